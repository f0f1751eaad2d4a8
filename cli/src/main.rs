//! `isthmus`: run the components of a cluster, link clusters, export
//! services, and run the demo.

mod admin;
mod components;
mod demo;
#[cfg(test)]
mod docs_check;
mod echo;
mod error;
mod install;
mod kube;
mod netns;
mod redirect;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use error::exit;

#[derive(Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Isthmus: link clusters into one service mesh",
    long_about = None,
    after_help = "Quick start:\n  isthmus demo                    two clusters, linked and called across, step by step\n\n\
By hand:\n  isthmus up --cluster east --net 127.0.1 --dir /tmp/isthmus/east --echo\n  \
isthmus up --cluster west --net 127.0.2 --dir /tmp/isthmus/west --client\n  \
isthmus link --dir /tmp/isthmus/west \"$(isthmus token create --dir /tmp/isthmus/east)\"\n  \
isthmus export --dir /tmp/isthmus/east demo/echo\n  \
curl -x http://127.0.2.30:15001 http://echo.demo.svc.clusterset.local:8080/\n\n\
Exit codes: 0 ok, 1 failure, 2 bad input, 3 not found, 4 refused, 5 unreachable (docs/cli.md)."
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), for the component subcommands.
    #[arg(long, global = true, env = "ISTHMUS_LOG", default_value = "info")]
    log: String,
    /// Async worker threads. 1 runs everything on one thread, with no
    /// cross-thread wake-ups: the default for a sidecar, which sits beside
    /// one workload (as linkerd2-proxy does). Other commands default to
    /// one per core.
    #[arg(long, global = true, env = "ISTHMUS_WORKERS")]
    workers: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The cluster a command talks to: its directory, as `isthmus up` or
/// `isthmus controller` created it.
#[derive(clap::Args, Clone)]
struct DirArg {
    /// Cluster directory (the controller's state; `isthmus up --dir`).
    #[arg(long, env = "ISTHMUS_DIR")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run two clusters on this machine, link them and call across: the
    /// whole flow, step by step.
    Demo(demo::Args),
    /// Start a local-mode cluster (controller, gateway, workloads with
    /// sidecars) as child processes, and keep it running until Ctrl-C.
    Up(up::Args),
    /// Join tokens: create one on the cluster others will link to; list and
    /// revoke them.
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// Link this cluster to the cluster that issued <TOKEN>.
    Link {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// The token printed by `isthmus token create` on the other cluster.
        /// "-" reads it from standard input, which other local users cannot
        /// see (the command line is in the process list for everyone).
        #[arg(required_unless_present = "token_file", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the token from this file ("-" for standard input) instead.
        #[arg(long, value_name = "FILE")]
        token_file: Option<String>,
    },
    /// End the link with <CLUSTER> on both sides: its trust bundle and
    /// imports are removed here, and its calls are refused from now on.
    Unlink {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// The linked cluster's name (`isthmus status` lists them).
        cluster: String,
    },
    /// Choose which of a linked cluster's exports this cluster accepts.
    /// By default, every service it exports except those that run here
    /// without being exported from here: such a service takes a peer's
    /// endpoints (for failover, say) only when imported from that peer by
    /// name or pattern. Patterns replace the scope whole; none restores
    /// the default.
    #[command(
        after_help = "Examples:\n  isthmus imports east demo/echo 'shop/*'   only these from east (and merged with local ones)\n  \
isthmus imports east '*'                 everything east exports, merged with local services\n  \
isthmus imports east                     back to the default"
    )]
    Imports {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// The linked cluster (`isthmus status` lists them).
        cluster: String,
        /// `namespace/name`, `namespace/*` or `*`.
        patterns: Vec<String>,
    },
    /// Workload credentials: what a sidecar or gateway presents to get
    /// SVIDs for its own identity.
    #[command(subcommand)]
    Workload(admin::WorkloadCmd),
    /// The cluster's certificate authority: root rotation.
    #[command(subcommand)]
    Ca(admin::CaCmd),
    /// Verify a cluster's links, trust and certificates; exits non-zero with
    /// a hint for each problem found.
    Check {
        #[command(flatten)]
        target: kube::TargetArgs,
    },
    /// Export a service (<namespace>/<name>) to every linked cluster.
    Export {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// For example demo/echo.
        service: String,
    },
    /// Apply a TrafficPolicy (YAML; docs/policy.md): how this cluster's
    /// sidecars split a service's requests over clusters and fail over.
    /// Validated whole; an invalid policy changes nothing.
    Apply {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// The policy document ("-" for standard input).
        #[arg(short = 'f', long = "file")]
        file: String,
        /// Remove the named service's policy instead (back to the default:
        /// the local cluster first, then linked clusters that export it).
        #[arg(long)]
        delete: bool,
    },
    /// Show a cluster's links, trust and services.
    Status {
        #[command(flatten)]
        target: kube::TargetArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print every manifest a Kubernetes cluster needs (namespace, CRDs,
    /// RBAC, controller, gateway, injection webhook), for
    /// `isthmus install --cluster east | kubectl apply -f -`.
    Install(install::Args),
    /// Print what `install` made, for `isthmus uninstall --cluster east |
    /// kubectl delete -f -`. Keeps the namespace and the CRDs (deleting a
    /// CRD deletes every object of its kind) unless --with-crds.
    Uninstall {
        #[command(flatten)]
        args: install::Args,
        /// Delete the CRDs too, and with them every ServiceExport,
        /// ServiceImport, Link and TrafficPolicy.
        #[arg(long)]
        with_crds: bool,
    },
    /// Send this network namespace's TCP through its sidecar (nftables, or
    /// iptables): a pod's init step, or `ip netns exec` in local mode. Needs
    /// CAP_NET_ADMIN.
    Redirect(redirect::Args),
    /// Run the federation controller of a cluster.
    Controller(components::ControllerArgs),
    /// Run a cluster's east-west gateway.
    Gateway(components::GatewayArgs),
    /// Run a sidecar beside a workload.
    Sidecar(components::SidecarArgs),
    /// Run the demo workload: an HTTP server that says who served the
    /// request and who called it.
    Echo(echo::Args),
}

fn main() -> ExitCode {
    isthmus_core::install_crypto_provider();
    let cli = Cli::parse();
    let workers = cli.workers.unwrap_or(match cli.cmd {
        Cmd::Sidecar(_) => 1,
        _ => 0,
    });
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let res: Result<(), error::CliError> = rt.block_on(async move {
        match cli.cmd {
            Cmd::Demo(a) => demo::run(a).await,
            Cmd::Up(a) => up::run(a, &cli.log).await,
            Cmd::Token(t) => admin::token(t).await,
            Cmd::Link {
                target,
                token,
                token_file,
            } => {
                let token = match (token, token_file) {
                    (Some(t), _) if t != "-" => t,
                    (_, Some(f)) => admin::read_input(&f)?,
                    _ => admin::read_input("-")?,
                };
                admin::link(&target.resolve().await?, token.trim()).await
            }
            Cmd::Unlink { target, cluster } => admin::unlink(&target.resolve().await?, &cluster).await,
            Cmd::Imports {
                target,
                cluster,
                patterns,
            } => admin::set_imports(&target.resolve().await?, &cluster, &patterns).await,
            Cmd::Ca(c) => admin::ca(c).await,
            Cmd::Workload(w) => admin::workload(w).await,
            Cmd::Check { target } => admin::check(&target.resolve().await?).await,
            Cmd::Export { target, service } => admin::export(&target.resolve().await?, &service).await,
            Cmd::Status { target, json } => admin::status(&target.resolve().await?, json).await,
            Cmd::Apply { target, file, delete } => admin::apply(&target.resolve().await?, &file, delete).await,
            Cmd::Install(a) => install::install(a),
            Cmd::Redirect(a) => redirect::run(a),
            Cmd::Uninstall { args, with_crds } => install::uninstall(args, with_crds),
            Cmd::Controller(a) => components::controller(a, &cli.log).await,
            Cmd::Gateway(a) => components::gateway(a, &cli.log).await,
            Cmd::Sidecar(a) => components::sidecar(a, &cli.log).await,
            Cmd::Echo(a) => echo::run(a).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
