//! The comparison handshakes over real TCP sockets (tokio), for the latency scenario: rustls
//! TLS 1.3 (full or resumed) and snow Noise XX.
//!
//! A [`PeerServer`] accepts connections and runs the server side of every one of them,
//! reporting each handshake's outcome; [`tls_connect`] and [`noise_connect`] run the client
//! side and time it: from the start of `connect` until the client can send application data
//! (TLS: its Finished written and `is_handshaking()` false; Noise: message 3 written). The
//! client's session is then closed with [`ClientSession::close`], which is not timed (and,
//! for TLS, reads the server's session tickets so that the next handshake can resume).
//!
//! Noise messages travel in frames of a 2-byte big-endian length and the message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, HandshakeKind, ServerConfig, ServerConnection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::BenchError;

/// Largest Noise message (the Noise specification's limit).
const NOISE_MAX: usize = 65535;
/// Connections a [`PeerServer`] serves at once; more are refused.
const MAX_SERVER_CONNECTIONS: usize = 16;
/// Outcomes a [`PeerServer`] holds until [`PeerServer::next_done`] takes them.
const DONE_QUEUE: usize = 64;
/// How long a server keeps a finished connection open waiting for the client to close it.
const LINGER: Duration = Duration::from_secs(30);

/// The client's view of one handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Just before `connect`.
    pub started: Instant,
    /// When the client had processed the last server message it needed (before writing its
    /// own last message, if any): the instant to count flights at.
    pub last_input: Instant,
    /// When the client could send application data.
    pub finished: Instant,
    /// What ran: `full`, `full+hrr`, `resumed` (TLS), `xx` (Noise).
    pub kind: String,
}

impl Timing {
    /// Client-side latency: `finished - started`.
    pub fn latency(&self) -> Duration {
        self.finished.saturating_duration_since(self.started)
    }
}

/// The client side of an established session, to be closed (untimed) after the measurement.
pub struct ClientSession {
    sock: TcpStream,
    tls: Option<ClientConnection>,
}

impl core::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientSession")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// Closes the session: TLS sends `close_notify`; then the write side is shut down and
    /// everything the server still sends is read (TLS: processed, which stores its session
    /// tickets) until the server closes, for at most `timeout`.
    pub async fn close(mut self, timeout: Duration) -> Result<(), BenchError> {
        let run = async {
            let mut out = Vec::new();
            if let Some(c) = self.tls.as_mut() {
                c.send_close_notify();
                flush(c, &mut self.sock, &mut out).await?;
            }
            self.sock.shutdown().await?;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = self.sock.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                if let Some(c) = self.tls.as_mut() {
                    feed(c, buf.get(..n).unwrap_or_default())?;
                }
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| BenchError::Incomplete("close (timed out)"))?
    }
}

/// Writes everything the connection wants to send.
async fn flush<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut TcpStream,
    out: &mut Vec<u8>,
) -> Result<(), BenchError> {
    while conn.wants_write() {
        out.clear();
        conn.write_tls(out)?;
        sock.write_all(out).await?;
    }
    Ok(())
}

/// Hands `data` to the connection and processes it.
fn feed<D>(conn: &mut ConnectionCommon<D>, mut data: &[u8]) -> Result<(), BenchError> {
    while !data.is_empty() {
        if conn.read_tls(&mut data)? == 0 {
            return Err(BenchError::Incomplete("tls (receiver full)"));
        }
        conn.process_new_packets()?;
    }
    Ok(())
}

/// Reads from the socket once and feeds the connection; `false` at EOF.
async fn read_into<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut TcpStream,
    buf: &mut [u8],
) -> Result<bool, BenchError> {
    let n = sock.read(buf).await?;
    if n == 0 {
        return Ok(false);
    }
    feed(conn, buf.get(..n).unwrap_or_default())?;
    Ok(true)
}

fn kind_name(k: Option<HandshakeKind>) -> &'static str {
    match k {
        Some(HandshakeKind::Full) => "full",
        Some(HandshakeKind::FullWithHelloRetryRequest) => "full+hrr",
        Some(HandshakeKind::Resumed) => "resumed",
        None => "unknown",
    }
}

/// Runs a TLS client handshake to `addr` with `config` (use a configuration that never
/// resumes for full handshakes; a resuming one resumes whenever its store holds a ticket).
/// Not bounded in time: wrap it in a timeout.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<(Timing, ClientSession), BenchError> {
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let mut conn = ClientConnection::new(config, name)?;
    let mut out = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_input = None;
    loop {
        flush(&mut conn, &mut sock, &mut out).await?;
        if !conn.is_handshaking() {
            break;
        }
        if !read_into(&mut conn, &mut sock, &mut buf).await? {
            return Err(BenchError::Incomplete("tls (server closed)"));
        }
        if !conn.is_handshaking() && last_input.is_none() {
            last_input = Some(Instant::now());
        }
    }
    let finished = Instant::now();
    let timing = Timing {
        started,
        last_input: last_input.unwrap_or(finished),
        finished,
        kind: kind_name(conn.handshake_kind()).to_string(),
    };
    Ok((
        timing,
        ClientSession {
            sock,
            tls: Some(conn),
        },
    ))
}

/// Static key pairs of the two Noise parties and the protocol they run.
#[derive(Clone)]
pub struct NoiseKeys {
    params: snow::params::NoiseParams,
    client: Arc<snow::Keypair>,
    server: Arc<snow::Keypair>,
}

impl core::fmt::Debug for NoiseKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NoiseKeys")
            .field("params", &self.params.name)
            .finish_non_exhaustive()
    }
}

impl NoiseKeys {
    /// Generates both parties' static keys for the XX protocol `name` (e.g.
    /// [`crate::peers::NOISE_XX`]).
    pub fn generate(name: &str) -> Result<Self, BenchError> {
        let params: snow::params::NoiseParams = name.parse()?;
        let b = snow::Builder::new(params.clone());
        Ok(Self {
            client: Arc::new(b.generate_keypair()?),
            server: Arc::new(b.generate_keypair()?),
            params,
        })
    }
}

async fn write_frame(sock: &mut TcpStream, msg: &[u8]) -> Result<(), BenchError> {
    let len = u16::try_from(msg.len()).map_err(|_| BenchError::Incomplete("noise (too long)"))?;
    let mut f = Vec::with_capacity(2 + msg.len());
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(msg);
    sock.write_all(&f).await?;
    Ok(())
}

async fn read_frame(sock: &mut TcpStream, buf: &mut [u8]) -> Result<usize, BenchError> {
    let mut len = [0u8; 2];
    sock.read_exact(&mut len).await?;
    let n = usize::from(u16::from_be_bytes(len));
    let b = buf
        .get_mut(..n)
        .ok_or(BenchError::Incomplete("noise (frame too long)"))?;
    sock.read_exact(b).await?;
    Ok(n)
}

/// Runs a Noise XX initiator handshake (empty payloads) to `addr`. Not bounded in time: wrap
/// it in a timeout.
pub async fn noise_connect(
    addr: SocketAddr,
    keys: &NoiseKeys,
) -> Result<(Timing, ClientSession), BenchError> {
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let mut hs = snow::Builder::new(keys.params.clone())
        .local_private_key(&keys.client.private)?
        .build_initiator()?;
    let mut msg = vec![0u8; NOISE_MAX];
    let mut payload = vec![0u8; NOISE_MAX];
    // -> e
    let n = hs.write_message(&[], &mut msg)?;
    write_frame(&mut sock, msg.get(..n).unwrap_or_default()).await?;
    // <- e, ee, s, es
    let n = read_frame(&mut sock, &mut msg).await?;
    hs.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
    let last_input = Instant::now();
    // -> s, se
    let n = hs.write_message(&[], &mut msg)?;
    write_frame(&mut sock, msg.get(..n).unwrap_or_default()).await?;
    let finished = Instant::now();
    if !hs.is_handshake_finished() {
        return Err(BenchError::Incomplete("noise"));
    }
    if hs.get_remote_static() != Some(keys.server.public.as_slice()) {
        return Err(BenchError::UnexpectedKind("noise: wrong server key".into()));
    }
    let timing = Timing {
        started,
        last_input,
        finished,
        kind: "xx".into(),
    };
    Ok((timing, ClientSession { sock, tls: None }))
}

/// What a [`PeerServer`] runs on each connection.
#[derive(Clone)]
enum ServerKind {
    Tls(Arc<ServerConfig>),
    Noise(NoiseKeys),
}

/// A server on `127.0.0.1:0` running the server side of TLS or Noise on every connection it
/// accepts, one task each. Dropping it stops it.
pub struct PeerServer {
    addr: SocketAddr,
    done: mpsc::Receiver<Result<(), BenchError>>,
    task: JoinHandle<()>,
}

impl core::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PeerServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PeerServer {
    /// A TLS server with `config`; every handshake must complete within `timeout`.
    pub async fn tls(config: Arc<ServerConfig>, timeout: Duration) -> Result<Self, BenchError> {
        Self::start(ServerKind::Tls(config), timeout).await
    }

    /// A Noise XX responder with the server key of `keys`; every handshake must complete
    /// within `timeout`.
    pub async fn noise(keys: NoiseKeys, timeout: Duration) -> Result<Self, BenchError> {
        Self::start(ServerKind::Noise(keys), timeout).await
    }

    async fn start(kind: ServerKind, timeout: Duration) -> Result<Self, BenchError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, done) = mpsc::channel(DONE_QUEUE);
        let task = tokio::spawn(serve(listener, kind, timeout, tx));
        Ok(Self { addr, done, task })
    }

    /// The address to connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The outcome of the next server-side handshake (in completion order): `Ok` once the
    /// server completed it (TLS: session tickets written too). Waits at most `timeout`.
    pub async fn next_done(&mut self, timeout: Duration) -> Result<(), BenchError> {
        match tokio::time::timeout(timeout, self.done.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => Err(BenchError::Incomplete("server (stopped)")),
            Err(_) => Err(BenchError::Incomplete("server handshake (timed out)")),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    kind: ServerKind,
    timeout: Duration,
    done: mpsc::Sender<Result<(), BenchError>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SERVER_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (kind, done) = (kind.clone(), done.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let mut sock = sock;
            let _ = sock.set_nodelay(true);
            let r = tokio::time::timeout(timeout, serve_one(&mut sock, &kind))
                .await
                .unwrap_or(Err(BenchError::Incomplete("server handshake (timed out)")));
            let ok = r.is_ok();
            let _ = done.send(r).await;
            if ok {
                // Keep the connection until the client closes it (its session tickets are
                // already written), then close ours.
                let mut buf = vec![0u8; 4096];
                let _ = tokio::time::timeout(LINGER, async {
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                })
                .await;
                let _ = sock.shutdown().await;
            }
        });
    }
}

async fn serve_one(sock: &mut TcpStream, kind: &ServerKind) -> Result<(), BenchError> {
    match kind {
        ServerKind::Tls(config) => {
            let mut conn = ServerConnection::new(config.clone())?;
            let mut out = Vec::with_capacity(4096);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                flush(&mut conn, sock, &mut out).await?;
                if !conn.is_handshaking() {
                    return Ok(());
                }
                if !read_into(&mut conn, sock, &mut buf).await? {
                    return Err(BenchError::Incomplete("tls (client closed)"));
                }
            }
        }
        ServerKind::Noise(keys) => {
            let mut hs = snow::Builder::new(keys.params.clone())
                .local_private_key(&keys.server.private)?
                .build_responder()?;
            let mut msg = vec![0u8; NOISE_MAX];
            let mut payload = vec![0u8; NOISE_MAX];
            let n = read_frame(sock, &mut msg).await?;
            hs.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
            let n = hs.write_message(&[], &mut msg)?;
            write_frame(sock, msg.get(..n).unwrap_or_default()).await?;
            let n = read_frame(sock, &mut msg).await?;
            hs.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
            if !hs.is_handshake_finished() {
                return Err(BenchError::Incomplete("noise"));
            }
            if hs.get_remote_static() != Some(keys.client.public.as_slice()) {
                return Err(BenchError::UnexpectedKind("noise: wrong client key".into()));
            }
            Ok(())
        }
    }
}
