//! `keav init`, `keav peers`, `keav forget`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use keav_proto::cache::{LockoutPolicy, Zid};
use keav_store::{LockState, PeerRecord, Store, ANONYMOUS_PEER};

/// Current unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Opens the store, creating parent directories (and the store) if needed.
pub fn open_store(path: &Path) -> Result<Store> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Store::open(path).with_context(|| format!("opening device store {}", path.display()))
}

/// Opens an existing store (commands other than `init` do not create one silently).
pub fn open_existing(path: &Path) -> Result<Store> {
    if !path.exists() {
        bail!(
            "no device store at {} (run `keav init` first, or pass --store)",
            path.display()
        );
    }
    open_store(path)
}

/// `keav init`.
pub fn init(path: &Path) -> Result<()> {
    let existed = path.exists();
    let store = open_store(path)?;
    let id = store.identity()?;
    if existed {
        println!("device store {} already exists", path.display());
    } else {
        println!("created device store {}", path.display());
    }
    println!("device ZID: {}", id.zid);
    Ok(())
}

fn verification_text(r: &PeerRecord) -> String {
    match r.last_verification {
        Some((n, v)) => format!("{} (session {n})", v.name()),
        None => "-".into(),
    }
}

fn lock_text(lock: &LockState, now: u64) -> String {
    match (lock.locked_until, lock.failures) {
        (Some(t), f) => format!("locked for {}s ({f} failures)", t.saturating_sub(now)),
        (None, 0) => "-".into(),
        (None, f) => format!("{f} failures"),
    }
}

/// `keav peers`.
pub fn peers(path: &Path) -> Result<()> {
    let store = open_existing(path)?;
    let now = unix_now();
    let policy = LockoutPolicy::default();
    let mut list = store.list_peers()?;
    list.sort_by(|a, b| a.label.cmp(&b.label).then(a.zid.cmp(&b.zid)));
    if list.is_empty() {
        println!("no known peers");
    } else {
        println!(
            "{:<16} {:<24} {:<13} {:>8}  {:<22} lockout",
            "label", "zid", "mode", "sessions", "last verification"
        );
    }
    for r in &list {
        let lock = store.lock_state(&r.id, now, &policy)?;
        println!(
            "{:<16} {:<24} {:<13} {:>8}  {:<22} {}",
            r.label.as_deref().unwrap_or("-"),
            r.zid.map_or_else(|| "-".to_string(), |z| z.to_string()),
            r.mode.name(),
            r.cache.sessions,
            verification_text(r),
            lock_text(&lock, now)
        );
    }
    // Callers that could not be identified (e.g. a first contact that failed its equality
    // test) share one failure budget, which has no peer row of its own.
    let anon = store.lock_state(&ANONYMOUS_PEER, now, &policy)?;
    if anon.failures > 0 || anon.locked_until.is_some() {
        println!(
            "unknown callers (one shared budget): {}",
            lock_text(&anon, now)
        );
    }
    Ok(())
}

fn parse_zid(s: &str) -> Option<Zid> {
    if s.len() != 24 {
        return None;
    }
    let mut z = [0u8; 12];
    for (i, b) in z.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Zid(z))
}

/// `keav forget LABEL|ZID`.
pub fn forget(path: &Path, peer: &str) -> Result<()> {
    let store = open_existing(path)?;
    let rec = match store.peer_by_label(peer)? {
        Some(r) => Some(r),
        None => match parse_zid(peer) {
            Some(z) => store.peer_by_zid(&z)?,
            None => None,
        },
    };
    let Some(rec) = rec else {
        bail!("no peer labelled or with ZID {peer:?} (see `keav peers`)");
    };
    store.forget(&rec.id)?;
    println!(
        "forgot {} — the next session with it is a first session (DH and verification)",
        rec.label.as_deref().unwrap_or(peer)
    );
    Ok(())
}
