//! Twelve sessions in `normal` mode (N = 10), a fresh `keav listen` process each time and the
//! same stores: DH and a bound equality test on sessions 1 and 11, preshared keys and no test
//! on the others; `keav peers` counts 12 sessions on both sides.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn twelve_reconnects_follow_the_normal_mode_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let code = code_file(dir.path(), "code", "reconnect-code");
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");
    let code = path_str(&code);
    for n in 1..=12u64 {
        let mut listen = bob.spawn(&["listen", "--mode", "normal", "--code-file", code]);
        let addr = listen.listen_addr().to_string();
        let mut connect = alice.spawn(&[
            "connect",
            "bob",
            &addr,
            "--mode",
            "normal",
            "--code-file",
            code,
        ]);
        // A few bytes each way, so each session is also shown to carry data.
        let to_bob = format!("hello bob, session {n}\n");
        let to_alice = format!("hello alice, session {n}\n");
        use std::io::Write;
        listen
            .stdin
            .take()
            .unwrap()
            .write_all(to_alice.as_bytes())
            .unwrap();
        connect
            .stdin
            .take()
            .unwrap()
            .write_all(to_bob.as_bytes())
            .unwrap();
        let bob_got = listen.take_stdout_collector();
        let alice_got = connect.take_stdout_collector();

        let lp = parse_paired(&listen.paired_line());
        let cp = parse_paired(&connect.paired_line());
        let (keys, verification) = if n == 1 || n == 11 {
            ("dh", "bound")
        } else {
            ("preshared", "skipped")
        };
        for (who, p) in [("bob", &lp), ("alice", &cp)] {
            assert_eq!(p.session, n, "{who}'s session number");
            assert_eq!(p.keys, keys, "{who}, session {n}");
            assert_eq!(p.verification, verification, "{who}, session {n}");
        }
        assert_eq!(lp.sas, cp.sas, "session {n}: SAS differs");
        if n == 1 || n == 11 {
            let line = connect.paired_line();
            assert!(line.contains("verification bound (cpace)"), "{line}");
        }
        let t = Duration::from_secs(30);
        assert!(listen.wait(t).success(), "{}", listen.stderr_text());
        assert!(connect.wait(t).success(), "{}", connect.stderr_text());
        assert_eq!(bob_got.join_timeout(t), to_bob.as_bytes());
        assert_eq!(alice_got.join_timeout(t), to_alice.as_bytes());
    }
    let row = alice.peer_row("bob");
    // label zid mode sessions ...
    assert_eq!(row[2], "normal", "{row:?}");
    assert_eq!(row[3], "12", "alice's peers: {row:?}");
    assert_eq!(row.last().unwrap(), "-", "no lockout failures: {row:?}");
    let text = alice.peers();
    // The column shows the latest session's verification outcome.
    assert!(text.contains("skipped (session 12)"), "{text}");
    // Bob knows Alice by ZID only (she called him): one row, 12 sessions.
    let row = bob.peer_row("-");
    assert_eq!(row[3], "12", "bob's peers: {row:?}");
}
