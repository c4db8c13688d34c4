//! Reads criterion's results of `cargo bench -p keav-bench --bench records` and prints
//! Markdown tables: per payload size the median time per record (seal + open), the
//! throughput in GB/s (10^9 payload bytes per second), and the time ratios keav / rustls and
//! keav / snow for the same AEAD, with the goals checked.
//!
//! Usage: `cargo run -p keav-bench --release --example record_ratios [CRITERION_DIR]`
//! (default: `$CARGO_TARGET_DIR/criterion`, else `target/criterion`).
#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use serde_json::Value;

const GROUP: &str = "records";
const SIZES: [usize; 3] = [64, 1024, 16384];
const BENCHES: [(&str, &str); 6] = [
    ("keav-aes256gcm", "keav AES-256-GCM"),
    ("keav-chacha20poly1305", "keav ChaCha20-Poly1305"),
    ("rustls-aes256gcm", "rustls TLS_AES_256_GCM_SHA384"),
    (
        "rustls-chacha20poly1305",
        "rustls TLS_CHACHA20_POLY1305_SHA256",
    ),
    ("snow-aesgcm", "snow AESGCM"),
    ("snow-chachapoly", "snow ChaChaPoly"),
];
/// 16 KiB goal: at least 1 GB/s of payload through seal + open on one core.
const GOAL_GBPS_16K: f64 = 1.0;

/// Median with its 95% confidence interval, ns per record.
struct Stat {
    median: f64,
    ci: (f64, f64),
}

fn num(v: &Value, path: &[&str]) -> Result<f64, String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| format!("missing field {p}"))?;
    }
    cur.as_f64()
        .ok_or_else(|| format!("{} is not a number", path.join(".")))
}

fn load(dir: &Path, id: &str, size: usize) -> Result<Stat, String> {
    let p = dir
        .join(GROUP)
        .join(id)
        .join(size.to_string())
        .join("new")
        .join("estimates.json");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let est: Value = serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(Stat {
        median: num(&est, &["median", "point_estimate"])?,
        ci: (
            num(&est, &["median", "confidence_interval", "lower_bound"])?,
            num(&est, &["median", "confidence_interval", "upper_bound"])?,
        ),
    })
}

/// Payload bytes per ns = GB/s (decimal).
fn gbps(size: usize, ns: f64) -> f64 {
    size as f64 / ns
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    let mut stats: Vec<Vec<Stat>> = Vec::new();
    for (id, _) in BENCHES {
        let mut row = Vec::new();
        for size in SIZES {
            match load(&dir, id, size) {
                Ok(s) => row.push(s),
                Err(e) => {
                    eprintln!("cannot read results of {id}/{size}: {e}");
                    std::process::exit(1);
                }
            }
        }
        stats.push(row);
    }
    let median = |id: &str, size_idx: usize| {
        BENCHES
            .iter()
            .position(|(b, _)| *b == id)
            .map(|i| stats[i][size_idx].median)
            .unwrap_or(f64::NAN)
    };

    println!("results from {}\n", dir.display());
    println!("Median ns per record (seal + open), 95% CI of the median, and GB/s of payload:\n");
    print!("| stack |");
    for s in SIZES {
        print!(" {s} B ns | {s} B GB/s |");
    }
    println!();
    print!("|---|");
    for _ in SIZES {
        print!("---:|---:|");
    }
    println!();
    for ((id, what), row) in BENCHES.iter().zip(&stats) {
        print!("| {what} (`{id}`) |");
        for (size, s) in SIZES.iter().zip(row) {
            print!(
                " {:.0} ({:.0}–{:.0}) | {:.2} |",
                s.median,
                s.ci.0,
                s.ci.1,
                gbps(*size, s.median)
            );
        }
        println!();
    }

    println!("\nTime ratios (medians; < 1 means keav is faster):\n");
    print!("| ratio |");
    for s in SIZES {
        print!(" {s} B |");
    }
    println!();
    print!("|---|");
    for _ in SIZES {
        print!("---:|");
    }
    println!();
    let ratios = [
        (
            "keav AES-GCM / rustls AES-GCM",
            "keav-aes256gcm",
            "rustls-aes256gcm",
        ),
        (
            "keav ChaCha / rustls ChaCha",
            "keav-chacha20poly1305",
            "rustls-chacha20poly1305",
        ),
        (
            "keav AES-GCM / snow AESGCM",
            "keav-aes256gcm",
            "snow-aesgcm",
        ),
        (
            "keav ChaCha / snow ChaChaPoly",
            "keav-chacha20poly1305",
            "snow-chachapoly",
        ),
    ];
    for (name, a, b) in ratios {
        print!("| {name} |");
        for i in 0..SIZES.len() {
            print!(" {:.3} |", median(a, i) / median(b, i));
        }
        println!();
    }

    println!("\nGoals:\n");
    for (keav, tls) in [
        ("keav-aes256gcm", "rustls-aes256gcm"),
        ("keav-chacha20poly1305", "rustls-chacha20poly1305"),
    ] {
        let r = median(keav, 0) / median(tls, 0);
        let verdict = if r <= 1.0 { "met" } else { "missed" };
        println!("- 64 B, {keav} / {tls} = {r:.3} (goal ≤ 1.0): {verdict}");
    }
    let last = SIZES.len() - 1;
    for keav in ["keav-aes256gcm", "keav-chacha20poly1305"] {
        let g = gbps(SIZES[last], median(keav, last));
        let verdict = if g >= GOAL_GBPS_16K { "met" } else { "missed" };
        println!("- 16 KiB, {keav}: {g:.2} GB/s seal+open (goal ≥ {GOAL_GBPS_16K}): {verdict}");
    }
}
