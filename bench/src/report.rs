//! The figures as a Markdown section, spliced into docs/benchmarks.md
//! between two markers so the prose around it is kept.

use std::fmt::Write;
use std::path::Path;

use crate::{PathResult, Results};

const BEGIN: &str = "<!-- bench:begin (written by isthmus-bench; do not edit by hand) -->";
const END: &str = "<!-- bench:end -->";

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {:.0} GiB, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

pub fn commit() -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = out(&["rev-parse", "--short", "HEAD"]);
    let dirty = !out(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn over<T>(p: &PathResult, f: impl Fn(&crate::RoundFigures) -> T) -> Vec<T> {
    p.rounds.iter().map(f).collect()
}

/// Latency added to `direct`, per percentile index, as the median over
/// rounds of each round's difference (both measured in the same round).
pub fn added_ms(p: &PathResult, direct: &PathResult, i: usize) -> f64 {
    median(
        p.rounds
            .iter()
            .zip(&direct.rounds)
            .map(|(r, d)| (r.latency_us[i] - d.latency_us[i]) / 1000.0)
            .collect(),
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn mib(b: f64) -> f64 {
    b / 1024.0 / 1024.0
}

pub fn markdown(r: &Results) -> String {
    let a = &r.args;
    let mut s = String::new();
    let find = |n: &str| r.paths.iter().find(|p| p.name == n);
    let direct = find("direct").expect("the direct path is always measured");
    let _ = writeln!(s, "{BEGIN}\n");
    let _ = writeln!(
        s,
        "Run {} at commit `{}` on {}.\n\nCommand: `{}`\n",
        r.started, r.commit, r.machine, r.command
    );
    let _ = writeln!(
        s,
        "Settings: {} req/s over {} keep-alive HTTP/1.1 connections, `POST` of {} B echoed back, \
         {:.0} s per run; {} rounds, each path measured in turn in every round; figures are medians over \
         rounds. Highest rate: {} connections, each sending as soon as it is answered, {:.0} s. Bulk: one \
         `GET` of {} MiB on a new connection.\n",
        a.rate,
        a.conns,
        a.body,
        a.duration.as_secs_f64(),
        a.rounds,
        a.max_conns,
        a.max_duration.as_secs_f64(),
        a.bulk_mib
    );

    let _ = writeln!(s, "### Latency at {} req/s\n", a.rate);
    let _ = writeln!(
        s,
        "| path | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | errors | target (added p99) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.paths {
        let abs = |i: usize| median(over(p, |x| x.latency_us[i])) / 1000.0;
        let errors: u64 = over(p, |x| x.errors).iter().sum();
        let sent: u64 = over(p, |x| x.sent).iter().sum();
        let (added, target) = if p.name == "direct" {
            ("| - | - | - ".to_string(), "-".to_string())
        } else {
            let ad = |i| added_ms(p, direct, i);
            // Against the L7 peer when it ran: at or below the HAProxy
            // pair's added p99 within a cluster, at most twice it across.
            let l7 = find("haproxy").map(|h| added_ms(h, direct, 2));
            let target = match (p.name, l7) {
                ("intra", Some(h)) => format!("≤ HAProxy's ({h:.3} ms): {}", verdict(ad(2) <= h)),
                ("cross", Some(h)) => format!("≤ 2x HAProxy's ({:.3} ms): {}", 2.0 * h, verdict(ad(2) <= 2.0 * h)),
                ("intra", None) => format!("≤ 0.5 ms: {}", verdict(ad(2) <= 0.5)),
                ("cross", None) => format!("≤ 1 ms: {}", verdict(ad(2) <= 1.0)),
                _ => "-".into(),
            };
            (
                format!("| {:.3} ms | {:.3} ms | {:.3} ms ", ad(0), ad(1), ad(2)),
                target,
            )
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms {added}| {errors} of {sent} | {target} |",
            p.label,
            abs(0),
            abs(1),
            abs(2),
            abs(3)
        );
    }

    let stunnel = find("stunnel");
    let _ = writeln!(s, "\n### Highest rate and bulk throughput\n");
    let _ = writeln!(
        s,
        "| path | highest rate | vs direct | bulk, one connection | vs stunnel | target (bulk) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let direct_rate = median(over(direct, |x| x.max_rate));
    let stunnel_bulk = stunnel.map(|t| median(over(t, |x| x.bulk_bytes_per_sec)));
    for p in &r.paths {
        let rate = median(over(p, |x| x.max_rate));
        let bulk = median(over(p, |x| x.bulk_bytes_per_sec));
        let vs = stunnel_bulk.map_or("-".into(), |b| format!("{:.2}x", bulk / b));
        let target = match (p.name, stunnel_bulk) {
            ("cross", Some(b)) => format!("≥ 0.8x stunnel: {}", verdict(bulk >= 0.8 * b)),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} req/s | {:.2}x | {:.0} MiB/s | {vs} | {target} |",
            p.label,
            rate,
            rate / direct_rate,
            mib(bulk)
        );
    }

    let _ = writeln!(s, "\n### Memory and CPU of each process\n");
    let _ = writeln!(
        s,
        "RSS idle is read after the clusters are linked and every path has answered once; under load, the \
         largest RSS sampled (every 100 ms) during the fixed-rate runs. CPU is user plus system time over \
         the run, per 1000 requests (the same as vCPU at 1000 req/s). The fixed-rate runs come first; the peak \
         is the high-water mark (VmHWM) at the end, after the highest-rate and bulk runs.\n"
    );
    let _ = writeln!(
        s,
        "| path | process | RSS idle | RSS under load | RSS peak, whole run | CPU per 1000 requests | target |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let cpu_of = |p: &PathResult, i: usize| median(over(p, |x| x.cpu[i] / (x.achieved_rate / 1000.0)));
    // The L7 peer's client-side instance: what a sidecar's CPU is held to.
    let l7_cpu = find("haproxy").map(|h| cpu_of(h, 0));
    for p in &r.paths {
        for (i, proc_name) in p.procs.iter().enumerate() {
            let load = over(p, |x| x.rss_load[i] as f64).into_iter().fold(0.0, f64::max);
            let cpu = cpu_of(p, i);
            let target = if proc_name.ends_with("sidecar") {
                let cpu_target = match l7_cpu {
                    Some(h) => format!("CPU ≤ HAProxy's ({h:.3} s): {}", verdict(cpu <= h)),
                    None => format!("CPU ≤ 0.05: {}", verdict(cpu <= 0.05)),
                };
                format!("RSS ≤ 15 MB: {}; {cpu_target}", verdict(load <= 15e6))
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| {} | {proc_name} | {:.1} MB | {:.1} MB | {:.1} MB | {:.3} s | {target} |",
                p.label,
                p.rss_idle[i] as f64 / 1e6,
                load / 1e6,
                p.rss_peak.get(i).copied().unwrap_or(0) as f64 / 1e6,
                cpu
            );
        }
    }
    let _ = writeln!(s, "\n![latency, throughput and CPU by path](benchmarks.png)\n");
    let _ = writeln!(s, "{END}");
    s
}

/// Replace the generated section of `path` with `section`, or append it.
pub fn splice(path: &Path, section: &str) -> std::io::Result<()> {
    splice_between(path, section, BEGIN, END)
}

/// Replace what lies between `begin` and `end` (markers included, and in
/// `section` too) in the file at `path`, or append `section`.
pub fn splice_between(path: &Path, section: &str, begin: &str, end: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => format!("{}{}{}", &old[..b], section.trim_end(), &old[e + end.len()..]),
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(path, new)
}
