//! Services a sidecar learns as they are first called: it subscribes to a
//! service on the first DNS lookup, HTTP Host or redirected connection to an
//! unknown ClusterSet IP, and holds nothing of services it never calls.
//! In transparent mode each learned service gets a virtual IP.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use isthmus_core::naming::{ServiceKey, ServiceName};
use tokio_util::sync::CancellationToken;

use crate::{Sidecar, config, dns, vip};

/// This concern's state, owned by the `Sidecar`.
#[derive(Default)]
pub(crate) struct Learned {
    /// Transparent mode: each known service's virtual IP.
    pub(crate) vips: arc_swap::ArcSwap<vip::Vips>,
    /// Service ports `ports::follow` has tried to listen on (open or not).
    pub(crate) ports_tried: tokio::sync::watch::Sender<BTreeSet<u16>>,
    /// Addresses the controller said are no ClusterSet IP, and when.
    ip_misses: Mutex<HashMap<IpAddr, Instant>>,
}

/// Keep the virtual IPs in step with the known services.
pub(crate) async fn follow_vips(sc: Arc<Sidecar>, stop: CancellationToken) {
    let mut rx = sc.agent.config.clone();
    loop {
        rx.borrow_and_update();
        sc.refresh_vips();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// What the sidecar's DNS answers with.
pub(crate) struct Names {
    pub(crate) sc: Arc<Sidecar>,
    /// The outbound address, where the service ports listen.
    pub(crate) ip: IpAddr,
}

impl dns::Names for Names {
    fn prepare<'a>(&'a self, name: &'a ServiceName) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = name.key();
            self.sc.learn(&key).await;
            if self.sc.cfg.transparent {
                self.sc.refresh_vips();
                return;
            }
            // The answer is only good once the port listens.
            let Some(port) = self.sc.port_of(&key) else { return };
            let mut tried = self.sc.learned.ports_tried.subscribe();
            let _ = tokio::time::timeout(config::PORT_WAIT, tried.wait_for(|t| t.contains(&port))).await;
        })
    }

    fn resolve(&self, name: &ServiceName) -> Option<IpAddr> {
        self.sc.resolve(name, self.ip)
    }
}

impl Sidecar {
    /// Whether this sidecar holds `key`'s service now.
    fn knows(&self, key: &ServiceKey) -> bool {
        self.port_of(key).is_some()
    }

    fn port_of(&self, key: &ServiceKey) -> Option<u16> {
        let snap = self.agent.config.borrow();
        isthmus_core::delta::find(&snap, &key.namespace, &key.name).and_then(|s| u16::try_from(s.port).ok())
    }

    /// Before the first call to a service: subscribe to it and wait (up to
    /// `LEARN_WAIT`) for the controller's answer. Afterwards, free.
    pub(crate) async fn learn(&self, key: &ServiceKey) {
        if !self.knows(key) && !self.agent.ensure(&key.to_string(), config::LEARN_WAIT).await {
            tracing::warn!(service = %key, "the controller did not answer for this service in time");
        }
    }

    /// Give every held service a virtual IP, keeping those already given.
    fn refresh_vips(&self) {
        let keys: Vec<ServiceKey> = self
            .agent
            .config
            .borrow()
            .services
            .iter()
            .map(|s| ServiceKey::new(&s.namespace, &s.name))
            .collect();
        self.learned.vips.rcu(|v| Arc::new(v.extended(&keys)));
    }

    /// The address DNS gives a service name: its virtual IP in transparent
    /// mode, else the outbound address (`ip`), where it listens on every
    /// service port; `None` for a service nobody serves or exports.
    fn resolve(&self, name: &ServiceName, ip: IpAddr) -> Option<IpAddr> {
        if !self.knows(&name.key()) {
            return None;
        }
        if self.cfg.transparent {
            return self.learned.vips.load().ip_of(&name.key()).map(IpAddr::V4);
        }
        Some(ip)
    }

    /// The service a redirected connection to `ip` is for: a virtual IP,
    /// or a ClusterSet IP of a service the controller told of.
    fn service_at(&self, ip: IpAddr) -> Option<ServiceName> {
        let key = self.learned.vips.load().service_at(ip).cloned().or_else(|| {
            let text = ip.to_string();
            self.agent
                .config
                .borrow()
                .services
                .iter()
                .find(|s| s.clusterset_ips.contains(&text))
                .map(|s| ServiceKey::new(&s.namespace, &s.name))
        })?;
        Some(ServiceName {
            cluster: None,
            namespace: key.namespace,
            name: key.name,
        })
    }

    /// `service_at`, asking the controller about an address not held yet
    /// (a ClusterSet IP dialled without a DNS lookup through this
    /// sidecar); an address it says is none is not asked about again for
    /// `IP_MISS_TTL`.
    pub(crate) async fn service_at_learning(&self, ip: IpAddr) -> Option<ServiceName> {
        if let Some(name) = self.service_at(ip) {
            return Some(name);
        }
        let now = Instant::now();
        {
            let mut misses = self.learned.ip_misses.lock().expect("ip misses lock");
            if misses
                .get(&ip)
                .is_some_and(|t| now.duration_since(*t) < config::IP_MISS_TTL)
            {
                return None;
            }
            if misses.len() >= 4096 {
                misses.clear();
            }
        }
        self.agent.ensure(&format!("ip:{ip}"), config::LEARN_WAIT).await;
        let found = self.service_at(ip);
        if found.is_none() {
            self.learned.ip_misses.lock().expect("ip misses lock").insert(ip, now);
        }
        found
    }
}
