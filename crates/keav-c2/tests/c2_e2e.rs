//! Issue 6, end to end: a C2 server (`keav_c2::server`) that writes the Mosquitto
//! configuration and starts a private broker on a free loopback port, its identity service
//! and operator API over loopback HTTP, and device agents (`keav_c2::agent`) that register
//! over HTTP, join, take commands and updates, and are revoked.
//!
//! Waits are bounded (a hang fails the test after `PATIENCE`); nothing asserts on timing.

mod common;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keav_c2::acl::new_password;
use keav_c2::agent::{
    Agent, AgentError, AgentNotice, AgentOptions, AgentStatus, Handlers, Identity, StateStore,
};
use keav_c2::engine::{DropReason, EngineError, JoinPolicy, JoinRequestKind, ServerEvent};
use keav_c2::identity::IdentityError;
use keav_c2::keys::{Alg, DeviceId};
use keav_c2::registry::{DeviceStatus, RedbRegistry, Registry};
use keav_c2::server::api::{CommandBody, DecideBody, UpdateBody, ValueBody};
use keav_c2::server::{RateLimit, ServerError, ServerNotice, ServerOptions};
use keav_c2::wire::{Data, JoinCode, Status};
use sha2::{Digest, Sha256};

use common::fleet::{
    action_body, action_to, action_to_group, broker_creds, eventually, hex, reach, run_action,
    server_notice, OPERATOR, PATIENCE,
};

/// What a test device saw and did.
#[derive(Default)]
struct Log {
    actions: Vec<(u16, Vec<u8>)>,
    data: Vec<Data>,
    words: Vec<Vec<String>>,
    activated: Vec<Vec<u8>>,
    joined: usize,
    refused: Vec<Status>,
    terminated: usize,
    deregistered: usize,
}

/// Codes presented by joining devices, as observers could see them (a shared "screen").
type Screen = Arc<Mutex<HashMap<DeviceId, JoinCode>>>;

struct TestHandlers {
    me: DeviceId,
    log: Arc<Mutex<Log>>,
    screen: Screen,
    /// Joining devices this observer lies about (reports a wrong code).
    lie_about: Vec<DeviceId>,
}

impl Handlers for TestHandlers {
    fn on_action(&mut self, action: u16, args: &[u8]) -> Status {
        run_action(&mut self.log.lock().unwrap().actions, action, args)
    }
    fn on_data(&mut self, data: &Data, confidential: bool) -> Status {
        assert!(!confidential, "no confidential session in these tests");
        self.log.lock().unwrap().data.push(data.clone());
        Status::DataSuccess
    }
    fn on_activate(&mut self, _digest: &[u8; 32], update: &[u8]) -> Status {
        self.log.lock().unwrap().activated.push(update.to_vec());
        Status::ActivateSuccess
    }
    fn on_show_words(&mut self, words: &[&'static str]) {
        let w = words.iter().map(|s| s.to_string()).collect();
        self.log.lock().unwrap().words.push(w);
    }
    fn on_present_code(&mut self, code: &JoinCode) {
        self.screen.lock().unwrap().insert(self.me, code.clone());
    }
    fn on_observation(&mut self, joining: DeviceId) -> Option<JoinCode> {
        // The joining device may not have shown its code yet: look for a while, as a
        // person or a camera would.
        let deadline = Instant::now() + Duration::from_secs(5);
        let seen = loop {
            if let Some(c) = self.screen.lock().unwrap().get(&joining).cloned() {
                break c;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if self.lie_about.contains(&joining) {
            let mut b = seen.as_bytes().to_vec();
            b[0] ^= 1;
            return JoinCode::from_bytes(&b);
        }
        Some(seen)
    }
    fn on_joined(&mut self) {
        self.log.lock().unwrap().joined += 1;
    }
    fn on_join_refused(&mut self, status: Status) {
        self.log.lock().unwrap().refused.push(status);
    }
    fn on_terminated(&mut self) {
        self.log.lock().unwrap().terminated += 1;
    }
    fn on_deregistered(&mut self) {
        self.log.lock().unwrap().deregistered += 1;
    }
}

/// The common fleet (server with HTTP, its own broker, and a "tap" broker account with the
/// server role: used to replay captured commands as a broker-level attacker), with the
/// "screen" the test devices show their join codes on.
struct Fleet<R: Registry = RedbRegistry> {
    core: common::fleet::Fleet<R>,
    screen: Screen,
}

impl<R: Registry> Deref for Fleet<R> {
    type Target = common::fleet::Fleet<R>;
    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

impl<R: Registry> DerefMut for Fleet<R> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.core
    }
}

impl Fleet {
    async fn start(policy: JoinPolicy) -> Fleet {
        Fleet::start_with(policy, |_| {}).await
    }

    async fn start_with(policy: JoinPolicy, tweak: impl FnOnce(&mut ServerOptions)) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let registry = RedbRegistry::open(&dir.path().join("registry.redb")).unwrap();
        Fleet::start_on(dir, registry, policy, tweak).await
    }
}

impl<R: Registry> Fleet<R> {
    async fn start_on(
        dir: tempfile::TempDir,
        registry: R,
        policy: JoinPolicy,
        tweak: impl FnOnce(&mut ServerOptions),
    ) -> Fleet<R> {
        let core = common::fleet::Fleet::start(Arc::new(dir), registry, new_password(), |o| {
            o.engine.join_policy = policy;
            tweak(o);
        })
        .await;
        Fleet {
            core,
            screen: Screen::default(),
        }
    }

    async fn agent(
        &self,
        identity: Identity,
        data: &Path,
        join: Option<JoinRequestKind>,
        lie_about: Vec<DeviceId>,
    ) -> (Agent, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let h = TestHandlers {
            me: identity.device_id(),
            log: log.clone(),
            screen: self.screen.clone(),
            lie_about,
        };
        let mut o = AgentOptions::new(StateStore::Dir(data.to_path_buf()));
        o.join = join;
        (Agent::start(identity, o, h).await.unwrap(), log)
    }

    /// A joined device: enrolled over HTTP, simple join approved by the operator over HTTP.
    async fn joined(
        &self,
        name: &str,
        groups: &[&str],
    ) -> (Agent, Arc<Mutex<Log>>, std::path::PathBuf) {
        let (id, data) = self.enroll(name, groups).await;
        let (agent, log) = self
            .agent(id, &data, Some(JoinRequestKind::Simple), vec![])
            .await;
        self.approve(&agent).await;
        (agent, log, data)
    }

    async fn shutdown(self) {
        self.core.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_join_command_respond_then_revoke() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (agent, log, data) = fleet.joined("pump-1", &["pumps"]).await;
    let dev = agent.id();
    assert_eq!(fleet.status(dev).await, DeviceStatus::Joined);

    // An action to the device, by id, over the operator API: the response is recorded under
    // the command's token.
    let sent = fleet.command(&action_to(dev, 7)).await;
    assert_eq!(sent.sent.len(), 1);
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log.lock().unwrap().actions, vec![(7, vec![1, 2, 3])]);
    // An action the device does not know: answered, not run as another.
    let sent = fleet.command(&action_to_group("pumps", 9)).await;
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::ActionUnknown.code()
    );
    // Typed data.
    let sent = fleet
        .command(&CommandBody {
            device: Some(dev.to_hex()),
            data_id: Some("setpoint".into()),
            value: Some(ValueBody::U64(42)),
            ..Default::default()
        })
        .await;
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::DataSuccess.code()
    );
    assert_eq!(log.lock().unwrap().data[0].id, "setpoint");

    // Revocation through the identity service's route: registry, engine, broker.
    let (user, pass) = broker_creds(&data);
    fleet.operator().revoke(dev).await.unwrap();
    fleet
        .until_broker_refuses("the broker to refuse the revoked device", &user, &pass)
        .await;
    // The server refuses to command it…
    let to_revoked = action_to(dev, 7);
    assert!(fleet.op.command(&to_revoked).await.is_err());
    // …and a group command skips it.
    let sent = fleet.command(&action_to_group("pumps", 7)).await;
    assert!(sent.sent.is_empty());
    assert_eq!(sent.skipped.len(), 1);
    // What the revoked agent still sends reaches nothing: the broker cut it off.
    let before = fleet.server.counters().await.accepted();
    let _ = agent
        .send_data(Data {
            id: "late".into(),
            value: keav_c2::wire::Value::U8(1),
        })
        .await;
    // A marker from a live device shows the server has processed what came before it.
    let (other, _, _) = fleet.joined("pump-2", &[]).await;
    let after = fleet.server.counters().await.accepted();
    // pump-2's join request is the only message accepted since.
    assert_eq!(after, before + 1);
    drop(other);
    drop(agent);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_moderated_join_wrong_words_refused_right_words_accepted() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (id, data) = fleet.enroll("cam-1", &[]).await;
    let dev = id.device_id();
    let (agent, log) = fleet
        .agent(id, &data, Some(JoinRequestKind::Human), vec![])
        .await;
    let words = eventually("the words on the console", || async {
        let joins = fleet.op.joins().await.unwrap();
        joins
            .into_iter()
            .find(|j| j.device == dev.to_hex())
            .and_then(|j| j.words)
    })
    .await;
    // The device shows the same words.
    let shown = eventually("the words on the device", || async {
        log.lock().unwrap().words.first().cloned()
    })
    .await;
    assert_eq!(shown, words);
    // Accepted without the words: refused as a call (409), the join stays pending.
    match fleet.accept(dev, vec![]).await {
        Err(IdentityError::Refused { status: 409, code }) => {
            assert!(code.starts_with("words_required"), "{code}")
        }
        other => panic!("{other:?}"),
    }
    let still = fleet.op.joins().await.unwrap();
    assert!(still
        .iter()
        .any(|j| j.device == dev.to_hex() && j.words.as_ref() == Some(&words)));
    // The operator types one word wrong: refused, and the attempt is over.
    let mut wrong = words.clone();
    wrong[0] = if wrong[0] == "acid" {
        "aim".into()
    } else {
        "acid".into()
    };
    let d = fleet.accept(dev, wrong).await.unwrap();
    assert!(!d.joined);
    eventually("the refusal on the device", || async {
        (!log.lock().unwrap().refused.is_empty()).then_some(())
    })
    .await;
    assert_eq!(agent.status(), AgentStatus::Registered);
    assert_eq!(log.lock().unwrap().refused, vec![Status::JoinRefused]);
    // The right words afterwards do not help: no join is pending any more.
    assert!(fleet.accept(dev, words.clone()).await.is_err());
    // A new attempt gets a new code; the right words join the device.
    agent.request_join(JoinRequestKind::Human).await.unwrap();
    let words2 = eventually("new words", || async {
        let l = log.lock().unwrap();
        (l.words.len() == 2).then(|| l.words[1].clone())
    })
    .await;
    let console = eventually("the console words", || async {
        fleet
            .op
            .joins()
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.device == dev.to_hex())
            .and_then(|j| j.words)
    })
    .await;
    assert_eq!(console, words2);
    let d = fleet.accept(dev, words2).await.unwrap();
    assert!(d.joined);
    reach(&agent, AgentStatus::Joined).await;
    assert_eq!(fleet.status(dev).await, DeviceStatus::Joined);
    drop(agent);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observed_join_confirmed_by_a_second_device_and_refused_on_a_wrong_code() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    // The observer is a joined device; it lies about "liar-target".
    let (id_c, data_c) = fleet.enroll("lied-about", &[]).await;
    let c = id_c.device_id();
    let (id_o, data_o) = fleet.enroll("observer", &[]).await;
    let o = id_o.device_id();
    let (observer, _) = fleet
        .agent(id_o, &data_o, Some(JoinRequestKind::Simple), vec![c])
        .await;
    eventually("observer's join request", || async {
        (!fleet.server.pending_joins().await.is_empty()).then_some(())
    })
    .await;
    assert!(fleet.server.decide(o, true, &[]).await.unwrap());
    reach(&observer, AgentStatus::Joined).await;

    // B asks to join, vouched for by the observer: the observer reports the code B shows.
    let (id_b, data_b) = fleet.enroll("newcomer", &[]).await;
    let (b, _) = fleet
        .agent(
            id_b,
            &data_b,
            Some(JoinRequestKind::Observed { observer: o }),
            vec![],
        )
        .await;
    reach(&b, AgentStatus::Joined).await;

    // C asks the same, but the observer reports another code: refused.
    let (cagent, clog) = fleet
        .agent(
            id_c,
            &data_c,
            Some(JoinRequestKind::Observed { observer: o }),
            vec![],
        )
        .await;
    eventually("C's refusal", || async {
        (!clog.lock().unwrap().refused.is_empty()).then_some(())
    })
    .await;
    assert_eq!(cagent.status(), AgentStatus::Registered);
    assert_eq!(fleet.status(c).await, DeviceStatus::Registered);
    drop((observer, b, cagent));
    fleet.shutdown().await;
}

/// A plain HTTP file server on 127.0.0.1:0 serving `files` by path.
async fn file_server(
    files: HashMap<&'static str, Vec<u8>>,
) -> (String, tokio::task::JoinHandle<()>) {
    use axum::extract::{Path as AxPath, State};
    use axum::http::StatusCode;
    let files = Arc::new(files);
    let app = axum::Router::new()
        .route(
            "/:name",
            axum::routing::get(
                |State(f): State<Arc<HashMap<&'static str, Vec<u8>>>>,
                 AxPath(name): AxPath<String>| async move {
                    match f.get(name.as_str()) {
                        Some(b) => Ok(b.clone()),
                        None => Err(StatusCode::NOT_FOUND),
                    }
                },
            ),
        )
        .with_state(files);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}"), t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_flow_right_digest_activates_wrong_digest_fails() {
    let firmware = b"keav firmware 2.0 \x00\x01\x02".repeat(1000);
    let digest: [u8; 32] = Sha256::digest(&firmware).into();
    let hexd: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let (base, files) = file_server(HashMap::from([("fw.bin", firmware.clone())])).await;
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (agent, log, _) = fleet.joined("valve-1", &[]).await;
    let dev = agent.id().to_hex();

    // Right digest: downloaded, verified, reported; then activated.
    let sent = fleet
        .op
        .update(&UpdateBody {
            device: Some(dev.clone()),
            group: None,
            url: format!("{base}/fw.bin"),
            digest: hexd.clone(),
        })
        .await
        .unwrap();
    let token = sent.sent[0].token.clone();
    assert_eq!(fleet.response(&token).await, Status::UpdateSuccess.code());
    fleet
        .op
        .activate(&keav_c2::server::api::ActivateBody {
            device: dev.clone(),
            token: token.clone(),
        })
        .await
        .unwrap();
    eventually("the activation", || async {
        let t = fleet
            .op
            .responses(std::slice::from_ref(&token))
            .await
            .unwrap();
        t[0].responses
            .iter()
            .any(|r| r.status == Status::ActivateSuccess.code())
            .then_some(())
    })
    .await;
    assert_eq!(log.lock().unwrap().activated, vec![firmware.clone()]);

    // Wrong digest: the device reports the mismatch, and the update cannot be activated.
    let mut bad = digest;
    bad[31] ^= 1;
    let badhex: String = bad.iter().map(|b| format!("{b:02x}")).collect();
    let sent = fleet
        .op
        .update(&UpdateBody {
            device: Some(dev.clone()),
            group: None,
            url: format!("{base}/fw.bin"),
            digest: badhex,
        })
        .await
        .unwrap();
    let bad_token = sent.sent[0].token.clone();
    assert_eq!(
        fleet.response(&bad_token).await,
        Status::UpdateFailDigest.code()
    );
    assert!(fleet
        .op
        .activate(&keav_c2::server::api::ActivateBody {
            device: dev.clone(),
            token: bad_token,
        })
        .await
        .is_err());
    // A missing file: an HTTP failure status.
    let sent = fleet
        .op
        .update(&UpdateBody {
            device: Some(dev.clone()),
            group: None,
            url: format!("{base}/nope.bin"),
            digest: hexd,
        })
        .await
        .unwrap();
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::UpdateFailHttp.code()
    );
    assert_eq!(log.lock().unwrap().activated.len(), 1);
    files.abort();
    drop(agent);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_then_replay_has_no_effect() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (agent, log, data) = fleet.joined("meter-1", &[]).await;
    let dev = agent.id();
    let mut notices = fleet.server.notices();
    let token = fleet
        .server
        .command(dev, action_body(7, vec![]))
        .await
        .unwrap();
    // The signed command as it went over the broker.
    let captured = server_notice("the published command", &mut notices, |n| match n {
        ServerNotice::Published {
            token: t, bytes, ..
        } if t == token => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(
        fleet.response(&hex(&token)).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log.lock().unwrap().actions.len(), 1);

    // Kill the agent and start it again from its data directory.
    agent.stop().await.ok();
    let identity = Identity::load(&data).unwrap().unwrap();
    let (agent, log2) = fleet.agent(identity, &data, None, vec![]).await;
    assert_eq!(agent.status(), AgentStatus::Joined);
    let mut an = agent.notices();

    // Replay the captured command through the broker (an account with the server's rights).
    let topic = keav_c2::topics::Topics::new(fleet.server.id()).to_device(dev);
    let (port, pass) = (fleet.port(), fleet.tap_password.to_string());
    tokio::task::spawn_blocking(move || {
        let mut tap = common::connected(port, "tap", &pass);
        tap.publish(&topic, &captured);
    })
    .await
    .unwrap();
    let reason = eventually("the replay to be dropped", || {
        let mut got = None;
        while let Ok(n) = an.try_recv() {
            if let AgentNotice::Dropped(d) = n {
                got = Some(d.reason);
            }
        }
        std::future::ready(got)
    })
    .await;
    assert_eq!(reason, DropReason::Replay);
    assert_eq!(agent.counters().get(DropReason::Replay), 1);
    assert!(log2.lock().unwrap().actions.is_empty(), "the replay ran");

    // The restarted agent still takes fresh commands.
    let t2 = fleet
        .server
        .command(dev, action_body(7, vec![9]))
        .await
        .unwrap();
    assert_eq!(
        fleet.response(&hex(&t2)).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log2.lock().unwrap().actions, vec![(7, vec![9])]);
    drop(agent);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_resign_and_deregister_end_to_end() {
    let fleet = Fleet::start(JoinPolicy::Automatic).await;
    let (id, data) = fleet.enroll("sensor-1", &[]).await;
    let dev = id.device_id();
    let (agent, log) = fleet
        .agent(id, &data, Some(JoinRequestKind::Simple), vec![])
        .await;
    reach(&agent, AgentStatus::Joined).await;

    // Terminate: the device is registered again on both sides.
    fleet
        .op
        .device_verb(&dev.to_hex(), "terminate")
        .await
        .unwrap();
    reach(&agent, AgentStatus::Registered).await;
    assert_eq!(log.lock().unwrap().terminated, 1);
    assert!(fleet
        .server
        .command(dev, action_body(7, vec![]))
        .await
        .is_err());

    // Join again (automatic policy), then resign on the device's initiative.
    agent.request_join(JoinRequestKind::Simple).await.unwrap();
    reach(&agent, AgentStatus::Joined).await;
    agent.resign().await.unwrap();
    eventually("the server to see the resignation", || async {
        let d = fleet.server.registry().device(dev).await.unwrap().unwrap();
        (d.status == DeviceStatus::Registered).then_some(())
    })
    .await;

    // Deregister: the device erases its identity, the broker refuses its account.
    let (user, pass) = broker_creds(&data);
    fleet
        .op
        .device_verb(&dev.to_hex(), "deregister")
        .await
        .unwrap();
    reach(&agent, AgentStatus::Deregistered).await;
    assert_eq!(log.lock().unwrap().deregistered, 1);
    assert!(Identity::load(&data).unwrap().is_none());
    fleet
        .until_broker_refuses("the broker to refuse the deregistered device", &user, &pass)
        .await;
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    // Registering the same key again is refused (its identity was revoked).
    fleet.shutdown().await;
}

// ---- review fixes (issue 6): races, approval words, HTTP, revocation, state, rate limit ----

/// The registry says revoked (as the identity service writes it, before the server hears of
/// it), then the device resigns: the status the engine derives from its message must not
/// overwrite the revocation, and the server must treat the device as revoked from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_status_is_never_overwritten_by_an_inbound_message() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (agent, _log, _) = fleet.joined("valve-1", &[]).await;
    let dev = agent.id();
    let mut notices = fleet.server.notices();
    fleet
        .server
        .registry()
        .set_status(dev, DeviceStatus::Revoked)
        .await
        .unwrap();
    // The engine still thinks the device joined: its resignation is accepted…
    agent.resign().await.unwrap();
    server_notice("the resignation", &mut notices, |n| match n {
        ServerNotice::Event(ServerEvent::Resigned { device }) if device == dev => Some(()),
        _ => None,
    })
    .await;
    // …but the registry stays revoked, and the engine follows it.
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    let e = fleet.server.join_command(dev).await.unwrap_err();
    assert!(
        matches!(e, ServerError::Engine(EngineError::Revoked(d)) if d == dev),
        "{e}"
    );
    drop(agent);
    fleet.shutdown().await;
}

/// Operator calls on a device the registry revoked behind the engine's back are refused,
/// and never set it back to registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_of_a_device_revoked_meanwhile_is_refused_and_keeps_it_revoked() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (agent, _log, _) = fleet.joined("valve-2", &[]).await;
    let dev = agent.id();
    fleet
        .server
        .registry()
        .set_status(dev, DeviceStatus::Revoked)
        .await
        .unwrap();
    let e = fleet.server.terminate(dev).await.unwrap_err();
    assert!(
        matches!(e, ServerError::Engine(EngineError::Revoked(d)) if d == dev),
        "{e}"
    );
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    for verb in ["terminate", "join", "deregister", "reset"] {
        let e = fleet.op.device_verb(&dev.to_hex(), verb).await.unwrap_err();
        assert!(
            matches!(e, IdentityError::Refused { status: 409, .. }),
            "{verb}: {e}"
        );
    }
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    drop(agent);
    fleet.shutdown().await;
}

/// Terminate and revoke raced against each other (and against the device's own traffic):
/// whichever runs first, the device ends revoked in the registry and in the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_racing_revoke_always_ends_revoked() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    for i in 0..3 {
        let (agent, _log, _) = fleet.joined(&format!("race-{i}"), &[]).await;
        let dev = agent.id();
        let chatter = agent.send_data(Data {
            id: "t".into(),
            value: keav_c2::wire::Value::U8(1),
        });
        let (_, t, r) = tokio::join!(
            chatter,
            fleet.server.terminate(dev),
            fleet.server.revoke(dev)
        );
        r.unwrap();
        if let Err(e) = t {
            assert!(
                matches!(e, ServerError::Engine(EngineError::Revoked(_))),
                "{e}"
            );
        }
        assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
        assert!(matches!(
            fleet.server.join_command(dev).await,
            Err(ServerError::Engine(EngineError::Revoked(_)))
        ));
        drop(agent);
    }
    fleet.shutdown().await;
}

/// Words given for a join that is not human-moderated (or for no join at all) are an error
/// (409 with a code saying why), not an approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_with_words_needs_a_pending_human_join() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (id, data) = fleet.enroll("door-1", &[]).await;
    let dev = id.device_id();
    let with_words = DecideBody {
        accept: true,
        words: vec!["acid".into(), "aim".into()],
    };
    // No join pending at all.
    match fleet.op.decide(&dev.to_hex(), &with_words).await {
        Err(IdentityError::Refused { status: 409, code }) => {
            assert!(code.starts_with("no_pending_join"), "{code}")
        }
        other => panic!("{other:?}"),
    }
    // A simple join pending: words are refused, the join is left pending.
    let (agent, _log) = fleet
        .agent(id, &data, Some(JoinRequestKind::Simple), vec![])
        .await;
    fleet.join_requested(dev).await;
    match fleet.op.decide(&dev.to_hex(), &with_words).await {
        Err(IdentityError::Refused { status: 409, code }) => {
            assert!(code.starts_with("no_human_join"), "{code}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(agent.status(), AgentStatus::Registered);
    let joins = fleet.op.joins().await.unwrap();
    assert!(joins.iter().any(|j| j.device == dev.to_hex()));
    drop(agent);
    fleet.shutdown().await;
}

/// `GET /v1/c2/stats` with the operator token, on a connection closed after the answer.
fn stats_request() -> String {
    format!(
        "GET /v1/c2/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\nConnection: close\r\n\r\n"
    )
}

/// One raw HTTP/1.1 request on a fresh connection; the status code of the answer.
async fn raw_http(addr: std::net::SocketAddr, request: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let k = tokio::time::timeout(PATIENCE, s.read(&mut buf[n..]))
            .await
            .expect("an answer")
            .unwrap();
        assert!(k > 0, "connection closed without an answer");
        n += k;
    }
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line[9..12].parse().unwrap()
}

fn post(path: &str, token: Option<&str>, body: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The operator token is checked before the body is parsed: without it, a malformed body
/// still gets 401 (not a parse error that would reveal the route's schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_authenticate_before_parsing_the_body() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let addr = fleet.server.http_addr().unwrap();
    let garbage = "{\"no such field\": [[[";
    for path in [
        "/v1/c2/command",
        "/v1/c2/update",
        "/v1/c2/joins/0102030405060708",
    ] {
        assert_eq!(
            raw_http(addr, post(path, None, garbage)).await,
            401,
            "{path}"
        );
        assert_eq!(
            raw_http(addr, post(path, Some("wrong-token"), garbage)).await,
            401,
            "{path}"
        );
        // With the token, the same body is a client error of another kind.
        let with = raw_http(addr, post(path, Some(OPERATOR), garbage)).await;
        assert!(with == 400 || with == 422, "{path}: {with}");
    }
    fleet.shutdown().await;
}

/// Requests held open (a body that never comes) fill the in-flight limit: one more is
/// answered 503 at once instead of queueing without bound; once they go, service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_in_flight_limit_answers_busy() {
    use tokio::io::AsyncWriteExt;
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_max_operator_in_flight = 2;
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/c2/command HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s);
    }
    let stats = stats_request();
    // Until both held requests have their places, a probe may still get one.
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let status = raw_http(addr, stats.clone()).await;
        if status == 503 {
            break;
        }
        seen.push(status);
        if Instant::now() >= deadline {
            // Were the held requests answered (so their places freed)?
            let mut held_answers = Vec::new();
            for s in &mut held {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 12];
                let r = tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await;
                held_answers.push(format!("{r:?} {:?}", String::from_utf8_lossy(&b)));
            }
            let mut counts = std::collections::BTreeMap::new();
            for s in &seen {
                *counts.entry(*s).or_insert(0u32) += 1;
            }
            panic!("never busy: probes answered {counts:?}; held requests: {held_answers:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    eventually("service again", || {
        let r = stats.clone();
        async move { (raw_http(addr, r).await == 200).then_some(()) }
    })
    .await;
    fleet.shutdown().await;
}

/// A request whose body never comes does not keep its place for ever: it is answered 408
/// once the request timeout passes, and the place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_finishes_is_timed_out_and_frees_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_max_in_flight = 1;
        o.http_request_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Unauthenticated registration route: anyone can open one of these.
    s.write_all(
        b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .expect("no answer to the unfinished request")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 408");
    let stats = stats_request();
    assert_eq!(raw_http(addr, stats).await, 200);
    drop(s);
    fleet.shutdown().await;
}

/// Revoking a running device (the caller going away at once: the revocation runs on its own
/// task; `server::tests` attacks that with a busy engine) stops its agent with `Revoked`
/// instead of retrying forever, and a restarted agent stops at once with the same error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_running_device_stops_its_agent_with_revoked() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (mut agent, _log, data) = fleet.joined("pump-9", &[]).await;
    let dev = agent.id();
    // Polled once, then dropped.
    let _ = tokio::time::timeout(Duration::ZERO, fleet.server.revoke(dev)).await;
    let ended = tokio::time::timeout(PATIENCE, agent.finished())
        .await
        .expect("the agent never stopped");
    assert!(matches!(ended, Err(AgentError::Revoked(_))), "{ended:?}");
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    // Started again, it stops at once with the same typed error.
    let identity = Identity::load(&data).unwrap().unwrap();
    let e = Agent::start(
        identity,
        AgentOptions::new(StateStore::Dir(data.clone())),
        keav_c2::agent::AcceptAll,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AgentError::Revoked(_)), "{e}");
    fleet.shutdown().await;
}

/// The state file is bound to its device: another device's is refused, a missing one is
/// refused for a registered identity; `reset_state` starts afresh, and the server accepts
/// the device again only once the operator resets its continuity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_state_is_bound_to_its_device_and_a_reset_needs_the_operator() {
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (a, _, data_a) = fleet.joined("tank-a", &[]).await;
    let (b, _, data_b) = fleet.joined("tank-b", &[]).await;
    let dev_b = b.id();
    // Registered on both sides, so its join requests are admissible: only the replay check
    // can stop them.
    fleet
        .op
        .device_verb(&dev_b.to_hex(), "terminate")
        .await
        .unwrap();
    reach(&b, AgentStatus::Registered).await;
    b.stop().await.ok();
    let opts = |d: &Path| AgentOptions::new(StateStore::Dir(d.to_path_buf()));
    let start_b = |o: AgentOptions| {
        let identity = Identity::load(&data_b).unwrap().unwrap();
        Agent::start(identity, o, keav_c2::agent::AcceptAll)
    };
    // A's state in B's directory.
    let state_b = data_b.join(keav_c2::agent::STATE_FILE);
    let own = std::fs::read(&state_b).unwrap();
    std::fs::copy(data_a.join(keav_c2::agent::STATE_FILE), &state_b).unwrap();
    let e = start_b(opts(&data_b)).await.unwrap_err();
    match e {
        AgentError::ForeignState { found } => assert_eq!(found, a.id().to_hex()),
        e => panic!("{e}"),
    }
    // A state file without the binding (the engine's bare snapshot) is refused too.
    std::fs::write(&state_b, &own[13..]).unwrap();
    assert!(matches!(
        start_b(opts(&data_b)).await.unwrap_err(),
        AgentError::ForeignState { .. }
    ));
    // No state file at all.
    std::fs::remove_file(&state_b).unwrap();
    assert!(matches!(
        start_b(opts(&data_b)).await.unwrap_err(),
        AgentError::StateMissing { .. }
    ));
    // Reset: B starts registered, with its sequence numbers from 1 again…
    let mut o = opts(&data_b);
    o.reset_state = true;
    let b = start_b(o).await.unwrap();
    assert_eq!(b.status(), AgentStatus::Registered);
    let mut notices = fleet.server.notices();
    b.request_join(JoinRequestKind::Simple).await.unwrap();
    // …so the server drops its join request as a replay…
    let reason = server_notice(
        "the stale join request to be dropped",
        &mut notices,
        |n| match n {
            ServerNotice::Dropped(d) if d.sender == Some(dev_b) => Some(d.reason),
            _ => None,
        },
    )
    .await;
    assert_eq!(reason, DropReason::Replay);
    // …until the operator resets the server's continuity with it.
    fleet
        .op
        .device_verb(&dev_b.to_hex(), "reset")
        .await
        .unwrap();
    assert_eq!(fleet.status(dev_b).await, DeviceStatus::Registered);
    b.request_join(JoinRequestKind::Simple).await.unwrap();
    fleet.approve(&b).await;
    // The state file written since is bound to B again.
    let again = std::fs::read(&state_b).unwrap();
    assert_eq!(&again[5..13], &dev_b.0);
    drop(a);
    drop(b);
    fleet.shutdown().await;
}

/// A device flooding the server is cut at its bucket before any signature work, counted;
/// another device's messages still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_rate_limited_and_others_still_pass() {
    const BURST: u32 = 8;
    const FLOOD: usize = 40;
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.inbound_rate = RateLimit {
            burst: BURST,
            per_sec: 0.0,
        }
    })
    .await;
    let (a, _, _) = fleet.joined("noisy", &[]).await;
    let (b, _, _) = fleet.joined("quiet", &[]).await;
    let (dev_a, dev_b) = (a.id(), b.id());
    let mut notices = fleet.server.notices();
    let limited_before = fleet.server.rate_limited();
    for i in 0..FLOOD {
        a.send_data(Data {
            id: "flood".into(),
            value: keav_c2::wire::Value::U64(i as u64),
        })
        .await
        .unwrap();
    }
    // Every message of the flood is either taken or dropped by the limit.
    let mut taken = 0usize;
    let mut announced = false;
    eventually("the whole flood to be seen", || {
        while let Ok(n) = notices.try_recv() {
            match n {
                ServerNotice::Event(ServerEvent::Data { device, .. }) if device == dev_a => {
                    taken += 1
                }
                ServerNotice::RateLimited { device, .. } if device == dev_a => announced = true,
                _ => {}
            }
        }
        let limited = fleet.server.rate_limited() - limited_before;
        std::future::ready((taken + limited as usize == FLOOD).then_some(()))
    })
    .await;
    let limited = (fleet.server.rate_limited() - limited_before) as usize;
    assert!(taken < BURST as usize, "{taken} of the flood taken");
    assert_eq!(limited, FLOOD - taken);
    assert!(announced, "the limit was not announced");
    let stats = fleet.op.stats().await.unwrap();
    assert!(stats
        .dropped
        .iter()
        .any(|(r, n)| r == "rate_limited" && *n as usize >= limited));
    // The other device is not affected.
    b.send_data(Data {
        id: "hello".into(),
        value: keav_c2::wire::Value::U8(1),
    })
    .await
    .unwrap();
    server_notice("the other device's data", &mut notices, |n| match n {
        ServerNotice::Event(ServerEvent::Data { device, .. }) if device == dev_b => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        (fleet.server.rate_limited() - limited_before) as usize,
        limited
    );
    drop(a);
    drop(b);
    fleet.shutdown().await;
}

/// Enrol, join, command and response, revocation stopping the agent: the whole cycle on
/// `fleet` (its algorithm, its registry).
async fn whole_cycle<R: Registry>(fleet: &Fleet<R>, name: &str) {
    let (mut agent, log, _) = fleet.joined(name, &["cycle"]).await;
    let dev = agent.id();
    let rec = fleet.server.registry().device(dev).await.unwrap().unwrap();
    assert_eq!(rec.alg, fleet.alg);
    assert_eq!(rec.status, DeviceStatus::Joined);
    let sent = fleet.command(&action_to_group("cycle", 7)).await;
    assert_eq!(sent.sent.len(), 1);
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log.lock().unwrap().actions, vec![(7, vec![1, 2, 3])]);
    let before = agent.counters().accepted();
    fleet.op.device_verb(&dev.to_hex(), "revoke").await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, agent.finished())
        .await
        .expect("the agent never stopped");
    assert!(matches!(ended, Err(AgentError::Revoked(_))), "{ended:?}");
    assert_eq!(agent.counters().accepted(), before);
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    assert!(fleet.server.join_command(dev).await.is_err());
}

/// The cycle with RSA-2048 (PSS/SHA-256) keys on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cycle_with_rsa_2048_keys() {
    let mut fleet = Fleet::start_with(JoinPolicy::Moderated, |o| o.alg = Alg::RsaPss2048).await;
    assert_eq!(fleet.server.public_key().alg(), Alg::RsaPss2048);
    fleet.alg = Alg::RsaPss2048;
    whole_cycle(&fleet, "rsa-1").await;
    fleet.shutdown().await;
}

/// The cycle with the fleet registry in PostgreSQL (127.0.0.1:5432, database `test`, or
/// `$KEAV_TEST_POSTGRES`); skipped, with a note, when no PostgreSQL answers.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cycle_with_the_postgres_registry() {
    use keav_c2::registry::PgRegistry;
    let url = common::pg::url();
    let schema = common::pg::schema("e2e");
    let registry = match PgRegistry::connect(&url, &schema).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIPPED: PostgreSQL unreachable at {url} ({e})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    common::pg::dropping_schema(&schema, async move {
        let fleet = Fleet::start_on(dir, registry, JoinPolicy::Moderated, |_| {}).await;
        whole_cycle(&fleet, "pg-1").await;
        fleet.shutdown().await;
    })
    .await;
}

/// Unauthenticated clients sending their registration body a byte at a time fill every
/// unauthenticated place; the operator still gets through (its token gives it places of its
/// own, on the identity service's routes and the C2 ones), and the revocation takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_unauthenticated_bodies_cannot_keep_the_operator_from_revoking() {
    use tokio::io::AsyncWriteExt;
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_max_in_flight = 4;
        // Long enough that the slow clients keep their places for the whole test.
        o.http_body_timeout = Duration::from_secs(600);
        o.http_request_timeout = Duration::from_secs(600);
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let (identity, _data) = fleet.enroll("pump-slow", &[]).await;
    let dev = identity.device_id();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{",
        )
        .await
        .unwrap();
        held.push(s);
    }
    // The unauthenticated places are all taken.
    let challenge = post("/v1/challenge", None, "{}");
    eventually("the unauthenticated places full", || {
        let r = challenge.clone();
        async move { (raw_http(addr, r).await == 503).then_some(()) }
    })
    .await;
    // A wrong token is no token: it does not get the operator's places.
    assert_eq!(
        raw_http(addr, post("/v1/challenge", Some("wrong"), "{}")).await,
        503
    );
    // The operator revokes through the identity service's route…
    let path = format!("/v1/devices/{}/revoke", dev.to_hex());
    assert_eq!(raw_http(addr, post(&path, Some(OPERATOR), "")).await, 200);
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    // …and the C2 routes answer it too.
    let stats = stats_request();
    assert_eq!(raw_http(addr, stats).await, 200);
    let path = format!("/v1/c2/devices/{}/revoke", dev.to_hex());
    let again = raw_http(addr, post(&path, Some(OPERATOR), "")).await;
    assert!(again == 200 || again == 409, "{again}");
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    // The slow clients were still holding their places all along.
    assert_eq!(raw_http(addr, challenge.clone()).await, 503);
    drop(held);
    fleet.shutdown().await;
}

/// An unauthenticated request whose body does not come is answered 408 once the short body
/// deadline passes, long before the request timeout, and its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_unauthenticated_body_is_answered_408_by_the_body_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_max_in_flight = 1;
        o.http_body_timeout = Duration::from_millis(300);
        // Far beyond PATIENCE: only the body deadline can answer in time.
        o.http_request_timeout = Duration::from_secs(600);
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .expect("no answer to the slow body")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 408");
    // Its place is free: an unauthenticated request is served (400: an empty challenge
    // body is still an answer, not 503).
    let r = raw_http(addr, post("/v1/challenge", None, "{}")).await;
    assert_ne!(r, 503);
    drop(s);
    fleet.shutdown().await;
}

// --- the web console ---

/// An HTTP/1.1 answer read whole.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the server has no such route (its fallback answer, or a 405), as opposed to
    /// an answer of the route itself (an error about the device or the body included).
    fn no_such_route(&self) -> bool {
        self.status == 405 || (self.status == 404 && self.body.contains("no such route"))
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = body
        .map(|b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        })
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("a whole answer")
        .unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The `[method, path]` entries of the console script's `ROUTES` table, and the keys of its
/// `VERBS` table.
fn console_routes() -> (Vec<(String, String, String)>, Vec<String>) {
    let js = keav_c2::server::console::CONSOLE_JS;
    let block = |start: &str| -> Vec<&str> {
        let from = js.find(start).unwrap_or_else(|| panic!("no {start}"));
        js[from + start.len()..]
            .lines()
            .take_while(|l| !l.starts_with("};"))
            .filter(|l| !l.trim().is_empty())
            .collect()
    };
    let routes = block("const ROUTES = {")
        .into_iter()
        .map(|l| {
            let (name, rest) = l.trim().split_once(':').unwrap();
            let parts: Vec<&str> = rest.split('"').collect();
            (name.to_string(), parts[1].to_string(), parts[3].to_string())
        })
        .collect();
    let verbs = block("const VERBS = {")
        .into_iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .map(|l| l.trim().split_once(':').unwrap().0.to_string())
        .collect();
    (routes, verbs)
}

/// The console is served without the token, under a strict content security policy; its
/// script writes no HTML and keeps the token in the tab only; and every operator route it
/// calls exists on a real server (a route renamed on one side fails here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_console_is_served_strictly_and_calls_only_routes_that_exist() {
    use keav_c2::server::console::{CONSOLE_CSS, CONSOLE_JS, CSP, INDEX_HTML};
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let addr = fleet.server.http_addr().unwrap();

    assert_eq!(
        http(addr, "GET", "/favicon.ico", None, None).await.status,
        204
    );
    let root = http(addr, "GET", "/", None, None).await;
    assert_eq!(root.status, 303);
    assert_eq!(root.header("location"), Some("/console/"));
    for (path, ctype, body) in [
        ("/console/", "text/html", INDEX_HTML),
        ("/console/console.js", "text/javascript", CONSOLE_JS),
        ("/console/console.css", "text/css", CONSOLE_CSS),
    ] {
        let a = http(addr, "GET", path, None, None).await;
        assert_eq!(a.status, 200, "{path}");
        assert!(
            a.header("content-type").unwrap().starts_with(ctype),
            "{path}"
        );
        assert_eq!(a.header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(a.body, body, "{path}");
    }
    // The page loads only what is served above, and no inline code (the policy forbids it).
    assert!(INDEX_HTML.contains(r#"<script src="/console/console.js" defer></script>"#));
    assert!(INDEX_HTML.contains(r#"href="/console/console.css""#));
    assert_eq!(INDEX_HTML.matches("<script").count(), 1);
    assert!(!INDEX_HTML.contains("<style") && !INDEX_HTML.contains(" style="));
    // No inline event handler (` onclick=`...).
    for (i, _) in INDEX_HTML.match_indices(" on") {
        let attr: String = INDEX_HTML[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        assert!(
            !INDEX_HTML[i + 1 + attr.len()..].starts_with('='),
            "inline handler {attr}"
        );
    }
    // No HTML written from strings, no code from strings, the token never stored to disk.
    for bad in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "localStorage",
    ] {
        assert!(!CONSOLE_JS.contains(bad), "the console script uses {bad}");
    }

    // Every route of the script, with a real device and the operator token.
    let (agent, _log, _data) = fleet.joined("pump-1", &["pumps"]).await;
    let id = agent.id().to_hex();
    let (routes, verbs) = console_routes();
    assert!(routes.len() >= 10, "{routes:?}");
    assert_eq!(
        verbs,
        ["join", "reset", "terminate", "deregister", "revoke"]
    );
    // The check below tells a missing route apart.
    let missing = http(addr, "GET", "/v1/c2/no-such", Some(OPERATOR), None).await;
    assert!(missing.no_such_route(), "{}", missing.body);
    let bad_verb = format!("/v1/c2/devices/{id}/no-such");
    let missing = http(addr, "POST", &bad_verb, Some(OPERATOR), Some("{}")).await;
    assert!(missing.no_such_route(), "{}", missing.body);
    let mut calls = Vec::new();
    for (name, method, template) in &routes {
        let fill = |verb: &str| {
            template
                .replace("{id}", &id)
                .replace("{verb}", verb)
                .replace("{after}", "0")
                .replace("{limit}", "10")
        };
        if template.contains("{verb}") {
            // Revocation last: it is final.
            for v in std::iter::once("confidential").chain(verbs.iter().map(|s| s.as_str())) {
                calls.push((format!("{name}/{v}"), method.clone(), fill(v)));
            }
        } else {
            calls.insert(0, (name.clone(), method.clone(), fill("")));
        }
    }
    for (name, method, path) in &calls {
        let body = (method == "POST").then_some("{}");
        let a = http(addr, method, path, Some(OPERATOR), body).await;
        assert!(!a.no_such_route(), "{name}: {method} {path}: {}", a.status);
        // And not without the token.
        let a = http(addr, method, path, None, body).await;
        assert_eq!(a.status, 401, "{name}: {method} {path}");
    }
    assert_eq!(fleet.status(agent.id()).await, DeviceStatus::Revoked);
    drop(agent);
    fleet.shutdown().await;
}

/// The console script parses as JavaScript (checked when Node.js is installed).
#[test]
fn the_console_script_parses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.js");
    std::fs::write(&path, keav_c2::server::console::CONSOLE_JS).unwrap();
    match std::process::Command::new("node")
        .arg("--check")
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("node not found ({e}): the console script was not parsed"),
    }
}

/// `GET /v1/c2/events`: the server's notices, numbered, read after a number; the operator
/// token is required and a bad query is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_route_lists_what_happened_in_order_after_a_number() {
    use keav_c2::server::events::EventsBody;
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let addr = fleet.server.http_addr().unwrap();
    let (agent, _log, _data) = fleet.joined("pump-1", &["pumps"]).await;
    let dev = agent.id().to_hex();

    assert_eq!(
        http(addr, "GET", "/v1/c2/events", None, None).await.status,
        401
    );
    for bad in ["after=x", "after=-1", "since=3"] {
        let a = http(
            addr,
            "GET",
            &format!("/v1/c2/events?{bad}"),
            Some(OPERATOR),
            None,
        )
        .await;
        assert_eq!(a.status, 400, "{bad}");
    }
    let get = |after: u64| async move {
        let a = http(
            addr,
            "GET",
            &format!("/v1/c2/events?after={after}"),
            Some(OPERATOR),
            None,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        serde_json::from_str::<EventsBody>(&a.body).unwrap()
    };
    let first = get(0).await;
    assert_eq!(first.missed, 0);
    let seqs: Vec<u64> = first.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(first.next, seqs.len() as u64);
    let mine = |b: &EventsBody, kind: &str| {
        b.events
            .iter()
            .filter(|e| e.kind == kind && e.device.as_deref() == Some(dev.as_str()))
            .count()
    };
    assert_eq!(mine(&first, "join_requested"), 1, "{first:?}");
    assert_eq!(mine(&first, "joined"), 1, "{first:?}");
    let none = get(first.next).await;
    assert!(none.events.is_empty());
    assert_eq!((none.next, none.run), (first.next, first.run));

    // A command's response comes after that number, naming its token.
    let sent = fleet.command(&action_to(agent.id(), 7)).await;
    let token = &sent.sent[0].token;
    fleet.response(token).await;
    let later = eventually("the response event", || async {
        let b = get(first.next).await;
        (mine(&b, "response") == 1).then_some(b)
    })
    .await;
    let e = later.events.iter().find(|e| e.kind == "response").unwrap();
    assert!(e.seq > first.next);
    assert!(e.text.contains(token.as_str()), "{}", e.text);
    assert!(e.text.contains("ActionSuccess"), "{}", e.text);
    drop(agent);
    fleet.shutdown().await;
}

/// The directory of the browser driver (`tests/browser`), if Node.js, Chromium and
/// playwright-core (`npm ci` there) are all installed. Without them the browser test is
/// skipped, unless `KEAV_BROWSER_TESTS=1` (set by `.ci/run` once it installed them) makes
/// their absence a failure.
fn browser_tools() -> Option<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("KEAV_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = [
        (!node).then_some("node"),
        (!Path::new(&chromium).exists()).then_some("chromium"),
        (!dir.join("node_modules/playwright-core").exists())
            .then_some("playwright-core (npm ci in tests/browser)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    assert!(
        std::env::var("KEAV_BROWSER_TESTS").as_deref() != Ok("1"),
        "KEAV_BROWSER_TESTS=1 but missing: {missing:?}"
    );
    eprintln!("browser test skipped: missing {missing:?}");
    None
}

/// The console in headless Chromium, driven as an operator would: a wrong token refused,
/// sign-in, a human-moderated join accepted with the words the device shows and a simple
/// join accepted, an action with arguments to a group answered by both devices, bad hex
/// caught before sending, a revocation (asked first), the event feed, sign-out. Then the
/// server's state and the devices' logs say it all happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_drives_a_fleet_in_a_real_browser() {
    let Some(dir) = browser_tools() else { return };
    let fleet = Fleet::start(JoinPolicy::Moderated).await;
    let (ida, data_a) = fleet.enroll("cam-1", &["cams"]).await;
    let a = ida.device_id();
    let (agent_a, log_a) = fleet
        .agent(ida, &data_a, Some(JoinRequestKind::Human), vec![])
        .await;
    let (idb, data_b) = fleet.enroll("cam-2", &["cams"]).await;
    let b = idb.device_id();
    let (agent_b, log_b) = fleet
        .agent(idb, &data_b, Some(JoinRequestKind::Simple), vec![])
        .await;
    let words = eventually("the words on the device", || async {
        log_a.lock().unwrap().words.first().cloned()
    })
    .await;
    fleet.join_requested(a).await;
    fleet.join_requested(b).await;

    let args = [
        format!("{}/", fleet.http),
        OPERATOR.to_string(),
        words.join(" "),
        "cams".to_string(),
        b.to_hex(),
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("node")
                .arg("console_e2e.js")
                .args(&args)
                .current_dir(&dir)
                .output()
                .expect("run node")
        }),
    )
    .await
    .expect("the browser run ended")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no report; stderr: {stderr}")),
    )
    .unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
    assert_eq!(report["ok"], true, "{report:#}\n{stderr}");
    assert_eq!(report["landed"], "/console/");
    assert_eq!(
        report["wrongTokenError"],
        "The server refused the operator token."
    );
    assert_eq!(report["appHiddenAfterWrongToken"], true);
    assert_eq!(report["tokenInSession"], true);
    assert_eq!(
        report["joinMethods"],
        serde_json::json!(["human", "simple"])
    );
    assert_eq!(
        report["responses"],
        serde_json::json!(["ActionSuccess", "ActionSuccess"])
    );
    assert!(
        report["badHexError"].as_str().unwrap().contains("not hex"),
        "{report}"
    );
    assert_eq!(report["sentRowsAfterBadHex"], 2);
    let dialog = report["dialog"].as_str().unwrap();
    assert!(
        dialog.starts_with("Revoke") && dialog.contains(&b.to_hex()) && dialog.contains("cam-2"),
        "{dialog}"
    );
    assert!(report["events"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(report["tokenInSessionAfterSignOut"], 0);
    assert_eq!(report["pageErrors"], serde_json::json!([]), "{report}");

    // What the browser did reached the fleet.
    assert_eq!(fleet.status(a).await, DeviceStatus::Joined);
    assert_eq!(fleet.status(b).await, DeviceStatus::Revoked);
    assert_eq!(log_a.lock().unwrap().actions, vec![(7, vec![0x0a, 0x0b])]);
    assert_eq!(log_b.lock().unwrap().actions, vec![(7, vec![0x0a, 0x0b])]);
    drop((agent_a, agent_b));
    fleet.shutdown().await;
}

/// Whether the server closes `s` (end of stream or reset) within [`PATIENCE`], whatever it
/// writes before; the bytes it wrote.
async fn closed_by_server(s: &mut tokio::net::TcpStream) -> (bool, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let r = tokio::time::timeout(PATIENCE, async {
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    (r.is_ok(), String::from_utf8_lossy(&got).into_owned())
}

/// A connection that sends half a request head and stops (slowloris) is closed once the
/// header timeout passes, without an answer from any handler; one that is idle is closed
/// too. Other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_header_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        format!("GET /v1/c2/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stats = stats_request();
    assert_eq!(raw_http(addr, stats.clone()).await, 200);
    let (closed, said) = closed_by_server(&mut slow).await;
    assert!(closed, "the half-sent head kept its connection");
    assert!(!said.contains("200 OK"), "{said}");
    let (closed, _) = closed_by_server(&mut idle).await;
    assert!(closed, "the idle connection was kept");
    assert_eq!(raw_http(addr, stats).await, 200);
    fleet.shutdown().await;
}

/// Connections beyond the limit are closed at once, before anything is read; once one of
/// those held goes, a new client is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    use tokio::io::AsyncWriteExt;
    let fleet = Fleet::start_with(JoinPolicy::Moderated, |o| {
        o.http_max_connections = 2;
    })
    .await;
    let addr = fleet.server.http_addr().unwrap();
    let stats = stats_request();
    // Two connections that say nothing (within the 10 s header timeout) hold both places.
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Accepted in order: the third is closed, and its request is never answered.
    let _ = third.write_all(stats.as_bytes()).await;
    let (closed, said) = closed_by_server(&mut third).await;
    assert!(closed && said.is_empty(), "{closed} {said:?}");
    drop(first);
    eventually("service again", || {
        let r = stats.clone();
        async move { (raw_http_or_closed(addr, r).await == Some(200)).then_some(()) }
    })
    .await;
    fleet.shutdown().await;
}

/// Like [`raw_http`], but `None` when the server closes the connection without answering.
async fn raw_http_or_closed(addr: std::net::SocketAddr, request: String) -> Option<u16> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(request.as_bytes()).await.ok()?;
    let (_, said) = closed_by_server(&mut s).await;
    said.get(9..12)?.parse().ok()
}
