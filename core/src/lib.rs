//! Pieces shared by two or more Isthmus components.
//!
//! - [`identity`]: SPIFFE IDs, the cluster CA, workload key pairs and CSRs.
//! - [`bundle`]: per-trust-domain trust bundles and SVID verification.
//! - [`tls`]: rustls configs whose verifiers check SPIFFE identities.
//! - [`agent`]: a sidecar's or gateway's link to its controller (SVID
//!   renewal, the config stream).
//! - [`token`]: the join token codec (sans-IO).
//! - [`delta`]: config deltas, applied and computed (sans-IO).
//! - [`tunnel`]: the header that opens every tunneled stream (sans-IO).
//! - [`policy`]: the TrafficPolicy document and its validation.
//! - [`naming`]: `clusterset.local` service names and `ns/name` keys.
//! - [`grpc`]: tonic over our own rustls configs.
//! - [`http`]: serving an HTTP connection; a one-request client.
//! - [`net`]: binding and accepting.
//! - [`metrics`]: the admin endpoint and what metrics share.
//! - [`local`]: the files a local-mode cluster keeps in its directory.

pub mod agent;
pub mod bundle;
pub mod delta;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod local;
pub mod metrics;
pub mod naming;
pub mod net;
pub mod policy;
pub mod tls;
pub mod token;
pub mod tunnel;

/// Install ring as the process-wide rustls crypto provider. Call first thing
/// in every binary and test; calling it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
