//! Commands that talk to a cluster's controller: token, link, export, status.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use isthmus_core::local::{ClusterDir, LocalClient, LocalError};
use isthmus_core::naming;
use isthmus_proto::{CreateTokenRequest, ExportRequest, LinkRequest, StatusRequest, StatusResponse};

use crate::exit;

/// An error for the user, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(exit::FAILURE, format!("{e:#}"))
    }
}

impl From<LocalError> for CliError {
    fn from(e: LocalError) -> Self {
        let code = match e {
            LocalError::Unreachable { .. } => exit::UNREACHABLE,
            LocalError::NoController { .. } => exit::NOT_FOUND,
            _ => exit::FAILURE,
        };
        Self::new(code, e.to_string())
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument => exit::BAD_INPUT,
            Code::NotFound => exit::NOT_FOUND,
            Code::FailedPrecondition | Code::AlreadyExists | Code::PermissionDenied => exit::REFUSED,
            Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
            _ => exit::FAILURE,
        };
        Self::new(code, s.message().to_string())
    }
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token. Give it to `isthmus link` on the other cluster.
    Create {
        #[command(flatten)]
        dir: crate::DirArg,
        /// How long the token can be used (for example 15m, 1h; at most 7d).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many clusters may link with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

pub async fn connect(dir: &Path) -> Result<LocalClient, CliError> {
    Ok(ClusterDir::new(dir).connect().await?)
}

pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create { dir, ttl, uses } => {
            let t = create_token(&dir.dir, ttl, uses).await?;
            println!("{t}");
            Ok(())
        }
    }
}

pub async fn create_token(dir: &Path, ttl: Duration, uses: u32) -> Result<String, CliError> {
    if uses == 0 {
        return Err(CliError::new(exit::BAD_INPUT, "--uses must be at least 1"));
    }
    if ttl < Duration::from_secs(1) {
        return Err(CliError::new(exit::BAD_INPUT, "--ttl must be at least 1s"));
    }
    let c = connect(dir).await?;
    let r = c
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: ttl.as_secs(),
            uses,
        })
        .await?
        .into_inner();
    Ok(r.token)
}

pub async fn link(dir: &Path, token: &str) -> Result<(), CliError> {
    // Catch a garbled token before bothering the controller.
    isthmus_core::token::JoinToken::decode(token).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let c = connect(dir).await?;
    let r = c
        .admin()
        .link(LinkRequest {
            token: token.trim().to_string(),
        })
        .await?
        .into_inner();
    println!(
        "linked cluster {} with cluster {} (trust domain {})",
        c.info.cluster, r.peer_cluster, r.peer_trust_domain
    );
    Ok(())
}

pub async fn export(dir: &Path, service: &str) -> Result<(), CliError> {
    let (namespace, name) = naming::parse_ns_name(service).map_err(|e| CliError::new(exit::BAD_INPUT, e))?;
    let c = connect(dir).await?;
    c.admin()
        .export(ExportRequest {
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .await?;
    println!(
        "exported {namespace}/{name} from cluster {}: linked clusters can call {name}.{namespace}.svc.clusterset.local",
        c.info.cluster
    );
    Ok(())
}

pub async fn fetch_status(dir: &Path) -> Result<StatusResponse, CliError> {
    let c = connect(dir).await?;
    Ok(c.admin().status(StatusRequest {}).await?.into_inner())
}

pub async fn status(dir: &Path, json: bool) -> Result<(), CliError> {
    let s = fetch_status(dir).await?;
    if json {
        println!("{}", status_json(&s));
        return Ok(());
    }
    println!(
        "cluster {}  trust domain {}  root sha256 {}",
        s.cluster,
        s.trust_domain,
        &s.root_fingerprint[..16]
    );
    println!(
        "gateway  tunnel {}  quic {}",
        or_none(&s.gateway_tunnel_addr),
        or_none(&s.gateway_quic_addr)
    );
    println!("\nLINKS");
    if s.links.is_empty() {
        println!("  (none: `isthmus token create` here, `isthmus link <token>` on the other cluster)");
    }
    for l in &s.links {
        let hb = if l.heartbeat_age_ms < 0 {
            "never".to_string()
        } else {
            format!("{:.1}s ago", l.heartbeat_age_ms as f64 / 1000.0)
        };
        println!(
            "  {:<12} {:<12} heartbeat {:<10} trust domain {}  root sha256 {}  gateway {}",
            l.cluster,
            l.state,
            hb,
            l.trust_domain,
            &l.bundle_fingerprint.get(..16).unwrap_or(""),
            or_none(&l.gateway_addr)
        );
    }
    println!("\nSERVICES");
    if s.services.is_empty() {
        println!("  (none)");
    }
    for svc in &s.services {
        let backends: Vec<String> = svc
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.cluster, b.healthy_endpoints))
            .collect();
        println!(
            "  {:<40} port {:<6} {:<9} endpoints {}",
            format!("{}.{}.svc.clusterset.local", svc.name, svc.namespace),
            svc.port,
            if svc.exported { "exported" } else { "" },
            backends.join(" ")
        );
    }
    Ok(())
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub fn status_json(s: &StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "cluster": s.cluster,
        "trust_domain": s.trust_domain,
        "root_fingerprint": s.root_fingerprint,
        "gateway": { "tunnel": s.gateway_tunnel_addr, "quic": s.gateway_quic_addr },
        "links": s.links.iter().map(|l| serde_json::json!({
            "cluster": l.cluster, "trust_domain": l.trust_domain, "state": l.state,
            "heartbeat_age_ms": l.heartbeat_age_ms, "gateway": l.gateway_addr,
            "bundle_fingerprint": l.bundle_fingerprint,
        })).collect::<Vec<_>>(),
        "services": s.services.iter().map(|svc| serde_json::json!({
            "namespace": svc.namespace, "name": svc.name, "port": svc.port, "exported": svc.exported,
            "backends": svc.backends.iter().map(|b| serde_json::json!({
                "cluster": b.cluster, "endpoints": b.healthy_endpoints, "identities": b.identities,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
