//! The fleet registry (redb and PostgreSQL, one suite) and the identity service over real
//! HTTP on loopback: proof of possession, enrollment tokens and their server-key pin,
//! stateless nonces, operator auth, malformed input, duplicates, revocation, body limit,
//! persistence across restarts.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keav_c2::acl::{BrokerUser, Role};
use keav_c2::identity::api::EnrollmentRequestBody;
use keav_c2::identity::{
    registration_message, serve, BrokerAccounts, Client, Clock, EnrollmentToken, IdentityConfig,
    IdentityError, IdentityState, NONCE_LEN,
};
use keav_c2::keys::{Alg, DeviceId, SigningKey};
use keav_c2::registry::{
    BlobKind, DeviceRecord, DeviceStatus, Enrollment, RedbRegistry, Registry, RegistryError,
    TokenHash, MAX_BLOB_LEN,
};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------------------
// The registry suite, run against both engines.

fn record(key: &SigningKey, created: u64) -> DeviceRecord {
    DeviceRecord {
        id: key.device_id(),
        alg: key.alg(),
        public_key: key.public().to_bytes(),
        status: DeviceStatus::Registered,
        password_hash: format!("$test${}", hex::encode(key.device_id().0)),
        created,
        name: None,
        groups: Vec::new(),
    }
}

async fn registry_suite<R: Registry>(r: &R) {
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    let b = SigningKey::generate(Alg::Ed25519).unwrap();
    let rsa = SigningKey::generate(Alg::RsaPss2048).unwrap();

    // Insert and read back.
    assert!(r.devices().await.unwrap().is_empty());
    let mut ra = record(&a, 1000);
    ra.name = Some("pump-7".into());
    ra.groups = vec!["pumps".into()];
    r.insert_device(ra.clone()).await.unwrap();
    assert_eq!(r.device(ra.id).await.unwrap(), Some(ra.clone()));
    let rr = record(&rsa, 1001);
    r.insert_device(rr.clone()).await.unwrap();
    assert_eq!(r.device(rr.id).await.unwrap(), Some(rr.clone()));
    assert_eq!(r.devices().await.unwrap().len(), 2);
    assert_eq!(r.device(b.device_id()).await.unwrap(), None);

    // Duplicates: the same record, the same id with another key, the same key under another id.
    assert!(matches!(
        r.insert_device(ra.clone()).await,
        Err(RegistryError::DuplicateKey(id)) if id == ra.id
    ));
    let mut same_id = record(&b, 1002);
    same_id.id = ra.id;
    assert!(matches!(
        r.insert_device(same_id).await,
        Err(RegistryError::DuplicateId(id)) if id == ra.id
    ));
    let mut same_key = record(&a, 1003);
    same_key.id = DeviceId([9; 8]);
    assert!(matches!(
        r.insert_device(same_key).await,
        Err(RegistryError::DuplicateKey(id)) if id == ra.id
    ));
    assert_eq!(r.devices().await.unwrap().len(), 2);

    // Out-of-bounds values are refused before storing.
    let mut bad = record(&b, 1);
    bad.groups = vec!["no spaces".into()];
    assert!(matches!(
        r.insert_device(bad).await,
        Err(RegistryError::Invalid(_))
    ));

    // Status and groups.
    let joined = r.set_status(ra.id, DeviceStatus::Joined).await.unwrap();
    assert_eq!(joined.status, DeviceStatus::Joined);
    assert_eq!(
        r.device(ra.id).await.unwrap().unwrap().status,
        DeviceStatus::Joined
    );
    assert!(matches!(
        r.set_status(b.device_id(), DeviceStatus::Joined).await,
        Err(RegistryError::NotFound(_))
    ));
    r.set_groups(rr.id, vec!["pumps".into(), "site-a".into()])
        .await
        .unwrap();
    let pumps: Vec<DeviceId> = r
        .devices_in_group("pumps".into())
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    let mut want = vec![ra.id, rr.id];
    want.sort();
    assert_eq!(pumps, want);
    assert_eq!(r.devices_in_group("site-a".into()).await.unwrap().len(), 1);

    // Counters: absent, stored, replaced; per peer.
    assert_eq!(r.load_counters(ra.id).await.unwrap(), None);
    r.store_counters(ra.id, vec![1, 2, 3]).await.unwrap();
    r.store_counters(rr.id, vec![9]).await.unwrap();
    r.store_counters(ra.id, vec![4, 5]).await.unwrap();
    assert_eq!(r.load_counters(ra.id).await.unwrap(), Some(vec![4, 5]));
    assert_eq!(r.load_counters(rr.id).await.unwrap(), Some(vec![9]));
    assert!(r
        .store_counters(ra.id, vec![0; 64 * 1024 + 1])
        .await
        .is_err());

    // Blobs: absent, stored, replaced; per kind and per peer; bounded.
    assert_eq!(
        r.load_blob(BlobKind::Confidential, ra.id).await.unwrap(),
        None
    );
    r.store_blob(BlobKind::Confidential, ra.id, vec![1, 2])
        .await
        .unwrap();
    r.store_blob(BlobKind::ConfidentialPolicy, ra.id, vec![1])
        .await
        .unwrap();
    r.store_blob(BlobKind::Confidential, rr.id, vec![7; 300])
        .await
        .unwrap();
    r.store_blob(BlobKind::Confidential, ra.id, vec![3, 4, 5])
        .await
        .unwrap();
    assert_eq!(
        r.load_blob(BlobKind::Confidential, ra.id).await.unwrap(),
        Some(vec![3, 4, 5])
    );
    assert_eq!(
        r.load_blob(BlobKind::ConfidentialPolicy, ra.id)
            .await
            .unwrap(),
        Some(vec![1])
    );
    assert_eq!(
        r.load_blob(BlobKind::Confidential, rr.id).await.unwrap(),
        Some(vec![7; 300])
    );
    assert_eq!(
        r.load_blob(BlobKind::ConfidentialPolicy, rr.id)
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        r.store_blob(BlobKind::Confidential, ra.id, vec![0; MAX_BLOB_LEN + 1])
            .await,
        Err(RegistryError::Invalid(_))
    ));
    // Counters and blobs are separate slots.
    assert_eq!(r.load_counters(ra.id).await.unwrap(), Some(vec![4, 5]));

    // Responses per token; a token that is a prefix of another does not see its responses.
    r.record_response(b"ab".to_vec(), ra.id, 0).await.unwrap();
    r.record_response(b"ab".to_vec(), rr.id, 3).await.unwrap();
    r.record_response(b"abc".to_vec(), ra.id, 7).await.unwrap();
    r.record_response(b"ab".to_vec(), ra.id, 1).await.unwrap(); // replaces
    let got = r.responses(b"ab".to_vec()).await.unwrap();
    assert_eq!(got.len(), 2);
    let a_status = got.iter().find(|x| x.device == ra.id).unwrap().status;
    let r_status = got.iter().find(|x| x.device == rr.id).unwrap().status;
    assert_eq!((a_status, r_status), (1, 3));
    assert!(got.windows(2).all(|w| w[0].device < w[1].device));
    let abc = r.responses(b"abc".to_vec()).await.unwrap();
    assert_eq!(abc.len(), 1);
    assert_eq!((abc[0].device, abc[0].status), (ra.id, 7));
    assert!(r.responses(b"zz".to_vec()).await.unwrap().is_empty());
    assert!(r.record_response(Vec::new(), ra.id, 0).await.is_err());

    // Enrollment tokens: peek, expiry, one use, and no use on a refused device.
    let t1 = TokenHash::of("token-one");
    let e1 = Enrollment {
        expires: 2000,
        name: Some("cam".into()),
        groups: vec!["cams".into()],
    };
    r.add_enrollment(t1, e1.clone(), 1000).await.unwrap();
    assert_eq!(r.enrollment(t1, 1999).await.unwrap(), e1);
    assert!(matches!(
        r.enrollment(t1, 2000).await,
        Err(RegistryError::EnrollmentExpired)
    ));
    assert!(matches!(
        r.enrollment(TokenHash::of("nope"), 1000).await,
        Err(RegistryError::EnrollmentInvalid)
    ));
    // A duplicate device leaves the token usable.
    assert!(matches!(
        r.enroll_device(ra.clone(), t1, 1500).await,
        Err(RegistryError::DuplicateKey(_))
    ));
    assert!(matches!(
        r.enroll_device(record(&b, 1), t1, 2000).await,
        Err(RegistryError::EnrollmentExpired)
    ));
    assert!(r.device(b.device_id()).await.unwrap().is_none());
    r.enroll_device(record(&b, 1500), t1, 1500).await.unwrap();
    assert!(r.device(b.device_id()).await.unwrap().is_some());
    let c = SigningKey::generate(Alg::Ed25519).unwrap();
    assert!(matches!(
        r.enroll_device(record(&c, 1500), t1, 1500).await,
        Err(RegistryError::EnrollmentInvalid)
    ));
    assert!(matches!(
        r.enrollment(t1, 1500).await,
        Err(RegistryError::EnrollmentInvalid)
    ));
    // Adding a token purges expired ones.
    let t2 = TokenHash::of("token-two");
    let t3 = TokenHash::of("token-three");
    r.add_enrollment(
        t2,
        Enrollment {
            expires: 3000,
            name: None,
            groups: vec![],
        },
        1000,
    )
    .await
    .unwrap();
    r.add_enrollment(
        t3,
        Enrollment {
            expires: 5000,
            name: None,
            groups: vec![],
        },
        3500,
    )
    .await
    .unwrap();
    assert!(matches!(
        r.enrollment(t2, 0).await,
        Err(RegistryError::EnrollmentInvalid)
    ));
    assert!(r.enrollment(t3, 3500).await.is_ok());

    // Delete: the key can be registered again, counters are gone.
    assert!(r.delete_device(ra.id).await.unwrap());
    assert!(!r.delete_device(ra.id).await.unwrap());
    assert_eq!(r.device(ra.id).await.unwrap(), None);
    assert_eq!(r.load_counters(ra.id).await.unwrap(), None);
    for kind in BlobKind::ALL {
        assert_eq!(r.load_blob(kind, ra.id).await.unwrap(), None);
    }
    // Another device's blob is untouched.
    assert!(r
        .load_blob(BlobKind::Confidential, rr.id)
        .await
        .unwrap()
        .is_some());
    r.insert_device(ra.clone()).await.unwrap();
    assert_eq!(r.devices().await.unwrap().len(), 3);
}

#[tokio::test]
async fn registry_suite_redb() {
    let dir = tempfile::tempdir().unwrap();
    let r = RedbRegistry::open(&dir.path().join("fleet.redb")).unwrap();
    registry_suite(&r).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn registry_suite_postgres() {
    common::pg::in_schema("test", |s| async move {
        registry_suite(&common::pg::connect(&s).await).await;
    })
    .await;
}

#[tokio::test]
async fn redb_corrupt_rows_are_typed_errors() {
    use redb::{ReadableTable, TableDefinition};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.redb");
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    {
        let r = RedbRegistry::open(&path).unwrap();
        r.insert_device(record(&a, 5)).await.unwrap();
        r.store_counters(a.device_id(), vec![1, 2, 3])
            .await
            .unwrap();
    }
    // Flip one bit in the stored device row and in the counters row, as a disk would.
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        for name in ["c2_devices", "c2_counters"] {
            let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new(name);
            let mut t = tx.open_table(def).unwrap();
            let mut row = t
                .get(a.device_id().0.as_slice())
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            row[2] ^= 0x10;
            t.insert(a.device_id().0.as_slice(), row.as_slice())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let r = RedbRegistry::open(&path).unwrap();
    assert!(matches!(
        r.device(a.device_id()).await,
        Err(RegistryError::Corrupt(_))
    ));
    assert!(matches!(r.devices().await, Err(RegistryError::Corrupt(_))));
    assert!(matches!(
        r.load_counters(a.device_id()).await,
        Err(RegistryError::Corrupt(_))
    ));
}

// ---------------------------------------------------------------------------------------
// The identity service.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Add(BrokerUser),
    Remove(String),
}

/// Broker accounts double: records every call, makes test credentials.
#[derive(Default)]
struct FakeAccounts {
    events: Mutex<Vec<Event>>,
}

fn fake_hash(password: &str) -> String {
    format!("$test${}", hex::encode(Sha256::digest(password.as_bytes())))
}

impl BrokerAccounts for FakeAccounts {
    fn new_credentials(&self) -> Result<(Zeroizing<String>, String), IdentityError> {
        let mut raw = [0u8; 16];
        OsRng.fill_bytes(&mut raw);
        let password = Zeroizing::new(hex::encode(raw));
        let hash = fake_hash(&password);
        Ok((password, hash))
    }

    async fn add(&self, user: BrokerUser) -> Result<(), IdentityError> {
        self.events.lock().unwrap().push(Event::Add(user));
        Ok(())
    }

    async fn remove(&self, username: String) -> Result<(), IdentityError> {
        self.events.lock().unwrap().push(Event::Remove(username));
        Ok(())
    }
}

const OPERATOR: &str = "operator-secret-token-0123456789";

struct Service {
    addr: SocketAddr,
    state: Arc<IdentityState<RedbRegistry, FakeAccounts>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), IdentityError>>>,
    now: Arc<AtomicU64>,
    server_key: SigningKey,
}

impl Service {
    async fn start(path: &std::path::Path) -> Service {
        Service::start_at(path, Arc::new(AtomicU64::new(1_700_000_000))).await
    }

    async fn start_at(path: &std::path::Path, now: Arc<AtomicU64>) -> Service {
        Service::start_with(path, now, |_| {}).await
    }

    /// A service whose configuration `tweak` adjusts (after the test clock is set).
    async fn start_with(
        path: &std::path::Path,
        now: Arc<AtomicU64>,
        tweak: impl FnOnce(&mut IdentityConfig),
    ) -> Service {
        let server_key = SigningKey::generate(Alg::Ed25519).unwrap();
        Service::start_keyed(path, now, server_key, tweak).await
    }

    /// A service handing out `server_key` as the C2 server's key.
    async fn start_keyed(
        path: &std::path::Path,
        now: Arc<AtomicU64>,
        server_key: SigningKey,
        tweak: impl FnOnce(&mut IdentityConfig),
    ) -> Service {
        let registry = RedbRegistry::open(path).unwrap();
        let mut config = IdentityConfig::new(
            Zeroizing::new(OPERATOR.to_string()),
            "127.0.0.1:18830".into(),
            server_key.public(),
        );
        let clock_now = now.clone();
        config.clock = Clock::from_fn(move || clock_now.load(Ordering::SeqCst));
        config.nonce_ttl = 60;
        tweak(&mut config);
        let state = IdentityState::new(registry, FakeAccounts::default(), config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Service {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
            now,
            server_key,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.addr)).unwrap()
    }

    fn operator(&self) -> Client {
        self.client()
            .with_operator_token(Zeroizing::new(OPERATOR.to_string()))
    }

    async fn token(&self) -> EnrollmentToken {
        self.operator()
            .create_enrollment(&EnrollmentRequestBody::default())
            .await
            .unwrap()
            .0
    }

    fn events(&self) -> Vec<Event> {
        self.state.accounts().events.lock().unwrap().clone()
    }

    async fn raw(&self, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, Value) {
        raw_http(self.addr, method, path, auth, body).await
    }

    /// A fresh nonce from the service.
    /// Stores an enrollment for the token secret `secret` (never expiring, no name, no
    /// groups) straight into the registry.
    async fn accept_token(&self, secret: &str) {
        self.state
            .registry()
            .add_enrollment(
                TokenHash::of(secret),
                Enrollment {
                    expires: u64::MAX,
                    name: None,
                    groups: Vec::new(),
                },
                0,
            )
            .await
            .unwrap();
    }

    /// POSTs `body` to the registration route (no authorization).
    async fn post_register(&self, body: &[u8]) -> (u16, Value) {
        self.raw("POST", "/v1/register", None, body).await
    }

    async fn nonce(&self) -> [u8; NONCE_LEN] {
        self.client().challenge().await.unwrap().nonce
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One HTTP/1.1 exchange written by hand (so tests can send anything): status and JSON body.
async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    // The server may answer (413) and close before reading everything: ignore write errors.
    let _ = s.write_all(&req).await;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A registration body signed by `signer` over `nonce_signed`, claiming `key`'s public key
/// and `nonce_sent`.
fn register_body(
    key: &SigningKey,
    signer: &SigningKey,
    token: &str,
    nonce_sent: &[u8; NONCE_LEN],
    nonce_signed: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let pk = key.public().to_bytes();
    let sig = signer
        .sign(&registration_message(nonce_signed, key.alg(), &pk))
        .unwrap();
    serde_json::to_vec(&json!({
        "alg": key.alg().name(),
        "public_key": STANDARD.encode(&pk),
        "enrollment_token": token,
        "nonce": STANDARD.encode(nonce_sent),
        "signature": STANDARD.encode(&sig),
    }))
    .unwrap()
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("<no code>")
}

fn refused(r: Result<impl std::fmt::Debug, IdentityError>) -> (u16, String) {
    match r {
        Err(IdentityError::Refused { status, code }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn register_ed25519_and_rsa_happy_path() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    for alg in [Alg::Ed25519, Alg::RsaPss2048] {
        let key = SigningKey::generate(alg).unwrap();
        let (token, expires) = svc
            .operator()
            .create_enrollment(&EnrollmentRequestBody {
                ttl_secs: Some(600),
                name: Some(format!("dev-{}", alg.name())),
                groups: vec!["pumps".into()],
            })
            .await
            .unwrap();
        assert_eq!(expires, svc.now.load(Ordering::SeqCst) + 600);
        let reg = svc.client().register(&key, &token).await.unwrap();
        let id = key.device_id();
        assert_eq!(reg.device_id, id);
        assert_eq!(reg.broker_username, id.to_hex());
        assert_eq!(reg.broker, "127.0.0.1:18830");
        assert_eq!(reg.server_key, svc.server_key.public());
        assert_eq!(reg.server_id, svc.server_key.device_id());
        assert_eq!(reg.server_id, svc.state.server_id());
        assert!(reg.broker_password.expose().len() >= 16);
        // The password is not printed and not stored; its hash is, and went to the broker.
        assert!(!format!("{reg:?}").contains(reg.broker_password.expose()));
        let stored = svc.state.registry().device(id).await.unwrap().unwrap();
        assert_eq!(stored.status, DeviceStatus::Registered);
        assert_eq!(
            stored.password_hash,
            fake_hash(reg.broker_password.expose())
        );
        assert_eq!(stored.public_key, key.public().to_bytes());
        assert_eq!(stored.groups, vec!["pumps".to_string()]);
        let events = svc.events();
        assert_eq!(
            events.last(),
            Some(&Event::Add(BrokerUser {
                username: id.to_hex(),
                password_hash: stored.password_hash.clone(),
                role: Role::Device,
            }))
        );
        // The operator sees it.
        let d = svc.operator().device(id).await.unwrap();
        assert_eq!(d.status, "registered");
        assert_eq!(d.alg, alg.name());
        assert_eq!(
            d.name.as_deref(),
            Some(format!("dev-{}", alg.name()).as_str())
        );
    }
    let all = svc.operator().devices().await.unwrap();
    assert_eq!(all.len(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn proof_of_possession_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let other = SigningKey::generate(Alg::Ed25519).unwrap();
    let token = svc.token().await;

    // Signed by another key.
    let n = svc.nonce().await;
    let (st, v) = svc
        .post_register(&register_body(&key, &other, &token, &n, &n))
        .await;
    assert_eq!((st, code(&v)), (422, "bad_signature"));
    // Signed over another nonce than the one sent.
    let n1 = svc.nonce().await;
    let n2 = svc.nonce().await;
    let (st, v) = svc
        .post_register(&register_body(&key, &key, &token, &n1, &n2))
        .await;
    assert_eq!((st, code(&v)), (422, "bad_signature"));
    // The algorithm id is signed: a proof made for another algorithm id does not verify.
    let n3 = svc.nonce().await;
    let pk = key.public().to_bytes();
    let sig = key
        .sign(&registration_message(&n3, Alg::RsaPss2048, &pk))
        .unwrap();
    let body = json!({
        "alg": "ed25519",
        "public_key": STANDARD.encode(&pk),
        "enrollment_token": token.as_str(),
        "nonce": STANDARD.encode(n3),
        "signature": STANDARD.encode(&sig),
    });
    let (st, v) = svc.post_register(body.to_string().as_bytes()).await;
    assert_eq!((st, code(&v)), (422, "bad_signature"));
    // Nothing was stored and the broker saw nothing.
    assert!(svc.state.registry().devices().await.unwrap().is_empty());
    assert!(svc.events().is_empty());
    // The failed attempts used up neither their nonces nor the enrollment token (a failed
    // proof proves nothing, so there is nothing to replay); a good proof uses both.
    assert_eq!(svc.state.used_nonces(), 0);
    let (st, _) = svc
        .post_register(&register_body(&key, &key, &token, &n1, &n1))
        .await;
    assert_eq!(st, 201);
    let third = SigningKey::generate(Alg::Ed25519).unwrap();
    let token2 = svc.token().await;
    let (st, v) = svc
        .post_register(&register_body(&third, &third, &token2, &n1, &n1))
        .await;
    assert_eq!((st, code(&v)), (409, "nonce_used"));
    let (st, v) = svc
        .post_register(&register_body(&third, &third, &token, &n2, &n2))
        .await;
    assert_eq!(st, 401, "{v}");
    svc.stop().await;
}

#[tokio::test]
async fn nonces_are_single_use_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    let b = SigningKey::generate(Alg::Ed25519).unwrap();
    let t1 = svc.token().await;
    let t2 = svc.token().await;
    let n = svc.nonce().await;
    let (st, _) = svc.post_register(&register_body(&a, &a, &t1, &n, &n)).await;
    assert_eq!(st, 201);
    // Replaying the nonce (with a fresh token and another key) is refused.
    let (st, v) = svc.post_register(&register_body(&b, &b, &t2, &n, &n)).await;
    assert_eq!((st, code(&v)), (409, "nonce_used"));
    // A nonce the service never issued.
    let made_up = [0x5a; NONCE_LEN];
    let (st, v) = svc
        .post_register(&register_body(&b, &b, &t2, &made_up, &made_up))
        .await;
    assert_eq!((st, code(&v)), (400, "nonce_invalid"));
    // An expired nonce (60 s lifetime here): refused from its expiry on, every time.
    let n = svc.nonce().await;
    svc.now.fetch_add(60, Ordering::SeqCst);
    for _ in 0..2 {
        let (st, v) = svc.post_register(&register_body(&b, &b, &t2, &n, &n)).await;
        assert_eq!((st, code(&v)), (410, "nonce_expired"));
    }
    // The token survived all of that.
    svc.client().register(&b, &t2).await.unwrap();
    svc.stop().await;
}

#[tokio::test]
async fn enrollment_tokens_are_required_once_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    let b = SigningKey::generate(Alg::Ed25519).unwrap();
    // No token, a made-up token.
    for t in ["", "not-a-token-the-operator-issued"] {
        let (st, c) = refused(svc.client().register(&a, t).await);
        assert_eq!(st, 401, "token {t:?}: {c}");
        assert_eq!(c, "enrollment_invalid");
    }
    // A token missing from the JSON body altogether.
    let n = svc.nonce().await;
    let mut body: Value = serde_json::from_slice(&register_body(&a, &a, "x", &n, &n)).unwrap();
    body.as_object_mut().unwrap().remove("enrollment_token");
    let (st, _) = svc.post_register(body.to_string().as_bytes()).await;
    assert_eq!(st, 400);
    // One use.
    let t = svc.token().await;
    svc.client().register(&a, &t).await.unwrap();
    let (st, c) = refused(svc.client().register(&b, &t).await);
    assert_eq!((st, c.as_str()), (401, "enrollment_invalid"));
    // Expiry.
    let (t, expires) = svc
        .operator()
        .create_enrollment(&EnrollmentRequestBody {
            ttl_secs: Some(30),
            ..Default::default()
        })
        .await
        .unwrap();
    svc.now.store(expires, Ordering::SeqCst);
    let (st, c) = refused(svc.client().register(&b, &t).await);
    assert_eq!((st, c.as_str()), (401, "enrollment_expired"));
    assert!(svc
        .state
        .registry()
        .device(b.device_id())
        .await
        .unwrap()
        .is_none());
    // Bad lifetimes.
    let (st, c) = refused(
        svc.operator()
            .create_enrollment(&EnrollmentRequestBody {
                ttl_secs: Some(0),
                ..Default::default()
            })
            .await,
    );
    assert_eq!((st, c.as_str()), (400, "bad_ttl"));
    svc.stop().await;
}

#[tokio::test]
async fn operator_calls_need_the_operator_token() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let id = "0011223344556677";
    let routes = [
        ("POST", "/v1/enrollments".to_string()),
        ("GET", "/v1/devices".to_string()),
        ("GET", format!("/v1/devices/{id}")),
        ("POST", format!("/v1/devices/{id}/revoke")),
    ];
    let wrong = format!("Bearer {OPERATOR}x");
    let short = "Bearer operator".to_string();
    let basic = format!("Basic {OPERATOR}");
    for (method, path) in &routes {
        for auth in [
            None,
            Some(wrong.as_str()),
            Some(short.as_str()),
            Some(basic.as_str()),
        ] {
            let (st, v) = svc.raw(method, path, auth, b"").await;
            assert_eq!(
                (st, code(&v)),
                (401, "unauthorized"),
                "{method} {path} {auth:?}"
            );
        }
    }
    // A device's enrollment token is not an operator token.
    let t = svc.token().await;
    let (st, _) = svc
        .raw(
            "GET",
            "/v1/devices",
            Some(&format!("Bearer {}", t.as_str())),
            b"",
        )
        .await;
    assert_eq!(st, 401);
    // The right one works.
    let (st, v) = svc
        .raw(
            "GET",
            "/v1/devices",
            Some(&format!("Bearer {OPERATOR}")),
            b"",
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["devices"], json!([]));
    svc.stop().await;
}

/// An unauthenticated caller is answered 401 before its body is read: a request that
/// announces a body and never sends it gets its answer at once, instead of holding the
/// connection (and a place among the requests in flight) while the service waits for it.
#[tokio::test]
async fn unauthenticated_enrollment_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let mut s = TcpStream::connect(svc.addr).await.unwrap();
    let head = format!(
        "POST /v1/enrollments HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{",
        svc.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Read until the end of the answer's head (bounded: a service that waits for the body
    // never answers and the test fails).
    let mut resp = Vec::new();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer while the body is outstanding");
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 401"), "{text:?}");
    svc.stop().await;
}

#[tokio::test]
async fn malformed_registrations_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let token = svc.token().await;
    let good = SigningKey::generate(Alg::Ed25519).unwrap();
    let n = svc.nonce().await;
    let base: Value = serde_json::from_slice(&register_body(&good, &good, &token, &n, &n)).unwrap();
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b.to_string().into_bytes()
    };
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    let small_rsa = rsa::RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
    let small_rsa_der = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        small_rsa
            .to_public_key()
            .to_pkcs1_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let e3_rsa =
        rsa::RsaPrivateKey::new_with_exp(&mut OsRng, 2048, &rsa::BigUint::from(3u32)).unwrap();
    let e3_der = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        e3_rsa
            .to_public_key()
            .to_pkcs1_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"{\"alg\": ".to_vec(), "bad_json"),
        ("unknown field", with("extra", json!(1)), "bad_json"),
        ("unknown alg", with("alg", json!("dsa")), "bad_alg"),
        (
            "key not base64",
            with("public_key", json!("@@@@")),
            "bad_key",
        ),
        (
            "ed25519 key 31 bytes",
            with("public_key", json!(STANDARD.encode([7u8; 31]))),
            "bad_key",
        ),
        (
            "weak ed25519 key",
            with("public_key", json!(STANDARD.encode(identity_point))),
            "bad_key",
        ),
        (
            "RSA key under ed25519",
            with("public_key", json!(STANDARD.encode(&e3_der))),
            "bad_key",
        ),
        (
            "huge key",
            with("public_key", json!(STANDARD.encode(vec![1u8; 4000]))),
            "bad_key",
        ),
        (
            "nonce short",
            with("nonce", json!(STANDARD.encode([1u8; 31]))),
            "bad_nonce",
        ),
        (
            "signature short",
            with("signature", json!(STANDARD.encode([1u8; 63]))),
            "bad_signature_format",
        ),
        (
            "signature not base64",
            with("signature", json!("!")),
            "bad_signature_format",
        ),
    ];
    for (what, body, want) in cases {
        let (st, v) = svc.post_register(&body).await;
        assert_eq!((st, code(&v)), (400, want), "{what}: {v}");
    }
    // RSA keys that are not 2048-bit / e = 65537.
    for (what, der) in [("RSA-1024", &small_rsa_der), ("RSA e=3", &e3_der)] {
        let mut b = base.clone();
        b["alg"] = json!("rsa2048");
        b["public_key"] = json!(STANDARD.encode(der));
        b["signature"] = json!(STANDARD.encode([0u8; 256]));
        let (st, v) = svc.post_register(b.to_string().as_bytes()).await;
        assert_eq!((st, code(&v)), (400, "bad_key"), "{what}: {v}");
    }
    // None of that consumed the nonce (formats are checked before it) or stored anything.
    assert!(svc.state.registry().devices().await.unwrap().is_empty());
    let (st, _) = svc.post_register(&base.to_string().into_bytes()).await;
    assert_eq!(st, 201);
    // Bad device ids in operator routes.
    let bearer = format!("Bearer {OPERATOR}");
    let (st, v) = svc.raw("GET", "/v1/devices/xyz", Some(&bearer), b"").await;
    assert_eq!((st, code(&v)), (400, "bad_device_id"));
    let (st, _) = svc.raw("GET", "/v1/nothing", None, b"").await;
    assert_eq!(st, 404);
    svc.stop().await;
}

#[tokio::test]
async fn duplicate_registration_is_409_and_keeps_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let t1 = svc.token().await;
    let first = svc.client().register(&key, &t1).await.unwrap();
    let t2 = svc.token().await;
    let (st, c) = refused(svc.client().register(&key, &t2).await);
    assert_eq!((st, c.as_str()), (409, "duplicate"));
    // The first registration's credentials are untouched.
    let stored = svc
        .state
        .registry()
        .device(key.device_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.password_hash,
        fake_hash(first.broker_password.expose())
    );
    assert_eq!(
        svc.events()
            .iter()
            .filter(|e| matches!(e, Event::Add(_)))
            .count(),
        1
    );
    // The refused attempt did not use up t2.
    let other = SigningKey::generate(Alg::Ed25519).unwrap();
    svc.client().register(&other, &t2).await.unwrap();
    svc.stop().await;
}

#[tokio::test]
async fn revoke_marks_revoked_and_removes_the_broker_account() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let keep = SigningKey::generate(Alg::Ed25519).unwrap();
    let t = svc.token().await;
    svc.client().register(&key, &t).await.unwrap();
    let t = svc.token().await;
    svc.client().register(&keep, &t).await.unwrap();
    let id = key.device_id();
    let d = svc.operator().revoke(id).await.unwrap();
    assert_eq!(d.status, "revoked");
    assert_eq!(svc.operator().device(id).await.unwrap().status, "revoked");
    assert_eq!(
        svc.operator()
            .device(keep.device_id())
            .await
            .unwrap()
            .status,
        "registered"
    );
    assert_eq!(svc.events().last(), Some(&Event::Remove(id.to_hex())));
    assert!(!svc
        .events()
        .contains(&Event::Remove(keep.device_id().to_hex())));
    // The revoked key cannot come back under the same identity.
    let t = svc.token().await;
    let (st, c) = refused(svc.client().register(&key, &t).await);
    assert_eq!((st, c.as_str()), (403, "revoked"));
    // Unknown device.
    let (st, c) = refused(svc.operator().revoke(DeviceId([3; 8])).await);
    assert_eq!((st, c.as_str()), (404, "not_found"));
    svc.stop().await;
}

#[tokio::test]
async fn oversize_body_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let big = vec![b' '; 32 * 1024];
    let (st, v) = svc.post_register(&big).await;
    assert_eq!((st, code(&v)), (413, "body_too_large"));
    let bearer = format!("Bearer {OPERATOR}");
    let (st, v) = svc
        .raw("POST", "/v1/enrollments", Some(&bearer), &big)
        .await;
    assert_eq!((st, code(&v)), (413, "body_too_large"));
    // Just under the limit is read (and refused for what it is).
    let (st, v) = svc.post_register(&vec![b' '; 16 * 1024]).await;
    assert_eq!((st, code(&v)), (400, "bad_json"));
    svc.stop().await;
}

#[tokio::test]
async fn registry_survives_a_service_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id.redb");
    let now = Arc::new(AtomicU64::new(1_700_000_000));
    let key = SigningKey::generate(Alg::RsaPss2048).unwrap();
    // The C2 server keeps its key across restarts (tokens pin it).
    let server_key = SigningKey::generate(Alg::Ed25519)
        .unwrap()
        .to_bytes()
        .unwrap();
    let server_key = || SigningKey::from_bytes(Alg::Ed25519, &server_key).unwrap();
    let (spare, old_nonce);
    {
        let svc = Service::start_keyed(&path, now.clone(), server_key(), |_| {}).await;
        let t = svc.token().await;
        svc.client().register(&key, &t).await.unwrap();
        spare = svc.token().await;
        old_nonce = svc.nonce().await;
        svc.stop().await;
    }
    let svc = Service::start_keyed(&path, now, server_key(), |_| {}).await;
    let d = svc.operator().device(key.device_id()).await.unwrap();
    assert_eq!(d.status, "registered");
    assert_eq!(d.alg, "rsa2048");
    // Still a duplicate after the restart; the unused token still works.
    let t = svc.token().await;
    let (st, _) = refused(svc.client().register(&key, &t).await);
    assert_eq!(st, 409);
    // A nonce issued before the restart (under the old random nonce key) is refused.
    let other = SigningKey::generate(Alg::Ed25519).unwrap();
    let (st, v) = svc
        .post_register(&register_body(
            &other, &other, &spare, &old_nonce, &old_nonce,
        ))
        .await;
    assert_eq!((st, code(&v)), (400, "nonce_invalid"));
    svc.client().register(&other, &spare).await.unwrap();
    assert_eq!(svc.operator().devices().await.unwrap().len(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn mosquitto_accounts_follow_registrations_and_revocations() {
    use keav_c2::acl::{self, MosquittoConfig};
    use keav_c2::identity::MosquittoAccounts;
    use keav_c2::topics::Topics;

    let dir = tempfile::tempdir().unwrap();
    let registry = RedbRegistry::open(&dir.path().join("id.redb")).unwrap();
    let server_key = SigningKey::generate(Alg::Ed25519).unwrap();
    let topics = Topics::new(server_key.device_id());
    let broker_dir = dir.path().join("broker");
    let config = MosquittoConfig::new(&broker_dir, 18832, topics);
    let server_user = BrokerUser {
        username: server_key.device_id().to_hex(),
        password_hash: acl::hash_password("server-password").unwrap(),
        role: Role::Server,
    };
    // No broker running: the files are written, not applied.
    let accounts = MosquittoAccounts::load(&registry, config, None, vec![server_user])
        .await
        .unwrap();
    let state = IdentityState::new(
        registry,
        accounts,
        IdentityConfig::new(
            Zeroizing::new(OPERATOR.to_string()),
            "127.0.0.1:18832".into(),
            server_key.public(),
        ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    let client = Client::new(&addr.to_string()).unwrap();
    let operator = client
        .clone()
        .with_operator_token(Zeroizing::new(OPERATOR.to_string()));
    let passwd = || std::fs::read_to_string(broker_dir.join("passwd")).unwrap();
    let hash_of = |text: &str, user: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{user}:")).map(str::to_string))
    };
    assert!(hash_of(&passwd(), &server_key.device_id().to_hex()).is_some());

    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let (token, _) = operator
        .create_enrollment(&EnrollmentRequestBody::default())
        .await
        .unwrap();
    let reg = client.register(&key, &token).await.unwrap();
    // The broker's password file verifies the password the device received, and the
    // registry holds the same hash (not the password).
    let hash = hash_of(&passwd(), &reg.broker_username).expect("device in passwd");
    assert!(acl::verify_password(reg.broker_password.expose(), &hash).unwrap());
    assert!(!acl::verify_password("not-the-password", &hash).unwrap());
    let stored = state
        .registry()
        .device(reg.device_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.password_hash, hash);
    assert!(!passwd().contains(reg.broker_password.expose()));

    operator.revoke(reg.device_id).await.unwrap();
    assert!(hash_of(&passwd(), &reg.broker_username).is_none());
    assert!(hash_of(&passwd(), &server_key.device_id().to_hex()).is_some());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// Stateless challenge nonces.

/// POSTs `/v1/challenge` `n` times over one kept-alive connection; returns the nonces.
async fn many_challenges(addr: SocketAddr, n: usize) -> Vec<[u8; NONCE_LEN]> {
    use http_body_util::{BodyExt, Empty};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = hyper::Request::post("/v1/challenge")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let nonce = STANDARD.decode(v["nonce"].as_str().unwrap()).unwrap();
        out.push(nonce.try_into().unwrap());
    }
    drop(sender);
    conn.abort();
    out
}

#[tokio::test]
async fn challenge_flood_stores_nothing_and_registration_still_works() {
    let dir = tempfile::tempdir().unwrap();
    // A small used-nonce bound: the flood must not touch it at all.
    let svc = Service::start_with(
        &dir.path().join("id.redb"),
        Arc::new(AtomicU64::new(1_700_000_000)),
        |c| c.max_nonces = 4,
    )
    .await;
    assert_eq!(svc.state.used_nonces(), 0);
    let nonces = many_challenges(svc.addr, 10_000).await;
    // Every challenge was answered (no "table full"), every nonce is distinct, and the
    // service kept nothing for any of them.
    let distinct: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(distinct.len(), 10_000);
    assert_eq!(svc.state.used_nonces(), 0);
    // Registration still works, with a fresh nonce and with one from the flood.
    let t = svc.token().await;
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    svc.client().register(&a, &t).await.unwrap();
    assert_eq!(svc.state.used_nonces(), 1);
    let t = svc.token().await;
    let b = SigningKey::generate(Alg::Ed25519).unwrap();
    let n = nonces[9_999];
    let (st, v) = svc.post_register(&register_body(&b, &b, &t, &n, &n)).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(svc.state.used_nonces(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn tampered_and_foreign_nonces_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    let other = Service::start(&dir.path().join("other.redb")).await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let token = svc.token().await;
    let n = svc.nonce().await;
    // One bit flipped in the random part, in the expiry, in the MAC tag; each correctly
    // signed by the key being registered, so only the nonce check can refuse it.
    for bit in [0usize, 16 * 8 + 7, (NONCE_LEN - 1) * 8] {
        let mut t = n;
        t[bit / 8] ^= 1 << (bit % 8);
        let (st, v) = svc
            .post_register(&register_body(&key, &key, &token, &t, &t))
            .await;
        assert_eq!((st, code(&v)), (400, "nonce_invalid"), "bit {bit}");
    }
    // A genuine nonce of another service (another key).
    let foreign = other.nonce().await;
    let (st, v) = svc
        .post_register(&register_body(&key, &key, &token, &foreign, &foreign))
        .await;
    assert_eq!((st, code(&v)), (400, "nonce_invalid"));
    // None of that was remembered, and the untampered nonce still works.
    assert_eq!(svc.state.used_nonces(), 0);
    let (st, v) = svc
        .post_register(&register_body(&key, &key, &token, &n, &n))
        .await;
    assert_eq!(st, 201, "{v}");
    other.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn used_nonces_are_bounded_and_forgotten_when_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicU64::new(1_700_000_000));
    let svc = Service::start_with(&dir.path().join("id.redb"), now.clone(), |c| {
        c.max_nonces = 2
    })
    .await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let liar = SigningKey::generate(Alg::Ed25519).unwrap();
    let token = svc.token().await;
    // Without a valid enrollment token nothing is remembered.
    let n = svc.nonce().await;
    let (st, _) = svc
        .post_register(&register_body(&key, &key, "made-up", &n, &n))
        .await;
    assert_eq!(st, 401);
    assert_eq!(svc.state.used_nonces(), 0);
    // Failed proofs of possession, even with a valid token, remember nothing (someone
    // holding a token cannot fill the table and turn everyone else away) ...
    let reused = svc.nonce().await;
    for _ in 0..5 {
        let n = svc.nonce().await;
        let (st, v) = svc
            .post_register(&register_body(&key, &liar, &token, &n, &n))
            .await;
        assert_eq!((st, code(&v)), (422, "bad_signature"));
    }
    let (st, v) = svc
        .post_register(&register_body(&key, &liar, &token, &reused, &reused))
        .await;
    assert_eq!((st, code(&v)), (422, "bad_signature"));
    assert_eq!(svc.state.used_nonces(), 0);
    // ... and the nonce of a failed attempt still serves a good one, once.
    let (st, _) = svc
        .post_register(&register_body(&key, &key, &token, &reused, &reused))
        .await;
    assert_eq!(st, 201);
    assert_eq!(svc.state.used_nonces(), 1);
    let other = SigningKey::generate(Alg::Ed25519).unwrap();
    let token2 = svc.token().await;
    let (st, v) = svc
        .post_register(&register_body(&other, &other, &token2, &reused, &reused))
        .await;
    assert_eq!((st, code(&v)), (409, "nonce_used"));
    // Successful registrations fill the table up to its bound, then registrations wait.
    svc.client().register(&other, &token2).await.unwrap();
    assert_eq!(svc.state.used_nonces(), 2);
    let third = SigningKey::generate(Alg::Ed25519).unwrap();
    let token3 = svc.token().await;
    let n = svc.nonce().await;
    let (st, v) = svc
        .post_register(&register_body(&third, &third, &token3, &n, &n))
        .await;
    assert_eq!((st, code(&v)), (503, "busy"));
    assert_eq!(svc.state.used_nonces(), 2);
    // Once those expire they are dropped, and a registration gets through.
    now.fetch_add(130, Ordering::SeqCst);
    svc.client().register(&third, &token3).await.unwrap();
    assert_eq!(svc.state.used_nonces(), 1);
    svc.stop().await;
}

// ---------------------------------------------------------------------------------------
// Enrollment tokens pin the C2 server key.

#[tokio::test]
async fn pinned_token_refuses_a_service_with_another_server_key() {
    let dir = tempfile::tempdir().unwrap();
    let real = Service::start(&dir.path().join("real.redb")).await;
    let impostor = Service::start(&dir.path().join("impostor.redb")).await;
    assert_ne!(real.server_key.public(), impostor.server_key.public());
    let token = real.token().await;
    // The token is `<secret>.<pin>`, and the pin is the real server key's.
    let pin = token.pin().unwrap().expect("issued tokens carry a pin");
    assert!(pin.matches(&real.server_key.public()));
    assert!(!format!("{token:?}").contains(token.secret()));
    // The impostor accepts the token's secret (as a relaying man in the middle would) and
    // answers with its own server key: the device refuses.
    impostor.accept_token(token.secret()).await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let r = impostor.client().register(&key, &token).await;
    assert!(
        matches!(r, Err(IdentityError::ServerKeyMismatch)),
        "{:?}",
        r.map(|r| r.server_id)
    );
    // The same token at the real service: the pin matches.
    let reg = real.client().register(&key, &token).await.unwrap();
    assert_eq!(reg.server_key, real.server_key.public());
    impostor.stop().await;
    real.stop().await;
}

#[tokio::test]
async fn old_unpinned_tokens_and_whole_tokens_on_the_wire_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("id.redb")).await;
    // An old-format token (no pin), as issued before pins existed.
    svc.accept_token("legacy-token-without-pin").await;
    let a = SigningKey::generate(Alg::Ed25519).unwrap();
    let reg = svc
        .client()
        .register(&a, "legacy-token-without-pin")
        .await
        .unwrap();
    assert_eq!(reg.server_key, svc.server_key.public());
    // A client that sends the whole `<secret>.<pin>` token (not just the secret) works too.
    let t = svc.token().await;
    let b = SigningKey::generate(Alg::Ed25519).unwrap();
    let n = svc.nonce().await;
    let (st, v) = svc
        .post_register(&register_body(&b, &b, t.as_str(), &n, &n))
        .await;
    assert_eq!(st, 201, "{v}");
    // A malformed pin is refused by the client before it calls the service.
    let c = SigningKey::generate(Alg::Ed25519).unwrap();
    let bad = format!("{}.not-a-pin", t.secret());
    assert!(matches!(
        svc.client().register(&c, &bad).await,
        Err(IdentityError::BadEnrollmentToken)
    ));
    assert!(svc
        .state
        .registry()
        .device(c.device_id())
        .await
        .unwrap()
        .is_none());
    svc.stop().await;
}

/// A registration whose body is sent a byte at a time, held open on a fresh connection.
async fn slow_registration(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{",
    )
    .await
    .unwrap();
    s
}

/// Slow-body registrations filling every unauthenticated place do not keep the operator out:
/// its token gives it places of its own, and its revocation goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_registrations_cannot_keep_the_operator_from_revoking() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_with(
        &dir.path().join("id.redb"),
        Arc::new(AtomicU64::new(1_700_000_000)),
        |c| {
            c.max_in_flight = 3;
            // Long enough that the slow clients keep their places for the whole test.
            c.body_timeout = std::time::Duration::from_secs(600);
        },
    )
    .await;
    let key = SigningKey::generate(Alg::Ed25519).unwrap();
    let t = svc.token().await;
    svc.client().register(&key, &t).await.unwrap();
    let id = key.device_id();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(slow_registration(svc.addr).await);
    }
    // Every unauthenticated place is taken (bounded wait: the slow clients' requests reach
    // the service in their own time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while svc.raw("POST", "/v1/challenge", None, b"{}").await.0 != 503 {
        if std::time::Instant::now() >= deadline {
            // Which slow clients were answered (and so freed their place)?
            let mut answered = Vec::new();
            for s in &mut held {
                let mut b = [0u8; 12];
                let r = tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut b))
                    .await;
                answered.push(format!("{r:?} {:?}", String::from_utf8_lossy(&b)));
            }
            panic!("the places never filled; slow clients: {answered:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A wrong token gets no place of the operator's.
    let wrong = svc
        .raw("GET", "/v1/devices", Some("Bearer not-the-token"), b"")
        .await;
    assert_eq!(wrong.0, 503);
    let d = svc.operator().revoke(id).await.unwrap();
    assert_eq!(d.status, "revoked");
    assert_eq!(svc.operator().device(id).await.unwrap().status, "revoked");
    assert_eq!(svc.events().last(), Some(&Event::Remove(id.to_hex())));
    // The slow clients still held their places all along.
    assert_eq!(svc.raw("POST", "/v1/challenge", None, b"{}").await.0, 503);
    drop(held);
    svc.stop().await;
}

/// An unauthenticated body that does not come is answered 408 once the body deadline passes
/// (the service has no other timeout: without it, the answer would never come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_registration_body_is_answered_408() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_with(
        &dir.path().join("id.redb"),
        Arc::new(AtomicU64::new(1_700_000_000)),
        |c| {
            c.max_in_flight = 1;
            c.body_timeout = std::time::Duration::from_millis(300);
        },
    )
    .await;
    let mut s = slow_registration(svc.addr).await;
    let mut buf = [0u8; 12];
    tokio::time::timeout(std::time::Duration::from_secs(20), s.read_exact(&mut buf))
        .await
        .expect("no answer to the slow body")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 408");
    drop(s);
    // Its place is free again.
    let nonce = svc.nonce().await;
    assert_eq!(nonce.len(), NONCE_LEN);
    svc.stop().await;
}
