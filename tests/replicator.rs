//! The kanban replicator (`aion run --archive`): every hop archived (queued or dead-lettered, then acknowledged), readable with
//! `aion kanban log` and `aion kanban trace`, also after the runtime stopped.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{json_lines, Runtime};
use serde_json::Value;

#[test]
fn every_hop_is_archived_and_traceable() {
    let mut rt = Runtime::start_with_args(
        r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 20 }
    nextService: { default: [ { name: relay } ] }
  relay:
    command: ["{testkit}"]
    always: yes
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink } ], loud: [ { name: quiet } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl", FORWARD: 1 }
  quiet:
    command: ["{testkit}"]
    withoutKanban: yes
    env: { RECORD: "{work}/quiet.jsonl" }
"#,
        &["--archive"],
    );
    let sink = rt.wait_lines("sink.jsonl", 20);
    // sink forwards but has no nextService: 20 dead letters `no-route`, archived too.
    rt.send("relay", &["--metadata", r#"{"route":"loud"}"#]);
    rt.wait_lines("quiet.jsonl", 1);
    let rows = common::wait_until("archive complete", std::time::Duration::from_secs(60), || {
        let (ok, out, _) = rt.cli(&["kanban", "log", "--json", "--limit", "1000"]);
        let rows = if ok { json_lines(&out) } else { Vec::new() };
        let acked = rows.iter().filter(|r| r["outcome"] == "queued" && !r["acked_at"].is_null()).count();
        let dead = rows.iter().filter(|r| r["outcome"] == "no-route").count();
        (acked >= 40 && dead >= 20).then_some(rows)
    });
    let queued: Vec<&Value> = rows.iter().filter(|r| r["outcome"] == "queued").collect();
    assert!(queued.iter().all(|r| r["to"] != "quiet-1" && r["from"] != "quiet-1"), "withoutKanban skips archiving");
    assert!(queued.iter().any(|r| r["from"] == "aion-cli-0" && r["to"] == "relay-1"), "injected kanbans too");
    let src: Vec<&&Value> = queued.iter().filter(|r| r["from"] == "source-1").collect();
    assert_eq!(src.len(), 20);
    assert!(src.iter().all(|r| r["to"] == "relay-1" && r["latency_ms"].as_i64() >= Some(0)));

    // Trace one chain: source-1 > relay-1 > sink-1 > (dead letter), by the trace id the sink saw.
    let trace = sink[7]["trace"].as_str().expect("trace id");
    let (ok, out, err) = rt.cli(&["kanban", "trace", trace, "--json"]);
    assert!(ok, "{err}");
    let hops = json_lines(&out);
    let path: Vec<(String, String)> = hops
        .iter()
        .map(|h| (h["from"].as_str().unwrap_or("").to_owned(), h["to"].as_str().unwrap_or("-").to_owned()))
        .collect();
    assert_eq!(
        path,
        vec![("source-1".into(), "relay-1".into()), ("relay-1".into(), "sink-1".into()), ("sink-1".into(), "-".into())]
    );
    assert_eq!(hops[2]["outcome"], "no-route");
    assert_eq!(hops[0]["metadata"]["seq"], sink[7]["metadata"]["seq"]);
    let (ok, table, _) = rt.cli(&["kanban", "trace", trace]);
    assert!(ok && table.contains("3 hops"), "{table}");

    let (ok, out, _) = rt.cli(&["kanban", "log", "--json", "--service", "sink", "--since", "1h", "--limit", "1000"]);
    assert!(ok);
    let sink_rows = json_lines(&out);
    assert_eq!(sink_rows.len(), 40, "20 queued for sink + 20 dead letters from sink");
    let s = rt.status();
    // 20 source>relay + 20 relay>sink + 1 injected + 20 dead letters; the hop to `quiet` is not archived.
    assert_eq!(s["store"]["archived"], 61, "{}", s["store"]);
    assert_eq!(s["store"]["archive_dropped"], 0);
    assert_eq!(rt.stop(), 0);
    // The archive is still readable with the runtime stopped.
    let (ok, out, _) = rt.cli(&["kanban", "log", "--limit", "5"]);
    assert!(ok && out.lines().count() == 6, "{out}");
    let (ok, _, err) = rt.cli(&["kanban", "trace", "ffffffffffffffffffffffffffffffff"]);
    assert!(!ok && err.contains("no archived hop"), "{err}");
    let (ok, _, err) = rt.cli(&["kanban", "log", "--since", "last tuesday"]);
    assert!(!ok && err.contains("--since"), "{err}");
}
