//! Two bzrtp endpoints back to back, in process, with a simulated clock.
//!
//! These tests pin down what keav will have to interoperate with: bzrtp's
//! Hello, its negotiation choices, its retained-secret handling over several
//! sessions, its tolerance of unknown SAS types, and its timers.

use std::path::Path;

use keav_interop::bzrtp::{BzrtpConfig, BzrtpEndpoint, Cache, Role, SasType};
use keav_interop::driver::{self, Options, Side, Transcript};
use keav_interop::{wire, BZRTP_AVAILABLE};

macro_rules! require_bzrtp {
    () => {
        if !BZRTP_AVAILABLE {
            eprintln!("skipped: libbzrtp-dev not installed");
            return;
        }
    };
}

const ALICE: &str = "sip:alice@keav.test";
const BOB: &str = "sip:bob@keav.test";
const B32_ALPHABET: &str = "ybndrfg8ejkmcpqxot1uwisza345h769";

fn endpoints(cache_dir: Option<&Path>) -> (BzrtpEndpoint, BzrtpEndpoint) {
    let cache = |name: &str| match cache_dir {
        Some(d) => Cache::File(d.join(name)),
        None => Cache::None,
    };
    let a = BzrtpEndpoint::new(
        &BzrtpConfig::new(ALICE, BOB, 0x0A11_CE00).with_cache(cache("alice.sqlite")),
    )
    .expect("alice");
    let b = BzrtpEndpoint::new(
        &BzrtpConfig::new(BOB, ALICE, 0x0000_0B0B).with_cache(cache("bob.sqlite")),
    )
    .expect("bob");
    (a, b)
}

fn run_pair(a: &mut BzrtpEndpoint, b: &mut BzrtpEndpoint) -> Transcript {
    let t = driver::run(a, b, Options::default()).expect("driver");
    assert!(
        t.secure_at_ms.is_some(),
        "no agreement; exchange: {:?}",
        t.summary()
    );
    t
}

/// Checks that hold for any successful session between a and b.
fn assert_agreement(a: &BzrtpEndpoint, b: &BzrtpEndpoint) {
    assert!(a.is_secure() && b.is_secure());

    // roles are complementary and consistent with bzrtp's own callback
    let (ra, rb) = (a.role().expect("role a"), b.role().expect("role b"));
    assert_ne!(ra, rb);
    if a.callback_role().is_some() {
        assert_eq!(a.callback_role(), Some(ra));
    }
    if b.callback_role().is_some() {
        assert_eq!(b.callback_role(), Some(rb));
    }

    // negotiated profile: S256 / AES1 / HS32 / X255 / B32
    let na = a.negotiated().expect("negotiated a");
    assert_eq!(Some(na.clone()), b.negotiated());
    assert_eq!(
        (
            na.hash.as_str(),
            na.cipher.as_str(),
            na.auth_tag.as_str(),
            na.key_agreement.as_str(),
            na.sas.as_str()
        ),
        ("S256", "AES1", "HS32", "X255", "B32 ")
    );
    assert_eq!(a.sas_type(), Some(SasType::B32));

    // same SAS, well-formed base32 rendering
    let sas = a.sas().expect("sas");
    assert_eq!(Some(sas.clone()), b.sas());
    assert_eq!(sas.len(), 4);
    assert!(sas.chars().all(|c| B32_ALPHABET.contains(c)), "{sas}");

    // SRTP keys: what one side sends with, the other receives with
    let (ka, kb) = (
        a.srtp_keys().expect("keys a"),
        b.srtp_keys().expect("keys b"),
    );
    assert_eq!(ka.self_key, kb.peer_key);
    assert_eq!(ka.peer_key, kb.self_key);
    assert_eq!(ka.self_salt, kb.peer_salt);
    assert_eq!(ka.peer_salt, kb.self_salt);
    assert_eq!(ka.self_key.len(), 16);
    assert_eq!(ka.self_salt.len(), 14);
    assert_ne!(ka.self_key, ka.peer_key);

    // ZIDs: each side saw the other's
    assert_eq!(a.peer_zid(), b.self_zid());
    assert_eq!(b.peer_zid(), a.self_zid());
    assert!(a.self_zid().is_some());
    assert_ne!(a.self_zid(), b.self_zid());
}

fn assert_transcript_wellformed(t: &Transcript) {
    for r in &t.records {
        assert!(
            wire::crc_ok(&r.packet),
            "bad CRC-32c on {}",
            wire::message_name(&r.packet)
        );
        assert_eq!(r.packet.first(), Some(&0x10));
        assert_eq!(r.packet.get(4..8), Some(&b"ZRTP"[..]));
        // message length (words) covers exactly header-to-CRC
        let words = u16::from_be_bytes([r.packet[14], r.packet[15]]);
        assert_eq!(usize::from(words) * 4, r.packet.len() - 16);
    }
}

#[test]
fn fresh_pair_agrees_on_x255_sas_and_exported_key() {
    require_bzrtp!();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = endpoints(Some(dir.path()));
    let t = run_pair(&mut a, &mut b);
    assert_agreement(&a, &b);
    assert_transcript_wellformed(&t);

    let ea = a.exported_key().expect("exported key a");
    assert_eq!(Some(ea.clone()), b.exported_key());
    assert_eq!(ea.len(), 32);
    assert!(ea.iter().any(|x| *x != 0));
    assert_eq!(a.export_label(), keav_interop::bzrtp::DEFAULT_EXPORT_LABEL);

    // first session: nothing cached before, nothing to mismatch
    assert!(!a.cache_mismatch() && !b.cache_mismatch());
    assert_eq!(a.previously_verified(), Some(false));
    assert_eq!(a.status_counters().cache_mismatch, 0);
    // both wrote a fresh rs1 (the same one) and no rs2
    let (rs1a, rs2a) = a.retained_secrets_at_export();
    let (rs1b, rs2b) = b.retained_secrets_at_export();
    assert_eq!(rs1a.as_ref().map(Vec::len), Some(32));
    assert_eq!(rs1a, rs1b);
    assert_eq!((rs2a, rs2b), (None, None));

    // the same thing works cacheless (exported key still available)
    let (mut c, mut d) = endpoints(None);
    run_pair(&mut c, &mut d);
    assert_agreement(&c, &d);
    assert_eq!(c.exported_key(), d.exported_key());
    assert!(c.exported_key().is_some());
    assert_ne!(c.exported_key(), a.exported_key());
    assert_eq!(c.retained_secrets_at_export(), (None, None));
}

#[test]
fn b256_sas_when_preferred_by_both() {
    require_bzrtp!();
    let mut ca = BzrtpConfig::new(ALICE, BOB, 1);
    let mut cb = BzrtpConfig::new(BOB, ALICE, 2);
    ca.sas = vec![SasType::B256, SasType::B32];
    cb.sas = vec![SasType::B256, SasType::B32];
    let mut a = BzrtpEndpoint::new(&ca).expect("a");
    let mut b = BzrtpEndpoint::new(&cb).expect("b");
    run_pair(&mut a, &mut b);
    assert_eq!(a.sas_type(), Some(SasType::B256));
    let sas = a.sas().expect("sas");
    assert_eq!(Some(sas.clone()), b.sas());
    // PGP words: "even:odd"
    let words: Vec<&str> = sas.split(':').collect();
    assert_eq!(words.len(), 2, "{sas}");
    assert!(words
        .iter()
        .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic())));
}

#[test]
fn retained_secrets_carry_over_four_sessions() {
    require_bzrtp!();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut prev_rs1: Option<Vec<u8>> = None;
    let mut zids = None;
    let mut keys = Vec::new();
    let mut sases = Vec::new();
    for session in 0..4 {
        let (mut a, mut b) = endpoints(Some(dir.path()));
        run_pair(&mut a, &mut b);
        assert_agreement(&a, &b);

        // same identities every time: the ZIDs come from the cache files
        let z = (a.self_zid(), b.self_zid());
        if let Some(first) = zids {
            assert_eq!(first, z, "session {session}: ZID changed");
        }
        zids = Some(z);

        // cache path used, and no mismatch
        assert!(
            !a.cache_mismatch() && !b.cache_mismatch(),
            "session {session}"
        );
        assert_eq!(
            a.status_counters().cache_mismatch + b.status_counters().cache_mismatch,
            0
        );
        assert!(a.zuid() > 0 && b.zuid() > 0);

        // PVS: verified in session 0, so reported from session 1 on
        let expected_pvs = session > 0;
        assert_eq!(
            a.previously_verified(),
            Some(expected_pvs),
            "session {session}"
        );
        assert_eq!(
            b.previously_verified(),
            Some(expected_pvs),
            "session {session}"
        );

        // rs2 := previous rs1, new rs1 identical on both sides
        let (rs1a, rs2a) = a.retained_secrets_at_export();
        let (rs1b, rs2b) = b.retained_secrets_at_export();
        assert!(rs1a.is_some());
        assert_eq!(rs1a, rs1b, "session {session}");
        assert_eq!(
            rs2a, prev_rs1,
            "session {session}: rs2 is not the previous rs1"
        );
        assert_eq!(rs2b, prev_rs1);
        assert_ne!(rs1a, prev_rs1);
        // and that is what the cache holds now
        assert_eq!(a.cache_read("rs1"), Ok(rs1a.clone()));
        assert_eq!(b.cache_read("rs2"), Ok(prev_rs1.clone()));
        prev_rs1 = rs1a;

        let k = a.exported_key().expect("exported");
        assert_eq!(Some(k.clone()), b.exported_key());
        assert!(!keys.contains(&k), "exported key repeated across sessions");
        keys.push(k);
        sases.push(a.sas());

        if session == 0 {
            a.set_sas_verified();
            b.set_sas_verified();
            assert_eq!(a.cache_read("pvs"), Ok(Some(vec![1])));
            assert_eq!(a.peer_cache_status(), Some(0x2011));
        }
    }
    assert_eq!(keys.len(), 4);
}

#[test]
fn corrupted_rs1_is_reported_as_cache_mismatch() {
    require_bzrtp!();
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut a, mut b) = endpoints(Some(dir.path()));
        run_pair(&mut a, &mut b);
        assert_agreement(&a, &b);
        a.set_sas_verified();
        b.set_sas_verified();
        // Bob's cache now holds a wrong rs1 (and no rs2: first session)
        b.cache_write("rs1", &[0x5a; 32]).expect("tamper");
        assert_eq!(b.cache_read("rs1"), Ok(Some(vec![0x5a; 32])));
    }
    let (mut a, mut b) = endpoints(Some(dir.path()));
    run_pair(&mut a, &mut b);
    assert_agreement(&a, &b); // still agree: s0 computed without any rs

    assert!(a.cache_mismatch(), "alice did not flag the mismatch");
    assert!(b.cache_mismatch(), "bob did not flag the mismatch");
    assert!(a.status_counters().cache_mismatch >= 1);
    // mismatch clears the PVS flag
    assert_eq!(a.previously_verified(), Some(false));
    assert_eq!(a.cache_read("pvs"), Ok(Some(vec![0])));
    // cache update and the export callback wait for the user's SAS check
    assert_eq!(a.exported_key(), None);
    assert_eq!(b.exported_key(), None);
    let old_rs1 = a.cache_read("rs1").expect("read");
    assert!(old_rs1.is_some());
    a.set_sas_verified();
    b.set_sas_verified();
    let ea = a.exported_key().expect("exported after verification");
    assert_eq!(Some(ea), b.exported_key());
    let (rs1a, rs2a) = a.retained_secrets_at_export();
    assert_eq!(rs1a, b.retained_secrets_at_export().0);
    assert_ne!(rs1a, old_rs1);
    // bzrtp discarded the mismatching rs1 from its context, so the delayed
    // update writes a fresh rs1 and *erases* rs2 (old rs1 is not kept).
    assert_eq!(rs2a, None);
    assert_eq!(a.cache_read("rs2"), Ok(None));
}

#[test]
fn bzrtp_hello_contents() {
    require_bzrtp!();
    let (mut a, _b) = endpoints(None);
    a.start(0).expect("start");
    let out = a.take_outgoing();
    assert_eq!(out.len(), 1, "one Hello at start");
    let p = &out[0];
    assert!(wire::crc_ok(p));
    assert_eq!(wire::ssrc(p), Some(0x0A11_CE00));
    let h = wire::parse_hello(p).expect("hello");
    assert_eq!(&h.version, b"1.10");
    assert_eq!(&h.client_id, b"BZRTPv1.1\0\0\0\0\0\0\0");
    assert!(!h.s && !h.m && !h.p);
    assert_eq!(h.hash, ["S256"]);
    assert_eq!(h.cipher, ["AES1"]);
    assert_eq!(h.auth, ["HS32", "HS80"]);
    // DH3k and Mult are always appended by bzrtp (mandatory / multistream)
    assert_eq!(h.key_agreement, ["X255", "DH3k", "Mult"]);
    assert_eq!(h.sas, ["B32 ", "B256"]);
    assert_eq!(Some(h.zid), a.self_zid());
    // message length: 88 fixed bytes + 4 per algorithm
    assert_eq!(p.len(), 12 + 88 + 4 * 9 + 4);

    // bzrtp's Hello hash (signalling) is SHA-256 of the Hello message
    let hh = a.self_hello_hash().expect("hello hash");
    assert!(hh.starts_with("1.10 "));
    assert_eq!(hh.len(), 5 + 64);

    // a Hello retransmission is byte-identical except seq and CRC
    a.iterate(1000).expect("iterate");
    let again = a.take_outgoing();
    assert_eq!(again.len(), 1);
    assert_eq!(wire::sequence(&again[0]), wire::sequence(p).map(|s| s + 1));
    assert_eq!(again[0].get(4..again[0].len() - 4), p.get(4..p.len() - 4));
}

/// A minimal HelloACK packet (RFC 6189 5.3) from `ssrc` with sequence `seq`.
fn hello_ack(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x10, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ZRTP");
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0x50, 0x5a, 0x00, 0x03]);
    p.extend_from_slice(b"HelloACK");
    p.extend_from_slice(&[0; 4]);
    wire::fix_crc(&mut p);
    p
}

#[test]
fn unknown_sas_types_in_peer_hello_are_tolerated() {
    require_bzrtp!();
    let (mut a, mut b) = endpoints(None);
    a.start(0).expect("a start");
    b.start(0).expect("b start");
    let hello_a = a.take_outgoing().remove(0);
    let _ = b.take_outgoing();

    let modified = wire::hello_with_extra_sas(&hello_a, &[*b"KVCP", *b"KVRQ"]).expect("modify");
    let parsed = wire::parse_hello(&modified).expect("still a Hello");
    assert_eq!(parsed.sas, ["B32 ", "B256", "KVCP", "KVRQ"]);
    assert!(wire::crc_ok(&modified));

    // bzrtp accepts it and answers HelloACK
    b.process(&modified, 10)
        .expect("bzrtp rejected a Hello with unknown SAS types");
    let out = b.take_outgoing();
    let names: Vec<String> = out.iter().map(|p| wire::message_name(p)).collect();
    assert!(names.contains(&"HelloACK".to_owned()), "{names:?}");

    // our HelloACK moves it on to Commit, which picks a known SAS type
    let seq = wire::sequence(&modified).expect("seq") + 1;
    b.process(&hello_ack(seq, 0x0A11_CE00), 20)
        .expect("HelloACK");
    let commit = b
        .take_outgoing()
        .into_iter()
        .find(|p| wire::message_name(p) == "Commit")
        .expect("bzrtp sent a Commit");
    // Commit body: H2(32) ZID(12) hash cipher auth ka sas
    let body = &commit[24..];
    assert_eq!(&body[44..48], b"S256");
    assert_eq!(&body[56..60], b"X255");
    assert_eq!(&body[60..64], b"B32 ");

    // More than 7 entries in one list is rejected (bzrtp caps counts at 7,
    // then the length check fails): keep keav's lists at <= 7.
    let (mut c, mut d) = endpoints(None);
    c.start(0).expect("c start");
    d.start(0).expect("d start");
    let hello_c = c.take_outgoing().remove(0);
    let too_many = wire::hello_with_extra_sas(
        &hello_c,
        &[*b"KV01", *b"KV02", *b"KV03", *b"KV04", *b"KV05", *b"KV06"],
    )
    .expect("modify");
    assert_eq!(wire::parse_hello(&too_many).map(|h| h.sas.len()), Some(8));
    assert!(d.process(&too_many, 10).is_err());
}

#[test]
fn unknown_sas_only_falls_back_to_mandatory_b32() {
    require_bzrtp!();
    // A Hello advertising only keav's private SAS types, no B32: bzrtp adds
    // the mandatory B32 to the peer's list on parse and agrees on it.
    let (mut a, mut b) = endpoints(None);
    a.start(0).expect("a start");
    b.start(0).expect("b start");
    let hello_a = a.take_outgoing().remove(0);
    let _ = b.take_outgoing();
    let h = wire::parse_hello(&hello_a).expect("hello");
    // rewrite the two SAS entries in place: "B32 " "B256" -> "KVCP" "KVRQ"
    let mut m = hello_a.clone();
    let sas_off = m.len() - 12 - 4 * h.sas.len();
    m[sas_off..sas_off + 4].copy_from_slice(b"KVCP");
    m[sas_off + 4..sas_off + 8].copy_from_slice(b"KVRQ");
    wire::fix_crc(&mut m);
    assert_eq!(
        wire::parse_hello(&m).map(|h| h.sas),
        Some(vec!["KVCP".to_owned(), "KVRQ".to_owned()])
    );
    b.process(&m, 10).expect("accepted");
    let seq = wire::sequence(&m).expect("seq") + 1;
    b.process(&hello_ack(seq, 0x0A11_CE00), 20)
        .expect("HelloACK");
    let commit = b
        .take_outgoing()
        .into_iter()
        .find(|p| wire::message_name(p) == "Commit")
        .expect("Commit");
    assert_eq!(&commit[24 + 60..24 + 64], b"B32 ");
}

#[test]
fn hello_retransmission_schedule() {
    require_bzrtp!();
    // A alone, nobody answers: record when Hellos go out (1 ms resolution).
    let (mut a, _b) = endpoints(None);
    let t0 = 10_000;
    a.start(t0).expect("start");
    let mut times = vec![t0; a.take_outgoing().len()];
    for t in t0 + 1..t0 + 20_000 {
        a.iterate(t).expect("iterate");
        for _ in a.take_outgoing() {
            times.push(t);
        }
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // first Hello immediately, then 100 ms, then every 200 ms (cap);
    // 21 Hellos in all, then silence.
    assert_eq!(times.len(), 21, "{gaps:?}");
    assert_eq!(gaps[0], 100);
    assert!(gaps[1..].iter().all(|g| *g == 200), "{gaps:?}");
}

#[test]
fn commit_retransmission_schedule() {
    require_bzrtp!();
    // Exchange Hello/HelloACK, then cut B off and watch A's Commits.
    let (mut a, mut b) = endpoints(None);
    let t0 = 5_000;
    a.start(t0).expect("a");
    b.start(t0).expect("b");
    let hello_a = a.take_outgoing().remove(0);
    let hello_b = b.take_outgoing().remove(0);
    b.process(&hello_a, t0).expect("b <- hello");
    let ack_b: Vec<Vec<u8>> = b.take_outgoing();
    a.process(&hello_b, t0).expect("a <- hello");
    let _ = a.take_outgoing(); // A's HelloACK, dropped
    let mut times = Vec::new();
    for p in ack_b.iter().filter(|p| wire::message_name(p) == "HelloACK") {
        a.process(p, t0).expect("a <- HelloACK");
    }
    for p in a.take_outgoing() {
        if wire::message_name(&p) == "Commit" {
            times.push(t0);
        }
    }
    assert_eq!(times.len(), 1, "Commit sent right after HelloACK");
    for t in t0 + 1..t0 + 30_000 {
        a.iterate(t).expect("iterate");
        for p in a.take_outgoing() {
            assert_eq!(wire::message_name(&p), "Commit");
            times.push(t);
        }
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 150 ms, doubling, capped at 1200 ms; 12 Commits in all
    assert_eq!(gaps[..5], [150, 300, 600, 1200, 1200], "{gaps:?}");
    assert!(gaps[4..].iter().all(|g| *g == 1200), "{gaps:?}");
    assert_eq!(times.len(), 12, "{gaps:?}");
}

#[test]
fn late_starter_and_roles() {
    require_bzrtp!();
    // B starts 500 ms after A: both still end up committing (bzrtp commits
    // as soon as Hello/HelloACK are exchanged) and contention picks a role.
    let mut initiators = [0u32; 2];
    for _ in 0..6 {
        let (mut a, mut b) = endpoints(None);
        let opts = Options {
            b_start_delay_ms: Some(500),
            ..Options::default()
        };
        let t = driver::run(&mut a, &mut b, opts).expect("run");
        assert!(t.secure_at_ms.is_some(), "{:?}", t.summary());
        assert_agreement(&a, &b);
        let i = usize::from(a.role() != Some(Role::Initiator));
        initiators[i] += 1;
        // B's packets before it starts are rejected (no state machine yet)
        let early: Vec<_> = t
            .records
            .iter()
            .filter(|r| r.from == Side::A && r.t_ms < 1_500)
            .collect();
        assert!(
            early.iter().all(|r| r.result == Err(0x4)),
            "bzrtp drops packets before start"
        );
    }
    eprintln!("initiator counts (A, B) over 6 runs: {initiators:?}");
}

#[test]
fn recorded_exchange_is_consistent() {
    require_bzrtp!();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = endpoints(Some(dir.path()));
    let t = run_pair(&mut a, &mut b);
    assert_agreement(&a, &b);
    let s = t.summary();
    // every message of DH mode was delivered; the last is Conf2ACK
    for m in [
        "Hello", "HelloACK", "Commit", "DHPart1", "DHPart2", "Confirm1", "Confirm2", "Conf2ACK",
    ] {
        assert!(
            s.iter().any(|x| x.ends_with(&format!(":{m}"))),
            "missing {m}: {s:?}"
        );
    }

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/bzrtp_x255_session1.txt");
    if std::env::var_os("KEAV_INTEROP_RECORD").is_some() {
        let na = a.negotiated().expect("negotiated");
        let header = format!(
            "One bzrtp <-> bzrtp DH-mode exchange (libbzrtp 5.1.64), recorded by tests/bzrtp_pair.rs\n\
             (KEAV_INTEROP_RECORD=1). A = {ALICE} ssrc 0x0a11ce00, B = {BOB} ssrc 0x00000b0b, fresh caches.\n\
             Packets are complete RFC 6189 packets (header, message, CRC-32c) as sent.\n\
             A role: {:?}; B role: {:?}\n\
             A ZID: {}; B ZID: {}\n\
             negotiated: {} {} {} {} {}; SAS: {}\n\
             exported key (bzrtp_exportKey, label \"{}\"): {}",
            a.role().expect("role"),
            b.role().expect("role"),
            hex::encode(a.self_zid().expect("zid")),
            hex::encode(b.self_zid().expect("zid")),
            na.hash,
            na.cipher,
            na.auth_tag,
            na.key_agreement,
            na.sas,
            a.sas().expect("sas"),
            String::from_utf8_lossy(a.export_label()),
            hex::encode(a.exported_key().expect("key")),
        );
        std::fs::write(&data, t.to_text(&header)).expect("write data");
    }

    // the committed recording parses and is internally consistent
    let text = std::fs::read_to_string(&data).expect("data file present");
    let mut n = 0;
    let mut seen_hello = 0;
    let mut last_seq = [None::<u16>; 2];
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split(' ').collect();
        assert_eq!(cols.len(), 5, "{line}");
        let p = hex::decode(cols[4]).expect("hex");
        assert!(wire::crc_ok(&p));
        assert_eq!(wire::message_name(&p), cols[2]);
        let side = usize::from(cols[1] == "B");
        let seq = wire::sequence(&p).expect("seq");
        if let Some(prev) = last_seq[side] {
            assert!(seq > prev, "sequence numbers increase per sender");
        }
        last_seq[side] = Some(seq);
        if cols[2] == "Hello" {
            seen_hello += 1;
            assert!(wire::parse_hello(&p).is_some());
        }
        n += 1;
    }
    assert!(n >= 10 && seen_hello >= 2, "{n} packets");
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn hmac8(key: &[u8], data: &[u8]) -> [u8; 8] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

/// The (first) packet of a given type sent by `side`.
fn find<'a>(t: &'a Transcript, side: Side, name: &str) -> &'a [u8] {
    &t.records
        .iter()
        .find(|r| r.from == side && wire::message_name(&r.packet) == name)
        .unwrap_or_else(|| panic!("no {name} from {side:?}"))
        .packet
}

/// Message bytes (without packet header and CRC).
fn message(p: &[u8]) -> &[u8] {
    &p[12..p.len() - 4]
}

#[test]
fn hash_chain_macs_and_retained_secret_ids_follow_rfc() {
    require_bzrtp!();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rs_history: Vec<Vec<u8>> = Vec::new();
    for session in 0..3 {
        let (mut a, mut b) = endpoints(Some(dir.path()));
        let t = run_pair(&mut a, &mut b);
        assert_agreement(&a, &b);
        let (ini, res) = if a.role() == Some(Role::Initiator) {
            (Side::A, Side::B)
        } else {
            (Side::B, Side::A)
        };

        // RFC 6189 9: H3 = SHA256(H2), H2 = SHA256(H1), H1 = SHA256(H0);
        // Hello MAC keyed by H2, Commit MAC by H1, DHPart MAC by H0 (all HMAC-SHA256/64).
        let hello_i = message(find(&t, ini, "Hello"));
        let hello_r = message(find(&t, res, "Hello"));
        let commit = message(find(&t, ini, "Commit"));
        let dh1 = message(find(&t, res, "DHPart1"));
        let dh2 = message(find(&t, ini, "DHPart2"));
        let h3_i = &hello_i[12 + 20..12 + 52];
        let h3_r = &hello_r[12 + 20..12 + 52];
        let h2_i = &commit[12..44];
        let h1_r = &dh1[12..44];
        let h1_i = &dh2[12..44];
        assert_eq!(sha256(h2_i), h3_i);
        let h2_r = sha256(h1_r);
        assert_eq!(sha256(&h2_r), h3_r);
        assert_eq!(sha256(h1_i), h2_i);
        assert_eq!(
            hmac8(h2_i, &hello_i[..hello_i.len() - 8]),
            hello_i[hello_i.len() - 8..]
        );
        assert_eq!(
            hmac8(&h2_r, &hello_r[..hello_r.len() - 8]),
            hello_r[hello_r.len() - 8..]
        );
        assert_eq!(
            hmac8(h1_i, &commit[..commit.len() - 8]),
            commit[commit.len() - 8..]
        );
        // hvi = hash(initiator's DHPart2 || responder's Hello) (RFC 4.4.1.1)
        let hvi = &commit[12 + 32 + 12 + 20..12 + 32 + 12 + 20 + 32];
        assert_eq!(sha256(&[dh2, hello_r].concat()), hvi);
        // X255 public values are 32 bytes: DHPart = 12 + 32 + 4*8 + 32 + 8 bytes
        assert_eq!(dh1.len(), 12 + 32 + 32 + 32 + 8);

        // retained secret IDs: rsNIDi = MAC(rsN, "Initiator"), rsNIDr = MAC(rsN, "Responder")
        let ids = |dh: &[u8]| -> ([u8; 8], [u8; 8]) {
            (
                dh[44..52].try_into().expect("8"),
                dh[52..60].try_into().expect("8"),
            )
        };
        let (rs1id_r, rs2id_r) = ids(dh1);
        let (rs1id_i, rs2id_i) = ids(dh2);
        if let Some(rs1) = rs_history.last() {
            assert_eq!(rs1id_r, hmac8(rs1, b"Responder"), "session {session}");
            assert_eq!(rs1id_i, hmac8(rs1, b"Initiator"), "session {session}");
        }
        if rs_history.len() >= 2 {
            let rs2 = &rs_history[rs_history.len() - 2];
            assert_eq!(rs2id_r, hmac8(rs2, b"Responder"), "session {session}");
            assert_eq!(rs2id_i, hmac8(rs2, b"Initiator"), "session {session}");
        }

        if session == 1 && std::env::var_os("KEAV_INTEROP_RECORD").is_some() {
            let header = format!(
                "Second bzrtp <-> bzrtp DH-mode session between the same caches (libbzrtp 5.1.64),\n\
                 recorded by tests/bzrtp_pair.rs (KEAV_INTEROP_RECORD=1): DHPart rs1IDs are real.\n\
                 A = {ALICE}, B = {BOB}. A role: {:?}. SAS: {}\n\
                 rs1 shared by both before this session (rs2 absent): {}\n\
                 => responder rs1IDr = HMAC-SHA256(rs1, \"Responder\")[..8], initiator rs1IDi = HMAC(rs1, \"Initiator\")[..8]\n\
                 rs1 after this session: {}",
                a.role().expect("role"),
                a.sas().expect("sas"),
                hex::encode(&rs_history[0]),
                hex::encode(a.retained_secrets_at_export().0.expect("rs1")),
            );
            let data =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("data/bzrtp_x255_session2_rs1.txt");
            std::fs::write(data, t.to_text(&header)).expect("write");
        }
        rs_history.push(a.retained_secrets_at_export().0.expect("rs1"));
    }
}
