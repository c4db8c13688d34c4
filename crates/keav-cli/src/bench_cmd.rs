//! `keav bench`: runs the benchmark scenarios on this machine and writes `bench-report/`.
//!
//! Flags are checked up front (usage errors exit 2 before anything is measured or written).
//! A progress bar per stage goes to stderr when it is a terminal. Ctrl-C once stops at the
//! next measurement boundary and still writes the report (marked partial, exit 130); a
//! second Ctrl-C exits at once.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keav_bench::options::{
    parse_broker_addr, parse_links, parse_scenarios, Options, Scenario, QUICK_BROKER_MESSAGES,
    QUICK_C2_DEVICES,
};
use keav_bench::{BenchError, Progress};

/// Exit status after an interrupted (but written) run, as a shell reports SIGINT.
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status of a usage error.
const EXIT_USAGE: u8 = 2;

/// `keav bench` flags. Every flag is optional so that flags that do not apply to the
/// selected scenarios can be rejected.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios, comma-separated: latency, cpu, records, throughput, memory, wire, broker,
    /// c2 (default: all).
    #[arg(long, value_name = "LIST")]
    scenarios: Option<String>,
    /// Repetitions of each latency series (default 10; 3 with --quick). Latency only.
    #[arg(long, value_name = "N")]
    reps: Option<u32>,
    /// Sessions per latency series (default 10). Latency only.
    #[arg(long, value_name = "N")]
    sessions: Option<u32>,
    /// Link models, comma-separated: DELAY or DELAY/JITTER, e.g. 70ms,0ms or 70ms/5ms
    /// (default 70ms,0ms). Latency only.
    #[arg(long, value_name = "LIST")]
    link: Option<String>,
    /// N of `normal` mode: verification on sessions 1, 1+N, ... (default 10). Latency only.
    #[arg(long, value_name = "N")]
    verify_every: Option<u32>,
    /// Idle sessions held by the memory scenario (default 100000). Memory only.
    #[arg(long, value_name = "N")]
    memory_sessions: Option<u32>,
    /// Messages per broker measurement (default 20000; 2000 with --quick). Broker only.
    #[arg(long, value_name = "N")]
    broker_messages: Option<u32>,
    /// MQTT broker HOST:PORT (default: an embedded broker on a free loopback port). Broker
    /// and c2 only.
    #[arg(long, value_name = "HOST:PORT")]
    mqtt: Option<String>,
    /// NATS server HOST:PORT (default: NATS is not measured). Broker only.
    #[arg(long, value_name = "HOST:PORT")]
    nats: Option<String>,
    /// Simulated devices of the C2 fleet, each its own MQTT connection (default 200; 100
    /// with --quick). C2 only.
    #[arg(long, value_name = "N")]
    c2_devices: Option<u32>,
    /// A smoke run: few iterations, finishes quickly; numbers are rough.
    #[arg(long)]
    quick: bool,
    /// Output directory (default bench-report).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Turns the flags into checked [`Options`]; the error is a usage message.
fn options(a: &BenchArgs) -> Result<Options, String> {
    let mut o = Options::default();
    if let Some(list) = &a.scenarios {
        o.scenarios = parse_scenarios(list).map_err(|e| e.to_string())?;
    }
    let selected = || {
        o.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(",")
    };
    if !o.has(Scenario::Latency) {
        let given: Vec<&str> = [
            ("--reps", a.reps.is_some()),
            ("--sessions", a.sessions.is_some()),
            ("--link", a.link.is_some()),
            ("--verify-every", a.verify_every.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, g)| g.then_some(f))
        .collect();
        if !given.is_empty() {
            return Err(format!(
                "{} only {} to the latency scenario, which is not selected (--scenarios {}); \
                 add latency to --scenarios or drop the {}",
                given.join(", "),
                if given.len() == 1 { "applies" } else { "apply" },
                selected(),
                if given.len() == 1 { "flag" } else { "flags" }
            ));
        }
    }
    if !o.has(Scenario::Memory) && a.memory_sessions.is_some() {
        return Err(format!(
            "--memory-sessions only applies to the memory scenario, which is not selected \
             (--scenarios {})",
            selected()
        ));
    }
    if !o.has(Scenario::C2) && a.c2_devices.is_some() {
        return Err(format!(
            "--c2-devices only applies to the c2 scenario, which is not selected \
             (--scenarios {})",
            selected()
        ));
    }
    if !o.has(Scenario::Broker) {
        let given: Vec<&str> = [
            ("--broker-messages", a.broker_messages.is_some()),
            ("--mqtt", a.mqtt.is_some() && !o.has(Scenario::C2)),
            ("--nats", a.nats.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, g)| g.then_some(f))
        .collect();
        if !given.is_empty() {
            return Err(format!(
                "{} only {} to the broker scenario, which is not selected (--scenarios {}); \
                 add broker to --scenarios or drop the {}",
                given.join(", "),
                if given.len() == 1 { "applies" } else { "apply" },
                selected(),
                if given.len() == 1 { "flag" } else { "flags" }
            ));
        }
    }
    if let Some(m) = &a.mqtt {
        o.mqtt = Some(parse_broker_addr(m, "mqtt").map_err(|e| format!("--mqtt: {e}"))?);
    }
    if let Some(n) = &a.nats {
        o.nats = Some(parse_broker_addr(n, "nats").map_err(|e| format!("--nats: {e}"))?);
    }
    if let Some(l) = &a.link {
        o.links = parse_links(l).map_err(|e| format!("--link: {e}"))?;
    }
    o.quick = a.quick;
    if a.quick {
        o.reps = 3;
        o.broker_messages = QUICK_BROKER_MESSAGES;
        o.c2_devices = QUICK_C2_DEVICES;
    }
    if let Some(n) = a.c2_devices {
        o.c2_devices = n;
    }
    if let Some(n) = a.reps {
        o.reps = n;
    }
    if let Some(n) = a.sessions {
        o.sessions = n;
    }
    if let Some(n) = a.verify_every {
        o.verify_every = n;
    }
    if let Some(n) = a.memory_sessions {
        o.memory_sessions = n;
    }
    if let Some(n) = a.broker_messages {
        o.broker_messages = n;
    }
    if let Some(d) = &a.out {
        o.out_dir = d.clone();
    }
    o.validate().map_err(|e| e.to_string())?;
    Ok(o)
}

/// Progress bars on stderr (one per stage), or plain stage lines when stderr is not a
/// terminal.
struct Bars {
    visible: bool,
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            visible: std::io::stderr().is_terminal(),
            current: Mutex::new(None),
        }
    }

    fn with_bar(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        match self.current.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn finish(&self) {
        self.with_bar(|b| {
            if let Some(bar) = b.take() {
                bar.finish();
            }
        });
    }
}

impl Progress for Bars {
    fn stage(&self, name: &str, total: u64) {
        let visible = self.visible;
        self.with_bar(|b| {
            if let Some(old) = b.take() {
                old.finish();
            }
            if !visible {
                eprintln!("keav: bench: {name} ({total} steps)");
                return;
            }
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>24} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(250));
            *b = Some(bar);
        });
    }

    fn advance(&self, n: u64) {
        self.with_bar(|b| {
            if let Some(bar) = b.as_ref() {
                bar.inc(n);
            }
        });
    }

    fn note(&self, msg: &str) {
        self.with_bar(|b| match b.as_ref() {
            Some(bar) if !bar.is_hidden() => bar.println(format!("keav: {msg}")),
            _ => eprintln!("keav: {msg}"),
        });
    }
}

/// Installs the Ctrl-C handling on a background thread (a small current-thread tokio
/// runtime): the first SIGINT sets `cancel`, a second one exits with status 130. Returns once
/// the handler is registered.
fn watch_ctrl_c(cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("keav-bench-ctrl-c".into())
        .spawn(move || {
            rt.block_on(async move {
                #[cfg(unix)]
                let mut sig = {
                    use tokio::signal::unix::{signal, SignalKind};
                    match signal(SignalKind::interrupt()) {
                        Ok(s) => {
                            let _ = ready_tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                };
                #[cfg(not(unix))]
                let _ = ready_tx.send(Ok(()));
                let mut presses = 0u32;
                loop {
                    #[cfg(unix)]
                    let got = sig.recv().await.is_some();
                    #[cfg(not(unix))]
                    let got = tokio::signal::ctrl_c().await.is_ok();
                    if !got {
                        return;
                    }
                    presses += 1;
                    if presses == 1 {
                        cancel.store(true, Ordering::SeqCst);
                        eprintln!(
                            "keav: stopping after the current measurement; the report will be \
                             written (Ctrl-C again to quit at once)"
                        );
                    } else {
                        eprintln!("keav: interrupted again, exiting without writing the report");
                        std::process::exit(i32::from(EXIT_INTERRUPTED));
                    }
                }
            });
        })?;
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("could not install the Ctrl-C handler"),
    }
}

/// The command line as typed (for the report).
fn command_line() -> String {
    let mut parts = vec!["keav".to_string()];
    parts.extend(std::env::args().skip(1));
    parts.join(" ")
}

/// Runs `keav bench`; returns the process exit status.
pub fn run(args: &BenchArgs) -> ExitCode {
    let opts = match options(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("keav: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_ctrl_c(cancel.clone()) {
        eprintln!("keav: error: {}", crate::one_line(&e));
        return ExitCode::FAILURE;
    }
    let bars = Bars::new();
    let result = keav_bench::run(&opts, &command_line(), &bars, &cancel);
    bars.finish();
    let report = match result {
        Ok(r) => r,
        Err(e @ BenchError::InvalidOption(_)) => {
            eprintln!("keav: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("keav: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let written = match report.write(&opts.out_dir) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "keav: error: writing the report to {}: {e}",
                opts.out_dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.summary());
    println!("wrote:");
    for f in &written {
        println!("  {}", f.display());
    }
    if cancel.load(Ordering::SeqCst) {
        eprintln!("keav: interrupted; the report is partial");
        ExitCode::from(EXIT_INTERRUPTED)
    } else if let Some(why) = &report.partial {
        eprintln!("keav: error: the report is partial: {why}");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn opts(args: &[&str]) -> Result<Options, String> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        options(&T::try_parse_from(v).map_err(|e| e.to_string())?.a)
    }

    #[test]
    fn flags_are_checked_up_front() {
        let o = opts(&[]).unwrap();
        assert_eq!(o.scenarios.len(), Scenario::ALL.len());
        let o = opts(&[
            "--scenarios",
            "latency",
            "--reps",
            "4",
            "--link",
            "70ms/5ms",
        ])
        .unwrap();
        assert_eq!((o.reps, o.links.len()), (4, 1));
        let o = opts(&["--quick", "--scenarios", "wire"]).unwrap();
        assert!(o.quick);
        let e = opts(&["--scenarios", "cpu,nope"]).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = opts(&["--scenarios", "cpu", "--link", "70ms", "--reps", "3"]).unwrap_err();
        assert!(e.contains("--reps, --link") && e.contains("latency"), "{e}");
        let e = opts(&["--scenarios", "cpu", "--memory-sessions", "5"]).unwrap_err();
        assert!(e.contains("memory"), "{e}");
        let e = opts(&["--reps", "0"]).unwrap_err();
        assert!(e.contains("--reps"), "{e}");
        let e = opts(&["--link", "70"]).unwrap_err();
        assert!(e.contains("--link"), "{e}");
    }

    #[test]
    fn broker_flags() {
        let o = opts(&[]).unwrap();
        assert!(o.has(Scenario::Broker));
        assert_eq!(
            (o.broker_messages, o.mqtt.clone(), o.nats.clone()),
            (20_000, None, None)
        );
        let o = opts(&["--scenarios", "broker", "--quick"]).unwrap();
        assert_eq!(o.broker_messages, 2_000);
        let o = opts(&[
            "--scenarios",
            "broker",
            "--quick",
            "--broker-messages",
            "500",
            "--mqtt",
            "mqtt://127.0.0.1:1883",
            "--nats",
            "127.0.0.1:4222",
        ])
        .unwrap();
        assert_eq!(o.broker_messages, 500);
        assert_eq!(o.mqtt.as_deref(), Some("127.0.0.1:1883"));
        assert_eq!(o.nats.as_deref(), Some("127.0.0.1:4222"));
        let e = opts(&["--scenarios", "cpu", "--nats", "127.0.0.1:4222"]).unwrap_err();
        assert!(e.contains("--nats") && e.contains("broker scenario"), "{e}");
        let e = opts(&[
            "--scenarios",
            "wire",
            "--broker-messages",
            "5",
            "--mqtt",
            "h:1",
        ])
        .unwrap_err();
        assert!(
            e.contains("--broker-messages, --mqtt") && e.contains("apply"),
            "{e}"
        );
        let e = opts(&["--scenarios", "broker", "--broker-messages", "0"]).unwrap_err();
        assert!(e.contains("--broker-messages"), "{e}");
        let e = opts(&["--scenarios", "broker", "--nats", "localhost"]).unwrap_err();
        assert!(e.contains("--nats") && e.contains("HOST:PORT"), "{e}");
        let e = opts(&["--scenarios", "broker", "--mqtt", "nats://h:4222"]).unwrap_err();
        assert!(e.contains("--mqtt"), "{e}");
    }

    #[test]
    fn c2_flags() {
        let o = opts(&["--scenarios", "c2", "--quick", "--mqtt", "127.0.0.1:1883"]).unwrap();
        assert_eq!(o.c2_devices, QUICK_C2_DEVICES);
        assert_eq!(o.mqtt.as_deref(), Some("127.0.0.1:1883"));
        let o = opts(&["--scenarios", "c2", "--c2-devices", "30"]).unwrap();
        assert_eq!((o.c2_devices, o.mqtt.clone()), (30, None));
        let e = opts(&["--scenarios", "cpu", "--c2-devices", "30"]).unwrap_err();
        assert!(
            e.contains("--c2-devices") && e.contains("c2 scenario"),
            "{e}"
        );
        let e = opts(&["--scenarios", "c2", "--c2-devices", "0"]).unwrap_err();
        assert!(e.contains("--c2-devices"), "{e}");
        // --mqtt still needs broker or c2.
        let e = opts(&["--scenarios", "cpu", "--mqtt", "127.0.0.1:1883"]).unwrap_err();
        assert!(e.contains("--mqtt"), "{e}");
    }
}
