//! Workload credentials: `isthmus workload credential|list|revoke`.

use std::path::Path;

use clap::Subcommand;

use super::connect;
use super::status::until;
use crate::error::{CliError, exit};
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
