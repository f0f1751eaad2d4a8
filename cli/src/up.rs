//! `isthmus up`: a local-mode cluster as real processes on one host.
//!
//! A cluster gets its own loopback range (`--net 127.0.1` is 127.0.1.0/24):
//! the controller on .1, the gateway on .2, the echo workload and its sidecar
//! on .20, a client-only workload's sidecar on .30. Ports are the defaults
//! of docs/architecture.md, or all ephemeral with `--ephemeral-ports`.
//! With `--netns NAME` the client workload lives in a network namespace of
//! its own instead, its traffic redirected to its sidecar (netns.rs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::error::CliError;
use crate::exit;
use crate::netns::Netns;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Cluster name.
    #[arg(long)]
    pub cluster: String,
    /// The cluster's loopback range, as its first three octets (127.0.N).
    #[arg(long)]
    pub net: String,
    /// Cluster directory (created if missing; reused across restarts).
    #[arg(long, env = "ISTHMUS_DIR")]
    pub dir: PathBuf,
    /// SPIFFE trust domain [default: <cluster>.mesh].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Also run the demo workload: service demo/echo on port 8080, with its sidecar.
    #[arg(long)]
    pub echo: bool,
    /// Also run a client-only workload (demo/client) with its sidecar.
    #[arg(long)]
    pub client: bool,
    /// Run the client workload (implies --client) in network namespace NAME,
    /// made now and removed on exit, as a pod: its TCP is redirected to its
    /// sidecar and mesh names resolve there, so an unchanged app reaches
    /// them with `ip netns exec NAME curl http://echo.demo.svc.clusterset.local:8080/`.
    /// Needs root.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Bind every port to 0 instead of the defaults (for tests).
    #[arg(long)]
    pub ephemeral_ports: bool,
    /// Lifetime of the SVIDs the controller issues (renewed at half-life).
    #[arg(long, default_value_t = isthmus_controller::config::DEFAULT_SVID_TTL.into())]
    pub svid_ttl: humantime::Duration,
}

/// The addresses of a running local cluster, also written to `<dir>/up.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpInfo {
    pub cluster: String,
    pub control: String,
    pub peering: String,
    pub gateway_tunnel: String,
    pub gateway_quic: String,
    /// Admin endpoints (/metrics, /ready, /live) of the controller and gateway.
    pub controller_admin: String,
    pub gateway_admin: String,
    pub echo: Option<Workload>,
    pub client: Option<Workload>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workload {
    /// The network namespace the workload runs in, when not the host's:
    /// its addresses are that namespace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub app: Option<String>,
    pub inbound: String,
    pub outbound: String,
    pub id: String,
    pub admin: String,
}

pub struct LocalCluster {
    pub info: UpInfo,
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
    /// The client workload's namespace (`--netns`), removed on drop.
    netns: Option<Netns>,
}

fn octets(net: &str) -> Result<String, CliError> {
    let parts: Vec<&str> = net.split('.').collect();
    let ok = parts.len() == 3 && parts[0] == "127" && parts.iter().all(|p| p.parse::<u8>().is_ok());
    if ok {
        Ok(net.to_string())
    } else {
        Err(CliError::new(
            exit::BAD_INPUT,
            format!("--net {net:?}: give the first three octets of a loopback /24, for example 127.0.1"),
        ))
    }
}

impl LocalCluster {
    pub async fn start(a: &Args, log: &str) -> Result<Self, CliError> {
        let net = octets(&a.net)?;
        if let Some(name) = &a.netns {
            Netns::check(name)?;
        }
        let port = |p: u16| if a.ephemeral_ports { 0 } else { p };
        let io = |e: std::io::Error| CliError::new(exit::FAILURE, format!("{}: {e}", a.dir.display()));
        std::fs::create_dir_all(a.dir.join("logs")).map_err(io)?;
        std::fs::create_dir_all(a.dir.join("run")).map_err(io)?;
        let mut c = LocalCluster {
            info: UpInfo {
                cluster: a.cluster.clone(),
                control: String::new(),
                peering: String::new(),
                gateway_tunnel: String::new(),
                gateway_quic: String::new(),
                controller_admin: String::new(),
                gateway_admin: String::new(),
                echo: None,
                client: None,
            },
            dir: a.dir.clone(),
            children: Vec::new(),
            netns: None,
        };
        let dir = a.dir.display().to_string();
        let mut ctl = vec![
            "controller".to_string(),
            "--dir".into(),
            dir.clone(),
            "--cluster".into(),
            a.cluster.clone(),
            "--control-addr".into(),
            format!("{net}.1:{}", port(15010)),
            "--peering-addr".into(),
            format!("{net}.1:{}", port(15011)),
            "--admin-addr".into(),
            format!("{net}.1:{}", port(15022)),
        ];
        if let Some(td) = &a.trust_domain {
            ctl.extend(["--trust-domain".into(), td.clone()]);
        }
        ctl.extend(["--svid-ttl".into(), a.svid_ttl.to_string()]);
        let r = c.spawn("controller", ctl, log).await?;
        c.info.control = str_of(&r, "control");
        c.info.peering = str_of(&r, "peering");
        c.info.controller_admin = str_of(&r, "admin");

        // Each component gets a credential for its own identity only, not
        // the cluster's admin token.
        let gw_cred = c
            .credential("gateway", isthmus_core::identity::SYSTEM_NAMESPACE, "gateway")
            .await?;
        let r = c
            .spawn(
                "gateway",
                vec![
                    "gateway".into(),
                    "--dir".into(),
                    dir.clone(),
                    "--credential-file".into(),
                    gw_cred,
                    "--tunnel-addr".into(),
                    format!("{net}.2:{}", port(15008)),
                    "--quic-addr".into(),
                    format!("{net}.2:{}", port(15443)),
                    "--admin-addr".into(),
                    format!("{net}.2:{}", port(15021)),
                ],
                log,
            )
            .await?;
        c.info.gateway_tunnel = str_of(&r, "tunnel");
        c.info.gateway_quic = str_of(&r, "quic");
        c.info.gateway_admin = str_of(&r, "admin");

        if a.echo {
            let app = c.spawn_echo_app(&format!("{net}.20:{}", port(8080)), log).await?;
            let cred = c.credential("echo-sidecar", "demo", "echo").await?;
            let serve = [
                "--credential-file",
                &cred,
                "--service",
                "echo",
                "--port",
                "8080",
                "--app",
                &app,
                "--instance",
                &format!("echo-{}-1", a.cluster),
            ];
            let r = c
                .spawn_sidecar("echo-sidecar", &dir, &format!("{net}.20"), &port, &serve, log)
                .await?;
            c.info.echo = Some(workload(Some(app), &r));
        }
        if let Some(name) = &a.netns {
            let cred = c.credential("client-sidecar", "demo", "client").await?;
            let r = c.spawn_netns_client(name, Path::new(&cred), log).await?;
            c.info.client = Some(Workload {
                netns: Some(name.clone()),
                ..workload(None, &r)
            });
        } else if a.client {
            let r = c
                .spawn_sidecar(
                    "client-sidecar",
                    &dir,
                    &format!("{net}.30"),
                    &port,
                    &[
                        "--service-account",
                        "client",
                        "--credential-file",
                        &c.credential("client-sidecar", "demo", "client").await?,
                    ],
                    log,
                )
                .await?;
            c.info.client = Some(workload(None, &r));
        }
        isthmus_core::local::write_atomic(
            &a.dir.join("up.json"),
            serde_json::to_string_pretty(&c.info).expect("serializes").as_bytes(),
            false,
        )
        .map_err(io)?;
        Ok(c)
    }

    /// Start a sidecar of namespace `demo` on `ip` (its pod address), with
    /// the workload-specific `extra` flags.
    async fn spawn_sidecar(
        &mut self,
        name: &str,
        dir: &str,
        ip: &str,
        port: &impl Fn(u16) -> u16,
        extra: &[&str],
        log: &str,
    ) -> Result<serde_json::Value, CliError> {
        let mut args: Vec<String> = ["sidecar", "--dir", dir, "--namespace", "demo"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        for (flag, p) in [
            ("--inbound-addr", 15006),
            ("--outbound-addr", 15001),
            ("--admin-addr", 15020),
        ] {
            args.extend([flag.to_string(), format!("{ip}:{}", port(p))]);
        }
        self.spawn(name, args, log).await
    }

    /// The client workload's sidecar in a new network namespace `name`, as
    /// user 1337, with the redirection rules applied and the controller,
    /// gateway and echo's sidecar relayed in (netns.rs). Ports are the defaults there: the
    /// namespace is the workload's alone.
    async fn spawn_netns_client(&mut self, name: &str, cred: &Path, log: &str) -> Result<serde_json::Value, CliError> {
        let ns = self.netns.insert(Netns::create(name, &self.dir, cred)?);
        // What the sidecar dials: the controller, the gateway, and the
        // sidecars of this cluster's own workloads (echo's, with --echo).
        ns.relay(&self.info.control)?;
        ns.relay(&self.info.gateway_tunnel)?;
        if let Some(echo) = &self.info.echo {
            ns.relay(&echo.inbound)?;
        }
        let exe = current_exe()?;
        ns.exec(&[&exe.display().to_string(), "redirect"])?;
        let ns_dir = ns.dir.display().to_string();
        let args = [
            "sidecar",
            "--dir",
            &ns_dir,
            "--credential-file",
            &format!("{ns_dir}/client.cred"),
            "--namespace",
            "demo",
            "--service-account",
            "client",
            "--inbound-addr",
            "127.0.0.1:15006",
            "--outbound-addr",
            "127.0.0.1:15001",
            "--admin-addr",
            "127.0.0.1:15020",
            "--dns-addr",
            "127.0.0.1:53",
            "--transparent",
        ];
        let wrap = ns.as_sidecar(&exe);
        let ready = ns.dir.join("client-sidecar.json");
        let args = args.iter().map(|s| s.to_string()).collect();
        self.spawn_program("client-sidecar", wrap, args, &ready, log).await
    }

    /// The credential file of component `name` (identity `ns`/`sa`): made
    /// once by the controller, kept 0600 in `<dir>/creds/` and reused.
    async fn credential(&self, name: &str, ns: &str, sa: &str) -> Result<String, CliError> {
        let path = self.dir.join("creds").join(format!("{name}.cred"));
        if !path.exists() {
            let r = crate::admin::create_credential(&self.dir, ns, sa, None).await?;
            crate::admin::write_private(&path, &r.credential)?;
        }
        Ok(path.display().to_string())
    }

    /// Start the demo/echo app listening on `listen`; its bound address.
    async fn spawn_echo_app(&mut self, listen: &str, log: &str) -> Result<String, CliError> {
        let cluster = self.info.cluster.clone();
        let args = ["echo", "--listen", listen, "--cluster", &cluster, "--instance"];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("echo-{cluster}-1"));
        let r = self.spawn("echo", args, log).await?;
        Ok(str_of(&r, "listen"))
    }

    /// Start the echo app again where it listened before (its sidecar
    /// still points there), after `kill("echo")`.
    pub async fn restart_echo(&mut self) -> Result<(), CliError> {
        let listen = self
            .info
            .echo
            .as_ref()
            .and_then(|e| e.app.clone())
            .ok_or_else(|| CliError::new(exit::FAILURE, format!("cluster {} runs no echo", self.info.cluster)))?;
        self.spawn_echo_app(&listen, "info").await.map(|_| ())
    }

    /// Start `isthmus <args>` and wait for its ready file.
    async fn spawn(&mut self, name: &str, args: Vec<String>, log: &str) -> Result<serde_json::Value, CliError> {
        let ready = self.dir.join("run").join(format!("{name}.json"));
        let exe = current_exe()?.display().to_string();
        self.spawn_program(name, (exe, Vec::new()), args, &ready, log).await
    }

    /// Start `program <before> <args>` (`isthmus <args>`, or a command that
    /// runs it) and wait for `ready`, the ready file it is told to write.
    async fn spawn_program(
        &mut self,
        name: &str,
        (program, before): (String, Vec<String>),
        mut args: Vec<String>,
        ready: &Path,
        log: &str,
    ) -> Result<serde_json::Value, CliError> {
        let _ = std::fs::remove_file(ready);
        let log_path = self.dir.join("logs").join(format!("{name}.log"));
        let fail = |m: String| CliError::new(exit::FAILURE, m);
        let log_file = std::fs::File::create(&log_path).map_err(|e| fail(format!("{}: {e}", log_path.display())))?;
        args.extend([
            "--ready-file".into(),
            ready.display().to_string(),
            "--exit-with-parent".into(),
        ]);
        let mut child = Command::new(program)
            .args(&before)
            .args(&args)
            .env("ISTHMUS_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot start {name}: {e}")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready_info = std::fs::read_to_string(ready)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            if let Some(v) = ready_info {
                self.children.push((name.to_string(), child));
                return Ok(v);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(fail(format!(
                    "{name} of cluster {} exited ({status}) before it was ready:\n{}",
                    self.info.cluster,
                    tail(&log_path, 8)
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(fail(format!(
                    "{name} of cluster {} was not ready within 60s; see {}",
                    self.info.cluster,
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The first child that has exited, if any.
    pub fn exited(&mut self) -> Option<String> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!(
                    "{name} exited ({status}); see {}",
                    self.dir.join("logs").join(format!("{name}.log")).display()
                ));
            }
        }
        None
    }

    /// Stop every component: SIGTERM so gateways drain, then kill.
    pub async fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for (_, child) in self.children.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }

    /// Kill one component (the demo uses it to show failures).
    pub async fn kill(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill().await;
        }
    }
}

fn current_exe() -> Result<PathBuf, CliError> {
    std::env::current_exe().map_err(|e| CliError::new(exit::FAILURE, format!("cannot find the isthmus binary: {e}")))
}

fn str_of(v: &serde_json::Value, k: &str) -> String {
    v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string()
}

fn workload(app: Option<String>, r: &serde_json::Value) -> Workload {
    Workload {
        netns: None,
        app,
        inbound: str_of(r, "inbound"),
        outbound: str_of(r, "outbound"),
        id: str_of(r, "id"),
        admin: str_of(r, "admin"),
    }
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub async fn run(a: Args, log: &str) -> Result<(), CliError> {
    let mut c = LocalCluster::start(&a, log).await?;
    let i = &c.info;
    println!("cluster {} is up (directory {})", i.cluster, a.dir.display());
    println!("  controller  control {}  peering {}", i.control, i.peering);
    println!("  gateway     tunnel {}  quic {}", i.gateway_tunnel, i.gateway_quic);
    if let Some(w) = &i.echo {
        println!(
            "  echo        app {}  sidecar inbound {}  ({})",
            w.app.as_deref().unwrap_or("-"),
            w.inbound,
            w.id
        );
    }
    match &i.client {
        Some(w @ Workload { netns: Some(ns), .. }) => {
            println!(
                "  client      in network namespace {ns}, its TCP through its sidecar ({})",
                w.id
            );
            println!("              try: ip netns exec {ns} curl http://echo.demo.svc.clusterset.local:8080/");
            println!(
                "              its metrics: ip netns exec {ns} curl http://{}/metrics",
                w.admin
            );
        }
        Some(w) => {
            println!("  client      sidecar outbound {}  ({})", w.outbound, w.id);
            println!(
                "              try: curl -x http://{} http://echo.demo.svc.clusterset.local:8080/",
                w.outbound
            );
        }
        None => {}
    }
    println!(
        "  metrics     http://{}/metrics (controller), http://{}/metrics (gateway){}",
        i.controller_admin,
        i.gateway_admin,
        [&i.echo, &i.client]
            .into_iter()
            .flatten()
            .filter(|w| w.netns.is_none())
            .map(|w| format!(", http://{}/metrics (sidecar)", w.admin))
            .collect::<String>()
    );
    println!("  logs in {}; Ctrl-C stops the cluster", a.dir.join("logs").display());
    let shutdown = crate::components::shutdown_token(false);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let res = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tick.tick() => if let Some(m) = c.exited() {
                break Err(CliError::new(exit::FAILURE, m));
            }
        }
    };
    c.stop().await;
    res
}
