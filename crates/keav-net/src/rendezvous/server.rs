//! The rendezvous server: an accept loop with bounded connections, per-request deadlines and
//! graceful shutdown.

use super::proto::{read_frame, write_frame, ErrorCode, Request, Response, Token, MAX_MESSAGE};
use super::store::{Claim, PutOutcome, RemoveOutcome, RendezvousStore};
use super::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, warn};

/// The server's source of the current time, in unix seconds.
pub trait Clock: Send + Sync {
    /// Seconds since the unix epoch.
    fn now_unix(&self) -> u64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that only moves when told to (tests). Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `now` unix seconds.
    pub fn new(now: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    /// Sets the time.
    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Resource limits of the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Limits {
    /// Concurrent connections; one more is answered `Error { Busy }` and closed (default 1024).
    pub max_connections: usize,
    /// Time allowed for a complete request to arrive, counted from the connection's start or
    /// the previous answer; an idle or trickling (slow-loris) connection is cut (default 10 s).
    pub request_timeout: Duration,
    /// Time allowed to write one answer (default 10 s).
    pub write_timeout: Duration,
    /// Requests served on one connection before the server closes it (default 100).
    pub max_requests_per_connection: u32,
    /// Longest registration; longer requested TTLs are capped to it (default 1 day).
    pub max_ttl: Duration,
    /// Period of the purge of expired records (default 60 s). Expired records are never
    /// returned in between.
    pub purge_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_requests_per_connection: 100,
            max_ttl: Duration::from_secs(24 * 60 * 60),
            purge_interval: Duration::from_secs(60),
        }
    }
}

struct Ctx {
    store: Arc<dyn RendezvousStore>,
    clock: Arc<dyn Clock>,
    limits: Limits,
}

/// Runs a rendezvous server on `listener` until `shutdown` completes, with the system clock.
///
/// On shutdown the server stops accepting (the listener is closed), answers every request
/// it has already read, closes idle connections, and returns when all connection tasks have
/// ended. Per-connection failures are logged, never returned.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn RendezvousStore>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_with_clock(listener, store, limits, Arc::new(SystemClock), shutdown).await
}

/// [`serve`] with the time read from `clock`.
pub async fn serve_with_clock(
    listener: TcpListener,
    store: Arc<dyn RendezvousStore>,
    limits: Limits,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let ctx = Arc::new(Ctx {
        store,
        clock,
        limits,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(purge_loop(ctx.clone(), stop_rx.clone()));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = tasks.join_next() => log_join(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tasks.spawn(connection(ctx.clone(), stream, peer, stop_rx.clone(), permit));
                        }
                        Err(_) => {
                            debug!(%peer, "rendezvous: at connection limit, refusing");
                            // A fresh socket's send buffer is empty: this does not block.
                            let busy = Response::Error { code: ErrorCode::Busy }.to_frame();
                            let _ = stream.try_write(&busy);
                        }
                    }
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "rendezvous: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        log_join(done);
    }
    Ok(())
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        warn!(error = %e, "rendezvous: connection task failed");
    }
}

async fn purge_loop(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let period = ctx.limits.purge_interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let now = ctx.clock.now_unix();
                let store = ctx.store.clone();
                match blocking(move || store.purge_expired(now)).await {
                    Ok(0) => {}
                    Ok(n) => debug!(purged = n, "rendezvous: expired records purged"),
                    Err(e) => warn!(error = %e, "rendezvous: purge failed"),
                }
            }
        }
    }
}

async fn connection(
    ctx: Arc<Ctx>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; MAX_MESSAGE];
    let mut served = 0u32;
    while served < ctx.limits.max_requests_per_connection && !*stop.borrow() {
        let read = tokio::select! {
            _ = stop.changed() => break,
            r = timeout(ctx.limits.request_timeout, read_frame(&mut stream, &mut buf)) => r,
        };
        let (response, close) = match read {
            Err(_) => {
                debug!(%peer, "rendezvous: request timeout, closing");
                break;
            }
            Ok(Err(Error::TooLarge { len })) => {
                debug!(%peer, len, "rendezvous: oversize frame, closing");
                (
                    Response::Error {
                        code: ErrorCode::TooLarge,
                    },
                    true,
                )
            }
            Ok(Err(_)) => break, // closed by the peer, or a socket error
            Ok(Ok(n)) => match Request::decode(buf.get(..n).unwrap_or_default()) {
                Ok(req) => (handle(&ctx, req).await, false),
                Err(e) => {
                    debug!(%peer, error = %e, "rendezvous: bad request");
                    (
                        Response::Error {
                            code: ErrorCode::for_decode_error(&e),
                        },
                        false,
                    )
                }
            },
        };
        served = served.saturating_add(1);
        let frame = response.to_frame();
        match timeout(ctx.limits.write_timeout, write_frame(&mut stream, &frame)).await {
            Ok(Ok(())) => {}
            _ => {
                debug!(%peer, "rendezvous: answer not written, closing");
                return;
            }
        }
        if close {
            break;
        }
    }
    let _ = timeout(
        ctx.limits.write_timeout,
        tokio::io::AsyncWriteExt::shutdown(&mut stream),
    )
    .await;
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Task)?
}

fn error(code: ErrorCode) -> Response {
    Response::Error { code }
}

async fn handle(ctx: &Ctx, req: Request) -> Response {
    let now = ctx.clock.now_unix();
    let store = ctx.store.clone();
    let result = match req {
        Request::Register {
            id,
            addr,
            ttl_secs,
            token,
        } => {
            if ttl_secs == 0 || addr.ip().is_unspecified() || addr.port() == 0 {
                return error(ErrorCode::BadRequest);
            }
            let ttl = u64::from(ttl_secs).min(ctx.limits.max_ttl.as_secs().max(1));
            let Ok(fresh) = Token::random() else {
                warn!("rendezvous: OS random generator failed");
                return error(ErrorCode::Internal);
            };
            let claim = Claim {
                addr,
                expires_at: now.saturating_add(ttl),
                presented: token,
                fresh,
            };
            blocking(move || store.put(&id, &claim, now))
                .await
                .map(|outcome| match outcome {
                    PutOutcome::Stored(e) => Response::Registered {
                        token: e.token,
                        expires_at: e.expires_at,
                    },
                    PutOutcome::Denied => error(ErrorCode::Denied),
                    PutOutcome::Full => error(ErrorCode::Busy),
                })
        }
        Request::Lookup { id } => {
            blocking(move || store.get(&id, now))
                .await
                .map(|found| match found {
                    Some(e) => Response::Found {
                        addr: e.addr,
                        expires_at: e.expires_at,
                    },
                    None => Response::NotFound,
                })
        }
        Request::Unregister { id, token } => blocking(move || store.remove(&id, &token, now))
            .await
            .map(|outcome| match outcome {
                RemoveOutcome::Removed => Response::Unregistered,
                RemoveOutcome::NotFound => Response::NotFound,
                RemoveOutcome::Denied => error(ErrorCode::Denied),
            }),
    };
    result.unwrap_or_else(|e| {
        warn!(error = %e, "rendezvous: store failed");
        error(ErrorCode::Internal)
    })
}

/// A server running on its own task (see [`spawn`]). Dropping the handle also shuts the
/// server down (without waiting for it).
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(|_| Error::Task)?
    }
}

/// Starts [`serve`] on a new task (system clock) and returns its handle.
pub fn spawn(
    listener: TcpListener,
    store: Arc<dyn RendezvousStore>,
    limits: Limits,
) -> Result<ServerHandle, Error> {
    spawn_with_clock(listener, store, limits, Arc::new(SystemClock))
}

/// Starts [`serve_with_clock`] on a new task and returns its handle.
pub fn spawn_with_clock(
    listener: TcpListener,
    store: Arc<dyn RendezvousStore>,
    limits: Limits,
    clock: Arc<dyn Clock>,
) -> Result<ServerHandle, Error> {
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_with_clock(
        listener,
        store,
        limits,
        clock,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(ServerHandle {
        local_addr,
        stop: Some(stop),
        task,
    })
}
