//! Names of services across the cluster set (KEP-1645).

use std::fmt;

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

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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

/// Parse `namespace/name`.
pub fn parse_ns_name(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not <namespace>/<name> (for example demo/echo)"))?;
    for part in [ns, name] {
        crate::identity::validate_name(part).map_err(|e| e.to_string())?;
    }
    Ok((ns.to_string(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ns_name() {
        assert_eq!(parse_ns_name("demo/echo").unwrap(), ("demo".into(), "echo".into()));
        assert!(parse_ns_name("echo").is_err());
        assert!(parse_ns_name("Demo/echo").is_err());
    }
}
