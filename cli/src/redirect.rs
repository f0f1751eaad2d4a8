//! `isthmus redirect`: install the transparent-redirection rules in this
//! network namespace (a pod's init step; `ip netns exec` in local mode).
//! The rules are `isthmus_sidecar::redirect`'s; this only applies them,
//! with nftables, or iptables where `nft` is absent.

use std::io::Write;
use std::process::{Command, Stdio};

use isthmus_sidecar::redirect::Redirect;

use crate::error::{CliError, exit};

#[derive(clap::Args)]
pub struct Args {
    /// The sidecar's outbound port (where the workload's connections go).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The sidecar's inbound port (where connections to the workload go).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The sidecar's user id: its own connections are not redirected.
    #[arg(long, default_value_t = 1337)]
    pub uid: u32,
    /// Inbound ports left alone (comma separated): the sidecar's admin
    /// port, ports kubelet probes directly.
    #[arg(long, value_delimiter = ',', default_value = "15020")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports left alone (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destinations reached directly (CIDRs, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Print the nftables ruleset instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why a rules program could not install its input.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// It could not be started (absent, most often).
    #[error("{program}: {source}")]
    Start {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: &'static str, stderr: String },
}

fn feed(program: &'static str, args: &[&str], input: &str) -> Result<(), FeedError> {
    let io = |source| FeedError::Start { program, source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(io)?;
    let out = child.wait_with_output().map_err(io)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FeedError::Failed {
            program,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub fn run(a: Args) -> Result<(), CliError> {
    for cidr in &a.exclude_outbound_cidrs {
        let (ip, len) = cidr.split_once('/').unwrap_or((cidr, ""));
        if ip.parse::<std::net::IpAddr>().is_err() || (!len.is_empty() && len.parse::<u8>().is_err()) {
            return Err(CliError::new(
                exit::BAD_INPUT,
                format!("--exclude-outbound-cidrs: {cidr:?} is not a CIDR"),
            ));
        }
    }
    let r = Redirect {
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        uid: a.uid,
        exclude_inbound_ports: a.exclude_inbound_ports,
        exclude_outbound_ports: a.exclude_outbound_ports,
        exclude_outbound_cidrs: a.exclude_outbound_cidrs,
    };
    if a.dry_run {
        print!("{}", r.nftables());
        return Ok(());
    }
    let nft = feed("nft", &["-f", "-"], &r.nftables());
    let applied = match nft {
        Ok(()) => "nftables",
        Err(e @ FeedError::Start { .. }) => {
            // No nft binary: iptables (legacy or nft backend) instead.
            feed("iptables-restore", &["--noflush"], &r.iptables(false))
                .and_then(|()| feed("ip6tables-restore", &["--noflush"], &r.iptables(true)))
                .map_err(|e2| {
                    CliError::new(
                        exit::FAILURE,
                        format!("neither nftables ({e}) nor iptables ({e2}) could install the rules"),
                    )
                })?;
            "iptables"
        }
        Err(e) => return Err(CliError::new(exit::FAILURE, e.to_string())),
    };
    println!(
        "redirecting TCP through the sidecar ({applied}): outbound to :{}, inbound to :{}, user {} exempt",
        r.outbound_port, r.inbound_port, r.uid
    );
    Ok(())
}
