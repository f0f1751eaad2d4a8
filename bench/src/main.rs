//! `isthmus-bench`: the data path measured side by side with its baselines
//! in one run on one machine. See docs/benchmarks.md for what each figure
//! means; `scripts/bench` builds, runs this and draws the chart.

mod haproxy;
mod hedge;
mod load;
mod loss;
mod procs;
mod report;
mod scale;
mod stunnel;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use isthmus_e2e::{Component, Pair, ok};
use serde::Serialize;

use load::Target;

#[derive(Parser)]
#[command(
    name = "isthmus-bench",
    about = "Benchmark Isthmus's data path against direct and stunnel baselines"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start two clusters and a stunnel pair, measure every path, write the report.
    Run(RunArgs),
    /// Hedging: p50/p99 of a service with a slow endpoint, or slow
    /// answers, without and with a TrafficPolicy `hedge`, side by side.
    Hedge(hedge::HedgeArgs),
    /// The cross-cluster hop under packet loss and added round-trip time:
    /// the QUIC tunnel against the stunnel pair (needs root, for nftables).
    Loss(loss::LossArgs),
    /// The control plane at scale: controllers in a full mesh, thousands of
    /// services, endpoint churn; how fast and how cheaply changes travel.
    Scale(scale::ScaleArgs),
    /// The benchmark's application server (started by `run`).
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Answer every request this late.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        delay: Duration,
        /// Answer this share of requests (at random) `--slow-delay` later.
        #[arg(long, default_value_t = 0.0)]
        slow_share: f64,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        slow_delay: Duration,
    },
}

#[derive(clap::Args, Clone, Serialize)]
pub struct RunArgs {
    /// Fixed request rate for the latency runs, requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Keep-alive connections the fixed rate is spread over.
    #[arg(long, default_value_t = 10)]
    conns: u32,
    /// Request and response body size, bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// Length of each measured fixed-rate run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    duration: Duration,
    /// Unmeasured load on each path before the first round.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    warmup: Duration,
    /// Rounds; each measures every path in turn, and figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections for the highest-rate run (each sends as soon as answered).
    #[arg(long, default_value_t = 32)]
    max_conns: u32,
    /// Length of each highest-rate run.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    max_duration: Duration,
    /// Size of each single-connection bulk download, MiB.
    #[arg(long, default_value_t = 256)]
    bulk_mib: usize,
    /// Leave out the stunnel baseline (if stunnel is not installed).
    #[arg(long)]
    no_stunnel: bool,
    /// Leave out the HAProxy pair (if haproxy is not installed).
    #[arg(long)]
    no_haproxy: bool,
    /// Measure only these paths besides direct (stunnel, intra, cross).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Keep the clusters' directory and logs after the run.
    #[arg(long)]
    keep: bool,
    /// Markdown file whose generated section is replaced with the results.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where to write every figure as JSON (what the chart is drawn from).
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One way from the client to the server, and the processes on it.
pub struct Path {
    pub name: &'static str,
    pub label: &'static str,
    pub target: Target,
    pub procs: Vec<(&'static str, u32)>,
}

#[derive(Serialize, Default, Clone)]
pub struct RoundFigures {
    /// Latency percentiles, microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: [f64; 5],
    pub sent: u64,
    pub errors: u64,
    pub achieved_rate: f64,
    /// CPU of each process on the path, seconds per second of the run.
    pub cpu: Vec<f64>,
    pub rss_load: Vec<u64>,
    pub max_rate: f64,
    pub max_rate_errors: u64,
    pub bulk_bytes_per_sec: f64,
}

#[derive(Serialize)]
pub struct PathResult {
    pub name: &'static str,
    pub label: &'static str,
    pub procs: Vec<&'static str>,
    pub rss_idle: Vec<u64>,
    /// Largest RSS over the whole run, bulk downloads included (VmHWM).
    pub rss_peak: Vec<u64>,
    pub rounds: Vec<RoundFigures>,
}

#[derive(Serialize)]
pub struct Results {
    pub args: RunArgs,
    pub command: String,
    pub machine: String,
    pub commit: String,
    pub started: String,
    pub paths: Vec<PathResult>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Upstream {
            listen,
            ready_file,
            delay,
            slow_share,
            slow_delay,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(upstream::serve(
                listen,
                ready_file,
                upstream::Lateness {
                    delay,
                    slow_share,
                    slow_delay,
                },
            )),
        Cmd::Run(args) => run(args),
        Cmd::Hedge(args) => hedge::run(args),
        Cmd::Loss(args) => loss::run(args),
        Cmd::Scale(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(scale::run(args)),
    }
}

const EAST: &str = "127.0.91";
const WEST: &str = "127.0.92";
const BASE: &str = "127.0.93";
const MESH_HOST: &str = "bench.demo.svc.clusterset.local:8080";

/// Removes the run's directory when the run ends, however it ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let tmp = tempfile::tempdir()?.keep();
    // Declared before the components, so dropped after they are killed.
    let _cleanup = (!args.keep).then(|| DirGuard(tmp.clone()));
    let root = tmp.as_path();
    let (e, w) = (root.join("east"), root.join("west"));
    let (e, w) = (e.display().to_string(), w.display().to_string());
    eprintln!(
        "starting the server, two clusters and the stunnel pair under {}",
        root.display()
    );

    let me = std::env::current_exe()?;
    let server = Component::start_program(&me, root, "upstream", &format!("upstream --listen {EAST}.21:0"));
    let upstream: SocketAddr = server.addr("listen").parse()?;

    let controller = |name: &str, dir: &str, net: &str| Pair::controller(root, name, dir, net, "");
    let gateway = |name: &str, dir: &str, net: &str| Pair::gateway(root, name, dir, net);
    let client = |name: &str, dir: &str, net: &str| Pair::client_sidecar(root, dir, net, name);
    let _east_ctl = controller("east", &e, EAST);
    let east_gw = gateway("east", &e, EAST);
    let east_sc = Component::start(
        root,
        "east-sidecar",
        &format!(
            "sidecar --dir {e} --namespace demo --service bench --port 8080 --app {upstream} \
             --inbound-addr {EAST}.20:0 --outbound-addr {EAST}.20:0 --admin-addr {EAST}.20:0"
        ),
    );
    let east_client = client("east-client", &e, EAST);
    let _west_ctl = controller("west", &w, WEST);
    let west_gw = gateway("west", &w, WEST);
    let west_client = client("west-client", &w, WEST);

    let token = ok(&["token", "create", "--dir", &e]).trim().to_string();
    ok(&["link", "--dir", &w, &token]);
    ok(&["export", "--dir", &e, "demo/bench"]);

    let stunnel_dir = root.join("stunnel");
    std::fs::create_dir_all(&stunnel_dir)?;
    let tunnel = if args.no_stunnel {
        None
    } else {
        Some(stunnel::start(
            &stunnel_dir,
            &format!("{BASE}.1"),
            &format!("{BASE}.2"),
            upstream,
        )?)
    };

    let haproxy_dir = root.join("haproxy");
    std::fs::create_dir_all(&haproxy_dir)?;
    let l7 = if args.no_haproxy {
        None
    } else {
        Some(haproxy::start(
            &haproxy_dir,
            &format!("{BASE}.3"),
            &format!("{BASE}.4"),
            upstream,
        )?)
    };

    let mesh = |c: &Component| -> anyhow::Result<Target> {
        Ok(Target {
            addr: c.addr("outbound").parse()?,
            host: MESH_HOST.into(),
        })
    };
    let mut paths = vec![Path {
        name: "direct",
        label: "direct",
        target: Target {
            addr: upstream,
            host: upstream.to_string(),
        },
        procs: vec![("server", server.pid())],
    }];
    if let Some(t) = &tunnel {
        paths.push(Path {
            name: "stunnel",
            label: "stunnel mTLS pair",
            target: Target {
                addr: t.entry,
                host: upstream.to_string(),
            },
            procs: vec![("stunnel client", t.client.id()), ("stunnel server", t.server.id())],
        });
    }
    if let Some(h) = &l7 {
        paths.push(Path {
            name: "haproxy",
            label: "HAProxy mTLS h2 pair",
            target: Target {
                addr: h.entry,
                host: upstream.to_string(),
            },
            procs: vec![("haproxy client", h.client.id()), ("haproxy server", h.server.id())],
        });
    }
    paths.push(Path {
        name: "intra",
        label: "intra-cluster",
        target: mesh(&east_client)?,
        procs: vec![("client sidecar", east_client.pid()), ("server sidecar", east_sc.pid())],
    });
    paths.push(Path {
        name: "cross",
        label: "cross-cluster",
        target: mesh(&west_client)?,
        procs: vec![
            ("client sidecar", west_client.pid()),
            ("west gateway", west_gw.pid()),
            ("east gateway", east_gw.pid()),
            ("server sidecar", east_sc.pid()),
        ],
    });

    paths.retain(|p| p.name == "direct" || args.only.is_empty() || args.only.iter().any(|o| o == p.name));
    for p in &paths {
        let pids: Vec<String> = p.procs.iter().map(|(n, pid)| format!("{n} {pid}")).collect();
        eprintln!("path {}: {}", p.name, pids.join(", "));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let results = rt.block_on(measure(&args, &paths))?;
    let results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        args: args.clone(),
        machine: report::machine(),
        commit: report::commit(),
        started,
        paths: results,
    };
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("figures written to {}", args.json.display());
    let text = report::markdown(&results);
    println!("{text}");
    if let Some(path) = &args.report {
        report::splice(path, &text).with_context(|| format!("update {}", path.display()))?;
        eprintln!("{} updated", path.display());
    }
    Ok(())
}

async fn measure(args: &RunArgs, paths: &[Path]) -> anyhow::Result<Vec<PathResult>> {
    // Every path must answer before anything is measured: the cross-cluster
    // one only once the link and the export have reached the client sidecar.
    for p in paths {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = load::probe(&p.target).await {
            anyhow::ensure!(Instant::now() < deadline, "path {} does not answer: {e:#}", p.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut out: Vec<PathResult> = paths
        .iter()
        .map(|p| PathResult {
            name: p.name,
            label: p.label,
            procs: p.procs.iter().map(|(n, _)| *n).collect(),
            rss_idle: p.procs.iter().map(|(_, pid)| procs::rss_bytes(*pid)).collect(),
            rss_peak: Vec::new(),
            rounds: Vec::new(),
        })
        .collect();
    for p in paths {
        eprintln!("warming up {}", p.name);
        load::fixed_rate(&p.target, args.rate, args.conns, args.warmup, args.body).await?;
    }
    // Phases in this order, so the fixed-rate runs (latency, CPU, RSS under
    // load) see no memory left over from the heavier runs.
    for round in 1..=args.rounds {
        for (p, res) in paths.iter().zip(&mut out) {
            eprintln!("fixed rate, round {round}/{}: {}", args.rounds, p.name);
            res.rounds.push(fixed_rate_round(args, p).await?);
        }
    }
    for round in 0..args.rounds {
        for (p, res) in paths.iter().zip(&mut out) {
            eprintln!("highest rate and bulk, round {}/{}: {}", round + 1, args.rounds, p.name);
            let r = &mut res.rounds[round];
            (r.max_rate, r.max_rate_errors) =
                load::max_rate(&p.target, args.max_conns, args.max_duration, args.body).await?;
            r.bulk_bytes_per_sec = load::bulk(&p.target, args.bulk_mib * 1024 * 1024)
                .await
                .with_context(|| format!("bulk download over {}", p.name))?;
        }
    }
    for (p, res) in paths.iter().zip(&mut out) {
        res.rss_peak = p.procs.iter().map(|(_, pid)| procs::rss_peak_bytes(*pid)).collect();
    }
    Ok(out)
}

async fn fixed_rate_round(args: &RunArgs, p: &Path) -> anyhow::Result<RoundFigures> {
    let pids: Vec<u32> = p.procs.iter().map(|(_, pid)| *pid).collect();
    let cpu_before: Vec<f64> = pids.iter().map(|pid| procs::cpu_seconds(*pid)).collect();
    let rss = procs::RssPeak::start(pids.clone());
    let fixed = load::fixed_rate(&p.target, args.rate, args.conns, args.duration, args.body).await?;
    let rss_load = rss.finish();
    let secs = fixed.elapsed.as_secs_f64();
    let cpu = pids
        .iter()
        .zip(cpu_before)
        .map(|(pid, before)| (procs::cpu_seconds(*pid) - before) / secs)
        .collect();
    let h = &fixed.latency;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(RoundFigures {
        latency_us: [us(0.5), us(0.9), us(0.99), us(0.999), h.max() as f64 / 1000.0],
        sent: fixed.sent,
        errors: fixed.errors,
        achieved_rate: fixed.sent as f64 / secs,
        cpu,
        rss_load,
        ..Default::default()
    })
}
