//! Trust over time, with real processes: SVID renewal and root rotation
//! while requests run, unlinking a peer that does not hear of it, and a
//! controller killed with SIGKILL in the middle of writing its state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use isthmus_e2e::{Component, ECHO, Pair, eventually, get_via, metrics, ok, sample};

/// Requests sent one after another from `proxy` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    fn start(proxy: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                match get_via(&proxy, ECHO) {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {:?}", r.status, r.header("x-isthmus-error"))),
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        Load { stop, handle }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

fn status(dir: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["status", "--dir", dir, "--json"])).expect("status JSON")
}

fn root_of_svid(admin: &str) -> Option<String> {
    let m = metrics(admin);
    m.lines()
        .find(|l| l.starts_with("isthmus_svid_root{") && l.ends_with(" 1"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_string)
}

fn streams_from_west(east_gw_admin: &str) -> f64 {
    sample(
        &metrics(east_gw_admin),
        "isthmus_gateway_streams_total",
        &[("direction", "inbound"), ("peer", "west"), ("result", "ok")],
    )
    .unwrap_or(0.0)
}

/// SVIDs of 6 s renew every few seconds, then both clusters rotate their
/// roots, all while west calls east: no request fails, the session opened
/// before carries on, and a sidecar started afterwards connects with the
/// new certificates alone.
#[test]
fn renewal_and_root_rotation_under_traffic() {
    let root = tempfile::tempdir().unwrap();
    let p = Pair::start(root.path(), "127.0.20", "127.0.21", "--svid-ttl 6s");
    p.link_and_export();
    let east_gw_admin = p.east_gw.addr("admin");
    let streams_before = streams_from_west(&east_gw_admin);
    let load = Load::start(p.proxy());

    // Renewals at half-life, with requests running.
    let east_sc_admin = p.east_sc.addr("admin");
    eventually("two SVID renewals of east's sidecar", Duration::from_secs(20), || {
        let n = sample(
            &metrics(&east_sc_admin),
            "isthmus_svid_renewals_total",
            &[("result", "ok")],
        )?;
        (n >= 2.0).then_some(())
    });

    let old_east = status(&p.east_dir)["roots"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ok(&["ca", "rotate", "--dir", &p.east_dir, "--retire-after", "2s", "--wait"]);
    assert!(out.contains("rotation complete"), "{out}");
    let out = ok(&["ca", "rotate", "--dir", &p.west_dir, "--retire-after", "2s", "--wait"]);
    assert!(out.contains("rotation complete"), "{out}");

    let east = status(&p.east_dir);
    let new_east = east["roots"][0]["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(new_east, old_east);
    assert_eq!(east["roots"].as_array().unwrap().len(), 1, "{east}");
    eventually("west to hold only east's new root", Duration::from_secs(10), || {
        let w = status(&p.west_dir);
        (w["links"][0]["bundle_fingerprint"] == new_east.as_str()).then_some(())
    });
    for (what, admin) in [("east sidecar", &east_sc_admin), ("east gateway", &east_gw_admin)] {
        eventually(&format!("{what} on the new root"), Duration::from_secs(10), || {
            (root_of_svid(admin)? == new_east[..16]).then_some(())
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let (sent, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        sent + failed.len()
    );
    assert!(sent >= 50, "only {sent} requests went through");
    // The pooled session opened before the renewals and the rotations
    // carried every request: established connections are not cut.
    assert_eq!(streams_from_west(&east_gw_admin), streams_before);

    // A new sidecar's first connection is verified against the new roots
    // only (the old ones are retired on both sides).
    let fresh = Pair::client_sidecar(root.path(), &p.west_dir, "127.0.21", "west-client-2");
    let r = get_via(&fresh.addr("outbound"), ECHO).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["client_identity"], "spiffe://west.mesh/ns/demo/sa/client");
    assert_eq!(streams_from_west(&east_gw_admin), streams_before + 1.0);
}

/// East unlinks west while west's controller is down, so west never hears
/// of it: west's sidecars still hold east's bundle and imports, yet their
/// calls are refused, and the session that was open is cut.
#[test]
fn unlink_refuses_a_peer_that_did_not_hear() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Pair::start(root.path(), "127.0.22", "127.0.23", "");
    p.link_and_export();
    p.west_ctl.kill();
    eventually("east to see the link drop", Duration::from_secs(20), || {
        (status(&p.east_dir)["links"][0]["state"] != "active").then_some(())
    });

    let out = ok(&["unlink", "--dir", &p.east_dir, "west"]);
    assert!(out.contains("run `isthmus unlink east` there"), "{out}");
    assert_eq!(status(&p.east_dir)["links"], serde_json::json!([]));

    let proxy = p.proxy();
    eventually("west's calls to be refused", Duration::from_secs(10), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status != 200)
    });
    for i in 0..5 {
        let r = get_via(&proxy, ECHO).unwrap();
        assert_ne!(r.status, 200, "request {i} after unlink went through: {r:?}");
    }
}

/// Kill east's controller with SIGKILL while it writes its state (tokens
/// created in a loop), restart it on the same addresses: CA, link, export
/// and the imports on west all come back.
#[test]
fn controller_state_survives_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Pair::start(root.path(), "127.0.24", "127.0.25", "");
    p.link_and_export();
    let before = status(&p.east_dir);

    let writing = Arc::new(AtomicBool::new(true));
    let flag = writing.clone();
    let dir = p.east_dir.clone();
    let writer = std::thread::spawn(move || {
        let mut made = 0;
        while flag.load(Ordering::Relaxed) {
            if isthmus_e2e::isthmus(&["token", "create", "--dir", &dir])
                .status
                .success()
            {
                made += 1;
            }
        }
        made
    });
    std::thread::sleep(Duration::from_millis(700));
    let (control, peering) = (p.east_ctl.addr("control"), p.east_ctl.addr("peering"));
    p.east_ctl.kill();
    writing.store(false, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0, "no token was written before the kill");

    let _restarted = Component::start(
        root.path(),
        "east-controller-2",
        &format!(
            "controller --dir {} --cluster east --control-addr {control} --peering-addr {peering} --admin-addr 127.0.24.1:0",
            p.east_dir
        ),
    );
    let after = eventually("the link to come back", Duration::from_secs(30), || {
        let s = status(&p.east_dir);
        (s["links"][0]["state"] == "active").then_some(s)
    });
    assert_eq!(after["root_fingerprint"], before["root_fingerprint"]);
    assert_eq!(after["links"][0]["cluster"], "west");
    let exported = after["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "echo" && s["exported"] == true);
    assert!(exported, "{after}");
    let proxy = p.proxy();
    eventually("west calls east again", Duration::from_secs(30), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
    });
}
