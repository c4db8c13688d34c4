//! A proxy between `keav connect` (Alice) and `keav listen` (Bob) that understands the TCP
//! framing (u32 BE length, kind byte: 0 handshake, 1 record, payload) and, once the
//! handshake is over, tampers with one of Alice's record frames. Bob must never deliver
//! corrupted, reordered or duplicated data: his stdout is a strict prefix of what Alice sent,
//! he exits 1 with a clear error, and Alice exits too (no hang).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flip one ciphertext byte of record K.
    Flip,
    /// Leave record K out.
    Drop,
    /// Send record K twice in a row.
    Duplicate,
    /// Swap records K and K+1.
    Reorder,
    /// Send record K again after record K+3.
    Replay,
}

/// Which record (0-based, among Alice's records) is tampered with.
const K: usize = 5;
/// What Alice sends: 64 records of 16 KiB or more (stdin reads may be shorter).
const LEN: u64 = 1 << 20;

fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((h[4], p))
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(payload);
    v
}

/// Accepts one connection, connects to `server`, copies server→client unchanged and
/// client→server frame by frame, tampering as told. Returns the proxy address.
fn proxy(server: SocketAddr, how: Tamper) -> (SocketAddr, Joined<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let done = Joined::spawn(move || {
        let (mut client, _) = l.accept().unwrap();
        let mut up = TcpStream::connect(server).unwrap();
        let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
        // server -> client: bytes as they come.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
        });
        let mut records = 0usize;
        let mut held: Option<Vec<u8>> = None;
        let mut replay: Option<Vec<u8>> = None;
        while let Some((kind, mut payload)) = read_frame(&mut client) {
            let mut out: Vec<Vec<u8>> = Vec::new();
            if kind == 1 {
                let i = records;
                records += 1;
                match how {
                    Tamper::Flip if i == K => {
                        // Past the 13-byte record header: a ciphertext byte.
                        payload[20] ^= 0x01;
                        out.push(frame(kind, &payload));
                    }
                    Tamper::Drop if i == K => {}
                    Tamper::Duplicate if i == K => {
                        out.push(frame(kind, &payload));
                        out.push(frame(kind, &payload));
                    }
                    Tamper::Reorder if i == K => held = Some(frame(kind, &payload)),
                    Tamper::Reorder if i == K + 1 => {
                        out.push(frame(kind, &payload));
                        out.extend(held.take());
                    }
                    Tamper::Replay if i == K => {
                        replay = Some(frame(kind, &payload));
                        out.push(frame(kind, &payload));
                    }
                    Tamper::Replay if i == K + 3 => {
                        out.push(frame(kind, &payload));
                        out.extend(replay.take());
                    }
                    _ => out.push(frame(kind, &payload)),
                }
            } else {
                out.push(frame(kind, &payload));
            }
            for f in out {
                if up.write_all(&f).is_err() {
                    let _ = client.shutdown(Shutdown::Both);
                    return records;
                }
            }
        }
        let _ = up.shutdown(Shutdown::Write);
        records
    });
    (addr, done)
}

/// `bob_stdin_open`: Bob's own stdin stays open (an interactive session); he must still
/// stop at the attack instead of waiting for his input to end.
fn tamper_run(how: Tamper, bob_stdin_open: bool) {
    let dir = tempfile::tempdir().unwrap();
    let code = code_file(dir.path(), "code", "proxy-test-code");
    let alice = Dev::init(dir.path(), "alice");
    let bob = Dev::init(dir.path(), "bob");
    let mut listen = bob.spawn(&["listen", "--code-file", path_str(&code)]);
    let addr = listen.listen_addr();
    let (paddr, proxied) = proxy(addr, how);
    let mut connect = alice.spawn(&[
        "connect",
        "bob",
        &paddr.to_string(),
        "--code-file",
        path_str(&code),
    ]);

    let bob_got = listen.take_stdout_collector();
    let alice_got = connect.take_stdout_collector();
    let _bob_stdin = listen.stdin.take();
    if !bob_stdin_open {
        drop(_bob_stdin);
    }
    let alice_sent = connect.feed_stdin(7, LEN);

    listen.paired_line();
    connect.paired_line();
    let limit = Duration::from_secs(30);
    let ls = listen.wait(limit);
    let cs = connect.wait(limit);
    let got = bob_got.join_timeout(limit);
    let _ = alice_got.join_timeout(limit);
    let _ = alice_sent.join_timeout(limit);
    let records = proxied.join_timeout(limit);
    // The attack point was reached (the receiver may stop the stream right after it).
    let needed = match how {
        Tamper::Replay => K + 3,
        Tamper::Reorder => K + 1,
        _ => K,
    };
    assert!(
        records > needed,
        "{how:?}: the proxy saw only {records} records"
    );

    let sent = Stream::bytes(7, LEN as usize);
    assert!(
        got.len() < sent.len(),
        "{how:?}: bob delivered {} bytes, all of them despite the tampering",
        got.len()
    );
    assert!(
        sent.starts_with(&got),
        "{how:?}: bob delivered {} bytes that are not a prefix of what alice sent",
        got.len()
    );
    let err = assert_failed(&mut listen, ls);
    assert!(
        err.contains("secure channel") || err.contains("receiving"),
        "{how:?}: unclear error: {err}"
    );
    let words: Vec<&str> = err.split(": ").collect();
    assert!(
        words.windows(2).all(|w| w[0] != w[1]),
        "{how:?}: the error repeats itself: {err}"
    );
    // Alice: clean exit (she got Bob's close and sent everything) or a one-line error.
    if !cs.success() {
        assert_failed(&mut connect, cs);
    }
    eprintln!("{how:?}: bob delivered {} bytes, then: {err}", got.len());
}

#[test]
fn flipped_byte_is_fatal_and_never_delivered() {
    tamper_run(Tamper::Flip, false);
}

#[test]
fn flipped_byte_ends_the_receiver_even_with_its_stdin_open() {
    tamper_run(Tamper::Flip, true);
}

#[test]
fn dropped_record_is_fatal_and_never_skipped_over() {
    tamper_run(Tamper::Drop, false);
}

#[test]
fn duplicated_record_is_fatal_and_never_delivered_twice() {
    tamper_run(Tamper::Duplicate, false);
}

#[test]
fn reordered_records_are_fatal_and_never_delivered_out_of_order() {
    tamper_run(Tamper::Reorder, false);
}

#[test]
fn replayed_record_is_fatal_and_never_delivered_again() {
    tamper_run(Tamper::Replay, false);
}
