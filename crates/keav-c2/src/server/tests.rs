//! Server tests that need its insides (the engine lock). They start a real Mosquitto (the
//! server spawns it on a free loopback port), like the end-to-end tests.

use super::*;
use crate::acl::{hash_password, new_password};
use crate::registry::RedbRegistry;

const PATIENCE: Duration = Duration::from_secs(20);

/// Options for a server in `dir/server` (operator token `op`), its broker spawned on a free
/// loopback port.
fn options(dir: &Path) -> ServerOptions {
    ServerOptions::new(dir.join("server"), Zeroizing::new("op".into()))
}

/// Adds a registered device with a fresh Ed25519 key; its id.
async fn add_registered<R: Registry>(server: &Server<R>) -> DeviceId {
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
    id
}

async fn server_with_device(dir: &Path) -> (Server<RedbRegistry>, DeviceId) {
    let registry = RedbRegistry::open(&dir.join("registry.redb")).unwrap();
    let server = Server::start(options(dir), registry).await.unwrap();
    let id = add_registered(&server).await;
    (server, id)
}

/// Waits (bounded) until the engine holds `dev` as revoked and the broker's password file
/// (`passwd`) has no account of it any more; with `with_registry`, also until the registry says
/// revoked.
async fn until_revoked<R: Registry>(
    server: &Server<R>,
    dev: DeviceId,
    passwd: &Path,
    with_registry: bool,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let registry = match with_registry {
            true => Some(server.registry().device(dev).await.unwrap().unwrap().status),
            false => None,
        };
        let engine = server
            .inner
            .engine
            .lock()
            .await
            .device(dev)
            .map(|d| d.status);
        let account = std::fs::read_to_string(passwd)
            .unwrap()
            .contains(&dev.to_hex());
        if matches!(registry, None | Some(DeviceStatus::Revoked))
            && engine == Some(DeviceStatus::Revoked)
            && !account
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revocation never completed: registry {registry:?}, engine {engine:?}, account {account}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    until_revoked(&server, dev, &passwd, true).await;
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

/// A registry where a device is revoked right after its record is read (the record read is
/// the one from before): the identity service revoking between the server's read and write.
struct RevokedBetween {
    inner: RedbRegistry,
    revoke_after_read: std::sync::Mutex<Option<DeviceId>>,
    /// Device reads fail (a registry that went away after a write, as a PostgreSQL
    /// connection can).
    fail_reads: std::sync::atomic::AtomicBool,
}

impl RevokedBetween {
    /// A server in `dir` on this registry (nothing revoked between reads, reads working).
    async fn server(dir: &Path) -> Server<RevokedBetween> {
        let registry = RevokedBetween {
            inner: RedbRegistry::open(&dir.join("registry.redb")).unwrap(),
            revoke_after_read: std::sync::Mutex::new(None),
            fail_reads: Default::default(),
        };
        Server::start(options(dir), registry).await.unwrap()
    }
}

impl Registry for RevokedBetween {
    async fn insert_device(&self, record: DeviceRecord) -> Result<(), RegistryError> {
        self.inner.insert_device(record).await
    }
    async fn enroll_device(
        &self,
        record: DeviceRecord,
        token: TokenHash,
        now: u64,
    ) -> Result<(), RegistryError> {
        self.inner.enroll_device(record, token, now).await
    }
    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(RegistryError::Corrupt("read failed (test)".into()));
        }
        let rec = self.inner.device(id).await?;
        let revoke = self.revoke_after_read.lock().unwrap().take();
        if revoke == Some(id) {
            self.inner.set_status(id, DeviceStatus::Revoked).await?;
        }
        Ok(rec)
    }
    async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.inner.devices().await
    }
    async fn set_status(
        &self,
        id: DeviceId,
        status: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.inner.set_status(id, status).await
    }
    async fn set_status_if(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        new: DeviceStatus,
    ) -> Result<DeviceRecord, RegistryError> {
        self.inner.set_status_if(id, expected, new).await
    }
    async fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> Result<(), RegistryError> {
        self.inner.set_groups(id, groups).await
    }
    async fn delete_device(&self, id: DeviceId) -> Result<bool, RegistryError> {
        self.inner.delete_device(id).await
    }
    async fn load_counters(&self, peer: DeviceId) -> Result<Option<Vec<u8>>, RegistryError> {
        self.inner.load_counters(peer).await
    }
    async fn store_counters(&self, peer: DeviceId, state: Vec<u8>) -> Result<(), RegistryError> {
        self.inner.store_counters(peer, state).await
    }
    async fn load_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        self.inner.load_blob(kind, peer).await
    }
    async fn store_blob(
        &self,
        kind: BlobKind,
        peer: DeviceId,
        blob: Vec<u8>,
    ) -> Result<(), RegistryError> {
        self.inner.store_blob(kind, peer, blob).await
    }
    async fn record_response(
        &self,
        token: Vec<u8>,
        device: DeviceId,
        status: u8,
    ) -> Result<(), RegistryError> {
        self.inner.record_response(token, device, status).await
    }
    async fn responses(&self, token: Vec<u8>) -> Result<Vec<ResponseRecord>, RegistryError> {
        self.inner.responses(token).await
    }
    async fn add_enrollment(
        &self,
        token: TokenHash,
        enrollment: Enrollment,
        now: u64,
    ) -> Result<(), RegistryError> {
        self.inner.add_enrollment(token, enrollment, now).await
    }
    async fn enrollment(&self, token: TokenHash, now: u64) -> Result<Enrollment, RegistryError> {
        self.inner.enrollment(token, now).await
    }
    async fn devices_in_group(&self, group: String) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.inner.devices_in_group(group).await
    }
}

/// The status read under the engine lock is stale (revoked right after the read): the
/// compare-and-set refuses the write, the registry stays revoked, the engine follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_between_read_and_write_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let server = RevokedBetween::server(dir.path()).await;
    let dev = add_registered(&server).await;
    let inner = &server.inner;
    let mut eng = inner.engine.lock().await;
    *server.registry().revoke_after_read.lock().unwrap() = Some(dev);
    let written = inner
        .write_status(&mut eng, dev, DeviceStatus::Joined)
        .await
        .unwrap();
    assert!(!written);
    assert_eq!(
        server
            .registry()
            .inner
            .device(dev)
            .await
            .unwrap()
            .unwrap()
            .status,
        DeviceStatus::Revoked
    );
    assert_eq!(
        eng.device(dev).map(|d| d.status),
        Some(DeviceStatus::Revoked)
    );
    drop(eng);
    server.shutdown().await;
}

/// One raw HTTP/1.1 request on a fresh connection; the answer's status code.
async fn status_of(addr: SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
}

/// The identity service's revocation route, its client gone while the revocation waits for
/// the engine: the request's future is dropped (its place among those in flight is freed),
/// yet the revocation completes (engine and broker account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_revocation_completes_when_its_client_goes_away() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let registry = RedbRegistry::open(&dir.path().join("registry.redb")).unwrap();
    let mut o = options(dir.path());
    o.http = Some("127.0.0.1:0".parse().unwrap());
    o.http_max_in_flight = 1;
    // The operator's requests have their own places.
    o.http_max_operator_in_flight = 1;
    let server = Server::start(o, registry).await.unwrap();
    let addr = server.http_addr().unwrap();
    let dev = add_registered(&server).await;
    let passwd = dir.path().join("server/mosquitto").join(acl::PASSWD_FILE);
    let list = "GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(addr, list).await, 200);

    let busy = server.inner.engine.lock().await;
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let revoke = format!(
        "POST /v1/devices/{dev}/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op\r\nContent-Length: 0\r\n\r\n"
    );
    client.write_all(revoke.as_bytes()).await.unwrap();
    // The registry is written first; then the revocation waits for the engine.
    let deadline = Instant::now() + PATIENCE;
    while server.registry().device(dev).await.unwrap().unwrap().status != DeviceStatus::Revoked {
        assert!(Instant::now() < deadline, "the revocation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It holds the only place in flight.
    assert_eq!(status_of(addr, list).await, 503);
    // The client goes away; the server notices (the place is freed).
    drop(client);
    let deadline = Instant::now() + PATIENCE;
    while status_of(addr, list).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the dropped request never let go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(busy);
    until_revoked(&server, dev, &passwd, false).await;
    server.shutdown().await;
}

/// A revocation whose registry write succeeds and whose later registry reads fail still
/// reaches the engine (the device's messages refused) and the broker (its account gone), by
/// both ways in: the operator's revocation and the identity service's (which writes the
/// registry itself, then removes the broker account through the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_engine_and_broker_when_registry_reads_fail() {
    let dir = tempfile::tempdir().unwrap();
    let server = RevokedBetween::server(dir.path()).await;
    let passwd = dir.path().join("server/mosquitto").join(acl::PASSWD_FILE);
    let by_operator = add_registered(&server).await;
    let by_identity = add_registered(&server).await;
    for dev in [by_operator, by_identity] {
        assert!(std::fs::read_to_string(&passwd)
            .unwrap()
            .contains(&dev.to_hex()));
    }
    server.registry().fail_reads.store(true, Ordering::SeqCst);

    server.revoke(by_operator).await.unwrap();
    // The identity service's way: registry first, then the account through the server.
    server
        .registry()
        .inner
        .set_status(by_identity, DeviceStatus::Revoked)
        .await
        .unwrap();
    let accounts = FleetAccounts {
        inner: server.inner.clone(),
    };
    accounts.remove(by_identity.to_hex()).await.unwrap();

    for dev in [by_operator, by_identity] {
        let engine = server
            .inner
            .engine
            .lock()
            .await
            .device(dev)
            .map(|d| d.status);
        assert_eq!(engine, Some(DeviceStatus::Revoked), "{dev}");
        assert!(!std::fs::read_to_string(&passwd)
            .unwrap()
            .contains(&dev.to_hex()));
    }
    server.registry().fail_reads.store(false, Ordering::SeqCst);
    server.shutdown().await;
}
