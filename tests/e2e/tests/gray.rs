//! Gray failures: apps that hang or slow down rather than die. A hung app
//! still accepts connections (the kernel's backlog) and never answers; a
//! slow one answers too late. Three clusters of real processes (west calls
//! demo/echo, east and north export it), 100 idempotent calls a second
//! throughout. Each case prints calls sent and failed and when traffic had
//! moved:
//!
//! ```text
//! cargo test -p isthmus-e2e --test gray -- --nocapture --test-threads 1
//! ```
//!
//! Targets (docs/policy.md): with a per-try timeout no call is lost and
//! traffic has moved within 1 s of the fault; without one, at most the calls
//! in flight at the hang fail and the move follows within 1 s of the first
//! timeout. The assertions are looser on timing (5 s) so a loaded CI machine
//! cannot fail them by luck; the printed figures are the measurement.

use std::sync::Mutex;
use std::time::Duration;

use isthmus_e2e::Impact;
use isthmus_e2e::three::{SLOW, Three, check, echo_with, signal, through};

static SERIAL: Mutex<()> = Mutex::new(());

const NETS: [&str; 3] = ["127.0.35", "127.0.36", "127.0.37"];

fn elsewhere(c: &str) -> bool {
    c == "east" || c == "north"
}

#[test]
fn a_hung_local_app_is_left_for_another_cluster_losing_nothing() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start(NETS);
    let [west] = m.west_echoes([20]);
    m.west_policy("  retries: { perTryTimeout: 200ms }\n");
    m.wait_for("west's own echo to take every call", |c| c == "west");
    let app = [west.app.pid()];
    let (sent, at) = through(&m.proxy(), Duration::from_secs(3), || signal("-STOP", &app));
    let impact = Impact::of(&sent, at, SLOW, elsewhere);
    check("a hung local app, 200 ms per-try timeout", &impact, true);
    assert!(
        !impact.after.contains_key("west"),
        "probes let the hung app back: {impact:?}"
    );
    // Answering again, it is probed back and takes the traffic again.
    signal("-CONT", &app);
    m.wait_for("west's echo to take the traffic back", |c| c == "west");
}

#[test]
fn without_a_per_try_timeout_only_the_calls_in_flight_fail() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start_with(NETS, "--request-timeout 3s");
    let [west] = m.west_echoes([20]);
    let app = [west.app.pid()];
    only_the_calls_in_flight_fail(&m, &app, "a hung local app", elsewhere);
}

#[test]
fn without_a_per_try_timeout_a_hung_remote_app_costs_only_the_calls_in_flight() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start_with(NETS, "--request-timeout 3s");
    m.east_then_north("");
    let app = [m.east_echo.app.pid()];
    only_the_calls_in_flight_fail(&m, &app, "a hung remote app (east)", |c| c == "north");
}

/// Hang `app` under load with no per-try timeout (3 s request timeout):
/// the four calls in flight at the hang time out, and every call that
/// starts after the first timeout goes to a cluster `moved_to` accepts.
fn only_the_calls_in_flight_fail(m: &Three, app: &[u32], case: &str, moved_to: fn(&str) -> bool) {
    let (sent, at) = through(&m.proxy(), Duration::from_secs(6), || signal("-STOP", app));
    let failed: Vec<_> = sent.iter().filter(|s| s.status != 200).collect();
    // Four callers, one call each at a time: the four in flight at the hang.
    assert!(failed.len() <= 4, "{} failed: {failed:?}", failed.len());
    let first_timeout = failed
        .iter()
        .map(|s| s.end)
        .min()
        .expect("the calls in flight timed out");
    let late: Vec<_> = sent
        .iter()
        .filter(|s| s.start > first_timeout + Duration::from_millis(100))
        .filter(|s| s.status != 200 || !moved_to(&s.cluster))
        .collect();
    let impact = Impact::of(&sent, at, SLOW, moved_to);
    println!(
        "{case}, no per-try timeout (3 s request timeout): {} calls, {} failed (in flight at the hang), first timeout {:.3} s after the hang, traffic moved {:.3} s after it",
        sent.len(),
        failed.len(),
        (first_timeout - at).as_secs_f64(),
        impact.moved_after.as_secs_f64() - (first_timeout - at).as_secs_f64(),
    );
    assert!(
        late.is_empty(),
        "calls after the first timeout stayed or failed: {late:?}"
    );
    signal("-CONT", app);
}

#[test]
fn a_hung_remote_app_is_left_for_the_next_cluster_losing_nothing() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start(NETS);
    m.east_then_north("      retries: { perTryTimeout: 200ms }\n");
    let app = [m.east_echo.app.pid()];
    let (sent, at) = through(&m.proxy(), Duration::from_secs(3), || signal("-STOP", &app));
    let impact = Impact::of(&sent, at, SLOW, |c| c == "north");
    check("a hung remote app (east), 200 ms per-try timeout", &impact, true);
    assert!(
        !impact.after.contains_key("east"),
        "probes let the hung app back: {impact:?}"
    );
    signal("-CONT", &app);
    m.wait_for("east to take the traffic back", |c| c == "east");
}

#[test]
fn a_slow_remote_app_is_left_for_the_next_cluster_losing_nothing() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = Three::start(NETS);
    // East's app, answering at once until SIGUSR1, then after 2 s: the
    // same process, address and connections, turned slow (never dead).
    m.east_echo = echo_with(
        m.root.path(),
        &m.east.dir,
        "east",
        &format!("{}.21", m.nets[1]),
        "east-echo-slowing",
        "--delay 2s --slow-on-sigusr1",
    );
    m.east_then_north("      retries: { perTryTimeout: 500ms }\n");
    let app = [m.east_echo.app.pid()];
    let (sent, at) = through(&m.proxy(), Duration::from_secs(4), || signal("-USR1", &app));
    let impact = Impact::of(&sent, at, Duration::from_millis(700), |c| c == "north");
    check(
        "a slow remote app (east, 2 s answers), 500 ms per-try timeout",
        &impact,
        true,
    );
    assert!(!impact.after.contains_key("east"), "{impact:?}");
}
