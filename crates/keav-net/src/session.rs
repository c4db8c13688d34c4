//! Sessions: the handshake driver shared by every transport, and the [`Channel`] it yields.
//!
//! The API is a typestate in two steps: a connect or accept future runs the handshake and
//! persists its result, and only then hands out a [`Channel`] — there is no way to send
//! application data on a connection whose handshake did not complete. A channel can be
//! [`split`](Channel::split) into a [`SendHalf`] and a [`RecvHalf`] for two tasks.
//!
//! Driver order (the one `keav_store::ledger` documents): after every call into the endpoint,
//! its events go through the ledger first (which counts a verification attempt, or persists
//! a completed session, before anything else is sent), then its queued messages are sent.
//!
//! Record failures: on a stream transport (TCP) any record that fails to open is fatal for
//! the channel — the stream neither loses nor reorders, so it can only be an attack — and
//! is reported as [`Error::Record`]. On UDP such a record is dropped and counted
//! ([`RecvHalf::dropped_records`]). Corrupted or duplicated data is never delivered.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keav_proto::cache::{Mode, Verification, Zid};
use keav_proto::handshake::{Endpoint, Event, KeyAgreement, Role, SessionOutcome};
use keav_store::ledger::Ledger;
use keav_verify::Backend;
use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::coalesce::Coalescer;
use crate::device::Device;
use crate::frame::{FrameError, FrameKind, FrameReader, FrameWriter, QueueError};
use crate::record::{self, Aead, Opened, Opener, Sealer, MAX_PLAINTEXT};
use crate::udp::{UdpRx, UdpTx};
use crate::Error;

/// Per-connection and per-listener options. `Default`: no idle timeout, at most 64
/// concurrent handshakes and 1024 connections per listener, 5 s grace on shutdown.
#[derive(Clone, Debug)]
pub struct Options {
    /// [`RecvHalf::recv`] fails with [`Error::Timeout`] if nothing arrives for this long
    /// (the channel stays usable; call `recv` again to keep waiting).
    pub idle_timeout: Option<Duration>,
    /// Listeners: handshakes running at once (more callers wait; UDP drops their packets and
    /// lets them retransmit).
    pub max_handshakes: usize,
    /// Listeners: connections (handshaking or established) at once; on UDP also the size of
    /// the per-source table.
    pub max_connections: usize,
    /// `serve`: how long handlers get to finish after the shutdown signal before they are
    /// aborted.
    pub shutdown_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            idle_timeout: None,
            max_handshakes: 64,
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Options {
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.max_handshakes == 0 || self.max_connections == 0 {
            return Err(Error::InvalidInput(
                "max_handshakes and max_connections must be positive",
            ));
        }
        Ok(())
    }
}

/// What the handshake established about the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's ZID in this session (fresh per session in paranoid mode).
    pub peer_zid: Zid,
    /// Our ZID in this session.
    pub local_zid: Zid,
    /// The mode this device ran.
    pub mode: Mode,
    /// Our ZRTP role.
    pub role: Role,
    /// DH or preshared.
    pub key_agreement: KeyAgreement,
    /// The rendered SAS (not secret once the session is up; shown to people for plain peers).
    pub sas: String,
    /// What the equality test did: bound, unbound, skipped, not supported.
    pub verification: Verification,
    /// Which equality test ran, if any.
    pub backend: Option<Backend>,
    /// The session number with this peer as this device counts it (1 = first).
    pub session_number: u64,
    /// A retained secret matched (key continuity held).
    pub cache_matched: bool,
    /// The AEAD protecting the channel's records.
    pub channel_aead: Aead,
    /// The label under which we called the peer (initiator side).
    pub label: Option<String>,
    /// The peer's transport address, if the transport has one.
    pub remote_addr: Option<SocketAddr>,
}

/// Milliseconds on the channel's monotonic clock (tokio's, so paused test time works).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn start() -> Self {
        Clock(Instant::now())
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Handshake driver

/// Which side of the handshake this device runs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side<'a> {
    /// Calls the peer it knows as this label.
    Initiator(&'a str),
    /// Waits for callers.
    Responder,
}

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Where handshake messages travel.
pub(crate) enum HsLink<'a> {
    Stream(&'a mut FrameReader<BoxRead>, &'a mut FrameWriter<BoxWrite>),
    Udp(&'a mut crate::udp::HsUdp),
}

impl HsLink<'_> {
    async fn send(&mut self, msgs: &[Vec<u8>]) -> Result<(), Error> {
        match self {
            HsLink::Stream(_, w) => {
                for m in msgs {
                    w.queue(FrameKind::Handshake, m)?;
                }
                w.flush().await?;
                Ok(())
            }
            HsLink::Udp(u) => u.send_messages(msgs).await,
        }
    }

    /// The next handshake message. Cancel-safe.
    async fn recv(&mut self) -> Result<Vec<u8>, Error> {
        match self {
            HsLink::Stream(r, _) => match r.read_frame().await? {
                None => Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the handshake",
                ))),
                Some(f) if f.kind == FrameKind::Handshake => Ok(f.payload.to_vec()),
                Some(f) => Err(Error::Frame(FrameError::Unexpected(f.kind))),
            },
            HsLink::Udp(u) => u.recv_message().await,
        }
    }
}

enum Fail {
    Proto(keav_proto::Error),
    Net(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Net(e)
    }
}

impl From<keav_store::Error> for Fail {
    fn from(e: keav_store::Error) -> Self {
        Fail::Net(Error::Store(e))
    }
}

/// A completed handshake: the persisted outcome and the endpoint (a UDP responder keeps it to
/// answer a retransmitted Confirm2 whose Conf2ACK was lost).
pub(crate) struct Handshaken {
    pub(crate) outcome: Box<SessionOutcome>,
    pub(crate) endpoint: Endpoint,
}

/// Runs one handshake to completion (persisted) or failure (counted), before `deadline`.
pub(crate) async fn handshake(
    device: &Device,
    side: Side<'_>,
    link: &mut HsLink<'_>,
    deadline: Instant,
) -> Result<Handshaken, Error> {
    let store = device.store();
    let settings = device.settings();
    let mut cfg = device.handshake_config();
    // Byte streams deliver or fail: resending a handshake message would only duplicate it.
    cfg.retransmit = matches!(link, HsLink::Udp(_));
    let unix = unix_now();
    let clock = Clock::start();
    let mut rng = OsRng;
    let (mut ledger, mut ep) = match side {
        Side::Initiator(label) => {
            let (mut ledger, lookup) =
                Ledger::initiator(store, settings.mode, settings.lockout, label)?;
            match Endpoint::initiator(cfg, lookup, 0, unix, &mut rng) {
                Ok(ep) => (ledger, ep),
                Err(e) => {
                    ledger.failed(&e, unix)?;
                    return Err(Error::from_handshake(e));
                }
            }
        }
        Side::Responder => (
            Ledger::responder(store, settings.mode, settings.lockout),
            Endpoint::responder(cfg, 0, unix, &mut rng),
        ),
    };
    let run = drive(&mut ep, &mut ledger, link, clock, unix);
    let failure = match tokio::time::timeout_at(deadline, run).await {
        Ok(Ok(outcome)) => {
            return Ok(Handshaken {
                outcome,
                endpoint: ep,
            })
        }
        Ok(Err(Fail::Proto(e))) => e,
        Ok(Err(Fail::Net(e))) => {
            // Transport or store failure. An equality test that had started was already
            // counted by the ledger when it started, so nothing more to record.
            return Err(e);
        }
        Err(_) => ep.abort(keav_proto::Error::Timeout),
    };
    ledger.failed(&failure, unix)?;
    // Best effort: tell the peer (the endpoint queued an Error or ErrorACK).
    let msgs: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    if !msgs.is_empty() {
        let _ = tokio::time::timeout(Duration::from_millis(200), link.send(&msgs)).await;
    }
    Err(Error::from_handshake(failure))
}

async fn drive(
    ep: &mut Endpoint,
    ledger: &mut Ledger<'_>,
    link: &mut HsLink<'_>,
    clock: Clock,
    unix: u64,
) -> Result<Box<SessionOutcome>, Fail> {
    let mut rng = OsRng;
    loop {
        let mut outcome = None;
        while let Some(ev) = ep.poll_event() {
            match ev {
                Event::NeedPeerCache { zid, rs_id_hint } => {
                    let cache = ledger.lookup(&zid, rs_id_hint, unix)?;
                    ep.provide_peer_cache(cache, clock.now_ms(), &mut rng)
                        .map_err(Fail::Proto)?;
                }
                Event::VerificationStarting { backend } => {
                    debug!(backend = backend.name(), "equality test starting");
                    if let Err(refusal) = ledger.verification_starting(unix)? {
                        return Err(Fail::Proto(ep.abort(refusal)));
                    }
                }
                Event::Established(o) => {
                    // Persist before anything that follows is sent (the responder's Conf2ACK).
                    ledger.succeeded(&o, unix)?;
                    outcome = Some(o);
                }
                _ => {}
            }
        }
        let msgs: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit()).collect();
        if !msgs.is_empty() {
            link.send(&msgs).await?;
        }
        if let Some(o) = outcome {
            return Ok(o);
        }
        let wake = ep.poll_timeout();
        tokio::select! {
            m = link.recv() => {
                let m = m?;
                ep.handle_message(&m, clock.now_ms(), &mut rng).map_err(Fail::Proto)?;
            }
            _ = tokio::time::sleep_until(clock.at(wake.unwrap_or(0))), if wake.is_some() => {
                ep.handle_timeout(clock.now_ms()).map_err(Fail::Proto)?;
            }
        }
    }
}

pub(crate) fn log_failure(what: &str, remote: Option<SocketAddr>, e: &Error) {
    if e.counts_toward_lockout() {
        warn!(?remote, error = %e, "{what}: verification failed (counted toward lockout)");
    } else {
        debug!(?remote, error = %e, "{what} failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Channel

pub(crate) enum Tx {
    Stream(FrameWriter<BoxWrite>),
    Udp(UdpTx),
    /// A broker carrier's datagrams, records coalesced ([`crate::coalesce`]).
    Batched(Coalescer),
}

pub(crate) enum Rx {
    Stream(FrameReader<BoxRead>),
    Udp(UdpRx),
}

/// Shared by both halves: released when both are gone.
struct Held {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Everything needed to turn a completed handshake into a [`Channel`].
pub(crate) struct Parts {
    pub(crate) tx: Tx,
    pub(crate) rx: Rx,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) label: Option<String>,
    pub(crate) shutdown: Option<watch::Receiver<bool>>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// An established, persisted secure channel over transport `T` (`TcpStream`, `UdpSocket`, or
/// any byte stream given to [`connect_stream`] / [`accept_stream`]).
pub struct Channel<T> {
    tx: SendHalf<T>,
    rx: RecvHalf<T>,
}

impl<T> core::fmt::Debug for Channel<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.tx.peer)
            .finish_non_exhaustive()
    }
}

impl<T> Channel<T> {
    pub(crate) fn new(
        device: &Device,
        outcome: &SessionOutcome,
        parts: Parts,
        opts: &Options,
    ) -> Result<Self, Error> {
        let aead = outcome.channel_aead.ok_or(Error::Unsupported(
            "the peer negotiated no channel AEAD (plain ZRTP peer)",
        ))?;
        let clock = Clock::start();
        let (sealer, mut opener) =
            record::channel(outcome, device.settings().ratchet, clock.now_ms())?;
        if matches!(parts.rx, Rx::Stream(_)) {
            // A stream neither loses nor reorders: a gap or a swap is an attack.
            opener.require_in_order();
        }
        let peer = Arc::new(PeerInfo {
            peer_zid: outcome.peer_zid,
            local_zid: outcome.local_zid,
            mode: outcome.mode,
            role: outcome.role,
            key_agreement: outcome.key_agreement,
            sas: outcome.sas.clone(),
            verification: outcome.verification,
            backend: outcome.backend,
            session_number: outcome.session_number,
            cache_matched: outcome.cache_matched,
            channel_aead: aead,
            label: parts.label,
            remote_addr: parts.remote,
        });
        info!(
            peer = %peer.peer_zid,
            remote = ?peer.remote_addr,
            session = peer.session_number,
            key_agreement = peer.key_agreement.name(),
            verification = peer.verification.name(),
            aead = aead.name(),
            "secure channel established"
        );
        debug!(sas = %peer.sas, "session SAS");
        let held = Arc::new(Held {
            _permit: parts.permit,
        });
        let stream = matches!(parts.tx, Tx::Stream(_));
        Ok(Channel {
            tx: SendHalf {
                tx: parts.tx,
                sealer,
                clock,
                peer: peer.clone(),
                state: HalfState::Open,
                shutdown: parts.shutdown.clone(),
                _held: held.clone(),
                _t: PhantomData,
            },
            rx: RecvHalf {
                rx: parts.rx,
                opener,
                clock,
                peer,
                state: HalfState::Open,
                stream,
                idle: opts.idle_timeout,
                shutdown: parts.shutdown,
                dropped: 0,
                _held: held,
                _t: PhantomData,
            },
        })
    }

    /// What the handshake established.
    pub fn peer(&self) -> &PeerInfo {
        &self.tx.peer
    }

    /// Sends `data` (split into records of at most 16 KiB).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        self.tx.send(data).await
    }

    /// The next piece of data; `Ok(None)` after the peer's authenticated close. On shutdown
    /// of the listener that accepted this channel, sends our close and returns
    /// [`Error::Shutdown`]; after a fatal record error, cuts the transport off.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let r = self.rx.recv().await;
        match &r {
            Err(Error::Shutdown) => {
                let _ = self.tx.close().await;
            }
            Err(Error::Record(_) | Error::Frame(_)) if self.rx.stream => {
                self.tx.abort().await;
            }
            _ => {}
        }
        r
    }

    /// Sends the authenticated close and shuts the transport's write side down.
    pub async fn close(&mut self) -> Result<(), Error> {
        self.tx.close().await
    }

    /// Records dropped because they failed to open, and malformed record batches (UDP and
    /// broker carriers; always 0 on TCP, where such a record is fatal).
    pub fn dropped_records(&self) -> u64 {
        self.rx.dropped_records()
    }

    /// Drops both directions' expanded AEAD state until the next record (see
    /// [`SendHalf::compact`] and [`RecvHalf::compact`]): an idle channel then keeps about
    /// 0.5 KiB of key state instead of about 1.6 KiB (docs/BENCHMARKS.md, memory).
    pub fn compact(&mut self) {
        self.tx.compact();
        self.rx.compact();
    }

    /// Splits into halves usable from two tasks.
    pub fn split(self) -> (SendHalf<T>, RecvHalf<T>) {
        (self.tx, self.rx)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HalfState {
    Open,
    Closed,
    Failed,
}

/// The sending half of a [`Channel`].
pub struct SendHalf<T> {
    tx: Tx,
    sealer: Sealer,
    clock: Clock,
    peer: Arc<PeerInfo>,
    state: HalfState,
    shutdown: Option<watch::Receiver<bool>>,
    _held: Arc<Held>,
    _t: PhantomData<fn() -> T>,
}

impl<T> core::fmt::Debug for SendHalf<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendHalf")
            .field("peer", &self.peer.peer_zid)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Flush TCP output once this much is queued.
const FLUSH_AT: usize = 64 * 1024;

impl<T> SendHalf<T> {
    /// What the handshake established.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Drops the expanded AEAD state until the next send, which rebuilds it (about a
    /// microsecond); for servers holding many idle channels. See
    /// [`keav_proto::record::Sealer::compact`].
    pub fn compact(&mut self) {
        self.sealer.compact();
    }

    /// Sends `data`, split into records of at most 16 KiB. On UDP each record is one
    /// datagram (delivery is not guaranteed). If the listener that accepted this channel is
    /// shutting down, sends the close instead and returns [`Error::Shutdown`].
    pub async fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.state != HalfState::Open {
            return Err(Error::Closed);
        }
        if self.shutdown.as_ref().is_some_and(|s| *s.borrow()) {
            let _ = self.close().await;
            return Err(Error::Shutdown);
        }
        let r = self.send_records(data).await;
        if r.is_err() {
            self.state = HalfState::Failed;
        }
        r
    }

    async fn send_records(&mut self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            let now = self.clock.now_ms();
            match &mut self.tx {
                Tx::Stream(w) => {
                    let sealer = &mut self.sealer;
                    w.queue_with(FrameKind::Record, |b| sealer.seal(chunk, now, b))
                        .map_err(queue_error)?;
                    if w.pending() >= FLUSH_AT {
                        w.flush().await?;
                    }
                }
                Tx::Udp(u) => {
                    // Sealed into the buffer that becomes the datagram (a broker message's
                    // payload as it is).
                    let mut d = Vec::with_capacity(chunk.len() + record::RECORD_OVERHEAD);
                    self.sealer.seal(chunk, now, &mut d)?;
                    u.send(d).await?;
                }
                Tx::Batched(c) => {
                    // Sealed straight into the batch being built.
                    let sealer = &mut self.sealer;
                    c.push(chunk.len() + record::RECORD_OVERHEAD, |out| {
                        sealer.seal(chunk, now, out)
                    })
                    .await?;
                }
            }
        }
        if let Tx::Stream(w) = &mut self.tx {
            w.flush().await?;
        }
        Ok(())
    }

    /// Sends the authenticated close and shuts the write side down. Idempotent.
    pub async fn close(&mut self) -> Result<(), Error> {
        if self.state != HalfState::Open {
            return Ok(());
        }
        self.state = HalfState::Closed;
        let now = self.clock.now_ms();
        match &mut self.tx {
            Tx::Stream(w) => {
                let sealer = &mut self.sealer;
                w.queue_with(FrameKind::Record, |b| sealer.seal_close(now, b))
                    .map_err(queue_error)?;
                w.shutdown().await?;
            }
            Tx::Udp(u) => {
                let mut d = Vec::new();
                self.sealer.seal_close(now, &mut d)?;
                u.send(d).await?;
            }
            Tx::Batched(c) => {
                // After the records before it, then everything is published.
                let sealer = &mut self.sealer;
                c.push(record::RECORD_OVERHEAD, |out| sealer.seal_close(now, out))
                    .await?;
                c.finish().await?;
            }
        }
        Ok(())
    }

    /// Cuts the transport off without a close (after an attack was detected).
    async fn abort(&mut self) {
        if self.state == HalfState::Open {
            self.state = HalfState::Failed;
            if let Tx::Stream(w) = &mut self.tx {
                let _ = w.shutdown().await;
            }
        }
    }
}

fn queue_error(e: QueueError<record::RecordError>) -> Error {
    match e {
        QueueError::Fill(e) => Error::Record(e),
        QueueError::TooLarge => Error::InvalidInput("record larger than a frame"),
    }
}

/// The receiving half of a [`Channel`].
pub struct RecvHalf<T> {
    rx: Rx,
    opener: Opener,
    clock: Clock,
    peer: Arc<PeerInfo>,
    state: HalfState,
    stream: bool,
    idle: Option<Duration>,
    shutdown: Option<watch::Receiver<bool>>,
    dropped: u64,
    _held: Arc<Held>,
    _t: PhantomData<fn() -> T>,
}

impl<T> core::fmt::Debug for RecvHalf<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RecvHalf")
            .field("peer", &self.peer.peer_zid)
            .field("state", &self.state)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

/// Resolves when the shutdown flag turns true; never if there is no flag or its sender is
/// gone.
async fn shutdown_signalled(s: &mut Option<watch::Receiver<bool>>) {
    match s {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

impl<T> RecvHalf<T> {
    /// What the handshake established.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Records dropped because they failed to open, and malformed record batches (UDP and
    /// broker carriers only).
    pub fn dropped_records(&self) -> u64 {
        self.dropped.saturating_add(self.bad_batches())
    }

    fn bad_batches(&self) -> u64 {
        match &self.rx {
            Rx::Udp(u) => u.bad_batches(),
            Rx::Stream(_) => 0,
        }
    }

    /// Drops the expanded AEAD state until the next record arrives, which rebuilds it. A
    /// record of the previous epoch that arrives after this is refused (datagram channels
    /// count it as dropped). See [`keav_proto::record::Opener::compact`].
    pub fn compact(&mut self) {
        self.opener.compact();
    }

    /// The next piece of data (the plaintext of one record); `Ok(None)` after the peer's
    /// authenticated close (and on every later call). Errors: [`Error::Truncated`] if the
    /// stream ends without a close, [`Error::Record`] / [`Error::Frame`] on a stream that
    /// carried something forged (fatal), [`Error::Timeout`] after the idle timeout (not
    /// fatal), [`Error::Shutdown`] when the accepting listener shuts down.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        match self.state {
            HalfState::Closed => return Ok(None),
            HalfState::Failed => return Err(Error::Closed),
            HalfState::Open => {}
        }
        let idle = self.idle;
        loop {
            let next = async {
                match idle {
                    Some(d) => tokio::time::timeout(d, next_record(&mut self.rx))
                        .await
                        .unwrap_or(Err(Error::Timeout("no data within the idle timeout"))),
                    None => next_record(&mut self.rx).await,
                }
            };
            let got = tokio::select! {
                r = next => r,
                _ = shutdown_signalled(&mut self.shutdown) => Err(Error::Shutdown),
            };
            let mut rec = match got {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.state = HalfState::Failed;
                    return Err(Error::Truncated);
                }
                Err(e @ (Error::Timeout(_) | Error::Shutdown)) => return Err(e),
                Err(e) => {
                    self.state = HalfState::Failed;
                    return Err(e);
                }
            };
            let (base, rec_len) = (rec.as_ptr() as usize, rec.len());
            match self.opener.open(&mut rec, self.clock.now_ms()) {
                Ok(opened) => {
                    // The plaintext, decrypted in place, is a slice of `rec`: moved to its
                    // front, the record's buffer becomes the returned data (no new buffer).
                    // The span is checked against the buffer, so a slice from anywhere else
                    // would be copied rather than panic.
                    let plain = match opened {
                        Opened::Data(d) => {
                            let start = (d.as_ptr() as usize).wrapping_sub(base);
                            Some(match start.checked_add(d.len()) {
                                Some(end) if end <= rec_len => Ok(start..end),
                                _ => Err(d.to_vec()),
                            })
                        }
                        Opened::Close => None,
                    };
                    let data = plain.map(|p| match p {
                        Ok(span) => {
                            let len = span.len();
                            rec.copy_within(span, 0);
                            rec.truncate(len);
                            rec
                        }
                        Err(copied) => copied,
                    });
                    if let Rx::Udp(u) = &mut self.rx {
                        u.peer_confirmed();
                    }
                    match data {
                        Some(d) if d.is_empty() => continue,
                        Some(d) => return Ok(Some(d)),
                        None => {
                            self.state = HalfState::Closed;
                            return Ok(None);
                        }
                    }
                }
                Err(e) if self.stream => {
                    warn!(peer = %self.peer.peer_zid, error = %e, "record failed to open on a stream: closing the channel");
                    self.state = HalfState::Failed;
                    return Err(Error::Record(e));
                }
                Err(e) => {
                    self.dropped = self.dropped.saturating_add(1);
                    debug!(peer = %self.peer.peer_zid, error = %e, dropped = self.dropped, "dropped a datagram record");
                }
            }
        }
    }
}

/// The next record's bytes; `Ok(None)` when the transport ended. Cancel-safe.
///
/// A datagram's bytes are copied once, into a buffer of their size: the record is opened
/// in place in it and it becomes the plaintext. (Not `Vec::from(Bytes)`: for a payload cut
/// from a client's read buffer it can take over that whole buffer, many times the record's
/// size, and make the client allocate a new one.)
async fn next_record(rx: &mut Rx) -> Result<Option<Vec<u8>>, Error> {
    match rx {
        Rx::Stream(r) => loop {
            match r.read_frame().await? {
                None => return Ok(None),
                Some(f) if f.kind == FrameKind::Record => return Ok(Some(f.payload.to_vec())),
                Some(_) => {
                    // A handshake message after completion: nothing on a stream needs it.
                    debug!("ignoring a handshake frame on an established channel");
                }
            }
        },
        Rx::Udp(u) => u.next_record().await.map(|d| Some(d.to_vec())),
    }
}

// ---------------------------------------------------------------------------------------------
// Generic streams

pub(crate) async fn establish_stream<T, S>(
    device: &Device,
    stream: S,
    side: Side<'_>,
    deadline: Instant,
    opts: &Options,
    extra: Attach,
) -> Result<Channel<T>, Error>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut reader: FrameReader<BoxRead> = FrameReader::new(Box::new(r));
    let mut writer: FrameWriter<BoxWrite> = FrameWriter::new(Box::new(w));
    let done = {
        let mut link = HsLink::Stream(&mut reader, &mut writer);
        handshake(device, side, &mut link, deadline).await?
    };
    let label = match side {
        Side::Initiator(l) => Some(l.to_string()),
        Side::Responder => None,
    };
    Channel::new(
        device,
        &done.outcome,
        Parts {
            tx: Tx::Stream(writer),
            rx: Rx::Stream(reader),
            remote: extra.remote,
            label,
            shutdown: extra.shutdown,
            permit: extra.permit,
        },
        opts,
    )
}

/// What a driver attaches to a channel besides the handshake result.
#[derive(Default)]
pub(crate) struct Attach {
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) shutdown: Option<watch::Receiver<bool>>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
    /// Broker carriers: coalesce the sender's records ([`crate::coalesce`]).
    pub(crate) coalesce: bool,
}

/// Runs the initiator's handshake over any byte stream (framed as in [`crate::frame`]) and
/// returns the channel. `label` is the local name of the peer.
pub async fn connect_stream<S>(
    device: &Device,
    stream: S,
    label: &str,
    opts: &Options,
) -> Result<Channel<S>, Error>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let deadline = Instant::now() + device.settings().handshake_timeout;
    establish_stream(
        device,
        stream,
        Side::Initiator(label),
        deadline,
        opts,
        Attach::default(),
    )
    .await
}

/// Runs the responder's handshake over any byte stream and returns the channel.
pub async fn accept_stream<S>(
    device: &Device,
    stream: S,
    opts: &Options,
) -> Result<Channel<S>, Error>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let deadline = Instant::now() + device.settings().handshake_timeout;
    establish_stream(
        device,
        stream,
        Side::Responder,
        deadline,
        opts,
        Attach::default(),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Listener plumbing shared by TCP and UDP

/// One incoming handshake attempt, as a listener reports it.
#[derive(Debug)]
pub struct Incoming<T> {
    /// Where it came from.
    pub remote: SocketAddr,
    /// The channel, or why the handshake failed.
    pub result: Result<Channel<T>, Error>,
}

/// The part of a listener that hands out completed handshakes.
pub(crate) struct Acceptor<T> {
    pub(crate) incoming: mpsc::Receiver<Incoming<T>>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) task: JoinHandle<()>,
    pub(crate) grace: Duration,
}

impl<T> Drop for Acceptor<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: 'static> Acceptor<T> {
    pub(crate) async fn next_incoming(&mut self) -> Result<Incoming<T>, Error> {
        self.incoming.recv().await.ok_or(Error::Shutdown)
    }

    pub(crate) async fn accept(&mut self) -> Result<Channel<T>, Error> {
        loop {
            let inc = self.next_incoming().await?;
            if let Ok(ch) = inc.result {
                return Ok(ch);
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        self.task.abort();
        let _ = self.shutdown.send(true);
    }

    pub(crate) async fn serve<H, Fut, Sd>(mut self, handler: H, shutdown: Sd) -> Result<(), Error>
    where
        H: Fn(Channel<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
        Sd: Future<Output = ()>,
    {
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                inc = self.incoming.recv() => match inc {
                    None => break,
                    Some(Incoming { result: Ok(ch), .. }) => {
                        tasks.spawn(handler(ch));
                    }
                    Some(_) => {}
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        info!(handlers = tasks.len(), "shutting down");
        self.shutdown();
        let grace = self.grace;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                handlers = tasks.len(),
                "handlers did not finish within the grace period: aborting them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        Ok(())
    }
}

/// Handshake-task result queue capacity of a listener.
pub(crate) fn queue_capacity(opts: &Options) -> usize {
    opts.max_handshakes.clamp(1, 1024)
}
