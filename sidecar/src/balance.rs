//! Choosing among a service's local endpoints, and how many retries to
//! allow (sans-IO: the caller passes the time and the random numbers).
//!
//! - Power of two choices: pick two endpoints at random, send to the one
//!   with the lower cost, where cost is a peak-EWMA of its latency times
//!   (requests in flight + 1). Cheap, and it steers away from a slow or
//!   overloaded endpoint without the herding of "always the fastest".
//! - Outlier ejection: an endpoint that fails `ENDPOINT_EJECT_AFTER` times in a row
//!   is left out for a while (doubling on repeat), but never more than half
//!   of a service's endpoints at once.
//! - A retry budget: retries may add at most a fifth to the requests sent,
//!   plus a small floor per second, so retries cannot multiply load
//!   on a service that is already failing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How fast the latency estimate forgets (time constant).
const DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint with no history, so a new endpoint gets
/// tried rather than avoided.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
pub const ENDPOINT_EJECT_AFTER: u32 = 5;
const BASE_EJECTION: Duration = Duration::from_secs(10);
const MAX_EJECTION: Duration = Duration::from_secs(300);
const MAX_EJECTED_PERCENT: usize = 50;

#[derive(Clone, Debug)]
struct Stats {
    ewma_ns: f64,
    stamp: Instant,
    pending: u32,
    failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Stats {
    fn new(now: Instant) -> Self {
        Self {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
            pending: 0,
            failures: 0,
            ejected_until: None,
            ejections: 0,
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Latency estimate decayed by the time since the last sample, times
    /// requests in flight + 1. Decaying here (not only on a sample) lets an
    /// endpoint that looked slow once, and so got no traffic since, be tried
    /// again after a while instead of never.
    fn cost(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.ewma_ns * (-idle / DECAY.as_secs_f64()).exp() * f64::from(self.pending + 1)
    }
}

/// The endpoints of one service, as this sidecar has seen them answer.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: HashMap<String, Stats>,
    /// How many endpoints the service has now (for the ejection limit;
    /// `stats` holds only those that have been tried).
    endpoints: usize,
}

impl Balancer {
    /// Forget endpoints that are no longer among `addrs`; returns them, so
    /// their pooled sessions can be dropped too.
    pub fn retain(&mut self, addrs: &[String]) -> Vec<String> {
        self.endpoints = addrs.len();
        let gone: Vec<String> = self.stats.keys().filter(|a| !addrs.contains(a)).cloned().collect();
        for a in &gone {
            self.stats.remove(a);
        }
        gone
    }

    /// Pick an endpoint of `addrs`; `rand(n)` must return a number below n.
    pub fn pick<'a>(
        &mut self,
        addrs: &'a [String],
        now: Instant,
        mut rand: impl FnMut(usize) -> usize,
    ) -> Option<&'a str> {
        let live: Vec<&String> = addrs.iter().filter(|a| !self.is_ejected(a, now)).collect();
        // If every endpoint is ejected, ejection has nothing better to offer.
        let pool: Vec<&String> = if live.is_empty() { addrs.iter().collect() } else { live };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].as_str()),
            n => {
                let i = rand(n);
                let mut j = rand(n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (pool[i], pool[j]);
                Some(if self.cost_of(a, now) <= self.cost_of(b, now) {
                    a
                } else {
                    b
                })
            }
        }
    }

    /// A request to `addr` starts.
    pub fn start(&mut self, addr: &str, now: Instant) {
        self.entry(addr, now).pending += 1;
    }

    /// A request to `addr` ended after `rtt`; `ok` if it got an answer that
    /// was not a server error. True if this ejected the endpoint.
    pub fn finish(&mut self, addr: &str, rtt: Duration, ok: bool, now: Instant) -> bool {
        let total = self.endpoints.max(self.stats.len()).max(1);
        let ejected = self.stats.values().filter(|s| s.ejected(now)).count();
        let s = self.entry(addr, now);
        s.pending = s.pending.saturating_sub(1);
        if !ok {
            // A quick failure says nothing about how fast the endpoint
            // serves and must not make it look like the fastest one; a slow
            // one (a timeout) does say it is slow.
            let sample = rtt.as_nanos() as f64;
            if sample > s.ewma_ns {
                s.ewma_ns = sample;
                s.stamp = now;
            }
            s.failures += 1;
            if s.failures >= ENDPOINT_EJECT_AFTER
                && !s.ejected(now)
                && (ejected + 1) * 100 <= total * MAX_EJECTED_PERCENT
            {
                let time = BASE_EJECTION.saturating_mul(1 << s.ejections.min(8)).min(MAX_EJECTION);
                s.ejected_until = Some(now + time);
                s.ejections += 1;
                s.failures = 0;
                tracing::warn!(endpoint = %addr, secs = time.as_secs(), "endpoint ejected after consecutive failures");
                return true;
            }
            return false;
        }
        s.failures = 0;
        // Peak EWMA: a slower answer counts at once, a faster one decays in.
        let elapsed = now.saturating_duration_since(s.stamp).as_secs_f64();
        let w = (-elapsed / DECAY.as_secs_f64()).exp();
        let sample = rtt.as_nanos() as f64;
        s.ewma_ns = if sample > s.ewma_ns {
            sample
        } else {
            s.ewma_ns * w + sample * (1.0 - w)
        };
        s.stamp = now;
        false
    }

    pub fn is_ejected(&self, addr: &str, now: Instant) -> bool {
        self.stats.get(addr).is_some_and(|s| s.ejected(now))
    }

    fn cost_of(&self, addr: &str, now: Instant) -> f64 {
        self.stats
            .get(addr)
            .map_or_else(|| Stats::new(now).cost(now), |s| s.cost(now))
    }

    fn entry(&mut self, addr: &str, now: Instant) -> &mut Stats {
        // No allocation on the common path, where the endpoint is known.
        if !self.stats.contains_key(addr) {
            self.stats.insert(addr.to_string(), Stats::new(now));
        }
        self.stats.get_mut(addr).expect("just inserted")
    }
}

/// Retry tokens are counted in thousandths, so that a fifth of a token per
/// request adds up exactly.
const MILLI: u64 = 1000;
/// Share of requests that may be retried, in thousandths, on top of the floor.
const RETRY_RATIO_MILLI: u64 = 200;
const RETRY_FLOOR_PER_SEC: u64 = 10;
const RETRY_CAP: u64 = 100;

/// A token bucket: each request deposits a share of a retry (a fifth by
/// default), time deposits the floor, each retry withdraws one.
#[derive(Debug)]
pub struct RetryBudget {
    balance_milli: u64,
    stamp: Instant,
    ratio_milli: u64,
    floor_per_sec: u64,
}

impl RetryBudget {
    pub fn new(now: Instant) -> Self {
        Self::with(now, RETRY_RATIO_MILLI / 10, RETRY_FLOOR_PER_SEC)
    }

    /// `percent` of requests may be retried, plus `floor_per_sec` retries a
    /// second (a TrafficPolicy's retryBudget).
    pub fn with(now: Instant, percent: u64, floor_per_sec: u64) -> Self {
        Self {
            balance_milli: floor_per_sec.min(RETRY_CAP) * MILLI,
            stamp: now,
            ratio_milli: percent * 10,
            floor_per_sec,
        }
    }

    /// (percent, floor per second).
    pub fn params(&self) -> (u64, u64) {
        (self.ratio_milli / 10, self.floor_per_sec)
    }

    fn refill(&mut self, now: Instant, extra_milli: u64) {
        // The floor accrues per whole millisecond; the rest waits.
        let elapsed_ms = now.saturating_duration_since(self.stamp).as_millis() as u64;
        self.stamp += Duration::from_millis(elapsed_ms);
        let floor = elapsed_ms.saturating_mul(self.floor_per_sec);
        self.balance_milli = (self.balance_milli + floor + extra_milli).min(RETRY_CAP * MILLI);
    }

    /// A request was sent (not a retry).
    pub fn deposit(&mut self, now: Instant) {
        self.refill(now, self.ratio_milli);
    }

    /// May one retry be sent now? Takes it from the budget if so.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.refill(now, 0);
        if self.balance_milli >= MILLI {
            self.balance_milli -= MILLI;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:15006")).collect()
    }

    /// A deterministic "random" source cycling through its values.
    fn seq(values: &[usize]) -> impl FnMut(usize) -> usize + '_ {
        let mut i = 0;
        move |n| {
            let v = values[i % values.len()] % n;
            i += 1;
            v
        }
    }

    #[test]
    fn p2c_prefers_the_faster_and_the_less_loaded() {
        let t0 = Instant::now();
        let a = addrs(2);
        let mut b = Balancer::default();
        for _ in 0..5 {
            b.start(&a[0], t0);
            b.finish(&a[0], Duration::from_millis(20), true, t0);
            b.start(&a[1], t0);
            b.finish(&a[1], Duration::from_millis(2), true, t0);
        }
        for _ in 0..10 {
            assert_eq!(b.pick(&a, t0, |n| rand::random_range(0..n)), Some(a[1].as_str()));
        }
        // Requests in flight make the fast one cost more than the slow one.
        for _ in 0..20 {
            b.start(&a[1], t0);
        }
        assert_eq!(b.pick(&a, t0, seq(&[0, 0])), Some(a[0].as_str()));
    }

    #[test]
    fn latency_estimate_rises_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let a = addrs(2);
        let mut b = Balancer::default();
        b.start(&a[0], t0);
        b.finish(&a[0], Duration::from_millis(50), true, t0);
        b.start(&a[1], t0);
        b.finish(&a[1], Duration::from_millis(10), true, t0);
        // One fast answer long after does not make a[0] look fast at once...
        let t1 = t0 + Duration::from_secs(1);
        b.start(&a[0], t1);
        b.finish(&a[0], Duration::from_millis(1), true, t1);
        assert_eq!(b.pick(&a, t1, seq(&[0, 0])), Some(a[1].as_str()));
        // ...but a long quiet spell lets it decay towards the new samples.
        let t2 = t0 + Duration::from_secs(60);
        for (addr, ms) in [(&a[0], 1), (&a[1], 10)] {
            b.start(addr, t2);
            b.finish(addr, Duration::from_millis(ms), true, t2);
        }
        assert_eq!(b.pick(&a, t2, seq(&[0, 0])), Some(a[0].as_str()));
    }

    #[test]
    fn an_endpoint_that_looked_slow_once_is_tried_again() {
        let t0 = Instant::now();
        let a = addrs(2);
        let mut b = Balancer::default();
        b.start(&a[0], t0);
        b.finish(&a[0], Duration::from_secs(1), true, t0);
        let mut picked_slow = None;
        // The fast one keeps serving (and keeps its estimate fresh) while
        // the slow one's estimate decays, until it is worth a try again.
        for s in 0..120 {
            let now = t0 + Duration::from_secs(s);
            let p = b.pick(&a, now, seq(&[0, 0])).unwrap().to_string();
            if p == a[0] {
                picked_slow = Some(s);
                break;
            }
            b.start(&p, now);
            b.finish(&p, Duration::from_millis(2), true, now);
        }
        let s = picked_slow.expect("the slow endpoint is never tried again");
        assert!((40..100).contains(&s), "tried again after {s}s");
    }

    #[test]
    fn consecutive_failures_eject_at_most_half() {
        let t0 = Instant::now();
        let a = addrs(4);
        let mut b = Balancer::default();
        for addr in &a {
            b.start(addr, t0);
            b.finish(addr, Duration::from_millis(1), true, t0);
        }
        let fail = |b: &mut Balancer, addr: &str, n: u32, now: Instant| {
            for _ in 0..n {
                b.start(addr, now);
                b.finish(addr, Duration::from_millis(1), false, now);
            }
        };
        fail(&mut b, &a[0], ENDPOINT_EJECT_AFTER - 1, t0);
        assert!(!b.is_ejected(&a[0], t0), "fewer failures in a row do not eject");
        fail(&mut b, &a[0], 1, t0);
        assert!(b.is_ejected(&a[0], t0));
        for _ in 0..50 {
            assert_ne!(b.pick(&a, t0, |n| rand::random_range(0..n)), Some(a[0].as_str()));
        }
        fail(&mut b, &a[1], ENDPOINT_EJECT_AFTER, t0);
        fail(&mut b, &a[2], ENDPOINT_EJECT_AFTER, t0);
        assert!(b.is_ejected(&a[1], t0));
        assert!(!b.is_ejected(&a[2], t0), "never more than half ejected");
        // Ejection ends, and a repeat offender stays out twice as long.
        let later = t0 + BASE_EJECTION;
        assert!(!b.is_ejected(&a[0], later));
        fail(&mut b, &a[0], ENDPOINT_EJECT_AFTER, later);
        assert!(b.is_ejected(&a[0], later + BASE_EJECTION + Duration::from_secs(1)));
        assert!(!b.is_ejected(&a[0], later + 2 * BASE_EJECTION));
    }

    /// The ejection limit counts the service's endpoints, not only those
    /// tried so far: a fast-failing endpoint that P2C kept choosing over an
    /// untried healthy one was never ejected.
    #[test]
    fn ejection_counts_endpoints_not_yet_tried() {
        let t0 = Instant::now();
        let a = addrs(2);
        let mut b = Balancer::default();
        assert!(b.retain(&a).is_empty());
        for _ in 0..ENDPOINT_EJECT_AFTER {
            let p = b.pick(&a, t0, seq(&[0, 0])).unwrap().to_string();
            assert_eq!(p, a[0], "its quick failures keep it looking as fast as the untried one");
            b.start(&p, t0);
            b.finish(&p, Duration::from_micros(100), false, t0);
        }
        assert!(b.is_ejected(&a[0], t0));
        assert_eq!(b.pick(&a, t0, seq(&[0, 0])), Some(a[1].as_str()));
    }

    #[test]
    fn a_single_endpoint_is_never_ejected_away() {
        let t0 = Instant::now();
        let a = addrs(1);
        let mut b = Balancer::default();
        for _ in 0..20 {
            b.start(&a[0], t0);
            b.finish(&a[0], Duration::from_millis(1), false, t0);
        }
        assert_eq!(b.pick(&a, t0, seq(&[0])), Some(a[0].as_str()));
        assert_eq!(b.pick(&[], t0, seq(&[0])), None);
    }

    #[test]
    fn retry_budget_allows_a_fifth_plus_a_floor() {
        let t0 = Instant::now();
        let mut r = RetryBudget::new(t0);
        // The floor: 10 retries at once with no traffic...
        let floor = (0..100).filter(|_| r.withdraw(t0)).count();
        assert_eq!(floor, 10);
        // ...then 20% of the requests sent.
        for _ in 0..100 {
            r.deposit(t0);
        }
        assert_eq!((0..100).filter(|_| r.withdraw(t0)).count(), 20);
        // And the floor comes back with time.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| r.withdraw(t1)).count(), 10);
    }

    #[test]
    fn a_policy_sets_the_share_and_the_floor() {
        let t0 = Instant::now();
        let mut r = RetryBudget::with(t0, 50, 0);
        assert!(!r.withdraw(t0), "no floor");
        for _ in 0..10 {
            r.deposit(t0);
        }
        assert_eq!((0..100).filter(|_| r.withdraw(t0)).count(), 5);
        let mut none = RetryBudget::with(t0, 0, 0);
        none.deposit(t0);
        assert!(
            !none.withdraw(t0 + Duration::from_secs(5)),
            "a zero budget never retries"
        );
        assert_eq!(none.params(), (0, 0));
    }
}
