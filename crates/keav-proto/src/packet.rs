//! The RFC 6189 §5 packet that carries one message over datagram links (Figure 2).
//!
//! ```text
//! 0      1      2      3
//! 0x10   0x00   sequence (16)        '0001' + 12 unused bits, sequence number
//! magic cookie 0x5a525450 ("ZRTP")
//! source identifier (SSRC)
//! message ...
//! CRC-32c (1 word)
//! ```
//!
//! The CRC is the CRC-32c (Castagnoli) of everything before it, placed as RFC 4960 Appendix B
//! places SCTP's checksum: least significant byte first. This is what deployed
//! implementations (GNU ZRTP, Linphone's bzrtp) put on the wire; the tests check it against a
//! captured trace. Stream and broker transports carry the bare message instead.

use crate::codec::Reader;
use crate::error::ParseError;
use crate::msg::{HEADER_LEN, MAX_MESSAGE_LEN};

/// The ZRTP magic cookie `"ZRTP"`.
pub const MAGIC_COOKIE: u32 = 0x5a52_5450;
/// Bytes before the message: flags, sequence, magic cookie, SSRC.
pub const PACKET_HEADER_LEN: usize = 12;
/// Bytes of the trailing CRC.
pub const CRC_LEN: usize = 4;
/// Smallest packet: header, the shortest message (12 bytes) and CRC.
pub const MIN_PACKET_LEN: usize = PACKET_HEADER_LEN + HEADER_LEN + CRC_LEN;
/// Largest packet: header, a [`MAX_MESSAGE_LEN`] message and CRC.
pub const MAX_PACKET_LEN: usize = PACKET_HEADER_LEN + MAX_MESSAGE_LEN + CRC_LEN;

/// A decoded packet borrowing its message bytes (not yet parsed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Sequence number.
    pub sequence: u16,
    /// SSRC of the stream the packet belongs to.
    pub ssrc: u32,
    /// The ZRTP message; parse it with [`Message::parse`](crate::msg::Message::parse).
    pub message: &'a [u8],
}

impl Packet<'_> {
    /// Wire form, see [`encode_packet`].
    pub fn encode(&self) -> Vec<u8> {
        encode_packet(self.sequence, self.ssrc, self.message)
    }
}

/// Wraps `message` in a packet with the given sequence number and SSRC and appends the
/// CRC-32c.
pub fn encode_packet(sequence: u16, ssrc: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PACKET_HEADER_LEN + message.len() + CRC_LEN);
    out.extend_from_slice(&[0x10, 0x00]);
    out.extend_from_slice(&sequence.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(message);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks and unwraps a packet.
///
/// In order: size ([`ParseError::TooLong`] above [`MAX_PACKET_LEN`], [`ParseError::Truncated`]
/// below [`MIN_PACKET_LEN`]), header ([`ParseError::BadPacketHeader`] unless the first four
/// bits are `0001` and the magic cookie matches; the 12 unused bits are ignored as RFC 6189
/// requires), then CRC ([`ParseError::BadCrc`]). The message itself is not parsed.
pub fn decode_packet(bytes: &[u8]) -> Result<Packet<'_>, ParseError> {
    if bytes.len() > MAX_PACKET_LEN {
        return Err(ParseError::TooLong);
    }
    if bytes.len() < MIN_PACKET_LEN {
        return Err(ParseError::Truncated);
    }
    let mut r = Reader::new(bytes);
    let first: [u8; 4] = r.array()?;
    if first[0] >> 4 != 0x1 || r.u32()? != MAGIC_COOKIE {
        return Err(ParseError::BadPacketHeader);
    }
    let ssrc = r.u32()?;
    let message_len = r
        .remaining()
        .checked_sub(CRC_LEN)
        .ok_or(ParseError::Truncated)?;
    let message = r.take(message_len)?;
    let wire_crc = u32::from_le_bytes(r.array()?);
    let covered = bytes
        .get(..PACKET_HEADER_LEN + message_len)
        .ok_or(ParseError::Truncated)?;
    if crc32c::crc32c(covered) != wire_crc {
        return Err(ParseError::BadCrc);
    }
    Ok(Packet {
        sequence: u16::from_be_bytes([first[2], first[3]]),
        ssrc,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Message, MessageType};
    use proptest::prelude::*;

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 (iSCSI) check value for CRC-32c over "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8A9136AA, transmitted as aa 36 91 8a.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(0x8A91_36AAu32.to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    }

    #[test]
    fn layout_is_rfc_figure_2() {
        let msg = Message::HelloAck.encode();
        let p = encode_packet(0xbeef, 0x0102_0304, &msg);
        assert_eq!(p.len(), 12 + 12 + 4);
        assert_eq!(&p[0..2], &[0x10, 0x00]);
        assert_eq!(&p[2..4], &[0xbe, 0xef]);
        assert_eq!(&p[4..8], b"ZRTP");
        assert_eq!(&p[8..12], &[1, 2, 3, 4]);
        assert_eq!(&p[12..24], &msg[..]);
        let crc = crc32c::crc32c(&p[..24]);
        assert_eq!(&p[24..], &crc.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let msg = Message::Conf2Ack.encode();
        let p = encode_packet(7, 0xdead_beef, &msg);
        let d = decode_packet(&p).unwrap();
        assert_eq!(
            d,
            Packet {
                sequence: 7,
                ssrc: 0xdead_beef,
                message: &msg
            }
        );
        assert_eq!(d.encode(), p);
        assert_eq!(Message::parse(d.message), Ok(Message::Conf2Ack));
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        let msg = Message::ErrorAck.encode();
        let p = encode_packet(1, 2, &msg);
        for i in 0..p.len() {
            for bit in 0..8 {
                let mut q = p.clone();
                q[i] ^= 1 << bit;
                let r = decode_packet(&q);
                let unused_header_bit = (i == 0 && bit < 4) || i == 1;
                if unused_header_bit {
                    // Ignored bits: the packet still decodes only if the CRC matches, which it
                    // does not since the CRC covers them.
                    assert_eq!(r, Err(ParseError::BadCrc), "byte {i} bit {bit}");
                } else if i == 0 || (4..8).contains(&i) {
                    assert_eq!(r, Err(ParseError::BadPacketHeader), "byte {i} bit {bit}");
                } else {
                    assert_eq!(r, Err(ParseError::BadCrc), "byte {i} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn unused_header_bits_are_ignored() {
        let msg = Message::ErrorAck.encode();
        let mut p = encode_packet(1, 2, &msg);
        p[0] = 0x1f;
        p[1] = 0xff;
        let n = p.len();
        let crc = crc32c::crc32c(&p[..n - 4]);
        p[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let d = decode_packet(&p).unwrap();
        assert_eq!((d.sequence, d.ssrc, d.message), (1, 2, &msg[..]));
    }

    #[test]
    fn bad_magic_and_sizes() {
        let msg = Message::HelloAck.encode();
        let mut p = encode_packet(1, 2, &msg);
        p[4..8].copy_from_slice(b"ZRTQ");
        assert_eq!(decode_packet(&p), Err(ParseError::BadPacketHeader));
        let p = encode_packet(1, 2, &msg);
        for k in 0..p.len() {
            assert!(decode_packet(&p[..k]).is_err(), "prefix {k}");
        }
        assert_eq!(
            decode_packet(&p[..MIN_PACKET_LEN - 1]),
            Err(ParseError::Truncated)
        );
        let big = encode_packet(1, 2, &vec![0u8; MAX_MESSAGE_LEN + 1]);
        assert_eq!(decode_packet(&big), Err(ParseError::TooLong));
        let max = encode_packet(1, 2, &vec![0u8; MAX_MESSAGE_LEN]);
        assert_eq!(
            decode_packet(&max).map(|d| d.message.len()),
            Ok(MAX_MESSAGE_LEN)
        );
    }

    /// Packets captured from deployed implementations (see `msg/testdata/bzrtp_trace.hex`):
    /// our CRC placement must agree with theirs, and every message must parse and re-encode
    /// byte for byte.
    #[test]
    fn captured_trace_decodes() {
        let trace = include_str!("msg/testdata/bzrtp_trace.hex");
        let mut types = Vec::new();
        for line in trace
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let bytes = hex::decode(line.trim()).unwrap();
            let d = decode_packet(&bytes).unwrap();
            assert_eq!(encode_packet(d.sequence, d.ssrc, d.message), bytes);
            let m = Message::parse(d.message).unwrap();
            assert_eq!(m.encode(), d.message);
            types.push(m.message_type());
        }
        assert_eq!(
            types,
            [
                MessageType::Hello,
                MessageType::Hello,
                MessageType::HelloAck,
                MessageType::Commit,
                MessageType::DhPart1,
                MessageType::DhPart2,
                MessageType::Confirm1,
                MessageType::Confirm2,
                MessageType::Conf2Ack
            ]
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2200)) {
            let _ = decode_packet(&bytes);
        }

        #[test]
        fn round_trip_any(seq: u16, ssrc: u32, msg in proptest::collection::vec(any::<u8>(), 12..300)) {
            let p = encode_packet(seq, ssrc, &msg);
            let d = decode_packet(&p).unwrap();
            prop_assert_eq!(d, Packet { sequence: seq, ssrc, message: &msg });
        }
    }
}
