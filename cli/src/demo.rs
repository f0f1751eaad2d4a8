//! `isthmus demo`: two local clusters, linked with a join token, with a
//! service exported from one and called from the other, each step shown;
//! then failover, failback and a weighted split, watched live.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use isthmus_core::http::{Answer, HttpError};

use crate::admin;
use crate::error::CliError;
use crate::exit;
use crate::kube::Target;
use crate::up::{self, LocalCluster};

#[derive(clap::Args)]
pub struct Args {
    /// Run every step once, print the report and exit: 0 only if all worked.
    #[arg(long)]
    check: bool,
    /// Requests to send across once linked.
    #[arg(long, default_value_t = 5)]
    requests: usize,
    /// Bind every port to 0 instead of the defaults.
    #[arg(long)]
    ephemeral_ports: bool,
    /// Where to keep the clusters' directories [default: a new temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// GET `url` through the sidecar at `proxy` (HTTP proxy style).
pub async fn call(proxy: &str, url: &str) -> Result<Answer, HttpError> {
    isthmus_core::http::get_via(proxy, url).await
}

/// The kind of failure a sidecar reported, if it answered for itself.
fn error_kind(a: &Answer) -> Option<&str> {
    a.header(isthmus_sidecar::ERROR_HEADER)
}

struct Report {
    step: usize,
    total: usize,
}

impl Report {
    fn start(&mut self, what: &str) {
        self.step += 1;
        print!("[{}/{}] {what:<52} ", self.step, self.total);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> Result<T, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                exit::FAILURE,
                format!("timed out after {timeout:?} waiting for {what}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const URL: &str = "http://echo.demo.svc.clusterset.local:8080/";
/// The same service, pinned to east's copy.
const EAST_URL: &str = "http://east.echo.demo.svc.clusterset.local:8080/";

pub async fn run(a: Args) -> Result<(), CliError> {
    let base = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("isthmus-demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&base);
    println!(
        "Isthmus demo: two clusters on this machine, linked with a join token; then failover, failback and a split, live.\n"
    );
    let mut clusters: Vec<LocalCluster> = Vec::new();
    let res = steps(&a, &base, &mut clusters).await;
    if let Err(e) = &res {
        println!("FAILED\n\nerror: {}", e.message);
        for c in &clusters {
            println!("logs of cluster {}: {}", c.info.cluster, c.dir.join("logs").display());
        }
    }
    if res.is_ok() && !a.check {
        let west = &clusters[1].info;
        let proxy = west.client.as_ref().map(|w| w.outbound.clone()).unwrap_or_default();
        println!("\nBoth clusters keep running. From west's client workload, try:");
        println!("  curl -x http://{proxy} {URL}     # split 20% east / 80% west by policy");
        println!("  curl -x http://{proxy} {EAST_URL}  # east's copy only");
        println!(
            "  isthmus apply --dir {} --delete -f {}   # back to local first",
            clusters[1].dir.display(),
            base.join("policy.yaml").display()
        );
        println!("  isthmus status --dir {}", clusters[1].dir.display());
        println!("Ctrl-C stops everything.");
        crate::components::shutdown_token(false).cancelled().await;
    }
    for c in &mut clusters {
        c.stop().await;
    }
    if res.is_ok() && a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    res.map_err(|e| CliError::new(exit::FAILURE, format!("demo failed: {}", e.message)))?;
    if a.check {
        println!("\ndemo check passed");
    }
    Ok(())
}

async fn steps(a: &Args, base: &std::path::Path, clusters: &mut Vec<LocalCluster>) -> Result<(), CliError> {
    let mut r = Report { step: 0, total: 12 };
    let up_args = |name: &str, net: &str, echo: bool, client: bool| up::Args {
        cluster: name.to_string(),
        net: net.to_string(),
        dir: base.join(name),
        trust_domain: None,
        echo,
        client,
        netns: None,
        ephemeral_ports: a.ephemeral_ports,
        svid_ttl: isthmus_controller::config::DEFAULT_SVID_TTL.into(),
    };

    r.start("start cluster east on 127.0.1.0/24 (with demo/echo)");
    let east = LocalCluster::start(&up_args("east", "127.0.1", true, false), "info").await?;
    println!(
        "ok  controller {}, gateway {}/udp",
        east.info.control, east.info.gateway_quic
    );
    clusters.push(east);

    r.start("start cluster west on 127.0.2.0/24 (demo/echo, a client)");
    let west = LocalCluster::start(&up_args("west", "127.0.2", true, true), "info").await?;
    println!(
        "ok  controller {}, gateway {}/udp",
        west.info.control, west.info.gateway_quic
    );
    clusters.push(west);
    let east_dir = clusters[0].dir.clone();
    let west_dir = clusters[1].dir.clone();
    let proxy = clusters[1]
        .info
        .client
        .as_ref()
        .map(|w| w.outbound.clone())
        .unwrap_or_default();

    r.start("call east's echo from west before linking (must fail)");
    let before = call(&proxy, EAST_URL)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    if before.status == 200 {
        return Err(CliError::new(
            exit::FAILURE,
            "the call succeeded before the clusters were linked",
        ));
    }
    println!(
        "refused as expected: {} {} {}",
        before.status,
        error_kind(&before).unwrap_or(""),
        before.text().trim()
    );

    r.start("create a join token on east");
    let token = admin::create_token(&east_dir, Duration::from_secs(900), 1, None).await?;
    println!("{token}");

    r.start("link west to east with the token");
    admin::link(&Target::Dir(west_dir.clone()), &token).await.map(|_| ())?;
    let hb = wait_for("the link to become active", Duration::from_secs(20), || async {
        let s = admin::fetch_status(&west_dir).await.ok()?;
        s.links
            .iter()
            .find(|l| l.cluster == "east" && l.state == "active")
            .map(|l| l.heartbeat_age_ms)
    })
    .await?;
    println!("      link west -> east active, last heartbeat {hb} ms ago");

    // West runs an echo of its own, unexported: east's endpoints join it
    // (and take its calls when it fails) only because west says so.
    r.start("west takes east's echo too: imports east demo/echo");
    admin::set_imports(&Target::Dir(west_dir.clone()), "east", &["demo/echo".to_string()]).await?;

    r.start("export demo/echo from east");
    admin::export(&Target::Dir(east_dir.clone()), "demo/echo").await?;
    wait_for("west to import echo from east", Duration::from_secs(20), || async {
        let s = admin::fetch_status(&west_dir).await.ok()?;
        s.services
            .iter()
            .any(|svc| {
                svc.name == "echo"
                    && svc
                        .backends
                        .iter()
                        .any(|b| b.cluster == "east" && b.healthy_endpoints > 0)
            })
            .then_some(())
    })
    .await?;
    println!("      west imports echo.demo.svc.clusterset.local from east");

    r.start(&format!("call {EAST_URL} from west ({} requests)", a.requests));
    println!();
    let mut latencies = Vec::new();
    for i in 1..=a.requests {
        let ans = call(&proxy, EAST_URL)
            .await
            .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
        if ans.status != 200 {
            return Err(CliError::new(
                exit::FAILURE,
                format!("request {i}: {} {}", ans.status, ans.text().trim()),
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&ans.body)
            .map_err(|e| CliError::new(exit::FAILURE, format!("request {i}: not echo's answer: {e}")))?;
        let served = format!(
            "{}/{}",
            v["cluster"].as_str().unwrap_or("?"),
            v["instance"].as_str().unwrap_or("?")
        );
        let client = v["client_identity"].as_str().unwrap_or("(none)").to_string();
        println!(
            "      #{i:<3} 200  served by {served:<20} client {client}  {:.2} ms",
            ans.latency.as_secs_f64() * 1e3
        );
        if v["cluster"] != "east" || client != "spiffe://west.mesh/ns/demo/sa/client" {
            return Err(CliError::new(
                exit::FAILURE,
                format!("request {i} was served by {served} for {client}, expected east for west's client"),
            ));
        }
        latencies.push(ans.latency);
    }
    latencies.sort();
    // Nearest-rank percentile.
    let pct = |p: f64| {
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1].as_secs_f64() * 1e3
    };
    if !latencies.is_empty() {
        println!(
            "      {n}/{n} served by east; latency p50 {:.2} ms, max {:.2} ms",
            pct(0.5),
            pct(1.0),
            n = latencies.len()
        );
    }
    live_steps(&mut r, clusters, base, &proxy).await
}

/// Failover, failback and a split, each watched live from west's client.
async fn live_steps(
    r: &mut Report,
    clusters: &mut [LocalCluster],
    base: &std::path::Path,
    proxy: &str,
) -> Result<(), CliError> {
    let fail = |m: String| CliError::new(exit::FAILURE, m);
    let west_dir = clusters[1].dir.clone();

    r.start("failover: kill west's own echo while west calls echo");
    println!();
    let live = Live::start(proxy);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = live.now();
    clusters[1].kill("echo").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = live.stop().await;
    let seen = Seen::since(&calls, fault);
    println!(
        "      {} calls, {} failed; answered by east from {:.0} ms after the kill",
        calls.len(),
        seen.failed,
        seen.moved_after.as_secs_f64() * 1e3
    );
    if seen.failed > 0 || seen.last.get("east").copied().unwrap_or(0) == 0 {
        return Err(fail(format!(
            "failover: {} calls failed, last answers {:?}",
            seen.failed, seen.last
        )));
    }

    r.start("failback: start west's echo again");
    println!();
    let live = Live::start(proxy);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = live.now();
    clusters[1].restart_echo().await?;
    let moved = wait_for("traffic to return to west", Duration::from_secs(15), || async {
        let calls = live.snapshot();
        let seen = Seen::since(&calls, back);
        (seen.last.get("west").copied().unwrap_or(0) == seen.last.values().sum::<usize>()
            && seen.last.values().sum::<usize>() > 10)
            .then_some(seen.moved_after)
    })
    .await;
    let calls = live.stop().await;
    let moved = moved?;
    let seen = Seen::since(&calls, back);
    println!(
        "      {} calls, {} failed; back on west {:.1} s after the restart (probed healthy, then held 2 s against flapping)",
        calls.len(),
        seen.failed,
        moved.as_secs_f64()
    );
    if seen.failed > 0 {
        return Err(fail(format!("failback: {} calls failed", seen.failed)));
    }

    for (east, west) in [(80u32, 20u32), (20, 80)] {
        r.start(&format!("split by policy: east {east}%, west {west}%"));
        let file = base.join("policy.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: isthmus.dev/v1alpha1
kind: TrafficPolicy
metadata: {{ name: echo, namespace: demo }}
spec:
  routes:
    - split: [{{ cluster: east, weight: {east} }}, {{ cluster: west, weight: {west} }}]
"
            ),
        )
        .map_err(|e| fail(format!("{}: {e}", file.display())))?;
        admin::apply(&Target::Dir(west_dir.clone()), &file.display().to_string(), false).await?;
        // The sidecars have it within a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let live = Live::start(proxy);
        let from = live.now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let calls = live.stop().await;
        let seen = Seen::since(&calls, from);
        let n: usize = calls.iter().filter(|c| c.at >= from).count();
        let got = 100.0 * seen.all.get("east").copied().unwrap_or(0) as f64 / n.max(1) as f64;
        println!(
            "      {n} calls, {} failed: east {got:.0}%, west {:.0}% (policy {east}/{west})",
            seen.failed,
            100.0 - got
        );
        // 4 s at ~50 calls/s: 15 points is over four standard deviations.
        if seen.failed > 0 || (got - f64::from(east)).abs() > 15.0 {
            return Err(fail(format!(
                "split {east}/{west}: got east {got:.0}%, {} failed",
                seen.failed
            )));
        }
    }
    Ok(())
}

/// One call of the live view: when it started (since the view began),
/// whether it succeeded, and which cluster answered.
#[derive(Clone)]
struct LiveCall {
    at: Duration,
    ok: bool,
    cluster: String,
}

/// Calls to echo from west's client, about 50 a second from two callers,
/// with a line that redraws in place (on a terminal) showing the mix of
/// the last second.
struct Live {
    began: Instant,
    calls: std::sync::Arc<std::sync::Mutex<Vec<LiveCall>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Live {
    fn start(proxy: &str) -> Self {
        let began = Instant::now();
        let calls: std::sync::Arc<std::sync::Mutex<Vec<LiveCall>>> = Default::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (calls, stop, proxy) = (calls.clone(), stop.clone(), proxy.to_string());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(40));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let at = began.elapsed();
                    let ans = call(&proxy, URL).await;
                    let cluster = ans
                        .as_ref()
                        .ok()
                        .filter(|a| a.status == 200)
                        .and_then(|a| serde_json::from_slice::<serde_json::Value>(&a.body).ok())
                        .and_then(|v| v["cluster"].as_str().map(String::from));
                    calls.lock().expect("calls lock").push(LiveCall {
                        at,
                        ok: cluster.is_some(),
                        cluster: cluster.unwrap_or_default(),
                    });
                }
            }));
        }
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            let (calls, stop) = (calls.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let line = render(&calls.lock().expect("calls lock"), began.elapsed());
                    print!("\r\x1b[2K      {line}");
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
                print!("\r\x1b[2K");
            }));
        }
        Live {
            began,
            calls,
            stop,
            tasks,
        }
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    fn snapshot(&self) -> Vec<LiveCall> {
        self.calls.lock().expect("calls lock").clone()
    }

    async fn stop(mut self) -> Vec<LiveCall> {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.snapshot()
    }
}

/// `2.4 s  calls 120  failed 0  last second  west ████████████░░░░░░░░ 60%  east 40%`
fn render(calls: &[LiveCall], now: Duration) -> String {
    let failed = calls.iter().filter(|c| !c.ok).count();
    let recent: Vec<&LiveCall> = calls.iter().filter(|c| c.at + Duration::from_secs(1) >= now).collect();
    let share = |name: &str| {
        let n = recent.iter().filter(|c| c.cluster == name).count();
        n as f64 / recent.len().max(1) as f64
    };
    let (west, east) = (share("west"), share("east"));
    let bar: String = (0..20)
        .map(|i| if (i as f64) < west * 20.0 { '█' } else { '░' })
        .collect();
    format!(
        "{:>5.1} s  calls {:<5} failed {:<3} last second  west {bar} {:>3.0}%  east {:>3.0}%",
        now.as_secs_f64(),
        calls.len(),
        failed,
        west * 100.0,
        east * 100.0
    )
}

/// What the calls from `from` on show.
struct Seen {
    failed: usize,
    /// Answers by cluster, from `from` on.
    all: std::collections::BTreeMap<String, usize>,
    /// Answers by cluster after the last change of cluster.
    last: std::collections::BTreeMap<String, usize>,
    /// From `from` to the first call of the final run of one cluster.
    moved_after: Duration,
}

impl Seen {
    fn since(calls: &[LiveCall], from: Duration) -> Self {
        let mut after: Vec<&LiveCall> = calls.iter().filter(|c| c.at >= from).collect();
        after.sort_by_key(|c| c.at);
        let mut all = std::collections::BTreeMap::new();
        for c in after.iter().filter(|c| c.ok) {
            *all.entry(c.cluster.clone()).or_insert(0) += 1;
        }
        // The final run: calls after the last one answered by another
        // cluster than the final answer's (or that failed).
        let final_cluster = after.last().map(|c| c.cluster.clone()).unwrap_or_default();
        let start = after
            .iter()
            .rposition(|c| !c.ok || c.cluster != final_cluster)
            .map_or(0, |i| i + 1);
        let mut last = std::collections::BTreeMap::new();
        if !after[start..].is_empty() {
            last.insert(final_cluster, after.len() - start);
        }
        Seen {
            failed: after.iter().filter(|c| !c.ok).count(),
            all,
            last,
            moved_after: after.get(start).map_or(Duration::ZERO, |c| c.at.saturating_sub(from)),
        }
    }
}
