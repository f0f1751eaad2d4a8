//! Commands that talk to a cluster's controller: token, link, export, status.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use isthmus_core::local::{ClusterDir, LocalClient, LocalError};
use isthmus_core::naming;
use isthmus_proto::{
    CreateTokenRequest, ExportRequest, LinkRequest, ListTokensRequest, RevokeTokenRequest, RotateCaRequest,
    StatusRequest, StatusResponse, UnlinkRequest,
};

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
        /// Failover priority the joining cluster gives this one (lower is
        /// preferred); used by traffic policies.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        priority: Option<u32>,
    },
    /// List this cluster's join tokens and what became of them.
    List {
        #[command(flatten)]
        dir: crate::DirArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused join token, so nobody can link with it.
    Revoke {
        #[command(flatten)]
        dir: crate::DirArg,
        /// The token's id (`isthmus token list`).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum WorkloadCmd {
    /// Create a credential for one identity (namespace and service account):
    /// give it to that workload's sidecar (`--credential-file`). It allows
    /// SVIDs for that identity only, and nothing else.
    Credential {
        #[command(flatten)]
        dir: crate::DirArg,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// The one service the workload may serve [default: the service
        /// account's name].
        #[arg(long)]
        service: Option<String>,
        /// Write it to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// List workload credentials (ids and identities; never the secrets).
    List {
        #[command(flatten)]
        dir: crate::DirArg,
    },
    /// Revoke a workload credential: the workload keeps its current SVID
    /// until it expires, but cannot renew it or register again.
    Revoke {
        #[command(flatten)]
        dir: crate::DirArg,
        /// The credential's id (`isthmus workload list`).
        id: String,
    },
}

pub async fn workload(cmd: WorkloadCmd) -> Result<(), CliError> {
    match cmd {
        WorkloadCmd::Credential {
            dir,
            namespace,
            service_account,
            service,
            out,
        } => {
            let r = create_credential(&dir.dir, &namespace, &service_account, service.as_deref()).await?;
            match out {
                Some(path) => {
                    write_private(&path, &r.credential)?;
                    println!("credential {} for {} written to {}", r.id, r.spiffe_id, path.display());
                }
                None => println!("{}", r.credential),
            }
        }
        WorkloadCmd::List { dir } => {
            let c = connect(&dir.dir).await?;
            let list = c
                .admin()
                .list_workload_credentials(isthmus_proto::ListWorkloadCredentialsRequest {})
                .await?
                .into_inner()
                .credentials;
            let now = isthmus_core::unix_now();
            println!("{:<18} {:<50} {:<16} CREATED", "ID", "IDENTITY", "SERVICE");
            for w in list {
                println!(
                    "{:<18} {:<50} {:<16} {}",
                    w.id,
                    w.spiffe_id,
                    w.service,
                    until(now, w.created_unix)
                );
            }
        }
        WorkloadCmd::Revoke { dir, id } => {
            let c = connect(&dir.dir).await?;
            c.admin()
                .revoke_workload_credential(isthmus_proto::RevokeWorkloadCredentialRequest { id: id.clone() })
                .await?;
            println!("revoked workload credential {id}: renewals and registrations with it are refused");
        }
    }
    Ok(())
}

pub async fn create_credential(
    dir: &Path,
    namespace: &str,
    service_account: &str,
    service: Option<&str>,
) -> Result<isthmus_proto::WorkloadCredentialResponse, CliError> {
    let c = connect(dir).await?;
    Ok(c.admin()
        .create_workload_credential(isthmus_proto::WorkloadCredentialRequest {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            service: service.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner())
}

/// Write a secret to `path`, mode 0600, crash-safely.
pub fn write_private(path: &Path, secret: &str) -> Result<(), CliError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", parent.display())))?;
    }
    isthmus_core::local::write_atomic(path, secret.as_bytes(), true)
        .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", path.display())))
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Rotate the cluster's root: add a new root, switch signing to it once
    /// every linked cluster holds it (workloads renew at once), then retire
    /// the old root. Traffic keeps flowing throughout.
    Rotate {
        #[command(flatten)]
        dir: crate::DirArg,
        /// How long the old root stays trusted after the new one signs
        /// [default: the SVID lifetime, so every old SVID has expired].
        #[arg(long, value_parser = humantime::parse_duration)]
        retire_after: Option<Duration>,
        /// Wait until the rotation is complete, printing each step.
        #[arg(long)]
        wait: bool,
    },
}

pub async fn connect(dir: &Path) -> Result<LocalClient, CliError> {
    Ok(ClusterDir::new(dir).connect().await?)
}

pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            dir,
            ttl,
            uses,
            priority,
        } => {
            let t = create_token(&dir.dir, ttl, uses, priority).await?;
            println!("{t}");
            Ok(())
        }
        TokenCmd::List { dir, json } => {
            let c = connect(&dir.dir).await?;
            let tokens = c.admin().list_tokens(ListTokensRequest {}).await?.into_inner().tokens;
            if json {
                let v: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "state": t.state, "created_unix": t.created_unix,
                            "expires_unix": t.expires_unix, "uses_left": t.uses_left, "used_by": t.used_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::from(v));
                return Ok(());
            }
            if tokens.is_empty() {
                println!("no join tokens (`isthmus token create` makes one)");
                return Ok(());
            }
            let now = isthmus_core::unix_now();
            println!(
                "{:<18} {:<8} {:<16} {:<9} USED BY",
                "ID", "STATE", "EXPIRES", "USES LEFT"
            );
            for t in &tokens {
                let expires = if t.expires_unix > now {
                    format!("in {}", until(now, t.expires_unix))
                } else {
                    until(now, t.expires_unix)
                };
                println!(
                    "{:<18} {:<8} {:<16} {:<9} {}",
                    t.id,
                    t.state,
                    expires,
                    t.uses_left,
                    if t.used_by.is_empty() {
                        "-".into()
                    } else {
                        t.used_by.join(",")
                    }
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { dir, id } => {
            let c = connect(&dir.dir).await?;
            c.admin().revoke_token(RevokeTokenRequest { id: id.clone() }).await?;
            println!("revoked join token {id}: linking with it is refused from now on");
            Ok(())
        }
    }
}

pub async fn unlink(dir: &Path, cluster: &str) -> Result<(), CliError> {
    let c = connect(dir).await?;
    let r = c
        .admin()
        .unlink(UnlinkRequest {
            cluster: cluster.to_string(),
        })
        .await?
        .into_inner();
    println!(
        "unlinked cluster {} from {cluster}: its trust bundle and imports are gone, its calls are refused",
        c.info.cluster
    );
    if !r.peer_notified {
        println!(
            "note: {cluster} was not reachable and still has its side of the link; run `isthmus unlink {}` there",
            c.info.cluster
        );
    }
    Ok(())
}

pub async fn ca(cmd: CaCmd) -> Result<(), CliError> {
    let CaCmd::Rotate {
        dir,
        retire_after,
        wait,
    } = cmd;
    let c = connect(&dir.dir).await?;
    let r = c
        .admin()
        .rotate_ca(RotateCaRequest {
            retire_after_seconds: retire_after.map(|d| d.as_secs().max(1)).unwrap_or(0),
        })
        .await?
        .into_inner();
    let new = r.new_root_fingerprint;
    println!(
        "new root {} staged: it signs once every linked cluster holds it",
        &new[..16]
    );
    if !wait {
        println!("follow it with `isthmus status`");
        return Ok(());
    }
    let mut last = String::new();
    loop {
        let s = c.admin().status(StatusRequest {}).await?.into_inner();
        let phase = s
            .roots
            .iter()
            .find(|r| r.fingerprint == new)
            .map(|r| r.state.clone())
            .ok_or_else(|| CliError::new(exit::FAILURE, "the new root disappeared from the cluster's roots"))?;
        let done = phase == "signing" && s.roots.len() == 1;
        if phase != last || done {
            match (phase.as_str(), done) {
                ("staged", _) => {
                    println!(
                        "waiting for linked clusters to hold the new root: {}",
                        lacking_our_roots(&s).join(", ")
                    );
                }
                ("signing", false) => println!("new root signs; workloads renewed; old root retiring"),
                ("signing", true) => {
                    println!("rotation complete: the old root is retired");
                    return Ok(());
                }
                (other, _) => println!("new root is {other}"),
            }
            last = phase;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn create_token(dir: &Path, ttl: Duration, uses: u32, priority: Option<u32>) -> Result<String, CliError> {
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
            priority: priority.unwrap_or(0),
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

/// Read, check and apply a TrafficPolicy document.
pub async fn apply(dir: &Path, file: &str, delete: bool) -> Result<(), CliError> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| CliError::new(exit::BAD_INPUT, format!("cannot read {file}: {e}")))?;
    let doc: isthmus_core::policy::PolicyDocument = serde_saphyr::from_str(&text)
        .map_err(|e| CliError::new(exit::BAD_INPUT, format!("{file} is not a TrafficPolicy: {e}")))?;
    let policy = doc
        .to_proto()
        .map_err(|e| CliError::new(exit::BAD_INPUT, format!("{file}: {e}")))?;
    let c = connect(dir).await?;
    let key = format!("{}/{}", policy.namespace, policy.service);
    let r = c
        .admin()
        .apply_policy(isthmus_proto::ApplyPolicyRequest {
            policy: Some(policy),
            delete,
        })
        .await?
        .into_inner();
    let what = match (delete, r.changed) {
        (true, true) => "deleted",
        (true, false) => "had no policy to delete",
        (false, true) => "applied",
        (false, false) => "unchanged (already in place)",
    };
    println!("traffic policy for {key} in cluster {}: {what}", c.info.cluster);
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
    let now = isthmus_core::unix_now();
    println!("\nROOTS (trust domain {})", s.trust_domain);
    for r in &s.roots {
        let retire = if r.retire_unix > 0 {
            format!("  leaves the bundle in {}", until(now, r.retire_unix))
        } else {
            String::new()
        };
        println!(
            "  sha256 {}  {:<9} expires in {}{retire}",
            &r.fingerprint[..16],
            r.state,
            until(now, r.not_after_unix)
        );
    }
    println!("  controller SVID expires in {}", until(now, s.svid_expires_unix));
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
            "  {:<12} {:<12} heartbeat {:<10} imports {:<3} trust domain {}  root sha256 {}{}{}  gateway {}",
            l.cluster,
            l.state,
            hb,
            l.imports,
            l.trust_domain,
            &l.bundle_fingerprint.get(..16).unwrap_or(""),
            if l.peer_has_our_roots {
                ""
            } else {
                " (lacks our newest root)"
            },
            if l.priority > 0 {
                format!(" priority {}", l.priority)
            } else {
                String::new()
            },
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
        for c in &svc.conditions {
            println!("    condition: {c}");
        }
    }
    Ok(())
}

/// `at` as time from `now`, for humans.
fn until(now: i64, at: i64) -> String {
    if at <= now {
        format!("{} ago", span(now - at))
    } else {
        span(at - now)
    }
}

/// A duration to the precision a reader needs: `3650d`, `5h07m`, `4m30s`.
fn span(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
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
        "roots": s.roots.iter().map(|r| serde_json::json!({
            "fingerprint": r.fingerprint, "state": r.state, "not_after_unix": r.not_after_unix,
            "retire_unix": r.retire_unix,
        })).collect::<Vec<_>>(),
        "svid_expires_unix": s.svid_expires_unix,
        "links": s.links.iter().map(|l| serde_json::json!({
            "cluster": l.cluster, "trust_domain": l.trust_domain, "state": l.state,
            "heartbeat_age_ms": l.heartbeat_age_ms, "gateway": l.gateway_addr,
            "bundle_fingerprint": l.bundle_fingerprint, "peer_has_our_roots": l.peer_has_our_roots,
            "priority": l.priority,
            "imports": l.imports,
        })).collect::<Vec<_>>(),
        "services": s.services.iter().map(|svc| serde_json::json!({
            "namespace": svc.namespace, "name": svc.name, "port": svc.port, "exported": svc.exported,
            "conditions": svc.conditions,
            "backends": svc.backends.iter().map(|b| serde_json::json!({
                "cluster": b.cluster, "endpoints": b.healthy_endpoints, "identities": b.identities,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Linked clusters that do not hold every root of ours yet.
fn lacking_our_roots(s: &StatusResponse) -> Vec<&str> {
    s.links
        .iter()
        .filter(|l| !l.peer_has_our_roots)
        .map(|l| l.cluster.as_str())
        .collect()
}

/// One finding of `isthmus check`.
struct Finding {
    ok: bool,
    what: String,
    hint: String,
}

/// What `isthmus check` concludes from a status, without I/O (unit-tested).
fn findings(s: &StatusResponse, now: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |ok: bool, what: String, hint: &str| {
        out.push(Finding {
            ok,
            what,
            hint: hint.to_string(),
        })
    };
    add(
        !s.gateway_quic_addr.is_empty(),
        format!("gateway registered (quic {})", or_none(&s.gateway_quic_addr)),
        "start the gateway: `isthmus gateway --dir <cluster dir>` (or `isthmus up`); without it no call crosses clusters",
    );
    // A retiring root is on its way out: its expiry is no longer a concern.
    for r in s.roots.iter().filter(|r| r.state != "retiring") {
        const MONTH: i64 = 30 * 24 * 3600;
        add(
            r.not_after_unix - now > MONTH,
            format!(
                "root {} ({}) expires in {}",
                &r.fingerprint[..16],
                r.state,
                until(now, r.not_after_unix)
            ),
            "rotate it before it expires: `isthmus ca rotate`",
        );
    }
    let lacking = lacking_our_roots(s);
    if let Some(staged) = s.roots.iter().find(|r| r.state == "staged")
        && !lacking.is_empty()
    {
        add(
            false,
            format!(
                "root rotation waits for {} to receive new root {}",
                lacking.join(", "),
                &staged.fingerprint[..16]
            ),
            "the new root signs once every linked cluster holds it: bring those links back up (or unlink them)",
        );
    }
    add(
        s.svid_expires_unix > now,
        format!("controller SVID valid for {}", until(now, s.svid_expires_unix)),
        "the controller renews its SVID at half-life; restart it if this stays expired",
    );
    if s.links.is_empty() {
        add(true, "no links yet".into(), "");
    }
    for l in &s.links {
        let hb = if l.heartbeat_age_ms < 0 {
            "none yet".to_string()
        } else {
            format!("{:.1}s ago", l.heartbeat_age_ms as f64 / 1000.0)
        };
        add(
            l.state == "active",
            format!("link {} is {} (last heartbeat {hb})", l.cluster, l.state),
            match l.state.as_str() {
                "pending" => "the peer has not opened its peering stream yet: is its controller running?",
                _ => {
                    "check that the peer's controller runs and that its peering address is reachable from here (and ours from there); `isthmus status` on the peer"
                }
            },
        );
        // Only an active link reports what it holds.
        if l.state == "active" {
            add(
                l.peer_has_our_roots,
                format!("link {} holds our current roots", l.cluster),
                "bundle updates travel on the peering stream and arrive within a heartbeat; if this persists, check the peer's controller log",
            );
        }
    }
    for svc in &s.services {
        for c in &svc.conditions {
            add(
                false,
                format!("{}/{}: {c}", svc.namespace, svc.name),
                "export the service on the same port in every cluster (KEP-1645 keeps the oldest export's port)",
            );
        }
    }
    out
}

pub async fn check(dir: &Path) -> Result<(), CliError> {
    let s = fetch_status(dir).await.map_err(|e| {
        CliError::new(
            e.code,
            format!(
                "{}\n  hint: is the controller running? `isthmus up --dir {}` or `isthmus controller --dir {}`",
                e.message,
                dir.display(),
                dir.display()
            ),
        )
    })?;
    println!("cluster {} ({}): controller reachable", s.cluster, s.trust_domain);
    let found = findings(&s, isthmus_core::unix_now());
    let problems = found.iter().filter(|f| !f.ok).count();
    for f in &found {
        println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what);
        if !f.ok && !f.hint.is_empty() {
            println!("     hint: {}", f.hint);
        }
    }
    if problems == 0 {
        println!("all {} checks passed", found.len());
        Ok(())
    } else {
        Err(CliError::new(
            exit::FAILURE,
            format!("{problems} of {} checks failed", found.len()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::{Backend, LinkStatus, RootStatus, Service};

    fn healthy(now: i64) -> StatusResponse {
        StatusResponse {
            cluster: "east".into(),
            trust_domain: "east.mesh".into(),
            root_fingerprint: "ab".repeat(32),
            gateway_quic_addr: "127.0.1.2:15443".into(),
            roots: vec![RootStatus {
                fingerprint: "ab".repeat(32),
                state: "signing".into(),
                not_after_unix: now + 3650 * 86400,
                retire_unix: 0,
            }],
            svid_expires_unix: now + 3000,
            links: vec![LinkStatus {
                cluster: "west".into(),
                state: "active".into(),
                heartbeat_age_ms: 300,
                peer_has_our_roots: true,
                ..Default::default()
            }],
            services: vec![Service {
                namespace: "demo".into(),
                name: "echo".into(),
                exported: true,
                backends: vec![Backend {
                    cluster: "east".into(),
                    healthy_endpoints: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn failed(s: &StatusResponse, now: i64) -> Vec<String> {
        findings(s, now).into_iter().filter(|f| !f.ok).map(|f| f.what).collect()
    }

    #[test]
    fn check_finds_each_problem() {
        let now = 1_000_000;
        assert!(failed(&healthy(now), now).is_empty());

        let mut s = healthy(now);
        s.links[0].state = "failing".into();
        s.links[0].heartbeat_age_ms = 12_000;
        assert_eq!(failed(&s, now), ["link west is failing (last heartbeat 12.0s ago)"]);

        let mut s = healthy(now);
        s.gateway_quic_addr.clear();
        s.roots[0].not_after_unix = now + 86400;
        s.services[0].conditions = vec!["PortConflict: cluster west exports port 9090".into()];
        assert_eq!(failed(&s, now).len(), 3);
        // A retiring root near its end is not a problem; a staged root that
        // every peer holds is about to sign, not stuck.
        let mut s = healthy(now);
        s.roots[0].state = "retiring".into();
        s.roots[0].not_after_unix = now + 86400;
        s.roots.push(RootStatus {
            fingerprint: "cd".repeat(32),
            state: "staged".into(),
            not_after_unix: now + 3650 * 86400,
            retire_unix: 0,
        });
        assert!(failed(&s, now).is_empty(), "{:?}", failed(&s, now));

        let mut s = healthy(now);
        s.roots.push(RootStatus {
            fingerprint: "cd".repeat(32),
            state: "staged".into(),
            not_after_unix: now + 3650 * 86400,
            retire_unix: 0,
        });
        s.links[0].peer_has_our_roots = false;
        let f = failed(&s, now);
        assert!(f.iter().any(|w| w.contains("waits for west")), "{f:?}");
        assert!(f.iter().any(|w| w.contains("holds our current roots")), "{f:?}");
    }
}
