//! An MQTT broker inside this process (rumqttd), so a demo or a test can run KEAV over MQTT
//! ([`crate::mqtt`]) with no external service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keav_net::Error> {
//! use keav_net::embedded_broker::{BrokerOptions, EmbeddedBroker};
//! let broker = EmbeddedBroker::start(BrokerOptions::default())?;
//! let link = keav_net::mqtt::Link::connect(&broker.addr().to_string(), "sensor",
//!     keav_net::mqtt::LinkOptions::default()).await?;
//! # drop(link);
//! broker.shutdown();
//! # Ok(()) }
//! ```
//!
//! # What runs where
//!
//! rumqttd is a set of threads: its *router* (one thread, blocking on a channel) and one
//! thread per listener, each with its own single-threaded tokio runtime. [`EmbeddedBroker`]
//! starts the router and one MQTT 3.1.1 (v4) listener in a thread it owns; it does not use
//! rumqttd's `Broker::start`, which blocks forever, can only be stopped by ending the process,
//! and only logs a listener that failed to bind.
//!
//! # Port
//!
//! By default the broker listens on 127.0.0.1 with a free port chosen by the system, never
//! 1883. rumqttd binds its listener itself from a configured address and does not report the
//! port it got, so binding port 0 cannot work: a free port is found by binding a std listener
//! to `127.0.0.1:0`, reading its port and dropping it; if another program takes that port
//! before rumqttd binds it, the bind fails and a new port is tried (up to
//! [`PORT_ATTEMPTS`] times).
//!
//! # Shutdown
//!
//! [`EmbeddedBroker::shutdown`] (or dropping the broker) stops the listener and drops its
//! runtime: the listening socket and every client connection are closed and the port is free
//! again; it returns once the listener thread has ended. rumqttd's router thread cannot be
//! stopped (it holds a sender to its own channel, so it never sees the channel close and has
//! no stop command): it stays parked, idle and with no socket, until the process exits, with
//! the messages it still held. Start one broker per process (the demo does); tests that start
//! many leak one idle thread each, never a port.
//!
//! # Queues and persistence
//!
//! rumqttd keeps the messages of each topic filter in an in-memory log of
//! [`BrokerOptions::queue_segments`] segments of [`BrokerOptions::queue_segment_bytes`]
//! bytes; subscribers, including a persistent session (`clean_session = false`) whose client
//! is offline, read from it with their own cursor. When the log is full the **oldest segment
//! is dropped** (publishers are never slowed down or refused): a subscriber that was offline
//! for longer than the log holds silently misses the oldest messages. Nothing is written to
//! disk: a broker that stops forgets every session and message. Per connection, at most
//! [`BrokerOptions::max_inflight`] QoS 1 messages await their PUBACK.
//!
//! # Limits
//!
//! A packet larger than [`BrokerOptions::max_payload`] (the MQTT remaining length: topic,
//! packet id and payload) makes rumqttd drop that client's connection. The broker has no
//! authentication and no ACLs: any local process can connect, subscribe to `#` and publish
//! anywhere, so bind it to loopback (the default). KEAV's channels are end-to-end, so the
//! broker sees only handshake packets and sealed records.
//!
//! # Logging
//!
//! rumqttd logs every connection and subscription at `info`. Unless `debug` is enabled (for
//! the `rumqttd` target or this module) when the broker starts, the listener thread runs
//! with no tracing subscriber. The router thread logs to the global subscriber, at `info` and
//! below (the `keav` CLI shows only errors by default).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::oneshot;

use crate::Error;

/// How many free ports [`EmbeddedBroker::start`] tries when another program takes the one it
/// picked before rumqttd binds it.
pub const PORT_ATTEMPTS: usize = 8;

/// How long the listener has to report a failed bind before it counts as listening.
const BIND_GRACE: Duration = Duration::from_millis(25);

/// Settings of an [`EmbeddedBroker`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Where to listen (default `127.0.0.1:0`: loopback, a free port chosen at start). A
    /// non-zero port is bound exactly, with no retry.
    pub bind: SocketAddr,
    /// Largest MQTT packet body accepted from a client, in bytes (default 64 KiB + 4 KiB: a
    /// full [`crate::mqtt::LinkOptions::max_payload`] payload plus its topic and header).
    /// A larger packet closes that client's connection.
    pub max_payload: usize,
    /// Client connections at once (default 256); more are refused.
    pub max_connections: usize,
    /// QoS 1 messages in flight (sent, not yet acknowledged) per connection (default 100).
    pub max_inflight: usize,
    /// Size of one segment of a topic filter's message log, in bytes (default 1 MiB; at
    /// least 1 KiB and at least `max_payload`).
    pub queue_segment_bytes: usize,
    /// Segments kept per topic filter (default 4): with the default sizes a filter holds
    /// 3 to 4 MiB of messages for offline subscribers before the oldest are dropped.
    pub queue_segments: usize,
    /// How long a new TCP connection may take to send its MQTT CONNECT (default 10 s).
    pub connect_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            bind: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            max_payload: 64 * 1024 + 4 * 1024,
            max_connections: 256,
            max_inflight: 100,
            queue_segment_bytes: 1 << 20,
            queue_segments: 4,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl BrokerOptions {
    fn validate(&self) -> Result<(), Error> {
        if self.max_payload == 0 {
            return Err(Error::InvalidInput("broker max_payload must be positive"));
        }
        if self.max_connections == 0 || self.max_inflight == 0 || self.queue_segments == 0 {
            return Err(Error::InvalidInput(
                "broker max_connections, max_inflight and queue_segments must be positive",
            ));
        }
        // rumqttd panics below 1 KiB.
        if self.queue_segment_bytes < 1024 || self.queue_segment_bytes < self.max_payload {
            return Err(Error::InvalidInput(
                "broker queue_segment_bytes must be at least 1 KiB and at least max_payload",
            ));
        }
        if self.max_inflight > usize::from(u16::MAX) {
            return Err(Error::InvalidInput(
                "broker max_inflight must fit MQTT packet ids",
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout.as_millis() > u128::from(u16::MAX)
        {
            return Err(Error::InvalidInput(
                "broker connect_timeout must be between 1 ms and 65 s",
            ));
        }
        Ok(())
    }

    fn router_config(&self) -> RouterConfig {
        RouterConfig {
            max_connections: self.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: self.queue_segment_bytes,
            max_segment_count: self.queue_segments,
            ..RouterConfig::default()
        }
    }

    fn server_settings(&self, listen: SocketAddr) -> ServerSettings {
        ServerSettings {
            name: format!("keav-embedded-broker-{}", listen.port()),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: u16::try_from(self.connect_timeout.as_millis())
                    .unwrap_or(u16::MAX),
                max_payload_size: self.max_payload,
                max_inflight_count: self.max_inflight,
                auth: None,
                external_auth: None,
                // Clients subscribe to and publish on any topic (no pre-declared filters).
                dynamic_filters: true,
            },
        }
    }
}

/// An MQTT broker (rumqttd) running in this process; see the [module docs](self).
///
/// Stops when [shut down](EmbeddedBroker::shutdown) or dropped.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a broker and returns once it listens. Blocking (it waits for the listener
    /// thread to bind, a few tens of milliseconds); from async code call it before the
    /// runtime starts or inside `spawn_blocking` if that matters.
    ///
    /// Fails with [`Error::InvalidInput`] for inconsistent options and [`Error::Io`] when
    /// the address cannot be bound (for a free port: after [`PORT_ATTEMPTS`] tries).
    pub fn start(options: BrokerOptions) -> Result<EmbeddedBroker, Error> {
        options.validate()?;
        let quiet = !(tracing::enabled!(target: "rumqttd", tracing::Level::DEBUG)
            || tracing::enabled!(tracing::Level::DEBUG));
        // The router thread lives as long as the process (see the module docs): a failed
        // start leaks one idle router thread, as does every stopped broker.
        let router_tx = Router::new(0, options.router_config()).spawn();
        let attempts = if options.bind.port() == 0 {
            PORT_ATTEMPTS
        } else {
            1
        };
        let mut last_err = None;
        for _ in 0..attempts {
            let listen = if options.bind.port() == 0 {
                free_port(options.bind)?
            } else {
                options.bind
            };
            let server = Server::new(options.server_settings(listen), router_tx.clone(), V4);
            match spawn_listener(server, listen, quiet) {
                Ok((stop, thread)) => {
                    tracing::debug!(%listen, "embedded MQTT broker listening");
                    return Ok(EmbeddedBroker {
                        addr: listen,
                        stop: Some(stop),
                        thread: Some(thread),
                    });
                }
                Err(e) => {
                    tracing::debug!(%listen, error = %e, "embedded MQTT broker could not bind");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(Error::InvalidInput("no port to try")))
    }

    /// The address clients connect to (`host:port` for [`crate::mqtt::Link::connect`] is
    /// `addr().to_string()`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and closes every client connection; returns once the port is free.
    /// (Dropping the broker does the same.) rumqttd's router thread stays, idle: see the
    /// module docs.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("embedded MQTT broker listener thread panicked");
            }
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A port on `bind`'s address that nothing listens on right now.
fn free_port(bind: SocketAddr) -> Result<SocketAddr, Error> {
    let probe = TcpListener::bind(bind)?;
    let addr = probe.local_addr()?;
    drop(probe);
    Ok(addr)
}

type Started = Result<(), Error>;

/// Runs `server` on its own thread and current-thread runtime until told to stop; returns
/// once it listens (or failed to bind).
fn spawn_listener(
    mut server: Server<V4>,
    listen: SocketAddr,
    quiet: bool,
) -> Result<(oneshot::Sender<()>, JoinHandle<()>), Error> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Started>();
    let body = move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = started_tx.send(Err(Error::Io(e)));
                return;
            }
        };
        runtime.block_on(async move {
            let serve = server.start(LinkType::Remote);
            tokio::pin!(serve);
            // The listener binds on the first poll; `start` only ever returns with an error
            // (it accepts forever otherwise).
            tokio::select! {
                biased;
                r = &mut serve => {
                    let why = match r {
                        Err(e) => format!("MQTT listener on {listen}: {e}"),
                        Ok(()) => format!("MQTT listener on {listen} ended at start"),
                    };
                    let _ = started_tx.send(Err(Error::Io(std::io::Error::other(why))));
                    return;
                }
                _ = tokio::time::sleep(BIND_GRACE) => {}
            }
            let _ = started_tx.send(Ok(()));
            tokio::select! {
                biased;
                _ = stop_rx => {}
                r = &mut serve => {
                    tracing::warn!(result = ?r.err(), "embedded MQTT broker listener ended");
                }
            }
        });
        // Dropping the runtime cancels every connection task and closes its socket.
        drop(runtime);
        tracing::debug!(%listen, "embedded MQTT broker stopped");
    };
    let thread = std::thread::Builder::new()
        .name(format!("mqtt-broker-{}", listen.port()))
        .spawn(move || {
            if quiet {
                tracing::dispatcher::with_default(&tracing::Dispatch::none(), body);
            } else {
                body();
            }
        })?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok((stop_tx, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(Error::Io(std::io::Error::other(
                "MQTT listener thread ended at start",
            )))
        }
    }
}
