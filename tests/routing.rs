//! Routing through the real runtime with real microservice processes.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::Runtime;
use serde_json::Value;
use std::collections::BTreeMap;

fn seqs(lines: &[Value]) -> Vec<i64> {
    lines.iter().map(|l| l["metadata"]["seq"].as_i64().expect("seq")).collect()
}

#[test]
fn three_stage_flow_delivers_every_kanban_in_order() {
    let mut rt = Runtime::start(&common::pipeline("EMIT_COUNT: 500", "", ""));
    let lines = rt.wait_lines("sink.jsonl", 500);
    assert_eq!(seqs(&lines), (1..=500).collect::<Vec<_>>(), "order kept along source > relay > sink");
    for l in &lines {
        assert_eq!(l["from"], "relay");
        assert_eq!(l["metadata"]["hops"], serde_json::json!(["relay-1"]));
    }
    let traces: std::collections::BTreeSet<&str> = lines.iter().map(|l| l["trace"].as_str().expect("trace")).collect();
    assert_eq!(traces.len(), 500, "each chain keeps its own trace id");
    let relay = rt.instance("relay", 1);
    assert_eq!(relay["kanbans_in"], 500);
    assert_eq!(relay["kanbans_out"], 500);
    assert_eq!(rt.stop(), 0);
}

#[test]
fn sdk_pipeline_example_flows_a_to_b_to_c() {
    let mut rt = Runtime::start(
        r#"
microservices:
  source:
    command: ["{source}"]
    startup: yes
    env: { COUNT: 50, INTERVAL_MS: 0 }
    nextService: { default: [ { name: transform } ] }
  transform:
    command: ["{transform}"]
    always: yes
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{sink}"]
    always: yes
    env: { SINK_FILE: "{work}/sink.jsonl" }
"#,
    );
    let lines = rt.wait_lines("sink.jsonl", 50);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["metadata"]["seq"], i as i64 + 1);
        assert_eq!(l["metadata"]["text"], format!("HELLO #{}", i + 1));
    }
    let s = rt.wait_status("source terminated", |s| {
        s["instances"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["service"] == "source" && i["state"] == "completed"))
    });
    let source = s["instances"].as_array().and_then(|a| a.iter().find(|i| i["service"] == "source")).cloned();
    assert_eq!(source.expect("source")["terminated"], true);
    assert!(rt.stderr().contains("terminate kanban received"));
    assert_eq!(rt.stop(), 0);
}

#[test]
fn fan_out_reaches_every_target() {
    let mut rt = Runtime::start(
        r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 100 }
    nextService: { default: [ { name: left }, { name: right } ] }
  left:
    command: ["{testkit}"]
    env: { RECORD: "{work}/left.jsonl" }
  right:
    command: ["{testkit}"]
    env: { RECORD: "{work}/right.jsonl" }
"#,
    );
    let l = rt.wait_lines("left.jsonl", 100);
    let r = rt.wait_lines("right.jsonl", 100);
    assert_eq!(seqs(&l), (1..=100).collect::<Vec<_>>());
    assert_eq!(seqs(&r), (1..=100).collect::<Vec<_>>());
    assert_eq!(l[0]["id"], r[0]["id"], "fan-out delivers the same kanban");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn connection_keys_default_fallback_and_no_route() {
    let mut rt = Runtime::start(
        r#"
microservices:
  relay:
    command: ["{testkit}"]
    always: yes
    env: { FORWARD: 1 }
    nextService:
      cars: [ { name: cars } ]
      default: [ { name: other } ]
  strict:
    command: ["{testkit}"]
    always: yes
    env: { FORWARD: 1 }
    nextService:
      cars: [ { name: cars } ]
  cars:
    command: ["{testkit}"]
    env: { RECORD: "{work}/cars.jsonl" }
  other:
    command: ["{testkit}"]
    env: { RECORD: "{work}/other.jsonl" }
"#,
    );
    for (i, route) in ["cars", "bikes", "cars", "trucks"].iter().enumerate() {
        rt.send("relay", &["--metadata", &format!(r#"{{"seq":{},"route":"{route}"}}"#, i + 1)]);
    }
    rt.send("strict", &["--metadata", r#"{"seq":9,"route":"bikes"}"#]);
    rt.send("strict", &["--metadata", r#"{"seq":10,"route":"cars"}"#]);
    let cars = rt.wait_lines("cars.jsonl", 3);
    let other = rt.wait_lines("other.jsonl", 2);
    assert_eq!(seqs(&cars), vec![1, 3, 10]);
    assert_eq!(seqs(&other), vec![2, 4]);
    let s = rt.wait_status("no-route dead letter", |s| s["dead_letters"]["no-route"] == 1);
    let dl = &s["recent_dead_letters"][0];
    assert_eq!(dl["reason"], "no-route");
    assert_eq!(dl["from"], "strict:1");
    assert_eq!(dl["connection_key"], "bikes");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn pattern_n_keeps_instance_affinity_and_stamps_the_target_instance() {
    let mut rt = Runtime::start(
        r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    scale: 3
    env: { EMIT_COUNT: 30 }
    nextService: { default: [ { name: relay } ] }
  relay:
    command: ["{testkit}"]
    scale: 3
    always: yes
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink, pattern: n }, { name: funnel, pattern: "0" } ] }
  sink:
    command: ["{testkit}"]
    scale: 3
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
  funnel:
    command: ["{testkit}"]
    scale: 3
    env: { RECORD: "{work}/funnel.jsonl" }
"#,
    );
    let lines = rt.wait_lines("sink.jsonl", 90);
    let mut per: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for l in &lines {
        let inst = l["instance"].as_i64().expect("instance");
        assert_eq!(l["metadata"]["origin_instance"], inst, "source-n > relay-n > sink-n");
        assert_eq!(l["process_number"], inst, "forwarded kanban carries the target instance");
        assert_eq!(l["metadata"]["hops"], serde_json::json!([format!("relay-{inst}")]));
        per.entry(inst).or_default().push(l["metadata"]["seq"].as_i64().expect("seq"));
    }
    for n in 1..=3 {
        assert_eq!(per[&n], (1..=30).collect::<Vec<_>>(), "per-instance order for instance {n}");
    }
    let funnel = rt.wait_lines("funnel.jsonl", 90);
    assert!(funnel.iter().all(|l| l["instance"] == 1), "pattern \"0\" funnels into instance 1");
    assert_eq!(rt.instance("funnel", 2)["state"], "idle");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn dead_letter_reasons_are_counted_and_visible() {
    let mut rt = Runtime::start(
        r#"
deviceName: here
devices:
  there: { addr: 192.0.2.1 }
microservices:
  a:
    command: ["{testkit}"]
    startup: yes
    scale: 2
    env: { EMIT_COUNT: 2 }
    nextService:
      default:
        - { name: ghost }
        - { name: remote, device: there }
        - { name: single }
        - { name: local, device: here }
  remote:
    command: ["{testkit}"]
  single:
    command: ["{testkit}"]
    env: { RECORD: "{work}/single.jsonl" }
  local:
    command: ["{testkit}"]
    env: { RECORD: "{work}/local.jsonl" }
"#,
    );
    // a-1 and a-2 emit 2 each: ghost ×4 unknown-service, remote ×4 no-federation, single gets a-1's 2 and
    // a-2's 2 are dead-lettered (single has only instance 1), local gets its 2 per instance... but scale 1.
    let s = rt.wait_status("all dead letters", |s| {
        s["dead_letters"]["unknown-service"] == 4
            && s["dead_letters"]["no-federation"] == 4
            && s["dead_letters"]["no-such-instance"] == 4
    });
    assert_eq!(rt.wait_lines("single.jsonl", 2).len(), 2);
    assert_eq!(rt.wait_lines("local.jsonl", 2).len(), 2, "a device naming this device is local");
    assert_eq!(rt.instance("remote", 1)["kanbans_in"], 0, "remote targets are never delivered locally");
    let reasons: Vec<&str> =
        s["recent_dead_letters"].as_array().expect("recent").iter().filter_map(|d| d["reason"].as_str()).collect();
    assert!(reasons.contains(&"no-federation") && reasons.contains(&"unknown-service"));
    let (ok, table, _) = rt.cli(&["status"]);
    assert!(ok && table.contains("no-federation=4"), "{table}");
    assert!(rt.stderr().contains("dead letter"));
    assert_eq!(rt.stop(), 0);
}

#[test]
fn static_kanbans_put_get_delete_subscribe() {
    let mut rt = Runtime::start(
        r#"
microservices:
  st:
    command: ["{testkit}"]
    startup: yes
    env: { STATICS: 1, RECORD: "{work}/st.jsonl" }
"#,
    );
    let l = rt.wait_lines("st.jsonl", 1);
    assert_eq!(l[0]["statics"], serde_json::json!({"deleted": true, "listed": 1, "subscribed_first": {"v": "second"}}));
    assert_eq!(rt.stop(), 0);
}
