//! The reference docs say what the code does: every metric registered in
//! code is in docs/metrics.md and the reverse, every `x-isthmus-error` kind,
//! exit code, opaque-connection outcome, tunnel refusal and join and link
//! result is documented, and the README's layout names every directory and
//! script.
//! These tests fail when the two drift apart.

use std::collections::BTreeSet;

use prometheus_client::registry::Registry;

fn doc(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a registry holds, without the `_total` counters carry
/// on the wire. Read from its `Debug` form: the text encoding leaves out
/// families that have no series yet, and nothing else lists descriptors.
fn names_in(registry: &Registry) -> BTreeSet<String> {
    let debug = format!("{registry:?}");
    debug
        .split("name: \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// The counters among them, whose series exist already (to check that the
/// docs give them their `_total`).
fn counters_in(registry: &Registry) -> BTreeSet<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .map(str::to_string)
        .collect()
}

/// Every component's registry, as it registers its metrics.
fn registries() -> Vec<Registry> {
    let mut sidecar = Registry::default();
    isthmus_sidecar::metrics::Metrics::register(&mut sidecar);
    let mut gateway = Registry::default();
    isthmus_gateway::metrics::Metrics::register(&mut gateway);
    let mut controller = Registry::default();
    isthmus_controller::metrics::Metrics::register(&mut controller);
    let mut svid = Registry::default();
    isthmus_core::agent::SvidMetrics::default().register(&mut svid);
    vec![sidecar, gateway, controller, svid]
}

/// The metric names in the first column of docs/metrics.md's tables.
fn documented_metrics() -> BTreeSet<String> {
    doc("metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `isthmus_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("isthmus_{n}"))
        .collect()
}

#[test]
fn every_metric_is_documented_and_every_documented_metric_exists() {
    let registries = registries();
    let code: BTreeSet<String> = registries.iter().flat_map(names_in).collect();
    let documented = documented_metrics();
    for c in registries.iter().flat_map(counters_in) {
        assert!(
            documented.contains(&format!("{c}_total")),
            "counter {c} is not documented as {c}_total"
        );
    }
    let docs: BTreeSet<String> = documented
        .iter()
        .map(|d| d.strip_suffix("_total").unwrap_or(d).to_string())
        .collect();
    assert!(code.len() > 30, "the registries look empty: {code:?}");
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from docs/metrics.md: {undocumented:?}"
    );
    assert!(
        stale.is_empty(),
        "docs/metrics.md lists metrics no component registers: {stale:?}"
    );
}

/// Each of `labels` appears in backticks in `text`; `what` names them.
fn all_backticked(text: &str, labels: impl IntoIterator<Item = &'static str>, what: &str) {
    let missing: Vec<&str> = labels
        .into_iter()
        .filter(|l| !text.contains(&format!("`{l}`")))
        .collect();
    assert!(missing.is_empty(), "{what} not documented: {missing:?}");
}

#[test]
fn every_label_value_of_metrics_is_documented() {
    let metrics = doc("metrics.md");
    let tcp = isthmus_sidecar::metrics::TcpOutcome::ALL.map(|o| o.as_str());
    all_backticked(&metrics, tcp, "TCP outcomes in docs/metrics.md");
    let refusals = isthmus_core::tunnel::RefuseCode::ALL.map(|c| c.as_str());
    all_backticked(&metrics, refusals, "refusals in docs/metrics.md");
}

#[test]
fn every_error_kind_and_exit_code_is_in_the_cli_reference() {
    let cli = doc("cli.md");
    let kinds = isthmus_sidecar::ErrorKind::ALL.map(|k| k.as_str());
    all_backticked(&cli, kinds, "x-isthmus-error kinds in docs/cli.md");
    for code in crate::exit::ALL {
        assert!(
            cli.contains(&format!("\n| {code} |")),
            "exit code {code} not in docs/cli.md's table"
        );
    }
}

/// The line of docs/metrics.md that documents `metric`.
fn metric_row(metric: &str) -> String {
    doc("metrics.md")
        .lines()
        .find(|l| l.starts_with(&format!("| `{metric}`")))
        .unwrap_or_else(|| panic!("{metric} not in docs/metrics.md"))
        .to_string()
}

#[test]
fn every_join_and_link_result_is_documented() {
    use isthmus_controller::join::{JoinRefusal, LinkFailure};
    let join = metric_row("isthmus_join_attempts_total");
    let refusals = JoinRefusal::examples().into_iter().map(|r| r.label());
    all_backticked(&join, refusals, "join results in isthmus_join_attempts_total's row");
    let link = metric_row("isthmus_link_attempts_total");
    let failures = LinkFailure::ALL.iter().map(|f| f.label());
    all_backticked(&link, failures, "link results in isthmus_link_attempts_total's row");
}

#[test]
fn the_readme_layout_names_every_directory_and_script() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let layout = readme.split("## Layout").nth(1).expect("a Layout section");
    let layout = layout.split("\n## ").next().unwrap_or(layout);
    let dirs = |path: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .expect("readable")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    for d in dirs(&root) {
        // Build output, VCS and editor state are no part of the layout.
        if d == "target" || (d.starts_with('.') && d != ".ci") {
            continue;
        }
        if d == "tests" {
            for t in dirs(&root.join("tests")) {
                assert!(
                    layout.contains(&format!("`tests/{t}/`")),
                    "README layout lacks tests/{t}/"
                );
            }
            continue;
        }
        assert!(layout.contains(&format!("`{d}/`")), "README layout lacks {d}/");
    }
    for f in std::fs::read_dir(root.join("scripts")).expect("scripts/").flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            continue;
        }
        assert!(
            layout.contains(&format!("`{name}`")),
            "README layout lacks scripts/{name}"
        );
    }
}
