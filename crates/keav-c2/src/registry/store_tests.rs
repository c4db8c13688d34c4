//! Status rules of both engines: Revoked is final, and `set_status_if` is a compare-and-set.

use std::sync::Arc;

use super::*;
use crate::keys::SigningKey;

fn record(status: DeviceStatus) -> DeviceRecord {
    let k = SigningKey::generate(Alg::Ed25519).unwrap();
    DeviceRecord {
        id: k.device_id(),
        alg: Alg::Ed25519,
        public_key: k.public().to_bytes(),
        status,
        password_hash: "$7$101$abc$def".into(),
        created: 1_700_000_000,
        name: None,
        groups: vec![],
    }
}

async fn status_rules<R: Registry>(r: &R) {
    let a = record(DeviceStatus::PendingJoin);
    r.insert_device(a.clone()).await.unwrap();

    // Compare-and-set: the right expectation writes, a stale one writes nothing.
    let rec = r
        .set_status_if(a.id, DeviceStatus::PendingJoin, DeviceStatus::Joined)
        .await
        .unwrap();
    assert_eq!(rec.status, DeviceStatus::Joined);
    match r
        .set_status_if(a.id, DeviceStatus::PendingJoin, DeviceStatus::Registered)
        .await
    {
        Err(RegistryError::StatusConflict {
            id,
            expected: DeviceStatus::PendingJoin,
            found: DeviceStatus::Joined,
        }) if id == a.id => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.device(a.id).await.unwrap().unwrap().status,
        DeviceStatus::Joined
    );

    // The race the compare-and-set exists for: the engine read PendingJoin and decided to
    // join, but the device was revoked meanwhile. The late write must not undo it.
    let b = record(DeviceStatus::PendingJoin);
    r.insert_device(b.clone()).await.unwrap();
    r.set_status(b.id, DeviceStatus::Revoked).await.unwrap();
    assert!(matches!(
        r.set_status_if(b.id, DeviceStatus::PendingJoin, DeviceStatus::Joined)
            .await,
        Err(RegistryError::Revoked(id)) if id == b.id
    ));
    // A stale expectation that would also revoke: a plain conflict.
    let c = record(DeviceStatus::Joined);
    r.insert_device(c.clone()).await.unwrap();
    match r
        .set_status_if(c.id, DeviceStatus::Registered, DeviceStatus::Revoked)
        .await
    {
        Err(RegistryError::StatusConflict {
            expected: DeviceStatus::Registered,
            found: DeviceStatus::Joined,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Revoked is final, whatever the caller expects.
    for s in [
        DeviceStatus::Registered,
        DeviceStatus::PendingJoin,
        DeviceStatus::Joined,
    ] {
        assert!(matches!(
            r.set_status(b.id, s).await,
            Err(RegistryError::Revoked(id)) if id == b.id
        ));
        assert!(matches!(
            r.set_status_if(b.id, DeviceStatus::Revoked, s).await,
            Err(RegistryError::Revoked(id)) if id == b.id
        ));
    }
    assert_eq!(
        r.device(b.id).await.unwrap().unwrap().status,
        DeviceStatus::Revoked
    );
    // Revoking again is allowed (idempotent).
    assert_eq!(
        r.set_status(b.id, DeviceStatus::Revoked)
            .await
            .unwrap()
            .status,
        DeviceStatus::Revoked
    );
    assert_eq!(
        r.set_status_if(b.id, DeviceStatus::Revoked, DeviceStatus::Revoked)
            .await
            .unwrap()
            .status,
        DeviceStatus::Revoked
    );
    // Unknown devices.
    let ghost = DeviceId([0x5a; 8]);
    assert!(matches!(
        r.set_status_if(ghost, DeviceStatus::Registered, DeviceStatus::Joined)
            .await,
        Err(RegistryError::NotFound(id)) if id == ghost
    ));
    assert!(matches!(
        r.set_status(ghost, DeviceStatus::Joined).await,
        Err(RegistryError::NotFound(id)) if id == ghost
    ));
}

/// Many concurrent compare-and-sets from the same expected status: exactly one wins.
async fn cas_has_one_winner<R: Registry>(r: Arc<R>) {
    let a = record(DeviceStatus::PendingJoin);
    r.insert_device(a.clone()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let r = r.clone();
        let new = if i % 2 == 0 {
            DeviceStatus::Joined
        } else {
            DeviceStatus::Registered
        };
        tasks.push(tokio::spawn(async move {
            r.set_status_if(a.id, DeviceStatus::PendingJoin, new).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(RegistryError::StatusConflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rules_redb() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(RedbRegistry::open(&dir.path().join("fleet.redb")).unwrap());
    status_rules(&*r).await;
    cas_has_one_winner(r).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rules_postgres() {
    let url = std::env::var("KEAV_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("keav_unit_{}_{}", std::process::id(), nanos % 1_000_000_000);
    let r = match PgRegistry::connect(&url, &schema).await {
        Ok(r) => Arc::new(r),
        Err(e) => panic!(
            "PostgreSQL unreachable at {url} ({e}); start it (trust auth, user postgres, \
             database test) or set KEAV_TEST_POSTGRES"
        ),
    };
    let r2 = r.clone();
    let outcome = tokio::spawn(async move {
        status_rules(&*r2).await;
        cas_has_one_winner(r2).await;
    })
    .await;
    r.drop_schema().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
