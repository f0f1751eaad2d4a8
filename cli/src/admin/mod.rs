//! Commands that talk to a cluster's controller, one file per concern:
//! join tokens and links (`token.rs`), workload credentials
//! (`workload.rs`), root rotation (`ca.rs`), exports and policies
//! (`service.rs`), status (`status.rs`) and `isthmus check` (`check.rs`).

use std::path::Path;

use isthmus_core::local::{ClusterDir, LocalClient};

use crate::error::CliError;

mod ca;
mod check;
mod service;
mod status;
mod token;
mod workload;

pub use ca::{CaCmd, ca};
pub use check::{Finding, check};
pub use service::{apply, export};
pub use status::{fetch_status, status};
pub use token::{TokenCmd, create_token, link, set_imports, token, unlink};
pub use workload::{WorkloadCmd, create_credential, workload, write_private};

pub async fn connect(dir: &Path) -> Result<LocalClient, CliError> {
    Ok(ClusterDir::new(dir).connect().await?)
}

/// The text of `file`, or of standard input for "-" (a join token or a
/// policy: what should not be on a command line or is long).
pub fn read_input(file: &str) -> Result<String, CliError> {
    if file == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| CliError::new(crate::error::exit::BAD_INPUT, format!("cannot read {file}: {e}")))
}
