//! The walking skeleton, end to end: two (and three) clusters as real
//! processes on loopback, linked with a join token; a service exported from
//! east is called from west through the real path (sidecar, gateway, QUIC,
//! gateway, sidecar) with end-to-end mTLS between the sidecars.

use std::time::Duration;

use isthmus_e2e::{Cluster, eventually, fails, get_via, metrics, ok, sample};

const ECHO: &str = "http://echo.demo.svc.clusterset.local:8080/hello";

#[test]
fn link_export_and_call_across_clusters() {
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::up(root.path(), "east", "127.0.11", true, false);
    let west = Cluster::up(root.path(), "west", "127.0.12", false, true);
    let proxy = west.client_proxy();

    // Before linking, the name is unknown in west: a clear error, not a hang.
    let r = get_via(&proxy, ECHO).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-isthmus-error"), Some("unknown-service"));
    assert!(r.body.contains("not known in cluster west"), "{}", r.body);

    // Bad input is refused with its own message and exit code.
    let (code, err) = fails(&["link", "--dir", west.dir_str(), "not-a-token"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("malformed join token"), "{err}");
    let (code, err) = fails(&["export", "--dir", east.dir_str(), "demo/nope"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("demo/nope does not exist in cluster east"), "{err}");

    // A token with one character changed is caught before anything is sent.
    let token = ok(&["token", "create", "--dir", east.dir_str()]).trim().to_string();
    let mut altered: Vec<char> = token.chars().collect();
    let mid = altered.len() / 2;
    altered[mid] = if altered[mid] == 'A' { 'B' } else { 'A' };
    let altered: String = altered.into_iter().collect();
    let (code, err) = fails(&["link", "--dir", west.dir_str(), &altered]);
    assert!(code == 2 || code == 4, "{code}: {err}");

    // A cluster cannot link to itself.
    let (code, err) = fails(&["link", "--dir", east.dir_str(), &token]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("itself"), "{err}");

    // Link west to east, then export echo from east.
    let out = ok(&["link", "--dir", west.dir_str(), &token]);
    assert!(out.contains("linked cluster west with cluster east"), "{out}");
    let (code, err) = fails(&["link", "--dir", west.dir_str(), &token]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already linked"), "{err}");
    ok(&["export", "--dir", east.dir_str(), "demo/echo"]);

    // West's client reaches east's echo; east's sidecar saw west's identity.
    let r = eventually("echo to answer across clusters", Duration::from_secs(30), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
    });
    let v = r.json();
    assert_eq!(v["cluster"], "east", "{v}");
    assert_eq!(v["instance"], "echo-east-1");
    assert_eq!(v["client_identity"], "spiffe://west.mesh/ns/demo/sa/client");
    assert_eq!(v["path"], "/hello");
    assert_eq!(r.header("x-isthmus-cluster"), Some("east"));

    // A cluster-pinned name addresses east alone.
    let r = get_via(&proxy, "http://east.echo.demo.svc.clusterset.local:8080/").unwrap();
    assert_eq!(r.status, 200, "{r:?}");

    // A service nobody exports stays unreachable.
    let r = get_via(&proxy, "http://nope.demo.svc.clusterset.local:8080/").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-isthmus-error"), Some("unknown-service"));

    // The way there shows in every component's metrics.
    let route = [
        ("source_cluster", "west"),
        ("destination_cluster", "east"),
        ("destination_service", "demo/echo"),
    ];
    let client_metrics = metrics(west.info["client"]["admin"].as_str().unwrap());
    let out = [&route[..], &[("direction", "outbound"), ("status", "200")]].concat();
    assert!(
        sample(&client_metrics, "isthmus_requests_total", &out).unwrap_or(0.0) >= 2.0,
        "{client_metrics}"
    );
    let unknown = [
        ("direction", "outbound"),
        ("destination_cluster", "unknown"),
        ("status", "503"),
    ];
    assert!(
        sample(&client_metrics, "isthmus_requests_total", &unknown).unwrap_or(0.0) >= 1.0,
        "{client_metrics}"
    );
    let echo_metrics = metrics(east.info["echo"]["admin"].as_str().unwrap());
    // The pooled session from east's gateway stays open between requests.
    assert!(
        sample(&echo_metrics, "isthmus_open_connections", &[("direction", "inbound")]).unwrap_or(0.0) >= 1.0,
        "{echo_metrics}"
    );
    let inb = [&route[..], &[("direction", "inbound"), ("status", "200")]].concat();
    assert!(
        sample(&echo_metrics, "isthmus_requests_total", &inb).unwrap_or(0.0) >= 2.0,
        "{echo_metrics}"
    );
    let gw_metrics = metrics(east.info["gateway_admin"].as_str().unwrap());
    let streams = [("direction", "inbound"), ("peer", "west"), ("result", "ok")];
    assert!(
        sample(&gw_metrics, "isthmus_gateway_streams_total", &streams).unwrap_or(0.0) >= 1.0,
        "{gw_metrics}"
    );
    // Bytes count while the pooled tunnel is still open, not only when it ends.
    let from_west = [("peer", "west"), ("direction", "from_peer")];
    assert!(
        sample(&gw_metrics, "isthmus_gateway_stream_bytes_total", &from_west).unwrap_or(0.0) > 0.0,
        "{gw_metrics}"
    );
    let ctl_metrics = metrics(east.info["controller_admin"].as_str().unwrap());
    assert!(
        ctl_metrics.lines().any(|l| l == "isthmus_exported_services 1"),
        "{ctl_metrics}"
    );
    let accepted = sample(&ctl_metrics, "isthmus_join_attempts_total", &[("result", "accepted")]);
    assert_eq!(accepted, Some(1.0), "{ctl_metrics}");

    // Both sides see an active link with heartbeats.
    for c in [&west, &east] {
        let s = c.status();
        let peer = if c.name == "west" { "east" } else { "west" };
        let link = s["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["cluster"] == peer)
            .cloned();
        let link = link.unwrap_or_else(|| panic!("{} has no link to {peer}: {s}", c.name));
        assert_eq!(link["state"], "active", "{s}");
    }
    // Link gauges follow within a tick (250 ms) of the lease keeper.
    let west_admin = west.info["controller_admin"].as_str().unwrap().to_string();
    eventually("the link gauge to show active", Duration::from_secs(5), || {
        let text = metrics(&west_admin);
        let active = sample(&text, "isthmus_link_state", &[("peer", "east"), ("state", "active")]);
        (active == Some(1.0)).then_some(())
    });
}

#[test]
fn a_spent_token_is_refused_by_its_issuer() {
    let root = tempfile::tempdir().unwrap();
    let east = Cluster::up(root.path(), "east", "127.0.13", false, false);
    let west = Cluster::up(root.path(), "west", "127.0.14", false, false);
    let north = Cluster::up(root.path(), "north", "127.0.15", false, false);
    let token = ok(&["token", "create", "--dir", east.dir_str()]).trim().to_string();
    // From standard input: the token never shows in the process list.
    link_from_stdin(west.dir_str(), &token).expect("link with the token on standard input");
    let (code, err) = fails(&["link", "--dir", north.dir_str(), &token]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already used"), "{err}");
    // The refused cluster holds no link.
    assert!(north.status()["links"].as_array().unwrap().is_empty());

    // From a file; a garbled one on standard input is bad input (exit 2).
    let second = ok(&["token", "create", "--dir", east.dir_str()]).trim().to_string();
    let file = root.path().join("token");
    std::fs::write(&file, format!("{second}\n")).unwrap();
    ok(&["link", "--dir", north.dir_str(), "--token-file", file.to_str().unwrap()]);
    assert_eq!(north.status()["links"].as_array().unwrap().len(), 1);
    let (code, err) = link_from_stdin(north.dir_str(), "not-a-token").unwrap_err();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("malformed join token"), "{err}");
    let (code, err) = fails(&["link", "--dir", north.dir_str()]);
    assert_eq!(code, 2, "no token at all: {err}");
}

/// `isthmus link --dir DIR -` with `token` written to its standard input.
fn link_from_stdin(dir: &str, token: &str) -> Result<(), (i32, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new(isthmus_e2e::binary())
        .args(["link", "--dir", dir, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(token),
        "the token is in the process list"
    );
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

#[test]
fn unreachable_controller_and_issuer_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let (code, err) = fails(&["status", "--dir", root.path().join("nothing").to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no controller has started"), "{err}");

    let mut east = Cluster::up(root.path(), "east", "127.0.16", false, false);
    let west = Cluster::up(root.path(), "west", "127.0.17", false, false);
    let token = ok(&["token", "create", "--dir", east.dir_str()]).trim().to_string();
    let east_dir = east.dir_str().to_string();
    east.kill();

    // Commands against east's stopped controller say it cannot be reached.
    let (code, err) = eventually("east's controller to be gone", Duration::from_secs(10), || {
        let out = isthmus_e2e::isthmus(&["status", "--dir", &east_dir]);
        (!out.status.success()).then(|| {
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    });
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("cannot reach the controller of cluster east"), "{err}");

    // The issuer is gone too: linking says so, and west holds no link.
    let (code, err) = fails(&["link", "--dir", west.dir_str(), &token]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("cannot reach the issuer"), "{err}");
    assert!(west.status()["links"].as_array().unwrap().is_empty());
}

#[test]
fn demo_check_passes() {
    let root = tempfile::tempdir().unwrap();
    let out = isthmus_e2e::isthmus(&[
        "demo",
        "--check",
        "--ephemeral-ports",
        "--dir",
        root.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("served by east/echo-east-1"), "{stdout}");
    // Failover, failback and both splits ran, none losing a call.
    assert!(stdout.contains("0 failed; answered by east"), "{stdout}");
    assert!(stdout.contains("0 failed; back on west"), "{stdout}");
    assert_eq!(stdout.matches("0 failed: east").count(), 2, "{stdout}");
    assert!(stdout.contains("demo check passed"), "{stdout}");
}
