//! The Control service: what sidecars and the gateway ask of their
//! controller (SVIDs by CSR, and a config stream that registers them).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use isthmus_core::identity::{self, SpiffeId};
use isthmus_core::naming::ServiceKey;
use isthmus_proto::admin_server::AdminServer;
use isthmus_proto::control_server::{Control, ControlServer};
use isthmus_proto::{
    CertificateRequest, CertificateResponse, ConfigSnapshot, Service, WatchRequest, WatchScope, watch_request,
};
use prost::Message;
use std::collections::HashSet;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth;
use crate::publish::{self, Published, Watcher};
use crate::shared::{Shared, Svc};

/// Serve Control and Admin on the control port until shutdown.
pub(crate) async fn serve_control(shared: Arc<Shared>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let svc = Svc(shared.clone());
    let incoming = isthmus_core::grpc::tls_incoming(listener, tls, shared.shutdown.clone());
    let res = tonic::transport::Server::builder()
        .add_service(ControlServer::new(svc.clone()))
        .add_service(AdminServer::new(svc))
        .serve_with_incoming_shutdown(incoming, shared.shutdown.clone().cancelled_owned())
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "control server stopped");
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Control for Svc {
    async fn issue_certificate(
        &self,
        req: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        auth::acting_as(&self.0, &req, &req.get_ref().namespace, &req.get_ref().service_account).await?;
        let r = req.into_inner();
        let id = auth::workload_id(&self.0.cfg.trust_domain, &r.namespace, &r.service_account)?;
        let ca = self.0.ca.load();
        let leaf = ca
            .signer()
            .sign_csr(&r.csr_pem, &id, self.0.cfg.svid_ttl)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let not_after = identity::not_after_of(&leaf).unwrap_or_default();
        self.0.metrics.svids_issued.inc();
        tracing::info!(%id, "issued SVID");
        Ok(Response::new(CertificateResponse {
            cert_chain_pem: format!("{}{}", identity::cert_to_pem(&leaf), ca.signer().chain_pem()),
            spiffe_id: id.to_string(),
            not_after_unix: not_after,
        }))
    }

    type WatchConfigStream = SnapshotStream;

    async fn watch_config(
        &self,
        req: Request<tonic::Streaming<WatchRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        // The first request registers; the request side may close after it.
        let (meta, ext, mut inbound) = req.into_parts();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("registration missing"))?;
        let req = Request::from_parts(meta, ext, first);
        let credential = self.admit(&req).await?;
        let WatchRequest {
            node,
            resume,
            subscribe,
            scope,
            incremental,
        } = req.into_inner();
        let scope = WatchScope::try_from(scope).map_err(|_| Status::invalid_argument("unknown watch scope"))?;
        let node = node.ok_or_else(|| Status::invalid_argument("registration missing"))?;
        let shared = self.0.clone();
        let mut own = None;
        let id = {
            let mut reg = shared.registry.lock().expect("registry lock");
            reg.next_id += 1;
            let id = reg.next_id;
            match node {
                watch_request::Node::Sidecar(mut s) => {
                    // The identity this sidecar serves with is the one the CA
                    // issues for its namespace and service account.
                    s.identity = SpiffeId::new(&shared.cfg.trust_domain, &s.namespace, &s.service_account)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?
                        .to_string();
                    if !s.service.is_empty() {
                        identity::validate_name(&s.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
                        own = Some(ServiceKey::new(&s.namespace, &s.service).to_string());
                    }
                    tracing::info!(service = %ServiceKey::new(&s.namespace, &s.service), addr = %s.inbound_addr, "sidecar registered");
                    reg.add_sidecar(id, s);
                }
                watch_request::Node::Gateway(g) => {
                    tracing::info!(tunnel = %g.tunnel_addr, quic = %g.quic_addr, "gateway registered");
                    reg.gateway = Some((id, g));
                }
            }
            id
        };
        let watcher = shared.hub.add(id, scope);
        // A sidecar holds its own service (whether it is exported).
        shared
            .hub
            .subscribe(id, &watcher, &own.into_iter().chain(subscribe).collect::<Vec<_>>());
        shared.metrics.watchers.set(shared.hub.watchers() as i64);
        let touched = registered_service(&shared, id);
        touched.changed(&shared);
        let registered = *shared.version.borrow();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stream = ConfigStream {
            shared: shared.clone(),
            id,
            watcher: watcher.clone(),
            credential,
            incremental,
        };
        tokio::spawn(async move {
            // A reconnecting component keeps its last config until this
            // controller has heard from the rest (Config::settle): a
            // gateway told now would refuse tunnels to sidecars not yet
            // back, though they still serve.
            if resume && !shared.settled() {
                tokio::select! {
                    _ = tokio::time::sleep_until(shared.settled_at()) => {}
                    _ = tx.closed() => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
            // Later requests subscribe to more services.
            let subscriber = {
                let (shared, watcher) = (shared.clone(), watcher.clone());
                tokio::spawn(async move {
                    while let Ok(Some(r)) = inbound.message().await {
                        shared.hub.subscribe(id, &watcher, &r.subscribe);
                    }
                })
            };
            stream.run(tx, registered).await;
            subscriber.abort();
            // The registration lives as long as the stream.
            shared.hub.remove(id);
            shared.metrics.watchers.set(shared.hub.watchers() as i64);
            let mut reg = shared.registry.lock().expect("registry lock");
            reg.remove(id);
            drop(reg);
            touched.changed(&shared);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a registration changes in the service table.
enum Touched {
    /// A sidecar's service: only it is rebuilt.
    Service(Vec<ServiceKey>),
    /// The gateway: its address is cluster-wide.
    Everything,
}

impl Touched {
    fn changed(&self, shared: &Shared) {
        match self {
            Touched::Service(keys) => shared.changed_services(keys.iter().cloned()),
            Touched::Everything => shared.changed(),
        }
    }
}

fn registered_service(shared: &Shared, id: u64) -> Touched {
    let reg = shared.registry.lock().expect("registry lock");
    match reg.sidecars.get(&id) {
        // A client-only sidecar changes no service.
        Some(s) if s.service.is_empty() => Touched::Service(vec![]),
        Some(s) => Touched::Service(vec![ServiceKey::new(&s.namespace, &s.service)]),
        None => Touched::Everything,
    }
}

/// One config stream: a full snapshot of what is in its scope, then what
/// changed of it, each time the publisher marks it.
struct ConfigStream {
    shared: Arc<Shared>,
    id: u64,
    watcher: Arc<Watcher>,
    credential: Option<String>,
    incremental: bool,
}

impl ConfigStream {
    async fn run(self, tx: tokio::sync::mpsc::Sender<Result<ConfigSnapshot, Status>>, registered: u64) {
        let shared = &self.shared;
        // The first snapshot includes this registration.
        let mut current = shared.hub.current.subscribe();
        let ready = tokio::select! {
            r = current.wait_for(|p| p.source >= registered) => r.map(|p| p.clone()).ok(),
            _ = tx.closed() => None,
            _ = shared.shutdown.cancelled() => None,
        };
        let Some(table) = ready else { return };
        // Keys this stream has sent (to tell it when one leaves its scope).
        let mut sent: HashSet<ServiceKey> = HashSet::new();
        let first = self.take(&table, &mut sent, true);
        // A stream that is not incremental gets every message whole.
        let mut whole = first.clone();
        if !self.send(&tx, first).await {
            return;
        }
        loop {
            tokio::select! {
                _ = self.watcher.wake.notified() => {}
                _ = tx.closed() => return,
                _ = shared.shutdown.cancelled() => return,
            }
            if let Some(c) = &self.credential
                && !shared.state.lock().expect("state lock").workloads.contains_key(c)
            {
                tracing::warn!(credential = %c, "workload credential revoked: its registration ends");
                let _ = tx
                    .send(Err(Status::unauthenticated("the workload credential was revoked")))
                    .await;
                return;
            }
            let table = shared.hub.current.borrow().clone();
            let d = self.take(&table, &mut sent, false);
            if isthmus_core::delta::is_empty(&d) {
                continue;
            }
            let msg = if self.incremental {
                d
            } else {
                isthmus_core::delta::apply(&mut whole, d);
                whole.clone()
            };
            if !self.send(&tx, msg).await {
                return;
            }
        }
    }

    /// What this stream is owed now: everything in its scope (`full`), or
    /// the services marked dirty since it last sent.
    fn take(&self, table: &Published, sent: &mut HashSet<ServiceKey>, full: bool) -> ConfigSnapshot {
        let dirty = self.watcher.take();
        let snap = &table.cluster;
        let scope = self.watcher.scope;
        let wanted = |key: &ServiceKey, s: &Service| match scope {
            WatchScope::Subscribed => self.watcher.holds(key),
            _ => publish::in_scope(scope, s),
        };
        let mut services = Vec::new();
        let mut removed = Vec::new();
        let hub = &self.shared.hub;
        if full {
            let all = hub.table.read().expect("table lock");
            let mut add = |key: &ServiceKey, s: &Service| {
                if wanted(key, s) {
                    services.push(s.clone());
                    sent.insert(key.clone());
                }
            };
            match self.watcher.scope {
                // Only what it subscribed to: found by key, not by a walk
                // over every service.
                WatchScope::Subscribed => {
                    for key in self.watcher.subscribed() {
                        if let Some(s) = all.services.get(&key) {
                            add(&key, s);
                        }
                    }
                    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                }
                _ => {
                    for (key, s) in &all.services {
                        add(key, s);
                    }
                }
            }
        } else {
            for key in dirty.keys {
                match hub.service(&key).filter(|s| wanted(&key, s)) {
                    Some(s) => {
                        services.push((*s).clone());
                        sent.insert(key);
                    }
                    None if sent.remove(&key) => removed.push(key.to_string()),
                    None => {}
                }
            }
        }
        let mut msg = isthmus_core::delta::message(snap, full || dirty.cluster, services, removed);
        msg.delta = !full;
        msg.cluster_changed = dirty.cluster && !full;
        msg.answered = dirty.answered;
        msg
    }

    async fn send(&self, tx: &tokio::sync::mpsc::Sender<Result<ConfigSnapshot, Status>>, msg: ConfigSnapshot) -> bool {
        self.shared.metrics.config_sent(msg.delta, msg.encoded_len());
        tracing::trace!(
            stream = self.id,
            delta = msg.delta,
            services = msg.services.len(),
            "config sent"
        );
        tx.send(Ok(msg)).await.is_ok()
    }
}

impl Svc {
    /// Check a registration: who may register what. Returns the workload
    /// credential it came with, whose revocation ends it.
    async fn admit(&self, req: &Request<WatchRequest>) -> Result<Option<String>, Status> {
        // A sidecar registers as its own identity; only the gateway's may
        // register the gateway, whose address every tunnel goes through.
        let mut credential = None;
        match &req.get_ref().node {
            Some(watch_request::Node::Sidecar(s)) => {
                // Serving a service means receiving its traffic: a
                // credential allows one service, not any in its namespace;
                // a service account (Kubernetes), a Service of its own
                // namespace that exists.
                let caller = auth::acting_as(&self.0, req, &s.namespace, &s.service_account).await?;
                if let auth::Caller::Workload { credential: c, .. } = &caller {
                    credential = c.clone();
                }
                if !s.service.is_empty() {
                    if !(1..=u32::from(u16::MAX)).contains(&s.port) {
                        return Err(Status::invalid_argument(format!(
                            "service port {} is not a port",
                            s.port
                        )));
                    }
                    let source = req.remote_addr().map(|a| a.ip());
                    auth::check_inbound(&s.inbound_addr, source, self.0.cfg.control_addr.ip())?;
                }
                if let auth::Caller::Workload { service, .. } = caller
                    && !s.service.is_empty()
                {
                    match (service, &self.0.kube) {
                        (Some(service), _) if s.service != service => {
                            return Err(Status::permission_denied(format!(
                                "this credential may serve {}/{service}, not {}/{}",
                                s.namespace, s.namespace, s.service
                            )));
                        }
                        (None, Some(api)) => {
                            let exists = api
                                .service_exists(&s.namespace, &s.service)
                                .await
                                .map_err(|e| Status::unavailable(format!("cannot look the Service up: {e}")))?;
                            if !exists {
                                return Err(Status::permission_denied(format!(
                                    "there is no Service {}/{}: create it before its workloads register",
                                    s.namespace, s.service
                                )));
                            }
                        }
                        _ => {}
                    }
                }
            }
            Some(watch_request::Node::Gateway(_)) => {
                let gw = SpiffeId::gateway(&self.0.cfg.trust_domain);
                if let auth::Caller::Workload { credential: c, .. } =
                    auth::acting_as(&self.0, req, &gw.namespace, &gw.service_account).await?
                {
                    credential = c;
                }
            }
            None => {}
        }
        Ok(credential)
    }
}
