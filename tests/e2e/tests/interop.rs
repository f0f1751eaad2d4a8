//! Interop: servers and clients nobody here wrote, through the mesh.
//!
//! Two clusters of real processes. Each runs three workloads behind
//! sidecars: `isthmus echo` (demo/echo, HTTP/1.1), a grpcio (gRPC C-core)
//! server (demo/hello, h2c) and a `websockets` server (demo/ws); east
//! exports all three. West's client sidecar answers DNS and listens on each
//! service port, so clients dial it as they would dial the service. Every
//! case runs over both paths: intra-cluster (`west.<svc>...`, pinned to
//! west's own workload) and cross-cluster (`east.<svc>...`, through both
//! gateways and QUIC).
//!
//! | client | server | what |
//! |---|---|---|
//! | grpcio | grpcio | unary, the three streaming kinds, metadata and trailers, `grpc-timeout` as deadline, cancellation reaching the server, the health service, 16 MiB messages, status codes |
//! | grpc-js (Node) | grpcio | unary, the three streaming kinds, metadata and trailers, deadline, cancellation reaching the server, 16 MiB messages, status codes |
//! | curl (h2c) | grpcio | `grpc-timeout` enforced on the path for a client that keeps no deadline |
//! | websockets | websockets | upgrade through the mesh, text and binary frames (1 MiB) both ways, the caller's identity at the server; and a session two minutes long |
//! | curl | echo | HTTP/1.1 proxy, h2c with prior knowledge on the service port, HTTP/1.0, `Expect: 100-continue`, chunked upload, a streamed answer's first byte on time, hop-by-hop headers, 1 GiB each way with flat memory |
//! | h2load | echo | 2,000 multiplexed HTTP/2 requests, none failed |
//!
//! Run with `--nocapture` to see the figures.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_e2e::{Component, Pair, Program, eventually, get_via, interop_node, interop_python, ok, repo, rss_kib};

const EAST: &str = "127.0.62";
const WEST: &str = "127.0.63";

/// A workload behind a sidecar: the app and its sidecar.
struct Workload {
    _app: Box<dyn std::any::Any>,
    _sidecar: Component,
}

/// Where a workload's sidecar runs: its cluster directory and loopback
/// address.
struct At<'a> {
    root: &'a Path,
    dir: &'a str,
    net: &'a str,
    ip: u8,
}

/// `service` on `port`, served by the app at `app`.
fn sidecar(at: At<'_>, service: &str, port: u16, app: &str, http2: bool) -> Component {
    let At { root, dir, net, ip } = at;
    Component::start(
        root,
        &format!("{}-{service}-sidecar", dir.rsplit('/').next().unwrap_or("x")),
        &format!(
            "sidecar --dir {dir} --namespace demo --service {service} --port {port} --app {app} {} \
             --inbound-addr {net}.{ip}:0 --outbound-addr {net}.{ip}:0 --admin-addr {net}.{ip}:0",
            if http2 { "--app-http2" } else { "" }
        ),
    )
}

struct Mesh {
    root: PathBuf,
    east_dir: String,
    west_dir: String,
    _components: Vec<Component>,
    _workloads: Vec<Workload>,
    /// West's client sidecar: HTTP proxy address, and the IP it answers
    /// names with and listens on at every service port.
    client: Component,
    client_ip: String,
    /// Processes on the cross-cluster path, by name, to watch.
    path_pids: Vec<(String, u32)>,
}

impl Mesh {
    fn start(root: &Path) -> Self {
        let py = interop_python();
        let interop = repo().join("tests/interop");
        let e = root.join("east").display().to_string();
        let w = root.join("west").display().to_string();
        let mut components = Vec::new();
        let mut workloads = Vec::new();
        let mut path_pids = Vec::new();
        for (name, dir, net) in [("east", &e, EAST), ("west", &w, WEST)] {
            components.push(Pair::controller(root, name, dir, net, ""));
            let gw = Pair::gateway(root, name, dir, net);
            path_pids.push((format!("{name} gateway"), gw.pid()));
            components.push(gw);
            let echo = Component::start(
                root,
                &format!("{name}-echo"),
                &format!("echo --cluster {name} --listen {net}.20:0"),
            );
            let echo_sc = sidecar(At { root, dir, net, ip: 20 }, "echo", 8080, &echo.addr("listen"), false);
            if name == "east" {
                path_pids.push(("east echo sidecar".to_string(), echo_sc.pid()));
            }
            workloads.push(Workload {
                _app: Box::new(echo),
                _sidecar: echo_sc,
            });
            let grpc = Program::start(
                root,
                &format!("{name}-grpc"),
                &py,
                &[
                    interop.join("grpc_server.py").to_str().unwrap(),
                    "--port",
                    "0",
                    "--bind",
                    &format!("{net}.21"),
                ],
            );
            let grpc_sc = sidecar(
                At { root, dir, net, ip: 21 },
                "hello",
                50051,
                &format!("{net}.21:{}", grpc.port()),
                true,
            );
            workloads.push(Workload {
                _app: Box::new(grpc),
                _sidecar: grpc_sc,
            });
            let ws = Program::start(
                root,
                &format!("{name}-ws"),
                &py,
                &[
                    interop.join("ws_server.py").to_str().unwrap(),
                    "--port",
                    "0",
                    "--bind",
                    &format!("{net}.22"),
                ],
            );
            let ws_sc = sidecar(
                At { root, dir, net, ip: 22 },
                "ws",
                8765,
                &format!("{net}.22:{}", ws.port()),
                false,
            );
            workloads.push(Workload {
                _app: Box::new(ws),
                _sidecar: ws_sc,
            });
        }
        let client = Component::start(
            root,
            "west-client",
            &format!(
                "sidecar --dir {w} --namespace demo --service-account client --inbound-addr {WEST}.30:0 \
                 --outbound-addr {WEST}.30:0 --admin-addr {WEST}.30:0 --dns-addr {WEST}.30:0"
            ),
        );
        let token = ok(&["token", "create", "--dir", &e]).trim().to_string();
        ok(&["link", "--dir", &w, &token]);
        // West runs the same services, unexported: east's endpoints join
        // them (east.<svc>... names) because west imports them.
        ok(&["imports", "--dir", &w, "east", "demo/*"]);
        for svc in ["demo/echo", "demo/hello", "demo/ws"] {
            ok(&["export", "--dir", &e, svc]);
        }
        let proxy = client.addr("outbound");
        eventually("echo across clusters", Duration::from_secs(30), || {
            get_via(&proxy, "http://east.echo.demo.svc.clusterset.local:8080/")
                .ok()
                .filter(|r| r.status == 200)
        });
        // Unchanged clients look the names up first: the client sidecar
        // learns each service then, and opens its port.
        let dns = client.addr("dns");
        for svc in ["echo", "hello", "ws"] {
            let name = format!("{svc}.demo.svc.clusterset.local");
            assert!(isthmus_e2e::dns_a(&dns, &name).is_ok(), "{name} does not resolve");
        }
        Mesh {
            root: root.to_path_buf(),
            east_dir: e,
            west_dir: w,
            _components: components,
            _workloads: workloads,
            client_ip: WEST.to_string() + ".30",
            path_pids,
            client,
        }
    }

    fn proxy(&self) -> String {
        self.client.addr("outbound")
    }

    /// The client sidecar's listener for a service port.
    fn port(&self, port: u16) -> String {
        format!("{}:{port}", self.client_ip)
    }
}

/// Run a command to completion; its stdout, or a panic with everything.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn curl(args: &[&str]) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120"]).args(args);
    run(&format!("curl {args:?}"), &mut c)
}

const PATHS: [&str; 2] = ["west", "east"];

fn grpc_cases(m: &Mesh) {
    let py = interop_python();
    for cluster in PATHS {
        let out = run(
            &format!("grpcio client, {cluster} path"),
            Command::new(&py).args([
                repo().join("tests/interop/grpc_client.py").to_str().unwrap(),
                "--target",
                &m.port(50051),
                "--authority",
                &format!("{cluster}.hello.demo.svc.clusterset.local:50051"),
                "--case",
                "all",
            ]),
        );
        let passed = out.lines().filter(|l| l.contains("\"ok\": true")).count();
        println!("grpcio -> grpcio via {cluster}: {passed} cases passed");
        assert!(passed >= 10, "{out}");
        // grpc-js: a gRPC stack that shares no code with C-core.
        let out = run(
            &format!("grpc-js client, {cluster} path"),
            interop_node("grpc_client.js").args([
                "--target",
                &m.port(50051),
                "--authority",
                &format!("{cluster}.hello.demo.svc.clusterset.local:50051"),
            ]),
        );
        let passed = out.lines().filter(|l| l.contains("\"ok\":true")).count();
        println!("grpc-js -> grpcio via {cluster}: {passed} cases passed");
        assert!(passed >= 9, "{out}");
        grpc_timeout_case(m, cluster);
    }
}

/// `grpc-timeout` bounds the call on the path: curl sends the header but
/// keeps no deadline of its own, so only the mesh (the sidecar's deadline,
/// or the server's from the header passed on) can end this 5 s Sleep at
/// 300 ms.
fn grpc_timeout_case(m: &Mesh, cluster: &str) {
    // One gRPC frame: uncompressed, 3 bytes, SleepRequest { millis: 5000 }.
    let frame = m.root.join("sleep-5s.grpc");
    std::fs::write(&frame, [0u8, 0, 0, 0, 3, 0x08, 0x88, 0x27]).unwrap();
    let out = curl(&[
        "--http2-prior-knowledge",
        "--connect-to",
        &format!("::{}", m.port(50051)),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        "grpc-timeout: 300m",
        "--data-binary",
        &format!("@{}", frame.display()),
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total}",
        &format!("http://{cluster}.hello.demo.svc.clusterset.local:50051/interop.Echo/Sleep"),
    ]);
    let took: f64 = out.lines().last().unwrap().trim().parse().unwrap();
    println!("curl gRPC with grpc-timeout 300m via {cluster}: ended after {took} s");
    assert!(out.to_ascii_lowercase().contains("grpc-status: 4"), "{out}");
    assert!(took < 2.0, "the call ran {took} s past its 300 ms grpc-timeout");
}

fn ws_case(m: &Mesh, cluster: &str, messages: &str, seconds: &str) -> String {
    let py = interop_python();
    run(
        &format!("websockets client, {cluster} path"),
        Command::new(&py).args([
            repo().join("tests/interop/ws_client.py").to_str().unwrap(),
            "--url",
            &format!("ws://{cluster}.ws.demo.svc.clusterset.local:8765/chat"),
            "--connect-to",
            &m.port(8765),
            "--messages",
            messages,
            "--seconds",
            seconds,
            "--expect-header",
            "x-isthmus-client-id=spiffe://west.mesh/ns/demo/sa/client",
            "--timeout",
            "30",
        ]),
    )
}

fn curl_cases(m: &Mesh) {
    let proxy = format!("http://{}", m.proxy());
    for cluster in PATHS {
        let base = format!("http://{cluster}.echo.demo.svc.clusterset.local:8080");
        // HTTP/1.1 through the proxy port.
        let v: serde_json::Value = serde_json::from_str(&curl(&["-x", &proxy, &format!("{base}/")])).unwrap();
        assert_eq!(v["cluster"], cluster, "{v}");
        assert_eq!(v["client_identity"], "spiffe://west.mesh/ns/demo/sa/client");
        // h2c with prior knowledge on the service port, dialled as the name.
        let connect_to = format!("::{}", m.port(8080));
        let out = curl(&[
            "--http2-prior-knowledge",
            "--connect-to",
            &connect_to,
            "-w",
            "\n%{http_version}",
            &format!("{base}/"),
        ]);
        assert!(out.ends_with("\n2"), "h2c answer: {out}");
        // HTTP/1.0.
        let out = curl(&["--http1.0", "-x", &proxy, "-w", "\n%{http_code}", &format!("{base}/")]);
        assert!(
            out.ends_with("\n200") && out.contains(&format!("\"cluster\":\"{cluster}\"")),
            "{out}"
        );
        // Expect: 100-continue with a 2 MiB body, and a chunked upload.
        let file = m.root.join("two-mib");
        std::fs::write(&file, vec![b'a'; 2 << 20]).unwrap();
        // curl waits up to 30 s for the 100 before it sends the body: an
        // answer well within that means the 100 came through.
        let out = curl(&[
            "-x",
            &proxy,
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "30",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "\n%{time_total}",
            &format!("{base}/upload"),
        ]);
        let (body, took) = out.rsplit_once('\n').unwrap();
        assert_eq!(body.trim(), r#"{"received":2097152}"#);
        let took: f64 = took.parse().unwrap();
        assert!(took < 10.0, "Expect: 100-continue waited {took} s for its 100");
        let out = curl(&[
            "-x",
            &proxy,
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{base}/upload"),
        ]);
        assert_eq!(out.trim(), r#"{"received":2097152}"#);
        // A streamed answer: its first chunk arrives when the app sends it,
        // not when the body ends.
        let out = curl(&[
            "-N",
            "-x",
            &proxy,
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total}",
            &format!("{base}/stream?chunks=3&interval_ms=1000"),
        ]);
        let t: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        println!(
            "curl -> echo via {cluster}: streamed answer, first byte {:.3} s, last {:.3} s",
            t[0], t[1]
        );
        assert!(t[0] < 0.9 && t[1] >= 1.9, "first byte {} s, whole {} s", t[0], t[1]);
        // Hop-by-hop headers go; everything else, te: trailers included, stays.
        let v: serde_json::Value = serde_json::from_str(&curl(&[
            "-x",
            &proxy,
            "-H",
            "Connection: x-hop, TE",
            "-H",
            "x-hop: 1",
            "-H",
            "TE: trailers",
            "-H",
            "x-app: kept",
            &format!("{base}/"),
        ]))
        .unwrap();
        let h = &v["headers"];
        assert_eq!(h["x-app"], "kept", "{h}");
        assert_eq!(h["te"], "trailers", "{h}");
        assert!(
            h.get("x-hop").is_none() && h.get("connection").is_none_or(|c| c == "keep-alive"),
            "{h}"
        );
    }
}

fn h2load_cases(m: &Mesh) {
    for cluster in PATHS {
        let mut c = Command::new("h2load");
        c.args([
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "10",
            "-H",
            &format!(":authority: {cluster}.echo.demo.svc.clusterset.local:8080"),
            &format!("http://{}/", m.port(8080)),
        ]);
        let out = run(&format!("h2load via {cluster}"), &mut c);
        let line = out
            .lines()
            .find(|l| l.starts_with("requests:"))
            .unwrap_or_default()
            .to_string();
        println!("h2load -> echo via {cluster}: {line}");
        assert!(line.contains("2000 succeeded, 0 failed, 0 errored"), "{out}");
    }
}

/// 1 GiB down and up across clusters, while the memory of every process on
/// the path is watched: it must stay flat (bodies stream, nothing holds one).
fn gigabyte(m: &Mesh, pids: &[(String, u32)]) {
    const GIB: u64 = 1 << 30;
    let proxy = format!("http://{}", m.proxy());
    let base = "http://east.echo.demo.svc.clusterset.local:8080";
    let before: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, pids) = (stop.clone(), pids.iter().map(|(_, p)| *p).collect::<Vec<_>>());
        std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, p) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*p));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let t = Instant::now();
    let got = curl(&[
        "-x",
        &proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("{base}/bulk?bytes={GIB}"),
    ]);
    let down = t.elapsed();
    assert_eq!(got.trim(), GIB.to_string());
    let t = Instant::now();
    let mut up = Command::new("bash");
    up.args([
        "-c",
        &format!("head -c {GIB} /dev/zero | curl -sS --max-time 300 -x {proxy} -T - {base}/upload"),
    ]);
    let out = run("1 GiB upload", &mut up);
    let up_time = t.elapsed();
    assert_eq!(out.trim(), format!("{{\"received\":{GIB}}}"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    println!(
        "1 GiB across clusters: down {:.1} s ({:.0} MiB/s), up {:.1} s ({:.0} MiB/s)",
        down.as_secs_f64(),
        1024.0 / down.as_secs_f64(),
        up_time.as_secs_f64(),
        1024.0 / up_time.as_secs_f64()
    );
    for (i, (name, _)) in pids.iter().enumerate() {
        let grew = peak[i].saturating_sub(before[i]);
        println!(
            "  {name}: RSS {} KiB before, peak {} KiB (+{grew} KiB)",
            before[i], peak[i]
        );
        assert!(grew < 64 * 1024, "{name} grew {grew} KiB while carrying 1 GiB");
    }
}

#[test]
fn third_party_clients_and_servers_through_both_paths() {
    isthmus_e2e::binary();
    let root = tempfile::tempdir().unwrap();
    let m = Mesh::start(root.path());
    // A WebSocket session across clusters, frames both ways for two
    // minutes, while everything else runs.
    let long = {
        let py = interop_python();
        let port = m.port(8765);
        std::thread::spawn(move || {
            let t = Instant::now();
            let out = run(
                "websockets client, two minutes across",
                Command::new(&py).args([
                    repo().join("tests/interop/ws_client.py").to_str().unwrap(),
                    "--url",
                    "ws://east.ws.demo.svc.clusterset.local:8765/long",
                    "--connect-to",
                    &port,
                    "--messages",
                    "240",
                    "--seconds",
                    "120",
                    "--timeout",
                    "30",
                ]),
            );
            (t.elapsed(), out)
        })
    };
    for cluster in PATHS {
        let out = ws_case(&m, cluster, "20", "0");
        println!(
            "websockets -> websockets via {cluster}: {}",
            out.lines().last().unwrap_or_default()
        );
    }
    grpc_cases(&m);
    curl_cases(&m);
    h2load_cases(&m);
    let _ = (&m.east_dir, &m.west_dir);
    let mut pids = vec![("west client sidecar".to_string(), m.client.pid())];
    pids.extend(m.path_pids.iter().cloned());
    gigabyte(&m, &pids);
    let (took, out) = long.join().unwrap();
    println!(
        "websockets across clusters for {:.0} s: {}",
        took.as_secs_f64(),
        out.lines().last().unwrap_or_default()
    );
    assert!(took >= Duration::from_secs(115), "the long session ended early: {out}");
}
