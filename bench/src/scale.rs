//! `isthmus-bench scale`: the control plane at mesh scale. Real
//! controller processes, linked in a full mesh through their Admin API,
//! and synthetic sidecars registered through the real Control API (one
//! config stream each, as a sidecar keeps): thousands of services, their
//! endpoints, endpoint churn, and services exported, changed and withdrawn.
//!
//! What it reports (docs/benchmarks.md, "Control plane at scale"): how long
//! a change in one cluster takes to reach a client sidecar of another that
//! uses the service; the bytes each change costs (config streams and
//! peering); controller CPU and memory; a real sidecar's memory in the
//! loaded mesh.
//!
//! Over 600 lines on purpose: `run` is one scenario (start, link, load,
//! churn, export, report) read top to bottom, as docs/benchmarks.md tells
//! it; splitting it would scatter the steps a reader checks the figures by.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_core::local::{ClusterDir, LocalClient};
use isthmus_e2e::Component;
use isthmus_proto::{
    ConfigSnapshot, CreateTokenRequest, ExportRequest, LinkRequest, SidecarRegistration, WatchRequest, WatchScope,
    watch_request,
};
use prost::Message;
use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const BEGIN: &str = "<!-- scale:begin (written by isthmus-bench scale; do not edit by hand) -->";
const END: &str = "<!-- scale:end -->";
const NS: &str = "scale";
/// Config streams per connection (the server allows 200 at once).
const STREAMS_PER_CONN: usize = 150;

#[derive(clap::Args, Clone, Serialize)]
pub struct ScaleArgs {
    #[arg(long, default_value_t = 10)]
    clusters: usize,
    /// Services in all, spread evenly over the clusters, each exported.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints (registered sidecars) in all, spread evenly over services.
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,
    /// Endpoint changes a second across the mesh during the churn.
    #[arg(long, default_value_t = 100)]
    churn: u32,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(skip)]
    duration: Duration,
    /// Services each cluster's client sidecar uses (from other clusters).
    #[arg(long, default_value_t = 100)]
    uses: usize,
    /// Markdown file whose scale section is rewritten with the results.
    #[arg(long)]
    report: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn name(cluster: usize, i: usize) -> String {
    format!("c{cluster}-s{i}")
}

/// What the client sidecars are waiting to see: (service, cluster,
/// endpoint count) -> when the change was made, and how many clients use it.
type Pending = Arc<Mutex<HashMap<(String, String, u32), (Instant, usize)>>>;

#[derive(Default)]
struct Samples {
    latency_ms: Vec<f64>,
    message_bytes: Vec<f64>,
}

struct Cluster {
    name: String,
    dir: PathBuf,
    controller: Component,
    conns: Vec<LocalClient>,
}

impl Cluster {
    fn admin_addr(&self) -> String {
        self.controller.addr("admin")
    }
}

/// A registered endpoint: its stream lives while this is held.
struct Endpoint {
    _requests: mpsc::UnboundedSender<WatchRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Register `service` at a made-up inbound address; the stream is drained
/// (bytes counted) until dropped.
async fn register(
    conn: &LocalClient,
    service: &str,
    port: u16,
    bytes: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Endpoint> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WatchRequest {
        node: Some(watch_request::Node::Sidecar(SidecarRegistration {
            namespace: NS.into(),
            service: service.into(),
            port: 8080,
            inbound_addr: format!("127.0.0.1:{port}"),
            instance: format!("{service}-{port}"),
            identity: String::new(),
            service_account: "app".into(),
        })),
        scope: WatchScope::Subscribed.into(),
        incremental: true,
        ..Default::default()
    })?;
    let mut stream = conn
        .control()
        .watch_config(UnboundedReceiverStream::new(rx))
        .await
        .with_context(|| format!("registering {service}"))?
        .into_inner();
    let task = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            bytes.fetch_add(m.encoded_len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok(Endpoint { _requests: tx, task })
}

/// A client sidecar of `cluster` that uses `uses`: it records when each
/// pending change reaches it.
async fn client(
    conn: &LocalClient,
    uses: Vec<String>,
    pending: Pending,
    samples: Arc<Mutex<Samples>>,
    held: Arc<Mutex<HashMap<String, u32>>>,
) -> anyhow::Result<Endpoint> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WatchRequest {
        node: Some(watch_request::Node::Sidecar(SidecarRegistration {
            namespace: NS.into(),
            service_account: "client".into(),
            ..Default::default()
        })),
        scope: WatchScope::Subscribed.into(),
        incremental: true,
        subscribe: uses.iter().map(|s| format!("{NS}/{s}")).collect(),
        resume: false,
    })?;
    let mut stream = conn
        .control()
        .watch_config(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let task = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let now = Instant::now();
            let mut s = samples.lock().unwrap();
            if m.delta {
                s.message_bytes.push(m.encoded_len() as f64);
            }
            let mut pending = pending.lock().unwrap();
            let mut held = held.lock().unwrap();
            for svc in &m.services {
                let total: u32 = svc.backends.iter().map(|b| b.healthy_endpoints).sum();
                held.insert(svc.name.clone(), total);
                for b in &svc.backends {
                    let key = (svc.name.clone(), b.cluster.clone(), b.healthy_endpoints);
                    if let Some((at, left)) = pending.get_mut(&key) {
                        s.latency_ms.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                        *left -= 1;
                        if *left == 0 {
                            pending.remove(&key);
                        }
                    }
                }
            }
            for k in &m.removed {
                held.remove(k.trim_start_matches("scale/"));
            }
        }
    });
    Ok(Endpoint { _requests: tx, task })
}

async fn sum_metric(clusters: &[Cluster], name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for c in clusters {
        let addr = c.admin_addr();
        let text = isthmus_core::http::get_via(&addr, &format!("http://{addr}/metrics"))
            .await?
            .text();
        sum += isthmus_e2e::sample(&text, name, labels).unwrap_or(0.0);
    }
    Ok(sum)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Serialize, Default)]
struct Results {
    args: Option<ScaleArgs>,
    setup_s: f64,
    changes: usize,
    deliveries: usize,
    latency_ms: [f64; 3],
    client_delta_bytes: [f64; 2],
    config_bytes_per_change: f64,
    full_table_bytes: usize,
    peering_bytes_per_change: f64,
    controller_cpu_percent: [f64; 2],
    controller_rss_mib: [f64; 2],
    lifecycle_ms: Vec<(String, f64)>,
    sidecar_rss_mib: f64,
    sidecar_held: usize,
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    isthmus_core::install_crypto_provider();
    let root = tempfile::tempdir()?;
    let started = Instant::now();
    eprintln!("starting {} controllers", args.clusters);
    let mut clusters = Vec::new();
    for c in 0..args.clusters {
        let name = format!("c{c}");
        let dir = root.path().join(&name);
        let controller = Component::start(
            root.path(),
            &format!("{name}-controller"),
            &format!(
                "controller --dir {} --cluster {name} --control-addr 127.0.0.1:0 --peering-addr 127.0.0.1:0 \
                 --admin-addr 127.0.0.1:0 --log warn",
                dir.display()
            ),
        );
        let per = args.services.div_ceil(args.clusters) * (args.endpoints / args.services).max(1);
        let mut conns = Vec::new();
        for _ in 0..per.div_ceil(STREAMS_PER_CONN) + 1 {
            conns.push(ClusterDir::new(&dir).connect().await?);
        }
        clusters.push(Cluster {
            name,
            dir,
            controller,
            conns,
        });
    }
    eprintln!("linking them in a full mesh");
    for i in 0..clusters.len() {
        for j in i + 1..clusters.len() {
            let token = clusters[i].conns[0]
                .admin()
                .create_token(CreateTokenRequest {
                    ttl_seconds: 600,
                    uses: 1,
                    priority: 0,
                })
                .await?
                .into_inner()
                .token;
            clusters[j].conns[0].admin().link(LinkRequest { token }).await?;
        }
    }

    let per_cluster = args.services / args.clusters;
    let per_service = (args.endpoints / args.services).max(1);
    eprintln!(
        "registering {} endpoints of {} services, and exporting them",
        per_cluster * per_service * args.clusters,
        per_cluster * args.clusters
    );
    let endpoint_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut endpoints: Vec<HashMap<String, Vec<Endpoint>>> = Vec::new();
    let mut port: u16 = 1;
    for c in &clusters {
        let mut eps: HashMap<String, Vec<Endpoint>> = HashMap::new();
        let mut jobs = Vec::new();
        for s in 0..per_cluster {
            for _ in 0..per_service {
                let conn = c.conns[jobs.len() / STREAMS_PER_CONN].clone();
                let svc = name(clusters.iter().position(|x| x.name == c.name).unwrap(), s);
                let bytes = endpoint_bytes.clone();
                port = port.wrapping_add(1).max(1);
                let p = port;
                jobs.push(async move { (svc.clone(), register(&conn, &svc, p, bytes).await) });
            }
        }
        for (svc, ep) in futures::future::join_all(jobs).await {
            eps.entry(svc).or_default().push(ep?);
        }
        let admin = c.conns[0].admin();
        let exports = (0..per_cluster).map(|s| {
            let mut admin = admin.clone();
            let svc = name(clusters.iter().position(|x| x.name == c.name).unwrap(), s);
            async move {
                admin
                    .export(ExportRequest {
                        namespace: NS.into(),
                        name: svc,
                    })
                    .await
            }
        });
        for r in futures::future::join_all(exports).await {
            r?;
        }
        endpoints.push(eps);
        eprintln!(
            "  {}: {} endpoints registered, {per_cluster} exported ({:.0} s)",
            c.name,
            per_cluster * per_service,
            started.elapsed().as_secs_f64()
        );
    }

    // Each cluster's client uses `uses` services of other clusters.
    let pending: Pending = Arc::default();
    let samples = Arc::new(Mutex::new(Samples::default()));
    let mut rng = rand::rng();
    let mut users: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    let mut helds = Vec::new();
    for (c, cl) in clusters.iter().enumerate() {
        let mut uses = BTreeSet::new();
        while uses.len() < args.uses.min(per_cluster * (args.clusters - 1)) {
            let other = (c + rng.random_range(1..args.clusters)) % args.clusters;
            uses.insert(name(other, rng.random_range(0..per_cluster)));
        }
        for u in &uses {
            *users.entry(u.clone()).or_default() += 1;
        }
        let held = Arc::new(Mutex::new(HashMap::new()));
        clients.push(
            client(
                &cl.conns[0],
                uses.into_iter().collect(),
                pending.clone(),
                samples.clone(),
                held.clone(),
            )
            .await?,
        );
        helds.push(held);
    }
    // Every client holds every service it uses, with all its endpoints.
    let want = args.uses.min(per_cluster * (args.clusters - 1));
    let deadline = Instant::now() + Duration::from_secs(300);
    while helds.iter().any(|h| {
        let h = h.lock().unwrap();
        h.len() < want || h.values().any(|n| *n != per_service as u32)
    }) {
        anyhow::ensure!(Instant::now() < deadline, "the mesh did not converge in 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!(
        "mesh converged after {setup_s:.0} s; churning {} endpoint changes/s for {:?}",
        args.churn, args.duration
    );
    samples.lock().unwrap().latency_ms.clear();
    samples.lock().unwrap().message_bytes.clear();

    let pids: Vec<u32> = clusters.iter().map(|c| c.controller.pid()).collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| crate::procs::cpu_seconds(*p)).collect();
    let delta_bytes0 = sum_metric(&clusters, "isthmus_config_message_bytes_total", &[("kind", "delta")]).await?;
    let peering0 = sum_metric(&clusters, "isthmus_peering_export_bytes_total", &[]).await?;
    let used: Vec<String> = users.keys().cloned().collect();
    // Endpoints added by the churn: a change adds one to a service, or
    // removes the one it added. Registrations run in their own tasks, so
    // the rate holds however long the controller takes to answer.
    let extra: Arc<Mutex<HashMap<String, Option<Endpoint>>>> = Arc::default();
    let churn_start = Instant::now();
    let mut changes = 0usize;
    let mut expected = 0usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.churn));
    while churn_start.elapsed() < args.duration {
        let at = churn_start + interval * changes as u32;
        tokio::time::sleep_until(at.into()).await;
        // Half the changes hit a service some client uses.
        let svc = if rng.random_bool(0.5) {
            used[rng.random_range(0..used.len())].clone()
        } else {
            name(rng.random_range(0..args.clusters), rng.random_range(0..per_cluster))
        };
        let c: usize = svc[1..svc.find('-').unwrap()].parse()?;
        let removed = extra.lock().unwrap().remove(&svc);
        let count = match removed {
            // Still registering: leave this service be for now.
            Some(None) => {
                extra.lock().unwrap().insert(svc, None);
                continue;
            }
            Some(Some(ep)) => {
                drop(ep);
                per_service as u32
            }
            None => {
                port = port.wrapping_add(1).max(1);
                let conn = clusters[c].conns[rng.random_range(0..clusters[c].conns.len())].clone();
                extra.lock().unwrap().insert(svc.clone(), None);
                let (extra, svc, bytes, p) = (extra.clone(), svc.clone(), endpoint_bytes.clone(), port);
                tokio::spawn(async move {
                    if let Ok(ep) = register(&conn, &svc, p, bytes).await {
                        extra.lock().unwrap().insert(svc, Some(ep));
                    }
                });
                per_service as u32 + 1
            }
        };
        if let Some(n) = users.get(&svc) {
            pending
                .lock()
                .unwrap()
                .insert((svc.clone(), clusters[c].name.clone(), count), (Instant::now(), *n));
            expected += n;
        }
        changes += 1;
    }
    let churned = churn_start.elapsed().as_secs_f64();
    // Let the last changes arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| (crate::procs::cpu_seconds(*p) - c0) / churned * 100.0)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|p| isthmus_e2e::rss_kib(*p) as f64 / 1024.0).collect();
    let delta_bytes =
        sum_metric(&clusters, "isthmus_config_message_bytes_total", &[("kind", "delta")]).await? - delta_bytes0;
    let peering = sum_metric(&clusters, "isthmus_peering_export_bytes_total", &[]).await? - peering0;
    let s = std::mem::take(&mut *samples.lock().unwrap());
    let missed = pending.lock().unwrap().values().map(|(_, n)| n).sum::<usize>();
    eprintln!(
        "{changes} changes in {churned:.1} s; {} of {expected} deliveries seen ({missed} superseded or missed)",
        s.latency_ms.len()
    );

    // A service exported, changed and withdrawn, timed to a client of
    // another cluster.
    eprintln!("exporting, changing and withdrawing services");
    let mut lifecycle = Vec::new();
    for round in 0..5 {
        let svc = format!("fresh-{round}");
        let held: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let watcher = client(
            &clusters[1].conns[0],
            vec![svc.clone()],
            Arc::default(),
            Arc::default(),
            held.clone(),
        )
        .await?;
        port = port.wrapping_add(1).max(1);
        let first = register(&clusters[0].conns[0], &svc, port, endpoint_bytes.clone()).await?;
        let t = Instant::now();
        clusters[0].conns[0]
            .admin()
            .export(ExportRequest {
                namespace: NS.into(),
                name: svc.clone(),
            })
            .await?;
        wait_held(&held, |h| h.get(&svc) == Some(&1)).await?;
        lifecycle.push(("exported".to_string(), t.elapsed().as_secs_f64() * 1000.0));
        port = port.wrapping_add(1).max(1);
        let t = Instant::now();
        let second = register(&clusters[0].conns[0], &svc, port, endpoint_bytes.clone()).await?;
        wait_held(&held, |h| h.get(&svc) == Some(&2)).await?;
        lifecycle.push(("changed".to_string(), t.elapsed().as_secs_f64() * 1000.0));
        let t = Instant::now();
        drop(first);
        drop(second);
        wait_held(&held, |h| !h.contains_key(&svc)).await?;
        lifecycle.push(("withdrawn".to_string(), t.elapsed().as_secs_f64() * 1000.0));
        drop(watcher);
    }

    // What a sidecar would be sent whole: the table of every service.
    let full_table_bytes = {
        let req = WatchRequest {
            node: Some(watch_request::Node::Sidecar(SidecarRegistration {
                namespace: NS.into(),
                service_account: "all".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut s = clusters[0].conns[0]
            .control()
            .watch_config(tokio_stream::once(req))
            .await?
            .into_inner();
        let m: ConfigSnapshot = s.message().await?.context("a full snapshot")?;
        m.encoded_len()
    };

    // A real sidecar in the loaded mesh, that has called ten services.
    let (sidecar_rss_mib, sidecar_held) = real_sidecar(&clusters[0], root.path(), &used).await?;

    let r = Results {
        args: Some(args.clone()),
        setup_s,
        changes,
        deliveries: s.latency_ms.len(),
        latency_ms: [
            pct(&s.latency_ms, 0.5),
            pct(&s.latency_ms, 0.99),
            pct(&s.latency_ms, 1.0),
        ],
        client_delta_bytes: [pct(&s.message_bytes, 0.5), pct(&s.message_bytes, 1.0)],
        config_bytes_per_change: delta_bytes / changes as f64,
        full_table_bytes,
        peering_bytes_per_change: peering / changes as f64,
        controller_cpu_percent: [pct(&cpu, 0.5), pct(&cpu, 1.0)],
        controller_rss_mib: [pct(&rss, 0.5), pct(&rss, 1.0)],
        lifecycle_ms: lifecycle,
        sidecar_rss_mib,
        sidecar_held,
    };
    let text = markdown(&r, &args);
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")))?;
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    if let Some(path) = &args.report {
        crate::report::splice_between(path, &text, BEGIN, END)?;
    }
    drop(clients);
    drop(endpoints);
    Ok(())
}

/// Wait (at most 30 s) until what a client holds passes `f`.
async fn wait_held(
    held: &Mutex<HashMap<String, u32>>,
    f: impl Fn(&HashMap<String, u32>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f(&held.lock().unwrap()) {
        anyhow::ensure!(Instant::now() < deadline, "a lifecycle step did not arrive in 30 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Start `isthmus sidecar` in `cluster` with DNS on, look up ten used
/// services through it (so it learns them), and read its memory.
async fn real_sidecar(cluster: &Cluster, root: &std::path::Path, used: &[String]) -> anyhow::Result<(f64, usize)> {
    let sc = Component::start(
        root,
        "real-sidecar",
        &format!(
            "sidecar --dir {} --namespace {NS} --service-account client --inbound-addr 127.0.0.1:0 \
             --outbound-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --dns-addr 127.0.0.1:0 --log warn",
            cluster.dir.display()
        ),
    );
    let dns = sc.addr("dns");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut known = 0;
    for (i, svc) in used.iter().take(10).enumerate() {
        udp.send_to(&dns_query(i as u16, &format!("{svc}.{NS}.svc.clusterset.local")), &dns)
            .await?;
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
            .await
            .context("a DNS answer")??;
        // NOERROR with one answer: the sidecar learned the service.
        if n > 12 && buf[3] & 0x0f == 0 && buf[7] == 1 {
            known += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((isthmus_e2e::rss_kib(sc.pid()) as f64 / 1024.0, known))
}

/// A DNS query for the A record of `name` (RFC 1035 4.1).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn markdown(r: &Results, a: &ScaleArgs) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let life = |step: &str| {
        let v: Vec<f64> = r
            .lifecycle_ms
            .iter()
            .filter(|(s, _)| s == step)
            .map(|(_, v)| *v)
            .collect();
        format!(
            "{:.0} ms (median of {}, max {:.0} ms)",
            pct(&v, 0.5),
            v.len(),
            pct(&v, 1.0)
        )
    };
    format!(
        "{BEGIN}\n\
         Commit `{commit}`, {machine}. `scripts/bench-scale` (`isthmus-bench scale --clusters {clusters} --services {services} \
         --endpoints {endpoints} --churn {churn} --duration {duration}s`): {clusters} controller processes linked in a full \
         mesh, {services} services exported (each cluster {per}), {endpoints} endpoints registered as config streams, \
         one client sidecar per cluster using {uses} services of other clusters; the mesh converged {setup:.0} s after the \
         first controller started.\n\n\
         | Figure | Result | Target |\n|---|---|---|\n\
         | Change in one cluster until a client sidecar of another holds it: p50 / p99 / max | {p50:.0} / {p99:.0} / {max:.0} ms \
         ({n} deliveries of {changes} changes) | p99 ≤ 1000 ms: {v_lat} |\n\
         | Bytes a client sidecar is sent per change it uses: median / max | {b50:.0} / {bmax:.0} B | grows with the change, \
         not the mesh: {v_bytes} |\n\
         | Config bytes sent by all controllers per change (every sidecar) | {cfg:.0} B | — |\n\
         | The whole service table, as every sidecar was sent it per change before | {full} B | — |\n\
         | Peering bytes per change (all controllers) | {peer:.0} B | — |\n\
         | Controller CPU during churn: median / max of {clusters} | {cpu50:.0} % / {cpumax:.0} % of a core | — |\n\
         | Controller RSS: median / max | {rss50:.0} / {rssmax:.0} MiB | — |\n\
         | A service exported in one cluster until a client of another holds it | {exp} | — |\n\
         | ... an endpoint added | {chg} | — |\n\
         | ... withdrawn (its endpoints gone) until the client drops it | {wd} | — |\n\
         | A real `isthmus sidecar` in the loaded mesh, that looked up {held} services: RSS | {srss:.1} MiB | ≤ 20 MB: {v_rss} |\n\
         {END}",
        commit = crate::report::commit(),
        machine = crate::report::machine(),
        clusters = a.clusters,
        services = a.services,
        endpoints = a.endpoints,
        churn = a.churn,
        duration = a.duration.as_secs(),
        per = a.services / a.clusters,
        uses = a.uses,
        setup = r.setup_s,
        p50 = r.latency_ms[0],
        p99 = r.latency_ms[1],
        max = r.latency_ms[2],
        n = r.deliveries,
        changes = r.changes,
        v_lat = verdict(r.latency_ms[1] <= 1000.0),
        b50 = r.client_delta_bytes[0],
        bmax = r.client_delta_bytes[1],
        v_bytes = verdict(r.client_delta_bytes[1] < r.full_table_bytes as f64 / 100.0),
        cfg = r.config_bytes_per_change,
        full = r.full_table_bytes,
        peer = r.peering_bytes_per_change,
        cpu50 = r.controller_cpu_percent[0],
        cpumax = r.controller_cpu_percent[1],
        rss50 = r.controller_rss_mib[0],
        rssmax = r.controller_rss_mib[1],
        exp = life("exported"),
        chg = life("changed"),
        wd = life("withdrawn"),
        held = r.sidecar_held,
        srss = r.sidecar_rss_mib,
        v_rss = verdict(r.sidecar_rss_mib * 1.048_576 <= 20.0),
    )
}
