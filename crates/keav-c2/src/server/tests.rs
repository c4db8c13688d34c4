//! Server tests that need its insides (the engine lock). They start a real Mosquitto (the
//! server spawns it on a free loopback port), like the end-to-end tests.

use super::*;
use crate::acl::{hash_password, new_password};
use crate::registry::RedbRegistry;

const PATIENCE: Duration = Duration::from_secs(20);

async fn server_with_device(dir: &Path) -> (Server<RedbRegistry>, DeviceId) {
    let registry = RedbRegistry::open(&dir.join("registry.redb")).unwrap();
    let o = ServerOptions::new(dir.join("server"), Zeroizing::new("op".into()));
    let server = Server::start(o, registry).await.unwrap();
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let id = key.device_id();
    server
        .add_device(DeviceRecord {
            id,
            alg: Alg::Ed25519,
            public_key: key.public().to_bytes(),
            status: DeviceStatus::Registered,
            password_hash: hash_password(&new_password()).unwrap(),
            created: unix_now(),
            name: None,
            groups: vec![],
        })
        .await
        .unwrap();
    (server, id)
}

/// A revocation whose caller is cancelled while it waits (an HTTP client that went away
/// while the engine was busy) still completes: registry, engine and broker account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_completes_when_its_caller_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (server, dev) = server_with_device(dir.path()).await;
    let passwd = dir.path().join("server/mosquitto").join(acl::PASSWD_FILE);
    assert!(std::fs::read_to_string(&passwd)
        .unwrap()
        .contains(&dev.to_hex()));
    // The engine is busy: the revocation waits for it, and its caller gives up.
    let busy = server.inner.engine.lock().await;
    let r = tokio::time::timeout(Duration::from_millis(50), server.revoke(dev)).await;
    assert!(r.is_err(), "the revocation did not wait for the engine");
    drop(busy);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let registry = server.registry().device(dev).await.unwrap().unwrap().status;
        let engine = server
            .inner
            .engine
            .lock()
            .await
            .device(dev)
            .map(|d| d.status);
        let account = std::fs::read_to_string(&passwd)
            .unwrap()
            .contains(&dev.to_hex());
        if registry == DeviceStatus::Revoked && engine == Some(DeviceStatus::Revoked) && !account {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revocation never completed: registry {registry:?}, engine {engine:?}, account {account}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

/// A status the engine decided (here: a join expiring on the tick sets the device back to
/// registered) never overwrites a revocation the registry holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_status_never_leaves_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (server, dev) = server_with_device(dir.path()).await;
    server
        .registry()
        .set_status(dev, DeviceStatus::Revoked)
        .await
        .unwrap();
    let inner = &server.inner;
    let mut eng = inner.engine.lock().await;
    for status in [
        DeviceStatus::Registered,
        DeviceStatus::PendingJoin,
        DeviceStatus::Joined,
    ] {
        assert!(!inner.write_status(&mut eng, dev, status).await.unwrap());
        assert_eq!(
            server.registry().device(dev).await.unwrap().unwrap().status,
            DeviceStatus::Revoked
        );
        // The engine follows the registry.
        assert_eq!(
            eng.device(dev).map(|d| d.status),
            Some(DeviceStatus::Revoked)
        );
    }
    let events = inner
        .apply_status(
            &mut eng,
            vec![
                ServerEvent::StatusChanged {
                    device: dev,
                    status: DeviceStatus::Joined,
                },
                ServerEvent::Joined {
                    device: dev,
                    method: JoinMethod::Simple,
                },
            ],
        )
        .await;
    assert!(events.is_empty(), "{events:?}");
    drop(eng);
    server.shutdown().await;
}
