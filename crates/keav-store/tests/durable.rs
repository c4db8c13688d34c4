//! Durable channels in the device store: round trips, ordering, name isolation, range
//! deletes, big outboxes, damaged rows (refused, never returned) and crashes in the middle of
//! a batch (all or nothing).

use std::path::{Path, PathBuf};

use keav_store::{DurableRow, DurableUpdate, Error, Store};
use redb::{TableDefinition, TableHandle};
use zeroize::Zeroizing;

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    (dir, path)
}

fn row(n: u8) -> DurableRow {
    DurableRow {
        peer_zid: [n; 12],
        state: Zeroizing::new(vec![n ^ 0x5a; 40 + usize::from(n)]),
        delivered: u64::from(n) * 1000,
    }
}

fn upd(name: &str) -> DurableUpdate {
    DurableUpdate {
        name: name.into(),
        ..Default::default()
    }
}

/// A payload that names its channel and sequence number.
fn payload(name: &str, seq: u64) -> Vec<u8> {
    format!("out:{name}:{seq}").into_bytes()
}

fn message(name: &str, seq: u64) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(format!("in:{name}:{seq}").into_bytes())
}

fn out_seqs(s: &Store, name: &str) -> Vec<u64> {
    let rows = s.durable_outbox(name).unwrap();
    for (seq, p) in &rows {
        assert_eq!(*p, payload(name, *seq), "{name} outbox row {seq}");
    }
    rows.into_iter().map(|(seq, _)| seq).collect()
}

fn in_seqs(s: &Store, name: &str) -> Vec<u64> {
    let rows = s.durable_inbox(name).unwrap();
    for (seq, m) in &rows {
        assert_eq!(**m, *message(name, *seq), "{name} inbox row {seq}");
    }
    rows.into_iter().map(|(seq, _)| seq).collect()
}

fn is_corrupt(r: Result<impl std::fmt::Debug, Error>, name: &str) {
    match r {
        Err(Error::CorruptDurable { name: n }) => assert_eq!(n, name),
        other => panic!("expected CorruptDurable({name}), got {other:?}"),
    }
}

#[test]
fn rows_outbox_and_inbox_round_trip_in_order_across_a_reopen() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    assert_eq!(s.durable_names().unwrap(), Vec::<String>::new());
    assert_eq!(s.durable_row("phone").unwrap(), None);
    assert!(s.durable_outbox("phone").unwrap().is_empty());
    assert!(s.durable_inbox("phone").unwrap().is_empty());

    let mut u = upd("phone");
    u.row = Some(row(1));
    // Out of order on purpose, including the extremes.
    for seq in [5, 1, u64::MAX, 3, 0, 256] {
        u.outbox_put.push((seq, payload("phone", seq)));
        u.inbox_put.push((seq, message("phone", seq)));
    }
    let mut v = upd("hrm-1");
    v.row = Some(row(2));
    s.durable_commit(&[u, v]).unwrap();
    drop(s);

    let s = Store::open_at(&path, 2).unwrap();
    assert_eq!(s.durable_row("phone").unwrap(), Some(row(1)));
    assert_eq!(s.durable_row("hrm-1").unwrap(), Some(row(2)));
    assert_eq!(s.durable_names().unwrap(), vec!["hrm-1", "phone"]);
    let want = vec![0, 1, 3, 5, 256, u64::MAX];
    assert_eq!(out_seqs(&s, "phone"), want);
    assert_eq!(in_seqs(&s, "phone"), want);
    assert!(s.durable_outbox("hrm-1").unwrap().is_empty());

    // Replacing the row and overwriting an outbox row.
    let mut u = upd("phone");
    u.row = Some(row(3));
    u.outbox_put.push((3, b"replaced".to_vec()));
    s.durable_commit(&[u]).unwrap();
    assert_eq!(s.durable_row("phone").unwrap(), Some(row(3)));
    let out = s.durable_outbox("phone").unwrap();
    assert_eq!(out.len(), 6);
    assert_eq!(out[2], (3, b"replaced".to_vec()));

    // An empty batch and an update without changes are fine.
    s.durable_commit(&[]).unwrap();
    s.durable_commit(&[upd("phone")]).unwrap();
    assert_eq!(s.durable_row("phone").unwrap(), Some(row(3)));
}

#[test]
fn forgetting_a_peer_erases_its_durable_channels_and_only_those() {
    let (_d, path) = tmp();
    let s = Store::open(&path).unwrap();
    let zid = keav_proto::cache::Zid([7; 12]);
    let peer = s
        .create_peer(Some(zid), Some("phone"), keav_proto::cache::Mode::NORMAL, 1)
        .unwrap();
    // Two channels with the forgotten peer (under two device names), one with another peer.
    let mut batch = Vec::new();
    for (name, n) in [("phone", 7u8), ("phone-2", 7), ("watch", 9)] {
        let mut u = upd(name);
        u.row = Some(row(n));
        u.outbox_put = vec![(0, payload(name, 0)), (1, payload(name, 1))];
        u.inbox_put = vec![(0, message(name, 0))];
        batch.push(u);
    }
    s.durable_commit(&batch).unwrap();
    assert!(s.forget(&peer).unwrap());
    assert_eq!(s.durable_names().unwrap(), vec!["watch".to_string()]);
    for gone in ["phone", "phone-2"] {
        assert!(s.durable_row(gone).unwrap().is_none());
        assert!(out_seqs(&s, gone).is_empty());
        assert!(in_seqs(&s, gone).is_empty());
    }
    assert_eq!(out_seqs(&s, "watch"), vec![0, 1]);
    assert_eq!(in_seqs(&s, "watch"), vec![0]);
    assert_eq!(s.durable_row("watch").unwrap(), Some(row(9)));
}

#[test]
fn names_are_isolated_from_their_prefixes_and_extensions() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let names = ["a", "ab", "a-", "a_", "A", "b", "a0", "aa"];
    let mut batch = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut u = upd(n);
        u.row = Some(row(i as u8));
        for seq in [0, 1, 2, u64::MAX - 1, u64::MAX] {
            u.outbox_put.push((seq, payload(n, seq)));
            u.inbox_put.push((seq, message(n, seq)));
        }
        batch.push(u);
    }
    s.durable_commit(&batch).unwrap();
    let all = vec![0, 1, 2, u64::MAX - 1, u64::MAX];
    for n in names {
        // The payload check inside catches any row of another name.
        assert_eq!(out_seqs(&s, n), all, "{n}");
        assert_eq!(in_seqs(&s, n), all, "{n}");
    }
    let mut sorted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    sorted.sort();
    assert_eq!(s.durable_names().unwrap(), sorted);

    // Deleting below a mark for "a" leaves every other name alone.
    let mut u = upd("a");
    u.outbox_delete_below = Some(u64::MAX);
    u.inbox_delete_below = Some(2);
    s.durable_commit(&[u]).unwrap();
    assert_eq!(out_seqs(&s, "a"), vec![u64::MAX]);
    assert_eq!(in_seqs(&s, "a"), vec![2, u64::MAX - 1, u64::MAX]);
    for n in names.iter().filter(|n| **n != "a") {
        assert_eq!(out_seqs(&s, n), all, "{n}");
        assert_eq!(in_seqs(&s, n), all, "{n}");
    }

    // Deleting "a" removes its row and all its rows, and nothing of "ab" or "a-".
    assert!(s.durable_delete("a").unwrap());
    assert!(!s.durable_delete("a").unwrap());
    assert_eq!(s.durable_row("a").unwrap(), None);
    assert!(out_seqs(&s, "a").is_empty());
    assert!(in_seqs(&s, "a").is_empty());
    for (i, n) in names.iter().enumerate().skip(1) {
        assert_eq!(s.durable_row(n).unwrap(), Some(row(i as u8)));
        assert_eq!(out_seqs(&s, n), all, "{n}");
        assert_eq!(in_seqs(&s, n), all, "{n}");
    }
    assert!(!s.durable_names().unwrap().contains(&"a".to_string()));
}

#[test]
fn invalid_names_are_refused_and_nothing_of_the_batch_is_applied() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let long = "x".repeat(65);
    let bad = [
        "",
        long.as_str(),
        "a b",
        "a\0b",
        "a/b",
        "é",
        "a.b",
        "a\u{0}",
    ];
    for n in bad {
        let mut good = upd("good");
        good.row = Some(row(1));
        let mut u = upd(n);
        u.row = Some(row(2));
        assert!(matches!(
            s.durable_commit(&[good, u]),
            Err(Error::InvalidName)
        ));
        assert!(matches!(s.durable_row(n), Err(Error::InvalidName)));
        assert!(matches!(s.durable_outbox(n), Err(Error::InvalidName)));
        assert!(matches!(s.durable_inbox(n), Err(Error::InvalidName)));
        assert!(matches!(s.durable_delete(n), Err(Error::InvalidName)));
    }
    assert_eq!(s.durable_row("good").unwrap(), None);
    assert!(s.durable_names().unwrap().is_empty());
    // 64 characters is the longest valid name.
    let max = "Z".repeat(64);
    let mut u = upd(&max);
    u.row = Some(row(1));
    s.durable_commit(&[u]).unwrap();
    assert_eq!(s.durable_names().unwrap(), vec![max]);
}

#[test]
fn rows_need_a_channel_and_a_failing_update_aborts_the_whole_batch() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let mut a = upd("a");
    a.row = Some(row(1));
    a.outbox_put.push((0, payload("a", 0)));
    let mut b = upd("b");
    b.outbox_put.push((0, payload("b", 0)));
    assert!(matches!(s.durable_commit(&[a, b]), Err(Error::NotFound)));
    assert_eq!(s.durable_row("a").unwrap(), None);
    assert!(s.durable_outbox("a").unwrap().is_empty());
    assert!(s.durable_outbox("b").unwrap().is_empty());

    let mut b = upd("b");
    b.inbox_put.push((0, message("b", 0)));
    assert!(matches!(s.durable_commit(&[b]), Err(Error::NotFound)));

    // A row set earlier in the same batch counts.
    let mut a = upd("a");
    a.row = Some(row(1));
    let mut a2 = upd("a");
    a2.outbox_put.push((7, payload("a", 7)));
    a2.inbox_put.push((8, message("a", 8)));
    s.durable_commit(&[a, a2]).unwrap();
    assert_eq!(out_seqs(&s, "a"), vec![7]);
    assert_eq!(in_seqs(&s, "a"), vec![8]);
    // Deleting below a mark needs no row.
    let mut b = upd("b");
    b.outbox_delete_below = Some(10);
    s.durable_commit(&[b]).unwrap();
}

#[test]
fn delete_below_is_a_range_delete_applied_after_the_puts() {
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let mut u = upd("dev");
    u.row = Some(row(1));
    for seq in 0..100 {
        u.outbox_put.push((seq, payload("dev", seq)));
        u.inbox_put.push((seq, message("dev", seq)));
    }
    s.durable_commit(&[u]).unwrap();

    let step = |below_out: Option<u64>, below_in: Option<u64>| {
        let mut u = upd("dev");
        u.outbox_delete_below = below_out;
        u.inbox_delete_below = below_in;
        s.durable_commit(&[u]).unwrap();
    };
    step(Some(0), Some(0));
    assert_eq!(out_seqs(&s, "dev"), (0..100).collect::<Vec<_>>());
    step(Some(10), None);
    assert_eq!(out_seqs(&s, "dev"), (10..100).collect::<Vec<_>>());
    assert_eq!(in_seqs(&s, "dev"), (0..100).collect::<Vec<_>>());
    step(Some(10), Some(1));
    assert_eq!(out_seqs(&s, "dev"), (10..100).collect::<Vec<_>>());
    assert_eq!(in_seqs(&s, "dev"), (1..100).collect::<Vec<_>>());
    // Lowering the mark again deletes nothing more.
    step(Some(3), Some(0));
    assert_eq!(out_seqs(&s, "dev").len(), 90);

    // New rows and an ack in one update: rows below the mark go, the rest stay.
    let mut u = upd("dev");
    u.outbox_put = (95..105).map(|q| (q, payload("dev", q))).collect();
    u.outbox_put.push((2, payload("dev", 2)));
    u.outbox_delete_below = Some(50);
    u.inbox_put = vec![(100, message("dev", 100))];
    u.inbox_delete_below = Some(99);
    s.durable_commit(&[u]).unwrap();
    assert_eq!(out_seqs(&s, "dev"), (50..105).collect::<Vec<_>>());
    assert_eq!(in_seqs(&s, "dev"), vec![99, 100]);

    step(Some(u64::MAX), Some(u64::MAX));
    assert!(out_seqs(&s, "dev").is_empty());
    assert!(in_seqs(&s, "dev").is_empty());
    assert_eq!(s.durable_row("dev").unwrap(), Some(row(1)));
}

#[test]
fn outbox_of_a_hundred_thousand_rows_in_batches_of_512() {
    const BATCH: u64 = 512;
    const BATCHES: u64 = 200; // 102,400 rows
    let (_d, path) = tmp();
    let s = Store::open_at(&path, 1).unwrap();
    let mut u = upd("bulk");
    u.row = Some(row(1));
    let mut other = upd("bulk2");
    other.row = Some(row(2));
    other.outbox_put = vec![(0, payload("bulk2", 0)), (1, payload("bulk2", 1))];
    s.durable_commit(&[u, other]).unwrap();
    for b in 0..BATCHES {
        let mut u = upd("bulk");
        let mut r = row(1);
        r.delivered = b;
        u.row = Some(r);
        u.outbox_put = (b * BATCH..(b + 1) * BATCH)
            .map(|q| (q, payload("bulk", q)))
            .collect();
        s.durable_commit(&[u]).unwrap();
    }
    let total = BATCH * BATCHES;
    assert_eq!(out_seqs(&s, "bulk"), (0..total).collect::<Vec<_>>());
    // Acks in steps of one batch.
    for b in 1..=BATCHES {
        let mut u = upd("bulk");
        u.outbox_delete_below = Some(b * BATCH);
        s.durable_commit(&[u]).unwrap();
        if b == BATCHES / 2 {
            let left = s.durable_outbox("bulk").unwrap();
            assert_eq!(left.len() as u64, total - b * BATCH);
            assert_eq!(left.first().map(|r| r.0), Some(b * BATCH));
        }
    }
    assert!(s.durable_outbox("bulk").unwrap().is_empty());
    assert_eq!(out_seqs(&s, "bulk2"), vec![0, 1]);
    assert_eq!(
        s.durable_row("bulk").unwrap().unwrap().delivered,
        BATCHES - 1
    );
}

#[test]
fn debug_output_shows_no_state_or_messages() {
    let mut u = upd("dbg");
    u.row = Some(DurableRow {
        peer_zid: [1; 12],
        state: Zeroizing::new(b"SECRET-STATE".to_vec()),
        delivered: 3,
    });
    u.outbox_put.push((1, b"CIPHERTEXT-X".to_vec()));
    u.inbox_put
        .push((1, Zeroizing::new(b"PLAINTEXT-Y".to_vec())));
    let d = format!("{u:?}");
    for needle in ["SECRET", "CIPHERTEXT", "PLAINTEXT", "83, 69, 67"] {
        assert!(!d.contains(needle), "{d}");
    }
    assert!(d.contains("dbg"));
}

// ---------------------------------------------------------------------------------------------
// Damaged rows

type Raw = TableDefinition<'static, &'static [u8], &'static [u8]>;
const DURABLE: Raw = TableDefinition::new("keav_durable");
const OUTBOX: Raw = TableDefinition::new("keav_outbox");
const INBOX: Raw = TableDefinition::new("keav_inbox");

fn seq_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Edits the file with redb directly (the store must be closed): page checksums stay valid,
/// only the record checksums can catch the change.
fn raw(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
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

fn raw_put(path: &Path, t: Raw, k: &[u8], v: &[u8]) {
    raw(path, |txn| {
        txn.open_table(t).unwrap().insert(k, v).unwrap();
    });
}

fn seeded(path: &Path) {
    let s = Store::open_at(path, 1).unwrap();
    let mut batch = Vec::new();
    for n in ["a", "ab"] {
        let mut u = upd(n);
        u.row = Some(row(n.len() as u8));
        for seq in 0..4 {
            u.outbox_put.push((seq, payload(n, seq)));
            u.inbox_put.push((seq, message(n, seq)));
        }
        batch.push(u);
    }
    s.durable_commit(&batch).unwrap();
}

#[test]
fn damaged_rows_are_refused_never_returned() {
    let (_d, path) = tmp();
    seeded(&path);
    let good_row = raw_get(&path, DURABLE, b"a");
    let good_out = raw_get(&path, OUTBOX, &seq_key("a", 2));
    let good_in = raw_get(&path, INBOX, &seq_key("a", 2));

    let check_ab_intact = |s: &Store| {
        assert_eq!(s.durable_row("ab").unwrap(), Some(row(2)));
        assert_eq!(out_seqs(s, "ab"), vec![0, 1, 2, 3]);
        assert_eq!(in_seqs(s, "ab"), vec![0, 1, 2, 3]);
    };

    // Bit flips and truncations of each kind of value.
    let cases: [(Raw, Vec<u8>, &Vec<u8>); 3] = [
        (DURABLE, b"a".to_vec(), &good_row),
        (OUTBOX, seq_key("a", 2), &good_out),
        (INBOX, seq_key("a", 2), &good_in),
    ];
    for (t, k, good) in &cases {
        let mut variants: Vec<Vec<u8>> = Vec::new();
        for bit in (0..good.len() * 8).step_by(17) {
            let mut b = (*good).clone();
            b[bit / 8] ^= 1 << (bit % 8);
            variants.push(b);
        }
        for n in [0, 1, 2, good.len() / 2, good.len() - 1] {
            variants.push(good[..n].to_vec());
        }
        let mut longer = (*good).clone();
        longer.push(0);
        variants.push(longer);
        for bad in variants {
            raw_put(&path, *t, k, &bad);
            let s = Store::open_at(&path, 1).unwrap();
            match t.name() {
                "keav_durable" => is_corrupt(s.durable_row("a"), "a"),
                "keav_outbox" => is_corrupt(s.durable_outbox("a"), "a"),
                _ => is_corrupt(s.durable_inbox("a"), "a"),
            }
            check_ab_intact(&s);
            drop(s);
        }
        raw_put(&path, *t, k, good);
    }

    // Valid values moved: under another sequence number, another name, another table.
    let moves: [(Raw, Vec<u8>, &Vec<u8>, &str); 5] = [
        (OUTBOX, seq_key("a", 3), &good_out, "a"),
        (OUTBOX, seq_key("ab", 2), &good_out, "ab"),
        (INBOX, seq_key("a", 2), &good_out, "a"),
        (OUTBOX, seq_key("a", 2), &good_in, "a"),
        (DURABLE, b"ab".to_vec(), &good_row, "ab"),
    ];
    for (t, k, v, name) in moves {
        let before = raw_get(&path, t, &k);
        raw_put(&path, t, &k, v);
        let s = Store::open_at(&path, 1).unwrap();
        match t.name() {
            "keav_durable" => is_corrupt(s.durable_row(name), name),
            "keav_outbox" => is_corrupt(s.durable_outbox(name), name),
            _ => is_corrupt(s.durable_inbox(name), name),
        }
        drop(s);
        raw_put(&path, t, &k, &before);
    }

    // A stray key inside a name's range (not `name ‖ 0 ‖ 8 bytes`).
    let mut stray = seq_key("a", 1);
    stray.push(9);
    raw_put(&path, OUTBOX, &stray, &good_out);
    let s = Store::open_at(&path, 1).unwrap();
    is_corrupt(s.durable_outbox("a"), "a");
    check_ab_intact(&s);
    drop(s);
    raw(&path, |txn| {
        txn.open_table(OUTBOX)
            .unwrap()
            .remove(stray.as_slice())
            .unwrap();
    });

    // Everything intact again; then damage and drop the channel with durable_delete.
    let s = Store::open_at(&path, 1).unwrap();
    assert_eq!(s.durable_row("a").unwrap(), Some(row(1)));
    assert_eq!(out_seqs(&s, "a"), vec![0, 1, 2, 3]);
    drop(s);
    raw_put(&path, DURABLE, b"a", b"junk");
    raw_put(&path, INBOX, &seq_key("a", 1), b"junk");
    let s = Store::open_at(&path, 1).unwrap();
    is_corrupt(s.durable_row("a"), "a");
    assert!(s.durable_delete("a").unwrap());
    assert_eq!(s.durable_row("a").unwrap(), None);
    assert!(s.durable_inbox("a").unwrap().is_empty());
    check_ab_intact(&s);
}

#[test]
fn an_invalid_name_in_the_table_is_reported() {
    let (_d, path) = tmp();
    seeded(&path);
    raw_put(&path, DURABLE, b"bad name", b"x");
    let s = Store::open_at(&path, 1).unwrap();
    assert!(matches!(s.durable_names(), Err(Error::Corrupt(_))));
}

// ---------------------------------------------------------------------------------------------
// Crashes (subprocesses)

const CHILD_ENV: &str = "KEAV_DURABLE_TEST_CHILD";

/// The batch the child commits: "a" gets a new row, ten new outbox rows and an ack, "b" is
/// created with inbox rows.
fn crash_batch() -> Vec<DurableUpdate> {
    let mut a = upd("a");
    a.row = Some(row(9));
    a.outbox_put = (10..20).map(|q| (q, payload("a", q))).collect();
    a.outbox_delete_below = Some(5);
    a.inbox_delete_below = Some(2);
    let mut b = upd("b");
    b.row = Some(row(8));
    b.inbox_put = (0..10).map(|q| (q, message("b", q))).collect();
    vec![a, b]
}

#[test]
#[ignore = "child process of the crash tests"]
fn durable_crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let s = Store::open_at(Path::new(&path), 1).unwrap();
    s.durable_commit(&crash_batch()).unwrap();
    if std::env::var("KEAV_DURABLE_TEST_ABORT_AFTER").is_ok() {
        std::process::abort();
    }
}

fn run_child(path: &Path, failpoint: Option<&str>) -> std::process::ExitStatus {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "durable_crash_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, path)
        .env_remove("KEAV_STORE_FAILPOINT")
        .env_remove("KEAV_DURABLE_TEST_ABORT_AFTER")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match failpoint {
        Some(fp) => c.env("KEAV_STORE_FAILPOINT", fp),
        None => c.env("KEAV_DURABLE_TEST_ABORT_AFTER", "1"),
    };
    c.status().unwrap()
}

#[cfg(unix)]
fn assert_aborted(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "child did not abort: {status:?}");
}

fn before_crash(path: &Path) {
    let s = Store::open_at(path, 1).unwrap();
    let mut a = upd("a");
    a.row = Some(row(1));
    a.outbox_put = (0..10).map(|q| (q, payload("a", q))).collect();
    a.inbox_put = (0..4).map(|q| (q, message("a", q))).collect();
    s.durable_commit(&[a]).unwrap();
}

fn assert_old_state(s: &Store) {
    assert_eq!(s.durable_row("a").unwrap(), Some(row(1)));
    assert_eq!(out_seqs(s, "a"), (0..10).collect::<Vec<_>>());
    assert_eq!(in_seqs(s, "a"), (0..4).collect::<Vec<_>>());
    assert_eq!(s.durable_row("b").unwrap(), None);
    assert!(s.durable_inbox("b").unwrap().is_empty());
    assert_eq!(s.durable_names().unwrap(), vec!["a"]);
}

fn assert_new_state(s: &Store) {
    assert_eq!(s.durable_row("a").unwrap(), Some(row(9)));
    assert_eq!(out_seqs(s, "a"), (5..20).collect::<Vec<_>>());
    assert_eq!(in_seqs(s, "a"), vec![2, 3]);
    assert_eq!(s.durable_row("b").unwrap(), Some(row(8)));
    assert_eq!(in_seqs(s, "b"), (0..10).collect::<Vec<_>>());
    assert_eq!(s.durable_names().unwrap(), vec!["a", "b"]);
}

#[cfg(unix)]
#[test]
fn crash_in_the_middle_of_a_batch_applies_nothing() {
    for fp in ["durable_commit:after_first", "durable_commit:before_commit"] {
        let (_d, path) = tmp();
        before_crash(&path);
        assert_aborted(run_child(&path, Some(fp)));
        let s = Store::open_at(&path, 1).unwrap();
        assert_old_state(&s);
        // The batch can be committed again from there.
        s.durable_commit(&crash_batch()).unwrap();
        assert_new_state(&s);
    }
}

#[cfg(unix)]
#[test]
fn kill_right_after_the_commit_keeps_the_whole_batch() {
    let (_d, path) = tmp();
    before_crash(&path);
    assert_aborted(run_child(&path, None));
    let s = Store::open_at(&path, 1).unwrap();
    assert_new_state(&s);
}
