//! Who is calling the control port: the operator (the admin token in the
//! cluster directory) or a workload (a credential bound to one identity and
//! one service), and what each may do.

use isthmus_core::identity::SpiffeId;
use isthmus_core::token;
use tonic::{Request, Status};

use crate::shared::Shared;

pub(crate) enum Caller {
    Admin,
    Workload {
        namespace: String,
        service_account: String,
        /// The one service it may register as a backend of; `None` (a
        /// Kubernetes service account): any Service of its namespace.
        service: Option<String>,
        /// The workload credential's id (none for a Kubernetes service
        /// account token): what a revocation ends.
        credential: Option<String>,
    },
}

/// Who presented the request's bearer credential.
pub(crate) async fn caller<T>(shared: &Shared, req: &Request<T>) -> Result<Caller, Status> {
    let presented = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing credential"))?;
    if let Some(hash) = &shared.local_token_hash
        && token::secret_matches(presented.as_bytes(), hash)
    {
        return Ok(Caller::Admin);
    }
    if let Some(reviewer) = &shared.kube
        && crate::k8s::auth::is_jwt(presented)
    {
        let sa = reviewer.review(presented).await.map_err(|e| match e {
            crate::k8s::auth::ReviewError::Api(e) => Status::unavailable(format!("cannot review the token: {e}")),
            other => Status::unauthenticated(other.to_string()),
        })?;
        return Ok(Caller::Workload {
            namespace: sa.namespace,
            service_account: sa.name,
            service: None,
            credential: None,
        });
    }
    let wrong = || Status::unauthenticated("unknown or altered credential");
    let (id, secret) = credential::parse(presented).ok_or_else(wrong)?;
    let state = shared.state.lock().expect("state lock");
    let rec = state.workloads.get(id).ok_or_else(wrong)?;
    if !token::secret_matches(&secret, &rec.secret_hash) {
        return Err(wrong());
    }
    Ok(Caller::Workload {
        namespace: rec.namespace.clone(),
        service_account: rec.service_account.clone(),
        service: Some(rec.service.clone()),
        credential: Some(id.to_string()),
    })
}

/// The Admin service is the operator's alone.
pub(crate) async fn admin<T>(shared: &Shared, req: &Request<T>) -> Result<(), Status> {
    match caller(shared, req).await? {
        Caller::Admin => Ok(()),
        Caller::Workload { .. } => Err(Status::permission_denied(
            "a workload credential cannot use the Admin service; use the cluster's admin token",
        )),
    }
}

/// A workload may act only as the identity its credential is bound to.
pub(crate) async fn acting_as<T>(
    shared: &Shared,
    req: &Request<T>,
    namespace: &str,
    service_account: &str,
) -> Result<Caller, Status> {
    let caller = caller(shared, req).await?;
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

/// The identity a workload may hold. The controller's is what peers trust
/// for peering: only the controller itself holds it, never anything that
/// asks for it by CSR or credential.
pub(crate) fn workload_id(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, Status> {
    let id =
        SpiffeId::new(trust_domain, namespace, service_account).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if id == SpiffeId::controller(trust_domain) {
        return Err(Status::permission_denied(format!(
            "{id} is reserved for the controller"
        )));
    }
    Ok(id)
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
