//! The relay mailbox: round trips, arrival order, dedupe, bounds (refuse, never drop),
//! positions across restarts, removal, a 100,000-entry backlog, damaged values (typed error,
//! repair by quarantine) and crashes in the middle of a batch (all or nothing).

use std::path::{Path, PathBuf};

use keav_proto::route::EntryKey;
use keav_store::mailbox::{Entry, Mailbox, MailboxLimits, PutOutcome, QueueStats};
use keav_store::{Error, Store};
use redb::TableDefinition;

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailbox.redb");
    (dir, path)
}

fn open(path: &Path) -> Mailbox {
    Mailbox::open(path, MailboxLimits::default()).unwrap()
}

fn key(src: &str, dst: &str, stream: u8, seq: u64) -> EntryKey {
    EntryKey {
        src: src.into(),
        dst: dst.into(),
        stream,
        seq,
    }
}

/// A frame that names its entry.
fn frame(k: &EntryKey) -> Vec<u8> {
    format!("frame:{}:{}:{}:{}", k.src, k.dst, k.stream, k.seq).into_bytes()
}

fn items(src: &str, dst: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(EntryKey, Vec<u8>)> {
    seqs.into_iter()
        .map(|s| {
            let k = key(src, dst, 0, s);
            let f = frame(&k);
            (k, f)
        })
        .collect()
}

fn stored(n: impl IntoIterator<Item = u64>) -> Vec<PutOutcome> {
    n.into_iter().map(PutOutcome::Stored).collect()
}

/// All entries of `queue`, each checked against its frame.
fn all(m: &Mailbox, queue: &str) -> Vec<Entry> {
    let v = m.peek(queue, None, usize::MAX).unwrap();
    for e in &v {
        assert_eq!(e.frame, frame(&e.key), "entry {}", e.pos);
    }
    v
}

fn seqs(m: &Mailbox, queue: &str) -> Vec<u64> {
    all(m, queue).iter().map(|e| e.key.seq).collect()
}

fn bytes_of(it: &[(EntryKey, Vec<u8>)]) -> u64 {
    it.iter().map(|(_, f)| f.len() as u64).sum()
}

fn is_corrupt<T: std::fmt::Debug>(r: Result<T, Error>, queue: &str, pos: Option<u64>) {
    match r {
        Err(Error::CorruptMailbox { queue: q, pos: p }) => {
            assert_eq!((q.as_str(), p), (queue, pos));
        }
        other => panic!("expected CorruptMailbox({queue}, {pos:?}), got {other:?}"),
    }
}

#[test]
fn entries_round_trip_in_arrival_order_across_a_reopen() {
    let (_d, path) = tmp();
    let m = open(&path);
    assert!(m.queues().unwrap().is_empty());
    assert_eq!(m.queue_stats("phone").unwrap(), QueueStats::default());
    assert!(m.peek("phone", None, 10).unwrap().is_empty());

    // Arrival order, not key order.
    let batch = items("hrm", "phone", [9, 3, u64::MAX, 0, 5]);
    assert_eq!(m.put_batch("phone", &batch).unwrap(), stored(0..5));
    let mut more = items("scale", "phone", [1, 2]);
    more.push((key("hrm", "phone", 7, 1), b"".to_vec()));
    assert_eq!(m.put_batch("phone", &more).unwrap(), stored(5..8));
    let to_relay = items("hrm", "phone", [100]);
    assert_eq!(m.put_batch("relay-2", &to_relay).unwrap(), stored([0]));
    assert_eq!(m.put_batch("phone", &[]).unwrap(), vec![]);
    drop(m);

    let m = open(&path);
    let got = m.peek("phone", None, 100).unwrap();
    let want: Vec<Entry> = batch
        .iter()
        .chain(more.iter())
        .enumerate()
        .map(|(i, (k, f))| Entry {
            pos: i as u64,
            key: k.clone(),
            frame: f.clone(),
        })
        .collect();
    assert_eq!(got, want);
    // Windows.
    assert_eq!(m.peek("phone", None, 2).unwrap(), want[..2].to_vec());
    assert_eq!(m.peek("phone", Some(4), 2).unwrap(), want[5..7].to_vec());
    assert_eq!(m.peek("phone", Some(6), 10).unwrap(), want[7..].to_vec());
    assert!(m.peek("phone", Some(7), 10).unwrap().is_empty());
    assert!(m.peek("phone", Some(u64::MAX), 10).unwrap().is_empty());
    assert!(m.peek("phone", None, 0).unwrap().is_empty());
    assert_eq!(seqs(&m, "relay-2"), vec![100]);

    let phone = QueueStats {
        entries: 8,
        bytes: bytes_of(&batch) + bytes_of(&more),
    };
    assert_eq!(m.queue_stats("phone").unwrap(), phone);
    assert_eq!(
        m.queues().unwrap(),
        vec![
            ("phone".to_string(), phone),
            (
                "relay-2".to_string(),
                QueueStats {
                    entries: 1,
                    bytes: bytes_of(&to_relay)
                }
            ),
        ]
    );
}

#[test]
fn duplicates_are_refused_per_queue() {
    let (_d, path) = tmp();
    let m = open(&path);
    let k = key("a", "b", 0, 1);
    // Twice in one batch.
    let out = m
        .put_batch(
            "b",
            &[(k.clone(), b"one".to_vec()), (k.clone(), b"two".to_vec())],
        )
        .unwrap();
    assert_eq!(out, vec![PutOutcome::Stored(0), PutOutcome::Duplicate]);
    // Again later, even with another frame; the first frame stays.
    assert_eq!(
        m.put_batch("b", &[(k.clone(), b"three".to_vec())]).unwrap(),
        vec![PutOutcome::Duplicate]
    );
    assert_eq!(m.peek("b", None, 10).unwrap()[0].frame, b"one".to_vec());
    // Keys differing in any one field are different entries.
    let others = [
        key("a", "b", 1, 1),
        key("a", "b", 0, 2),
        key("a", "c", 0, 1),
        key("ab", "b", 0, 1),
        key("a", "bb", 0, 1),
    ];
    let batch: Vec<_> = others.iter().map(|k| (k.clone(), frame(k))).collect();
    assert_eq!(m.put_batch("b", &batch).unwrap(), stored(1..6));
    // The same key in another queue is another entry.
    assert_eq!(
        m.put_batch("relay", &[(k.clone(), b"one".to_vec())])
            .unwrap(),
        stored([0])
    );
    drop(m);
    // Dedupe survives a restart.
    let m = open(&path);
    assert_eq!(
        m.put_batch("b", &[(k.clone(), b"x".to_vec())]).unwrap(),
        vec![PutOutcome::Duplicate]
    );
    assert_eq!(m.queue_stats("b").unwrap().entries, 6);
    // Once removed (custody passed on), the key can be stored again, at a new position.
    assert_eq!(m.remove("b", std::slice::from_ref(&k)).unwrap(), 1);
    assert_eq!(
        m.put_batch("b", &[(k.clone(), b"again".to_vec())]).unwrap(),
        stored([6])
    );
}

#[test]
fn a_full_queue_refuses_and_never_drops() {
    let (_d, path) = tmp();
    let limits = MailboxLimits {
        max_entries: 5,
        max_bytes: 1000,
    };
    let m = Mailbox::open(&path, limits).unwrap();
    assert_eq!(m.limits(), limits);
    let batch = items("s", "d", 0..7);
    let out = m.put_batch("d", &batch).unwrap();
    assert_eq!(out[..5], stored(0..5)[..]);
    assert_eq!(out[5..], [PutOutcome::Full, PutOutcome::Full]);
    assert_eq!(seqs(&m, "d"), (0..5).collect::<Vec<_>>());
    // Still full; a duplicate is still a duplicate.
    let out = m.put_batch("d", &items("s", "d", [0, 7])).unwrap();
    assert_eq!(out, vec![PutOutcome::Duplicate, PutOutcome::Full]);
    // Other queues have their own bound.
    assert_eq!(
        m.put_batch("e", &items("s", "e", [0])).unwrap(),
        stored([0])
    );
    // Room after a removal.
    assert_eq!(m.remove("d", &[key("s", "d", 0, 1)]).unwrap(), 1);
    let out = m.put_batch("d", &items("s", "d", [7, 8])).unwrap();
    assert_eq!(out, vec![PutOutcome::Stored(5), PutOutcome::Full]);
    assert_eq!(seqs(&m, "d"), vec![0, 2, 3, 4, 7]);
    drop(m);

    // Bytes: 40 + 40 fit in 100, a third 40 does not, 20 more fit exactly.
    let (_d2, path2) = tmp();
    let limits = MailboxLimits {
        max_entries: 100,
        max_bytes: 100,
    };
    let m = Mailbox::open(&path2, limits).unwrap();
    let f = |seq, n| (key("s", "d", 0, seq), vec![seq as u8; n]);
    let out = m
        .put_batch("d", &[f(0, 40), f(1, 40), f(2, 40), f(3, 20), f(4, 1)])
        .unwrap();
    use PutOutcome::{Full, Stored};
    assert_eq!(out, vec![Stored(0), Stored(1), Full, Stored(2), Full]);
    assert_eq!(
        m.queue_stats("d").unwrap(),
        QueueStats {
            entries: 3,
            bytes: 100
        }
    );
    let held: Vec<u64> = m
        .peek("d", None, 10)
        .unwrap()
        .iter()
        .map(|e| e.key.seq)
        .collect();
    assert_eq!(held, vec![0, 1, 3]);
    // A frame larger than the whole bound never fits.
    assert_eq!(m.put_batch("x", &[f(9, 101)]).unwrap(), vec![Full]);
    drop(m);

    // Lower limits after a restart: everything stays, new entries are refused.
    let m = Mailbox::open(
        &path2,
        MailboxLimits {
            max_entries: 1,
            max_bytes: 10,
        },
    )
    .unwrap();
    assert_eq!(m.queue_stats("d").unwrap().entries, 3);
    assert_eq!(m.peek("d", None, 10).unwrap().len(), 3);
    assert_eq!(m.put_batch("d", &[f(5, 1)]).unwrap(), vec![Full]);
}

#[test]
fn positions_are_never_reused_across_removals_and_restarts() {
    let (_d, path) = tmp();
    let m = open(&path);
    let batch = items("s", "q", 0..3);
    assert_eq!(m.put_batch("q", &batch).unwrap(), stored(0..3));
    let keys: Vec<EntryKey> = batch.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(m.remove("q", &keys).unwrap(), 3);
    assert!(m.queues().unwrap().is_empty());
    assert_eq!(m.queue_stats("q").unwrap(), QueueStats::default());
    drop(m);
    let m = open(&path);
    assert_eq!(
        m.put_batch("q", &items("s", "q", [9])).unwrap(),
        stored([3])
    );
    drop(m);
    let m = open(&path);
    assert_eq!(
        m.put_batch("q", &items("s", "q", [10, 11])).unwrap(),
        stored([4, 5])
    );
    let pos: Vec<u64> = all(&m, "q").iter().map(|e| e.pos).collect();
    assert_eq!(pos, vec![3, 4, 5]);
}

#[test]
fn remove_by_key_counts_what_was_there() {
    let (_d, path) = tmp();
    let m = open(&path);
    let batch = items("s", "q", 0..10);
    m.put_batch("q", &batch).unwrap();
    m.put_batch("r", &items("s", "q", 0..10)).unwrap();
    let k = |seq| key("s", "q", 0, seq);
    let bad = EntryKey {
        src: "not valid".into(),
        ..k(1)
    };
    // Unknown, repeated and invalid keys are ignored.
    let n = m
        .remove("q", &[k(2), k(2), k(5), k(42), key("s", "q", 1, 3), bad])
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(seqs(&m, "q"), vec![0, 1, 3, 4, 6, 7, 8, 9]);
    let left: Vec<_> = batch
        .iter()
        .filter(|(k, _)| ![2, 5].contains(&k.seq))
        .cloned()
        .collect();
    assert_eq!(
        m.queue_stats("q").unwrap(),
        QueueStats {
            entries: 8,
            bytes: bytes_of(&left)
        }
    );
    assert_eq!(m.remove("q", &[]).unwrap(), 0);
    assert_eq!(m.remove("nobody", &[k(1)]).unwrap(), 0);
    // The other queue is untouched.
    assert_eq!(seqs(&m, "r"), (0..10).collect::<Vec<_>>());
    drop(m);
    let m = open(&path);
    assert_eq!(seqs(&m, "q"), vec![0, 1, 3, 4, 6, 7, 8, 9]);
    assert_eq!(m.queue_stats("q").unwrap().entries, 8);
}

#[test]
fn invalid_names_are_refused_and_nothing_is_stored() {
    let (_d, path) = tmp();
    let m = open(&path);
    let long = "q".repeat(65);
    for q in ["", long.as_str(), "a b", "a\0b", "ü"] {
        assert!(matches!(
            m.put_batch(q, &items("s", "d", [0])),
            Err(Error::InvalidName)
        ));
        assert!(matches!(m.peek(q, None, 1), Err(Error::InvalidName)));
        assert!(matches!(m.remove(q, &[]), Err(Error::InvalidName)));
        assert!(matches!(m.queue_stats(q), Err(Error::InvalidName)));
    }
    for (src, dst) in [("", "d"), ("s", ""), (long.as_str(), "d"), ("s", "d/e")] {
        let mut batch = items("s", "d", [0]);
        batch.push((key(src, dst, 0, 1), vec![1]));
        assert!(matches!(m.put_batch("d", &batch), Err(Error::InvalidName)));
    }
    assert!(m.queues().unwrap().is_empty());
    assert!(m.peek("d", None, 10).unwrap().is_empty());
}

#[test]
fn a_backlog_of_a_hundred_thousand_entries() {
    const BATCH: u64 = 1000;
    const BATCHES: u64 = 100;
    let (_d, path) = tmp();
    let m = open(&path);
    let mut bytes = 0;
    for b in 0..BATCHES {
        // Entries of two senders interleaved.
        let batch: Vec<_> = (b * BATCH..(b + 1) * BATCH)
            .map(|i| {
                let k = key(if i % 2 == 0 { "hrm" } else { "scale" }, "phone", 0, i);
                let f = frame(&k);
                (k, f)
            })
            .collect();
        bytes += bytes_of(&batch);
        assert_eq!(
            m.put_batch("phone", &batch).unwrap(),
            stored(b * BATCH..(b + 1) * BATCH)
        );
    }
    let total = BATCH * BATCHES;
    let stats = QueueStats {
        entries: total,
        bytes,
    };
    assert_eq!(m.queue_stats("phone").unwrap(), stats);
    assert_eq!(m.queues().unwrap(), vec![("phone".to_string(), stats)]);
    drop(m);

    // Drain the way a relay does: peek a window after the last position, pass custody on,
    // remove by key.
    let m = open(&path);
    let mut after = None;
    let mut next = 0;
    loop {
        let window = m.peek("phone", after, BATCH as usize).unwrap();
        if window.is_empty() {
            break;
        }
        for e in &window {
            assert_eq!(e.pos, next);
            assert_eq!(e.key.seq, next);
            assert_eq!(e.frame, frame(&e.key));
            next += 1;
        }
        after = window.last().map(|e| e.pos);
        let keys: Vec<EntryKey> = window.into_iter().map(|e| e.key).collect();
        assert_eq!(m.remove("phone", &keys).unwrap(), keys.len());
    }
    assert_eq!(next, total);
    assert_eq!(m.queue_stats("phone").unwrap(), QueueStats::default());
    assert!(m.queues().unwrap().is_empty());
    assert!(m.peek("phone", None, 10).unwrap().is_empty());
    assert_eq!(
        m.put_batch("phone", &items("hrm", "phone", [0])).unwrap(),
        stored([total])
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged files and values

type Raw = TableDefinition<'static, &'static [u8], &'static [u8]>;
const QUEUES: Raw = TableDefinition::new("keav_mailbox_queues");
const ENTRIES: Raw = TableDefinition::new("keav_mailbox_entries");
const KEYS: Raw = TableDefinition::new("keav_mailbox_keys");

fn slot(queue: &str, pos: u64) -> Vec<u8> {
    let mut k = queue.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

/// Edits the closed mailbox file with redb directly: page checksums stay valid, only the
/// value checksums can catch the change.
fn raw_put(path: &Path, t: Raw, k: &[u8], v: &[u8]) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(t).unwrap().insert(k, v).unwrap();
    txn.commit().unwrap();
}

fn raw_get(path: &Path, t: Raw, k: &[u8]) -> Vec<u8> {
    let db = redb::Database::open(path).unwrap();
    let rtx = db.begin_read().unwrap();
    let v = rtx
        .open_table(t)
        .unwrap()
        .get(k)
        .unwrap()
        .unwrap()
        .value()
        .to_vec();
    v
}

/// All (key, value) pairs of a table.
fn raw_all(path: &Path, t: Raw) -> Vec<(Vec<u8>, Vec<u8>)> {
    use redb::ReadableTable;
    let db = redb::Database::open(path).unwrap();
    let rtx = db.begin_read().unwrap();
    let t = rtx.open_table(t).unwrap();
    let v = t
        .iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.value().to_vec(), v.value().to_vec())
        })
        .collect();
    v
}

fn seeded(path: &Path) {
    let m = open(path);
    m.put_batch("phone", &items("hrm", "phone", 0..6)).unwrap();
    m.put_batch("other", &items("hrm", "other", 0..3)).unwrap();
}

#[test]
fn a_damaged_entry_is_a_typed_error_and_can_be_quarantined() {
    let (_d, path) = tmp();
    seeded(&path);
    let good = raw_get(&path, ENTRIES, &slot("phone", 2));
    let mut variants = Vec::new();
    for bit in (0..good.len() * 8).step_by(13) {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        variants.push(b);
    }
    for n in [0, 1, 5, good.len() - 1] {
        variants.push(good[..n].to_vec());
    }
    // A valid value of another position, and of another queue.
    variants.push(raw_get(&path, ENTRIES, &slot("phone", 3)));
    variants.push(raw_get(&path, ENTRIES, &slot("other", 2)));
    for bad in variants {
        raw_put(&path, ENTRIES, &slot("phone", 2), &bad);
        let m = open(&path);
        is_corrupt(m.peek("phone", None, 10), "phone", Some(2));
        // Entries before and after it are still readable; the other queue is unaffected.
        assert_eq!(m.peek("phone", None, 2).unwrap().len(), 2);
        assert_eq!(m.peek("phone", Some(2), 10).unwrap().len(), 3);
        assert_eq!(seqs(&m, "other"), vec![0, 1, 2]);
        // Removing it fails and removes nothing else of that call.
        is_corrupt(
            m.remove(
                "phone",
                &[key("hrm", "phone", 0, 0), key("hrm", "phone", 0, 2)],
            ),
            "phone",
            Some(2),
        );
        assert_eq!(m.peek("phone", None, 1).unwrap()[0].key.seq, 0);
        assert_eq!(m.queue_stats("phone").unwrap().entries, 6);
        drop(m);
    }

    // Quarantine drops it and its index entry and recounts.
    let m = open(&path);
    assert!(m.quarantine_entry("phone", 2).unwrap());
    assert!(!m.quarantine_entry("phone", 2).unwrap());
    assert_eq!(seqs(&m, "phone"), vec![0, 1, 3, 4, 5]);
    let left = items("hrm", "phone", [0, 1, 3, 4, 5]);
    assert_eq!(
        m.queue_stats("phone").unwrap(),
        QueueStats {
            entries: 5,
            bytes: bytes_of(&left)
        }
    );
    // Its sender resends it: stored again at a new position.
    assert_eq!(
        m.put_batch("phone", &items("hrm", "phone", [2])).unwrap(),
        stored([6])
    );
    assert_eq!(m.remove("phone", &[key("hrm", "phone", 0, 3)]).unwrap(), 1);
    assert_eq!(seqs(&m, "other"), vec![0, 1, 2]);
}

#[test]
fn damaged_counters_and_index_entries_are_typed_errors() {
    let (_d, path) = tmp();
    seeded(&path);
    let good_row = raw_get(&path, QUEUES, b"phone");
    let mut bad = good_row.clone();
    bad[3] ^= 0x40;
    raw_put(&path, QUEUES, b"phone", &bad);
    let m = open(&path);
    is_corrupt(m.queue_stats("phone"), "phone", None);
    is_corrupt(m.queues(), "phone", None);
    is_corrupt(
        m.put_batch("phone", &items("hrm", "phone", [9])),
        "phone",
        None,
    );
    is_corrupt(
        m.remove("phone", &[key("hrm", "phone", 0, 1)]),
        "phone",
        None,
    );
    // The entries themselves are still readable, and the other queue works.
    assert_eq!(seqs(&m, "phone"), (0..6).collect::<Vec<_>>());
    assert_eq!(
        m.put_batch("other", &items("hrm", "other", [3])).unwrap(),
        stored([3])
    );
    // Quarantine rebuilds the counters (the position is kept above every used one).
    assert!(!m.quarantine_entry("phone", 1000).unwrap());
    assert_eq!(m.queue_stats("phone").unwrap().entries, 6);
    assert_eq!(
        m.put_batch("phone", &items("hrm", "phone", [9])).unwrap(),
        stored([1001])
    );
    drop(m);

    // A damaged dedupe entry: a put of that key and a remove of it are refused.
    let (_d2, path) = tmp();
    seeded(&path);
    let phone_keys: Vec<_> = raw_all(&path, KEYS)
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"phone\0"))
        .collect();
    assert_eq!(phone_keys.len(), 6);
    // Index keys sort by (src, dst, stream, seq): the first one is that of seq 0 (position 0).
    let (k0, v0) = &phone_keys[0];
    let (_, v1) = &phone_keys[1];
    let mut bad = v0.clone();
    bad[0] ^= 1;
    raw_put(&path, KEYS, k0, &bad);
    let m = open(&path);
    let all_keys: Vec<EntryKey> = (0..6).map(|s| key("hrm", "phone", 0, s)).collect();
    is_corrupt(
        m.put_batch("phone", &items("hrm", "phone", [0])),
        "phone",
        None,
    );
    is_corrupt(m.remove("phone", &all_keys), "phone", None);
    assert_eq!(m.queue_stats("phone").unwrap().entries, 6);
    drop(m);
    // The valid index value of seq 1 copied under seq 0's key is refused too.
    raw_put(&path, KEYS, k0, v1);
    let m = open(&path);
    is_corrupt(m.remove("phone", &all_keys[..1]), "phone", None);
    assert_eq!(m.remove("phone", &all_keys[1..2]).unwrap(), 1);
    // Quarantining position 0 drops the entry and the damaged index entry.
    assert!(m.quarantine_entry("phone", 0).unwrap());
    assert_eq!(seqs(&m, "phone"), vec![2, 3, 4, 5]);
    assert_eq!(m.remove("phone", &all_keys).unwrap(), 4);
    assert_eq!(m.queue_stats("phone").unwrap(), QueueStats::default());
    assert!(raw_all_after_close(m, &path, KEYS)
        .iter()
        .all(|(k, _)| !k.starts_with(b"phone\0")));
}

#[test]
fn find_looks_an_entry_up_by_key_wherever_it_is() {
    let (_d, path) = tmp();
    let m = open(&path);
    // Seq 3 arrives last (a resend landing at the tail of the queue).
    m.put_batch("phone", &items("hrm", "phone", [0, 1, 2, 4, 5]))
        .unwrap();
    m.put_batch("phone", &items("other", "phone", [3])).unwrap();
    m.put_batch("phone", &items("hrm", "phone", [3])).unwrap();
    m.put_batch("tablet", &items("hrm", "tablet", [3])).unwrap();
    let k3 = key("hrm", "phone", 0, 3);
    let e = m.find("phone", &k3).unwrap().expect("held");
    assert_eq!((e.pos, &e.key, &e.frame), (6, &k3, &frame(&k3)));
    assert_eq!(
        m.find("phone", &key("other", "phone", 0, 3))
            .unwrap()
            .map(|e| e.pos),
        Some(5)
    );
    // Not held: another seq, stream, sender, destination or queue; never-valid ids.
    for k in [
        key("hrm", "phone", 0, 6),
        key("hrm", "phone", 1, 3),
        key("nobody", "phone", 0, 3),
        key("hrm", "tablet", 0, 3),
        key("", "phone", 0, 3),
        key("hrm", "a/b", 0, 3),
    ] {
        assert_eq!(m.find("phone", &k).unwrap(), None, "{k:?}");
    }
    assert_eq!(m.find("watch", &k3).unwrap(), None);
    assert!(matches!(m.find("a b", &k3), Err(Error::InvalidName)));
    // Removed: gone; across a reopen: still found.
    assert_eq!(m.remove("phone", std::slice::from_ref(&k3)).unwrap(), 1);
    assert_eq!(m.find("phone", &k3).unwrap(), None);
    drop(m);
    let m = open(&path);
    assert_eq!(
        m.find("tablet", &key("hrm", "tablet", 0, 3))
            .unwrap()
            .map(|e| e.pos),
        Some(0)
    );
    drop(m);

    // A damaged entry, or an index value pointing to another entry: typed errors.
    let k1 = key("hrm", "phone", 0, 1);
    let good = raw_get(&path, ENTRIES, &slot("phone", 1));
    let mut bad = good.clone();
    bad[4] ^= 0x10;
    raw_put(&path, ENTRIES, &slot("phone", 1), &bad);
    is_corrupt(open(&path).find("phone", &k1), "phone", Some(1));
    raw_put(
        &path,
        ENTRIES,
        &slot("phone", 1),
        &raw_get(&path, ENTRIES, &slot("phone", 2)),
    );
    is_corrupt(open(&path).find("phone", &k1), "phone", Some(1));
    raw_put(&path, ENTRIES, &slot("phone", 1), &good);
    assert_eq!(
        open(&path).find("phone", &k1).unwrap().map(|e| e.pos),
        Some(1)
    );
    let index: Vec<_> = raw_all(&path, KEYS)
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"phone\0"))
        .collect();
    // Index keys sort by (src, dst, stream, seq): hrm's seq 0 and seq 1 come first.
    let (k0, v0) = &index[0];
    let (_, v1) = &index[1];
    // (An index value is bound to its key: seq 1's value under seq 0's key is damaged.)
    raw_put(&path, KEYS, k0, v1);
    is_corrupt(
        open(&path).find("phone", &key("hrm", "phone", 0, 0)),
        "phone",
        None,
    );
    let mut bad = v0.clone();
    bad[0] ^= 1;
    raw_put(&path, KEYS, k0, &bad);
    is_corrupt(
        open(&path).find("phone", &key("hrm", "phone", 0, 0)),
        "phone",
        None,
    );
}

fn raw_all_after_close(m: Mailbox, path: &Path, t: Raw) -> Vec<(Vec<u8>, Vec<u8>)> {
    drop(m);
    raw_all(path, t)
}

#[test]
fn foreign_garbage_and_other_version_files_are_refused() {
    let (d, path) = tmp();
    // A device store is not a mailbox, and a mailbox is not a device store.
    let store_path = d.path().join("store.redb");
    let identity = Store::open_at(&store_path, 1).unwrap().identity().unwrap();
    match Mailbox::open(&store_path, MailboxLimits::default()) {
        Err(Error::CorruptMailboxFile { path, detail }) => {
            assert_eq!(path, store_path.display().to_string());
            assert!(detail.contains("not a KEAV mailbox"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // (redb rewrites its header on open; the store's contents are untouched.)
    let store = Store::open_at(&store_path, 2).unwrap();
    assert_eq!(store.identity().unwrap(), identity);
    drop(store);
    seeded(&path);
    assert!(matches!(Store::open_at(&path, 1), Err(Error::Corrupt(_))));
    assert_eq!(seqs(&open(&path), "phone"), (0..6).collect::<Vec<_>>());
    // Garbage.
    let junk = d.path().join("junk.redb");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    assert!(matches!(
        Mailbox::open(&junk, MailboxLimits::default()),
        Err(Error::CorruptMailboxFile { .. } | Error::Io(_))
    ));
    assert!(std::fs::read(&junk).unwrap() == vec![0x5a; 8192]);
    // Another schema version.
    let meta: Raw = TableDefinition::new("keav_mailbox_meta");
    let mut marker = raw_get(&path, meta, b"schema");
    *marker.last_mut().unwrap() ^= 1;
    raw_put(&path, meta, b"schema", &marker);
    assert!(matches!(
        Mailbox::open(&path, MailboxLimits::default()),
        Err(Error::CorruptMailboxFile { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Crashes (subprocesses)

const CHILD_ENV: &str = "KEAV_MAILBOX_TEST_CHILD";

#[test]
#[ignore = "child process of the crash tests"]
fn mailbox_crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (what, path) = spec.split_once(':').unwrap();
    let m = open(Path::new(path));
    match what {
        "put" => {
            m.put_batch("q", &items("s", "q", 10..110)).unwrap();
        }
        "remove" => {
            let keys: Vec<EntryKey> = (0..10).map(|s| key("s", "q", 0, s)).collect();
            assert_eq!(m.remove("q", &keys).unwrap(), 10);
        }
        _ => unreachable!(),
    }
    if std::env::var("KEAV_MAILBOX_TEST_ABORT_AFTER").is_ok() {
        std::process::abort();
    }
}

fn run_child(path: &Path, what: &str, failpoint: Option<&str>) -> std::process::ExitStatus {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "mailbox_crash_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, format!("{what}:{}", path.display()))
        .env_remove("KEAV_STORE_FAILPOINT")
        .env_remove("KEAV_MAILBOX_TEST_ABORT_AFTER")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match failpoint {
        Some(fp) => c.env("KEAV_STORE_FAILPOINT", fp),
        None => c.env("KEAV_MAILBOX_TEST_ABORT_AFTER", "1"),
    };
    c.status().unwrap()
}

#[cfg(unix)]
fn assert_aborted(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "child did not abort: {status:?}");
}

fn ten(path: &Path) -> QueueStats {
    let m = open(path);
    let batch = items("s", "q", 0..10);
    m.put_batch("q", &batch).unwrap();
    QueueStats {
        entries: 10,
        bytes: bytes_of(&batch),
    }
}

#[cfg(unix)]
#[test]
fn crash_in_the_middle_of_a_put_batch_stores_nothing() {
    for fp in ["mailbox_put:mid", "mailbox_put:before_commit"] {
        let (_d, path) = tmp();
        let before = ten(&path);
        assert_aborted(run_child(&path, "put", Some(fp)));
        let m = open(&path);
        assert_eq!(seqs(&m, "q"), (0..10).collect::<Vec<_>>());
        assert_eq!(m.queue_stats("q").unwrap(), before);
        // The sender resends the whole batch: all stored, positions continue at 10.
        assert_eq!(
            m.put_batch("q", &items("s", "q", 10..110)).unwrap(),
            stored(10..110)
        );
    }
}

#[cfg(unix)]
#[test]
fn crash_in_the_middle_of_a_remove_removes_nothing() {
    let (_d, path) = tmp();
    let before = ten(&path);
    assert_aborted(run_child(&path, "remove", Some("mailbox_remove:mid")));
    let m = open(&path);
    assert_eq!(seqs(&m, "q"), (0..10).collect::<Vec<_>>());
    assert_eq!(m.queue_stats("q").unwrap(), before);
}

#[cfg(unix)]
#[test]
fn kill_right_after_the_commit_keeps_the_whole_batch() {
    let (_d, path) = tmp();
    ten(&path);
    assert_aborted(run_child(&path, "put", None));
    let m = open(&path);
    assert_eq!(seqs(&m, "q"), (0..110).collect::<Vec<_>>());
    assert_eq!(m.queue_stats("q").unwrap().entries, 110);
    assert_eq!(
        m.put_batch("q", &items("s", "q", [0])).unwrap(),
        vec![PutOutcome::Duplicate]
    );
    drop(m);
    assert_aborted(run_child(&path, "remove", None));
    let m = open(&path);
    assert_eq!(seqs(&m, "q"), (10..110).collect::<Vec<_>>());
    assert_eq!(m.queue_stats("q").unwrap().entries, 100);
}
