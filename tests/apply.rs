//! `aion apply` and `aion delete` on a running runtime: only what changed is touched.
// A test fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{fill, read_lines, wait_until, Runtime};
use std::time::Duration;

fn yaml(services: &str) -> String {
    format!("microservices:\n{services}")
}

const KEEP: &str = r#"  keep:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { X: "1" }
"#;
const RELAY_TO_SINK: &str = r#"  relay:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;

fn pid(rt: &Runtime, service: &str) -> u64 {
    rt.instance(service, 1)["pid"].as_u64().unwrap_or(0)
}

fn write(rt: &Runtime, name: &str, text: &str) -> String {
    let p = rt.path(name);
    std::fs::write(&p, fill(text, rt.work.path())).expect("write");
    p.display().to_string()
}

#[test]
fn apply_starts_restarts_and_stops_only_what_changed() {
    let rt = Runtime::start(&yaml(&format!("{KEEP}{RELAY_TO_SINK}")));
    rt.wait_status("every instance running", common::all_connected);
    let (keep, relay, sink) = (pid(&rt, "keep"), pid(&rt, "relay"), pid(&rt, "sink"));
    rt.send("relay", &["--metadata", r#"{"seq": 1}"#]);
    wait_until("the first kanban at the sink", Duration::from_secs(20), || {
        (read_lines(&rt.path("sink.jsonl")).len() == 1).then_some(())
    });

    // relay now routes to a new service, sink2; sink is removed; keep is untouched.
    let next = format!(
        "{KEEP}{}",
        r#"  relay:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink2 } ] }
  sink2:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { RECORD: "{work}/sink2.jsonl" }
"#
    );
    let file = write(&rt, "next.yml", &yaml(&next));
    let (ok, out, err) = rt.cli(&["apply", &file]);
    assert!(ok, "{err}");
    assert!(
        out.contains("added: sink2") && out.contains("changed (restarted): relay") && out.contains("removed: sink"),
        "{out}"
    );
    let st = rt.wait_status("relay restarted, sink2 running, sink gone", |s| {
        let names: Vec<&str> =
            s["instances"].as_array().unwrap().iter().filter_map(|i| i["service"].as_str()).collect();
        !names.contains(&"sink")
            && names.contains(&"sink2")
            && s["instances"].as_array().unwrap().iter().all(|i| i["state"] == "running" && i["connected"] == true)
    });
    assert_eq!(pid(&rt, "keep"), keep, "an unchanged service is not restarted: {st}");
    assert_ne!(pid(&rt, "relay"), relay, "a changed service is restarted");
    assert!(!common::processes_with_env(&format!("AION_SOCKET={}", rt.socket().display())).contains(&(sink as u32)));
    rt.send("relay", &["--metadata", r#"{"seq": 2}"#]);
    let got = wait_until("the kanban at the new sink", Duration::from_secs(20), || {
        let l = read_lines(&rt.path("sink2.jsonl"));
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(got[0]["metadata"]["seq"], 2);

    // Applying the same file again changes nothing.
    let (ok, out, _) = rt.cli(&["apply", &file]);
    assert!(
        ok && out.contains("added: -") && out.contains("changed (restarted): -") && out.contains("removed: -"),
        "{out}"
    );
    assert_eq!(pid(&rt, "keep"), keep);

    // A broken file is refused with its position; nothing changes.
    let bad = write(&rt, "bad.yml", "microservices:\n  x:\n    scale: many\n");
    let (ok, _, err) = rt.cli(&["apply", &bad]);
    assert!(!ok && err.contains("bad.yml:3:"), "{err}");
    assert_eq!(pid(&rt, "keep"), keep);

    // delete removes every service.
    let (ok, out, err) = rt.cli(&["delete"]);
    assert!(ok, "{err}");
    assert!(out.contains("removed: keep relay sink2"), "{out}");
    rt.wait_status("no instance left", |s| s["instances"].as_array().is_some_and(|a| a.is_empty()));
}

#[test]
fn a_changed_scale_adds_and_retires_instances() {
    let one = r#"  w:
    command: ["{testkit}"]
    always: yes
    startup: yes
    scale: 2
"#;
    let rt = Runtime::start(&yaml(one));
    rt.wait_status("two instances", |s| common::all_connected(s) && s["instances"].as_array().unwrap().len() == 2);
    let three = write(&rt, "three.yml", &yaml(&one.replace("scale: 2", "scale: 3")));
    let (ok, _, err) = rt.cli(&["apply", &three]);
    assert!(ok, "{err}");
    rt.wait_status("three instances running", |s| {
        s["instances"].as_array().unwrap().len() == 3 && common::all_connected(s)
    });
    let single = write(&rt, "one.yml", &yaml(&one.replace("scale: 2", "scale: 1")));
    let (ok, _, err) = rt.cli(&["apply", &single]);
    assert!(ok, "{err}");
    rt.wait_status("one instance", |s| s["instances"].as_array().unwrap().len() == 1 && common::all_connected(s));
}
