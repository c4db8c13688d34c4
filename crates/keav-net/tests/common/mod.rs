//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod private_nats;
pub mod spy;

use std::time::Duration;

use keav_net::device::{Device, DeviceSettings};
use keav_verify::VerifySecret;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Settings with this pairing secret and a short handshake deadline.
pub fn settings(secret: Option<&str>) -> DeviceSettings {
    DeviceSettings {
        verify_secret: secret.map(VerifySecret::from),
        handshake_timeout: Duration::from_secs(5),
        ..DeviceSettings::default()
    }
}

/// A fresh device with its store in `dir`.
pub fn device(dir: &TempDir, name: &str, settings: DeviceSettings) -> Device {
    Device::open(dir.path().join(format!("{name}.keav")), settings).unwrap()
}

/// Deterministic pseudo-random test data.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256(d: &[u8]) -> [u8; 32] {
    Sha256::digest(d).into()
}

pub fn init_tracing() {}
