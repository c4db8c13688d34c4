//! `keav relay` as a process: it prints its TCP address, keeps its mailbox across a SIGKILL,
//! stops gracefully on SIGTERM, and reports bad arguments like the other subcommands. The
//! devices are fake: raw relay frames over TCP (bodies are hand-built durable payloads).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ChildStdout;

use common::*;
use keav_proto::route::{Frame, DEFAULT_HOPS};

fn payload(seq: u64) -> Vec<u8> {
    let mut p = vec![0x44, 1, 0x17];
    p.extend_from_slice(&((seq >> 8) as u32).to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend([0xA5; 32]);
    p
}

fn fwd(src: &str, dst: &str, seq: u64) -> Frame {
    Frame::Forward {
        hops: DEFAULT_HOPS,
        src: src.into(),
        dst: dst.into(),
        body: payload(seq),
    }
}

/// Starts `keav relay` on a TCP port of its choice; returns it, the address it printed and
/// its stdout (kept open).
fn start(mailbox: &Path) -> (Proc, SocketAddr, BufReader<ChildStdout>) {
    let mut p = Proc::spawn(&[
        "relay",
        "--id",
        "R1",
        "--mailbox",
        path_str(mailbox),
        "--listen-tcp",
        "127.0.0.1:0",
        "--route",
        "*=tcp",
    ]);
    let out = p.stdout.take().expect("stdout");
    let (line, out) = Joined::spawn(move || {
        let mut r = BufReader::new(out);
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        (l, r)
    })
    .join_timeout(SHORT);
    let addr = line
        .trim_end()
        .strip_prefix("relay R1 listening tcp=")
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {line:?}; stderr:\n{}",
                p.stderr_text()
            )
        })
        .parse()
        .expect("address");
    (p, addr, out)
}

fn send(s: &mut TcpStream, f: &Frame) {
    let b = f.encode();
    s.write_all(&(b.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&b).unwrap();
}

fn recv(s: &mut TcpStream) -> Frame {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a frame from the relay");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("a frame from the relay");
    Frame::decode(&buf).unwrap()
}

fn attach(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    send(&mut s, &Frame::Attach { id: id.into() });
    s
}

#[test]
fn relay_mailbox_survives_sigkill_and_sigterm_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let mailbox = dir.path().join("relay.redb");
    let (mut relay, addr, _out) = start(&mailbox);

    let mut a = attach(addr, "A");
    for s in 0..10 {
        send(&mut a, &fwd("A", "B", s));
    }
    let mut acked = BTreeSet::new();
    while acked.len() < 10 {
        match recv(&mut a) {
            Frame::Stored { src, dst, seqs, .. } => {
                assert_eq!((src.as_str(), dst.as_str()), ("A", "B"));
                acked.extend(seqs);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, (0..10).collect());

    // Custody was acknowledged, so the entries are committed: SIGKILL loses none.
    relay.kill();
    let st = relay.wait(SHORT);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    drop(a);

    let (mut relay, addr, _out) = start(&mailbox);
    let mut b = attach(addr, "B");
    send(&mut b, &Frame::Pull { window: 64 });
    for s in 0..10 {
        assert_eq!(
            recv(&mut b),
            Frame::Forward {
                hops: DEFAULT_HOPS - 1,
                src: "A".into(),
                dst: "B".into(),
                body: payload(s),
            }
        );
    }
    send(
        &mut b,
        &Frame::Stored {
            src: "A".into(),
            dst: "B".into(),
            stream: 1,
            seqs: (0..10).collect(),
        },
    );
    // A marker B sends itself: once it is acknowledged, the acks before it were applied.
    send(&mut b, &fwd("B", "B", 0));
    loop {
        match recv(&mut b) {
            Frame::Stored { src, .. } if src == "B" => break,
            Frame::Forward { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(b);

    // SIGTERM: a clean exit with status 0.
    let pid = relay.child.id().to_string();
    let k = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(k.success());
    let st = relay.wait(SHORT);
    assert!(st.success(), "{st:?}; stderr:\n{}", relay.stderr_text());

    // Again: only B's own marker is left (A's entries were acknowledged before the stop).
    let (_relay, addr, _out) = start(&mailbox);
    let mut b = attach(addr, "B");
    send(&mut b, &Frame::Pull { window: 64 });
    match recv(&mut b) {
        Frame::Forward { src, dst, body, .. } => {
            assert_eq!((src.as_str(), dst.as_str()), ("B", "B"));
            assert_eq!(body, payload(0));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_relay_arguments_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mb = dir.path().join("m.redb");
    let mb = path_str(&mb);
    // Usage errors (clap): exit 2.
    for args in [
        vec!["relay", "--id", "R", "--mailbox", mb, "--route", "*=udp"],
        vec!["relay", "--id", "R", "--mailbox", mb],
        vec![
            "relay",
            "--id",
            "R",
            "--mailbox",
            mb,
            "--route",
            "*=tcp:h/R2",
        ],
        vec![
            "relay",
            "--id",
            "R",
            "--mailbox",
            mb,
            "--route",
            "*=tcp",
            "--window",
            "0",
        ],
    ] {
        let out = run(&args, SHORT);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
    }
    let out = run(
        &["relay", "--id", "R", "--mailbox", mb, "--route", "x y=tcp"],
        SHORT,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("DST"), "{}", out.stderr);
    // Errors once running: exit 1, one line.
    for args in [
        // A route over a carrier that is not configured.
        vec!["relay", "--id", "R", "--mailbox", mb, "--route", "*=mqtt"],
        // An invalid relay id.
        vec![
            "relay",
            "--id",
            "a b",
            "--mailbox",
            mb,
            "--listen-tcp",
            "127.0.0.1:0",
            "--route",
            "*=tcp",
        ],
    ] {
        let out = run(&args, SHORT);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("keav: error: "), "{}", out.stderr);
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
    }
}
