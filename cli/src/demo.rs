//! `isthmus demo`: two local clusters, linked with a join token, with a
//! service exported from one and called from the other, each step shown.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::admin::{self, CliError};
use crate::exit;
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

/// An HTTP response as the demo and tests look at it.
pub struct Answer {
    pub status: u16,
    pub error_kind: Option<String>,
    pub body: String,
    pub latency: Duration,
}

/// GET `url` through the sidecar at `proxy` (HTTP proxy style).
pub async fn call(proxy: &str, url: &str) -> Result<Answer, String> {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect to sidecar {proxy}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(url)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let error_kind = resp
        .headers()
        .get(isthmus_sidecar::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status,
        error_kind,
        body: String::from_utf8_lossy(&body).into_owned(),
        latency: start.elapsed(),
    })
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

pub async fn run(a: Args) -> Result<(), CliError> {
    let base = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("isthmus-demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&base);
    println!("Isthmus demo: two clusters on this machine, linked with a join token.\n");
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
        println!("  curl -x http://{proxy} {URL}");
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
    let mut r = Report { step: 0, total: 7 };
    let up_args = |name: &str, net: &str, echo: bool, client: bool| up::Args {
        cluster: name.to_string(),
        net: net.to_string(),
        dir: base.join(name),
        trust_domain: None,
        echo,
        client,
        ephemeral_ports: a.ephemeral_ports,
        svid_ttl: "1h".into(),
    };

    r.start("start cluster east on 127.0.1.0/24 (with demo/echo)");
    let east = LocalCluster::start(&up_args("east", "127.0.1", true, false), "info").await?;
    println!(
        "ok  controller {}, gateway {}/udp",
        east.info.control, east.info.gateway_quic
    );
    clusters.push(east);

    r.start("start cluster west on 127.0.2.0/24 (with a client)");
    let west = LocalCluster::start(&up_args("west", "127.0.2", false, true), "info").await?;
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

    r.start("call echo from west before linking (must fail)");
    let before = call(&proxy, URL).await.map_err(|e| CliError::new(exit::FAILURE, e))?;
    if before.status == 200 {
        return Err(CliError::new(
            exit::FAILURE,
            "the call succeeded before the clusters were linked",
        ));
    }
    println!(
        "refused as expected: {} {} {}",
        before.status,
        before.error_kind.as_deref().unwrap_or(""),
        before.body.trim()
    );

    r.start("create a join token on east");
    let token = admin::create_token(&east_dir, Duration::from_secs(900), 1, None).await?;
    println!("{token}");

    r.start("link west to east with the token");
    admin::link(&west_dir, &token).await.map(|_| ())?;
    let hb = wait_for("the link to become active", Duration::from_secs(20), || async {
        let s = admin::fetch_status(&west_dir).await.ok()?;
        s.links
            .iter()
            .find(|l| l.cluster == "east" && l.state == "active")
            .map(|l| l.heartbeat_age_ms)
    })
    .await?;
    println!("      link west -> east active, last heartbeat {hb} ms ago");

    r.start("export demo/echo from east");
    admin::export(&east_dir, "demo/echo").await?;
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

    r.start(&format!("call {URL} from west ({} requests)", a.requests));
    println!();
    let mut latencies = Vec::new();
    for i in 1..=a.requests {
        let ans = call(&proxy, URL).await.map_err(|e| CliError::new(exit::FAILURE, e))?;
        if ans.status != 200 {
            return Err(CliError::new(
                exit::FAILURE,
                format!("request {i}: {} {}", ans.status, ans.body.trim()),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&ans.body)
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
    Ok(())
}
