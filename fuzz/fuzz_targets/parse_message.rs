//! Fuzzes `Message::parse` and the helpers that look at raw message bytes.
//!
//! Beyond "never panics" it checks the parser's contract: whatever parses is valid, re-encodes
//! to bytes that parse back to the same message, and agrees with `peek_type`.
#![no_main]

use keav_proto::codec::Codec;
use keav_proto::msg::{mac_covered, peek_type, ConfirmBody, Message, MAX_MESSAGE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = Message::parse(data);
    let peeked = peek_type(data);
    if let Ok(m) = parsed {
        let t = m.message_type();
        assert_eq!(peeked, Ok(t));
        assert_eq!(m.validate(), Ok(()));
        let again = m.encode();
        assert_eq!(again.len(), data.len());
        assert!(again.len() <= MAX_MESSAGE_LEN);
        assert_eq!(Message::parse(&again).as_ref(), Ok(&m));
        let covered = mac_covered(data, t).expect("a parsed message has room for its MAC");
        assert!(covered.len() <= data.len());
    }
    if let Ok(b) = ConfirmBody::from_bytes(data) {
        assert_eq!(b.validate(), Ok(()));
        assert_eq!(ConfirmBody::from_bytes(&b.to_bytes()), Ok(b));
    }
});
