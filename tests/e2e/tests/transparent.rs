//! Unchanged apps, transparently: a workload in its own network namespace
//! (as a pod is), with `isthmus redirect`'s nftables rules applied, dials
//! `echo.demo.svc.clusterset.local:8080` by name with no proxy setting;
//! its sidecar (running as the user the rules exempt) answers the name
//! with a virtual IP, takes the redirected connection, and routes it by
//! its original destination. Also: a server-first TCP protocol on a
//! declared opaque port, a destination outside the mesh passed through,
//! and inbound TCP sent to the sidecar's mTLS port.
//!
//! Needs root (network namespaces, nftables); creates and removes its own
//! namespace, veth pair and /etc/netns entry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use isthmus_e2e::{Cluster, Component, Pair, binary, eventually, fails, metrics, ok, sample, upper_echo};

/// The namespace, its veth pair and resolv.conf, removed on drop.
struct Netns {
    name: String,
    /// Host side of the veth pair (.1 controller, .2 gateway) and the
    /// workload's address (.100).
    net: String,
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// `tag` tells apart the namespaces of tests running at once.
    fn new(tag: u8) -> Self {
        let id = std::process::id();
        let name = format!("isthmus-t{id}-{tag}");
        let (host, inner) = (format!("it{id}{tag}h"), format!("it{id}{tag}n"));
        let net = format!("10.{}.{}", 251 + tag, id % 250);
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, net };
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &inner]);
        run("ip", &["link", "set", &inner, "netns", &ns.name]);
        // .1 controller, .2 gateway, .30 the host-side client Pair starts.
        for a in [".1/24", ".2/24", ".30/24"] {
            run("ip", &["addr", "add", &format!("{}{a}", ns.net), "dev", &host]);
        }
        run("ip", &["link", "set", &host, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{}.100/24", ns.net), "dev", &inner]);
        ns.exec(&["ip", "link", "set", &inner, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &format!("{}.1", ns.net)]);
        // The sidecar (an unprivileged user) answers DNS on port 53.
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
        // `ip netns exec` gives the namespace this resolv.conf.
        let etc = format!("/etc/netns/{}", ns.name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        ns
    }

    fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend(cmd);
        run("ip", &args);
    }

    /// Run `cmd` in the namespace as root (the app: redirected).
    fn output(&self, cmd: &[&str]) -> std::process::Output {
        in_netns(&self.name, cmd)
    }
}

/// Run `cmd` in namespace `name` as root, with no proxy setting.
fn in_netns(name: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", name])
        .args(cmd)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("run in the namespace")
}

fn assert_root() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "this test needs root: it makes a network namespace and nftables rules"
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
        let _ = std::fs::remove_dir_all(format!("/run/isthmus/netns/{}", self.name));
    }
}

/// Let user 1337 reach what the sidecar needs in `root`.
fn open_up(root: &Path, credential: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in [root, &root.join("west")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::os::unix::fs::chown(credential, Some(1337), Some(1337)).unwrap();
}

#[test]
fn an_unchanged_app_in_its_own_namespace_goes_through_its_sidecar() {
    assert_root();
    let python = isthmus_e2e::interop_python(); // also installs nft, curl
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ns = Netns::new(0);
    let net = ns.net.clone();

    // East on loopback; west's controller and gateway on the host's end of
    // the veth pair, where the namespace reaches them.
    let p = Pair::start(root, "127.0.61", &net, "");
    let banner = upper_echo("127.0.61.40:0", Some(b"220 banner ready\r\n"));
    let _banner_sidecar = Component::start(
        root,
        "east-banner",
        &format!(
            "sidecar --dir {} --namespace demo --service banner --port 2525 --app {banner} \
             --inbound-addr 127.0.61.41:0 --outbound-addr 127.0.61.41:0 --admin-addr 127.0.61.41:0",
            p.east_dir
        ),
    );
    p.link_and_export();
    ok(&["export", "--dir", &p.east_dir, "demo/banner"]);

    // The workload's sidecar, in the namespace, as user 1337.
    let cred = root.join("client.cred");
    ok(&[
        "workload",
        "credential",
        "--dir",
        &p.west_dir,
        "--namespace",
        "demo",
        "--service-account",
        "client",
        "--out",
        cred.to_str().unwrap(),
    ]);
    open_up(root, &cred);
    let sidecar = Component::start_program(
        Path::new("ip"),
        root,
        "west-transparent",
        &format!(
            "netns exec {} setpriv --reuid=1337 --regid=1337 --clear-groups {} sidecar --dir {} --credential-file {} \
             --namespace demo --service-account client --inbound-addr {net}.100:15006 \
             --outbound-addr 127.0.0.1:15001 --admin-addr {net}.100:15020 --dns-addr 127.0.0.1:53 \
             --transparent --opaque-port 2525",
            ns.name,
            binary().display(),
            p.west_dir,
            cred.display()
        ),
    );
    let out = ns.output(&[binary().to_str().unwrap(), "redirect"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An unchanged app: curl by name, no proxy. The answer comes from east,
    // whose sidecar verified the workload's own identity.
    let url = "http://echo.demo.svc.clusterset.local:8080/hello";
    let body = eventually("curl by name through the redirection", Duration::from_secs(30), || {
        let out = ns.output(&["curl", "-sS", "--max-time", "10", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["cluster"], "east", "{v}");
    assert_eq!(v["client_identity"], "spiffe://west.mesh/ns/demo/sa/client", "{v}");
    assert_eq!(v["path"], "/hello");

    // A server-first protocol on a declared opaque port: the greeting comes
    // first, through both gateways.
    let script = "import socket\ns = socket.create_connection(('banner.demo.svc.clusterset.local', 2525), timeout=10)\n\
                  f = s.makefile('rwb')\nprint(f.readline().decode().strip())\ns.sendall(b'hello\\n')\n\
                  print(f.readline().decode().strip())\n";
    let out = ns.output(&[python.to_str().unwrap(), "-c", script]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "220 banner ready\nHELLO\n");

    // A destination outside the mesh: passed through, untouched.
    let outside = Component::start(root, "outside", &format!("echo --cluster outside --listen {net}.1:0"));
    let out = ns.output(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{}/", outside.addr("listen")),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"cluster\":\"outside\""));
    let m = metrics(&sidecar.addr("admin"));
    assert!(
        sample(&m, "isthmus_tcp_connections_total", &[("outcome", "passthrough")]).unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // Inbound: plain TCP to any port of the workload lands on the
    // sidecar's mTLS port (a closed port would refuse the connection).
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{net}.100:8080/")])
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        code != Some(7) && !out.status.success(),
        "curl {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `isthmus up --netns`, as a user runs it: the client workload in a
/// namespace `up` makes (rules, DNS, its sidecar as user 1337, the
/// controller, gateway and echo's sidecar relayed in), an unchanged curl
/// there reaching west's own echo and east's by name; everything removed
/// when `up` stops. A name that is
/// no namespace name is refused before anything starts.
#[test]
fn isthmus_up_runs_the_client_in_a_namespace_of_its_own() {
    assert_root();
    isthmus_e2e::interop_python(); // installs nft, curl
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (code, err) = fails(&[
        "up",
        "--cluster",
        "west",
        "--net",
        "127.0.64",
        "--dir",
        root.join("bad").to_str().unwrap(),
        "--netns",
        "not/a name",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--netns \"not/a name\""), "{err}");
    assert!(!root.join("bad").join("controller.json").exists(), "nothing starts");

    let name = format!("isthmus-up{}", std::process::id());
    // If the test fails before `up` stops, `up` is killed and cannot clean
    // up: remove what it made, as `ip netns del` would.
    let _leftover = Netns {
        name: name.clone(),
        net: String::new(),
    };
    let east = Cluster::up(root, "east", "127.0.62", true, false);
    let mut west = Cluster::up_with(root, "west", "127.0.63", &["--echo", "--netns", &name]);
    assert_eq!(west.info["client"]["netns"], name.as_str(), "{}", west.info);
    let token = ok(&["token", "create", "--dir", east.dir_str()]).trim().to_string();
    ok(&["link", "--dir", west.dir_str(), &token]);
    ok(&["export", "--dir", east.dir_str(), "demo/echo"]);
    // West runs echo too: merge east's endpoints into it (else kept local).
    ok(&["imports", "--dir", west.dir_str(), "east", "demo/echo"]);

    // West's own echo (local first), through the relay to its sidecar;
    // east's, by the name that pins it, through both gateways.
    let call = |url: &str| {
        let body = eventually(
            &format!("curl {url} in up's namespace"),
            Duration::from_secs(30),
            || {
                // -f: an answer of the sidecar's own (503 before the import
                // has arrived) is a failure to wait out.
                let out = in_netns(&name, &["curl", "-fsS", "--max-time", "10", url]);
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            },
        );
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    for (url, cluster) in [
        ("http://echo.demo.svc.clusterset.local:8080/hello", "west"),
        ("http://east.echo.demo.svc.clusterset.local:8080/hello", "east"),
    ] {
        let v = call(url);
        assert_eq!(v["cluster"], cluster, "{url}: {v}");
        assert_eq!(v["client_identity"], "spiffe://west.mesh/ns/demo/sa/client", "{v}");
    }
    // The sidecar counted it: its admin port, inside the namespace.
    let admin = west.info["client"]["admin"].as_str().unwrap().to_string();
    let out = in_netns(
        &name,
        &["curl", "-sS", "--max-time", "10", &format!("http://{admin}/metrics")],
    );
    let m = String::from_utf8_lossy(&out.stdout);
    assert!(
        sample(&m, "isthmus_requests_total", &[("destination_service", "demo/echo")]).unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    west.stop();
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "namespace {name} left behind"
    );
    assert!(
        !Path::new("/etc/netns").join(&name).exists(),
        "/etc/netns/{name} left behind"
    );
    assert!(
        !Path::new("/run/isthmus/netns").join(&name).exists(),
        "the sidecar's copy of its credential left behind"
    );
}

/// Where `nft` is absent, `isthmus redirect` installs the same redirection
/// with iptables: applied for real in a namespace of its own, where an
/// app's connection to an address outside is taken to the outbound port.
#[test]
fn without_nft_the_iptables_rules_redirect_the_same() {
    isthmus_e2e::interop_python(); // installs iptables and curl if missing
    let ns = Netns::new(1);
    // A PATH holding iptables-restore but no nft.
    let tools = tempfile::tempdir().unwrap();
    for tool in ["iptables-restore", "ip6tables-restore"] {
        let real = which(tool);
        std::os::unix::fs::symlink(&real, tools.path().join(tool)).unwrap();
    }
    // `ip` by its full path: the PATH given is the child's, lookup included.
    let out = Command::new(which("ip"))
        .args(["netns", "exec", &ns.name])
        .arg(binary())
        .args(["redirect", "--exclude-outbound-ports", "5432"])
        .env("PATH", tools.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("(iptables)"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = String::from_utf8_lossy(&ns.output(&["iptables-save"]).stdout).into_owned();
    assert!(
        saved.contains("ISTHMUS") && saved.contains("--to-ports 15001"),
        "{saved}"
    );

    // The outbound port: a listener that says it was reached.
    let mut listener = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c"])
        .arg(
            "import socket\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 15001)); s.listen()\n\
             while True:\n\
             \x20   c, _ = s.accept(); c.recv(1024)\n\
             \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nredirected'); c.close()\n",
        )
        .spawn()
        .unwrap();
    // An address nobody serves, from the app (root: not the exempt user).
    let body = eventually("a redirected connection", Duration::from_secs(10), || {
        let out = ns.output(&["curl", "-s", "--max-time", "2", &format!("http://{}.77:80/", ns.net)]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        (body == "redirected").then_some(body)
    });
    assert_eq!(body, "redirected");
    // An excluded port is not taken: nothing serves it, so it fails.
    let out = ns.output(&["curl", "-s", "--max-time", "2", &format!("http://{}.77:5432/", ns.net)]);
    assert!(!out.status.success(), "an excluded port was redirected");
    let _ = listener.kill();
    let _ = listener.wait();
}

fn which(tool: &str) -> std::path::PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} is not installed (tests/interop/setup.sh installs it)"
    );
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
