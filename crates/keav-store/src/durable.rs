//! Persisted durable channels (docs/MESSAGING.md): per peer device name, the channel's key
//! state, its outbox (sealed records not yet acknowledged end to end) and its inbox (opened
//! messages not yet acknowledged by the application), written in one transaction per
//! [`Store::durable_commit`] so a crash leaves all of a batch or none of it.
//!
//! Tables: `keav_durable` (name → checksummed row), `keav_outbox` and `keav_inbox`
//! (name ‖ 0x00 ‖ seq u64 BE → bytes; the 0x00 cannot occur in a device name, so one
//! name's rows are one key range). Rows are checksummed and bound to their key like the
//! rest of the store; damage is [`Error::CorruptChannel`].

use zeroize::Zeroizing;

use crate::{Error, Store};

/// The persisted row of one durable channel. `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct DurableRow {
    /// The peer's ZID (its verified identity).
    pub peer_zid: [u8; 12],
    /// keav-proto's encoded `DurableState` (opaque here).
    pub state: Zeroizing<Vec<u8>>,
    /// The application acknowledged every message below this sequence number.
    pub delivered: u64,
}

impl core::fmt::Debug for DurableRow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableRow")
            .field("delivered", &self.delivered)
            .field("state_len", &self.state.len())
            .finish_non_exhaustive()
    }
}

/// Changes to one durable channel, applied with others in one transaction.
#[derive(Debug, Default)]
pub struct DurableUpdate {
    /// The peer device's name (1–64 chars of `[A-Za-z0-9_-]`).
    pub name: String,
    /// Replaces the row when set.
    pub row: Option<DurableRow>,
    /// Outbox rows to add (sequence number, payload).
    pub outbox_put: Vec<(u64, Vec<u8>)>,
    /// Deletes outbox rows with a sequence number below this.
    pub outbox_delete_below: Option<u64>,
    /// Inbox rows to add (sequence number, message).
    pub inbox_put: Vec<(u64, Zeroizing<Vec<u8>>)>,
    /// Deletes inbox rows with a sequence number below this.
    pub inbox_delete_below: Option<u64>,
}

impl Store {
    /// Applies `updates` in one write transaction (fsync once).
    pub fn durable_commit(&self, _updates: &[DurableUpdate]) -> Result<(), Error> {
        todo!()
    }

    /// The row of the durable channel with `name`.
    pub fn durable_row(&self, _name: &str) -> Result<Option<DurableRow>, Error> {
        todo!()
    }

    /// Names of all durable channels, sorted.
    pub fn durable_names(&self) -> Result<Vec<String>, Error> {
        todo!()
    }

    /// The outbox rows of `name`, in sequence order.
    pub fn durable_outbox(&self, _name: &str) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        todo!()
    }

    /// The inbox rows of `name`, in sequence order.
    pub fn durable_inbox(&self, _name: &str) -> Result<Vec<(u64, Zeroizing<Vec<u8>>)>, Error> {
        todo!()
    }

    /// Deletes the channel with `name` and all its rows; whether it existed.
    pub fn durable_delete(&self, _name: &str) -> Result<bool, Error> {
        todo!()
    }
}
