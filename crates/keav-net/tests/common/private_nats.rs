//! A nats-server with JetStream of the test's own: tests that create a JetStream stream must
//! not leave it on the shared server, whose stream would then keep every `keav.v1` message
//! any other test or run publishes there (it captures the subjects, whoever publishes).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// A private nats-server (JetStream on, storage in a temporary directory) on a free loopback
/// port, killed when dropped.
pub struct PrivateNats {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl PrivateNats {
    /// Starts one and waits (bounded) until it listens; `None` if nats-server is missing.
    pub fn start() -> Option<PrivateNats> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = TempDir::new().ok()?;
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let n = PrivateNats {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        for _ in 0..400 {
            if std::net::TcpStream::connect(&n.addr).is_ok() {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the private nats-server never listened on {}", n.addr);
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
