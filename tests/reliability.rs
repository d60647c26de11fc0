//! Regression tests for the defects of the hostile review (`../shared/reference/review-reliability.md`): each test
//! names the defect it guards (D1…D25) and fails on the code before its fix.
mod common;
use common::{read_lines, wait_until, Runtime};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// `src > [b1, b2, …] > d`: every branch forwards every source kanban to `d`.
fn diamond(branches: usize, n: u64, d_env: &str) -> String {
    let names: Vec<String> = (1..=branches).map(|i| format!("b{i}")).collect();
    let targets: Vec<String> = names.iter().map(|b| format!("{{ name: {b} }}")).collect();
    let mut y = format!(
        r#"
microservices:
  src:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: {n}, CHUNK: {n} }}
    nextService: {{ default: [ {} ] }}
  d:
    command: ["{{testkit}}"]
    always: yes
    env: {{ RECORD: "{{work}}/d.jsonl", {d_env} }}
"#,
        targets.join(", ")
    );
    for b in &names {
        y += &format!(
            "  {b}:\n    command: [\"{{testkit}}\"]\n    always: yes\n    env: {{ FORWARD: 1 }}\n    nextService: {{ default: [ {{ name: d }} ] }}\n"
        );
    }
    y
}

/// (seq, branch) → how many times `d` recorded it, and the distinct kanban ids `d` saw.
fn diamond_arrivals(lines: &[serde_json::Value]) -> (BTreeMap<(i64, String), u64>, BTreeSet<String>) {
    let mut seen = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for l in lines {
        let seq = l["metadata"]["seq"].as_i64().expect("seq");
        let branch = l["metadata"]["hops"][0].as_str().expect("branch").to_owned();
        *seen.entry((seq, branch)).or_default() += 1;
        ids.insert(l["id"].as_str().expect("id").to_owned());
    }
    (seen, ids)
}

fn expected_pairs(branches: usize, n: u64) -> BTreeSet<(i64, String)> {
    (1..=n as i64).flat_map(|s| (1..=branches).map(move |b| (s, format!("b{b}-1")))).collect()
}

/// D1: in a diamond, the branches' outputs for one input are different kanbans with different ids, and all of
/// them arrive — in memory, and after a kill -9 of the runtime while they wait in the durable queue of `d`.
#[test]
fn fan_out_then_fan_in_delivers_every_branch_with_distinct_ids() {
    const N: u64 = 60;
    for branches in [2usize, 3] {
        // Without a crash.
        let rt = Runtime::start(&diamond(branches, N, "WINDOW: 64"));
        let lines = rt.wait_lines("d.jsonl", branches * N as usize);
        let (seen, ids) = diamond_arrivals(&lines);
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), expected_pairs(branches, N), "every (input, branch)");
        assert_eq!(ids.len(), seen.len(), "one distinct id per (input, branch)");
        drop(rt);

        // With a kill -9 while everything waits in d's durable queue (d holds one kanban and never acks it).
        let slow = diamond(branches, N, "SLOW_MS: 600000, WINDOW: 1");
        let mut rt = Runtime::start(&slow);
        let want_acks = branches as u64 * N; // every branch acknowledged its N inputs: their outputs are committed
        let s = rt.wait_status("branches done", |s| s["store"]["acked"].as_u64() >= Some(want_acks));
        let d = s["instances"].as_array().and_then(|a| a.iter().find(|i| i["service"] == "d")).cloned().expect("d");
        let queued = d["queue_depth"].as_u64().unwrap_or(0) + d["inflight"].as_u64().unwrap_or(0);
        assert_eq!(queued, branches as u64 * N, "d holds every branch's output: {d}");
        let rt2 = rt.crash_and_restart(&diamond(branches, N, "WINDOW: 64"));
        let want = expected_pairs(branches, N);
        let lines = wait_until("every (input, branch) at d after the crash", Duration::from_secs(60), || {
            let lines = read_lines(&rt2.path("d.jsonl"));
            let (seen, _) = diamond_arrivals(&lines);
            (seen.keys().cloned().collect::<BTreeSet<_>>() == want).then_some(lines)
        });
        let (seen, _) = diamond_arrivals(&lines);
        let dups: u64 = seen.values().map(|c| c - 1).sum();
        assert!(dups <= 1, "only the kanban d held in flight may come twice: {dups}");
    }
}
