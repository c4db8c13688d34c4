//! Reads criterion's results of `cargo bench -p keav-bench --bench handshake` and prints a
//! Markdown table of the medians and the ratios keav / peers.
//!
//! Usage: `cargo run -p keav-bench --release --example handshake_ratios [CRITERION_DIR]`
//! (default: `$CARGO_TARGET_DIR/criterion`, else `target/criterion`).
#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use serde_json::Value;

const GROUP: &str = "handshake";
const PRIMITIVES: [&str; 9] = [
    "dalek-x25519-keygen",
    "dalek-x25519-agree",
    "ristretto-hash-to-curve",
    "ristretto-varbase-mul",
    "ristretto-decompress-mul",
    "ristretto-basepoint-mul",
    "ring-x25519-keygen+agree",
    "ring-ed25519-sign",
    "ring-ed25519-verify",
];
const BENCHES: [(&str, &str); 7] = [
    ("keav-dh-cpace", "keav DH + CPace (first session, bound)"),
    ("keav-dh-smp", "keav DH + SMP (first session, bound)"),
    ("keav-preshared", "keav preshared (cached, no verification)"),
    ("noise-xx", "snow Noise_XX_25519_ChaChaPoly_BLAKE2s"),
    ("tls13-full-ed25519", "rustls TLS 1.3 full, Ed25519 cert"),
    ("tls13-full-p256", "rustls TLS 1.3 full, ECDSA P-256 cert"),
    (
        "tls13-resumed",
        "rustls TLS 1.3 resumed (ticket, PSK+ECDHE)",
    ),
];

/// Median with its 95% confidence interval, and the per-iteration min/max over samples, ns.
struct Stat {
    median: f64,
    ci: (f64, f64),
    range: (f64, f64),
}

fn num(v: &Value, path: &[&str]) -> Result<f64, String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| format!("missing field {p}"))?;
    }
    cur.as_f64()
        .ok_or_else(|| format!("{} is not a number", path.join(".")))
}

fn read_json(p: &Path) -> Result<Value, String> {
    let s = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
}

fn load(dir: &Path, group: &str, id: &str) -> Result<Stat, String> {
    let base = dir.join(group).join(id).join("new");
    let est = read_json(&base.join("estimates.json"))?;
    let median = num(&est, &["median", "point_estimate"])?;
    let lo = num(&est, &["median", "confidence_interval", "lower_bound"])?;
    let hi = num(&est, &["median", "confidence_interval", "upper_bound"])?;
    let sample = read_json(&base.join("sample.json"))?;
    let iters = sample["iters"].as_array().ok_or("sample.json: no iters")?;
    let times = sample["times"].as_array().ok_or("sample.json: no times")?;
    let per: Vec<f64> = iters
        .iter()
        .zip(times)
        .filter_map(|(n, t)| Some(t.as_f64()? / n.as_f64()?))
        .collect();
    let min = per.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per.iter().copied().fold(0.0, f64::max);
    Ok(Stat {
        median,
        ci: (lo, hi),
        range: (min, max),
    })
}

fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1000.0)
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    let mut stats = Vec::new();
    for (id, _) in BENCHES {
        match load(&dir, GROUP, id) {
            Ok(s) => stats.push(s),
            Err(e) => {
                eprintln!("cannot read results of {id}: {e}");
                std::process::exit(1);
            }
        }
    }
    let get = |id: &str| {
        BENCHES
            .iter()
            .position(|(b, _)| *b == id)
            .map(|i| stats[i].median)
            .unwrap_or(f64::NAN)
    };
    println!("results from {}\n", dir.display());
    println!("| benchmark | what | median µs | median 95% CI µs | per-sample min–max µs |");
    println!("|---|---|---:|---:|---:|");
    for ((id, what), s) in BENCHES.iter().zip(&stats) {
        println!(
            "| `{id}` | {what} | {} | {}–{} | {}–{} |",
            us(s.median),
            us(s.ci.0),
            us(s.ci.1),
            us(s.range.0),
            us(s.range.1)
        );
    }
    println!();
    println!("| ratio (medians) | value | goal |");
    println!("|---|---:|---|");
    let ratios = [
        (
            "keav DH+CPace / TLS full (Ed25519)",
            "keav-dh-cpace",
            "tls13-full-ed25519",
            Some(1.0),
        ),
        (
            "keav DH+CPace / TLS full (P-256)",
            "keav-dh-cpace",
            "tls13-full-p256",
            Some(1.0),
        ),
        (
            "keav DH+SMP / TLS full (Ed25519)",
            "keav-dh-smp",
            "tls13-full-ed25519",
            None,
        ),
        (
            "keav preshared / TLS resumed",
            "keav-preshared",
            "tls13-resumed",
            Some(0.1),
        ),
        (
            "keav DH+CPace / Noise XX",
            "keav-dh-cpace",
            "noise-xx",
            None,
        ),
        ("keav DH+SMP / Noise XX", "keav-dh-smp", "noise-xx", None),
        (
            "keav preshared / Noise XX",
            "keav-preshared",
            "noise-xx",
            None,
        ),
    ];
    for (name, a, b, goal) in ratios {
        let r = get(a) / get(b);
        let g = match goal {
            Some(g) if r <= g => format!("≤ {g}: met"),
            Some(g) => format!("≤ {g}: missed by {:.2}×", r / g),
            None => "—".to_string(),
        };
        println!("| {name} | {r:.3} | {g} |");
    }
    // Primitive costs, if that group ran too.
    let prims: Vec<(&str, Stat)> = PRIMITIVES
        .iter()
        .filter_map(|id| load(&dir, "primitives", id).ok().map(|s| (*id, s)))
        .collect();
    if !prims.is_empty() {
        println!();
        println!("| primitive (one operation) | median µs | median 95% CI µs |");
        println!("|---|---:|---:|");
        for (id, s) in prims {
            println!(
                "| `{id}` | {} | {}–{} |",
                us(s.median),
                us(s.ci.0),
                us(s.ci.1)
            );
        }
    }
}
