//! Issue 6 point 7 end to end: confidential data between the C2 server and a device agent
//! over a real Mosquitto (started by the server with its generated configuration).
//!
//! A "tap" broker account with the server's rights reads every device → server message; the
//! server's `Published` notices give every server → device message. Neither may carry the
//! plaintext. Waits are bounded; nothing asserts on timing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keav_c2::acl::{hash_password, new_password, BrokerUser, Role};
use keav_c2::agent::{
    Agent, AgentNotice, AgentOptions, AgentStatus, Handlers, Identity, StateStore,
};
use keav_c2::engine::{JoinPolicy, JoinRequestKind};
use keav_c2::identity::api::EnrollmentRequestBody;
use keav_c2::identity::Client;
use keav_c2::keys::Alg;
use keav_c2::registry::{RedbRegistry, Registry};
use keav_c2::server::api::ConfidentialBody;
use keav_c2::server::client::OperatorClient;
use keav_c2::server::{BrokerSetup, ConfNotice, Server, ServerError, ServerNotice, ServerOptions};
use keav_c2::wire::{Body, Data, Value};
use zeroize::Zeroizing;

use common::fleet::{eventually, reach, OPERATOR, PATIENCE};

const SECRET: &str = "the-launch-code-is-PURPLE-OTTER-42";
const SECRET_UP: &str = "device-reading-SECRET-LEMUR-77";

/// Payloads a spy read.
type Payloads = Arc<Mutex<Vec<Vec<u8>>>>;

type Seen = Arc<Mutex<Vec<(Data, bool)>>>;

struct H(Seen);

impl Handlers for H {
    fn on_data(&mut self, data: &Data, confidential: bool) -> keav_c2::wire::Status {
        self.0.lock().unwrap().push((data.clone(), confidential));
        keav_c2::wire::Status::DataSuccess
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn text(id: &str, v: &str) -> Data {
    Data {
        id: id.into(),
        value: Value::Text(v.into()),
    }
}

async fn start_server(dir: &std::path::Path, port: u16, tap: &str) -> Server<RedbRegistry> {
    let registry = RedbRegistry::open(&dir.join("registry.redb")).unwrap();
    let mut o = ServerOptions::new(dir.join("server"), Zeroizing::new(OPERATOR.into()));
    o.http = Some("127.0.0.1:0".parse().unwrap());
    o.engine.join_policy = JoinPolicy::Automatic;
    o.broker = BrokerSetup::Spawn {
        dir: dir.join("server").join("mosquitto"),
        port,
        program: "mosquitto".into(),
    };
    o.extra_broker_users.push(BrokerUser {
        username: "tap".into(),
        password_hash: hash_password(tap).unwrap(),
        role: Role::Server,
    });
    Server::start(o, registry).await.unwrap()
}

async fn enroll(server: &Server<RedbRegistry>, dir: &std::path::Path, name: &str) -> Identity {
    let http = format!("http://{}", server.http_addr().unwrap());
    let operator = Client::new(&http)
        .unwrap()
        .with_operator_token(Zeroizing::new(OPERATOR.into()));
    let (token, _) = operator
        .create_enrollment(&EnrollmentRequestBody {
            ttl_secs: None,
            name: Some(name.into()),
            groups: vec![],
        })
        .await
        .unwrap();
    Identity::enroll(&dir.join(name), &http, &token, Alg::Ed25519)
        .await
        .unwrap()
}

async fn agent(dir: &std::path::Path, name: &str, seen: Seen, join: bool) -> Agent {
    let id = Identity::load(&dir.join(name)).unwrap().unwrap();
    let mut o = AgentOptions::new(StateStore::Dir(dir.join(name)));
    if join {
        o.join = Some(JoinRequestKind::Simple);
    }
    let a = Agent::start(id, o, H(seen)).await.unwrap();
    reach(&a, AgentStatus::Joined).await;
    a
}

/// Collects every payload the tap account reads on the server's topics until stopped.
fn spy(port: u16, pass: String, filter: String) -> (Payloads, Arc<std::sync::atomic::AtomicBool>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, s) = (got.clone(), stop.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tap = common::connected(port, "tap", &pass);
        tap.subscribe(&filter);
        let _ = ready_tx.send(());
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            match tap.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    g.lock().unwrap().push(p.payload.to_vec())
                }
                Ok(Err(_)) => return,
                _ => {}
            }
        }
    });
    ready_rx.recv_timeout(PATIENCE).expect("the tap subscribed");
    (got, stop)
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<ServerNotice>, out: &mut Vec<ServerNotice>) {
    while let Ok(n) = rx.try_recv() {
        out.push(n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_data_both_ways_survives_restarts_and_never_shows_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let tap = new_password();
    let server = start_server(dir.path(), port, &tap).await;
    let mut sn = server.notices();
    let mut notices = Vec::new();
    let (wire, spy_stop) = spy(
        port,
        tap.to_string(),
        keav_c2::topics::Topics::new(server.id()).server_filter(),
    );

    enroll(&server, dir.path(), "pump").await;
    enroll(&server, dir.path(), "plain").await;
    let seen: Seen = Seen::default();
    let dev = agent(dir.path(), "pump", seen.clone(), true).await;
    let d = dev.id();
    let mut an = dev.notices();

    // Nothing sealed before a session exists.
    assert!(matches!(
        server.send_confidential(d, text("x", "y")).await,
        Err(ServerError::Confidential(_))
    ));

    // The operator starts the session over HTTP.
    let op = OperatorClient::new(
        &format!("http://{}", server.http_addr().unwrap()),
        Zeroizing::new(OPERATOR.into()),
    )
    .unwrap();
    let sent = op
        .confidential(&d.to_hex(), &ConfidentialBody::default())
        .await
        .unwrap();
    assert!(!sent.sent.is_empty());
    eventually("the session on both sides", || {
        let (s, a) = (server.clone(), dev.confidential_info());
        async move {
            let i = s.confidential_info(d).await.unwrap();
            (i.established && !i.handshaking && a.established && a.session == i.session)
                .then_some(())
        }
    })
    .await;
    let session = server.confidential_info(d).await.unwrap().session.unwrap();
    // The device acknowledged every handshake command.
    for item in &sent.sent {
        let t = keav_c2::server::http::parse_token(&item.token).unwrap();
        eventually("the handshake acknowledgement", || {
            let s = server.clone();
            let t = t.clone();
            async move { (!s.responses(&t).await.unwrap().is_empty()).then_some(()) }
        })
        .await;
    }

    // Server → device, sealed: the handler gets the real data, flagged confidential.
    let tok = server
        .send_confidential(d, text("launch", SECRET))
        .await
        .unwrap();
    eventually("the sealed data at the device", || {
        std::future::ready(
            seen.lock()
                .unwrap()
                .iter()
                .any(|(x, _)| x.id == "launch")
                .then_some(()),
        )
    })
    .await;
    assert_eq!(seen.lock().unwrap()[0], (text("launch", SECRET), true));
    eventually("its response", || {
        let s = server.clone();
        let t = tok.clone();
        async move { (!s.responses(&t).await.unwrap().is_empty()).then_some(()) }
    })
    .await;

    // Device → server, sealed: announced opened and marked confidential.
    dev.send_data_confidential(text("reading", SECRET_UP))
        .await
        .unwrap();
    eventually("the sealed data at the server", || {
        drain(&mut sn, &mut notices);
        std::future::ready(
            notices
                .iter()
                .any(|n| {
                    matches!(n, ServerNotice::ConfidentialData { device, data, .. }
                    if *device == d && *data == text("reading", SECRET_UP))
                })
                .then_some(()),
        )
    })
    .await;
    // Not announced as plain data.
    assert!(!notices.iter().any(|n| matches!(
        n,
        ServerNotice::Event(keav_c2::engine::ServerEvent::Data { .. })
    )));

    let sealed_before = server.confidential_info(d).await.unwrap();
    let dev_before = dev.confidential_info();

    // Restart both: the agent, then the server (same broker port, same registry).
    dev.stop().await.ok();
    server.shutdown().await;
    drop(server);
    drop(sn);
    spy_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all_wire: Vec<Vec<u8>> = wire.lock().unwrap().drain(..).collect();
    all_wire.extend(notices.iter().filter_map(|n| match n {
        ServerNotice::Published { bytes, .. } => Some(bytes.to_vec()),
        _ => None,
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let server = start_server(dir.path(), port, &tap).await;
    let mut sn = server.notices();
    let mut notices = Vec::new();
    let (wire2, spy_stop2) = spy(
        port,
        tap.to_string(),
        keav_c2::topics::Topics::new(server.id()).server_filter(),
    );
    let op = OperatorClient::new(
        &format!("http://{}", server.http_addr().unwrap()),
        Zeroizing::new(OPERATOR.into()),
    )
    .unwrap();
    let seen2: Seen = Seen::default();
    let dev = agent(dir.path(), "pump", seen2.clone(), false).await;
    // Same session on both sides, restored, without a handshake.
    let i = server.confidential_info(d).await.unwrap();
    assert!(i.established);
    assert_eq!(i.session, Some(session));
    assert_eq!(dev.confidential_info().session, Some(session));
    assert_eq!(i.records_sealed, sealed_before.records_sealed);

    // Data both ways continue; sequence numbers continue (no nonce reuse).
    server
        .send_confidential(d, text("launch2", SECRET))
        .await
        .unwrap();
    eventually("sealed data after the restart", || {
        std::future::ready(
            seen2
                .lock()
                .unwrap()
                .iter()
                .any(|(x, c)| x.id == "launch2" && *c)
                .then_some(()),
        )
    })
    .await;
    dev.send_data_confidential(text("reading2", SECRET_UP))
        .await
        .unwrap();
    eventually("device data after the restart", || {
        drain(&mut sn, &mut notices);
        std::future::ready(
            notices
                .iter()
                .any(|n| {
                    matches!(n, ServerNotice::ConfidentialData { data, .. }
                    if data.id == "reading2")
                })
                .then_some(()),
        )
    })
    .await;
    let after = server.confidential_info(d).await.unwrap();
    assert_eq!(after.session, Some(session));
    assert_eq!(after.records_sealed, sealed_before.records_sealed + 1);
    assert_eq!(
        dev.confidential_info().records_sealed,
        dev_before.records_sealed + 1
    );
    // No handshake after the restart: no session established, no frame refused.
    assert!(!notices.iter().any(|n| matches!(
        n,
        ServerNotice::Confidential {
            notice: ConfNotice::Established { .. },
            ..
        }
    )));
    let counters = server.confidential_counters();
    assert_eq!((counters.established, counters.records_refused), (0, 0));
    while let Ok(n) = an.try_recv() {
        assert!(!matches!(n, AgentNotice::ConfidentialRefused(_)), "{n:?}");
    }

    // A device without confidentiality: plain data both ways as before.
    let seen_plain: Seen = Seen::default();
    let plain = agent(dir.path(), "plain", seen_plain.clone(), true).await;
    server
        .command(plain.id(), Body::Data(text("setpoint", "plain-ok")))
        .await
        .unwrap();
    eventually("plain data at the plain device", || {
        std::future::ready(
            (seen_plain.lock().unwrap().first() == Some(&(text("setpoint", "plain-ok"), false)))
                .then_some(()),
        )
    })
    .await;
    plain.send_data(text("temp", "plain-up")).await.unwrap();
    eventually("plain data at the server", || {
        drain(&mut sn, &mut notices);
        std::future::ready(
            notices
                .iter()
                .any(|n| {
                    matches!(n, ServerNotice::Event(keav_c2::engine::ServerEvent::Data { data, .. })
                    if data.id == "temp")
                })
                .then_some(()),
        )
    })
    .await;

    // The operator requires confidentiality for the pump: plain data from it is refused and
    // counted, plain data to it is not sent; sealed data still flows.
    op.confidential(
        &d.to_hex(),
        &ConfidentialBody {
            start: Some(false),
            required: Some(true),
        },
    )
    .await
    .unwrap();
    assert!(op.confidential_info(&d.to_hex()).await.unwrap().required);
    assert!(matches!(
        server.command(d, Body::Data(text("plain", "no"))).await,
        Err(ServerError::ConfidentialRequired(_))
    ));
    dev.send_data(text("sneaky", "plain-from-pump"))
        .await
        .unwrap();
    eventually("the plain data to be refused", || {
        drain(&mut sn, &mut notices);
        std::future::ready(
            notices
                .iter()
                .any(|n| matches!(n, ServerNotice::Confidential { device, notice: ConfNotice::Refused { .. } } if *device == d))
                .then_some(()),
        )
    })
    .await;
    assert_eq!(server.confidential_counters().plain_refused, 1);
    assert!(!notices.iter().any(|n| matches!(n,
        ServerNotice::Event(keav_c2::engine::ServerEvent::Data { data, .. }) if data.id == "sneaky")));
    let stats = op.stats().await.unwrap();
    assert!(stats
        .confidential
        .contains(&("plain_refused".to_string(), 1)));
    // The policy survives in the registry.
    assert_eq!(
        server
            .registry()
            .load_blob(keav_c2::registry::BlobKind::ConfidentialPolicy, d)
            .await
            .unwrap(),
        Some(vec![1])
    );

    // The wire: the plaintexts and the real data ids never appear in any payload; the
    // sealed messages are there (the spy did see traffic).
    spy_stop2.store(true, std::sync::atomic::Ordering::Relaxed);
    all_wire.extend(wire2.lock().unwrap().drain(..));
    all_wire.extend(notices.iter().filter_map(|n| match n {
        ServerNotice::Published { bytes, .. } => Some(bytes.to_vec()),
        _ => None,
    }));
    let sealed = all_wire
        .iter()
        .filter(|p| contains(p, b"keav.sealed"))
        .count();
    assert!(sealed >= 4, "sealed messages seen on the wire: {sealed}");
    for needle in [
        SECRET.as_bytes(),
        SECRET_UP.as_bytes(),
        b"launch",
        b"reading",
    ] {
        assert!(
            !all_wire.iter().any(|p| contains(p, needle)),
            "{} on the wire",
            String::from_utf8_lossy(needle)
        );
    }
    // The plain messages are visible (the check above can fail).
    assert!(all_wire.iter().any(|p| contains(p, b"plain-up")));
    assert!(all_wire.iter().any(|p| contains(p, b"plain-from-pump")));

    drop(plain);
    drop(dev);
    server.shutdown().await;
}
