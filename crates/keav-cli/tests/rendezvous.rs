//! Discovery through `keav rendezvous serve`: Bob registers while listening, Alice finds him
//! by identifier, they pair and exchange data. A rendezvous entry that points at someone else
//! (Carol, who does not know Alice and Bob's code) cannot make a pairing succeed: Alice
//! refuses, and the refusal counts.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn serve() -> (Proc, String) {
    let mut server = Proc::spawn(&["rendezvous", "serve", "--bind", "127.0.0.1:0"]);
    let line = server.wait_line("`rendezvous listening on`", SHORT, |l| {
        l.starts_with("keav: rendezvous listening on ")
    });
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (server, addr)
}

#[test]
fn pair_through_rendezvous_and_a_lying_server_cannot_make_it_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let shared = code_file(dir.path(), "shared", "alice-bob-rendezvous");
    let carols = code_file(dir.path(), "carol", "carol-has-another-code");
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");
    let carol = Dev::init(dir.path(), "carol");
    let (_server, rv) = serve();
    let t = Duration::from_secs(30);

    let mut listen = bob.spawn(&[
        "listen",
        "--register",
        "bob-dev",
        "--rendezvous",
        &rv,
        "--code-file",
        path_str(&shared),
    ]);
    let bob_addr = listen.listen_addr();
    listen.wait_line("`registered`", SHORT, |l| {
        l.starts_with("keav: registered \"bob-dev\"")
    });
    // The lookup command finds exactly the address Bob bound.
    let out = run(&["rendezvous", "lookup", "bob-dev", "--server", &rv], t);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), bob_addr.to_string());

    let mut connect = alice.spawn(&[
        "connect",
        "bob",
        "--rendezvous",
        &rv,
        "--peer-id",
        "bob-dev",
        "--code-file",
        path_str(&shared),
    ]);
    listen
        .stdin
        .take()
        .unwrap()
        .write_all(b"from bob via rendezvous\n")
        .unwrap();
    connect
        .stdin
        .take()
        .unwrap()
        .write_all(b"from alice via rendezvous\n")
        .unwrap();
    let bob_got = listen.take_stdout_collector();
    let alice_got = connect.take_stdout_collector();
    let lp = parse_paired(&listen.paired_line());
    let cp = parse_paired(&connect.paired_line());
    assert_eq!(
        (cp.session, cp.keys.as_str(), cp.verification.as_str()),
        (1, "dh", "bound")
    );
    assert_eq!(lp.sas, cp.sas);
    assert!(listen.wait(t).success(), "{}", listen.stderr_text());
    assert!(connect.wait(t).success(), "{}", connect.stderr_text());
    assert_eq!(bob_got.join_timeout(t), b"from alice via rendezvous\n");
    assert_eq!(alice_got.join_timeout(t), b"from bob via rendezvous\n");

    let mut carol_l = carol.spawn(&["listen", "--code-file", path_str(&carols)]);
    let carol_addr = carol_l.listen_addr().to_string();
    // The honest server does not let anyone else take over Bob's identifier...
    let out = run(
        &[
            "rendezvous",
            "register",
            "bob-dev",
            &carol_addr,
            "--server",
            &rv,
        ],
        t,
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("keav: error: "), "{}", out.stderr);
    // ...so the lie comes from the server itself: one that maps bob-dev to Carol.
    let (_liar, rv) = serve();
    let out = run(
        &[
            "rendezvous",
            "register",
            "bob-dev",
            &carol_addr,
            "--server",
            &rv,
        ],
        t,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let out = run(&["rendezvous", "lookup", "bob-dev", "--server", &rv], t);
    assert_eq!(out.stdout.trim(), carol_addr);

    // Alice, who knows Bob already, and a fresh device of hers that never met him.
    let alice2 = Dev::init(dir.path(), "alice2");
    for (who, dev) in [("alice", &alice), ("alice2", &alice2)] {
        let mut connect = dev.spawn(&[
            "connect",
            "bob",
            "--rendezvous",
            &rv,
            "--peer-id",
            "bob-dev",
            "--code-file",
            path_str(&shared),
        ]);
        let _in = connect.stdin.take();
        let st = connect.wait(t);
        let err = assert_failed(&mut connect, st);
        eprintln!("{who} against carol: {err}");
        assert!(err.contains("refused"), "{who}: {err}");
        assert!(err.contains("(counted toward lockout)"), "{who}: {err}");
        assert!(
            !connect.stderr_text().contains("paired with"),
            "{}",
            connect.stderr_text()
        );
        let row = dev.peer_row("bob").join(" ");
        assert!(
            row.ends_with("1 failures") || row.contains("locked"),
            "{who}: {row}"
        );
        // Carol's listener handled this one attempt and failed too; start her again.
        let st = carol_l.wait(t);
        assert_failed(&mut carol_l, st);
        carol_l = carol.spawn(&[
            "listen",
            "--bind",
            &carol_addr,
            "--code-file",
            path_str(&carols),
        ]);
        carol_l.listen_addr();
    }
    // Alice's cache of the real Bob survived: session 1 is still the last good one.
    assert_eq!(alice.peer_row("bob")[3], "1");
}
