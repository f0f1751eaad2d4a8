//! Names of services across the cluster set (KEP-1645).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::IdentityError;

pub const CLUSTERSET_DOMAIN: &str = "svc.clusterset.local";

/// `name.ns.svc.clusterset.local`, or `cluster.name.ns.svc.clusterset.local`
/// to address one cluster's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub cluster: Option<String>,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    /// Parse a host (without port). `None` if it is not a clusterset name.
    pub fn parse(host: &str) -> Option<Self> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let rest = host.strip_suffix(CLUSTERSET_DOMAIN)?.strip_suffix('.')?;
        let labels: Vec<&str> = rest.split('.').collect();
        let valid = |l: &&str| crate::identity::validate_name(l).is_ok();
        if !labels.iter().all(valid) {
            return None;
        }
        match labels.as_slice() {
            [name, ns] => Some(Self {
                cluster: None,
                name: name.to_string(),
                namespace: ns.to_string(),
            }),
            [cluster, name, ns] => Some(Self {
                cluster: Some(cluster.to_string()),
                name: name.to_string(),
                namespace: ns.to_string(),
            }),
            _ => None,
        }
    }

    /// The service, whichever cluster the name pins.
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }
}

/// A service across the cluster set: its namespace and name, written
/// `namespace/name` (one service in every cluster, KEP-1645).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// A `namespace/name` that is not one.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not <namespace>/<name> (for example demo/echo)")]
    Shape(String),
    #[error(transparent)]
    Invalid(#[from] IdentityError),
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parse and validate `namespace/name`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (ns, name) = s.split_once('/').ok_or_else(|| NameError::Shape(s.to_string()))?;
        crate::identity::validate_name(ns)?;
        crate::identity::validate_name(name)?;
        Ok(Self::new(ns, name))
    }

    /// `name.namespace.svc.clusterset.local`.
    pub fn host(&self) -> String {
        format!("{}.{}.{CLUSTERSET_DOMAIN}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl TryFrom<String> for ServiceKey {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<ServiceKey> for String {
    fn from(k: ServiceKey) -> String {
        k.to_string()
    }
}

/// Which of a linked peer's exports a link accepts (its import scope):
/// `namespace/name`, `namespace/*`, or `*` for any service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPattern {
    /// None: any namespace (only in `*`).
    namespace: Option<String>,
    /// None: any name in the namespace.
    name: Option<String>,
}

impl ImportPattern {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s == "*" {
            return Ok(Self {
                namespace: None,
                name: None,
            });
        }
        let (ns, name) = s.split_once('/').ok_or_else(|| NameError::Shape(s.to_string()))?;
        crate::identity::validate_name(ns)?;
        if name == "*" {
            return Ok(Self {
                namespace: Some(ns.to_string()),
                name: None,
            });
        }
        crate::identity::validate_name(name)?;
        Ok(Self {
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
        })
    }

    pub fn matches(&self, key: &ServiceKey) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }
}

impl fmt::Display for ImportPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.namespace, &self.name) {
            (None, _) => write!(f, "*"),
            (Some(ns), None) => write!(f, "{ns}/*"),
            (Some(ns), Some(n)) => write!(f, "{ns}/{n}"),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.cluster {
            write!(f, "{c}.")?;
        }
        write!(f, "{}.{}.{CLUSTERSET_DOMAIN}", self.name, self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_patterns() {
        let echo = ServiceKey::new("demo", "echo");
        let other = ServiceKey::new("prod", "echo");
        for (p, demo_echo, prod_echo) in [("*", true, true), ("demo/*", true, false), ("demo/echo", true, false)] {
            let pat = ImportPattern::parse(p).unwrap();
            assert_eq!((pat.matches(&echo), pat.matches(&other)), (demo_echo, prod_echo), "{p}");
            assert_eq!(pat.to_string(), p);
        }
        for bad in ["", "demo", "*/echo", "demo/ec*", "Demo/echo", "demo/echo/x"] {
            assert!(ImportPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_clusterset_names() {
        let n = ServiceName::parse("echo.demo.svc.clusterset.local").unwrap();
        assert_eq!(
            (n.cluster, n.name.as_str(), n.namespace.as_str()),
            (None, "echo", "demo")
        );
        let n = ServiceName::parse("East.echo.demo.svc.clusterset.local.").unwrap();
        assert_eq!(n.cluster.as_deref(), Some("east"));
        assert_eq!(n.to_string(), "east.echo.demo.svc.clusterset.local");
        for bad in [
            "echo.demo.svc.cluster.local",
            "demo.svc.clusterset.local",
            "a.b.c.d.svc.clusterset.local",
            "example.com",
        ] {
            assert!(ServiceName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn service_keys() {
        let k = ServiceKey::parse("demo/echo").unwrap();
        assert_eq!(k, ServiceKey::new("demo", "echo"));
        assert_eq!(k.to_string(), "demo/echo");
        assert_eq!(k.host(), "echo.demo.svc.clusterset.local");
        assert!(ServiceKey::parse("echo").is_err());
        assert!(ServiceKey::parse("Demo/echo").is_err());
        // As a JSON map key it is the plain `ns/name` string.
        let m: std::collections::BTreeMap<ServiceKey, u8> = [(k.clone(), 1)].into();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"demo/echo":1}"#);
        assert_eq!(
            serde_json::from_str::<std::collections::BTreeMap<ServiceKey, u8>>(&text).unwrap(),
            m
        );
        assert!(serde_json::from_str::<std::collections::BTreeMap<ServiceKey, u8>>(r#"{"x":1}"#).is_err());
    }
}
