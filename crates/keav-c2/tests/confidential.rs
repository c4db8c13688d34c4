//! Optional confidentiality: a KEAV channel inside signed C2 messages, in memory with the
//! sans-IO engines (one ServerEngine, joined devices, a fake clock). Every MQTT payload is
//! logged so that tests can check what an observer of the broker sees.

use std::convert::Infallible;

use keav_c2::confidential::{
    self, is_frame, is_sealed, ConfError, ConfEvent, Confidential, ConfidentialConfig, Pairing,
    SessionId, Side, StoreFirst, FRAME_HEADER_LEN, SEALED_DATA_ID,
};
use keav_c2::engine::{
    Device, DeviceConfig, DeviceStatus, DeviceView, DropReason, Dropped, Joined, JoinedEvent,
    MustPersist, Outgoing, RegisteredEvent, ServerConfig, ServerEngine, ServerEvent,
};
use keav_c2::keys::{Alg, DeviceId, PublicKey, SigningKey};
use keav_c2::topics::Topics;
use keav_c2::wire::{Body, Data, Envelope, Message, Status, Token, Value};
use keav_proto::cache::Verification;
use keav_proto::record::{RecordError, HEADER_LEN};
use rand_core::OsRng;

const T0: u64 = 1_700_000_000;
const EXP: u64 = T0 + 600;
const NOW_MS: u64 = T0 * 1000;

fn ok<T, R>(m: MustPersist<T, R>) -> T {
    m.persist(|_| Ok::<_, Infallible>(())).unwrap()
}

fn keep<T>(s: StoreFirst<T>) -> T {
    s.persist(|_| Ok::<_, Infallible>(())).unwrap()
}

fn key_copy(k: &SigningKey) -> SigningKey {
    SigningKey::from_bytes(k.alg(), &k.to_bytes().unwrap()).unwrap()
}

/// A joined device with its confidential session (if it has one) and the server's.
struct Node {
    dev: Device<Joined>,
    key: SigningKey,
    public: PublicKey,
    conf: Option<Confidential>,
    server_conf: Option<Confidential>,
}

impl Node {
    fn id(&self) -> DeviceId {
        self.dev.id()
    }
    fn conf(&mut self) -> &mut Confidential {
        self.conf.as_mut().unwrap()
    }
    fn sconf(&mut self) -> &mut Confidential {
        self.server_conf.as_mut().unwrap()
    }
}

struct Fleet {
    server: ServerEngine,
    server_pub: PublicKey,
    /// Every MQTT payload published, in order.
    wire: Vec<Vec<u8>>,
}

impl Fleet {
    fn new() -> Fleet {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let server_pub = k.public();
        Fleet {
            server: ServerEngine::new(k, ServerConfig::default()),
            server_pub,
            wire: Vec::new(),
        }
    }

    fn pairing(&self, device: &PublicKey) -> Pairing {
        Pairing::new(&self.server_pub, device)
    }

    /// A joined device; with `confidential`, both ends get a session object.
    fn join(&mut self, confidential: bool) -> Node {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let key = key_copy(&k);
        let public = k.public();
        self.server
            .upsert_device(DeviceView::new(public.clone(), DeviceStatus::Registered));
        let mut d = Device::new(k, self.server_pub.clone(), DeviceConfig::default());
        let cmd = ok(self.server.join_command(d.id(), EXP, T0).unwrap());
        let h = ok(d.handle(&cmd.topic, &cmd.bytes, T0).unwrap());
        let RegisteredEvent::Joined(grant) = h.event else {
            panic!("{:?}", h.event)
        };
        let reply = h.reply.unwrap();
        self.server
            .handle(&reply.topic, &reply.bytes, T0)
            .map(ok)
            .unwrap();
        let (conf, server_conf) = if confidential {
            let p = self.pairing(&public);
            (
                Some(Confidential::new(
                    Side::Device,
                    p.clone(),
                    ConfidentialConfig::default(),
                    &mut OsRng,
                )),
                Some(Confidential::new(
                    Side::Server,
                    p,
                    ConfidentialConfig::default(),
                    &mut OsRng,
                )),
            )
        } else {
            (None, None)
        };
        Node {
            dev: d.join(grant),
            key,
            public,
            conf,
            server_conf,
        }
    }

    fn log(&mut self, o: &Outgoing) {
        self.wire.push(o.bytes.clone());
    }

    /// Publishes a device message to the server.
    fn up(&mut self, o: &Outgoing) -> Result<Vec<ServerEvent>, Dropped> {
        self.log(o);
        self.server
            .handle(&o.topic, &o.bytes, T0 + 1)
            .map(|m| ok(m).events)
    }

    /// Publishes a server message to a device.
    fn down(&mut self, n: &mut Node, o: &Outgoing) -> Result<JoinedEvent, Dropped> {
        self.log(o);
        n.dev
            .handle(&o.topic, &o.bytes, T0 + 1)
            .map(|m| ok(m).event)
    }

    /// Carries handshake frames back and forth until both sides are quiet; returns the
    /// events each side saw (server's, device's).
    fn run_handshake(
        &mut self,
        n: &mut Node,
        mut to_device: Vec<Vec<u8>>,
        mut to_server: Vec<Vec<u8>>,
    ) -> (Vec<ConfEvent>, Vec<ConfEvent>) {
        let (mut sev, mut dev) = (Vec::new(), Vec::new());
        for _ in 0..32 {
            if to_device.is_empty() && to_server.is_empty() {
                return (sev, dev);
            }
            for f in std::mem::take(&mut to_device) {
                let out =
                    ok(confidential::server_send(&mut self.server, n.id(), f, EXP, T0).unwrap());
                let JoinedEvent::Generic { data, token } = self.down(n, &out).unwrap() else {
                    panic!("not a generic")
                };
                // The device answers the command like any other.
                let resp = ok(n.dev.respond(&token, Status::DataSuccess, T0 + 1).unwrap());
                let ev = self.up(&resp).unwrap();
                assert!(matches!(ev[..], [ServerEvent::Response { .. }]));
                assert!(is_frame(&data));
                // A frame for a handshake that already failed here (the peer's ErrorACK) is
                // refused without effect; anything else must be accepted.
                match n.conf().handle_frame(&data, NOW_MS, &mut OsRng) {
                    Ok(h) => {
                        let h = keep(h);
                        to_server.extend(h.frames);
                        dev.extend(h.events);
                    }
                    Err(e) => assert_eq!(e, ConfError::UnexpectedHandshake),
                }
            }
            for f in std::mem::take(&mut to_server) {
                let out = ok(n.dev.send_generic(f, T0 + 1).unwrap());
                let ev = self.up(&out).unwrap();
                let [ServerEvent::Generic { device, data, .. }] = &ev[..] else {
                    panic!("{ev:?}")
                };
                assert_eq!(*device, n.id());
                match n.sconf().handle_frame(data, NOW_MS, &mut OsRng) {
                    Ok(h) => {
                        let h = keep(h);
                        to_device.extend(h.frames);
                        sev.extend(h.events);
                    }
                    Err(e) => assert_eq!(e, ConfError::UnexpectedHandshake),
                }
            }
        }
        panic!("handshake did not settle");
    }

    /// The server starts a session with `n` and both ends establish it.
    fn establish_from_server(&mut self, n: &mut Node) -> (Vec<ConfEvent>, Vec<ConfEvent>) {
        let h = keep(n.sconf().start(NOW_MS, &mut OsRng).unwrap());
        let (mut sev, dev) = self.run_handshake(n, h.frames, Vec::new());
        sev.splice(0..0, h.events);
        (sev, dev)
    }

    fn establish_from_device(&mut self, n: &mut Node) -> (Vec<ConfEvent>, Vec<ConfEvent>) {
        let h = keep(n.conf().start(NOW_MS, &mut OsRng).unwrap());
        let (sev, mut dev) = self.run_handshake(n, Vec::new(), h.frames);
        dev.splice(0..0, h.events);
        (sev, dev)
    }

    /// The server sends a sealed Data to `n`; returns the outgoing message.
    fn send_sealed_down(&mut self, n: &mut Node, data: &Data, ms: u64) -> Outgoing {
        let sealed = keep(n.sconf().seal_data(data, ms).unwrap());
        ok(self
            .server
            .command(n.id(), Body::Data(sealed), EXP, T0)
            .unwrap())
    }

    /// `n` sends a sealed Data to the server; returns the outgoing message.
    fn send_sealed_up(n: &mut Node, data: &Data, ms: u64) -> Outgoing {
        let sealed = keep(n.conf().seal_data(data, ms).unwrap());
        ok(n.dev.send_data(sealed, T0 + 1).unwrap())
    }

    /// Delivers a device's message carrying sealed data and opens it on the server side.
    fn receive_up(&mut self, n: &mut Node, o: &Outgoing) -> Result<Data, ConfError> {
        let ev = self.up(o).unwrap();
        let [ServerEvent::Data { device, data, .. }] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(*device, n.id());
        assert!(is_sealed(data));
        n.sconf().open_data(data, NOW_MS).map(keep)
    }
}

fn established(events: &[ConfEvent]) -> (SessionId, bool, Verification, bool) {
    let e: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ConfEvent::Established {
                session,
                rekey,
                verification,
                cache_matched,
                ..
            } => Some((*session, *rekey, *verification, *cache_matched)),
            _ => None,
        })
        .collect();
    assert_eq!(e.len(), 1, "{events:?}");
    e[0]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const SECRET: &[u8] = b"TOP-SECRET-READING-4242";
const SECRET_ID: &str = "blood_pressure_secret";

fn secret_data(n: u8) -> Data {
    let mut v = SECRET.to_vec();
    v.push(n);
    Data {
        id: SECRET_ID.to_string(),
        value: Value::Bytes(v),
    }
}

/// The record-layer header of a sealed Data (epoch and sequence number, the nonce's source).
fn record_header(sealed: &Data) -> [u8; HEADER_LEN] {
    let Value::Bytes(f) = &sealed.value else {
        panic!()
    };
    f[FRAME_HEADER_LEN..FRAME_HEADER_LEN + HEADER_LEN]
        .try_into()
        .unwrap()
}

fn seq_of(header: &[u8; HEADER_LEN]) -> u64 {
    u64::from_be_bytes(header[5..13].try_into().unwrap())
}

#[test]
fn establish_and_exchange_both_ways_plaintext_never_on_the_wire() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    let (sev, dev) = f.establish_from_server(&mut n);
    let (ss, rekey, ver, _) = established(&sev);
    let (ds, _, dver, _) = established(&dev);
    assert_eq!(ss, ds);
    assert!(!rekey);
    // First session, no provisioned secret: the equality test ran, unbound (the C2
    // signatures authenticate the handshake; see docs/C2-confidential.md).
    assert_eq!(ver, Verification::Unbound);
    assert_eq!(dver, Verification::Unbound);
    assert!(n.sconf().is_established() && n.conf().is_established());

    // Server -> device, a few records.
    for i in 0..3 {
        let out = f.send_sealed_down(&mut n, &secret_data(i), NOW_MS);
        let JoinedEvent::Data { data, token } = f.down(&mut n, &out).unwrap() else {
            panic!()
        };
        assert!(is_sealed(&data));
        assert_eq!(data.id, SEALED_DATA_ID);
        let opened = keep(n.conf().open_data(&data, NOW_MS).unwrap());
        assert_eq!(opened, secret_data(i));
        // The C2 layer still works as usual: the device answers the data command.
        let resp = ok(n.dev.respond(&token, Status::DataSuccess, T0 + 1).unwrap());
        assert!(matches!(
            f.up(&resp).unwrap()[..],
            [ServerEvent::Response {
                status: Status::DataSuccess,
                ..
            }]
        ));
    }
    // Device -> server.
    for i in 10..13 {
        let out = Fleet::send_sealed_up(&mut n, &secret_data(i), NOW_MS);
        assert_eq!(f.receive_up(&mut n, &out).unwrap(), secret_data(i));
    }
    // Raw seal/open in a Generic body works too.
    let frame = keep(n.conf().seal(SECRET, NOW_MS).unwrap());
    let out = ok(n.dev.send_generic(frame, T0 + 1).unwrap());
    let ev = f.up(&out).unwrap();
    let [ServerEvent::Generic { data, .. }] = &ev[..] else {
        panic!()
    };
    assert_eq!(&keep(n.sconf().open(data, NOW_MS).unwrap())[..], SECRET);
    assert_eq!(n.sconf().records_opened(), Some(4));
    assert_eq!(n.sconf().records_sealed(), Some(3));

    // Neither the plaintext nor the real data id ever crossed the broker.
    assert!(f.wire.len() > 15);
    for payload in &f.wire {
        assert!(!contains(payload, SECRET), "plaintext on the wire");
        assert!(
            !contains(payload, SECRET_ID.as_bytes()),
            "data id on the wire"
        );
    }
}

#[test]
fn device_can_start_and_rekey_keeps_in_flight_records_and_continuity() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    let (sev, dev) = f.establish_from_device(&mut n);
    let (s1, _, _, _) = established(&sev);
    assert_eq!(established(&dev).0, s1);
    assert_eq!(n.sconf().sessions(), 1);

    // A record sealed under session 1 is still in flight when the rekey completes.
    let in_flight = Fleet::send_sealed_up(&mut n, &secret_data(1), NOW_MS);

    // The server rekeys (a new KEAV handshake, DH again, retained secret mixed in).
    let (sev, dev) = f.establish_from_server(&mut n);
    let (s2, rekey, _, matched) = established(&sev);
    assert_ne!(s1, s2);
    assert!(rekey);
    assert!(matched, "key continuity must hold across the rekey");
    assert!(established(&dev).3);
    assert_eq!(n.sconf().sessions(), 2);
    assert_eq!(n.conf().session(), Some(s2));

    // The old record opens with the previous session's keys; new records use the new one.
    assert_eq!(f.receive_up(&mut n, &in_flight).unwrap(), secret_data(1));
    let out = Fleet::send_sealed_up(&mut n, &secret_data(2), NOW_MS);
    assert_eq!(f.receive_up(&mut n, &out).unwrap(), secret_data(2));
    let out = f.send_sealed_down(&mut n, &secret_data(3), NOW_MS);
    let JoinedEvent::Data { data, .. } = f.down(&mut n, &out).unwrap() else {
        panic!()
    };
    assert_eq!(
        keep(n.conf().open_data(&data, NOW_MS).unwrap()),
        secret_data(3)
    );
}

#[test]
fn simultaneous_starts_resolve_in_favour_of_the_server() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    let s = keep(n.sconf().start(NOW_MS, &mut OsRng).unwrap());
    let d = keep(n.conf().start(NOW_MS, &mut OsRng).unwrap());
    // The server refuses the device's Hello (its own handshake goes on); the device drops
    // its own and answers the server's.
    let out = ok(n.dev.send_generic(d.frames[0].clone(), T0 + 1).unwrap());
    let ev = f.up(&out).unwrap();
    let [ServerEvent::Generic { data, .. }] = &ev[..] else {
        panic!()
    };
    assert_eq!(
        n.sconf()
            .handle_frame(data, NOW_MS, &mut OsRng)
            .unwrap_err(),
        ConfError::Contention
    );
    let (sev, dev) = f.run_handshake(&mut n, s.frames, Vec::new());
    assert_eq!(established(&sev).0, established(&dev).0);
}

#[test]
fn tampered_sealed_payload_is_refused_by_aead_and_outer_change_by_signature() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    f.establish_from_server(&mut n);

    // Inner tampering (as a re-signing insider would have to do): the AEAD refuses every
    // changed byte of the record, header included, and the opener is unchanged.
    let sealed = keep(n.conf().seal_data(&secret_data(1), NOW_MS).unwrap());
    let Value::Bytes(frame) = &sealed.value else {
        panic!()
    };
    for i in FRAME_HEADER_LEN..frame.len() {
        let mut bad = frame.clone();
        bad[i] ^= 0x01;
        let r = n.sconf().open(&bad, NOW_MS);
        assert!(matches!(r, Err(ConfError::Record(_))), "byte {i}: {r:?}");
    }
    // Truncated, or under another session id: refused too.
    assert!(n.sconf().open(&frame[..frame.len() - 1], NOW_MS).is_err());
    let mut other = frame.clone();
    other[6] ^= 0xff;
    assert_eq!(
        n.sconf().open(&other, NOW_MS).unwrap_err(),
        ConfError::NoSession
    );
    assert_eq!(n.sconf().records_opened(), Some(0));
    // The genuine record still opens.
    assert_eq!(
        keep(n.sconf().open_data(&sealed, NOW_MS).unwrap()),
        secret_data(1)
    );

    // Outer tampering: any change to the C2 message carrying a sealed record is refused by
    // the C2 signature before the confidential layer sees anything.
    let out = Fleet::send_sealed_up(&mut n, &secret_data(2), NOW_MS);
    let len = out.bytes.len();
    for i in [len / 2, len - 80, len - 70] {
        let mut bad = out.clone();
        bad.bytes[i] ^= 0x01;
        let r = f.up(&bad);
        assert_eq!(r.unwrap_err().reason, DropReason::BadSignature, "byte {i}");
    }
    // The untouched message still goes through and opens.
    assert_eq!(f.receive_up(&mut n, &out).unwrap(), secret_data(2));
}

#[test]
fn replayed_sealed_payload_is_refused_by_both_layers() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    f.establish_from_server(&mut n);
    let out = Fleet::send_sealed_up(&mut n, &secret_data(1), NOW_MS);
    assert_eq!(f.receive_up(&mut n, &out).unwrap(), secret_data(1));
    // Same MQTT message again: the C2 guard refuses it.
    assert_eq!(f.up(&out).unwrap_err().reason, DropReason::Replay);

    // The same sealed record in a fresh, correctly signed C2 message (a compromised device
    // key, or a buggy agent): the record layer's window refuses it.
    let body = Message::decode(&out.bytes)
        .unwrap()
        .verify(&n.public)
        .unwrap()
        .into_parts()
        .1;
    let Body::Data(sealed) = body else { panic!() };
    let again = ok(n.dev.send_data(sealed, T0 + 1).unwrap());
    let ev = f.up(&again).unwrap();
    let [ServerEvent::Data { data, .. }] = &ev[..] else {
        panic!()
    };
    assert_eq!(
        n.sconf().open_data(data, NOW_MS).unwrap_err(),
        ConfError::Record(RecordError::Replay)
    );
    assert_eq!(n.sconf().records_opened(), Some(1));
}

/// A message signed by `key` as if it came from `sender`'s topic to the server.
fn forge_up(
    key: &SigningKey,
    sender: DeviceId,
    server: DeviceId,
    seq: u64,
    body: Body,
) -> Outgoing {
    let env = Envelope {
        sender,
        recipient: server,
        seq,
        expiry: T0 + 300,
        token: Token::random(),
    };
    Outgoing {
        topic: Topics::new(server).to_server(sender),
        msg_type: body.msg_type(),
        bytes: Message::sign(&env, &body, key).unwrap(),
        token: env.token,
        recipient: server,
    }
}

#[test]
fn man_in_the_middle_cannot_inject_or_relay_handshake_or_records() {
    let mut f = Fleet::new();
    let server = f.server.id();
    let mut d = f.join(true);
    let mut e = f.join(true); // a registered, joined device turned attacker

    // 1. Without a registered key: the device's handshake Hello re-signed by an unknown key
    //    is refused (unknown sender); forged as the device with the wrong key: bad signature.
    let stranger = SigningKey::generate(Alg::Ed25519).unwrap();
    let hello = keep(d.conf().start(NOW_MS, &mut OsRng).unwrap()).frames;
    let body = confidential::handshake_body(hello[0].clone());
    let r = f.up(&forge_up(
        &stranger,
        stranger.device_id(),
        server,
        1,
        body.clone(),
    ));
    assert_eq!(r.unwrap_err().reason, DropReason::UnknownSender);
    // (a fresh sequence number: a used one is refused as a replay before the signature work)
    let r = f.up(&forge_up(&stranger, d.id(), server, 77, body.clone()));
    assert_eq!(r.unwrap_err().reason, DropReason::BadSignature);
    assert!(!d.sconf().is_handshaking() && !d.sconf().is_established());

    // Nor can a keyless attacker inject into the device: a "server" message signed by
    // another key is dropped.
    let fake_server = SigningKey::generate(Alg::Ed25519).unwrap();
    let mut throwaway = Confidential::new(
        Side::Server,
        f.pairing(&d.public),
        ConfidentialConfig::default(),
        &mut OsRng,
    );
    let s_hello = keep(throwaway.start(NOW_MS, &mut OsRng).unwrap()).frames;
    let env = Envelope {
        sender: server,
        recipient: d.id(),
        seq: 77,
        expiry: EXP,
        token: Token::random(),
    };
    let msg = Message::sign(
        &env,
        &confidential::handshake_body(s_hello[0].clone()),
        &fake_server,
    )
    .unwrap();
    let r = d
        .dev
        .handle(&Topics::new(server).to_device(d.id()), &msg, T0 + 1);
    assert_eq!(r.unwrap_err().reason, DropReason::BadSignature);
    assert!(!d.conf().is_established());

    // 2. Relay by a registered insider E: it re-signs D's Hello with its own key. The server
    //    takes it as E's (E's pairing), answers E — and E cannot pass the answer to D, whose
    //    engine accepts only the server's signature.
    let r = f.up(&forge_up(&e.key, e.id(), server, 100, body)).unwrap();
    let [ServerEvent::Generic { device, data, .. }] = &r[..] else {
        panic!()
    };
    assert_eq!(*device, e.id());
    let answer = keep(e.sconf().handle_frame(data, NOW_MS, &mut OsRng).unwrap()).frames;
    assert!(!answer.is_empty());
    let env = Envelope {
        sender: e.id(),
        recipient: d.id(),
        seq: 1,
        expiry: EXP,
        token: Token::random(),
    };
    let relayed = Message::sign(
        &env,
        &confidential::handshake_body(answer[0].clone()),
        &e.key,
    )
    .unwrap();
    let r = d
        .dev
        .handle(&Topics::new(server).to_device(d.id()), &relayed, T0 + 1);
    assert_eq!(r.unwrap_err().reason, DropReason::UnknownSender);
    assert!(!d.conf().is_established() && !e.sconf().is_established());

    // 3. Records: D and the server establish; E re-signs one of D's sealed records as its
    //    own. The server hands it to E's session, which cannot open it.
    d.conf = Some(Confidential::new(
        Side::Device,
        f.pairing(&d.public),
        ConfidentialConfig::default(),
        &mut OsRng,
    ));
    f.establish_from_server(&mut d);
    let (_, _) = f.establish_from_server(&mut e);
    let out = Fleet::send_sealed_up(&mut d, &secret_data(7), NOW_MS);
    let Body::Data(sealed) = Message::decode(&out.bytes)
        .unwrap()
        .verify(&d.public)
        .unwrap()
        .into_parts()
        .1
    else {
        panic!()
    };
    let ev = f
        .up(&forge_up(&e.key, e.id(), server, 1000, Body::Data(sealed)))
        .unwrap();
    let [ServerEvent::Data { device, data, .. }] = &ev[..] else {
        panic!()
    };
    assert_eq!(*device, e.id());
    assert_eq!(
        e.sconf().open_data(data, NOW_MS).unwrap_err(),
        ConfError::NoSession
    );
    // D's genuine message still opens in D's session.
    assert_eq!(f.receive_up(&mut d, &out).unwrap(), secret_data(7));
}

#[test]
fn restart_continues_without_reusing_a_nonce() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    f.establish_from_server(&mut n);
    let pairing = f.pairing(&n.public);

    // The server seals three records, storing its state before each leaves.
    let mut stored = Vec::new();
    let mut before = Vec::new();
    let mut sent = Vec::new();
    for i in 0..3 {
        let s = n.sconf().seal_data(&secret_data(i), NOW_MS).unwrap();
        let sealed = s
            .persist(|st| {
                stored = st.to_vec();
                Ok::<_, Infallible>(())
            })
            .unwrap();
        before.push(record_header(&sealed));
        sent.push(sealed);
    }
    // The device opens them, storing its state too.
    let mut dev_stored = Vec::new();
    for s in &sent[..2] {
        n.conf()
            .open_data(s, NOW_MS)
            .unwrap()
            .persist(|st| {
                dev_stored = st.to_vec();
                Ok::<_, Infallible>(())
            })
            .unwrap();
    }

    // Both restart from what they stored.
    let later = NOW_MS + 5_000;
    n.server_conf = Some(
        Confidential::from_state(
            &stored,
            Side::Server,
            pairing.clone(),
            ConfidentialConfig::default(),
            later,
        )
        .unwrap(),
    );
    n.conf = Some(
        Confidential::from_state(
            &dev_stored,
            Side::Device,
            pairing.clone(),
            ConfidentialConfig::default(),
            later,
        )
        .unwrap(),
    );
    assert_eq!(n.sconf().records_sealed(), Some(3));

    let mut after = Vec::new();
    for i in 3..6 {
        let sealed = keep(n.sconf().seal_data(&secret_data(i), later).unwrap());
        after.push(record_header(&sealed));
        sent.push(sealed);
    }
    // No (epoch, sequence) pair — the nonce's only input under one key — repeats.
    let mut all: Vec<_> = before.iter().chain(after.iter()).collect();
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), total);
    assert_eq!(
        after.iter().map(seq_of).collect::<Vec<_>>(),
        vec![3, 4, 5],
        "sequence numbers continue"
    );

    // The restored device refuses what it opened before the restart, opens the rest.
    for s in &sent[..2] {
        assert_eq!(
            n.conf().open_data(s, later).unwrap_err(),
            ConfError::Record(RecordError::Replay)
        );
    }
    for (i, s) in sent.clone().iter().enumerate().skip(2) {
        assert_eq!(
            keep(n.conf().open_data(s, later).unwrap()),
            secret_data(i as u8)
        );
    }

    // Why "store first" matters: restoring an older state (here the one stored before the
    // last three seals) seals sequence number 3 again under the same key: nonce reuse.
    let mut m = Confidential::from_state(
        &stored,
        Side::Server,
        pairing.clone(),
        ConfidentialConfig::default(),
        later,
    )
    .unwrap();
    let again = keep(m.seal(b"x", later).unwrap());
    let h: [u8; HEADER_LEN] = again[FRAME_HEADER_LEN..][..HEADER_LEN].try_into().unwrap();
    assert_eq!(
        h, after[0],
        "an old state repeats a nonce; hence store before sending"
    );

    // States are bound to their pair and side and checked.
    let other = f.join(true);
    let wrong = f.pairing(&other.public);
    assert_eq!(
        Confidential::from_state(
            &stored,
            Side::Server,
            wrong,
            ConfidentialConfig::default(),
            0
        )
        .unwrap_err(),
        ConfError::State("another pairing")
    );
    assert_eq!(
        Confidential::from_state(
            &stored,
            Side::Device,
            pairing.clone(),
            ConfidentialConfig::default(),
            0
        )
        .unwrap_err(),
        ConfError::State("side")
    );
    let mut corrupt = stored.clone();
    corrupt[40] ^= 1;
    assert_eq!(
        Confidential::from_state(
            &corrupt,
            Side::Server,
            pairing,
            ConfidentialConfig::default(),
            0
        )
        .unwrap_err(),
        ConfError::State("checksum")
    );
}

#[test]
fn lost_state_breaks_continuity_until_the_operator_resets_it() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    f.establish_from_server(&mut n);
    // The device loses its confidential state (not its C2 key). Its new handshake has no
    // retained secret: the server sees a cache mismatch and refuses (an attacker holding a
    // stolen C2 key would be in the same position).
    n.conf = Some(Confidential::new(
        Side::Device,
        f.pairing(&n.public),
        ConfidentialConfig::default(),
        &mut OsRng,
    ));
    let old = n.sconf().session();
    let (sev, _) = f.establish_from_device(&mut n);
    assert!(
        sev.iter().any(|e| matches!(
            e,
            ConfEvent::Failed {
                error: keav_proto::Error::CacheMismatch,
                ..
            }
        )),
        "{sev:?}"
    );
    assert!(!sev
        .iter()
        .any(|e| matches!(e, ConfEvent::Established { .. })));
    // The old session is untouched.
    assert_eq!(n.sconf().session(), old);

    // The operator resets continuity for this device; the next handshake succeeds.
    keep(n.sconf().reset_continuity());
    let (sev, dev) = f.establish_from_device(&mut n);
    assert_eq!(established(&sev).0, established(&dev).0);
    let out = Fleet::send_sealed_up(&mut n, &secret_data(1), NOW_MS);
    assert_eq!(f.receive_up(&mut n, &out).unwrap(), secret_data(1));
}

#[test]
fn device_without_confidentiality_keeps_plain_data() {
    let mut f = Fleet::new();
    let mut c = f.join(true);
    let mut p = f.join(false);
    f.establish_from_server(&mut c);

    let plain = Data {
        id: "temperature".into(),
        value: Value::F32(21.5),
    };
    let out = ok(p.dev.send_data(plain.clone(), T0 + 1).unwrap());
    let ev = f.up(&out).unwrap();
    let [ServerEvent::Data { device, data, .. }] = &ev[..] else {
        panic!()
    };
    assert_eq!(*device, p.id());
    assert!(!is_sealed(data));
    assert_eq!(*data, plain);
    // Server to the plain device: plain data, as before.
    let cmd = ok(f
        .server
        .command(p.id(), Body::Data(plain.clone()), EXP, T0)
        .unwrap());
    let JoinedEvent::Data { data, .. } = f.down(&mut p, &cmd).unwrap() else {
        panic!()
    };
    assert!(!is_sealed(&data));
    assert_eq!(data, plain);
    // And the confidential device alongside it still works.
    let out = Fleet::send_sealed_up(&mut c, &secret_data(9), NOW_MS);
    assert_eq!(f.receive_up(&mut c, &out).unwrap(), secret_data(9));
    // Plain bytes are never mistaken for frames.
    assert!(!is_frame(b"KVC"));
    assert!(!is_frame(b"hello world, this is plain"));
}

#[test]
fn malformed_frames_are_refused_without_effect() {
    let mut f = Fleet::new();
    let mut n = f.join(true);
    let conf = n.sconf();
    for bad in [
        &b""[..],
        b"KVCF",
        b"KVCF\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00",
        b"KVCF\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00",
        b"KVCF\x01\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00",
        b"KVCF\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\x00",
    ] {
        assert!(
            conf.handle_frame(bad, NOW_MS, &mut OsRng).is_err(),
            "{bad:?}"
        );
        assert!(conf.open(bad, NOW_MS).is_err());
    }
    // A well-formed handshake frame that does not start with Hello: no handshake starts.
    let mut junk = b"KVCF\x01\x01\x01\x02\x03\x04\x05\x06\x07\x08".to_vec();
    junk.extend_from_slice(&[0, 4, 1, 2, 3, 4]);
    assert_eq!(
        conf.handle_frame(&junk, NOW_MS, &mut OsRng).unwrap_err(),
        ConfError::UnexpectedHandshake
    );
    assert!(!conf.is_handshaking());
    // Seal before any session: refused.
    assert_eq!(conf.seal(b"x", NOW_MS).unwrap_err(), ConfError::NoSession);
}
