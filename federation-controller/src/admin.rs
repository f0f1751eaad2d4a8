//! The Admin service: what the operator's CLI asks of the controller
//! (tokens, links, exports, policies, credentials, rotation, status).

use std::time::Duration;

use isthmus_core::identity;
use isthmus_core::naming::ServiceKey;
use isthmus_core::token::{self, JoinToken};
use isthmus_core::unix_now;
use isthmus_proto::admin_server::Admin;
use isthmus_proto::{
    ApplyPolicyRequest, ApplyPolicyResponse, CreateTokenRequest, CreateTokenResponse, ExportRequest, ExportResponse,
    LinkRequest, LinkResponse, ListTokensRequest, ListTokensResponse, ListWorkloadCredentialsRequest,
    ListWorkloadCredentialsResponse, RevokeTokenRequest, RevokeTokenResponse, RevokeWorkloadCredentialRequest,
    RevokeWorkloadCredentialResponse, RotateCaRequest, RotateCaResponse, SetImportsRequest, SetImportsResponse,
    StatusRequest, StatusResponse, TokenInfo, UnlinkRequest, UnlinkResponse, WorkloadCredentialInfo,
    WorkloadCredentialRequest, WorkloadCredentialResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{self, credential};
use crate::shared::Svc;
use crate::state::ExportRecord;
use crate::{join, peering};

#[tonic::async_trait]
impl Admin for Svc {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        let now = unix_now();
        let (tok, rec) = join::issue(
            &self.0.join_info(),
            Duration::from_secs(r.ttl_seconds),
            r.uses,
            Some(r.priority),
            now,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (id, expires, uses) = (rec.id.clone(), rec.expires_unix, rec.uses_left);
        self.0
            .update(|state| {
                state.tokens.retain(|_, t| !join::forgotten(t, now));
                state.tokens.insert(rec.id.clone(), rec);
                Ok(())
            })
            .await?;
        self.0.metrics.tokens_created.inc();
        tracing::info!(token_id = %id, ttl_s = expires - now, uses, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token: tok.encode(),
            id,
            expires_unix: expires,
        }))
    }

    async fn link(&self, req: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let joined = match JoinToken::decode(&req.into_inner().token) {
            Ok(tok) => peering::join(self.0.clone(), &tok).await,
            Err(e) => Err(join::LinkError::from(e)),
        };
        // The joining side's view of token failures, by reason.
        let result = match &joined {
            Ok(_) => "linked",
            Err(e) => e.label(),
        };
        self.0.metrics.link_attempt(result);
        Ok(Response::new(joined.map_err(|e| e.status())?))
    }

    async fn export(&self, req: Request<ExportRequest>) -> Result<Response<ExportResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        let key = ServiceKey::new(&r.namespace, &r.name);
        identity::validate_name(&key.namespace).map_err(|e| Status::invalid_argument(e.to_string()))?;
        identity::validate_name(&key.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        {
            let reg = self.0.registry.lock().expect("registry lock");
            if !reg.serves(&key) {
                let mut known: Vec<String> = reg
                    .sidecars
                    .values()
                    .map(|s| ServiceKey::new(&s.namespace, &s.service).to_string())
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
        let exports = self
            .0
            .update(|state| {
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
            })
            .await?;
        self.0.metrics.exports.set(exports as i64);
        tracing::info!(service = %key, "exported");
        self.0.changed_services([key]);
        Ok(Response::new(ExportResponse {}))
    }

    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        let policy = r
            .policy
            .ok_or_else(|| Status::invalid_argument("no policy in the request"))?;
        // Checked whole before anything is stored: nothing half-applied.
        isthmus_core::policy::validate(&policy).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = ServiceKey::new(&policy.namespace, &policy.service);
        let changed = self
            .0
            .update(|state| {
                let before = state.policies.get(&key).cloned();
                if r.delete {
                    state.policies.remove(&key);
                } else {
                    state.set_policy(&policy);
                }
                Ok(state.policies.get(&key) != before.as_ref())
            })
            .await?;
        if changed {
            tracing::info!(service = %key, delete = r.delete, "traffic policy applied");
            self.0.metrics.policy_changes.inc();
            self.0.changed();
        }
        Ok(Response::new(ApplyPolicyResponse { changed }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        Ok(Response::new(self.0.status()))
    }

    async fn list_tokens(&self, req: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        auth::admin(&self.0, &req).await?;
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
        auth::admin(&self.0, &req).await?;
        let id = req.into_inner().id;
        let now = unix_now();
        let signer = self.0.ca.load().signer().fingerprint();
        self.0
            .update(|state| {
                let t = state.tokens.get_mut(&id).ok_or_else(|| {
                    Status::not_found(format!("no join token {id:?} (`isthmus token list` shows them)"))
                })?;
                match t.state(now, &signer) {
                    "usable" => {
                        t.revoked = true;
                        Ok(())
                    }
                    other => Err(Status::failed_precondition(format!(
                        "join token {id} is {other} already: it cannot be used to link"
                    ))),
                }
            })
            .await?;
        self.0.metrics.token_revocations.inc();
        tracing::info!(token_id = %id, "join token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn unlink(&self, req: Request<UnlinkRequest>) -> Result<Response<UnlinkResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let peer = req.into_inner().cluster;
        let connected = self
            .0
            .peers
            .lock()
            .expect("peers lock")
            .get(&peer)
            .is_some_and(|p| p.connected);
        if !peering::remove_link(&self.0, &peer, "unlinked by an operator").await {
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
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        let id = auth::workload_id(&self.0.cfg.trust_domain, &r.namespace, &r.service_account)?;
        if !r.service.is_empty() {
            identity::validate_name(&r.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let (secret, hash) = token::new_secret();
        let cred_id = format!("{:016x}", rand::random::<u64>());
        self.0
            .update(|state| {
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
            })
            .await?;
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
        auth::admin(&self.0, &req).await?;
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
        auth::admin(&self.0, &req).await?;
        let id = req.into_inner().id;
        self.0
            .update(|state| {
                state.workloads.remove(&id).map(|_| ()).ok_or_else(|| {
                    Status::not_found(format!(
                        "no workload credential {id:?} (`isthmus workload list` shows them)"
                    ))
                })
            })
            .await?;
        tracing::info!(credential = %id, "workload credential revoked");
        // Its live registrations see it and end.
        self.0.changed();
        Ok(Response::new(RevokeWorkloadCredentialResponse {}))
    }

    async fn set_imports(&self, req: Request<SetImportsRequest>) -> Result<Response<SetImportsResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        peering::set_imports(&self.0, &r.cluster, r.imports).await?;
        Ok(Response::new(SetImportsResponse {}))
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<RotateCaResponse>, Status> {
        auth::admin(&self.0, &req).await?;
        let r = req.into_inner();
        let grace = if r.retire_after_seconds == 0 {
            self.0.cfg.svid_ttl
        } else {
            Duration::from_secs(r.retire_after_seconds)
        };
        // Checked first, so a refused rotation leaves no key behind.
        crate::ca::no_rotation_under_way(&self.0.state.lock().expect("state lock"))
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let new = identity::Ca::generate(&self.0.cfg.trust_domain).map_err(|e| Status::internal(e.to_string()))?;
        // The key is stored before the state names it.
        let key_file = crate::ca::key_file(&new);
        self.0
            .store
            .write_key(&key_file, &new.key_pem())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let staged = self
            .0
            .update(|state| {
                crate::ca::stage(state, &new, grace, unix_now()).map_err(|e| Status::failed_precondition(e.to_string()))
            })
            .await;
        if let Err(e) = staged {
            let _ = self.0.store.delete_key(&key_file).await;
            return Err(e);
        }
        tracing::info!(root = %new.fingerprint(), retire_after_s = grace.as_secs(), "root rotation started: new root staged");
        self.0.reload_ca().await;
        Ok(Response::new(RotateCaResponse {
            new_root_fingerprint: new.fingerprint(),
        }))
    }
}
