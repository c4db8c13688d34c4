//! Client side: one request per connection, the whole exchange under a deadline.

use super::proto::{read_frame, write_frame, DeviceId, Request, Response, Token, MAX_MESSAGE};
use super::Error;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Deadline of [`register`], [`lookup`] and [`unregister`] (connect, send and answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A registration in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The token to present when renewing, moving or removing the registration.
    pub token: Token,
    /// Unix second at which the registration expires (the server caps long TTLs).
    pub expires_at: u64,
}

/// Sends `req` to the server at `server` on a new connection and returns its answer; the
/// whole exchange must complete within `deadline`. A server `Error` answer is returned as
/// `Ok(Response::Error { .. })`.
pub async fn request(
    server: SocketAddr,
    req: &Request,
    deadline: Duration,
) -> Result<Response, Error> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        write_frame(&mut stream, &req.to_frame()).await?;
        let mut buf = [0u8; MAX_MESSAGE];
        let n = read_frame(&mut stream, &mut buf).await?;
        Response::decode(buf.get(..n).unwrap_or_default())
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| Error::Timeout(deadline))?
}

fn unexpected(resp: Response) -> Error {
    match resp {
        Response::Error { code } => Error::Rejected(code),
        _ => Error::UnexpectedResponse,
    }
}

/// Registers device `id` at `addr` for `ttl` (whole seconds, at least one; the server caps
/// it). Pass the token of the current registration to renew or move it; without it a live
/// registration by someone else is refused with `Error::Rejected(ErrorCode::Denied)`.
pub async fn register(
    server: SocketAddr,
    id: &str,
    addr: SocketAddr,
    ttl: Duration,
    token: Option<Token>,
) -> Result<Registration, Error> {
    let id = DeviceId::new(id)?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(Error::InvalidAddress);
    }
    let ttl_secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
    if ttl_secs == 0 {
        return Err(Error::InvalidTtl);
    }
    let req = Request::Register {
        id,
        addr,
        ttl_secs,
        token,
    };
    match request(server, &req, DEFAULT_TIMEOUT).await? {
        Response::Registered { token, expires_at } => Ok(Registration { token, expires_at }),
        other => Err(unexpected(other)),
    }
}

/// Looks up device `id`: its registered address, or `None` if it has no live registration.
///
/// The answer is only a hint: the server is not trusted, and the KEAV handshake with whoever
/// listens at that address decides whether it is the right device.
pub async fn lookup(server: SocketAddr, id: &str) -> Result<Option<SocketAddr>, Error> {
    let req = Request::Lookup {
        id: DeviceId::new(id)?,
    };
    match request(server, &req, DEFAULT_TIMEOUT).await? {
        Response::Found { addr, .. } => Ok(Some(addr)),
        Response::NotFound => Ok(None),
        other => Err(unexpected(other)),
    }
}

/// Removes the registration of `id`; `Ok(false)` if there was no live registration.
pub async fn unregister(server: SocketAddr, id: &str, token: Token) -> Result<bool, Error> {
    let req = Request::Unregister {
        id: DeviceId::new(id)?,
        token,
    };
    match request(server, &req, DEFAULT_TIMEOUT).await? {
        Response::Unregistered => Ok(true),
        Response::NotFound => Ok(false),
        other => Err(unexpected(other)),
    }
}
