//! KEAV over a NATS server (core NATS publish/subscribe, no JetStream): handshakes and records
//! carried end to end as NATS messages, so the server (and anyone who can subscribe to its
//! subjects) sees only RFC 6189 handshake packets and AEAD records.
//!
//! This carrier behaves exactly like the MQTT one ([`crate::mqtt`]: device ids, payload
//! classification and bounds, routing by sender, datagram channels, counters; the code is
//! shared), with NATS subjects instead of MQTT topics:
//!
//! - device `D` subscribes to its inbox `keav.v1.D.from.>` and accepts only subjects
//!   `keav.v1.D.from.S` where `S` is a valid device id (the sender);
//! - it sends to peer `P` on `keav.v1.P.from.D`.
//!
//! A NATS server can confine each device to its inbox and its own name with per-user
//! permissions (subscribe `keav.v1.D.from.>`, publish `keav.v1.*.from.D`, plus publish and
//! subscribe `_INBOX.>` for the connection probe below). Without them the sender name in a subject is only a routing
//! hint: the KEAV handshake authenticates the peer, never the subject.
//!
//! Core NATS delivers at most once: a message published while a subscriber is disconnected is
//! lost. The handshake retransmits on the core's timers; records lost on the way are lost to
//! the application (end-to-end delivery is planned, docs/MESSAGING.md). Messages are never
//! retained. The client reconnects by itself and subscribes again; [`Link::connect`] returns
//! only once the server has the inbox subscription (a round trip through a private
//! `_INBOX` subject proves it).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::broker::{self, Feed, Hub, Publisher, NATS};
use crate::Error;

pub use crate::broker::{valid_device_id, LinkOptions, LinkStats};

/// The subject on which `from` sends to `to`.
pub fn subject(to: &str, from: &str) -> String {
    NATS.subject(to, from)
}

fn nats_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("NATS {what}: {e}")))
}

/// Publishes `d` on `subject` (at most once).
pub(crate) async fn publish(
    client: &async_nats::Client,
    subject: &str,
    d: &[u8],
) -> Result<(), Error> {
    client
        .publish(subject.to_string(), Bytes::copy_from_slice(d))
        .await
        .map_err(|e| nats_error("publish", e))
}

/// One device's connection to a NATS server, carrying KEAV channels to peers addressed by
/// device id. Dropping it ends the inbox subscription (its channels stop receiving); the
/// connection itself closes once its channels are gone too.
pub struct Link {
    hub: Hub,
    task: JoinHandle<()>,
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("nats::Link")
            .field("device_id", &self.hub.device_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Connects to the NATS server at `server` (`host:port`, plain TCP) as device
    /// `device_id`, subscribes to its inbox and starts receiving. Fails if the server does
    /// not accept the connection and the subscription within [`LinkOptions::connect_timeout`].
    /// The client id is the NATS connection name, the keep-alive its ping interval; the server
    /// refuses payloads beyond its own `max_payload` (1 MiB by default) before they reach
    /// anyone.
    pub async fn connect(
        server: &str,
        device_id: &str,
        options: LinkOptions,
    ) -> Result<Link, Error> {
        broker::check_config(device_id, options.max_payload, options.max_peers)?;
        broker::host_port(server)?;
        let timeout = options.connect_timeout;
        let ready =
            tokio::time::timeout(timeout, connect_and_subscribe(server, device_id, &options));
        let (client, inbox) = match ready.await {
            Ok(r) => r?,
            Err(_) => return Err(Error::Timeout("NATS server connection")),
        };
        let (hub, feed) = Hub::new(
            &NATS,
            device_id,
            options.max_payload,
            options.max_peers,
            Publisher::Nats(client),
        );
        let task = tokio::spawn(receive(inbox, feed));
        info!(device_id, server, "connected to the NATS server");
        Ok(Link { hub, task })
    }

    broker::link_api!();
}

/// Connects, subscribes to the inbox, and waits until the server has the subscription.
async fn connect_and_subscribe(
    server: &str,
    device_id: &str,
    options: &LinkOptions,
) -> Result<(async_nats::Client, async_nats::Subscriber), Error> {
    let name = options
        .client_id
        .clone()
        .unwrap_or_else(|| device_id.to_string());
    let mut co = async_nats::ConnectOptions::new()
        .name(name)
        .ping_interval(options.keep_alive.max(Duration::from_secs(1)))
        .connection_timeout(options.connect_timeout)
        .event_callback(|e| async move {
            match e {
                async_nats::Event::Connected => info!("NATS connection (re)established"),
                async_nats::Event::Disconnected => warn!("NATS connection lost, reconnecting"),
                // The client's subscription buffer overflowed: messages were lost uncounted
                // (the receive loop only queues, so this takes a flood).
                e @ async_nats::Event::SlowConsumer(_) => warn!(event = %e, "NATS messages lost"),
                e => debug!(event = %e, "NATS connection event"),
            }
        });
    if let Some((u, p)) = &options.credentials {
        co = co.user_and_password(u.clone(), p.clone());
    }
    let client = co
        .connect(format!("nats://{server}"))
        .await
        .map_err(|e| nats_error("connect", e))?;
    let inbox = client
        .subscribe(NATS.inbox_filter(device_id))
        .await
        .map_err(|e| nats_error("subscribe", e))?;
    // The server handles a connection's commands in order: once a message published after
    // the inbox subscription comes back, the inbox subscription is in place.
    let probe = client.new_inbox();
    let mut echo = client
        .subscribe(probe.clone())
        .await
        .map_err(|e| nats_error("subscribe", e))?;
    publish(&client, &probe, b"").await?;
    echo.next()
        .await
        .ok_or_else(|| nats_error("subscribe", "the probe subscription ended"))?;
    Ok((client, inbox))
}

async fn receive(mut inbox: async_nats::Subscriber, feed: Feed) {
    while let Some(m) = inbox.next().await {
        feed.deliver(m.subject.as_str(), &m.payload, false);
    }
    debug!("NATS inbox subscription ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert_eq!(subject("p", "d"), "keav.v1.p.from.d");
        assert!(!valid_device_id("a.b"));
    }
}
