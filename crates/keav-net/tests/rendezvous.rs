//! Rendezvous server and client over loopback TCP: discovery, expiry, ownership tokens,
//! hostile input, slow-loris, limits, graceful shutdown, durability and a lying server.

use keav_net::rendezvous::{
    lookup, read_frame, register, request, spawn_with_clock, unregister, Claim, DeviceId, Entry,
    Error, ErrorCode, Limits, ManualClock, MemoryRendezvousStore, PutOutcome, RedbRendezvousStore,
    RemoveOutcome, RendezvousStore, Request, Response, ServerHandle, Token, MAX_MESSAGE,
};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T0: u64 = 1_700_000_000;
const MINUTE: Duration = Duration::from_secs(60);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn start(
    store: Arc<dyn RendezvousStore>,
    limits: Limits,
    clock: &ManualClock,
) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    spawn_with_clock(listener, store, limits, Arc::new(clock.clone())).unwrap()
}

async fn start_default() -> (ServerHandle, ManualClock) {
    let clock = ManualClock::new(T0);
    let h = start(
        Arc::new(MemoryRendezvousStore::new()),
        Limits::default(),
        &clock,
    )
    .await;
    (h, clock)
}

/// Sends raw bytes as one frame body and reads one answer.
async fn raw_exchange(s: &mut TcpStream, body: &[u8]) -> Response {
    let mut frame = u16::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    s.write_all(&frame).await.unwrap();
    read_response(s).await
}

async fn read_response(s: &mut TcpStream) -> Response {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = tokio::time::timeout(Duration::from_secs(5), read_frame(s, &mut buf))
        .await
        .expect("answer in time")
        .expect("a frame");
    Response::decode(&buf[..n]).unwrap()
}

/// Waits until the server closes `s` (EOF or reset) and returns when that happened; fails if
/// the server sends anything or keeps the connection open for `within`.
async fn expect_closed(s: &mut TcpStream, within: Duration) -> Instant {
    let mut b = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Instant::now(),
        Ok(Ok(n)) => panic!("expected the connection closed, got {n} bytes"),
        Err(_) => panic!("connection still open after {within:?}"),
    }
}

fn lookup_body(id: &str) -> Vec<u8> {
    let mut b = vec![1, 0x02, u8::try_from(id.len()).unwrap()];
    b.extend_from_slice(id.as_bytes());
    b
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Error { code } => *code,
        other => panic!("expected an Error response, got {other:?}"),
    }
}

#[tokio::test]
async fn register_then_lookup() {
    let (h, _clock) = start_default().await;
    let server = h.local_addr();
    let a4 = addr("192.0.2.10:4433");
    let a6 = addr("[2001:db8::5]:7");
    let r4 = register(server, "sensor-1", a4, MINUTE, None)
        .await
        .unwrap();
    assert_eq!(r4.expires_at, T0 + 60);
    let r6 = register(server, "sensor-6", a6, MINUTE, None)
        .await
        .unwrap();
    assert_ne!(r4.token, r6.token, "tokens are random per registration");
    assert_eq!(lookup(server, "sensor-1").await.unwrap(), Some(a4));
    assert_eq!(lookup(server, "sensor-6").await.unwrap(), Some(a6));
    // The raw answer carries the expiry.
    let id = DeviceId::new("sensor-1").unwrap();
    let resp = request(server, &Request::Lookup { id }, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        resp,
        Response::Found {
            addr: a4,
            expires_at: T0 + 60
        }
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_id_is_not_found() {
    let (h, _clock) = start_default().await;
    let server = h.local_addr();
    register(server, "known", addr("10.0.0.1:1"), MINUTE, None)
        .await
        .unwrap();
    assert_eq!(lookup(server, "unknown").await.unwrap(), None);
    assert_eq!(
        lookup(server, "Known").await.unwrap(),
        None,
        "ids are exact"
    );
    // Invalid identifiers are refused before anything is sent.
    assert!(matches!(lookup(server, "").await, Err(Error::InvalidId)));
    assert!(matches!(
        lookup(server, &"x".repeat(65)).await,
        Err(Error::InvalidId)
    ));
    assert!(matches!(
        register(server, "z", addr("0.0.0.0:5"), MINUTE, None).await,
        Err(Error::InvalidAddress)
    ));
    assert!(matches!(
        register(
            server,
            "z",
            addr("10.0.0.1:5"),
            Duration::from_millis(999),
            None
        )
        .await,
        Err(Error::InvalidTtl)
    ));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn registrations_expire() {
    let clock = ManualClock::new(T0);
    let mut limits = Limits::default();
    limits.max_ttl = Duration::from_secs(100);
    limits.purge_interval = Duration::from_millis(20);
    let store = Arc::new(MemoryRendezvousStore::new());
    let h = start(store.clone(), limits, &clock).await;
    let server = h.local_addr();
    let a = addr("10.0.0.7:7000");

    let r = register(server, "short", a, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(r.expires_at, T0 + 30);
    clock.advance(29);
    assert_eq!(lookup(server, "short").await.unwrap(), Some(a));
    clock.advance(1);
    assert_eq!(lookup(server, "short").await.unwrap(), None);

    // After expiry the identifier is free: someone else takes it, with a new token.
    let b = addr("10.0.0.8:7000");
    let r2 = register(server, "short", b, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_ne!(r2.token, r.token);
    assert_eq!(lookup(server, "short").await.unwrap(), Some(b));

    // TTLs are capped by Limits::max_ttl.
    let long = register(server, "long", a, Duration::from_secs(10 * 86_400), None)
        .await
        .unwrap();
    assert_eq!(long.expires_at, clock_now(&clock) + 100);

    // The periodic purge removes expired records from the store.
    assert_eq!(store.len(), 2);
    clock.advance(100);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_empty() {
        assert!(Instant::now() < deadline, "expired records not purged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown().await.unwrap();
}

fn clock_now(c: &ManualClock) -> u64 {
    use keav_net::rendezvous::Clock;
    c.now_unix()
}

#[tokio::test]
async fn hijack_needs_the_token() {
    let (h, _clock) = start_default().await;
    let server = h.local_addr();
    let owner = addr("10.0.0.1:4433");
    let thief = addr("10.6.6.6:4433");
    let reg = register(server, "door", owner, MINUTE, None).await.unwrap();

    assert!(matches!(
        register(server, "door", thief, MINUTE, None).await,
        Err(Error::Rejected(ErrorCode::Denied))
    ));
    assert!(matches!(
        register(
            server,
            "door",
            thief,
            MINUTE,
            Some(Token::random().unwrap())
        )
        .await,
        Err(Error::Rejected(ErrorCode::Denied))
    ));
    assert_eq!(lookup(server, "door").await.unwrap(), Some(owner));

    // The owner moves its registration; the token stays the same.
    let moved = addr("[fd00::1]:4433");
    let again = register(server, "door", moved, MINUTE, Some(reg.token))
        .await
        .unwrap();
    assert_eq!(again.token, reg.token);
    assert_eq!(lookup(server, "door").await.unwrap(), Some(moved));

    // Unregister needs the token as well.
    assert!(matches!(
        unregister(server, "door", Token::random().unwrap()).await,
        Err(Error::Rejected(ErrorCode::Denied))
    ));
    assert_eq!(lookup(server, "door").await.unwrap(), Some(moved));
    assert!(unregister(server, "door", reg.token).await.unwrap());
    assert_eq!(lookup(server, "door").await.unwrap(), None);
    assert!(!unregister(server, "door", reg.token).await.unwrap());
    // Now anyone may take it.
    register(server, "door", thief, MINUTE, None).await.unwrap();
    assert_eq!(lookup(server, "door").await.unwrap(), Some(thief));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_input_is_refused_and_others_are_served() {
    let (h, _clock) = start_default().await;
    let server = h.local_addr();
    let a = addr("10.0.0.2:9000");
    register(server, "good", a, MINUTE, None).await.unwrap();

    let mut s = TcpStream::connect(server).await.unwrap();
    // Wrong version: the framing is intact, so the connection stays usable.
    let mut v9 = lookup_body("good");
    v9[0] = 9;
    assert_eq!(
        code(&raw_exchange(&mut s, &v9).await),
        ErrorCode::UnsupportedVersion
    );
    // Unknown type, empty frame, one-byte frame, truncated Register, trailing byte.
    assert_eq!(
        code(&raw_exchange(&mut s, &[1, 0x7f]).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&raw_exchange(&mut s, &[]).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&raw_exchange(&mut s, &[1]).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(&raw_exchange(&mut s, &[1, 0x01, 1, b'x', 4, 10, 0]).await),
        ErrorCode::BadRequest
    );
    let mut trailing = lookup_body("good");
    trailing.push(0);
    assert_eq!(
        code(&raw_exchange(&mut s, &trailing).await),
        ErrorCode::BadRequest
    );
    // Invalid UTF-8 identifier.
    assert_eq!(
        code(&raw_exchange(&mut s, &[1, 0x02, 2, 0xff, 0xfe]).await),
        ErrorCode::BadRequest
    );
    // Register fields the client library refuses, sent raw: TTL 0, port 0, unspecified IP.
    let reg = |a: &str, ttl: u32| {
        Request::Register {
            id: DeviceId::new("evil").unwrap(),
            addr: addr(a),
            ttl_secs: ttl,
            token: None,
        }
        .to_frame()
    };
    for f in [
        reg("10.0.0.1:1", 0),
        reg("10.0.0.1:0", 60),
        reg("[::]:80", 60),
    ] {
        assert_eq!(
            code(&raw_exchange(&mut s, &f[2..]).await),
            ErrorCode::BadRequest
        );
    }
    // ... and the same connection still answers a good request.
    assert_eq!(
        raw_exchange(&mut s, &lookup_body("good")).await,
        Response::Found {
            addr: a,
            expires_at: T0 + 60
        }
    );
    assert_eq!(lookup(server, "evil").await.unwrap(), None);

    // Oversize length: TooLarge, then the connection is closed (no body is awaited).
    let mut big = TcpStream::connect(server).await.unwrap();
    big.write_all(&[0xff, 0xff]).await.unwrap();
    assert_eq!(code(&read_response(&mut big).await), ErrorCode::TooLarge);
    expect_closed(&mut big, Duration::from_secs(5)).await;

    // Text garbage: "GE" reads as a 18245-byte length.
    let mut http = TcpStream::connect(server).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(code(&read_response(&mut http).await), ErrorCode::TooLarge);
    expect_closed(&mut http, Duration::from_secs(5)).await;

    // Half a frame then EOF: the server just drops the connection.
    let mut half = TcpStream::connect(server).await.unwrap();
    half.write_all(&[0x00, 0x10, 1, 2, 3]).await.unwrap();
    half.shutdown().await.unwrap();
    expect_closed(&mut half, Duration::from_secs(5)).await;

    // The server still serves everyone else.
    assert_eq!(lookup(server, "good").await.unwrap(), Some(a));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_loris_is_cut_while_others_are_served() {
    let clock = ManualClock::new(T0);
    let mut limits = Limits::default();
    limits.request_timeout = Duration::from_millis(400);
    let h = start(Arc::new(MemoryRendezvousStore::new()), limits, &clock).await;
    let server = h.local_addr();
    let a = addr("10.0.0.3:1");
    register(server, "busy", a, MINUTE, None).await.unwrap();

    // Idle connection: sends nothing.
    let started = Instant::now();
    let mut idle = TcpStream::connect(server).await.unwrap();
    // Trickling connection: one byte of a valid Lookup every 100 ms (would take ~1 s).
    let mut frame = vec![0, 0];
    frame.extend_from_slice(&lookup_body("busy"));
    frame[1] = u8::try_from(frame.len() - 2).unwrap();
    let trickle = TcpStream::connect(server).await.unwrap();
    let (mut tr, mut tw) = trickle.into_split();
    let writer = tokio::spawn(async move {
        for b in frame {
            if tw.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Meanwhile ordinary clients are served promptly.
    for _ in 0..3 {
        assert_eq!(lookup(server, "busy").await.unwrap(), Some(a));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_cut = expect_closed(&mut idle, Duration::from_secs(5)).await;
    let mut b = [0u8; 64];
    let tr_read = tokio::time::timeout(Duration::from_secs(5), tr.read(&mut b))
        .await
        .expect("trickling connection cut in time");
    // Had the deadline been per byte, the whole frame would have arrived (~0.9 s) and been
    // answered.
    assert!(
        matches!(tr_read, Ok(0) | Err(_)),
        "a trickled request must be cut, not answered"
    );
    let cut_after = idle_cut - started;
    assert!(
        cut_after >= Duration::from_millis(350),
        "cut too early: {cut_after:?}"
    );
    writer.abort();
    assert_eq!(lookup(server, "busy").await.unwrap(), Some(a));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_and_request_limits() {
    let clock = ManualClock::new(T0);
    let mut limits = Limits::default();
    limits.max_connections = 2;
    limits.max_requests_per_connection = 3;
    let h = start(Arc::new(MemoryRendezvousStore::new()), limits, &clock).await;
    let server = h.local_addr();

    // Two connections hold both slots (one answered request each proves they were accepted).
    let mut c1 = TcpStream::connect(server).await.unwrap();
    let mut c2 = TcpStream::connect(server).await.unwrap();
    assert_eq!(
        raw_exchange(&mut c1, &lookup_body("x")).await,
        Response::NotFound
    );
    assert_eq!(
        raw_exchange(&mut c2, &lookup_body("x")).await,
        Response::NotFound
    );
    // A third is told Busy and closed.
    let mut c3 = TcpStream::connect(server).await.unwrap();
    assert_eq!(code(&read_response(&mut c3).await), ErrorCode::Busy);
    expect_closed(&mut c3, Duration::from_secs(5)).await;

    // c1 may send two more requests, then the server closes it, which frees a slot.
    assert_eq!(
        raw_exchange(&mut c1, &lookup_body("x")).await,
        Response::NotFound
    );
    assert_eq!(
        raw_exchange(&mut c1, &lookup_body("x")).await,
        Response::NotFound
    );
    let _ = c1.write_all(&[0, 3, 1, 0x02, 0]).await;
    expect_closed(&mut c1, Duration::from_secs(5)).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match lookup(server, "x").await {
            Ok(None) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("slot not freed: {other:?}"),
        }
    }
    drop(c2);
    h.shutdown().await.unwrap();
}

/// A store whose `get` blocks until the test releases it, to hold a request in flight.
struct GateStore {
    inner: MemoryRendezvousStore,
    entered: std::sync::Mutex<mpsc::Sender<()>>,
    release: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl RendezvousStore for GateStore {
    fn put(&self, id: &DeviceId, claim: &Claim, now: u64) -> Result<PutOutcome, Error> {
        self.inner.put(id, claim, now)
    }
    fn get(&self, id: &DeviceId, now: u64) -> Result<Option<Entry>, Error> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        self.inner.get(id, now)
    }
    fn remove(&self, id: &DeviceId, token: &Token, now: u64) -> Result<RemoveOutcome, Error> {
        self.inner.remove(id, token, now)
    }
    fn purge_expired(&self, now: u64) -> Result<usize, Error> {
        self.inner.purge_expired(now)
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let store = Arc::new(GateStore {
        inner: MemoryRendezvousStore::new(),
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    });
    let clock = ManualClock::new(T0);
    let h = start(store, Limits::default(), &clock).await;
    let server = h.local_addr();
    let a = addr("10.0.0.4:4");
    register(server, "inflight", a, MINUTE, None).await.unwrap();

    let mut idle = TcpStream::connect(server).await.unwrap();
    let mut busy = TcpStream::connect(server).await.unwrap();
    let mut f = vec![0, 0];
    f.extend_from_slice(&lookup_body("inflight"));
    f[1] = u8::try_from(f.len() - 2).unwrap();
    busy.write_all(&f).await.unwrap();
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("request reached the store");

    let stopping = tokio::spawn(h.shutdown());
    // Idle connections are closed at once and no new connection is accepted ...
    expect_closed(&mut idle, Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(server).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... but the server waits for the request in flight, which still gets its answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "returned before the in-flight request"
    );
    release_tx.send(()).unwrap();
    assert_eq!(
        read_response(&mut busy).await,
        Response::Found {
            addr: a,
            expires_at: T0 + 60
        }
    );
    expect_closed(&mut busy, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("server stopped")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let (h, _clock) = start_default().await;
    let server = h.local_addr();
    assert_eq!(lookup(server, "a").await.unwrap(), None);
    drop(h);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lookup(server, "a").await.is_ok() {
        assert!(Instant::now() < deadline, "server still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn redb_registrations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendezvous.redb");
    let clock = ManualClock::new(T0);
    let a = addr("[2001:db8::42]:4433");

    let store = Arc::new(RedbRendezvousStore::open(&path).unwrap());
    let h = start(store.clone(), Limits::default(), &clock).await;
    let reg = register(h.local_addr(), "boiler", a, MINUTE, None)
        .await
        .unwrap();
    h.shutdown().await.unwrap();
    drop(store); // the server has released its reference: the file is closed

    clock.advance(10);
    let store = Arc::new(RedbRendezvousStore::open(&path).unwrap());
    let h = start(store, Limits::default(), &clock).await;
    let server = h.local_addr();
    assert_eq!(lookup(server, "boiler").await.unwrap(), Some(a));
    // Ownership survives too.
    assert!(matches!(
        register(server, "boiler", addr("10.6.6.6:1"), MINUTE, None).await,
        Err(Error::Rejected(ErrorCode::Denied))
    ));
    let renewed = register(server, "boiler", a, MINUTE, Some(reg.token))
        .await
        .unwrap();
    assert_eq!(renewed.token, reg.token);
    assert_eq!(renewed.expires_at, T0 + 70);
    // And so does expiry.
    clock.advance(60);
    assert_eq!(lookup(server, "boiler").await.unwrap(), None);
    h.shutdown().await.unwrap();
}

/// A lying server is just data at this layer: the client gets whatever address the server
/// holds. (That the KEAV handshake with the wrong peer fails is tested end to end with the
/// TCP driver.) This is how such a server is set up: pre-fill the store, then serve it.
#[tokio::test]
async fn a_lying_server_returns_its_lie() {
    let store = Arc::new(MemoryRendezvousStore::new());
    let attacker = addr("10.66.66.66:4433");
    store.insert_unchecked(
        &DeviceId::new("device-b").unwrap(),
        Entry {
            addr: attacker,
            token: Token::random().unwrap(),
            expires_at: u64::MAX,
        },
    );
    let clock = ManualClock::new(T0);
    let h = start(store, Limits::default(), &clock).await;
    let server = h.local_addr();
    assert_eq!(lookup(server, "device-b").await.unwrap(), Some(attacker));
    // The genuine device cannot even re-register itself while the lie is "live".
    assert!(matches!(
        register(server, "device-b", addr("10.0.0.2:4433"), MINUTE, None).await,
        Err(Error::Rejected(ErrorCode::Denied))
    ));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_times_out_on_a_silent_server() {
    // A listener that accepts (kernel backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = silent.local_addr().unwrap();
    let started = Instant::now();
    let r = request(
        server,
        &Request::Lookup {
            id: DeviceId::new("x").unwrap(),
        },
        Duration::from_millis(200),
    )
    .await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
