//! Join tokens and links on Kubernetes. A token is made here, its record
//! (the secret only as a hash) written as a Secret the controller reads
//! when a peer spends it; a link is a `Link` naming a Secret with the
//! token, which the controller spends.

use std::time::Duration;

use isthmus_controller::join::{self, LinkError};
use isthmus_controller::k8s::crds::{Link, LinkSpec};
use isthmus_controller::k8s::link::{IMPORTS_ACCEPTED, LINKED};
use isthmus_controller::k8s::store::{TOKEN_LABEL, TOKEN_PREFIX, token_secret};
use isthmus_controller::state::TokenRecord;
use isthmus_core::token::JoinToken;
use isthmus_proto::TokenInfo;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use super::{Kube, api_error, condition, no_answer, wait_for};
use crate::error::{CliError, exit};

/// How long `isthmus link` waits for the controller to spend the token.
const LINK_WAIT: Duration = Duration::from_secs(60);

fn secrets(k: &Kube) -> Api<Secret> {
    Api::namespaced(k.client.clone(), &k.namespace)
}

pub async fn create(k: &Kube, ttl: Duration, uses: u32, priority: Option<u32>) -> Result<String, CliError> {
    let info = k.join_info().await?;
    let now = isthmus_core::unix_now();
    let (tok, rec) =
        join::issue(&info, ttl, uses, priority, now).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    secrets(k)
        .create(&PostParams::default(), &token_secret(&rec))
        .await
        .map_err(|e| api_error("writing the join token's Secret", e))?;
    // Tokens that can never be used again go, as in local mode.
    for (rec, _) in records(k).await? {
        if join::forgotten(&rec, now) {
            let _ = secrets(k)
                .delete(&format!("{TOKEN_PREFIX}{}", rec.id), &DeleteParams::default())
                .await;
        }
    }
    Ok(tok.encode())
}

/// Every join token's record, with its Secret's resourceVersion.
async fn records(k: &Kube) -> Result<Vec<(TokenRecord, Option<String>)>, CliError> {
    let list = secrets(k)
        .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
        .await
        .map_err(|e| api_error("listing join tokens", e))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|s| {
            let rec = s.data.as_ref()?.get("record.json")?;
            Some((serde_json::from_slice(&rec.0).ok()?, s.metadata.resource_version))
        })
        .collect())
}

pub async fn list(k: &Kube) -> Result<Vec<TokenInfo>, CliError> {
    let signer = k.join_info().await?.root_fingerprint;
    let now = isthmus_core::unix_now();
    let mut out: Vec<TokenInfo> = records(k)
        .await?
        .into_iter()
        .map(|(t, _)| TokenInfo {
            state: t.state(now, &signer).to_string(),
            id: t.id,
            created_unix: t.created_unix,
            expires_unix: t.expires_unix,
            uses_left: t.uses_left,
            used_by: t.used_by,
        })
        .collect();
    out.sort_by_key(|t| t.created_unix);
    Ok(out)
}

pub async fn revoke(k: &Kube, id: &str) -> Result<(), CliError> {
    let signer = k.join_info().await?.root_fingerprint;
    let Some((mut rec, rv)) = records(k).await?.into_iter().find(|(r, _)| r.id == id) else {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("no join token {id:?} (`isthmus token list --kube` shows them)"),
        ));
    };
    match rec.state(isthmus_core::unix_now(), &signer) {
        "usable" => {}
        other => {
            return Err(CliError::new(
                exit::REFUSED,
                format!("join token {id} is {other} already: it cannot be used to link"),
            ));
        }
    }
    rec.revoked = true;
    let mut secret = token_secret(&rec);
    // Guarded by the version read: a join spending it meanwhile wins.
    secret.metadata.resource_version = rv;
    secrets(k)
        .replace(&format!("{TOKEN_PREFIX}{id}"), &PostParams::default(), &secret)
        .await
        .map_err(|e| {
            api_error(
                &format!("revoking join token {id} (it changed meanwhile? try again)"),
                e,
            )
        })?;
    Ok(())
}

/// The exit code of a join refused with `reason` (a `Linked` condition).
fn link_exit(reason: &str) -> u8 {
    match reason {
        "Malformed" => exit::BAD_INPUT,
        "Unreachable" => exit::UNREACHABLE,
        "NoToken" => exit::NOT_FOUND,
        _ => exit::REFUSED,
    }
}

pub async fn link(k: &Kube, token: &str) -> Result<(), CliError> {
    let token = token.trim();
    let tok = JoinToken::decode(token).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let own = k.join_info().await?;
    let nothing_linked = isthmus_controller::State::new(&own.cluster, &own.trust_domain);
    join::check_token_here(&own.cluster, &own.trust_domain, &nothing_linked, &tok)
        .map_err(|e: LinkError| CliError::new(exit::REFUSED, e.to_string()))?;
    let links = Api::<Link>::all(k.client.clone());
    let existing = links
        .get_opt(&tok.cluster)
        .await
        .map_err(|e| api_error("reading Links (are the Isthmus CRDs installed?)", e))?;
    if let Some(l) = &existing
        && l.status
            .as_ref()
            .is_some_and(|s| isthmus_controller::k8s::reconcile::is_true(&s.conditions, LINKED))
    {
        return Err(CliError::new(
            exit::REFUSED,
            format!("cluster {} is already linked ({})", tok.cluster, tok.trust_domain),
        ));
    }
    // The token goes in a Secret of its own, which the controller deletes
    // once spent; the Link names it.
    let secret_name = format!("isthmus-link-{}", tok.id);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.clone()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "isthmus".to_string())].into()),
            ..Default::default()
        },
        data: Some([("token".to_string(), ByteString(token.as_bytes().to_vec()))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    secrets(k)
        .patch(
            &secret_name,
            &PatchParams::apply("isthmus-cli").force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| api_error("writing the join token's Secret", e))?;
    let link = Link::new(
        &tok.cluster,
        LinkSpec {
            token_secret: Some(secret_name),
            imports: Vec::new(),
        },
    );
    let applied = links
        .patch(
            &tok.cluster,
            &PatchParams::apply("isthmus-cli").force(),
            &Patch::Apply(&link),
        )
        .await
        .map_err(|e| api_error(&format!("writing Link {}", tok.cluster), e))?;
    let generation = applied.metadata.generation;
    let decided = wait_for(LINK_WAIT, || async {
        let l = links
            .get_opt(&tok.cluster)
            .await
            .map_err(|e| api_error("reading the Link", e))?;
        Ok(l.and_then(|l| {
            let conds = l.status?.conditions;
            condition(&conds, LINKED, generation).cloned()
        }))
    })
    .await?
    .ok_or_else(|| no_answer(k, &format!("Link {}", tok.cluster), LINK_WAIT))?;
    if decided.status != "True" {
        return Err(CliError::new(link_exit(&decided.reason), decided.message));
    }
    println!(
        "linked cluster {} with cluster {} (trust domain {})",
        own.cluster, tok.cluster, tok.trust_domain
    );
    Ok(())
}

pub async fn unlink(k: &Kube, cluster: &str) -> Result<(), CliError> {
    let links = Api::<Link>::all(k.client.clone());
    let own = k.join_info().await?;
    let Some(link) = links
        .get_opt(cluster)
        .await
        .map_err(|e| api_error("reading Links", e))?
    else {
        let known: Vec<String> = links
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("listing Links", e))?
            .items
            .into_iter()
            .filter_map(|l| l.metadata.name)
            .collect();
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "cluster {} has no link with {cluster:?} (links: {})",
                own.cluster,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        ));
    };
    let was_active = link.status.as_ref().and_then(|s| s.state.as_deref()) == Some("active");
    links
        .delete(cluster, &DeleteParams::default())
        .await
        .map_err(|e| api_error(&format!("deleting Link {cluster}"), e))?;
    let wait = Duration::from_secs(30);
    wait_for(wait, || async {
        let gone = links
            .get_opt(cluster)
            .await
            .map_err(|e| api_error("reading the Link", e))?
            .is_none();
        Ok(gone.then_some(()))
    })
    .await?
    .ok_or_else(|| no_answer(k, &format!("the deletion of Link {cluster}"), wait))?;
    println!(
        "unlinked cluster {} from {cluster}: its trust bundle and imports are gone, its calls are refused",
        own.cluster
    );
    if !was_active {
        println!(
            "note: {cluster} was not reachable and may still have its side of the link; run `isthmus unlink {}` there",
            own.cluster
        );
    }
    Ok(())
}

/// Set the Link's import scope and wait for the controller to take it.
pub async fn set_imports(k: &Kube, cluster: &str, patterns: &[String]) -> Result<(), CliError> {
    let links = Api::<Link>::all(k.client.clone());
    let patch = serde_json::json!({ "spec": { "imports": if patterns.is_empty() { None } else { Some(patterns) } } });
    let patched = links
        .patch(cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            api_error(
                &format!("setting the imports of Link {cluster} (`isthmus status` lists links)"),
                e,
            )
        })?;
    let generation = patched.metadata.generation;
    let wait = Duration::from_secs(30);
    let decided = wait_for(wait, || async {
        let l = links
            .get_opt(cluster)
            .await
            .map_err(|e| api_error("reading the Link", e))?;
        Ok(l.and_then(|l| condition(&l.status?.conditions, IMPORTS_ACCEPTED, generation).cloned()))
    })
    .await?
    .ok_or_else(|| no_answer(k, &format!("the imports of Link {cluster}"), wait))?;
    if decided.reason == "InvalidScope" {
        return Err(CliError::new(exit::BAD_INPUT, decided.message));
    }
    Ok(())
}
