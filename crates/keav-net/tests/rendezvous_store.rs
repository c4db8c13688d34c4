//! Conformance of both rendezvous stores to the `RendezvousStore` contract (ownership rule,
//! expiry, removal, purge, record limit, atomicity).

use keav_net::rendezvous::{
    Claim, DeviceId, Entry, MemoryRendezvousStore, PutOutcome, RedbRendezvousStore, RemoveOutcome,
    RendezvousStore, Token,
};
use std::net::SocketAddr;
use std::sync::Arc;

const T0: u64 = 1_700_000_000;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn claim(a: &str, expires_at: u64, presented: Option<Token>) -> Claim {
    Claim {
        addr: addr(a),
        expires_at,
        presented,
        fresh: Token::random().unwrap(),
    }
}

fn stored(o: PutOutcome) -> Entry {
    match o {
        PutOutcome::Stored(e) => e,
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn ownership_and_expiry(s: &dyn RendezvousStore) {
    let dev = id("dev-a");
    let c = claim("10.0.0.1:4000", T0 + 100, None);
    let fresh = c.fresh;
    let e = stored(s.put(&dev, &c, T0).unwrap());
    assert_eq!(e.token, fresh, "a new registration takes the fresh token");
    assert_eq!(e.addr, addr("10.0.0.1:4000"));
    assert_eq!(e.expires_at, T0 + 100);
    assert_eq!(s.get(&dev, T0).unwrap(), Some(e.clone()));
    assert_eq!(s.get(&id("other"), T0).unwrap(), None);

    // Live: no token, or a wrong one, is denied and changes nothing.
    assert_eq!(
        s.put(&dev, &claim("10.6.6.6:1", T0 + 500, None), T0 + 1)
            .unwrap(),
        PutOutcome::Denied
    );
    let wrong = Token::random().unwrap();
    assert_eq!(
        s.put(&dev, &claim("10.6.6.6:1", T0 + 500, Some(wrong)), T0 + 1)
            .unwrap(),
        PutOutcome::Denied
    );
    assert_eq!(s.get(&dev, T0 + 1).unwrap(), Some(e.clone()));

    // The right token moves and renews it, keeping the token.
    let moved = stored(
        s.put(
            &dev,
            &claim("[2001:db8::1]:4001", T0 + 200, Some(e.token)),
            T0 + 2,
        )
        .unwrap(),
    );
    assert_eq!(moved.token, e.token);
    assert_eq!(moved.addr, addr("[2001:db8::1]:4001"));
    assert_eq!(moved.expires_at, T0 + 200);
    assert_eq!(s.get(&dev, T0 + 199).unwrap(), Some(moved.clone()));

    // Expired exactly at expires_at: not returned, and free for anyone, with a fresh token
    // (even when the old token is presented).
    assert_eq!(s.get(&dev, T0 + 200).unwrap(), None);
    let c2 = claim("10.0.0.2:4000", T0 + 300, Some(e.token));
    let fresh2 = c2.fresh;
    let e2 = stored(s.put(&dev, &c2, T0 + 200).unwrap());
    assert_eq!(e2.token, fresh2);
    assert_ne!(e2.token, e.token);
}

fn removal(s: &dyn RendezvousStore) {
    let dev = id("dev-r");
    let e = stored(
        s.put(&dev, &claim("10.0.0.3:1", T0 + 10, None), T0)
            .unwrap(),
    );
    assert_eq!(
        s.remove(&dev, &Token::random().unwrap(), T0).unwrap(),
        RemoveOutcome::Denied
    );
    assert!(s.get(&dev, T0).unwrap().is_some());
    assert_eq!(
        s.remove(&dev, &e.token, T0).unwrap(),
        RemoveOutcome::Removed
    );
    assert_eq!(s.get(&dev, T0).unwrap(), None);
    assert_eq!(
        s.remove(&dev, &e.token, T0).unwrap(),
        RemoveOutcome::NotFound
    );
    // Removing an expired registration reports NotFound, even with its token.
    let e = stored(
        s.put(&dev, &claim("10.0.0.3:1", T0 + 10, None), T0)
            .unwrap(),
    );
    assert_eq!(
        s.remove(&dev, &e.token, T0 + 10).unwrap(),
        RemoveOutcome::NotFound
    );
}

fn purge(s: &dyn RendezvousStore) {
    for (name, exp) in [("p1", T0 + 5), ("p2", T0 + 6), ("p3", T0 + 50)] {
        stored(
            s.put(&id(name), &claim("10.0.0.4:1", exp, None), T0)
                .unwrap(),
        );
    }
    assert_eq!(s.purge_expired(T0 + 6).unwrap(), 2);
    assert_eq!(s.purge_expired(T0 + 6).unwrap(), 0);
    assert!(s.get(&id("p3"), T0 + 6).unwrap().is_some());
    assert_eq!(s.purge_expired(T0 + 50).unwrap(), 1);
}

fn record_limit(s: &dyn RendezvousStore) {
    // The store was built with a limit of 2 records.
    let a = stored(
        s.put(&id("l1"), &claim("10.0.0.5:1", T0 + 10, None), T0)
            .unwrap(),
    );
    stored(
        s.put(&id("l2"), &claim("10.0.0.5:2", T0 + 100, None), T0)
            .unwrap(),
    );
    assert_eq!(
        s.put(&id("l3"), &claim("10.0.0.5:3", T0 + 100, None), T0)
            .unwrap(),
        PutOutcome::Full
    );
    assert_eq!(s.get(&id("l3"), T0).unwrap(), None);
    // Renewing an existing record is not blocked by the limit.
    stored(
        s.put(&id("l1"), &claim("10.0.0.5:9", T0 + 20, Some(a.token)), T0)
            .unwrap(),
    );
    // Once l1 has expired its slot is reclaimed.
    stored(
        s.put(&id("l3"), &claim("10.0.0.5:3", T0 + 100, None), T0 + 20)
            .unwrap(),
    );
    assert_eq!(s.get(&id("l1"), T0 + 20).unwrap(), None);
}

fn racing_registrants(s: Arc<dyn RendezvousStore>) {
    let dev = id("contested");
    let winners: usize = (0..8)
        .map(|i| {
            let s = s.clone();
            let dev = dev.clone();
            std::thread::spawn(move || {
                let c = claim(&format!("10.1.0.{i}:1"), T0 + 100, None);
                matches!(s.put(&dev, &c, T0).unwrap(), PutOutcome::Stored(_))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(winners, 1, "exactly one racing registrant may win");
}

#[test]
fn memory_store_contract() {
    let s = MemoryRendezvousStore::new();
    ownership_and_expiry(&s);
    removal(&s);
    purge(&MemoryRendezvousStore::new());
    record_limit(&MemoryRendezvousStore::with_max_entries(2));
    racing_registrants(Arc::new(MemoryRendezvousStore::new()));
}

#[test]
fn redb_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbRendezvousStore::open(dir.path().join("a.redb")).unwrap();
    ownership_and_expiry(&s);
    removal(&s);
    purge(&RedbRendezvousStore::open(dir.path().join("b.redb")).unwrap());
    record_limit(
        &RedbRendezvousStore::open_with_max_entries(dir.path().join("c.redb"), 2).unwrap(),
    );
    racing_registrants(Arc::new(
        RedbRendezvousStore::open(dir.path().join("d.redb")).unwrap(),
    ));
}

#[test]
fn redb_store_reopens_with_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let e = {
        let s = RedbRendezvousStore::open(&path).unwrap();
        stored(
            s.put(&id("kept"), &claim("[fd00::9]:5555", T0 + 60, None), T0)
                .unwrap(),
        )
    };
    let s = RedbRendezvousStore::open(&path).unwrap();
    assert_eq!(s.get(&id("kept"), T0 + 1).unwrap(), Some(e.clone()));
    assert_eq!(
        s.put(&id("kept"), &claim("10.9.9.9:1", T0 + 90, None), T0 + 1)
            .unwrap(),
        PutOutcome::Denied
    );
    assert_eq!(
        s.remove(&id("kept"), &e.token, T0 + 1).unwrap(),
        RemoveOutcome::Removed
    );
}

#[test]
fn redb_open_rejects_a_non_redb_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    assert!(RedbRendezvousStore::open(&path).is_err());
}
