//! KEAV over TCP: handshake messages and records in [`crate::frame`] frames.
//!
//! On TCP the core's retransmission timers never fire a resend that matters (the stream does
//! not lose), but the driver still calls `handle_timeout` when `poll_timeout` passes; the
//! overall handshake deadline ([`DeviceSettings::handshake_timeout`], 10 s by default) covers
//! connecting, every read and every write, so a peer that trickles one byte a second or never
//! answers is cut off at the deadline.
//!
//! [`DeviceSettings::handshake_timeout`]: crate::device::DeviceSettings::handshake_timeout

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::device::Device;
use crate::session::{
    self, establish_stream, log_failure, Acceptor, Attach, Channel, Incoming, Options, Side,
};
use crate::Error;

/// Connects to `addr`, runs the handshake as initiator with the peer known locally as
/// `label`, persists the result and returns the channel. Connecting counts against the
/// handshake deadline.
pub async fn connect(
    device: &Device,
    addr: impl ToSocketAddrs,
    label: &str,
    opts: &Options,
) -> Result<Channel<TcpStream>, Error> {
    let deadline = Instant::now() + device.settings().handshake_timeout;
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout("TCP connect"))??;
    stream.set_nodelay(true)?;
    let remote = stream.peer_addr().ok();
    establish_stream(
        device,
        stream,
        Side::Initiator(label),
        deadline,
        opts,
        Attach {
            remote,
            ..Attach::default()
        },
    )
    .await
}

/// A TCP listener that runs handshakes in the background (at most
/// [`Options::max_handshakes`] at once, at most [`Options::max_connections`] connections) and
/// hands out completed channels.
pub struct Listener {
    local_addr: SocketAddr,
    acceptor: Acceptor<TcpStream>,
}

impl core::fmt::Debug for Listener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("tcp::Listener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Binds `addr` and starts accepting.
    pub async fn bind(
        device: &Device,
        addr: impl ToSocketAddrs,
        opts: Options,
    ) -> Result<Listener, Error> {
        opts.check()?;
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(session::queue_capacity(&opts));
        let (sd_tx, sd_rx) = watch::channel(false);
        let grace = opts.shutdown_grace;
        let task = tokio::spawn(accept_loop(device.clone(), listener, opts, tx, sd_rx));
        info!(%local_addr, "listening (TCP)");
        Ok(Listener {
            local_addr,
            acceptor: Acceptor {
                incoming: rx,
                shutdown: sd_tx,
                task,
                grace,
            },
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next completed handshake. Failed handshakes are logged and skipped (see
    /// [`Listener::next_incoming`] to see them). [`Error::Shutdown`] once the listener stopped.
    pub async fn accept(&mut self) -> Result<Channel<TcpStream>, Error> {
        self.acceptor.accept().await
    }

    /// The next handshake attempt, successful or not.
    pub async fn next_incoming(&mut self) -> Result<Incoming<TcpStream>, Error> {
        self.acceptor.next_incoming().await
    }

    /// Stops accepting, aborts handshakes in progress, and tells every channel this listener
    /// accepted to close (their next `recv` sends the close and returns
    /// [`Error::Shutdown`]).
    pub fn shutdown(&self) {
        self.acceptor.shutdown();
    }

    /// Runs `handler` on every channel (one task each) until `shutdown` resolves; then stops
    /// accepting, signals every channel to close, and waits up to
    /// [`Options::shutdown_grace`] for handlers before aborting them.
    pub async fn serve<H, Fut>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        H: Fn(Channel<TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.acceptor.serve(handler, shutdown).await
    }
}

async fn accept_loop(
    device: Device,
    listener: TcpListener,
    opts: Options,
    out: mpsc::Sender<Incoming<TcpStream>>,
    shutdown: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(opts.max_handshakes));
    let connections = Arc::new(Semaphore::new(opts.max_connections));
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        while tasks.try_join_next().is_some() {}
        let (Ok(conn), Ok(hs)) = (
            connections.clone().acquire_owned().await,
            handshakes.clone().acquire_owned().await,
        ) else {
            return;
        };
        let (stream, remote) = match listener.accept().await {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        debug!(%remote, "TCP connection");
        let _ = stream.set_nodelay(true);
        let (device, opts, out, shutdown) =
            (device.clone(), opts.clone(), out.clone(), shutdown.clone());
        tasks.spawn(async move {
            let deadline = Instant::now() + device.settings().handshake_timeout;
            let result = establish_stream(
                &device,
                stream,
                Side::Responder,
                deadline,
                &opts,
                Attach {
                    remote: Some(remote),
                    shutdown: Some(shutdown),
                    permit: Some(conn),
                    coalesce: false,
                },
            )
            .await;
            drop(hs);
            if let Err(e) = &result {
                log_failure("incoming TCP handshake", Some(remote), e);
            }
            let _ = out.send(Incoming { remote, result }).await;
        });
    }
}
