//! keav against Linphone's bzrtp: both roles, several sessions in a row (so the retained
//! secrets carry over), same SAS and same exported key on both sides every time.

use keav_interop::bzrtp::{
    BzrtpConfig, BzrtpEndpoint, Cache, Role as BzRole, DEFAULT_EXPORT_LABEL,
};
use keav_interop::driver::{self, Options};
use keav_interop::keav::{KeavPeer, Start};
use keav_proto::cache::{PeerCache, Verification, Zid};
use keav_proto::handshake::{KeyAgreement, Role};

const KEAV_URI: &str = "sip:keav@keav.test";
const BZRTP_URI: &str = "sip:bzrtp@keav.test";

fn skip() -> bool {
    if !keav_interop::BZRTP_AVAILABLE {
        println!("skipped: libbzrtp-dev not installed");
        return true;
    }
    false
}

/// Runs `sessions` sessions between one keav device and one bzrtp device.
fn sessions(keav_start: Start, sessions: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bz_cache = dir.path().join("bzrtp.sqlite");
    let zid = Zid(*b"keav-interop");
    let mut cache: Option<PeerCache> = None;
    let mut initiator_seen = [false; 2];
    for n in 1..=sessions {
        let mut keav = KeavPeer::new(keav_start, zid, 0x4B45_4156, cache.clone());
        let mut bz = BzrtpEndpoint::new(
            &BzrtpConfig::new(BZRTP_URI, KEAV_URI, 0x0B27_0000 + n as u32)
                .with_cache(Cache::File(bz_cache.clone())),
        )
        .expect("bzrtp endpoint");
        let opts = Options {
            // A keav responder waits for the peer's Hello, so bzrtp goes first; a keav
            // initiator goes first and bzrtp starts right after.
            b_start_delay_ms: Some(0),
            linger_ms: 300,
            ..Options::default()
        };
        let t = match keav_start {
            Start::Initiator => driver::run(&mut keav, &mut bz, opts),
            Start::Responder => driver::run(&mut bz, &mut keav, opts),
        }
        .expect("driver");
        assert!(
            t.secure_at_ms.is_some(),
            "session {n}: no agreement (keav error: {:?}); exchange: {:?}",
            keav.error(),
            t.summary()
        );
        let o = keav.outcome().expect("keav outcome");
        // Same SAS: bzrtp renders B32 as four characters.
        let bz_sas = bz.sas().expect("bzrtp SAS");
        assert_eq!(o.sas, bz_sas, "session {n}: SAS");
        // Same exported key: bzrtp exposes KDF(exported_key, label, KDF_Context, 256).
        let bz_key = bz.exported_key().expect("bzrtp exported key");
        assert_eq!(
            o.export(DEFAULT_EXPORT_LABEL, 256).expose(),
            &bz_key[..],
            "session {n}: exported key"
        );
        assert_eq!(o.key_agreement, KeyAgreement::Dh);
        assert_eq!(
            o.verification,
            Verification::NotSupported,
            "bzrtp has no KEAV test"
        );
        // Key continuity from session 2 on.
        assert_eq!(
            o.cache_matched,
            n > 1,
            "session {n}: retained secret matched"
        );
        assert!(!o.cache_mismatch, "session {n}");
        assert_eq!(o.session_number, n as u64);
        // Roles are complementary.
        let bz_role = bz.role().expect("bzrtp role");
        match o.role {
            Role::Initiator => assert_eq!(bz_role, BzRole::Responder),
            Role::Responder => assert_eq!(bz_role, BzRole::Initiator),
        }
        initiator_seen[usize::from(o.role == Role::Initiator)] = true;
        cache = keav.next_cache();
    }
    if keav_start == Start::Responder {
        assert!(
            initiator_seen[0] && !initiator_seen[1],
            "a keav responder never commits"
        );
    }
}

#[test]
fn keav_initiator_against_bzrtp_four_sessions() {
    if skip() {
        return;
    }
    // bzrtp also commits as soon as it can; commit contention (RFC 6189 §4.2) decides who
    // initiates, so both of keav's roles get exercised over the sessions.
    sessions(Start::Initiator, 4);
}

#[test]
fn keav_responder_against_bzrtp_four_sessions() {
    if skip() {
        return;
    }
    sessions(Start::Responder, 4);
}

#[test]
fn b256_sas_matches_bzrtp_words() {
    if skip() {
        return;
    }
    use keav_interop::bzrtp::SasType as BzSas;
    use keav_proto::sas::SasType;
    let mut keav = KeavPeer::new(Start::Responder, Zid(*b"keav-b256-01"), 7, None)
        .with_sas_types(vec![SasType::B256, SasType::B32]);
    let mut cfg = BzrtpConfig::new(BZRTP_URI, KEAV_URI, 8);
    cfg.sas = vec![BzSas::B256, BzSas::B32];
    let mut bz = BzrtpEndpoint::new(&cfg).expect("bzrtp");
    let t = driver::run(&mut bz, &mut keav, Options::default()).expect("driver");
    assert!(
        t.secure_at_ms.is_some(),
        "{:?} {:?}",
        keav.error(),
        t.summary()
    );
    let o = keav.outcome().expect("outcome");
    assert_eq!(o.sas_type, SasType::B256);
    // bzrtp shows the two PGP words as "even:odd"; keav separates them with a space.
    assert_eq!(o.sas.replace(' ', ":"), bz.sas().expect("bzrtp sas"));
    assert_eq!(
        o.export(DEFAULT_EXPORT_LABEL, 256).expose(),
        &bz.exported_key().expect("key")[..]
    );
}
