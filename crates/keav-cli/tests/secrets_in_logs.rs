//! No secret reaches the logs at any verbosity: a full pairing with `-vv` and `RUST_LOG=trace`
//! on both sides, then the pairing code must not appear anywhere in what the processes print.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEAV: &str = env!("CARGO_BIN_EXE_keav");
const CODE: &str = "zebra-4711-quartz";

fn keav(store: &std::path::Path) -> Command {
    let mut c = Command::new(KEAV);
    c.arg("--store").arg(store).env("RUST_LOG", "trace");
    c
}

#[test]
fn pairing_code_never_appears_in_trace_logs() {
    let dir = tempfile::tempdir().expect("tmp");
    let code = dir.path().join("code");
    std::fs::write(&code, format!("{CODE}\n")).expect("code file");
    let (a, b) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    for s in [&a, &b] {
        assert!(keav(s).arg("init").status().expect("init").success());
    }
    let mut listener = keav(&b)
        .args(["-vv", "listen", "--bind", "127.0.0.1:0", "--code-file"])
        .arg(&code)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("listen");
    let mut err = BufReader::new(listener.stderr.take().expect("stderr"));
    let mut listener_log = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let mut line = String::new();
        assert!(Instant::now() < deadline, "no listening line");
        if err.read_line(&mut line).expect("read") == 0 {
            panic!("listener exited: {listener_log}");
        }
        listener_log.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("keav: listening on tcp ") {
            break rest.to_string();
        }
    };
    let mut connect = keav(&a)
        .args(["-vv", "connect", "bob", &addr, "--code-file"])
        .arg(&code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("connect");
    connect
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"ping")
        .expect("write");
    let out = connect.wait_with_output().expect("connect output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = listener.wait().expect("listener");
    err.read_to_string(&mut listener_log).expect("read");
    let mut stdout = String::new();
    listener
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    assert!(status.success(), "{listener_log}");
    assert_eq!(stdout, "ping");
    let connect_log = String::from_utf8_lossy(&out.stderr);
    // The logs are real (trace level reached the handshake), and clean.
    assert!(listener_log.contains("paired with"), "{listener_log}");
    assert!(
        listener_log.lines().count() > 3,
        "expected trace output: {listener_log}"
    );
    for log in [&listener_log[..], &connect_log[..]] {
        assert!(!log.contains(CODE), "pairing code leaked into the log");
        assert!(
            !log.contains("4711"),
            "part of the pairing code leaked into the log"
        );
    }
}
