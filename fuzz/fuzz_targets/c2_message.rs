//! Fuzzes the keav-c2 parsers: `Message::decode` then `verify` with a fixed key, the body
//! codecs directly, and the replay guard's persisted state.
//!
//! Beyond "never panics" it checks: whatever decodes re-signs (with the fixed key) to a
//! message that decodes to the same header and body; an arbitrary signature never verifies;
//! whatever guard state decodes re-encodes to the same bytes.
#![no_main]

use std::sync::OnceLock;

use keav_c2::guard::{GuardState, PeerState};
use keav_c2::keys::{Alg, SigningKey};
use keav_c2::wire::{
    Body, Envelope, Message, MessageType, Unverified, FIXED_HEADER_LEN, MAX_MESSAGE_LEN,
};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(Alg::Ed25519, &[7u8; 32]).expect("fixed key"))
}

fuzz_target!(|data: &[u8]| {
    let k = key();
    if let Ok(u) = Message::decode(data) {
        let h = u.header().clone();
        assert!(data.len() <= MAX_MESSAGE_LEN);
        assert_eq!(u.signed_bytes(), &data[..u.signed_bytes().len()]);
        // The fuzzer cannot forge the fixed key's signature.
        assert!(u.clone().verify(&k.public()).is_err());
        // Take the body out by signing the same content with the fixed key.
        let env = Envelope {
            sender: h.sender,
            recipient: h.recipient,
            seq: h.seq,
            expiry: h.expiry,
            token: h.token.clone(),
        };
        if h.alg == Alg::Ed25519 {
            let body = Body::decode(h.msg_type, body_of(data, &u)).expect("decoded once");
            let again = Message::sign(&env, &body, k).expect("a parsed body re-encodes");
            let m = Message::decode(&again)
                .and_then(|u| u.verify(&k.public()))
                .expect("own signature verifies");
            assert_eq!(m.body(), &body);
            assert_eq!(m.header().seq, h.seq);
            // Same layout, so the same length (both Ed25519).
            assert_eq!(again.len(), data.len());
        }
    }
    // Body codecs on their own, with the first byte choosing the type.
    if let Some((&t, rest)) = data.split_first() {
        if let Ok(ty) = MessageType::from_id(t) {
            if let Ok(body) = Body::decode(ty, rest) {
                let mut out = Vec::new();
                body.encode(&mut out).expect("a parsed body re-encodes");
                assert_eq!(out, rest);
            }
        }
    }
    if let Ok(s) = GuardState::decode(data) {
        assert_eq!(s.encode(), data);
    }
    if let Ok(p) = PeerState::decode(data) {
        assert_eq!(p.encode(), data);
    }
});

/// The body bytes of a decoded message: after the header and the two-byte body length.
fn body_of<'a>(data: &'a [u8], u: &Unverified) -> &'a [u8] {
    let header_len = FIXED_HEADER_LEN + 1 + u.header().token.as_bytes().len();
    &data[header_len + 2..u.signed_bytes().len()]
}
