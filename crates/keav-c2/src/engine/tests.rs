//! Engine tests: a server and devices passing bytes in memory, with a fake clock.

use std::convert::Infallible;

use sha2::{Digest, Sha256};

use super::*;
use crate::keys::{Alg, PublicKey, SigningKey};
use crate::wire::{Action, Body, Data, Envelope, JoinCode, Message, Status, Token, Value};

const T0: u64 = 1_700_000_000;
const EXP: u64 = T0 + 600;

/// Persists nowhere (tests check the records where it matters) and yields the value.
fn ok<T, R>(m: MustPersist<T, R>) -> T {
    m.persist(|_| Ok::<_, Infallible>(())).unwrap()
}

fn key_copy(k: &SigningKey) -> SigningKey {
    SigningKey::from_bytes(k.alg(), &k.to_bytes().unwrap()).unwrap()
}

struct Net {
    server: ServerEngine,
    server_pub: PublicKey,
    server_key: SigningKey, // a copy, to craft server-signed messages
}

impl Net {
    fn new(policy: JoinPolicy) -> Net {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let server_key = key_copy(&k);
        let server_pub = k.public();
        let config = ServerConfig {
            join_policy: policy,
            ..ServerConfig::default()
        };
        Net {
            server: ServerEngine::new(k, config),
            server_pub,
            server_key,
        }
    }

    /// A device registered with the server; returns it and a copy of its key.
    fn register(&mut self, groups: &[&str]) -> (Device<Registered>, SigningKey) {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        let copy = key_copy(&k);
        let mut rec = DeviceView::new(k.public(), DeviceStatus::Registered);
        rec.groups = groups.iter().map(|g| g.to_string()).collect();
        self.server.upsert_device(rec);
        let d = Device::new(k, self.server_pub.clone(), DeviceConfig::default());
        (d, copy)
    }

    /// A device joined through the server's join command.
    fn joined(&mut self, groups: &[&str]) -> (Device<Joined>, SigningKey) {
        let (mut d, k) = self.register(groups);
        let cmd = ok(self.server.join_command(d.id(), EXP, T0).unwrap());
        let h = ok(d.handle(&cmd.topic, &cmd.bytes, T0).unwrap());
        let RegisteredEvent::Joined(grant) = h.event else {
            panic!("{:?}", h.event)
        };
        let reply = h.reply.unwrap();
        let sh = self.deliver(&reply, T0).unwrap();
        assert!(sh.events.contains(&ServerEvent::Joined {
            device: d.id(),
            method: JoinMethod::Command
        }));
        assert_eq!(self.status(d.id()), DeviceStatus::Joined);
        (d.join(grant), k)
    }

    fn deliver(&mut self, o: &Outgoing, now: u64) -> Result<ServerHandled, Dropped> {
        self.server.handle(&o.topic, &o.bytes, now).map(ok)
    }

    fn status(&self, d: DeviceId) -> DeviceStatus {
        self.server.device(d).unwrap().status
    }

    /// A message signed with the server's key, as if from the server.
    fn server_signed(&self, to: DeviceId, seq: u64, expiry: u64, body: Body) -> Outgoing {
        craft(
            &self.server_key,
            to,
            self.server.id(),
            seq,
            expiry,
            Token::random(),
            body,
            true,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn craft(
    key: &SigningKey,
    to: DeviceId,
    server: DeviceId,
    seq: u64,
    expiry: u64,
    token: Token,
    body: Body,
    to_device: bool,
) -> Outgoing {
    let sender = key.device_id();
    let env = Envelope {
        sender,
        recipient: to,
        seq,
        expiry,
        token: token.clone(),
    };
    let topics = crate::topics::Topics::new(server);
    let topic = if to_device {
        topics.to_device(to)
    } else {
        topics.to_server(sender)
    };
    Outgoing {
        topic,
        msg_type: body.msg_type(),
        bytes: Message::sign(&env, &body, key).unwrap(),
        token,
        recipient: to,
    }
}

fn to_dev(
    d: &mut Device<Joined>,
    o: &Outgoing,
    now: u64,
) -> Result<DeviceHandled<JoinedEvent>, Dropped> {
    d.handle(&o.topic, &o.bytes, now).map(ok)
}

fn action(n: u16) -> Body {
    Body::Action(Action {
        action: n,
        args: vec![n as u8; 3],
    })
}

fn reason(r: Result<impl std::fmt::Debug, Dropped>) -> DropReason {
    r.expect_err("must be dropped").reason
}

#[test]
fn command_response_loop_tracks_tokens() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.joined(&[]);
    let cmd = ok(net.server.command(d.id(), action(7), EXP, T0).unwrap());
    assert!(net.server.pending(&cmd.token));
    assert_eq!(
        net.server.tracked(&cmd.token),
        Some((d.id(), CommandKind::Command(MessageType::Action)))
    );
    let h = to_dev(&mut d, &cmd, T0 + 1).unwrap();
    assert_eq!(
        h.event,
        JoinedEvent::Action {
            action: 7,
            args: vec![7; 3],
            token: cmd.token.clone()
        }
    );
    assert!(h.reply.is_none());
    let resp = ok(d
        .respond(&cmd.token, Status::ActionSuccess, T0 + 2)
        .unwrap());
    assert_eq!(resp.token, cmd.token);
    // A second response to the same token is refused by the device itself.
    assert_eq!(
        d.respond(&cmd.token, Status::ActionFail, T0 + 2)
            .unwrap_err(),
        EngineError::UnknownToken
    );
    let sh = net.deliver(&resp, T0 + 3).unwrap();
    assert_eq!(
        sh.events,
        vec![ServerEvent::Response {
            device: d.id(),
            token: cmd.token.clone(),
            kind: CommandKind::Command(MessageType::Action),
            status: Status::ActionSuccess
        }]
    );
    assert!(!net.server.pending(&cmd.token));
    assert_eq!(
        net.server.outcome(&cmd.token),
        Some(Outcome::Answered(Status::ActionSuccess))
    );
    // The same response bytes again: refused by the cheap replay check, before the signature
    // and the (settled) token are looked at (no effect, counted).
    assert_eq!(reason(net.deliver(&resp, T0 + 4)), DropReason::Replay);

    // A command nobody answers expires; a late response is then not matched.
    let cmd2 = ok(net.server.command(d.id(), action(8), T0 + 100, T0).unwrap());
    assert!(
        net.server.tick(T0 + 100).is_empty(),
        "not yet past expiry + grace"
    );
    let ev = net.server.tick(T0 + 100 + 61);
    assert_eq!(
        ev,
        vec![ServerEvent::CommandExpired {
            device: d.id(),
            token: cmd2.token.clone()
        }]
    );
    assert_eq!(net.server.outcome(&cmd2.token), Some(Outcome::Expired));
    to_dev(&mut d, &cmd2, T0 + 50).unwrap();
    let late = ok(d
        .respond(&cmd2.token, Status::ActionSuccess, T0 + 50)
        .unwrap());
    assert_eq!(
        reason(net.deliver(&late, T0 + 170)),
        DropReason::UnknownToken
    );
    assert_eq!(net.server.outcome(&cmd2.token), Some(Outcome::Expired));

    // Commands only go to joined devices, with a sane expiry, and only command bodies.
    let (reg, _) = net.register(&[]);
    assert_eq!(
        net.server
            .command(reg.id(), action(1), EXP, T0)
            .unwrap_err(),
        EngineError::NotJoined(reg.id())
    );
    assert!(matches!(
        net.server.command(d.id(), action(1), T0 - 1, T0),
        Err(EngineError::BadExpiry { .. })
    ));
    assert!(matches!(
        net.server.command(d.id(), action(1), T0 + 2 * 86_400, T0),
        Err(EngineError::BadExpiry { .. })
    ));
    assert_eq!(
        net.server
            .command(d.id(), Body::Terminate(crate::wire::Terminate), EXP, T0)
            .unwrap_err(),
        EngineError::NotACommand(MessageType::Terminate)
    );
}

#[test]
fn group_command_to_50_devices_every_response_accounted_for() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let mut devices: Vec<Device<Joined>> = (0..50).map(|_| net.joined(&["pumps"]).0).collect();
    let (outsider, _) = net.register(&["pumps"]);
    let (_other_group, _) = net.joined(&["valves"]);
    let report = net
        .server
        .command_group(&Targets::Group("pumps".into()), action(3), EXP, T0)
        .unwrap();
    // The record holds the 50 new send counters (each device's second message).
    assert_eq!(report.record().peers().len(), 50);
    assert!(report
        .record()
        .peers()
        .iter()
        .all(|(_, s)| s.next_send() == 3));
    let report = ok(report);
    assert_eq!(report.sent.len(), 50);
    assert_eq!(
        report.skipped,
        vec![(outsider.id(), EngineError::NotJoined(outsider.id()))]
    );
    let tokens: std::collections::HashSet<_> =
        report.sent.iter().map(|o| o.token.clone()).collect();
    assert_eq!(tokens.len(), 50, "a fresh token per device");
    let mut answered = 0;
    for o in &report.sent {
        let d = devices.iter_mut().find(|d| d.id() == o.recipient).unwrap();
        let h = to_dev(d, o, T0 + 1).unwrap();
        let JoinedEvent::Action { token, .. } = h.event else {
            panic!("{:?}", h.event)
        };
        let status = if answered % 2 == 0 {
            Status::ActionSuccess
        } else {
            Status::ActionFail
        };
        let r = ok(d.respond(&token, status, T0 + 2).unwrap());
        let sh = net.deliver(&r, T0 + 3).unwrap();
        assert_eq!(sh.events.len(), 1);
        answered += 1;
    }
    assert_eq!(answered, 50);
    let mut ok_count = 0;
    for o in &report.sent {
        match net.server.outcome(&o.token) {
            Some(Outcome::Answered(Status::ActionSuccess)) => ok_count += 1,
            Some(Outcome::Answered(Status::ActionFail)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok_count, 25);
    assert_eq!(net.server.counters().dropped(), 0);

    // An explicit list, with an unknown id among them.
    let ghost = DeviceId([9; 8]);
    let ids = vec![devices[0].id(), ghost];
    let r = ok(net
        .server
        .command_group(&Targets::Devices(ids), action(4), EXP, T0)
        .unwrap());
    assert_eq!(r.sent.len(), 1);
    assert_eq!(r.skipped, vec![(ghost, EngineError::UnknownDevice(ghost))]);
}

#[test]
fn update_flow_with_digest_check() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.joined(&[]);
    let file = b"firmware v2".to_vec();
    let digest: [u8; 32] = Sha256::digest(&file).into();
    assert!(check_digest(&file, &digest));
    assert!(!check_digest(b"firmware v3", &digest));

    let init = ok(net
        .server
        .initiate_update(d.id(), "http://updates/fw2", digest, EXP, T0)
        .unwrap());
    let h = to_dev(&mut d, &init, T0).unwrap();
    assert_eq!(
        h.event,
        JoinedEvent::Update {
            url: "http://updates/fw2".into(),
            digest,
            token: init.token.clone()
        }
    );
    // Not activatable before the device reports a verified download.
    assert_eq!(
        net.server
            .activate(d.id(), &init.token, EXP, T0)
            .unwrap_err(),
        EngineError::UpdateNotReady
    );
    // Success can only be reported through the digest check.
    assert_eq!(
        d.respond(&init.token, Status::UpdateSuccess, T0)
            .unwrap_err(),
        EngineError::StatusNotAllowed
    );
    let resp = ok(d.update_downloaded(&init.token, &file, T0 + 5).unwrap());
    let sh = net.deliver(&resp, T0 + 6).unwrap();
    assert!(matches!(
        sh.events[..],
        [ServerEvent::Response {
            status: Status::UpdateSuccess,
            ..
        }]
    ));
    let act = ok(net
        .server
        .activate(d.id(), &init.token, EXP, T0 + 7)
        .unwrap());
    assert_eq!(act.token, init.token);
    assert!(net.server.pending(&init.token));
    let h = to_dev(&mut d, &act, T0 + 8).unwrap();
    assert_eq!(
        h.event,
        JoinedEvent::Activate {
            digest,
            token: init.token.clone()
        }
    );
    let done = ok(d
        .respond(&init.token, Status::ActivateSuccess, T0 + 9)
        .unwrap());
    net.deliver(&done, T0 + 10).unwrap();
    assert_eq!(
        net.server.outcome(&init.token),
        Some(Outcome::Answered(Status::ActivateSuccess))
    );

    // A download with the wrong digest: failure status, and no activation possible.
    let init2 = ok(net
        .server
        .initiate_update(d.id(), "http://updates/fw3", digest, EXP, T0 + 20)
        .unwrap());
    to_dev(&mut d, &init2, T0 + 20).unwrap();
    let resp2 = ok(d
        .update_downloaded(&init2.token, b"tampered", T0 + 21)
        .unwrap());
    net.deliver(&resp2, T0 + 22).unwrap();
    assert_eq!(
        net.server.outcome(&init2.token),
        Some(Outcome::Answered(Status::UpdateFailDigest))
    );
    assert_eq!(
        net.server
            .activate(d.id(), &init2.token, EXP, T0 + 23)
            .unwrap_err(),
        EngineError::UpdateNotReady
    );
    // Even a validly signed activate for it (a server bug) is refused by the device.
    let forced = craft(
        &net.server_key,
        d.id(),
        net.server.id(),
        1000,
        EXP,
        init2.token.clone(),
        Body::Activate(crate::wire::Activate { digest }),
        true,
    );
    let h = to_dev(&mut d, &forced, T0 + 24).unwrap();
    assert_eq!(
        h.event,
        JoinedEvent::ActivateRefused {
            token: init2.token.clone()
        }
    );
    let reply = h.reply.unwrap();
    let (hdr, body) = Message::decode(&reply.bytes)
        .unwrap()
        .verify(&d_public(&d, &net))
        .unwrap()
        .into_parts();
    assert_eq!(hdr.token, init2.token);
    assert_eq!(
        body,
        Body::Response(crate::wire::Response {
            status: Status::ActivateFail
        })
    );
}

fn d_public(d: &Device<Joined>, net: &Net) -> PublicKey {
    net.server.device(d.id()).unwrap().key.clone()
}

#[test]
fn human_moderated_join_right_words_accepted() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.register(&[]);
    let req = ok(d.request_join(JoinRequestKind::Human, T0).unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    let console_words = match &sh.events[..] {
        [ServerEvent::StatusChanged {
            status: DeviceStatus::PendingJoin,
            ..
        }, ServerEvent::HumanJoinPending { device, words }] => {
            assert_eq!(*device, d.id());
            words.clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(net.server.join_words(d.id()), Some(console_words.clone()));
    assert_eq!(
        net.server.pending_joins(),
        vec![(d.id(), JoinMethod::Human)]
    );
    let [to_dev_msg] = &sh.outgoing[..] else {
        panic!()
    };
    let h = ok(d
        .handle(&to_dev_msg.topic, &to_dev_msg.bytes, T0 + 1)
        .unwrap());
    let RegisteredEvent::ShowWords { words } = h.event else {
        panic!("{:?}", h.event)
    };
    assert_eq!(
        words, console_words,
        "device and console show the same words"
    );
    // The operator types the words read on the device (any case).
    let typed: Vec<String> = words.iter().map(|w| w.to_uppercase()).collect();
    let dec = ok(net
        .server
        .operator_decide(d.id(), true, &typed, T0 + 30)
        .unwrap());
    assert!(dec.joined);
    assert_eq!(net.status(d.id()), DeviceStatus::Joined);
    let h = ok(d
        .handle(&dec.outgoing.topic, &dec.outgoing.bytes, T0 + 31)
        .unwrap());
    let RegisteredEvent::Joined(grant) = h.event else {
        panic!("{:?}", h.event)
    };
    let mut d = d.join(grant);
    let cmd = ok(net.server.command(d.id(), action(1), EXP, T0 + 40).unwrap());
    assert!(matches!(
        to_dev(&mut d, &cmd, T0 + 41).unwrap().event,
        JoinedEvent::Action { action: 1, .. }
    ));
}

#[test]
fn human_moderated_join_wrong_words_rejected() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, dk) = net.register(&[]);
    let req = ok(d.request_join(JoinRequestKind::Human, T0).unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    let words = net.server.join_words(d.id()).unwrap();
    ok(d.handle(&sh.outgoing[0].topic, &sh.outgoing[0].bytes, T0)
        .unwrap());
    // One word changed.
    let mut wrong: Vec<&str> = words.clone();
    wrong[0] = if wrong[0] == "ant" { "bear" } else { "ant" };
    let dec = ok(net
        .server
        .operator_decide(d.id(), true, &wrong, T0 + 5)
        .unwrap());
    assert!(!dec.joined);
    assert_eq!(dec.reason, Some(RefuseReason::WrongCode));
    assert_eq!(net.status(d.id()), DeviceStatus::Registered);
    // The attempt is over: the right words no longer help.
    assert_eq!(
        net.server
            .operator_decide(d.id(), true, &words, T0 + 6)
            .unwrap_err(),
        EngineError::NoPendingJoin(d.id())
    );
    let h = ok(d
        .handle(&dec.outgoing.topic, &dec.outgoing.bytes, T0 + 6)
        .unwrap());
    assert_eq!(
        h.event,
        RegisteredEvent::JoinRefused {
            status: Status::JoinRefused
        }
    );
    // Still not joined: its data is dropped.
    let data = craft(
        &dk,
        net.server.id(),
        net.server.id(),
        50,
        EXP,
        Token::random(),
        Body::Data(Data {
            id: "t".into(),
            value: Value::U8(1),
        }),
        false,
    );
    assert_eq!(reason(net.deliver(&data, T0 + 7)), DropReason::NotJoined);
    // Garbage words, and the operator's refusal, also refuse.
    let req = ok(d.request_join(JoinRequestKind::Human, T0 + 10).unwrap());
    net.deliver(&req, T0 + 10).unwrap();
    let dec = ok(net
        .server
        .operator_decide(d.id(), true, &["unicorn"], T0 + 11)
        .unwrap());
    assert_eq!(dec.reason, Some(RefuseReason::WrongCode));
    let req = ok(d.request_join(JoinRequestKind::Human, T0 + 12).unwrap());
    net.deliver(&req, T0 + 12).unwrap();
    let words = net.server.join_words(d.id()).unwrap();
    let dec = ok(net
        .server
        .operator_decide(d.id(), false, &words, T0 + 13)
        .unwrap());
    assert_eq!(dec.reason, Some(RefuseReason::Operator));
    assert_eq!(net.status(d.id()), DeviceStatus::Registered);
}

#[test]
fn simple_join_by_policy_and_by_operator() {
    let mut net = Net::new(JoinPolicy::Automatic);
    let (mut d, _) = net.register(&[]);
    let req = ok(d.request_join(JoinRequestKind::Simple, T0).unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    assert!(sh.events.contains(&ServerEvent::Joined {
        device: d.id(),
        method: JoinMethod::Simple
    }));
    let h = ok(d
        .handle(&sh.outgoing[0].topic, &sh.outgoing[0].bytes, T0)
        .unwrap());
    assert!(matches!(h.event, RegisteredEvent::Joined(_)));

    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.register(&[]);
    let req = ok(d.request_join(JoinRequestKind::Simple, T0).unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    assert!(sh.outgoing.is_empty());
    assert!(sh
        .events
        .contains(&ServerEvent::JoinRequested { device: d.id() }));
    assert_eq!(net.status(d.id()), DeviceStatus::PendingJoin);
    let dec = ok(net.server.decide_join(d.id(), true, T0 + 1).unwrap());
    assert!(dec.joined);
    let h = ok(d
        .handle(&dec.outgoing.topic, &dec.outgoing.bytes, T0 + 2)
        .unwrap());
    assert!(matches!(h.event, RegisteredEvent::Joined(_)));
    // A join left undecided expires.
    let (mut e, _) = net.register(&[]);
    let req = ok(e.request_join(JoinRequestKind::Simple, T0).unwrap());
    net.deliver(&req, T0).unwrap();
    tick_refuses(
        &mut net,
        e.id(),
        T0 + 601,
        JoinMethod::Simple,
        RefuseReason::Expired,
    );
}

/// The tick at `now` refuses `dev`'s join (by `method`, for `why`) and leaves the device
/// registered.
fn tick_refuses(net: &mut Net, dev: DeviceId, now: u64, method: JoinMethod, why: RefuseReason) {
    let ev = net.server.tick(now);
    assert!(ev.contains(&ServerEvent::JoinRefused {
        device: dev,
        method,
        reason: why
    }));
    assert_eq!(net.status(dev), DeviceStatus::Registered);
}

/// Starts an observed join of a new device vouched for by `observer`, up to the observation
/// request the observer receives: the newcomer, the code it presents, the request's token.
fn start_observation(
    net: &mut Net,
    observer: &mut Device<Joined>,
) -> (Device<Registered>, JoinCode, Token) {
    let (mut newcomer, _) = net.register(&[]);
    let req = ok(newcomer
        .request_join(
            JoinRequestKind::Observed {
                observer: observer.id(),
            },
            T0,
        )
        .unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    assert!(sh.events.contains(&ServerEvent::ObservationStarted {
        device: newcomer.id(),
        observer: observer.id()
    }));
    let to_new = sh
        .outgoing
        .iter()
        .find(|o| o.recipient == newcomer.id())
        .unwrap();
    let to_obs = sh
        .outgoing
        .iter()
        .find(|o| o.recipient == observer.id())
        .unwrap();
    let h = ok(newcomer
        .handle(&to_new.topic, &to_new.bytes, T0 + 1)
        .unwrap());
    let RegisteredEvent::PresentCode { code } = h.event else {
        panic!("{:?}", h.event)
    };
    let h = to_dev(observer, to_obs, T0 + 1).unwrap();
    let JoinedEvent::ObservationRequest { joining, token } = h.event else {
        panic!("{:?}", h.event)
    };
    assert_eq!(joining, newcomer.id());
    (newcomer, code, token)
}

/// Runs an observed join of a new device vouched for by `observer`, the observer reporting
/// `observed` (None: the code the newcomer presents). Returns the newcomer's last event.
fn observed_join(
    net: &mut Net,
    observer: &mut Device<Joined>,
    wrong_code: bool,
) -> (Device<Registered>, RegisteredEvent) {
    let (mut newcomer, code, token) = start_observation(net, observer);
    // The observer reads what the newcomer presents (or something else).
    let seen = if wrong_code {
        let mut b = code.as_bytes().to_vec();
        b[0] ^= 0x55;
        JoinCode::from_bytes(&b).unwrap()
    } else {
        code
    };
    let resp = ok(observer.observe(&token, Some(&seen), T0 + 2).unwrap());
    let sh = net.deliver(&resp, T0 + 3).unwrap();
    let [to_new] = &sh.outgoing[..] else {
        panic!("{:?}", sh.outgoing)
    };
    let h = ok(newcomer
        .handle(&to_new.topic, &to_new.bytes, T0 + 4)
        .unwrap());
    (newcomer, h.event)
}

#[test]
fn observed_join_confirmed_by_second_device() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, ev) = observed_join(&mut net, &mut observer, false);
    let RegisteredEvent::Joined(grant) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(net.status(newcomer.id()), DeviceStatus::Joined);
    let mut newcomer = newcomer.join(grant);
    let cmd = ok(net
        .server
        .command(newcomer.id(), action(2), EXP, T0 + 5)
        .unwrap());
    to_dev(&mut newcomer, &cmd, T0 + 5).unwrap();
}

#[test]
fn observed_join_refused_on_wrong_code_or_bad_observer() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, ev) = observed_join(&mut net, &mut observer, true);
    assert_eq!(
        ev,
        RegisteredEvent::JoinRefused {
            status: Status::JoinRefused
        }
    );
    assert_eq!(net.status(newcomer.id()), DeviceStatus::Registered);
    assert!(net.server.pending_joins().is_empty());

    // An observer that is not joined cannot vouch.
    let (mut newcomer, _) = net.register(&[]);
    let (bystander, _) = net.register(&[]);
    let req = ok(newcomer
        .request_join(
            JoinRequestKind::Observed {
                observer: bystander.id(),
            },
            T0,
        )
        .unwrap());
    let sh = net.deliver(&req, T0).unwrap();
    assert!(sh.events.contains(&ServerEvent::JoinRefused {
        device: newcomer.id(),
        method: JoinMethod::Observed,
        reason: RefuseReason::BadObserver
    }));
    assert_eq!(sh.outgoing.len(), 1);
    let h = ok(newcomer
        .handle(&sh.outgoing[0].topic, &sh.outgoing[0].bytes, T0)
        .unwrap());
    assert_eq!(
        h.event,
        RegisteredEvent::JoinRefused {
            status: Status::JoinRefused
        }
    );
}

#[test]
fn terminate_resign_and_deregister() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let sid = net.server.id();
    // Terminate: the device acknowledges and leaves; the server stops commanding it.
    let (mut d, dk) = net.joined(&[]);
    let t = ok(net.server.terminate(d.id(), EXP, T0).unwrap());
    assert_eq!(net.status(d.id()), DeviceStatus::Registered);
    let h = to_dev(&mut d, &t, T0).unwrap();
    let JoinedEvent::Terminated(grant) = h.event else {
        panic!("{:?}", h.event)
    };
    net.deliver(&h.reply.unwrap(), T0 + 1).unwrap();
    assert_eq!(
        net.server.outcome(&t.token),
        Some(Outcome::Answered(Status::TerminateOk))
    );
    let d = d.leave(grant);
    assert_eq!(
        net.server.command(d.id(), action(1), EXP, T0).unwrap_err(),
        EngineError::NotJoined(d.id())
    );
    let data = |seq| {
        craft(
            &dk,
            sid,
            sid,
            seq,
            EXP,
            Token::random(),
            Body::Generic(crate::wire::Generic { data: vec![1] }),
            false,
        )
    };
    assert_eq!(
        reason(net.deliver(&data(100), T0 + 2)),
        DropReason::NotJoined
    );

    // Resign: the server registers it again.
    let (e, ek) = net.joined(&[]);
    let eid = e.id();
    let (e, msg) = e.resign(T0).map_err(|(_, err)| err).unwrap();
    let msg = ok(msg);
    let sh = net.deliver(&msg, T0).unwrap();
    assert!(sh.events.contains(&ServerEvent::Resigned { device: eid }));
    assert_eq!(net.status(eid), DeviceStatus::Registered);
    assert_eq!(e.id(), eid);
    let g = craft(
        &ek,
        sid,
        sid,
        100,
        EXP,
        Token::random(),
        Body::Generic(crate::wire::Generic { data: vec![] }),
        false,
    );
    assert_eq!(reason(net.deliver(&g, T0 + 1)), DropReason::NotJoined);

    // Deregister command: revoked at once; everything it sends afterwards is dropped.
    let (mut f, fk) = net.joined(&[]);
    let cmd = ok(net.server.deregister(f.id(), EXP, T0).unwrap());
    assert_eq!(net.status(f.id()), DeviceStatus::Revoked);
    let h = to_dev(&mut f, &cmd, T0).unwrap();
    let JoinedEvent::Deregistered(grant) = h.event else {
        panic!("{:?}", h.event)
    };
    assert_eq!(
        reason(net.deliver(&h.reply.unwrap(), T0)),
        DropReason::Revoked
    );
    let gone = f.erase(grant);
    let g = craft(
        &fk,
        sid,
        sid,
        100,
        EXP,
        Token::random(),
        Body::Generic(crate::wire::Generic { data: vec![] }),
        false,
    );
    assert_eq!(reason(net.deliver(&g, T0 + 1)), DropReason::Revoked);
    assert_eq!(
        net.server.command(gone.id, action(1), EXP, T0).unwrap_err(),
        EngineError::Revoked(gone.id)
    );

    // Deregister request: the device asks, the server revokes.
    let (h, hk) = net.joined(&[]);
    let hid = h.id();
    let m = h.deregister_request(T0).map_err(|(_, e)| e).unwrap();
    let snap = m.record().clone();
    let (gone, msg) = ok(m);
    assert_eq!(gone.id, hid);
    let sh = net.deliver(&msg, T0).unwrap();
    assert!(sh
        .events
        .contains(&ServerEvent::DeregisterRequested { device: hid }));
    assert_eq!(net.status(hid), DeviceStatus::Revoked);
    // The device's persisted state says deregistered.
    let restored = AnyDevice::from_state(
        hk,
        net.server_pub.clone(),
        DeviceConfig::default(),
        snap.bytes(),
    )
    .unwrap();
    assert!(matches!(restored, AnyDevice::Deregistered(Deregistered { id }) if id == hid));
}

#[test]
fn attacks_have_no_effect_and_are_counted() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let sid = net.server.id();
    let (mut x, xk) = net.joined(&[]);
    let (mut y, _) = net.joined(&[]);
    let before = x.counters().clone();

    // Forged signature: one bit of the signature flipped.
    let cmd = ok(net.server.command(x.id(), action(1), EXP, T0).unwrap());
    let mut forged = cmd.clone();
    let n = forged.bytes.len();
    forged.bytes[n - 1] ^= 1;
    assert_eq!(
        reason(to_dev(&mut x, &forged, T0)),
        DropReason::BadSignature
    );
    // An attacker's own key, claiming the server's id.
    let mallory = SigningKey::generate(Alg::Ed25519).unwrap();
    let env = Envelope {
        sender: sid,
        recipient: x.id(),
        seq: 50,
        expiry: EXP,
        token: Token::random(),
    };
    let fake = Outgoing {
        bytes: Message::sign(&env, &action(9), &mallory).unwrap(),
        ..cmd.clone()
    };
    assert_eq!(reason(to_dev(&mut x, &fake, T0)), DropReason::BadSignature);

    // Wrong algorithm: relabelled in place (the signature no longer fits: malformed), and
    // a RSA signature claiming the Ed25519 device's id (algorithm mismatch).
    let mut relabelled = cmd.clone();
    relabelled.bytes[2] = Alg::RsaPss2048.id();
    assert_eq!(
        reason(to_dev(&mut x, &relabelled, T0)),
        DropReason::Malformed
    );
    let rsa = SigningKey::generate(Alg::RsaPss2048).unwrap();
    let env = Envelope {
        sender: x.id(),
        recipient: sid,
        seq: 60,
        expiry: EXP,
        token: Token::random(),
    };
    let rsa_msg = Outgoing {
        topic: net.server.topics().to_server(x.id()),
        bytes: Message::sign(
            &env,
            &Body::Generic(crate::wire::Generic { data: vec![] }),
            &rsa,
        )
        .unwrap(),
        token: Token::random(),
        recipient: sid,
        msg_type: MessageType::Generic,
    };
    assert_eq!(
        reason(net.deliver(&rsa_msg, T0)),
        DropReason::AlgorithmMismatch
    );

    // None of that moved anything: the genuine command is accepted, once.
    let h = to_dev(&mut x, &cmd, T0).unwrap();
    assert!(matches!(h.event, JoinedEvent::Action { action: 1, .. }));
    assert_eq!(reason(to_dev(&mut x, &cmd, T0 + 1)), DropReason::Replay);

    // Expired: held back past its expiry.
    let short = ok(net.server.command(x.id(), action(2), T0 + 10, T0).unwrap());
    assert_eq!(reason(to_dev(&mut x, &short, T0 + 11)), DropReason::Expired);
    // Expiry too far ahead (only a forger or a broken server makes one).
    let far = net.server_signed(x.id(), 70, T0 + 3 * 86_400, action(3));
    assert_eq!(reason(to_dev(&mut x, &far, T0)), DropReason::ExpiryTooFar);

    // Lock-out: a validly signed message with seq 2^64-1 is refused, later ones work.
    let lock = net.server_signed(x.id(), u64::MAX, EXP, action(4));
    assert_eq!(reason(to_dev(&mut x, &lock, T0)), DropReason::JumpTooFar);
    let next = ok(net.server.command(x.id(), action(5), EXP, T0).unwrap());
    assert!(matches!(
        to_dev(&mut x, &next, T0).unwrap().event,
        JoinedEvent::Action { action: 5, .. }
    ));

    // Command addressed to X delivered to Y (on Y's topic): wrong recipient.
    let for_x = ok(net.server.command(x.id(), action(6), EXP, T0).unwrap());
    let misdelivered = Outgoing {
        topic: y.topic_in(),
        ..for_x.clone()
    };
    assert_eq!(
        reason(to_dev(&mut y, &misdelivered, T0)),
        DropReason::WrongRecipient
    );
    // On X's topic, but handed to Y's engine: not Y's topic.
    assert_eq!(reason(to_dev(&mut y, &for_x, T0)), DropReason::WrongTopic);
    // X's genuine data published on Y's server topic: sender mismatch.
    let data = ok(x
        .send_data(
            Data {
                id: "temp".into(),
                value: Value::F32(21.5),
            },
            T0,
        )
        .unwrap());
    let on_y = Outgoing {
        topic: y.topic_out(),
        ..data.clone()
    };
    assert_eq!(reason(net.deliver(&on_y, T0)), DropReason::SenderMismatch);
    // Another server's topic.
    let other = crate::topics::Topics::new(DeviceId([7; 8]));
    let elsewhere = Outgoing {
        topic: other.to_server(x.id()),
        ..data.clone()
    };
    assert_eq!(reason(net.deliver(&elsewhere, T0)), DropReason::WrongTopic);
    // The genuine one still goes through, once.
    let sh = net.deliver(&data, T0).unwrap();
    assert!(matches!(sh.events[..], [ServerEvent::Data { .. }]));
    assert_eq!(reason(net.deliver(&data, T0)), DropReason::Replay);

    // Unknown sender, garbage, a device->server type sent to a device.
    let stranger = SigningKey::generate(Alg::Ed25519).unwrap();
    let s = craft(
        &stranger,
        sid,
        sid,
        1,
        EXP,
        Token::random(),
        Body::Generic(crate::wire::Generic { data: vec![] }),
        false,
    );
    assert_eq!(reason(net.deliver(&s, T0)), DropReason::UnknownSender);
    assert_eq!(
        reason(net.server.handle(&data.topic, b"\x01\x05garbage", T0)),
        DropReason::Malformed
    );
    assert_eq!(
        reason(
            net.server
                .handle(&data.topic, &data.bytes[..data.bytes.len() - 3], T0)
        ),
        DropReason::Malformed
    );
    let wrong_dir = net.server_signed(x.id(), 80, EXP, Body::Resign(crate::wire::Resign));
    assert_eq!(
        reason(to_dev(&mut x, &wrong_dir, T0)),
        DropReason::Unexpected
    );
    // A joined device may not join again.
    let j = craft(
        &xk,
        sid,
        sid,
        90,
        EXP,
        Token::random(),
        Body::JoinRequest(crate::wire::JoinRequest),
        false,
    );
    assert_eq!(reason(net.deliver(&j, T0)), DropReason::Unexpected);

    // Every drop was counted under its reason.
    let c = x.counters();
    assert_eq!(before.dropped(), 0);
    assert_eq!(c.get(DropReason::BadSignature), 2);
    assert_eq!(c.get(DropReason::Malformed), 1);
    assert_eq!(c.get(DropReason::Replay), 1);
    assert_eq!(c.get(DropReason::Expired), 1);
    assert_eq!(c.get(DropReason::ExpiryTooFar), 1);
    assert_eq!(c.get(DropReason::JumpTooFar), 1);
    assert_eq!(c.get(DropReason::Unexpected), 1);
    assert_eq!(c.dropped(), 8);
    assert_eq!(y.counters().get(DropReason::WrongRecipient), 1);
    assert_eq!(y.counters().get(DropReason::WrongTopic), 1);
    let sc = net.server.counters();
    assert_eq!(sc.get(DropReason::AlgorithmMismatch), 1);
    assert_eq!(sc.get(DropReason::SenderMismatch), 1);
    assert_eq!(sc.get(DropReason::WrongTopic), 1);
    assert_eq!(sc.get(DropReason::Replay), 1);
    assert_eq!(sc.get(DropReason::UnknownSender), 1);
    assert_eq!(sc.get(DropReason::Malformed), 2);
    assert_eq!(sc.get(DropReason::Unexpected), 1);
    assert_eq!(sc.dropped(), 8);
}

#[test]
fn restart_then_replay_is_refused() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, dk) = net.joined(&[]);
    let cmd = ok(net.server.command(d.id(), action(1), EXP, T0).unwrap());
    // The device persists its snapshot before acting.
    let mut stored: Vec<u8> = Vec::new();
    let h = d
        .handle(&cmd.topic, &cmd.bytes, T0)
        .unwrap()
        .persist(|snap| {
            stored = snap.bytes().to_vec();
            Ok::<_, Infallible>(())
        })
        .unwrap();
    assert!(matches!(h.event, JoinedEvent::Action { .. }));
    drop(d);
    // Restart from the stored state: the old command is refused, new ones work.
    let AnyDevice::Joined(mut d) = AnyDevice::from_state(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
        &stored,
    )
    .unwrap() else {
        panic!("not joined after restart")
    };
    assert_eq!(reason(to_dev(&mut d, &cmd, T0 + 1)), DropReason::Replay);
    let cmd2 = ok(net.server.command(d.id(), action(2), EXP, T0 + 2).unwrap());
    let h = to_dev(&mut d, &cmd2, T0 + 2).unwrap();
    let JoinedEvent::Action { token, .. } = h.event else {
        panic!()
    };
    let resp = ok(d.respond(&token, Status::ActionSuccess, T0 + 3).unwrap());

    // A failed persist yields nothing (the caller must not act).
    let data = d
        .send_data(
            Data {
                id: "x".into(),
                value: Value::Bool(true),
            },
            T0 + 3,
        )
        .unwrap();
    assert_eq!(data.persist(|_| Err("disk full")).unwrap_err(), "disk full");

    // The server restarts too, from its exported state; the registry refills its view.
    net.deliver(&resp, T0 + 4).unwrap();
    let data = ok(d
        .send_data(
            Data {
                id: "x".into(),
                value: Value::Bool(true),
            },
            T0 + 5,
        )
        .unwrap());
    net.deliver(&data, T0 + 5).unwrap();
    let state = net.server.export_state();
    let rec = net.server.device(d.id()).unwrap().clone();
    let mut server =
        ServerEngine::from_state(key_copy(&net.server_key), ServerConfig::default(), &state)
            .unwrap();
    server.upsert_device(rec);
    assert_eq!(
        server.outcome(&cmd2.token),
        Some(Outcome::Answered(Status::ActionSuccess)),
        "tracked tokens survive"
    );
    assert_eq!(
        reason(server.handle(&data.topic, &data.bytes, T0 + 6)),
        DropReason::Replay
    );
    assert_eq!(
        reason(server.handle(&resp.topic, &resp.bytes, T0 + 6)),
        DropReason::Replay
    );
    // Send counters survive: the next command is accepted by the device (no reused number).
    let cmd3 = ok(server.command(d.id(), action(3), EXP, T0 + 7).unwrap());
    let hdr = Message::decode(&cmd3.bytes).unwrap().header().clone();
    assert_eq!(hdr.seq, 4, "join command, cmd, cmd2, then cmd3");
    to_dev(&mut d, &cmd3, T0 + 7).unwrap();

    // Corrupted states are refused.
    let mut bad = state.clone();
    bad[10] ^= 1;
    assert_eq!(
        ServerEngine::from_state(key_copy(&net.server_key), ServerConfig::default(), &bad)
            .unwrap_err(),
        EngineError::Corrupt("state checksum")
    );
    let mut bad = stored.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(AnyDevice::from_state(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
        &bad
    )
    .is_err());
    // A device state made for another server is refused.
    let other = SigningKey::generate(Alg::Ed25519).unwrap().public();
    assert!(AnyDevice::from_state(key_copy(&dk), other, DeviceConfig::default(), &stored).is_err());
}

#[test]
fn snapshots_carry_the_status_a_grant_leads_to() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, dk) = net.register(&[]);
    let cmd = ok(net.server.join_command(d.id(), EXP, T0).unwrap());
    let m = d.handle(&cmd.topic, &cmd.bytes, T0).unwrap();
    let snap = m.record().bytes().to_vec();
    // Crash before applying the grant: the restored device is joined anyway.
    let restored = AnyDevice::from_state(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
        &snap,
    )
    .unwrap();
    assert!(matches!(restored, AnyDevice::Joined(_)));
    let AnyDevice::Joined(mut j) = restored else {
        panic!()
    };
    // Terminate → registered (before the grant is applied too).
    net.deliver(&ok(m).reply.unwrap(), T0).unwrap();
    let t = ok(net.server.terminate(j.id(), EXP, T0).unwrap());
    let m = j.handle(&t.topic, &t.bytes, T0).unwrap();
    let restored = AnyDevice::from_state(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
        m.record().bytes(),
    )
    .unwrap();
    assert!(matches!(restored, AnyDevice::Registered(_)));
    let JoinedEvent::Terminated(grant) = ok(m).event else {
        panic!()
    };
    let mut r = j.leave(grant);
    // Deregister command to a registered device → deregistered.
    let dr = ok(net.server.deregister(r.id(), EXP, T0).unwrap());
    let m = r.handle(&dr.topic, &dr.bytes, T0).unwrap();
    let restored = AnyDevice::from_state(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
        m.record().bytes(),
    )
    .unwrap();
    assert!(matches!(restored, AnyDevice::Deregistered(_)));
    let RegisteredEvent::Deregistered(grant) = ok(m).event else {
        panic!()
    };
    assert_eq!(r.erase(grant).id, DeviceId::of_key(&dk.public()));
}

#[test]
fn registered_device_only_takes_join_messages() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.register(&[]);
    let a = net.server_signed(d.id(), 1, EXP, action(1));
    assert_eq!(
        reason(d.handle(&a.topic, &a.bytes, T0).map(ok)),
        DropReason::NotJoined
    );
    // A join response for no request of ours.
    let r = net.server_signed(
        d.id(),
        2,
        EXP,
        Body::Response(crate::wire::Response {
            status: Status::JoinOk,
        }),
    );
    assert_eq!(
        reason(d.handle(&r.topic, &r.bytes, T0).map(ok)),
        DropReason::UnknownToken
    );
    // ID requests are answered in any state, with the request's token.
    let id = ok(net
        .server
        .command(d.id(), Body::IdRequest(crate::wire::IdRequest), EXP, T0)
        .unwrap());
    let h = ok(d.handle(&id.topic, &id.bytes, T0).unwrap());
    assert_eq!(
        h.event,
        RegisteredEvent::Identified {
            token: id.token.clone()
        }
    );
    net.deliver(&h.reply.unwrap(), T0).unwrap();
    assert_eq!(
        net.server.outcome(&id.token),
        Some(Outcome::Answered(Status::Identified))
    );
    assert_eq!(d.counters().get(DropReason::NotJoined), 1);
    assert_eq!(d.counters().get(DropReason::UnknownToken), 1);
    assert_eq!(d.counters().accepted(), 1);
}

#[test]
fn device_view_from_registry_record() {
    let k = SigningKey::generate(Alg::Ed25519).unwrap();
    let mut rec = crate::registry::DeviceRecord {
        id: k.device_id(),
        alg: Alg::Ed25519,
        public_key: k.public().to_bytes(),
        status: DeviceStatus::Joined,
        password_hash: String::new(),
        created: T0,
        name: None,
        groups: vec!["pumps".into()],
    };
    let v = DeviceView::from_record(&rec).unwrap();
    assert_eq!(v.id, k.device_id());
    assert_eq!(v.key, k.public());
    assert_eq!(v.status, DeviceStatus::Joined);
    assert!(v.groups.contains("pumps"));
    rec.public_key.truncate(5);
    assert!(DeviceView::from_record(&rec).is_err());
}

// ---- issue 6 review: revocation, join races, continuity ----

fn revoked_view(net: &Net, id: DeviceId) -> DeviceView {
    let mut v = net.server.device(id).unwrap().clone();
    v.status = DeviceStatus::Revoked;
    v
}

/// Starts a human-moderated join of `d`; returns the words the console shows.
fn start_human_join(net: &mut Net, d: &mut Device<Registered>, now: u64) -> Vec<&'static str> {
    let req = ok(d.request_join(JoinRequestKind::Human, now).unwrap());
    let sh = net.deliver(&req, now).unwrap();
    ok(d.handle(&sh.outgoing[0].topic, &sh.outgoing[0].bytes, now)
        .unwrap());
    net.server.join_words(d.id()).unwrap()
}

#[test]
fn revocation_is_not_undone_by_a_pending_human_join() {
    // Revoked through the registry mirror (upsert) and through set_status.
    for via_upsert in [true, false] {
        let mut net = Net::new(JoinPolicy::Moderated);
        let (mut d, _) = net.register(&[]);
        let words = start_human_join(&mut net, &mut d, T0);
        assert_eq!(net.status(d.id()), DeviceStatus::PendingJoin);
        if via_upsert {
            let v = revoked_view(&net, d.id());
            net.server.upsert_device(v);
        } else {
            net.server
                .set_status(d.id(), DeviceStatus::Revoked)
                .unwrap();
        }
        // The pending join is gone with the revocation.
        assert!(net.server.pending_joins().is_empty());
        assert_eq!(net.server.join_words(d.id()), None);
        // A late approval with the right words is refused; the device stays revoked.
        let err = net
            .server
            .operator_decide(d.id(), true, &words, T0 + 5)
            .unwrap_err();
        assert_eq!(err, EngineError::NoPendingJoin(d.id()));
        assert_eq!(net.status(d.id()), DeviceStatus::Revoked);
        assert!(net.server.decide_join(d.id(), true, T0 + 5).is_err());
        assert_eq!(net.status(d.id()), DeviceStatus::Revoked);
        // Revoked is final in the engine too.
        assert_eq!(
            net.server
                .set_status(d.id(), DeviceStatus::PendingJoin)
                .unwrap_err(),
            EngineError::Revoked(d.id())
        );
        let mut back = net.server.device(d.id()).unwrap().clone();
        back.status = DeviceStatus::Registered;
        net.server.upsert_device(back);
        assert_eq!(net.status(d.id()), DeviceStatus::Revoked);
        // Its new join requests are dropped, and tick changes nothing.
        let req = ok(d.request_join(JoinRequestKind::Human, T0 + 6).unwrap());
        assert_eq!(reason(net.deliver(&req, T0 + 6)), DropReason::Revoked);
        assert!(!net
            .server
            .tick(T0 + 10_000)
            .iter()
            .any(|e| matches!(e, ServerEvent::StatusChanged { device, .. } if *device == d.id())));
        assert_eq!(net.status(d.id()), DeviceStatus::Revoked);
    }
}

/// Runs an observed join up to the observer's answer, without delivering it.
fn observed_join_answer(
    net: &mut Net,
    observer: &mut Device<Joined>,
) -> (Device<Registered>, Outgoing) {
    let (newcomer, code, token) = start_observation(net, observer);
    let resp = ok(observer.observe(&token, Some(&code), T0 + 2).unwrap());
    (newcomer, resp)
}

#[test]
fn revoked_joiner_is_not_admitted_by_a_late_observation() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, resp) = observed_join_answer(&mut net, &mut observer);
    net.server
        .set_status(newcomer.id(), DeviceStatus::Revoked)
        .unwrap();
    // The observer's (valid) confirmation arrives after the revocation.
    assert_eq!(reason(net.deliver(&resp, T0 + 3)), DropReason::UnknownToken);
    assert_eq!(net.status(newcomer.id()), DeviceStatus::Revoked);
    assert!(net.server.pending_joins().is_empty());
}

#[test]
fn observer_must_still_be_joined_when_it_confirms() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, resp) = observed_join_answer(&mut net, &mut observer);
    // The observer is terminated before its confirmation is handled.
    let _t = ok(net.server.terminate(observer.id(), EXP, T0 + 2).unwrap());
    assert_eq!(reason(net.deliver(&resp, T0 + 3)), DropReason::UnknownToken);
    assert_eq!(net.status(newcomer.id()), DeviceStatus::PendingJoin);
    // The join cannot complete any more: tick refuses it at once, not at expiry.
    tick_refuses(
        &mut net,
        newcomer.id(),
        T0 + 4,
        JoinMethod::Observed,
        RefuseReason::ObserverRejected,
    );
    assert!(net.server.pending_joins().is_empty());

    // An observer revoked meanwhile: same.
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, resp) = observed_join_answer(&mut net, &mut observer);
    let v = revoked_view(&net, observer.id());
    net.server.upsert_device(v);
    assert_eq!(reason(net.deliver(&resp, T0 + 3)), DropReason::Revoked);
    net.server.tick(T0 + 4);
    assert_eq!(net.status(newcomer.id()), DeviceStatus::Registered);
}

#[test]
fn a_late_join_ok_does_not_rejoin_a_terminated_device() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.register(&[]);
    let jc = ok(net.server.join_command(d.id(), EXP, T0).unwrap());
    let h = ok(d.handle(&jc.topic, &jc.bytes, T0).unwrap());
    let late_ok = h.reply.unwrap(); // held back by the broker (or an attacker)
                                    // Meanwhile the operator marks it joined, then terminates it.
    net.server.set_status(d.id(), DeviceStatus::Joined).unwrap();
    let _t = ok(net.server.terminate(d.id(), EXP, T0 + 1).unwrap());
    assert_eq!(net.status(d.id()), DeviceStatus::Registered);
    assert_eq!(
        reason(net.deliver(&late_ok, T0 + 2)),
        DropReason::UnknownToken
    );
    assert_eq!(net.status(d.id()), DeviceStatus::Registered);

    // A deregistered device: its late JoinOk is dropped too.
    let (mut e, _) = net.register(&[]);
    let jc = ok(net.server.join_command(e.id(), EXP, T0).unwrap());
    let late_ok = ok(e.handle(&jc.topic, &jc.bytes, T0).unwrap())
        .reply
        .unwrap();
    let _dr = ok(net.server.deregister(e.id(), EXP, T0 + 1).unwrap());
    assert_eq!(reason(net.deliver(&late_ok, T0 + 2)), DropReason::Revoked);
    assert_eq!(net.status(e.id()), DeviceStatus::Revoked);
}

#[test]
fn a_terminated_device_ignores_a_join_command_delivered_late() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.joined(&[]);
    // The server sends a join command (a stale one, as a buggy or replaying path would),
    // then terminates; the broker delivers them out of order.
    let stale_join = net.server_signed(d.id(), 5, EXP, Body::JoinCommand(crate::wire::JoinCommand));
    let term = net.server_signed(d.id(), 6, EXP, Body::Terminate(crate::wire::Terminate));
    let h = to_dev(&mut d, &term, T0).unwrap();
    let JoinedEvent::Terminated(grant) = h.event else {
        panic!("{:?}", h.event)
    };
    let mut r = d.leave(grant);
    assert_eq!(
        reason(
            r.handle(&stale_join.topic, &stale_join.bytes, T0 + 1)
                .map(ok)
        ),
        DropReason::Unexpected
    );
    // A join command sent after the terminate is obeyed.
    let fresh = net.server_signed(r.id(), 7, EXP, Body::JoinCommand(crate::wire::JoinCommand));
    let h = ok(r.handle(&fresh.topic, &fresh.bytes, T0 + 2).unwrap());
    assert!(matches!(h.event, RegisteredEvent::Joined(_)));
}

#[test]
fn a_code_join_cannot_be_replaced_by_a_new_request() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut d, _) = net.register(&[]);
    let (observer, _) = net.joined(&[]);
    let words = start_human_join(&mut net, &mut d, T0);
    // Every kind of new request is refused while the words are being compared.
    for kind in [
        JoinRequestKind::Human,
        JoinRequestKind::Simple,
        JoinRequestKind::Observed {
            observer: observer.id(),
        },
    ] {
        let req = ok(d.request_join(kind, T0 + 1).unwrap());
        assert_eq!(
            reason(net.deliver(&req, T0 + 1)),
            DropReason::JoinInProgress
        );
        assert_eq!(net.server.join_words(d.id()), Some(words.clone()));
    }
    assert_eq!(net.server.counters().get(DropReason::JoinInProgress), 3);
    // The wrong decision calls for the method are refused.
    assert_eq!(
        net.server.decide_join(d.id(), true, T0 + 2).unwrap_err(),
        EngineError::NoPendingJoin(d.id())
    );
    // Once expired (before tick prunes it), a new request may start afresh.
    let req = ok(d.request_join(JoinRequestKind::Human, T0 + 700).unwrap());
    net.deliver(&req, T0 + 700).unwrap();
    assert_ne!(net.server.join_words(d.id()), Some(words));

    // Operator words only decide a human-moderated join: not an observed one.
    let mut net = Net::new(JoinPolicy::Moderated);
    let (mut observer, _) = net.joined(&[]);
    let (newcomer, resp) = observed_join_answer(&mut net, &mut observer);
    assert_eq!(
        net.server
            .operator_decide(newcomer.id(), true, &["ant"], T0 + 3)
            .unwrap_err(),
        EngineError::NoPendingJoin(newcomer.id())
    );
    assert_eq!(net.status(newcomer.id()), DeviceStatus::PendingJoin);
    // And an observed join cannot be restarted with another observer (one open at a time).
    let (other, _) = net.joined(&[]);
    let mut newcomer = newcomer;
    let req = ok(newcomer
        .request_join(
            JoinRequestKind::Observed {
                observer: other.id(),
            },
            T0 + 4,
        )
        .unwrap());
    assert_eq!(
        reason(net.deliver(&req, T0 + 4)),
        DropReason::JoinInProgress
    );
    assert_eq!(net.server.pending_joins().len(), 1);
    assert!(
        net.server.pending(&resp.token),
        "the observation is still open"
    );
    // Once that join expired, a new observed request replaces it and settles the old
    // observation: one open observation per joining device.
    let req = ok(newcomer
        .request_join(
            JoinRequestKind::Observed {
                observer: other.id(),
            },
            T0 + 700,
        )
        .unwrap());
    net.deliver(&req, T0 + 700).unwrap();
    assert_eq!(net.server.outcome(&resp.token), None);
    assert_eq!(
        net.server.pending_joins(),
        vec![(newcomer.id(), JoinMethod::Observed)]
    );
}

#[test]
fn open_joins_are_bounded() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let sid = net.server.id();
    let join_req = |k: &SigningKey, now: u64| {
        craft(
            k,
            sid,
            sid,
            1,
            now + 60,
            Token::random(),
            Body::JoinRequest(crate::wire::JoinRequest),
            false,
        )
    };
    let mut keys = Vec::new();
    for _ in 0..=MAX_PENDING_JOINS {
        let k = SigningKey::generate(Alg::Ed25519).unwrap();
        net.server
            .upsert_device(DeviceView::new(k.public(), DeviceStatus::Registered));
        keys.push(k);
    }
    for k in &keys[..MAX_PENDING_JOINS] {
        net.deliver(&join_req(k, T0), T0).unwrap();
    }
    assert_eq!(net.server.pending_joins().len(), MAX_PENDING_JOINS);
    let last = &keys[MAX_PENDING_JOINS];
    assert_eq!(
        reason(net.deliver(&join_req(last, T0), T0)),
        DropReason::TooManyJoins
    );
    assert_eq!(net.status(last.device_id()), DeviceStatus::Registered);
    // Tick prunes the expired ones; then there is room again.
    let ev = net.server.tick(T0 + 601);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, ServerEvent::JoinRefused { .. }))
            .count(),
        MAX_PENDING_JOINS
    );
    assert!(net.server.pending_joins().is_empty());
    net.deliver(&join_req(last, T0 + 602), T0 + 602).unwrap();
    assert_eq!(net.server.pending_joins().len(), 1);
}

#[test]
fn a_forged_high_sequence_does_not_move_the_window() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let sid = net.server.id();
    let (mut x, xk) = net.joined(&[]);
    // Server side: a forgery claiming X with a high sequence number.
    let mallory = SigningKey::generate(Alg::Ed25519).unwrap();
    let env = Envelope {
        sender: x.id(),
        recipient: sid,
        seq: 1000,
        expiry: EXP,
        token: Token::random(),
    };
    let body = Body::Generic(crate::wire::Generic { data: vec![1] });
    let forged = Outgoing {
        topic: net.server.topics().to_server(x.id()),
        bytes: Message::sign(&env, &body, &mallory).unwrap(),
        token: Token::random(),
        recipient: sid,
        msg_type: MessageType::Generic,
    };
    assert_eq!(reason(net.deliver(&forged, T0)), DropReason::BadSignature);
    // A genuine message with a lower number is still accepted.
    let genuine = craft(&xk, sid, sid, 3, EXP, Token::random(), body.clone(), false);
    net.deliver(&genuine, T0).unwrap();
    // A replay with a broken signature is refused by the cheap check, before verification.
    let mut broken = genuine.clone();
    let n = broken.bytes.len();
    broken.bytes[n - 1] ^= 1;
    assert_eq!(reason(net.deliver(&broken, T0)), DropReason::Replay);

    // Device side: the same with a forgery claiming the server.
    let env = Envelope {
        sender: sid,
        recipient: x.id(),
        seq: 1000,
        expiry: EXP,
        token: Token::random(),
    };
    let forged = Outgoing {
        topic: x.topic_in(),
        bytes: Message::sign(&env, &action(9), &mallory).unwrap(),
        token: Token::random(),
        recipient: x.id(),
        msg_type: MessageType::Action,
    };
    assert_eq!(
        reason(to_dev(&mut x, &forged, T0)),
        DropReason::BadSignature
    );
    let cmd = ok(net.server.command(x.id(), action(1), EXP, T0).unwrap());
    assert!(Message::decode(&cmd.bytes).unwrap().header().seq < 1000);
    assert!(matches!(
        to_dev(&mut x, &cmd, T0).unwrap().event,
        JoinedEvent::Action { action: 1, .. }
    ));
}

#[test]
fn reset_continuity_after_a_reinstall() {
    let mut net = Net::new(JoinPolicy::Moderated);
    let sid = net.server.id();
    let (mut d, dk) = net.joined(&[]);
    for i in 0..3 {
        let c = ok(net.server.command(d.id(), action(i), EXP, T0).unwrap());
        to_dev(&mut d, &c, T0).unwrap();
    }
    let data = |seq: u64| {
        craft(
            &dk,
            sid,
            sid,
            seq,
            EXP,
            Token::random(),
            Body::Generic(crate::wire::Generic { data: vec![] }),
            false,
        )
    };
    net.deliver(&data(5), T0).unwrap();
    // The device is re-installed with the same key: its counters start at 1 again.
    drop(d);
    assert_eq!(reason(net.deliver(&data(1), T0)), DropReason::Replay);
    let mp = net.server.reset_continuity(dk.device_id()).unwrap();
    assert_eq!(
        mp.record().peers(),
        &[(dk.device_id(), crate::guard::PeerState::default())],
        "the fresh state is handed over to persist"
    );
    ok(mp);
    net.deliver(&data(1), T0 + 1).unwrap();
    // Messages to it number from 1 again, which a fresh agent accepts.
    let mut fresh = Device::new(
        key_copy(&dk),
        net.server_pub.clone(),
        DeviceConfig::default(),
    );
    let jc = ok(net
        .server
        .command(
            dk.device_id(),
            Body::IdRequest(crate::wire::IdRequest),
            EXP,
            T0 + 2,
        )
        .unwrap());
    assert_eq!(Message::decode(&jc.bytes).unwrap().header().seq, 1);
    ok(fresh.handle(&jc.topic, &jc.bytes, T0 + 2).unwrap());
    // The reset survives a restart of the server engine.
    let state = net.server.export_state();
    let rec = net.server.device(dk.device_id()).unwrap().clone();
    let mut server =
        ServerEngine::from_state(key_copy(&net.server_key), ServerConfig::default(), &state)
            .unwrap();
    server.upsert_device(rec);
    assert_eq!(
        reason(server.handle(&data(1).topic, &data(1).bytes, T0 + 3)),
        DropReason::Replay,
        "seq 1 was accepted after the reset"
    );
    server
        .handle(&data(2).topic, &data(2).bytes, T0 + 3)
        .map(ok)
        .unwrap();
    // Refused for unknown and revoked devices.
    assert_eq!(
        net.server.reset_continuity(DeviceId([3; 8])).unwrap_err(),
        EngineError::UnknownDevice(DeviceId([3; 8]))
    );
    net.server
        .set_status(dk.device_id(), DeviceStatus::Revoked)
        .unwrap();
    assert_eq!(
        net.server.reset_continuity(dk.device_id()).unwrap_err(),
        EngineError::Revoked(dk.device_id())
    );
}
