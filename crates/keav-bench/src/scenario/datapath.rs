//! The `records` and `throughput` scenarios.
//!
//! - [`run_records`]: one record sealed and opened through both ends of an established
//!   channel, in memory, for 64 B, 1 KiB and 16 KiB: keav ([`KeavPipe`], this build's AEAD
//!   backend, [`keav_proto::record::AEAD_BACKEND`]), rustls TLS 1.3 and snow (with the
//!   `peers` feature), each with AES-256-GCM and ChaCha20-Poly1305. Timed in batches; the
//!   reported time is the median of the batch means, the range is the fastest and slowest
//!   batch. Every batch is bracketed by a checked round trip (the opened plaintext must equal
//!   the sealed one).
//! - [`run_throughput`]: one stream over loopback TCP, a keav-net channel against plain
//!   tokio TCP moving the same bytes in the same chunks ([`measure_throughput`]). Every run's
//!   received bytes are checked against what was sent ([`StreamCheck`]); a short, long or
//!   corrupted transfer is an error.

use std::time::{Duration, Instant};

use keav_proto::record::{Aead, RECORD_OVERHEAD};

use crate::records::{KeavPipe, PAYLOAD_SIZES};
use crate::report::stats;
use crate::report::{RecordRow, ThroughputRow};
use crate::run::Ctx;
use crate::BenchError;

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// A protocol stack of the records scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordSubject {
    /// keav's record layer ([`KeavPipe`]) with this AEAD, on this build's backend.
    Keav(Aead),
    /// rustls TLS 1.3 with the suite of this AEAD (`TLS_AES_256_GCM_SHA384` or
    /// `TLS_CHACHA20_POLY1305_SHA256`).
    #[cfg(feature = "peers")]
    Rustls(Aead),
    /// snow Noise transport messages (`AESGCM` or `ChaChaPoly`).
    #[cfg(feature = "peers")]
    Snow(Aead),
}

impl RecordSubject {
    /// Every stack this build can measure, in table order.
    pub fn all() -> Vec<RecordSubject> {
        let keav = [
            RecordSubject::Keav(Aead::Aes256Gcm),
            RecordSubject::Keav(Aead::ChaCha20Poly1305),
        ];
        #[cfg(feature = "peers")]
        let peers = [
            RecordSubject::Rustls(Aead::Aes256Gcm),
            RecordSubject::Rustls(Aead::ChaCha20Poly1305),
            RecordSubject::Snow(Aead::Aes256Gcm),
            RecordSubject::Snow(Aead::ChaCha20Poly1305),
        ];
        #[cfg(not(feature = "peers"))]
        let peers: [RecordSubject; 0] = [];
        keav.into_iter().chain(peers).collect()
    }

    /// The row's subject, e.g. `keav aes-256-gcm [ring]`, `rustls aes-256-gcm`,
    /// `snow chachapoly`.
    pub fn name(self) -> String {
        match self {
            RecordSubject::Keav(a) => {
                format!("keav {} [{}]", a.name(), keav_proto::record::AEAD_BACKEND)
            }
            #[cfg(feature = "peers")]
            RecordSubject::Rustls(a) => format!("rustls {}", a.name()),
            #[cfg(feature = "peers")]
            RecordSubject::Snow(Aead::Aes256Gcm) => "snow aesgcm".into(),
            #[cfg(feature = "peers")]
            RecordSubject::Snow(Aead::ChaCha20Poly1305) => "snow chachapoly".into(),
        }
    }

    /// Bytes the protocol adds to a record's payload on the wire: keav 29 (13-byte header,
    /// 16-byte tag), TLS 1.3 22 (5-byte header, 1-byte inner content type, 16-byte tag),
    /// Noise 16 (the tag; the 2-byte length prefix a stream transport adds is not part of a
    /// Noise message).
    pub fn overhead(self) -> usize {
        match self {
            RecordSubject::Keav(_) => RECORD_OVERHEAD,
            #[cfg(feature = "peers")]
            RecordSubject::Rustls(_) => 5 + 1 + 16,
            #[cfg(feature = "peers")]
            RecordSubject::Snow(_) => 16,
        }
    }

    /// Sets up an established channel of this stack (runs a handshake).
    pub fn pipe(self) -> Result<Pipe, BenchError> {
        Ok(match self {
            RecordSubject::Keav(a) => Pipe::Keav(KeavPipe::new(a)?),
            #[cfg(feature = "peers")]
            RecordSubject::Rustls(a) => Pipe::Tls(Box::new(crate::peers::TlsPipe::new(match a {
                Aead::Aes256Gcm => crate::peers::TlsSuite::Aes256Gcm,
                Aead::ChaCha20Poly1305 => crate::peers::TlsSuite::ChaCha20Poly1305,
            })?)),
            #[cfg(feature = "peers")]
            RecordSubject::Snow(a) => {
                let name = noise_name(a);
                Pipe::Noise(crate::peers::NoisePipe::new(name)?, name)
            }
        })
    }
}

#[cfg(feature = "peers")]
fn noise_name(a: Aead) -> &'static str {
    match a {
        Aead::Aes256Gcm => crate::peers::NOISE_XX_AESGCM,
        Aead::ChaCha20Poly1305 => crate::peers::NOISE_XX,
    }
}

/// An established channel of one [`RecordSubject`], both ends in this thread.
#[derive(Debug)]
pub enum Pipe {
    /// keav.
    Keav(KeavPipe),
    /// rustls.
    #[cfg(feature = "peers")]
    Tls(Box<crate::peers::TlsPipe>),
    /// snow, with its protocol name.
    #[cfg(feature = "peers")]
    Noise(crate::peers::NoisePipe, &'static str),
}

impl Pipe {
    /// Sends `payload` as one record and returns what the receiver opened.
    #[inline]
    pub fn transfer(&mut self, payload: &[u8]) -> Result<&[u8], BenchError> {
        match self {
            Pipe::Keav(p) => p.transfer(payload),
            #[cfg(feature = "peers")]
            Pipe::Tls(p) => p.transfer(payload),
            #[cfg(feature = "peers")]
            Pipe::Noise(p, _) => p.transfer(payload),
        }
    }

    /// Sends `payload` once, checks that the receiver opened exactly `payload`, and returns
    /// the bytes that record took on the wire (measured: keav's record buffer, rustls'
    /// `write_tls` output, snow's `write_message` length of an equal-length payload on a
    /// fresh transport of the same protocol).
    pub fn checked_transfer(&mut self, payload: &[u8]) -> Result<usize, BenchError> {
        let got = self.transfer(payload)?;
        if got != payload {
            return Err(BenchError::Report(format!(
                "records: the opened plaintext ({} bytes) differs from the {} sealed",
                got.len(),
                payload.len()
            )));
        }
        Ok(match self {
            Pipe::Keav(p) => p.last_record_len(),
            #[cfg(feature = "peers")]
            Pipe::Tls(p) => p.last_wire_len(),
            #[cfg(feature = "peers")]
            Pipe::Noise(_, name) => noise_wire_len(name, payload)?,
        })
    }
}

/// Length of one snow transport message carrying `payload` (the `NoisePipe` keeps its
/// buffers private, so a second transport of the same protocol writes one).
#[cfg(feature = "peers")]
fn noise_wire_len(name: &str, payload: &[u8]) -> Result<usize, BenchError> {
    let statics = crate::peers::NoiseStatics::generate_for(name)?;
    let mut o = crate::peers::noise_xx_handshake(&statics)?;
    let mut wire = vec![0u8; payload.len() + 64];
    Ok(o.initiator.write_message(payload, &mut wire)?)
}

/// Batches of the records scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordPlan {
    /// Timed batches per (stack, size).
    pub batches: u32,
    /// Target duration of one batch (the batch size is calibrated to it).
    pub batch_time: Duration,
}

impl RecordPlan {
    /// 15 batches of about 20 ms, or 3 of about 2 ms when `quick`.
    pub fn new(quick: bool) -> Self {
        if quick {
            RecordPlan {
                batches: 3,
                batch_time: Duration::from_millis(2),
            }
        } else {
            RecordPlan {
                batches: 15,
                batch_time: Duration::from_millis(20),
            }
        }
    }
}

/// Deterministic, non-constant payload bytes.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Times `payload` through `pipe` as the plan says and returns the row. `between` runs
/// after each batch (progress, cancellation); its error ends the measurement.
pub fn measure_records(
    subject: RecordSubject,
    pipe: &mut Pipe,
    payload: &[u8],
    plan: RecordPlan,
    between: &mut dyn FnMut() -> Result<(), BenchError>,
) -> Result<RecordRow, BenchError> {
    let wire_bytes = pipe.checked_transfer(payload)?;
    // Calibrate: how many records fit in a batch.
    let mut n: u64 = 1;
    let per_record_ns = loop {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(pipe.transfer(std::hint::black_box(payload))?.len());
        }
        let e = t.elapsed();
        if e >= plan.batch_time / 8 || n >= 1 << 24 {
            break (e.as_nanos() as f64 / n as f64).max(1.0);
        }
        n *= 2;
    };
    let batch = ((plan.batch_time.as_nanos() as f64 / per_record_ns) as u64).max(1);
    let mut means = Vec::with_capacity(plan.batches as usize);
    for _ in 0..plan.batches {
        let t = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(pipe.transfer(std::hint::black_box(payload))?.len());
        }
        let e = t.elapsed();
        means.push(e.as_nanos() as f64 / batch as f64);
        // The round trip still works and is still exact after the batch.
        let w = pipe.checked_transfer(payload)?;
        if w != wire_bytes {
            return Err(BenchError::Report(format!(
                "records: {} wire bytes changed from {wire_bytes} to {w}",
                subject.name()
            )));
        }
        between()?;
    }
    let ns_median = stats::median(&means);
    Ok(RecordRow {
        subject: subject.name(),
        size: payload.len(),
        ns_median,
        ns_range: stats::range(&means),
        mb_per_s: payload.len() as f64 / ns_median * 1e3,
        wire_bytes,
    })
}

/// Record seal + open beside rustls and snow.
pub fn run_records(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let plan = RecordPlan::new(ctx.opts.quick);
    let subjects = RecordSubject::all();
    ctx.progress.stage(
        "records",
        (subjects.len() * PAYLOAD_SIZES.len()) as u64 * u64::from(plan.batches),
    );
    for subject in subjects {
        ctx.check()?;
        let mut pipe = subject.pipe()?;
        for (i, size) in PAYLOAD_SIZES.into_iter().enumerate() {
            let data = payload(size, i as u8 + 1);
            let progress = ctx.progress;
            let cancel = ctx.cancel;
            let row = measure_records(subject, &mut pipe, &data, plan, &mut || {
                progress.advance(1);
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    Err(BenchError::Cancelled)
                } else {
                    Ok(())
                }
            })?;
            if row.wire_bytes != size + subject.overhead() {
                ctx.report.notes.push(format!(
                    "records: {} put {} bytes on the wire for a {size}-byte payload \
                     (expected {} of overhead)",
                    row.subject,
                    row.wire_bytes,
                    subject.overhead()
                ));
            }
            ctx.report.records.push(row);
        }
    }
    #[cfg(feature = "peers")]
    ctx.report.notes.push(
        "records: one record sealed and opened through both ends of an established channel in \
         one thread; ns = median of the batch means (range: fastest and slowest batch); \
         wire bytes of snow are the Noise message (ciphertext + tag) without the 2-byte length \
         prefix a stream transport adds; rustls' include the 5-byte record header."
            .into(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------

/// Checks a received byte stream against the one [`ChunkSource`] sends: every byte in
/// order, nothing missing, nothing extra. Receivers feed it whatever pieces they got.
#[derive(Debug)]
pub struct StreamCheck {
    source: ChunkSource,
    expected: Vec<u8>,
    /// Index of the chunk held in `expected`.
    chunk_index: u64,
    received: u64,
}

impl StreamCheck {
    /// Expects the stream of `source`.
    pub fn new(source: &ChunkSource) -> Self {
        let mut expected = Vec::new();
        source.fill(0, &mut expected);
        StreamCheck {
            source: source.clone(),
            expected,
            chunk_index: 0,
            received: 0,
        }
    }

    /// Checks the next received piece.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), BenchError> {
        let chunk = self.source.chunk as u64;
        while !data.is_empty() {
            if self.received >= self.source.total {
                return Err(BenchError::Report(format!(
                    "transfer: received more than the {} bytes sent",
                    self.source.total
                )));
            }
            let idx = self.received / chunk;
            if idx != self.chunk_index {
                self.source.fill(idx, &mut self.expected);
                self.chunk_index = idx;
            }
            let off = (self.received % chunk) as usize;
            let want = self.expected.get(off..).unwrap_or_default();
            let n = want.len().min(data.len());
            if n == 0 {
                return Err(BenchError::Report("transfer: internal check error".into()));
            }
            let (head, rest) = data.split_at(n);
            if head != want.get(..n).unwrap_or_default() {
                return Err(BenchError::Report(format!(
                    "transfer: received bytes differ from those sent near offset {}",
                    self.received
                )));
            }
            self.received += n as u64;
            data = rest;
        }
        Ok(())
    }

    /// Bytes checked so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Ends the check: every byte sent must have arrived.
    pub fn finish(&self) -> Result<(), BenchError> {
        if self.received != self.source.total {
            return Err(BenchError::Report(format!(
                "transfer: received {} of {} bytes",
                self.received, self.source.total
            )));
        }
        Ok(())
    }
}

/// The sender's stream: `total` bytes in chunks of `chunk` bytes; every chunk is the same
/// pseudo-random block with the chunk's index stamped into its first 8 bytes, so a lost,
/// repeated or reordered chunk is noticed as well as a damaged byte.
#[derive(Clone, Debug)]
pub struct ChunkSource {
    base: Vec<u8>,
    chunk: usize,
    total: u64,
}

impl ChunkSource {
    /// A stream of `total` bytes in `chunk`-byte pieces (`chunk` ≥ 1).
    pub fn new(total: u64, chunk: usize) -> Result<Self, BenchError> {
        if chunk == 0 {
            return Err(BenchError::InvalidOption(
                "chunk size must be positive".into(),
            ));
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let base = (0..chunk)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Ok(ChunkSource { base, chunk, total })
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.total.div_ceil(self.chunk as u64)
    }

    /// Writes chunk `idx` into `out` (replacing its contents; the last chunk may be short).
    pub fn fill(&self, idx: u64, out: &mut Vec<u8>) {
        out.clear();
        let start = idx.saturating_mul(self.chunk as u64);
        let len = self.total.saturating_sub(start).min(self.chunk as u64) as usize;
        out.extend_from_slice(self.base.get(..len).unwrap_or_default());
        for (d, s) in out.iter_mut().zip(idx.to_le_bytes()) {
            *d ^= s;
        }
    }
}

/// Which transport a throughput run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A plain tokio `TcpStream` pair (`TCP_NODELAY`).
    PlainTcp,
    /// A keav-net TCP channel.
    KeavTcp,
}

impl Transport {
    /// The row's subject.
    pub fn name(self) -> &'static str {
        match self {
            Transport::PlainTcp => "plain tcp (tokio)",
            Transport::KeavTcp => "keav-net tcp channel",
        }
    }
}

/// Sizes of a throughput measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThroughputPlan {
    /// Bytes per run.
    pub total: u64,
    /// Bytes per write (`send` / `write_all`).
    pub chunk: usize,
    /// Runs of each transport (alternating, plain first).
    pub runs: u32,
}

impl ThroughputPlan {
    /// 256 MiB in 16 KiB writes, 3 runs; quick: 8 MiB, 1 run.
    pub fn new(quick: bool) -> Self {
        if quick {
            ThroughputPlan {
                total: 8 << 20,
                chunk: 16 * 1024,
                runs: 1,
            }
        } else {
            ThroughputPlan {
                total: 256 << 20,
                chunk: 16 * 1024,
                runs: 3,
            }
        }
    }
}

/// One timed transfer.
#[derive(Clone, Debug)]
pub struct ThroughputRun {
    /// The transport.
    pub transport: Transport,
    /// From before the first write until the receiver had the last byte.
    pub secs: f64,
    /// CPU time of this process (both ends) during the transfer, if /proc tells.
    pub cpu_secs: Option<f64>,
    /// keav only: connect + accept (not part of `secs`).
    pub handshake: Option<Duration>,
    /// keav only: the channel's AEAD.
    pub aead: Option<Aead>,
}

impl ThroughputRun {
    /// Payload MB/s (10^6 bytes per second) of a run of `total` bytes.
    pub fn mb_per_s(&self, total: u64) -> f64 {
        total as f64 / self.secs.max(1e-9) / 1e6
    }
}

/// User + system CPU time of this process, from /proc/self/stat (Linux; USER_HZ = 100).
fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn join_error(e: tokio::task::JoinError) -> BenchError {
    BenchError::Report(format!("throughput task failed: {e}"))
}

/// Two keav devices on temporary stores, and the runtime that drives them.
struct Bench {
    rt: tokio::runtime::Runtime,
    a: keav_net::device::Device,
    b: keav_net::device::Device,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Result<Self, BenchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let dir = tempfile::TempDir::new()?;
        let settings = keav_net::device::DeviceSettings {
            verify_secret: Some(keav_verify::VerifySecret::from("bench pairing code")),
            ..keav_net::device::DeviceSettings::default()
        };
        let a = keav_net::device::Device::open(dir.path().join("a.keav"), settings.clone())?;
        let b = keav_net::device::Device::open(dir.path().join("b.keav"), settings)?;
        Ok(Bench {
            rt,
            a,
            b,
            _dir: dir,
        })
    }

    fn plain(&self, src: &ChunkSource) -> Result<ThroughputRun, BenchError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};
        self.rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
            let (mut a, (mut b, _)) = (a?, b?);
            a.set_nodelay(true)?;
            b.set_nodelay(true)?;
            let tx_src = src.clone();
            let mut check = StreamCheck::new(src);
            let cpu0 = cpu_time();
            let t0 = Instant::now();
            let sender = tokio::spawn(async move {
                let mut chunk = Vec::new();
                for i in 0..tx_src.chunks() {
                    tx_src.fill(i, &mut chunk);
                    a.write_all(&chunk).await?;
                }
                a.shutdown().await?;
                Ok::<_, BenchError>(())
            });
            let receiver = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = b.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    check.feed(buf.get(..n).unwrap_or_default())?;
                }
                check.finish()?;
                Ok::<_, BenchError>(Instant::now())
            });
            let sent = sender.await.map_err(join_error);
            let t1 = receiver.await.map_err(join_error)??;
            sent??;
            Ok(ThroughputRun {
                transport: Transport::PlainTcp,
                secs: (t1 - t0).as_secs_f64(),
                cpu_secs: cpu0
                    .zip(cpu_time())
                    .map(|(a, b)| b.saturating_sub(a).as_secs_f64()),
                handshake: None,
                aead: None,
            })
        })
    }

    fn keav(&self, src: &ChunkSource) -> Result<ThroughputRun, BenchError> {
        use keav_net::session::Options;
        use keav_net::tcp::{self, Listener};
        self.rt.block_on(async {
            let mut listener = Listener::bind(&self.b, "127.0.0.1:0", Options::default()).await?;
            let addr = listener.local_addr();
            let opts = Options::default();
            let h0 = Instant::now();
            let (ca, cb) = tokio::join!(tcp::connect(&self.a, addr, "b", &opts), listener.accept());
            let handshake = h0.elapsed();
            let (mut ca, mut cb) = (ca?, cb?);
            let aead = ca.peer().channel_aead;
            if cb.peer().channel_aead != aead {
                return Err(BenchError::UnexpectedKind(
                    "the two channel ends use different AEADs".into(),
                ));
            }
            let tx_src = src.clone();
            let mut check = StreamCheck::new(src);
            let cpu0 = cpu_time();
            let t0 = Instant::now();
            let sender = tokio::spawn(async move {
                let mut chunk = Vec::new();
                for i in 0..tx_src.chunks() {
                    tx_src.fill(i, &mut chunk);
                    ca.send(&chunk).await?;
                }
                ca.close().await?;
                Ok::<_, BenchError>(())
            });
            let receiver = tokio::spawn(async move {
                while let Some(d) = cb.recv().await? {
                    check.feed(&d)?;
                }
                check.finish()?;
                Ok::<_, BenchError>(Instant::now())
            });
            let sent = sender.await.map_err(join_error);
            let t1 = receiver.await.map_err(join_error);
            listener.shutdown();
            let t1 = t1??;
            sent??;
            Ok(ThroughputRun {
                transport: Transport::KeavTcp,
                secs: (t1 - t0).as_secs_f64(),
                cpu_secs: cpu0
                    .zip(cpu_time())
                    .map(|(a, b)| b.saturating_sub(a).as_secs_f64()),
                handshake: Some(handshake),
                aead: Some(aead),
            })
        })
    }
}

/// Runs `plan.runs` transfers of each transport, alternating (plain, keav, plain, ...), each
/// checked byte for byte. Builds its own tokio runtime (two workers): call from a plain
/// thread, not from inside a runtime. `after_run` sees each run as it finishes (progress,
/// cancellation); its error ends the measurement. Returns the runs in order.
pub fn measure_throughput(
    plan: ThroughputPlan,
    after_run: &mut dyn FnMut(&ThroughputRun) -> Result<(), BenchError>,
) -> Result<Vec<ThroughputRun>, BenchError> {
    if plan.runs == 0 || plan.total == 0 {
        return Err(BenchError::InvalidOption(
            "throughput: runs and bytes must be positive".into(),
        ));
    }
    let src = ChunkSource::new(plan.total, plan.chunk)?;
    let bench = Bench::new()?;
    let mut out = Vec::new();
    for _ in 0..plan.runs {
        let r = bench.plain(&src)?;
        after_run(&r)?;
        out.push(r);
        let r = bench.keav(&src)?;
        after_run(&r)?;
        out.push(r);
    }
    Ok(out)
}

/// The report rows (plain, keav) of `runs`.
pub fn throughput_rows(runs: &[ThroughputRun], plan: ThroughputPlan) -> Vec<ThroughputRow> {
    [Transport::PlainTcp, Transport::KeavTcp]
        .into_iter()
        .filter_map(|t| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.transport == t)
                .map(|r| r.mb_per_s(plan.total))
                .collect();
            if v.is_empty() {
                return None;
            }
            let aead = runs.iter().find(|r| r.transport == t).and_then(|r| r.aead);
            let subject = match aead {
                Some(a) => format!(
                    "{} ({}, {})",
                    t.name(),
                    a.name(),
                    keav_proto::record::AEAD_BACKEND
                ),
                None => t.name().to_string(),
            };
            Some(ThroughputRow {
                subject,
                mb_per_s: stats::median(&v),
                range: stats::range(&v),
                bytes: plan.total,
                runs: v.len() as u32,
            })
        })
        .collect()
}

/// One TCP channel's throughput on loopback.
pub fn run_throughput(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let plan = ThroughputPlan::new(ctx.opts.quick);
    ctx.progress.stage("throughput", u64::from(plan.runs) * 2);
    let progress = ctx.progress;
    let cancel = ctx.cancel;
    let runs = measure_throughput(plan, &mut |_| {
        progress.advance(1);
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            Err(BenchError::Cancelled)
        } else {
            Ok(())
        }
    })?;
    ctx.report.throughput.extend(throughput_rows(&runs, plan));
    let hs: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.handshake)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ctx.report.notes.push(format!(
        "throughput: {} MiB one way per run in {}-byte writes over 127.0.0.1, {} run(s) of \
         each transport alternating, every run checked byte for byte; the keav handshake \
         (connect + accept, median {:.1} ms) is not timed.",
        plan.total >> 20,
        plan.chunk,
        plan.runs,
        stats::median(&hs)
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(src: &ChunkSource) -> Vec<u8> {
        let mut all = Vec::new();
        let mut c = Vec::new();
        for i in 0..src.chunks() {
            src.fill(i, &mut c);
            all.extend_from_slice(&c);
        }
        all
    }

    #[test]
    fn stream_check_accepts_the_stream_in_any_pieces() {
        let src = ChunkSource::new(10_000, 1000).unwrap();
        let all = stream(&src);
        assert_eq!(all.len(), 10_000);
        for piece in [1, 7, 999, 1000, 1001, 4096, 10_000] {
            let mut c = StreamCheck::new(&src);
            for p in all.chunks(piece) {
                c.feed(p).unwrap();
            }
            c.finish().unwrap();
            assert_eq!(c.received(), 10_000);
        }
        // A short last chunk.
        let src = ChunkSource::new(2500, 1000).unwrap();
        let all = stream(&src);
        assert_eq!(all.len(), 2500);
        let mut c = StreamCheck::new(&src);
        c.feed(&all).unwrap();
        c.finish().unwrap();
    }

    #[test]
    fn stream_check_refuses_damage_loss_excess_and_swaps() {
        let src = ChunkSource::new(8000, 1000).unwrap();
        let all = stream(&src);
        // One flipped bit anywhere.
        for pos in [0, 5, 999, 1000, 4321, 7999] {
            let mut bad = all.clone();
            bad[pos] ^= 0x10;
            let mut c = StreamCheck::new(&src);
            assert!(c.feed(&bad).is_err(), "flip at {pos} not noticed");
        }
        // Short.
        let mut c = StreamCheck::new(&src);
        c.feed(&all[..7999]).unwrap();
        assert!(c.finish().is_err());
        // Long.
        let mut c = StreamCheck::new(&src);
        let mut long = all.clone();
        long.push(0);
        assert!(c.feed(&long).is_err());
        // Two whole chunks swapped (same length, same bytes but the stamp).
        let mut swapped = all[..1000].to_vec();
        swapped.extend_from_slice(&all[2000..3000]);
        swapped.extend_from_slice(&all[1000..2000]);
        swapped.extend_from_slice(&all[3000..]);
        let mut c = StreamCheck::new(&src);
        assert!(c.feed(&swapped).is_err());
        // A chunk lost and the next one repeated.
        let mut dup = all[..3000].to_vec();
        dup.extend_from_slice(&all[4000..5000]);
        dup.extend_from_slice(&all[4000..]);
        assert_eq!(dup.len(), all.len());
        let mut c = StreamCheck::new(&src);
        assert!(c.feed(&dup).is_err());
    }

    #[test]
    fn zero_chunk_is_refused() {
        assert!(ChunkSource::new(10, 0).is_err());
    }

    #[test]
    fn record_plan_quick_is_small() {
        let q = RecordPlan::new(true);
        let f = RecordPlan::new(false);
        assert!(q.batches < f.batches && q.batch_time < f.batch_time);
    }
}
