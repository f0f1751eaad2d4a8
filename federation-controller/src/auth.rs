//! Who is calling the control port: the operator (the admin token in the
//! cluster directory) or a workload (a credential bound to one identity and
//! one service), and what each may do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

/// Whether a sidecar registering as a backend may name `inbound` as where
/// it is reached: the gateway relays peers' streams there, so it must be
/// the workload's own address, not any host and port the gateway can
/// reach. From another host (a pod), it is the address the registration
/// came from (the pod IP); from loopback (local mode), a loopback address,
/// in the cluster's /24 when the controller listens in one of its own
/// (`isthmus up --net 127.0.N`). The port must be a real one.
pub(crate) fn check_inbound(inbound: &str, source: Option<IpAddr>, control: IpAddr) -> Result<(), Status> {
    let addr: SocketAddr = inbound
        .parse()
        .map_err(|_| Status::invalid_argument(format!("inbound address {inbound:?} is not an IP address and port")))?;
    if addr.port() == 0 {
        return Err(Status::invalid_argument(format!(
            "inbound address {inbound} has no port"
        )));
    }
    let ip = addr.ip().to_canonical();
    let ok = match source.map(|s| s.to_canonical()) {
        Some(src) if !src.is_loopback() => ip == src,
        // Loopback, or a transport without an address (in-process tests).
        _ => match (ip, control.to_canonical()) {
            (IpAddr::V4(ip), IpAddr::V4(c)) if c.is_loopback() && c != Ipv4Addr::LOCALHOST => {
                ip.octets()[..3] == c.octets()[..3]
            }
            (ip, _) => ip.is_loopback(),
        },
    };
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a workload registering from {} cannot be reached at {inbound}: a backend registers its own address",
            source.map(|s| s.to_string()).unwrap_or_else(|| "this host".into())
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_backend_registers_its_own_address() {
        let any = ip("0.0.0.0");
        // A pod: its own IP, nothing else.
        assert!(check_inbound("10.1.0.7:8080", Some(ip("10.1.0.7")), any).is_ok());
        for other in ["10.1.0.8:8080", "10.0.0.5:5432", "127.0.0.1:15022"] {
            let e = check_inbound(other, Some(ip("10.1.0.7")), any).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{other}");
        }
        // Local mode: loopback, in the cluster's /24 when it has one.
        let east = ip("127.0.1.1");
        assert!(check_inbound("127.0.1.20:1", Some(ip("127.0.0.1")), east).is_ok());
        assert!(check_inbound("127.0.2.20:1", Some(ip("127.0.0.1")), east).is_err());
        assert!(check_inbound("192.168.1.9:5432", Some(ip("127.0.0.1")), east).is_err());
        assert!(check_inbound("127.0.9.9:1", None, ip("127.0.0.1")).is_ok());
        assert!(check_inbound("10.0.0.5:5432", None, ip("127.0.0.1")).is_err());
        // Ports and shapes.
        for bad in ["127.0.1.20:0", "echo:8080", "127.0.1.20"] {
            let e = check_inbound(bad, None, east).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
