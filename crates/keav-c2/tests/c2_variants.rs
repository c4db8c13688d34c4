//! Issue 6, end to end, on the variants the default tests (`c2_e2e.rs`) do not run: the C2
//! server signing with RSA-2048 PSS/SHA-256 instead of Ed25519, and the fleet registry on
//! PostgreSQL instead of redb (including a server restart on it).
//!
//! Each test runs a real C2 server (its own Mosquitto on a free loopback port, written from
//! keav's configuration), its identity service and operator API over loopback HTTP, and device
//! agents that register over HTTP. A "tap" broker account with the server's role plays a
//! broker-level attacker (it may read the server's topics and write to the devices').
//!
//! PostgreSQL: `KEAV_TEST_POSTGRES` or `postgres://postgres@127.0.0.1:5432/test`; each test
//! works in its own schema, dropped at the end (also when the test fails). An unreachable
//! database fails the test with a message, as `tests/identity.rs` does.
//!
//! Waits are bounded (a hang fails the test after `PATIENCE`); nothing asserts on timing.

mod common;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keav_c2::acl::new_password;
use keav_c2::agent::{
    Agent, AgentNotice, AgentOptions, AgentStatus, Handlers, Identity, StateStore,
};
use keav_c2::engine::{DropReason, EngineError, JoinRequestKind};
use keav_c2::identity::IdentityError;
use keav_c2::keys::{Alg, SigningKey};
use keav_c2::registry::{DeviceStatus, RedbRegistry, Registry};
use keav_c2::server::{unix_now, BrokerSetup, ServerError, ServerNotice, STATE_FILE};
use keav_c2::topics::Topics;
use keav_c2::wire::{Data, Envelope, Message, MessageType, Status, Token, Value};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use common::fleet::{
    action_body, action_to, action_to_group, broker_creds, broker_refuses, eventually, hex,
    run_action, Fleet, PATIENCE,
};

/// The next drop an agent reports (bounded).
async fn agent_drop(notices: &mut tokio::sync::broadcast::Receiver<AgentNotice>) -> DropReason {
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match notices.recv().await {
                Ok(AgentNotice::Dropped(d)) => return d.reason,
                Ok(_) => {}
                Err(e) => panic!("agent notices ended: {e}"),
            }
        }
    })
    .await;
    r.expect("the agent reported no drop")
}

/// Asserts that the agent counted exactly `want` drops for `reason` (waiting, bounded, for
/// drops still in flight to be counted).
async fn agent_count(agent: &Agent, reason: DropReason, want: u64) {
    eventually("the agent's counters", || {
        std::future::ready((agent.counters().get(reason) >= want).then_some(()))
    })
    .await;
    assert_eq!(agent.counters().get(reason), want, "{reason:?}");
}

/// The next drop the server reports (bounded).
async fn server_drop(
    notices: &mut tokio::sync::broadcast::Receiver<ServerNotice>,
) -> keav_c2::engine::Dropped {
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match notices.recv().await {
                Ok(ServerNotice::Dropped(d)) => return d,
                Ok(_) => {}
                Err(e) => panic!("server notices ended: {e}"),
            }
        }
    })
    .await;
    r.expect("the server reported no drop")
}

/// The signed bytes the server published with `token` (bounded).
async fn published(
    notices: &mut tokio::sync::broadcast::Receiver<ServerNotice>,
    token: &Token,
) -> Vec<u8> {
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match notices.recv().await {
                Ok(ServerNotice::Published {
                    token: t, bytes, ..
                }) if t == *token => return bytes.to_vec(),
                Ok(_) => {}
                Err(e) => panic!("server notices ended: {e}"),
            }
        }
    })
    .await;
    r.expect("the command was never published")
}

/// What a test device saw.
#[derive(Default)]
struct Log {
    actions: Vec<(u16, Vec<u8>)>,
    data: Vec<String>,
}

struct TestHandlers {
    log: Arc<Mutex<Log>>,
}

impl Handlers for TestHandlers {
    fn on_action(&mut self, action: u16, args: &[u8]) -> Status {
        run_action(&mut self.log.lock().unwrap().actions, action, args)
    }
    fn on_data(&mut self, data: &Data, _confidential: bool) -> Status {
        self.log.lock().unwrap().data.push(data.id.clone());
        Status::DataSuccess
    }
}

/// An MQTT client of the test's broker (async), keeping what it receives in order.
struct Tap {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<TapEvent>,
    inbox: VecDeque<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

enum TapEvent {
    ConnAck,
    SubAck(bool),
    PubAck,
    Publish(String, Vec<u8>),
    Failed(String),
}

impl Tap {
    /// Connects as `user` with client id `client_id` (never the agent's own, which would
    /// take its session over) and waits for the CONNACK.
    async fn connect(port: u16, client_id: &str, user: &str, pass: &str) -> Tap {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_credentials(user, pass);
        let (client, mut el) = AsyncClient::new(o, 16);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => TapEvent::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(s))) => TapEvent::SubAck(
                        s.return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                    ),
                    Ok(Event::Incoming(Packet::PubAck(_))) => TapEvent::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        TapEvent::Publish(p.topic, p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(TapEvent::Failed(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut tap = Tap {
            client,
            events,
            inbox: VecDeque::new(),
            task,
        };
        tap.wait("CONNACK", |e| matches!(e, TapEvent::ConnAck))
            .await;
        tap
    }

    /// Waits for an event `f` accepts, keeping messages that arrive meanwhile.
    async fn wait(&mut self, what: &str, f: impl Fn(&TapEvent) -> bool) -> TapEvent {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("tap: no {what}"))
                .unwrap_or_else(|| panic!("tap: connection task ended before {what}"));
            if f(&ev) {
                return ev;
            }
            match ev {
                TapEvent::Publish(t, p) => self.inbox.push_back((t, p)),
                TapEvent::Failed(e) => panic!("tap: connection failed before {what}: {e}"),
                _ => {}
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self
            .wait("SUBACK", |e| matches!(e, TapEvent::SubAck(_)))
            .await
        {
            TapEvent::SubAck(ok) => assert!(ok, "tap: subscription to {filter} refused"),
            _ => unreachable!(),
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        self.wait("PUBACK", |e| matches!(e, TapEvent::PubAck)).await;
    }

    /// The first message received (already or from now on) that `f` accepts.
    async fn find(&mut self, what: &str, f: impl Fn(&str, &[u8]) -> bool) -> Vec<u8> {
        if let Some(i) = self.inbox.iter().position(|(t, p)| f(t, p)) {
            return self.inbox.remove(i).unwrap().1;
        }
        match self
            .wait(what, |e| matches!(e, TapEvent::Publish(t, p) if f(t, p)))
            .await
        {
            TapEvent::Publish(_, p) => p,
            _ => unreachable!(),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<R: Registry> Fleet<R> {
    /// Starts a server in `dir` with `registry`, signing with `alg`, its broker on `port`
    /// (0: a free one).
    async fn on_port(
        dir: Arc<tempfile::TempDir>,
        registry: R,
        alg: Alg,
        port: u16,
        tap_password: Zeroizing<String>,
    ) -> Fleet<R> {
        Fleet::start(dir, registry, tap_password, |o| {
            o.alg = alg;
            o.broker = BrokerSetup::Spawn {
                dir: o.data_dir.join("mosquitto"),
                port,
                program: PathBuf::from("mosquitto"),
            };
        })
        .await
    }

    async fn new(registry: R, alg: Alg) -> Fleet<R> {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Fleet::on_port(dir, registry, alg, 0, new_password()).await
    }

    async fn tap(&self) -> Tap {
        Tap::connect(self.port(), "tap", "tap", &self.tap_password).await
    }

    async fn agent(
        &self,
        identity: Identity,
        data: &Path,
        join: Option<JoinRequestKind>,
    ) -> (Agent, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut o = AgentOptions::new(StateStore::Dir(data.to_path_buf()));
        o.join = join;
        let h = TestHandlers { log: log.clone() };
        (Agent::start(identity, o, h).await.unwrap(), log)
    }

    /// A joined device: enrolled over HTTP, simple join approved by the operator over HTTP.
    async fn joined(&self, name: &str, groups: &[&str]) -> (Agent, Arc<Mutex<Log>>, PathBuf) {
        let (id, data) = self.enroll(name, groups).await;
        let (agent, log) = self.agent(id, &data, Some(JoinRequestKind::Simple)).await;
        self.approve(&agent).await;
        (agent, log, data)
    }
}

/// Register -> join -> action -> response tracked per token -> revoke, over HTTP; the broker
/// refuses the revoked device afterwards and the server neither commands it nor hears it.
/// Returns nothing; fails on the first wrong value.
async fn full_flow<R: Registry>(fleet: &Fleet<R>) {
    let (agent, log, data) = fleet.joined("pump-1", &["pumps"]).await;
    let dev = agent.id();
    assert_eq!(fleet.status(dev).await, DeviceStatus::Joined);

    let sent = fleet.command(&action_to(dev, 7)).await;
    assert_eq!(sent.sent.len(), 1);
    assert_eq!(
        fleet.response(&sent.sent[0].token).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log.lock().unwrap().actions, vec![(7, vec![1, 2, 3])]);
    // By group, an action the device does not know: answered under its own token.
    let unknown = fleet.command(&action_to_group("pumps", 9)).await;
    assert_eq!(unknown.sent.len(), 1);
    assert_ne!(unknown.sent[0].token, sent.sent[0].token);
    assert_eq!(
        fleet.response(&unknown.sent[0].token).await,
        Status::ActionUnknown.code()
    );
    // Each token keeps its own answer, from this device only.
    let both = fleet
        .op
        .responses(&[sent.sent[0].token.clone(), unknown.sent[0].token.clone()])
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    for (t, want) in both
        .iter()
        .zip([Status::ActionSuccess, Status::ActionUnknown])
    {
        assert_eq!(t.responses.len(), 1);
        assert_eq!(t.responses[0].status, want.code());
        assert_eq!(t.responses[0].device, dev.to_hex());
    }

    // Revocation through the identity service's route: registry, engine, broker.
    let (user, pass) = broker_creds(&data);
    fleet.operator().revoke(dev).await.unwrap();
    assert_eq!(fleet.status(dev).await, DeviceStatus::Revoked);
    fleet
        .until_broker_refuses("the broker to refuse the revoked device", &user, &pass)
        .await;
    match fleet.server.command(dev, action_body(7, vec![])).await {
        Err(ServerError::Engine(EngineError::Revoked(d))) => assert_eq!(d, dev),
        other => panic!("command to a revoked device: {other:?}"),
    }
    match fleet.op.command(&action_to(dev, 7)).await {
        Err(IdentityError::Refused { status, .. }) => assert!((400..500).contains(&status)),
        other => panic!("HTTP command to a revoked device: {other:?}"),
    }
    let group = fleet.command(&action_to_group("pumps", 7)).await;
    assert!(group.sent.is_empty());
    assert_eq!(group.skipped.len(), 1);
    // What the revoked agent still sends reaches nothing; a live device's join request is a
    // marker that the server processed what came before it.
    let before = fleet.server.counters().await.accepted();
    let _ = agent
        .send_data(Data {
            id: "late".into(),
            value: Value::U8(1),
        })
        .await;
    let (other, _, _) = fleet.joined("pump-2", &[]).await;
    assert_eq!(fleet.server.counters().await.accepted(), before + 1);
    assert_eq!(log.lock().unwrap().actions.len(), 2);
    drop(other);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_server_full_flow_and_foreign_signatures_refused_by_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RedbRegistry::open(&dir.path().join("registry.redb")).unwrap();
    let fleet = Fleet::new(registry, Alg::RsaPss2048).await;
    assert_eq!(fleet.server.public_key().alg(), Alg::RsaPss2048);

    // The device was given the server's RSA key at registration and kept it.
    let (agent, log, data) = fleet.joined("rsa-dev", &[]).await;
    let dev = agent.id();
    let stored = Identity::load(&data).unwrap().unwrap();
    assert_eq!(stored.registration().server_key.alg(), Alg::RsaPss2048);
    assert_eq!(
        stored.registration().server_key.to_bytes(),
        fleet.server.public_key().to_bytes()
    );
    assert_eq!(stored.registration().server_id, fleet.server.id());

    // A command the device accepted: as published, it claims RSA in its header (covered by
    // the signature) and verifies under the server's key.
    let mut notices = fleet.server.notices();
    let token = fleet
        .server
        .command(dev, action_body(7, vec![1]))
        .await
        .unwrap();
    let bytes = published(&mut notices, &token).await;
    assert_eq!(
        fleet.response(&hex(&token)).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(log.lock().unwrap().actions, vec![(7, vec![1])]);
    let unverified = Message::decode(&bytes).unwrap();
    let header = unverified.header().clone();
    assert_eq!(header.alg, Alg::RsaPss2048);
    assert_eq!(header.msg_type, MessageType::Action);
    assert_eq!(header.sender, fleet.server.id());
    assert_eq!(header.recipient, dev);
    assert_eq!(bytes.len() - unverified.signed_bytes().len() - 2, 256);
    let msg = unverified.verify(fleet.server.public_key()).unwrap();
    assert_eq!(msg.body(), &action_body(7, vec![1]));
    // Flipping the algorithm id in the signed header breaks it: the id is not a free label.
    let mut relabelled = bytes.clone();
    relabelled[2] = Alg::Ed25519.id();
    assert!(Message::decode(&relabelled).is_err());

    // Forgeries on the device's topic, with the server as sender and an unused sequence
    // number: an Ed25519 signature by another key, then RSA by another key.
    let mut tap = fleet.tap().await;
    let topic = Topics::new(fleet.server.id()).to_device(dev);
    let forge = |key: &SigningKey, seq: u64| {
        let env = Envelope {
            sender: fleet.server.id(),
            recipient: dev,
            seq,
            expiry: unix_now() + 120,
            token: Token::random(),
        };
        Message::sign(&env, &action_body(7, vec![0xee]), key).unwrap()
    };
    let mut an = agent.notices();
    let ed = SigningKey::generate(Alg::Ed25519).unwrap();
    tap.publish(&topic, &forge(&ed, header.seq + 1)).await;
    assert_eq!(agent_drop(&mut an).await, DropReason::AlgorithmMismatch);
    let rsa = tokio::task::spawn_blocking(|| SigningKey::generate(Alg::RsaPss2048).unwrap())
        .await
        .unwrap();
    tap.publish(&topic, &forge(&rsa, header.seq + 1)).await;
    assert_eq!(agent_drop(&mut an).await, DropReason::BadSignature);
    agent_count(&agent, DropReason::AlgorithmMismatch, 1).await;
    agent_count(&agent, DropReason::BadSignature, 1).await;
    assert_eq!(
        log.lock().unwrap().actions,
        vec![(7, vec![1])],
        "a forgery ran"
    );

    // The forgeries did not use up the sequence number: the server's next command (that very
    // number) is accepted.
    let t2 = fleet
        .server
        .command(dev, action_body(7, vec![2]))
        .await
        .unwrap();
    let b2 = published(&mut notices, &t2).await;
    assert_eq!(Message::decode(&b2).unwrap().header().seq, header.seq + 1);
    assert_eq!(
        fleet.response(&hex(&t2)).await,
        Status::ActionSuccess.code()
    );
    assert_eq!(
        log.lock().unwrap().actions,
        vec![(7, vec![1]), (7, vec![2])]
    );
    drop(tap);
    drop(agent);

    // The whole flow, with RSA.
    full_flow(&fleet).await;
    fleet.server.shutdown().await;
}

/// A drop the agent reports as a notice is already in its counters (a regression test: the
/// agent used to publish its counters only after its inbound step, so a caller woken by the
/// notice could read counters without that drop; it failed within a few forgeries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_counters_agree_with_drop_notices() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RedbRegistry::open(&dir.path().join("registry.redb")).unwrap();
    let fleet = Fleet::new(registry, Alg::Ed25519).await;
    let (agent, log, _) = fleet.joined("counted", &[]).await;
    let dev = agent.id();
    let mut notices = fleet.server.notices();
    let token = fleet
        .server
        .command(dev, action_body(7, vec![]))
        .await
        .unwrap();
    let seq = Message::decode(&published(&mut notices, &token).await)
        .unwrap()
        .header()
        .seq;
    assert_eq!(
        fleet.response(&hex(&token)).await,
        Status::ActionSuccess.code()
    );
    let mut tap = fleet.tap().await;
    let topic = Topics::new(fleet.server.id()).to_device(dev);
    let stranger = SigningKey::generate(Alg::Ed25519).unwrap();
    let mut an = agent.notices();
    for i in 1..=300u64 {
        let env = Envelope {
            sender: fleet.server.id(),
            recipient: dev,
            seq: seq + 1,
            expiry: unix_now() + 120,
            token: Token::random(),
        };
        let body = action_body(7, vec![]);
        tap.publish(&topic, &Message::sign(&env, &body, &stranger).unwrap())
            .await;
        assert_eq!(agent_drop(&mut an).await, DropReason::BadSignature);
        assert_eq!(
            agent.counters().get(DropReason::BadSignature),
            i,
            "after notice {i}"
        );
    }
    assert_eq!(log.lock().unwrap().actions.len(), 1);
    drop(agent);
    fleet.server.shutdown().await;
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use common::pg::connect;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_registry_full_flow() {
        common::pg::in_schema("c2v_flow", |s| async move {
            let fleet = Fleet::new(connect(&s).await, Alg::Ed25519).await;
            full_flow(&fleet).await;
            // The registry the flow wrote is the PostgreSQL one: a second connection sees it.
            let other = connect(&s).await;
            let devices = other.devices().await.unwrap();
            assert_eq!(devices.len(), 2);
            let statuses: Vec<_> = devices
                .iter()
                .map(|d| (d.name.clone().unwrap(), d.status))
                .collect();
            assert!(statuses.contains(&("pump-1".into(), DeviceStatus::Revoked)));
            assert!(statuses.contains(&("pump-2".into(), DeviceStatus::Joined)));
            fleet.server.shutdown().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_registry_survives_a_server_restart_and_replays_have_no_effect() {
        common::pg::in_schema("c2v_restart", |s| restart_case(s, false)).await;
    }

    /// As above, but the server's local state file is an older one, as after a crash between
    /// two saves: what was accepted since (and the sequence numbers used since) must come
    /// from the registry, which is written before anything is published or recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_registry_is_authoritative_when_the_state_file_is_stale() {
        common::pg::in_schema("c2v_stale", |s| restart_case(s, true)).await;
    }

    /// A fleet on PostgreSQL, a command answered, a server restart (with the state file the
    /// shutdown saved, or with one older than the command if `stale_state`), then replays.
    async fn restart_case(s: String, stale_state: bool) {
        {
            let fleet = Fleet::new(connect(&s).await, Alg::Ed25519).await;
            let server_id = fleet.server.id();
            let topics = Topics::new(server_id);
            // A: joined, in a group; B: registered only; C: joined then revoked.
            let (a, a_log, a_data) = fleet.joined("meter-a", &["meters"]).await;
            let a_id = a.id();
            let (b_identity, _) = fleet.enroll("meter-b", &[]).await;
            let b_id = b_identity.device_id();
            let (c, _, c_data) = fleet.joined("meter-c", &[]).await;
            let c_id = c.id();
            drop(c);
            fleet.operator().revoke(c_id).await.unwrap();

            // The server's state file as saved before the command below.
            let state_file = fleet.dir.path().join("server").join(STATE_FILE);
            let stale = eventually("the server's state file", || {
                std::future::ready(std::fs::read(&state_file).ok())
            })
            .await;

            // A command to A, and A's response as it went over the broker.
            let mut tap = fleet.tap().await;
            tap.subscribe(&topics.server_filter()).await;
            let mut notices = fleet.server.notices();
            let token = fleet
                .server
                .command(a_id, action_body(7, vec![5]))
                .await
                .unwrap();
            let command = published(&mut notices, &token).await;
            assert_eq!(
                fleet.response(&hex(&token)).await,
                Status::ActionSuccess.code()
            );
            let a_topic = topics.to_server(a_id);
            let response = tap
                .find("A's response", |t, p| {
                    t == a_topic
                        && Message::decode(p).is_ok_and(|m| {
                            m.header().msg_type == MessageType::Response
                                && m.header().token == token
                        })
                })
                .await;
            drop(tap);
            assert_eq!(a_log.lock().unwrap().actions, vec![(7, vec![5])]);

            // Stop everything; keep what the registry holds at that point.
            a.stop().await.ok();
            let port = fleet.port();
            fleet.server.shutdown().await;
            let before: Vec<_> = {
                let mut v = fleet.server.registry().devices().await.unwrap();
                v.sort_by_key(|d| d.id);
                v
            };
            let counters_before = fleet.server.registry().load_counters(a_id).await.unwrap();
            assert!(counters_before.is_some(), "A's counters were never stored");
            let Fleet {
                dir, tap_password, ..
            } = fleet;
            if stale_state {
                // A crash after the last save before the command: the file knows nothing of
                // the command, its response or the sequence numbers they used.
                std::fs::write(&state_file, &stale).unwrap();
            }

            // Start again: a new process would connect afresh to the same schema. The options
            // now ask for RSA: that is for a new key only; the existing key keeps its own.
            let fleet =
                Fleet::on_port(dir, connect(&s).await, Alg::RsaPss2048, port, tap_password).await;
            assert_eq!(fleet.server.id(), server_id);
            assert_eq!(fleet.server.public_key().alg(), Alg::Ed25519);
            let mut after = fleet.server.registry().devices().await.unwrap();
            after.sort_by_key(|d| d.id);
            assert_eq!(after.len(), 3);
            for (x, y) in before.iter().zip(&after) {
                assert_eq!(
                    (x.id, x.status, &x.groups, &x.name),
                    (y.id, y.status, &y.groups, &y.name)
                );
                assert_eq!(x.public_key, y.public_key);
            }
            assert_eq!(fleet.status(a_id).await, DeviceStatus::Joined);
            assert_eq!(fleet.status(b_id).await, DeviceStatus::Registered);
            assert_eq!(fleet.status(c_id).await, DeviceStatus::Revoked);
            assert_eq!(
                fleet.server.registry().load_counters(a_id).await.unwrap(),
                counters_before
            );
            assert_eq!(
                fleet
                    .server
                    .groups(a_id)
                    .await
                    .map(|g| g.into_iter().collect::<Vec<_>>()),
                Some(vec!["meters".to_string()])
            );
            // The response recorded before the restart is still under its token.
            let r = fleet.server.responses(&token).await.unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(
                (r[0].device, r[0].status),
                (a_id, Status::ActionSuccess.code())
            );
            // Statuses hold in the engine too: B is not joined, C is revoked and locked out.
            match fleet.server.command(b_id, action_body(7, vec![])).await {
                Err(ServerError::Engine(EngineError::NotJoined(d))) => assert_eq!(d, b_id),
                other => panic!("command to a registered device: {other:?}"),
            }
            match fleet.server.command(c_id, action_body(7, vec![])).await {
                Err(ServerError::Engine(EngineError::Revoked(d))) => assert_eq!(d, c_id),
                other => panic!("command to a revoked device: {other:?}"),
            }
            let (cu, cp) = broker_creds(&c_data);
            assert!(broker_refuses(port, cu, cp).await, "the broker took C back");

            // A comes back from its data directory.
            let identity = Identity::load(&a_data).unwrap().unwrap();
            let (a, a_log) = fleet.agent(identity, &a_data, None).await;
            assert_eq!(a.status(), AgentStatus::Joined);

            // Replay the old command to A, as a broker-level attacker with the server's rights.
            let mut tap = fleet.tap().await;
            let mut an = a.notices();
            tap.publish(&topics.to_device(a_id), &command).await;
            assert_eq!(agent_drop(&mut an).await, DropReason::Replay);
            agent_count(&a, DropReason::Replay, 1).await;
            assert!(a_log.lock().unwrap().actions.is_empty(), "the replay ran");
            drop(tap);
            // A goes offline (the broker keys sessions by user name: the replayer below would
            // take A's over).
            a.stop().await.ok();

            // Replay A's old response to the server, with A's own broker account.
            let (au, ap) = broker_creds(&a_data);
            let mut as_a = Tap::connect(port, "replayer", &au, &ap).await;
            let mut sn = fleet.server.notices();
            let accepted = fleet.server.counters().await.accepted();
            as_a.publish(&a_topic, &response).await;
            let d = server_drop(&mut sn).await;
            assert_eq!((d.reason, d.sender), (DropReason::Replay, Some(a_id)));
            assert_eq!(fleet.server.counters().await.get(DropReason::Replay), 1);
            assert_eq!(fleet.server.counters().await.accepted(), accepted);
            let r = fleet.server.responses(&token).await.unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].status, Status::ActionSuccess.code());
            as_a.client.disconnect().await.unwrap();
            drop(as_a);

            // A back online.
            let identity = Identity::load(&a_data).unwrap().unwrap();
            let (a, a_log) = fleet.agent(identity, &a_data, None).await;
            assert_eq!(a.status(), AgentStatus::Joined);

            // Fresh traffic both ways still flows: the server's sequence numbers and A's
            // survived the restart.
            let t2 = fleet
                .server
                .command(a_id, action_body(7, vec![6]))
                .await
                .unwrap();
            assert_eq!(
                fleet.response(&hex(&t2)).await,
                Status::ActionSuccess.code()
            );
            assert_eq!(a_log.lock().unwrap().actions, vec![(7, vec![6])]);
            assert_eq!(fleet.server.counters().await.accepted(), accepted + 1);
            assert_ne!(
                fleet.server.registry().load_counters(a_id).await.unwrap(),
                counters_before
            );
            drop(a);
            fleet.server.shutdown().await;
        }
    }
}
