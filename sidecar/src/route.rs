//! Routing decisions for outbound requests (pure).
//!
//! Over 600 lines with its tests: the code itself is under 380; the
//! split, failover and failback cases are tested here, beside it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use isthmus_core::naming::{ServiceKey, ServiceName};
use isthmus_proto::{ConfigSnapshot, PolicyRoute, RequestPolicy, Service};

/// Where one request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub cluster: String,
    /// Direct sidecar addresses (local cluster) or empty (through the gateway).
    pub addresses: Vec<String>,
    /// SPIFFE IDs the serving sidecar may present.
    pub identities: Vec<String>,
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// The service's policy's retry budget (percent, floor per second), if
    /// it has a policy; else the sidecar's shared budget applies.
    pub retry_budget: Option<(u32, u32)>,
    /// Timeouts, retries and hedging of the request's route.
    pub settings: RequestSettings,
}

/// How a request is treated on its way: its timeouts, what sends it
/// again, and hedging. From the matched policy route, else the policy,
/// else the defaults (the sidecar's `--request-timeout`, no per-try
/// timeout, attempts bounded by the choices and the retry budget, the
/// default retry conditions, no hedging).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestSettings {
    /// The whole request's limit; `None`: the sidecar's.
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    /// Attempts in all, the first included.
    pub attempts: Option<u32>,
    pub retry_on: RetryOn,
    pub hedge: Option<Hedge>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedge {
    pub after: Duration,
    /// Copies beyond the first.
    pub max: u32,
}

/// The conditions that send a request again (a policy's `retries.on`), as
/// a set (the rules they feed: `outbound/retry.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetryOn(u8);

impl RetryOn {
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1);
    pub const RESET: RetryOn = RetryOn(2);
    pub const TIMEOUT: RetryOn = RetryOn(4);
    pub const UNAVAILABLE: RetryOn = RetryOn(8);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(16);
    pub const SERVER_ERROR: RetryOn = RetryOn(32);
    pub const NONE: RetryOn = RetryOn(0);
    /// `isthmus_core::policy::DEFAULT_RETRY_ON`.
    pub const DEFAULT: RetryOn =
        RetryOn(Self::CONNECT_FAILURE.0 | Self::RESET.0 | Self::TIMEOUT.0 | Self::UNAVAILABLE.0);

    /// The set named by a policy (names checked when it was applied); none
    /// named is the default set.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Self {
        if names.is_empty() {
            return Self::default();
        }
        let mut set = Self::NONE;
        for n in names {
            set.0 |= match n.as_ref() {
                "connect-failure" => Self::CONNECT_FAILURE.0,
                "reset" => Self::RESET.0,
                "timeout" => Self::TIMEOUT.0,
                "unavailable" => Self::UNAVAILABLE.0,
                "gateway-error" => Self::GATEWAY_ERROR.0,
                "5xx" => Self::SERVER_ERROR.0,
                _ => 0,
            };
        }
        set
    }

    pub fn has(self, c: RetryOn) -> bool {
        self.0 & c.0 != 0
    }
}

impl Default for RetryOn {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl RequestSettings {
    /// A route's settings over its policy's: each field from the first
    /// that sets it (0 and empty are unset).
    pub fn of(route: Option<&RequestPolicy>, policy: Option<&RequestPolicy>) -> Self {
        let sources = [route, policy];
        let first = |f: fn(&RequestPolicy) -> u32| sources.iter().flatten().map(|r| f(r)).find(|v| *v > 0);
        let ms = |v: Option<u32>| v.map(|m| Duration::from_millis(u64::from(m)));
        let retry_on = sources
            .iter()
            .flatten()
            .find(|r| !r.retry_on.is_empty())
            .map(|r| RetryOn::parse(&r.retry_on))
            .unwrap_or_default();
        let hedge = sources.iter().flatten().find(|r| r.hedge_after_ms > 0).map(|r| Hedge {
            after: Duration::from_millis(u64::from(r.hedge_after_ms)),
            max: r.hedge_max.max(1),
        });
        Self {
            timeout: ms(first(|r| r.timeout_ms)),
            per_try_timeout: ms(first(|r| r.per_try_timeout_ms)),
            attempts: first(|r| r.attempts),
            retry_on,
            hedge,
        }
    }
}

impl Target {
    pub fn is_local(&self) -> bool {
        !self.addresses.is_empty()
    }

    /// The service in the target's cluster, at its port.
    pub fn destination(&self) -> Destination {
        Destination {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            port: self.port,
        }
    }
}

/// A service in one cluster at one port: what endpoint choice and pooled
/// sessions are kept per.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub cluster: String,
    pub namespace: String,
    pub service: String,
    pub port: u16,
}

/// Failover state is kept per service and per policy route (by index; the
/// default route is `usize::MAX`).
pub type FailoverStates = Mutex<HashMap<(ServiceKey, usize), LevelState>>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "service {name} is not known in cluster {cluster}: no local workload serves it and no linked cluster exports it"
    )]
    UnknownService { name: String, cluster: String },
    #[error("service {name} serves port {want}, not {got}")]
    PortMismatch { name: String, want: u32, got: u16 },
    #[error("service {name} has no endpoints in cluster {target}")]
    NoEndpoints { name: String, target: String },
    #[error(
        "service {name} is not available from cluster {target} here (not exported there, or that cluster is not linked)"
    )]
    UnknownCluster { name: String, target: String },
    #[error("no known service serves port {port}")]
    NoServiceOnPort { port: u16 },
    #[error(
        "port {port} is served by several services ({names}): an opaque connection cannot name one, so declare it HTTP or give the services distinct ports"
    )]
    AmbiguousPort { port: u16, names: String },
}

/// The one service serving `port`: what an opaque connection, which names
/// no host, is for.
pub fn by_port(snap: &ConfigSnapshot, port: u16) -> Result<ServiceName, RouteError> {
    let on_port: Vec<_> = snap.services.iter().filter(|s| s.port == u32::from(port)).collect();
    match on_port.as_slice() {
        [] => Err(RouteError::NoServiceOnPort { port }),
        [s] => Ok(ServiceName {
            cluster: None,
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }),
        many => Err(RouteError::AmbiguousPort {
            port,
            names: many
                .iter()
                .map(|s| ServiceKey::new(&s.namespace, &s.name).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// What a routing decision needs beyond the config snapshot.
pub struct Inputs<'a> {
    /// The request's headers, for policy routes that match on them.
    pub headers: Option<&'a http::HeaderMap>,
    /// Clusters not to use now: failed for this request already, or
    /// ejected for this service by passive outlier detection.
    pub avoid: &'a dyn Fn(&str) -> bool,
    /// Failover state per service route, kept between requests.
    pub failover: Option<&'a FailoverStates>,
    pub now: Instant,
    /// A uniform random number, for the weighted choice.
    pub random: u64,
}

impl Inputs<'_> {
    /// No headers, nothing to avoid, no failover memory.
    pub fn simple(random: u64) -> Inputs<'static> {
        Inputs {
            headers: None,
            avoid: &|_| false,
            failover: None,
            now: Instant::now(),
            random,
        }
    }
}

/// A decision: where the request goes, from which priority level, and
/// whether this request moved the service's traffic to another level.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed {
    pub target: Target,
    pub level: usize,
    pub moved: Option<LevelMove>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelMove {
    Failover,
    Failback,
}

/// A service route's current priority level, and since when a better one
/// has been healthy again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LevelState {
    pub level: usize,
    pub recovering_since: Option<Instant>,
}

/// How long a better level must stay healthy before traffic returns to it,
/// so a flapping cluster does not pull traffic back and forth.
pub const FAILBACK_HOLD: Duration = Duration::from_secs(2);

/// The level traffic should use given each level's healthy share. Moves
/// down (failover) at once; moves back up (failback) once the better level
/// has stayed at or above the threshold for `FAILBACK_HOLD`, or at once if
/// the current level has nothing healthy left. `None` if no level has
/// anything healthy.
pub fn choose_level(
    shares: &[f64],
    threshold: f64,
    st: &mut LevelState,
    now: Instant,
) -> Option<(usize, Option<LevelMove>)> {
    let best = shares
        .iter()
        .position(|s| *s >= threshold)
        .or_else(|| shares.iter().position(|s| *s > 0.0))?;
    let current_ok = shares.get(st.level).is_some_and(|s| *s >= threshold);
    if best > st.level || !current_ok && best != st.level && shares.get(st.level).is_none_or(|s| *s == 0.0) {
        let moved = if best > st.level {
            LevelMove::Failover
        } else {
            LevelMove::Failback
        };
        *st = LevelState {
            level: best,
            recovering_since: None,
        };
        return Some((best, Some(moved)));
    }
    if best < st.level {
        let since = *st.recovering_since.get_or_insert(now);
        if now.duration_since(since) >= FAILBACK_HOLD || !current_ok {
            *st = LevelState {
                level: best,
                recovering_since: None,
            };
            return Some((best, Some(LevelMove::Failback)));
        }
        return Some((st.level, None));
    }
    st.recovering_since = None;
    Some((st.level, None))
}

/// The policy's first route whose headers all match the request, if any.
fn matched<'a>(svc: &'a Service, headers: Option<&http::HeaderMap>) -> Option<(usize, &'a PolicyRoute)> {
    svc.policy.as_ref()?.routes.iter().enumerate().find(|(_, r)| {
        r.headers.iter().all(|(k, v)| {
            headers
                .and_then(|h| h.get(k.as_str()))
                .is_some_and(|got| got.as_bytes() == v.as_bytes())
        })
    })
}

/// The priority levels for a request: the policy's first route whose
/// headers all match (a split, then one cluster per failover step), or by
/// default the local cluster, then every other cluster alike. Also the
/// route's key for failover state, and its threshold.
pub fn levels(
    snap: &ConfigSnapshot,
    svc: &Service,
    headers: Option<&http::HeaderMap>,
) -> (usize, f64, Vec<Vec<(String, u32)>>) {
    let matched = matched(svc, headers)
        .filter(|(_, r)| !r.split.is_empty() || !r.failover.is_empty())
        .map(|(i, r)| (i, svc.policy.as_ref().map_or(0.5, |p| p.failover_threshold), r));
    if let Some((i, threshold, r)) = matched {
        let mut levels = Vec::new();
        if !r.split.is_empty() {
            levels.push(r.split.iter().map(|w| (w.cluster.clone(), w.weight)).collect());
        }
        levels.extend(r.failover.iter().map(|c| vec![(c.clone(), 1)]));
        return (i, threshold, levels);
    }
    let remote: Vec<(String, u32)> = svc
        .backends
        .iter()
        .filter(|b| b.cluster != snap.cluster)
        .map(|b| (b.cluster.clone(), 1))
        .collect();
    (
        usize::MAX,
        isthmus_core::policy::DEFAULT_THRESHOLD,
        vec![vec![(snap.cluster.clone(), 1)], remote],
    )
}

/// 1 if `cluster` can take the service's requests now, else 0: the local
/// cluster while it has endpoints, another while its export reports
/// healthy endpoints (withdrawn when its peering lease runs out), unless
/// it is to be avoided.
fn health(snap: &ConfigSnapshot, svc: &Service, cluster: &str, avoid: &dyn Fn(&str) -> bool) -> f64 {
    if avoid(cluster) {
        return 0.0;
    }
    let usable = svc.backends.iter().any(|b| {
        b.cluster == cluster
            && if b.cluster == snap.cluster {
                !b.addresses.is_empty()
            } else {
                b.healthy_endpoints > 0
            }
    });
    if usable { 1.0 } else { 0.0 }
}

/// Pick the cluster that serves `name:port`, by the service's policy (or
/// the default) and what is healthy now.
pub fn route(snap: &ConfigSnapshot, name: &ServiceName, port: Option<u16>, inp: &Inputs) -> Result<Routed, RouteError> {
    let svc =
        isthmus_core::delta::find(snap, &name.namespace, &name.name).ok_or_else(|| RouteError::UnknownService {
            name: name.to_string(),
            cluster: snap.cluster.clone(),
        })?;
    if let Some(p) = port.filter(|p| u32::from(*p) != svc.port) {
        return Err(RouteError::PortMismatch {
            name: name.to_string(),
            want: svc.port,
            got: p,
        });
    }
    let settings = match &svc.policy {
        None => RequestSettings::default(),
        Some(p) => RequestSettings::of(
            matched(svc, inp.headers).and_then(|(_, r)| r.requests.as_ref()),
            p.requests.as_ref(),
        ),
    };
    let target = |cluster: &str| -> Target {
        let b = svc.backends.iter().find(|b| b.cluster == cluster);
        Target {
            cluster: cluster.to_string(),
            addresses: match b {
                Some(b) if b.cluster == snap.cluster => b.addresses.clone(),
                _ => Vec::new(),
            },
            identities: b.map(|b| b.identities.clone()).unwrap_or_default(),
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            port: svc.port as u16,
            retry_budget: svc
                .policy
                .as_ref()
                .map(|p| (p.retry_budget_percent, p.retry_budget_min_per_second)),
            settings,
        }
    };
    if let Some(c) = &name.cluster {
        if !svc.backends.iter().any(|b| &b.cluster == c) {
            return Err(RouteError::UnknownCluster {
                name: name.to_string(),
                target: c.clone(),
            });
        }
        if health(snap, svc, c, &|_| false) == 0.0 {
            return Err(RouteError::NoEndpoints {
                name: name.to_string(),
                target: c.clone(),
            });
        }
        return Ok(Routed {
            target: target(c),
            level: 0,
            moved: None,
        });
    }
    let (route_index, threshold, levels) = levels(snap, svc, inp.headers);
    let weighted: Vec<Vec<(&str, f64)>> = levels
        .iter()
        .map(|l| {
            l.iter()
                .map(|(c, w)| (c.as_str(), f64::from(*w) * health(snap, svc, c, inp.avoid)))
                .collect()
        })
        .collect();
    let shares: Vec<f64> = levels
        .iter()
        .zip(&weighted)
        .map(|(l, h)| {
            let total: f64 = l.iter().map(|(_, w)| f64::from(*w)).sum();
            if total == 0.0 {
                0.0
            } else {
                h.iter().map(|(_, w)| w).sum::<f64>() / total
            }
        })
        .collect();
    let chosen = match inp.failover {
        Some(states) => {
            let key = (ServiceKey::new(&svc.namespace, &svc.name), route_index);
            let mut all = states.lock().expect("failover lock");
            choose_level(&shares, threshold, all.entry(key).or_default(), inp.now)
        }
        None => choose_level(&shares, threshold, &mut LevelState::default(), inp.now),
    };
    let Some((level, moved)) = chosen else {
        return Err(RouteError::NoEndpoints {
            name: name.to_string(),
            target: "any cluster".into(),
        });
    };
    let cluster = pick_weighted(&weighted[level], inp.random).ok_or_else(|| RouteError::NoEndpoints {
        name: name.to_string(),
        target: "any cluster".into(),
    })?;
    Ok(Routed {
        target: target(cluster),
        level,
        moved,
    })
}

/// A cluster by weight; `random` is uniform over u64.
pub fn pick_weighted<'a>(candidates: &[(&'a str, f64)], random: u64) -> Option<&'a str> {
    let total: f64 = candidates.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = (random as f64 / u64::MAX as f64) * total;
    for (c, w) in candidates {
        if *w > 0.0 && x < *w {
            return Some(c);
        }
        x -= w;
    }
    candidates.iter().rev().find(|(_, w)| *w > 0.0).map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opaque_port_names_its_one_service() {
        let mut s = snap(vec!["127.0.0.1:1".into()]);
        assert_eq!(by_port(&s, 8080).unwrap().key().to_string(), "demo/echo");
        assert_eq!(by_port(&s, 9090), Err(RouteError::NoServiceOnPort { port: 9090 }));
        let mut other = s.services[0].clone();
        other.name = "other".into();
        s.services.push(other);
        assert!(matches!(
            by_port(&s, 8080),
            Err(RouteError::AmbiguousPort { port: 8080, .. })
        ));
    }
    use isthmus_proto::{Backend, Service};

    fn snap(local_addrs: Vec<String>) -> ConfigSnapshot {
        ConfigSnapshot {
            cluster: "west".into(),
            services: vec![Service {
                namespace: "demo".into(),
                name: "echo".into(),
                port: 8080,
                exported: false,
                conditions: vec![],
                policy: None,
                clusterset_ips: vec![],
                backends: vec![
                    Backend {
                        cluster: "east".into(),
                        addresses: vec![],
                        identities: vec!["spiffe://east.mesh/ns/demo/sa/echo".into()],
                        healthy_endpoints: 1,
                    },
                    Backend {
                        cluster: "west".into(),
                        healthy_endpoints: local_addrs.len() as u32,
                        addresses: local_addrs,
                        identities: vec!["spiffe://west.mesh/ns/demo/sa/echo".into()],
                    },
                ],
            }],
            ..Default::default()
        }
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn prefers_local_then_remote() {
        let t = route(
            &snap(vec!["127.0.2.10:1".into()]),
            &name("echo.demo.svc.clusterset.local"),
            Some(8080),
            &Inputs::simple(0),
        )
        .map(|r| r.target)
        .unwrap();
        assert!(t.is_local());
        assert_eq!(t.cluster, "west");
        let t = route(
            &snap(vec![]),
            &name("echo.demo.svc.clusterset.local"),
            None,
            &Inputs::simple(0),
        )
        .map(|r| r.target)
        .unwrap();
        assert_eq!(t.cluster, "east");
        assert!(!t.is_local());
        assert_eq!(t.identities, ["spiffe://east.mesh/ns/demo/sa/echo"]);
    }

    #[test]
    fn cluster_pinned_name() {
        let t = route(
            &snap(vec!["127.0.2.10:1".into()]),
            &name("east.echo.demo.svc.clusterset.local"),
            None,
            &Inputs::simple(0),
        )
        .map(|r| r.target)
        .unwrap();
        assert_eq!(t.cluster, "east");
        assert!(matches!(
            route(
                &snap(vec![]),
                &name("north.echo.demo.svc.clusterset.local"),
                None,
                &Inputs::simple(0)
            )
            .map(|r| r.target),
            Err(RouteError::UnknownCluster { .. })
        ));
    }

    #[test]
    fn errors() {
        let s = snap(vec![]);
        assert!(matches!(
            route(&s, &name("nope.demo.svc.clusterset.local"), None, &Inputs::simple(0)).map(|r| r.target),
            Err(RouteError::UnknownService { .. })
        ));
        assert!(matches!(
            route(&s, &name("echo.demo.svc.clusterset.local"), Some(1), &Inputs::simple(0)).map(|r| r.target),
            Err(RouteError::PortMismatch { .. })
        ));
        let mut down = snap(vec![]);
        down.services[0].backends[0].healthy_endpoints = 0;
        assert!(matches!(
            route(&down, &name("echo.demo.svc.clusterset.local"), None, &Inputs::simple(0)).map(|r| r.target),
            Err(RouteError::NoEndpoints { .. })
        ));
    }

    /// west (local, with an endpoint), east and north (remote, healthy),
    /// and a policy: x-canary pins to north; else 80/20 east/west, then north.
    fn policy_snap(threshold: f64) -> ConfigSnapshot {
        use isthmus_proto::{PolicyRoute, TrafficPolicy, WeightedCluster};
        let mut s = snap(vec!["127.0.2.10:1".into()]);
        s.services[0].backends.push(Backend {
            cluster: "north".into(),
            addresses: vec![],
            identities: vec![],
            healthy_endpoints: 2,
        });
        let w = |c: &str, weight| WeightedCluster {
            cluster: c.into(),
            weight,
        };
        s.services[0].policy = Some(TrafficPolicy {
            namespace: "demo".into(),
            service: "echo".into(),
            failover_threshold: threshold,
            retry_budget_percent: 20,
            retry_budget_min_per_second: 10,
            requests: None,
            routes: vec![
                PolicyRoute {
                    headers: [("x-canary".to_string(), "true".to_string())].into(),
                    split: vec![w("north", 1)],
                    failover: vec![],
                    requests: None,
                },
                PolicyRoute {
                    headers: Default::default(),
                    split: vec![w("east", 80), w("west", 20)],
                    failover: vec!["north".into()],
                    requests: None,
                },
            ],
        });
        s
    }

    fn share_of(
        s: &ConfigSnapshot,
        headers: Option<&http::HeaderMap>,
        avoid: &dyn Fn(&str) -> bool,
    ) -> HashMap<String, u32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = HashMap::new();
        for _ in 0..10_000 {
            let inp = Inputs {
                headers,
                avoid,
                failover: None,
                now: Instant::now(),
                random: rng.random(),
            };
            let r = route(s, &name("echo.demo.svc.clusterset.local"), None, &inp).unwrap();
            *seen.entry(r.target.cluster).or_default() += 1;
        }
        seen
    }

    #[test]
    fn a_split_holds_within_two_points_over_ten_thousand_requests() {
        let seen = share_of(&policy_snap(0.5), None, &|_| false);
        let east = f64::from(seen["east"]) / 100.0;
        assert!((east - 80.0).abs() <= 2.0, "east got {east}%: {seen:?}");
        assert_eq!(seen["east"] + seen["west"], 10_000);
    }

    #[test]
    fn a_header_match_pins_the_request() {
        let mut h = http::HeaderMap::new();
        h.insert("x-canary", "true".parse().unwrap());
        assert_eq!(share_of(&policy_snap(0.5), Some(&h), &|_| false)["north"], 10_000);
        h.insert("x-canary", "false".parse().unwrap());
        assert!(!share_of(&policy_snap(0.5), Some(&h), &|_| false).contains_key("north"));
    }

    #[test]
    fn an_unhealthy_cluster_in_the_split_gives_its_share_to_the_rest_or_fails_over() {
        // East down: the split level keeps 20% of its weight healthy.
        let seen = share_of(&policy_snap(0.2), None, &|c| c == "east");
        assert_eq!(seen.get("west"), Some(&10_000), "{seen:?}");
        // Below the threshold, the level is left for north.
        let seen = share_of(&policy_snap(0.5), None, &|c| c == "east");
        assert_eq!(seen.get("north"), Some(&10_000), "{seen:?}");
    }

    #[test]
    fn failover_is_at_once_and_failback_waits_for_the_hold() {
        let mut st = LevelState::default();
        let t0 = Instant::now();
        assert_eq!(choose_level(&[1.0, 1.0], 0.5, &mut st, t0), Some((0, None)));
        assert_eq!(
            choose_level(&[0.0, 1.0], 0.5, &mut st, t0),
            Some((1, Some(LevelMove::Failover)))
        );
        // Level 0 is back: traffic stays until it has held for FAILBACK_HOLD.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(choose_level(&[1.0, 1.0], 0.5, &mut st, t1), Some((1, None)));
        // It flaps: the hold starts over.
        assert_eq!(
            choose_level(&[0.0, 1.0], 0.5, &mut st, t1 + Duration::from_secs(1)),
            Some((1, None))
        );
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(choose_level(&[1.0, 1.0], 0.5, &mut st, t2), Some((1, None)));
        assert_eq!(
            choose_level(&[1.0, 1.0], 0.5, &mut st, t2 + FAILBACK_HOLD),
            Some((0, Some(LevelMove::Failback)))
        );
        // Nothing healthy anywhere: no level.
        assert_eq!(choose_level(&[0.0, 0.0], 0.5, &mut st, t2), None);
        // The current level dies while a better one is recovering: go now.
        let mut st = LevelState {
            level: 1,
            recovering_since: None,
        };
        assert_eq!(
            choose_level(&[1.0, 0.0], 0.5, &mut st, t0),
            Some((0, Some(LevelMove::Failback)))
        );
    }
}
