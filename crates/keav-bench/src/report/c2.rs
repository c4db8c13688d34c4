//! The C2 part of the report (issue 6): rows, their statistics, the Markdown section and the
//! plot (`c2.png`).
//!
//! Two kinds of rows, both produced by [`crate::scenario::c2`]:
//!
//! - [`SigRow`]: the CPU cost of one operation on a typical signed action command (sign,
//!   decode + verify, decode only), per algorithm; the section sets RSA-2048 beside Ed25519.
//! - [`FleetRow`]: signed commands per second from a C2 server to a fleet of devices through
//!   an MQTT broker, and command → response round trips per second, beside unsigned plaintext
//!   messages of the same sizes on the same topics and connections.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::stats::{median, range};
use super::Report;

/// What a [`SigRow`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigOp {
    /// `Message::sign`: header and body encoding plus the signature.
    Sign,
    /// `Message::decode` then `Unverified::verify` with the sender's key: what a receiver
    /// pays for an authentic message before its replay checks.
    Verify,
    /// `Message::decode` alone: parsing and the layout checks, no public-key work (what a
    /// receiver pays to drop a malformed or misaddressed message).
    Decode,
}

impl SigOp {
    /// Table order.
    pub const ALL: [SigOp; 3] = [SigOp::Sign, SigOp::Verify, SigOp::Decode];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            SigOp::Sign => "sign",
            SigOp::Verify => "decode + verify",
            SigOp::Decode => "decode only (no key)",
        }
    }
}

/// The CPU cost of one operation on one signed action command, single-threaded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SigRow {
    /// Algorithm name as keav-c2 prints it (`ed25519`, `rsa2048`).
    pub alg: String,
    /// The operation.
    pub op: SigOp,
    /// Median over batches of each batch's median, µs per operation.
    pub median_us: f64,
    /// 90th percentile over every timed operation, µs.
    pub p90_us: f64,
    /// 99th percentile over every timed operation, µs.
    pub p99_us: f64,
    /// Smallest and largest batch median, µs (the spread).
    pub range_us: (f64, f64),
    /// Operations timed.
    pub iterations: u64,
    /// Bytes of the signed command.
    pub message_bytes: usize,
}

impl SigRow {
    /// A row from per-operation timings grouped by batch (µs). `None` without any sample.
    pub fn from_batches(
        alg: &str,
        op: SigOp,
        batches: &[Vec<f64>],
        message_bytes: usize,
    ) -> Option<SigRow> {
        let medians: Vec<f64> = batches
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| median(b))
            .collect();
        if medians.is_empty() {
            return None;
        }
        let mut all: Vec<f64> = batches.iter().flatten().copied().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        Some(SigRow {
            alg: alg.to_string(),
            op,
            median_us: median(&medians),
            p90_us: percentile_sorted(&all, 90.0),
            p99_us: percentile_sorted(&all, 99.0),
            range_us: range(&medians),
            iterations: all.len() as u64,
            message_bytes,
        })
    }

    /// Operations per second on one core at the median (0 for a zero median).
    pub fn ops_per_sec(&self) -> f64 {
        if self.median_us > 0.0 {
            1e6 / self.median_us
        } else {
            0.0
        }
    }
}

/// Nearest-rank percentile `p` (0..=100) of ascending `sorted` values (0 when empty).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// One timed phase of the fleet measurement (keav or plaintext).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FleetRun {
    /// Commands the devices received (keav: and verified and accepted).
    pub delivered: u64,
    /// Responses the server received (keav: verified and matched to a tracked command).
    pub answered: u64,
    /// From the first command published to the last command delivered.
    pub delivered_in: Duration,
    /// From the first command published to the last response accounted.
    pub answered_in: Duration,
    /// CPU time of the bench process during the phase (server, devices, and the embedded
    /// broker when it runs), if the system tells.
    pub cpu: Option<Duration>,
}

/// Signed commands per second from a C2 server to a fleet through one MQTT broker, with one
/// algorithm, beside plaintext of the same sizes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FleetRow {
    /// The broker as the report names it.
    pub broker: String,
    /// Algorithm of the server's and the devices' keys.
    pub alg: String,
    /// Devices, each with its own MQTT connection.
    pub devices: u64,
    /// Group commands sent (each one signed message per device).
    pub rounds: u64,
    /// Group commands in flight at most (a round is sent once the one `window` before it is
    /// fully answered).
    pub window: u64,
    /// Bytes of one signed command (the plaintext messages have the same size).
    pub command_bytes: usize,
    /// Bytes of one signed response (the plaintext replies have the same size).
    pub response_bytes: usize,
    /// keav: commands delivered and verified by the devices per second.
    pub keav_cmds_per_s: f64,
    /// keav: round trips (response verified and accounted by the server) per second.
    pub keav_round_trips_per_s: f64,
    /// keav: seconds from the first command to the last response.
    pub keav_secs: f64,
    /// keav: CPU µs of the bench process per command (round trip included).
    pub keav_cpu_us_per_cmd: Option<f64>,
    /// Plaintext: messages received by the devices per second.
    pub plain_cmds_per_s: f64,
    /// Plaintext: replies received by the server per second.
    pub plain_round_trips_per_s: f64,
    /// Plaintext: seconds from the first message to the last reply.
    pub plain_secs: f64,
    /// Plaintext: CPU µs of the bench process per message (reply included).
    pub plain_cpu_us_per_cmd: Option<f64>,
    /// keav / plaintext commands per second.
    pub cmd_ratio: Option<f64>,
    /// keav / plaintext round trips per second.
    pub round_trip_ratio: Option<f64>,
    /// Messages an engine dropped during the keav phase (expected 0).
    pub dropped: u64,
}

/// `n` per `d`; 0 for an instantaneous or empty phase.
pub fn per_sec(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

fn cpu_per(cpu: Option<Duration>, n: u64) -> Option<f64> {
    cpu.filter(|_| n > 0)
        .map(|c| c.as_secs_f64() * 1e6 / n as f64)
}

/// What a fleet measurement was, apart from its two timed phases.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSetup {
    /// The broker as the report names it.
    pub broker: String,
    /// Algorithm name.
    pub alg: String,
    /// Devices.
    pub devices: u64,
    /// Group commands.
    pub rounds: u64,
    /// Group commands in flight at most.
    pub window: u64,
    /// Bytes of one signed command.
    pub command_bytes: usize,
    /// Bytes of one signed response.
    pub response_bytes: usize,
}

impl FleetRow {
    /// The row of one algorithm: rates of both phases and their ratios.
    pub fn new(s: &FleetSetup, keav: &FleetRun, plain: &FleetRun, dropped: u64) -> FleetRow {
        let kc = per_sec(keav.delivered, keav.delivered_in);
        let kr = per_sec(keav.answered, keav.answered_in);
        let pc = per_sec(plain.delivered, plain.delivered_in);
        let pr = per_sec(plain.answered, plain.answered_in);
        FleetRow {
            broker: s.broker.clone(),
            alg: s.alg.clone(),
            devices: s.devices,
            rounds: s.rounds,
            window: s.window,
            command_bytes: s.command_bytes,
            response_bytes: s.response_bytes,
            keav_cmds_per_s: kc,
            keav_round_trips_per_s: kr,
            keav_secs: keav.answered_in.as_secs_f64(),
            keav_cpu_us_per_cmd: cpu_per(keav.cpu, keav.delivered),
            plain_cmds_per_s: pc,
            plain_round_trips_per_s: pr,
            plain_secs: plain.answered_in.as_secs_f64(),
            plain_cpu_us_per_cmd: cpu_per(plain.cpu, plain.delivered),
            cmd_ratio: ratio(kc, pc),
            round_trip_ratio: ratio(kr, pr),
            dropped,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------------------

/// Whether the report has any C2 row.
pub(crate) fn has_rows(r: &Report) -> bool {
    !r.c2_signatures.is_empty() || !r.c2_fleet.is_empty()
}

/// Display name of an algorithm name.
pub fn alg_label(alg: &str) -> &str {
    match alg {
        "ed25519" => "Ed25519",
        "rsa2048" => "RSA-2048 (PSS, SHA-256)",
        other => other,
    }
}

fn us(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn count(x: f64) -> String {
    format!("{x:.0}")
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "—".into(), |v| format!("{v:.2}×"))
}

/// Algorithms of the rows, in first-seen order.
fn algs(r: &Report) -> Vec<&str> {
    let mut v: Vec<&str> = Vec::new();
    let names = r
        .c2_signatures
        .iter()
        .map(|x| x.alg.as_str())
        .chain(r.c2_fleet.iter().map(|x| x.alg.as_str()));
    for a in names {
        if !v.contains(&a) {
            v.push(a);
        }
    }
    v
}

fn sig<'a>(r: &'a Report, alg: &str, op: SigOp) -> Option<&'a SigRow> {
    r.c2_signatures.iter().find(|x| x.alg == alg && x.op == op)
}

/// RSA-2048 / Ed25519 median of `op`, when both were measured.
pub fn rsa_over_ed25519(r: &Report, op: SigOp) -> Option<f64> {
    let rsa = sig(r, "rsa2048", op)?;
    let ed = sig(r, "ed25519", op)?;
    ratio(rsa.median_us, ed.median_us)
}

/// The section of `report.md`.
pub(crate) fn section(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## C2 commands and signatures (issue 6)\n");
    if !r.c2_signatures.is_empty() {
        section_signatures(out, r);
    }
    if !r.c2_fleet.is_empty() {
        section_fleet(out, r);
    }
    for p in plots {
        if p.file_name().is_some_and(|n| n == "c2.png") {
            let _ = writeln!(
                out,
                "![C2 signature cost and commands per second](c2.png)\n"
            );
        }
    }
}

fn section_signatures(out: &mut String, r: &Report) {
    let _ = writeln!(out, "### Signature cost per command\n");
    let _ = writeln!(
        out,
        "One typical action command (action id, {} bytes of arguments, 16-byte token), one \
         thread, in memory. Median of batch medians; p90/p99 over every timed operation.\n",
        crate::scenario::c2::ACTION_ARGS
    );
    let algs = algs(r);
    let both = algs.contains(&"ed25519") && algs.contains(&"rsa2048");
    let mut head = String::from("| Operation |");
    let mut rule = String::from("|---|");
    for a in &algs {
        let _ = write!(head, " {} µs |", alg_label(a));
        rule.push_str("---|");
    }
    if both {
        head.push_str(" RSA-2048 / Ed25519 |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    for op in SigOp::ALL {
        let mut line = format!("| {} |", op.name());
        for a in &algs {
            let cell = sig(r, a, op).map_or_else(
                || "—".to_string(),
                |x| {
                    format!(
                        "**{}** (p90 {}, p99 {})",
                        us(x.median_us),
                        us(x.p90_us),
                        us(x.p99_us)
                    )
                },
            );
            let _ = write!(line, " {cell} |");
        }
        if both {
            let _ = write!(line, " {} |", fmt_ratio(rsa_over_ed25519(r, op)));
        }
        let _ = writeln!(out, "{line}");
    }
    let mut line = String::from("| message size |");
    for a in &algs {
        let b = r
            .c2_signatures
            .iter()
            .find(|x| x.alg == *a)
            .map_or_else(|| "—".to_string(), |x| format!("{} B", x.message_bytes));
        let _ = write!(line, " {b} |");
    }
    if both {
        line.push_str(" |");
    }
    let _ = writeln!(out, "{line}\n");
    let _ = writeln!(
        out,
        "| Algorithm | Operation | Median µs | Batch range µs | Ops/s (one core) | Timed |\n\
         |---|---|---|---|---|---|"
    );
    for x in &r.c2_signatures {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {} | {} |",
            alg_label(&x.alg),
            x.op.name(),
            us(x.median_us),
            us(x.range_us.0),
            us(x.range_us.1),
            count(x.ops_per_sec()),
            x.iterations
        );
    }
    out.push('\n');
}

fn section_fleet(out: &mut String, r: &Report) {
    let _ = writeln!(out, "### Commands through the broker to a fleet\n");
    let _ = writeln!(
        out,
        "A C2 server engine and simulated joined devices, each device on its own MQTT \
         connection (QoS 1) subscribed to its command topic. The server sends group commands \
         (one signed action per device, at most `window` group commands unanswered); each \
         device verifies (engine `handle`: topic, decode, key, signature, replay guard) and \
         responds with a signed response, which the server verifies and matches to its token. \
         Commands/s: commands delivered and accepted by the devices, from the first publish to \
         the last acceptance. Round trips/s: responses accounted by the server, from the first \
         publish to the last response. Plaintext: the same number of unsigned messages of the \
         same sizes on the same topics, the same connections, the devices replying with a \
         plaintext message of the response's size. State persistence is a no-op here (no \
         registry or device store writes). CPU: the bench process (server, devices; the broker \
         too when embedded) per command.\n"
    );
    let _ = writeln!(
        out,
        "| Broker | Algorithm | Devices × rounds (window) | Command / response | keav cmds/s | plaintext cmds/s | keav / plaintext | keav round trips/s | plaintext round trips/s | keav / plaintext | CPU µs/cmd keav / plaintext | Dropped |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in &r.c2_fleet {
        let cpu = |v: Option<f64>| v.map_or_else(|| "—".to_string(), us);
        let _ = writeln!(
            out,
            "| {} | {} | {} × {} ({}) | {} B / {} B | {} | {} | **{}** | {} | {} | **{}** | {} / {} | {} |",
            x.broker,
            alg_label(&x.alg),
            x.devices,
            x.rounds,
            x.window,
            x.command_bytes,
            x.response_bytes,
            count(x.keav_cmds_per_s),
            count(x.plain_cmds_per_s),
            fmt_ratio(x.cmd_ratio),
            count(x.keav_round_trips_per_s),
            count(x.plain_round_trips_per_s),
            fmt_ratio(x.round_trip_ratio),
            cpu(x.keav_cpu_us_per_cmd),
            cpu(x.plain_cpu_us_per_cmd),
            x.dropped
        );
    }
    let ed = r.c2_fleet.iter().find(|x| x.alg == "ed25519");
    let rsa = r.c2_fleet.iter().find(|x| x.alg == "rsa2048");
    if let (Some(e), Some(s)) = (ed, rsa) {
        let _ = writeln!(
            out,
            "\nRSA-2048 / Ed25519 through the broker: commands/s {}, round trips/s {}.",
            fmt_ratio(ratio(s.keav_cmds_per_s, e.keav_cmds_per_s)),
            fmt_ratio(ratio(s.keav_round_trips_per_s, e.keav_round_trips_per_s))
        );
    }
    out.push('\n');
}

/// Headline lines for the stdout summary.
pub(crate) fn summary_lines(r: &Report) -> Vec<String> {
    let mut v = Vec::new();
    for op in SigOp::ALL {
        let cells: Vec<String> = algs(r)
            .into_iter()
            .filter_map(|a| sig(r, a, op).map(|x| format!("{a} {} µs", us(x.median_us))))
            .collect();
        if cells.is_empty() {
            continue;
        }
        let mut line = format!("c2 {}: {}", op.name(), cells.join(", "));
        if let Some(q) = rsa_over_ed25519(r, op) {
            let _ = write!(line, " (rsa/ed25519 {q:.1}×)");
        }
        v.push(line);
    }
    for x in &r.c2_fleet {
        v.push(format!(
            "c2 fleet {} {} × {}: {} cmds/s ({} plaintext), {} round trips/s ({} plaintext)",
            x.alg,
            x.devices,
            x.rounds,
            count(x.keav_cmds_per_s),
            fmt_ratio(x.cmd_ratio),
            count(x.keav_round_trips_per_s),
            fmt_ratio(x.round_trip_ratio)
        ));
    }
    v
}

// ---------------------------------------------------------------------------------------
// Plot
// ---------------------------------------------------------------------------------------

/// The font family plots.rs registers before any plot is drawn.
const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1100, 900);
const ALG_COLORS: [RGBColor; 2] = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e)];
const KEAV_COLOR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const PLAIN_COLOR: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// One panel of vertical grouped bars: `categories` along x, one bar per series in each.
/// `log`: the y axis shows log10 of the values (for values spanning decades).
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, RGBColor, Vec<Option<f64>>)],
    log: bool,
) -> Result<(), String> {
    let n = categories.len();
    if n == 0 || series.is_empty() {
        return Err("no data".into());
    }
    let tr = |v: f64| if log { v.max(1e-3).log10() } else { v };
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(tr(v)), hi.max(tr(v)))
        });
    if !hi.is_finite() {
        return Err("no positive values to plot".into());
    }
    let (y_lo, y_hi) = if log {
        ((lo - 0.5).floor(), hi + 0.6)
    } else {
        (0.0, hi * 1.15)
    };
    let cats = categories.to_vec();
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), y_lo..y_hi)
        .map_err(err)?;
    let x_fmt = move |v: &f64| {
        let i = v.round();
        if (v - i).abs() > 0.01 || i < 0.0 {
            return String::new();
        }
        cats.get(i as usize).cloned().unwrap_or_default()
    };
    let y_fmt = move |v: &f64| {
        if log {
            if (v - v.round()).abs() > 0.01 {
                return String::new();
            }
            let x = 10f64.powf(v.round());
            if x >= 1e3 {
                format!("{:.0}k", x / 1e3)
            } else if x >= 1.0 {
                format!("{x:.0}")
            } else {
                format!("{x}")
            }
        } else {
            format!("{v:.0}")
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    let k = series.len() as f64;
    let band = 0.8;
    // Value labels sit on top of their bar (anchored at their bottom-left corner).
    let label_style =
        TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom));
    for (si, (name, color, values)) in series.iter().enumerate() {
        let c = *color;
        let mut rects = Vec::new();
        let mut labels = Vec::new();
        for (ci, v) in values.iter().enumerate() {
            let Some(v) = *v else { continue };
            if !v.is_finite() || v <= 0.0 {
                continue;
            }
            let left = ci as f64 - band / 2.0 + band / k * si as f64;
            let right = left + band / k * 0.9;
            rects.push(Rectangle::new([(left, y_lo), (right, tr(v))], c.filled()));
            let text = if v >= 100.0 {
                format!("{v:.0}")
            } else if v >= 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            };
            let top = tr(v) + (y_hi - y_lo) * 0.005;
            labels.push(Text::new(text, (left, top), label_style.clone()));
        }
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
        chart.draw_series(labels).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// `c2.png`: µs per operation per algorithm (log scale) above commands and round trips per
/// second, keav beside plaintext.
pub(crate) fn plot(r: &Report, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels: Vec<_> = if r.c2_signatures.is_empty() || r.c2_fleet.is_empty() {
        vec![root.clone()]
    } else {
        let (a, b) = root.split_vertically(SIZE.1 / 2);
        vec![a, b]
    };
    let mut next = panels.iter();
    if !r.c2_signatures.is_empty() {
        let area = next.next().ok_or("no panel")?;
        let cats: Vec<String> = SigOp::ALL.iter().map(|o| o.name().to_string()).collect();
        let series: Vec<(String, RGBColor, Vec<Option<f64>>)> = algs(r)
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let v = SigOp::ALL
                    .iter()
                    .map(|op| sig(r, a, *op).map(|x| x.median_us))
                    .collect();
                (
                    alg_label(a).to_string(),
                    ALG_COLORS[i % ALG_COLORS.len()],
                    v,
                )
            })
            .collect();
        bars(
            area,
            "C2 signature cost per command (median µs, one core)",
            "µs per operation (log scale)",
            &cats,
            &series,
            true,
        )?;
    }
    if !r.c2_fleet.is_empty() {
        let area = next.next().ok_or("no panel")?;
        let mut cats = Vec::new();
        let (mut keav, mut plain) = (Vec::new(), Vec::new());
        for x in &r.c2_fleet {
            let a = match x.alg.as_str() {
                "rsa2048" => "RSA-2048",
                "ed25519" => "Ed25519",
                o => o,
            };
            cats.push(format!("{a} commands/s"));
            keav.push(Some(x.keav_cmds_per_s));
            plain.push(Some(x.plain_cmds_per_s));
            cats.push(format!("{a} round trips/s"));
            keav.push(Some(x.keav_round_trips_per_s));
            plain.push(Some(x.plain_round_trips_per_s));
        }
        let devices = r.c2_fleet.first().map_or(0, |x| x.devices);
        let series = vec![
            ("keav C2 (signed, verified)".to_string(), KEAV_COLOR, keav),
            ("plaintext (same sizes)".to_string(), PLAIN_COLOR, plain),
        ];
        bars(
            area,
            &format!("C2 commands through the broker to {devices} devices"),
            "per second",
            &cats,
            &series,
            false,
        )?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig_row(alg: &str, op: SigOp, us: f64) -> SigRow {
        SigRow {
            alg: alg.into(),
            op,
            median_us: us,
            p90_us: us * 1.1,
            p99_us: us * 1.5,
            range_us: (us * 0.9, us * 1.2),
            iterations: 100,
            message_bytes: if alg == "ed25519" { 140 } else { 332 },
        }
    }

    pub(crate) fn fixed() -> Report {
        let mut r = Report::default();
        for (alg, s, v, d) in [("ed25519", 20.0, 45.0, 0.5), ("rsa2048", 1500.0, 90.0, 0.6)] {
            r.c2_signatures.push(sig_row(alg, SigOp::Sign, s));
            r.c2_signatures.push(sig_row(alg, SigOp::Verify, v));
            r.c2_signatures.push(sig_row(alg, SigOp::Decode, d));
        }
        let setup = |alg: &str| FleetSetup {
            broker: "MQTT 127.0.0.1:1883".into(),
            alg: alg.into(),
            devices: 200,
            rounds: 20,
            window: 4,
            command_bytes: 140,
            response_bytes: 120,
        };
        let plain = FleetRun {
            delivered: 4000,
            answered: 4000,
            delivered_in: Duration::from_millis(400),
            answered_in: Duration::from_millis(500),
            cpu: Some(Duration::from_millis(200)),
        };
        let keav = FleetRun {
            delivered: 4000,
            answered: 4000,
            delivered_in: Duration::from_secs(1),
            answered_in: Duration::from_secs(2),
            cpu: Some(Duration::from_millis(800)),
        };
        r.c2_fleet
            .push(FleetRow::new(&setup("ed25519"), &keav, &plain, 0));
        let slow = FleetRun {
            delivered_in: Duration::from_secs(8),
            answered_in: Duration::from_secs(10),
            ..keav
        };
        r.c2_fleet
            .push(FleetRow::new(&setup("rsa2048"), &slow, &plain, 1));
        r
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 90.0), 90.0);
        assert_eq!(percentile_sorted(&v, 99.0), 99.0);
        assert_eq!(percentile_sorted(&v, 100.0), 100.0);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert_eq!(percentile_sorted(&[7.0], 99.0), 7.0);
        assert_eq!(percentile_sorted(&[], 50.0), 0.0);
        let five = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile_sorted(&five, 50.0), 3.0);
        assert_eq!(percentile_sorted(&five, 90.0), 5.0);
    }

    #[test]
    fn sig_rows_from_batches() {
        // Batch medians 2, 10, 4 → median 4, range (2, 10); p90 over the 9 samples: the 9th.
        let batches = vec![
            vec![1.0, 2.0, 3.0],
            vec![10.0, 10.0, 50.0],
            vec![4.0, 4.0, 4.0],
        ];
        let r = SigRow::from_batches("ed25519", SigOp::Verify, &batches, 140).unwrap();
        assert_eq!(r.median_us, 4.0);
        assert_eq!(r.range_us, (2.0, 10.0));
        assert_eq!(r.p90_us, 50.0);
        assert_eq!(r.p99_us, 50.0);
        assert_eq!(r.iterations, 9);
        assert_eq!(r.message_bytes, 140);
        assert_eq!(r.ops_per_sec(), 250_000.0);
        assert!(SigRow::from_batches("x", SigOp::Sign, &[vec![]], 1).is_none());
        assert!(SigRow::from_batches("x", SigOp::Sign, &[], 1).is_none());
    }

    #[test]
    fn fleet_rows_compute_rates_ratios_and_cpu() {
        let r = fixed();
        let e = &r.c2_fleet[0];
        assert_eq!(e.keav_cmds_per_s, 4000.0);
        assert_eq!(e.keav_round_trips_per_s, 2000.0);
        assert_eq!(e.plain_cmds_per_s, 10_000.0);
        assert_eq!(e.plain_round_trips_per_s, 8000.0);
        assert!((e.cmd_ratio.unwrap() - 0.4).abs() < 1e-12);
        assert!((e.round_trip_ratio.unwrap() - 0.25).abs() < 1e-12);
        assert!((e.keav_cpu_us_per_cmd.unwrap() - 200.0).abs() < 1e-9);
        assert!((e.plain_cpu_us_per_cmd.unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(e.keav_secs, 2.0);
        // A plaintext phase that measured nothing gives no ratio, not infinity.
        let none = FleetRow::new(
            &FleetSetup {
                broker: "b".into(),
                alg: "ed25519".into(),
                devices: 1,
                rounds: 1,
                window: 1,
                command_bytes: 1,
                response_bytes: 1,
            },
            &FleetRun::default(),
            &FleetRun::default(),
            0,
        );
        assert_eq!((none.cmd_ratio, none.round_trip_ratio), (None, None));
        assert_eq!(none.keav_cpu_us_per_cmd, None);
        assert_eq!(per_sec(5, Duration::ZERO), 0.0);
    }

    #[test]
    fn section_renders_ratios() {
        let r = fixed();
        assert!((rsa_over_ed25519(&r, SigOp::Sign).unwrap() - 75.0).abs() < 1e-9);
        assert!((rsa_over_ed25519(&r, SigOp::Verify).unwrap() - 2.0).abs() < 1e-9);
        let mut md = String::new();
        section(&mut md, &r, &[PathBuf::from("/x/c2.png")]);
        assert!(
            md.contains("## C2 commands and signatures (issue 6)"),
            "{md}"
        );
        assert!(
            md.contains(
                "| sign | **20.0** (p90 22.0, p99 30.0) | **1500** (p90 1650, p99 2250) | 75.00× |"
            ),
            "{md}"
        );
        assert!(md.contains("| decode + verify | **45.0**"), "{md}");
        assert!(md.contains("| 2.00× |"), "{md}");
        assert!(md.contains("| message size | 140 B | 332 B | |"), "{md}");
        // Fleet: ed25519 4000 cmds/s vs 10000 plaintext → 0.40×; round trips 0.25×.
        assert!(
            md.contains("| MQTT 127.0.0.1:1883 | Ed25519 | 200 × 20 (4) | 140 B / 120 B | 4000 | 10000 | **0.40×** | 2000 | 8000 | **0.25×** | 200 / 50.0 | 0 |"),
            "{md}"
        );
        // RSA: 500 cmds/s, 400 round trips/s, beside Ed25519.
        assert!(md.contains("commands/s 0.12×, round trips/s 0.20×"), "{md}");
        assert!(md.contains("![C2 signature cost and commands per second](c2.png)"));
        let s = summary_lines(&r).join("\n");
        assert!(
            s.contains("c2 sign: ed25519 20.0 µs, rsa2048 1500 µs (rsa/ed25519 75.0×)"),
            "{s}"
        );
        assert!(
            s.contains("c2 fleet rsa2048 200 × 20: 500 cmds/s (0.05× plaintext), 400 round trips/s (0.05× plaintext)"),
            "{s}"
        );
        // Only one algorithm: no ratio column.
        let mut one = r.clone();
        one.c2_signatures.retain(|x| x.alg == "ed25519");
        one.c2_fleet.clear();
        let mut md = String::new();
        section(&mut md, &one, &[]);
        assert!(!md.contains("RSA-2048 / Ed25519"), "{md}");
        assert!(!md.contains("c2.png"));
        assert!(!md.contains("### Commands through the broker"));
    }

    #[test]
    fn whole_report_has_the_section_and_the_plot() {
        let r = fixed();
        let dir = tempfile::tempdir().unwrap();
        let files = r.write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## C2 commands and signatures"));
        let json = std::fs::read_to_string(dir.path().join("results.json")).unwrap();
        assert!(
            json.contains("\"c2_fleet\"") && json.contains("\"decode\""),
            "{json}"
        );
        let png = dir.path().join("c2.png");
        if files.contains(&png) {
            let b = std::fs::read(&png).unwrap();
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
            assert!(b.len() > 5000);
            assert!(md.contains("(c2.png)"));
            if let Ok(keep) = std::env::var("KEAV_BENCH_KEEP_PLOTS") {
                std::fs::copy(&png, Path::new(&keep).join("c2.png")).unwrap();
            }
        } else {
            // No font on this machine: the report says why.
            assert!(md.contains("c2.png:"), "{md}");
        }
    }
}
