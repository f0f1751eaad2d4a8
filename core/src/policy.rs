//! TrafficPolicy: the document users write (`isthmus apply -f`), and its
//! validation, which names the offending field. The controller validates
//! again whatever reaches it; sidecars act on the proto form.
//!
//! ```yaml
//! apiVersion: isthmus.dev/v1alpha1
//! kind: TrafficPolicy
//! metadata: { name: echo, namespace: demo }
//! spec:
//!   failoverThreshold: 0.5
//!   routes:
//!     - match: { headers: { x-canary: "true" } }
//!       split: [{ cluster: west }]
//!     - split: [{ cluster: east, weight: 80 }, { cluster: west, weight: 20 }]
//!       failover: [north]
//!       timeout: 3s
//!       retries: { attempts: 3, perTryTimeout: 200ms, on: [connect-failure, timeout] }
//!       hedge: { after: 20ms, max: 1 }
//! ```

use std::collections::BTreeMap;

use std::time::Duration;

use isthmus_proto::{PolicyRoute, RequestPolicy, TrafficPolicy, WeightedCluster};
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "isthmus.dev/v1alpha1";
pub const KIND: &str = "TrafficPolicy";
pub const DEFAULT_THRESHOLD: f64 = 0.5;
pub const MAX_WEIGHT: u32 = 10_000;

/// What may send a request again (`retries.on`).
pub const RETRY_ON: [&str; 6] = [
    "connect-failure",
    "reset",
    "timeout",
    "unavailable",
    "gateway-error",
    "5xx",
];
/// What sends a request again when `retries.on` is not given: whatever was
/// not delivered, whatever an idempotent request lost to a dead session or
/// a per-try timeout, and gRPC calls the server did not take up.
pub const DEFAULT_RETRY_ON: [&str; 4] = ["connect-failure", "reset", "timeout", "unavailable"];
/// The longest request timeout a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most attempts a policy may allow, the first included.
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest a hedge may wait, and the most copies of one request.
pub const MAX_HEDGE_AFTER: Duration = Duration::from_secs(10);
pub const MAX_HEDGES: u32 = 3;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The service in `metadata.namespace` [default: `metadata.name`].
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "default_threshold")]
    pub failover_threshold: f64,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Timeouts, retries and hedging of every route without its own.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub hedge: Option<Hedge>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Attempts in all, the first included [default: as many as there are
    /// endpoints and clusters to try, within the retry budget].
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Each attempt's own time limit [default: none, only `timeout`].
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// What sends a request again [default: `DEFAULT_RETRY_ON`].
    #[serde(default)]
    pub on: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hedge {
    /// Send another copy of an idempotent request not answered by then.
    pub after: String,
    /// Copies beyond the first [default: 1].
    #[serde(default = "one")]
    pub max: u32,
}

fn default_threshold() -> f64 {
    DEFAULT_THRESHOLD
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, rename = "match")]
    pub matches: Option<Match>,
    #[serde(default)]
    pub split: Vec<Weighted>,
    #[serde(default)]
    pub failover: Vec<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub hedge: Option<Hedge>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub cluster: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A duration field in milliseconds (at least 1).
fn millis(field: &str, text: &str) -> Result<u32, PolicyError> {
    let d = humantime::parse_duration(text).map_err(|e| err(field, format!("{text:?} is not a duration ({e})")))?;
    let ms = u32::try_from(d.as_millis()).map_err(|_| err(field, "too long"))?;
    if ms == 0 {
        return Err(err(field, "must be at least 1ms"));
    }
    Ok(ms)
}

/// The request settings of a spec or route, as the proto carries them.
fn requests(
    at: &str,
    timeout: &Option<String>,
    retries: &Option<Retries>,
    hedge: &Option<Hedge>,
) -> Result<Option<RequestPolicy>, PolicyError> {
    if timeout.is_none() && retries.is_none() && hedge.is_none() {
        return Ok(None);
    }
    let mut r = RequestPolicy::default();
    if let Some(t) = timeout {
        r.timeout_ms = millis(&format!("{at}.timeout"), t)?;
    }
    if let Some(x) = retries {
        r.attempts = x.attempts.unwrap_or(0);
        if x.attempts == Some(0) {
            return Err(err(
                format!("{at}.retries.attempts"),
                "must be at least 1 (the first attempt)",
            ));
        }
        if let Some(t) = &x.per_try_timeout {
            r.per_try_timeout_ms = millis(&format!("{at}.retries.perTryTimeout"), t)?;
        }
        r.retry_on = x.on.clone().unwrap_or_default();
    }
    if let Some(h) = hedge {
        r.hedge_after_ms = millis(&format!("{at}.hedge.after"), &h.after)?;
        r.hedge_max = h.max;
    }
    Ok(Some(r))
}

/// A policy that cannot be applied, and the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

impl PolicyDocument {
    /// The policy as sidecars get it, once the document's own fields check.
    pub fn to_proto(&self) -> Result<TrafficPolicy, PolicyError> {
        if self.api_version != API_VERSION {
            return Err(err("apiVersion", format!("must be {API_VERSION}")));
        }
        if self.kind != KIND {
            return Err(err("kind", format!("must be {KIND}")));
        }
        let mut routes = Vec::with_capacity(self.spec.routes.len());
        for (i, r) in self.spec.routes.iter().enumerate() {
            routes.push(PolicyRoute {
                headers: r
                    .matches
                    .as_ref()
                    .map(|m| m.headers.clone().into_iter().collect())
                    .unwrap_or_default(),
                split: r
                    .split
                    .iter()
                    .map(|w| WeightedCluster {
                        cluster: w.cluster.clone(),
                        weight: w.weight,
                    })
                    .collect(),
                failover: r.failover.clone(),
                requests: requests(&format!("spec.routes[{i}]"), &r.timeout, &r.retries, &r.hedge)?,
            });
        }
        let p = TrafficPolicy {
            namespace: self.metadata.namespace.clone(),
            service: self.spec.service.clone().unwrap_or_else(|| self.metadata.name.clone()),
            failover_threshold: self.spec.failover_threshold,
            retry_budget_percent: self.spec.retry_budget.percent,
            retry_budget_min_per_second: self.spec.retry_budget.min_per_second,
            routes,
            requests: requests("spec", &self.spec.timeout, &self.spec.retries, &self.spec.hedge)?,
        };
        validate(&p)?;
        Ok(p)
    }
}

/// Every rule a policy must keep, with the field named in the document's
/// terms (`spec.routes[1].split[0].weight`).
pub fn validate(p: &TrafficPolicy) -> Result<(), PolicyError> {
    crate::identity::validate_name(&p.namespace).map_err(|e| err("metadata.namespace", e.to_string()))?;
    crate::identity::validate_name(&p.service).map_err(|e| err("spec.service", e.to_string()))?;
    let t = p.failover_threshold;
    if !(t > 0.0 && t <= 1.0) {
        return Err(err(
            "spec.failoverThreshold",
            format!("{t} is not a share in (0, 1]: the healthy share of a level below which traffic moves on"),
        ));
    }
    if p.retry_budget_percent > 100 {
        return Err(err("spec.retryBudget.percent", "must be at most 100"));
    }
    if p.routes.is_empty() && p.requests.is_none() {
        return Err(err(
            "spec.routes",
            "at least one route, or request settings (timeout, retries, hedge), is needed",
        ));
    }
    if let Some(r) = &p.requests {
        validate_requests("spec", r)?;
    }
    for (i, r) in p.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if r.split.is_empty() && r.failover.is_empty() && r.requests.is_none() {
            return Err(err(
                &at,
                "needs a split, a failover list, or request settings (timeout, retries, hedge)",
            ));
        }
        if let Some(req) = &r.requests {
            validate_requests(&at, req)?;
        }
        if i + 1 < p.routes.len() && r.headers.is_empty() {
            return Err(err(
                format!("spec.routes[{}]", i + 1),
                format!("is never reached: {at} has no match and takes every request"),
            ));
        }
        for (name, value) in &r.headers {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !valid {
                return Err(err(
                    format!("{at}.match.headers.{name}"),
                    "header names are lowercase letters, digits, '-' and '_'",
                ));
            }
            if http_value_invalid(value) {
                return Err(err(format!("{at}.match.headers.{name}"), "not a valid header value"));
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (j, w) in r.split.iter().enumerate() {
            let f = format!("{at}.split[{j}]");
            crate::identity::validate_name(&w.cluster).map_err(|e| err(format!("{f}.cluster"), e.to_string()))?;
            if !(1..=MAX_WEIGHT).contains(&w.weight) {
                return Err(err(format!("{f}.weight"), format!("must be 1 to {MAX_WEIGHT}")));
            }
            if seen.contains(&w.cluster.as_str()) {
                return Err(err(
                    format!("{f}.cluster"),
                    format!("{} is named twice in this route", w.cluster),
                ));
            }
            seen.push(&w.cluster);
        }
        for (j, c) in r.failover.iter().enumerate() {
            let f = format!("{at}.failover[{j}]");
            crate::identity::validate_name(c).map_err(|e| err(&f, e.to_string()))?;
            if seen.contains(&c.as_str()) {
                return Err(err(&f, format!("{c} is named twice in this route")));
            }
            seen.push(c);
        }
    }
    Ok(())
}

fn validate_requests(at: &str, r: &RequestPolicy) -> Result<(), PolicyError> {
    let max_ms = MAX_TIMEOUT.as_millis() as u32;
    if r.timeout_ms > max_ms {
        return Err(err(format!("{at}.timeout"), format!("must be at most {MAX_TIMEOUT:?}")));
    }
    if r.per_try_timeout_ms > max_ms {
        return Err(err(
            format!("{at}.retries.perTryTimeout"),
            format!("must be at most {MAX_TIMEOUT:?}"),
        ));
    }
    if r.timeout_ms > 0 && r.per_try_timeout_ms > r.timeout_ms {
        return Err(err(
            format!("{at}.retries.perTryTimeout"),
            "is longer than the request's timeout: no attempt could use it",
        ));
    }
    if r.attempts > MAX_ATTEMPTS {
        return Err(err(
            format!("{at}.retries.attempts"),
            format!("must be at most {MAX_ATTEMPTS}"),
        ));
    }
    for (j, c) in r.retry_on.iter().enumerate() {
        if !RETRY_ON.contains(&c.as_str()) {
            return Err(err(
                format!("{at}.retries.on[{j}]"),
                format!("{c:?} is not one of {}", RETRY_ON.join(", ")),
            ));
        }
    }
    if r.hedge_after_ms > 0 {
        if r.hedge_after_ms > MAX_HEDGE_AFTER.as_millis() as u32 {
            return Err(err(
                format!("{at}.hedge.after"),
                format!("must be at most {MAX_HEDGE_AFTER:?}"),
            ));
        }
        if !(1..=MAX_HEDGES).contains(&r.hedge_max) {
            return Err(err(format!("{at}.hedge.max"), format!("must be 1 to {MAX_HEDGES}")));
        }
    }
    Ok(())
}

fn http_value_invalid(v: &str) -> bool {
    v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> PolicyDocument {
        PolicyDocument {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name: "echo".into(),
                namespace: "demo".into(),
            },
            spec: Spec {
                service: None,
                failover_threshold: 0.5,
                retry_budget: RetryBudget::default(),
                routes: vec![
                    Route {
                        matches: Some(Match {
                            headers: [("x-canary".to_string(), "true".to_string())].into(),
                        }),
                        split: vec![Weighted {
                            cluster: "west".into(),
                            weight: 1,
                        }],
                        failover: vec![],
                        timeout: None,
                        retries: None,
                        hedge: None,
                    },
                    Route {
                        matches: None,
                        split: vec![
                            Weighted {
                                cluster: "east".into(),
                                weight: 80,
                            },
                            Weighted {
                                cluster: "west".into(),
                                weight: 20,
                            },
                        ],
                        failover: vec!["north".into()],
                        timeout: None,
                        retries: None,
                        hedge: None,
                    },
                ],
                timeout: None,
                retries: None,
                hedge: None,
            },
        }
    }

    #[test]
    fn request_settings_convert_and_may_stand_alone() {
        let text = r#"
apiVersion: isthmus.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: demo }
spec:
  timeout: 3s
  retries: { perTryTimeout: 200ms }
  routes:
    - match: { headers: { x-slow: "1" } }
      timeout: 30s
      hedge: { after: 20ms }
"#;
        let d: PolicyDocument = serde_saphyr::from_str(text).unwrap();
        let p = d.to_proto().unwrap();
        let spec = p.requests.as_ref().unwrap();
        assert_eq!(
            (spec.timeout_ms, spec.per_try_timeout_ms, spec.attempts),
            (3000, 200, 0)
        );
        let route = p.routes[0].requests.as_ref().unwrap();
        assert_eq!(
            (route.timeout_ms, route.hedge_after_ms, route.hedge_max),
            (30_000, 20, 1)
        );
        assert!(
            p.routes[0].split.is_empty(),
            "a route of settings only keeps the default destinations"
        );
    }

    #[test]
    fn a_valid_document_converts() {
        let p = doc().to_proto().unwrap();
        assert_eq!(p.service, "echo");
        assert_eq!(p.routes[1].split[0].weight, 80);
        assert_eq!(p.routes[0].headers["x-canary"], "true");
    }

    #[test]
    fn errors_name_the_field() {
        let field = |f: &dyn Fn(&mut PolicyDocument)| {
            let mut d = doc();
            f(&mut d);
            d.to_proto().unwrap_err().field
        };
        assert_eq!(field(&|d| d.kind = "Policy".into()), "kind");
        assert_eq!(field(&|d| d.spec.failover_threshold = 0.0), "spec.failoverThreshold");
        assert_eq!(field(&|d| d.spec.failover_threshold = 1.5), "spec.failoverThreshold");
        assert_eq!(
            field(&|d| d.spec.routes[1].split[1].weight = 0),
            "spec.routes[1].split[1].weight"
        );
        assert_eq!(
            field(&|d| d.spec.routes[1].failover = vec!["east".into()]),
            "spec.routes[1].failover[0]"
        );
        assert_eq!(field(&|d| d.spec.routes[0].matches = None), "spec.routes[1]");
        assert_eq!(field(&|d| d.spec.routes.clear()), "spec.routes");
        assert_eq!(field(&|d| d.spec.timeout = Some("soon".into())), "spec.timeout");
        assert_eq!(field(&|d| d.spec.timeout = Some("0s".into())), "spec.timeout");
        assert_eq!(
            field(&|d| {
                d.spec.routes[1].timeout = Some("1s".into());
                d.spec.routes[1].retries = Some(Retries {
                    per_try_timeout: Some("2s".into()),
                    ..Default::default()
                });
            }),
            "spec.routes[1].retries.perTryTimeout"
        );
        assert_eq!(
            field(&|d| {
                d.spec.retries = Some(Retries {
                    on: Some(vec!["timeout".into(), "everything".into()]),
                    ..Default::default()
                })
            }),
            "spec.retries.on[1]"
        );
        assert_eq!(
            field(&|d| {
                d.spec.retries = Some(Retries {
                    attempts: Some(0),
                    ..Default::default()
                })
            }),
            "spec.retries.attempts"
        );
        assert_eq!(
            field(&|d| {
                d.spec.routes[0].hedge = Some(Hedge {
                    after: "20ms".into(),
                    max: 9,
                })
            }),
            "spec.routes[0].hedge.max"
        );
        assert_eq!(
            field(&|d| d.spec.routes[1].split[0].cluster = "East!".into()),
            "spec.routes[1].split[0].cluster"
        );
        assert_eq!(
            field(&|d| {
                d.spec.routes[0].matches = Some(Match {
                    headers: [("X-Canary".to_string(), "1".to_string())].into(),
                })
            }),
            "spec.routes[0].match.headers.X-Canary"
        );
        assert_eq!(
            field(&|d| d.spec.retry_budget.percent = 101),
            "spec.retryBudget.percent"
        );
    }
}
