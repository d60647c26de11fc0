//! The Redis Streams store (`aion run --store redis://…`) against a real `redis-server` (Debian package) that
//! the harness starts on a free port: AION's key names, consumer groups and acks, the durability scenarios of the
//! embedded store, Redis itself killed mid-flow, kanbans AION left in Redis, retention, and an unreachable Redis.
#![cfg(feature = "redis")]
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{line_count, scenarios, wait_until, Redis, Runtime, AION};
use std::time::Duration;

fn slow(slow_ms: u32) -> String {
    format!(
        r#"
microservices:
  slow:
    command: ["{{testkit}}"]
    always: yes
    env: {{ SLOW_MS: {slow_ms}, RECORD: "{{work}}/slow.jsonl" }}
"#
    )
}

#[test]
fn queues_are_aion_streams_with_a_consumer_group_and_acks() {
    let redis = Redis::start();
    let url = redis.url();
    let mut rt = Runtime::start_with_args(&slow(60_000), &["--store", &url]);
    for i in 1..=3 {
        rt.send("slow", &["--metadata", &format!(r#"{{"seq":{i}}}"#)]);
    }
    let key = "kanban:before:slow:001";
    // Accepted = in Redis, and delivered-but-unacknowledged in the group's pending list.
    assert_eq!(redis.int(&["XLEN", key]), 3);
    let pending = redis.cli(&["XPENDING", key, "aion"]);
    assert!(pending.starts_with("3\n"), "3 pending entries: {pending}");
    let first = redis.cli(&["XRANGE", key, "-", "+", "COUNT", "1"]);
    assert!(first.contains("\"connectionKey\":\"default\"") && first.contains("\"seq\":1"), "AION protojson: {first}");
    assert!(first.contains("\nid\n") && first.contains("\nwire\n"), "{first}");
    let s = rt.status();
    assert_eq!(s["store"]["backend"], "redis", "{s}");
    assert!(s["store"]["path"].as_str().is_some_and(|p| p.starts_with("redis://")), "{s}");

    // kill -9; the next run claims the dead consumer's pending entries (XAUTOCLAIM) and delivers them.
    let mut rt2 = rt.crash_and_restart(&slow(0));
    let lines = rt2.wait_lines("slow.jsonl", 3);
    let seqs: std::collections::BTreeSet<i64> = lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=3).collect());
    rt2.wait_status("acks reached Redis", |s| s["store"]["acked"].as_u64() >= Some(3));
    wait_until("acknowledged entries deleted", Duration::from_secs(10), || {
        (redis.int(&["XLEN", key]) == 0).then_some(())
    });
    let consumers = redis.cli(&["XINFO", "CONSUMERS", key, "aion"]);
    assert_eq!(consumers.matches("\nname\n").count() + usize::from(consumers.starts_with("name\n")), 1, "{consumers}");
    // Nothing else was touched: never FLUSHALL.
    redis.cli(&["SET", "app:cache", "kept"]);
    assert_eq!(rt2.stop(), 0);
    let rt3 = Runtime::start_with_args(&slow(0), &["--store", &url]);
    assert_eq!(redis.cli(&["GET", "app:cache"]).trim(), "kept");
    drop(rt3);
}

#[test]
fn queued_kanbans_survive_a_runtime_kill_9_on_redis() {
    let redis = Redis::start();
    scenarios::queued_kanbans_survive_kill_9(&["--store", &redis.url()]);
}

#[test]
fn static_kanbans_survive_a_runtime_kill_9_on_redis() {
    let redis = Redis::start();
    scenarios::static_kanbans_survive_kill_9(&["--store", &redis.url()]);
    let topic = redis.cli(&["XRANGE", "kanban:static:t", "-", "+"]);
    assert!(topic.contains("\"v\":\"second\"") && !topic.contains("\"v\":\"first\""), "{topic}");
}

#[test]
fn kill_9_at_random_points_loses_nothing_on_redis() {
    let redis = Redis::start();
    scenarios::kill_9_at_random_points_loses_nothing(&["--store", &redis.url()]);
    assert_eq!(redis.int(&["XLEN", "kanban:before:sink:001"]), 0, "everything acknowledged");
}

#[test]
fn redis_killed_mid_flow_loses_nothing() {
    const N: i64 = 20_000;
    let mut redis = Redis::start();
    let yaml = common::pipeline(&format!("EMIT_COUNT: {N}, CHUNK: 500"), "", "");
    let mut rt = Runtime::start_with_args(&yaml, &["--store", &redis.url()]);
    let sink = rt.path("sink.jsonl");
    wait_until("flow under way", Duration::from_secs(120), || (line_count(&sink) >= 2_000).then_some(()));
    redis.kill9_and_restart();
    let count = common::every_seq_at_sink(&sink, N as u64, Duration::from_secs(300));
    // The runtime did not restart, and Redis kept what it acknowledged: no kanban was delivered twice.
    let dups: u64 = count.values().map(|c| c - 1).sum();
    assert_eq!(dups, 0, "no duplicates when only Redis restarts");
    let s = rt.wait_status("queues drained in Redis", |s| s["store"]["acked"].as_u64() >= Some(2 * N as u64));
    assert!(s["store"]["errors"].as_u64() > Some(0), "the outage was seen and retried: {s}");
    eprintln!("store: {}", s["store"]);
    assert!(rt.stderr().contains("Redis writes resumed"), "{}", rt.stderr());
    for key in ["kanban:before:relay:001", "kanban:before:sink:001"] {
        wait_until(key, Duration::from_secs(10), || (redis.int(&["XLEN", key]) == 0).then_some(()));
    }
    assert_eq!(rt.stop(), 0);
}

#[test]
fn kanbans_aion_left_in_redis_are_delivered() {
    let redis = Redis::start();
    // What AION's broker wrote: one field, `kanban`, with the protojson of StatusKanban.
    redis.cli(&[
        "XADD",
        "kanban:before:slow:001",
        "*",
        "kanban",
        r#"{"connectionKey":"default","processNumber":1,"priorSuccess":true,"metadata":{"seq":42}}"#,
    ]);
    redis.cli(&["XADD", "kanban:before:slow:001", "*", "kanban", "not json"]);
    let mut rt = Runtime::start_with_args(&slow(0), &["--store", &redis.url()]);
    let l = rt.wait_lines("slow.jsonl", 1);
    assert_eq!(l[0]["metadata"]["seq"], 42);
    assert!(rt.stderr().contains("unreadable queued kanban left pending in Redis"), "{}", rt.stderr());
    // The delivered entry is deleted once its ack reaches Redis; the unreadable one is kept, not dropped.
    wait_until("the delivered entry acknowledged", Duration::from_secs(10), || {
        (redis.int(&["XLEN", "kanban:before:slow:001"]) == 1).then_some(())
    });
    assert!(redis.cli(&["XRANGE", "kanban:before:slow:001", "-", "+"]).contains("not json"));
    assert_eq!(rt.stop(), 0);
}

/// An entry that appears in one of our streams while the runtime runs (in practice: the last pipeline of a run
/// killed mid-write, executed by Redis after this run's recovery scan) is adopted and delivered, not left
/// pending in Redis with nobody to acknowledge it.
#[test]
fn entries_written_behind_a_running_store_are_adopted_and_delivered() {
    let redis = Redis::start();
    let mut rt = Runtime::start_with_args(&slow(0), &["--store", &redis.url()]);
    rt.send("slow", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_lines("slow.jsonl", 1);
    redis.cli(&[
        "XADD",
        "kanban:before:slow:001",
        "*",
        "kanban",
        r#"{"connectionKey":"default","processNumber":1,"priorSuccess":true,"metadata":{"seq":99}}"#,
    ]);
    // The next write to the stream reads the stray entry into our pending list with its own.
    rt.send("slow", &["--metadata", r#"{"seq":2}"#]);
    let lines = rt.wait_lines("slow.jsonl", 3);
    let mut seqs: Vec<i64> = lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2, 99]);
    let s = rt.wait_status("stray entry counted", |s| s["store"]["stray_entries"] == 1);
    assert!(rt.stderr().contains("entry written behind this run adopted"), "{s}");
    wait_until("every entry acknowledged", Duration::from_secs(10), || {
        (redis.int(&["XLEN", "kanban:before:slow:001"]) == 0).then_some(())
    });
    assert_eq!(rt.stop(), 0);
}

#[test]
fn retention_keeps_acknowledged_entries_up_to_the_limit() {
    let redis = Redis::start();
    let yaml = r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 1000 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;
    let mut rt = Runtime::start_with_args(yaml, &["--store", &redis.url(), "--redis-retain", "100"]);
    rt.wait_lines("sink.jsonl", 1000);
    rt.wait_status("all acked", |s| s["store"]["acked"].as_u64() >= Some(1000));
    let key = "kanban:before:sink:001";
    let len = redis.int(&["XLEN", key]);
    assert!(
        (100..1000).contains(&len),
        "acknowledged entries kept, then trimmed to the newest 100 (+ one trim period): {len}"
    );
    assert!(redis.cli(&["XPENDING", key, "aion"]).starts_with("0\n"));
    assert_eq!(rt.stop(), 0);
}

#[test]
fn an_unreachable_redis_is_a_clear_error() {
    let port = common::free_port();
    let work = tempfile::tempdir().expect("tmp");
    let file = work.path().join("services.yml");
    std::fs::write(&file, "microservices:\n  a:\n    command: [\"true\"]\n").expect("write");
    let out = std::process::Command::new(AION)
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .arg("run")
        .arg(&file)
        .args(["--store", &format!("redis://127.0.0.1:{port}"), "--redis-wait", "1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Redis store redis://127.0.0.1:") && err.contains("aion:"), "{err}");
    let bad =
        std::process::Command::new(AION).arg("run").arg(&file).args(["--store", "mysql://x"]).output().expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected `embedded` or a redis:// URL"));
}
