//! Wire format of the rendezvous protocol (see the module documentation for the grammar).

use super::Error;
use rand_core::{OsRng, RngCore};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version carried in the first byte of every message.
pub const VERSION: u8 = 1;
/// Largest message body in bytes (the u16 length prefix is not counted).
pub const MAX_MESSAGE: usize = 1024;
/// Longest device identifier in bytes.
pub const MAX_ID_LEN: usize = 64;

const T_REGISTER: u8 = 0x01;
const T_LOOKUP: u8 = 0x02;
const T_UNREGISTER: u8 = 0x03;
const T_REGISTERED: u8 = 0x81;
const T_FOUND: u8 = 0x82;
const T_NOT_FOUND: u8 = 0x83;
const T_UNREGISTERED: u8 = 0x84;
const T_ERROR: u8 = 0xFF;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// A validated device identifier: 1 to [`MAX_ID_LEN`] bytes of UTF-8 without control
/// characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks and wraps an identifier.
    pub fn new(id: &str) -> Result<Self, Error> {
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
            return Err(Error::InvalidId);
        }
        Ok(Self(id.to_owned()))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The random 16-byte ownership token of a registration (anti-griefing only; see the module
/// documentation). `Debug` does not print it; equality is constant-time.
#[derive(Clone, Copy)]
pub struct Token([u8; 16]);

impl Token {
    /// Draws a token from the OS random generator.
    pub fn random() -> Result<Self, Error> {
        let mut b = [0u8; 16];
        OsRng.try_fill_bytes(&mut b).map_err(|_| Error::Rng)?;
        Ok(Self(b))
    }

    /// Wraps raw bytes (e.g. a token the device kept from an earlier registration).
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// The raw bytes, to keep across restarts of the device.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl From<[u8; 16]> for Token {
    fn from(b: [u8; 16]) -> Self {
        Self(b)
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        // No early exit: the time taken does not depend on where the tokens differ.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Coarse error codes of the `Error` response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request could not be parsed or has invalid fields (1).
    BadRequest,
    /// The request's protocol version is not supported (2).
    UnsupportedVersion,
    /// The frame is longer than [`MAX_MESSAGE`]; the server closes the connection (3).
    TooLarge,
    /// The identifier is registered by someone else: the current token is missing or wrong (4).
    Denied,
    /// The server is at capacity (connections or records); try again later (5).
    Busy,
    /// The server failed internally (storage) (6).
    Internal,
    /// A code this implementation does not know.
    Unknown(u8),
}

impl ErrorCode {
    /// The code's byte on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            Self::BadRequest => 1,
            Self::UnsupportedVersion => 2,
            Self::TooLarge => 3,
            Self::Denied => 4,
            Self::Busy => 5,
            Self::Internal => 6,
            Self::Unknown(c) => c,
        }
    }

    /// The code for a byte on the wire.
    pub const fn from_u8(c: u8) -> Self {
        match c {
            1 => Self::BadRequest,
            2 => Self::UnsupportedVersion,
            3 => Self::TooLarge,
            4 => Self::Denied,
            5 => Self::Busy,
            6 => Self::Internal,
            c => Self::Unknown(c),
        }
    }

    /// The code a server answers with when a request fails to parse with `e`.
    pub(crate) fn for_decode_error(e: &Error) -> Self {
        match e {
            Error::UnsupportedVersion(_) => Self::UnsupportedVersion,
            Error::TooLarge { .. } => Self::TooLarge,
            _ => Self::BadRequest,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest => f.write_str("bad request"),
            Self::UnsupportedVersion => f.write_str("unsupported version"),
            Self::TooLarge => f.write_str("message too large"),
            Self::Denied => f.write_str("denied (identifier registered with another token)"),
            Self::Busy => f.write_str("server busy"),
            Self::Internal => f.write_str("internal server error"),
            Self::Unknown(c) => write!(f, "unknown error code {c}"),
        }
    }
}

/// A request from a device to the rendezvous server.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Register (or renew) `id` at `addr` for `ttl_secs` seconds (capped by the server).
    Register {
        /// The device's identifier.
        id: DeviceId,
        /// The address where the device accepts KEAV connections.
        addr: SocketAddr,
        /// Requested lifetime in seconds (at least 1).
        ttl_secs: u32,
        /// The current token, to renew or move a live registration.
        token: Option<Token>,
    },
    /// Ask for the address of `id`.
    Lookup {
        /// The identifier looked up.
        id: DeviceId,
    },
    /// Remove the registration of `id`.
    Unregister {
        /// The identifier to remove.
        id: DeviceId,
        /// The registration's token.
        token: Token,
    },
}

/// An answer of the rendezvous server.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// The registration is stored until `expires_at`.
    Registered {
        /// The registration's token (unchanged on renewal).
        token: Token,
        /// Unix second at which the registration expires.
        expires_at: u64,
    },
    /// The identifier is registered at `addr`.
    Found {
        /// The registered address (as claimed by the device; not verified).
        addr: SocketAddr,
        /// Unix second at which the registration expires.
        expires_at: u64,
    },
    /// No live registration for the identifier.
    NotFound,
    /// The registration was removed.
    Unregistered,
    /// The request failed.
    Error {
        /// Why.
        code: ErrorCode,
    },
}

/// A bounds-checked reader over a message body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or(Error::Malformed("truncated message"))?;
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn id(&mut self) -> Result<DeviceId, Error> {
        let n = usize::from(self.u8()?);
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| Error::InvalidId)?;
        DeviceId::new(s)
    }

    fn addr(&mut self) -> Result<SocketAddr, Error> {
        let ip = match self.u8()? {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(Error::Malformed("unknown address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn token(&mut self) -> Result<Token, Error> {
        Ok(Token(self.array()?))
    }

    /// Reads the version and type bytes.
    fn header(&mut self) -> Result<u8, Error> {
        let v = self.u8()?;
        if v != VERSION {
            return Err(Error::UnsupportedVersion(v));
        }
        self.u8()
    }

    fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed("trailing bytes"))
        }
    }
}

fn put_id(out: &mut Vec<u8>, id: &DeviceId) {
    // DeviceId guarantees 1..=64 bytes, so the length fits a byte.
    out.push(u8::try_from(id.0.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id.0.as_bytes());
}

pub(crate) fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Decodes an address written by [`put_addr`] followed by `rest` bytes (used by the store).
pub(crate) fn take_addr(buf: &[u8]) -> Result<(SocketAddr, &[u8]), Error> {
    let mut r = Reader(buf);
    let a = r.addr()?;
    Ok((a, r.0))
}

/// Starts a frame: reserves the length prefix and writes version and type.
fn start(ty: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[0, 0, VERSION, ty]);
    out
}

/// Fills in the length prefix of a frame built by [`start`].
fn finish_frame(mut out: Vec<u8>) -> Vec<u8> {
    let body = out.len().saturating_sub(2);
    // Every message this module builds is far below MAX_MESSAGE (at most ~110 bytes).
    let len = u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes();
    if let Some(prefix) = out.get_mut(..2) {
        prefix.copy_from_slice(&len);
    }
    out
}

impl Request {
    /// The complete frame (length prefix included).
    pub fn to_frame(&self) -> Vec<u8> {
        let out = match self {
            Self::Register {
                id,
                addr,
                ttl_secs,
                token,
            } => {
                let mut out = start(T_REGISTER);
                put_id(&mut out, id);
                put_addr(&mut out, addr);
                out.extend_from_slice(&ttl_secs.to_be_bytes());
                match token {
                    Some(t) => {
                        out.push(1);
                        out.extend_from_slice(&t.0);
                    }
                    None => out.push(0),
                }
                out
            }
            Self::Lookup { id } => {
                let mut out = start(T_LOOKUP);
                put_id(&mut out, id);
                out
            }
            Self::Unregister { id, token } => {
                let mut out = start(T_UNREGISTER);
                put_id(&mut out, id);
                out.extend_from_slice(&token.0);
                out
            }
        };
        finish_frame(out)
    }

    /// Parses a message body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, Error> {
        let mut r = Reader(body);
        let req = match r.header()? {
            T_REGISTER => {
                let id = r.id()?;
                let addr = r.addr()?;
                let ttl_secs = r.u32()?;
                let token = match r.u8()? {
                    0 => None,
                    1 => Some(r.token()?),
                    _ => return Err(Error::Malformed("bad token flag")),
                };
                Self::Register {
                    id,
                    addr,
                    ttl_secs,
                    token,
                }
            }
            T_LOOKUP => Self::Lookup { id: r.id()? },
            T_UNREGISTER => Self::Unregister {
                id: r.id()?,
                token: r.token()?,
            },
            _ => return Err(Error::Malformed("unknown request type")),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// The complete frame (length prefix included).
    pub fn to_frame(&self) -> Vec<u8> {
        let out = match self {
            Self::Registered { token, expires_at } => {
                let mut out = start(T_REGISTERED);
                out.extend_from_slice(&token.0);
                out.extend_from_slice(&expires_at.to_be_bytes());
                out
            }
            Self::Found { addr, expires_at } => {
                let mut out = start(T_FOUND);
                put_addr(&mut out, addr);
                out.extend_from_slice(&expires_at.to_be_bytes());
                out
            }
            Self::NotFound => start(T_NOT_FOUND),
            Self::Unregistered => start(T_UNREGISTERED),
            Self::Error { code } => {
                let mut out = start(T_ERROR);
                out.push(code.to_u8());
                out
            }
        };
        finish_frame(out)
    }

    /// Parses a message body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, Error> {
        let mut r = Reader(body);
        let resp = match r.header()? {
            T_REGISTERED => Self::Registered {
                token: r.token()?,
                expires_at: r.u64()?,
            },
            T_FOUND => Self::Found {
                addr: r.addr()?,
                expires_at: r.u64()?,
            },
            T_NOT_FOUND => Self::NotFound,
            T_UNREGISTERED => Self::Unregistered,
            T_ERROR => Self::Error {
                code: ErrorCode::from_u8(r.u8()?),
            },
            _ => return Err(Error::Malformed("unknown response type")),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Reads one frame into `buf` and returns its body length.
///
/// The announced length is checked against [`MAX_MESSAGE`] before any body byte is read
/// ([`Error::TooLarge`]); a stream that ends exactly between frames gives an
/// [`Error::Io`] of kind `UnexpectedEof`, as does one that ends mid-frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8; MAX_MESSAGE],
) -> Result<usize, Error> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    let body = buf.get_mut(..len).ok_or(Error::TooLarge { len })?;
    r.read_exact(body).await?;
    Ok(len)
}

/// Writes a complete frame (as built by `to_frame`) and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), Error> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
        assert_eq!(len, frame.len() - 2, "length prefix");
        &frame[2..]
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn register_known_bytes() {
        let req = Request::Register {
            id: id("ab"),
            addr: "192.0.2.1:4433".parse().unwrap(),
            ttl_secs: 300,
            token: Some(Token::from_bytes([0x11; 16])),
        };
        let mut expected = vec![
            0x00, 0x21, 1, 0x01, 2, b'a', b'b', 4, 192, 0, 2, 1, 0x11, 0x51,
        ];
        expected.extend_from_slice(&[0, 0, 1, 0x2c, 1]);
        expected.extend_from_slice(&[0x11; 16]);
        assert_eq!(req.to_frame(), expected);
        assert_eq!(Request::decode(body(&expected)).unwrap(), req);
    }

    #[test]
    fn found_v6_known_bytes() {
        let resp = Response::Found {
            addr: "[2001:db8::7]:9".parse().unwrap(),
            expires_at: 0x0102_0304_0506_0708,
        };
        let mut expected = vec![0x00, 29, 1, 0x82, 6, 0x20, 0x01, 0x0d, 0xb8];
        expected.extend_from_slice(&[0; 11]);
        expected.extend_from_slice(&[7, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(resp.to_frame(), expected);
        assert_eq!(Response::decode(body(&expected)).unwrap(), resp);
    }

    #[test]
    fn round_trips() {
        let reqs = [
            Request::Register {
                id: id(&"x".repeat(64)),
                addr: "[::1]:1".parse().unwrap(),
                ttl_secs: u32::MAX,
                token: None,
            },
            Request::Lookup { id: id("dév-ü") },
            Request::Unregister {
                id: id("d"),
                token: Token::from_bytes([7; 16]),
            },
        ];
        for r in reqs {
            assert_eq!(Request::decode(body(&r.to_frame())).unwrap(), r);
        }
        let resps = [
            Response::Registered {
                token: Token::from_bytes([9; 16]),
                expires_at: u64::MAX,
            },
            Response::NotFound,
            Response::Unregistered,
            Response::Error {
                code: ErrorCode::Denied,
            },
            Response::Error {
                code: ErrorCode::Unknown(200),
            },
        ];
        for r in resps {
            assert_eq!(Response::decode(body(&r.to_frame())).unwrap(), r);
        }
    }

    #[test]
    fn rejects_bad_bodies() {
        let good = Request::Lookup { id: id("abc") }.to_frame();
        let good = body(&good);
        // Wrong version.
        let mut v = good.to_vec();
        v[0] = 2;
        assert!(matches!(
            Request::decode(&v),
            Err(Error::UnsupportedVersion(2))
        ));
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(Request::decode(&good[..n]).is_err(), "prefix of {n} bytes");
        }
        // Trailing byte.
        let mut t = good.to_vec();
        t.push(0);
        assert!(matches!(Request::decode(&t), Err(Error::Malformed(_))));
        // Unknown type, empty id, id too long, invalid UTF-8, control character.
        assert!(Request::decode(&[1, 0x7f, 1, b'a']).is_err());
        assert!(matches!(
            Request::decode(&[1, T_LOOKUP, 0]),
            Err(Error::InvalidId)
        ));
        let mut long = vec![1, T_LOOKUP, 65];
        long.extend_from_slice(&[b'a'; 65]);
        assert!(matches!(Request::decode(&long), Err(Error::InvalidId)));
        assert!(matches!(
            Request::decode(&[1, T_LOOKUP, 2, 0xc3, 0x28]),
            Err(Error::InvalidId)
        ));
        assert!(matches!(
            Request::decode(&[1, T_LOOKUP, 2, b'a', b'\n']),
            Err(Error::InvalidId)
        ));
        // Bad address family and bad token flag in a Register.
        let reg = Request::Register {
            id: id("a"),
            addr: "10.0.0.1:5".parse().unwrap(),
            ttl_secs: 1,
            token: None,
        }
        .to_frame();
        let mut fam = body(&reg).to_vec();
        fam[4] = 5;
        assert!(matches!(Request::decode(&fam), Err(Error::Malformed(_))));
        let mut flag = body(&reg).to_vec();
        *flag.last_mut().unwrap() = 2;
        assert!(matches!(Request::decode(&flag), Err(Error::Malformed(_))));
        // A response type is not a request.
        assert!(Request::decode(&[1, T_NOT_FOUND]).is_err());
    }

    #[test]
    fn token_equality_and_debug() {
        let a = Token::from_bytes([1; 16]);
        let mut b = [1; 16];
        b[15] = 2;
        assert_ne!(a, Token::from_bytes(b));
        assert_eq!(a, Token::from_bytes([1; 16]));
        assert_eq!(format!("{a:?}"), "Token(..)");
        assert_ne!(Token::random().unwrap(), Token::random().unwrap());
    }

    #[tokio::test]
    async fn frame_reader_bounds() {
        let mut buf = [0u8; MAX_MESSAGE];
        // Oversize is refused from the prefix alone (no body bytes present).
        let mut over: &[u8] = &[0x04, 0x01];
        assert!(matches!(
            read_frame(&mut over, &mut buf).await,
            Err(Error::TooLarge { len: 1025 })
        ));
        // Exactly MAX_MESSAGE is accepted.
        let mut max = vec![0x04, 0x00];
        max.extend_from_slice(&[0xaa; MAX_MESSAGE]);
        assert_eq!(read_frame(&mut &max[..], &mut buf).await.unwrap(), 1024);
        // Truncated body.
        let mut short: &[u8] = &[0x00, 0x05, 1, 2];
        assert!(matches!(
            read_frame(&mut short, &mut buf).await,
            Err(Error::Io(_))
        ));
    }
}
