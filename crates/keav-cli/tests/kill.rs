//! `keav listen` killed with SIGKILL in the middle of a large transfer, then restarted on the
//! same store: the next pairing succeeds and both caches agree (a later session is
//! preshared, which needs the same retained secret on both sides).

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

const LEN: u64 = 40 * 1000 * 1000;

fn session(alice: &Dev, bob: &Dev, code: &str) -> (Paired, Paired) {
    let mut listen = bob.spawn(&["listen", "--code-file", code]);
    let addr = listen.listen_addr().to_string();
    let mut connect = alice.spawn(&["connect", "bob", &addr, "--code-file", code]);
    let bob_got = listen.take_stdout_hasher();
    let alice_got = connect.take_stdout_hasher();
    let b = listen.feed_stdin(11, 100_000);
    let a = connect.feed_stdin(12, 100_000);
    let lp = parse_paired(&listen.paired_line());
    let cp = parse_paired(&connect.paired_line());
    let t = Duration::from_secs(30);
    assert!(listen.wait(t).success(), "{}", listen.stderr_text());
    assert!(connect.wait(t).success(), "{}", connect.stderr_text());
    assert_eq!(bob_got.join_timeout(t), a.join_timeout(t));
    assert_eq!(alice_got.join_timeout(t), b.join_timeout(t));
    assert_eq!(lp.session, cp.session);
    assert_eq!((&lp.keys, &lp.sas), (&cp.keys, &cp.sas), "{lp:?} vs {cp:?}");
    (lp, cp)
}

#[test]
fn listener_killed_mid_transfer_then_restarted_pairs_again_with_agreeing_caches() {
    let dir = tempfile::tempdir().unwrap();
    let code = code_file(dir.path(), "code", "kill-test-code");
    let code = path_str(&code);
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");

    let (first, _) = session(&alice, &bob, code);
    assert_eq!((first.session, first.keys.as_str()), (1, "dh"));

    // Session 2: Alice streams 40 MB; Bob is killed once about half has arrived.
    let mut listen = bob.spawn(&["listen", "--code-file", code]);
    let addr = listen.listen_addr().to_string();
    let mut connect = alice.spawn(&["connect", "bob", &addr, "--code-file", code]);
    let _bob_in = listen.stdin.take();
    let alice_out = connect.take_stdout_collector();
    let fed = connect.feed_stdin(3, LEN);
    let mut out = listen.stdout.take().unwrap();
    let half = Joined::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        while n_total < LEN / 2 {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n_total += n as u64,
            }
        }
        (n_total, out)
    });
    let t = Duration::from_secs(120);
    let (got, _out) = half.join_timeout(t);
    assert!(got >= LEN / 2, "bob's output ended early at {got} bytes");
    listen.kill();
    let ls = listen.wait(Duration::from_secs(10));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&ls), Some(9));
    // Alice notices: the connection ended without Bob's authenticated close (or her
    // writes failed). She exits 1 with one error line, she does not hang.
    drop(_bob_in);
    let cs = connect.wait(Duration::from_secs(30));
    let err = assert_failed(&mut connect, cs);
    eprintln!("alice after the kill: {err}");
    let (sent, _) = fed.join_timeout(Duration::from_secs(30));
    assert!(
        sent < LEN,
        "alice's stdin should have been cut off, all {sent} bytes went"
    );
    let _ = alice_out.join_timeout(Duration::from_secs(30));

    // Restarted Bob, same store: the pairing succeeds.
    let (after, _) = session(&alice, &bob, code);
    assert_eq!(
        after.session, 3,
        "the killed session was already persisted as session 2"
    );
    // Both sides agree on the cache: a further session uses the retained secret (preshared),
    // or if this one re-synchronised with DH, the one after it does.
    let (next, _) = session(&alice, &bob, code);
    eprintln!("after restart: {after:?}; next: {next:?}");
    if after.keys == "dh" {
        assert_eq!(after.verification, "bound", "{after:?}");
    }
    assert_eq!(next.keys, "preshared", "{next:?} (after {after:?})");
    assert_eq!(next.verification, "skipped", "{next:?}");
    assert_eq!(alice.peer_row("bob")[3], "4");
}
