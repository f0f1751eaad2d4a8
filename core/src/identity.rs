//! SPIFFE identities and the cluster certificate authority.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Namespace of Isthmus's own components.
pub const SYSTEM_NAMESPACE: &str = "isthmus-system";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    InvalidSpiffeId(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '-', '.' and '_'")]
    InvalidTrustDomain(String),
    #[error("invalid name {0:?}: use lowercase letters, digits and '-' (at most 63)")]
    InvalidName(String),
    #[error("certificate has no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("PEM holds no certificate")]
    NoCertificate,
    #[error("unusable CA: {0}")]
    BadCa(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name(namespace)?;
        validate_name(service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The identity of a cluster's gateway.
    pub fn gateway(trust_domain: &str) -> Self {
        Self::system(trust_domain, "gateway")
    }

    /// The identity of a cluster's federation controller.
    pub fn controller(trust_domain: &str) -> Self {
        Self::system(trust_domain, "controller")
    }

    fn system(trust_domain: &str, sa: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: SYSTEM_NAMESPACE.to_string(),
            service_account: sa.to_string(),
        }
    }

    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::InvalidSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Self::new(td, ns, sa).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidTrustDomain(td.to_string()))
    }
}

/// Kubernetes DNS-label rules: cluster names, namespaces, service names.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_string()))
    }
}

/// Parse every certificate in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            out.push(CertificateDer::from(block.contents));
        }
    }
    if out.is_empty() {
        return Err(IdentityError::NoCertificate);
    }
    Ok(out)
}

pub fn cert_to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// SHA-256 of a certificate's DER, lowercase hex: how a token pins a root.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref())
}

/// Lowercase hex, without a formatting call per byte (trace context is
/// written with it on every request).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
        .ok_or(IdentityError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    // An X.509-SVID carries exactly one SPIFFE ID.
    match uris.as_slice() {
        [one] => SpiffeId::parse(one),
        _ => Err(IdentityError::NoSpiffeId),
    }
}

/// Unix time after which a certificate is no longer valid.
pub fn not_after_of(der: &CertificateDer<'_>) -> Result<i64, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// A workload's key pair, generated where it runs.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, IdentityError> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A CSR for this key. The CA ignores what it asks for beyond the key
    /// and sets the SPIFFE ID itself.
    pub fn csr_pem(&self) -> Result<String, IdentityError> {
        let params = CertificateParams::new(Vec::<String>::new())?;
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// A cluster's certificate authority: a root Isthmus generated, or one the
/// user supplied (a root, or an intermediate signed by their own PKI).
///
/// The signing certificate itself is the trust anchor peers hold, even when
/// it is an intermediate: trust in a trust domain is confined to this CA,
/// not extended to everything else the user's root has signed.
pub struct Ca {
    trust_domain: String,
    /// The signing certificate first, then its issuers up to the trust anchor.
    chain: Vec<CertificateDer<'static>>,
    /// `chain` as PEM: what follows the leaf in every SVID this CA issues.
    chain_pem: String,
    key: KeyPair,
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Isthmus");
        // Roots of one trust domain differ by creation time (rotation).
        dn.push(
            DnType::CommonName,
            format!("Isthmus root CA {trust_domain} {}", crate::unix_now()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // SPIFFE: a root carries the trust domain as its URI SAN.
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = time_now();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            chain: vec![cert.der().clone()],
            chain_pem: cert.pem(),
            key,
        })
    }

    /// Load a CA from PEM: `chain_pem` holds the signing certificate first,
    /// then (for an intermediate) its issuers up to the root, which becomes
    /// the trust anchor. The signing certificate must be a CA whose public
    /// key is `key_pem`'s, and each certificate must be issued by the next.
    pub fn load(trust_domain: &str, chain_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::BadCa(format!("private key: {e}")))?;
        let chain = certs_from_pem(chain_pem)?;
        let parsed: Vec<_> = chain
            .iter()
            .map(|c| x509_parser::parse_x509_certificate(c.as_ref()).map(|(_, c)| c))
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        for (i, c) in parsed.iter().enumerate() {
            if !c.is_ca() {
                return Err(IdentityError::BadCa(format!(
                    "certificate {} of the chain ({}) is not a CA certificate",
                    i + 1,
                    c.subject()
                )));
            }
            let issuer = parsed.get(i + 1).unwrap_or(c);
            if c.verify_signature(Some(issuer.public_key())).is_err() {
                return Err(IdentityError::BadCa(format!(
                    "certificate {} ({}) is not signed by {}: give the signing certificate first, then each issuer up to the root",
                    i + 1,
                    c.subject(),
                    if i + 1 < parsed.len() {
                        "the next one"
                    } else {
                        "itself (the last must be a root)"
                    }
                )));
            }
        }
        if parsed[0].public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(IdentityError::BadCa(
                "the private key does not belong to the first certificate of the chain".into(),
            ));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            chain_pem: chain.iter().map(cert_to_pem).collect(),
            chain,
            key,
        })
    }

    /// The trust anchor peers hold in their bundle for this trust domain:
    /// the signing certificate. Its issuers travel in SVID chains (for
    /// verifiers that know the user's PKI) but vouch for nothing here.
    pub fn anchor_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The signing certificate and its issuers, as PEM.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the trust anchor: what join tokens pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.anchor_der())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Sign `csr_pem` as an X.509-SVID for `id`, valid for `ttl`.
    /// `dns_names` are added for callers that also dial by host name.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        // An SVID never outlives the CA that signs it.
        let ca_left = not_after_of(&self.chain[0])? - crate::unix_now();
        let ttl = ttl.min(Duration::from_secs(ca_left.max(0) as u64));
        csr.params = svid_params(id, ttl)?;
        let issuer = Issuer::from_ca_cert_der(&self.chain[0], &self.key)?;
        Ok(csr.signed_by(&issuer)?.der().clone())
    }

    /// Issue an SVID for a key held in this process (the controller's own).
    pub fn issue_local(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, IdentityError> {
        self.issue_local_named(id, &[], ttl)
    }

    /// As `issue_local`, the certificate also naming `names` (DNS names or
    /// IP addresses), for a server that clients outside the mesh verify by
    /// name (the admission webhook: the API server dials it by name).
    pub fn issue_local_named(&self, id: &SpiffeId, names: &[String], ttl: Duration) -> Result<Svid, IdentityError> {
        let key = WorkloadKey::generate()?;
        let csr = key.csr_pem()?;
        let mut csr = CertificateSigningRequestParams::from_pem(&csr)?;
        let ca_left = not_after_of(&self.chain[0])? - crate::unix_now();
        csr.params = svid_params(id, ttl.min(Duration::from_secs(ca_left.max(0) as u64)))?;
        for name in names {
            csr.params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(name.clone().try_into()?),
                });
        }
        let issuer = Issuer::from_ca_cert_der(&self.chain[0], &self.key)?;
        let leaf = csr.signed_by(&issuer)?.der().clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        Ok(Svid {
            id: id.clone(),
            chain,
            key: key.private_key_der(),
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn svid_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Isthmus");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = time_now();
    // Allow a little clock skew between the CA and verifiers.
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + ttl;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// An X.509-SVID with its private key: leaf first, then the chain to the root.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trip() {
        let id = SpiffeId::parse("spiffe://east.mesh/ns/demo/sa/echo").unwrap();
        assert_eq!(id.trust_domain, "east.mesh");
        assert_eq!(id.namespace, "demo");
        assert_eq!(id.service_account, "echo");
        assert_eq!(id.to_string(), "spiffe://east.mesh/ns/demo/sa/echo");
    }

    #[test]
    fn spiffe_id_rejects_junk() {
        for bad in [
            "http://east/ns/a/sa/b",
            "spiffe://east",
            "spiffe://east/ns/a",
            "spiffe://East/ns/a/sa/b",
            "spiffe://east/ns/a/sa/b/c",
            "spiffe://east/ns//sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_signs_csr_with_its_own_spiffe_id() {
        crate::install_crypto_provider();
        let ca = Ca::generate("east.mesh").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let id = SpiffeId::new("east.mesh", "demo", "echo").unwrap();
        let leaf = ca
            .sign_csr(&key.csr_pem().unwrap(), &id, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(spiffe_id_of(&leaf).unwrap(), id);
        let not_after = not_after_of(&leaf).unwrap();
        let now = crate::unix_now();
        assert!(not_after > now + 3500 && not_after <= now + 3601);
        // The root round-trips through PEM with the same fingerprint.
        let reloaded = Ca::load("east.mesh", ca.chain_pem(), &ca.key_pem()).unwrap();
        assert_eq!(reloaded.fingerprint(), ca.fingerprint());
        // A key that is not the certificate's is refused.
        let other = Ca::generate("east.mesh").unwrap();
        let err = Ca::load("east.mesh", ca.chain_pem(), &other.key_pem()).err().unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    /// An intermediate signed by the user's own root: SVIDs chain through it
    /// to that root, which is the anchor peers trust.
    #[test]
    fn user_supplied_intermediate() {
        crate::install_crypto_provider();
        let root = Ca::generate("east.mesh").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_ca_cert_der(root.anchor_der(), &root.key).unwrap();
        let inter = params.signed_by(&key, &issuer).unwrap();
        let chain_pem = format!("{}{}", inter.pem(), root.chain_pem());
        let ca = Ca::load("east.mesh", &chain_pem, &key.serialize_pem()).unwrap();
        // The intermediate is the anchor: the user's root vouches for nothing.
        assert_eq!(ca.fingerprint(), fingerprint(inter.der()));

        let id = SpiffeId::new("east.mesh", "demo", "echo").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(svid.chain.len(), 3);
        let verify = |anchor: &CertificateDer<'static>, leaf: &Svid| {
            let mut b = crate::bundle::TrustBundles::new();
            b.set("east.mesh", vec![anchor.clone()]);
            b.verify(
                &leaf.chain[0],
                &leaf.chain[1..],
                crate::bundle::Usage::Server,
                rustls_pki_types::UnixTime::now(),
            )
        };
        verify(ca.anchor_der(), &svid).unwrap();
        // Another CA under the same user root cannot mint east identities.
        let sibling = root.issue_local(&id, Duration::from_secs(600)).unwrap();
        assert!(verify(ca.anchor_der(), &sibling).is_err());

        // The chain in the wrong order is refused with a hint.
        let reversed = format!("{}{}", root.chain_pem(), inter.pem());
        let err = Ca::load("east.mesh", &reversed, &key.serialize_pem()).err().unwrap();
        assert!(err.to_string().contains("not signed by"), "{err}");
    }
}
