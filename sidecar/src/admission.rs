//! What a sidecar lets through, and where a request to a local service goes:
//! connection limits per direction, request limits per service, retry
//! budgets, and the choice of a local endpoint. Each keeps its own state
//! behind its own lock; the rules themselves are in `balance.rs` (sans-IO).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use isthmus_core::naming::ServiceKey;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::{Balancer, RetryBudget};
use crate::metrics::{Direction, Metrics, ServiceLabels};
use crate::route::{Destination, Target};

/// Connection slots per direction and requests in flight per service.
pub(crate) struct Limits {
    outbound: Arc<Semaphore>,
    inbound: Arc<Semaphore>,
    max_connections: usize,
    max_requests_per_service: usize,
    /// Outbound requests in flight, per destination service.
    in_flight: Mutex<HashMap<ServiceKey, usize>>,
}

impl Limits {
    pub fn new(max_connections: usize, max_requests_per_service: usize) -> Self {
        Self {
            outbound: Arc::new(Semaphore::new(max_connections)),
            inbound: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            max_requests_per_service,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// A connection slot in `direction`, or `None` (the connection is
    /// closed, and counted) when all are taken.
    pub fn admit(&self, direction: Direction, metrics: &Metrics) -> Option<OwnedSemaphorePermit> {
        let slots = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let slot = slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            tracing::warn!(
                direction = direction.as_str(),
                limit = self.max_connections,
                "connection limit reached; closing a new connection"
            );
            metrics.rejected(direction, "connection-limit");
        }
        slot
    }

    /// Count a request in flight to `service`, unless it already has
    /// `max_requests_per_service`: then it is refused at once (`None`), so
    /// a slow service cannot pile up every client of this workload.
    pub fn reserve(&self, service: &ServiceKey, metrics: &Metrics) -> Option<InFlightSlot<'_>> {
        let mut all = self.in_flight.lock().expect("in-flight lock");
        let n = all.entry(service.clone()).or_default();
        if *n >= self.max_requests_per_service {
            drop(all);
            metrics.rejected(Direction::Outbound, "request-limit");
            return None;
        }
        *n += 1;
        Some(InFlightSlot {
            limits: self,
            service: service.clone(),
        })
    }

    pub fn max_requests_per_service(&self) -> usize {
        self.max_requests_per_service
    }
}

/// An outbound request counted in flight to its service until dropped.
pub(crate) struct InFlightSlot<'a> {
    limits: &'a Limits,
    service: ServiceKey,
}

impl Drop for InFlightSlot<'_> {
    fn drop(&mut self) {
        let mut all = self.limits.in_flight.lock().expect("in-flight lock");
        if let Some(n) = all.get_mut(&self.service) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.service);
            }
        }
    }
}

/// Retry budgets: one shared by services without a TrafficPolicy, and one
/// per service whose policy sets its own terms.
pub(crate) struct Budgets {
    shared: Mutex<RetryBudget>,
    per_service: Mutex<HashMap<ServiceKey, RetryBudget>>,
}

impl Budgets {
    pub fn new(now: Instant) -> Self {
        Self {
            shared: Mutex::new(RetryBudget::new(now)),
            per_service: Mutex::new(HashMap::new()),
        }
    }

    /// Use the retry budget of `service`, whose policy's terms `target`
    /// carries: the policy's own budget, else the shared one.
    pub fn with<R>(&self, service: &ServiceKey, target: &Target, f: impl FnOnce(&mut RetryBudget) -> R) -> R {
        let Some((percent, floor)) = target.retry_budget else {
            return f(&mut self.shared.lock().expect("budget lock"));
        };
        let params = (u64::from(percent), u64::from(floor));
        let fresh = || RetryBudget::with(Instant::now(), params.0, params.1);
        let mut all = self.per_service.lock().expect("budgets lock");
        // Looked up by reference: no key is built per request once it exists.
        if !all.contains_key(service) {
            all.insert(service.clone(), fresh());
        }
        let b = all.get_mut(service).expect("inserted");
        if b.params() != params {
            // The policy changed: a new budget with the new terms.
            *b = fresh();
        }
        f(b)
    }

    /// A request to `service` is sent: it adds to what may be retried.
    pub fn deposit(&self, service: &ServiceKey, target: &Target) {
        self.with(service, target, |b| b.deposit(Instant::now()))
    }

    /// May one more attempt go? Takes from the budget if so.
    pub fn withdraw(&self, service: &ServiceKey, target: &Target) -> bool {
        self.with(service, target, |b| b.withdraw(Instant::now()))
    }
}

/// The endpoint choice for each local service, with what each endpoint's
/// answers taught the balancer.
#[derive(Default)]
pub(crate) struct Endpoints {
    balancers: Mutex<HashMap<Destination, Balancer>>,
}

impl Endpoints {
    /// Choose a local endpoint of `target` other than `failed`, and count
    /// the request in flight there. Endpoints that left the service (not
    /// among `endpoints`) are forgotten and returned in `gone`, so their
    /// pooled sessions can go too.
    pub fn choose<'a>(
        &'a self,
        metrics: &'a Metrics,
        target: &Target,
        endpoints: &[String],
        failed: &[String],
        gone: &mut Vec<String>,
    ) -> Option<InFlight<'a>> {
        let now = Instant::now();
        let service = target.destination();
        // Usually nothing has failed yet: no copy of the endpoint list then.
        let candidates: std::borrow::Cow<'_, [String]> = if failed.is_empty() {
            endpoints.into()
        } else {
            endpoints
                .iter()
                .filter(|e| !failed.contains(e))
                .cloned()
                .collect::<Vec<_>>()
                .into()
        };
        let addr = {
            let mut all = self.balancers.lock().expect("balancers lock");
            let b = all.entry(service.clone()).or_default();
            gone.extend(b.retain(endpoints));
            let addr = b
                .pick(&candidates, now, |n| rand::random_range(0..n))
                .map(str::to_string);
            if let Some(a) = &addr {
                b.start(a, now);
            }
            addr
        };
        Some(InFlight {
            endpoints: self,
            metrics,
            service,
            addr: addr?,
            start: now,
            ok: false,
        })
    }
}

/// A request in flight to a local endpoint. It reports to the balancer when
/// dropped, so a request that never got an answer (timed out, or its caller
/// went away) counts as a failure and no longer as in flight.
pub(crate) struct InFlight<'a> {
    endpoints: &'a Endpoints,
    metrics: &'a Metrics,
    service: Destination,
    pub addr: String,
    start: Instant,
    /// Set once the endpoint gave an answer that was not a server error.
    pub ok: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let ejected = {
            let mut all = self.endpoints.balancers.lock().expect("balancers lock");
            all.get_mut(&self.service)
                .is_some_and(|b| b.finish(&self.addr, self.start.elapsed(), self.ok, Instant::now()))
        };
        if ejected {
            let label = ServiceLabels {
                destination_service: ServiceKey::new(&self.service.namespace, &self.service.service).to_string(),
            };
            self.metrics.ejections.get_or_create(&label).inc();
        }
    }
}
