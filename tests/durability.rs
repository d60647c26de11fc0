//! Durable delivery on the embedded store: kanbans accepted by the runtime survive kill -9 of the runtime and of
//! microservices. (The same scenarios run against Redis in tests/redis_store.rs.)
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::scenarios;

#[test]
fn queued_kanbans_survive_a_runtime_kill_9_and_memory_mode_does_not() {
    scenarios::queued_kanbans_survive_kill_9(&[]);
}

#[test]
fn static_kanbans_survive_a_runtime_kill_9() {
    scenarios::static_kanbans_survive_kill_9(&[]);
}

#[test]
fn kill_9_at_random_points_loses_nothing_in_a_100k_pipeline() {
    scenarios::kill_9_at_random_points_loses_nothing(&[]);
}

/// A full store (here `--store-max-mb 1`, the same SQLite error as a full disk): producers wait with a logged,
/// counted error instead of losing anything; acknowledgements still free space, and every kanban arrives once.
#[test]
fn a_full_store_applies_back_pressure_and_loses_nothing() {
    const N: usize = 60;
    let yaml = r#"
microservices:
  slow:
    command: ["{testkit}"]
    always: yes
    env: { SLOW_MS: 250, RECORD: "{work}/slow.jsonl" }
"#;
    let rt = common::Runtime::start_with_args(yaml, &["--store-max-mb", "1"]);
    let pad = "x".repeat(64 * 1024);
    // ~4 MB of kanbans into a 1 MB queue database (room for ~15), sent by 4 producers at once, while the consumer
    // takes 250 ms per kanban: the store fills whatever the machine's speed.
    std::thread::scope(|s| {
        for p in 0..4 {
            let (rt, pad) = (&rt, &pad);
            s.spawn(move || {
                for i in (p..N).step_by(4) {
                    rt.send("slow", &["--metadata", &format!(r#"{{"seq":{i},"pad":"{pad}"}}"#)]);
                }
            });
        }
    });
    let lines = rt.wait_lines("slow.jsonl", N);
    let mut seqs: Vec<i64> = lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..N as i64).collect::<Vec<_>>(), "every accepted kanban delivered exactly once");
    let s = rt.status();
    assert!(s["store"]["errors"].as_u64() > Some(0), "the store filled up: {}", s["store"]);
    assert!(s["store"]["last_error"].as_str().is_some_and(|e| e.contains("full")), "{}", s["store"]);
    assert!(rt.stderr().contains("store commit failed"), "logged");
}
