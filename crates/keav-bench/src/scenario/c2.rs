//! The `c2` scenario (issue 6): what keav's signed C2 commands cost.
//!
//! 1. **Signature cost per command**, in memory, one thread, for Ed25519 and RSA-2048 (PSS,
//!    SHA-256): `Message::sign` of a typical action command, `Message::decode` +
//!    `Unverified::verify` of it, and `Message::decode` alone (the cheap checks a receiver
//!    runs before any public-key work). Timed per operation in batches, like the `cpu`
//!    scenario: median of the batch medians, their range, p90/p99 over every operation.
//! 2. **Commands per second to a fleet** through an MQTT broker (`--mqtt HOST:PORT`, or the
//!    embedded rumqttd the `broker` scenario uses), per algorithm: a [`ServerEngine`] and
//!    `--c2-devices` joined [`Device`] engines, each device on its own rumqttc connection
//!    (QoS 1) subscribed to its command topic. The server sends [`ROUNDS`] group commands
//!    (one signed action per device), at most [`WINDOW`] of them unanswered; every device
//!    verifies (`Device::handle`) and responds (`Device::respond`); the server verifies and
//!    accounts every response (`ServerEngine::handle`). Baseline on the same connections and
//!    topics: as many unsigned messages of the same sizes, each answered by a plaintext reply
//!    of the response's size. Rates and keav/plaintext ratios go into the report.
//!
//! Keys are generated before anything is timed (RSA-2048 generation takes a while: on every
//! core, with progress). The engines' state records are not persisted (no registry or
//! device store writes): what is measured is the protocol work and the broker.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use keav_c2::engine::{
    Device, DeviceConfig, DeviceStatus, DeviceView, Joined, JoinedEvent, MustPersist,
    RegisteredEvent, ServerConfig, ServerEngine, ServerEvent, Targets,
};
use keav_c2::keys::{Alg, DeviceId, SigningKey};
use keav_c2::wire::{Action, Body, Envelope, Message, Response, Status, Token};
use keav_net::embedded_broker::{BrokerOptions, EmbeddedBroker};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

use crate::options::parse_broker_addr;
use crate::report::c2::{FleetRow, FleetRun, FleetSetup, SigOp, SigRow};
use crate::run::{Ctx, Progress};
use crate::BenchError;

/// The algorithms compared, in report order.
pub const ALGS: [Alg; 2] = [Alg::Ed25519, Alg::RsaPss2048];
/// Batches and operations per batch of the signature measurement.
pub const SIG_BATCHES: u32 = 20;
/// See [`SIG_BATCHES`].
pub const SIG_PER_BATCH: u32 = 100;
/// [`SIG_BATCHES`] with `--quick`.
pub const QUICK_SIG_BATCHES: u32 = 5;
/// [`SIG_PER_BATCH`] with `--quick`.
pub const QUICK_SIG_PER_BATCH: u32 = 20;
/// Group commands per fleet measurement.
pub const ROUNDS: u32 = 20;
/// [`ROUNDS`] with `--quick`.
pub const QUICK_ROUNDS: u32 = 10;
/// Group commands unanswered at most.
pub const WINDOW: u32 = 4;
/// Argument bytes of the benchmark's action command.
pub const ACTION_ARGS: usize = 16;
/// The action id of the benchmark's command.
const ACTION_ID: u16 = 7;
/// The group every simulated device belongs to.
const GROUP: &str = "bench";
/// Lifetime of the server's commands, seconds.
const LIFETIME: u64 = 300;
/// First byte of the plaintext baseline's messages (a keav message starts with its version,
/// 1), so a device tells the two apart without parsing.
const PLAIN_MARK: u8 = 0;
/// No response for this long fails a fleet measurement.
const IDLE: Duration = Duration::from_secs(30);
/// Every device connected and subscribed within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress is reported in steps of this many responses.
const PROGRESS_STEP: u64 = 64;
/// Device errors quoted in a failure message, at most.
const QUOTED_ERRORS: usize = 3;

/// What one run of the scenario does; [`Config::from_options`] derives it from the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Algorithms, in order.
    pub algs: Vec<Alg>,
    /// Signature batches.
    pub sig_batches: u32,
    /// Operations per signature batch.
    pub sig_per_batch: u32,
    /// Simulated devices.
    pub devices: u32,
    /// Group commands per fleet measurement.
    pub rounds: u32,
    /// Group commands unanswered at most.
    pub window: u32,
}

impl Config {
    /// The configuration of a `keav bench` run.
    pub fn from_options(o: &crate::Options) -> Config {
        let (sig_batches, sig_per_batch, rounds) = if o.quick {
            (QUICK_SIG_BATCHES, QUICK_SIG_PER_BATCH, QUICK_ROUNDS)
        } else {
            (SIG_BATCHES, SIG_PER_BATCH, ROUNDS)
        };
        Config {
            algs: ALGS.to_vec(),
            sig_batches,
            sig_per_batch,
            devices: o.c2_devices,
            rounds,
            window: WINDOW,
        }
    }
}

/// Runs the scenario with the options' configuration.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    let cfg = Config::from_options(ctx.opts);
    run_with(ctx, &cfg)
}

/// Runs the scenario with `cfg`, pushing rows into `ctx.report`. A measurement that fails is
/// noted and the others still run; the scenario then fails with every reason.
pub fn run_with(ctx: &mut Ctx<'_>, cfg: &Config) -> Result<(), BenchError> {
    ctx.check()?;
    let mut failures = Vec::new();

    // 1. Signature cost.
    ctx.progress.stage(
        "c2 signatures",
        cfg.algs.len() as u64 * 3 * u64::from(cfg.sig_batches),
    );
    for &alg in &cfg.algs {
        ctx.check()?;
        let rows = {
            let c = &*ctx;
            let mut between = || {
                c.progress.advance(1);
                c.check()
            };
            signature_rows(alg, cfg.sig_batches, cfg.sig_per_batch, &mut between)
        };
        match rows {
            Ok(rows) => ctx.report.c2_signatures.extend(rows),
            Err(BenchError::Cancelled) => return Err(BenchError::Cancelled),
            Err(e) => failures.push(format!("{alg} signatures: {e}")),
        }
    }

    // 2. Commands to a fleet through the broker.
    ctx.check()?;
    let devices = cfg.devices.max(1);
    let (addr, label, embedded) = match &ctx.opts.mqtt {
        Some(a) => {
            let addr = parse_broker_addr(a, "mqtt")?;
            let label = format!("MQTT {addr}");
            (addr, label, None)
        }
        None => {
            let b = EmbeddedBroker::start(BrokerOptions {
                max_connections: devices as usize + 16,
                ..BrokerOptions::default()
            })?;
            (
                b.addr().to_string(),
                "MQTT (embedded rumqttd)".to_string(),
                Some(b),
            )
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut result = Ok(());
    for &alg in &cfg.algs {
        if let Err(e) = ctx.check() {
            result = Err(e);
            break;
        }
        let r = fleet(ctx, &rt, cfg, alg, &addr, &label);
        match r {
            Ok(row) => {
                ctx.progress.note(&format!(
                    "c2 {alg}: {:.0} commands/s ({:.0} plaintext), {:.0} round trips/s ({:.0} plaintext)",
                    row.keav_cmds_per_s,
                    row.plain_cmds_per_s,
                    row.keav_round_trips_per_s,
                    row.plain_round_trips_per_s
                ));
                ctx.report.c2_fleet.push(row);
            }
            Err(BenchError::Cancelled) => {
                result = Err(BenchError::Cancelled);
                break;
            }
            Err(e) => failures.push(format!("{alg} fleet through {label}: {e}")),
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

fn fail(m: impl Into<String>) -> BenchError {
    BenchError::Report(m.into())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The value of a [`MustPersist`] without storing its record: the benchmark keeps no
/// durable state (what it measures is the protocol work and the broker).
fn unpersisted<T, R>(m: MustPersist<T, R>) -> T {
    match m.persist(|_| Ok::<(), Infallible>(())) {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// The benchmark's action command.
pub fn action_body() -> Body {
    Body::Action(Action {
        action: ACTION_ID,
        args: (0..ACTION_ARGS).map(|i| i as u8).collect(),
    })
}

/// A signed action command from `key` to `to` with sequence number `seq` (and the length a
/// response of the same algorithm has).
fn sample_command(key: &SigningKey, to: DeviceId, seq: u64) -> Result<Vec<u8>, BenchError> {
    let env = Envelope {
        sender: key.device_id(),
        recipient: to,
        seq,
        expiry: unix_now() + LIFETIME,
        token: Token::random(),
    };
    Message::sign(&env, &action_body(), key).map_err(|e| fail(format!("sign: {e}")))
}

fn response_len(key: &SigningKey, to: DeviceId) -> Result<usize, BenchError> {
    let env = Envelope {
        sender: key.device_id(),
        recipient: to,
        seq: 1,
        expiry: unix_now() + LIFETIME,
        token: Token::random(),
    };
    let body = Body::Response(Response {
        status: Status::ActionSuccess,
    });
    Message::sign(&env, &body, key)
        .map(|b| b.len())
        .map_err(|e| fail(format!("sign: {e}")))
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------
// 1. Signature cost
// ---------------------------------------------------------------------------------------

/// Times sign, decode + verify and decode of the benchmark command with a fresh `alg` key:
/// `batches` × `per_batch` operations each after a warm-up batch, calling `between` after
/// each batch of each operation (progress, cancellation).
pub fn signature_rows(
    alg: Alg,
    batches: u32,
    per_batch: u32,
    between: &mut dyn FnMut() -> Result<(), BenchError>,
) -> Result<Vec<SigRow>, BenchError> {
    let key = SigningKey::generate(alg).map_err(|e| fail(format!("key generation: {e}")))?;
    let public = key.public();
    let to = DeviceId(rand::random());
    let body = action_body();
    let mut env = Envelope {
        sender: key.device_id(),
        recipient: to,
        seq: 1,
        expiry: unix_now() + LIFETIME,
        token: Token::random(),
    };
    let bytes = Message::sign(&env, &body, &key).map_err(|e| fail(format!("sign: {e}")))?;
    // The message must verify, and a flipped signature bit must not: the timed path is the
    // real one.
    let m = Message::decode(&bytes)
        .and_then(|u| u.verify(&public))
        .map_err(|e| fail(format!("the benchmark command does not verify: {e}")))?;
    if m.body() != &body {
        return Err(fail("the benchmark command decoded to another body"));
    }
    let mut bad = bytes.clone();
    if let Some(last) = bad.last_mut() {
        *last ^= 1;
    }
    if Message::decode(&bad)
        .and_then(|u| u.verify(&public))
        .is_ok()
    {
        return Err(fail("a tampered command verified"));
    }

    let mut samples: [Vec<Vec<f64>>; 3] = Default::default();
    for op in SigOp::ALL {
        let slot = match op {
            SigOp::Sign => 0,
            SigOp::Verify => 1,
            SigOp::Decode => 2,
        };
        for b in 0..=batches {
            let mut batch = Vec::with_capacity(per_batch as usize);
            for _ in 0..per_batch {
                let t = Instant::now();
                match op {
                    SigOp::Sign => {
                        env.seq += 1;
                        black_box(
                            Message::sign(black_box(&env), &body, &key)
                                .map_err(|e| fail(format!("sign: {e}")))?,
                        );
                    }
                    SigOp::Verify => {
                        black_box(
                            Message::decode(black_box(&bytes))
                                .and_then(|u| u.verify(&public))
                                .map_err(|e| fail(format!("verify: {e}")))?,
                        );
                    }
                    SigOp::Decode => {
                        black_box(
                            Message::decode(black_box(&bytes))
                                .map_err(|e| fail(format!("decode: {e}")))?,
                        );
                    }
                }
                batch.push(micros(t.elapsed()));
            }
            // Batch 0 is the warm-up.
            if b > 0 {
                samples[slot].push(batch);
                between()?;
            }
        }
    }
    let rows = SigOp::ALL
        .iter()
        .zip(samples.iter())
        .filter_map(|(op, s)| SigRow::from_batches(alg.name(), *op, s, bytes.len()))
        .collect();
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 2. Fleet
// ---------------------------------------------------------------------------------------

/// `count` fresh keys of `alg`, generated on every core (RSA-2048 takes a while), with
/// progress; stops early when the run is stopped.
fn generate_keys(
    alg: Alg,
    count: usize,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Vec<SigningKey>, BenchError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, count.max(1));
    let results: Vec<Result<Vec<SigningKey>, BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = count / threads + usize::from(t < count % threads);
                s.spawn(move || {
                    let mut keys = Vec::with_capacity(share);
                    for _ in 0..share {
                        if cancel.load(Ordering::Relaxed) {
                            return Err(BenchError::Cancelled);
                        }
                        keys.push(
                            SigningKey::generate(alg)
                                .map_err(|e| fail(format!("key generation: {e}")))?,
                        );
                        progress.advance(1);
                    }
                    Ok(keys)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(fail("key generation panicked")))
            })
            .collect()
    });
    let mut keys = Vec::with_capacity(count);
    for r in results {
        keys.extend(r?);
    }
    Ok(keys)
}

/// A server engine and its joined devices, in memory.
struct Fleet {
    engine: ServerEngine,
    devices: Vec<Device<Joined>>,
    command_bytes: usize,
    response_bytes: usize,
}

/// Registers every device with the server and joins it through a join command (all in
/// memory, not timed).
fn build_fleet(server_key: SigningKey, device_keys: Vec<SigningKey>) -> Result<Fleet, BenchError> {
    let now = unix_now();
    let first = device_keys
        .first()
        .ok_or_else(|| fail("a fleet needs a device"))?;
    let command_bytes = sample_command(&server_key, first.device_id(), 1)?.len();
    let response_bytes = response_len(first, server_key.device_id())?;
    let server_pub = server_key.public();
    let mut engine = ServerEngine::new(server_key, ServerConfig::default());
    let mut devices = Vec::with_capacity(device_keys.len());
    let engine_err = |e: keav_c2::engine::EngineError| fail(format!("server engine: {e}"));
    for key in device_keys {
        let mut view = DeviceView::new(key.public(), DeviceStatus::Registered);
        view.groups = BTreeSet::from([GROUP.to_string()]);
        engine.upsert_device(view);
        let mut d = Device::new(key, server_pub.clone(), DeviceConfig::default());
        let cmd = unpersisted(
            engine
                .join_command(d.id(), now + LIFETIME, now)
                .map_err(engine_err)?,
        );
        let h = unpersisted(
            d.handle(&cmd.topic, &cmd.bytes, now)
                .map_err(|e| fail(format!("device join: {e}")))?,
        );
        let (RegisteredEvent::Joined(grant), Some(reply)) = (h.event, h.reply) else {
            return Err(fail("a device did not join on the join command"));
        };
        let sh = unpersisted(
            engine
                .handle(&reply.topic, &reply.bytes, now)
                .map_err(|e| fail(format!("server join response: {e}")))?,
        );
        if !sh
            .events
            .iter()
            .any(|e| matches!(e, ServerEvent::Joined { device, .. } if *device == d.id()))
        {
            return Err(fail("the server did not see a device join"));
        }
        devices.push(d.join(grant));
    }
    Ok(Fleet {
        engine,
        devices,
        command_bytes,
        response_bytes,
    })
}

/// One fleet measurement of `alg`: keys, fleet, connections, warm-up, plaintext, keav.
fn fleet(
    ctx: &mut Ctx<'_>,
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    alg: Alg,
    addr: &str,
    label: &str,
) -> Result<FleetRow, BenchError> {
    let n = cfg.devices.max(1) as usize;
    ctx.progress.stage(&format!("c2 {alg} keys"), n as u64 + 1);
    let mut keys = generate_keys(alg, n + 1, ctx.progress, ctx.cancel)?;
    let server_key = keys.pop().ok_or_else(|| fail("no server key"))?;
    let fleet = build_fleet(server_key, keys)?;
    let setup = FleetSetup {
        broker: label.to_string(),
        alg: alg.name().to_string(),
        devices: n as u64,
        rounds: u64::from(cfg.rounds.max(1)),
        window: u64::from(cfg.window.max(1)),
        command_bytes: fleet.command_bytes,
        response_bytes: fleet.response_bytes,
    };
    let (progress, cancel) = (ctx.progress, ctx.cancel);
    let (keav, plain, dropped) =
        rt.block_on(cancellable(cancel, measure(fleet, addr, &setup, progress)))?;
    Ok(FleetRow::new(&setup, &keav, &plain, dropped))
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

/// What the device tasks report.
#[derive(Default)]
struct Shared {
    /// Commands accepted (keav) or plaintext messages received, since the start.
    delivered: AtomicU64,
    /// Messages a device engine dropped.
    dropped: AtomicU64,
    /// When the last one was delivered.
    last_delivery: Mutex<Option<Instant>>,
    /// What went wrong in device tasks.
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn delivered(&self) {
        let now = Instant::now();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        match self.last_delivery.lock() {
            Ok(mut g) => *g = Some(now),
            Err(p) => *p.into_inner() = Some(now),
        }
    }

    fn last_delivery(&self) -> Option<Instant> {
        match self.last_delivery.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    fn error(&self, e: String) {
        match self.errors.lock() {
            Ok(mut g) => g.push(e),
            Err(p) => p.into_inner().push(e),
        }
    }

    fn errors(&self) -> Vec<String> {
        match self.errors.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Aborts the fleet's tasks (and so closes their connections) when dropped, also when the
/// measurement is cancelled.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
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

fn mqtt_options(id: String, host: &str, port: u16) -> MqttOptions {
    let mut mo = MqttOptions::new(id, host, port);
    mo.set_keep_alive(Duration::from_secs(60));
    mo.set_clean_session(true);
    mo.set_max_packet_size(1 << 16, 1 << 16);
    mo
}

/// Polls `el` until the broker acknowledges the subscription.
async fn subscribed(el: &mut EventLoop) -> Result<(), String> {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                return if s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    Ok(())
                } else {
                    Err("the broker refused the subscription".into())
                };
            }
            Ok(_) => {}
            Err(e) => return Err(format!("connection: {e}")),
        }
    }
}

/// One device: connects, subscribes to its command topic, reports ready, then answers
/// every command (keav: verify, respond signed; plaintext: reply with `plain_reply` bytes).
async fn device_task(
    mut dev: Device<Joined>,
    mo: MqttOptions,
    capacity: usize,
    plain_reply: usize,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
) {
    let id = dev.id();
    let (client, mut el) = AsyncClient::new(mo, capacity);
    let topic_out = dev.topic_out();
    let r = match client.subscribe(dev.topic_in(), QoS::AtLeastOnce).await {
        Ok(()) => subscribed(&mut el).await,
        Err(e) => Err(format!("subscribe: {e}")),
    };
    let ok = r.is_ok();
    let _ = ready.send(r.map_err(|e| format!("device {id}: {e}")));
    if !ok {
        return;
    }
    loop {
        let p = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            Err(e) => {
                shared.error(format!("device {id}: connection: {e}"));
                return;
            }
        };
        let reply = if p.payload.first() == Some(&PLAIN_MARK) {
            shared.delivered();
            (topic_out.clone(), vec![PLAIN_MARK; plain_reply])
        } else {
            let now = unix_now();
            let h = match dev.handle(&p.topic, &p.payload, now) {
                Ok(m) => unpersisted(m),
                Err(d) => {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    shared.error(format!("device {id} dropped a command: {d}"));
                    continue;
                }
            };
            let JoinedEvent::Action { token, .. } = h.event else {
                shared.error(format!("device {id}: unexpected event {:?}", h.event));
                continue;
            };
            shared.delivered();
            match dev.respond(&token, Status::ActionSuccess, now) {
                Ok(m) => {
                    let o = unpersisted(m);
                    (o.topic, o.bytes)
                }
                Err(e) => {
                    shared.error(format!("device {id}: respond: {e}"));
                    continue;
                }
            }
        };
        if let Err(e) = client.try_publish(reply.0, QoS::AtLeastOnce, false, reply.1) {
            shared.error(format!("device {id}: publish: {e}"));
            return;
        }
    }
}

/// The server side of a connected fleet.
struct Server<'a> {
    engine: ServerEngine,
    client: AsyncClient,
    inbound: mpsc::UnboundedReceiver<Result<(String, Bytes), String>>,
    shared: Arc<Shared>,
    /// Command topic of every device.
    topics_in: Vec<String>,
    setup: &'a FleetSetup,
    dropped: u64,
}

/// Which phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Keav,
    Plain,
}

impl Server<'_> {
    /// Publishes round after round (at most `window` unanswered) and accounts the
    /// responses until all `rounds` × devices are in.
    async fn phase(
        &mut self,
        kind: Kind,
        rounds: u64,
        progress: Option<&dyn Progress>,
    ) -> Result<FleetRun, BenchError> {
        let n = self.topics_in.len() as u64;
        let total = n * rounds;
        let window = self.setup.window.max(1);
        let delivered0 = self.shared.delivered.load(Ordering::Relaxed);
        let mut pending_progress = 0u64;
        let cpu0 = super::broker::process_cpu();
        let t0 = Instant::now();
        let (mut sent, mut answered) = (0u64, 0u64);
        while answered < total {
            while sent < rounds && (sent + 1) * n <= answered + window * n {
                self.send_round(kind).await?;
                sent += 1;
            }
            let msg = match tokio::time::timeout(IDLE, self.inbound.recv()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(fail(format!("server connection: {e}"))),
                Ok(None) => return Err(fail("the server connection closed")),
                Err(_) => return Err(self.stalled(answered, total, delivered0)),
            };
            let (topic, payload) = msg;
            let ok = match kind {
                Kind::Plain => {
                    if payload.first() != Some(&PLAIN_MARK) {
                        return Err(fail("a keav message arrived during the plaintext phase"));
                    }
                    1
                }
                Kind::Keav => self.handle(&topic, &payload)?,
            };
            answered += ok;
            pending_progress += ok;
            if let Some(p) = progress {
                if pending_progress >= PROGRESS_STEP {
                    p.advance(pending_progress);
                    pending_progress = 0;
                }
            }
        }
        let answered_in = t0.elapsed();
        let cpu = super::broker::process_cpu()
            .zip(cpu0)
            .map(|(b, a)| b.saturating_sub(a));
        if let Some(p) = progress {
            p.advance(pending_progress);
        }
        let delivered = self.shared.delivered.load(Ordering::Relaxed) - delivered0;
        let delivered_in = self
            .shared
            .last_delivery()
            .map_or(answered_in, |l| l.saturating_duration_since(t0));
        if kind == Kind::Keav {
            self.engine.prune_settled();
        }
        Ok(FleetRun {
            delivered,
            answered,
            delivered_in,
            answered_in,
            cpu,
        })
    }

    async fn send_round(&mut self, kind: Kind) -> Result<(), BenchError> {
        let pub_err = |e: rumqttc::ClientError| fail(format!("server publish: {e}"));
        match kind {
            Kind::Keav => {
                let now = unix_now();
                let report = unpersisted(
                    self.engine
                        .command_group(
                            &Targets::Group(GROUP.into()),
                            action_body(),
                            now + LIFETIME,
                            now,
                        )
                        .map_err(|e| fail(format!("group command: {e}")))?,
                );
                if let Some((d, e)) = report.skipped.first() {
                    return Err(fail(format!("the group command skipped {d}: {e}")));
                }
                for o in report.sent {
                    self.client
                        .publish(o.topic, QoS::AtLeastOnce, false, o.bytes)
                        .await
                        .map_err(pub_err)?;
                }
            }
            Kind::Plain => {
                for t in &self.topics_in {
                    self.client
                        .publish(
                            t.clone(),
                            QoS::AtLeastOnce,
                            false,
                            vec![PLAIN_MARK; self.setup.command_bytes],
                        )
                        .await
                        .map_err(pub_err)?;
                }
            }
        }
        Ok(())
    }

    /// Verifies and accounts one response; returns 1 for an accepted action success.
    fn handle(&mut self, topic: &str, payload: &[u8]) -> Result<u64, BenchError> {
        match self.engine.handle(topic, payload, unix_now()) {
            Ok(m) => {
                let mut n = 0;
                for ev in unpersisted(m).events {
                    match ev {
                        ServerEvent::Response {
                            status: Status::ActionSuccess,
                            ..
                        } => n += 1,
                        other => {
                            return Err(fail(format!("unexpected server event {other:?}")));
                        }
                    }
                }
                Ok(n)
            }
            Err(d) => {
                self.dropped += 1;
                Err(fail(format!("the server dropped a response: {d}")))
            }
        }
    }

    fn stalled(&self, answered: u64, total: u64, delivered0: u64) -> BenchError {
        let delivered = self.shared.delivered.load(Ordering::Relaxed) - delivered0;
        let errors = self.shared.errors();
        let mut m = format!(
            "no response for {} s: {answered} of {total} responses, {delivered} commands \
             delivered",
            IDLE.as_secs()
        );
        if !errors.is_empty() {
            m.push_str(&format!(
                "; {} device errors, first: {}",
                errors.len(),
                errors
                    .iter()
                    .take(QUOTED_ERRORS)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        fail(m)
    }
}

/// Connects the fleet to the broker at `addr`, warms up (one keav and one plaintext group
/// command, not timed), then times the plaintext phase and the keav phase. Returns the keav
/// run, the plaintext run and the messages the engines dropped.
async fn measure(
    fleet: Fleet,
    addr: &str,
    setup: &FleetSetup,
    progress: &dyn Progress,
) -> Result<(FleetRun, FleetRun, u64), BenchError> {
    let (host, port) = host_port(addr)?;
    let run_id = format!("kc2b{:08x}", rand::random::<u32>());
    let shared = Arc::new(Shared::default());
    let topics = fleet.engine.topics();
    let topics_in: Vec<String> = fleet.devices.iter().map(|d| d.topic_in()).collect();
    let rounds = setup.rounds;
    // Replies a device may have queued: every round plus the warm-ups.
    let capacity = rounds as usize + 16;

    progress.stage(
        &format!("c2 {} connect {} devices", setup.alg, fleet.devices.len()),
        fleet.devices.len() as u64,
    );
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut tasks = Tasks(Vec::with_capacity(fleet.devices.len() + 1));
    let n = fleet.devices.len();
    for (i, dev) in fleet.devices.into_iter().enumerate() {
        let mo = mqtt_options(format!("{run_id}-d{i}"), &host, port);
        tasks.0.push(tokio::spawn(device_task(
            dev,
            mo,
            capacity,
            setup.response_bytes,
            shared.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    for done in 0..n {
        match tokio::time::timeout_at(deadline.into(), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => progress.advance(1),
            Ok(Some(Err(e))) => return Err(fail(e)),
            Ok(None) => return Err(fail("a device task ended before it was ready")),
            Err(_) => {
                return Err(fail(format!(
                    "{done} of {n} devices connected and subscribed within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        }
    }

    // The server: subscribed to every device's response topic before any command.
    let (client, mut el) =
        AsyncClient::new(mqtt_options(format!("{run_id}-server"), &host, port), 4096);
    client
        .subscribe(topics.server_filter(), QoS::AtLeastOnce)
        .await
        .map_err(|e| fail(format!("server subscribe: {e}")))?;
    tokio::time::timeout(CONNECT_TIMEOUT, subscribed(&mut el))
        .await
        .map_err(|_| fail("the server did not get its subscription in time"))?
        .map_err(|e| fail(format!("server: {e}")))?;
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    tasks.0.push(tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if in_tx.send(Ok((p.topic, p.payload))).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = in_tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    }));
    let mut server = Server {
        engine: fleet.engine,
        client,
        inbound: in_rx,
        shared: shared.clone(),
        topics_in,
        setup,
        dropped: 0,
    };

    // Warm-up: proves the whole loop works, fills caches and connections.
    progress.stage(&format!("c2 {} warm-up", setup.alg), 0);
    server.phase(Kind::Keav, 1, None).await?;
    server.phase(Kind::Plain, 1, None).await?;

    let total = n as u64 * rounds;
    progress.stage(&format!("c2 {} plaintext", setup.alg), total);
    let plain = server.phase(Kind::Plain, rounds, Some(progress)).await?;
    progress.stage(&format!("c2 {} keav", setup.alg), total);
    let keav = server.phase(Kind::Keav, rounds, Some(progress)).await?;

    let dropped = server.dropped + shared.dropped.load(Ordering::Relaxed);
    let _ = server.client.disconnect().await;
    drop(tasks);
    Ok((keav, plain, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Report;

    #[test]
    fn config_follows_the_options() {
        let mut o = crate::Options::default();
        let c = Config::from_options(&o);
        assert_eq!(c.devices, crate::options::DEFAULT_C2_DEVICES);
        assert_eq!((c.rounds, c.sig_batches), (ROUNDS, SIG_BATCHES));
        assert_eq!(c.algs, ALGS);
        o.quick = true;
        o.c2_devices = 7;
        let c = Config::from_options(&o);
        assert_eq!((c.devices, c.rounds), (7, QUICK_ROUNDS));
        assert_eq!(c.sig_per_batch, QUICK_SIG_PER_BATCH);
        o.c2_devices = 0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--c2-devices"));
    }

    #[test]
    fn signature_rows_time_every_operation() {
        let mut calls = 0;
        let rows = signature_rows(Alg::Ed25519, 2, 3, &mut || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 6, "2 batches × 3 operations");
        assert_eq!(
            rows.iter().map(|r| r.op).collect::<Vec<_>>(),
            SigOp::ALL.to_vec()
        );
        for r in &rows {
            assert_eq!(r.alg, "ed25519");
            assert_eq!(r.iterations, 6);
            assert!(r.median_us > 0.0 && r.p99_us >= r.median_us * 0.0);
        }
        // Cancellation between batches stops the measurement.
        let e = signature_rows(Alg::Ed25519, 2, 1, &mut || Err(BenchError::Cancelled));
        assert!(matches!(e, Err(BenchError::Cancelled)));
    }

    #[test]
    fn fleets_join_in_memory() {
        let keys: Vec<SigningKey> = (0..3)
            .map(|_| SigningKey::generate(Alg::Ed25519).unwrap())
            .collect();
        let server = SigningKey::generate(Alg::Ed25519).unwrap();
        let f = build_fleet(server, keys).unwrap();
        assert_eq!(f.devices.len(), 3);
        assert!(
            f.command_bytes > f.response_bytes,
            "{} {}",
            f.command_bytes,
            f.response_bytes
        );
        for d in &f.devices {
            assert_eq!(
                f.engine.device(d.id()).unwrap().status,
                DeviceStatus::Joined
            );
        }
        assert!(build_fleet(SigningKey::generate(Alg::Ed25519).unwrap(), vec![]).is_err());
    }

    /// The whole scenario with tiny counts against the embedded broker (no timing asserted).
    #[test]
    fn smoke_run_against_the_embedded_broker() {
        let opts = crate::Options::default();
        let mut report = Report::default();
        let cancel = AtomicBool::new(false);
        let mut ctx = Ctx {
            opts: &opts,
            report: &mut report,
            progress: &crate::run::Quiet,
            cancel: &cancel,
        };
        let cfg = Config {
            algs: vec![Alg::Ed25519, Alg::RsaPss2048],
            sig_batches: 1,
            sig_per_batch: 2,
            devices: 3,
            rounds: 2,
            window: 1,
        };
        run_with(&mut ctx, &cfg).unwrap();
        assert_eq!(report.c2_signatures.len(), 6);
        assert_eq!(report.c2_fleet.len(), 2);
        for r in &report.c2_fleet {
            assert_eq!((r.devices, r.rounds, r.dropped), (3, 2, 0));
            assert!(r.keav_cmds_per_s > 0.0 && r.plain_cmds_per_s > 0.0, "{r:?}");
            assert!(r.cmd_ratio.is_some() && r.round_trip_ratio.is_some());
            assert_eq!(r.broker, "MQTT (embedded rumqttd)");
        }
        let rsa = &report.c2_fleet[1];
        assert_eq!(rsa.alg, "rsa2048");
        assert!(rsa.command_bytes > report.c2_fleet[0].command_bytes + 150);
        // A stopped run stops.
        cancel.store(true, Ordering::Relaxed);
        let mut report = Report::default();
        let mut ctx = Ctx {
            opts: &opts,
            report: &mut report,
            progress: &crate::run::Quiet,
            cancel: &cancel,
        };
        assert!(matches!(
            run_with(&mut ctx, &cfg),
            Err(BenchError::Cancelled)
        ));
    }
}
