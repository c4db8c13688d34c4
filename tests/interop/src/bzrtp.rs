//! Safe wrapper around one bzrtp endpoint (one ZRTP context with one channel).
//!
//! Everything goes through the C shim in `csrc/shim.c`; this module only
//! marshals data and keeps a Rust-side view of the packets bzrtp sent
//! (to learn our role, our Hello and ZID) and received (peer Hello/ZID).
//!
//! Time is simulated: the caller passes `now_ms` and bzrtp arms its
//! retransmission timers relative to the last time it was given.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::raw::c_char;
use std::path::PathBuf;

use crate::ffi;
use crate::wire;

/// Label passed to `bzrtp_exportKey` by default (see [`BzrtpEndpoint::exported_key`]).
pub const DEFAULT_EXPORT_LABEL: &[u8] = b"keav-interop exported key";

/// Where the endpoint keeps its ZID cache (rs1/rs2, PVS flag, own ZID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Cacheless: random ZID, no retained secrets.
    None,
    /// A private in-memory sqlite database (lives as long as the endpoint).
    Memory,
    /// A sqlite file; reuse it across sessions to exercise rs1/rs2.
    File(PathBuf),
}

/// Hash algorithms (RFC 6189 5.1.2) bzrtp 5.1 implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgo {
    /// SHA-256
    S256,
    /// SHA-384
    S384,
}

/// Cipher algorithms (RFC 6189 5.1.3) bzrtp 5.1 implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlgo {
    /// AES-128 CFB
    Aes1,
    /// AES-256 CFB
    Aes3,
}

/// SRTP authentication tags (RFC 6189 5.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthTag {
    /// HMAC-SHA1 32-bit tag
    Hs32,
    /// HMAC-SHA1 80-bit tag
    Hs80,
}

/// Key agreement types (RFC 6189 5.1.5 plus X255 from the ZRTP registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAgreement {
    /// Curve25519 ECDH
    X255,
    /// 3072-bit finite field DH (bzrtp always adds it: mandatory)
    Dh3k,
}

/// SAS rendering types (RFC 6189 5.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SasType {
    /// base32, 4 characters
    B32,
    /// PGP word list, two words
    B256,
}

/// Role a channel ended up with after commit contention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sent the accepted Commit.
    Initiator,
    /// Received the accepted Commit.
    Responder,
}

/// `bzrtp_getChannelStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelStatus {
    /// No such channel.
    NotFound,
    /// Created, not started.
    Initialised,
    /// Handshake running.
    Ongoing,
    /// Secure: Conf2ACK sent (responder) or received (initiator).
    Secure,
    /// Error state.
    Error,
    /// Any other code.
    Other(i32),
}

const HASH_S256: u8 = 0x11;
const HASH_S384: u8 = 0x12;
const CIPHER_AES1: u8 = 0x21;
const CIPHER_AES3: u8 = 0x23;
const AUTH_HS32: u8 = 0x31;
const AUTH_HS80: u8 = 0x32;
const KA_X255: u8 = 0x42;
const KA_DH3K: u8 = 0x45;
const SAS_B32: u8 = 0x51;
const SAS_B256: u8 = 0x52;

impl HashAlgo {
    fn code(self) -> u8 {
        match self {
            Self::S256 => HASH_S256,
            Self::S384 => HASH_S384,
        }
    }
}
impl CipherAlgo {
    fn code(self) -> u8 {
        match self {
            Self::Aes1 => CIPHER_AES1,
            Self::Aes3 => CIPHER_AES3,
        }
    }
}
impl AuthTag {
    fn code(self) -> u8 {
        match self {
            Self::Hs32 => AUTH_HS32,
            Self::Hs80 => AUTH_HS80,
        }
    }
}
impl KeyAgreement {
    fn code(self) -> u8 {
        match self {
            Self::X255 => KA_X255,
            Self::Dh3k => KA_DH3K,
        }
    }
}
impl SasType {
    fn code(self) -> u8 {
        match self {
            Self::B32 => SAS_B32,
            Self::B256 => SAS_B256,
        }
    }
    /// The 4-character wire name.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::B32 => "B32 ",
            Self::B256 => "B256",
        }
    }
}

/// Wire name (4 chars, RFC 6189 section 5.1) of a bzrtp algorithm code.
pub fn algo_name(code: u8) -> Option<&'static str> {
    Some(match code {
        0x11 => "S256",
        0x12 => "S384",
        0x13 => "N256",
        0x14 => "N384",
        0x21 => "AES1",
        0x22 => "AES2",
        0x23 => "AES3",
        0x24 => "2FS1",
        0x25 => "2FS2",
        0x26 => "2FS3",
        0x31 => "HS32",
        0x32 => "HS80",
        0x33 => "SK32",
        0x34 => "SK64",
        0x41 => "DH2k",
        0x42 => "X255",
        0x43 => "EC25",
        0x44 => "X448",
        0x45 => "DH3k",
        0x46 => "EC38",
        0x47 => "EC52",
        0x4e => "Prsh",
        0x4f => "Mult",
        0x51 => "B32 ",
        0x52 => "B256",
        _ => return None,
    })
}

/// Configuration of one endpoint. Algorithm lists are in preference order;
/// bzrtp appends the mandatory algorithms it is missing (S256, AES1, HS32,
/// HS80, DH3k, Mult, B32) to what it advertises.
#[derive(Clone, Debug)]
pub struct BzrtpConfig {
    /// ZID cache.
    pub cache: Cache,
    /// Local URI (cache key together with the peer URI and peer ZID).
    pub self_uri: String,
    /// Peer URI.
    pub peer_uri: String,
    /// SSRC written in our packets.
    pub ssrc: u32,
    /// Hash preference list.
    pub hash: Vec<HashAlgo>,
    /// Cipher preference list.
    pub cipher: Vec<CipherAlgo>,
    /// SRTP auth tag preference list.
    pub auth_tags: Vec<AuthTag>,
    /// Key agreement preference list.
    pub key_agreement: Vec<KeyAgreement>,
    /// SAS type preference list.
    pub sas: Vec<SasType>,
    /// Label for `bzrtp_exportKey`.
    pub export_label: Vec<u8>,
    /// Transient auxiliary secret (`bzrtp_setAuxiliarySharedSecret`), if any.
    pub aux_secret: Option<Vec<u8>>,
}

impl BzrtpConfig {
    /// Defaults of the interop profile: cacheless, S256, AES1, HS32+HS80,
    /// X255, B32+B256, [`DEFAULT_EXPORT_LABEL`].
    pub fn new(self_uri: &str, peer_uri: &str, ssrc: u32) -> Self {
        Self {
            cache: Cache::None,
            self_uri: self_uri.to_owned(),
            peer_uri: peer_uri.to_owned(),
            ssrc,
            hash: vec![HashAlgo::S256],
            cipher: vec![CipherAlgo::Aes1],
            auth_tags: vec![AuthTag::Hs32, AuthTag::Hs80],
            key_agreement: vec![KeyAgreement::X255],
            sas: vec![SasType::B32, SasType::B256],
            export_label: DEFAULT_EXPORT_LABEL.to_vec(),
            aux_secret: None,
        }
    }

    /// Same, with a ZID cache.
    pub fn with_cache(mut self, cache: Cache) -> Self {
        self.cache = cache;
        self
    }
}

/// Algorithms bzrtp reports as negotiated (4-character wire names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// e.g. "S256"
    pub hash: String,
    /// e.g. "AES1"
    pub cipher: String,
    /// e.g. "HS32"
    pub auth_tag: String,
    /// e.g. "X255"
    pub key_agreement: String,
    /// e.g. "B32 "
    pub sas: String,
}

/// SRTP master keys and salts bzrtp handed out (self = what we encrypt with).
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    /// Our sending key.
    pub self_key: Vec<u8>,
    /// Our sending salt (14 bytes).
    pub self_salt: Vec<u8>,
    /// Peer's sending key.
    pub peer_key: Vec<u8>,
    /// Peer's sending salt.
    pub peer_salt: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrtpKeys(..)")
    }
}

/// Counters of bzrtp's statusMessage callback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounters {
    /// BZRTP_MESSAGE_CACHEMISMATCH
    pub cache_mismatch: i32,
    /// BZRTP_MESSAGE_PEERVERSIONOBSOLETE
    pub peer_version_obsolete: i32,
    /// BZRTP_MESSAGE_PEERNOTBZRTP (peer's client id is not bzrtp's)
    pub peer_not_bzrtp: i32,
    /// Any message of level BZRTP_MESSAGE_ERROR
    pub errors: i32,
}

struct Flags {
    srtp_started: bool,
    verified: bool,
    cache_mismatch: bool,
    aux_secret_mismatch: i32,
    export_ready: bool,
    cb_role: i32,
    export_rc: i32,
    zuid: i32,
    counters: StatusCounters,
    secrets_parts: i32,
}

/// One bzrtp ZRTP endpoint. Not `Send`: bzrtp contexts are used from one thread.
pub struct BzrtpEndpoint {
    ep: *mut ffi::ShimEndpoint,
    export_label: Vec<u8>,
    outgoing: VecDeque<Vec<u8>>,
    sent_types: Vec<[u8; 8]>,
    self_hello: Option<Vec<u8>>,
    peer_hello: Option<Vec<u8>>,
    last_now: u64,
}

impl std::fmt::Debug for BzrtpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BzrtpEndpoint")
            .field("status", &self.status())
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

fn stage_name(stage: i32) -> &'static str {
    match stage {
        -1 => "libbzrtp-dev not installed (crate built with cfg(no_bzrtp))",
        1 => "out of memory",
        2 => "sqlite3_open_v2 failed",
        3 => "bzrtp_createBzrtpContext failed",
        4 => "bzrtp_setZIDCache_lock failed",
        5 => "bzrtp_setCallbacks failed",
        6 => "bzrtp_initBzrtpContext failed",
        7 => "bzrtp_setClientData failed",
        8 => "bzrtp_setAuxiliarySharedSecret failed",
        9 => "invalid configuration (more than 7 algorithms of a kind?)",
        _ => "unknown failure",
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

impl BzrtpEndpoint {
    /// Creates the context: opens the cache, sets callbacks and algorithms,
    /// initialises the channel (this builds our Hello). Does not start it.
    pub fn new(config: &BzrtpConfig) -> Result<Self, String> {
        let self_uri = cstring("self_uri", &config.self_uri)?;
        let peer_uri = cstring("peer_uri", &config.peer_uri)?;
        let cache_path = match &config.cache {
            Cache::None => None,
            Cache::Memory => Some(cstring("cache path", ":memory:")?),
            Cache::File(p) => {
                let s = p
                    .to_str()
                    .ok_or_else(|| "cache path is not UTF-8".to_owned())?;
                Some(cstring("cache path", s)?)
            }
        };
        let hash: Vec<u8> = config.hash.iter().map(|a| a.code()).collect();
        let cipher: Vec<u8> = config.cipher.iter().map(|a| a.code()).collect();
        let auth: Vec<u8> = config.auth_tags.iter().map(|a| a.code()).collect();
        let ka: Vec<u8> = config.key_agreement.iter().map(|a| a.code()).collect();
        let sas: Vec<u8> = config.sas.iter().map(|a| a.code()).collect();
        let count = |v: &[u8], what: &str| -> Result<u8, String> {
            u8::try_from(v.len())
                .ok()
                .filter(|n| *n <= 7)
                .ok_or_else(|| format!("at most 7 {what} algorithms"))
        };
        let cfg = ffi::ShimConfig {
            cache_path: cache_path.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            self_uri: self_uri.as_ptr(),
            peer_uri: peer_uri.as_ptr(),
            ssrc: config.ssrc,
            hash: hash.as_ptr(),
            hash_count: count(&hash, "hash")?,
            cipher: cipher.as_ptr(),
            cipher_count: count(&cipher, "cipher")?,
            auth_tag: auth.as_ptr(),
            auth_tag_count: count(&auth, "auth tag")?,
            key_agreement: ka.as_ptr(),
            key_agreement_count: count(&ka, "key agreement")?,
            sas: sas.as_ptr(),
            sas_count: count(&sas, "SAS")?,
            export_label: config.export_label.as_ptr(),
            export_label_len: config.export_label.len(),
            aux_secret: config
                .aux_secret
                .as_ref()
                .map_or(std::ptr::null(), |a| a.as_ptr()),
            aux_secret_len: config.aux_secret.as_ref().map_or(0, Vec::len),
        };
        let mut stage = 0;
        let mut detail = 0;
        // SAFETY: every pointer in `cfg` points into a buffer that outlives
        // this call (the shim copies what it keeps); the out pointers are valid.
        let ep = unsafe { ffi::kshim_new(&cfg, &mut stage, &mut detail) };
        if ep.is_null() {
            return Err(format!(
                "bzrtp endpoint creation failed: {} (code {detail:#x})",
                stage_name(stage)
            ));
        }
        Ok(Self {
            ep,
            export_label: config.export_label.clone(),
            outgoing: VecDeque::new(),
            sent_types: Vec::new(),
            self_hello: None,
            peer_hello: None,
            last_now: 0,
        })
    }

    /// Moves packets bzrtp queued in the shim into our queue, noting their types.
    fn drain(&mut self) {
        loop {
            // SAFETY: self.ep is a live endpoint (freed only in Drop).
            let len = unsafe { ffi::kshim_next_len(self.ep) };
            if len == 0 {
                break;
            }
            let mut buf = vec![0u8; len];
            // SAFETY: buf has `len` writable bytes.
            let got = unsafe { ffi::kshim_pop(self.ep, buf.as_mut_ptr(), buf.len()) };
            if got != len {
                break;
            }
            if let Some(t) = wire::message_type(&buf) {
                if &t == b"Hello   " && self.self_hello.is_none() {
                    self.self_hello = Some(buf.clone());
                }
                self.sent_types.push(t);
            }
            self.outgoing.push_back(buf);
        }
    }

    fn rc(rc: i32) -> Result<(), i32> {
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }

    /// Starts the channel engine and gives it the time: the first Hello is
    /// sent at once (bzrtp arms its Hello timer to fire on the first tick).
    pub fn start(&mut self, now_ms: u64) -> Result<(), i32> {
        // SAFETY: live endpoint.
        let rc = unsafe { ffi::kshim_start(self.ep) };
        self.drain();
        Self::rc(rc)?;
        self.iterate(now_ms)
    }

    /// Gives bzrtp the current time; fires a due retransmission timer.
    pub fn iterate(&mut self, now_ms: u64) -> Result<(), i32> {
        self.last_now = now_ms;
        // SAFETY: live endpoint.
        let rc = unsafe { ffi::kshim_iterate(self.ep, now_ms) };
        self.drain();
        Self::rc(rc)
    }

    /// Processes one incoming ZRTP packet (full RFC 6189 packet with CRC).
    ///
    /// If `now_ms` is later than the last time given, the clock is first
    /// advanced with `bzrtp_iterate` (bzrtp arms timers relative to the last
    /// iterate time), which may fire a due retransmission. Returns bzrtp's
    /// error code on rejection (e.g. 0xa002 out of order, 0xa004 bad CRC,
    /// 0xe002 unmatching repetition — see NOTES.md).
    pub fn process(&mut self, packet: &[u8], now_ms: u64) -> Result<(), i32> {
        if now_ms > self.last_now {
            // an iterate error is only "no channel", which process reports too
            let _ = self.iterate(now_ms);
        }
        // SAFETY: live endpoint; packet is a valid slice (the shim copies it).
        let rc = unsafe { ffi::kshim_process(self.ep, packet.as_ptr(), packet.len()) };
        self.drain();
        if rc == 0
            && self.peer_hello.is_none()
            && wire::message_type(packet).as_ref() == Some(b"Hello   ")
        {
            self.peer_hello = Some(packet.to_vec());
        }
        Self::rc(rc)
    }

    /// Takes every packet bzrtp sent since the last call, oldest first.
    pub fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        self.drain();
        self.outgoing.drain(..).collect()
    }

    /// Whether a packet could not be queued (allocation failure in the shim).
    pub fn queue_overflowed(&self) -> bool {
        // SAFETY: live endpoint.
        unsafe { ffi::kshim_queue_overflowed(self.ep) != 0 }
    }

    /// `bzrtp_getChannelStatus`.
    pub fn status(&self) -> ChannelStatus {
        // SAFETY: live endpoint.
        match unsafe { ffi::kshim_channel_status(self.ep) } {
            0x1000 => ChannelStatus::NotFound,
            0x1001 => ChannelStatus::Initialised,
            0x1002 => ChannelStatus::Ongoing,
            0x1004 => ChannelStatus::Secure,
            0x1008 => ChannelStatus::Error,
            c => ChannelStatus::Other(c),
        }
    }

    /// Channel secure (and the startSrtpSession callback was called).
    pub fn is_secure(&self) -> bool {
        self.status() == ChannelStatus::Secure && self.flags().srtp_started
    }

    fn flags(&self) -> Flags {
        let mut f = [0i32; 13];
        // SAFETY: live endpoint; the shim writes exactly 13 ints.
        unsafe { ffi::kshim_flags(self.ep, f.as_mut_ptr()) };
        Flags {
            srtp_started: f[0] != 0,
            verified: f[1] != 0,
            cache_mismatch: f[2] != 0,
            aux_secret_mismatch: f[3],
            export_ready: f[4] != 0,
            cb_role: f[5],
            export_rc: f[6],
            zuid: f[7],
            counters: StatusCounters {
                cache_mismatch: f[8],
                peer_version_obsolete: f[9],
                peer_not_bzrtp: f[10],
                errors: f[11],
            },
            secrets_parts: f[12],
        }
    }

    /// The SAS as bzrtp renders it: 4 base32 chars for B32, "word:word" for B256.
    pub fn sas(&self) -> Option<String> {
        let mut buf = [0u8; 64];
        // SAFETY: live endpoint; buf has 64 writable bytes.
        let n = unsafe { ffi::kshim_sas(self.ep, buf.as_mut_ptr().cast::<c_char>(), buf.len()) };
        if n == 0 {
            return None;
        }
        buf.get(..n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    fn algos(&self) -> Option<[u8; 5]> {
        let mut a = [0u8; 5];
        // SAFETY: live endpoint; the shim writes 5 bytes.
        let ok = unsafe { ffi::kshim_algos(self.ep, a.as_mut_ptr()) };
        (ok != 0).then_some(a)
    }

    /// Negotiated SAS type.
    pub fn sas_type(&self) -> Option<SasType> {
        match self.algos()?[4] {
            SAS_B32 => Some(SasType::B32),
            SAS_B256 => Some(SasType::B256),
            _ => None,
        }
    }

    /// All negotiated algorithms, once the SRTP secrets exist.
    pub fn negotiated(&self) -> Option<Negotiated> {
        let a = self.algos()?;
        let n = |c: u8| algo_name(c).unwrap_or("????").to_owned();
        Some(Negotiated {
            hash: n(a[0]),
            cipher: n(a[1]),
            auth_tag: n(a[2]),
            key_agreement: n(a[3]),
            sas: n(a[4]),
        })
    }

    /// Our role, from the DHPart we sent (DHPart1: responder, DHPart2:
    /// initiator), else from the contextReadyForExportedKeys callback.
    pub fn role(&self) -> Option<Role> {
        for t in &self.sent_types {
            if t == b"DHPart1 " {
                return Some(Role::Responder);
            }
            if t == b"DHPart2 " {
                return Some(Role::Initiator);
            }
        }
        self.callback_role()
    }

    /// Role as given by bzrtp's contextReadyForExportedKeys callback.
    pub fn callback_role(&self) -> Option<Role> {
        match self.flags().cb_role {
            0 => Some(Role::Initiator),
            1 => Some(Role::Responder),
            _ => None,
        }
    }

    /// `bzrtp_exportKey(label)` computed inside contextReadyForExportedKeys,
    /// i.e. KDF(ExportedKey, label, KDF_Context, 256) with
    /// ExportedKey = KDF(s0, "Exported key", KDF_Context, 256) (RFC 6189 4.5.2).
    /// The raw ExportedKey is private to bzrtp. `None` before the callback
    /// (also when a cache mismatch delays it until [`Self::set_sas_verified`]).
    pub fn exported_key(&self) -> Option<Vec<u8>> {
        let f = self.flags();
        if !f.export_ready || f.export_rc != 0 {
            return None;
        }
        let mut buf = [0u8; 64];
        // SAFETY: live endpoint; buf has 64 writable bytes.
        let n = unsafe { ffi::kshim_exported_key(self.ep, buf.as_mut_ptr(), buf.len()) };
        (n > 0).then(|| buf.get(..n).map(<[u8]>::to_vec)).flatten()
    }

    /// The label used for [`Self::exported_key`].
    pub fn export_label(&self) -> &[u8] {
        &self.export_label
    }

    /// bzrtp's cacheMismatch flag (rs1/rs2 did not match the peer's).
    pub fn cache_mismatch(&self) -> bool {
        self.flags().cache_mismatch
    }

    /// `verified` of startSrtpSession: our cached PVS flag AND the peer's V
    /// flag from its Confirm. `None` before the channel is secure.
    pub fn previously_verified(&self) -> Option<bool> {
        let f = self.flags();
        f.srtp_started.then_some(f.verified)
    }

    /// Auxiliary secret status code (0 match, 1 mismatch, 2 unset).
    pub fn aux_secret_mismatch(&self) -> i32 {
        self.flags().aux_secret_mismatch
    }

    /// SRTP keys, once both directions were handed out.
    pub fn srtp_keys(&self) -> Option<SrtpKeys> {
        if self.flags().secrets_parts & 3 != 3 {
            return None;
        }
        let get = |which: i32| {
            let mut buf = [0u8; 32];
            // SAFETY: live endpoint; buf has 32 writable bytes.
            let n = unsafe { ffi::kshim_srtp(self.ep, which, buf.as_mut_ptr(), buf.len()) };
            buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default()
        };
        Some(SrtpKeys {
            self_key: get(0),
            self_salt: get(1),
            peer_key: get(2),
            peer_salt: get(3),
        })
    }

    /// rs1 and rs2 as stored in the cache right after bzrtp updated them at
    /// the end of this session (new rs1 = KDF(s0, "retained secret", ...),
    /// rs2 = previous rs1). `(None, None)` when cacheless or not reached.
    pub fn retained_secrets_at_export(&self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let get = |which: i32| {
            let mut buf = [0u8; 64];
            // SAFETY: live endpoint; buf has 64 writable bytes.
            let n = unsafe { ffi::kshim_rs_at_export(self.ep, which, buf.as_mut_ptr(), buf.len()) };
            (n > 0).then(|| buf.get(..n).map(<[u8]>::to_vec)).flatten()
        };
        (get(1), get(2))
    }

    /// Internal cache row id of (self URI, peer URI, peer ZID) as given by
    /// bzrtp's export callback or found by [`Self::cache_read`]; 0 if unknown.
    pub fn zuid(&self) -> i32 {
        self.flags().zuid
    }

    /// Makes sure the shim knows the zuid: given by bzrtp's export callback,
    /// else looked up in the cache by the peer's ZID.
    fn resolve_zuid(&mut self) {
        if let Some(zid) = self.peer_zid() {
            // SAFETY: live endpoint; zid is 12 readable bytes.
            unsafe { ffi::kshim_resolve_zuid(self.ep, zid.as_ptr()) };
        }
    }

    /// Reads a column ("rs1", "rs2", "pvs", "aux", "pbx") of the peer's row
    /// in the cache now (needs the peer's ZID to be known, i.e. its Hello seen).
    pub fn cache_read(&mut self, column: &str) -> Result<Option<Vec<u8>>, i32> {
        self.resolve_zuid();
        let col = CString::new(column).map_err(|_| -4)?;
        let mut buf = [0u8; 256];
        // SAFETY: live endpoint; col is NUL-terminated; buf has 256 bytes.
        let n =
            unsafe { ffi::kshim_cache_read(self.ep, col.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(buf.get(..n).map(<[u8]>::to_vec)),
            Err(_) => Err(i32::try_from(n).unwrap_or(-5)),
        }
    }

    /// Overwrites a column of the peer's row in the cache (test hook).
    pub fn cache_write(&mut self, column: &str, value: &[u8]) -> Result<(), i32> {
        self.resolve_zuid();
        let col = CString::new(column).map_err(|_| -4)?;
        // SAFETY: live endpoint; col NUL-terminated; value is a valid slice.
        let rc =
            unsafe { ffi::kshim_cache_write(self.ep, col.as_ptr(), value.as_ptr(), value.len()) };
        Self::rc(rc)
    }

    /// `bzrtp_SASVerified`: sets the PVS flag in cache (and, after a cache
    /// mismatch, performs the delayed rs1/rs2 update + export callback).
    pub fn set_sas_verified(&mut self) {
        // SAFETY: live endpoint.
        unsafe { ffi::kshim_sas_verified(self.ep) }
    }

    /// `bzrtp_resetSASVerified`: clears the PVS flag in cache.
    pub fn reset_sas_verified(&mut self) {
        // SAFETY: live endpoint.
        unsafe { ffi::kshim_sas_reset_verified(self.ep) }
    }

    /// `bzrtp_cache_getPeerStatus_lock` for our peer URI
    /// (0x2010 unknown, 0x2011 valid, 0x2012 invalid); `None` if cacheless.
    pub fn peer_cache_status(&mut self) -> Option<i32> {
        // SAFETY: live endpoint.
        let s = unsafe { ffi::kshim_peer_status(self.ep) };
        (s >= 0).then_some(s)
    }

    /// `bzrtp_getSelfHelloHash`: "1.10 <sha256 of our Hello message, hex>".
    pub fn self_hello_hash(&mut self) -> Option<String> {
        let mut buf = [0u8; 80];
        // SAFETY: live endpoint; buf has 80 bytes (bzrtp needs >= 70).
        let rc = unsafe {
            ffi::kshim_self_hello_hash(self.ep, buf.as_mut_ptr().cast::<c_char>(), buf.len())
        };
        if rc != 0 {
            return None;
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        buf.get(..end)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// Our first Hello packet as sent (None before start).
    pub fn self_hello(&self) -> Option<&[u8]> {
        self.self_hello.as_deref()
    }

    /// Our ZID, read from the Hello we sent.
    pub fn self_zid(&self) -> Option<[u8; 12]> {
        self.self_hello.as_deref().and_then(wire::hello_zid)
    }

    /// Peer's ZID, from the first Hello bzrtp accepted.
    pub fn peer_zid(&self) -> Option<[u8; 12]> {
        self.peer_hello.as_deref().and_then(wire::hello_zid)
    }

    /// Message types we sent so far, in order.
    pub fn sent_message_types(&self) -> &[[u8; 8]] {
        &self.sent_types
    }

    /// statusMessage counters.
    pub fn status_counters(&self) -> StatusCounters {
        self.flags().counters
    }
}

impl Drop for BzrtpEndpoint {
    fn drop(&mut self) {
        // SAFETY: self.ep came from kshim_new and is freed exactly once here.
        unsafe { ffi::kshim_free(self.ep) }
    }
}
