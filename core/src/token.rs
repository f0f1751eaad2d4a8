//! Join tokens (sans-IO).
//!
//! A token is `isthmus1` followed by base64url(JSON payload ‖ 4-byte
//! checksum). The checksum catches typos and truncation; it is no security
//! boundary. Security comes from the pinned root fingerprint (the joiner only
//! talks to the real issuer) and the one-time secret (the issuer only accepts
//! the holder, once, before expiry by its own clock; it stores only a hash).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "isthmus1";
const CHECKSUM_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed join token: {0}")]
    Malformed(String),
    #[error(
        "join token checksum mismatch: the token was altered or cut short; copy it again from `isthmus token create`"
    )]
    Tampered,
}

/// What a join token carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Issuing cluster's name.
    pub cluster: String,
    pub trust_domain: String,
    /// Controller peering addresses (`host:port`, host may be a DNS name).
    pub peering: Vec<String>,
    /// Gateway addresses of the issuing cluster.
    pub gateway: Vec<String>,
    /// SHA-256 (hex) of the issuer's root CA certificate.
    pub root_fingerprint: String,
    pub id: String,
    /// One-time establishment secret, base64url.
    pub secret: String,
    /// Optional link priority (lower is preferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

/// A token string around `payload` (its JSON), with its checksum: what
/// `encode` writes, and how the fuzz target reaches the payload parser.
#[doc(hidden)]
pub fn seal(payload: &[u8]) -> String {
    let mut bytes = payload.to_vec();
    bytes.extend_from_slice(&checksum(payload));
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

impl JoinToken {
    pub fn encode(&self) -> String {
        seal(&serde_json::to_vec(self).expect("token serializes"))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        let body = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| TokenError::Malformed(format!("it should start with {PREFIX:?}")))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed("it is not valid base64url".into()))?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(TokenError::Malformed("it is too short".into()));
        }
        let (payload, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(payload) != sum {
            return Err(TokenError::Tampered);
        }
        let token: JoinToken =
            serde_json::from_slice(payload).map_err(|e| TokenError::Malformed(format!("unreadable payload: {e}")))?;
        if token.peering.is_empty() {
            return Err(TokenError::Malformed("it names no peering address".into()));
        }
        if token.root_fingerprint.len() != 64 {
            return Err(TokenError::Malformed("its root fingerprint is not a SHA-256".into()));
        }
        token.secret_bytes()?;
        Ok(token)
    }

    pub fn secret_bytes(&self) -> Result<Vec<u8>, TokenError> {
        let s = URL_SAFE_NO_PAD
            .decode(&self.secret)
            .map_err(|_| TokenError::Malformed("its secret is not base64url".into()))?;
        if s.len() < 16 {
            return Err(TokenError::Malformed("its secret is too short".into()));
        }
        Ok(s)
    }
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0; CHECKSUM_LEN];
    out.copy_from_slice(&d.as_ref()[..CHECKSUM_LEN]);
    out
}

/// A fresh random secret (32 bytes, base64url) and its stored hash.
pub fn new_secret() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    (URL_SAFE_NO_PAD.encode(bytes), hash_secret(&bytes))
}

/// The form in which the issuer stores a secret.
pub fn hash_secret(secret: &[u8]) -> String {
    crate::identity::hex(ring::digest::digest(&ring::digest::SHA256, secret).as_ref())
}

/// Constant-time comparison of a presented secret with a stored hash.
pub fn secret_matches(presented: &[u8], stored_hash: &str) -> bool {
    let h = hash_secret(presented);
    // Compare without an early exit, so timing says nothing about the hash.
    h.len() == stored_hash.len()
        && h.bytes()
            .zip(stored_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        let (secret, _) = new_secret();
        JoinToken {
            cluster: "east".into(),
            trust_domain: "east.mesh".into(),
            peering: vec!["127.0.1.1:15011".into()],
            gateway: vec!["gw.east.example:15443".into()],
            root_fingerprint: "ab".repeat(32),
            id: "t-1".into(),
            secret,
            priority: None,
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        // Whitespace from copy-paste is fine.
        assert_eq!(JoinToken::decode(&format!("  {}\n", t.encode())).unwrap(), t);
    }

    #[test]
    fn flipped_character_is_caught() {
        let s = sample().encode();
        let mut chars: Vec<char> = s.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        assert!(JoinToken::decode(&altered).is_err());
    }

    #[test]
    fn malformed_inputs() {
        for bad in ["", "hello", "isthmus1", "isthmus1!!!", "isthmus1AAAA"] {
            assert!(matches!(JoinToken::decode(bad), Err(TokenError::Malformed(_))), "{bad}");
        }
        let s = sample().encode();
        assert!(JoinToken::decode(&s[..s.len() - 3]).is_err());
    }

    #[test]
    fn secrets_compare_by_hash() {
        let (secret, hash) = new_secret();
        let t = JoinToken { secret, ..sample() };
        assert!(secret_matches(&t.secret_bytes().unwrap(), &hash));
        assert!(!secret_matches(b"not the secret at all", &hash));
    }
}
