//! KEAV over UDP: handshake messages in RFC 6189 packets (sequence number, `ZRTP` cookie,
//! SSRC, CRC-32c), retransmitted on the core's timers; records as datagrams. A datagram is
//! classified by its first byte: `0x10` ZRTP packet, `0x17` data record, `0x15` close record;
//! anything else is dropped.
//!
//! Channels over UDP are datagram channels: a record may be lost or arrive out of order (the
//! record layer's window sorts out duplicates and replays); records that fail to open are
//! dropped and counted, never delivered.
//!
//! [`Listener`] serves many peers from one socket through a bounded table keyed by source
//! address; each entry owns its own handshake endpoint and, once established, its channel.
//! Entries disappear when the handshake fails or times out, or when the channel is dropped.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keav_proto::handshake::Endpoint;
use keav_proto::msg::Message;
use keav_proto::packet::{decode_packet, encode_packet};
use keav_proto::record::batch::{self, BATCH_TAG};
use rand_core::{OsRng, RngCore};
use tokio::net::{ToSocketAddrs, UdpSocket};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::coalesce::Coalescer;
use crate::device::Device;
use crate::session::{
    self, handshake, log_failure, Acceptor, Attach, Channel, Clock, HsLink, Incoming, Options,
    Parts, Rx, Side, Tx,
};
use crate::Error;

/// First byte of a ZRTP packet.
pub(crate) const ZRTP_PACKET: u8 = 0x10;
/// First byte of a bare RFC 6189 message (its preamble `0x505a`), as broker transports carry
/// handshake messages: without the UDP packet header and CRC.
pub(crate) const BARE_MESSAGE: u8 = 0x50;
/// First byte of a data record.
pub(crate) const RECORD_DATA: u8 = 0x17;
/// First byte of a close record.
pub(crate) const RECORD_CLOSE: u8 = 0x15;
/// First byte of a record batch (several records in one datagram, [`batch`]).
pub(crate) const RECORD_BATCH: u8 = BATCH_TAG;
/// Records that arrive before the initiator's handshake completes, kept to open afterwards.
const MAX_EARLY: usize = 16;
/// Datagrams queued per peer of a listener.
const PEER_QUEUE: usize = 64;
/// Receive buffer (the largest UDP payload).
const DATAGRAM_MAX: usize = 65_536;

/// Where a peer's datagrams are sent.
#[derive(Clone, Debug)]
pub(crate) enum UdpTx {
    /// A UDP socket.
    Socket {
        socket: Arc<UdpSocket>,
        /// `None`: the socket is connected to the peer.
        peer: Option<SocketAddr>,
    },
    /// The peer's inbox on a broker (datagrams carried as MQTT or NATS messages,
    /// [`crate::broker`]).
    Broker(crate::broker::BrokerTx),
}

impl UdpTx {
    /// Sends one datagram; a broker carrier publishes `d` itself as the message's payload
    /// (no copy).
    pub(crate) async fn send(&self, d: Vec<u8>) -> Result<(), Error> {
        match self {
            UdpTx::Socket { socket, peer } => {
                match peer {
                    Some(p) => socket.send_to(&d, *p).await?,
                    None => socket.send(&d).await?,
                };
            }
            UdpTx::Broker(b) => b.send(d).await?,
        }
        Ok(())
    }
}

/// Where a peer's datagrams come from.
pub(crate) enum Source {
    /// A socket connected to the peer.
    Socket(Arc<UdpSocket>, Vec<u8>),
    /// A listener's (or a broker link's) per-peer queue.
    Queue(mpsc::Receiver<Bytes>),
}

impl Source {
    /// The next datagram. Cancel-safe.
    async fn next(&mut self) -> Result<Bytes, Error> {
        match self {
            Source::Socket(s, buf) => loop {
                match s.recv(buf).await {
                    Ok(n) => return Ok(Bytes::copy_from_slice(buf.get(..n).unwrap_or_default())),
                    // An ICMP "port unreachable" for an earlier datagram: the peer may not be
                    // up yet; the retransmission timers decide when to give up.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        debug!("UDP peer unreachable (ICMP)");
                    }
                    Err(e) => return Err(e.into()),
                }
            },
            Source::Queue(q) => q.recv().await.ok_or(Error::Shutdown),
        }
    }
}

/// The handshake side of one UDP peer.
pub(crate) struct HsUdp {
    tx: UdpTx,
    source: Source,
    seq: u16,
    ssrc: u32,
    early: VecDeque<Bytes>,
    /// Broker transports: handshake messages travel bare (no packet header, no CRC).
    bare: bool,
}

impl HsUdp {
    pub(crate) fn new(tx: UdpTx, source: Source) -> Self {
        Self {
            tx,
            source,
            seq: (OsRng.next_u32() & 0x7fff) as u16,
            ssrc: OsRng.next_u32(),
            early: VecDeque::new(),
            bare: false,
        }
    }

    /// Like [`HsUdp::new`], for a broker transport: handshake messages are sent and expected
    /// as bare RFC 6189 messages.
    pub(crate) fn new_bare(tx: UdpTx, source: Source) -> Self {
        Self {
            bare: true,
            ..Self::new(tx, source)
        }
    }

    fn next_seq(&mut self) -> u16 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends each message in its own packet with a fresh sequence number.
    pub(crate) async fn send_messages(&mut self, msgs: &[Vec<u8>]) -> Result<(), Error> {
        for m in msgs {
            if self.bare {
                self.tx.send(m.clone()).await?;
                continue;
            }
            let seq = self.next_seq();
            let p = encode_packet(seq, self.ssrc, m);
            self.tx.send(p).await?;
        }
        Ok(())
    }

    /// The next ZRTP message that arrived in a well-formed packet. Cancel-safe.
    pub(crate) async fn recv_message(&mut self) -> Result<Vec<u8>, Error> {
        loop {
            let d = self.source.next().await?;
            match d.first() {
                Some(&BARE_MESSAGE) if self.bare => return Ok(d.to_vec()),
                Some(&ZRTP_PACKET) if !self.bare => match decode_packet(&d) {
                    Ok(p) => return Ok(p.message.to_vec()),
                    Err(e) => debug!(error = %e, "dropped a malformed ZRTP packet"),
                },
                Some(&RECORD_DATA | &RECORD_CLOSE | &RECORD_BATCH) => {
                    if self.early.len() < MAX_EARLY {
                        self.early.push_back(d);
                    }
                }
                _ => debug!("dropped an unclassifiable datagram"),
            }
        }
    }

    fn into_rx(self, endpoint: Option<Box<Endpoint>>) -> (UdpTx, UdpRx) {
        let rx = UdpRx {
            tx: self.tx.clone(),
            source: self.source,
            seq: self.seq,
            ssrc: self.ssrc,
            endpoint,
            clock: Clock::start(),
            pending: self.early,
            batch: VecDeque::new(),
            bad_batches: 0,
            bare: self.bare,
        };
        (self.tx, rx)
    }
}

/// The receiving side of an established UDP channel.
pub(crate) struct UdpRx {
    tx: UdpTx,
    source: Source,
    seq: u16,
    ssrc: u32,
    /// Responder: kept to answer a retransmitted Confirm2 (our Conf2ACK was lost) until the
    /// peer's first record proves it has completed.
    endpoint: Option<Box<Endpoint>>,
    clock: Clock,
    /// Datagrams that arrived before the handshake completed (records or batches).
    pending: VecDeque<Bytes>,
    /// The records of the batch being read, not yet handed out.
    batch: VecDeque<Bytes>,
    /// Malformed batches dropped.
    bad_batches: u64,
    /// Broker transports: handshake messages travel bare (see [`HsUdp::new_bare`]).
    bare: bool,
}

impl UdpRx {
    /// The next datagram that looks like a record, the records of a batch one by one.
    /// Cancel-safe.
    pub(crate) async fn next_record(&mut self) -> Result<Bytes, Error> {
        loop {
            if let Some(r) = self.batch.pop_front() {
                return Ok(r);
            }
            let d = match self.pending.pop_front() {
                Some(d) => d,
                None => self.source.next().await?,
            };
            match d.first() {
                Some(&RECORD_DATA | &RECORD_CLOSE) => return Ok(d),
                Some(&RECORD_BATCH) => self.unbatch(&d),
                Some(&ZRTP_PACKET) if !self.bare => self.late_handshake(&d).await?,
                Some(&BARE_MESSAGE) if self.bare => self.late_handshake(&d).await?,
                _ => debug!("dropped an unclassifiable datagram"),
            }
        }
    }

    /// Queues the records of batch `d` (shared slices of it), or drops and counts it whole
    /// if it is malformed.
    fn unbatch(&mut self, d: &Bytes) {
        match batch::records(d) {
            Ok(records) => self.batch.extend(records.map(|r| d.slice(r))),
            Err(e) => {
                self.bad_batches = self.bad_batches.saturating_add(1);
                debug!(error = %e, len = d.len(), "dropped a malformed record batch");
            }
        }
    }

    /// Malformed record batches dropped so far.
    pub(crate) fn bad_batches(&self) -> u64 {
        self.bad_batches
    }

    /// The peer's first record opened: it has completed, the endpoint is no longer needed.
    pub(crate) fn peer_confirmed(&mut self) {
        self.endpoint = None;
    }

    async fn late_handshake(&mut self, d: &[u8]) -> Result<(), Error> {
        let Some(ep) = self.endpoint.as_mut() else {
            return Ok(());
        };
        let message = if self.bare {
            d
        } else {
            let Ok(p) = decode_packet(d) else {
                return Ok(());
            };
            p.message
        };
        // Only a retransmitted Confirm2 needs an answer (Conf2ACK); anything else could only
        // make the completed endpoint queue an Error for the peer.
        if !matches!(Message::parse(message), Ok(Message::Confirm2(_))) {
            return Ok(());
        }
        if ep
            .handle_message(message, self.clock.now_ms(), &mut OsRng)
            .is_err()
        {
            self.endpoint = None;
            return Ok(());
        }
        let msgs: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit()).collect();
        for m in msgs {
            if self.bare {
                self.tx.send(m).await?;
                continue;
            }
            self.seq = self.seq.wrapping_add(1);
            let pkt = encode_packet(self.seq, self.ssrc, &m);
            self.tx.send(pkt).await?;
        }
        Ok(())
    }
}

pub(crate) fn channel_from<T>(
    device: &Device,
    done: session::Handshaken,
    link: HsUdp,
    keep_endpoint: bool,
    label: Option<String>,
    opts: &Options,
    attach: Attach,
) -> Result<Channel<T>, Error> {
    let (tx, rx) = link.into_rx(keep_endpoint.then(|| Box::new(done.endpoint)));
    let tx = match tx {
        UdpTx::Broker(b) if attach.coalesce => Tx::Batched(Coalescer::new(b)),
        tx => Tx::Udp(tx),
    };
    Channel::new(
        device,
        &done.outcome,
        Parts {
            tx,
            rx: Rx::Udp(rx),
            remote: attach.remote,
            label,
            shutdown: attach.shutdown,
            permit: attach.permit,
        },
        opts,
    )
}

/// Runs the handshake as initiator over a UDP socket connected to `addr`, with the peer known
/// locally as `label`, and returns the channel.
pub async fn connect(
    device: &Device,
    addr: impl ToSocketAddrs,
    label: &str,
    opts: &Options,
) -> Result<Channel<UdpSocket>, Error> {
    let deadline = Instant::now() + device.settings().handshake_timeout;
    let target = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or(Error::InvalidInput("address resolved to nothing"))?;
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    let socket = Arc::new(socket);
    let mut link = HsUdp::new(
        UdpTx::Socket {
            socket: socket.clone(),
            peer: None,
        },
        Source::Socket(socket, vec![0; DATAGRAM_MAX]),
    );
    let done = handshake(
        device,
        Side::Initiator(label),
        &mut HsLink::Udp(&mut link),
        deadline,
    )
    .await?;
    channel_from(
        device,
        done,
        link,
        false,
        Some(label.to_string()),
        opts,
        Attach {
            remote: Some(target),
            ..Attach::default()
        },
    )
}

/// A UDP listener serving many peers from one socket.
pub struct Listener {
    local_addr: SocketAddr,
    acceptor: Acceptor<UdpSocket>,
}

impl core::fmt::Debug for Listener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("udp::Listener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Binds `addr` and starts serving.
    pub async fn bind(
        device: &Device,
        addr: impl ToSocketAddrs,
        opts: Options,
    ) -> Result<Listener, Error> {
        opts.check()?;
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let local_addr = socket.local_addr()?;
        let (tx, rx) = mpsc::channel(session::queue_capacity(&opts));
        let (sd_tx, sd_rx) = watch::channel(false);
        let grace = opts.shutdown_grace;
        let task = tokio::spawn(demux_loop(device.clone(), socket, opts, tx, sd_rx));
        info!(%local_addr, "listening (UDP)");
        Ok(Listener {
            local_addr,
            acceptor: Acceptor {
                incoming: rx,
                shutdown: sd_tx,
                task,
                grace,
            },
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next completed handshake (failed ones are logged and skipped).
    pub async fn accept(&mut self) -> Result<Channel<UdpSocket>, Error> {
        self.acceptor.accept().await
    }

    /// The next handshake attempt, successful or not.
    pub async fn next_incoming(&mut self) -> Result<Incoming<UdpSocket>, Error> {
        self.acceptor.next_incoming().await
    }

    /// Stops serving (the socket closes, so channels accepted here stop receiving) and tells
    /// every channel to close.
    pub fn shutdown(&self) {
        self.acceptor.shutdown();
    }

    /// Like [`crate::tcp::Listener::serve`].
    pub async fn serve<H, Fut>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        H: Fn(Channel<UdpSocket>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.acceptor.serve(handler, shutdown).await
    }
}

/// Whether a datagram from a new source may open a table entry: a well-formed ZRTP packet
/// carrying a Hello. No public-key work, no allocation beyond the parse.
fn is_hello_packet(d: &[u8]) -> bool {
    d.first() == Some(&ZRTP_PACKET)
        && decode_packet(d)
            .is_ok_and(|p| matches!(Message::parse(p.message), Ok(Message::Hello(_))))
}

async fn demux_loop(
    device: Device,
    socket: Arc<UdpSocket>,
    opts: Options,
    out: mpsc::Sender<Incoming<UdpSocket>>,
    shutdown: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(opts.max_handshakes));
    let connections = Arc::new(Semaphore::new(opts.max_connections));
    let mut table: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM_MAX];
    let mut purge = tokio::time::interval(Duration::from_secs(1));
    loop {
        let (n, src) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
            _ = purge.tick() => {
                table.retain(|_, q| !q.is_closed());
                while tasks.try_join_next().is_some() {}
                continue;
            }
        };
        let Some(d) = buf.get(..n) else { continue };
        if let Some(q) = table.get(&src) {
            match q.try_send(Bytes::copy_from_slice(d)) {
                Ok(()) => continue,
                Err(TrySendError::Full(_)) => {
                    debug!(%src, "peer queue full: datagram dropped");
                    continue;
                }
                Err(TrySendError::Closed(_)) => {
                    table.remove(&src);
                }
            }
        }
        if !is_hello_packet(d) {
            debug!(%src, "datagram from an unknown source is not a Hello: dropped");
            continue;
        }
        if table.len() >= opts.max_connections {
            table.retain(|_, q| !q.is_closed());
        }
        let (Ok(hs), Ok(conn)) = (
            handshakes.clone().try_acquire_owned(),
            connections.clone().try_acquire_owned(),
        ) else {
            debug!(%src, "at capacity: Hello dropped (the peer retransmits)");
            continue;
        };
        let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
        let _ = qtx.try_send(Bytes::copy_from_slice(d));
        table.insert(src, qtx);
        let link = HsUdp::new(
            UdpTx::Socket {
                socket: socket.clone(),
                peer: Some(src),
            },
            Source::Queue(qrx),
        );
        let (device, opts, out, shutdown) =
            (device.clone(), opts.clone(), out.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut link = link;
            let deadline = Instant::now() + device.settings().handshake_timeout;
            let done = handshake(
                &device,
                Side::Responder,
                &mut HsLink::Udp(&mut link),
                deadline,
            )
            .await;
            drop(hs);
            let result = done.and_then(|done| {
                channel_from(
                    &device,
                    done,
                    link,
                    true,
                    None,
                    &opts,
                    Attach {
                        remote: Some(src),
                        shutdown: Some(shutdown),
                        permit: Some(conn),
                        coalesce: false,
                    },
                )
            });
            if let Err(e) = &result {
                log_failure("incoming UDP handshake", Some(src), e);
            }
            let _ = out
                .send(Incoming {
                    remote: src,
                    result,
                })
                .await;
        });
    }
}
