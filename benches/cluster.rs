//! Cross-device figures of cluster mode: two `aion` runtimes on two hosts (network namespaces joined by veth
//! and a bridge when run as root, else loopback), a source on device `a` and a sink on device `b`:
//!
//! - throughput of small kanbans across the link, the sink's queue in memory and durable;
//! - hop latency (source emission → sink handling, wall clock of the one machine) at a fixed rate, p50/p99.
//!
//! `cargo build --release --examples && cargo bench --bench cluster` (`AION_BENCH_N` kanbans, default 200 000;
//! `AION_BENCH_RATE`, default 1000/s for 5 s). Results also in `target/bench-results/cluster.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const AION: &str = env!("CARGO_BIN_EXE_aion");

#[path = "support/netns.rs"]
mod netns;
use netns::{Hosts, Runtime};

fn status(data: &Path) -> Option<serde_json::Value> {
    netns::status(Path::new(AION), data)
}

fn start(wrapper: &[String], data: &Path, yaml: &str, listen: &str) -> Runtime {
    let args = ["--listen", listen, "--grpc", "off", "--outbox-capacity", "65536"];
    let rt = Runtime::start(Path::new(AION), wrapper, data, yaml, &args).expect("spawn aion");
    assert!(rt.ready(Duration::from_secs(30)), "runtime did not start");
    rt
}

fn sink_in(data: &Path) -> u64 {
    status(data)
        .and_then(|s| s["instances"].as_array().and_then(|a| a.iter().find(|i| i["service"] == "sink").cloned()))
        .and_then(|i| i["kanbans_in"].as_u64())
        .unwrap_or(0)
}

/// One run: returns the throughput (kanbans/s) and b's data dir (deleted on return: what the sink records
/// goes elsewhere).
fn run(
    hosts: &[(Vec<String>, String)],
    kit: &str,
    n: u64,
    source_env: &str,
    sink_env: &str,
    delivery: &str,
) -> (f64, PathBuf) {
    let (ta, tb) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let (da, db) = (ta.path().to_owned(), tb.path().to_owned());
    assert!(Command::new(AION)
        .arg("--data-dir")
        .arg(&da)
        .args(["cluster", "init", "--name", "a"])
        .output()
        .unwrap()
        .status
        .success());
    assert!(Command::new(AION)
        .arg("--data-dir")
        .arg(&da)
        .args(["cluster", "issue", "b", "--out", &db.display().to_string()])
        .output()
        .unwrap()
        .status
        .success());
    let (a_addr, b_addr) = (&hosts[0].1, &hosts[1].1);
    let (pa, pb) = if a_addr == b_addr { (free_port(), free_port()) } else { (11030, 11030) };
    let b_yaml = format!(
        "deviceName: b\ndevices:\n  a: {{ addr: \"{a_addr}:{pa}\" }}\nmicroservices:\n  sink:\n    command: [\"{kit}\"]\n    always: yes\n    startup: yes\n    delivery: {delivery}\n    env: {{ {sink_env} }}\n"
    );
    let a_yaml = format!(
        "deviceName: a\ndevices:\n  b: {{ addr: \"{b_addr}:{pb}\" }}\nmicroservices:\n  source:\n    command: [\"{kit}\"]\n    startup: yes\n    env: {{ EMIT_COUNT: {n}{source_env} }}\n    nextService: {{ default: [ {{ name: sink, device: b }} ] }}\n"
    );
    let rb = start(&hosts[1].0, &db, &b_yaml, &format!("{b_addr}:{pb}"));
    let t0 = Instant::now();
    let ra = start(&hosts[0].0, &da, &a_yaml, &format!("{a_addr}:{pa}"));
    let (mut first, mut last) = (None, None);
    while last.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(600), "the run did not complete");
        let got = sink_in(&db);
        if got >= n / 100 && first.is_none() {
            first = Some((Instant::now(), got));
        }
        if got >= n {
            last = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ((t1, k1), t2) = (first.unwrap(), last.unwrap());
    let rate = (n - k1) as f64 / t2.duration_since(t1).as_secs_f64();
    drop(ra);
    drop(rb);
    (rate, db)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kit = Path::new(AION).parent().unwrap().join("examples/testkit");
    assert!(kit.is_file(), "{} is missing: run `cargo build --release --examples` first", kit.display());
    let kit = kit.display().to_string();
    let n: u64 = std::env::var("AION_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let rate: u64 = std::env::var("AION_BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let (hosts_guard, hosts) = Hosts::new();
    println!("cluster bench: {} kanbans, {}", n, hosts_guard.kind());
    let (mem, _) = run(&hosts, &kit, n, "", "WINDOW: 1024", "memory");
    println!("  throughput a > b, sink queue in memory:  {mem:>9.0} kanbans/s");
    let (dur, _) = run(&hosts, &kit, n, "", "WINDOW: 1024", "durable");
    println!("  throughput a > b, sink queue durable:    {dur:>9.0} kanbans/s");
    let count = rate * 5;
    let rec = tempfile::tempdir().expect("tmp");
    let path = rec.path().join("lat.jsonl");
    let sink_env = format!("RECORD: \"{}\"", path.display());
    run(&hosts, &kit, count, &format!(", RATE: {rate}, STAMP: 1"), &sink_env, "durable");
    let mut lat: Vec<f64> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["lat_us"].as_f64())
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!(
        "  hop latency at {rate}/s (source > a > b > sink, durable): p50 {p50:.0} µs, p99 {p99:.0} µs ({} samples)",
        lat.len()
    );
    let out = serde_json::json!({
        "hosts": hosts_guard.kind(), "kanbans": n,
        "throughput_memory": mem, "throughput_durable": dur,
        "latency_rate": rate, "latency_p50_us": p50, "latency_p99_us": p99, "latency_samples": lat.len(),
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("cluster.json"), serde_json::to_string_pretty(&out).unwrap());
}
