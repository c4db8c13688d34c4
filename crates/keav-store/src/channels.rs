//! Persisted record-layer state of durable channels (docs/MESSAGING.md, "Durable channels").
//!
//! Table `keav_channels`: key `peer handle (16) ‖ channel id (u32 BE)`, value one record in the
//! store's checksummed format (see `codec`): `'C' ‖ version 1 ‖ flags u8 (bit 0 sealer, bit 1
//! opener) ‖ [len u32 LE ‖ SealerState] ‖ [len u32 LE ‖ OpenerState] ‖ check`, the states in
//! keav-proto's own versioned encoding, which is validated again on read. The checksum binds
//! the table key, so a record copied under another peer or channel is refused too. Any
//! failure is [`Error::CorruptChannel`]; a damaged state is never returned.
//!
//! Each call is one write transaction (`Durability::Immediate` like every store write), so a
//! crash leaves either the old or the new state. [`Store::forget`] removes a peer's channels
//! with its record.

use keav_proto::record::{OpenerState, SealerState};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use zeroize::Zeroizing;

use crate::{codec, Error, PeerId, Store, PEERS};

/// Peer handle ‖ channel id (big-endian, so a peer's channels are one key range) -> record.
const CHANNELS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keav_channels");

const CHANNEL_TAG: u8 = b'C';
const CHANNEL_VERSION: u8 = 1;
const F_SEALER: u8 = 1 << 0;
const F_OPENER: u8 = 1 << 1;
/// Upper bound of one encoded state (the keav-proto encodings are a few hundred bytes).
const MAX_STATE_LEN: usize = 4096;

/// The persisted state of one durable channel: our sending direction and the peer's, each
/// absent once closed (or not yet set up).
///
/// `Debug` shows no key material (see [`SealerState`], [`OpenerState`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelState {
    /// Our sending direction.
    pub sealer: Option<SealerState>,
    /// The peer's sending direction.
    pub opener: Option<OpenerState>,
}

fn key(peer: &PeerId, channel: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    let (p, c) = k.split_at_mut(16);
    p.copy_from_slice(peer);
    c.copy_from_slice(&channel.to_be_bytes());
    k
}

fn encode(key: &[u8], state: &ChannelState) -> Zeroizing<Vec<u8>> {
    let sealer = state.sealer.as_ref().map(SealerState::encode);
    let opener = state.opener.as_ref().map(OpenerState::encode);
    let parts = [sealer, opener];
    let len: usize = parts.iter().flatten().map(|p| 4 + p.len()).sum();
    // Sized up front (with the checksum) so that no reallocation leaves key bytes behind.
    let mut b = Zeroizing::new(Vec::with_capacity(3 + len + 16));
    b.push(CHANNEL_TAG);
    b.push(CHANNEL_VERSION);
    let mut flags = 0;
    for (part, bit) in parts.iter().zip([F_SEALER, F_OPENER]) {
        if part.is_some() {
            flags |= bit;
        }
    }
    b.push(flags);
    for p in parts.iter().flatten() {
        // Encodings are far below 4 GiB; the cast cannot truncate.
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
    }
    codec::seal(key, b)
}

/// Takes one length-prefixed state off the front of `rest`.
fn take_part<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    if len > MAX_STATE_LEN {
        return None;
    }
    let (part, tail) = tail.split_at_checked(len)?;
    *rest = tail;
    Some(part)
}

fn decode(key: &[u8], bytes: &[u8]) -> Option<ChannelState> {
    let sealed = codec::unseal(key, bytes)?;
    let (&[tag, version, flags], mut rest) = sealed.split_first_chunk::<3>()?;
    if tag != CHANNEL_TAG || version != CHANNEL_VERSION || flags & !(F_SEALER | F_OPENER) != 0 {
        return None;
    }
    let sealer = if flags & F_SEALER != 0 {
        Some(SealerState::decode(take_part(&mut rest)?).ok()?)
    } else {
        None
    };
    let opener = if flags & F_OPENER != 0 {
        Some(OpenerState::decode(take_part(&mut rest)?).ok()?)
    } else {
        None
    };
    rest.is_empty().then_some(ChannelState { sealer, opener })
}

/// Removes every channel of `peer` (inside the caller's transaction).
pub(crate) fn remove_peer(txn: &WriteTransaction, peer: &PeerId) -> Result<(), Error> {
    let (lo, hi) = (key(peer, 0), key(peer, u32::MAX));
    let mut t = txn.open_table(CHANNELS)?;
    let keys: Vec<Vec<u8>> = t
        .range(lo.as_slice()..=hi.as_slice())?
        .map(|e| e.map(|(k, _)| k.value().to_vec()))
        .collect::<Result<_, _>>()?;
    for k in keys {
        t.remove(k.as_slice())?;
    }
    Ok(())
}

impl Store {
    /// Stores the state of channel `channel` with `peer`, replacing any earlier one, in one
    /// committed transaction. [`Error::NotFound`] if there is no peer record `peer`.
    ///
    /// Store the sealer state before any record sealed after its export leaves the process
    /// (keav-proto's [`Sealer::export_state`](keav_proto::record::Sealer::export_state)).
    pub fn put_channel_state(
        &self,
        peer: &PeerId,
        channel: u32,
        state: &ChannelState,
    ) -> Result<(), Error> {
        let k = key(peer, channel);
        let enc = encode(&k, state);
        self.write(|txn| {
            if txn.open_table(PEERS)?.get(peer.as_slice())?.is_none() {
                return Err(Error::NotFound);
            }
            txn.open_table(CHANNELS)?
                .insert(k.as_slice(), enc.as_slice())?;
            Ok(())
        })
    }

    /// The stored state of channel `channel` with `peer`, if any; [`Error::CorruptChannel`]
    /// if the record fails its checksum or does not decode to valid states.
    pub fn channel_state(
        &self,
        peer: &PeerId,
        channel: u32,
    ) -> Result<Option<ChannelState>, Error> {
        let k = key(peer, channel);
        self.read(|rtx| {
            let t = match rtx.open_table(CHANNELS) {
                Ok(t) => t,
                // A store written before the first channel has no such table.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let Some(v) = t.get(k.as_slice())? else {
                return Ok(None);
            };
            decode(&k, v.value())
                .map(Some)
                .ok_or(Error::CorruptChannel {
                    peer: *peer,
                    channel,
                })
        })
    }

    /// Deletes the state of channel `channel` with `peer` (damaged or not) in one committed
    /// transaction; returns whether there was one.
    pub fn delete_channel_state(&self, peer: &PeerId, channel: u32) -> Result<bool, Error> {
        let k = key(peer, channel);
        self.write(|txn| Ok(txn.open_table(CHANNELS)?.remove(k.as_slice())?.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keav_proto::cache::Mode;
    use keav_proto::handshake::Role;
    use keav_proto::record::{
        channel_from_parts, Aead, Opener, RatchetPolicy, RecordError, Sealer,
    };
    use keav_proto::secret::Secret32;

    const POLICY: RatchetPolicy = RatchetPolicy {
        every_records_log2: 2,
        every_ms: u64::MAX,
    };

    fn ends() -> (Sealer, Opener) {
        let k = Secret32::new([7; 32]);
        let (s, _) = channel_from_parts(&k, b"ctx", Role::Initiator, Aead::Aes256Gcm, POLICY, 0);
        let (_, o) = channel_from_parts(&k, b"ctx", Role::Responder, Aead::Aes256Gcm, POLICY, 0);
        (s, o)
    }

    fn seal(s: &mut Sealer, i: u8) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(&[i; 10], 0, &mut out).unwrap();
        out
    }

    fn open_store() -> (tempfile::TempDir, std::path::PathBuf, Store, PeerId) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open_at(&path, 1).unwrap();
        let peer = store.create_peer(None, None, Mode::default(), 1).unwrap();
        (dir, path, store, peer)
    }

    /// Overwrites the raw value of a channel record (simulated damage or copying).
    fn raw_put(store: &Store, k: &[u8], v: &[u8]) {
        store
            .write(|txn| {
                txn.open_table(CHANNELS)?.insert(k, v)?;
                Ok(())
            })
            .unwrap();
    }

    fn raw_get(store: &Store, k: &[u8]) -> Vec<u8> {
        store
            .read(|rtx| Ok(rtx.open_table(CHANNELS)?.get(k)?.unwrap().value().to_vec()))
            .unwrap()
    }

    #[test]
    fn states_survive_a_reopen_and_the_channel_continues() {
        let (_dir, path, store, peer) = open_store();
        assert_eq!(store.channel_state(&peer, 1).unwrap(), None);
        let (mut s, mut o) = ends();
        let (mut twin, _) = ends();
        for i in 0..6 {
            let r = seal(&mut s, i);
            assert_eq!(r, seal(&mut twin, i));
            o.open(&mut r.clone(), 0).unwrap();
        }
        let state = ChannelState {
            sealer: s.export_state(),
            opener: o.export_state(),
        };
        store.put_channel_state(&peer, 1, &state).unwrap();
        store
            .put_channel_state(&peer, 2, &ChannelState::default())
            .unwrap();
        drop((s, o, store));

        let store = Store::open_at(&path, 2).unwrap();
        let back = store.channel_state(&peer, 1).unwrap().unwrap();
        assert!(back == state);
        assert_eq!(
            store.channel_state(&peer, 2).unwrap(),
            Some(ChannelState::default())
        );
        assert_eq!(store.channel_state(&peer, 3).unwrap(), None);

        let mut s = Sealer::from_state(back.sealer.as_ref().unwrap(), 0).unwrap();
        let mut o = Opener::from_state(back.opener.as_ref().unwrap(), 0).unwrap();
        let (mut s0, _) = ends();
        let first = seal(&mut s0, 0);
        assert_eq!(o.open(&mut first.clone(), 0), Err(RecordError::Replay));
        for i in 6..12 {
            let r = seal(&mut s, i);
            assert_eq!(r, seal(&mut twin, i));
            o.open(&mut r.clone(), 0).unwrap();
        }
    }

    #[test]
    fn delete_and_forget_remove_channels() {
        let (_dir, _path, store, peer) = open_store();
        let other = store.create_peer(None, None, Mode::default(), 1).unwrap();
        let (s, _) = ends();
        let st = ChannelState {
            sealer: s.export_state(),
            opener: None,
        };
        for ch in [0, 5, u32::MAX] {
            store.put_channel_state(&peer, ch, &st).unwrap();
        }
        store.put_channel_state(&other, 5, &st).unwrap();
        assert!(store.delete_channel_state(&peer, 5).unwrap());
        assert!(!store.delete_channel_state(&peer, 5).unwrap());
        assert_eq!(store.channel_state(&peer, 5).unwrap(), None);
        assert!(store.channel_state(&peer, 0).unwrap().is_some());

        assert!(store.forget(&peer).unwrap());
        for ch in [0, u32::MAX] {
            assert_eq!(store.channel_state(&peer, ch).unwrap(), None);
        }
        assert!(store.channel_state(&other, 5).unwrap() == Some(st.clone()));
        // No channel for a peer the store does not know.
        assert!(matches!(
            store.put_channel_state(&peer, 0, &st),
            Err(Error::NotFound)
        ));
    }

    #[test]
    fn damaged_or_moved_records_are_reported_never_returned() {
        let (_dir, _path, store, peer) = open_store();
        let (mut s, mut o) = ends();
        let r = seal(&mut s, 0);
        o.open(&mut r.clone(), 0).unwrap();
        let st = ChannelState {
            sealer: s.export_state(),
            opener: o.export_state(),
        };
        store.put_channel_state(&peer, 1, &st).unwrap();
        let k = key(&peer, 1);
        let good = raw_get(&store, &k);
        let corrupt = |r: Result<Option<ChannelState>, Error>, ch: u32| {
            assert!(
                matches!(r, Err(Error::CorruptChannel { peer: p, channel }) if p == peer && channel == ch),
                "{r:?}"
            );
        };
        // Every single-bit flip and every truncation.
        for bit in (0..good.len() * 8).step_by(5) {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            raw_put(&store, &k, &b);
            corrupt(store.channel_state(&peer, 1), 1);
        }
        for n in [0, 1, 3, good.len() / 2, good.len() - 1] {
            raw_put(&store, &k, &good[..n]);
            corrupt(store.channel_state(&peer, 1), 1);
        }
        // A valid record copied under another channel id.
        raw_put(&store, &key(&peer, 2), &good);
        corrupt(store.channel_state(&peer, 2), 2);
        // A correct checksum over a state keav-proto refuses (next_seq = u64::MAX).
        let mut enc = st.sealer.as_ref().unwrap().encode().to_vec();
        let n = enc.len();
        enc[n - 16..n - 8].copy_from_slice(&u64::MAX.to_be_bytes());
        let mut body = Zeroizing::new(vec![CHANNEL_TAG, CHANNEL_VERSION, F_SEALER]);
        body.extend_from_slice(&(enc.len() as u32).to_le_bytes());
        body.extend_from_slice(&enc);
        raw_put(&store, &k, &codec::seal(&k, body));
        corrupt(store.channel_state(&peer, 1), 1);
        // Deleting a damaged record works, and the good one reads back after a rewrite.
        assert!(store.delete_channel_state(&peer, 1).unwrap());
        store.put_channel_state(&peer, 1, &st).unwrap();
        assert!(store.channel_state(&peer, 1).unwrap() == Some(st));
    }
}
