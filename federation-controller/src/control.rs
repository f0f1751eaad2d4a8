//! The Control service: what sidecars and the gateway ask of their
//! controller (SVIDs by CSR, and a config stream that registers them).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use isthmus_core::identity::{self, SpiffeId};
use isthmus_core::naming::ServiceKey;
use isthmus_proto::admin_server::AdminServer;
use isthmus_proto::control_server::{Control, ControlServer};
use isthmus_proto::{CertificateRequest, CertificateResponse, ConfigSnapshot, WatchRequest, watch_request};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth;
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

    async fn watch_config(&self, req: Request<WatchRequest>) -> Result<Response<SnapshotStream>, Status> {
        // A sidecar registers as its own identity; only the gateway's may
        // register the gateway, whose address every tunnel goes through.
        // The workload credential it registered with: its revocation ends
        // the registration.
        let mut credential = None;
        match &req.get_ref().node {
            Some(watch_request::Node::Sidecar(s)) => {
                // Serving a service means receiving its traffic: a
                // credential allows one service, not any in its namespace;
                // a service account (Kubernetes), a Service of its own
                // namespace that exists.
                let caller = auth::acting_as(&self.0, &req, &s.namespace, &s.service_account).await?;
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
                    auth::acting_as(&self.0, &req, &gw.namespace, &gw.service_account).await?
                {
                    credential = c;
                }
            }
            None => {}
        }
        let WatchRequest { node, resume } = req.into_inner();
        let node = node.ok_or_else(|| Status::invalid_argument("registration missing"))?;
        let shared = self.0.clone();
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
                    }
                    tracing::info!(service = %ServiceKey::new(&s.namespace, &s.service), addr = %s.inbound_addr, "sidecar registered");
                    reg.sidecars.insert(id, s);
                }
                watch_request::Node::Gateway(g) => {
                    tracing::info!(tunnel = %g.tunnel_addr, quic = %g.quic_addr, "gateway registered");
                    reg.gateway = Some((id, g));
                }
            }
            id
        };
        shared.changed();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
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
            let mut version = shared.version.subscribe();
            // What this component was last sent, its version zeroed: a change
            // elsewhere (another component, a token, a resent export list)
            // that leaves its config as it was sends nothing.
            let mut last: Option<ConfigSnapshot> = None;
            loop {
                version.borrow_and_update();
                if let Some(c) = &credential
                    && !shared.state.lock().expect("state lock").workloads.contains_key(c)
                {
                    tracing::warn!(credential = %c, "workload credential revoked: its registration ends");
                    let _ = tx
                        .send(Err(Status::unauthenticated("the workload credential was revoked")))
                        .await;
                    break;
                }
                let snap = shared.snapshot();
                let same = ConfigSnapshot {
                    version: 0,
                    ..snap.clone()
                };
                if last.as_ref() != Some(&same) {
                    if tx.send(Ok(snap)).await.is_err() {
                        break;
                    }
                    last = Some(same);
                }
                tokio::select! {
                    r = version.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                    _ = shared.shutdown.cancelled() => break,
                }
            }
            // The registration lives as long as the stream.
            let mut reg = shared.registry.lock().expect("registry lock");
            reg.sidecars.remove(&id);
            if reg.gateway.as_ref().is_some_and(|(g, _)| *g == id) {
                reg.gateway = None;
            }
            drop(reg);
            shared.changed();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
