//! A device: its durable store and its settings, shared by every session it runs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keav_proto::cache::{LockoutPolicy, Mode, Zid};
use keav_proto::handshake::Config;
use keav_proto::record::RatchetPolicy;
use keav_store::Store;
use keav_verify::{Backend, VerifySecret};

use crate::Error;

/// How a device pairs. `Default` gives `normal` mode, CPace then SMP, no verification secret
/// (verification runs *unbound*), KEAV required, 10 s handshake deadline.
#[derive(Clone)]
pub struct DeviceSettings {
    /// Key-continuity mode.
    pub mode: Mode,
    /// Equality-test backends in order of preference.
    pub backends: Vec<Backend>,
    /// The verification secret shared with the peers (pairing code, keyset key), if any.
    pub verify_secret: Option<VerifySecret>,
    /// Attempt limits for the equality test.
    pub lockout: LockoutPolicy,
    /// Refuse peers that do not speak KEAV verification (default true).
    pub require_keav: bool,
    /// Accept a cache mismatch repaired only by an unbound test (default false).
    pub allow_repair: bool,
    /// Deadline for a whole handshake, connection set-up included (default 10 s).
    pub handshake_timeout: Duration,
    /// When the channel keys ratchet.
    pub ratchet: RatchetPolicy,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            mode: Mode::NORMAL,
            backends: vec![Backend::CPace, Backend::Smp],
            verify_secret: None,
            lockout: LockoutPolicy::default(),
            require_keav: true,
            allow_repair: false,
            handshake_timeout: Duration::from_secs(10),
            ratchet: RatchetPolicy::default(),
        }
    }
}

impl core::fmt::Debug for DeviceSettings {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceSettings")
            .field("mode", &self.mode)
            .field("backends", &self.backends)
            .field(
                "verify_secret",
                &self.verify_secret.as_ref().map(|_| "<set>"),
            )
            .field("lockout", &self.lockout)
            .field("require_keav", &self.require_keav)
            .field("allow_repair", &self.allow_repair)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    zid: Zid,
    settings: DeviceSettings,
}

/// A cheaply clonable handle on one device: its store (identity, retained secrets, lockout
/// counters) and its settings. Every session of the device goes through the same store.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device")
            .field("zid", &self.inner.zid)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl Device {
    /// Opens (or creates) the store at `path` and wraps it. A damaged or unreadable store is
    /// [`Error::Store`].
    pub fn open(path: impl AsRef<Path>, settings: DeviceSettings) -> Result<Device, Error> {
        let store = Store::open(path.as_ref())?;
        Self::from_store(store, settings)
    }

    /// Wraps an already opened store.
    pub fn from_store(store: Store, settings: DeviceSettings) -> Result<Device, Error> {
        if settings.handshake_timeout.is_zero() {
            return Err(Error::InvalidInput("handshake timeout must be positive"));
        }
        let zid = store.identity()?.zid;
        Ok(Device {
            inner: Arc::new(Inner {
                store,
                zid,
                settings,
            }),
        })
    }

    /// This device's ZID (its store identity).
    pub fn zid(&self) -> Zid {
        self.inner.zid
    }

    /// The device store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The device settings.
    pub fn settings(&self) -> &DeviceSettings {
        &self.inner.settings
    }

    /// A fresh handshake configuration for one session.
    pub fn handshake_config(&self) -> Config {
        let s = &self.inner.settings;
        let mut cfg = Config::new(self.inner.zid, s.mode);
        cfg.backends = s.backends.clone();
        cfg.verify_secret = s.verify_secret.clone();
        cfg.require_keav = s.require_keav;
        cfg.allow_repair = s.allow_repair;
        cfg.lockout = s.lockout;
        cfg.handshake_timeout_ms =
            u64::try_from(s.handshake_timeout.as_millis()).unwrap_or(u64::MAX);
        cfg
    }
}
