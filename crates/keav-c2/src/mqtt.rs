//! MQTT plumbing shared by the C2 server and the device agent (rumqttc, plain TCP).
//!
//! [`connect`] logs in with a user name and password (the broker's ACLs confine the account;
//! Mosquitto uses the user name as the client id, so each account has one connection), waits
//! for the first CONNACK and SUBACK, and then keeps the connection up: on a loss it reconnects
//! with exponential backoff (100 ms to 30 s) and subscribes again (sessions are clean).
//!
//! - Inbound messages arrive on a bounded channel ([`Inbound`]); the event loop waits when it
//!   is full, so a slow consumer slows the broker down rather than growing a queue.
//! - Payloads longer than [`LinkOptions::max_payload`] are dropped and counted
//!   ([`MqttLink::oversized`]) before anyone parses them; packets beyond four times that
//!   are refused by the MQTT codec itself (the connection is dropped and re-made).
//! - [`MqttLink::publish`] never waits: messages go to a publisher task through an unbounded
//!   queue, so a consumer that publishes while handling an inbound message can never
//!   deadlock against the event loop that feeds it. Publishing is QoS 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::identity::BrokerPassword;
use crate::wire::MAX_MESSAGE_LEN;

/// Why an MQTT link could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MqttError {
    /// The broker address is not `host:port`.
    #[error("broker address must be host:port")]
    BadAddress,
    /// The broker refused the connection: CONNACK return `code` (MQTT 3.1.1). Only codes
    /// [`BAD_USER_NAME_OR_PASSWORD`] and [`NOT_AUTHORIZED`] are about the credentials (the
    /// account may be gone: revoked); see [`refuses_credentials`].
    #[error("the broker refused the connection ({reason})")]
    Refused {
        /// The CONNACK return code.
        code: u8,
        /// Its name.
        reason: String,
    },
    /// The broker refused the subscription.
    #[error("the broker refused the subscription")]
    SubscriptionRefused,
    /// The connection failed before it was up.
    #[error("MQTT connection failed: {0}")]
    Connection(String),
    /// The broker did not answer in time.
    #[error("the broker did not answer in time")]
    Timeout,
}

/// CONNACK return code 4 (MQTT 3.1.1): bad user name or password.
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
/// CONNACK return code 5 (MQTT 3.1.1): not authorised.
pub const NOT_AUTHORIZED: u8 = 5;

/// Whether a CONNACK refusal `code` is about the credentials (codes 4 and 5), the only
/// refusals that may mean the account was revoked; the others (server unavailable, protocol
/// version, client id) say nothing about the account.
pub fn refuses_credentials(code: u8) -> bool {
    code == BAD_USER_NAME_OR_PASSWORD || code == NOT_AUTHORIZED
}

impl MqttError {
    /// Whether this is a refusal of the credentials ([`refuses_credentials`]).
    pub fn refuses_credentials(&self) -> bool {
        matches!(self, MqttError::Refused { code, .. } if refuses_credentials(*code))
    }
}

/// How a link connects.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// `host:port` of the broker.
    pub broker: String,
    /// The account's user name (also the client id).
    pub username: String,
    /// The account's password.
    pub password: BrokerPassword,
    /// The one topic filter to subscribe to.
    pub subscribe: String,
    /// Largest payload accepted (larger ones are dropped and counted).
    pub max_payload: usize,
    /// Capacity of the inbound channel.
    pub inbound_capacity: usize,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long [`connect`] waits for the first CONNACK and SUBACK.
    pub connect_timeout: Duration,
}

impl LinkOptions {
    /// Options with the defaults: payloads up to [`MAX_MESSAGE_LEN`], 1024 inbound messages
    /// queued, 30 s keep-alive, 10 s to connect.
    pub fn new(
        broker: impl Into<String>,
        username: impl Into<String>,
        password: BrokerPassword,
        subscribe: impl Into<String>,
    ) -> LinkOptions {
        LinkOptions {
            broker: broker.into(),
            username: username.into(),
            password,
            subscribe: subscribe.into(),
            max_payload: MAX_MESSAGE_LEN,
            inbound_capacity: 1024,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// One message the broker delivered.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Its topic.
    pub topic: String,
    /// Its payload (at most [`LinkOptions::max_payload`] bytes).
    pub payload: Bytes,
}

#[derive(Debug, Default)]
struct Stats {
    oversized: AtomicU64,
    connected: AtomicBool,
    refusals: AtomicU64,
}

/// A live MQTT connection (see the module docs). Dropping it stops its tasks.
#[derive(Debug)]
pub struct MqttLink {
    out: mpsc::UnboundedSender<(String, Bytes)>,
    client: AsyncClient,
    stats: Arc<Stats>,
    tasks: Vec<JoinHandle<()>>,
}

impl MqttLink {
    /// Queues `payload` for `topic` (QoS 1, not retained). Returns at once.
    pub fn publish(&self, topic: String, payload: impl Into<Bytes>) {
        if self.out.send((topic, payload.into())).is_err() {
            tracing::warn!("MQTT publisher stopped; message not sent");
        }
    }

    /// Inbound payloads dropped for being longer than the limit.
    pub fn oversized(&self) -> u64 {
        self.stats.oversized.load(Ordering::Relaxed)
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }

    /// Times the broker refused a reconnection for the credentials (CONNACK codes 4 and 5,
    /// [`refuses_credentials`]: e.g. the account was revoked); other refusals are not
    /// counted.
    pub fn refusals(&self) -> u64 {
        self.stats.refusals.load(Ordering::Relaxed)
    }

    /// Disconnects and stops the tasks.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.disconnect()).await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn host_port(addr: &str) -> Result<(String, u16), MqttError> {
    let addr = addr.strip_prefix("mqtt://").unwrap_or(addr);
    let (h, p) = addr.rsplit_once(':').ok_or(MqttError::BadAddress)?;
    let port = p.parse::<u16>().map_err(|_| MqttError::BadAddress)?;
    if h.is_empty() || port == 0 {
        return Err(MqttError::BadAddress);
    }
    Ok((h.trim_matches(['[', ']']).to_string(), port))
}

/// Connects (see the module docs); returns the link and its inbound channel once the first
/// subscription is granted.
pub async fn connect(
    options: LinkOptions,
) -> Result<(MqttLink, mpsc::Receiver<Inbound>), MqttError> {
    let (host, port) = host_port(&options.broker)?;
    let mut mo = MqttOptions::new(options.username.clone(), host, port);
    mo.set_keep_alive(options.keep_alive.max(Duration::from_secs(5)));
    mo.set_clean_session(true);
    mo.set_credentials(options.username.clone(), options.password.expose());
    let slack = 1024;
    mo.set_max_packet_size(
        options.max_payload.saturating_mul(4).saturating_add(slack),
        options.max_payload.saturating_add(slack),
    );
    let (client, eventloop) = AsyncClient::new(mo, 256);
    let (in_tx, in_rx) = mpsc::channel(options.inbound_capacity.max(1));
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(String, Bytes)>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let stats = Arc::new(Stats::default());
    let pump = tokio::spawn(event_loop(
        eventloop,
        client.clone(),
        options.subscribe.clone(),
        options.max_payload,
        in_tx,
        stats.clone(),
        ready_tx,
    ));
    let pub_client = client.clone();
    let publisher = tokio::spawn(async move {
        while let Some((topic, payload)) = out_rx.recv().await {
            if let Err(e) = pub_client
                .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!(error = %e, "MQTT publish request failed");
            }
        }
    });
    let link = MqttLink {
        out: out_tx,
        client,
        stats,
        tasks: vec![pump, publisher],
    };
    match tokio::time::timeout(options.connect_timeout, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((link, in_rx)),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(MqttError::Connection("event loop stopped".into())),
        Err(_) => Err(MqttError::Timeout),
    }
}

/// A refusal's code and name, if `e` is one.
fn refusal(e: &ConnectionError) -> Option<(u8, String)> {
    match e {
        ConnectionError::ConnectionRefused(code) => Some((
            *code as u8,
            match code {
                ConnectReturnCode::NotAuthorized => "not authorised".to_string(),
                ConnectReturnCode::BadUserNamePassword => "bad user name or password".to_string(),
                other => format!("{other:?}"),
            },
        )),
        _ => None,
    }
}

async fn event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    max_payload: usize,
    inbound: mpsc::Sender<Inbound>,
    stats: Arc<Stats>,
    ready: oneshot::Sender<Result<(), MqttError>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.payload.len() > max_payload {
                    stats.oversized.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        topic = %p.topic,
                        len = p.payload.len(),
                        "oversized MQTT payload dropped"
                    );
                    continue;
                }
                let msg = Inbound {
                    topic: p.topic,
                    payload: p.payload,
                };
                if inbound.send(msg).await.is_err() {
                    return; // nobody listens any more
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                stats.connected.store(true, Ordering::Relaxed);
                // Through a task: the request queue is drained by this very loop.
                let (client, filter) = (client.clone(), filter.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::debug!(error = %e, "MQTT subscribe request failed");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                let ok = s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if let Some(r) = ready.take() {
                    let _ = r.send(if ok {
                        Ok(())
                    } else {
                        Err(MqttError::SubscriptionRefused)
                    });
                    if !ok {
                        return;
                    }
                } else if !ok {
                    tracing::warn!("the broker refused the subscription after a reconnection");
                }
            }
            Ok(Event::Incoming(Packet::Disconnect)) => {
                stats.connected.store(false, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                stats.connected.store(false, Ordering::Relaxed);
                let refused = refusal(&e);
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(match refused {
                        Some((code, reason)) => MqttError::Refused { code, reason },
                        None => MqttError::Connection(e.to_string()),
                    }));
                    return;
                }
                if refused.is_some_and(|(code, _)| refuses_credentials(code)) {
                    stats.refusals.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection lost");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            host_port("127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            host_port("mqtt://localhost:99").unwrap(),
            ("localhost".into(), 99)
        );
        assert!(host_port("localhost").is_err());
        assert!(host_port(":1").is_err());
        assert!(host_port("h:0").is_err());
        assert!(host_port("h:x").is_err());
    }

    /// Only the credential refusals (codes 4 and 5) count as such; the code comes through.
    #[test]
    fn refusal_codes() {
        let codes = [
            (ConnectReturnCode::RefusedProtocolVersion, 1, false),
            (ConnectReturnCode::BadClientId, 2, false),
            (ConnectReturnCode::ServiceUnavailable, 3, false),
            (ConnectReturnCode::BadUserNamePassword, 4, true),
            (ConnectReturnCode::NotAuthorized, 5, true),
        ];
        for (rc, code, credentials) in codes {
            let (got, _) = refusal(&ConnectionError::ConnectionRefused(rc)).unwrap();
            assert_eq!(got, code);
            assert_eq!(refuses_credentials(got), credentials, "{rc:?}");
            let e = MqttError::Refused {
                code: got,
                reason: String::new(),
            };
            assert_eq!(e.refuses_credentials(), credentials, "{rc:?}");
        }
        assert!(!refuses_credentials(0));
        assert!(!MqttError::Timeout.refuses_credentials());
        assert!(refusal(&ConnectionError::RequestsDone).is_none());
    }
}
