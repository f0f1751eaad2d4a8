//! Hedging measured: a service of 20 endpoints behind sidecars in one
//! cluster, called at a fixed rate of idempotent requests through a client
//! sidecar, without and with a TrafficPolicy `hedge` (alternating rounds in
//! one run, so the machine's noise falls on both alike), in two cases:
//!
//! - one endpoint in 20 answers every request after 100 ms (the sidecar's
//!   balancer, peak-EWMA power of two choices, already steers around it);
//! - every endpoint answers 5% of requests after 100 ms, at random (a
//!   tail no balancer can predict: what hedging is for).

use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_e2e::{Component, Pair, metrics, ok};
use serde::Serialize;

use crate::load::{self, Target};

#[derive(clap::Args, Clone, Serialize)]
pub struct HedgeArgs {
    /// Requests per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Keep-alive connections the rate is spread over.
    #[arg(long, default_value_t = 10)]
    conns: u32,
    /// Length of each measured run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(skip)]
    duration: Duration,
    /// Rounds of (without, with) per case; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Endpoints of the service.
    #[arg(long, default_value_t = 20)]
    endpoints: u8,
    /// When a hedge goes out.
    #[arg(long, default_value = "20ms")]
    after: String,
    /// Markdown file whose hedging section is replaced with the results.
    #[arg(long)]
    report: Option<PathBuf>,
}

const NET: &str = "127.0.94";
const HOST: &str = "bench.demo.svc.clusterset.local:8080";
const BEGIN: &str = "<!-- hedge:begin (written by isthmus-bench hedge; do not edit by hand) -->";
const END: &str = "<!-- hedge:end -->";

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// Flags for endpoint `i`'s server.
    flags: fn(u8) -> &'static str,
}

const CASES: [Case; 2] = [
    Case {
        name: "one endpoint in 20 answers after 100 ms",
        flags: |i| if i == 0 { "--delay 100ms" } else { "" },
    },
    Case {
        name: "every endpoint answers 5% of requests after 100 ms",
        flags: |_| "--slow-share 0.05 --slow-delay 100ms",
    },
];

/// Percentiles of one run, milliseconds: p50, p99, p99.9, and errors.
#[derive(Clone, Copy, Default)]
struct Run {
    ms: [f64; 3],
    errors: u64,
    hedges: f64,
}

pub fn run(args: HedgeArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let dir = root.join("east").display().to_string();
    let _ctl = Pair::controller(root, "east", &dir, NET, "");
    let client = Pair::client_sidecar(root, &dir, NET, "client");
    let target = Target {
        addr: client.addr("outbound").parse()?,
        host: HOST.into(),
    };
    let policy = root.join("hedge.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: isthmus.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: bench, namespace: demo }}\nspec:\n  hedge: {{ after: {}, max: 1 }}\n",
            args.after
        ),
    )?;
    let me = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut results = Vec::new();
    for case in CASES {
        eprintln!("case: {}", case.name);
        let _endpoints = endpoints(root, &me, &dir, args.endpoints, case)?;
        rt.block_on(wait_for(&target, args.endpoints))?;
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let mut pair = [Run::default(); 2];
            for (i, hedged) in [false, true].into_iter().enumerate() {
                set_policy(&dir, &policy, hedged);
                // The policy reaches the client sidecar within a snapshot.
                std::thread::sleep(Duration::from_secs(1));
                eprintln!(
                    "  round {round}/{}: {}",
                    args.rounds,
                    if hedged { "with hedging" } else { "without" }
                );
                let before = hedges(&client);
                let r = rt.block_on(load::fixed_rate_of(
                    &target,
                    args.rate,
                    args.conns,
                    args.duration,
                    (http::Method::GET, "/"),
                    0,
                ))?;
                let h = &r.latency;
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
                pair[i] = Run {
                    ms: [ms(0.5), ms(0.99), ms(0.999)],
                    errors: r.errors,
                    hedges: (hedges(&client) - before) / r.sent.max(1) as f64,
                };
            }
            rounds.push(pair);
        }
        results.push((case, rounds));
    }
    let text = report(&args, &results);
    println!("{text}");
    if let Some(path) = &args.report {
        crate::report::splice_between(path, &text, BEGIN, END)?;
        eprintln!("{} updated", path.display());
    }
    Ok(())
}

/// The service's endpoints for `case`: a server and its sidecar each.
fn endpoints(root: &Path, me: &Path, dir: &str, n: u8, case: Case) -> anyhow::Result<Vec<Component>> {
    let mut out = Vec::new();
    for i in 0..n {
        let ip = format!("{NET}.{}", 20 + u16::from(i));
        let name = format!("{}-{i}", case.name.split_whitespace().next().unwrap_or("case"));
        let server = Component::start_program(
            me,
            root,
            &format!("{name}-upstream"),
            &format!("upstream --listen {ip}:0 {}", (case.flags)(i)),
        );
        let sidecar = Component::start(
            root,
            &format!("{name}-sidecar"),
            &format!(
                "sidecar --dir {dir} --namespace demo --service bench --port 8080 --app {} \
                 --inbound-addr {ip}:0 --outbound-addr {ip}:0 --admin-addr {ip}:0",
                server.addr("listen")
            ),
        );
        out.push(server);
        out.push(sidecar);
    }
    Ok(out)
}

/// Wait until the client sidecar knows all `n` endpoints: a quick burst of
/// calls succeeds.
async fn wait_for(target: &Target, _n: u8) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let probe = load::probe(target).await;
        if probe.is_ok() {
            // The rest register within a snapshot or two.
            tokio::time::sleep(Duration::from_secs(2)).await;
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the service does not answer: {probe:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn set_policy(dir: &str, file: &Path, hedged: bool) {
    let f = file.to_str().expect("a UTF-8 path");
    if hedged {
        ok(&["apply", "--dir", dir, "-f", f]);
    } else {
        ok(&["apply", "--dir", dir, "-f", f, "--delete"]);
    }
}

/// Hedges the client sidecar has sent, over every route.
fn hedges(client: &Component) -> f64 {
    metrics(&client.addr("admin"))
        .lines()
        .filter(|l| l.starts_with("isthmus_hedges_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(args: &HedgeArgs, results: &[(Case, Vec<[Run; 2]>)]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}\n");
    let _ = writeln!(
        s,
        "Run {} at commit `{}` on {}: {} endpoints, {} GET/s over {} connections for {:?} per run, {} rounds of (without, with) `hedge: {{ after: {}, max: 1 }}`; medians over rounds.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        crate::report::commit(),
        crate::report::machine(),
        args.endpoints,
        args.rate,
        args.conns,
        args.duration,
        args.rounds,
        args.after,
    );
    let _ = writeln!(
        s,
        "| case | hedging | p50 | p99 | p99.9 | errors | hedges per request |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (case, rounds) in results {
        for (i, label) in ["without", "with"].into_iter().enumerate() {
            let col = |f: fn(&Run) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
            let _ = writeln!(
                s,
                "| {} | {label} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.3} |",
                case.name,
                col(|r| r.ms[0]),
                col(|r| r.ms[1]),
                col(|r| r.ms[2]),
                rounds.iter().map(|r| r[i].errors).sum::<u64>(),
                col(|r| r.hedges),
            );
        }
    }
    let _ = writeln!(s, "\n{END}");
    s
}
