//! Store tests: round trips, indexes, lockout, corruption, and crash safety (subprocesses).

use super::*;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

// ------------------------------------------------------------------------------------------
// Helpers with independent expectations

/// Retained secret of rotation state `k`: SHA-256("rs" ‖ k), so a state is checkable from its
/// counter alone.
fn rs(k: u64) -> Secret32 {
    let mut h = Sha256::new();
    h.update(b"rs");
    h.update(k.to_le_bytes());
    Secret32::new(h.finalize().into())
}

fn verification_of(k: u64) -> Verification {
    if k % 10 == 1 {
        Verification::Bound
    } else {
        Verification::Skipped
    }
}

/// The cache update of session `k` (rotation k-1 -> k).
fn update(k: u64) -> CacheUpdate {
    CacheUpdate {
        rs1: rs(k),
        rs2: k.checked_sub(1).map(rs),
        expires_at: Some(1_000_000 + k),
        sessions: k,
        verification: verification_of(k),
    }
}

/// Commit time used for session `k`.
fn t(k: u64) -> u64 {
    5_000 + k
}

/// Initiator rs ID computed here, independently of the crate's helper.
fn ini(s: &Secret32) -> [u8; 8] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(s.expose()).unwrap();
    m.update(b"Initiator");
    m.finalize().into_bytes()[..8].try_into().unwrap()
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keav.redb");
    (dir, path)
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> PeerId {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

const ZID_A: Zid = Zid([0xA1; 12]);
const ZID_B: Zid = Zid([0xB2; 12]);

/// The record a Normal peer created at `t(0)` has after sessions 1..=k were committed.
fn expected_after(id: PeerId, k: u64) -> PeerRecord {
    PeerRecord {
        id,
        zid: Some(ZID_A),
        label: Some("thermostat".into()),
        mode: Mode::NORMAL,
        cache: PeerCache {
            rs1: (k > 0).then(|| rs(k)),
            rs2: k.checked_sub(1).map(rs),
            expires_at: (k > 0).then_some(1_000_000 + k),
            sessions: k,
            verify_due: false,
            locked_until: None,
        },
        verify_failures: 0,
        last_failure_at: None,
        last_verification: (k > 0).then(|| (k, verification_of(k))),
        created_at: t(0),
        updated_at: t(k),
    }
}

/// Creates a store with one Normal peer and sessions 1..=k committed.
fn store_with_peer(path: &Path, k: u64) -> PeerId {
    let s = Store::open_at(path, 1).unwrap();
    let id = s
        .create_peer(Some(ZID_A), Some("thermostat"), Mode::NORMAL, t(0))
        .unwrap();
    for i in 1..=k {
        s.commit_session(&id, &update(i), t(i)).unwrap();
    }
    id
}

/// Asserts that the store holds exactly state `k` for `id`, including the rs-ID index.
fn assert_state(s: &Store, id: PeerId, k: u64) {
    assert_eq!(
        s.peer(&id).unwrap(),
        Some(expected_after(id, k)),
        "state {k}"
    );
    assert_eq!(s.peer_by_zid(&ZID_A).unwrap().map(|r| r.id), Some(id));
    for j in k.saturating_sub(1)..=k {
        if k > 0 {
            let hit = s.peer_by_initiator_rs_id(&ini(&rs(j))).unwrap();
            assert_eq!(
                hit.map(|r| r.id),
                Some(id),
                "rs id of state {j} in state {k}"
            );
        }
    }
    for j in [k.wrapping_sub(2), k + 1, k + 2] {
        assert!(
            s.peer_by_initiator_rs_id(&ini(&rs(j))).unwrap().is_none(),
            "stale rs id {j} in state {k}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Basics

#[test]
fn rs_id_known_answers() {
    // HMAC-SHA256(key, "Initiator")[..8], computed with Python's hmac module.
    let a = rs_id(&Secret32::new([0x0b; 32]), b"Initiator").unwrap();
    assert_eq!(hexs(&a), "a07b557eb9b3d187");
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8;
    }
    let b = rs_id(&Secret32::new(k), b"Initiator").unwrap();
    assert_eq!(hexs(&b), "286065344005e3eb");
}

#[test]
fn identity_is_created_once_and_stable_across_reopen() {
    let (_d, path) = tmp();
    let first = Store::open_at(&path, 77).unwrap().identity().unwrap();
    assert_eq!(first.created_at, 77);
    assert_ne!(first.zid.0, [0u8; 12]);
    let again = Store::open_at(&path, 999).unwrap().identity().unwrap();
    assert_eq!(again, first);
    // A deleted store means a new identity.
    std::fs::remove_file(&path).unwrap();
    let fresh = Store::open_at(&path, 1000).unwrap().identity().unwrap();
    assert_ne!(fresh.zid, first.zid);
    assert_eq!(fresh.created_at, 1000);
}

#[test]
fn open_fails_when_parent_dir_is_missing() {
    let (_d, path) = tmp();
    let bad = path.join("nope").join("keav.redb");
    assert!(matches!(Store::open(&bad), Err(Error::Io(_))));
}

#[test]
fn round_trip_of_every_field_across_reopen() {
    let (_d, path) = tmp();
    let policy = LockoutPolicy {
        max_failures: 1,
        base_backoff_secs: 100,
        max_backoff_secs: 1000,
    };
    let id = {
        let s = Store::open_at(&path, 1).unwrap();
        let id = s
            .create_peer(
                Some(ZID_A),
                Some("thermostat"),
                Mode::Normal { verify_every: 7 },
                10,
            )
            .unwrap();
        s.commit_session(
            &id,
            &CacheUpdate {
                rs1: rs(8),
                rs2: Some(rs(9)),
                expires_at: Some(123_456),
                sessions: 31,
                verification: Verification::Unbound,
            },
            20,
        )
        .unwrap();
        let ls = s.record_verification_failure(&id, 30, &policy).unwrap();
        assert_eq!(
            ls,
            LockState {
                failures: 1,
                locked_until: Some(130)
            }
        );
        id
    };
    let want = PeerRecord {
        id,
        zid: Some(ZID_A),
        label: Some("thermostat".into()),
        mode: Mode::Normal { verify_every: 7 },
        cache: PeerCache {
            rs1: Some(rs(8)),
            rs2: Some(rs(9)),
            expires_at: Some(123_456),
            sessions: 31,
            verify_due: true,
            locked_until: Some(130),
        },
        verify_failures: 1,
        last_failure_at: Some(30),
        last_verification: Some((31, Verification::Unbound)),
        created_at: 10,
        updated_at: 30,
    };
    let s = Store::open_at(&path, 2).unwrap();
    assert_eq!(s.peer(&id).unwrap(), Some(want.clone()));
    assert_eq!(s.peer_by_zid(&ZID_A).unwrap(), Some(want.clone()));
    assert_eq!(s.peer_by_label("thermostat").unwrap(), Some(want.clone()));
    assert_eq!(s.list_peers().unwrap(), vec![want.clone()]);

    // set_verify_due / set_zid change exactly those fields.
    s.set_verify_due(&id, false).unwrap();
    s.set_zid(&id, Some(ZID_B)).unwrap();
    let mut want2 = want;
    want2.cache.verify_due = false;
    want2.zid = Some(ZID_B);
    drop(s);
    let s = Store::open_at(&path, 3).unwrap();
    assert_eq!(s.peer(&id).unwrap(), Some(want2.clone()));
    assert_eq!(s.peer_by_zid(&ZID_B).unwrap(), Some(want2.clone()));
    assert_eq!(s.peer_by_zid(&ZID_A).unwrap(), None);
    s.set_zid(&id, None).unwrap();
    assert_eq!(s.peer_by_zid(&ZID_B).unwrap(), None);
    assert_eq!(s.peer(&id).unwrap().unwrap().zid, None);

    // Other modes and absent fields round-trip too.
    for mode in [Mode::Paranoid, Mode::NoContinuity] {
        let p = s.create_peer(None, None, mode, 40).unwrap();
        let r = s.peer(&p).unwrap().unwrap();
        assert_eq!(
            r,
            PeerRecord {
                id: p,
                zid: None,
                label: None,
                mode,
                cache: PeerCache::default(),
                verify_failures: 0,
                last_failure_at: None,
                last_verification: None,
                created_at: 40,
                updated_at: 40,
            }
        );
    }
    assert_eq!(s.list_peers().unwrap().len(), 3);
}

#[test]
fn labels_and_zids_are_unique_and_labels_validated() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let a = s
        .create_peer(Some(ZID_A), Some("a"), Mode::NORMAL, 1)
        .unwrap();
    assert!(matches!(
        s.create_peer(None, Some("a"), Mode::NORMAL, 1),
        Err(Error::LabelTaken)
    ));
    assert!(matches!(
        s.create_peer(Some(ZID_A), Some("b"), Mode::NORMAL, 1),
        Err(Error::ZidTaken)
    ));
    assert!(matches!(
        s.create_peer(None, Some(""), Mode::NORMAL, 1),
        Err(Error::InvalidLabel)
    ));
    let long = "x".repeat(256);
    assert!(matches!(
        s.create_peer(None, Some(&long), Mode::NORMAL, 1),
        Err(Error::InvalidLabel)
    ));
    let b = s
        .create_peer(None, Some(&long[..255]), Mode::NORMAL, 1)
        .unwrap();
    assert!(matches!(s.set_zid(&b, Some(ZID_A)), Err(Error::ZidTaken)));
    // Failed operations changed nothing.
    assert_eq!(s.list_peers().unwrap().len(), 2);
    assert_eq!(s.peer_by_zid(&ZID_A).unwrap().unwrap().id, a);
    assert_eq!(s.peer(&b).unwrap().unwrap().zid, None);
    assert!(matches!(
        s.commit_session(&[9; 16], &update(1), 1),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        s.set_verify_due(&[9; 16], true),
        Err(Error::NotFound)
    ));
}

#[test]
fn no_continuity_keeps_no_secrets() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let id = s.create_peer(None, None, Mode::NoContinuity, 1).unwrap();
    s.commit_session(&id, &update(3), 2).unwrap();
    let r = s.peer(&id).unwrap().unwrap();
    assert!(r.cache.rs1.is_none() && r.cache.rs2.is_none() && r.cache.expires_at.is_none());
    assert_eq!(r.cache.sessions, 3);
    assert!(s.peer_by_initiator_rs_id(&ini(&rs(3))).unwrap().is_none());
}

// ------------------------------------------------------------------------------------------
// Lockout

#[test]
fn lockout_after_k_failures_resets_on_success_and_survives_reopen() {
    let (_d, path) = tmp();
    let p = LockoutPolicy {
        max_failures: 3,
        base_backoff_secs: 10,
        max_backoff_secs: 35,
    };
    let id = store_with_peer(&path, 1);
    {
        let s = Store::open_at(&path, 1).unwrap();
        let r1 = s.record_verification_failure(&id, 100, &p).unwrap();
        assert_eq!(
            r1,
            LockState {
                failures: 1,
                locked_until: None
            }
        );
        let r2 = s.record_verification_failure(&id, 101, &p).unwrap();
        assert_eq!(
            r2,
            LockState {
                failures: 2,
                locked_until: None
            }
        );
        let r3 = s.record_verification_failure(&id, 102, &p).unwrap();
        assert_eq!(
            r3,
            LockState {
                failures: 3,
                locked_until: Some(112)
            }
        );
        let r4 = s.record_verification_failure(&id, 103, &p).unwrap();
        assert_eq!(
            r4,
            LockState {
                failures: 4,
                locked_until: Some(123)
            }
        );
        let rec = s.peer(&id).unwrap().unwrap();
        assert_eq!(rec.cache.locked_until, Some(123));
        assert!(rec.cache.verify_due);
        // The secrets are untouched by failures.
        assert_eq!(rec.cache.rs1, Some(rs(1)));
    }
    // Durable across reopen.
    let s = Store::open_at(&path, 2).unwrap();
    assert_eq!(
        s.lock_state(&id, 110, &p).unwrap(),
        LockState {
            failures: 4,
            locked_until: Some(123)
        }
    );
    assert_eq!(
        s.lock_state(&id, 123, &p).unwrap(),
        LockState {
            failures: 4,
            locked_until: None
        }
    );
    // A session without the equality test does not reset the counter...
    s.commit_session(&id, &update(2), 200).unwrap();
    assert_eq!(s.lock_state(&id, 110, &p).unwrap().failures, 4);
    // ...one where it ran does.
    s.commit_session(&id, &update(11), 201).unwrap();
    assert_eq!(
        s.lock_state(&id, 110, &p).unwrap(),
        LockState {
            failures: 0,
            locked_until: None
        }
    );
    let rec = s.peer(&id).unwrap().unwrap();
    assert_eq!(rec.cache.locked_until, None);
    assert_eq!(rec.last_failure_at, None);
    assert!(!rec.cache.verify_due);
    drop(s);
    let s = Store::open_at(&path, 3).unwrap();
    assert_eq!(s.lock_state(&id, 110, &p).unwrap().failures, 0);
    assert!(matches!(
        s.lock_state(&[5; 16], 1, &p),
        Err(Error::NotFound)
    ));
}

#[test]
fn anonymous_bucket_is_created_on_demand_and_hidden() {
    let (_d, path) = tmp();
    let p = LockoutPolicy {
        max_failures: 2,
        base_backoff_secs: 60,
        max_backoff_secs: 600,
    };
    {
        let s = Store::open_at(&path, 1).unwrap();
        assert_eq!(
            s.lock_state(&ANONYMOUS_PEER, 5, &p).unwrap(),
            LockState {
                failures: 0,
                locked_until: None
            }
        );
        s.record_verification_failure(&ANONYMOUS_PEER, 10, &p)
            .unwrap();
        let l = s
            .record_verification_failure(&ANONYMOUS_PEER, 11, &p)
            .unwrap();
        assert_eq!(
            l,
            LockState {
                failures: 2,
                locked_until: Some(71)
            }
        );
        assert!(s.list_peers().unwrap().is_empty());
    }
    let s = Store::open_at(&path, 2).unwrap();
    assert_eq!(
        s.lock_state(&ANONYMOUS_PEER, 12, &p).unwrap(),
        LockState {
            failures: 2,
            locked_until: Some(71)
        }
    );
    let b = s.peer(&ANONYMOUS_PEER).unwrap().unwrap();
    assert!(b.cache.rs1.is_none() && b.zid.is_none());
}

// ------------------------------------------------------------------------------------------
// Index

#[test]
fn paranoid_lookup_by_initiator_rs_id_follows_rotation_and_forget() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let other = s
        .create_peer(None, Some("other"), Mode::Paranoid, 1)
        .unwrap();
    s.commit_session(
        &other,
        &CacheUpdate {
            rs1: rs(500),
            rs2: None,
            expires_at: None,
            sessions: 1,
            verification: Verification::Bound,
        },
        1,
    )
    .unwrap();
    let id = s
        .create_peer(None, Some("phone"), Mode::Paranoid, 1)
        .unwrap();
    assert!(s.peer_by_initiator_rs_id(&ini(&rs(1))).unwrap().is_none());
    s.commit_session(&id, &update(1), 2).unwrap();
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(1))).unwrap().unwrap().id,
        id
    );
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(0))).unwrap().unwrap().id,
        id
    );
    s.commit_session(&id, &update(2), 3).unwrap();
    assert!(s.peer_by_initiator_rs_id(&ini(&rs(0))).unwrap().is_none());
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(1))).unwrap().unwrap().id,
        id
    );
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(2))).unwrap().unwrap().id,
        id
    );
    // A responder-role ID is not an initiator ID.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(rs(2).expose()).unwrap();
    m.update(b"Responder");
    let resp: [u8; 8] = m.finalize().into_bytes()[..8].try_into().unwrap();
    assert!(s.peer_by_initiator_rs_id(&resp).unwrap().is_none());
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(500)))
            .unwrap()
            .unwrap()
            .id,
        other
    );

    assert!(s.forget(&id).unwrap());
    assert!(!s.forget(&id).unwrap());
    assert!(s.peer(&id).unwrap().is_none());
    assert!(s.peer_by_label("phone").unwrap().is_none());
    for k in 0..3 {
        assert!(s.peer_by_initiator_rs_id(&ini(&rs(k))).unwrap().is_none());
    }
    // The label is free again, the other peer is untouched.
    s.create_peer(None, Some("phone"), Mode::Paranoid, 4)
        .unwrap();
    assert_eq!(
        s.peer_by_initiator_rs_id(&ini(&rs(500)))
            .unwrap()
            .unwrap()
            .id,
        other
    );
    // Nothing is left behind in the index tables.
    let rtx = s.db.begin_read().unwrap();
    assert_eq!(rtx.open_table(RSID_IDX).unwrap().len().unwrap(), 1);
    assert_eq!(rtx.open_table(LABEL_IDX).unwrap().len().unwrap(), 2);
}

// ------------------------------------------------------------------------------------------
// Corruption

fn is_corruption(e: &Error) -> bool {
    matches!(e, Error::Corrupt(_) | Error::CorruptRecord { .. })
}

#[test]
fn damaged_record_value_is_reported_and_can_be_quarantined() {
    let (_d, path) = tmp();
    let id = store_with_peer(&path, 3);
    let s = Store::open_at(&path, 1).unwrap();
    let keep = s
        .create_peer(Some(ZID_B), Some("keep"), Mode::NORMAL, 1)
        .unwrap();
    // Flip one bit of the stored value, as a bad sector or a stray write would.
    {
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(PEERS).unwrap();
            let mut v = t.get(id.as_slice()).unwrap().unwrap().value().to_vec();
            v[60] ^= 0x04;
            t.insert(id.as_slice(), v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let e = s.peer(&id).unwrap_err();
    assert!(
        matches!(e, Error::CorruptRecord { peer } if peer == id),
        "{e:?}"
    );
    assert!(e.to_string().contains(&hexs(&id)));
    assert!(matches!(
        s.peer_by_zid(&ZID_A),
        Err(Error::CorruptRecord { .. })
    ));
    assert!(matches!(
        s.peer_by_label("thermostat"),
        Err(Error::CorruptRecord { .. })
    ));
    assert!(matches!(
        s.peer_by_initiator_rs_id(&ini(&rs(3))),
        Err(Error::CorruptRecord { .. })
    ));
    assert!(matches!(s.list_peers(), Err(Error::CorruptRecord { .. })));
    assert!(matches!(
        s.commit_session(&id, &update(4), 9),
        Err(Error::CorruptRecord { .. })
    ));
    s.quarantine_corrupt(&id).unwrap();
    assert!(matches!(s.quarantine_corrupt(&id), Err(Error::NotFound)));
    assert!(s.peer(&id).unwrap().is_none());
    assert!(s.peer_by_zid(&ZID_A).unwrap().is_none());
    assert!(s.peer_by_label("thermostat").unwrap().is_none());
    assert!(s.peer_by_initiator_rs_id(&ini(&rs(3))).unwrap().is_none());
    assert_eq!(s.list_peers().unwrap().len(), 1);
    assert_eq!(
        s.peer(&keep).unwrap().unwrap().label.as_deref(),
        Some("keep")
    );
}

#[test]
fn random_garbage_file_is_corrupt() {
    let (_d, path) = tmp();
    for len in [1usize, 100, 4096, 70_000] {
        let mut junk = vec![0u8; len];
        OsRng.fill_bytes(&mut junk);
        std::fs::write(&path, &junk).unwrap();
        match Store::open_at(&path, 1) {
            Err(Error::Corrupt(msg)) => assert!(!msg.is_empty()),
            other => panic!("len {len}: {other:?}"),
        }
        let msg = Store::open_at(&path, 1).unwrap_err().to_string();
        assert!(msg.contains("move the file aside"), "{msg}");
    }
}

#[test]
fn foreign_redb_file_and_other_schema_version_are_corrupt() {
    let (_d, path) = tmp();
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: TableDefinition<u64, u64> = TableDefinition::new("something_else");
            txn.open_table(def).unwrap().insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
    }
    assert!(matches!(Store::open_at(&path, 1), Err(Error::Corrupt(_))));

    std::fs::remove_file(&path).unwrap();
    store_with_peer(&path, 1);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&2u32.to_le_bytes());
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, v.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    match Store::open_at(&path, 1) {
        Err(Error::Corrupt(m)) => assert!(m.contains("version 2"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_file_is_an_error() {
    let (_d, path) = tmp();
    store_with_peer(&path, 5);
    let full = std::fs::read(&path).unwrap();
    for keep in [full.len() / 2, full.len() / 8, 600, 10] {
        std::fs::write(&path, &full[..keep]).unwrap();
        match Store::open_at(&path, 1) {
            Err(e) => assert!(is_corruption(&e) || matches!(e, Error::Io(_)), "{e:?}"),
            Ok(s) => panic!("truncated to {keep} opened: {:?}", s.list_peers()),
        }
    }
}

/// Overwrites bytes at many offsets of a valid store; every outcome must be an error or the
/// exact original data, never a panic or a silently different record.
#[test]
fn overwritten_bytes_are_detected_or_harmless() {
    const SPOTS: usize = 250;
    let (dir, pristine) = tmp();
    let id = store_with_peer(&pristine, 4);
    let (want_identity, want) = {
        let s = Store::open_at(&pristine, 1).unwrap();
        (s.identity().unwrap(), s.peer(&id).unwrap().unwrap())
    };
    let bytes = std::fs::read(&pristine).unwrap();
    // Offsets of the live secrets in the file must be among the damaged spots.
    let mut offsets: Vec<usize> = (0..SPOTS).map(|i| i * bytes.len() / SPOTS).collect();
    let needle = rs(4);
    let secret_at: Vec<usize> = bytes
        .windows(32)
        .enumerate()
        .filter(|(_, w)| *w == needle.expose())
        .map(|(i, _)| i)
        .collect();
    assert!(!secret_at.is_empty(), "rs1 not found in file");
    offsets.extend(secret_at.iter().map(|o| o + 5));

    let victim = dir.path().join("victim.redb");
    let (mut errors, mut intact) = (0usize, 0usize);
    let mut secret_hits_detected = 0usize;
    for (n, &off) in offsets.iter().enumerate() {
        let mut b = bytes.clone();
        for x in b.iter_mut().skip(off).take(8) {
            *x ^= 0x5a;
        }
        std::fs::write(&victim, &b).unwrap();
        let outcome: Result<(), Error> = (|| {
            let s = Store::open_at(&victim, 1)?;
            let ident = s.identity()?;
            assert_eq!(ident, want_identity, "offset {off}: wrong identity");
            let got = s.peer(&id)?;
            assert_eq!(got.as_ref(), Some(&want), "offset {off}: wrong record");
            let listed = s.list_peers()?;
            assert_eq!(listed, vec![want.clone()], "offset {off}: wrong list");
            let by_rs = s.peer_by_initiator_rs_id(&ini(&rs(4)))?;
            assert_eq!(by_rs.as_ref(), Some(&want), "offset {off}: wrong rs lookup");
            Ok(())
        })();
        match outcome {
            Ok(()) => intact += 1,
            Err(e) => {
                assert!(
                    is_corruption(&e) || matches!(e, Error::Io(_) | Error::Db(_)),
                    "offset {off}: {e:?}"
                );
                errors += 1;
                if n >= SPOTS {
                    secret_hits_detected += 1;
                }
            }
        }
    }
    eprintln!(
        "overwrite sweep: {errors} detected, {intact} harmless, file {} bytes",
        bytes.len()
    );
    assert_eq!(
        secret_hits_detected,
        secret_at.len(),
        "damaged secret not detected"
    );
    assert!(errors > 0 && intact > 0, "errors {errors}, intact {intact}");
}

// ------------------------------------------------------------------------------------------
// Crash safety (subprocesses)

const CHILD_ENV: &str = "KEAV_STORE_TEST_CHILD";
const PATH_ENV: &str = "KEAV_STORE_TEST_PATH";
const PEER_ENV: &str = "KEAV_STORE_TEST_PEER";

/// Body of the child process. Does nothing unless started by a crash test.
#[test]
#[ignore = "child process of the crash tests"]
fn crash_child() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(std::env::var(PATH_ENV).unwrap());
    let id = unhex16(&std::env::var(PEER_ENV).unwrap());
    let s = Store::open_at(&path, 1).unwrap();
    if let Some(k) = what.strip_prefix("commit:") {
        let k: u64 = k.parse().unwrap();
        s.commit_session(&id, &update(k), t(k)).unwrap();
        if std::env::var("KEAV_STORE_TEST_ABORT_AFTER").is_ok() {
            std::process::abort();
        }
    } else if let Some(start) = what.strip_prefix("loop:") {
        let start: u64 = start.parse().unwrap();
        for k in start + 1..=start + 200 {
            s.commit_session(&id, &update(k), t(k)).unwrap();
            println!("COMMITTED {k}");
        }
    }
}

fn child(path: &Path, id: &PeerId, what: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "tests::crash_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, what)
        .env(PATH_ENV, path)
        .env(PEER_ENV, hexs(id))
        .env_remove("KEAV_STORE_FAILPOINT")
        .env_remove("KEAV_STORE_TEST_ABORT_AFTER")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

#[cfg(unix)]
fn assert_aborted(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "child did not abort: {status:?}");
}

#[cfg(unix)]
#[test]
fn crash_inside_commit_keeps_the_old_state() {
    for fp in ["commit_session:before_commit", "commit_session:after_write"] {
        let (_d, path) = tmp();
        let id = store_with_peer(&path, 3);
        let status = child(&path, &id, "commit:4")
            .env("KEAV_STORE_FAILPOINT", fp)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_aborted(status);
        let s = Store::open_at(&path, 1).unwrap();
        assert_state(&s, id, 3);
        // The next session succeeds from the old state.
        s.commit_session(&id, &update(4), t(4)).unwrap();
        assert_state(&s, id, 4);
    }
}

#[cfg(unix)]
#[test]
fn kill_right_after_commit_keeps_the_new_state() {
    let (_d, path) = tmp();
    let id = store_with_peer(&path, 3);
    let status = child(&path, &id, "commit:4")
        .env("KEAV_STORE_TEST_ABORT_AFTER", "1")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_aborted(status);
    let s = Store::open_at(&path, 1).unwrap();
    assert_state(&s, id, 4);
}

#[cfg(unix)]
#[test]
fn sigkill_during_rotation_loop_leaves_a_consistent_state() {
    use std::io::BufRead;
    let (_d, path) = tmp();
    let id = store_with_peer(&path, 0);
    let mut k = 0u64;
    let mut mid_loop_kills = 0;
    for round in 0..6 {
        let mut r = [0u8; 1];
        OsRng.fill_bytes(&mut r);
        let kill_after = 1 + u64::from(r[0]) % 150;
        let mut c = child(&path, &id, &format!("loop:{k}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(c.stdout.take().unwrap());
        let mut last_seen = k;
        let mut seen = 0;
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("COMMITTED ") {
                last_seen = n.trim().parse().unwrap();
                seen += 1;
                if seen == kill_after {
                    c.kill().unwrap();
                    break;
                }
            }
        }
        let status = c.wait().unwrap();
        if !status.success() {
            mid_loop_kills += 1;
        }
        let s = Store::open_at(&path, 1).unwrap();
        let now_k = s.peer(&id).unwrap().unwrap().cache.sessions;
        assert!(
            now_k >= last_seen && now_k <= k + 200,
            "round {round}: state {now_k}, last reported {last_seen}"
        );
        assert_state(&s, id, now_k);
        k = now_k;
    }
    assert!(mid_loop_kills > 0);
    assert!(k >= 6);
}
