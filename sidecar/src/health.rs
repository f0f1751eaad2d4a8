//! Health of each (service, cluster) pair as this sidecar sees it: passive
//! outlier detection takes a pair out after failures in a row, and active
//! probes (see `crate::probe_ejected`) bring it back. Pure: the caller says
//! what happened.
//!
//! Per service, so one bad service never takes a whole cluster or gateway
//! out for the others.

use std::collections::HashMap;

use isthmus_core::naming::ServiceKey;

/// Answers of 502/503/504 in a row that eject a (service, cluster) pair.
/// (Local endpoints have their own, `balance::ENDPOINT_EJECT_AFTER`.) A request that could
/// not be delivered there at all ejects it at once: it has just gone to
/// another cluster, and only a probe's success is evidence that the pair
/// can take traffic again (else traffic would fail back to it blindly).
pub const CLUSTER_EJECT_AFTER: u32 = 3;

/// How a request (or probe) to a pair went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Answered 502, 503 or 504.
    Failed,
    /// Not delivered: the endpoint, its app, the gateway or the tunnel
    /// failed, or the session died before an answer.
    Unreached,
}

#[derive(Default)]
pub struct ClusterHealth {
    /// Only pairs that have failed lately: all-healthy is an empty map, so
    /// the per-request check builds no keys.
    pairs: HashMap<(ServiceKey, String), Pair>,
}

#[derive(Default)]
struct Pair {
    failures: u32,
    ejected: bool,
}

/// What an outcome changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Ejected,
    Restored,
}

impl ClusterHealth {
    pub fn is_ejected(&self, service: &ServiceKey, cluster: &str) -> bool {
        if self.pairs.is_empty() {
            return false;
        }
        self.pairs
            .get(&(service.clone(), cluster.to_string()))
            .is_some_and(|p| p.ejected)
    }

    /// Learn from a request (or, for an ejected pair, a probe): a success
    /// clears the pair; one undelivered request, or `EJECT_AFTER` failed
    /// answers in a row, eject it until a success.
    pub fn outcome(&mut self, service: &ServiceKey, cluster: &str, outcome: Outcome) -> Option<Change> {
        if outcome == Outcome::Ok && self.pairs.is_empty() {
            return None;
        }
        let key = (service.clone(), cluster.to_string());
        if outcome == Outcome::Ok {
            return self.pairs.remove(&key).filter(|p| p.ejected).map(|_| Change::Restored);
        }
        let p = self.pairs.entry(key).or_default();
        if p.ejected {
            return None;
        }
        p.failures += 1;
        if p.failures >= CLUSTER_EJECT_AFTER || outcome == Outcome::Unreached {
            p.ejected = true;
            return Some(Change::Ejected);
        }
        None
    }

    /// The ejected pairs, (service, cluster): what the prober checks.
    pub fn ejected(&self) -> Vec<(ServiceKey, String)> {
        self.pairs
            .iter()
            .filter(|(_, p)| p.ejected)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_failures_in_a_row_until_a_success() {
        let mut h = ClusterHealth::default();
        let echo = ServiceKey::new("demo", "echo");
        let store = ServiceKey::new("demo", "store");
        assert!(!h.is_ejected(&echo, "east"));
        assert_eq!(h.outcome(&echo, "east", Outcome::Failed), None);
        assert_eq!(h.outcome(&echo, "east", Outcome::Failed), None);
        // A success in between starts the count again.
        assert_eq!(h.outcome(&echo, "east", Outcome::Ok), None);
        assert!(h.pairs.is_empty(), "healthy pairs are not kept");
        for _ in 1..CLUSTER_EJECT_AFTER {
            assert_eq!(h.outcome(&echo, "east", Outcome::Failed), None);
        }
        assert_eq!(h.outcome(&echo, "east", Outcome::Failed), Some(Change::Ejected));
        assert!(h.is_ejected(&echo, "east"));
        // More failures (probes) change nothing; other pairs are untouched.
        assert_eq!(h.outcome(&echo, "east", Outcome::Failed), None);
        assert!(!h.is_ejected(&echo, "north"));
        assert!(!h.is_ejected(&store, "east"));
        assert_eq!(h.ejected(), vec![(echo.clone(), "east".to_string())]);
        assert_eq!(h.outcome(&echo, "east", Outcome::Ok), Some(Change::Restored));
        assert!(!h.is_ejected(&echo, "east"));
        assert!(h.ejected().is_empty());
        // Undelivered: out at once.
        assert_eq!(h.outcome(&echo, "north", Outcome::Unreached), Some(Change::Ejected));
        assert!(h.is_ejected(&echo, "north"));
    }
}
