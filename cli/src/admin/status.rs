//! `isthmus status`: a cluster's links, trust and services, as a table or
//! JSON, and the small renderers other commands share.

use std::path::Path;

use isthmus_proto::{StatusRequest, StatusResponse};

use super::connect;
use crate::error::CliError;
use crate::kube::Target;

pub async fn fetch_status(dir: &Path) -> Result<StatusResponse, CliError> {
    let c = connect(dir).await?;
    Ok(c.admin().status(StatusRequest {}).await?.into_inner())
}

pub async fn status(target: &Target, json: bool) -> Result<(), CliError> {
    let s = match target {
        Target::Dir(dir) => fetch_status(dir).await?,
        Target::Kube(k) => {
            let (s, age) = k.status().await?;
            if age > crate::kube::STALE_STATUS {
                eprintln!(
                    "warning: this status was published {age}s ago: no controller seems to lead (`isthmus check --kube`)"
                );
            }
            s
        }
    };
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
        if !l.import_scope.is_empty() {
            println!("  {:<12} imports only {}", "", l.import_scope.join(", "));
        }
        if !l.import_problem.is_empty() {
            println!("  {:<12} export list refused: {}", "", l.import_problem);
        }
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
pub(super) fn until(now: i64, at: i64) -> String {
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

pub(super) fn or_none(s: &str) -> &str {
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
pub(super) fn lacking_our_roots(s: &StatusResponse) -> Vec<&str> {
    s.links
        .iter()
        .filter(|l| !l.peer_has_our_roots)
        .map(|l| l.cluster.as_str())
        .collect()
}
