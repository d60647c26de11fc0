//! Instance lifecycle through the real runtime: lazy start, restarts, crash loops, jobs, shutdown, orphans.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{wait_until, Runtime};
use std::collections::BTreeSet;
use std::time::Duration;

fn seq_set(lines: &[serde_json::Value]) -> BTreeSet<i64> {
    lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect()
}

#[test]
fn lazy_start_on_first_kanban() {
    let mut rt = Runtime::start(
        r#"
microservices:
  lazy:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/lazy.jsonl" }
"#,
    );
    let i = rt.instance("lazy", 1);
    assert_eq!(i["state"], "idle");
    assert_eq!(i["pid"], 0);
    rt.send("lazy", &["--metadata", r#"{"seq":1}"#]);
    let l = rt.wait_lines("lazy.jsonl", 1);
    assert_eq!(l[0]["metadata"]["seq"], 1);
    assert_eq!(l[0]["from"], "aion-cli");
    let i = rt.instance("lazy", 1);
    assert_eq!(i["state"], "running");
    assert!(i["pid"].as_u64().unwrap_or(0) > 0);
    assert_eq!(rt.stop(), 0);
}

#[test]
fn seed_kanban_starts_a_service_without_input() {
    let mut rt = Runtime::start(
        r#"
microservices:
  seeded:
    command: ["{testkit}"]
    startup: yes
    scale: 2
    env: { SEED: 1, RECORD: "{work}/seed.jsonl" }
"#,
    );
    let mut l = rt.wait_lines("seed.jsonl", 2);
    l.sort_by_key(|x| x["instance"].as_i64());
    for (i, line) in l.iter().enumerate() {
        let n = i + 1;
        assert_eq!(line["instance"], n);
        assert_eq!(line["key"], "", "AION's seed kanban has an empty connection key");
        assert_eq!(line["process_number"], n);
        let dp = line["data_path"].as_str().expect("data path");
        assert!(dp.ends_with(&format!("Data/seeded_{n}")), "{dp}");
        assert!(std::path::Path::new(dp).is_dir());
    }
    assert_eq!(rt.stop(), 0);
}

#[test]
fn crash_in_handler_redelivers_and_loses_nothing() {
    let mut rt = Runtime::start(
        r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 300 }
    nextService: { default: [ { name: relay } ] }
  relay:
    command: ["{testkit}"]
    always: yes
    env: { FORWARD: 1, DIE_AT: 120 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#,
    );
    let s = rt.wait_status("relay restarted and drained", |s| {
        s["instances"].as_array().is_some_and(|a| {
            a.iter().any(|i| {
                i["service"] == "relay"
                    && i["restarts"].as_u64() >= Some(1)
                    && i["queue_depth"] == 0
                    && i["inflight"] == 0
                    && i["connected"] == true
            })
        })
    });
    let lines = rt.wait_lines("sink.jsonl", 300);
    assert_eq!(seq_set(&lines), (1..=300).collect(), "every kanban reached the sink\n{s}");
    let relay = rt.instance("relay", 1);
    assert!(relay["redelivered"].as_u64() >= Some(1), "the unacked kanban was redelivered: {relay}");
    assert!(relay["last_exit"].as_str().is_some_and(|e| e.contains("signal 6")), "{relay}");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn kill_9_of_an_always_instance_restarts_it_without_losing_kanbans() {
    let mut rt = Runtime::start(
        r#"
microservices:
  relay:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { FORWARD: 1, SLOW_MS: 2 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#,
    );
    let first_pid = rt.instance("relay", 1)["pid"].as_u64().expect("pid");
    for i in 1..=200 {
        rt.send("relay", &["--metadata", &format!(r#"{{"seq":{i}}}"#)]);
        if i == 50 {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(first_pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let lines = rt.wait_lines("sink.jsonl", 200);
    let got = seq_set(&lines);
    assert_eq!(got, (1..=200).collect(), "no kanban lost");
    let dups = lines.len() - got.len();
    let relay = rt.instance("relay", 1);
    assert!(relay["restarts"].as_u64() >= Some(1), "{relay}");
    assert_ne!(relay["pid"].as_u64(), Some(first_pid));
    assert!(relay["last_exit"].as_str().is_some_and(|e| e.contains("signal 9")), "{relay}");
    // Duplicates only from the window of kanbans in flight at the kill (at most the credit window).
    assert!(dups <= 256, "{dups} duplicates");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn crash_loop_is_reported_with_backoff() {
    let mut rt = Runtime::start(
        r#"
microservices:
  broken:
    command: ["{testkit}"]
    startup: yes
    always: yes
    env: { EXIT_CODE: 3 }
"#,
    );
    let s = rt.wait_status("crash-loop state", |s| s["instances"][0]["state"] == "crash-loop");
    let i = &s["instances"][0];
    assert!(i["restarts"].as_u64() >= Some(4), "{i}");
    assert_eq!(i["last_exit"], "exit code 3");
    let (ok, table, _) = rt.cli(&["status"]);
    assert!(ok && table.contains("crash-loop"), "{table}");
    assert!(rt.stderr().contains("crash loop"));
    assert_eq!(rt.stop(), 0);
}

#[test]
fn a_job_runs_again_when_later_kanbans_arrive() {
    let mut rt = Runtime::start(
        r#"
microservices:
  job:
    command: ["{testkit}"]
    always: no
    env: { ONESHOT: 1, RECORD: "{work}/job.jsonl" }
"#,
    );
    rt.send("job", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_lines("job.jsonl", 1);
    rt.wait_status("job completed", |s| s["instances"][0]["state"] == "completed");
    rt.send("job", &["--metadata", r#"{"seq":2}"#]);
    let l = rt.wait_lines("job.jsonl", 2);
    assert_eq!(seq_set(&l), [1, 2].into());
    let s = rt.wait_status("job completed again", |s| {
        s["instances"][0]["state"] == "completed" && s["instances"][0]["restarts"] == 1
    });
    assert_eq!(s["instances"][0]["last_exit"], "exit code 0");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn graceful_shutdown_leaves_no_orphans_and_exits_0() {
    let mut rt = Runtime::start(
        r#"
microservices:
  a:
    command: ["{testkit}"]
    startup: yes
    always: yes
    scale: 3
  b:
    command: ["{testkit}"]
    startup: yes
    always: yes
"#,
    );
    rt.wait_status("all connected", common::all_connected);
    assert_eq!(rt.live_children().len(), 4);
    assert_eq!(rt.stop(), 0);
    assert!(rt.live_children().is_empty(), "orphans: {:?}", rt.live_children());
    assert!(!rt.socket().exists(), "socket removed");
}

#[test]
fn stop_command_shuts_down_cleanly() {
    let mut rt = Runtime::start(
        r#"
microservices:
  a:
    command: ["{testkit}"]
    startup: yes
    always: yes
"#,
    );
    let (ok, out, _) = rt.cli(&["stop"]);
    assert!(ok, "{out}");
    let mut child = rt.child.take().expect("child");
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0));
    assert!(rt.live_children().is_empty());
    let (ok, _, err) = rt.cli(&["status"]);
    assert!(!ok && err.contains("no runtime is running"), "{err}");
}

#[test]
fn runtime_killed_with_9_is_cleaned_up_by_the_next_run() {
    let yaml = r#"
microservices:
  a:
    command: ["{testkit}"]
    startup: yes
    always: yes
    scale: 2
"#;
    let mut rt = Runtime::start(yaml);
    rt.wait_status("connected", common::all_connected);
    let old = rt.live_children();
    assert_eq!(old.len(), 2);
    rt.kill9();
    assert_eq!(rt.live_children(), old, "children survive a kill -9 of the runtime");
    let data = std::mem::replace(&mut rt.data, tempfile::tempdir().expect("tmp"));
    let work = std::mem::replace(&mut rt.work, tempfile::tempdir().expect("tmp"));
    let mut rt2 = Runtime::start_in(yaml, data, work);
    wait_until("old instances gone", Duration::from_secs(30), || {
        let live = rt2.live_children();
        old.iter().all(|p| !live.contains(p)).then_some(())
    });
    rt2.wait_status("new instances connected", common::all_connected);
    assert!(rt2.stderr().contains("orphan"));
    assert_eq!(rt2.stop(), 0);
    assert!(rt2.live_children().is_empty());
}

#[test]
fn a_second_runtime_on_the_same_data_dir_is_refused() {
    let rt = Runtime::start("microservices: {}\n");
    let file = rt.path("services.yml");
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(rt.data.path())
        .arg("run")
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
}
