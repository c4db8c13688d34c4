//! A private Mosquitto for one test, and small synchronous MQTT helpers around it.
//!
//! The broker runs the configuration keav generated, on a free loopback port (never 1883),
//! and is killed by its PID when the guard drops, also when the test panics.
//!
//! Submodules: [`fleet`], a whole C2 fleet (server, HTTP, broker, tap account) for the
//! end-to-end tests; [`pg`], a PostgreSQL schema of one's own for one test.
//! Each test file uses only part of this (hence `dead_code` allowed).
#![allow(dead_code)]

pub mod fleet;
#[cfg(feature = "postgres")]
pub mod pg;

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keav_c2::acl::MosquittoFiles;
use rumqttc::{
    Client, Connection, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};

/// How long a test waits for an event it expects before failing (bounds a hang; no test
/// asserts on how long anything took).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Whether this process runs as root (then Mosquitto must be told to stay root, or it drops
/// to the `mosquitto` account, which cannot read the 0600 files we wrote).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A Mosquitto process started with `files.conf`, killed (SIGKILL, by PID) on drop.
pub struct Broker {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Broker {
    /// Starts `mosquitto -c <conf>` and waits until it listens on `port`.
    pub fn start(files: &MosquittoFiles, port: u16) -> Broker {
        let log = files
            .conf
            .parent()
            .expect("conf has a directory")
            .join("mosquitto.log");
        let log_file = std::fs::File::create(&log).expect("create broker log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&files.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        let mut broker = Broker { child, port, log };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("mosquitto exited ({status}): {}", broker.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return broker;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto never listened on {port}: {}",
                broker.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's PID (for `MosquittoConfig::apply`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT 3.1.1 client of the broker on `port`; `credentials` `None` connects anonymously.
pub fn client(port: u16, id: &str, credentials: Option<(&str, &str)>) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    if let Some((user, pass)) = credentials {
        o.set_credentials(user, pass);
    }
    Client::new(o, 16)
}

/// Drives `conn` until the broker answers the CONNECT: `Ok` on CONNACK success, the error
/// (a refusal, or the connection closed) otherwise.
#[allow(clippy::result_large_err)] // rumqttc's own error type, test code
pub fn connack(conn: &mut Connection) -> Result<(), ConnectionError> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("no answer to CONNECT");
        match conn.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => panic!("no answer to CONNECT: {e:?}"),
        }
    }
}

/// A connected client whose received messages are kept in order, also those that arrive
/// while it waits for an acknowledgement (so a forbidden delivery is never skipped over).
pub struct Peer {
    /// The client handle.
    pub client: Client,
    /// Its connection (driven by the methods below).
    pub conn: Connection,
    inbox: VecDeque<Publish>,
}

/// A client that connected successfully.
pub fn connected(port: u16, user: &str, pass: &str) -> Peer {
    let (client, mut conn) = client(port, user, Some((user, pass)));
    connack(&mut conn).unwrap_or_else(|e| panic!("{user} refused: {e}"));
    Peer {
        client,
        conn,
        inbox: VecDeque::new(),
    }
}

impl Peer {
    /// Subscribes to `filter` (QoS 1) and returns the broker's SUBACK code.
    pub fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("queue SUBSCRIBE");
        let codes = self.next_matching("SUBACK", |p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        });
        assert_eq!(codes.len(), 1);
        codes[0]
    }

    /// Publishes `payload` to `topic` at QoS 1 and waits for the broker's PUBACK (so the
    /// broker has processed it before the test goes on).
    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .expect("queue PUBLISH");
        self.next_matching("PUBACK", |p| match p {
            Packet::PubAck(_) => Some(()),
            _ => None,
        });
    }

    /// The next message delivered.
    pub fn next_publish(&mut self) -> Publish {
        if let Some(p) = self.inbox.pop_front() {
            return p;
        }
        self.next_matching("PUBLISH", |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// Every message delivered up to and including the first with payload `marker`
    /// (overlapping subscriptions may deliver one message more than once, so callers assert
    /// on the whole list).
    pub fn until_marker(&mut self, marker: &[u8]) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self.next_publish();
            let done = p.payload[..] == *marker;
            got.push(p);
            if done {
                return got;
            }
        }
    }

    /// Drives the connection until the broker closes it; returns the error it closed with
    /// and the messages not yet read (the caller asserts there were none).
    pub fn until_closed(&mut self) -> (ConnectionError, Vec<Publish>) {
        let deadline = Instant::now() + PATIENCE;
        let mut got: Vec<Publish> = self.inbox.drain(..).collect();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the broker did not close the connection");
            match self.conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return (e, got),
                Err(e) => panic!("the broker did not close the connection: {e:?}"),
            }
        }
    }

    /// Drives the connection until an incoming packet `f` accepts, keeping messages that
    /// arrive meanwhile; fails on a connection error or after [`PATIENCE`].
    fn next_matching<T>(&mut self, what: &str, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {what} within {PATIENCE:?}"));
            match self.conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(p))) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                    if let Packet::Publish(p) = p {
                        self.inbox.push_back(p);
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("connection failed while waiting for {what}: {e}"),
                Err(e) => panic!("no {what}: {e:?}"),
            }
        }
    }
}
