//! `isthmus-bench loss`: the cross-cluster hop under packet loss and
//! round-trip time, QUIC tunnel against the stunnel pair in the same run.
//!
//! Both tunnels cross a relay in this process that delays each packet
//! (UDP, per datagram) or each chunk (TCP) by half the round trip, in each
//! direction: this kernel has no netem. Loss is nftables dropping a share
//! of the packets between the tunnel's client end and the relay, in both
//! directions, and nowhere else. The TCP relay splits the connection, so
//! TCP's loss recovery runs over the loopback hop's round trip, not the
//! emulated one: that favours the stunnel baseline, never Isthmus.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_e2e::{Component, Pair, ok};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::load::{self, Target};

const BEGIN: &str = "<!-- loss:begin (written by isthmus-bench loss; do not edit by hand) -->";
const END: &str = "<!-- loss:end -->";
const EAST: &str = "127.0.96";
const WEST: &str = "127.0.97";
const RELAY: &str = "127.0.98.1";
const TABLE: &str = "isthmus_bench_loss";

#[derive(clap::Args, Clone, Serialize)]
pub struct LossArgs {
    /// Round-trip times to add, milliseconds.
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 20, 80])]
    rtt_ms: Vec<u64>,
    /// Packet loss on the tunnel hop, percent.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0f64, 1.0, 5.0])]
    loss: Vec<f64>,
    /// Size of the one-connection bulk download, MiB.
    #[arg(long, default_value_t = 64)]
    bulk_mib: usize,
    /// A bulk download not done in this time counts as this slow.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(skip)]
    bulk_timeout: Duration,
    /// Request rate for the latency run, and its length.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(skip)]
    duration: Duration,
    /// Congestion control of both gateways' QUIC (`isthmus gateway
    /// --congestion`): cubic, bbr or newreno.
    #[arg(long, default_value = "cubic")]
    congestion: String,
    #[arg(long)]
    report: Option<PathBuf>,
}

use std::path::PathBuf;

/// One-way delay of both relays, microseconds (changed between cases).
type Delay = Arc<AtomicU64>;

/// Datagrams from the front socket go to `upstream` from a socket per
/// sender, and answers come back the same way, each `delay` late.
async fn udp_relay(front: Arc<UdpSocket>, upstream: SocketAddr, delay: Delay) -> anyhow::Result<()> {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let to_front = delayed(front.clone(), delay.clone());
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let back = match backs.get(&from) {
            Some(b) => b.clone(),
            None => {
                let b = Arc::new(UdpSocket::bind((RELAY, 0)).await?);
                b.connect(upstream).await?;
                let (reader, out) = (b.clone(), to_front.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = reader.recv(&mut buf).await {
                        let _ = out.send((Instant::now(), buf[..n].to_vec(), from));
                    }
                });
                backs.insert(from, b.clone());
                b
            }
        };
        let _ = delayed_one(&back, &delay, buf[..n].to_vec()).await;
    }
}

/// Toward the upstream: sent from a task per sender socket, in order.
async fn delayed_one(back: &Arc<UdpSocket>, delay: &Delay, data: Vec<u8>) -> anyhow::Result<()> {
    let d = Duration::from_micros(delay.load(Ordering::Relaxed));
    if d.is_zero() {
        back.send(&data).await?;
        return Ok(());
    }
    let back = back.clone();
    let due = Instant::now() + d;
    // Constant delay keeps order: each datagram waits its own due time.
    tokio::spawn(async move {
        tokio::time::sleep_until(due.into()).await;
        let _ = back.send(&data).await;
    });
    Ok(())
}

/// A sender that puts each datagram on `sock`, to its address, `delay`
/// after it was handed over.
fn delayed(sock: Arc<UdpSocket>, delay: Delay) -> mpsc::UnboundedSender<(Instant, Vec<u8>, SocketAddr)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, SocketAddr)>();
    tokio::spawn(async move {
        while let Some((at, data, to)) = rx.recv().await {
            let due = at + Duration::from_micros(delay.load(Ordering::Relaxed));
            tokio::time::sleep_until(due.into()).await;
            let _ = sock.send_to(&data, to).await;
        }
    });
    tx
}

/// TCP: each connection to `front` is carried to `upstream`, each chunk
/// `delay` late, at most 4 MiB in flight each way.
async fn tcp_relay(front: TcpListener, upstream: SocketAddr, delay: Delay) -> anyhow::Result<()> {
    loop {
        let (client, _) = front.accept().await?;
        let delay = delay.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, delay.clone()), pipe(sr, cw, delay));
        });
    }
}

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Delay) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            let due = at + Duration::from_micros(delay.load(Ordering::Relaxed));
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// nftables rules dropping `percent` of the packets to and from the
/// relays' front ports; removed when dropped.
struct Loss;

impl Loss {
    fn set(udp: u16, tcp: u16, percent: f64) -> anyhow::Result<Loss> {
        let _ = nft(&format!("delete table inet {TABLE}\n"));
        let permille = (percent * 10.0).round() as u32;
        let mut rules =
            format!("table inet {TABLE} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n");
        if permille > 0 {
            for m in [
                format!("udp dport {udp}"),
                format!("udp sport {udp}"),
                format!("tcp dport {tcp}"),
                format!("tcp sport {tcp}"),
            ] {
                rules += &format!("  ip daddr {RELAY} {m} numgen random mod 1000 < {permille} drop\n");
                rules += &format!("  ip saddr {RELAY} {m} numgen random mod 1000 < {permille} drop\n");
            }
        }
        rules += " }\n}\n";
        nft(&rules)?;
        Ok(Loss)
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {TABLE}\n"));
    }
}

fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (nftables, as root)")?;
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[derive(Serialize)]
struct CaseResult {
    rtt_ms: u64,
    loss: f64,
    /// (quic, tcp): MiB/s of one bulk download; p50 and p99, ms.
    bulk_mib_s: [f64; 2],
    p50_ms: [f64; 2],
    p99_ms: [f64; 2],
    errors: [u64; 2],
}

pub fn run(args: LossArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _enter = rt.enter();
    let root = tempfile::tempdir()?;
    let r = root.path();
    let (e, w) = (
        r.join("east").display().to_string(),
        r.join("west").display().to_string(),
    );
    let delay: Delay = Arc::default();
    let me = std::env::current_exe()?;
    let server = Component::start_program(&me, r, "upstream", &format!("upstream --listen {EAST}.21:0"));
    let upstream: SocketAddr = server.addr("listen").parse()?;

    // The relay's front is bound first: the east gateway announces it.
    let front = rt.block_on(UdpSocket::bind((RELAY, 0)))?;
    let udp_front = front.local_addr()?;
    let _east_ctl = Pair::controller(r, "east", &e, EAST, "");
    let east_gw = Component::start(
        r,
        "east-gateway",
        &format!(
            "gateway --dir {e} --tunnel-addr {EAST}.2:0 --quic-addr {EAST}.2:0 --admin-addr {EAST}.2:0 --advertise {udp_front} --congestion {}",
            args.congestion
        ),
    );
    let quic: SocketAddr = east_gw.addr("quic").parse()?;
    rt.spawn(udp_relay(Arc::new(front), quic, delay.clone()));
    let _east_sc = Component::start(
        r,
        "east-sidecar",
        &format!(
            "sidecar --dir {e} --namespace demo --service bench --port 8080 --app {upstream} \
             --inbound-addr {EAST}.20:0 --outbound-addr {EAST}.20:0 --admin-addr {EAST}.20:0"
        ),
    );
    let _west_ctl = Pair::controller(r, "west", &w, WEST, "");
    let _west_gw = Component::start(
        r,
        "west-gateway",
        &format!(
            "gateway --dir {w} --tunnel-addr {WEST}.2:0 --quic-addr {WEST}.2:0 --admin-addr {WEST}.2:0 --congestion {}",
            args.congestion
        ),
    );
    let west_client = Pair::client_sidecar(r, &w, WEST, "west-client");
    let token = ok(&["token", "create", "--dir", &e]).trim().to_string();
    ok(&["link", "--dir", &w, &token]);
    ok(&["export", "--dir", &e, "demo/bench"]);

    let stunnel_dir = r.join("stunnel");
    std::fs::create_dir_all(&stunnel_dir)?;
    let tcp_front = rt.block_on(TcpListener::bind((RELAY, 0)))?;
    let tcp_front_addr = tcp_front.local_addr()?;
    let tunnel = crate::stunnel::start_via(
        &stunnel_dir,
        &format!("{WEST}.31"),
        &format!("{EAST}.31"),
        upstream,
        |middle| {
            rt.spawn(tcp_relay(tcp_front, middle, delay.clone()));
            Ok(tcp_front_addr)
        },
    )?;

    let paths = [
        Target {
            addr: west_client.addr("outbound").parse()?,
            host: "bench.demo.svc.clusterset.local:8080".into(),
        },
        Target {
            addr: tunnel.entry,
            host: upstream.to_string(),
        },
    ];
    let mut results = Vec::new();
    rt.block_on(async {
        for p in &paths {
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Err(e) = load::probe(p).await {
                anyhow::ensure!(Instant::now() < deadline, "a path does not answer: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for &rtt in &args.rtt_ms {
            for &loss in &args.loss {
                delay.store(rtt * 500, Ordering::Relaxed);
                let _loss = Loss::set(udp_front.port(), tcp_front_addr.port(), loss)?;
                let mut c = CaseResult {
                    rtt_ms: rtt,
                    loss,
                    bulk_mib_s: [0.0; 2],
                    p50_ms: [0.0; 2],
                    p99_ms: [0.0; 2],
                    errors: [0; 2],
                };
                for (i, p) in paths.iter().enumerate() {
                    let fixed = load::fixed_rate(p, args.rate, 10, args.duration, 1024).await?;
                    c.p50_ms[i] = fixed.latency.value_at_quantile(0.5) as f64 / 1e6;
                    c.p99_ms[i] = fixed.latency.value_at_quantile(0.99) as f64 / 1e6;
                    c.errors[i] = fixed.errors;
                    let bytes = args.bulk_mib * 1024 * 1024;
                    c.bulk_mib_s[i] = match tokio::time::timeout(args.bulk_timeout, load::bulk(p, bytes)).await {
                        Ok(r) => r? / (1024.0 * 1024.0),
                        // Not done in time: at most this fast.
                        Err(_) => -(bytes as f64 / args.bulk_timeout.as_secs_f64() / (1024.0 * 1024.0)),
                    };
                }
                eprintln!(
                    "rtt {rtt} ms, loss {loss}%: bulk {:.1} vs {:.1} MiB/s, p99 {:.1} vs {:.1} ms",
                    c.bulk_mib_s[0], c.bulk_mib_s[1], c.p99_ms[0], c.p99_ms[1]
                );
                results.push(c);
            }
        }
        anyhow::Ok(())
    })?;
    let text = markdown(&args, &results);
    println!("{text}");
    if let Some(path) = &args.report {
        crate::report::splice_between(path, &text, BEGIN, END)?;
    }
    drop(tunnel);
    Ok(())
}

fn markdown(a: &LossArgs, results: &[CaseResult]) -> String {
    let mib = |v: f64| {
        if v < 0.0 {
            format!("< {:.2}", -v)
        } else {
            format!("{v:.1}")
        }
    };
    let mut s = format!(
        "{BEGIN}\nCommit `{}`, {}. `scripts/bench-loss` (`isthmus-bench loss --bulk-mib {} --rate {} --duration {}s --congestion {}`): \
         the cross-cluster path (client sidecar, QUIC between the gateways, server sidecar) against the stunnel pair \
         (TLS over TCP), loss and delay on the tunnel hop only. Bulk: one `GET` of {} MiB on a new connection \
         (\"<\": not done in {} s). Latency: {} req/s over 10 connections, 1 KiB each way.\n\n\
         | RTT added | loss | bulk: Isthmus / stunnel | ratio | p50: Isthmus / stunnel | p99: Isthmus / stunnel | p99 ratio | errors |\n\
         |---|---|---|---|---|---|---|---|\n",
        crate::report::commit(),
        crate::report::machine(),
        a.bulk_mib,
        a.rate,
        a.duration.as_secs(),
        a.congestion,
        a.bulk_mib,
        a.bulk_timeout.as_secs(),
        a.rate
    );
    for c in results {
        s += &format!(
            "| {} ms | {}% | {} / {} MiB/s | {:.2}x | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.2}x | {} / {} |\n",
            c.rtt_ms,
            c.loss,
            mib(c.bulk_mib_s[0]),
            mib(c.bulk_mib_s[1]),
            c.bulk_mib_s[0].abs() / c.bulk_mib_s[1].abs(),
            c.p50_ms[0],
            c.p50_ms[1],
            c.p99_ms[0],
            c.p99_ms[1],
            c.p99_ms[0] / c.p99_ms[1],
            c.errors[0],
            c.errors[1]
        );
    }
    s + END
}
