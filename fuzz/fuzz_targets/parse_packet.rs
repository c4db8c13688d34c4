//! Fuzzes `decode_packet` followed by `Message::parse` of the carried message, as a datagram
//! receiver does. Random bytes rarely carry a valid CRC-32c, so the input is also wrapped in a
//! correct packet to reach the message parser through the packet layer.
#![no_main]

use keav_proto::error::ParseError;
use keav_proto::msg::{Message, MAX_MESSAGE_LEN};
use keav_proto::packet::{decode_packet, encode_packet, MAX_PACKET_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_packet(data) {
        assert!(data.len() <= MAX_PACKET_LEN);
        let again = encode_packet(p.sequence, p.ssrc, p.message);
        assert_eq!(again.len(), data.len());
        assert_eq!(decode_packet(&again), Ok(p));
        if let Ok(m) = Message::parse(p.message) {
            assert_eq!(Message::parse(&m.encode()), Ok(m));
        }
    }

    let wrapped = encode_packet(0x1234, 0xdead_beef, data);
    match decode_packet(&wrapped) {
        Ok(p) => {
            assert_eq!((p.sequence, p.ssrc, p.message), (0x1234, 0xdead_beef, data));
            if let Ok(m) = Message::parse(p.message) {
                assert_eq!(m.encode().len(), data.len());
                assert_eq!(Message::parse(&m.encode()), Ok(m));
            }
        }
        Err(ParseError::Truncated) => assert!(data.len() < 12),
        Err(ParseError::TooLong) => assert!(data.len() > MAX_MESSAGE_LEN),
        Err(e) => panic!("a well-formed packet was rejected: {e:?}"),
    }
});
