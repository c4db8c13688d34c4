//! `keav listen` and `keav connect` as real processes on loopback move 100 MB each way, and
//! what each side received hashes to what the other sent.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LEN: u64 = 100 * 1000 * 1000;

#[test]
fn hundred_megabytes_both_ways_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    let code = code_file(dir.path(), "code", "correct horse battery staple");
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");

    let started = Instant::now();
    let mut listen = bob.spawn(&[
        "listen",
        "--bind",
        "127.0.0.1:0",
        "--code-file",
        path_str(&code),
    ]);
    let addr = listen.listen_addr();
    let mut connect = alice.spawn(&[
        "connect",
        "bob",
        &addr.to_string(),
        "--code-file",
        path_str(&code),
    ]);

    // Different streams each way, so a reflected stream cannot pass for the right one.
    let bob_got = listen.take_stdout_hasher();
    let alice_got = connect.take_stdout_hasher();
    let bob_sent = listen.feed_stdin(0xB0B, LEN);
    let alice_sent = connect.feed_stdin(0xA11CE, LEN);

    let lp = parse_paired(&listen.paired_line());
    let cp = parse_paired(&connect.paired_line());
    assert_eq!((lp.session, cp.session), (1, 1));
    assert_eq!((lp.keys.as_str(), cp.keys.as_str()), ("dh", "dh"));
    assert_eq!(lp.verification, "bound");
    assert_eq!(cp.verification, "bound");
    assert_eq!(lp.sas, cp.sas, "both ends must compute the same SAS");
    assert_eq!(lp.aead, "aes-256-gcm");

    let limit = Duration::from_secs(300);
    let ls = listen.wait(limit);
    let cs = connect.wait(limit);
    assert!(ls.success(), "listen: {}", listen.stderr_text());
    assert!(cs.success(), "connect: {}", connect.stderr_text());

    let (a_n, a_h) = alice_sent.join_timeout(limit);
    let (b_n, b_h) = bob_sent.join_timeout(limit);
    let (bg_n, bg_h) = bob_got.join_timeout(limit);
    let (ag_n, ag_h) = alice_got.join_timeout(limit);
    assert_eq!(a_n, LEN, "alice's stdin accepted everything");
    assert_eq!(b_n, LEN, "bob's stdin accepted everything");
    // Independent expectation: the digest of the deterministic stream itself.
    assert_eq!(a_h, stream_digest(0xA11CE, LEN));
    assert_eq!(b_h, stream_digest(0xB0B, LEN));
    assert_eq!(bg_n, LEN, "bob received all of alice's bytes");
    assert_eq!(bg_h, a_h, "bob received exactly what alice sent");
    assert_eq!(ag_n, LEN, "alice received all of bob's bytes");
    assert_eq!(ag_h, b_h, "alice received exactly what bob sent");
    eprintln!("100 MB each way took {:?}", started.elapsed());
}
