//! `isthmus check`: verify a cluster and say what to fix. The findings
//! are a pure function of its status (unit-tested).

use isthmus_core::naming::ServiceKey;
use isthmus_proto::StatusResponse;

use super::status::{fetch_status, lacking_our_roots, or_none, until};
use crate::error::{CliError, exit};
use crate::kube::Target;

/// One finding of `isthmus check`.
pub struct Finding {
    ok: bool,
    what: String,
    hint: String,
}

impl Finding {
    pub fn new(ok: bool, what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            ok,
            what: what.into(),
            hint: hint.into(),
        }
    }
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
                format!("{}: {c}", ServiceKey::new(&svc.namespace, &svc.name)),
                if c.starts_with("NotImported") {
                    "to make them one service, export it here too or import it from that cluster (`isthmus imports`); else rename one"
                } else {
                    "export the service on the same port in every cluster (KEP-1645 keeps the oldest export's port)"
                },
            );
        }
    }
    out
}

pub async fn check(target: &Target) -> Result<(), CliError> {
    let mut found = Vec::new();
    let status = match target {
        Target::Dir(dir) => {
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
            Some(s)
        }
        Target::Kube(k) => {
            println!("Kubernetes ({}), controller namespace {}", k.context, k.namespace);
            let (kube_found, s) = crate::kube::check::findings(k).await?;
            found = kube_found;
            s
        }
    };
    if let Some(s) = &status {
        found.extend(findings(s, isthmus_core::unix_now()));
    }
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
