//! Root rotation: `isthmus ca rotate`.

use std::time::Duration;

use clap::Subcommand;
use isthmus_proto::{RotateCaRequest, StatusRequest};

use super::connect;
use super::status::lacking_our_roots;
use crate::error::{CliError, exit};
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
