//! The controller's gRPC services: Control and Admin on the control port,
//! Peering on the peering port.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use isthmus_core::identity::{self, SpiffeId};
use isthmus_core::token::{self, JoinToken};
use isthmus_core::{naming, unix_now};
use isthmus_proto::admin_server::{Admin, AdminServer};
use isthmus_proto::control_server::{Control, ControlServer};
use isthmus_proto::peering_server::{Peering, PeeringServer};
use isthmus_proto::{
    ApplyPolicyRequest, ApplyPolicyResponse, CertificateRequest, CertificateResponse, ConfigSnapshot,
    CreateTokenRequest, CreateTokenResponse, ExportRequest, ExportResponse, JoinRequest, JoinResponse, LinkRequest,
    LinkResponse, LinkStatus, ListTokensRequest, ListTokensResponse, ListWorkloadCredentialsRequest,
    ListWorkloadCredentialsResponse, PeerMessage, RevokeTokenRequest, RevokeTokenResponse,
    RevokeWorkloadCredentialRequest, RevokeWorkloadCredentialResponse, RootStatus, RotateCaRequest, RotateCaResponse,
    StatusRequest, StatusResponse, TokenInfo, UnlinkRequest, UnlinkResponse, WatchRequest, WorkloadCredentialInfo,
    WorkloadCredentialRequest, WorkloadCredentialResponse, watch_request,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::state::{ExportRecord, LinkRecord, TokenRecord};
use crate::{Shared, peering};

const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

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

pub(crate) async fn serve_peering(shared: Arc<Shared>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let svc = Svc(shared.clone());
    let incoming = isthmus_core::grpc::tls_incoming(listener, tls, shared.shutdown.clone());
    let res = tonic::transport::Server::builder()
        .add_service(PeeringServer::new(svc))
        .serve_with_incoming_shutdown(incoming, shared.shutdown.clone().cancelled_owned())
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "peering server stopped");
    }
}

#[derive(Clone)]
struct Svc(Arc<Shared>);

impl Svc {
    /// Count a refused join attempt, by reason.
    fn refused(&self, reason: &'static str, status: Status) -> Status {
        self.0.metrics.join(reason);
        status
    }

    /// Who is calling: the operator (the admin token in the cluster
    /// directory) or a workload (a credential bound to one identity).
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing credential"))?;
        if token::secret_matches(presented.as_bytes(), &self.0.local_token_hash) {
            return Ok(Caller::Admin);
        }
        let wrong = || Status::unauthenticated("unknown or altered credential");
        let (id, secret) = credential::parse(presented).ok_or_else(wrong)?;
        let state = self.0.state.lock().expect("state lock");
        let rec = state.workloads.get(id).ok_or_else(wrong)?;
        if !token::secret_matches(&secret, &rec.secret_hash) {
            return Err(wrong());
        }
        Ok(Caller::Workload {
            namespace: rec.namespace.clone(),
            service_account: rec.service_account.clone(),
            service: rec.service.clone(),
        })
    }

    /// The identity a workload may hold. The controller's is what peers
    /// trust for peering: only the controller itself holds it, never
    /// anything that asks for it by CSR or credential.
    fn workload_id(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, Status> {
        let id = SpiffeId::new(&self.0.cfg.trust_domain, namespace, service_account)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if id == SpiffeId::controller(&self.0.cfg.trust_domain) {
            return Err(Status::permission_denied(format!(
                "{id} is reserved for the controller"
            )));
        }
        Ok(id)
    }

    /// The Admin service is the operator's alone.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.caller(req)? {
            Caller::Admin => Ok(()),
            Caller::Workload { .. } => Err(Status::permission_denied(
                "a workload credential cannot use the Admin service; use the cluster's admin token",
            )),
        }
    }

    /// A workload may act only as the identity its credential is bound to.
    fn authorize_as<T>(&self, req: &Request<T>, namespace: &str, service_account: &str) -> Result<Caller, Status> {
        let caller = self.caller(req)?;
        match &caller {
            Caller::Workload {
                namespace: ns,
                service_account: sa,
                ..
            } if ns != namespace || sa != service_account => Err(Status::permission_denied(format!(
                "this credential is for {ns}/{sa}, not {namespace}/{service_account}"
            ))),
            _ => Ok(caller),
        }
    }
}

enum Caller {
    Admin,
    Workload {
        namespace: String,
        service_account: String,
        /// The one service it may register as a backend of.
        service: String,
    },
}

/// Workload credentials: `iwc1.<id>.<secret>`.
pub(crate) mod credential {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const PREFIX: &str = "iwc1.";

    pub(crate) fn format(id: &str, secret_b64: &str) -> String {
        format!("{PREFIX}{id}.{secret_b64}")
    }

    /// The id and the secret's bytes, if `s` has the credential's form.
    pub(crate) fn parse(s: &str) -> Option<(&str, Vec<u8>)> {
        let (id, secret) = s.strip_prefix(PREFIX)?.split_once('.')?;
        Some((id, URL_SAFE_NO_PAD.decode(secret).ok()?))
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;
type PeerStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Control for Svc {
    async fn issue_certificate(
        &self,
        req: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        self.authorize_as(&req, &req.get_ref().namespace, &req.get_ref().service_account)?;
        let r = req.into_inner();
        let id = self.workload_id(&r.namespace, &r.service_account)?;
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
        match &req.get_ref().node {
            Some(watch_request::Node::Sidecar(s)) => {
                // Serving a service means receiving its traffic: a
                // credential allows one service, not any in its namespace.
                if let Caller::Workload { service, .. } = self.authorize_as(&req, &s.namespace, &s.service_account)?
                    && !s.service.is_empty()
                    && s.service != service
                {
                    return Err(Status::permission_denied(format!(
                        "this credential may serve {}/{service}, not {}/{}",
                        s.namespace, s.namespace, s.service
                    )));
                }
            }
            Some(watch_request::Node::Gateway(_)) => {
                let gw = SpiffeId::gateway(&self.0.cfg.trust_domain);
                self.authorize_as(&req, &gw.namespace, &gw.service_account)?;
            }
            None => {}
        }
        let node = req
            .into_inner()
            .node
            .ok_or_else(|| Status::invalid_argument("registration missing"))?;
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
                    tracing::info!(service = %format!("{}/{}", s.namespace, s.service), addr = %s.inbound_addr, "sidecar registered");
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
            let mut version = shared.version.subscribe();
            loop {
                version.borrow_and_update();
                if tx.send(Ok(shared.snapshot())).await.is_err() {
                    break;
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

#[tonic::async_trait]
impl Admin for Svc {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let ttl = Duration::from_secs(if r.ttl_seconds == 0 { 900 } else { r.ttl_seconds });
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument("--ttl may be at most 7 days"));
        }
        let uses = if r.uses == 0 { 1 } else { r.uses };
        let (secret, hash) = token::new_secret();
        let id = format!("{:016x}", rand::random::<u64>());
        let now = unix_now();
        let (_, quic) = self.0.gateway_addrs();
        let tok = JoinToken {
            cluster: self.0.cfg.cluster.clone(),
            trust_domain: self.0.cfg.trust_domain.clone(),
            peering: vec![self.0.peering_advertised.clone()],
            gateway: if quic.is_empty() { vec![] } else { vec![quic] },
            root_fingerprint: self.0.ca.load().signer().fingerprint(),
            id: id.clone(),
            secret,
            priority: (r.priority > 0).then_some(r.priority),
        };
        let expires = now + ttl.as_secs() as i64;
        self.0.update(|state| {
            // Drop tokens that can never be used again, so the file stays small.
            state.tokens.retain(|_, t| t.expires_unix > now - 24 * 3600);
            state.tokens.insert(
                id.clone(),
                TokenRecord {
                    id: id.clone(),
                    secret_hash: hash,
                    created_unix: now,
                    expires_unix: expires,
                    uses_left: uses,
                    used_by: vec![],
                    revoked: false,
                    root_fingerprint: tok.root_fingerprint.clone(),
                },
            );
            Ok(())
        })?;
        self.0.metrics.tokens_created.inc();
        tracing::info!(token_id = %id, ttl_s = ttl.as_secs(), uses, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token: tok.encode(),
            id,
            expires_unix: expires,
        }))
    }

    async fn link(&self, req: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        self.authorize(&req)?;
        let joined = match JoinToken::decode(&req.into_inner().token) {
            Ok(tok) => peering::join(self.0.clone(), &tok).await,
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        };
        // The joining side's view of token failures, by reason.
        let result = match &joined {
            Ok(_) => "linked",
            Err(s) if s.message().contains("fingerprint mismatch") => "fingerprint_mismatch",
            Err(s) => match s.code() {
                tonic::Code::InvalidArgument => "malformed",
                tonic::Code::Unavailable => "unreachable",
                tonic::Code::AlreadyExists => "already_linked",
                tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied | tonic::Code::NotFound => "refused",
                _ => "error",
            },
        };
        self.0.metrics.link_attempt(result);
        Ok(Response::new(joined?))
    }

    async fn export(&self, req: Request<ExportRequest>) -> Result<Response<ExportResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let key = format!("{}/{}", r.namespace, r.name);
        naming::parse_ns_name(&key).map_err(Status::invalid_argument)?;
        {
            let reg = self.0.registry.lock().expect("registry lock");
            if !reg
                .sidecars
                .values()
                .any(|s| s.namespace == r.namespace && s.service == r.name)
            {
                let mut known: Vec<String> = reg
                    .sidecars
                    .values()
                    .map(|s| format!("{}/{}", s.namespace, s.service))
                    .collect();
                known.sort();
                known.dedup();
                return Err(Status::not_found(format!(
                    "service {key} does not exist in cluster {}: no workload has registered it (services here: {})",
                    self.0.cfg.cluster,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        let exports = self.0.update(|state| {
            if !state.exports.contains_key(&key) {
                state.exports.insert(
                    key.clone(),
                    ExportRecord {
                        namespace: r.namespace,
                        name: r.name,
                        created_unix: unix_now(),
                    },
                );
            }
            Ok(state.exports.len())
        })?;
        self.0.metrics.exports.set(exports as i64);
        tracing::info!(service = %key, "exported");
        self.0.changed();
        Ok(Response::new(ExportResponse {}))
    }

    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let policy = r
            .policy
            .ok_or_else(|| Status::invalid_argument("no policy in the request"))?;
        // Checked whole before anything is stored: nothing half-applied.
        isthmus_core::policy::validate(&policy).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = format!("{}/{}", policy.namespace, policy.service);
        let changed = self.0.update(|state| {
            let before = state.policies.get(&key).cloned();
            if r.delete {
                state.policies.remove(&key);
            } else {
                state.set_policy(&policy);
            }
            Ok(state.policies.get(&key) != before.as_ref())
        })?;
        if changed {
            tracing::info!(service = %key, delete = r.delete, "traffic policy applied");
            self.0.metrics.policy_changes.inc();
            self.0.changed();
        }
        Ok(Response::new(ApplyPolicyResponse { changed }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&req)?;
        let snap = self.0.snapshot();
        let ca = self.0.ca.load();
        let ours = ca.fingerprints();
        let state = self.0.state.lock().expect("state lock").clone();
        let peers = self.0.peers.lock().expect("peers lock").clone();
        let links = state
            .links
            .values()
            .map(|l| {
                let rt = peers.get(&l.cluster);
                let age = rt
                    .and_then(|p| p.last_heartbeat)
                    .map(|t| t.elapsed().as_millis() as i64)
                    .unwrap_or(-1);
                let fp = identity::certs_from_pem(&l.roots_pem)
                    .ok()
                    .and_then(|c| c.first().map(identity::fingerprint))
                    .unwrap_or_default();
                LinkStatus {
                    cluster: l.cluster.clone(),
                    trust_domain: l.trust_domain.clone(),
                    state: peering::link_state(rt, self.0.cfg.import_lease).to_string(),
                    heartbeat_age_ms: age,
                    gateway_addr: l.gateway_addr.clone(),
                    bundle_fingerprint: fp,
                    priority: l.priority.unwrap_or(0),
                    peer_has_our_roots: rt.is_some_and(|p| ours.iter().all(|f| p.holds_our_roots.contains(f))),
                    imports: rt
                        .filter(|p| p.imports.live)
                        .map(|p| p.imports.services.len() as u32)
                        .unwrap_or(0),
                }
            })
            .collect();
        let roots = ca
            .records()
            .map(|(r, c)| RootStatus {
                fingerprint: c.fingerprint(),
                state: r.phase.as_str().to_string(),
                not_after_unix: identity::not_after_of(c.anchor_der()).unwrap_or_default(),
                retire_unix: r.retire_unix.unwrap_or_default(),
            })
            .collect();
        let (tunnel, quic) = self.0.gateway_addrs();
        Ok(Response::new(StatusResponse {
            cluster: self.0.cfg.cluster.clone(),
            trust_domain: self.0.cfg.trust_domain.clone(),
            root_fingerprint: ca.signer().fingerprint(),
            links,
            services: snap.services,
            gateway_tunnel_addr: tunnel,
            gateway_quic_addr: quic,
            roots,
            svid_expires_unix: self.0.svid.not_after().unwrap_or_default(),
        }))
    }

    async fn list_tokens(&self, req: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        self.authorize(&req)?;
        let now = unix_now();
        let state = self.0.state.lock().expect("state lock");
        let signer = self.0.ca.load().signer().fingerprint();
        let mut tokens: Vec<TokenInfo> = state
            .tokens
            .values()
            .map(|t| TokenInfo {
                id: t.id.clone(),
                created_unix: t.created_unix,
                expires_unix: t.expires_unix,
                uses_left: t.uses_left,
                used_by: t.used_by.clone(),
                state: t.state(now, &signer).to_string(),
            })
            .collect();
        tokens.sort_by_key(|t| t.created_unix);
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<RevokeTokenResponse>, Status> {
        self.authorize(&req)?;
        let id = req.into_inner().id;
        let now = unix_now();
        let signer = self.0.ca.load().signer().fingerprint();
        self.0.update(|state| {
            let t = state
                .tokens
                .get_mut(&id)
                .ok_or_else(|| Status::not_found(format!("no join token {id:?} (`isthmus token list` shows them)")))?;
            match t.state(now, &signer) {
                "usable" => {
                    t.revoked = true;
                    Ok(())
                }
                other => Err(Status::failed_precondition(format!(
                    "join token {id} is {other} already: it cannot be used to link"
                ))),
            }
        })?;
        self.0.metrics.token_revocations.inc();
        tracing::info!(token_id = %id, "join token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn unlink(&self, req: Request<UnlinkRequest>) -> Result<Response<UnlinkResponse>, Status> {
        self.authorize(&req)?;
        let peer = req.into_inner().cluster;
        let connected = self
            .0
            .peers
            .lock()
            .expect("peers lock")
            .get(&peer)
            .is_some_and(|p| p.connected);
        if !peering::remove_link(&self.0, &peer, "unlinked by an operator") {
            let known: Vec<String> = self.0.state.lock().expect("state lock").links.keys().cloned().collect();
            return Err(Status::not_found(format!(
                "cluster {} has no link with {peer:?} (links: {})",
                self.0.cfg.cluster,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
        // A live peering session notices on its next round and tells the
        // peer before it ends; without one, the peer keeps its side.
        Ok(Response::new(UnlinkResponse {
            peer_notified: connected,
        }))
    }

    async fn create_workload_credential(
        &self,
        req: Request<WorkloadCredentialRequest>,
    ) -> Result<Response<WorkloadCredentialResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let id = self.workload_id(&r.namespace, &r.service_account)?;
        if !r.service.is_empty() {
            identity::validate_name(&r.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let (secret, hash) = token::new_secret();
        let cred_id = format!("{:016x}", rand::random::<u64>());
        self.0.update(|state| {
            state.workloads.insert(
                cred_id.clone(),
                crate::state::WorkloadRecord {
                    id: cred_id.clone(),
                    namespace: r.namespace.clone(),
                    service_account: r.service_account.clone(),
                    service: if r.service.is_empty() {
                        r.service_account.clone()
                    } else {
                        r.service.clone()
                    },
                    secret_hash: hash,
                    created_unix: unix_now(),
                },
            );
            Ok(())
        })?;
        tracing::info!(%id, credential = %cred_id, "workload credential created");
        Ok(Response::new(WorkloadCredentialResponse {
            credential: credential::format(&cred_id, &secret),
            spiffe_id: id.to_string(),
            id: cred_id,
        }))
    }

    async fn list_workload_credentials(
        &self,
        req: Request<ListWorkloadCredentialsRequest>,
    ) -> Result<Response<ListWorkloadCredentialsResponse>, Status> {
        self.authorize(&req)?;
        let td = &self.0.cfg.trust_domain;
        let state = self.0.state.lock().expect("state lock");
        let mut credentials: Vec<WorkloadCredentialInfo> = state
            .workloads
            .values()
            .map(|w| WorkloadCredentialInfo {
                id: w.id.clone(),
                spiffe_id: format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account),
                service: w.service.clone(),
                created_unix: w.created_unix,
            })
            .collect();
        credentials.sort_by_key(|c| c.created_unix);
        Ok(Response::new(ListWorkloadCredentialsResponse { credentials }))
    }

    async fn revoke_workload_credential(
        &self,
        req: Request<RevokeWorkloadCredentialRequest>,
    ) -> Result<Response<RevokeWorkloadCredentialResponse>, Status> {
        self.authorize(&req)?;
        let id = req.into_inner().id;
        self.0.update(|state| {
            state.workloads.remove(&id).map(|_| ()).ok_or_else(|| {
                Status::not_found(format!(
                    "no workload credential {id:?} (`isthmus workload list` shows them)"
                ))
            })
        })?;
        tracing::info!(credential = %id, "workload credential revoked");
        Ok(Response::new(RevokeWorkloadCredentialResponse {}))
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<RotateCaResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let grace = if r.retire_after_seconds == 0 {
            self.0.cfg.svid_ttl
        } else {
            Duration::from_secs(r.retire_after_seconds)
        };
        // Checked first, so a refused rotation leaves no key behind.
        crate::ca::no_rotation_under_way(&self.0.state.lock().expect("state lock"))
            .map_err(Status::failed_precondition)?;
        let new = identity::Ca::generate(&self.0.cfg.trust_domain).map_err(|e| Status::internal(e.to_string()))?;
        // The key is on disk before the state names it.
        let key_file = crate::ca::key_file(&new);
        self.0
            .dir
            .write_atomic(&key_file, new.key_pem().as_bytes(), true)
            .map_err(|e| Status::internal(e.to_string()))?;
        let staged = self
            .0
            .update(|state| crate::ca::stage(state, &new, grace, unix_now()).map_err(Status::failed_precondition));
        if let Err(e) = staged {
            let _ = std::fs::remove_file(self.0.dir.file(&key_file));
            return Err(e);
        }
        tracing::info!(root = %new.fingerprint(), retire_after_s = grace.as_secs(), "root rotation started: new root staged");
        self.0.reload_ca();
        Ok(Response::new(RotateCaResponse {
            new_root_fingerprint: new.fingerprint(),
        }))
    }
}

#[tonic::async_trait]
impl Peering for Svc {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        let shared = &self.0;
        if r.trust_domain == shared.cfg.trust_domain || r.cluster == shared.cfg.cluster {
            return Err(self.refused(
                "self_link",
                Status::failed_precondition(format!(
                    "cannot link cluster {} to itself (trust domain {})",
                    shared.cfg.cluster, shared.cfg.trust_domain
                )),
            ));
        }
        identity::validate_name(&r.cluster)
            .map_err(|e| self.refused("invalid", Status::invalid_argument(e.to_string())))?;
        identity::validate_trust_domain(&r.trust_domain)
            .map_err(|e| self.refused("invalid", Status::invalid_argument(e.to_string())))?;
        identity::certs_from_pem(&r.roots_pem)
            .map_err(|e| self.refused("invalid", Status::invalid_argument(format!("joiner's roots: {e}"))))?;
        let now = unix_now();
        shared.update(|state| {
            let Some(rec) = state.tokens.get(&r.token_id).cloned() else {
                return Err(self.refused(
                    "unknown_token",
                    Status::not_found("unknown join token: it was never issued by this cluster (or is long expired)"),
                ));
            };
            if !token::secret_matches(&r.secret, &rec.secret_hash) {
                tracing::warn!(token_id = %r.token_id, "join refused: wrong secret");
                return Err(self.refused(
                    "bad_secret",
                    Status::permission_denied("join token secret does not match: the token was altered"),
                ));
            }
            if rec.revoked {
                return Err(self.refused(
                    "revoked",
                    Status::failed_precondition("join token was revoked by its issuer; ask for a new one"),
                ));
            }
            // Expiry is judged by the issuer's clock alone, so skew cannot matter.
            if now >= rec.expires_unix {
                return Err(self.refused(
                    "expired",
                    Status::failed_precondition(format!(
                        "join token expired {}s ago (by the issuer's clock); create a new one",
                        now - rec.expires_unix
                    )),
                ));
            }
            // A cluster that used this token and was unlinked since does not
            // get back in with the same (multi-use) token.
            if rec.used_by.contains(&r.cluster) {
                return Err(self.refused(
                    "used",
                    Status::failed_precondition(format!("join token already used by {}; ask for a new one", r.cluster)),
                ));
            }
            if rec.uses_left == 0 {
                return Err(self.refused(
                    "used",
                    Status::failed_precondition(format!(
                        "join token already used (by {}); create a new one",
                        rec.used_by.join(", ")
                    )),
                ));
            }
            if let Some(l) = state
                .links
                .values()
                .find(|l| l.cluster == r.cluster || l.trust_domain == r.trust_domain)
            {
                return Err(self.refused(
                    "already_linked",
                    Status::already_exists(format!(
                        "cluster {} ({}) is already linked with {}",
                        l.cluster, l.trust_domain, shared.cfg.cluster
                    )),
                ));
            }
            let t = state.tokens.get_mut(&r.token_id).expect("present");
            t.uses_left -= 1;
            t.used_by.push(r.cluster.clone());
            state.links.insert(
                r.cluster.clone(),
                LinkRecord {
                    cluster: r.cluster.clone(),
                    trust_domain: r.trust_domain.clone(),
                    roots_pem: r.roots_pem.clone(),
                    gateway_addr: r.gateway_addr.clone(),
                    dial: None,
                    priority: None,
                    created_unix: now,
                },
            );
            Ok(())
        })?;
        shared.rebuild_bundles();
        shared.changed();
        tracing::info!(peer = %r.cluster, trust_domain = %r.trust_domain, "linked (join accepted)");
        shared.metrics.join("accepted");
        let (_, quic) = shared.gateway_addrs();
        Ok(Response::new(JoinResponse {
            cluster: shared.cfg.cluster.clone(),
            trust_domain: shared.cfg.trust_domain.clone(),
            roots_pem: shared.ca.load().bundle_pem(),
            gateway_addr: quic,
        }))
    }

    type SyncStream = PeerStream;

    async fn sync(&self, req: Request<Streaming<PeerMessage>>) -> Result<Response<PeerStream>, Status> {
        let id = isthmus_core::tls::peer_id(req.peer_certs().as_deref().map(|v| v.as_slice()))
            .ok_or_else(|| Status::unauthenticated("the peering stream needs a client certificate"))?;
        let peer = {
            let state = self.0.state.lock().expect("state lock");
            state
                .links
                .values()
                .find(|l| l.trust_domain == id.trust_domain)
                .map(|l| l.cluster.clone())
        };
        let Some(peer) = peer.filter(|_| id == SpiffeId::controller(&id.trust_domain)) else {
            return Err(Status::permission_denied(format!(
                "{id} is not the controller of a linked cluster"
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(peering::session(self.0.clone(), peer, req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
