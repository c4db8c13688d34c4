//! A TCP delay proxy on loopback: the link model of the latency scenario.
//!
//! [`LinkProxy::start`] listens on `127.0.0.1:0`; every connection it accepts is connected to
//! the upstream address and bytes are forwarded both ways. Each chunk read from one side is
//! delivered to the other side at `arrival + one_way + jitter` (jitter drawn uniformly in
//! `[-jitter, +jitter]`), but never before the previous chunk of the same direction, so the
//! byte order is kept. Timers only round up, so a delay is never shortened.
//!
//! Per connection the proxy counts bytes both ways and the causal depth of every chunk (its
//! "flight"): a chunk read from side X gets depth 1 + the largest depth already handed to X
//! when it was read (0 if nothing was). The depths of the chunks delivered to the client, with
//! their delivery instants, give [`ConnStats::flights_until`]: how many one-way trips the
//! client had waited for when it finished its handshake.
//!
//! The TCP handshake between the client and the proxy is not delayed (it is the same for
//! every protocol measured); only the bytes of the protocols are. tokio's timer works in whole
//! milliseconds, so each delayed chunk arrives up to about a millisecond late.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::options::LinkModel;
use crate::BenchError;

/// Connections forwarded at once; more are refused (closed on accept).
pub const MAX_CONNECTIONS: usize = 64;
/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction (bounds the buffered bytes to `CHUNK * QUEUE` per direction).
const QUEUE: usize = 64;
/// Statistics kept for this many most recent connections.
const KEPT_STATS: usize = 16;
/// Deliveries to the client recorded per connection (later ones update the last entry).
const MAX_DELIVERIES: usize = 4096;
/// Deadline for connecting to the upstream server.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(5);

/// One chunk handed to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// When the proxy started writing it to the client.
    pub at: Instant,
    /// Largest causal depth delivered to the client up to and including this chunk.
    pub depth: u32,
    /// Bytes delivered to the client up to and including this chunk.
    pub bytes: u64,
}

/// What the proxy saw on one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Bytes read from the client (forwarded to the server).
    pub bytes_c2s: u64,
    /// Bytes read from the server (forwarded to the client).
    pub bytes_s2c: u64,
    /// Chunks read from the client.
    pub chunks_c2s: u64,
    /// Chunks read from the server.
    pub chunks_s2c: u64,
    /// Deliveries to the client, in time order.
    pub to_client: Vec<Delivery>,
    /// Largest causal depth delivered to the server so far.
    pub max_depth_to_server: u32,
}

impl ConnStats {
    /// Largest causal depth among the chunks delivered to the client at or before `t`: the
    /// one-way flights the client had waited for by then (round trips = flights / 2).
    pub fn flights_until(&self, t: Instant) -> u32 {
        self.last_delivery_until(t).map_or(0, |d| d.depth)
    }

    /// Bytes delivered to the client at or before `t`.
    pub fn bytes_to_client_until(&self, t: Instant) -> u64 {
        self.last_delivery_until(t).map_or(0, |d| d.bytes)
    }

    /// Largest causal depth delivered to the client at any time.
    pub fn flights(&self) -> u32 {
        self.to_client.last().map_or(0, |d| d.depth)
    }

    fn last_delivery_until(&self, t: Instant) -> Option<&Delivery> {
        let n = self.to_client.partition_point(|d| d.at <= t);
        n.checked_sub(1).and_then(|i| self.to_client.get(i))
    }
}

/// Shared state of one proxied connection.
#[derive(Debug, Default)]
struct Conn {
    stats: Mutex<ConnStats>,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnStats> {
        // A poisoned lock only means another task panicked mid-update; the counters are
        // still usable.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Registry {
    conns: Mutex<VecDeque<Arc<Conn>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, c: Arc<Conn>) {
        let mut q = self.lock();
        if q.len() >= KEPT_STATS {
            q.pop_front();
        }
        q.push_back(c);
    }
}

/// A running delay proxy. Dropping it stops it (connections in progress are cut).
#[derive(Debug)]
pub struct LinkProxy {
    addr: SocketAddr,
    model: LinkModel,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `upstream` through
    /// `model`. Must be called inside a tokio runtime.
    pub async fn start(model: LinkModel, upstream: SocketAddr) -> Result<LinkProxy, BenchError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            model,
            registry.clone(),
            stop_rx,
        ));
        Ok(LinkProxy {
            addr,
            model,
            registry,
            stop,
            task: Some(task),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The link model applied.
    pub fn model(&self) -> LinkModel {
        self.model
    }

    /// A snapshot of the statistics of the most recently accepted connection.
    pub fn last_connection_stats(&self) -> Option<ConnStats> {
        self.registry.lock().back().map(|c| c.lock().clone())
    }

    /// Like [`LinkProxy::last_connection_stats`], and forgets that connection's statistics.
    pub fn take_last_connection_stats(&self) -> Option<ConnStats> {
        let c = self.registry.lock().pop_back();
        c.map(|c| c.lock().clone())
    }

    /// Connections whose statistics are kept (at most the 16 most recent).
    pub fn kept_connections(&self) -> usize {
        self.registry.lock().len()
    }

    /// Stops accepting, cuts every connection and waits for the proxy's tasks to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    model: LinkModel,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropped (with every connection task) when this task ends or is aborted.
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let client = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(5);
                s
            }
            Err(_) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(client); // over the limit: refuse
            continue;
        };
        let conn = Arc::new(Conn::default());
        // Registered before anything is forwarded, so the stats exist by the time the
        // client can have completed a handshake through this connection.
        registry.push(conn.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let Ok(Ok(server)) =
                tokio::time::timeout(UPSTREAM_CONNECT, TcpStream::connect(upstream)).await
            else {
                return;
            };
            forward(client, server, model, conn).await;
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ClientToServer,
    ServerToClient,
}

struct Chunk {
    data: Vec<u8>,
    deliver_at: Instant,
    depth: u32,
}

async fn forward(client: TcpStream, server: TcpStream, model: LinkModel, conn: Arc<Conn>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (c2s_tx, c2s_rx) = mpsc::channel(QUEUE);
    let (s2c_tx, s2c_rx) = mpsc::channel(QUEUE);
    tokio::join!(
        read_side(cr, c2s_tx, model, &conn, Dir::ClientToServer),
        write_side(sw, c2s_rx, &conn, Dir::ClientToServer),
        read_side(sr, s2c_tx, model, &conn, Dir::ServerToClient),
        write_side(cw, s2c_rx, &conn, Dir::ServerToClient),
    );
}

fn delay(model: LinkModel) -> Duration {
    if model.jitter.is_zero() {
        return model.one_way;
    }
    let j = i64::try_from(model.jitter.as_micros()).unwrap_or(i64::MAX);
    let d = i64::try_from(model.one_way.as_micros()).unwrap_or(i64::MAX);
    let us = d
        .saturating_add(rand::thread_rng().gen_range(-j..=j))
        .max(0);
    Duration::from_micros(us.unsigned_abs())
}

/// Reads chunks from one side and queues them for delivery to the other. Ends at EOF, on a
/// read error, or when the writer is gone; dropping the sender tells the writer to half-close.
async fn read_side(
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    model: LinkModel,
    conn: &Conn,
    dir: Dir,
) {
    let mut last = Instant::now();
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let arrival = Instant::now();
        buf.truncate(n);
        let depth = {
            let mut s = conn.lock();
            let n64 = n as u64;
            match dir {
                Dir::ClientToServer => {
                    s.bytes_c2s += n64;
                    s.chunks_c2s += 1;
                    s.to_client.last().map_or(0, |d| d.depth) + 1
                }
                Dir::ServerToClient => {
                    s.bytes_s2c += n64;
                    s.chunks_s2c += 1;
                    s.max_depth_to_server + 1
                }
            }
        };
        let deliver_at = (arrival + delay(model)).max(last);
        last = deliver_at;
        let chunk = Chunk {
            data: buf,
            deliver_at,
            depth,
        };
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
}

/// Delivers queued chunks on time; half-closes its side when the reader is done.
async fn write_side(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Chunk>, conn: &Conn, dir: Dir) {
    while let Some(c) = rx.recv().await {
        // tokio's timer rounds up to whole milliseconds: skip it when the chunk is due.
        if c.deliver_at > Instant::now() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(c.deliver_at)).await;
        }
        {
            // Recorded before the write: the receiver cannot act on the chunk before this
            // instant, and a reply read afterwards is sure to count it.
            let at = Instant::now();
            let mut s = conn.lock();
            match dir {
                Dir::ClientToServer => {
                    s.max_depth_to_server = s.max_depth_to_server.max(c.depth);
                }
                Dir::ServerToClient => {
                    let prev = s.to_client.last().copied();
                    let d = Delivery {
                        at,
                        depth: prev.map_or(0, |p| p.depth).max(c.depth),
                        bytes: prev.map_or(0, |p| p.bytes) + c.data.len() as u64,
                    };
                    if s.to_client.len() < MAX_DELIVERIES {
                        s.to_client.push(d);
                    } else if let Some(l) = s.to_client.last_mut() {
                        *l = d;
                    }
                }
            }
        }
        if wr.write_all(&c.data).await.is_err() {
            // The receiver is gone: dropping `rx` stops the reader of this direction.
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flights_until_picks_the_last_delivery_at_or_before() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let s = ConnStats {
            to_client: vec![
                Delivery {
                    at: t0 + ms(1),
                    depth: 2,
                    bytes: 10,
                },
                Delivery {
                    at: t0 + ms(5),
                    depth: 4,
                    bytes: 30,
                },
            ],
            ..ConnStats::default()
        };
        assert_eq!(s.flights_until(t0), 0);
        assert_eq!(s.flights_until(t0 + ms(1)), 2);
        assert_eq!(s.bytes_to_client_until(t0 + ms(4)), 10);
        assert_eq!(s.flights_until(t0 + ms(5)), 4);
        assert_eq!(s.bytes_to_client_until(t0 + ms(9)), 30);
        assert_eq!(s.flights(), 4);
    }

    #[test]
    fn jitter_stays_in_range() {
        let m = LinkModel {
            one_way: Duration::from_millis(10),
            jitter: Duration::from_millis(3),
        };
        for _ in 0..1000 {
            let d = delay(m);
            assert!(d >= Duration::from_millis(7) && d <= Duration::from_millis(13));
        }
        assert_eq!(delay(LinkModel::INTERNET), Duration::from_millis(70));
    }
}
