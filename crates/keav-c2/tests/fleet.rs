//! Issue 6: a fleet of 1,000 simulated devices on one broker receives a group command, and
//! every response is accounted for, per token.
//!
//! One C2 server starts its own Mosquitto (generated configuration, one account per device,
//! one connection per account); 1,000 device agents run in this process, each with its own
//! MQTT connection and account. The devices are provisioned straight into the registry (keys
//! and broker password hashes made here; the HTTP registration path is covered by
//! `c2_e2e.rs`), join over MQTT (automatic policy), then the server sends one signed action
//! to the group. The test waits (bounded) until each of the 1,000 tokens has exactly one
//! response recorded in the registry, from the device it was sent to, with the right status.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keav_c2::acl::{hash_password, new_password};
use keav_c2::agent::{AcceptAll, Agent, AgentOptions, AgentStatus, Identity, StateStore};
use keav_c2::engine::{JoinPolicy, JoinRequestKind, Targets};
use keav_c2::identity::{BrokerPassword, Registration};
use keav_c2::keys::{Alg, DeviceId, SigningKey};
use keav_c2::registry::{DeviceRecord, DeviceStatus, RedbRegistry, Registry};
use keav_c2::server::{Server, ServerOptions};
use keav_c2::topics::Topics;
use keav_c2::wire::{Action, Body, Status, Token};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

const FLEET: usize = 1000;
/// Bounds a hang; nothing asserts on speed.
const PATIENCE: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_take_a_group_command_and_every_response_is_accounted_for() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let registry = RedbRegistry::open(&dir.path().join("registry.redb")).unwrap();

    // Provision the fleet: keys, broker passwords (only hashes are stored), registry rows.
    let mut devices: Vec<(SigningKey, Zeroizing<String>)> = Vec::with_capacity(FLEET);
    let now = keav_c2::server::unix_now();
    for i in 0..FLEET {
        let key = SigningKey::generate(Alg::Ed25519).unwrap();
        let password = new_password();
        let record = DeviceRecord {
            id: key.device_id(),
            alg: Alg::Ed25519,
            public_key: key.public().to_bytes(),
            status: DeviceStatus::Registered,
            password_hash: hash_password(&password).unwrap(),
            created: now,
            name: Some(format!("sim-{i}")),
            groups: vec!["fleet".into()],
        };
        registry.insert_device(record).await.unwrap();
        devices.push((key, password));
    }
    // One device outside the group: it must get nothing.
    let outsider = SigningKey::generate(Alg::Ed25519).unwrap();
    registry
        .insert_device(DeviceRecord {
            id: outsider.device_id(),
            alg: Alg::Ed25519,
            public_key: outsider.public().to_bytes(),
            status: DeviceStatus::Registered,
            password_hash: hash_password(&new_password()).unwrap(),
            created: now,
            name: None,
            groups: vec!["other".into()],
        })
        .await
        .unwrap();
    eprintln!(
        "fleet: {FLEET} devices provisioned ({:?})",
        started.elapsed()
    );

    let mut o = ServerOptions::new(dir.path().join("server"), Zeroizing::new("op".into()));
    o.engine.join_policy = JoinPolicy::Automatic;
    let server = Server::start(o, registry).await.unwrap();
    let server_key = server.public_key().clone();
    let server_id = server.id();
    eprintln!("fleet: server and broker up at {}", server.broker_addr());

    // 1,000 agents, each with its own connection, started 50 at a time; each asks to join.
    let mut agents: Vec<Agent> = Vec::with_capacity(FLEET);
    let mut pending = devices.into_iter();
    loop {
        let mut set = JoinSet::new();
        for (key, password) in pending.by_ref().take(50) {
            let reg = Registration {
                device_id: key.device_id(),
                broker_username: key.device_id().to_hex(),
                broker_password: BrokerPassword::new(password),
                broker: server.broker_addr().to_string(),
                server_id,
                server_key: server_key.clone(),
                topics: Topics::new(server_id),
            };
            let identity = Identity::new(key, reg).unwrap();
            let mut opts = AgentOptions::new(StateStore::Memory);
            opts.join = Some(JoinRequestKind::Simple);
            opts.connect_timeout = Duration::from_secs(60);
            set.spawn(Agent::start(identity, opts, AcceptAll));
        }
        if set.is_empty() {
            break;
        }
        while let Some(r) = set.join_next().await {
            agents.push(r.unwrap().unwrap());
        }
    }
    assert_eq!(agents.len(), FLEET);
    eprintln!("fleet: {FLEET} agents connected ({:?})", started.elapsed());
    let deadline = Instant::now() + PATIENCE;
    for (i, a) in agents.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = tokio::time::timeout(left, a.wait_status(|s| s == AgentStatus::Joined))
            .await
            .unwrap_or_else(|_| panic!("device {i} never joined"));
        assert_eq!(s, Some(AgentStatus::Joined));
    }
    eprintln!("fleet: all {FLEET} joined ({:?})", started.elapsed());

    // The group command: one signed action per device, each with its own token.
    let sent = server
        .command_group(
            &Targets::Group("fleet".into()),
            Body::Action(Action {
                action: 1,
                args: b"reboot".to_vec(),
            }),
            Some(600),
        )
        .await
        .unwrap();
    assert_eq!(sent.sent.len(), FLEET, "skipped: {:?}", sent.skipped);
    assert!(sent.skipped.is_empty());
    let expected: HashMap<Token, DeviceId> =
        sent.sent.iter().map(|(d, t)| (t.clone(), *d)).collect();
    assert_eq!(expected.len(), FLEET, "tokens are distinct");
    let fleet_ids: std::collections::HashSet<DeviceId> = agents.iter().map(|a| a.id()).collect();
    assert!(sent.sent.iter().all(|(d, _)| fleet_ids.contains(d)));
    assert!(!fleet_ids.contains(&outsider.device_id()));

    // Every token answered, exactly once, by its device, with success.
    let mut open: Vec<Token> = expected.keys().cloned().collect();
    let mut last_report = Instant::now();
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {FLEET} responses missing",
            open.len()
        );
        let mut still = Vec::new();
        for t in open {
            let r = server.responses(&t).await.unwrap();
            match r.as_slice() {
                [] => still.push(t),
                [one] => {
                    assert_eq!(one.device, expected[&t], "response from another device");
                    assert_eq!(one.status, Status::ActionSuccess.code());
                }
                more => panic!("{} responses under one token", more.len()),
            }
        }
        open = still;
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("fleet: {} of {FLEET} responses in", FLEET - open.len());
            last_report = Instant::now();
        }
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "fleet: all {FLEET} responses accounted for ({:?})",
        started.elapsed()
    );
    for t in expected.keys() {
        assert_eq!(
            server.outcome(t).await,
            Some(keav_c2::engine::Outcome::Answered(Status::ActionSuccess))
        );
    }
    // Nothing was dropped on either side.
    let c = server.counters().await;
    assert_eq!(c.dropped(), 0, "server drops: {:?}", c.nonzero());
    // Each device accepted its join answer and the command: two messages.
    for a in &agents {
        let c = a.counters();
        assert_eq!(c.dropped(), 0);
        assert_eq!(c.accepted(), 2);
    }
    drop(agents);
    server.shutdown().await;
}
