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

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// A cluster's root certificate authority.
pub struct Ca {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
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
        dn.push(DnType::CommonName, format!("Isthmus root CA {trust_domain}"));
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
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn load(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = certs_from_pem(cert_pem)?.remove(0);
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            cert_der,
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
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
        csr.params = svid_params(id, ttl)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(csr.signed_by(&issuer)?.der().clone())
    }

    /// Issue an SVID for a key held in this process (the controller's own).
    pub fn issue_local(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, IdentityError> {
        let key = WorkloadKey::generate()?;
        let csr = key.csr_pem()?;
        let leaf = self.sign_csr(&csr, id, ttl)?;
        Ok(Svid {
            id: id.clone(),
            chain: vec![leaf, self.cert_der.clone()],
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
        let reloaded = Ca::load("east.mesh", ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(reloaded.fingerprint(), ca.fingerprint());
    }
}
