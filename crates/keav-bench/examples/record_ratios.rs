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
/// keav rows: `keav-*` from a build without keav-bench's `fast-aead` feature (RustCrypto
/// AEADs), `keav-ring-*` from a build with it (ring AEADs). Rows without results are skipped.
const BENCHES: [(&str, &str); 8] = [
    ("keav-aes256gcm", "keav AES-256-GCM [RustCrypto]"),
    (
        "keav-chacha20poly1305",
        "keav ChaCha20-Poly1305 [RustCrypto]",
    ),
    ("keav-ring-aes256gcm", "keav AES-256-GCM [ring]"),
    (
        "keav-ring-chacha20poly1305",
        "keav ChaCha20-Poly1305 [ring]",
    ),
    ("rustls-aes256gcm", "rustls TLS_AES_256_GCM_SHA384"),
    (
        "rustls-chacha20poly1305",
        "rustls TLS_CHACHA20_POLY1305_SHA256",
    ),
    ("snow-aesgcm", "snow AESGCM"),
    ("snow-chachapoly", "snow ChaChaPoly"),
];
/// 16 KiB goal: at least 1 GB/s of payload through seal + open on one core.
/// The bare AEADs (group `aead`), seal + open in place without any record layer.
const AEADS: [(&str, &str); 4] = [
    (
        "rustcrypto-aes256gcm",
        "RustCrypto aes-gcm 0.10 (keav, snow)",
    ),
    (
        "rustcrypto-chacha20poly1305",
        "RustCrypto chacha20poly1305 0.10 (keav, snow)",
    ),
    ("ring-aes256gcm", "ring AES-256-GCM (rustls)"),
    ("ring-chacha20poly1305", "ring ChaCha20-Poly1305 (rustls)"),
];
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
    load_in(dir, GROUP, id, size)
}

fn load_in(dir: &Path, group: &str, id: &str, size: usize) -> Result<Stat, String> {
    let p = dir
        .join(group)
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
    // Rows with results (a keav row may be missing if only one backend's build ran).
    let mut rows: Vec<(&str, &str, Vec<Stat>)> = Vec::new();
    for (id, what) in BENCHES {
        let row: Result<Vec<Stat>, String> = SIZES.iter().map(|s| load(&dir, id, *s)).collect();
        match row {
            Ok(r) => rows.push((id, what, r)),
            Err(e) if id.starts_with("keav-") => eprintln!("skipping {id}: {e}"),
            Err(e) => {
                eprintln!("cannot read results of {id}: {e}");
                std::process::exit(1);
            }
        }
    }
    let median = |id: &str, size_idx: usize| {
        rows.iter()
            .find(|(b, _, _)| *b == id)
            .map(|(_, _, r)| r[size_idx].median)
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
    for (id, what, row) in &rows {
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
            "keav[ring] AES-GCM / rustls AES-GCM",
            "keav-ring-aes256gcm",
            "rustls-aes256gcm",
        ),
        (
            "keav[ring] ChaCha / rustls ChaCha",
            "keav-ring-chacha20poly1305",
            "rustls-chacha20poly1305",
        ),
        (
            "keav[RustCrypto] AES-GCM / rustls AES-GCM",
            "keav-aes256gcm",
            "rustls-aes256gcm",
        ),
        (
            "keav[RustCrypto] ChaCha / rustls ChaCha",
            "keav-chacha20poly1305",
            "rustls-chacha20poly1305",
        ),
        (
            "keav[RustCrypto] AES-GCM / snow AESGCM",
            "keav-aes256gcm",
            "snow-aesgcm",
        ),
        (
            "keav[RustCrypto] ChaCha / snow ChaChaPoly",
            "keav-chacha20poly1305",
            "snow-chachapoly",
        ),
    ];
    for (name, a, b) in ratios {
        if median(a, 0).is_nan() {
            continue;
        }
        print!("| {name} |");
        for i in 0..SIZES.len() {
            print!(" {:.3} |", median(a, i) / median(b, i));
        }
        println!();
    }

    // The bare AEADs, if that group ran.
    let bare: Vec<(&str, &str, Vec<Stat>)> = AEADS
        .iter()
        .filter_map(|(id, what)| {
            let row: Result<Vec<Stat>, String> = SIZES
                .iter()
                .map(|s| load_in(&dir, "aead", id, *s))
                .collect();
            row.ok().map(|r| (*id, *what, r))
        })
        .collect();
    if !bare.is_empty() {
        println!("\nBare AEAD, seal + open in place, no record layer: median ns and GB/s:\n");
        print!("| AEAD |");
        for s in SIZES {
            print!(" {s} B ns | {s} B GB/s |");
        }
        println!();
        print!("|---|");
        for _ in SIZES {
            print!("---:|---:|");
        }
        println!();
        for (id, what, row) in &bare {
            print!("| {what} (`{id}`) |");
            for (size, s) in SIZES.iter().zip(row) {
                print!(" {:.0} | {:.2} |", s.median, gbps(*size, s.median));
            }
            println!();
        }
        println!("\nRecord layer over its bare AEAD (time ratio, medians):\n");
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
        for (name, stack, aead) in [
            (
                "keav[RustCrypto] AES-GCM / RustCrypto AES-GCM",
                "keav-aes256gcm",
                "rustcrypto-aes256gcm",
            ),
            (
                "keav[RustCrypto] ChaCha / RustCrypto ChaCha",
                "keav-chacha20poly1305",
                "rustcrypto-chacha20poly1305",
            ),
            (
                "keav[ring] AES-GCM / ring AES-GCM",
                "keav-ring-aes256gcm",
                "ring-aes256gcm",
            ),
            (
                "keav[ring] ChaCha / ring ChaCha",
                "keav-ring-chacha20poly1305",
                "ring-chacha20poly1305",
            ),
            (
                "rustls AES-GCM / ring AES-GCM",
                "rustls-aes256gcm",
                "ring-aes256gcm",
            ),
            (
                "rustls ChaCha / ring ChaCha",
                "rustls-chacha20poly1305",
                "ring-chacha20poly1305",
            ),
        ] {
            let Some((_, _, row)) = bare.iter().find(|(id, _, _)| *id == aead) else {
                continue;
            };
            if median(stack, 0).is_nan() {
                continue;
            }
            print!("| {name} |");
            for (i, s) in row.iter().enumerate() {
                print!(" {:.2} |", median(stack, i) / s.median);
            }
            println!();
        }
    }

    println!("\nGoals:\n");
    for (keav, tls) in [
        ("keav-ring-aes256gcm", "rustls-aes256gcm"),
        ("keav-ring-chacha20poly1305", "rustls-chacha20poly1305"),
        ("keav-aes256gcm", "rustls-aes256gcm"),
        ("keav-chacha20poly1305", "rustls-chacha20poly1305"),
    ] {
        if median(keav, 0).is_nan() {
            continue;
        }
        let r = median(keav, 0) / median(tls, 0);
        let verdict = if r <= 1.0 { "met" } else { "missed" };
        println!("- 64 B, {keav} / {tls} = {r:.3} (goal ≤ 1.0): {verdict}");
    }
    let last = SIZES.len() - 1;
    for keav in [
        "keav-ring-aes256gcm",
        "keav-ring-chacha20poly1305",
        "keav-aes256gcm",
        "keav-chacha20poly1305",
    ] {
        if median(keav, last).is_nan() {
            continue;
        }
        let g = gbps(SIZES[last], median(keav, last));
        let verdict = if g >= GOAL_GBPS_16K { "met" } else { "missed" };
        println!("- 16 KiB, {keav}: {g:.2} GB/s seal+open (goal ≥ {GOAL_GBPS_16K}): {verdict}");
    }
}
