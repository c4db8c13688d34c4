//! `report.md` and the stdout summary.
//!
//! Everything here is computed from the rows in [`Report`]; nothing is asserted. Rows of the
//! CPU, record and memory scenarios are matched by *substring* of their subject (the
//! scenarios name them, e.g. `keav dh+cpace`, `tls13 full (ed25519) + ocsp`,
//! `rustls aes-256-gcm`); the matching rules are in [`cpu_is_keav_dh_cpace`] and its
//! neighbours so that they are written down once.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::stats::{mean, std_dev};
use super::{BrokerRow, CpuRow, DrainRow, LatencySample, RecordRow, Report, Subject};
use crate::options::{LinkModel, Scenario};

// ---------------------------------------------------------------------------------------
// Latency aggregation (shared with the plots)
// ---------------------------------------------------------------------------------------

/// All samples of one session number of one subject over one link.
#[derive(Clone, Debug, Default)]
pub(crate) struct SessionStat {
    /// Session number (1-based).
    pub session: u32,
    /// What ran in the "with verification" series (distinct kinds joined with `/`).
    pub kind_with: String,
    /// What ran in the "without verification" series.
    pub kind_without: String,
    /// Latencies of the with series, ms.
    pub with: Vec<f64>,
    /// Latencies of the without series, ms.
    pub without: Vec<f64>,
    /// Per repetition: with − without, ms (only repetitions that have both).
    pub diffs: Vec<f64>,
    /// Round trips (flights / 2) of the with series.
    pub rt_with: Vec<f64>,
    /// Round trips of the without series.
    pub rt_without: Vec<f64>,
    /// Handshake bytes (both directions) of the with series.
    pub bytes_with: Vec<f64>,
}

/// Consecutive sessions whose "with" kind is the same, pooled.
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    /// First and last session of the range.
    pub first: u32,
    /// See `first`.
    pub last: u32,
    /// The sessions' stats.
    pub sessions: Vec<SessionStat>,
}

impl Group {
    /// `1`, `2-9`.
    pub fn label(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}-{}", self.first, self.last)
        }
    }
    fn pooled(&self, f: impl Fn(&SessionStat) -> &Vec<f64>) -> Vec<f64> {
        self.sessions
            .iter()
            .flat_map(|s| f(s).iter().copied())
            .collect()
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn join_distinct<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for k in it {
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen.join("/")
}

/// Links present in the latency samples, in first-seen order.
pub(crate) fn latency_links(r: &Report) -> Vec<LinkModel> {
    let mut out: Vec<LinkModel> = Vec::new();
    for s in &r.latency {
        if !out.contains(&s.link) {
            out.push(s.link);
        }
    }
    out
}

/// Per-session statistics of `subject` over `link`, sorted by session.
pub(crate) fn session_stats(r: &Report, link: LinkModel, subject: Subject) -> Vec<SessionStat> {
    let samples: Vec<&LatencySample> = r
        .latency
        .iter()
        .filter(|s| s.link == link && s.subject == subject)
        .collect();
    let sessions: BTreeSet<u32> = samples.iter().map(|s| s.session).collect();
    sessions
        .into_iter()
        .map(|n| {
            let of = |with: bool| -> Vec<&LatencySample> {
                samples
                    .iter()
                    .copied()
                    .filter(|s| s.session == n && s.with_verification == with)
                    .collect()
            };
            let (w, wo) = (of(true), of(false));
            let diffs = w
                .iter()
                .filter_map(|a| {
                    wo.iter()
                        .find(|b| b.rep == a.rep)
                        .map(|b| ms(a.latency_us) - ms(b.latency_us))
                })
                .collect();
            SessionStat {
                session: n,
                kind_with: join_distinct(w.iter().map(|s| s.kind.as_str())),
                kind_without: join_distinct(wo.iter().map(|s| s.kind.as_str())),
                with: w.iter().map(|s| ms(s.latency_us)).collect(),
                without: wo.iter().map(|s| ms(s.latency_us)).collect(),
                diffs,
                rt_with: w.iter().map(|s| f64::from(s.flights) / 2.0).collect(),
                rt_without: wo.iter().map(|s| f64::from(s.flights) / 2.0).collect(),
                bytes_with: w
                    .iter()
                    .map(|s| (s.bytes_c2s + s.bytes_s2c) as f64)
                    .collect(),
            }
        })
        .collect()
}

/// Groups consecutive sessions with the same "with" kind: 1, 2-9, 10.
pub(crate) fn group_sessions(stats: Vec<SessionStat>) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for s in stats {
        if let Some(g) = out.last_mut() {
            let same = g
                .sessions
                .last()
                .is_some_and(|p| p.kind_with == s.kind_with && p.session + 1 == s.session);
            if same {
                g.last = s.session;
                g.sessions.push(s);
                continue;
            }
        }
        out.push(Group {
            first: s.session,
            last: s.session,
            sessions: vec![s],
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Formatting helpers
// ---------------------------------------------------------------------------------------

/// `mean ± std` with a precision fitting the magnitude; `—` for no data.
fn pm(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "—".into();
    }
    let (m, s) = (mean(xs), std_dev(xs));
    format!("{} ± {}", num(m), num(s))
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn opt_mean(xs: &[f64]) -> String {
    if xs.is_empty() {
        "—".into()
    } else {
        num(mean(xs))
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "—".into(), |v| format!("{v:.2}×"))
}

// ---------------------------------------------------------------------------------------
// Row matching (substring rules, written down once)
// ---------------------------------------------------------------------------------------

fn lc(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// CPU row of keav's DH handshake with CPace: subject contains `keav` and `dh+cpace`.
pub(crate) fn cpu_is_keav_dh_cpace(subject: &str) -> bool {
    let s = lc(subject);
    s.contains("keav") && s.contains("dh+cpace")
}

/// CPU row of keav's preshared handshake: contains `keav` and `preshared`.
pub(crate) fn cpu_is_keav_preshared(subject: &str) -> bool {
    let s = lc(subject);
    s.contains("keav") && s.contains("preshared")
}

/// CPU row of the TLS full handshake with an OCSP staple: contains `tls`, `full`, `ocsp`.
pub(crate) fn cpu_is_tls_full_ocsp(subject: &str) -> bool {
    let s = lc(subject);
    s.contains("tls") && s.contains("full") && s.contains("ocsp")
}

/// CPU row of the TLS resumed handshake: contains `tls` and `resum`.
pub(crate) fn cpu_is_tls_resumed(subject: &str) -> bool {
    let s = lc(subject);
    s.contains("tls") && s.contains("resum")
}

fn cpu_total(r: &CpuRow) -> f64 {
    r.initiator_us + r.responder_us
}

fn find_cpu(r: &Report, pred: fn(&str) -> bool) -> Option<&CpuRow> {
    r.cpu.iter().find(|c| pred(&c.subject))
}

/// The AEAD part of a record subject: the second word, without any bracketed backend note
/// (`keav aes-256-gcm [ring]` → `aes-256-gcm`; `keav-ring aes-256-gcm` → `aes-256-gcm`).
fn record_aead(subject: &str) -> String {
    let rest = subject.split_once(' ').map_or("", |(_, a)| a);
    let aead = rest.split('[').next().unwrap_or("");
    lc(aead.trim())
}

fn record_is_keav(subject: &str) -> bool {
    lc(subject).starts_with("keav")
}

/// The rustls record row with the same AEAD and size as `k`.
fn rustls_peer<'a>(r: &'a Report, k: &RecordRow) -> Option<&'a RecordRow> {
    let aead = record_aead(&k.subject);
    r.records.iter().find(|x| {
        x.size == k.size && lc(&x.subject).starts_with("rustls") && record_aead(&x.subject) == aead
    })
}

/// The snow record row of the same size (same AEAD if there is one, else any).
fn snow_peer<'a>(r: &'a Report, k: &RecordRow) -> Option<&'a RecordRow> {
    let aead = record_aead(&k.subject);
    let snow = |x: &&RecordRow| x.size == k.size && lc(&x.subject).starts_with("snow");
    r.records
        .iter()
        .filter(snow)
        .find(|x| record_aead(&x.subject) == aead)
        .or_else(|| r.records.iter().find(snow))
}

// ---------------------------------------------------------------------------------------
// Goals
// ---------------------------------------------------------------------------------------

/// Whether a goal was met by the measurements of this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The data satisfy the goal.
    Met,
    /// The data do not.
    Missed,
    /// The run has no data for it.
    NotMeasured,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotMeasured => "not measured",
        }
    }
    fn from_bool(ok: bool) -> Verdict {
        if ok {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }
}

/// One goal, what was measured and the verdict.
#[derive(Clone, Debug)]
pub(crate) struct Goal {
    /// The goal in words.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Met or not.
    pub verdict: Verdict,
}

fn not_measured(goal: &str, why: &str) -> Goal {
    Goal {
        goal: goal.into(),
        measured: why.into(),
        verdict: Verdict::NotMeasured,
    }
}

/// The 70 ms link of the latency goals (the patent's path): one-way 70 ms, no jitter
/// preferred, else 70 ms with jitter.
fn link70(r: &Report) -> Option<LinkModel> {
    let links = latency_links(r);
    let seventy = std::time::Duration::from_millis(70);
    links
        .iter()
        .find(|l| **l == LinkModel::INTERNET)
        .or_else(|| links.iter().find(|l| l.one_way == seventy))
        .copied()
}

/// Computes every goal from the data.
pub(crate) fn goals(r: &Report) -> Vec<Goal> {
    let mut out = Vec::new();

    // 1. CPU of keav DH + CPace (initiator + responder) ≤ 1.0 × TLS full + OCSP.
    const G1: &str = "DH + CPace handshake CPU ≤ 1.0× rustls full handshake (+ OCSP)";
    out.push(
        match (
            find_cpu(r, cpu_is_keav_dh_cpace),
            find_cpu(r, cpu_is_tls_full_ocsp),
        ) {
            (Some(k), Some(t)) => match ratio(cpu_total(k), cpu_total(t)) {
                Some(x) => Goal {
                    goal: G1.into(),
                    // Three decimals: a ratio that rounds to 1.00 can still miss.
                    measured: format!(
                        "{x:.3}× ({} µs vs {} µs, both sides)",
                        num(cpu_total(k)),
                        num(cpu_total(t))
                    ),
                    verdict: Verdict::from_bool(x <= 1.0),
                },
                None => not_measured(G1, "TLS CPU is zero"),
            },
            _ => not_measured(G1, "no CPU rows for keav dh+cpace and TLS full + OCSP"),
        },
    );

    // 2. keav preshared ≤ 0.1 × TLS resumed.
    const G2: &str = "preshared handshake CPU ≤ 0.1× rustls resumed handshake";
    out.push(
        match (
            find_cpu(r, cpu_is_keav_preshared),
            find_cpu(r, cpu_is_tls_resumed),
        ) {
            (Some(k), Some(t)) => match ratio(cpu_total(k), cpu_total(t)) {
                Some(x) => Goal {
                    goal: G2.into(),
                    measured: format!(
                        "{x:.2}× ({} µs vs {} µs, both sides)",
                        num(cpu_total(k)),
                        num(cpu_total(t))
                    ),
                    verdict: Verdict::from_bool(x <= 0.1),
                },
                None => not_measured(G2, "TLS CPU is zero"),
            },
            _ => not_measured(G2, "no CPU rows for keav preshared and TLS resumed"),
        },
    );

    // 3. 70 ms link: normal sessions 2-9 (with series) need no more round trips than TLS
    //    resumption (mean per session vs the mean of resumed TLS sessions).
    const G3: &str = "70 ms link: `normal` sessions 2–9 need ≤ round trips of TLS 1.3 resumption";
    out.push(match link70(r) {
        None => not_measured(G3, "no latency samples over a 70 ms link"),
        Some(link) => {
            let keav: Vec<SessionStat> = session_stats(r, link, Subject::KeavNormal)
                .into_iter()
                .filter(|s| (2..=9).contains(&s.session) && !s.rt_with.is_empty())
                .collect();
            let tls: Vec<f64> = r
                .latency
                .iter()
                .filter(|s| s.link == link && s.subject == Subject::TlsResumed)
                .filter(|s| s.kind == "resumed")
                .map(|s| f64::from(s.flights) / 2.0)
                .collect();
            if keav.is_empty() || tls.is_empty() {
                not_measured(G3, "no normal sessions 2–9 or no resumed TLS samples")
            } else {
                let worst = keav
                    .iter()
                    .map(|s| mean(&s.rt_with))
                    .fold(f64::NEG_INFINITY, f64::max);
                let t = mean(&tls);
                Goal {
                    goal: G3.into(),
                    measured: format!(
                        "keav at most {worst:.1} RTT (sessions {}–{}), TLS resumed {t:.1} RTT",
                        keav.first().map_or(0, |s| s.session),
                        keav.last().map_or(0, |s| s.session)
                    ),
                    verdict: Verdict::from_bool(worst <= t + 1e-9),
                }
            }
        }
    });

    // 4. 70 ms link: the verification step adds at most one round trip: for every keav
    //    session whose with series ran an equality test (kind mentions cpace or smp),
    //    mean RT(with) − mean RT(without).
    const G4: &str = "70 ms link: the verification step adds ≤ 1 round trip";
    out.push(match link70(r) {
        None => not_measured(G4, "no latency samples over a 70 ms link"),
        Some(link) => {
            let mut worst: Option<(f64, Subject, u32)> = None;
            for subj in Subject::KEAV {
                for s in session_stats(r, link, subj) {
                    let verified = s.kind_with.contains("cpace") || s.kind_with.contains("smp");
                    if !verified || s.rt_with.is_empty() || s.rt_without.is_empty() {
                        continue;
                    }
                    let d = mean(&s.rt_with) - mean(&s.rt_without);
                    if worst.is_none_or(|(w, _, _)| d > w) {
                        worst = Some((d, subj, s.session));
                    }
                }
            }
            match worst {
                None => not_measured(G4, "no verified sessions with a without-verification twin"),
                Some((d, subj, n)) => Goal {
                    goal: G4.into(),
                    measured: format!("at most +{d:.1} RTT ({}, session {n})", subj.name()),
                    verdict: Verdict::from_bool(d <= 1.0 + 1e-9),
                },
            }
        }
    });

    // 5. 64-byte records: keav ns ≤ rustls ns with the same AEAD, for every such pair.
    const G5: &str = "64-byte records at least as fast as rustls (same AEAD)";
    let pairs: Vec<(&RecordRow, &RecordRow)> = r
        .records
        .iter()
        .filter(|k| k.size == 64 && record_is_keav(&k.subject))
        .filter_map(|k| rustls_peer(r, k).map(|t| (k, t)))
        .collect();
    out.push(if pairs.is_empty() {
        not_measured(G5, "no 64-byte keav/rustls pair with the same AEAD")
    } else {
        let mut parts = Vec::new();
        let mut ok = true;
        for (k, t) in &pairs {
            let x = ratio(k.ns_median, t.ns_median).unwrap_or(f64::INFINITY);
            ok &= x <= 1.0;
            parts.push(format!(
                "{}: {} vs {} ns ({x:.2}×)",
                record_aead(&k.subject),
                num(k.ns_median),
                num(t.ns_median)
            ));
        }
        Goal {
            goal: G5.into(),
            measured: parts.join("; "),
            verdict: Verdict::from_bool(ok),
        }
    });

    // 6. Memory per idle session: the keav row measured idle (compacted) if there is one,
    //    else the first keav row whose subject mentions `session`, else the first keav row.
    const G6: &str = "≤ 1 KiB of memory per idle established session";
    let keav_rows = || {
        r.memory
            .iter()
            .filter(|m| lc(&m.subject).starts_with("keav"))
    };
    let keav_mem = keav_rows()
        .find(|m| lc(&m.subject).contains("idle"))
        .or_else(|| keav_rows().find(|m| lc(&m.subject).contains("session")))
        .or_else(|| r.memory.iter().find(|m| lc(&m.subject).starts_with("keav")));
    out.push(match keav_mem {
        None => not_measured(G6, "no keav memory row"),
        Some(m) => Goal {
            goal: G6.into(),
            measured: format!(
                "{:.0} B per session ({}, {} sessions)",
                m.bytes_per_session, m.subject, m.sessions
            ),
            verdict: Verdict::from_bool(m.bytes_per_session <= 1024.0),
        },
    });

    // 7. Per broker: keav end-to-end messages/s (the live channel: the same delivery as the
    //    plain clients, plus encryption) ≥ 0.9× plain clients on the same broker, at every
    //    measured size.
    out.extend(broker_goals(r));
    out
}

/// keav live / plaintext messages per second the broker goal asks for, at least.
pub(crate) const BROKER_GOAL_RATIO: f64 = 0.9;

/// Brokers of the broker rows, in first-seen order.
pub(crate) fn brokers(r: &Report) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for b in r.broker.iter().map(|x| x.broker.as_str()) {
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// `64 B`, `1 KiB`.
pub(crate) fn size_label(size: usize) -> String {
    if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// A rate as a whole number.
fn count(x: f64) -> String {
    format!("{:.0}", x.max(0.0))
}

fn broker_goal_text(broker: &str) -> String {
    format!("{broker}: end-to-end encrypted messages/s ≥ {BROKER_GOAL_RATIO}× plaintext")
}

/// What one row says toward its broker's goal, and whether it meets it (`None`: no
/// verdict, the live run or the plaintext rate is missing).
fn broker_goal_part(x: &BrokerRow) -> (String, Option<bool>) {
    let size = size_label(x.size);
    let durable = format!("durable {}", fmt_ratio(x.ratio));
    let mut lost = Vec::new();
    if let Some(l) = x.live_lost.filter(|l| *l > 0) {
        lost.push(format!("keav live lost {l}"));
    }
    if x.plain_lost > 0 {
        lost.push(format!("plaintext lost {}", x.plain_lost));
    }
    let lost = lost.iter().map(|l| format!(", {l}")).collect::<String>();
    let single = x
        .live_single_ratio
        .map(|s| format!("; a broker message per record: {s:.2}×"))
        .unwrap_or_default();
    match (x.live_msgs_per_s, x.live_ratio) {
        (Some(live), Some(q)) => (
            format!(
                "{size}: live {q:.2}× ({} vs {} msg/s{lost}{single}), {durable}",
                count(live),
                count(x.plain_msgs_per_s)
            ),
            Some(q >= BROKER_GOAL_RATIO),
        ),
        (None, _) => (format!("{size}: keav live not measured, {durable}"), None),
        (Some(_), None) => (format!("{size}: no plaintext rate"), None),
    }
}

/// One goal per measured broker, on the live channel's ratio; NATS not measured when the run
/// had no `--nats`.
fn broker_goals(r: &Report) -> Vec<Goal> {
    let mut out = Vec::new();
    for b in brokers(r) {
        let rows: Vec<&BrokerRow> = r.broker.iter().filter(|x| x.broker == b).collect();
        let mut parts = Vec::new();
        let mut verdict = Verdict::Met;
        for x in &rows {
            let (part, met) = broker_goal_part(x);
            parts.push(part);
            match met {
                Some(true) => {}
                Some(false) => verdict = Verdict::Missed,
                None if verdict == Verdict::Met => verdict = Verdict::NotMeasured,
                None => {}
            }
        }
        out.push(Goal {
            goal: broker_goal_text(b),
            measured: parts.join("; "),
            verdict,
        });
    }
    let broker_run = r.options.as_ref().filter(|o| o.has(Scenario::Broker));
    if broker_run.is_some_and(|o| o.nats.is_none()) {
        out.push(not_measured(
            &broker_goal_text("NATS"),
            "no --nats HOST:PORT given",
        ));
    }
    if out.is_empty() {
        out.push(not_measured(
            &broker_goal_text("brokers"),
            "no broker measurements",
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------

fn png_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn embed(out: &mut String, plots: &[PathBuf], prefix: &str, alt: &str) {
    for p in plots {
        let n = png_name(p);
        if n.starts_with(prefix) {
            let _ = writeln!(out, "![{alt}]({n})\n");
        }
    }
}

fn section_meta(out: &mut String, r: &Report) {
    let m = &r.meta;
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Date (UTC) | {} |", m.started);
    let _ = writeln!(out, "| Duration | {:.1} s |", m.elapsed_secs);
    let _ = writeln!(out, "| Machine | {} ({} logical CPUs) |", m.cpu, m.cpus);
    let _ = writeln!(out, "| Kernel | {} |", m.kernel);
    let _ = writeln!(
        out,
        "| Build | keav {} ({}) |",
        m.version,
        if m.release_build {
            "release"
        } else {
            "debug — timings are not representative"
        }
    );
    let _ = writeln!(out, "| AEAD backend | {} |", m.aead_backend);
    let _ = writeln!(out, "| Command | `{}` |", m.command.replace('|', "\\|"));
    if let Some(o) = &r.options {
        let _ = writeln!(
            out,
            "| Options | reps {}, sessions {}, links {}, verify every {}, memory sessions {}{} |",
            o.reps,
            o.sessions,
            o.links
                .iter()
                .map(LinkModel::name)
                .collect::<Vec<_>>()
                .join(", "),
            o.verify_every,
            o.memory_sessions,
            if o.quick { ", quick" } else { "" }
        );
        if o.has(Scenario::Broker) {
            let _ = writeln!(
                out,
                "| Brokers | {} messages per measurement; MQTT {}; NATS {} |",
                o.broker_messages,
                o.mqtt.as_deref().unwrap_or("embedded rumqttd"),
                o.nats.as_deref().unwrap_or("not measured")
            );
        }
    }
    out.push('\n');
}

fn section_goals(out: &mut String, r: &Report) {
    let _ = writeln!(out, "## Goals\n");
    let _ = writeln!(
        out,
        "Reported, never asserted: the verdict is what this run's numbers say.\n"
    );
    let _ = writeln!(out, "| Goal | Measured | Verdict |\n|---|---|---|");
    for g in goals(r) {
        let _ = writeln!(
            out,
            "| {} | {} | **{}** |",
            g.goal,
            g.measured,
            g.verdict.text()
        );
    }
    out.push('\n');
}

fn peer_samples(r: &Report, link: LinkModel, subj: Subject) -> Vec<&LatencySample> {
    r.latency
        .iter()
        .filter(|s| s.link == link && s.subject == subj)
        .filter(|s| subj != Subject::TlsResumed || s.kind == "resumed")
        .collect()
}

/// Mean latency (ms) of a peer over a link (resumed TLS: resumed sessions only).
pub(crate) fn peer_mean_ms(r: &Report, link: LinkModel, subj: Subject) -> Option<f64> {
    let v: Vec<f64> = peer_samples(r, link, subj)
        .iter()
        .map(|s| ms(s.latency_us))
        .collect();
    (!v.is_empty()).then(|| mean(&v))
}

fn section_latency(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## Latency (the patent's table)\n");
    let _ = writeln!(
        out,
        "Client-side time from starting to connect until the channel is established. \
         \"Without verification\" is the same devices with the equality test (CPace/SMP, the \
         patent's \"MPC\") turned off; the verification step is the mean of the per-repetition \
         differences with − without. Round trips = one-way flights / 2.\n"
    );
    for link in latency_links(r) {
        let _ = writeln!(out, "### Link {} (RTT {} ms)\n", link.name(), {
            let rtt = link.rtt().as_secs_f64() * 1000.0;
            num(rtt)
        });
        let _ = writeln!(
            out,
            "| Mode | Sessions | What ran | Without verification (ms) | Verification step (ms) | \
             With verification / total (ms) | Round trips with / without |\n\
             |---|---|---|---|---|---|---|"
        );
        for subj in Subject::KEAV {
            for g in group_sessions(session_stats(r, link, subj)) {
                let what = match g.sessions.first() {
                    Some(s) if s.kind_without.is_empty() || s.kind_without == s.kind_with => {
                        s.kind_with.clone()
                    }
                    Some(s) => format!("{} (without: {})", s.kind_with, s.kind_without),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} / {} |",
                    subj.name(),
                    g.label(),
                    what,
                    pm(&g.pooled(|s| &s.without)),
                    pm(&g.pooled(|s| &s.diffs)),
                    pm(&g.pooled(|s| &s.with)),
                    opt_mean(&g.pooled(|s| &s.rt_with)),
                    opt_mean(&g.pooled(|s| &s.rt_without)),
                );
            }
        }
        out.push('\n');

        let peers: Vec<(Subject, Vec<&LatencySample>)> = Subject::PEERS
            .into_iter()
            .map(|p| (p, peer_samples(r, link, p)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        if !peers.is_empty() {
            let _ = writeln!(
                out,
                "| Peer | Handshakes | Latency (ms) | Round trips | Bytes (both ways) |\n\
                 |---|---|---|---|---|"
            );
            for (p, v) in &peers {
                let lat: Vec<f64> = v.iter().map(|s| ms(s.latency_us)).collect();
                let rt: Vec<f64> = v.iter().map(|s| f64::from(s.flights) / 2.0).collect();
                let by: Vec<f64> = v
                    .iter()
                    .map(|s| (s.bytes_c2s + s.bytes_s2c) as f64)
                    .collect();
                let name = if *p == Subject::TlsResumed {
                    format!("{} (resumed sessions only)", p.name())
                } else {
                    p.name().to_string()
                };
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {:.0} |",
                    v.len(),
                    pm(&lat),
                    opt_mean(&rt),
                    mean(&by)
                );
            }
            out.push('\n');
        }

        // Ratio lines.
        let normal = session_stats(r, link, Subject::KeavNormal);
        let mut lines = Vec::new();
        if let (Some(s1), Some(t)) = (
            normal.iter().find(|s| s.session == 1 && !s.with.is_empty()),
            peer_mean_ms(r, link, Subject::TlsFullOcsp),
        ) {
            lines.push(format!(
                "keav normal session 1 / TLS full + OCSP: {}",
                fmt_ratio(ratio(mean(&s1.with), t))
            ));
        }
        let resumed: Vec<f64> = normal
            .iter()
            .filter(|s| s.kind_with.contains("preshared"))
            .flat_map(|s| s.with.iter().copied())
            .collect();
        if let (false, Some(t)) = (
            resumed.is_empty(),
            peer_mean_ms(r, link, Subject::TlsResumed),
        ) {
            lines.push(format!(
                "keav normal preshared sessions / TLS resumed: {}",
                fmt_ratio(ratio(mean(&resumed), t))
            ));
        }
        let dh_cpace: Vec<f64> = r
            .latency
            .iter()
            .filter(|s| s.link == link && s.subject.is_keav() && s.with_verification)
            .filter(|s| s.kind == "dh+cpace")
            .map(|s| ms(s.latency_us))
            .collect();
        if let (false, Some(t)) = (dh_cpace.is_empty(), peer_mean_ms(r, link, Subject::NoiseXx)) {
            lines.push(format!(
                "keav dh+cpace (any mode) / Noise XX: {}",
                fmt_ratio(ratio(mean(&dh_cpace), t))
            ));
        }
        for l in lines {
            let _ = writeln!(out, "- {l}");
        }
        out.push('\n');
        embed(
            out,
            plots,
            &format!("latency_{}", file_stem(&link)),
            &format!("latency over {}", link.name()),
        );

        // Per-session detail.
        let _ = writeln!(
            out,
            "<details><summary>Per-session detail ({})</summary>\n",
            link.name()
        );
        let _ = writeln!(
            out,
            "| Mode | Session | What ran (with / without) | n | Without (ms) | With (ms) | \
             With − without (ms) | RTT with / without | Bytes (with) |\n|---|---|---|---|---|---|---|---|---|"
        );
        for subj in Subject::KEAV {
            for s in session_stats(r, link, subj) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} / {} | {} | {} | {} | {} | {} / {} | {} |",
                    subj.name(),
                    s.session,
                    or_dash(&s.kind_with),
                    or_dash(&s.kind_without),
                    s.with.len().max(s.without.len()),
                    pm(&s.without),
                    pm(&s.with),
                    pm(&s.diffs),
                    opt_mean(&s.rt_with),
                    opt_mean(&s.rt_without),
                    opt_mean(&s.bytes_with)
                );
            }
        }
        let _ = writeln!(out, "\n</details>\n");
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "—"
    } else {
        s
    }
}

/// File-name part of a link model: `70ms`, `70ms_5ms`, `1_5ms`.
pub(crate) fn file_stem(link: &LinkModel) -> String {
    link.name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn section_cpu(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## CPU per handshake\n");
    let _ = writeln!(
        out,
        "Both sides of one handshake in one thread, in memory (no I/O, no storage); medians \
         over batches.\n"
    );
    let full = find_cpu(r, cpu_is_tls_full_ocsp).map(cpu_total);
    let resumed = find_cpu(r, cpu_is_tls_resumed).map(cpu_total);
    let _ = writeln!(
        out,
        "| Handshake | Initiator (µs) | Responder (µs) | Total (µs) | Range of total (µs) | \
         Iterations | × TLS full + OCSP | × TLS resumed | Server handshakes/s (1 core) |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.cpu {
        let t = cpu_total(c);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {}–{} | {} | {} | {} | {:.0} |",
            c.subject,
            num(c.initiator_us),
            num(c.responder_us),
            num(t),
            num(c.total_range_us.0),
            num(c.total_range_us.1),
            c.iterations,
            fmt_ratio(full.and_then(|f| ratio(t, f))),
            fmt_ratio(resumed.and_then(|f| ratio(t, f))),
            c.server_hs_per_sec
        );
    }
    out.push('\n');
    embed(out, plots, "cpu", "CPU per handshake");
}

fn section_records(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## Records (seal + open)\n");
    let _ = writeln!(
        out,
        "| Subject | Payload (B) | ns per record (median) | Range (ns) | MB/s | Wire bytes | \
         keav / rustls (same AEAD) | keav / snow |\n|---|---|---|---|---|---|---|---|"
    );
    for x in &r.records {
        let (vr, vs) = if record_is_keav(&x.subject) {
            (
                fmt_ratio(rustls_peer(r, x).and_then(|t| ratio(x.ns_median, t.ns_median))),
                fmt_ratio(snow_peer(r, x).and_then(|t| ratio(x.ns_median, t.ns_median))),
            )
        } else {
            ("".into(), "".into())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {:.1} | {} | {vr} | {vs} |",
            x.subject,
            x.size,
            num(x.ns_median),
            num(x.ns_range.0),
            num(x.ns_range.1),
            x.mb_per_s,
            x.wire_bytes
        );
    }
    out.push('\n');
    embed(out, plots, "records", "records");
}

fn section_throughput(out: &mut String, r: &Report) {
    let _ = writeln!(out, "## Throughput (one stream, loopback TCP)\n");
    let _ = writeln!(
        out,
        "| Subject | MB/s (median) | Range (MB/s) | Bytes per run | Runs |\n|---|---|---|---|---|"
    );
    for t in &r.throughput {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1}–{:.1} | {} | {} |",
            t.subject, t.mb_per_s, t.range.0, t.range.1, t.bytes, t.runs
        );
    }
    out.push('\n');
}

fn section_memory(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## Memory per idle session\n");
    let _ = writeln!(
        out,
        "| Subject | What one session holds | Sessions | RSS before (KiB) | RSS after (KiB) | \
         Bytes per session |\n|---|---|---|---|---|---|"
    );
    for m in &r.memory {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} |",
            m.subject, m.what, m.sessions, m.rss_before_kib, m.rss_after_kib, m.bytes_per_session
        );
    }
    out.push('\n');
    embed(out, plots, "memory", "memory per session");
}

fn section_wire(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(out, "## Bytes on the wire per handshake\n");
    let _ = writeln!(
        out,
        "Protocol messages as sent (no IP/TCP headers).\n\n\
         | Subject | What ran | Initiator msgs | Initiator bytes | Responder msgs | \
         Responder bytes | Total bytes | Flights | Round trips |\n|---|---|---|---|---|---|---|---|---|"
    );
    for w in &r.wire {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w.subject,
            w.kind,
            w.initiator_messages,
            w.initiator_bytes,
            w.responder_messages,
            w.responder_bytes,
            w.initiator_bytes + w.responder_bytes,
            w.flights,
            num(f64::from(w.flights) / 2.0)
        );
    }
    out.push('\n');
    embed(out, plots, "wire", "bytes on the wire");
}

fn section_broker(out: &mut String, r: &Report, plots: &[PathBuf]) {
    let _ = writeln!(
        out,
        "## Messages through brokers (end to end vs plaintext)\n"
    );
    let _ = writeln!(
        out,
        "Plaintext: plain clients of the broker (MQTT: rumqttc, QoS 1; NATS: async-nats core \
         publish) publish the messages to a subscriber as fast as the client takes them; \
         timed from the first publish to the last message received. **keav live**: two \
         devices paired over the same broker (a KEAV session over the broker link) send the \
         same messages as records of the live channel, through the same clients with the same \
         QoS, as fast as the link takes them; the receiver checks every body and its order; \
         timed from the first `send` to the last message received — only the encryption \
         differs, and that the sender coalesces records that pile up while its link \
         publishes into one broker message (keav's default); **a message per record**: the \
         same with coalescing off, one broker message per encrypted message. **keav durable**: two devices paired over the broker (durable messaging, \
         direct delivery, stores on disk); the sender `send`s every message (up to {} in \
         flight, each returning once committed), the receiver `recv`s them in order and `ack`s \
         every {}; timed from the first `send` to the last `recv` — every message committed \
         on both sides and acknowledged end to end, which the plain clients do not do. \
         \"keav durable paced\" is the same with flow control by the application: bursts of \
         {} messages, each acknowledged end to end (`flush`) before the next. One run each, \
         in the same process and run. Goal: keav live ≥ {}× plaintext.\n",
        crate::scenario::broker::SEND_WINDOW,
        crate::scenario::broker::ACK_EVERY,
        crate::scenario::broker::PACE_BURST,
        BROKER_GOAL_RATIO,
    );
    if !r.broker.is_empty() {
        let _ = writeln!(
            out,
            "| Broker | Size | Messages | Plaintext (msg/s) | keav live (msg/s) | live / plaintext \
             | keav live, a message per record (msg/s) | per record / plaintext \
             | keav durable (msg/s) | durable / plaintext | keav durable paced (msg/s) \
             | paced / plaintext |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for x in &r.broker {
            let _ = writeln!(out, "{}", broker_line(x));
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "<details><summary>Where keav's time goes</summary>\n\n\
             Process CPU: the whole bench process during the measurement (both devices; \
             the embedded broker too when it runs). Live lost: messages that never arrived; \
             live dropped: records the receiver dropped (its link's queue full, or failing to \
             open). Durable resent: payloads the sender transmitted again (no end-to-end ack \
             in time; the first resend waits 2 s, doubling). Deferred: payloads the receiver \
             could not take on arrival (beyond its reorder window, or its receive queue \
             full). From stash: of those, messages kept in the channel's early-arrival stash \
             and taken once the gap before them filled, with no resend. Dropped: payloads the \
             devices' links dropped (queue full). A broker may drop too (Mosquitto: \
             `max_queued_messages`, default 1000 per client).\n\n\
             | Broker | Size | Plaintext time (s) | Plaintext lost | Live time (s) | Live CPU (s) \
             | Live lost | Live dropped | Durable time (s) | Durable CPU (s) | Resent | Deferred \
             | From stash | Dropped |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for x in &r.broker {
            let _ = writeln!(out, "{}", broker_detail_line(x));
        }
        let _ = writeln!(out, "\n</details>\n");
    }
    for g in broker_goals(r) {
        let _ = writeln!(
            out,
            "- {}: **{}** — {}",
            g.goal,
            g.verdict.text(),
            g.measured
        );
    }
    out.push('\n');
    if !r.drain.is_empty() {
        let _ = writeln!(out, "### Mailbox drain after an offline period\n");
        let _ = writeln!(
            out,
            "A relay on the same broker (default settings) holds the messages sent while the \
             receiver was offline, for longer than the relay's presence window; timed from the \
             receiver's messenger start (broker connection already up) to its last `recv`.\n"
        );
        let _ = writeln!(
            out,
            "| Broker | Messages held | Size | Offline (s) | Drain (msg/s) | Drain time (s) | First message after (ms) |\n\
             |---|---|---|---|---|---|---|"
        );
        for d in &r.drain {
            let _ = writeln!(out, "{}", drain_line(d));
        }
        out.push('\n');
    }
    embed(out, plots, "broker", "messages per second through brokers");
}

/// `—` for a missing value.
fn dash_or<T>(x: Option<T>, f: impl FnOnce(T) -> String) -> String {
    x.map_or_else(|| "—".into(), f)
}

/// One row of the broker table.
fn broker_line(x: &BrokerRow) -> String {
    let paced = x.keav_paced_msgs_per_s;
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        x.broker,
        size_label(x.size),
        x.messages,
        count(x.plain_msgs_per_s),
        dash_or(x.live_msgs_per_s, count),
        fmt_ratio(x.live_ratio),
        dash_or(x.live_single_msgs_per_s, count),
        fmt_ratio(x.live_single_ratio),
        count(x.keav_msgs_per_s),
        fmt_ratio(x.ratio),
        dash_or(paced, count),
        fmt_ratio(paced.and_then(|p| ratio(p, x.plain_msgs_per_s)))
    )
}

/// One row of the broker details table.
fn broker_detail_line(x: &BrokerRow) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        x.broker,
        size_label(x.size),
        num(x.plain_secs),
        x.plain_lost,
        dash_or(x.live_secs, num),
        dash_or(x.live_cpu_secs, num),
        dash_or(x.live_lost, |v| v.to_string()),
        dash_or(x.live_dropped, |v| v.to_string()),
        num(x.keav_secs),
        dash_or(x.keav_cpu_secs, num),
        x.keav_resent,
        x.keav_deferred,
        x.keav_early,
        x.keav_link_dropped
    )
}

fn drain_line(d: &DrainRow) -> String {
    format!(
        "| {} | {} | {} | {:.0} | {} | {} | {} |",
        d.broker,
        d.held,
        size_label(d.size),
        d.offline_secs,
        count(d.drain_msgs_per_s),
        num(d.drain_secs),
        num(d.first_ms)
    )
}

const HOW_TO_READ: &str = "## How to read these numbers\n\n\
- CPU, record and throughput figures are **medians** over batches; the range next to each is \
  the fastest and slowest batch, so a wide range means a noisy machine, not a precise number.\n\
- Latency cells are mean ± sample standard deviation over the repetitions (the patent's \
  format). Over a delayed link they are dominated by round trips × RTT; CPU shows up mainly on \
  the 0 ms link.\n\
- Ratios compare rows **from the same run** on the same machine; compare ratios, not absolute \
  numbers, across machines.\n\
- The benchmark machine may be shared and small (2 cores): both ends of each handshake, the \
  link proxy and the peers compete for the same CPUs, so absolute timings carry noise of \
  several percent. Goals are reported, never asserted.\n\
- Broker rates are single runs of every message through a real broker on the same machine \
  (broker, both clients and, for keav, their stores share the CPUs and the disk); rerun before \
  reading much into a few percent.\n";

/// Renders the whole report.
pub fn render(r: &Report, plots: &[PathBuf], plot_errors: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# keav bench report\n");
    if let Some(why) = &r.partial {
        let _ = writeln!(
            out,
            "> **PARTIAL RESULTS** — the run did not finish: {why}. Everything below was \
             measured before it stopped; missing sections were not measured.\n"
        );
    }
    section_meta(&mut out, r);
    section_goals(&mut out, r);
    if !r.latency.is_empty() {
        section_latency(&mut out, r, plots);
    }
    if !r.cpu.is_empty() {
        section_cpu(&mut out, r, plots);
    }
    if !r.records.is_empty() {
        section_records(&mut out, r, plots);
    }
    if !r.throughput.is_empty() {
        section_throughput(&mut out, r);
    }
    if !r.memory.is_empty() {
        section_memory(&mut out, r, plots);
    }
    if !r.wire.is_empty() {
        section_wire(&mut out, r, plots);
    }
    if !r.broker.is_empty() || !r.drain.is_empty() {
        section_broker(&mut out, r, plots);
    }
    if super::c2::has_rows(r) {
        super::c2::section(&mut out, r, plots);
    }
    if !plot_errors.is_empty() {
        let _ = writeln!(out, "## Plots not drawn\n");
        for e in plot_errors {
            let _ = writeln!(out, "- {e}");
        }
        out.push('\n');
    }
    if !r.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
    }
    out.push_str(HOW_TO_READ);
    out
}

/// The stdout summary.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    if let Some(why) = &r.partial {
        let _ = writeln!(out, "PARTIAL: {why}");
    }
    let gs = goals(r);
    let w = gs.iter().map(|g| g.goal.chars().count()).max().unwrap_or(0);
    let _ = writeln!(out, "{:<w$}  {:<12}  measured", "goal", "verdict");
    for g in &gs {
        let _ = writeln!(
            out,
            "{:<w$}  {:<12}  {}",
            g.goal,
            g.verdict.text(),
            g.measured
        );
    }
    // Headline numbers.
    let mut head = Vec::new();
    if let Some(link) = link70(r).or_else(|| latency_links(r).first().copied()) {
        for g in group_sessions(session_stats(r, link, Subject::KeavNormal)) {
            let with = g.pooled(|s| &s.with);
            if !with.is_empty() {
                head.push(format!(
                    "latency {} keav normal {}: {} ms",
                    link.name(),
                    g.label(),
                    pm(&with)
                ));
            }
        }
        for p in Subject::PEERS {
            if let Some(m) = peer_mean_ms(r, link, p) {
                head.push(format!(
                    "latency {} {}: {} ms",
                    link.name(),
                    p.name(),
                    num(m)
                ));
            }
        }
    }
    for c in &r.cpu {
        head.push(format!(
            "cpu {}: {} µs (both sides)",
            c.subject,
            num(cpu_total(c))
        ));
    }
    let rec: Vec<&RecordRow> = r.records.iter().filter(|x| x.size == 64).collect();
    for x in rec {
        head.push(format!(
            "record 64 B {}: {} ns",
            x.subject,
            num(x.ns_median)
        ));
    }
    for t in &r.throughput {
        head.push(format!("throughput {}: {:.0} MB/s", t.subject, t.mb_per_s));
    }
    for m in &r.memory {
        head.push(format!(
            "memory {}: {:.0} B/session",
            m.subject, m.bytes_per_session
        ));
    }
    for x in &r.broker {
        head.push(format!(
            "broker {} {}: plaintext {} msg/s, keav live {} msg/s ({}; a message per record {} msg/s, {}), keav durable {} msg/s ({})",
            x.broker,
            size_label(x.size),
            count(x.plain_msgs_per_s),
            dash_or(x.live_msgs_per_s, count),
            fmt_ratio(x.live_ratio),
            dash_or(x.live_single_msgs_per_s, count),
            fmt_ratio(x.live_single_ratio),
            count(x.keav_msgs_per_s),
            fmt_ratio(x.ratio)
        ));
    }
    for d in &r.drain {
        head.push(format!(
            "drain {}: {} messages held, {} msg/s",
            d.broker,
            d.held,
            count(d.drain_msgs_per_s)
        ));
    }
    head.extend(super::c2::summary_lines(r));
    if !head.is_empty() {
        out.push('\n');
        for h in head {
            let _ = writeln!(out, "{h}");
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{MemoryRow, WireRow};

    /// A row whose live channel runs at `live` msg/s; the durable run at a quarter of that.
    pub(crate) fn broker_row(broker: &str, size: usize, live: f64, plain: f64) -> BrokerRow {
        let keav = live / 4.0;
        BrokerRow {
            live_msgs_per_s: Some(live),
            live_secs: Some(2000.0 / live),
            live_lost: Some(0),
            live_dropped: Some(0),
            live_cpu_secs: Some(0.125),
            live_ratio: Some(live / plain),
            live_single_msgs_per_s: Some(live * 0.75),
            live_single_ratio: Some(live * 0.75 / plain),
            broker: broker.into(),
            carrier: if broker.starts_with("NATS") {
                "nats"
            } else {
                "mqtt"
            }
            .into(),
            size,
            messages: 2000,
            keav_msgs_per_s: keav,
            keav_secs: 2000.0 / keav,
            keav_resent: 0,
            keav_deferred: 0,
            keav_early: 0,
            keav_link_dropped: 0,
            keav_cpu_secs: Some(0.25),
            keav_paced_msgs_per_s: Some(keav * 1.5),
            plain_msgs_per_s: plain,
            plain_secs: 2000.0 / plain,
            plain_lost: 0,
            ratio: Some(keav / plain),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sample(
        link: LinkModel,
        subject: Subject,
        session: u32,
        rep: u32,
        with: bool,
        kind: &str,
        ms_: f64,
        flights: u32,
    ) -> LatencySample {
        LatencySample {
            link,
            subject,
            session,
            rep,
            with_verification: with,
            kind: kind.into(),
            latency_us: (ms_ * 1000.0) as u64,
            flights,
            bytes_c2s: 300,
            bytes_s2c: 400,
        }
    }

    /// A synthetic report shaped like a real run: normal mode verifies on sessions 1 and 10.
    pub(crate) fn synthetic() -> Report {
        let l = LinkModel::INTERNET;
        let mut r = Report::default();
        r.meta.command = "keav bench --quick".into();
        for rep in 0..3u32 {
            let jitter = f64::from(rep);
            for s in 1..=10u32 {
                let verified = s == 1 || s == 10;
                let (kw, fw, kwo, fwo) = if verified {
                    ("dh+cpace", 6, "dh", 4)
                } else {
                    ("preshared", 2, "preshared", 2)
                };
                let base = if verified { 290.0 } else { 150.0 };
                r.latency.push(sample(
                    l,
                    Subject::KeavNormal,
                    s,
                    rep,
                    true,
                    kw,
                    base + 140.0 + jitter,
                    fw,
                ));
                r.latency.push(sample(
                    l,
                    Subject::KeavNormal,
                    s,
                    rep,
                    false,
                    kwo,
                    base + jitter * 2.0,
                    fwo,
                ));
                r.latency.push(sample(
                    l,
                    Subject::KeavParanoid,
                    s,
                    rep,
                    true,
                    "dh+cpace",
                    430.0,
                    6,
                ));
                r.latency.push(sample(
                    l,
                    Subject::KeavParanoid,
                    s,
                    rep,
                    false,
                    "dh",
                    290.0,
                    4,
                ));
                r.latency.push(sample(
                    l,
                    Subject::TlsResumed,
                    s,
                    rep,
                    true,
                    if s == 1 { "full" } else { "resumed" },
                    150.0,
                    if s == 1 { 4 } else { 2 },
                ));
            }
            r.latency.push(sample(
                l,
                Subject::TlsFullOcsp,
                1,
                rep,
                true,
                "full",
                300.0,
                4,
            ));
            r.latency
                .push(sample(l, Subject::NoiseXx, 1, rep, true, "xx", 290.0, 4));
        }
        r.cpu = vec![
            cpu("keav dh+cpace", 300.0, 310.0),
            cpu("keav preshared", 5.0, 5.0),
            cpu("tls13 full (ed25519) + ocsp", 400.0, 400.0),
            cpu("tls13 resumed", 150.0, 150.0),
        ];
        r.records = vec![
            rec("keav aes-256-gcm", 64, 100.0),
            rec("rustls aes-256-gcm", 64, 120.0),
            rec("snow chachapoly", 64, 200.0),
            rec("keav aes-256-gcm", 16384, 9000.0),
            rec("rustls aes-256-gcm", 16384, 9500.0),
        ];
        r.memory = vec![MemoryRow {
            subject: "keav session (record state, both directions)".into(),
            what: "two AEAD states and counters".into(),
            sessions: 1000,
            rss_before_kib: 1000,
            rss_after_kib: 1500,
            bytes_per_session: 512.0,
        }];
        r.wire = vec![WireRow {
            subject: "keav normal".into(),
            kind: "dh+cpace".into(),
            initiator_messages: 3,
            initiator_bytes: 400,
            responder_messages: 3,
            responder_bytes: 380,
            flights: 6,
        }];
        r.broker = vec![
            broker_row("MQTT 127.0.0.1:1883", 64, 9500.0, 10000.0),
            broker_row("MQTT 127.0.0.1:1883", 1024, 9000.0, 9500.0),
            broker_row("NATS 127.0.0.1:4222", 64, 40000.0, 42000.0),
            broker_row("NATS 127.0.0.1:4222", 1024, 30000.0, 31000.0),
        ];
        r.drain = vec![DrainRow {
            broker: "MQTT 127.0.0.1:1883".into(),
            carrier: "mqtt".into(),
            size: 64,
            held: 2000,
            offline_secs: 16.2,
            drain_msgs_per_s: 5000.0,
            drain_secs: 0.4,
            first_ms: 12.5,
        }];
        r
    }

    fn cpu(s: &str, i: f64, resp: f64) -> CpuRow {
        CpuRow {
            subject: s.into(),
            initiator_us: i,
            responder_us: resp,
            total_range_us: ((i + resp) * 0.9, (i + resp) * 1.1),
            iterations: 100,
            server_hs_per_sec: 1e6 / resp,
        }
    }

    fn rec(s: &str, size: usize, ns: f64) -> RecordRow {
        RecordRow {
            subject: s.into(),
            size,
            ns_median: ns,
            ns_range: (ns * 0.9, ns * 1.2),
            mb_per_s: size as f64 / ns * 1000.0,
            wire_bytes: size + 29,
        }
    }

    #[test]
    fn record_subjects_pair_by_aead_whatever_the_backend_note() {
        // The subjects the records scenario writes.
        assert_eq!(record_aead("keav aes-256-gcm [ring]"), "aes-256-gcm");
        assert_eq!(
            record_aead("keav chacha20-poly1305 [rustcrypto]"),
            "chacha20-poly1305"
        );
        assert_eq!(record_aead("rustls aes-256-gcm"), "aes-256-gcm");
        assert_eq!(record_aead("snow chachapoly"), "chachapoly");
        let r = Report {
            records: vec![
                rec("keav aes-256-gcm [ring]", 64, 170.0),
                rec("rustls aes-256-gcm", 64, 400.0),
            ],
            ..Report::default()
        };
        let g = goals(&r);
        let g5 = g.iter().find(|g| g.goal.starts_with("64-byte")).unwrap();
        assert_eq!(g5.verdict, Verdict::Met, "{}", g5.measured);
    }

    #[test]
    fn sessions_group_into_patent_ranges() {
        let r = synthetic();
        let g = group_sessions(session_stats(&r, LinkModel::INTERNET, Subject::KeavNormal));
        let labels: Vec<String> = g.iter().map(Group::label).collect();
        assert_eq!(labels, ["1", "2-9", "10"]);
        assert_eq!(g[1].sessions.len(), 8);
        assert_eq!(g[1].sessions[0].kind_with, "preshared");
        let p = group_sessions(session_stats(
            &r,
            LinkModel::INTERNET,
            Subject::KeavParanoid,
        ));
        assert_eq!(p.iter().map(Group::label).collect::<Vec<_>>(), ["1-10"]);
        // A gap in the session numbers splits a range even with the same kind.
        let mut r2 = synthetic();
        r2.latency
            .retain(|s| !(s.subject == Subject::KeavParanoid && s.session == 5));
        let p = group_sessions(session_stats(
            &r2,
            LinkModel::INTERNET,
            Subject::KeavParanoid,
        ));
        assert_eq!(
            p.iter().map(Group::label).collect::<Vec<_>>(),
            ["1-4", "6-10"]
        );
    }

    #[test]
    fn verification_step_is_mean_of_paired_differences() {
        let r = synthetic();
        let s = session_stats(&r, LinkModel::INTERNET, Subject::KeavNormal);
        // with = 430 + rep, without = 290 + 2 rep → diffs 140, 139, 138.
        let d = &s[0].diffs;
        assert_eq!(d.len(), 3);
        assert!((mean(d) - 139.0).abs() < 1e-9, "{d:?}");
        assert!((std_dev(d) - 1.0).abs() < 1e-9, "{d:?}");
        assert!((mean(&s[0].rt_with) - 3.0).abs() < 1e-9);
        assert!((mean(&s[0].rt_without) - 2.0).abs() < 1e-9);
        let md = render(&r, &[], &[]);
        assert!(md.contains("| keav normal | 2-9 | preshared |"), "{md}");
        assert!(md.contains("139.0 ± 1.00"), "{md}");
        assert!(md.contains("dh+cpace (without: dh)"), "{md}");
    }

    #[test]
    fn goals_met_and_missed() {
        let r = synthetic();
        let g = goals(&r);
        assert_eq!(g.len(), 8);
        assert!(g[6].goal.starts_with("MQTT 127.0.0.1:1883: "), "{:?}", g[6]);
        assert!(g[7].goal.starts_with("NATS 127.0.0.1:4222: "), "{:?}", g[7]);
        assert!(
            g[6].measured
                .contains("64 B: live 0.95× (9500 vs 10000 msg/s; a broker message per record: 0.71×), durable 0.24×")
                && g[6].measured.contains("1 KiB: live 0.95×"),
            "{}",
            g[6].measured
        );
        assert_eq!(g[6].verdict, Verdict::Met, "{:?}", g[6]);
        assert_eq!(g[7].verdict, Verdict::Met, "{:?}", g[7]);
        // dh+cpace 610 vs 800 → met; preshared 10 vs 300 = 0.033 → met.
        assert_eq!(g[0].verdict, Verdict::Met, "{:?}", g[0]);
        assert!(g[0].measured.starts_with("0.762×"), "{}", g[0].measured);
        assert_eq!(g[1].verdict, Verdict::Met, "{:?}", g[1]);
        // normal 2-9: 1 RTT vs TLS resumed 1 RTT → met; verification +1 RTT → met.
        assert_eq!(g[2].verdict, Verdict::Met, "{:?}", g[2]);
        assert_eq!(g[3].verdict, Verdict::Met, "{:?}", g[3]);
        assert_eq!(g[4].verdict, Verdict::Met, "{:?}", g[4]);
        assert_eq!(g[5].verdict, Verdict::Met, "{:?}", g[5]);

        let mut bad = synthetic();
        bad.cpu[0].initiator_us = 900.0; // 1210 vs 800
        bad.cpu[1].initiator_us = 50.0; // 55 vs 300
        for s in &mut bad.latency {
            if s.subject == Subject::KeavNormal && s.session == 5 && s.with_verification {
                s.flights = 4;
            }
            if s.subject == Subject::KeavParanoid && s.with_verification {
                s.flights = 8; // +2 RTT over the without series
            }
        }
        bad.records[0].ns_median = 130.0;
        bad.memory[0].bytes_per_session = 2048.0;
        // One size below 0.9× misses the broker's goal; 0.9× exactly meets it.
        bad.broker[1] = broker_row("MQTT 127.0.0.1:1883", 1024, 8000.0, 9500.0);
        bad.broker[2] = broker_row("NATS 127.0.0.1:4222", 64, 100.0, 42000.0);
        let g = goals(&bad);
        for x in &g {
            assert_eq!(x.verdict, Verdict::Missed, "{x:?}");
        }

        let empty = goals(&Report::default());
        assert!(empty.iter().all(|x| x.verdict == Verdict::NotMeasured));
        let md = render(&Report::default(), &[], &[]);
        assert!(md.contains("not measured"));
        assert!(!md.contains("## Latency"));
    }

    #[test]
    fn partial_banner_and_sections() {
        let mut r = synthetic();
        let md = render(&r, &[], &["cpu.png: no TrueType font found".into()]);
        assert!(!md.contains("PARTIAL"));
        for h in [
            "## Goals",
            "## Latency",
            "## CPU per handshake",
            "## Records",
            "## Memory",
            "## Bytes on the wire",
            "## Plots not drawn",
            "<details>",
            "TLS 1.3 resumed (rustls) (resumed sessions only)",
            "keav normal session 1 / TLS full + OCSP: 1.44×",
        ] {
            assert!(md.contains(h), "missing {h:?} in\n{md}");
        }
        r.partial = Some("interrupted during the latency scenario".into());
        let md = render(&r, &[], &[]);
        let banner = md.find("PARTIAL").unwrap();
        assert!(banner < md.find("## Goals").unwrap());
        assert!(md.contains("interrupted during the latency scenario"));
        let s = summary(&r);
        assert!(s.starts_with("PARTIAL: interrupted"), "{s}");
        assert!(s.contains("met"), "{s}");
    }

    #[test]
    fn broker_section_goals_and_summary() {
        // Only broker rows, from a run that was not given --nats.
        let mut r = Report {
            broker: vec![
                broker_row("MQTT (embedded rumqttd)", 64, 9000.0, 10000.0),
                broker_row("MQTT (embedded rumqttd)", 1024, 8000.0, 10000.0),
            ],
            drain: synthetic().drain,
            ..Report::default()
        };
        r.drain[0].broker = "MQTT (embedded rumqttd)".into();
        r.options = Some(crate::options::Options {
            scenarios: [Scenario::Broker].into_iter().collect(),
            ..crate::options::Options::default()
        });
        let g = broker_goals(&r);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g[0].verdict, Verdict::Missed, "{:?}", g[0]);
        assert!(
            g[0].measured
                .contains("64 B: live 0.90× (9000 vs 10000 msg/s; a broker message per record: 0.68×), durable"),
            "{}",
            g[0].measured
        );
        assert!(
            g[0].measured
                .contains("1 KiB: live 0.80× (8000 vs 10000 msg/s; a broker message per record: 0.60×), durable 0.20×"),
            "{}",
            g[0].measured
        );
        assert_eq!(g[1].verdict, Verdict::NotMeasured);
        assert!(g[1].goal.starts_with("NATS"), "{:?}", g[1]);
        assert!(g[1].measured.contains("--nats"), "{:?}", g[1]);

        let plot = PathBuf::from("/x/broker.png");
        let md = render(&r, std::slice::from_ref(&plot), &[]);
        for h in [
            "## Messages through brokers (end to end vs plaintext)",
            "| Broker | Size | Messages | Plaintext (msg/s) | keav live (msg/s) | live / plaintext | keav live, a message per record (msg/s) | per record / plaintext | keav durable (msg/s) | durable / plaintext |",
            "| MQTT (embedded rumqttd) | 64 B | 2000 | 10000 | 9000 | 0.90× | 6750 | 0.68× | 2250 |",
            "| MQTT (embedded rumqttd) | 1 KiB | 2000 | 10000 | 8000 | 0.80× | 6000 | 0.60× | 2000 | 0.20× | 3000 | 0.30× |",
            "| MQTT (embedded rumqttd) | 1 KiB | 0.200 | 0 | 0.250 | 0.125 | 0 | 0 | 1.00 | 0.250 | 0 | 0 | 0 |",
            "Goal: keav live ≥ 0.9× plaintext.",
            "- MQTT (embedded rumqttd): end-to-end encrypted messages/s ≥ 0.9× plaintext: **missed**",
            "- NATS: end-to-end encrypted messages/s ≥ 0.9× plaintext: **not measured** — no --nats",
            "### Mailbox drain after an offline period",
            "| MQTT (embedded rumqttd) | 2000 | 64 B | 16 | 5000 | 0.400 | 12.50 |",
            "![messages per second through brokers](broker.png)",
            "| Brokers | 20000 messages per measurement; MQTT embedded rumqttd; NATS not measured |",
        ] {
            assert!(md.contains(h), "missing {h:?} in\n{md}");
        }
        // The goals table carries the same verdicts.
        assert!(
            md.contains("| MQTT (embedded rumqttd): end-to-end encrypted messages/s ≥ 0.9× plaintext | 64 B: live 0.90×"),
            "{md}"
        );
        let s = summary(&r);
        assert!(
            s.contains("broker MQTT (embedded rumqttd) 1 KiB: plaintext 10000 msg/s, keav live 8000 msg/s (0.80×; a message per record 6000 msg/s, 0.60×), keav durable 2000 msg/s (0.20×)"),
            "{s}"
        );
        assert!(
            s.contains("drain MQTT (embedded rumqttd): 2000 messages held, 5000 msg/s"),
            "{s}"
        );

        // A lost plaintext message is shown; a zero plaintext rate is no verdict.
        r.broker[0].plain_lost = 7;
        r.broker[1].live_ratio = None;
        r.options = None;
        let g = broker_goals(&r);
        assert_eq!(g.len(), 1);
        assert!(
            g[0].measured.contains("plaintext lost 7"),
            "{}",
            g[0].measured
        );
        assert!(
            g[0].measured.contains("no plaintext rate"),
            "{}",
            g[0].measured
        );
        assert_eq!(g[0].verdict, Verdict::NotMeasured);
        r.broker[0].live_ratio = Some(0.5);
        assert_eq!(broker_goals(&r)[0].verdict, Verdict::Missed);
        // The durable ratio never decides the goal; a live run that failed is no verdict.
        r.broker[0].live_ratio = Some(0.95);
        r.broker[1].live_ratio = Some(0.9);
        r.broker[0].ratio = Some(0.01);
        assert_eq!(broker_goals(&r)[0].verdict, Verdict::Met);
        r.broker[1].live_msgs_per_s = None;
        r.broker[1].live_ratio = None;
        r.broker[1].live_lost = None;
        r.broker[1].live_secs = None;
        r.broker[1].live_single_msgs_per_s = None;
        r.broker[1].live_single_ratio = None;
        let g = broker_goals(&r);
        assert_eq!(g[0].verdict, Verdict::NotMeasured);
        assert!(
            g[0].measured
                .contains("1 KiB: keav live not measured, durable"),
            "{}",
            g[0].measured
        );
        let line = broker_line(&r.broker[1]);
        assert!(line.contains("| 10000 | — | — | — | — | 2000 |"), "{line}");
        let detail = broker_detail_line(&r.broker[1]);
        assert!(
            detail.contains("| 0.200 | 0 | — | 0.125 | — | 0 |"),
            "{detail}"
        );
        // The details table's rows have as many cells as its header.
        let md = render(&r, &[], &[]);
        let details = md
            .split("Where keav's time goes")
            .nth(1)
            .expect("the details section");
        let cells: Vec<usize> = details
            .lines()
            .skip_while(|l| !l.starts_with("| Broker"))
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.matches('|').count())
            .collect();
        assert_eq!(cells.len(), 2 + r.broker.len(), "{details}");
        assert!(cells.iter().all(|&c| c == cells[0]), "{cells:?}");
        // Lost live messages are shown beside the ratio.
        r.broker[0].live_lost = Some(3);
        assert!(
            broker_goals(&r)[0]
                .measured
                .contains("keav live lost 3, plaintext lost 7"),
            "{}",
            broker_goals(&r)[0].measured
        );
        // No broker data at all: one goal, not measured; no section.
        let empty = Report::default();
        let g = broker_goals(&empty);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].verdict, Verdict::NotMeasured);
        assert!(!render(&empty, &[], &[]).contains("## Messages through brokers"));
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(1024), "1 KiB");
        assert_eq!(size_label(1000), "1000 B");
    }
}
