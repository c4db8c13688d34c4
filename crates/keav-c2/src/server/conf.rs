//! Optional confidentiality in the server: one [`Confidential`] per device, persisted in the
//! registry ([`BlobKind::Confidential`]) beside the device's replay counters, and the
//! operator's policy per device ([`BlobKind::ConfidentialPolicy`]).
//!
//! Inbound (after the engine verified, admitted and persisted the C2 message):
//! - a Generic whose bytes are a frame ([`confidential::is_frame`]) goes to
//!   [`Confidential::handle_frame`]; the state is stored, then the answers go out as Generic
//!   commands;
//! - a Data with the id [`confidential::SEALED_DATA_ID`] goes to
//!   [`Confidential::open_data`]; the state is stored, then the opened Data is announced as
//!   [`ServerNotice::ConfidentialData`];
//! - plain Data or Generic from a device whose policy requires confidentiality is refused
//!   (not announced), logged and counted ([`ConfCounters::plain_refused`]).
//!
//! Lock order: the engine, then the confidential slots.

use std::collections::HashMap;
use std::convert::Infallible;

use rand_core::OsRng;

use super::{Inner, ServerError, ServerNotice};
use crate::confidential::{
    self, ConfError, ConfEvent, Confidential, ConfidentialConfig, Pairing, SessionId, Side,
    StoreFirst,
};
use crate::engine::{ServerEngine, ServerEvent};
use crate::keys::DeviceId;
use crate::registry::{BlobKind, DeviceStatus, Registry};
use crate::wire::{Body, Data, Token};

/// Milliseconds since the Unix epoch (the confidential layer's clock).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A device's confidential slot: its session object (once one was started by either side)
/// and whether the operator requires confidentiality.
#[derive(Default)]
pub(super) struct ConfSlot {
    pub(super) conf: Option<Confidential>,
    pub(super) required: bool,
}

/// Counters of the confidential layer (the engine's own counters count C2 messages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfCounters {
    /// Sessions established (first sessions and rekeys).
    pub established: u64,
    /// Handshakes that failed.
    pub failed: u64,
    /// Handshake frames refused (malformed, unexpected, contention).
    pub frames_refused: u64,
    /// Sealed data opened.
    pub opened: u64,
    /// Sealed data that did not open (no session, forged, replayed, bad content).
    pub records_refused: u64,
    /// Data sealed and sent.
    pub sealed: u64,
    /// Plain data or generic messages refused from devices that must be confidential.
    pub plain_refused: u64,
}

impl ConfCounters {
    /// The counters as (name, value) pairs.
    pub fn named(&self) -> Vec<(String, u64)> {
        [
            ("established", self.established),
            ("failed", self.failed),
            ("frames_refused", self.frames_refused),
            ("opened", self.opened),
            ("records_refused", self.records_refused),
            ("sealed", self.sealed),
            ("plain_refused", self.plain_refused),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect()
    }
}

/// Something the confidential layer did for a device ([`ServerNotice::Confidential`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfNotice {
    /// A session was established.
    Established {
        /// Its id.
        session: SessionId,
        /// It replaced a previous session.
        rekey: bool,
        /// Key continuity held (a retained secret matched).
        cache_matched: bool,
    },
    /// A handshake failed (the previous session, if any, stays in use).
    Failed {
        /// Why.
        reason: String,
    },
    /// A message was refused by the confidential layer (after the C2 checks passed).
    Refused {
        /// Why.
        reason: String,
    },
}

/// Where a device's confidentiality stands ([`super::Server::confidential_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfidentialInfo {
    /// The device.
    pub device: DeviceId,
    /// Whether the operator requires confidentiality.
    pub required: bool,
    /// Whether a session is established.
    pub established: bool,
    /// Whether a handshake is in progress.
    pub handshaking: bool,
    /// The session's id.
    pub session: Option<SessionId>,
    /// Sessions completed with the device.
    pub sessions: u64,
    /// Records sealed in the current session.
    pub records_sealed: u64,
    /// Records opened in the current session.
    pub records_opened: u64,
}

fn pairing(
    eng: &ServerEngine,
    server: &crate::keys::PublicKey,
    device: DeviceId,
) -> Option<Pairing> {
    eng.device(device).map(|v| Pairing::new(server, &v.key))
}

impl<R: Registry> Inner<R> {
    fn conf_count(&self, f: impl FnOnce(&mut ConfCounters)) {
        if let Ok(mut c) = self.conf_counters.lock() {
            f(&mut c);
        }
    }

    fn conf_notice(&self, device: DeviceId, n: ConfNotice) {
        self.notice(ServerNotice::Confidential { device, notice: n });
    }

    /// Stores a confidential state durably, then yields the value.
    pub(super) async fn conf_persist<T>(
        &self,
        device: DeviceId,
        sf: StoreFirst<T>,
    ) -> Result<T, ServerError> {
        self.registry
            .store_blob(BlobKind::Confidential, device, sf.state().to_vec())
            .await?;
        Ok(sf
            .persist(|_| Ok::<(), Infallible>(()))
            .unwrap_or_else(|e| match e {}))
    }

    /// Loads every device's confidential state and policy (server start).
    pub(super) async fn load_confidential(
        registry: &R,
        eng: &ServerEngine,
        server: &crate::keys::PublicKey,
        devices: &[DeviceId],
    ) -> Result<HashMap<DeviceId, ConfSlot>, ServerError> {
        let mut slots = HashMap::new();
        let now_ms = unix_now_ms();
        for &d in devices {
            let required = registry
                .load_blob(BlobKind::ConfidentialPolicy, d)
                .await?
                .is_some_and(|b| b == [1]);
            let conf = match (
                registry.load_blob(BlobKind::Confidential, d).await?,
                pairing(eng, server, d),
            ) {
                (Some(state), Some(p)) => {
                    let state = zeroize::Zeroizing::new(state);
                    match Confidential::from_state(
                        &state,
                        Side::Server,
                        p,
                        ConfidentialConfig::default(),
                        now_ms,
                    ) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::error!(device = %d, error = %e, "stored confidential state unreadable");
                            return Err(ServerError::Corrupt("confidential state"));
                        }
                    }
                }
                _ => None,
            };
            if required || conf.is_some() {
                slots.insert(d, ConfSlot { conf, required });
            }
        }
        Ok(slots)
    }

    /// Sends handshake frames to `device` as Generic commands (counters stored first).
    async fn send_frames(
        &self,
        eng: &mut ServerEngine,
        device: DeviceId,
        frames: Vec<Vec<u8>>,
    ) -> Result<Vec<Token>, ServerError> {
        let (now, expiry) = self.expiry(None);
        let mut tokens = Vec::with_capacity(frames.len());
        for f in frames {
            let mp = eng.command(device, confidential::handshake_body(f), expiry, now)?;
            let o = self.persist(mp).await?;
            tokens.push(o.token.clone());
            self.publish(o);
        }
        Ok(tokens)
    }

    fn conf_events(&self, device: DeviceId, events: Vec<ConfEvent>) {
        for ev in events {
            match ev {
                ConfEvent::Established {
                    session,
                    rekey,
                    cache_matched,
                    ..
                } => {
                    tracing::info!(%device, ?session, rekey, "confidential session established");
                    self.conf_count(|c| c.established += 1);
                    self.conf_notice(
                        device,
                        ConfNotice::Established {
                            session,
                            rekey,
                            cache_matched,
                        },
                    );
                }
                ConfEvent::Failed { error, .. } => {
                    tracing::warn!(%device, %error, "confidential handshake failed");
                    self.conf_count(|c| c.failed += 1);
                    self.conf_notice(
                        device,
                        ConfNotice::Failed {
                            reason: error.to_string(),
                        },
                    );
                }
            }
        }
    }

    fn refuse(&self, device: DeviceId, reason: String, count: impl FnOnce(&mut ConfCounters)) {
        tracing::warn!(%device, %reason, "refused by the confidential layer");
        self.conf_count(count);
        self.conf_notice(device, ConfNotice::Refused { reason });
    }

    /// Takes the confidential messages out of an accepted message's events (handled here),
    /// refuses plain data from devices that must be confidential, and returns the rest.
    pub(super) async fn confidential_inbound(
        &self,
        eng: &mut ServerEngine,
        events: Vec<ServerEvent>,
    ) -> Vec<ServerEvent> {
        let mut rest = Vec::with_capacity(events.len());
        for ev in events {
            match ev {
                ServerEvent::Generic { device, data, .. } if confidential::is_frame(&data) => {
                    if let Err(e) = self.inbound_frame(eng, device, &data).await {
                        tracing::error!(%device, error = %e, "confidential frame not handled");
                    }
                }
                ServerEvent::Data {
                    device,
                    token,
                    data,
                } if data.id == confidential::SEALED_DATA_ID => {
                    self.inbound_sealed(device, token, &data).await;
                }
                ServerEvent::Data { device, .. } | ServerEvent::Generic { device, .. }
                    if self.required(device).await =>
                {
                    self.refuse(
                        device,
                        "plain message from a device that must be confidential".into(),
                        |c| c.plain_refused += 1,
                    );
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Whether the operator requires confidentiality for `device`.
    pub(super) async fn required(&self, device: DeviceId) -> bool {
        self.conf
            .lock()
            .await
            .get(&device)
            .is_some_and(|s| s.required)
    }

    async fn inbound_frame(
        &self,
        eng: &mut ServerEngine,
        device: DeviceId,
        frame: &[u8],
    ) -> Result<(), ServerError> {
        let Some(p) = pairing(eng, &self.public_key, device) else {
            return Ok(());
        };
        let now_ms = unix_now_ms();
        let mut slots = self.conf.lock().await;
        let slot = slots.entry(device).or_default();
        let conf = slot.conf.get_or_insert_with(|| {
            Confidential::new(Side::Server, p, ConfidentialConfig::default(), &mut OsRng)
        });
        let sf = match conf.handle_frame(frame, now_ms, &mut OsRng) {
            Ok(sf) => sf,
            Err(e) => {
                drop(slots);
                let level_info = matches!(e, ConfError::Contention);
                if level_info {
                    tracing::info!(%device, "device's handshake refused: ours continues");
                }
                self.refuse(device, format!("handshake frame: {e}"), |c| {
                    c.frames_refused += 1
                });
                return Ok(());
            }
        };
        let h = self.conf_persist(device, sf).await?;
        drop(slots);
        self.send_frames(eng, device, h.frames).await?;
        self.conf_events(device, h.events);
        Ok(())
    }

    async fn inbound_sealed(&self, device: DeviceId, token: Token, data: &Data) {
        let now_ms = unix_now_ms();
        let mut slots = self.conf.lock().await;
        let Some(conf) = slots.get_mut(&device).and_then(|s| s.conf.as_mut()) else {
            drop(slots);
            self.refuse(device, "sealed data without a session".into(), |c| {
                c.records_refused += 1
            });
            return;
        };
        let sf = match conf.open_data(data, now_ms) {
            Ok(sf) => sf,
            Err(e) => {
                drop(slots);
                self.refuse(device, format!("sealed data: {e}"), |c| {
                    c.records_refused += 1
                });
                return;
            }
        };
        let opened = match self.conf_persist(device, sf).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%device, error = %e, "confidential state not stored; data not delivered");
                return;
            }
        };
        drop(slots);
        self.conf_count(|c| c.opened += 1);
        self.notice(ServerNotice::ConfidentialData {
            device,
            token,
            data: opened,
        });
    }

    /// Drives handshake deadlines (tick).
    pub(super) async fn confidential_tick(&self) {
        let now_ms = unix_now_ms();
        let mut eng = self.engine.lock().await;
        let mut slots = self.conf.lock().await;
        let due: Vec<DeviceId> = slots
            .iter()
            .filter(|(_, s)| {
                s.conf
                    .as_ref()
                    .and_then(|c| c.poll_timeout())
                    .is_some_and(|t| t <= now_ms)
            })
            .map(|(d, _)| *d)
            .collect();
        for device in due {
            let Some(conf) = slots.get_mut(&device).and_then(|s| s.conf.as_mut()) else {
                continue;
            };
            let sf = conf.handle_timeout(now_ms, &mut OsRng);
            let h = match self.conf_persist(device, sf).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(%device, error = %e, "confidential state not stored");
                    continue;
                }
            };
            if let Err(e) = self.send_frames(&mut eng, device, h.frames).await {
                tracing::warn!(%device, error = %e, "handshake frames not sent");
            }
            self.conf_events(device, h.events);
        }
    }
}

impl<R: Registry> super::Server<R> {
    /// Starts a confidential session with `device` (or a rekey of the current one); returns
    /// the tokens of the handshake messages sent. The session is established once the
    /// device has answered ([`super::ServerNotice::Confidential`],
    /// [`super::Server::confidential_info`]).
    pub async fn confidential_start(&self, device: DeviceId) -> Result<Vec<Token>, ServerError> {
        let inner = &self.inner;
        let mut eng = inner.engine.lock().await;
        let view = eng
            .device(device)
            .ok_or(ServerError::UnknownDevice(device))?;
        match view.status {
            DeviceStatus::Joined => {}
            DeviceStatus::Revoked => return Err(crate::engine::EngineError::Revoked(device).into()),
            _ => return Err(crate::engine::EngineError::NotJoined(device).into()),
        }
        let p = Pairing::new(&inner.public_key, &view.key);
        let mut slots = inner.conf.lock().await;
        let slot = slots.entry(device).or_default();
        let conf = slot.conf.get_or_insert_with(|| {
            Confidential::new(Side::Server, p, ConfidentialConfig::default(), &mut OsRng)
        });
        let sf = conf
            .start(unix_now_ms(), &mut OsRng)
            .map_err(ServerError::Confidential)?;
        let h = inner.conf_persist(device, sf).await?;
        drop(slots);
        let tokens = inner.send_frames(&mut eng, device, h.frames).await?;
        inner.conf_events(device, h.events);
        Ok(tokens)
    }

    /// Sets whether `device` must be confidential: when required, plain data and generic
    /// messages from it are refused and counted, and plain data to it is not sent.
    pub async fn set_confidential_required(
        &self,
        device: DeviceId,
        required: bool,
    ) -> Result<(), ServerError> {
        if self.inner.engine.lock().await.device(device).is_none() {
            return Err(ServerError::UnknownDevice(device));
        }
        self.inner
            .registry
            .store_blob(
                BlobKind::ConfidentialPolicy,
                device,
                vec![u8::from(required)],
            )
            .await?;
        self.inner
            .conf
            .lock()
            .await
            .entry(device)
            .or_default()
            .required = required;
        tracing::info!(%device, required, "confidentiality policy set");
        Ok(())
    }

    /// Where `device`'s confidentiality stands.
    pub async fn confidential_info(
        &self,
        device: DeviceId,
    ) -> Result<ConfidentialInfo, ServerError> {
        if self.inner.engine.lock().await.device(device).is_none() {
            return Err(ServerError::UnknownDevice(device));
        }
        let slots = self.inner.conf.lock().await;
        let slot = slots.get(&device);
        let conf = slot.and_then(|s| s.conf.as_ref());
        Ok(ConfidentialInfo {
            device,
            required: slot.is_some_and(|s| s.required),
            established: conf.is_some_and(|c| c.is_established()),
            handshaking: conf.is_some_and(|c| c.is_handshaking()),
            session: conf.and_then(|c| c.session()),
            sessions: conf.map_or(0, |c| c.sessions()),
            records_sealed: conf.and_then(|c| c.records_sealed()).unwrap_or(0),
            records_opened: conf.and_then(|c| c.records_opened()).unwrap_or(0),
        })
    }

    /// Sends `data` to `device` sealed in its confidential session (the id and the value
    /// are hidden; the message is a signed C2 Data as any other). The confidential state is
    /// stored before the record leaves.
    pub async fn send_confidential(
        &self,
        device: DeviceId,
        data: Data,
    ) -> Result<Token, ServerError> {
        let inner = &self.inner;
        let (now, expiry) = inner.expiry(None);
        let mut eng = inner.engine.lock().await;
        match eng.device(device).map(|v| v.status) {
            None => return Err(ServerError::UnknownDevice(device)),
            Some(DeviceStatus::Joined) => {}
            Some(DeviceStatus::Revoked) => {
                return Err(crate::engine::EngineError::Revoked(device).into())
            }
            Some(_) => return Err(crate::engine::EngineError::NotJoined(device).into()),
        }
        let mut slots = inner.conf.lock().await;
        let conf = slots
            .get_mut(&device)
            .and_then(|s| s.conf.as_mut())
            .ok_or(ServerError::Confidential(ConfError::NoSession))?;
        let sf = conf
            .seal_data(&data, unix_now_ms())
            .map_err(ServerError::Confidential)?;
        let sealed = inner.conf_persist(device, sf).await?;
        drop(slots);
        let mp = eng.command(device, Body::Data(sealed), expiry, now)?;
        let o = inner.persist(mp).await?;
        let token = o.token.clone();
        inner.publish(o);
        inner.conf_count(|c| c.sealed += 1);
        Ok(token)
    }

    /// Counters of the confidential layer.
    pub fn confidential_counters(&self) -> ConfCounters {
        self.inner
            .conf_counters
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}
