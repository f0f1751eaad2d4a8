//! `Link`: one per linked cluster, named after it. `isthmus link` creates
//! one naming a Secret that holds the join token; this reconciler spends
//! the token (the same join as in local mode), deletes the Secret, and
//! keeps the status in step with the link: state, last heartbeat, the
//! peer's trust domain and root fingerprints. Deleting a Link unlinks
//! (the finalizer ends the link on both sides); a link the other cluster
//! ended takes its Link away.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use isthmus_core::identity;
use isthmus_core::token::JoinToken;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;

use super::crds::{Link, LinkStatus};
use super::reconcile::{Cond, Ctx, FINALIZER, ReconcileError, conditions, is_true, mesh_changes, retry};
use crate::join::LinkError;
use crate::peering;
use crate::shared::Shared;

pub const LINKED: &str = "Linked";
/// False when the Link's import scope is invalid or the peer's export
/// list is over a limit (the reason says which).
pub const IMPORTS_ACCEPTED: &str = "ImportsAccepted";
/// How often a Link's status is refreshed while nothing else changes.
const REFRESH: Duration = Duration::from_secs(5);
/// The heartbeat shown is rewritten once it is this much behind.
const HEARTBEAT_SLACK: i64 = 10;

/// The reason a failed join gives in the `Linked` condition.
pub fn reason(e: &LinkError) -> &'static str {
    e.failure().reason()
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    Controller::new(Api::<Link>::all(ctx.client.clone()), watcher::Config::default())
        .reconcile_all_on(mesh_changes(&ctx.shared, Duration::from_millis(500)))
        .run(reconcile, retry, ctx)
        .for_each(|_| async {})
        .await;
}

async fn reconcile(link: Arc<Link>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let api = Api::<Link>::all(ctx.client.clone());
    finalizer(&api, FINALIZER, link, |event| async {
        match event {
            Event::Apply(link) => apply(&link, &ctx, &api).await,
            Event::Cleanup(link) => {
                let peer = link.metadata.name.clone().unwrap_or_default();
                peering::remove_link(&ctx.shared, &peer, "its Link was deleted").await;
                if let Some(secret) = &link.spec.token_secret {
                    delete_secret(&ctx, secret).await?;
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(ReconcileError::from)
}

async fn apply(link: &Link, ctx: &Ctx, api: &Api<Link>) -> Result<Action, ReconcileError> {
    let peer = link.metadata.name.clone().unwrap_or_default();
    let previous = link.status.clone().unwrap_or_default();
    let linked = ctx.shared.state.lock().expect("state lock").links.contains_key(&peer);
    // The spec's import scope is the link's, validated whole.
    let scope = if linked {
        match peering::set_imports(&ctx.shared, &peer, link.spec.imports.clone()).await {
            Ok(()) => None,
            Err(e) => Some(Cond::new(IMPORTS_ACCEPTED, false, "InvalidScope", e.message())),
        }
    } else {
        None
    };
    let mut next = if linked {
        observe(&ctx.shared, &peer)
    } else {
        LinkStatus::default()
    };
    let cond = if linked {
        if let Some(secret) = &link.spec.token_secret {
            delete_secret(ctx, secret).await?;
        }
        Cond::new(LINKED, true, "Linked", format!("linked with cluster {peer}"))
    } else if is_true(&previous.conditions, LINKED) {
        // Linked once, and not now: the other cluster ended the link.
        tracing::info!(%peer, "the link ended: deleting its Link");
        api.delete(&peer, &DeleteParams::default()).await?;
        return Ok(Action::await_change());
    } else {
        match &link.spec.token_secret {
            None => Cond::new(
                LINKED,
                false,
                "NoToken",
                "this Link names no join token Secret; `isthmus link <token>` makes both",
            ),
            Some(secret) => match spend(ctx, &peer, secret).await? {
                Spent::Linked => {
                    next = observe(&ctx.shared, &peer);
                    Cond::new(LINKED, true, "Linked", format!("linked with cluster {peer}"))
                }
                // Already decided for this generation: the Secret is gone,
                // and the reason stays what it was.
                Spent::Gone
                    if previous
                        .conditions
                        .iter()
                        .any(|c| c.observed_generation == link.metadata.generation) =>
                {
                    return Ok(Action::requeue(REFRESH));
                }
                Spent::Gone => Cond::new(
                    LINKED,
                    false,
                    "NoToken",
                    format!("there is no Secret {secret} in {} with the join token", ctx.namespace),
                ),
                Spent::Failed(e) => Cond::new(LINKED, false, reason(&e), e.to_string()),
            },
        }
    };
    let mut decided = vec![cond];
    if linked {
        decided.push(scope.unwrap_or_else(|| match next.import_problem.take() {
            Some(p) => Cond::new(IMPORTS_ACCEPTED, false, import_reason(&p), p),
            None => Cond::new(
                IMPORTS_ACCEPTED,
                true,
                "Accepted",
                format!("{} services imported from {peer}", next.imports),
            ),
        }));
    }
    let conds = conditions(&previous.conditions, &decided, link.metadata.generation);
    next.conditions = conds.clone().unwrap_or(previous.conditions.clone());
    if conds.is_some() || worth_writing(&previous, &next) {
        let patch = serde_json::json!({ "status": next });
        api.patch_status(&peer, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(Action::requeue(REFRESH))
}

enum Spent {
    Linked,
    /// No Secret: spent and deleted before, or never made.
    Gone,
    Failed(LinkError),
}

/// Spend the join token in `secret` to link with `peer`. The Secret is
/// deleted once the answer is final; a peer that cannot be reached is
/// tried again at the next reconcile.
async fn spend(ctx: &Ctx, peer: &str, secret: &str) -> Result<Spent, kube::Error> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace);
    let Some(s) = secrets.get_opt(secret).await? else {
        return Ok(Spent::Gone);
    };
    let text = s
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .unwrap_or_default();
    let joined = match JoinToken::decode(&text) {
        Ok(tok) if tok.cluster != peer => Err(LinkError::MisnamedLink {
            link: peer.to_string(),
            issuer: tok.cluster,
        }),
        Ok(tok) => peering::join(ctx.shared.clone(), &tok).await.map(|_| ()),
        Err(e) => Err(LinkError::from(e)),
    };
    ctx.shared.metrics.link_attempt(match &joined {
        Ok(()) => "linked",
        Err(e) => e.label(),
    });
    match joined {
        Ok(()) => {
            delete_secret(ctx, secret).await?;
            Ok(Spent::Linked)
        }
        Err(e) if e.failure() == crate::join::LinkFailure::Unreachable => {
            tracing::warn!(%peer, error = %e, "cannot reach the issuer yet; trying again");
            Ok(Spent::Failed(e))
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "link refused");
            delete_secret(ctx, secret).await?;
            Ok(Spent::Failed(e))
        }
    }
}

async fn delete_secret(ctx: &Ctx, name: &str) -> Result<(), kube::Error> {
    match Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The link with `peer` as this controller sees it now.
pub(crate) fn observe(shared: &Shared, peer: &str) -> LinkStatus {
    let status = shared.status();
    let Some(l) = status.links.iter().find(|l| l.cluster == peer) else {
        return LinkStatus::default();
    };
    let roots = shared
        .state
        .lock()
        .expect("state lock")
        .links
        .get(peer)
        .and_then(|r| identity::certs_from_pem(&r.roots_pem).ok())
        .unwrap_or_default();
    LinkStatus {
        state: Some(l.state.clone()),
        last_heartbeat: (l.heartbeat_age_ms >= 0).then(|| {
            let at = isthmus_core::unix_now() - l.heartbeat_age_ms / 1000;
            k8s_openapi::jiff::Timestamp::from_second(at)
                .map(|t| t.to_string())
                .unwrap_or_default()
        }),
        trust_domain: Some(l.trust_domain.clone()),
        root_fingerprints: roots
            .iter()
            .map(|r| identity::fingerprint(r)[..16].to_string())
            .collect(),
        gateway: Some(l.gateway_addr.clone()).filter(|g| !g.is_empty()),
        peer_holds_our_roots: l.peer_has_our_roots,
        imports: l.imports,
        import_scope: l.import_scope.clone(),
        import_problem: Some(l.import_problem.clone()).filter(|p| !p.is_empty()),
        conditions: vec![],
    }
}

/// The condition reason of an import problem, as its text (from the
/// controller's status) starts (`imports::ImportProblem`).
fn import_reason(problem: &str) -> &'static str {
    crate::imports::ImportProblem::REASONS
        .into_iter()
        .find(|r| problem.starts_with(r))
        .unwrap_or("Refused")
}

/// Whether a status differs from the last written one enough to write:
/// anything but the heartbeat, or the heartbeat once it is well behind.
pub fn worth_writing(old: &LinkStatus, new: &LinkStatus) -> bool {
    let secs = |s: &LinkStatus| {
        s.last_heartbeat
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map(|t| t.as_second())
    };
    let behind = match (secs(old), secs(new)) {
        (Some(a), Some(b)) => b - a >= HEARTBEAT_SLACK,
        (a, b) => a != b,
    };
    let same_but_heartbeat = LinkStatus {
        last_heartbeat: new.last_heartbeat.clone(),
        ..old.clone()
    } == *new;
    behind || !same_but_heartbeat
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crds::LinkSpec;
    use crate::k8s::fake::{Fake, condition};

    fn link(secret: Option<&str>) -> Link {
        let mut l = Link::new(
            "west",
            LinkSpec {
                token_secret: secret.map(str::to_string),
                imports: Vec::new(),
            },
        );
        l.metadata.finalizers = Some(vec![FINALIZER.into()]);
        l.metadata.generation = Some(1);
        l
    }

    /// Answer the Link's status patch; what it wrote.
    async fn status_patch(fake: &mut Fake) -> crate::k8s::fake::Seen {
        let answer = serde_json::to_value(link(None)).unwrap();
        fake.answer("PATCH", "/apis/isthmus.dev/v1alpha1/links/west/status", 200, answer)
            .await
    }

    #[tokio::test]
    async fn a_link_without_a_token_says_so() {
        let mut fake = Fake::new().await;
        let task = tokio::spawn(reconcile(Arc::new(link(None)), fake.ctx.clone()));
        let patch = status_patch(&mut fake).await;
        task.await.unwrap().expect("reconciled");
        let (status, reason, _) = condition(&patch.body, LINKED);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "NoToken"));
    }

    #[tokio::test]
    async fn a_malformed_token_is_refused_and_its_secret_deleted() {
        let mut fake = Fake::new().await;
        let secret = "/api/v1/namespaces/isthmus-system/secrets/isthmus-link-1";
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "isthmus-link-1"},
            "data": {"token": "bm90LWEtdG9rZW4="}
        });
        let task = tokio::spawn(reconcile(Arc::new(link(Some("isthmus-link-1"))), fake.ctx.clone()));
        fake.answer("GET", secret, 200, body.clone()).await;
        fake.answer("DELETE", secret, 200, body).await;
        let patch = status_patch(&mut fake).await;
        task.await.unwrap().expect("reconciled");
        let (status, reason, message) = condition(&patch.body, LINKED);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Malformed"), "{message}");
        assert!(fake.ctx.shared.state.lock().unwrap().links.is_empty());
    }

    #[test]
    fn heartbeats_alone_are_written_only_when_well_behind() {
        let at = |t: &str| LinkStatus {
            state: Some("active".into()),
            last_heartbeat: Some(t.into()),
            ..Default::default()
        };
        assert!(!worth_writing(&at("2026-11-30T10:00:00Z"), &at("2026-11-30T10:00:05Z")));
        assert!(worth_writing(&at("2026-11-30T10:00:00Z"), &at("2026-11-30T10:00:10Z")));
        let mut failing = at("2026-11-30T10:00:01Z");
        failing.state = Some("failing".into());
        assert!(worth_writing(&at("2026-11-30T10:00:00Z"), &failing));
        assert!(worth_writing(&LinkStatus::default(), &at("2026-11-30T10:00:00Z")));
    }

    #[test]
    fn join_failures_have_condition_reasons() {
        let e = LinkError::from(JoinToken::decode("not-a-token").expect_err("malformed"));
        assert_eq!(reason(&e), "Malformed");
        let e = LinkError::MisnamedLink {
            link: "west".into(),
            issuer: "east".into(),
        };
        assert_eq!(reason(&e), "Refused");
        let e = LinkError::Unreachable {
            cluster: "east".into(),
            addr: "127.0.0.1:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(reason(&e), "Unreachable");
    }
}
