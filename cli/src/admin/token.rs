//! Join tokens and links: `isthmus token`, `link`, `unlink`.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use isthmus_proto::{
    CreateTokenRequest, LinkRequest, ListTokensRequest, RevokeTokenRequest, SetImportsRequest, UnlinkRequest,
};

use super::connect;
use super::status::until;
use crate::error::{CliError, exit};
use crate::kube::Target;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token. Give it to `isthmus link` on the other cluster.
    Create {
        #[command(flatten)]
        target: crate::kube::TargetArgs,
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
        target: crate::kube::TargetArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused join token, so nobody can link with it.
    Revoke {
        #[command(flatten)]
        target: crate::kube::TargetArgs,
        /// The token's id (`isthmus token list`).
        id: String,
    },
}

pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            target,
            ttl,
            uses,
            priority,
        } => {
            check_token_args(ttl, uses)?;
            let t = match target.resolve().await? {
                Target::Dir(dir) => create_token(&dir, ttl, uses, priority).await?,
                Target::Kube(k) => crate::kube::tokens::create(&k, ttl, uses, priority).await?,
            };
            println!("{t}");
            Ok(())
        }
        TokenCmd::List { target, json } => {
            let tokens = match target.resolve().await? {
                Target::Dir(dir) => {
                    let c = connect(&dir).await?;
                    c.admin().list_tokens(ListTokensRequest {}).await?.into_inner().tokens
                }
                Target::Kube(k) => crate::kube::tokens::list(&k).await?,
            };
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
        TokenCmd::Revoke { target, id } => {
            match target.resolve().await? {
                Target::Dir(dir) => {
                    let c = connect(&dir).await?;
                    c.admin().revoke_token(RevokeTokenRequest { id: id.clone() }).await?;
                }
                Target::Kube(k) => crate::kube::tokens::revoke(&k, &id).await?,
            }
            println!("revoked join token {id}: linking with it is refused from now on");
            Ok(())
        }
    }
}

fn check_token_args(ttl: Duration, uses: u32) -> Result<(), CliError> {
    if uses == 0 {
        return Err(CliError::new(exit::BAD_INPUT, "--uses must be at least 1"));
    }
    if ttl < Duration::from_secs(1) {
        return Err(CliError::new(exit::BAD_INPUT, "--ttl must be at least 1s"));
    }
    Ok(())
}

pub async fn create_token(dir: &Path, ttl: Duration, uses: u32, priority: Option<u32>) -> Result<String, CliError> {
    check_token_args(ttl, uses)?;
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

pub async fn link(target: &Target, token: &str) -> Result<(), CliError> {
    // Catch a garbled token before bothering the controller.
    isthmus_core::token::JoinToken::decode(token).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let dir = match target {
        Target::Dir(dir) => dir,
        Target::Kube(k) => return crate::kube::tokens::link(k, token).await,
    };
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

pub async fn unlink(target: &Target, cluster: &str) -> Result<(), CliError> {
    let dir = match target {
        Target::Dir(dir) => dir,
        Target::Kube(k) => return crate::kube::tokens::unlink(k, cluster).await,
    };
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

/// Set the import scope of the link with `cluster`: which of its exports
/// this cluster accepts. No patterns: back to the default.
pub async fn set_imports(target: &Target, cluster: &str, patterns: &[String]) -> Result<(), CliError> {
    for p in patterns {
        isthmus_core::naming::ImportPattern::parse(p).map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("import pattern: {e}; use namespace/name, namespace/* or *"),
            )
        })?;
    }
    match target {
        Target::Kube(k) => crate::kube::tokens::set_imports(k, cluster, patterns).await?,
        Target::Dir(dir) => {
            connect(dir)
                .await?
                .admin()
                .set_imports(SetImportsRequest {
                    cluster: cluster.to_string(),
                    imports: patterns.to_vec(),
                })
                .await?;
        }
    }
    if patterns.is_empty() {
        println!(
            "link with {cluster} imports the default: what {cluster} exports, except services that run here unexported"
        );
    } else {
        println!("link with {cluster} imports only {}", patterns.join(", "));
    }
    Ok(())
}
