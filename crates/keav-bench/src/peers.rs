//! In-memory drivers for the comparison handshakes: Noise XX (snow) and TLS 1.3 (rustls with
//! the *ring* provider).

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, HandshakeKind, RootCertStore, ServerConfig,
    ServerConnection,
};

use crate::keav::{timed, Depths, HandshakeStats, SentMessage, SideStats};
use crate::BenchError;

/// The Noise protocol benchmarked: XX with X25519, ChaCha20-Poly1305 and BLAKE2s.
pub const NOISE_XX: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Noise XX with AES-256-GCM (and SHA-256), for the AES transport records.
pub const NOISE_XX_AESGCM: &str = "Noise_XX_25519_AESGCM_SHA256";

/// Long-term static key pairs of the two Noise parties, made once outside the timed loop
/// (like a device's identity key or a TLS certificate).
pub struct NoiseStatics {
    params: snow::params::NoiseParams,
    initiator: snow::Keypair,
    responder: snow::Keypair,
}

impl core::fmt::Debug for NoiseStatics {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NoiseStatics")
            .field("params", &self.params.name)
            .finish_non_exhaustive()
    }
}

impl NoiseStatics {
    /// Generates static key pairs for both parties of [`NOISE_XX`].
    pub fn generate() -> Result<Self, BenchError> {
        Self::generate_for(NOISE_XX)
    }

    /// Generates static key pairs for both parties of the XX protocol `name` (e.g.
    /// [`NOISE_XX_AESGCM`]).
    pub fn generate_for(name: &str) -> Result<Self, BenchError> {
        let params: snow::params::NoiseParams = name.parse()?;
        let b = snow::Builder::new(params.clone());
        Ok(Self {
            initiator: b.generate_keypair()?,
            responder: b.generate_keypair()?,
            params,
        })
    }
}

/// Both parties after a completed Noise handshake.
pub struct NoiseOutcome {
    /// The initiator's transport state.
    pub initiator: snow::TransportState,
    /// The responder's transport state.
    pub responder: snow::TransportState,
    /// Per-side CPU, messages and bytes, and flights. Bytes are the handshake messages each
    /// framed with the 2-byte big-endian length prefix the Noise specification (§13)
    /// suggests for stream transports ([`NOISE_LENGTH_PREFIX`]).
    pub stats: HandshakeStats,
}

/// Bytes of the length prefix counted in front of every Noise message.
pub const NOISE_LENGTH_PREFIX: usize = 2;

impl core::fmt::Debug for NoiseOutcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NoiseOutcome")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Runs one complete Noise XX handshake (three messages, empty payloads) between the two
/// parties, in memory, and checks that both end with the same handshake hash.
pub fn noise_xx_handshake(statics: &NoiseStatics) -> Result<NoiseOutcome, BenchError> {
    noise_drive(statics, None)
}

/// Like [`noise_xx_handshake`], and also returns every message moved (with its length
/// prefix).
pub fn noise_xx_handshake_traced(
    statics: &NoiseStatics,
) -> Result<(NoiseOutcome, Vec<SentMessage>), BenchError> {
    let mut trace = Vec::new();
    let o = noise_drive(statics, Some(&mut trace))?;
    Ok((o, trace))
}

fn noise_drive(
    statics: &NoiseStatics,
    mut trace: Option<&mut Vec<SentMessage>>,
) -> Result<NoiseOutcome, BenchError> {
    let mut st = HandshakeStats::default();
    let mut depths = Depths::default();
    let mut i = timed(&mut st.initiator.cpu, || {
        snow::Builder::new(statics.params.clone())
            .local_private_key(&statics.initiator.private)?
            .build_initiator()
    })?;
    let mut r = timed(&mut st.responder.cpu, || {
        snow::Builder::new(statics.params.clone())
            .local_private_key(&statics.responder.private)?
            .build_responder()
    })?;
    let mut msg = [0u8; 256];
    let mut payload = [0u8; 256];
    // -> e; <- e, ee, s, es; -> s, se
    for from_initiator in [true, false, true] {
        let (tx, rx) = if from_initiator {
            (&mut st.initiator, &mut st.responder)
        } else {
            (&mut st.responder, &mut st.initiator)
        };
        let (w, rd) = if from_initiator {
            (&mut i, &mut r)
        } else {
            (&mut r, &mut i)
        };
        let n = timed(&mut tx.cpu, || w.write_message(&[], &mut msg))?;
        let m = msg.get(..n).unwrap_or_default();
        let d = depths.send(from_initiator);
        tx.messages += 1;
        tx.bytes += (n + NOISE_LENGTH_PREFIX) as u64;
        if let Some(t) = trace.as_deref_mut() {
            let mut framed = Vec::with_capacity(n + NOISE_LENGTH_PREFIX);
            framed.extend_from_slice(&(n as u16).to_be_bytes());
            framed.extend_from_slice(m);
            t.push(SentMessage {
                from_initiator,
                bytes: framed,
                depth: d,
            });
        }
        depths.recv(!from_initiator, d);
        timed(&mut rx.cpu, || rd.read_message(m, &mut payload))?;
        if from_initiator && st.flights == 0 && i.is_handshake_finished() {
            st.flights = depths.received(true);
        }
    }
    if !i.is_handshake_finished() || !r.is_handshake_finished() {
        return Err(BenchError::Incomplete("noise"));
    }
    if i.get_handshake_hash() != r.get_handshake_hash() {
        return Err(BenchError::KeyMismatch("noise"));
    }
    let initiator = timed(&mut st.initiator.cpu, || i.into_transport_mode())?;
    let responder = timed(&mut st.responder.cpu, || r.into_transport_mode())?;
    Ok(NoiseOutcome {
        initiator,
        responder,
        stats: st,
    })
}

/// Largest Noise message (the Noise specification's limit).
const NOISE_MAX_MESSAGE: usize = 65535;

/// One direction of a Noise transport: the initiator writes, the responder reads.
pub struct NoisePipe {
    tx: snow::TransportState,
    rx: snow::TransportState,
    wire: Vec<u8>,
    out: Vec<u8>,
}

impl core::fmt::Debug for NoisePipe {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NoisePipe").finish_non_exhaustive()
    }
}

impl NoisePipe {
    /// Runs an XX handshake of protocol `name` ([`NOISE_XX`] or [`NOISE_XX_AESGCM`]) and
    /// keeps both transport states.
    pub fn new(name: &str) -> Result<Self, BenchError> {
        let o = noise_xx_handshake(&NoiseStatics::generate_for(name)?)?;
        Ok(Self {
            tx: o.initiator,
            rx: o.responder,
            wire: vec![0; NOISE_MAX_MESSAGE],
            out: vec![0; NOISE_MAX_MESSAGE],
        })
    }

    /// `write_message` of `payload` into the reused wire buffer, then `read_message` into the
    /// reused output buffer; returns the plaintext read.
    pub fn transfer(&mut self, payload: &[u8]) -> Result<&[u8], BenchError> {
        let n = self.tx.write_message(payload, &mut self.wire)?;
        let wire = self.wire.get(..n).unwrap_or_default();
        let m = self.rx.read_message(wire, &mut self.out)?;
        Ok(self.out.get(..m).unwrap_or_default())
    }
}

/// The TLS 1.3 cipher suite of a [`TlsPipe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsSuite {
    /// `TLS_AES_256_GCM_SHA384`.
    Aes256Gcm,
    /// `TLS_CHACHA20_POLY1305_SHA256`.
    ChaCha20Poly1305,
}

impl TlsSuite {
    fn suite(self) -> rustls::SupportedCipherSuite {
        match self {
            TlsSuite::Aes256Gcm => rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            TlsSuite::ChaCha20Poly1305 => {
                rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
            }
        }
    }
}

/// One direction of an established TLS 1.3 connection (rustls, ring provider): the client
/// writes application data, the server reads it. Records travel through a reused `Vec`.
#[derive(Debug)]
pub struct TlsPipe {
    client: ClientConnection,
    server: ServerConnection,
    wire: Vec<u8>,
    out: Vec<u8>,
}

impl TlsPipe {
    /// Runs a full handshake (Ed25519 certificate) restricted to `suite` and keeps both
    /// connections.
    pub fn new(suite: TlsSuite) -> Result<Self, BenchError> {
        let pair = TlsPair::with_suites(CertKind::Ed25519, &[suite.suite()])?;
        let o = pair.full_handshake()?;
        if o.client.negotiated_cipher_suite() != Some(suite.suite()) {
            return Err(BenchError::UnexpectedKind(format!(
                "negotiated {:?}",
                o.client.negotiated_cipher_suite()
            )));
        }
        Ok(Self {
            client: o.client,
            server: o.server,
            wire: Vec::with_capacity(32 * 1024),
            out: vec![0; 64 * 1024],
        })
    }

    /// The per-record path of a rustls user over a byte stream: client
    /// `writer().write_all(payload)`, `write_tls` into the reused wire buffer, server
    /// `read_tls` + `process_new_packets` until the wire buffer is consumed, then
    /// `reader().read_exact` of the payload length. Returns the plaintext read.
    pub fn transfer(&mut self, payload: &[u8]) -> Result<&[u8], BenchError> {
        use std::io::{Read, Write};
        self.client.writer().write_all(payload)?;
        self.wire.clear();
        while self.client.wants_write() {
            self.client.write_tls(&mut self.wire)?;
        }
        let mut rd: &[u8] = &self.wire;
        while !rd.is_empty() {
            if self.server.read_tls(&mut rd)? == 0 {
                return Err(BenchError::Incomplete("tls (receiver full)"));
            }
            self.server.process_new_packets()?;
        }
        let out = self
            .out
            .get_mut(..payload.len())
            .ok_or(BenchError::Incomplete("tls (payload too long)"))?;
        self.server.reader().read_exact(out)?;
        Ok(out)
    }

    /// Bytes the last [`TlsPipe::transfer`] put on the wire.
    pub fn last_wire_len(&self) -> usize {
        self.wire.len()
    }
}

/// Signature algorithm of the benchmark's self-signed server certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// Ed25519.
    Ed25519,
    /// ECDSA P-256 with SHA-256.
    EcdsaP256,
}

/// Server name in the benchmark certificate.
pub const TLS_SERVER_NAME: &str = "keav-bench.invalid";

/// A TLS 1.3 server and two clients (one without and one with session resumption), all with
/// the *ring* provider, trusting one self-signed certificate made at construction.
///
/// Built with [`TlsPair::with_ocsp_staple`], the server also staples a (synthetic) OCSP
/// response and the clients refuse a full handshake without a valid one; see [`ocsp`].
pub struct TlsPair {
    server: Arc<ServerConfig>,
    client_full: Arc<ClientConfig>,
    client_resume: Arc<ClientConfig>,
    name: ServerName<'static>,
    ocsp: bool,
}

impl core::fmt::Debug for TlsPair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsPair")
            .field("name", &self.name)
            .field("ocsp", &self.ocsp)
            .finish_non_exhaustive()
    }
}

/// Both sides after a completed TLS handshake.
#[derive(Debug)]
pub struct TlsOutcome {
    /// The client connection.
    pub client: ClientConnection,
    /// The server connection.
    pub server: ServerConnection,
    /// Per-side CPU, records and bytes, and flights. Bytes are the TLS records each side
    /// wrote (5-byte record headers included), including the server's NewSessionTicket
    /// records, which it sends during the handshake exchange.
    pub stats: HandshakeStats,
}

impl TlsOutcome {
    /// Full or resumed, as the client saw it.
    pub fn kind(&self) -> Option<HandshakeKind> {
        self.client.handshake_kind()
    }
}

/// What the server of a [`TlsPair`] staples, and whether the clients demand it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staple {
    /// No staple, no check (plain [`TlsPair::new`]).
    Off,
    /// A valid staple; the clients check it.
    Valid,
    /// Test only: the clients check, the server staples nothing.
    #[cfg(test)]
    Missing,
    /// Test only: the staple's body is altered after signing.
    #[cfg(test)]
    Tampered,
    /// Test only: signed by a key the clients do not trust.
    #[cfg(test)]
    WrongSigner,
}

impl TlsPair {
    /// Generates the certificate and builds the configurations (TLS 1.3 only, default key
    /// exchange groups of the ring provider, X25519 first; the server keeps its default of
    /// issuing two session tickets per handshake).
    pub fn new(kind: CertKind) -> Result<Self, BenchError> {
        Self::with_suites(kind, &[])
    }

    /// Like [`TlsPair::new`], but both sides offer only `suites` (all of the provider's
    /// TLS 1.3 suites if empty).
    pub fn with_suites(
        kind: CertKind,
        suites: &[rustls::SupportedCipherSuite],
    ) -> Result<Self, BenchError> {
        Self::build(kind, suites, Staple::Off)
    }

    /// Like [`TlsPair::new`], but the server staples an OCSP response to its certificate
    /// and the clients require it and check it (the patent's PKI baseline).
    ///
    /// The response is synthetic ([`ocsp::STAPLE_LEN`] = 472 bytes, in the size range of a
    /// real single-certificate OCSP response without embedded responder certificates) and
    /// signed with Ed25519 by a separate CA-like key made here. The clients' verifier wraps
    /// rustls's WebPKI verifier and additionally verifies the staple's signature, binding
    /// to the certificate and validity window, so a full handshake carries the cost of one
    /// OCSP signature check on the client. Resumed handshakes send no certificate, hence no
    /// staple, and are not checked (as in real TLS 1.3).
    pub fn with_ocsp_staple(kind: CertKind) -> Result<Self, BenchError> {
        Self::build(kind, &[], Staple::Valid)
    }

    fn build(
        kind: CertKind,
        suites: &[rustls::SupportedCipherSuite],
        staple: Staple,
    ) -> Result<Self, BenchError> {
        let alg = match kind {
            CertKind::Ed25519 => &rcgen::PKCS_ED25519,
            CertKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let key = rcgen::KeyPair::generate_for(alg)?;
        let cert =
            rcgen::CertificateParams::new(vec![TLS_SERVER_NAME.to_string()])?.self_signed(&key)?;
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let mut provider = rustls::crypto::ring::default_provider();
        if !suites.is_empty() {
            provider.cipher_suites = suites.to_vec();
        }
        let provider = Arc::new(provider);
        let server_builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth();
        let responder = match staple {
            Staple::Off => None,
            _ => Some(ocsp::Responder::generate()?),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let server = match (staple, &responder) {
            (Staple::Valid, Some(r)) => server_builder.with_single_cert_with_ocsp(
                vec![cert_der.clone()],
                key_der,
                r.staple(&cert_der, now)?,
            )?,
            #[cfg(test)]
            (Staple::Tampered, Some(r)) => {
                let mut s = r.staple(&cert_der, now)?;
                if let Some(b) = s.get_mut(60) {
                    *b ^= 1;
                }
                server_builder.with_single_cert_with_ocsp(vec![cert_der.clone()], key_der, s)?
            }
            #[cfg(test)]
            (Staple::WrongSigner, Some(_)) => {
                let other = ocsp::Responder::generate()?;
                let s = other.staple(&cert_der, now)?;
                server_builder.with_single_cert_with_ocsp(vec![cert_der.clone()], key_der, s)?
            }
            _ => server_builder.with_single_cert(vec![cert_der.clone()], key_der)?,
        };

        let mut roots = RootCertStore::empty();
        roots.add(cert_der)?;
        let roots = Arc::new(roots);
        let verifier: Option<Arc<ocsp::StapleVerifier>> = match &responder {
            Some(r) => {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .map_err(|e| BenchError::Report(format!("tls verifier: {e}")))?;
                Some(Arc::new(ocsp::StapleVerifier::new(inner, r.public_key())))
            }
            None => None,
        };
        let client = |resumption: Resumption| -> Result<ClientConfig, BenchError> {
            let b = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?;
            let mut c = match &verifier {
                Some(v) => b
                    .dangerous()
                    .with_custom_certificate_verifier(v.clone())
                    .with_no_client_auth(),
                None => b
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            };
            c.resumption = resumption;
            Ok(c)
        };
        let name = ServerName::try_from(TLS_SERVER_NAME)
            .map_err(|_| BenchError::UnexpectedKind("invalid server name".into()))?;
        Ok(Self {
            server: Arc::new(server),
            client_full: Arc::new(client(Resumption::disabled())?),
            client_resume: Arc::new(client(Resumption::in_memory_sessions(64))?),
            name,
            ocsp: staple != Staple::Off,
        })
    }

    /// Whether the server staples an OCSP response that the clients check.
    pub fn has_ocsp_staple(&self) -> bool {
        self.ocsp
    }

    /// The server configuration (for drivers over real sockets).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client configuration that never resumes.
    pub fn client_config_full(&self) -> Arc<ClientConfig> {
        self.client_full.clone()
    }

    /// The client configuration with an in-memory session store (resumes when it can).
    pub fn client_config_resume(&self) -> Arc<ClientConfig> {
        self.client_resume.clone()
    }

    /// The name the certificate is issued to.
    pub fn server_name(&self) -> ServerName<'static> {
        self.name.clone()
    }

    /// One full handshake (the client never resumes).
    pub fn full_handshake(&self) -> Result<TlsOutcome, BenchError> {
        self.handshake(&self.client_full, None)
    }

    /// One handshake of the resuming client: resumed if its session store holds a ticket
    /// from an earlier handshake (each handshake refills it with the server's new tickets).
    /// Call once and check [`TlsOutcome::kind`] before timing.
    pub fn resumed_handshake(&self) -> Result<TlsOutcome, BenchError> {
        self.handshake(&self.client_resume, None)
    }

    /// Like [`TlsPair::full_handshake`], and also returns every TLS record moved.
    pub fn full_handshake_traced(&self) -> Result<(TlsOutcome, Vec<SentMessage>), BenchError> {
        let mut t = Vec::new();
        let o = self.handshake(&self.client_full, Some(&mut t))?;
        Ok((o, t))
    }

    /// Like [`TlsPair::resumed_handshake`], and also returns every TLS record moved.
    pub fn resumed_handshake_traced(&self) -> Result<(TlsOutcome, Vec<SentMessage>), BenchError> {
        let mut t = Vec::new();
        let o = self.handshake(&self.client_resume, Some(&mut t))?;
        Ok((o, t))
    }

    fn handshake(
        &self,
        client: &Arc<ClientConfig>,
        mut trace: Option<&mut Vec<SentMessage>>,
    ) -> Result<TlsOutcome, BenchError> {
        let mut st = HandshakeStats::default();
        let mut depths = Depths::default();
        let mut c = timed(&mut st.initiator.cpu, || {
            ClientConnection::new(client.clone(), self.name.clone())
        })?;
        let mut s = timed(&mut st.responder.cpu, || {
            ServerConnection::new(self.server.clone())
        })?;
        let mut buf = Vec::with_capacity(4096);
        for _ in 0..16 {
            let a = transfer(
                true,
                &mut c,
                &mut s,
                &mut st,
                &mut depths,
                &mut trace,
                &mut buf,
            )?;
            let b = transfer(
                false,
                &mut s,
                &mut c,
                &mut st,
                &mut depths,
                &mut trace,
                &mut buf,
            )?;
            if !a && !b {
                break;
            }
        }
        if c.is_handshaking() || s.is_handshaking() {
            return Err(BenchError::Incomplete("tls"));
        }
        Ok(TlsOutcome {
            client: c,
            server: s,
            stats: st,
        })
    }
}

/// TLS record header: content type, legacy version, length.
const TLS_RECORD_HEADER: usize = 5;

/// Splits `buf` into whole TLS records.
fn records(buf: &[u8]) -> Result<Vec<&[u8]>, BenchError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let len = match rest.get(3..TLS_RECORD_HEADER) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Err(BenchError::Incomplete("tls (partial record header)")),
        };
        if rest.len() < TLS_RECORD_HEADER + len {
            return Err(BenchError::Incomplete("tls (partial record)"));
        }
        let (rec, r) = rest.split_at(TLS_RECORD_HEADER + len);
        out.push(rec);
        rest = r;
    }
    Ok(out)
}

/// Moves everything `from` wants to send into `to` and lets `to` process it, timing each
/// side and counting the records `from` wrote.
fn transfer<A, B>(
    from_client: bool,
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    st: &mut HandshakeStats,
    depths: &mut Depths,
    trace: &mut Option<&mut Vec<SentMessage>>,
    buf: &mut Vec<u8>,
) -> Result<bool, BenchError> {
    let mut moved = false;
    let (tx, rx): (&mut SideStats, &mut SideStats) = if from_client {
        (&mut st.initiator, &mut st.responder)
    } else {
        (&mut st.responder, &mut st.initiator)
    };
    while from.wants_write() {
        buf.clear();
        timed(&mut tx.cpu, || from.write_tls(buf))?;
        let d = depths.send(from_client);
        let recs = records(buf)?;
        tx.messages += recs.len() as u32;
        tx.bytes += buf.len() as u64;
        if let Some(t) = trace.as_deref_mut() {
            t.extend(recs.iter().map(|r| SentMessage {
                from_initiator: from_client,
                bytes: r.to_vec(),
                depth: d,
            }));
        }
        depths.recv(!from_client, d);
        let mut rd: &[u8] = buf;
        while !rd.is_empty() {
            timed(&mut rx.cpu, || -> Result<(), BenchError> {
                if to.read_tls(&mut rd)? == 0 {
                    return Err(BenchError::Incomplete("tls (receiver full)"));
                }
                to.process_new_packets()?;
                Ok(())
            })?;
        }
        if !from_client && st.flights == 0 && !to.is_handshaking() {
            st.flights = depths.received(true);
        }
        moved = true;
    }
    Ok(moved)
}

/// The synthetic OCSP staple of [`TlsPair::with_ocsp_staple`] and the client-side verifier
/// that demands it.
///
/// Layout (all integers big-endian): magic `KBOCSP01` (8), SHA-256 of the certificate's DER
/// (32), status (1, 0 = good), thisUpdate and nextUpdate (8 + 8, Unix seconds), filler up to
/// [`BODY_LEN`] standing in for the responder ID, extensions and ASN.1 framing, then an
/// Ed25519 signature (64) over everything before it.
pub mod ocsp {
    use std::sync::Arc;

    use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    use crate::BenchError;

    /// Magic at the start of a staple.
    pub const MAGIC: &[u8; 8] = b"KBOCSP01";
    /// Signed part of a staple.
    pub const BODY_LEN: usize = 408;
    /// Ed25519 signature length.
    pub const SIG_LEN: usize = 64;
    /// Total staple length.
    pub const STAPLE_LEN: usize = BODY_LEN + SIG_LEN;
    /// How long a staple is valid after `thisUpdate` (seven days, as common responders).
    pub const VALIDITY_SECS: u64 = 7 * 86_400;

    /// The CA-like key that signs staples.
    pub struct Responder {
        key: Ed25519KeyPair,
    }

    impl core::fmt::Debug for Responder {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("Responder").finish_non_exhaustive()
        }
    }

    impl Responder {
        /// A fresh Ed25519 signing key.
        pub fn generate() -> Result<Self, BenchError> {
            let rng = ring::rand::SystemRandom::new();
            let bad = |_| BenchError::Report("ocsp responder key generation failed".into());
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(bad)?;
            let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| BenchError::Report("ocsp responder key rejected".into()))?;
            Ok(Self { key })
        }

        /// The public key clients trust.
        pub fn public_key(&self) -> Vec<u8> {
            self.key.public_key().as_ref().to_vec()
        }

        /// A "good" staple for `cert`, valid from an hour before `now` for
        /// [`VALIDITY_SECS`].
        pub fn staple(&self, cert: &CertificateDer<'_>, now: u64) -> Result<Vec<u8>, BenchError> {
            let mut s = Vec::with_capacity(STAPLE_LEN);
            s.extend_from_slice(MAGIC);
            s.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, cert).as_ref());
            s.push(0);
            let this_update = now.saturating_sub(3600);
            s.extend_from_slice(&this_update.to_be_bytes());
            s.extend_from_slice(&(this_update + VALIDITY_SECS).to_be_bytes());
            let mut i = 0u8;
            while s.len() < BODY_LEN {
                s.push(i.wrapping_mul(37).wrapping_add(11));
                i = i.wrapping_add(1);
            }
            let sig = self.key.sign(&s);
            s.extend_from_slice(sig.as_ref());
            if s.len() != STAPLE_LEN {
                return Err(BenchError::Report("ocsp staple length".into()));
            }
            Ok(s)
        }
    }

    /// Checks `staple` for `cert` at `now` against the responder key `public`.
    pub fn check(
        staple: &[u8],
        cert: &CertificateDer<'_>,
        public: &[u8],
        now: u64,
    ) -> Result<(), &'static str> {
        if staple.is_empty() {
            return Err("server sent no OCSP staple");
        }
        if staple.len() != STAPLE_LEN {
            return Err("OCSP staple has the wrong length");
        }
        let (body, sig) = staple.split_at(BODY_LEN);
        UnparsedPublicKey::new(&ED25519, public)
            .verify(body, sig)
            .map_err(|_| "OCSP staple signature invalid")?;
        if body.get(..8) != Some(MAGIC.as_slice()) {
            return Err("not an OCSP staple");
        }
        let hash = ring::digest::digest(&ring::digest::SHA256, cert);
        if body.get(8..40) != Some(hash.as_ref()) {
            return Err("OCSP staple is for another certificate");
        }
        if body.get(40) != Some(&0) {
            return Err("OCSP status is not good");
        }
        let u64_at = |o: usize| -> Option<u64> {
            let b: [u8; 8] = body.get(o..o + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        };
        match (u64_at(41), u64_at(49)) {
            (Some(this), Some(next)) if this <= now && now < next => Ok(()),
            _ => Err("OCSP staple is not current"),
        }
    }

    /// rustls's WebPKI verifier plus a mandatory, signature-checked OCSP staple.
    #[derive(Debug)]
    pub struct StapleVerifier {
        inner: Arc<WebPkiServerVerifier>,
        responder_key: Vec<u8>,
    }

    impl StapleVerifier {
        /// Wraps `inner`; staples must be signed by `responder_key` (Ed25519).
        pub fn new(inner: Arc<WebPkiServerVerifier>, responder_key: Vec<u8>) -> Self {
            Self {
                inner,
                responder_key,
            }
        }
    }

    impl ServerCertVerifier for StapleVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?;
            check(
                ocsp_response,
                end_entity,
                &self.responder_key,
                now.as_secs(),
            )
            .map_err(|e| Error::General(e.to_string()))?;
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_xx_completes_and_transports_agree() {
        let statics = NoiseStatics::generate().unwrap();
        let mut o = noise_xx_handshake(&statics).unwrap();
        // Each side learned the other's static key.
        assert_eq!(
            o.initiator.get_remote_static().unwrap(),
            statics.responder.public.as_slice()
        );
        assert_eq!(
            o.responder.get_remote_static().unwrap(),
            statics.initiator.public.as_slice()
        );
        let mut ct = [0u8; 64];
        let mut pt = [0u8; 64];
        let n = o.initiator.write_message(b"hello", &mut ct).unwrap();
        let m = o.responder.read_message(&ct[..n], &mut pt).unwrap();
        assert_eq!(&pt[..m], b"hello");
        // A tampered record is rejected.
        let n = o.initiator.write_message(b"again", &mut ct).unwrap();
        ct[0] ^= 1;
        assert!(o.responder.read_message(&ct[..n], &mut pt).is_err());
    }

    fn exporters_agree(o: &TlsOutcome) {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        o.client
            .export_keying_material(&mut a, b"keav-bench", None)
            .unwrap();
        o.server
            .export_keying_material(&mut b, b"keav-bench", None)
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn tls_full_handshakes_complete_for_both_cert_kinds() {
        for kind in [CertKind::Ed25519, CertKind::EcdsaP256] {
            let pair = TlsPair::new(kind).unwrap();
            let o = pair.full_handshake().unwrap();
            assert_eq!(o.kind(), Some(HandshakeKind::Full));
            assert_eq!(
                o.client.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(
                o.client.negotiated_key_exchange_group().map(|g| g.name()),
                Some(rustls::NamedGroup::X25519)
            );
            exporters_agree(&o);
            // The non-resuming client stays on full handshakes.
            assert_eq!(
                pair.full_handshake().unwrap().kind(),
                Some(HandshakeKind::Full)
            );
        }
    }

    #[test]
    fn tls_resumption_really_resumes_repeatedly() {
        let pair = TlsPair::new(CertKind::Ed25519).unwrap();
        assert_eq!(
            pair.resumed_handshake().unwrap().kind(),
            Some(HandshakeKind::Full)
        );
        for _ in 0..10 {
            let o = pair.resumed_handshake().unwrap();
            assert_eq!(o.kind(), Some(HandshakeKind::Resumed));
            assert_eq!(o.server.handshake_kind(), Some(HandshakeKind::Resumed));
            exporters_agree(&o);
        }
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 13 + 1) as u8).collect()
    }

    #[test]
    fn noise_pipes_round_trip_and_encrypt() {
        for name in [NOISE_XX, NOISE_XX_AESGCM] {
            let mut p = NoisePipe::new(name).unwrap();
            for n in crate::records::PAYLOAD_SIZES {
                let msg = payload(n);
                for _ in 0..3 {
                    assert_eq!(p.transfer(&msg).unwrap(), &msg[..]);
                }
                // The wire bytes are not the plaintext.
                assert_ne!(&p.wire[..n], &msg[..]);
            }
        }
    }

    #[test]
    fn tls_pipes_round_trip_with_the_requested_suite() {
        for suite in [TlsSuite::Aes256Gcm, TlsSuite::ChaCha20Poly1305] {
            let mut p = TlsPipe::new(suite).unwrap();
            assert_eq!(p.client.negotiated_cipher_suite(), Some(suite.suite()));
            for n in crate::records::PAYLOAD_SIZES {
                let msg = payload(n);
                for _ in 0..3 {
                    assert_eq!(p.transfer(&msg).unwrap(), &msg[..]);
                    // One TLS 1.3 record: 5-byte header, payload, content type, 16-byte tag.
                    assert_eq!(p.last_wire_len(), 5 + n + 1 + 16);
                    assert!(!p.wire.windows(32).any(|w| w == &msg[..32]));
                }
            }
            // Nothing left over on either side.
            assert!(!p.client.wants_write());
            let mut extra = [0u8; 1];
            assert!(std::io::Read::read(&mut p.server.reader(), &mut extra).is_err());
        }
    }

    #[test]
    fn tls_client_rejects_an_untrusted_certificate() {
        let a = TlsPair::new(CertKind::Ed25519).unwrap();
        let b = TlsPair::new(CertKind::Ed25519).unwrap();
        let mixed = TlsPair {
            server: b.server.clone(),
            client_full: a.client_full.clone(),
            client_resume: a.client_resume.clone(),
            name: a.name.clone(),
            ocsp: false,
        };
        assert!(matches!(mixed.full_handshake(), Err(BenchError::Tls(_))));
    }

    #[test]
    fn ocsp_staple_is_required_and_checked() {
        let pair = TlsPair::with_ocsp_staple(CertKind::Ed25519).unwrap();
        assert!(pair.has_ocsp_staple());
        let o = pair.full_handshake().unwrap();
        assert_eq!(o.kind(), Some(HandshakeKind::Full));
        exporters_agree(&o);
        // The staple travels in the server's certificate flight: more bytes than without.
        let plain = TlsPair::new(CertKind::Ed25519)
            .unwrap()
            .full_handshake()
            .unwrap();
        assert!(
            o.stats.responder.bytes >= plain.stats.responder.bytes + ocsp::STAPLE_LEN as u64,
            "{:?} vs {:?}",
            o.stats,
            plain.stats
        );
        // Resumption still works (no certificate, so no staple, in a resumed handshake).
        assert_eq!(
            pair.resumed_handshake().unwrap().kind(),
            Some(HandshakeKind::Full)
        );
        for _ in 0..3 {
            let r = pair.resumed_handshake().unwrap();
            assert_eq!(r.kind(), Some(HandshakeKind::Resumed));
            exporters_agree(&r);
        }
        for bad in [Staple::Missing, Staple::Tampered, Staple::WrongSigner] {
            let p = TlsPair::build(CertKind::Ed25519, &[], bad).unwrap();
            let e = p.full_handshake().unwrap_err();
            assert!(
                matches!(&e, BenchError::Tls(rustls::Error::General(m)) if m.contains("OCSP")),
                "{bad:?}: {e}"
            );
            // The resuming client gets no ticket either: its first handshake fails too.
            assert!(p.resumed_handshake().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ocsp_check_rejects_wrong_cert_and_stale_staples() {
        let r = ocsp::Responder::generate().unwrap();
        let cert = CertificateDer::from(vec![1u8, 2, 3]);
        let other = CertificateDer::from(vec![1u8, 2, 4]);
        let now = 1_800_000_000;
        let s = r.staple(&cert, now).unwrap();
        assert_eq!(s.len(), ocsp::STAPLE_LEN);
        let pk = r.public_key();
        assert_eq!(ocsp::check(&s, &cert, &pk, now), Ok(()));
        assert!(ocsp::check(&s, &other, &pk, now).is_err());
        assert!(ocsp::check(&s, &cert, &pk, now + ocsp::VALIDITY_SECS).is_err());
        assert!(ocsp::check(&s, &cert, &pk, now - 7200).is_err());
        assert!(ocsp::check(&[], &cert, &pk, now).is_err());
        assert!(ocsp::check(&s[..s.len() - 1], &cert, &pk, now).is_err());
        let mut t = s.clone();
        t[ocsp::BODY_LEN + 3] ^= 0x40;
        assert!(ocsp::check(&t, &cert, &pk, now).is_err());
    }

    #[test]
    fn tls_stats_match_the_records_moved() {
        let pair = TlsPair::new(CertKind::Ed25519).unwrap();
        let (o, trace) = pair.full_handshake_traced().unwrap();
        for client in [true, false] {
            let side = if client {
                o.stats.initiator
            } else {
                o.stats.responder
            };
            let recs: Vec<_> = trace
                .iter()
                .filter(|m| m.from_initiator == client)
                .collect();
            assert_eq!(side.messages as usize, recs.len());
            assert_eq!(
                side.bytes,
                recs.iter().map(|m| m.bytes.len() as u64).sum::<u64>()
            );
            for r in recs {
                // TLS record: known content type, legacy version 0x0303 (or 0x0301 in the
                // first ClientHello), length field matching the bytes.
                assert!(matches!(r.bytes[0], 20..=23), "{:?}", &r.bytes[..5]);
                assert_eq!(r.bytes[1], 3);
                let len = u16::from_be_bytes([r.bytes[3], r.bytes[4]]) as usize;
                assert_eq!(r.bytes.len(), 5 + len);
            }
            assert!(side.cpu > std::time::Duration::ZERO);
        }
        // ClientHello (1), server flight (2), client Finished (3).
        assert_eq!(o.stats.flights, 2);
        assert_eq!(trace.iter().map(|m| m.depth).max(), Some(4)); // tickets
    }
}
