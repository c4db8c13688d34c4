//! Issue 6, broker ACLs: a real Mosquitto runs the configuration keav generates
//! (`keav_c2::acl`), and MQTT clients holding one account's credentials try to reach what
//! that account must not reach.
//!
//! Negative checks are made by order, not by waiting: the broker handles one client's
//! packets in order and delivers to a subscriber in order, so when the forbidden message is
//! sent first and an allowed marker second, receiving only the marker proves the forbidden
//! one was not delivered (if the ACL let it through, it would arrive first and fail the
//! test). Messages that arrive while a client waits for an acknowledgement are kept, never
//! skipped ([`common::Peer`]).

mod common;

use common::*;
use keav_c2::acl::{
    hash_password, hash_password_with, new_password, BrokerUser, MosquittoConfig, Role,
};
use keav_c2::keys::DeviceId;
use keav_c2::topics::Topics;
use rumqttc::{ConnectReturnCode, ConnectionError, Publish, QoS, SubscribeReasonCode};
use zeroize::Zeroizing;

const SERVER_USER: &str = "c2server";

/// An account and its password (the password only ever lives here and in the client).
struct Account {
    user: BrokerUser,
    password: Zeroizing<String>,
}

impl Account {
    fn new(username: &str, role: Role) -> Account {
        let password = new_password();
        let user = BrokerUser {
            username: username.to_owned(),
            password_hash: hash_password(&password).expect("hash"),
            role,
        };
        Account { user, password }
    }

    fn device(id: DeviceId) -> Account {
        Account::new(&id.to_hex(), Role::Device)
    }

    fn name(&self) -> &str {
        &self.user.username
    }

    fn connect(&self, port: u16) -> Peer {
        connected(port, self.name(), &self.password)
    }

    /// Whether the broker refuses a fresh connection with this account's credentials.
    fn is_refused(&self, port: u16) -> bool {
        let (_c, mut conn) = client(port, "probe", Some((self.name(), &self.password)));
        refused(connack(&mut conn))
    }
}

/// A fleet of one server and three devices behind a private broker.
struct Fleet {
    _dir: tempfile::TempDir,
    cfg: MosquittoConfig,
    topics: Topics,
    server: Account,
    a: Account,
    b: Account,
    c: Account,
    broker: Broker,
}

impl Fleet {
    fn start() -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let topics = Topics::new(DeviceId([0x5e; 8]));
        let mut cfg = MosquittoConfig::new(dir.path().join("broker"), free_port(), topics);
        if running_as_root() {
            cfg.run_as = Some("root".into());
        }
        let server = Account::new(SERVER_USER, Role::Server);
        let a = Account::device(DeviceId([0xa1; 8]));
        let b = Account::device(DeviceId([0xb2; 8]));
        // C's hash uses another iteration count: Mosquitto reads the count from the hash.
        let c_password = new_password();
        let c = Account {
            user: BrokerUser::device(
                DeviceId([0xc3; 8]),
                hash_password_with(&c_password, 1000).expect("hash"),
            ),
            password: c_password,
        };
        let users = [&server, &a, &b, &c].map(|x| x.user.clone());
        let files = cfg.write(&users).expect("write broker config");
        let broker = Broker::start(&files, cfg.port);
        Fleet {
            _dir: dir,
            cfg,
            topics,
            server,
            a,
            b,
            c,
            broker,
        }
    }

    fn port(&self) -> u16 {
        self.broker.port()
    }

    /// The command topic of `acc` (server -> device).
    fn d(&self, acc: &Account) -> String {
        self.topics
            .to_device(DeviceId::from_hex(acc.name()).expect("device"))
    }

    /// The server-bound topic of `acc` (device -> server).
    fn s(&self, acc: &Account) -> String {
        self.topics
            .to_server(DeviceId::from_hex(acc.name()).expect("device"))
    }

    fn all_devices_filter(&self) -> String {
        format!("keav/c2/{}/d/+", self.topics.server())
    }
}

fn ok1() -> SubscribeReasonCode {
    SubscribeReasonCode::Success(QoS::AtLeastOnce)
}

fn refused(r: Result<(), ConnectionError>) -> bool {
    matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
        ))
    )
}

/// Mosquitto's ACL file is not consulted for SUBSCRIBE (mosquitto.conf(5): `read` is checked
/// when a message is delivered), so a forbidden filter is granted at SUBACK and then delivers
/// nothing. The tests subscribe to the forbidden filters anyway and assert on what is
/// delivered; a SUBACK other than a grant or 0x80 fails.
fn try_forbidden_subscribe(peer: &mut Peer, filter: &str) {
    let code = peer.subscribe(filter);
    assert!(
        matches!(
            code,
            SubscribeReasonCode::Failure | SubscribeReasonCode::Success(_)
        ),
        "{filter}: {code:?}"
    );
}

/// Every message in `got` is on `topic`.
fn only_on(got: &[Publish], topic: &str, who: &str) {
    for p in got {
        assert_eq!(
            p.topic,
            topic,
            "{who} received {:?} on {}",
            String::from_utf8_lossy(&p.payload),
            p.topic
        );
    }
}

fn payloads(got: &[Publish]) -> Vec<&[u8]> {
    got.iter().map(|p| &p.payload[..]).collect()
}

#[test]
fn a_device_cannot_read_or_write_another_devices_topics() {
    let f = Fleet::start();
    let port = f.port();
    let mut srv = f.server.connect(port);
    let mut a = f.a.connect(port);
    let mut b = f.b.connect(port);
    assert_eq!(srv.subscribe(&f.topics.server_filter()), ok1());
    assert_eq!(a.subscribe(&f.d(&f.a)), ok1());
    assert_eq!(b.subscribe(&f.d(&f.b)), ok1());

    // A asks for B's command topic, every device's, B's reports, every report, everything.
    for filter in [
        f.d(&f.b),
        f.all_devices_filter(),
        f.s(&f.b),
        f.topics.server_filter(),
        "keav/#".to_owned(),
        "#".to_owned(),
    ] {
        try_forbidden_subscribe(&mut a, &filter);
    }

    // The server commands B, then A: everything A receives is on its own topic.
    srv.publish(&f.d(&f.b), b"for B");
    srv.publish(&f.d(&f.a), b"for A");
    only_on(&a.until_marker(b"for A"), &f.d(&f.a), "A");
    // Positive control: B did get its command.
    let got = b.next_publish();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (f.d(&f.b).as_str(), &b"for B"[..])
    );

    // A writes as B to the server, a command into B's topic, into its own command topic and
    // beside the scheme, then its own report: the server sees only the report.
    a.publish(&f.s(&f.b), b"forged report");
    a.publish(&f.d(&f.b), b"forged command");
    a.publish(&f.d(&f.a), b"to itself");
    a.publish(&format!("keav/c2/{}/s/x", f.topics.server()), b"x");
    a.publish(&format!("{}/x", f.s(&f.a)), b"deeper");
    a.publish(&f.s(&f.a), b"A's report");
    let got = srv.until_marker(b"A's report");
    only_on(&got, &f.s(&f.a), "the server");
    assert_eq!(payloads(&got), [&b"A's report"[..]]);
    // The next command B receives is the server's, not A's forgery.
    srv.publish(&f.d(&f.b), b"second for B");
    let got = b.until_marker(b"second for B");
    assert_eq!(
        payloads(&got),
        [&b"second for B"[..]],
        "B received A's forgery"
    );
    // B's report reaches the server, and not A (which asked for s/+ and #).
    b.publish(&f.s(&f.b), b"B's report");
    let got = srv.next_publish();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (f.s(&f.b).as_str(), &b"B's report"[..])
    );
    srv.publish(&f.d(&f.a), b"A's marker");
    let got = a.until_marker(b"A's marker");
    only_on(&got, &f.d(&f.a), "A");
    assert!(
        !payloads(&got).contains(&&b"to itself"[..]),
        "A wrote its own command topic"
    );
}

#[test]
fn the_server_has_the_rights_it_needs_and_no_more() {
    let f = Fleet::start();
    let port = f.port();
    let mut srv = f.server.connect(port);
    let mut a = f.a.connect(port);
    assert_eq!(a.subscribe(&f.d(&f.a)), ok1());
    assert_eq!(srv.subscribe(&f.topics.server_filter()), ok1());
    // It may read what devices write, not what is written to them, nor anything else.
    for filter in [f.d(&f.a), f.all_devices_filter(), "#".to_owned()] {
        try_forbidden_subscribe(&mut srv, &filter);
    }
    // It cannot pose as a device (towards itself or another server process), and does not
    // read the commands it sends.
    srv.publish(&f.s(&f.a), b"spoofed report");
    srv.publish(&f.d(&f.a), b"command");
    a.publish(&f.s(&f.a), b"real report");
    let got = srv.until_marker(b"real report");
    only_on(&got, &f.s(&f.a), "the server");
    assert_eq!(
        payloads(&got),
        [&b"real report"[..]],
        "the server read more"
    );
    // Nor write outside its fleet's command topics: A receives only the real commands.
    let other_fleet = Topics::new(DeviceId([9; 8]));
    let a_id = DeviceId::from_hex(f.a.name()).expect("id");
    srv.publish(&other_fleet.to_device(a_id), b"other fleet");
    srv.publish(&format!("{}/sub", f.d(&f.a)), b"deeper");
    srv.publish(&f.d(&f.a), b"second command");
    let got = a.until_marker(b"second command");
    only_on(&got, &f.d(&f.a), "A");
    assert_eq!(payloads(&got), [&b"command"[..], &b"second command"[..]]);
}

#[test]
fn wrong_password_unknown_user_and_anonymous_are_refused() {
    let f = Fleet::start();
    let port = f.port();
    // Positive controls: the right passwords work, whatever the iteration count of the hash.
    for acc in [&f.a, &f.c, &f.server] {
        assert!(!acc.is_refused(port), "{} refused", acc.name());
    }
    let wrong = new_password();
    let cases: [(&str, Option<(&str, &str)>); 7] = [
        ("wrong password", Some((f.a.name(), &wrong))),
        ("empty password", Some((f.a.name(), ""))),
        (
            "another device's password",
            Some((f.a.name(), &f.b.password)),
        ),
        (
            "a device's password for the server",
            Some((SERVER_USER, &f.a.password)),
        ),
        (
            "the stored hash as password",
            Some((f.a.name(), &f.a.user.password_hash)),
        ),
        ("unknown user", Some(("ddddddddddddddd0", &f.a.password))),
        ("anonymous", None),
    ];
    for (what, creds) in cases {
        let (_c, mut conn) = client(port, "intruder", creds);
        assert!(refused(connack(&mut conn)), "{what} accepted");
    }
}

#[test]
fn a_revoked_device_is_cut_off_and_refused() {
    let f = Fleet::start();
    let port = f.port();
    let mut srv = f.server.connect(port);
    let mut a = f.a.connect(port);
    let mut b = f.b.connect(port);
    assert_eq!(srv.subscribe(&f.topics.server_filter()), ok1());
    assert_eq!(a.subscribe(&f.d(&f.a)), ok1());
    assert_eq!(b.subscribe(&f.d(&f.b)), ok1());
    // Before: A works both ways.
    srv.publish(&f.d(&f.a), b"before");
    assert_eq!(payloads(&a.until_marker(b"before")), [&b"before"[..]]);
    a.publish(&f.s(&f.a), b"A before");
    assert_eq!(payloads(&srv.until_marker(b"A before")), [&b"A before"[..]]);

    // Revoke A while it is connected and subscribed.
    let users = [&f.server, &f.b, &f.c].map(|x| x.user.clone());
    f.cfg.apply(&users, f.broker.pid()).expect("apply");

    // Mosquitto 2.0.11 re-checks connected clients on reload and drops A, delivering nothing
    // more to it.
    let (why, got) = a.until_closed();
    assert!(got.is_empty(), "A received {got:?} while being revoked");
    assert!(!refused(Err(why)), "closed by a refusal, not by the reload");
    // A's client reconnects on its next poll and is refused; so is a fresh connection.
    assert!(refused(connack(&mut a.conn)), "revoked A reconnected");
    assert!(f.a.is_refused(port), "revoked A connected afresh");
    // B, not revoked, keeps its session through the reload, both ways.
    srv.publish(&f.d(&f.a), b"after, for A");
    srv.publish(&f.d(&f.b), b"after, for B");
    assert_eq!(
        payloads(&b.until_marker(b"after, for B")),
        [&b"after, for B"[..]]
    );
    b.publish(&f.s(&f.b), b"B still reports");
    let got = srv.until_marker(b"B still reports");
    only_on(&got, &f.s(&f.b), "the server");
}

#[test]
fn apply_rotates_passwords_and_adds_devices() {
    let mut f = Fleet::start();
    let port = f.port();
    let mut old_b_peer = f.b.connect(port);
    let d = Account::device(DeviceId([0xd4; 8]));
    assert!(d.is_refused(port), "D connected before it was added");
    // B gets a new password, D is added.
    let old_b = std::mem::replace(&mut f.b, Account::device(DeviceId([0xb2; 8])));
    let users = [&f.server, &f.a, &f.b, &f.c, &d].map(|x| x.user.clone());
    f.cfg.apply(&users, f.broker.pid()).expect("apply");
    // B's session under the old password is closed; the old password no longer works.
    let (why, _) = old_b_peer.until_closed();
    assert!(!refused(Err(why)));
    assert!(old_b.is_refused(port), "B's old password still accepted");
    // The new password works, and so does D, on its own topics only.
    let mut b = f.b.connect(port);
    let mut dp = d.connect(port);
    let mut srv = f.server.connect(port);
    try_forbidden_subscribe(&mut dp, &f.d(&f.b));
    assert_eq!(dp.subscribe(&f.d(&d)), ok1());
    assert_eq!(b.subscribe(&f.d(&f.b)), ok1());
    srv.publish(&f.d(&f.b), b"for B");
    srv.publish(&f.d(&d), b"for D");
    only_on(&dp.until_marker(b"for D"), &f.d(&d), "D");
    assert_eq!(payloads(&b.until_marker(b"for B")), [&b"for B"[..]]);
}

#[test]
fn apply_refuses_to_signal_a_process_that_is_not_the_broker() {
    let f = Fleet::start();
    let users = [&f.server, &f.a].map(|x| x.user.clone());
    // Our own pid: alive, not mosquitto; it must not receive SIGHUP (it would die).
    assert!(f.cfg.apply(&users, std::process::id()).is_err());
    // The broker was not told: it still runs the old files, B can still connect.
    assert!(!f.b.is_refused(f.port()));
}
