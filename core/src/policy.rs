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
//! ```

use std::collections::BTreeMap;

use isthmus_proto::{PolicyRoute, TrafficPolicy, WeightedCluster};
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "isthmus.dev/v1alpha1";
pub const KIND: &str = "TrafficPolicy";
pub const DEFAULT_THRESHOLD: f64 = 0.5;
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The service in `metadata.namespace` [default: `metadata.name`].
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "default_threshold")]
    pub failover_threshold: f64,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    pub routes: Vec<Route>,
}

fn default_threshold() -> f64 {
    DEFAULT_THRESHOLD
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, rename = "match")]
    pub matches: Option<Match>,
    #[serde(default)]
    pub split: Vec<Weighted>,
    #[serde(default)]
    pub failover: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub cluster: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
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
        let p = TrafficPolicy {
            namespace: self.metadata.namespace.clone(),
            service: self.spec.service.clone().unwrap_or_else(|| self.metadata.name.clone()),
            failover_threshold: self.spec.failover_threshold,
            retry_budget_percent: self.spec.retry_budget.percent,
            retry_budget_min_per_second: self.spec.retry_budget.min_per_second,
            routes: self
                .spec
                .routes
                .iter()
                .map(|r| PolicyRoute {
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
                })
                .collect(),
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
    if p.routes.is_empty() {
        return Err(err("spec.routes", "at least one route is needed"));
    }
    for (i, r) in p.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if r.split.is_empty() && r.failover.is_empty() {
            return Err(err(&at, "needs a split, a failover list, or both"));
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
                    },
                ],
            },
        }
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
