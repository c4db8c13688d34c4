//! The record layer of a KEAV secure channel (being written).

/// The AEAD protecting channel records, negotiated in Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aead {
    /// AES-256-GCM (preferred where the CPU has AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    ChaCha20Poly1305,
}

impl Aead {
    /// The 4-byte identifier advertised in the Hello cipher list (plain ZRTP peers ignore it).
    pub fn wire_id(self) -> [u8; 4] {
        match self {
            Aead::Aes256Gcm => *b"KGCM",
            Aead::ChaCha20Poly1305 => *b"KC20",
        }
    }

    /// Parses a Hello cipher-list entry.
    pub fn from_wire_id(id: &[u8; 4]) -> Option<Aead> {
        match id {
            b"KGCM" => Some(Aead::Aes256Gcm),
            b"KC20" => Some(Aead::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// This machine's preference: AES-256-GCM first when the CPU has AES and carry-less
    /// multiply instructions, ChaCha20-Poly1305 first otherwise.
    pub fn local_preference() -> [Aead; 2] {
        if has_aes_instructions() {
            [Aead::Aes256Gcm, Aead::ChaCha20Poly1305]
        } else {
            [Aead::ChaCha20Poly1305, Aead::Aes256Gcm]
        }
    }

    /// Stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Aead::Aes256Gcm => "aes-256-gcm",
            Aead::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn has_aes_instructions() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn has_aes_instructions() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn has_aes_instructions() -> bool {
    false
}
