//! Helpers for the `keav` end-to-end tests: real processes, loopback, temp dirs, bounded
//! waits, and children that are killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Generous bound for one short command or one handshake.
pub const SHORT: Duration = Duration::from_secs(30);

/// The `keav` binary built for these tests.
pub fn keav_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keav")
}

/// One device: a store in a temp dir.
pub struct Dev {
    pub store: PathBuf,
}

impl Dev {
    /// Creates `NAME.redb` in `dir` with `keav init`.
    pub fn init(dir: &Path, name: &str) -> Dev {
        let store = dir.join(format!("{name}.redb"));
        let out = run(&["--store", path_str(&store), "init"], SHORT);
        assert!(out.status.success(), "keav init failed: {}", out.stderr);
        assert!(out.stdout.contains("device ZID: "), "{}", out.stdout);
        Dev { store }
    }

    /// `keav --store S ARGS...` as a running process.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let mut all = vec!["--store", path_str(&self.store)];
        all.extend_from_slice(args);
        Proc::spawn(&all)
    }

    /// `keav --store S peers`, stdout.
    pub fn peers(&self) -> String {
        let out = run(&["--store", path_str(&self.store), "peers"], SHORT);
        assert!(out.status.success(), "keav peers failed: {}", out.stderr);
        out.stdout
    }

    /// The `keav peers` row whose label is `label` (split on whitespace).
    pub fn peer_row(&self, label: &str) -> Vec<String> {
        let text = self.peers();
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("no peer {label:?} in\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

/// Writes a pairing-code file.
pub fn code_file(dir: &Path, name: &str, code: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{code}\n")).expect("write code file");
    p
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Output of a finished command.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `keav ARGS` to completion (stdin empty), bounded by `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Output {
    let mut p = Proc::spawn(args);
    drop(p.stdin.take());
    let out = p.take_stdout_collector();
    let status = p.wait(timeout);
    let stdout = out.join_timeout(timeout);
    Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: p.stderr_text(),
    }
}

/// A running `keav` process. Killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Arc<Mutex<bool>>,
    pub args: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(keav_bin())
            .args(args)
            .env_remove("KEAV_STORE")
            .env_remove("KEAV_CONFIG")
            .env_remove("KEAV_PAIRING_CODE")
            .env_remove("RUST_LOG")
            // No user config file is picked up.
            .env("XDG_CONFIG_HOME", "/nonexistent-keav-test-config")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keav");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_done = Arc::new(Mutex::new(false));
        let pipe = child.stderr.take().expect("stderr piped");
        {
            let (lines, done) = (stderr.clone(), stderr_done.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    match line {
                        Ok(l) => lines.lock().unwrap().push(l),
                        Err(_) => break,
                    }
                }
                *done.lock().unwrap() = true;
            });
        }
        Proc {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
            stderr,
            stderr_done,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Everything on stderr so far, one line each.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Stderr so far as text; if the process has exited, first waits (briefly) for the
    /// reader thread to reach EOF so nothing is missed.
    pub fn stderr_text(&mut self) -> String {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            let until = Instant::now() + Duration::from_secs(5);
            while !*self.stderr_done.lock().unwrap() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.stderr_lines().join("\n")
    }

    /// Waits for a stderr line satisfying `pred`; panics (with the stderr so far) on timeout
    /// or if the process exits first.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            let exited = *self.stderr_done.lock().unwrap();
            if exited || Instant::now() >= until {
                panic!(
                    "{:?}: no stderr line {what} ({}); stderr:\n{}",
                    self.args,
                    if exited { "stderr closed" } else { "timed out" },
                    self.stderr_lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address from `keav: listening on tcp ADDR`.
    pub fn listen_addr(&mut self) -> SocketAddr {
        let l = self.wait_line("`listening on`", SHORT, |l| {
            l.starts_with("keav: listening on ")
        });
        l.rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .expect("listen address")
    }

    /// The `keav: paired with ...` line.
    pub fn paired_line(&mut self) -> String {
        self.wait_line("`paired with`", SHORT, |l| {
            l.starts_with("keav: paired with ")
        })
    }

    /// Waits for exit, at most `timeout` (then kills it and panics).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_for(timeout) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{:?} did not exit within {timeout:?}; stderr:\n{}",
                    self.args,
                    self.stderr_lines().join("\n")
                );
            }
        }
    }

    /// Waits for exit, at most `timeout`; `None` if still running.
    pub fn try_wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a thread that collects all of stdout.
    pub fn take_stdout_collector(&mut self) -> Joined<Vec<u8>> {
        let mut out = self.stdout.take().expect("stdout already taken");
        Joined::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        })
    }

    /// Starts a thread that hashes stdout as it comes: (bytes, SHA-256).
    pub fn take_stdout_hasher(&mut self) -> Joined<(u64, [u8; 32])> {
        let out = self.stdout.take().expect("stdout already taken");
        Joined::spawn(move || hash_reader(out))
    }

    /// Starts a thread that writes `len` bytes of the stream `seed` to stdin, then closes it;
    /// yields (bytes written, SHA-256 of what was written). A write error (the process went
    /// away) stops it early.
    pub fn feed_stdin(&mut self, seed: u64, len: u64) -> Joined<(u64, [u8; 32])> {
        let stdin = self.stdin.take().expect("stdin already taken");
        Joined::spawn(move || write_stream(stdin, seed, len))
    }

    /// Closes stdin (the process will send its authenticated close once paired).
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A thread whose result can be awaited with a deadline.
pub struct Joined<T> {
    rx: mpsc::Receiver<T>,
    _h: JoinHandle<()>,
}

impl<T: Send + 'static> Joined<T> {
    pub fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        Joined { rx, _h: h }
    }

    /// The result; panics if it is not there within `timeout`.
    pub fn join_timeout(self, timeout: Duration) -> T {
        self.rx
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("helper thread did not finish within {timeout:?}: {e}"))
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so each side's data is reproducible.
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The first `len` bytes of stream `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Stream::new(seed).fill(&mut v);
        v
    }
}

/// Writes `len` bytes of stream `seed` to `w` in 64 KiB writes, then drops `w`.
pub fn write_stream(mut w: impl Write, seed: u64, len: u64) -> (u64, [u8; 32]) {
    let mut s = Stream::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap();
        s.fill(&mut buf[..n]);
        if w.write_all(&buf[..n]).is_err() {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
    }
    let _ = w.flush();
    drop(w);
    (done, h.finalize().into())
}

/// Hashes everything `r` yields until EOF.
pub fn hash_reader(mut r: impl Read) -> (u64, [u8; 32]) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n_total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                n_total += n as u64;
            }
        }
    }
    (n_total, h.finalize().into())
}

/// SHA-256 of the first `len` bytes of stream `seed`, computed independently of the writer.
pub fn stream_digest(seed: u64, len: u64) -> [u8; 32] {
    let mut s = Stream::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap();
        s.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        done += n as u64;
    }
    h.finalize().into()
}

/// Fields of a `keav: paired with ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paired {
    pub session: u64,
    pub keys: String,
    pub verification: String,
    pub sas: String,
    pub aead: String,
}

/// Parses `keav: paired with [LABEL ]ZID — session N, K keys, verification V[ (B)], SAS S, A`.
pub fn parse_paired(line: &str) -> Paired {
    let rest = line
        .split_once(" — ")
        .unwrap_or_else(|| panic!("not a paired line: {line}"))
        .1;
    let parts: Vec<&str> = rest.split(", ").collect();
    assert_eq!(parts.len(), 5, "paired line fields: {line}");
    let session = parts[0]
        .strip_prefix("session ")
        .expect(line)
        .parse()
        .expect(line);
    let keys = parts[1].strip_suffix(" keys").expect(line).to_string();
    let verification = parts[2]
        .strip_prefix("verification ")
        .expect(line)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let sas = parts[3].strip_prefix("SAS ").expect(line).to_string();
    Paired {
        session,
        keys,
        verification,
        sas,
        aead: parts[4].to_string(),
    }
}

/// Asserts a process failed the way the CLI promises: status 1, a `keav: error:` line.
pub fn assert_failed(p: &mut Proc, status: ExitStatus) -> String {
    let err = p.stderr_text();
    assert_eq!(
        status.code(),
        Some(1),
        "{:?} should exit 1; stderr:\n{err}",
        p.args
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("keav: error: "))
        .unwrap_or_else(|| panic!("{:?}: no `keav: error:` line in:\n{err}", p.args))
        .to_string();
    line
}
