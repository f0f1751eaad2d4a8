//! The checks a join makes, on both sides, as pure functions of the state:
//! each refusal has one reason, which gives both the gRPC status the other
//! side sees and the metric label it is counted under.

use isthmus_core::identity;
use isthmus_core::token::{self, JoinToken};
use isthmus_proto::JoinRequest;
use tonic::{Code, Status};

use crate::config::{DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL};
use crate::state::{LinkRecord, State, TokenRecord, Unconfirmed};

/// What a join token says about the cluster that issues it. The controller
/// knows it; on Kubernetes it publishes it (`join.json` in its ConfigMap)
/// so that `isthmus token create` can issue tokens through the API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinInfo {
    pub cluster: String,
    pub trust_domain: String,
    /// Peering addresses (every replica's, or a name that reaches them).
    pub peering: Vec<String>,
    /// The gateway's QUIC address, once a gateway has registered.
    pub gateway: Vec<String>,
    /// The signing root's fingerprint: what tokens pin.
    pub root_fingerprint: String,
}

/// Why a token cannot be issued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("--ttl may be at most 7 days")]
    TtlTooLong,
}

/// A new join token and the record its issuer keeps of it (the secret
/// only as a hash). `ttl` and `uses` of zero mean the defaults (15 min,
/// one use).
pub fn issue(
    info: &JoinInfo,
    ttl: std::time::Duration,
    uses: u32,
    priority: Option<u32>,
    now: i64,
) -> Result<(JoinToken, TokenRecord), IssueError> {
    let ttl = if ttl.is_zero() { DEFAULT_TOKEN_TTL } else { ttl };
    if ttl > MAX_TOKEN_TTL {
        return Err(IssueError::TtlTooLong);
    }
    let (secret, hash) = token::new_secret();
    let id = format!("{:016x}", rand::random::<u64>());
    let tok = JoinToken {
        cluster: info.cluster.clone(),
        trust_domain: info.trust_domain.clone(),
        peering: info.peering.clone(),
        gateway: info.gateway.clone(),
        root_fingerprint: info.root_fingerprint.clone(),
        id: id.clone(),
        secret,
        priority: priority.filter(|p| *p > 0),
    };
    let rec = TokenRecord {
        id,
        secret_hash: hash,
        created_unix: now,
        expires_unix: now + ttl.as_secs() as i64,
        uses_left: uses.max(1),
        used_by: vec![],
        revoked: false,
        root_fingerprint: info.root_fingerprint.clone(),
    };
    Ok((tok, rec))
}

/// Tokens that can never be used again are forgotten a day after they
/// expire, so the store stays small.
pub fn forgotten(rec: &TokenRecord, now: i64) -> bool {
    rec.expires_unix <= now - 24 * 3600
}

/// Why the issuer refused a join.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("cannot link cluster {cluster} to itself (trust domain {trust_domain})")]
    SelfLink { cluster: String, trust_domain: String },
    #[error("{0}")]
    Invalid(String),
    #[error("unknown join token: it was never issued by this cluster (or is long expired)")]
    UnknownToken,
    #[error("join token secret does not match: the token was altered")]
    BadSecret,
    #[error("join token was revoked by its issuer; ask for a new one")]
    Revoked,
    #[error("join token expired {0}s ago (by the issuer's clock); create a new one")]
    Expired(i64),
    #[error("join token already used by {0}; ask for a new one")]
    UsedByYou(String),
    #[error("join token already used (by {0}); create a new one")]
    Used(String),
    #[error("cluster {cluster} ({trust_domain}) is already linked with {issuer}")]
    AlreadyLinked {
        cluster: String,
        trust_domain: String,
        issuer: String,
    },
}

impl JoinRefusal {
    /// One refusal of each kind (for the docs' check).
    pub fn examples() -> Vec<JoinRefusal> {
        let s = String::new;
        vec![
            JoinRefusal::SelfLink {
                cluster: s(),
                trust_domain: s(),
            },
            JoinRefusal::Invalid(s()),
            JoinRefusal::UnknownToken,
            JoinRefusal::BadSecret,
            JoinRefusal::Revoked,
            JoinRefusal::Expired(0),
            JoinRefusal::UsedByYou(s()),
            JoinRefusal::Used(s()),
            JoinRefusal::AlreadyLinked {
                cluster: s(),
                trust_domain: s(),
                issuer: s(),
            },
        ]
    }

    /// The `result` label of `isthmus_join_attempts_total`.
    pub fn label(&self) -> &'static str {
        match self {
            JoinRefusal::SelfLink { .. } => "self_link",
            JoinRefusal::Invalid(_) => "invalid",
            JoinRefusal::UnknownToken => "unknown_token",
            JoinRefusal::BadSecret => "bad_secret",
            JoinRefusal::Revoked => "revoked",
            JoinRefusal::Expired(_) => "expired",
            JoinRefusal::UsedByYou(_) | JoinRefusal::Used(_) => "used",
            JoinRefusal::AlreadyLinked { .. } => "already_linked",
        }
    }

    pub fn status(&self) -> Status {
        let code = match self {
            JoinRefusal::Invalid(_) => Code::InvalidArgument,
            JoinRefusal::UnknownToken => Code::NotFound,
            JoinRefusal::BadSecret => Code::PermissionDenied,
            JoinRefusal::AlreadyLinked { .. } => Code::AlreadyExists,
            _ => Code::FailedPrecondition,
        };
        Status::new(code, self.to_string())
    }
}

/// What can be checked of a join request before the state is looked at.
pub fn check_request(own_cluster: &str, own_trust_domain: &str, r: &JoinRequest) -> Result<(), JoinRefusal> {
    if r.trust_domain == own_trust_domain || r.cluster == own_cluster {
        return Err(JoinRefusal::SelfLink {
            cluster: own_cluster.to_string(),
            trust_domain: own_trust_domain.to_string(),
        });
    }
    let invalid = |e: String| JoinRefusal::Invalid(e);
    identity::validate_name(&r.cluster).map_err(|e| invalid(e.to_string()))?;
    identity::validate_trust_domain(&r.trust_domain).map_err(|e| invalid(e.to_string()))?;
    identity::certs_from_pem(&r.roots_pem).map_err(|e| invalid(format!("joiner's roots: {e}")))?;
    Ok(())
}

/// Whether `r` may spend its token now: issued here, secret right, not
/// revoked, not expired (by this clock alone, so skew cannot matter), uses
/// left and not used by the same cluster before, and not linked already.
pub fn check_token(state: &State, r: &JoinRequest, now: i64) -> Result<(), JoinRefusal> {
    let rec = state.tokens.get(&r.token_id).ok_or(JoinRefusal::UnknownToken)?;
    if !token::secret_matches(&r.secret, &rec.secret_hash) {
        return Err(JoinRefusal::BadSecret);
    }
    if rec.revoked {
        return Err(JoinRefusal::Revoked);
    }
    if now >= rec.expires_unix {
        return Err(JoinRefusal::Expired(now - rec.expires_unix));
    }
    // A cluster that used this token and was unlinked since does not get
    // back in with the same (multi-use) token.
    if rec.used_by.contains(&r.cluster) {
        return Err(JoinRefusal::UsedByYou(r.cluster.clone()));
    }
    if rec.uses_left == 0 {
        return Err(JoinRefusal::Used(rec.used_by.join(", ")));
    }
    if let Some(l) = linked(state, &r.cluster, &r.trust_domain) {
        return Err(JoinRefusal::AlreadyLinked {
            cluster: l.cluster.clone(),
            trust_domain: l.trust_domain.clone(),
            issuer: state.cluster.clone(),
        });
    }
    Ok(())
}

/// Spend one use of `r`'s token and record the link (after `check_token`),
/// unconfirmed until `confirm_by`.
pub fn spend(state: &mut State, r: &JoinRequest, now: i64, confirm_by: i64) {
    if let Some(t) = state.tokens.get_mut(&r.token_id) {
        t.uses_left = t.uses_left.saturating_sub(1);
        t.used_by.push(r.cluster.clone());
    }
    state.links.insert(
        r.cluster.clone(),
        LinkRecord {
            cluster: r.cluster.clone(),
            trust_domain: r.trust_domain.clone(),
            roots_pem: r.roots_pem.clone(),
            gateway_addr: r.gateway_addr.clone(),
            dial: None,
            priority: None,
            created_unix: now,
            imports: Vec::new(),
            unconfirmed: Some(Unconfirmed {
                until_unix: confirm_by,
                token_id: r.token_id.clone(),
            }),
        },
    );
}

/// Roll back an unconfirmed link to `peer`: the link goes, and the token
/// it spent gets its use back. False if there was no such link.
pub fn roll_back(state: &mut State, peer: &str) -> bool {
    let Some(pending) = state.links.get(peer).and_then(|l| l.unconfirmed.clone()) else {
        return false;
    };
    state.links.remove(peer);
    if let Some(t) = state.tokens.get_mut(&pending.token_id) {
        t.uses_left += 1;
        if let Some(i) = t.used_by.iter().position(|c| c == peer) {
            t.used_by.remove(i);
        }
    }
    true
}

/// The link with a cluster of this name or trust domain, if any.
pub fn linked<'a>(state: &'a State, cluster: &str, trust_domain: &str) -> Option<&'a LinkRecord> {
    state
        .links
        .values()
        .find(|l| l.cluster == cluster || l.trust_domain == trust_domain)
}

/// Why this cluster could not link with a token's issuer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Malformed(#[from] token::TokenError),
    #[error("this token was issued by cluster {0} itself: run `isthmus link` on another cluster")]
    OwnToken(String),
    #[error("cluster {cluster} is already linked ({trust_domain})")]
    AlreadyLinked { cluster: String, trust_domain: String },
    #[error("fingerprint mismatch: {0}")]
    FingerprintMismatch(String),
    #[error("cannot reach the issuer, cluster {cluster}, at {addr}: {reason}")]
    Unreachable {
        cluster: String,
        addr: String,
        reason: String,
    },
    #[error("cluster {cluster} refused the link: {}", status.message())]
    Refused { cluster: String, status: Status },
    #[error("the issuer calls itself {said:?}, but the token was issued by {token:?}")]
    WrongName { said: String, token: String },
    #[error(
        "the token was issued by cluster {issuer}, but the Link is named {link}: name the Link after the cluster it links to"
    )]
    MisnamedLink { link: String, issuer: String },
    #[error("cannot make a TLS client for the issuer: {0}")]
    Tls(#[from] isthmus_core::tls::TlsError),
    #[error("cannot store the link: {}", .0.message())]
    Store(Status),
}

/// What a failed link attempt counts as: one kind yields both the metric
/// label and the reason a Link's condition shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFailure {
    Malformed,
    AlreadyLinked,
    FingerprintMismatch,
    Unreachable,
    Refused,
    Error,
}

impl LinkFailure {
    pub const ALL: [LinkFailure; 6] = [
        LinkFailure::Malformed,
        LinkFailure::AlreadyLinked,
        LinkFailure::FingerprintMismatch,
        LinkFailure::Unreachable,
        LinkFailure::Refused,
        LinkFailure::Error,
    ];

    /// The `result` label of `isthmus_link_attempts_total`.
    pub fn label(self) -> &'static str {
        match self {
            LinkFailure::Malformed => "malformed",
            LinkFailure::AlreadyLinked => "already_linked",
            LinkFailure::FingerprintMismatch => "fingerprint_mismatch",
            LinkFailure::Unreachable => "unreachable",
            LinkFailure::Refused => "refused",
            LinkFailure::Error => "error",
        }
    }

    /// The reason of a Link's `Linked` condition.
    pub fn reason(self) -> &'static str {
        match self {
            LinkFailure::Malformed => "Malformed",
            LinkFailure::AlreadyLinked => "AlreadyLinked",
            LinkFailure::FingerprintMismatch => "FingerprintMismatch",
            LinkFailure::Unreachable => "Unreachable",
            LinkFailure::Refused => "Refused",
            LinkFailure::Error => "Error",
        }
    }
}

impl LinkError {
    pub fn failure(&self) -> LinkFailure {
        match self {
            LinkError::Malformed(_) => LinkFailure::Malformed,
            LinkError::AlreadyLinked { .. } => LinkFailure::AlreadyLinked,
            LinkError::FingerprintMismatch(_) => LinkFailure::FingerprintMismatch,
            LinkError::Unreachable { .. } => LinkFailure::Unreachable,
            LinkError::Refused { status, .. } => match status.code() {
                Code::AlreadyExists => LinkFailure::AlreadyLinked,
                Code::InvalidArgument => LinkFailure::Malformed,
                Code::Unavailable => LinkFailure::Unreachable,
                _ => LinkFailure::Refused,
            },
            LinkError::OwnToken(_) | LinkError::WrongName { .. } | LinkError::MisnamedLink { .. } => {
                LinkFailure::Refused
            }
            LinkError::Tls(_) | LinkError::Store(_) => LinkFailure::Error,
        }
    }

    /// The `result` label of `isthmus_link_attempts_total`.
    pub fn label(&self) -> &'static str {
        self.failure().label()
    }

    pub fn status(&self) -> Status {
        let code = match self {
            LinkError::Malformed(_) | LinkError::MisnamedLink { .. } => Code::InvalidArgument,
            LinkError::AlreadyLinked { .. } => Code::AlreadyExists,
            LinkError::Unreachable { .. } => Code::Unavailable,
            LinkError::Refused { status, .. } => status.code(),
            LinkError::OwnToken(_) | LinkError::FingerprintMismatch(_) | LinkError::WrongName { .. } => {
                Code::FailedPrecondition
            }
            LinkError::Tls(_) | LinkError::Store(_) => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

/// What the joining side checks of a token before it dials the issuer.
pub fn check_token_here(
    own_cluster: &str,
    own_trust_domain: &str,
    state: &State,
    tok: &JoinToken,
) -> Result<(), LinkError> {
    if tok.trust_domain == own_trust_domain || tok.cluster == own_cluster {
        return Err(LinkError::OwnToken(own_cluster.to_string()));
    }
    not_linked(state, tok)
}

/// Refuse a token whose issuer (by name or trust domain) is linked already.
pub fn not_linked(state: &State, tok: &JoinToken) -> Result<(), LinkError> {
    match linked(state, &tok.cluster, &tok.trust_domain) {
        Some(l) => Err(LinkError::AlreadyLinked {
            cluster: l.cluster.clone(),
            trust_domain: l.trust_domain.clone(),
        }),
        None => Ok(()),
    }
}

/// What the joining side checks of the issuer's answer: it returned the
/// root the token pins, under the trust domain and name the token carries.
pub fn check_answer(tok: &JoinToken, cluster: &str, trust_domain: &str, roots_pem: &str) -> Result<(), LinkError> {
    let pinned = identity::certs_from_pem(roots_pem)
        .map(|roots| roots.iter().any(|r| identity::fingerprint(r) == tok.root_fingerprint))
        .unwrap_or(false);
    if !pinned || trust_domain != tok.trust_domain {
        return Err(LinkError::FingerprintMismatch(
            "the issuer returned a bundle the token does not pin".into(),
        ));
    }
    // The link is recorded under the name the token carries; an issuer that
    // answers with another name is not the cluster the token described.
    if cluster != tok.cluster {
        return Err(LinkError::WrongName {
            said: cluster.to_string(),
            token: tok.cluster.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TokenRecord;

    fn state_with_token(now: i64) -> (State, JoinRequest) {
        let mut s = State::new("east", "east.mesh");
        let (secret, hash) = token::new_secret();
        s.tokens.insert(
            "t1".into(),
            TokenRecord {
                id: "t1".into(),
                secret_hash: hash,
                created_unix: now,
                expires_unix: now + 60,
                uses_left: 2,
                used_by: vec![],
                revoked: false,
                root_fingerprint: String::new(),
            },
        );
        let tok = JoinToken {
            cluster: "east".into(),
            trust_domain: "east.mesh".into(),
            peering: vec![],
            gateway: vec![],
            root_fingerprint: String::new(),
            id: "t1".into(),
            secret,
            priority: None,
        };
        let r = JoinRequest {
            token_id: "t1".into(),
            secret: tok.secret_bytes().unwrap(),
            cluster: "west".into(),
            trust_domain: "west.mesh".into(),
            roots_pem: String::new(),
            gateway_addr: String::new(),
        };
        (s, r)
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let now = 1000;
        let (mut s, r) = state_with_token(now);
        assert_eq!(check_token(&s, &r, now), Ok(()));

        let mut other = r.clone();
        other.token_id = "nope".into();
        assert_eq!(check_token(&s, &other, now), Err(JoinRefusal::UnknownToken));
        let mut altered = r.clone();
        altered.secret[0] ^= 1;
        assert_eq!(check_token(&s, &altered, now), Err(JoinRefusal::BadSecret));
        assert_eq!(check_token(&s, &r, now + 61), Err(JoinRefusal::Expired(1)));

        spend(&mut s, &r, now, now + 120);
        assert!(s.links.contains_key("west"));
        // Linked: the same cluster cannot use the token again, even unlinked.
        assert_eq!(check_token(&s, &r, now), Err(JoinRefusal::UsedByYou("west".into())));
        s.links.clear();
        assert_eq!(check_token(&s, &r, now), Err(JoinRefusal::UsedByYou("west".into())));
        let mut north = r.clone();
        north.cluster = "north".into();
        north.trust_domain = "north.mesh".into();
        assert_eq!(check_token(&s, &north, now), Ok(()));
        spend(&mut s, &north, now, now + 120);
        let mut south = north.clone();
        south.cluster = "south".into();
        assert_eq!(
            check_token(&s, &south, now),
            Err(JoinRefusal::Used("west, north".into()))
        );
        s.tokens.get_mut("t1").unwrap().revoked = true;
        assert_eq!(check_token(&s, &south, now), Err(JoinRefusal::Revoked));

        // Labels and statuses, one each.
        assert_eq!(JoinRefusal::BadSecret.label(), "bad_secret");
        assert_eq!(JoinRefusal::BadSecret.status().code(), Code::PermissionDenied);
        assert_eq!(JoinRefusal::UnknownToken.status().code(), Code::NotFound);
    }

    #[test]
    fn a_request_from_ourselves_or_with_bad_names_is_refused() {
        isthmus_core::install_crypto_provider();
        let (_, mut r) = state_with_token(0);
        r.roots_pem = isthmus_core::identity::Ca::generate("west.mesh")
            .unwrap()
            .chain_pem()
            .to_string();
        assert_eq!(check_request("east", "east.mesh", &r), Ok(()));
        let mut me = r.clone();
        me.cluster = "east".into();
        assert_eq!(
            check_request("east", "east.mesh", &me).unwrap_err().label(),
            "self_link"
        );
        let mut bad = r.clone();
        bad.cluster = "West!".into();
        assert_eq!(check_request("east", "east.mesh", &bad).unwrap_err().label(), "invalid");
    }

    #[test]
    fn link_errors_are_labelled_by_kind_not_by_message() {
        let e = LinkError::FingerprintMismatch("x".into());
        assert_eq!(
            (e.label(), e.status().code()),
            ("fingerprint_mismatch", Code::FailedPrecondition)
        );
        let e = LinkError::Refused {
            cluster: "east".into(),
            status: Status::already_exists("linked"),
        };
        assert_eq!((e.label(), e.status().code()), ("already_linked", Code::AlreadyExists));
        let e = LinkError::Refused {
            cluster: "east".into(),
            status: Status::failed_precondition("fingerprint mismatch in a message"),
        };
        assert_eq!(e.label(), "refused");
    }
}
