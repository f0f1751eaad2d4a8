//! Harness for end-to-end tests: the real `isthmus` binary, clusters as
//! real processes (`isthmus up`), and a minimal HTTP/1.1 client.
//!
//! Each test gives its clusters their own loopback /24 and binds port 0, so
//! tests run in parallel without colliding; clusters are killed on drop (and
//! their components exit with their parent).

pub mod apiserver;
pub mod three;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `isthmus` binary, built once per test process.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // A test is target/<profile>/deps/<test>, a binary of this workspace
        // (the benchmark) target/<profile>/<bin>: isthmus is target/<profile>/isthmus.
        let mut profile_dir = exe.parent().expect("target dir").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "isthmus", "--bin", "isthmus"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the isthmus binary failed");
        let bin = profile_dir.join("isthmus");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Run `isthmus <args>` to completion.
pub fn isthmus(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run isthmus")
}

/// Stdout of a command that must succeed.
pub fn ok(args: &[&str]) -> String {
    let out = isthmus(args);
    assert!(
        out.status.success(),
        "isthmus {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit code and stderr of a command that must fail.
pub fn fails(args: &[&str]) -> (i32, String) {
    let out = isthmus(args);
    assert!(
        !out.status.success(),
        "isthmus {args:?} should have failed but printed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait for `f` to return `Some`, polling, for at most `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A local cluster run by `isthmus up`.
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub info: serde_json::Value,
    child: Option<Child>,
}

impl Cluster {
    /// `isthmus up --cluster name --net net [--echo] [--client] --ephemeral-ports`.
    pub fn up(root: &Path, name: &str, net: &str, echo: bool, client: bool) -> Self {
        let flags: Vec<&str> = [(echo, "--echo"), (client, "--client")]
            .into_iter()
            .filter_map(|(on, f)| on.then_some(f))
            .collect();
        Self::up_with(root, name, net, &flags)
    }

    /// `isthmus up --cluster name --net net --ephemeral-ports <flags>`.
    pub fn up_with(root: &Path, name: &str, net: &str, flags: &[&str]) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("up.json"));
        let mut args = vec!["up", "--cluster", name, "--net", net, "--ephemeral-ports"];
        args.extend(flags);
        let mut child = Command::new(binary())
            .args(&args)
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start isthmus up");
        let info = eventually(&format!("cluster {name} to come up"), Duration::from_secs(90), || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("isthmus up for {name} exited ({status}): {err}");
            }
            let s = std::fs::read_to_string(dir.join("up.json")).ok()?;
            serde_json::from_str::<serde_json::Value>(&s).ok()
        });
        Cluster {
            name: name.to_string(),
            dir,
            info,
            child: Some(child),
        }
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    /// The client workload's sidecar outbound address.
    pub fn client_proxy(&self) -> String {
        self.info["client"]["outbound"]
            .as_str()
            .expect("cluster has a client")
            .to_string()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["status", "--dir", self.dir_str(), "--json"])).expect("status JSON")
    }

    /// Stop the cluster as Ctrl-C does (SIGTERM), waiting for `up` to exit.
    pub fn stop(&mut self) {
        let Some(c) = self.child.as_mut() else { return };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        // The child stays in `self` until it has exited, so a timeout still
        // leaves it to `Drop` to kill.
        let exited = eventually("isthmus up to stop", Duration::from_secs(30), || c.try_wait().ok()?);
        self.child = None;
        assert!(exited.success(), "isthmus up exited with {exited}");
    }

    /// Kill the whole cluster at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// The runtime the harness's async clients run on (tests are threads).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// GET `url` through the HTTP proxy (a sidecar's outbound) at `proxy`.
pub fn get_via(proxy: &str, url: &str) -> std::io::Result<Response> {
    let answer = runtime()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(20), isthmus_core::http::get_via(proxy, url)).await
        })
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("GET {url} via {proxy}")))?
        .map_err(std::io::Error::other)?;
    Ok(Response {
        status: answer.status,
        headers: answer
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: answer.text(),
    })
}

/// One component process (`isthmus controller|gateway|sidecar|echo ...`),
/// started with `--ready-file`, its stderr in `<dir>/<name>.log`. `args` is
/// a command line, split on white space (paths must have none).
pub struct Component {
    pub ready: serde_json::Value,
    pub log: PathBuf,
    child: Child,
}

impl Component {
    pub fn start(dir: &Path, name: &str, args: &str) -> Self {
        Self::start_program(&binary(), dir, name, args)
    }

    /// As `start`, for another program that writes a `--ready-file`.
    pub fn start_program(program: &Path, dir: &Path, name: &str, args: &str) -> Self {
        let ready = dir.join(format!("{name}.ready.json"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(program)
            .args(args.split_whitespace())
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start component");
        let info = eventually(&format!("{name} to be ready"), Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()
        });
        Component {
            ready: info,
            log,
            child,
        }
    }

    pub fn addr(&self, key: &str) -> String {
        self.ready[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}", self.ready))
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `/metrics` of the admin endpoint at `addr`.
pub fn metrics(addr: &str) -> String {
    let r = get_via(addr, &format!("http://{addr}/metrics")).expect("scrape metrics");
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

/// The value of the sample `name{...}` whose labels include all of `labels`
/// (or `name` with no labels, if none are asked for).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if labels.is_empty()
            && let Some(value) = rest.strip_prefix(' ')
        {
            return value.trim().parse().ok();
        }
        let rest = rest.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Two clusters started component by component (as deploy/local/
/// two-clusters.sh does), so a test can kill and restart any one of them:
/// east (`127.0.<e>.0/24`) serves demo/echo, west (`127.0.<w>.0/24`) has a
/// client sidecar. `controller_flags` are added to both controllers.
pub struct Pair {
    pub root: PathBuf,
    pub east_dir: String,
    pub west_dir: String,
    pub east_ctl: Component,
    pub east_gw: Component,
    pub echo: Component,
    pub east_sc: Component,
    pub west_ctl: Component,
    pub west_gw: Component,
    pub client: Component,
}

pub const ECHO: &str = "http://echo.demo.svc.clusterset.local:8080/";

impl Pair {
    pub fn start(root: &Path, east_net: &str, west_net: &str, controller_flags: &str) -> Self {
        let e = root.join("east").display().to_string();
        let w = root.join("west").display().to_string();
        let controller = |name: &str, dir: &str, net: &str| Self::controller(root, name, dir, net, controller_flags);
        let gateway = |name: &str, dir: &str, net: &str| Self::gateway(root, name, dir, net);
        let east_ctl = controller("east", &e, east_net);
        let east_gw = gateway("east", &e, east_net);
        let (echo, east_sc) = Self::echo(root, &e, east_net);
        let west_ctl = controller("west", &w, west_net);
        let west_gw = gateway("west", &w, west_net);
        let client = Self::client_sidecar(root, &w, west_net, "west-client");
        Pair {
            root: root.to_path_buf(),
            east_dir: e,
            west_dir: w,
            east_ctl,
            east_gw,
            echo,
            east_sc,
            west_ctl,
            west_gw,
            client,
        }
    }

    /// Cluster `name`'s controller, at `<net>.1`, its state in `dir`.
    pub fn controller(root: &Path, name: &str, dir: &str, net: &str, flags: &str) -> Component {
        Component::start(
            root,
            &format!("{name}-controller"),
            &format!(
                "controller --dir {dir} --cluster {name} --control-addr {net}.1:0 --peering-addr {net}.1:0 \
                 --admin-addr {net}.1:0 {flags}"
            ),
        )
    }

    /// East's demo/echo workload and its sidecar, at `<net>.20`.
    pub fn echo(root: &Path, dir: &str, net: &str) -> (Component, Component) {
        let echo = Component::start(root, "east-echo", &format!("echo --cluster east --listen {net}.20:0"));
        let sidecar = Component::start(
            root,
            "east-sidecar",
            &format!(
                "sidecar --dir {dir} --namespace demo --service echo --port 8080 --app {} \
                 --inbound-addr {net}.20:0 --outbound-addr {net}.20:0 --admin-addr {net}.20:0",
                echo.addr("listen")
            ),
        );
        (echo, sidecar)
    }

    /// Cluster `name`'s gateway, at `<net>.2`.
    pub fn gateway(root: &Path, name: &str, dir: &str, net: &str) -> Component {
        Component::start(
            root,
            &format!("{name}-gateway"),
            &format!("gateway --dir {dir} --tunnel-addr {net}.2:0 --quic-addr {net}.2:0 --admin-addr {net}.2:0"),
        )
    }

    /// A client-only sidecar (demo/client) in the cluster at `dir`.
    pub fn client_sidecar(root: &Path, dir: &str, net: &str, name: &str) -> Component {
        Component::start(
            root,
            name,
            &format!(
                "sidecar --dir {dir} --namespace demo --service-account client \
                 --inbound-addr {net}.30:0 --outbound-addr {net}.30:0 --admin-addr {net}.30:0"
            ),
        )
    }

    pub fn proxy(&self) -> String {
        self.client.addr("outbound")
    }

    /// Link west to east, export demo/echo, and wait for a call to work.
    pub fn link_and_export(&self) {
        let token = ok(&["token", "create", "--dir", &self.east_dir]).trim().to_string();
        ok(&["link", "--dir", &self.west_dir, &token]);
        ok(&["export", "--dir", &self.east_dir, "demo/echo"]);
        let proxy = self.proxy();
        eventually("echo across clusters", Duration::from_secs(30), || {
            get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
        });
    }
}

/// One request sent by a `Load`: when, its status, and which cluster
/// answered (`x-isthmus-cluster`, empty if none did).
#[derive(Clone, Debug)]
pub struct Sent {
    pub start: Instant,
    pub end: Instant,
    pub status: u16,
    pub cluster: String,
    /// Why it failed: the sidecar's `x-isthmus-error`, or the client's own
    /// error (status 0); empty for a success.
    pub error: String,
}

/// Requests running throughout a fault: `workers` threads, each sending
/// GET `url` through `proxy` one at a time, starting one every `interval`.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub fn start(proxy: &str, url: &str, workers: usize, interval: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..workers)
            .map(|_| {
                let (stop, proxy, url) = (stop.clone(), proxy.to_string(), url.to_string());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let mut next = Instant::now();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let start = Instant::now();
                        let (status, cluster, error) = match get_via(&proxy, &url) {
                            Ok(r) => (
                                r.status,
                                r.header("x-isthmus-cluster").unwrap_or_default().to_string(),
                                r.header("x-isthmus-error").unwrap_or_default().to_string(),
                            ),
                            Err(e) => (0, String::new(), e.to_string()),
                        };
                        out.push(Sent {
                            start,
                            end: Instant::now(),
                            status,
                            cluster,
                            error,
                        });
                        next += interval;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stop and return every request, in order of start.
    pub fn finish(self) -> Vec<Sent> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all: Vec<Sent> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|s| s.start);
        all
    }
}

/// What a fault did to the requests running through it.
#[derive(Debug)]
pub struct Impact {
    pub sent: usize,
    pub failed: usize,
    /// From the fault until traffic had moved: the end of the last request
    /// that failed, took longer than `slow`, or (started after the fault)
    /// was answered by a cluster other than the ones it should move to.
    pub moved_after: Duration,
    /// Requests started after `moved_after` by answering cluster.
    pub after: std::collections::BTreeMap<String, usize>,
    /// The slowest request running at or after the fault.
    pub slowest: Duration,
}

impl Impact {
    pub fn of(sent: &[Sent], fault: Instant, slow: Duration, moved_to: impl Fn(&str) -> bool) -> Self {
        let failed = sent.iter().filter(|s| s.status != 200).count();
        let moved_at = sent
            .iter()
            .filter(|s| s.end > fault)
            .filter(|s| s.status != 200 || s.end - s.start > slow || s.start > fault && !moved_to(&s.cluster))
            .map(|s| s.end)
            .max()
            .unwrap_or(fault);
        let mut after = std::collections::BTreeMap::new();
        for s in sent.iter().filter(|s| s.start > moved_at) {
            *after.entry(s.cluster.clone()).or_default() += 1;
        }
        let slowest = sent
            .iter()
            .filter(|s| s.end > fault)
            .map(|s| s.end - s.start)
            .max()
            .unwrap_or_default();
        Impact {
            slowest,
            sent: sent.len(),
            failed,
            moved_after: moved_at - fault,
            after,
        }
    }

    /// One line for the test's output (run with `--nocapture` to see it).
    pub fn report(&self, case: &str) -> String {
        format!(
            "{case}: sent {}, failed {}, traffic moved {:.3} s after the fault (slowest call {:.3} s); then answered by {:?}",
            self.sent,
            self.failed,
            self.moved_after.as_secs_f64(),
            self.slowest.as_secs_f64(),
            self.after
        )
    }
}

/// The interop peers' Python (tests/interop/setup.sh: a venv with grpcio
/// and websockets, plus curl and h2load), prepared once per test process.
/// A machine that lacks them gets them installed; a failure to do so fails
/// the test rather than skipping it.
pub fn interop_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let script = repo().join("tests/interop/setup.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/interop/setup.sh");
        assert!(
            out.status.success(),
            "tests/interop/setup.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let py = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        PathBuf::from(py)
    })
    .clone()
}

/// `node` running the grpc-js peer `tests/interop/node/<script>`, with the
/// modules setup.sh installed (under target/interop-node).
pub fn interop_node(script: &str) -> Command {
    interop_python(); // runs setup.sh, which installs node and grpc-js
    let modules = std::env::var_os("ISTHMUS_INTEROP_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/interop-node"))
        .join("node_modules");
    let mut c = Command::new("node");
    c.arg(repo().join("tests/interop/node").join(script))
        .env("NODE_PATH", modules);
    c
}

/// The workspace's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A program not of ours (a Python server, say) that prints one JSON line
/// on stdout once it listens, e.g. `{"port": 41234}`. Killed on drop.
pub struct Program {
    pub ready: serde_json::Value,
    pub log: PathBuf,
    child: Child,
}

impl Program {
    pub fn start(dir: &Path, name: &str, program: &Path, args: &[&str]) -> Self {
        use std::io::BufRead;
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{name} did not say it was ready within 60 s"));
        let ready = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{name} printed {line:?} ({e}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Program { ready, log, child }
    }

    pub fn port(&self) -> u16 {
        self.ready["port"].as_u64().expect("a port") as u16
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP app on `addr` (port 0: any) that sends `greeting` first if any (a
/// server-first protocol), then answers what it reads in upper case.
/// Returns the bound address; it serves until the test process ends.
pub fn upper_echo(addr: &str, greeting: Option<&'static [u8]>) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let bound = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                if greeting.is_some_and(|g| conn.write_all(g).is_err()) {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    bound
}

/// Resident memory of a process, in KiB (from /proc).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Send `signal` (`STOP`, `CONT`, `KILL`...) to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The IPv4 address `name` resolves to at the DNS server `dns` (A query
/// built by hand: this harness has no DNS library), or the response code.
pub fn dns_a(dns: &str, name: &str) -> Result<[u8; 4], u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(&q, dns).unwrap();
    let mut buf = [0u8; 512];
    let n = udp.recv(&mut buf).expect("a DNS answer");
    assert_eq!(&buf[..2], &[0x12, 0x34], "answer to our query");
    let rcode = buf[3] & 0x0f;
    let answers = u16::from_be_bytes([buf[6], buf[7]]);
    if rcode != 0 || answers == 0 {
        return Err(rcode);
    }
    Ok(buf[n - 4..n].try_into().unwrap())
}
