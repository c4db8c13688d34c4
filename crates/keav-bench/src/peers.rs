//! In-memory drivers for the comparison handshakes: Noise XX (snow) and TLS 1.3 (rustls with
//! the *ring* provider).

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, HandshakeKind, RootCertStore, ServerConfig,
    ServerConnection,
};

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
}

impl core::fmt::Debug for NoiseOutcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NoiseOutcome").finish_non_exhaustive()
    }
}

/// Runs one complete Noise XX handshake (three messages, empty payloads) between the two
/// parties, in memory, and checks that both end with the same handshake hash.
pub fn noise_xx_handshake(statics: &NoiseStatics) -> Result<NoiseOutcome, BenchError> {
    let mut i = snow::Builder::new(statics.params.clone())
        .local_private_key(&statics.initiator.private)?
        .build_initiator()?;
    let mut r = snow::Builder::new(statics.params.clone())
        .local_private_key(&statics.responder.private)?
        .build_responder()?;
    let mut msg = [0u8; 256];
    let mut payload = [0u8; 256];
    // -> e
    let n = i.write_message(&[], &mut msg)?;
    r.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
    // <- e, ee, s, es
    let n = r.write_message(&[], &mut msg)?;
    i.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
    // -> s, se
    let n = i.write_message(&[], &mut msg)?;
    r.read_message(msg.get(..n).unwrap_or_default(), &mut payload)?;
    if !i.is_handshake_finished() || !r.is_handshake_finished() {
        return Err(BenchError::Incomplete("noise"));
    }
    if i.get_handshake_hash() != r.get_handshake_hash() {
        return Err(BenchError::KeyMismatch("noise"));
    }
    Ok(NoiseOutcome {
        initiator: i.into_transport_mode()?,
        responder: r.into_transport_mode()?,
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
pub struct TlsPair {
    server: Arc<ServerConfig>,
    client_full: Arc<ClientConfig>,
    client_resume: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl core::fmt::Debug for TlsPair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsPair")
            .field("name", &self.name)
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
}

impl TlsOutcome {
    /// Full or resumed, as the client saw it.
    pub fn kind(&self) -> Option<HandshakeKind> {
        self.client.handshake_kind()
    }
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
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)?;

        let mut roots = RootCertStore::empty();
        roots.add(cert_der)?;
        let client = |resumption: Resumption| -> Result<ClientConfig, BenchError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
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
        })
    }

    /// Like [`TlsPair::new`], but the server staples an OCSP response to its certificate
    /// and the clients ask for it and check it (the patent's PKI baseline).
    // TODO(h-cpu): staple and check a response; today this is `new`.
    pub fn with_ocsp_staple(kind: CertKind) -> Result<Self, BenchError> {
        Self::new(kind)
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
        self.handshake(&self.client_full)
    }

    /// One handshake of the resuming client: resumed if its session store holds a ticket
    /// from an earlier handshake (each handshake refills it with the server's new tickets).
    /// Call once and check [`TlsOutcome::kind`] before timing.
    pub fn resumed_handshake(&self) -> Result<TlsOutcome, BenchError> {
        self.handshake(&self.client_resume)
    }

    fn handshake(&self, client: &Arc<ClientConfig>) -> Result<TlsOutcome, BenchError> {
        let mut c = ClientConnection::new(client.clone(), self.name.clone())?;
        let mut s = ServerConnection::new(self.server.clone())?;
        let mut buf = Vec::with_capacity(4096);
        for _ in 0..16 {
            let a = transfer(&mut c, &mut s, &mut buf)?;
            let b = transfer(&mut s, &mut c, &mut buf)?;
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
        })
    }
}

/// Moves everything `from` wants to send into `to` and lets `to` process it.
fn transfer<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    buf: &mut Vec<u8>,
) -> Result<bool, BenchError> {
    let mut moved = false;
    while from.wants_write() {
        buf.clear();
        from.write_tls(buf)?;
        let mut rd: &[u8] = buf;
        while !rd.is_empty() {
            if to.read_tls(&mut rd)? == 0 {
                return Err(BenchError::Incomplete("tls (receiver full)"));
            }
            to.process_new_packets()?;
        }
        moved = true;
    }
    Ok(moved)
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
        };
        assert!(matches!(mixed.full_handshake(), Err(BenchError::Tls(_))));
    }
}
