//! Who a workload is, on Kubernetes: it presents a projected,
//! audience-bound service-account token, and the API server says whose it
//! is (`TokenReview`). The controller then signs an SVID for exactly that
//! namespace and service account. Answers are cached for a short while, so
//! a fleet of sidecars reconnecting does not become a storm of reviews.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};

/// The audience Isthmus's tokens are minted for (the projected volume's
/// `audience`, or `TokenRequest`'s).
pub const AUDIENCE: &str = "isthmus";
/// How long a review's answer is trusted.
const CACHE_FOR: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the API server did not accept the token: {0}")]
    Refused(String),
    #[error("the token is not meant for audience {AUDIENCE}")]
    Audience,
    #[error("the token is not a service account's ({0})")]
    NotServiceAccount(String),
    #[error("cannot ask the API server about the token: {0}")]
    Api(#[from] kube::Error),
}

pub struct Reviewer {
    pub client: kube::Client,
    cache: Mutex<HashMap<String, (ServiceAccount, Instant)>>,
}

/// Whether a bearer credential looks like a JWT (three base64url parts).
pub fn is_jwt(s: &str) -> bool {
    s.split('.').count() == 3
        && s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// `system:serviceaccount:<namespace>:<name>`.
pub fn service_account(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| ServiceAccount {
        namespace: namespace.into(),
        name: name.into(),
    })
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The service account `token` belongs to, as the API server says.
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let key = isthmus_core::token::hash_secret(token.as_bytes());
        if let Some((sa, at)) = self.cache.lock().expect("review cache").get(&key)
            && at.elapsed() < CACHE_FOR
        {
            return Ok(sa.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Refused(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
            return Err(ReviewError::Audience);
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let sa = service_account(&user).ok_or(ReviewError::NotServiceAccount(user))?;
        let mut cache = self.cache.lock().expect("review cache");
        cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
        cache.insert(key, (sa.clone(), Instant::now()));
        Ok(sa)
    }

    /// Whether `namespace/name` is a Service: a workload serves only
    /// Services of its own namespace that exist.
    pub async fn service_exists(&self, namespace: &str, name: &str) -> Result<bool, kube::Error> {
        Ok(Api::<Service>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_names() {
        assert_eq!(
            service_account("system:serviceaccount:demo:echo"),
            Some(ServiceAccount {
                namespace: "demo".into(),
                name: "echo".into()
            })
        );
        for bad in [
            "alice",
            "system:serviceaccount:demo",
            "system:serviceaccount::echo",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!is_jwt("iwc1.abc.def+"));
        assert!(!is_jwt("plain-token"));
    }
}
