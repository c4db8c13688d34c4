//! Minimal, bounds-checked helpers over RFC 6189 packets, independent of
//! keav-proto, used to inspect and tamper with what bzrtp sends.
//!
//! Packet layout: 12-byte header (0x10 0x00, seq, 'ZRTP', SSRC), message
//! (0x505a preamble, length in words, 8-byte type, body), 4-byte CRC-32c.

/// Packet header length.
pub const HEADER_LEN: usize = 12;
/// Offset of the 8-byte message type.
pub const TYPE_OFFSET: usize = HEADER_LEN + 4;
/// Offset of the Hello body (after the 12-byte message header).
pub const HELLO_BODY: usize = HEADER_LEN + 12;

/// The 8-byte message type ("Hello   ", "Commit  ", ...), if the packet is long enough.
pub fn message_type(packet: &[u8]) -> Option<[u8; 8]> {
    packet.get(TYPE_OFFSET..TYPE_OFFSET + 8)?.try_into().ok()
}

/// Message type as text, trailing spaces trimmed.
pub fn message_name(packet: &[u8]) -> String {
    message_type(packet).map_or_else(
        || "?".to_owned(),
        |t| String::from_utf8_lossy(&t).trim_end().to_owned(),
    )
}

/// Sequence number.
pub fn sequence(packet: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(packet.get(2..4)?.try_into().ok()?))
}

/// SSRC.
pub fn ssrc(packet: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(packet.get(8..12)?.try_into().ok()?))
}

/// CRC-32c (Castagnoli) over everything but the last 4 bytes (RFC 6189
/// section 5, algorithm of RFC 4960 appendix B).
///
/// Byte order on the wire: bzrtp follows the SCTP reference code (byte-swap
/// the final value, then store it big-endian), so the packet ends with
/// `crc32c(..).to_le_bytes()`. See NOTES.md.
pub fn compute_crc(packet: &[u8]) -> Option<u32> {
    let body = packet.get(..packet.len().checked_sub(4)?)?;
    Some(crc32c::crc32c(body))
}

/// Whether the trailing CRC matches.
pub fn crc_ok(packet: &[u8]) -> bool {
    let Some(tail) = packet.len().checked_sub(4).and_then(|i| packet.get(i..)) else {
        return false;
    };
    let Ok(stored) = <[u8; 4]>::try_from(tail) else {
        return false;
    };
    compute_crc(packet) == Some(u32::from_le_bytes(stored))
}

/// Rewrites the trailing CRC after a modification.
pub fn fix_crc(packet: &mut [u8]) {
    if let Some(crc) = compute_crc(packet) {
        let n = packet.len();
        if let Some(tail) = packet.get_mut(n - 4..) {
            tail.copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Fields of a Hello message (RFC 6189 section 5.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// "1.10"
    pub version: [u8; 4],
    /// 16-byte client identifier, raw (bzrtp pads with NULs).
    pub client_id: [u8; 16],
    /// H3
    pub h3: [u8; 32],
    /// ZID
    pub zid: [u8; 12],
    /// Signature-capable flag.
    pub s: bool,
    /// MiTM (PBX) flag.
    pub m: bool,
    /// Passive flag.
    pub p: bool,
    /// Hash types.
    pub hash: Vec<String>,
    /// Cipher types.
    pub cipher: Vec<String>,
    /// Auth tag types.
    pub auth: Vec<String>,
    /// Key agreement types.
    pub key_agreement: Vec<String>,
    /// SAS types.
    pub sas: Vec<String>,
    /// Truncated MAC (8 bytes).
    pub mac: [u8; 8],
}

/// Parses a Hello packet (header + message + CRC).
pub fn parse_hello(packet: &[u8]) -> Option<Hello> {
    if message_type(packet)? != *b"Hello   " {
        return None;
    }
    let body = packet.get(HELLO_BODY..packet.len().checked_sub(4)?)?;
    let version: [u8; 4] = body.get(0..4)?.try_into().ok()?;
    let client_id: [u8; 16] = body.get(4..20)?.try_into().ok()?;
    let h3: [u8; 32] = body.get(20..52)?.try_into().ok()?;
    let zid: [u8; 12] = body.get(52..64)?.try_into().ok()?;
    let flags = *body.get(64)?;
    let hc = usize::from(*body.get(65)? & 0x0f);
    let cc_ac = *body.get(66)?;
    let kc_sc = *body.get(67)?;
    let counts = [
        hc,
        usize::from(cc_ac >> 4),
        usize::from(cc_ac & 0x0f),
        usize::from(kc_sc >> 4),
        usize::from(kc_sc & 0x0f),
    ];
    let mut off = 68;
    let mut lists: Vec<Vec<String>> = Vec::new();
    for n in counts {
        let mut l = Vec::new();
        for _ in 0..n {
            let w = body.get(off..off + 4)?;
            l.push(String::from_utf8_lossy(w).into_owned());
            off += 4;
        }
        lists.push(l);
    }
    let mac: [u8; 8] = body.get(off..off + 8)?.try_into().ok()?;
    if off + 8 != body.len() {
        return None;
    }
    let mut it = lists.into_iter();
    Some(Hello {
        version,
        client_id,
        h3,
        zid,
        s: flags & 0x40 != 0,
        m: flags & 0x20 != 0,
        p: flags & 0x10 != 0,
        hash: it.next()?,
        cipher: it.next()?,
        auth: it.next()?,
        key_agreement: it.next()?,
        sas: it.next()?,
        mac,
    })
}

/// ZID of a Hello packet.
pub fn hello_zid(packet: &[u8]) -> Option<[u8; 12]> {
    if message_type(packet)? != *b"Hello   " {
        return None;
    }
    packet
        .get(HELLO_BODY + 52..HELLO_BODY + 64)?
        .try_into()
        .ok()
}

/// Returns a copy of a Hello packet with `extra` 4-char SAS types appended
/// to its SAS list (sc, message length and CRC updated; the Hello MAC is NOT
/// recomputed, since only the sender knows H2).
pub fn hello_with_extra_sas(packet: &[u8], extra: &[[u8; 4]]) -> Option<Vec<u8>> {
    let h = parse_hello(packet)?;
    let sc = h.sas.len() + extra.len();
    if sc > 15 {
        return None;
    }
    // SAS list ends right before the 8-byte MAC and the 4-byte CRC.
    let insert_at = packet.len().checked_sub(12)?;
    let mut out = Vec::with_capacity(packet.len() + 4 * extra.len());
    out.extend_from_slice(packet.get(..insert_at)?);
    for e in extra {
        out.extend_from_slice(e);
    }
    out.extend_from_slice(packet.get(insert_at..)?);
    // counts byte kc|sc
    let kc_sc = out.get_mut(HELLO_BODY + 67)?;
    *kc_sc = (*kc_sc & 0xf0) | u8::try_from(sc).ok()?;
    // message length in 32-bit words: whole packet minus header and CRC
    let words = u16::try_from((out.len() - HEADER_LEN - 4) / 4).ok()?;
    out.get_mut(HEADER_LEN + 2..HEADER_LEN + 4)?
        .copy_from_slice(&words.to_be_bytes());
    fix_crc(&mut out);
    Some(out)
}
