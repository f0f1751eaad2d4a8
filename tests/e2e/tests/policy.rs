//! A TrafficPolicy applied with `isthmus apply` in west: a weighted split
//! between west's own echo and east's, a header that pins requests to east,
//! and an invalid policy refused with the field named and nothing changed.

use std::time::Duration;

use isthmus_e2e::{Component, ECHO, Pair, eventually, get_via, ok};

fn apply(dir: &str, root: &std::path::Path, name: &str, yaml: &str) -> (i32, String) {
    let file = root.join(name);
    std::fs::write(&file, yaml).unwrap();
    let out = isthmus_e2e::isthmus(&["apply", "--dir", dir, "-f", file.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Which cluster answered each of `n` calls: (east, west).
fn mix(proxy: &str, n: usize) -> (usize, usize) {
    let mut east = 0;
    for _ in 0..n {
        let r = get_via(proxy, ECHO).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        if r.json()["cluster"] == "east" {
            east += 1;
        }
    }
    (east, n - east)
}

#[test]
fn apply_splits_pins_and_refuses_bad_policies() {
    let root = tempfile::tempdir().unwrap();
    let p = Pair::start(root.path(), "127.0.30", "127.0.31", "");
    p.link_and_export();
    // West runs demo/echo too, unexported: east's endpoints join it only
    // because west imports them, and by default its own copy takes every
    // call.
    ok(&["imports", "--dir", &p.west_dir, "east", "demo/echo"]);
    let west_echo = Component::start(root.path(), "west-echo", "echo --cluster west --listen 127.0.31.20:0");
    let _west_sidecar = Component::start(
        root.path(),
        "west-echo-sidecar",
        &format!(
            "sidecar --dir {} --namespace demo --service echo --port 8080 --app {} \
             --inbound-addr 127.0.31.20:0 --outbound-addr 127.0.31.20:0 --admin-addr 127.0.31.20:0",
            p.west_dir,
            west_echo.addr("listen")
        ),
    );
    let proxy = p.proxy();
    eventually("west's own echo to answer", Duration::from_secs(30), || {
        (mix(&proxy, 1).1 == 1).then_some(())
    });
    assert_eq!(mix(&proxy, 20), (0, 20), "local first by default");

    let policy = "apiVersion: isthmus.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: demo }
spec:
  routes:
    - match: { headers: { x-canary: \"true\" } }
      split: [{ cluster: east }]
    - split: [{ cluster: east, weight: 50 }, { cluster: west, weight: 50 }]
";
    let (code, out) = apply(&p.west_dir, root.path(), "split.yaml", policy);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("applied"), "{out}");
    // Within a second or so the client sidecar splits; 400 calls at 50/50
    // land 35-65% on each side with overwhelming probability.
    eventually("the split to take effect", Duration::from_secs(10), || {
        let (east, _) = mix(&proxy, 20);
        (east > 0).then_some(())
    });
    let (east, west) = mix(&proxy, 400);
    assert!((140..=260).contains(&east), "east {east}, west {west}");

    // The canary header pins to east.
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(&proxy).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "GET {ECHO} HTTP/1.1\r\nhost: echo.demo.svc.clusterset.local:8080\r\nx-canary: true\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        assert!(raw.contains("\"cluster\":\"east\""), "{raw}");
    }

    // Invalid: refused with the field named, exit 2, the split stays.
    let bad = policy.replace("weight: 50 }, { cluster: west", "weight: 0 }, { cluster: west");
    let (code, out) = apply(&p.west_dir, root.path(), "bad.yaml", &bad);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("spec.routes[1].split[0].weight"), "{out}");
    let (code, out) = apply(
        &p.west_dir,
        root.path(),
        "typo.yaml",
        &policy.replace("routes:", "rotues:"),
    );
    assert_eq!(code, 2, "{out}");
    let (east, _) = mix(&proxy, 100);
    assert!(east > 10, "the applied split is still in place: east {east}");

    // Deleted: back to local first.
    let out = isthmus_e2e::isthmus(&[
        "apply",
        "--dir",
        &p.west_dir,
        "--delete",
        "-f",
        root.path().join("split.yaml").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    eventually("local first again", Duration::from_secs(10), || {
        (mix(&proxy, 20) == (0, 20)).then_some(())
    });
}
