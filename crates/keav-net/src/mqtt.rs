//! KEAV over an MQTT broker: handshakes and records carried end to end as MQTT messages, so
//! the broker (and anyone who can read its topics) sees only RFC 6189 handshake packets and
//! AEAD records.
//!
//! # Topic scheme
//!
//! A device id is 1 to 64 characters of `[A-Za-z0-9_-]` (checked). Device `D`
//!
//! - receives on its inbox: it subscribes to `keav/v1/D/from/#` and accepts only topics
//!   `keav/v1/D/from/S` where `S` is a valid device id (the sender);
//! - sends to peer `P` on `keav/v1/P/from/D`.
//!
//! So a broker can confine each device to reading its own inbox and to publishing under its
//! own name; with Mosquitto, and the MQTT user name equal to the device id:
//!
//! ```text
//! pattern read  keav/v1/%u/from/#
//! pattern write keav/v1/+/from/%u
//! ```
//!
//! Without such ACLs the sender name in a topic is only a routing hint: the KEAV handshake
//! authenticates the peer (its ZID, retained secrets, equality test), never the topic.
//!
//! # Payloads
//!
//! One MQTT message (QoS 1, never retained) carries one datagram, classified by its first byte
//! as on UDP ([`crate::udp`]), except that handshake messages travel bare, as on every
//! stream or broker transport: `0x50` an RFC 6189 message (its preamble `0x505a`; no UDP
//! packet header or CRC, MQTT and TCP frame and check it), `0x17` a data record, `0x15` a
//! close record, `0x42` a record batch (several records of one channel in one message:
//! [`LinkOptions::coalesce_records`], [`keav_proto::record::batch`]). Messages larger than
//! [`LinkOptions::max_payload`], empty, unclassifiable, retained, or on a malformed topic are
//! dropped, logged (at debug level, without content) and counted in [`LinkStats`].
//!
//! # Channels
//!
//! Channels are datagram channels, as on UDP: the handshake retransmits on the core's timers
//! (a broker may lose messages across a reconnect), and records that fail to open — forged,
//! replayed, or QoS 1 duplicates — are dropped and counted
//! ([`Channel::dropped_records`](crate::session::Channel::dropped_records)), never delivered.
//! Flow control: each peer's incoming records wait in a queue of 256; when it is full the
//! event loop waits until the channel's reader has freed 32 places, or 250 ms, and then uses
//! whatever room there is (so a reader that is merely slower than the broker slows the link
//! down, as a plain subscriber would, and loses nothing); if the reader took nothing in
//! that time it drops the record and counts it as `dropped_busy`; a route that stalled
//! that long drops at once until its reader takes something again, so a reader that stopped
//! reading cannot hold the link up.
//!
//! [`Link`] is one MQTT connection of one device; everything but the MQTT client is shared
//! with the NATS carrier ([`crate::nats`]). Its event loop (a tokio task) routes each
//! incoming message by its sender: to the channel or handshake with that peer, or — a Hello
//! from a sender with no route — to [`Link::accept`]. Handshake messages from a sender other
//! than the expected peer therefore never reach a handshake. One route per peer: a new
//! [`Link::connect_peer`] to a peer replaces the previous route to it, and so does a Hello
//! from a peer whose channel is established when that Hello differs from the one that
//! started the channel's session (the peer started over, e.g. after a restart); a retransmitted
//! or duplicated Hello of the current session changes nothing. The replaced channel's
//! receiver ends with [`Error::Shutdown`]. Without broker ACLs, anyone who can publish under a
//! peer's name can thus cut that peer's channel off (never read or inject data).
//!
//! Reconnection: rumqttc reconnects when polled after an error; the event loop polls again
//! after a backoff (100 ms doubling to 30 s), then subscribes again (also with a persistent
//! session, in case the broker lost it). The first connection must succeed within
//! [`LinkOptions::connect_timeout`] or [`Link::connect`] fails. [`Link::connections`] counts
//! the connections the broker acknowledged (ConnAck).
//!
//! # Mail
//!
//! Durable payloads (`0x44`) and relay frames (`0x52`) are mail ([`crate::broker`]): sent
//! with [`Link::publish`] (QoS 1; `Ok(false)`: the PUBACK says only that the broker has it),
//! received through [`Link::take_mail`]. With a clean session (the default) mail published
//! while the device is offline is lost; with [`LinkOptions::persistent_session`] the broker
//! queues it for the device's session and delivers it after the reconnect.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::broker::{self, Feed, Hub, MailSource, Publisher, MQTT};
use crate::Error;

pub use crate::broker::{valid_device_id, LinkOptions, LinkStats, Mail, MailAck};

/// The topic on which `from` sends to `to`.
pub fn topic(to: &str, from: &str) -> String {
    MQTT.subject(to, from)
}

fn mqtt_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("MQTT {what}: {e}")))
}

/// Queues `d` for publication on `topic` (QoS 1); `d` becomes the payload without a copy.
/// Waits while the client's request queue is full.
pub(crate) async fn publish(client: &AsyncClient, topic: &str, d: Vec<u8>) -> Result<(), Error> {
    client
        .publish(topic, QoS::AtLeastOnce, false, d)
        .await
        .map_err(|e| mqtt_error("publish", e))
}

/// One device's connection to an MQTT broker, carrying KEAV channels to peers addressed by
/// device id. Dropping it stops the event loop (its channels stop receiving).
pub struct Link {
    hub: Hub,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("mqtt::Link")
            .field("device_id", &self.hub.device_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

impl Link {
    /// Connects to the broker at `broker` (`host:port`, plain TCP) as device `device_id`,
    /// subscribes to its inbox and starts the event loop. Fails if the broker does not accept
    /// the connection and the subscription within [`LinkOptions::connect_timeout`]. Payloads
    /// beyond four times [`LinkOptions::max_payload`] exceed the MQTT client's packet limit:
    /// rumqttc drops the connection and the event loop reconnects. [`LinkOptions::jetstream`]
    /// is refused ([`Error::InvalidInput`]).
    pub async fn connect(
        broker: &str,
        device_id: &str,
        options: LinkOptions,
    ) -> Result<Link, Error> {
        broker::check_config(device_id, options.max_payload, options.max_peers)?;
        if options.jetstream.is_some() {
            return Err(Error::InvalidInput("JetStream is a NATS option, not MQTT"));
        }
        let (host, port) = broker::host_port(broker)?;
        let client_id = options
            .client_id
            .clone()
            .unwrap_or_else(|| device_id.to_string());
        let mut mo = MqttOptions::new(client_id, host, port);
        mo.set_keep_alive(options.keep_alive.max(Duration::from_secs(5)));
        // Room for a topic and the MQTT header around the largest payload we take; a bit
        // more on the way in so moderately oversized payloads are counted, not fatal.
        let slack = 1024;
        mo.set_max_packet_size(
            options.max_payload.saturating_mul(4).saturating_add(slack),
            options.max_payload.saturating_add(slack),
        );
        mo.set_clean_session(!options.persistent_session);
        if let Some((u, p)) = &options.credentials {
            mo.set_credentials(u.clone(), p.clone());
        }
        let (client, eventloop) = AsyncClient::new(mo, 64);
        let (hub, feed) = Hub::new(
            &MQTT,
            device_id,
            &options,
            Publisher::Mqtt(client.clone()),
            if options.persistent_session {
                MailSource::InboxEarly
            } else {
                MailSource::Inbox
            },
            None,
        );
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(event_loop(
            eventloop,
            client.clone(),
            device_id.to_string(),
            feed,
            ready_tx,
        ));
        let link = Link { hub, client, task };
        match tokio::time::timeout(options.connect_timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {
                info!(device_id, broker, "connected to the MQTT broker");
                Ok(link)
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(mqtt_error("event loop", "stopped")),
            Err(_) => Err(Error::Timeout("MQTT broker connection")),
        }
    }

    broker::link_api!();
}

async fn event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    device_id: String,
    feed: Feed,
    ready: oneshot::Sender<Result<(), Error>>,
) {
    let mut ready = Some(ready);
    let inbox = MQTT.inbox_filter(&device_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                feed.deliver(&p.topic, &p.payload, p.retain).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                feed.connected();
                // Subscribe on every (re)connection: a clean session starts without the
                // subscription, and a broker may have lost a persistent one (a restart
                // without persistence). Through a task, since the request queue is drained
                // by this very loop.
                let (client, inbox) = (client.clone(), inbox.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(inbox, QoS::AtLeastOnce).await {
                        debug!(error = %e, "MQTT subscribe request failed");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                let ok = s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if !ok {
                    warn!(device_id = %device_id, "the MQTT broker refused the inbox subscription");
                }
                if let Some(r) = ready.take() {
                    let _ = r.send(if ok {
                        Ok(())
                    } else {
                        Err(Error::InvalidInput(
                            "the MQTT broker refused the inbox subscription",
                        ))
                    });
                    if !ok {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(mqtt_error("broker", e)));
                    return;
                }
                warn!(device_id = %device_id, error = %e, retry_in = ?backoff, "MQTT connection lost");
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
    fn topics() {
        assert_eq!(topic("p", "d"), "keav/v1/p/from/d");
        assert!(!valid_device_id("a/b"));
    }
}
