//! Trust bundles, kept per SPIFFE trust domain.
//!
//! A certificate is verified against the bundle of the trust domain named in
//! its own SPIFFE ID, never against a union of all roots: a west root cannot
//! vouch for an east identity.

use std::collections::BTreeMap;

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::{self, IdentityError, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate presented")]
    NoCertificate,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("trust domain {0:?} is not trusted here (not this cluster, nor a linked peer)")]
    UnknownTrustDomain(String),
    #[error("certificate for {id} does not chain to a root of {trust_domain}: {source}")]
    Chain {
        id: String,
        trust_domain: String,
        source: webpki::Error,
    },
}

/// Which side of a TLS handshake a certificate authenticates.
#[derive(Clone, Copy, Debug)]
pub enum Usage {
    Server,
    Client,
}

/// Roots by trust domain. Cheap to clone; swapped whole when a bundle changes.
#[derive(Clone, Debug, Default)]
pub struct TrustBundles {
    domains: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the roots of one trust domain.
    pub fn set(&mut self, trust_domain: &str, roots: Vec<CertificateDer<'static>>) {
        self.domains.insert(trust_domain.to_string(), roots);
    }

    pub fn set_pem(&mut self, trust_domain: &str, roots_pem: &str) -> Result<(), IdentityError> {
        self.set(trust_domain, identity::certs_from_pem(roots_pem)?);
        Ok(())
    }

    pub fn remove(&mut self, trust_domain: &str) {
        self.domains.remove(trust_domain);
    }

    pub fn contains(&self, trust_domain: &str) -> bool {
        self.domains.contains_key(trust_domain)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    pub fn roots(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.domains.get(trust_domain).map(Vec::as_slice)
    }

    /// Verify a presented chain (leaf first) and return its SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        now: UnixTime,
    ) -> Result<SpiffeId, VerifyError> {
        let id = identity::spiffe_id_of(end_entity)?;
        let roots = self
            .domains
            .get(&id.trust_domain)
            .ok_or_else(|| VerifyError::UnknownTrustDomain(id.trust_domain.clone()))?;
        verify_chain(end_entity, intermediates, roots, usage, now).map_err(|source| VerifyError::Chain {
            id: id.to_string(),
            trust_domain: id.trust_domain.clone(),
            source,
        })?;
        Ok(id)
    }
}

/// Verify `end_entity` chains to one of `roots`, for `usage`, at `now`.
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    usage: Usage,
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(end_entity)?;
    let usage = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    // Peers send their root along with the leaf; it is not an intermediate.
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
        .cloned()
        .collect();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ca;
    use std::time::Duration;

    #[test]
    fn verifies_against_own_trust_domain_only() {
        crate::install_crypto_provider();
        let east = Ca::generate("east.mesh").unwrap();
        let west = Ca::generate("west.mesh").unwrap();
        let east_id = SpiffeId::new("east.mesh", "demo", "echo").unwrap();
        let svid = east.issue_local(&east_id, Duration::from_secs(600)).unwrap();
        let now = UnixTime::now();

        let mut bundles = TrustBundles::new();
        bundles.set("east.mesh", vec![east.anchor_der().clone()]);
        let id = bundles
            .verify(&svid.chain[0], &svid.chain[1..], Usage::Client, now)
            .unwrap();
        assert_eq!(id, east_id);

        // West's root installed under east's name must not vouch for east IDs.
        let mut wrong = TrustBundles::new();
        wrong.set("east.mesh", vec![west.anchor_der().clone()]);
        wrong.set("west.mesh", vec![east.anchor_der().clone()]);
        assert!(matches!(
            wrong.verify(&svid.chain[0], &svid.chain[1..], Usage::Server, now),
            Err(VerifyError::Chain { .. })
        ));

        // A trust domain we hold no bundle for is refused outright.
        let mut only_west = TrustBundles::new();
        only_west.set("west.mesh", vec![west.anchor_der().clone()]);
        assert!(matches!(
            only_west.verify(&svid.chain[0], &[], Usage::Server, now),
            Err(VerifyError::UnknownTrustDomain(td)) if td == "east.mesh"
        ));
    }

    #[test]
    fn several_roots_per_domain() {
        crate::install_crypto_provider();
        let old = Ca::generate("east.mesh").unwrap();
        let new = Ca::generate("east.mesh").unwrap();
        let id = SpiffeId::new("east.mesh", "demo", "echo").unwrap();
        let svid = new.issue_local(&id, Duration::from_secs(600)).unwrap();
        let mut b = TrustBundles::new();
        b.set("east.mesh", vec![old.anchor_der().clone(), new.anchor_der().clone()]);
        assert!(b.verify(&svid.chain[0], &[], Usage::Server, UnixTime::now()).is_ok());
    }
}
