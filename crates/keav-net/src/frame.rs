//! Framing for stream transports (TCP).
//!
//! ```text
//! length: u32 big-endian   number of payload bytes (at most MAX_PAYLOAD)
//! kind:   u8               0 = handshake message (a bare ZRTP message), 1 = record
//! payload: [length] bytes
//! ```
//!
//! [`FrameReader`] checks the length and the kind before it reserves any memory for the
//! payload, so an oversized length costs the peer its connection and us nothing. Its
//! [`FrameReader::read_frame`] is cancel-safe: bytes already read stay buffered, so it can sit
//! in a `tokio::select!` next to timers and shutdown signals.

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the frame header (length and kind).
pub const HEADER_LEN: usize = 5;
/// Largest payload a frame may carry (64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A bare ZRTP handshake message.
    Handshake,
    /// A record of the secure channel.
    Record,
}

impl FrameKind {
    /// The kind byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            FrameKind::Handshake => 0,
            FrameKind::Record => 1,
        }
    }

    /// Parses a kind byte.
    pub fn from_code(code: u8) -> Option<FrameKind> {
        match code {
            0 => Some(FrameKind::Handshake),
            1 => Some(FrameKind::Record),
            _ => None,
        }
    }
}

/// A malformed frame. The connection that carried it is cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length field exceeds [`MAX_PAYLOAD`].
    #[error("frame length {len} exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversized {
        /// The announced payload length.
        len: u32,
    },
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A frame of a kind that is not allowed at this point (e.g. a record before the
    /// handshake completed).
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload (mutable, so that records can be opened in place).
    pub payload: BytesMut,
}

/// Reads frames from a byte stream with bounded buffering.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The next frame; `Ok(None)` if the stream ended cleanly between frames.
    ///
    /// Cancel-safe. Memory use is bounded by [`HEADER_LEN`] + [`MAX_PAYLOAD`] plus one read.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameReadError> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(frame));
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated.into());
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let code = header[4];
        let kind = FrameKind::from_code(code).ok_or(FrameError::UnknownKind(code))?;
        let total = usize::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or(FrameError::Oversized { len })?
            + HEADER_LEN;
        if self.buf.len() < total {
            // Only now, with a checked length, make room for the rest of this frame.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        frame.advance(HEADER_LEN);
        Ok(Some(Frame {
            kind,
            payload: frame,
        }))
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Error of [`FrameReader::read_frame`]: the transport failed or the peer sent garbage.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameReadError {
    /// Transport failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Malformed frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl From<FrameReadError> for crate::Error {
    fn from(e: FrameReadError) -> Self {
        match e {
            FrameReadError::Io(e) => crate::Error::Io(e),
            FrameReadError::Frame(e) => crate::Error::Frame(e),
        }
    }
}

/// Writes frames to a byte stream. Frames are assembled in one buffer and written with one
/// call per [`FrameWriter::flush`].
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a writer.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// Queues one frame whose payload `fill` appends to the given buffer. Nothing is queued
    /// if `fill` fails or the payload would exceed [`MAX_PAYLOAD`].
    pub fn queue_with<E>(
        &mut self,
        kind: FrameKind,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), QueueError<E>> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0, 0, 0, kind.code()]);
        if let Err(e) = fill(&mut self.buf) {
            self.buf.truncate(start);
            return Err(QueueError::Fill(e));
        }
        let len = self.buf.len() - start - HEADER_LEN;
        let Some(wire_len) = u32::try_from(len).ok().filter(|_| len <= MAX_PAYLOAD) else {
            self.buf.truncate(start);
            return Err(QueueError::TooLarge);
        };
        if let Some(h) = self.buf.get_mut(start..start + 4) {
            h.copy_from_slice(&wire_len.to_be_bytes());
        }
        Ok(())
    }

    /// Queues one frame with this payload.
    pub fn queue(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), crate::Error> {
        self.queue_with(kind, |b| {
            b.extend_from_slice(payload);
            Ok::<(), crate::Error>(())
        })
        .map_err(|e| match e {
            QueueError::Fill(e) => e,
            QueueError::TooLarge => crate::Error::InvalidInput("frame payload over 64 KiB"),
        })
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes every queued frame and flushes the stream.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.inner.flush().await
    }

    /// Queues one frame and flushes.
    pub async fn write_frame(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
    ) -> Result<(), crate::Error> {
        self.queue(kind, payload)?;
        self.flush().await?;
        Ok(())
    }

    /// Shuts the write side down (after flushing).
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }
}

/// Error of [`FrameWriter::queue_with`].
#[derive(Debug)]
pub enum QueueError<E> {
    /// The payload callback failed.
    Fill(E),
    /// The payload exceeded [`MAX_PAYLOAD`].
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(a);
        let big = vec![7u8; MAX_PAYLOAD];
        let task = tokio::spawn(async move {
            w.write_frame(FrameKind::Handshake, b"hello").await.unwrap();
            w.write_frame(FrameKind::Record, &big).await.unwrap();
            w.write_frame(FrameKind::Record, b"").await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        let f = r.read_frame().await.unwrap().unwrap();
        assert_eq!(
            (f.kind, &f.payload[..]),
            (FrameKind::Handshake, &b"hello"[..])
        );
        let f = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Record);
        assert_eq!(f.payload.len(), MAX_PAYLOAD);
        assert!(f.payload.iter().all(|b| *b == 7));
        let f = r.read_frame().await.unwrap().unwrap();
        assert!(f.payload.is_empty());
        assert!(r.read_frame().await.unwrap().is_none());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn wire_layout() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(a);
        w.write_frame(FrameKind::Record, b"xyz").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [0, 0, 0, 3, 1, b'x', b'y', b'z']);
    }

    #[tokio::test]
    async fn oversized_is_refused_before_reading_payload() {
        let (mut a, b) = tokio::io::duplex(64);
        // Announce 64 KiB + 1 and send nothing else: the reader must refuse at once.
        a.write_all(&[0, 1, 0, 1, 1]).await.unwrap();
        let mut r = FrameReader::new(b);
        match r.read_frame().await {
            Err(FrameReadError::Frame(FrameError::Oversized { len })) => {
                assert_eq!(len as usize, MAX_PAYLOAD + 1)
            }
            other => panic!("{other:?}"),
        }
        assert!(r.buf.capacity() < 16 * 1024);
    }

    #[tokio::test]
    async fn unknown_kind_and_truncation() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 1, 9, 0]).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(
            r.read_frame().await,
            Err(FrameReadError::Frame(FrameError::UnknownKind(9)))
        ));
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 4, 0, 1, 2]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert!(matches!(
            r.read_frame().await,
            Err(FrameReadError::Frame(FrameError::Truncated))
        ));
    }

    #[test]
    fn writer_refuses_oversized_payload() {
        let mut w = FrameWriter::new(Vec::<u8>::new());
        assert!(w
            .queue(FrameKind::Record, &vec![0; MAX_PAYLOAD + 1])
            .is_err());
        assert_eq!(w.pending(), 0);
    }
}
