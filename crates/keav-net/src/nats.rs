//! KEAV over a NATS server (core NATS publish/subscribe; JetStream for mail, optionally):
//! handshakes and records carried end to end as NATS messages, so the server (and anyone who
//! can subscribe to its subjects) sees only RFC 6189 handshake packets and AEAD records.
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
//! `_INBOX` subject proves it). [`Link::connections`] counts the client's successful
//! connections (the first one and every reconnection).
//!
//! # Mail
//!
//! Durable payloads (`0x44`) and relay frames (`0x52`) are mail ([`crate::broker`]): sent
//! with [`Link::publish`], received through [`Link::take_mail`]. Over core NATS (the default)
//! `publish` returns `Ok(false)` and mail to an offline device is lost. With
//! [`LinkOptions::jetstream`] ([`JetStreamOptions`]) a JetStream stream is the device's
//! mailbox: `publish` returns `Ok(true)` once the server stored the message, or an error when
//! the stream is full; incoming mail comes from a durable consumer and must be acknowledged
//! ([`Mail::ack`]). The JetStream API needs the permissions `$JS.API.>` (stream and consumer
//! lookup and creation, pulls) and publishing to `$JS.ACK.>` (acks) besides the above.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;

use crate::broker::{self, Consumed, Feed, Hub, MailSource, Publisher, NATS};
use crate::Error;

pub use crate::broker::{valid_device_id, JetStreamOptions, LinkOptions, LinkStats, Mail, MailAck};

/// The subject on which `from` sends to `to`.
pub fn subject(to: &str, from: &str) -> String {
    NATS.subject(to, from)
}

fn nats_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("NATS {what}: {e}")))
}

/// Subjects of every device's inbox: what the mailbox stream captures.
const STREAM_SUBJECTS: &str = "keav.v1.*.from.*";

fn js_error(what: &str, e: impl core::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("NATS JetStream {what}: {e}")))
}

/// Publishes `d` on `subject` through JetStream and waits for the server's publish ack. A
/// full stream is an [`std::io::ErrorKind::StorageFull`] error naming the server's reason.
pub(crate) async fn publish_stored(
    js: &jetstream::Context,
    subject: String,
    d: &[u8],
) -> Result<(), Error> {
    let pending = js
        .publish(subject, Bytes::copy_from_slice(d))
        .await
        .map_err(|e| js_error("publish", e))?;
    match pending.await {
        Ok(_) => Ok(()),
        Err(e) => {
            let full = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED);
            if full {
                Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!("NATS JetStream publish refused, the mailbox stream is full: {e}"),
                )))
            } else {
                Err(js_error("publish", e))
            }
        }
    }
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

/// Publishes `payload` on `subject` (at most once); both are handed to the client as they
/// are, without a copy.
pub(crate) async fn publish_owned(
    client: &async_nats::Client,
    subject: async_nats::Subject,
    payload: Bytes,
) -> Result<(), Error> {
    client
        .publish(subject, payload)
        .await
        .map_err(|e| nats_error("publish", e))
}

/// One device's connection to a NATS server, carrying KEAV channels to peers addressed by
/// device id. Dropping it ends the inbox subscription (its channels stop receiving); the
/// connection itself closes once its channels are gone too.
pub struct Link {
    hub: Hub,
    task: JoinHandle<()>,
    consumer: Option<JoinHandle<()>>,
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
        if let Some(c) = &self.consumer {
            c.abort();
        }
    }
}

impl Link {
    /// Connects to the NATS server at `server` (`host:port`, plain TCP) as device
    /// `device_id`, subscribes to its inbox and starts receiving. Fails if the server does
    /// not accept the connection and the subscription within [`LinkOptions::connect_timeout`].
    /// The client id is the NATS connection name, the keep-alive its ping interval; the server
    /// refuses payloads beyond its own `max_payload` (1 MiB by default) before they reach
    /// anyone. With [`LinkOptions::jetstream`] it also gets or creates the mailbox stream and
    /// the device's consumer within that time. [`LinkOptions::persistent_session`] is refused
    /// ([`Error::InvalidInput`]: NATS has JetStream instead).
    pub async fn connect(
        server: &str,
        device_id: &str,
        options: LinkOptions,
    ) -> Result<Link, Error> {
        broker::check_config(device_id, options.max_payload, options.max_peers)?;
        broker::host_port(server)?;
        if options.persistent_session {
            return Err(Error::InvalidInput(
                "a persistent session is an MQTT option; NATS has JetStream",
            ));
        }
        if let Some(js) = &options.jetstream {
            check_jetstream(js)?;
        }
        let timeout = options.connect_timeout;
        let ready = tokio::time::timeout(timeout, async {
            let (client, inbox) = connect_and_subscribe(server, device_id, &options).await?;
            let js = match &options.jetstream {
                Some(o) => Some(mailbox(&client, device_id, o).await?),
                None => None,
            };
            Ok::<_, Error>((client, inbox, js))
        });
        let (client, inbox, js) = match ready.await {
            Ok(r) => r?,
            Err(_) => return Err(Error::Timeout("NATS server connection")),
        };
        let (source, context) = match &js {
            Some((context, _)) => (MailSource::Consumer, Some(context.clone())),
            None => (MailSource::Inbox, None),
        };
        let (hub, feed) = Hub::new(
            &NATS,
            device_id,
            &options,
            Publisher::Nats(client),
            source,
            context,
        );
        let consumer = js.map(|(_, c)| tokio::spawn(consume(c, feed.clone())));
        let task = tokio::spawn(receive(inbox, feed));
        info!(
            device_id,
            server,
            jetstream = consumer.is_some(),
            "connected to the NATS server"
        );
        Ok(Link {
            hub,
            task,
            consumer,
        })
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

fn check_jetstream(o: &JetStreamOptions) -> Result<(), Error> {
    let name_ok = (1..=64).contains(&o.stream.len())
        && o.stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        return Err(Error::InvalidInput(
            "a JetStream stream name is 1 to 64 characters of [A-Za-z0-9_-]",
        ));
    }
    if o.max_messages == 0 || o.max_bytes == 0 || o.max_ack_pending <= 0 || o.ack_wait.is_zero() {
        return Err(Error::InvalidInput(
            "JetStream limits must be positive (or -1: none) and ack_wait non-zero",
        ));
    }
    Ok(())
}

/// Gets or creates the mailbox stream and this device's durable pull consumer.
async fn mailbox(
    client: &async_nats::Client,
    device_id: &str,
    o: &JetStreamOptions,
) -> Result<(jetstream::Context, PullConsumer), Error> {
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: o.stream.clone(),
            subjects: vec![STREAM_SUBJECTS.to_string()],
            storage: jetstream::stream::StorageType::File,
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            discard: jetstream::stream::DiscardPolicy::New,
            max_messages: o.max_messages,
            max_bytes: o.max_bytes,
            max_age: o.max_age,
            ..Default::default()
        })
        .await
        .map_err(|e| js_error("stream", e))?;
    let consumer = stream
        .get_or_create_consumer(
            device_id,
            jetstream::consumer::pull::Config {
                durable_name: Some(device_id.to_string()),
                // `keav.v1.<id>.from.*`: the server wants a subset of the stream's subjects
                // (`>` is not one of `*`); the same messages, as the stream has one level.
                filter_subject: format!("keav.v1.{device_id}.from.*"),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: o.ack_wait,
                max_ack_pending: o.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| js_error("consumer", e))?;
    Ok((js, consumer))
}

/// Delivers the consumer's mail to the mail queue once it is taken (until then it waits in
/// the stream), acknowledging and ignoring everything else. Waits while the queue is full.
async fn consume(consumer: PullConsumer, feed: Feed) {
    if !feed.mail_taken().await {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "NATS JetStream consumer failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "NATS JetStream consumer");
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let (m, acker) = m.split();
            match feed.consumed(m.subject.as_str(), &m.payload) {
                Consumed::Mail(from) => {
                    let mail = Mail {
                        from,
                        payload: m.payload.to_vec(),
                        ack: Some(MailAck::new(acker)),
                    };
                    if feed.send_mail(mail).await.is_err() {
                        // Nobody takes mail any more: leave the rest in the stream.
                        debug!("mail receiver gone: JetStream consumer stopped");
                        return;
                    }
                }
                Consumed::Ignore => {
                    if let Err(e) = acker.ack().await {
                        debug!(error = %e, "NATS JetStream ack failed");
                    }
                }
            }
        }
        debug!(retry_in = ?backoff, "NATS JetStream consumer stream ended");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Most messages the receive loop takes from the subscription at once.
const BATCH: usize = 64;

fn subject_payload(m: &async_nats::Message) -> (&str, &Bytes) {
    (m.subject.as_str(), &m.payload)
}

/// Hands the inbox subscription's messages to the feed, in batches of what is already
/// there (the route table is locked once per batch, and a channel's queue gets its records
/// in one run instead of one per wake-up of this task).
async fn receive(mut inbox: async_nats::Subscriber, feed: Feed) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(m) = inbox.next().await {
        batch.push(m);
        while batch.len() < BATCH {
            match inbox.next().now_or_never() {
                Some(Some(m)) => batch.push(m),
                // Nothing more yet, or the subscription ended (the next `next` says so).
                _ => break,
            }
        }
        feed.deliver_all(batch.iter().map(subject_payload)).await;
        batch.clear();
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
