//! The `broker` scenario: durable end-to-end messaging through real brokers.
//!
//! For each broker (MQTT: `--mqtt HOST:PORT`, or an embedded rumqttd on a free loopback port;
//! NATS: `--nats HOST:PORT`, skipped without it) and each message size (64 B, 1 KiB):
//!
//! - **plaintext**: a plain client publishes `n` messages on one subject (MQTT: rumqttc, QoS 1,
//!   as keav's MQTT link; NATS: async-nats core publish, as keav's NATS link) to a plain
//!   subscriber on the same broker; timed from the first publish to the last message the
//!   subscriber receives. Lost messages (nothing resends them) are counted; the rate counts
//!   what arrived. The MQTT clients' event loops run in tasks of their own, the subscriber's
//!   handing messages on through a bounded queue, as keav's MQTT link does (the async-nats
//!   client has its own connection task).
//! - **keav live**: two devices paired over the same broker (a KEAV session over
//!   [`keav_net::mqtt`] / [`keav_net::nats`], the live [`Channel`]); after one untimed
//!   warm-up message the sender `send`s `n` messages as channel records as fast as the link
//!   takes them (MQTT QoS 1 through the same rumqttc client settings, NATS core publish, as
//!   the plaintext run) and the receiver `recv`s them, checking each body and that they
//!   arrive in order; timed from the first `send` to the last message received. Messages
//!   that never arrive (a datagram channel drops what a full queue cannot take) are counted
//!   as lost, as for the plain clients, and the rate counts what arrived. Only the
//!   encryption differs from the plaintext run: no store, no acknowledgements; and, with
//!   keav's default [`LinkOptions::coalesce_records`], records that pile up while the link
//!   publishes leave as one broker message. The run is repeated with coalescing off ("a
//!   message per record": one broker message per encrypted message, like for like).
//!
//!   In both of these runs the sending side and the receiving side are two devices, each
//!   its own client and each run as a task of its own on the multi-threaded runtime (not
//!   one task driving both), so either side's work runs on its own thread when one is free.
//! - **keav durable**: two devices paired over the same broker ([`Messenger`], direct delivery); the
//!   sender sends `n` messages, the receiver `recv`s them (and `ack`s every [`ACK_EVERY`]);
//!   timed from the first `send` to the last `recv`. Sends are pipelined, up to
//!   [`SEND_WINDOW`] in flight (each returns once committed; the messenger group-commits
//!   concurrent sends). Every message is checked: from the paired sender, in sequence, each
//!   body exactly once.
//!
//! Then the **mailbox drain**: a relay on the same broker, the two devices paired through it;
//! the receiver goes offline, the sender sends `n` messages of 64 B, and once the relay's
//! mailbox holds all of them the receiver comes back: timed from its `Messenger::start` (its
//! broker connection already up) to its last `recv`.
//!
//! Device stores and the relay's mailbox live in temporary directories (on disk, fsynced):
//! keav durable's rate includes its durable commits; keav live and the plain clients write
//! nothing per message.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use keav_net::broker::LinkOptions;
use keav_net::device::{Device, DeviceSettings};
use keav_net::embedded_broker::{BrokerOptions, EmbeddedBroker};
use keav_net::messenger::{Carrier, Delivery, Message, Messenger, MessengerOptions};
use keav_net::relay::{NextHop, Relay, RelayConfig, RouteRule};
use keav_net::session::{Channel, Options as ChannelOptions, RecvHalf, SendHalf};
use keav_verify::VerifySecret;

use crate::keav::BENCH_PAIRING_CODE;
use crate::options::parse_broker_addr;
use crate::report::{BrokerRow, DrainRow};
use crate::run::{Ctx, Progress};
use crate::BenchError;

/// Message sizes of the throughput measurements.
pub const SIZES: [usize; 2] = [64, 1024];
/// Message size of the drain measurement.
pub const DRAIN_SIZE: usize = 64;
/// keav sends in flight at once (the messenger's default `batch_max`).
pub const SEND_WINDOW: usize = 512;
/// The receiving application acknowledges every this many messages (and the last one).
pub const ACK_EVERY: u64 = 64;
/// The paced keav variant sends bursts of this many messages and waits for their end-to-end
/// acks (`flush`) before the next burst: flow control by the application, one receiver
/// reorder window (the default `InboxLimits`) at a time.
pub const PACE_BURST: u64 = 256;
/// Pairing deadline.
const PAIR_TIMEOUT: Duration = Duration::from_secs(60);
/// keav: no message for this long fails the measurement (resends back off from 2 s).
const KEAV_IDLE: Duration = Duration::from_secs(60);
/// Plain clients: no message for this long ends the measurement; the rest counts as lost.
const PLAIN_IDLE: Duration = Duration::from_secs(10);
/// Connection set-up deadline of the plain clients.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress is reported in steps of this many messages.
const PROGRESS_STEP: u64 = 64;

/// Which kind of broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// MQTT 3.1.1.
    Mqtt,
    /// Core NATS.
    Nats,
}

impl Kind {
    /// `mqtt` or `nats`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mqtt => "mqtt",
            Kind::Nats => "nats",
        }
    }
}

/// One broker under test.
#[derive(Clone, Debug)]
pub struct Target {
    /// MQTT or NATS.
    pub kind: Kind,
    /// `host:port`.
    pub addr: String,
    /// How the report names it.
    pub label: String,
}

/// Runs the scenario, pushing rows into `ctx.report`. A broker that cannot be measured is
/// reported and the others still run; the scenario then fails with every reason.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let mut targets = Vec::new();
    let mut embedded = None;
    match &ctx.opts.mqtt {
        Some(a) => {
            let addr = parse_broker_addr(a, "mqtt")?;
            targets.push(Target {
                kind: Kind::Mqtt,
                label: format!("MQTT {addr}"),
                addr,
            });
        }
        None => {
            let b = EmbeddedBroker::start(embedded_options())?;
            targets.push(Target {
                kind: Kind::Mqtt,
                addr: b.addr().to_string(),
                label: "MQTT (embedded rumqttd)".into(),
            });
            embedded = Some(b);
        }
    }
    match &ctx.opts.nats {
        Some(a) => {
            let addr = parse_broker_addr(a, "nats")?;
            targets.push(Target {
                kind: Kind::Nats,
                label: format!("NATS {addr}"),
                addr,
            });
        }
        None => ctx
            .report
            .notes
            .push("broker: NATS not measured (no --nats HOST:PORT given).".into()),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut failures = Vec::new();
    let mut result = Ok(());
    for t in &targets {
        if let Err(e) = rt.block_on(measure_target(ctx, t, &mut failures)) {
            result = Err(e);
            break;
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(embedded);
    result?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Report(failures.join("; ")))
    }
}

/// The embedded broker of the scenario: the default limits, with room for the largest run's
/// backlog (64 MiB per subscription) so a slow subscriber loses nothing.
fn embedded_options() -> BrokerOptions {
    BrokerOptions {
        queue_segment_bytes: 4 << 20,
        queue_segments: 16,
        ..BrokerOptions::default()
    }
}

/// `Ok(Some)` for a measurement, `Ok(None)` after noting its failure; `Err` only when the run
/// was stopped.
fn keep<T>(
    r: Result<T, BenchError>,
    what: String,
    failures: &mut Vec<String>,
) -> Result<Option<T>, BenchError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(BenchError::Cancelled) => Err(BenchError::Cancelled),
        Err(e) => {
            failures.push(format!("{what}: {e}"));
            Ok(None)
        }
    }
}

async fn measure_target(
    ctx: &mut Ctx<'_>,
    t: &Target,
    failures: &mut Vec<String>,
) -> Result<(), BenchError> {
    let n = u64::from(ctx.opts.broker_messages);
    let (progress, cancel) = (ctx.progress, ctx.cancel);
    let k = t.kind.name();
    for size in SIZES {
        ctx.check()?;
        progress.stage(&format!("broker {k} {size} B plain"), n);
        let plain = cancellable(cancel, plain_run(t, size, n, progress)).await;
        let Some(plain) = keep(plain, format!("{} {size} B plaintext", t.label), failures)? else {
            continue;
        };
        ctx.check()?;
        progress.stage(&format!("broker {k} {size} B keav live"), n);
        let live = cancellable(cancel, live_run(t, size, n, progress, true)).await;
        let live = keep(live, format!("{} {size} B keav live", t.label), failures)?;
        ctx.check()?;
        progress.stage(
            &format!("broker {k} {size} B keav live, a message per record"),
            n,
        );
        let single = cancellable(cancel, live_run(t, size, n, progress, false)).await;
        let single = keep(
            single,
            format!("{} {size} B keav live, a message per record", t.label),
            failures,
        )?;
        ctx.check()?;
        progress.stage(&format!("broker {k} {size} B keav durable"), n);
        let keav = cancellable(cancel, keav_run(t, size, n, progress, None)).await;
        let Some(keav) = keep(keav, format!("{} {size} B keav durable", t.label), failures)? else {
            continue;
        };
        ctx.check()?;
        progress.stage(&format!("broker {k} {size} B keav durable paced"), n);
        let paced = cancellable(cancel, keav_run(t, size, n, progress, Some(PACE_BURST))).await;
        let paced = keep(
            paced,
            format!("{} {size} B keav durable paced", t.label),
            failures,
        )?;
        let mut row = broker_row(t, size, n, &keav, &plain, live.as_ref());
        if let Some(s) = &single {
            let r = rate(s.received, s.elapsed);
            row.live_single_msgs_per_s = Some(r);
            row.live_single_ratio = ratio(r, row.plain_msgs_per_s);
        }
        if let Some(p) = paced {
            row.keav_paced_msgs_per_s = Some(rate(n, p.elapsed));
        }
        progress.note(&format!(
            "{} {size} B: keav live {} msg/s, keav durable {:.0} msg/s, plaintext {:.0} msg/s",
            t.label,
            row.live_msgs_per_s
                .map_or_else(|| "—".to_string(), |r| format!("{r:.0}")),
            row.keav_msgs_per_s,
            row.plain_msgs_per_s
        ));
        ctx.report.broker.push(row);
    }
    ctx.check()?;
    let d = cancellable(cancel, drain_run(t, n, progress)).await;
    if let Some(row) = keep(d, format!("{} mailbox drain", t.label), failures)? {
        progress.note(&format!(
            "{}: drained {} messages at {:.0} msg/s",
            t.label, row.held, row.drain_msgs_per_s
        ));
        ctx.report.drain.push(row);
    }
    Ok(())
}

/// One timed plain run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlainRun {
    /// First publish to last message received.
    pub elapsed: Duration,
    /// Distinct messages received.
    pub received: u64,
}

/// One timed keav live run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LiveRun {
    /// First send to last message received.
    pub elapsed: Duration,
    /// Messages received (each checked, in order).
    pub received: u64,
    /// Records the receiver dropped: its link's queue was full, or they failed to open.
    pub dropped: u64,
    /// CPU time of this whole process during the measurement, if the system tells.
    pub cpu: Option<Duration>,
}

/// One timed keav durable run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KeavRun {
    /// First send to last recv.
    pub elapsed: Duration,
    /// Payloads resent by the sender.
    pub resent: u64,
    /// Payloads the receiver could not take on arrival (stashed, or left to the sender's
    /// resend).
    pub deferred: u64,
    /// Messages the receiver took from its early-arrival stash.
    pub early: u64,
    /// Payloads the two links dropped (a full queue).
    pub dropped: u64,
    /// CPU time of this whole process during the measurement (both devices, and the
    /// embedded broker if it runs), if the system tells.
    pub cpu: Option<Duration>,
}

/// Messages per second; 0 for an empty or instantaneous run.
pub fn rate(messages: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        messages as f64 / s
    } else {
        0.0
    }
}

/// `a / b` when `b` is a positive rate.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// The report row of one size on one broker (`live`: `None` if that run failed).
pub fn broker_row(
    t: &Target,
    size: usize,
    n: u64,
    keav: &KeavRun,
    plain: &PlainRun,
    live: Option<&LiveRun>,
) -> BrokerRow {
    let k = rate(n, keav.elapsed);
    let p = rate(plain.received, plain.elapsed);
    let l = live.map(|l| rate(l.received, l.elapsed));
    BrokerRow {
        live_msgs_per_s: l,
        live_secs: live.map(|l| l.elapsed.as_secs_f64()),
        live_lost: live.map(|l| n.saturating_sub(l.received)),
        live_dropped: live.map(|l| l.dropped),
        live_cpu_secs: live.and_then(|l| l.cpu).map(|d| d.as_secs_f64()),
        live_ratio: l.and_then(|l| ratio(l, p)),
        live_single_msgs_per_s: None,
        live_single_ratio: None,
        broker: t.label.clone(),
        carrier: t.kind.name().into(),
        size,
        messages: n,
        keav_msgs_per_s: k,
        keav_secs: keav.elapsed.as_secs_f64(),
        keav_resent: keav.resent,
        keav_deferred: keav.deferred,
        keav_early: keav.early,
        keav_link_dropped: keav.dropped,
        keav_cpu_secs: keav.cpu.map(|d| d.as_secs_f64()),
        keav_paced_msgs_per_s: None,
        plain_msgs_per_s: p,
        plain_secs: plain.elapsed.as_secs_f64(),
        plain_lost: n.saturating_sub(plain.received),
        ratio: ratio(k, p),
    }
}

/// Runs `fut`, giving up with [`BenchError::Cancelled`] once `cancel` is set (checked every
/// 100 ms).
async fn cancellable<T>(
    cancel: &AtomicBool,
    fut: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => {
                if cancel.load(Ordering::Relaxed) {
                    return Err(BenchError::Cancelled);
                }
            }
        }
    }
}

/// Progress in steps of [`PROGRESS_STEP`].
struct Ticker<'a> {
    progress: &'a dyn Progress,
    pending: u64,
}

impl<'a> Ticker<'a> {
    fn new(progress: &'a dyn Progress) -> Self {
        Ticker {
            progress,
            pending: 0,
        }
    }
    fn tick(&mut self) {
        self.pending += 1;
        if self.pending >= PROGRESS_STEP {
            self.progress.advance(self.pending);
            self.pending = 0;
        }
    }
}

impl Drop for Ticker<'_> {
    fn drop(&mut self) {
        if self.pending > 0 {
            self.progress.advance(self.pending);
        }
    }
}

/// Progress from the receiving side of a run, which runs in a task of its own: counted into
/// a shared counter in steps of [`PROGRESS_STEP`] and forwarded by [`two_devices`].
struct Counter {
    shared: Arc<AtomicU64>,
    pending: u64,
}

impl Counter {
    fn new(shared: &Arc<AtomicU64>) -> Counter {
        Counter {
            shared: Arc::clone(shared),
            pending: 0,
        }
    }
    fn tick(&mut self) {
        self.pending += 1;
        if self.pending >= PROGRESS_STEP {
            self.shared.fetch_add(self.pending, Ordering::Relaxed);
            self.pending = 0;
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if self.pending > 0 {
            self.shared.fetch_add(self.pending, Ordering::Relaxed);
        }
    }
}

/// A spawned task, aborted if its handle is dropped before it ended (a failed or cancelled
/// run stops both devices).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn joined<T>(r: Result<Result<T, BenchError>, tokio::task::JoinError>) -> Result<T, BenchError> {
    r.unwrap_or_else(|e| Err(fail(format!("a device task failed: {e}"))))
}

/// The two devices of a timed run, as the issue describes them: two clients, the sending
/// side and the receiving side each a task of its own on the multi-threaded runtime (the
/// same for plaintext and keav live). Returns both results once both ended, or the first
/// error (the other task is then aborted); forwards the receiving side's progress
/// (`done`) meanwhile.
async fn two_devices<A, B>(
    progress: &dyn Progress,
    done: &AtomicU64,
    sending: impl Future<Output = Result<A, BenchError>> + Send + 'static,
    receiving: impl Future<Output = Result<B, BenchError>> + Send + 'static,
) -> Result<(A, B), BenchError>
where
    A: Send + 'static,
    B: Send + 'static,
{
    let mut s = Task(tokio::spawn(sending));
    let mut r = Task(tokio::spawn(receiving));
    let (mut a, mut b) = (None, None);
    let mut reported = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let forward = |reported: &mut u64| {
        let d = done.load(Ordering::Relaxed);
        if d > *reported {
            progress.advance(d - *reported);
            *reported = d;
        }
    };
    while a.is_none() || b.is_none() {
        tokio::select! {
            x = &mut s.0, if a.is_none() => a = Some(joined(x)?),
            x = &mut r.0, if b.is_none() => b = Some(joined(x)?),
            _ = tick.tick() => forward(&mut reported),
        }
    }
    forward(&mut reported);
    match (a, b) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(fail("a device task did not end")),
    }
}

/// Message `i` of `size` bytes (at least 8): `i` little-endian, then a filler pattern.
pub fn body(i: u64, size: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..size).map(|j| (j % 251) as u8 ^ 0x5a).collect();
    let idx = i.to_le_bytes();
    let k = idx.len().min(size);
    b[..k].copy_from_slice(&idx[..k]);
    b
}

/// Which of `n` messages arrived, each checked against [`body`].
pub struct Seen {
    got: Vec<bool>,
    size: usize,
    /// Distinct messages received.
    pub distinct: u64,
    /// Messages received again.
    pub duplicates: u64,
}

impl Seen {
    /// Expects messages `0..n` of `size` bytes.
    pub fn new(n: u64, size: usize) -> Seen {
        Seen {
            got: vec![false; usize::try_from(n).unwrap_or(0)],
            size,
            distinct: 0,
            duplicates: 0,
        }
    }

    /// Takes one received body: `Ok(true)` if new, `Ok(false)` for a duplicate, `Err` for a
    /// body that is no message of this run.
    pub fn take(&mut self, b: &[u8]) -> Result<bool, String> {
        if b.len() != self.size {
            return Err(format!(
                "a message of {} bytes arrived, {} expected",
                b.len(),
                self.size
            ));
        }
        let i = b
            .get(..8)
            .and_then(|x| <[u8; 8]>::try_from(x).ok())
            .map(u64::from_le_bytes)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < self.got.len())
            .ok_or("a message with an index outside the run arrived")?;
        if b != body(i as u64, self.size) {
            return Err(format!("message {i} arrived altered"));
        }
        match self.got.get_mut(i) {
            Some(g) if !*g => {
                *g = true;
                self.distinct += 1;
                Ok(true)
            }
            _ => {
                self.duplicates += 1;
                Ok(false)
            }
        }
    }

    /// Whether every message arrived.
    pub fn complete(&self) -> bool {
        self.distinct as usize == self.got.len()
    }
}

fn fail(m: impl Into<String>) -> BenchError {
    BenchError::Report(m.into())
}

async fn within<T, E: Into<BenchError>>(
    d: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, BenchError> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(fail(format!("{what}: no answer within {} s", d.as_secs()))),
    }
}

/// A fresh id for devices, topics and clients of one measurement.
fn unique() -> String {
    format!("kb{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------
// Plain clients
// ---------------------------------------------------------------------------------------

async fn plain_run(
    t: &Target,
    size: usize,
    n: u64,
    progress: &dyn Progress,
) -> Result<PlainRun, BenchError> {
    match t.kind {
        Kind::Mqtt => plain_mqtt(&t.addr, size, n, progress).await,
        Kind::Nats => plain_nats(&t.addr, size, n, progress).await,
    }
}

/// `host:port` (IPv6 in brackets) to rumqttc's host and port.
fn host_port(addr: &str) -> Result<(String, u16), BenchError> {
    let (h, p) = addr
        .rsplit_once(':')
        .ok_or_else(|| fail(format!("{addr}: no port")))?;
    let port = p.parse().map_err(|_| fail(format!("{addr}: bad port")))?;
    let host = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(h);
    Ok((host.to_string(), port))
}

fn mqtt_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    fail(format!("plain MQTT {what}: {e}"))
}

async fn plain_mqtt(
    addr: &str,
    size: usize,
    n: u64,
    progress: &dyn Progress,
) -> Result<PlainRun, BenchError> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
    let (host, port) = host_port(addr)?;
    let id = unique();
    let topic = format!("keav-bench/{id}/plain");
    let options = |client_id: String| {
        let mut mo = MqttOptions::new(client_id, host.clone(), port);
        mo.set_keep_alive(Duration::from_secs(30));
        mo.set_clean_session(true);
        mo.set_max_packet_size(1 << 20, 1 << 20);
        mo
    };
    // The subscriber, subscribed before anything is published.
    let (sub, mut sub_loop) = AsyncClient::new(options(format!("{id}-sub")), 64);
    sub.subscribe(topic.clone(), QoS::AtLeastOnce)
        .await
        .map_err(|e| mqtt_err("subscribe", e))?;
    within(CONNECT_TIMEOUT, "plain MQTT subscription", async {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    return if s
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        Ok(())
                    } else {
                        Err(fail("plain MQTT: the broker refused the subscription"))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(mqtt_err("subscriber", e)),
            }
        }
    })
    .await?;
    let (publisher, mut pub_loop) = AsyncClient::new(options(format!("{id}-pub")), 64);
    within(CONNECT_TIMEOUT, "plain MQTT connection", async {
        loop {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(mqtt_err("publisher", e)),
            }
        }
    })
    .await?;

    // The subscriber's event loop runs in a task of its own and hands each message to the
    // receiving side through a bounded queue, as keav's link does (its event loop task
    // routes records to the channel's queue of 256).
    let (msgs, mut inbox) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, BenchError>>(256);
    let subscriber = tokio::spawn(async move {
        loop {
            let m = match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => Ok(p.payload),
                Ok(_) => continue,
                Err(e) => Err(mqtt_err("subscriber", e)),
            };
            let stop = m.is_err();
            if msgs.send(m).await.is_err() || stop {
                return;
            }
        }
    });

    // The two devices: the sending side and the receiving side, each a task of its own.
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let sending = {
        let publisher = publisher.clone();
        async move {
            for i in 0..n {
                publisher
                    .publish(topic.clone(), QoS::AtLeastOnce, false, body(i, size))
                    .await
                    .map_err(|e| mqtt_err("publish", e))?;
            }
            Ok::<(), BenchError>(())
        }
    };
    let receiving = {
        let mut counter = Counter::new(&done);
        async move {
            let mut seen = Seen::new(n, size);
            let mut last = t0;
            while !seen.complete() {
                let payload =
                    match tokio::time::timeout_at((last + PLAIN_IDLE).into(), inbox.recv()).await {
                        Ok(Some(p)) => p?,
                        Ok(None) => return Err(mqtt_err("subscriber", "stopped")),
                        Err(_) => break,
                    };
                if seen.take(&payload).map_err(fail)? {
                    last = Instant::now();
                    counter.tick();
                }
            }
            Ok::<_, BenchError>(PlainRun {
                elapsed: last - t0,
                received: seen.distinct,
            })
        }
    };
    // The publisher's event loop sends the queued publishes and takes the PUBACKs, in a task
    // of its own as keav's link runs its event loop.
    let mut driving = tokio::spawn(async move {
        loop {
            if let Err(e) = pub_loop.poll().await {
                return mqtt_err("publisher", e);
            }
        }
    });
    let r = tokio::select! {
        r = two_devices(progress, &done, sending, receiving) => r.map(|((), run)| run),
        e = &mut driving => Err(e.unwrap_or_else(|e| mqtt_err("publisher task", e))),
    };
    driving.abort();
    subscriber.abort();
    let _ = publisher.try_disconnect();
    let _ = sub.try_disconnect();
    r
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    fail(format!("plain NATS {what}: {e}"))
}

async fn plain_nats(
    addr: &str,
    size: usize,
    n: u64,
    progress: &dyn Progress,
) -> Result<PlainRun, BenchError> {
    let url = format!("nats://{addr}");
    let id = unique();
    let subject = format!("keav-bench.{id}.plain");
    let connect = |name: String| {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(url.clone())
    };
    let sub_client = within(CONNECT_TIMEOUT, "plain NATS connection", async {
        connect(format!("{id}-sub"))
            .await
            .map_err(|e| nats_err("connect", e))
    })
    .await?;
    let mut sub = sub_client
        .subscribe(subject.clone())
        .await
        .map_err(|e| nats_err("subscribe", e))?;
    // PING/PONG: the server has processed the subscription.
    within(CONNECT_TIMEOUT, "plain NATS subscription", async {
        sub_client.flush().await.map_err(|e| nats_err("flush", e))
    })
    .await?;
    let publisher = within(CONNECT_TIMEOUT, "plain NATS connection", async {
        connect(format!("{id}-pub"))
            .await
            .map_err(|e| nats_err("connect", e))
    })
    .await?;

    // The two devices: the sending side and the receiving side, each a task of its own.
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let sending = async move {
        for i in 0..n {
            publisher
                .publish(subject.clone(), bytes::Bytes::from(body(i, size)))
                .await
                .map_err(|e| nats_err("publish", e))?;
        }
        publisher.flush().await.map_err(|e| nats_err("flush", e))
    };
    let receiving = {
        let mut counter = Counter::new(&done);
        async move {
            let mut seen = Seen::new(n, size);
            let mut last = t0;
            while !seen.complete() {
                let m = match tokio::time::timeout_at((last + PLAIN_IDLE).into(), sub.next()).await
                {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(nats_err("subscription", "ended")),
                    Err(_) => break,
                };
                if seen.take(&m.payload).map_err(fail)? {
                    last = Instant::now();
                    counter.tick();
                }
            }
            Ok(PlainRun {
                elapsed: last - t0,
                received: seen.distinct,
            })
        }
    };
    let ((), run) = two_devices(progress, &done, sending, receiving).await?;
    // The subscribing client stays connected until the subscription's task ended.
    drop(sub_client);
    Ok(run)
}

// ---------------------------------------------------------------------------------------
// keav
// ---------------------------------------------------------------------------------------

fn settings() -> DeviceSettings {
    DeviceSettings {
        verify_secret: Some(VerifySecret::new(BENCH_PAIRING_CODE.to_vec())),
        ..DeviceSettings::default()
    }
}

/// Payloads a link dropped because a queue was full.
fn dropped(c: &Carrier) -> u64 {
    match c {
        Carrier::Mqtt(l) => l.stats().dropped_busy,
        Carrier::Nats(l) => l.stats().dropped_busy,
    }
}

async fn carrier(t: &Target, id: &str) -> Result<Carrier, BenchError> {
    Ok(match t.kind {
        Kind::Mqtt => Carrier::Mqtt(Arc::new(
            keav_net::mqtt::Link::connect(&t.addr, id, LinkOptions::default()).await?,
        )),
        Kind::Nats => Carrier::Nats(Arc::new(
            keav_net::nats::Link::connect(&t.addr, id, LinkOptions::default()).await?,
        )),
    })
}

/// Starts device `id`'s messenger; also returns its link (for its counters).
async fn start(
    t: &Target,
    dir: &Path,
    id: &str,
    opts: &MessengerOptions,
) -> Result<(Messenger, Carrier), BenchError> {
    let device = Device::open(dir.join(format!("{id}.keav")), settings())?;
    let c = carrier(t, id).await?;
    Ok((Messenger::start(device, c.clone(), opts.clone()).await?, c))
}

/// Pairs `tx` with `rx` (whose id is `rx_id`).
async fn pair(tx: &Messenger, rx: &Messenger, rx_id: &str) -> Result<(), BenchError> {
    within(PAIR_TIMEOUT, "pairing", async {
        let (a, b) = tokio::join!(rx.accept_pair(), tx.pair(rx_id));
        a?;
        b?;
        Ok::<(), BenchError>(())
    })
    .await
}

/// Sends messages `0..n` of `size` bytes to `to`, up to [`SEND_WINDOW`] at once; `each` runs
/// after every committed send.
async fn send_all(
    tx: &Messenger,
    to: &str,
    size: usize,
    n: u64,
    each: impl FnMut(),
) -> Result<(), BenchError> {
    send_range(tx, to, size, 0..n, each).await
}

/// [`send_all`] in bursts of `burst`, each acknowledged end to end before the next.
async fn send_paced(
    tx: &Messenger,
    to: &str,
    size: usize,
    n: u64,
    burst: u64,
) -> Result<(), BenchError> {
    let mut start = 0;
    while start < n {
        let end = start.saturating_add(burst.max(1)).min(n);
        send_range(tx, to, size, start..end, || {}).await?;
        tx.flush(to, KEAV_IDLE).await?;
        start = end;
    }
    Ok(())
}

async fn send_range(
    tx: &Messenger,
    to: &str,
    size: usize,
    range: std::ops::Range<u64>,
    mut each: impl FnMut(),
) -> Result<(), BenchError> {
    stream::iter(range)
        .map(|i| async move { tx.send(to, &body(i, size)).await })
        .buffer_unordered(SEND_WINDOW)
        .map_err(BenchError::from)
        .try_for_each(|_| {
            each();
            std::future::ready(Ok(()))
        })
        .await
}

/// Receives `n` messages from `from` in sequence starting at `first_seq`, each body of the
/// run exactly once; acks every [`ACK_EVERY`] and the last. Returns the times of the first
/// and the last.
async fn recv_all(
    rx: &Messenger,
    from: &str,
    first_seq: u64,
    size: usize,
    n: u64,
    progress: &dyn Progress,
) -> Result<(Instant, Instant), BenchError> {
    let mut seen = Seen::new(n, size);
    let mut ticker = Ticker::new(progress);
    let mut first = None;
    let mut next_seq = first_seq;
    while !seen.complete() {
        let m: Message = match tokio::time::timeout(KEAV_IDLE, rx.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                return Err(fail(format!(
                    "no message for {} s ({} of {n} received)",
                    KEAV_IDLE.as_secs(),
                    seen.distinct
                )))
            }
        };
        let now = Instant::now();
        first.get_or_insert(now);
        if m.from != from || m.seq != next_seq {
            return Err(fail(format!(
                "message {} from {:?} arrived, {next_seq} from {from:?} expected",
                m.seq, m.from
            )));
        }
        next_seq += 1;
        if !seen.take(&m.body).map_err(fail)? {
            return Err(fail("a message was delivered twice"));
        }
        ticker.tick();
        if seen.distinct % ACK_EVERY == 0 || seen.complete() {
            rx.ack(&m).await?;
        }
        if seen.complete() {
            return Ok((first.unwrap_or(now), now));
        }
    }
    Err(fail("nothing to receive"))
}

/// One warm-up message (not timed): proves the channel works end to end.
async fn warm_up(
    tx: &Messenger,
    rx: &Messenger,
    tx_id: &str,
    rx_id: &str,
) -> Result<u64, BenchError> {
    let seq = tx.send(rx_id, b"warm-up").await?;
    let m = within(KEAV_IDLE, "warm-up message", rx.recv()).await?;
    if m.from != tx_id || m.seq != seq {
        return Err(fail("the warm-up message arrived from the wrong sender"));
    }
    rx.ack(&m).await?;
    Ok(seq + 1)
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (Linux; clock
/// ticks taken as 1/100 s, the value on every Linux platform keav targets).
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_ticks(&stat).map(|t| Duration::from_millis(t.saturating_mul(10)))
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: fields restart after
    // the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// One keav measurement: pipelined sends (`pace: None`) or bursts acknowledged end to end
/// before the next (`Some(burst)`).
async fn keav_run(
    t: &Target,
    size: usize,
    n: u64,
    progress: &dyn Progress,
    pace: Option<u64>,
) -> Result<KeavRun, BenchError> {
    let dir = tempfile::tempdir()?;
    let id = unique();
    let (tx_id, rx_id) = (format!("{id}-tx"), format!("{id}-rx"));
    let opts = MessengerOptions::default();
    let (tx, tx_link) = start(t, dir.path(), &tx_id, &opts).await?;
    let (rx, rx_link) = start(t, dir.path(), &rx_id, &opts).await?;
    pair(&tx, &rx, &rx_id).await?;
    let first_seq = warm_up(&tx, &rx, &tx_id, &rx_id).await?;
    let (resent0, deferred0, early0) = (tx.stats().resent, rx.stats().deferred, rx.stats().early);
    let dropped0 = dropped(&tx_link) + dropped(&rx_link);

    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let sending = async {
        match pace {
            None => send_all(&tx, &rx_id, size, n, || {}).await,
            Some(b) => send_paced(&tx, &rx_id, size, n, b).await,
        }
    };
    let receiving = recv_all(&rx, &tx_id, first_seq, size, n, progress);
    let ((), (_, last)) = tokio::try_join!(sending, receiving)?;
    let elapsed = last - t0;
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));

    // Not timed: the sender sees the last acks, then both stop.
    tx.flush(&rx_id, KEAV_IDLE).await?;
    let run = KeavRun {
        elapsed,
        resent: tx.stats().resent - resent0,
        deferred: rx.stats().deferred - deferred0,
        early: rx.stats().early - early0,
        dropped: (dropped(&tx_link) + dropped(&rx_link)).saturating_sub(dropped0),
        cpu,
    };
    tx.shutdown().await?;
    rx.shutdown().await?;
    Ok(run)
}

// ---------------------------------------------------------------------------------------
// keav live
// ---------------------------------------------------------------------------------------

/// Which of `n` messages arrived on an ordered channel: each must be a [`body`] of the run
/// with a higher index than the one before; skipped indexes are lost.
#[derive(Debug)]
pub struct InOrder {
    n: u64,
    size: usize,
    next: u64,
    /// Messages received.
    pub received: u64,
}

impl InOrder {
    /// Expects messages `0..n` of `size` bytes, in this order.
    pub fn new(n: u64, size: usize) -> InOrder {
        InOrder {
            n,
            size,
            next: 0,
            received: 0,
        }
    }

    /// Takes one received body: `Ok(lost)` with the number of messages skipped before it,
    /// `Err` for a body that is no message of this run, altered, repeated or out of order.
    pub fn take(&mut self, b: &[u8]) -> Result<u64, String> {
        if b.len() != self.size {
            return Err(format!(
                "a message of {} bytes arrived, {} expected",
                b.len(),
                self.size
            ));
        }
        let i = b
            .get(..8)
            .and_then(|x| <[u8; 8]>::try_from(x).ok())
            .map(u64::from_le_bytes)
            .filter(|i| *i < self.n)
            .ok_or("a message with an index outside the run arrived")?;
        if i < self.next {
            return Err(format!(
                "message {i} arrived after message {} (repeated or reordered)",
                self.next - 1
            ));
        }
        if b != body(i, self.size) {
            return Err(format!("message {i} arrived altered"));
        }
        let lost = i - self.next;
        self.next = i + 1;
        self.received += 1;
        Ok(lost)
    }

    /// Whether the last message of the run arrived (nothing can follow it).
    pub fn done(&self) -> bool {
        self.next >= self.n
    }
}

/// One keav live measurement: a KEAV session between two devices over the broker, then `n`
/// messages as channel records.
/// `coalesce`: [`LinkOptions::coalesce_records`] of both links (the default is on).
async fn live_run(
    t: &Target,
    size: usize,
    n: u64,
    progress: &dyn Progress,
    coalesce: bool,
) -> Result<LiveRun, BenchError> {
    let link_options = || LinkOptions {
        coalesce_records: coalesce,
        ..LinkOptions::default()
    };
    let dir = tempfile::tempdir()?;
    let id = unique();
    let (tx_id, rx_id) = (format!("{id}-tx"), format!("{id}-rx"));
    let a = Device::open(dir.path().join(format!("{tx_id}.keav")), settings())?;
    let b = Device::open(dir.path().join(format!("{rx_id}.keav")), settings())?;
    let opts = ChannelOptions::default();
    // The same steps on either carrier, whose links are distinct types.
    macro_rules! over {
        ($link:ty) => {{
            let la = <$link>::connect(&t.addr, &tx_id, link_options()).await?;
            let lb = <$link>::connect(&t.addr, &rx_id, link_options()).await?;
            let (ca, cb) = within(PAIR_TIMEOUT, "pairing", async {
                let (ca, cb) =
                    tokio::join!(la.connect_peer(&a, &rx_id, &opts), lb.accept(&b, &opts));
                let (from, cb) = cb?;
                if from != tx_id {
                    return Err(fail(format!("a handshake from {from:?} arrived")));
                }
                Ok::<_, BenchError>((ca?, cb))
            })
            .await?;
            let busy0 = lb.stats().dropped_busy;
            let mut run = live_exchange(ca, cb, size, n, progress).await?;
            run.dropped += lb.stats().dropped_busy.saturating_sub(busy0);
            Ok(run)
        }};
    }
    match t.kind {
        Kind::Mqtt => over!(keav_net::mqtt::Link),
        Kind::Nats => over!(keav_net::nats::Link),
    }
}

/// One untimed warm-up record, then `n` timed ones from `ca` to `cb`.
async fn live_exchange<T: 'static>(
    ca: Channel<T>,
    cb: Channel<T>,
    size: usize,
    n: u64,
    progress: &dyn Progress,
) -> Result<LiveRun, BenchError> {
    let (mut tx, _a_rx): (SendHalf<T>, RecvHalf<T>) = ca.split();
    let (_b_tx, mut rx): (SendHalf<T>, RecvHalf<T>) = cb.split();
    // Not timed: the channel carries data end to end (and the responder has seen the
    // initiator's first record, so it stops answering late handshake messages).
    tx.send(b"warm-up").await?;
    match within(KEAV_IDLE, "warm-up message", rx.recv()).await? {
        Some(w) if w == b"warm-up" => {}
        _ => return Err(fail("the warm-up message did not arrive intact")),
    }
    let dropped0 = rx.dropped_records();

    // The two devices: the sending side and the receiving side, each a task of its own.
    let done = Arc::new(AtomicU64::new(0));
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let sending = async move {
        for i in 0..n {
            tx.send(&body(i, size)).await?;
        }
        Ok::<_, BenchError>(tx)
    };
    let receiving = {
        let mut counter = Counter::new(&done);
        async move {
            let mut order = InOrder::new(n, size);
            let mut last = t0;
            while !order.done() {
                let d = match tokio::time::timeout_at((last + PLAIN_IDLE).into(), rx.recv()).await {
                    Ok(Ok(Some(d))) => d,
                    Ok(Ok(None)) => return Err(fail("the sender closed the channel")),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                };
                order.take(&d).map_err(fail)?;
                last = Instant::now();
                counter.tick();
            }
            Ok::<_, BenchError>((rx, last, order.received))
        }
    };
    let (mut tx, (rx, last, received)) = two_devices(progress, &done, sending, receiving).await?;
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let _ = tx.close().await;
    Ok(LiveRun {
        elapsed: last - t0,
        received,
        dropped: rx.dropped_records().saturating_sub(dropped0),
        cpu,
    })
}

/// Relay entries held for `dst`.
fn held(relay: &Relay, dst: &str) -> Result<u64, BenchError> {
    Ok(relay
        .queues()?
        .iter()
        .filter(|(q, _)| q == dst)
        .map(|(_, s)| s.entries)
        .sum())
}

async fn drain_run(t: &Target, n: u64, progress: &dyn Progress) -> Result<DrainRow, BenchError> {
    let dir = tempfile::tempdir()?;
    let id = unique();
    let (tx_id, rx_id, relay_id) = (
        format!("{id}-tx"),
        format!("{id}-rx"),
        format!("{id}-relay"),
    );
    let mut rc = RelayConfig::new(&relay_id, dir.path().join("mailbox.redb"));
    let next = match t.kind {
        Kind::Mqtt => {
            rc.mqtt = Some((t.addr.clone(), LinkOptions::default()));
            NextHop::MqttDevice
        }
        Kind::Nats => {
            rc.nats = Some((t.addr.clone(), LinkOptions::default()));
            NextHop::NatsDevice
        }
    };
    rc.routes = vec![RouteRule {
        dst: "*".into(),
        next,
    }];
    // The relay counts a device online for `presence` after its last Pull.
    let presence = rc.presence;
    let relay = Relay::start(rc).await?;
    let opts = MessengerOptions {
        delivery: Delivery::Relay(relay_id.clone()),
        ..MessengerOptions::default()
    };
    let (tx, _) = start(t, dir.path(), &tx_id, &opts).await?;
    let (rx, _) = start(t, dir.path(), &rx_id, &opts).await?;
    pair(&tx, &rx, &rx_id).await?;
    let first_seq = warm_up(&tx, &rx, &tx_id, &rx_id).await?;
    rx.shutdown().await?;
    let offline_since = Instant::now();

    // The receiver is offline: fill the relay's mailbox (not timed).
    let k = t.kind.name();
    progress.stage(&format!("broker {k} fill mailbox"), n);
    let mut ticker = Ticker::new(progress);
    send_all(&tx, &rx_id, DRAIN_SIZE, n, || ticker.tick()).await?;
    drop(ticker);
    let mut last_change = (Instant::now(), 0u64);
    loop {
        let h = held(&relay, &rx_id)?;
        if h >= n {
            break;
        }
        if h != last_change.1 {
            last_change = (Instant::now(), h);
        } else if last_change.0.elapsed() > KEAV_IDLE {
            return Err(fail(format!(
                "the relay holds {h} of {n} messages and takes no more"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held_now = held(&relay, &rx_id)?;
    // Offline for longer than the relay's presence window, so the relay knows the device
    // was away (a device back within the window finds its in-flight entries still waiting
    // for the relay's resend timer).
    let back_at = offline_since + presence + Duration::from_secs(1);
    if Instant::now() < back_at {
        progress.note(&format!(
            "{}: the receiver stays offline {:.0} s (the relay's presence window)",
            t.label,
            (back_at - Instant::now()).as_secs_f64()
        ));
        tokio::time::sleep_until(back_at.into()).await;
    }
    let offline = offline_since.elapsed();

    // The receiver comes back.
    progress.stage(&format!("broker {k} drain"), n);
    let device = Device::open(dir.path().join(format!("{rx_id}.keav")), settings())?;
    let c = carrier(t, &rx_id).await?;
    let t0 = Instant::now();
    let rx = Messenger::start(device, c, opts.clone()).await?;
    let (first, last) = recv_all(&rx, &tx_id, first_seq, DRAIN_SIZE, n, progress).await?;
    let secs = (last - t0).as_secs_f64();

    tx.flush(&rx_id, KEAV_IDLE).await?;
    tx.shutdown().await?;
    rx.shutdown().await?;
    relay.shutdown().await?;
    Ok(DrainRow {
        broker: t.label.clone(),
        carrier: k.into(),
        size: DRAIN_SIZE,
        held: held_now,
        offline_secs: offline.as_secs_f64(),
        drain_msgs_per_s: rate(n, last - t0),
        drain_secs: secs,
        first_ms: (first - t0).as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_exactly_once() {
        let mut s = Seen::new(3, 64);
        assert_eq!(body(2, 64).len(), 64);
        assert_ne!(body(1, 64), body(2, 64));
        assert_eq!(s.take(&body(2, 64)), Ok(true));
        assert_eq!(s.take(&body(2, 64)), Ok(false));
        assert_eq!((s.distinct, s.duplicates), (1, 1));
        assert!(s.take(&body(3, 64)).is_err(), "outside the run");
        assert!(s.take(&body(0, 65)).is_err(), "wrong size");
        assert!(s.take(&[0u8; 4]).is_err(), "short");
        let mut altered = body(0, 64);
        altered[40] ^= 1;
        assert!(s.take(&altered).unwrap_err().contains("altered"));
        assert!(!s.complete());
        assert_eq!(s.take(&body(0, 64)), Ok(true));
        assert_eq!(s.take(&body(1, 64)), Ok(true));
        assert!(s.complete());
    }

    #[test]
    fn live_bodies_are_checked_in_order() {
        let mut o = InOrder::new(5, 64);
        assert!(!o.done());
        assert_eq!(o.take(&body(0, 64)), Ok(0));
        // Message 1 and 2 never came: counted as lost.
        assert_eq!(o.take(&body(3, 64)), Ok(2));
        assert_eq!(o.received, 2);
        // Repeated, reordered, altered, resized, foreign: refused.
        assert!(o.take(&body(3, 64)).unwrap_err().contains("repeated"));
        assert!(o.take(&body(1, 64)).unwrap_err().contains("reordered"));
        let mut altered = body(4, 64);
        altered[63] ^= 0x80;
        assert!(o.take(&altered).unwrap_err().contains("altered"));
        assert!(o.take(&body(4, 1024)).is_err());
        assert!(o.take(&body(5, 64)).unwrap_err().contains("outside"));
        assert!(o.take(&[1, 2, 3]).is_err());
        assert!(!o.done());
        assert_eq!(o.received, 2);
        assert_eq!(o.take(&body(4, 64)), Ok(0));
        assert!(o.done());
        assert_eq!(o.received, 3);
    }

    /// The live run against the local brokers, when they run: every message arrives, in
    /// order (no assertion on time).
    #[test]
    fn live_channel_against_local_brokers() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let quiet = crate::run::Quiet;
        for (addr, kind) in [
            ("127.0.0.1:1883", Kind::Mqtt),
            ("127.0.0.1:4222", Kind::Nats),
        ] {
            if std::net::TcpStream::connect(addr).is_err() {
                eprintln!("skipped: nothing listens on {addr}");
                continue;
            }
            let t = Target {
                kind,
                addr: addr.into(),
                label: addr.into(),
            };
            for coalesce in [true, false] {
                let r = rt
                    .block_on(live_run(&t, 1024, 300, &quiet, coalesce))
                    .unwrap();
                assert_eq!((r.received, r.dropped), (300, 0), "{kind:?} {coalesce}");
                assert!(r.elapsed > Duration::ZERO);
            }
        }
    }

    #[test]
    fn rows_compute_rates_and_ratio() {
        let t = Target {
            kind: Kind::Nats,
            addr: "127.0.0.1:4222".into(),
            label: "NATS 127.0.0.1:4222".into(),
        };
        let keav = KeavRun {
            elapsed: Duration::from_secs(2),
            resent: 3,
            deferred: 4,
            early: 6,
            dropped: 5,
            cpu: Some(Duration::from_millis(1500)),
        };
        let plain = PlainRun {
            elapsed: Duration::from_secs(1),
            received: 900,
        };
        let live = LiveRun {
            elapsed: Duration::from_millis(1250),
            received: 990,
            dropped: 2,
            cpu: Some(Duration::from_millis(500)),
        };
        let r = broker_row(&t, 64, 1000, &keav, &plain, Some(&live));
        assert_eq!(r.live_msgs_per_s, Some(792.0));
        assert_eq!(r.live_secs, Some(1.25));
        assert_eq!((r.live_lost, r.live_dropped), (Some(10), Some(2)));
        assert_eq!(r.live_cpu_secs, Some(0.5));
        assert!((r.live_ratio.unwrap() - 792.0 / 900.0).abs() < 1e-12);
        assert_eq!(r.keav_msgs_per_s, 500.0);
        assert_eq!(r.plain_msgs_per_s, 900.0);
        assert_eq!(r.plain_lost, 100);
        assert_eq!(r.carrier, "nats");
        assert_eq!(
            (
                r.keav_resent,
                r.keav_deferred,
                r.keav_early,
                r.keav_link_dropped
            ),
            (3, 4, 6, 5)
        );
        assert_eq!(r.keav_cpu_secs, Some(1.5));
        assert_eq!(r.keav_paced_msgs_per_s, None);
        assert!((r.ratio.unwrap() - 500.0 / 900.0).abs() < 1e-12);
        let none = PlainRun {
            elapsed: Duration::ZERO,
            received: 0,
        };
        let r = broker_row(&t, 64, 1000, &keav, &none, Some(&live));
        assert_eq!((r.ratio, r.live_ratio), (None, None));
        // A failed live run: no live numbers, the durable ones stay.
        let r = broker_row(&t, 64, 1000, &keav, &plain, None);
        assert_eq!(
            (r.live_msgs_per_s, r.live_ratio, r.live_lost),
            (None, None, None)
        );
        assert_eq!(r.keav_msgs_per_s, 500.0);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(3.0, 4.0), Some(0.75));
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        let line = "4242 (keav (bench) x) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 9 0 100";
        assert_eq!(parse_cpu_ticks(line), Some(281));
        assert_eq!(parse_cpu_ticks("4242 (keav) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some());
        }
    }

    #[test]
    fn host_and_port() {
        assert_eq!(
            host_port("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(host_port("[::1]:4222").unwrap(), ("::1".into(), 4222));
        assert!(host_port("nohost").is_err());
    }

    /// Not a check but a steadier ratio than one bench run gives on a loaded machine:
    /// alternates plaintext and keav live runs of 20 000 messages through the local NATS
    /// server (`KEAV_RATIO_ROUNDS` pairs per size, default 9; `KEAV_RATIO_BROKER=mqtt` for
    /// Mosquitto) with the scenario's runtime, and prints each pair's ratio and the median.
    /// `cargo test --release -p keav-bench --lib -- --ignored --nocapture live_ratio`
    #[test]
    #[ignore = "a measurement: run by hand against local brokers"]
    fn live_ratio_repeated() {
        let rounds: usize = std::env::var("KEAV_RATIO_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(9);
        let (kind, addr) = match std::env::var("KEAV_RATIO_BROKER").as_deref() {
            Ok("mqtt") => (Kind::Mqtt, "127.0.0.1:1883"),
            _ => (Kind::Nats, "127.0.0.1:4222"),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let quiet = crate::run::Quiet;
        let t = Target {
            kind,
            addr: addr.into(),
            label: addr.into(),
        };
        // KEAV_RATIO_SIZES=64 and KEAV_RATIO_ONLY=plain|live narrow a run (for a profile).
        let sizes: Vec<usize> = std::env::var("KEAV_RATIO_SIZES")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![64, 1024]);
        let only = std::env::var("KEAV_RATIO_ONLY").ok();
        let n = std::env::var("KEAV_RATIO_N")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20_000);
        for size in sizes {
            let (mut ratios, mut singles) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let (mut pr, mut lr, mut sr, mut lost) = (f64::NAN, f64::NAN, f64::NAN, [0; 3]);
                if only.as_deref().is_none_or(|o| o == "plain") {
                    let p = rt.block_on(plain_run(&t, size, n, &quiet)).unwrap();
                    (pr, lost[0]) = (rate(p.received, p.elapsed), n - p.received);
                }
                if only.as_deref().is_none_or(|o| o == "live") {
                    let l = rt.block_on(live_run(&t, size, n, &quiet, true)).unwrap();
                    (lr, lost[1]) = (rate(l.received, l.elapsed), n - l.received);
                }
                if only.as_deref().is_none_or(|o| o == "single") {
                    let l = rt.block_on(live_run(&t, size, n, &quiet, false)).unwrap();
                    (sr, lost[2]) = (rate(l.received, l.elapsed), n - l.received);
                }
                eprintln!(
                    "{kind:?} {size} B: plaintext {pr:.0} msg/s (lost {}), keav live {lr:.0} msg/s (lost {}) {:.2}x, a message per record {sr:.0} msg/s (lost {}) {:.2}x",
                    lost[0],
                    lost[1],
                    lr / pr,
                    lost[2],
                    sr / pr
                );
                ratios.push(lr / pr);
                singles.push(sr / pr);
            }
            ratios.sort_by(f64::total_cmp);
            singles.sort_by(f64::total_cmp);
            eprintln!(
                "{kind:?} {size} B: median live/plaintext {:.2}x, a message per record {:.2}x, over {rounds} rounds",
                ratios[rounds / 2],
                singles[rounds / 2]
            );
        }
    }

    /// The plain baselines against the local brokers, when they run (no assertion on time).
    #[test]
    fn plain_clients_against_local_brokers() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let quiet = crate::run::Quiet;
        for (addr, kind) in [
            ("127.0.0.1:1883", Kind::Mqtt),
            ("127.0.0.1:4222", Kind::Nats),
        ] {
            if std::net::TcpStream::connect(addr).is_err() {
                eprintln!("skipped: nothing listens on {addr}");
                continue;
            }
            let t = Target {
                kind,
                addr: addr.into(),
                label: addr.into(),
            };
            let r = rt.block_on(plain_run(&t, 64, 200, &quiet)).unwrap();
            assert_eq!(r.received, 200, "{kind:?}");
        }
        // And the embedded broker, always.
        let b = EmbeddedBroker::start(embedded_options()).unwrap();
        let t = Target {
            kind: Kind::Mqtt,
            addr: b.addr().to_string(),
            label: "embedded".into(),
        };
        let r = rt.block_on(plain_run(&t, 1024, 200, &quiet)).unwrap();
        assert_eq!(r.received, 200);
    }
}
