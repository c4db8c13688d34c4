//! A C2 fleet for end-to-end tests: a server with its identity service and operator API over
//! loopback HTTP, its own Mosquitto (written from keav's configuration, on a free loopback
//! port), and a "tap" broker account with the server's role (it may read the server's topics
//! and write to the devices': a broker-level attacker).
//!
//! Devices and their handlers differ between test files: each file adds its own `agent` and
//! `joined` to [`Fleet`] and uses [`Fleet::approve`] for the operator's part of a join.
//!
//! Waits are bounded (a hang fails the test after [`PATIENCE`]); nothing asserts on timing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keav_c2::acl::{hash_password, BrokerUser, Role};
use keav_c2::agent::{Agent, AgentStatus, Identity};
use keav_c2::engine::JoinPolicy;
use keav_c2::identity::api::EnrollmentRequestBody;
use keav_c2::identity::{Client, IdentityError};
use keav_c2::keys::{Alg, DeviceId};
use keav_c2::registry::{DeviceStatus, Registry};
use keav_c2::server::api::{CommandBody, DecideBody, DecidedBody, SentBody};
use keav_c2::server::client::OperatorClient;
use keav_c2::server::{Server, ServerNotice, ServerOptions};
use keav_c2::wire::{Action, Body, Status, Token};
use zeroize::Zeroizing;

/// How long a test waits for what it expects before failing (bounds a hang).
pub const PATIENCE: Duration = Duration::from_secs(20);
/// The operator token of every test server.
pub const OPERATOR: &str = "operator-token-for-tests-0123456789";

/// Polls `f` until it gives `Some`, failing after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `notices` (bounded) until `f` picks a value out of one; of several picked in one
/// poll, the last.
pub async fn server_notice<T>(
    what: &str,
    notices: &mut tokio::sync::broadcast::Receiver<ServerNotice>,
    mut f: impl FnMut(ServerNotice) -> Option<T>,
) -> T {
    eventually(what, || {
        let mut got = None;
        while let Ok(n) = notices.try_recv() {
            if let Some(t) = f(n) {
                got = Some(t);
            }
        }
        std::future::ready(got)
    })
    .await
}

/// Waits (bounded) until `agent` stands at `want`.
pub async fn reach(agent: &Agent, want: AgentStatus) {
    let r = tokio::time::timeout(PATIENCE, agent.wait_status(|s| s == want)).await;
    assert_eq!(
        r.unwrap_or_else(|_| panic!("{} never reached {want:?}", agent.id())),
        Some(want)
    );
}

/// Whether the broker refuses a fresh connection with these credentials.
pub async fn broker_refuses(port: u16, user: String, pass: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let (_c, mut conn) = super::client(port, "probe", Some((&user, &pass)));
        super::connack(&mut conn).is_err()
    })
    .await
    .unwrap()
}

/// A device's broker credentials, from its data directory.
pub fn broker_creds(data: &Path) -> (String, String) {
    let id = Identity::load(data).unwrap().unwrap();
    (
        id.registration().broker_username.clone(),
        id.registration().broker_password.expose().to_string(),
    )
}

/// An action command (`args` 1, 2, 3) with no target yet.
pub fn action(id: u16) -> CommandBody {
    CommandBody {
        action: Some(id),
        args: Some("AQID".into()),
        ..Default::default()
    }
}

/// [`action`] `id` to the device `dev`.
pub fn action_to(dev: DeviceId, id: u16) -> CommandBody {
    CommandBody {
        device: Some(dev.to_hex()),
        ..action(id)
    }
}

/// [`action`] `id` to every device of `group`.
pub fn action_to_group(group: &str, id: u16) -> CommandBody {
    CommandBody {
        group: Some(group.into()),
        ..action(id)
    }
}

/// The wire body of action `id` with `args`.
pub fn action_body(id: u16, args: Vec<u8>) -> Body {
    Body::Action(Action { action: id, args })
}

/// What the test devices do with an action: note it in `actions`; only action 7 is known.
pub fn run_action(actions: &mut Vec<(u16, Vec<u8>)>, action: u16, args: &[u8]) -> Status {
    actions.push((action, args.to_vec()));
    if action == 7 {
        Status::ActionSuccess
    } else {
        Status::ActionUnknown
    }
}

/// A token in lower-case hex, as the operator API writes it.
pub fn hex(t: &Token) -> String {
    t.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A server with HTTP, its own broker, and the tap account.
pub struct Fleet<R: Registry> {
    pub dir: Arc<tempfile::TempDir>,
    pub server: Server<R>,
    /// Algorithm of the keys devices enroll with.
    pub alg: Alg,
    pub op: OperatorClient,
    pub http: String,
    pub tap_password: Zeroizing<String>,
}

impl<R: Registry> Fleet<R> {
    /// Starts a server in `dir` with `registry`: moderated joins, HTTP on a free loopback
    /// port, then `tweak` on the options, then the tap account with `tap_password`.
    pub async fn start(
        dir: Arc<tempfile::TempDir>,
        registry: R,
        tap_password: Zeroizing<String>,
        tweak: impl FnOnce(&mut ServerOptions),
    ) -> Fleet<R> {
        let mut o = ServerOptions::new(dir.path().join("server"), Zeroizing::new(OPERATOR.into()));
        o.http = Some("127.0.0.1:0".parse().unwrap());
        o.engine.join_policy = JoinPolicy::Moderated;
        tweak(&mut o);
        o.extra_broker_users.push(BrokerUser {
            username: "tap".into(),
            password_hash: hash_password(&tap_password).unwrap(),
            role: Role::Server,
        });
        let server = Server::start(o, registry).await.unwrap();
        let http = format!("http://{}", server.http_addr().unwrap());
        let op = OperatorClient::new(&http, Zeroizing::new(OPERATOR.into())).unwrap();
        Fleet {
            dir,
            server,
            alg: Alg::Ed25519,
            op,
            http,
            tap_password,
        }
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.server
            .broker_addr()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap()
    }

    /// Waits (bounded) until the broker refuses a fresh connection with these credentials.
    pub async fn until_broker_refuses(&self, what: &str, user: &str, pass: &str) {
        let port = self.port();
        eventually(what, || {
            let (u, p) = (user.to_string(), pass.to_string());
            async move { broker_refuses(port, u, p).await.then_some(()) }
        })
        .await;
    }

    /// The identity service's client, with the operator token.
    pub fn operator(&self) -> Client {
        Client::new(&self.http)
            .unwrap()
            .with_operator_token(Zeroizing::new(OPERATOR.into()))
    }

    /// Registers a new device over HTTP (enrollment token from the operator, proof of
    /// possession, keys of [`Fleet::alg`]) into its own data directory.
    pub async fn enroll(&self, name: &str, groups: &[&str]) -> (Identity, PathBuf) {
        let (token, _) = self
            .operator()
            .create_enrollment(&EnrollmentRequestBody {
                ttl_secs: None,
                name: Some(name.into()),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            })
            .await
            .unwrap();
        let data = self.dir.path().join(name);
        let id = Identity::enroll(&data, &self.http, &token, self.alg)
            .await
            .unwrap();
        (id, data)
    }

    /// The operator's part of a simple join: waits for `agent`'s join request, accepts it
    /// over HTTP, and waits until the agent has joined.
    pub async fn approve(&self, agent: &Agent) {
        let dev = agent.id();
        self.join_requested(dev).await;
        let d = self.accept(dev, vec![]).await.unwrap();
        assert!(d.joined);
        reach(agent, AgentStatus::Joined).await;
    }

    /// Waits until the operator API lists a join request of `dev`.
    pub async fn join_requested(&self, dev: DeviceId) {
        eventually("the join request", || async {
            let joins = self.op.joins().await.unwrap();
            joins.iter().any(|j| j.device == dev.to_hex()).then_some(())
        })
        .await;
    }

    /// The operator accepts `dev`'s pending join over HTTP, giving `words` (those a human
    /// join shows; none for a simple join).
    pub async fn accept(
        &self,
        dev: DeviceId,
        words: Vec<String>,
    ) -> Result<DecidedBody, IdentityError> {
        self.op
            .decide(
                &dev.to_hex(),
                &DecideBody {
                    accept: true,
                    words,
                },
            )
            .await
    }

    /// Sends `body` over the operator API (which must accept it).
    pub async fn command(&self, body: &CommandBody) -> SentBody {
        self.op.command(body).await.unwrap()
    }

    /// Waits until `token` has a recorded response and returns its status code.
    pub async fn response(&self, token: &str) -> u8 {
        eventually("a response", || async {
            let t = self.op.responses(&[token.to_string()]).await.unwrap();
            t[0].responses.first().map(|r| r.status)
        })
        .await
    }

    /// The registry's status of `dev`.
    pub async fn status(&self, dev: DeviceId) -> DeviceStatus {
        self.server
            .registry()
            .device(dev)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    /// Stops the server.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
