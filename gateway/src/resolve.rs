//! Peer gateway addresses: `host:port`, where host is an IP or a DNS name
//! (a cloud load balancer's, whose IPs change). Names are resolved with
//! hickory's resolver at every dial, so its cache honours each record's
//! TTL: a load balancer that moves is followed at the next dial after its
//! record expires, without a restart. The dial tries every address a name
//! has (`peers.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// A name that does not resolve is asked again this soon: a load
/// balancer's name often exists minutes after the link was made.
const NEGATIVE_TTL_CAP: Duration = Duration::from_secs(5);
/// However long a record says, ask again within this: a peer's gateway
/// moving is followed within it even behind a generous TTL.
const POSITIVE_TTL_CAP: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0:?} is not host:port")]
    Malformed(String),
    #[error("no DNS resolver: {0} (give the gateway --dns-server)")]
    NoResolver(Arc<NetError>),
    #[error("cannot resolve {name}: {reason}")]
    Lookup { name: String, reason: String },
}

/// One `host:port` split (sans-IO): an address as it is, or a name to
/// look up and the port to put beside each of its addresses.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

impl Target {
    pub fn parse(s: &str) -> Result<Self, ResolveError> {
        let s = s.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(a));
        }
        let malformed = || ResolveError::Malformed(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(malformed)?;
        let port: u16 = port.parse().map_err(|_| malformed())?;
        let host = host.trim_end_matches('.');
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            return Err(malformed());
        }
        Ok(Target::Name(host.to_string(), port))
    }
}

/// Resolves peer gateway addresses (one per gateway, shared by its dials).
pub struct Resolver {
    /// Why there is none, kept for every lookup that needs it.
    inner: Result<TokioResolver, Arc<NetError>>,
}

impl Resolver {
    /// The system's resolver configuration (`/etc/resolv.conf`, and
    /// `/etc/hosts`), or the given name servers (host:port, UDP and TCP).
    pub fn new(servers: &[SocketAddr]) -> Self {
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio()
        } else {
            let servers = servers
                .iter()
                .map(|s| {
                    let conn = |protocol| {
                        let mut c = ConnectionConfig::new(protocol);
                        c.port = s.port();
                        c
                    };
                    NameServerConfig::new(s.ip(), true, vec![conn(ProtocolConfig::Udp), conn(ProtocolConfig::Tcp)])
                })
                .collect();
            let config = ResolverConfig::from_name_servers(servers);
            let mut b = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
            *b.options_mut() = ResolverOpts::default();
            Ok(b)
        };
        let inner = builder.and_then(|mut b| {
            let o = b.options_mut();
            o.positive_max_ttl = Some(POSITIVE_TTL_CAP);
            o.negative_max_ttl = Some(NEGATIVE_TTL_CAP);
            // Both families, IPv4 first: whichever the path has.
            o.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
            b.build()
        });
        let inner = inner.map_err(Arc::new);
        if let Err(e) = &inner {
            tracing::warn!(error = %e, "no DNS resolver: peer gateways given by name cannot be reached");
        }
        Self { inner }
    }

    /// Every address of `addrs` (comma separated `host:port`s), in order,
    /// without repeats; names resolved now (from the cache while their
    /// records live).
    pub async fn addresses(&self, addrs: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let mut out: Vec<SocketAddr> = Vec::new();
        let mut failure = None;
        for part in addrs.split(',').filter(|p| !p.trim().is_empty()) {
            let found = match Target::parse(part)? {
                Target::Addr(a) => vec![a],
                Target::Name(name, port) => match self.lookup(&name).await {
                    Ok(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
                    Err(e) => {
                        failure = Some(e);
                        continue;
                    }
                },
            };
            for a in found {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        match (out.is_empty(), failure) {
            (true, Some(e)) => Err(e),
            (true, None) => Err(ResolveError::Malformed(addrs.to_string())),
            _ => Ok(out),
        }
    }

    async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let resolver = self
            .inner
            .as_ref()
            .map_err(|e| ResolveError::NoResolver(Arc::clone(e)))?;
        // Fully qualified: the search list is for people, not for peers.
        let fqdn = format!("{name}.");
        let lookup = resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| ResolveError::Lookup {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(lookup.iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_addresses_or_names_with_ports() {
        assert_eq!(
            Target::parse("10.0.0.1:15443").unwrap(),
            Target::Addr("10.0.0.1:15443".parse().unwrap())
        );
        assert_eq!(
            Target::parse("[::1]:15443").unwrap(),
            Target::Addr("[::1]:15443".parse().unwrap())
        );
        assert_eq!(
            Target::parse(" gw.east.example.com.:15443").unwrap(),
            Target::Name("gw.east.example.com".into(), 15443)
        );
        for bad in [
            "gw.example.com",
            "gw.example.com:http",
            ":15443",
            "a..b:1",
            "a b:1",
            "gw:99999",
            "::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn addresses_keep_order_drop_repeats_and_need_no_resolver_for_ips() {
        // A resolver that cannot be built must not matter for IPs.
        let r = Resolver {
            inner: Err(Arc::new(NetError::from("none here"))),
        };
        let got = r.addresses("10.0.0.1:1, 10.0.0.2:1,10.0.0.1:1").await.unwrap();
        assert_eq!(got, vec!["10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap()]);
        let e = r.addresses("gw.example.com:1").await.unwrap_err();
        assert!(e.to_string().contains("--dns-server"), "{e}");
        // One name failing leaves the addresses that are known.
        let got = r.addresses("gw.example.com:1,10.0.0.3:2").await.unwrap();
        assert_eq!(got, vec!["10.0.0.3:2".parse().unwrap()]);
    }
}
