//! Throughput of one keav secure channel over TCP on loopback, against a plain tokio TCP
//! socket moving the same bytes the same way: a thin wrapper around
//! [`keav_bench::scenario::datapath::measure_throughput`] (the `throughput` scenario of
//! `keav bench`), printing every run and the CPU time both sides used.
//!
//! Two devices with temporary stores pair over 127.0.0.1 (the handshake is timed
//! separately), then the initiator pushes `MIB` MiB in `CHUNK`-byte `Channel::send` calls
//! while the responder `recv`s until it has them all; the baseline is a plain `TcpStream`
//! pair (`TCP_NODELAY`) with `write_all` of the same chunks. Runs alternate (plain, keav,
//! ...); every run's received bytes are checked against what was sent, byte for byte.
//!
//! Usage: `cargo run -p keav-bench --release --example tcp_throughput [MIB] [CHUNK] [RUNS]`
//! (defaults 256 MiB, 16384-byte writes, 5 runs of each).
#![allow(missing_docs)]

use std::process::ExitCode;

use keav_bench::report::stats::median;
use keav_bench::scenario::datapath::{measure_throughput, ThroughputPlan, Transport};

fn arg<T: std::str::FromStr>(v: Option<String>, default: T, what: &str) -> Result<T, String> {
    match v {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("bad {what}: {s:?}")),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let parsed = (|| -> Result<ThroughputPlan, String> {
        let mib: u64 = arg(args.next(), 256, "MIB")?;
        let chunk: usize = arg(args.next(), 16 * 1024, "CHUNK")?;
        let runs: u32 = arg(args.next(), 5, "RUNS")?;
        Ok(ThroughputPlan {
            total: mib << 20,
            chunk,
            runs,
        })
    })();
    let plan = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}\nusage: tcp_throughput [MIB] [CHUNK] [RUNS]");
            return ExitCode::FAILURE;
        }
    };
    let runs = match measure_throughput(plan, &mut |r| {
        eprintln!(
            "  {}: {:.0} MB/s",
            r.transport.name(),
            r.mb_per_s(plan.total)
        );
        Ok(())
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("throughput failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let gb = plan.total as f64 / 1e9;
    println!(
        "{} MiB one way in {}-byte writes over 127.0.0.1, {} runs each, MB/s = 10^6 payload \
         bytes/s, every run checked byte for byte",
        plan.total >> 20,
        plan.chunk,
        plan.runs
    );
    println!("| transport | median MB/s | all runs MB/s | CPU s per GB (both sides, median) |");
    println!("|---|---:|---|---:|");
    let mut medians = Vec::new();
    for t in [Transport::PlainTcp, Transport::KeavTcp] {
        let mine: Vec<_> = runs.iter().filter(|r| r.transport == t).collect();
        let mbs: Vec<f64> = mine.iter().map(|r| r.mb_per_s(plan.total)).collect();
        let cpu: Vec<f64> = mine
            .iter()
            .filter_map(|r| r.cpu_secs)
            .map(|c| c / gb)
            .collect();
        let name = match mine.first().and_then(|r| r.aead) {
            Some(a) => format!("{} ({})", t.name(), a.name()),
            None => t.name().to_string(),
        };
        let all = mbs
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cpu = if cpu.is_empty() {
            "—".to_string()
        } else {
            format!("{:.2}", median(&cpu))
        };
        println!("| {name} | {:.0} | {all} | {cpu} |", median(&mbs));
        medians.push(median(&mbs));
    }
    if let [p, k] = medians[..] {
        println!("\nkeav / plain TCP throughput ratio: {:.3}", k / p);
    }
    let hs: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.handshake)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    if let Some(first) = hs.first() {
        println!(
            "handshake (connect + accept): first {first:.1} ms, median {:.1} ms",
            median(&hs)
        );
    }
    ExitCode::SUCCESS
}
