//! The relay's TCP carrier: length-prefixed relay frames, the listener (devices and relays
//! attach to it) and the outgoing connections to next relays.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keav_proto::route::{valid_id, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info};

use super::router::{Event, Source};
use super::{Counters, MAX_FRAME};

/// Most TCP connections (devices and relays) at once.
const MAX_CONNECTIONS: usize = 1024;
/// The first frame (`Attach`) must arrive within this.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// An outgoing connection attempt gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames queued per connection.
const CONN_QUEUE: usize = 1024;
/// Reconnection backoff to a next relay: from this, doubling...
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// ...up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Reads one frame: `None` at a clean end of stream (between frames). An empty frame or one
/// longer than [`MAX_FRAME`] is an error (the caller closes the connection).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "relay frame length out of bounds",
        ));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Queues one frame (length prefix and bytes) on a buffered writer.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len())
        .ok()
        .filter(|&n| n > 0 && n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "relay frame too long"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(frame).await
}

/// Writes what the routing task queues for one connection; flushes when the queue is empty.
async fn write_loop(w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
    let mut w = BufWriter::new(w);
    while let Some(f) = rx.recv().await {
        write_frame(&mut w, &f).await?;
        while let Ok(f) = rx.try_recv() {
            write_frame(&mut w, &f).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

/// Accepts devices and relays until aborted (aborting also ends every connection).
pub(super) async fn listen(
    listener: TcpListener,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    conn_ids: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%addr, "too many relay connections: closed");
            continue;
        };
        let (events, counters) = (events.clone(), counters.clone());
        let conn = conn_ids.fetch_add(1, Ordering::Relaxed);
        conns.spawn(async move {
            let _slot = slot;
            inbound(sock, addr, events, counters, conn).await;
        });
    }
}

/// One accepted connection: `Attach` first, then frames both ways.
async fn inbound(
    sock: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    conn: u64,
) {
    let _ = sock.set_nodelay(true);
    let (mut r, w) = sock.into_split();
    let first = tokio::time::timeout(ATTACH_TIMEOUT, read_frame(&mut r)).await;
    let peer = match first {
        Ok(Ok(Some(bytes))) => match Frame::decode(&bytes) {
            Ok(Frame::Attach { id }) if valid_id(&id) => id,
            _ => {
                Counters::add(&counters.malformed, 1);
                debug!(%addr, "relay connection whose first frame is not Attach: closed");
                return;
            }
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            Counters::add(&counters.malformed, 1);
            debug!(%addr, error = %e, "relay connection closed");
            return;
        }
        Err(_) => {
            debug!(%addr, "no Attach in time: relay connection closed");
            return;
        }
    };
    debug!(%addr, peer, "attached over TCP");
    serve(peer, r, w, &events, &counters, conn).await;
}

/// Runs an attached connection until it ends: registers it with the routing task, hands it
/// every frame, writes what the routing task queues, then unregisters it.
async fn serve(
    peer: String,
    mut r: OwnedReadHalf,
    w: OwnedWriteHalf,
    events: &mpsc::Sender<Event>,
    counters: &Counters,
    conn: u64,
) {
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let up = Event::TcpUp {
        peer: peer.clone(),
        conn,
        tx: tx.clone(),
    };
    if events.send(up).await.is_err() {
        return;
    }
    let reading = async {
        loop {
            match read_frame(&mut r).await {
                Ok(Some(bytes)) => {
                    let from = Source::Tcp {
                        peer: peer.clone(),
                        conn,
                        tx: tx.clone(),
                    };
                    let ev = Event::Frame {
                        from,
                        bytes,
                        ack: None,
                    };
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        Counters::add(&counters.malformed, 1);
                    }
                    debug!(peer, error = %e, "relay connection closed");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = reading => {}
        r = write_loop(w, rx) => {
            if let Err(e) = r {
                debug!(peer, error = %e, "relay connection write failed");
            }
        }
    }
    let _ = events.send(Event::TcpDown { peer, conn }).await;
}

/// Keeps a connection to the next relay `peer` at `addr` (attached as `own`), reconnecting
/// with backoff, until aborted or the routing task is gone.
pub(super) async fn connect_out(
    addr: SocketAddr,
    peer: String,
    own: String,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    conn_ids: Arc<AtomicU64>,
) {
    let attach = Frame::Attach { id: own }.encode();
    let mut backoff = BACKOFF_MIN;
    while !events.is_closed() {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(sock)) => {
                let _ = sock.set_nodelay(true);
                let (r, mut w) = sock.into_split();
                let sent = async {
                    write_frame(&mut w, &attach).await?;
                    w.flush().await
                };
                match sent.await {
                    Ok(()) => {
                        backoff = BACKOFF_MIN;
                        info!(%addr, peer, "connected to the next relay");
                        let conn = conn_ids.fetch_add(1, Ordering::Relaxed);
                        serve(peer.clone(), r, w, &events, &counters, conn).await;
                        info!(%addr, peer, "connection to the next relay ended");
                    }
                    Err(e) => debug!(%addr, peer, error = %e, "attach to the next relay failed"),
                }
            }
            Ok(Err(e)) => debug!(%addr, peer, error = %e, "cannot reach the next relay"),
            Err(_) => debug!(%addr, peer, "connecting to the next relay timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
