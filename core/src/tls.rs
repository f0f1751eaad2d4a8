//! rustls configurations whose verifiers authenticate SPIFFE identities.
//!
//! Certificates come from an [`SvidResolver`] so a renewed SVID is picked up
//! by the next handshake without touching live connections; roots come from
//! shared [`TrustBundles`] so a bundle update is picked up the same way.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::{self, TrustBundles, Usage, VerifyError};
use crate::identity::{self, IdentityError, SpiffeId, Svid};

/// Trust bundles shared between verifiers and whoever updates them.
pub type SharedBundles = Arc<ArcSwap<TrustBundles>>;

pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of an end-to-end session that carries one opaque TCP connection
/// (HTTP between sidecars is multiplexed over `h2` instead).
pub const ALPN_OPAQUE: &[u8] = b"isthmus-tcp/1";
/// ALPN of the gateway-to-gateway QUIC tunnel.
pub const ALPN_TUNNEL: &[u8] = b"isthmus-tunnel/1";

/// The server name sent in SNI. Verifiers ignore it: identity is the SPIFFE ID.
pub fn sni() -> ServerName<'static> {
    ServerName::try_from("isthmus.mesh.invalid").expect("static name is valid")
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the private key is not usable: {0}")]
    Key(rustls::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Holds the current SVID; swap it to renew without dropping connections.
#[derive(Debug)]
pub struct SvidResolver {
    current: ArcSwap<CertifiedKey>,
    id: ArcSwap<SpiffeId>,
}

impl SvidResolver {
    pub fn new(svid: &Svid) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(certified_key(svid)?),
            id: ArcSwap::from_pointee(svid.id.clone()),
        }))
    }

    pub fn update(&self, svid: &Svid) -> Result<(), TlsError> {
        self.current.store(Arc::new(certified_key(svid)?));
        self.id.store(Arc::new(svid.id.clone()));
        Ok(())
    }

    pub fn id(&self) -> SpiffeId {
        (**self.id.load()).clone()
    }

    /// Fingerprint of the last certificate of the current chain: the root
    /// the SVID was issued under.
    pub fn anchor_fingerprint(&self) -> Option<String> {
        self.current.load().cert.last().map(identity::fingerprint)
    }

    /// Unix time at which the current leaf expires.
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .load()
            .cert
            .first()
            .and_then(|c| identity::not_after_of(c).ok())
    }
}

fn certified_key(svid: &Svid) -> Result<CertifiedKey, TlsError> {
    let key = rustls::crypto::ring::sign::any_supported_type(&svid.key).map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(svid.chain.clone(), key))
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a client requires of the server it reaches.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Exactly this identity.
    Id(SpiffeId),
    /// Any of these identities (the endpoints of a service).
    AnyOf(Vec<SpiffeId>),
}

impl Expect {
    fn check(&self, got: &SpiffeId) -> Result<(), PeerCertError> {
        let ok = match self {
            Expect::Id(want) => want == got,
            Expect::AnyOf(ids) => ids.contains(got),
        };
        if ok {
            Ok(())
        } else {
            Err(PeerCertError::UnexpectedIdentity {
                got: got.clone(),
                want: self.describe(),
            })
        }
    }

    fn describe(&self) -> String {
        match self {
            Expect::Id(id) => id.to_string(),
            Expect::AnyOf(ids) => {
                let v: Vec<String> = ids.iter().map(ToString::to_string).collect();
                format!("one of [{}]", v.join(", "))
            }
        }
    }
}

/// Why a peer's certificate was refused, carried inside rustls's error so
/// that callers can tell the cases apart (`peer_cert_error`).
#[derive(thiserror::Error)]
pub enum PeerCertError {
    #[error("fingerprint mismatch: the issuer did not present the root CA pinned by the token (sha256 {0})")]
    PinMismatch(String),
    #[error("server identity {got} is not the expected {want}")]
    UnexpectedIdentity { got: SpiffeId, want: String },
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate chain: {0}")]
    Chain(#[from] webpki::Error),
}

/// rustls prints the error it carries with `Debug`: make that the message.
impl std::fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn cert_error(e: impl Into<PeerCertError>) -> rustls::Error {
    let e: PeerCertError = e.into();
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn verify_error(e: VerifyError) -> rustls::Error {
    cert_error(e)
}

/// The certificate refusal somewhere in `e`'s chain of causes, if any
/// (through the I/O and transport errors that wrap a handshake failure).
pub fn peer_cert_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PeerCertError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // io::Error's source() skips the error it wraps: look inside it.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(o)))) =
                candidate.downcast_ref::<rustls::Error>()
                && let Some(p) = o.downcast_ref::<PeerCertError>()
            {
                return Some(p);
            }
            if let Some(p) = candidate.downcast_ref::<PeerCertError>() {
                return Some(p);
            }
        }
        cur = inner.and_then(|i| i.source()).or_else(|| err.source());
    }
    None
}

/// Whether `e` says the server was not the one a join token pins: another
/// root, or another identity.
pub fn is_pin_mismatch(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        peer_cert_error(e),
        Some(PeerCertError::PinMismatch(_) | PeerCertError::UnexpectedIdentity { .. })
    )
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The handshake-signature checks every verifier here shares: plain
/// WebPKI algorithms of the ring provider.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Verifies servers by SPIFFE ID against the bundle of their trust domain.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundles: SharedBundles,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .bundles
            .load()
            .verify(end_entity, intermediates, Usage::Server, now)
            .map_err(verify_error)?;
        self.expect.check(&id).map_err(cert_error)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Verifies a server whose root is pinned by fingerprint (the join token):
/// the server sends its root after its leaf, and that root must hash to the
/// pin. Used only to spend a join token, before any bundle is exchanged.
#[derive(Debug)]
struct PinnedRootVerifier {
    fingerprint: String,
    expect: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|c| identity::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| cert_error(PeerCertError::PinMismatch(self.fingerprint.clone())))?;
        bundle::verify_chain(
            end_entity,
            intermediates,
            std::slice::from_ref(root),
            Usage::Server,
            now,
        )
        .map_err(cert_error)?;
        let id = identity::spiffe_id_of(end_entity).map_err(cert_error)?;
        Expect::Id(self.expect.clone()).check(&id).map_err(cert_error)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Verifies clients by SPIFFE ID against the bundle of their trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    bundles: SharedBundles,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundles
            .load()
            .verify(end_entity, intermediates, Usage::Client, now)
            .map_err(verify_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    signature_checks!();
}

/// Whether a server requires a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Ask for no client certificate: a server for clients outside the
    /// mesh (the admission webhook, called by the API server).
    None,
    /// Accept anonymous clients too; the application decides per request
    /// (the peering port: `Join` is anonymous, `Sync` is not).
    Optional,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 server presenting `certs` and verifying clients against `bundles`.
pub fn server_config(
    certs: Arc<SvidResolver>,
    bundles: SharedBundles,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundles,
        mandatory: client_auth == ClientAuth::Required,
        algs: algorithms(),
    });
    let builder = ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match client_auth {
        ClientAuth::None => builder.with_no_client_auth().with_cert_resolver(certs),
        _ => builder.with_client_cert_verifier(verifier).with_cert_resolver(certs),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 client presenting `certs` (if any) and requiring `expect`.
pub fn client_config(
    certs: Option<Arc<SvidResolver>>,
    bundles: SharedBundles,
    expect: Expect,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundles,
        expect,
        algs: algorithms(),
    });
    finish_client(verifier, certs, alpn)
}

/// A client that trusts only the root pinned by a join token.
pub fn pinned_client_config(
    fingerprint: &str,
    expect: SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(PinnedRootVerifier {
        fingerprint: fingerprint.to_string(),
        expect,
        algs: algorithms(),
    });
    finish_client(verifier, None, alpn)
}

fn finish_client(
    verifier: Arc<dyn ServerCertVerifier>,
    certs: Option<Arc<SvidResolver>>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match certs {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The SPIFFE ID of the peer of an established connection.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| identity::spiffe_id_of(c).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ca;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn shared(b: TrustBundles) -> SharedBundles {
        Arc::new(ArcSwap::from_pointee(b))
    }

    /// A real handshake over loopback: both sides see each other's SPIFFE ID,
    /// and a client expecting another identity is refused.
    #[tokio::test]
    async fn mutual_tls_carries_spiffe_ids() {
        crate::install_crypto_provider();
        let east = Ca::generate("east.mesh").unwrap();
        let west = Ca::generate("west.mesh").unwrap();
        let server_id = SpiffeId::new("east.mesh", "demo", "echo").unwrap();
        let client_id = SpiffeId::new("west.mesh", "demo", "client").unwrap();
        let server_svid = east.issue_local(&server_id, Duration::from_secs(600)).unwrap();
        let client_svid = west.issue_local(&client_id, Duration::from_secs(600)).unwrap();
        let mut b = TrustBundles::new();
        b.set("east.mesh", vec![east.anchor_der().clone()]);
        b.set("west.mesh", vec![west.anchor_der().clone()]);
        let bundles = shared(b);

        let server = server_config(
            SvidResolver::new(&server_svid).unwrap(),
            bundles.clone(),
            ClientAuth::Required,
            &[],
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let srv = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let id = peer_id(tls.get_ref().1.peer_certificates()).unwrap();
                    tls.write_all(id.to_string().as_bytes()).await.unwrap();
                    tls.shutdown().await.unwrap();
                    return;
                }
            }
        });

        let certs = SvidResolver::new(&client_svid).unwrap();
        let wrong = client_config(
            Some(certs.clone()),
            bundles.clone(),
            Expect::Id(SpiffeId::new("east.mesh", "demo", "other").unwrap()),
            &[],
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let err = tokio_rustls::TlsConnector::from(wrong)
            .connect(sni(), tcp)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not the expected"), "{err}");
        assert!(is_pin_mismatch(&err), "the refusal is typed, not only text: {err:?}");

        let right = client_config(Some(certs), bundles, Expect::Id(server_id), &[]).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(right)
            .connect(sni(), tcp)
            .await
            .unwrap();
        let mut seen = String::new();
        tls.read_to_string(&mut seen).await.unwrap();
        assert_eq!(seen, client_id.to_string());
        srv.await.unwrap();
    }
}
