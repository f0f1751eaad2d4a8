//! `TrafficPolicy`: the local mode's policy document as a resource. The
//! reconciler validates it with the same code as `isthmus apply`, hands
//! it to sidecars, and says in `Accepted` whether it did and why not. An
//! invalid edit leaves the last accepted version in force, as a refused
//! `isthmus apply` does. Two policies for one service: the older wins.

use std::sync::Arc;

use futures::StreamExt;
use isthmus_core::naming::ServiceKey;
use isthmus_core::policy::{API_VERSION, KIND, Metadata, PolicyDocument};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;

use super::crds::TrafficPolicy;
use super::reconcile::{Cond, Ctx, FINALIZER, RESYNC, ReconcileError, conditions, created_unix, retry};

pub const ACCEPTED: &str = "Accepted";

/// The service a TrafficPolicy is for: `spec.service`, else its own name.
pub fn target(tp: &TrafficPolicy) -> ServiceKey {
    let ns = tp.metadata.namespace.clone().unwrap_or_default();
    let name = tp.metadata.name.clone().unwrap_or_default();
    ServiceKey::new(&ns, tp.spec.spec.service.as_deref().unwrap_or(&name))
}

/// The policy as sidecars get it, checked as `isthmus apply` checks it.
pub fn to_proto(tp: &TrafficPolicy) -> Result<isthmus_proto::TrafficPolicy, isthmus_core::policy::PolicyError> {
    PolicyDocument {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata {
            name: tp.metadata.name.clone().unwrap_or_default(),
            namespace: tp.metadata.namespace.clone().unwrap_or_default(),
        },
        spec: tp.spec.spec.clone(),
    }
    .to_proto()
}

/// Of the policies for one service, the one in force: the oldest, then by name.
pub fn winner<'a>(candidates: impl Iterator<Item = &'a TrafficPolicy>) -> Option<&'a TrafficPolicy> {
    candidates
        .filter(|tp| tp.metadata.deletion_timestamp.is_none())
        .min_by_key(|tp| (created_unix(&tp.metadata), tp.metadata.name.clone()))
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    Controller::new(
        Api::<TrafficPolicy>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, retry, ctx)
    .for_each(|_| async {})
    .await;
}

async fn reconcile(tp: Arc<TrafficPolicy>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let ns = tp.metadata.namespace.clone().unwrap_or_default();
    let api = Api::<TrafficPolicy>::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, tp, |event| async {
        match event {
            Event::Apply(tp) => apply(&tp, &ctx, &api).await,
            Event::Cleanup(tp) => {
                let key = target(&tp);
                // The service's policy goes only if this one was in force.
                let others = api.list(&ListParams::default()).await?;
                let next = winner(
                    others
                        .items
                        .iter()
                        .filter(|o| target(o) == key && o.metadata.uid != tp.metadata.uid),
                );
                let next = next.and_then(|o| to_proto(o).ok());
                let changed = ctx
                    .shared
                    .absorb(|state| {
                        let before = state.policies.get(&key).cloned();
                        match &next {
                            Some(p) => state.set_policy(p),
                            None => {
                                state.policies.remove(&key);
                            }
                        }
                        state.policies.get(&key) != before.as_ref()
                    })
                    .await;
                if changed {
                    ctx.shared.metrics.policy_changes.inc();
                    tracing::info!(service = %key, "traffic policy removed (TrafficPolicy deleted)");
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(ReconcileError::from)
}

async fn apply(tp: &TrafficPolicy, ctx: &Ctx, api: &Api<TrafficPolicy>) -> Result<Action, ReconcileError> {
    let key = target(tp);
    let name = tp.metadata.name.clone().unwrap_or_default();
    let all = api.list(&ListParams::default()).await?;
    // A policy whose `spec.service` was edited leaves its old service: a
    // service of this namespace that no TrafficPolicy names has none.
    let ns = tp.metadata.namespace.clone().unwrap_or_default();
    let named: Vec<ServiceKey> = all.items.iter().map(target).collect();
    ctx.shared
        .absorb(|state| {
            let before = state.policies.len();
            state.policies.retain(|k, _| k.namespace != ns || named.contains(k));
            state.policies.len() != before
        })
        .await;
    let cond = match to_proto(tp) {
        Err(e) => {
            let in_force = ctx.shared.state.lock().expect("state lock").policies.contains_key(&key);
            Cond::new(
                ACCEPTED,
                false,
                "Invalid",
                if in_force {
                    format!("{e}; the last accepted policy for {key} stays in force")
                } else {
                    e.to_string()
                },
            )
        }
        Ok(p) => {
            let w = winner(all.items.iter().filter(|o| target(o) == key));
            match w.filter(|w| w.metadata.uid != tp.metadata.uid) {
                Some(other) => Cond::new(
                    ACCEPTED,
                    false,
                    "Conflict",
                    format!(
                        "TrafficPolicy {} sets the policy of {key} already (the oldest wins)",
                        other.metadata.name.as_deref().unwrap_or_default()
                    ),
                ),
                None => {
                    let changed = ctx
                        .shared
                        .absorb(|state| {
                            let before = state.policies.get(&key).cloned();
                            state.set_policy(&p);
                            state.policies.get(&key) != before.as_ref()
                        })
                        .await;
                    if changed {
                        ctx.shared.metrics.policy_changes.inc();
                        tracing::info!(service = %key, policy = %name, "traffic policy applied (TrafficPolicy)");
                    }
                    Cond::new(ACCEPTED, true, "Accepted", format!("in force for {key}"))
                }
            }
        }
    };
    let previous = tp.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    if let Some(next) = conditions(previous, &[cond], tp.metadata.generation) {
        let patch = serde_json::json!({ "status": { "conditions": next } });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crds::TrafficPolicySpec;
    use crate::k8s::fake::{Fake, condition};

    const LIST: &str = "/apis/isthmus.dev/v1alpha1/namespaces/demo/trafficpolicies";

    async fn reconciled(fake: &mut Fake, tp: TrafficPolicy) -> serde_json::Value {
        let mut tp = tp;
        tp.metadata.finalizers = Some(vec![FINALIZER.into()]);
        tp.metadata.generation = Some(3);
        let list = serde_json::json!({
            "apiVersion": "isthmus.dev/v1alpha1", "kind": "TrafficPolicyList", "metadata": {},
            "items": [serde_json::to_value(&tp).unwrap()]
        });
        let task = tokio::spawn(reconcile(Arc::new(tp.clone()), fake.ctx.clone()));
        fake.answer("GET", LIST, 200, list).await;
        let name = tp.metadata.name.clone().unwrap();
        let patch = fake
            .answer(
                "PATCH",
                &format!("{LIST}/{name}/status"),
                200,
                serde_json::to_value(&tp).unwrap(),
            )
            .await;
        task.await.unwrap().expect("reconciled");
        assert_eq!(patch.body["status"]["conditions"][0]["observedGeneration"], 3);
        patch.body
    }

    #[tokio::test]
    async fn a_valid_policy_reaches_sidecars_and_says_accepted() {
        let mut fake = Fake::new().await;
        let tp = policy("echo", None, 1, "routes:\n- split:\n  - cluster: west\n    weight: 1\n");
        let status = reconciled(&mut fake, tp).await;
        assert_eq!(condition(&status, ACCEPTED).0, "True");
        let key = ServiceKey::new("demo", "echo");
        let applied = fake.ctx.shared.state.lock().unwrap().policy(&key).expect("in force");
        assert_eq!(applied.routes[0].split[0].cluster, "west");
    }

    #[tokio::test]
    async fn an_invalid_policy_is_refused_with_the_field_named() {
        let mut fake = Fake::new().await;
        let tp = policy("echo", None, 1, "routes:\n- split:\n  - cluster: west\n    weight: 0\n");
        let status = reconciled(&mut fake, tp).await;
        let (accepted, reason, message) = condition(&status, ACCEPTED);
        assert_eq!((accepted.as_str(), reason.as_str()), ("False", "Invalid"));
        assert!(message.contains("spec.routes[0].split[0].weight"), "{message}");
        assert!(fake.ctx.shared.state.lock().unwrap().policies.is_empty());
    }

    fn policy(name: &str, service: Option<&str>, created: i64, yaml: &str) -> TrafficPolicy {
        let mut spec: isthmus_core::policy::Spec = serde_saphyr::from_str(yaml).expect("spec");
        spec.service = service.map(str::to_string);
        let mut tp = TrafficPolicy::new(name, TrafficPolicySpec { spec });
        tp.metadata.namespace = Some("demo".into());
        tp.metadata.uid = Some(format!("uid-{name}"));
        tp.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        tp
    }

    #[test]
    fn a_policy_is_checked_as_isthmus_apply_checks_it() {
        let ok = policy(
            "echo",
            None,
            1,
            "routes:\n- split:\n  - cluster: east\n    weight: 90\n  - cluster: west\n    weight: 10\n",
        );
        let p = to_proto(&ok).expect("valid");
        assert_eq!((p.namespace.as_str(), p.service.as_str()), ("demo", "echo"));
        let bad = policy("echo", None, 1, "routes:\n- split:\n  - cluster: east\n    weight: 0\n");
        let e = to_proto(&bad).expect_err("weight 0");
        assert!(e.to_string().contains("spec.routes[0].split[0].weight"), "{e}");
    }

    #[test]
    fn the_oldest_policy_for_a_service_wins() {
        let a = policy("a", Some("echo"), 20, "{}");
        let b = policy("b", Some("echo"), 10, "{}");
        let c = policy("echo", None, 10, "{}");
        assert_eq!(target(&a), target(&c));
        let all = [a, b, c];
        let w = winner(all.iter()).expect("one wins");
        assert_eq!(w.metadata.name.as_deref(), Some("b"), "oldest, then by name");
    }
}
