//! A man in the middle made of two real `keav` processes: M1 = `keav listen` (Alice connects
//! to it), M2 = `keav connect` to the real Bob; M1's output is piped into M2 and back. Mallory
//! does not know Alice and Bob's pairing code, so both victims refuse, exit 1, say why, and
//! count the refusal toward lockout.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// Copies `r` to `w` until EOF or an error, then closes `w`.
fn pump(mut r: impl Read + Send + 'static, mut w: impl Write + Send + 'static) -> Joined<u64> {
    Joined::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut n_total = 0u64;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    n_total += n as u64;
                }
            }
        }
        n_total
    })
}

#[test]
fn relay_of_two_keav_processes_is_refused_by_both_victims() {
    let dir = tempfile::tempdir().unwrap();
    let shared = code_file(dir.path(), "shared", "alice-and-bob-only");
    let guess = code_file(dir.path(), "mallory", "mallory-guess");
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");
    let m1 = Dev::init(dir.path(), "m1");
    let m2 = Dev::init(dir.path(), "m2");

    let mut bob_l = bob.spawn(&["listen", "--code-file", path_str(&shared)]);
    let bob_addr = bob_l.listen_addr().to_string();
    let mut m1_l = m1.spawn(&["listen", "--code-file", path_str(&guess)]);
    let m1_addr = m1_l.listen_addr().to_string();
    let mut m2_c = m2.spawn(&["connect", "bob", &bob_addr, "--code-file", path_str(&guess)]);
    // M1's stdout -> M2's stdin and back.
    let p1 = pump(m1_l.stdout.take().unwrap(), m2_c.stdin.take().unwrap());
    let p2 = pump(m2_c.stdout.take().unwrap(), m1_l.stdin.take().unwrap());
    let mut alice_c = alice.spawn(&["connect", "bob", &m1_addr, "--code-file", path_str(&shared)]);
    let alice_out = alice_c.take_stdout_collector();
    let bob_out = bob_l.take_stdout_collector();
    let _alice_in = alice_c.stdin.take();
    let _bob_in = bob_l.stdin.take();

    let t = Duration::from_secs(30);
    for (who, p) in [("alice", &mut alice_c), ("bob", &mut bob_l)] {
        let status = p.wait(t);
        let err = assert_failed(p, status);
        eprintln!("{who}: {err}");
        assert!(err.contains("refused"), "{who}: {err}");
        assert!(err.contains("(counted toward lockout)"), "{who}: {err}");
        assert!(
            !p.stderr_text().contains("paired with"),
            "{who} must never report a pairing:\n{}",
            p.stderr_text()
        );
    }
    // Nothing reached either victim's stdout, and nothing went through Mallory's relay.
    assert!(alice_out.join_timeout(t).is_empty());
    assert!(bob_out.join_timeout(t).is_empty());
    m1_l.wait(t);
    m2_c.wait(t);
    assert_eq!(p1.join_timeout(t), 0);
    assert_eq!(p2.join_timeout(t), 0);

    // The refusals are on record.
    let row = alice.peer_row("bob");
    let text = row.join(" ");
    assert!(
        text.ends_with("1 failures") || text.contains("locked"),
        "alice's peers: {text}"
    );
    // Bob never learnt who called (M2 failed its first contact): the failure is counted in
    // the shared budget of unknown callers.
    let peers = bob.peers();
    let line = peers
        .lines()
        .find(|l| l.starts_with("unknown callers"))
        .unwrap_or_else(|| panic!("bob's peers must show the failed attempt:\n{peers}"));
    assert!(line.ends_with(": 1 failures"), "{line}");

    // And they stay on record: the next failed attempt counts a second failure.
    let mut m1_l = m1.spawn(&["listen", "--code-file", path_str(&guess)]);
    let m1_addr = m1_l.listen_addr().to_string();
    let mut alice_c = alice.spawn(&["connect", "bob", &m1_addr, "--code-file", path_str(&shared)]);
    let s = alice_c.wait(t);
    assert_failed(&mut alice_c, s);
    m1_l.wait(t);
    let text = alice.peer_row("bob").join(" ");
    assert!(
        text.ends_with("2 failures") || text.contains("locked"),
        "alice's peers: {text}"
    );
}
