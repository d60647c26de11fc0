//! Regression tests for the defects of the hostile review (`../shared/reference/review-reliability.md`): each test
//! names the defect it guards (D1…D25) and fails on the code before its fix.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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

/// D2 (SDK side): an output too large to be delivered is refused by `ctx.emit` with a clear error, and nothing
/// else is held up: the outputs before and after it arrive.
#[test]
fn an_output_too_large_to_deliver_is_refused_to_the_producer() {
    let yaml = r#"
deviceName: demo-device
microservices:
  src:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 3, PAD: 16777090, PAD_SEQ: 2, RECORD: "{work}/src.jsonl" }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;
    let mut rt = Runtime::start(yaml);
    let sink = rt.wait_lines("sink.jsonl", 2);
    let seqs: BTreeSet<i64> = sink.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
    assert_eq!(seqs, BTreeSet::from([1, 3]));
    let src = rt.wait_lines("src.jsonl", 1);
    let err = src[0]["emit_error"].as_str().unwrap_or_default();
    assert!(err.contains("too large") && err.contains("limit"), "{err}");
    assert_eq!(src[0]["seq"], 2);
    let s = rt.status();
    assert_eq!(
        s["instances"].as_array().map(|a| a.iter().map(|i| i["redelivered"].as_u64().unwrap_or(0)).sum::<u64>()),
        Some(0)
    );
    assert_eq!(rt.stop(), 0);
}

const POISON_YAML: &str = r#"
deviceName: demo-device
microservices:
  relay:
    command: ["{testkit}"]
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;

/// D2 (runtime side): a client that is not the SDK sends an output that fits a frame but not a delivery: it is
/// dead-lettered `too-large` (counted as handled, so the client moves on) and the next output flows.
#[test]
fn an_oversized_output_from_a_raw_client_is_dead_lettered_and_the_flow_goes_on() {
    use aion::runtime::{Kanban, KanbanId};
    use aion::transport::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
    use common::raw::{converse, frames, hello};
    let mut rt = Runtime::start(POISON_YAML);
    let big = Kanban {
        id: KanbanId::generate(),
        metadata: aion::runtime::kanban::metadata_from_json(serde_json::json!({"pad": "p".repeat(16_777_000)})),
        ..Kanban::default()
    };
    let small = Kanban {
        id: KanbanId::generate(),
        metadata: aion::runtime::kanban::metadata_from_json(serde_json::json!({"seq": 7})),
        ..Kanban::default()
    };
    let raw = frames(&[
        hello("relay", 1, PROTOCOL_VERSION),
        ClientMsg::Output(Box::new(big.into_wire())),
        ClientMsg::Output(Box::new(small.into_wire())),
        ClientMsg::Bye,
    ]);
    let msgs = converse(&rt, &raw);
    let accepted: u32 = msgs.iter().map(|m| if let ServerMsg::Accepted { count } = m { *count } else { 0 }).sum();
    assert_eq!(accepted, 2, "both outputs answered: {msgs:?}");
    assert_eq!(rt.wait_lines("sink.jsonl", 1)[0]["metadata"]["seq"], 7);
    let s = rt.wait_status("dead letter", |s| s["dead_letters"]["too-large"] == 1);
    assert!(s["recent_dead_letters"][0]["detail"].as_str().is_some_and(|d| d.contains("limit")), "{s}");
    assert_eq!(rt.stop(), 0);
}

/// D2 (already stored): a kanban in the durable queue that cannot be delivered (written by an earlier build
/// before the size check) is dead-lettered `too-large` and removed, instead of being redelivered forever; the
/// kanbans behind it are delivered.
#[test]
fn an_undeliverable_stored_kanban_is_dead_lettered_and_the_queue_moves_on() {
    use aion::runtime::{Kanban, KanbanId};
    let mut rt = Runtime::start(POISON_YAML);
    assert_eq!(rt.stop(), 0);
    let db = rusqlite::Connection::open(rt.data.path().join("aion.db")).expect("open aion.db");
    let put = |k: Kanban| {
        let w = k.into_wire();
        let bytes = postcard::to_stdvec(&w).expect("encode");
        db.execute(
            "INSERT INTO queue (service, instance, id, kanban) VALUES ('sink', 1, ?1, ?2)",
            rusqlite::params![&w.id.0.to_be_bytes()[..], bytes],
        )
        .expect("insert");
    };
    let md = |j: serde_json::Value| aion::runtime::kanban::metadata_from_json(j);
    // Fits the 16 MiB frame limit by itself, but not once stamped and wrapped in a delivery.
    put(Kanban {
        id: KanbanId::generate(),
        metadata: md(serde_json::json!({"pad": "p".repeat(16_777_190)})),
        ..Kanban::default()
    });
    put(Kanban { id: KanbanId::generate(), metadata: md(serde_json::json!({"seq": 2})), ..Kanban::default() });
    drop(db);
    // An earlier build kept no state file (and this one would rightly refuse a store changed behind its back).
    std::fs::remove_file(rt.data.path().join("aion.db.state")).expect("state file");
    let mut rt = rt.crash_and_restart(POISON_YAML);
    assert_eq!(rt.wait_lines("sink.jsonl", 1)[0]["metadata"]["seq"], 2);
    let s = rt.wait_status("dead letter", |s| s["dead_letters"]["too-large"] == 1);
    assert_eq!(s["instances"][1]["redelivered"], 0, "never redelivered: {s}");
    // It was removed from the store: the next run has nothing left to deliver.
    let rt2 = rt.crash_and_restart(POISON_YAML);
    let s = rt2.status();
    assert_eq!(s["instances"][1]["queue_depth"], 0, "{s}");
    assert!(!rt2.stderr().contains("recovered queued kanbans"), "{}", rt2.stderr());
}

/// Starts `aion run` on `yaml` (placeholders as [`Runtime::start`]) with stderr going to `stderr`; returns once the
/// control socket answers. The caller owns the child.
fn spawn_with_stderr(
    yaml: &str,
    stderr: std::process::Stdio,
) -> (std::process::Child, tempfile::TempDir, tempfile::TempDir) {
    let (data, work) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let yaml =
        yaml.replace("{testkit}", &common::example("testkit")).replace("{work}", &work.path().display().to_string());
    let file = work.path().join("services.yml");
    std::fs::write(&file, yaml).expect("write");
    let child = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(data.path())
        .arg("run")
        .arg(&file)
        .env("RUST_LOG", "info")
        .env_remove("AION_HOME")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn aion");
    wait_until("control socket", Duration::from_secs(30), || cli(data.path(), &["status", "--json"]).ok());
    (child, data, work)
}

/// Runs the CLI against `data`; the parsed JSON of stdout, or the error text.
fn cli(data: &std::path::Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("AION_HOME")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout)
        .or_else(|_| Ok(serde_json::Value::String(String::from_utf8_lossy(&out.stdout).into())))
}

fn instance_of<'a>(s: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    s["instances"].as_array().and_then(|a| a.iter().find(|i| i["service"] == service)).expect("instance")
}

/// Kills `service`'s process `times` times, each time waiting until the broker restarted it: a dead broker would
/// never do so.
fn kill_and_see_restarts(data: &std::path::Path, service: &str, times: u64) {
    for _ in 0..times {
        let s = cli(data, &["status", "--json"]).expect("status");
        let (pid, restarts) = (
            instance_of(&s, service)["pid"].as_u64().unwrap_or(0),
            instance_of(&s, service)["restarts"].as_u64().unwrap_or(0),
        );
        assert!(pid > 0, "{service} runs: {s}");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        wait_until(&format!("{service} restarted"), Duration::from_secs(30), || {
            let s = cli(data, &["status", "--json"]).ok()?;
            let i = instance_of(&s, service);
            (i["restarts"].as_u64() > Some(restarts) && i["connected"] == true).then_some(())
        });
    }
}

const LOGGING_YAML: &str = r#"
microservices:
  src:
    command: ["{testkit}"]
    always: yes
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    startup: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;

/// Checks a runtime whose log cannot be written: the broker restarts killed services, durable kanbans are
/// committed and delivered, the failed log writes are counted, and a stop is clean.
fn survives_an_unwritable_log(mut child: std::process::Child, data: &std::path::Path, work: &std::path::Path) {
    kill_and_see_restarts(data, "sink", 3);
    cli(data, &["kanban", "send", "src", "--metadata", r#"{"seq":1}"#]).expect("send (durable: waits for the commit)");
    cli(data, &["kanban", "send", "sink", "--metadata", r#"{"seq":2}"#]).expect("send");
    wait_until("both kanbans at the sink", Duration::from_secs(30), || {
        (read_lines(&work.join("sink.jsonl")).len() >= 2).then_some(())
    });
    let s = cli(data, &["status", "--json"]).expect("status");
    assert!(
        s["log"]["write_errors"].as_u64() > Some(0) || s["log"]["dropped"].as_u64() > Some(0),
        "counted: {}",
        s["log"]
    );
    assert!(s["store"]["errors"] == 0, "the store writer works: {}", s["store"]);
    cli(data, &["stop"]).expect("stop");
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0), "clean stop: {st:?}");
    let sock = format!("AION_SOCKET={}", data.join("run/aion.sock").display());
    assert!(common::processes_with_env(&sock).is_empty(), "no process left behind");
}

/// D3 (a): the runtime's stderr is a pipe whose reader goes away: logging fails, the runtime does not.
#[test]
fn a_closed_log_pipe_does_not_take_the_runtime_down() {
    let (mut child, data, work) = spawn_with_stderr(LOGGING_YAML, std::process::Stdio::piped());
    drop(child.stderr.take()); // the reader exits
    survives_an_unwritable_log(child, data.path(), work.path());
}

/// D3 (b): the runtime's stderr is on a full disk (`/dev/full`: every write fails with ENOSPC).
#[test]
fn a_full_disk_under_the_log_does_not_take_the_runtime_down() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let (child, data, work) = spawn_with_stderr(LOGGING_YAML, full.into());
    survives_an_unwritable_log(child, data.path(), work.path());
}

/// D3: no ANSI colour codes in a log that is not a terminal.
#[test]
fn the_log_has_no_colour_codes_when_not_a_terminal() {
    let mut rt = Runtime::start(LOGGING_YAML);
    rt.send("sink", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_lines("sink.jsonl", 1);
    assert_eq!(rt.stop(), 0);
    let log = rt.stderr();
    assert!(log.contains("runtime started") && log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a piped log: {log:?}");
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// D5: a service that writes a huge line (no newline for 200 MB: progress bars, base64 dumps) costs the runtime a
/// bounded buffer, the line is split, and the log files stay within their cap.
#[test]
fn a_huge_output_line_is_split_and_memory_stays_bounded() {
    let yaml = r#"
microservices:
  noline:
    command: ["sh", "-c", "head -c 200000000 /dev/zero | tr '\\0' 'y'; echo; echo all-written; exec sleep 1000"]
    startup: yes
"#;
    let mut rt = Runtime::start(yaml);
    let log = rt.data.path().join("logs/noline_1.log");
    wait_until("the whole output in the log", Duration::from_secs(120), || {
        std::fs::read(&log).ok().filter(|b| b.ends_with(b"all-written\n")).map(|_| ())
    });
    let peak = peak_rss(rt.pid());
    assert!(peak < 150 << 20, "runtime peak RSS {} MiB for a 200 MB line", peak >> 20);
    let cap = 10u64 << 20;
    for f in [log.clone(), rt.data.path().join("logs/noline_1.log.1")] {
        let bytes = std::fs::read(&f).expect("log file");
        assert!(bytes.len() as u64 <= cap, "{} is {} bytes, over the {cap}-byte cap", f.display(), bytes.len());
        let longest = bytes.split(|b| *b == b'\n').map(<[u8]>::len).max().unwrap_or(0);
        assert!(longest <= 64 << 10, "{}: a line of {longest} bytes", f.display());
    }
    assert_eq!(rt.stop(), 0);
}

/// D6: two `aion run` started together on one data dir: exactly one runs, reachable, with its sockets; the other
/// exits 1 saying which runtime owns the directory — every time.
#[test]
fn two_runtimes_started_together_on_one_data_dir_never_both_run() {
    let yaml = "microservices:\n  one:\n    command: [\"{testkit}\"]\n    startup: yes\n    always: yes\n";
    for trial in 0..8 {
        let (data, work) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        let file = work.path().join("s.yml");
        std::fs::write(&file, yaml.replace("{testkit}", &common::example("testkit"))).expect("write");
        let spawn = || {
            std::process::Command::new(common::AION)
                .arg("--data-dir")
                .arg(data.path())
                .arg("run")
                .arg(&file)
                .env_remove("AION_HOME")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (mut a, mut b) = (spawn(), spawn());
        // One of them must exit; wait for it.
        let (loser, mut winner) = wait_until("one of the two to give up", Duration::from_secs(30), || {
            if a.try_wait().ok().flatten().is_some() {
                return Some((std::mem::replace(&mut a, spawn_dummy()), std::mem::replace(&mut b, spawn_dummy())));
            }
            if b.try_wait().ok().flatten().is_some() {
                return Some((std::mem::replace(&mut b, spawn_dummy()), std::mem::replace(&mut a, spawn_dummy())));
            }
            None
        });
        let out = loser.wait_with_output().expect("loser");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "trial {trial}: {msg}");
        assert!(
            msg.contains("already running") && msg.contains(&format!("pid {}", winner.id())),
            "trial {trial}: {msg}"
        );
        // The winner runs, reachable, and its service connects.
        let s = wait_until("the winner's service connected", Duration::from_secs(30), || {
            let s = cli(data.path(), &["status", "--json"]).ok()?;
            (s["instances"][0]["connected"] == true).then_some(s)
        });
        assert_eq!(s["pid"], winner.id(), "trial {trial}");
        cli(data.path(), &["stop"]).expect("stop");
        assert_eq!(winner.wait().expect("winner").code(), Some(0));
        for mut d in [a, b] {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// A placeholder child (already exited) to move real ones out of a closure.
fn spawn_dummy() -> std::process::Child {
    let mut c = std::process::Command::new("true").spawn().expect("true");
    let _ = c.wait();
    c
}

fn total_in(s: &serde_json::Value) -> u64 {
    s["instances"].as_array().map_or(0, |a| a.iter().map(|i| i["kanbans_in"].as_u64().unwrap_or(0)).sum())
}

/// D8: a kanban going round a cycle is dead-lettered `hop-limit` once it has made `--hop-limit` hops, and the
/// cycle goes quiet; a self-loop with fan-out too.
#[test]
fn routing_cycles_end_at_the_hop_limit() {
    let cycle = r#"
microservices:
  a: { command: ["{testkit}"], always: yes, env: { FORWARD: 1 }, nextService: { default: [ { name: b } ] } }
  b: { command: ["{testkit}"], always: yes, env: { FORWARD: 1 }, nextService: { default: [ { name: a } ] } }
"#;
    let mut rt = Runtime::start_with_args(cycle, &["--hop-limit", "10"]);
    assert!(rt.stderr().contains("routing cycle a > b > a"), "run warns too: {}", rt.stderr());
    rt.send("a", &["--metadata", r#"{"x":1}"#]);
    rt.wait_status("hop-limit dead letter", |s| s["dead_letters"]["hop-limit"] == 1);
    // The injected kanban and its 10 forwarded successors were delivered; the 11th hop was refused.
    let s = rt.wait_status("every delivery acknowledged", |s| {
        s["instances"].as_array().is_some_and(|a| a.iter().all(|i| i["inflight"] == 0 && i["queue_depth"] == 0))
    });
    assert_eq!(total_in(&s), 11, "{s}");
    assert!(s["recent_dead_letters"][0]["detail"].as_str().is_some_and(|d| d.contains("10 hops")), "{s}");
    assert_eq!(rt.stop(), 0);

    let fan = r#"
microservices:
  s: { command: ["{testkit}"], always: yes, env: { FORWARD: 1 }, nextService: { default: [ { name: s }, { name: s } ] } }
"#;
    let mut rt = Runtime::start_with_args(fan, &["--hop-limit", "6"]);
    rt.send("s", &["--metadata", r#"{"x":1}"#]);
    // 64 kanbans reach the limit; each of their outputs is refused once (before it is copied).
    rt.wait_status("every chain ended", |s| s["dead_letters"]["hop-limit"] == 64);
    let s = rt.wait_status("quiet", |s| s["instances"][0]["inflight"] == 0 && s["instances"][0]["queue_depth"] == 0);
    assert_eq!(total_in(&s), 127, "1 + 2 + 4 + … + 64 deliveries: {s}");
    assert_eq!(s["dead_letters"]["hop-limit"], 64);
    assert_eq!(rt.stop(), 0);
}

/// D7: queue memory is bounded in bytes, and a restart pages a large backlog in from the store instead of loading
/// it whole: the instance's queue holds at most its bound in memory, while its depth counts the whole backlog,
/// which is then delivered in order, nothing lost.
#[test]
fn a_large_backlog_is_paged_in_from_the_store_within_the_memory_bound() {
    const N: u64 = 200;
    let yaml = |sink_env: &str| {
        format!(
            r#"
microservices:
  src:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: {N}, CHUNK: {N}, PAD: 100000 }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{{testkit}}"]
    always: yes
    env: {{ RECORD: "{{work}}/sink.jsonl", {sink_env} }}
"#
        )
    };
    let slow = yaml("SLOW_MS: 600000, WINDOW: 1");
    // 200 × 100 KB queued for a sink that holds one and never acknowledges it.
    let mut rt = Runtime::start_with_args(&slow, &["--queue-max-mb", "64"]);
    let progress = rt.data.path().join("Data/src_1/progress");
    wait_until("every kanban committed", Duration::from_secs(60), || {
        (std::fs::read_to_string(&progress).ok()?.trim() == N.to_string()).then_some(())
    });
    // Restarted with a 2 MiB bound: the backlog stays in the store, paged in as there is room.
    let rt2 = rt.crash_and_restart_with(&slow, &["--queue-max-mb", "2"]);
    let s = rt2.wait_status("sink connected", |s| instance_of(s, "sink")["connected"] == true);
    let sink = instance_of(&s, "sink");
    let held = sink["queue_depth"].as_u64().unwrap_or(0) + sink["inflight"].as_u64().unwrap_or(0);
    assert_eq!(held, N, "the depth counts the whole backlog: {sink}");
    let bytes = sink["queue_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(bytes <= (2 << 20) + 110_000, "at most the bound (plus one kanban) in memory: {bytes}");
    assert!(
        peak_rss(rt2.pid()) < 64 << 20,
        "the runtime never loaded the 20 MB backlog: {} MiB",
        peak_rss(rt2.pid()) >> 20
    );
    // A fast sink: everything arrives, in order.
    let mut rt3 = {
        let mut rt2 = rt2;
        rt2.crash_and_restart_with(&yaml(""), &["--queue-max-mb", "2"])
    };
    let lines = rt3.wait_lines("sink.jsonl", N as usize);
    let seqs: Vec<i64> = lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
    let mut dedup = seqs.clone();
    dedup.dedup();
    assert_eq!(dedup, (1..=N as i64).collect::<Vec<_>>(), "every kanban, in order");
    assert_eq!(rt3.stop(), 0);
}

/// D15: SIGHUP (a closed terminal, a dropped SSH session) is a graceful stop: exit 0, no process left behind,
/// sockets removed.
#[test]
fn sighup_stops_the_runtime_gracefully() {
    // Under `nohup` (SIGHUP ignored by the test's own process, and so by the runtime it starts) the runtime keeps
    // ignoring it, by design (`sighup_is_ignored_under_nohup`): nothing to test here then.
    let ignored = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("SigIgn:")).map(str::to_owned))
        .and_then(|l| u64::from_str_radix(l.trim_start_matches("SigIgn:").trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0);
    if ignored {
        eprintln!("SKIPPED: SIGHUP is ignored in this test process (started under nohup), so it is in the runtime too");
        return;
    }
    let mut rt = Runtime::start(LOGGING_YAML);
    rt.wait_status("sink connected", |s| instance_of(s, "sink")["connected"] == true);
    let mut child = rt.child.take().expect("running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGHUP)
        .expect("hup");
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0), "{st:?}\n{}", rt.stderr());
    assert!(rt.stderr().contains("runtime stopped"), "{}", rt.stderr());
    assert!(rt.live_children().is_empty(), "no process left behind");
    assert!(!rt.socket().exists(), "sockets removed");
}

/// D13: a graceful stop while the pipeline is under back-pressure (the relay blocked on the slow sink's full
/// queue, the source in the middle of emitting) ends without SIGKILL, and nothing is lost: after a restart every
/// kanban arrives.
#[test]
fn a_graceful_stop_under_back_pressure_needs_no_sigkill() {
    const N: u64 = 10_000;
    let yaml = common::pipeline(&format!("EMIT_COUNT: {N}, CHUNK: 1000"), "", "SLOW_MS: 2");
    let mut rt = Runtime::start_with_args(&yaml, &["--grace", "60"]);
    // Under back-pressure: the sink's queue is full and the relay waits on it.
    rt.wait_status("the sink's queue full", |s| instance_of(s, "sink")["queue_depth"].as_u64() >= Some(1000));
    let pid = rt.pid();
    let code = rt.stop();
    assert_eq!(code, 0, "{}", rt.stderr());
    let log = rt.stderr();
    assert!(!log.contains("SIGKILL"), "every instance stopped on SIGTERM (pid {pid}):\n{log}");
    let mut rt2 = rt.crash_and_restart(&common::pipeline(&format!("EMIT_COUNT: {N}, CHUNK: 1000"), "", ""));
    common::every_seq_at_sink(&rt2.path("sink.jsonl"), N, Duration::from_secs(120));
    assert_eq!(rt2.stop(), 0);
}

/// D9: a stop while the store cannot commit (full) ends anyway — nothing acknowledged is at stake — saying so;
/// and a second signal during a stop ends it at once.
#[test]
fn a_stop_with_a_full_store_ends() {
    stop_with_a_full_store(false);
    stop_with_a_full_store(true);
}

fn stop_with_a_full_store(second_signal: bool) {
    let yaml = r#"
microservices:
  slow:
    command: ["{testkit}"]
    always: yes
    env: { SLOW_MS: 600000, WINDOW: 1 }
"#;
    let rt = Runtime::start_with_args(yaml, &["--store-max-mb", "1", "--grace", "2"]);
    let pad = "x".repeat(64 * 1024);
    // Fill the store from a background sender: its last sends wait for a commit that cannot happen.
    let data = rt.data.path().to_owned();
    let sender = std::thread::spawn(move || {
        for i in 0..40 {
            let _ = cli(&data, &["kanban", "send", "slow", "--metadata", &format!(r#"{{"seq":{i},"pad":"{pad}"}}"#)]);
        }
    });
    rt.wait_status("the store full", |s| s["store"]["errors"].as_u64() > Some(0));
    // D18: the table says so too, not only --json.
    let (ok, table, err) = rt.cli(&["status"]);
    assert!(ok, "{err}");
    assert!(table.contains("store errors") && table.contains("full"), "{table}");
    let mut rt = rt;
    let mut child = rt.child.take().expect("running");
    cli(rt.data.path(), &["stop"]).expect("stop requested");
    if second_signal {
        wait_until("the stop under way", Duration::from_secs(30), || {
            rt.stderr().contains("shutting down").then_some(())
        });
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .expect("int");
    }
    let st = wait_until("the runtime to exit", Duration::from_secs(60), || child.try_wait().ok().flatten());
    let log = rt.stderr();
    let why = if second_signal { "a second signal ended the stop" } else { "could not commit" };
    assert!(log.contains(why), "it says why it stopped as it did:\n{log}");
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(rt.live_children().is_empty(), "no process left behind");
    let _ = sender.join();
}

fn control_connect(data: &std::path::Path) -> std::os::unix::net::UnixStream {
    std::os::unix::net::UnixStream::connect(data.join("run/control.sock")).expect("connect control.sock")
}

/// D11 (a): clients that send half a request and hold the connection are cut off (read timeout, connection cap);
/// meanwhile `aion status` gets an answer or a clear "busy", never a hang, and works again afterwards.
#[test]
fn stuck_control_clients_cannot_starve_the_control_socket() {
    use std::io::{Read, Write};
    let rt = Runtime::start(LOGGING_YAML);
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = control_connect(rt.data.path());
        // Over the connection cap, the runtime answers "busy" and closes at once: the write may fail.
        let _ = s.write_all(br#"{"cmd":"sta"#);
        held.push(s);
    }
    let (ok, out, err) = rt.cli(&["--timeout", "20", "status", "--json"]);
    assert!(ok || err.contains("busy"), "answered or told busy, not hung: {out} {err}");
    // The runtime closes every held connection (after its request timeout, or at once when over the cap).
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        let timed_out =
            matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(!timed_out, "closed by the runtime (end or reset), not by our timeout: {r:?}");
    }
    let (ok, _, err) = rt.cli(&["status", "--json"]);
    assert!(ok, "works again: {err}");
}

/// D11 (b): clients that ask for the status and never read the answer cost bounded memory.
#[test]
fn control_clients_that_never_read_cost_bounded_memory() {
    use std::io::Write;
    let yaml = "microservices:\n  many:\n    command: [\"{testkit}\"]\n    scale: 3000\n";
    let rt = Runtime::start(yaml);
    let before = peak_rss(rt.pid());
    let mut held = Vec::new();
    for _ in 0..120 {
        let mut s = control_connect(rt.data.path());
        s.write_all(b"{\"cmd\":\"status\"}\n").expect("request");
        held.push(s);
    }
    // Every one of them was answered as far as the socket takes it, or told busy; then status works again.
    let s = wait_until("status answered", Duration::from_secs(60), || cli(rt.data.path(), &["status", "--json"]).ok());
    assert_eq!(s["instances"].as_array().map(Vec::len), Some(3000));
    let grown = peak_rss(rt.pid()).saturating_sub(before);
    assert!(grown < 150 << 20, "120 non-reading clients of a 3000-instance status cost {} MiB", grown >> 20);
    drop(held);
}

/// D20: metadata larger than a command line can hold comes from a file or stdin; a request over the control
/// socket's limit gets a clear error.
#[test]
fn large_metadata_from_a_file_or_stdin_and_a_clear_limit() {
    use std::io::Write;
    let rt = Runtime::start(LOGGING_YAML);
    let big = serde_json::json!({"seq": 1, "pad": "p".repeat(300_000)}).to_string();
    let file = rt.path("md.json");
    std::fs::write(&file, &big).expect("write");
    let (ok, _, err) = rt.cli(&["kanban", "send", "sink", "--metadata", &format!("@{}", file.display())]);
    assert!(ok, "{err}");
    let mut child = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(rt.data.path())
        .args(["kanban", "send", "sink", "--metadata", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(big.replace("\"seq\":1", "\"seq\":2").as_bytes()).expect("stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = rt.wait_lines("sink.jsonl", 2);
    assert!(lines.iter().all(|l| l["metadata"]["pad"] == 300_000), "whole");
    // 40 MB through the control socket: refused with the limit, not a JSON parse error.
    let mut s = control_connect(rt.data.path());
    let req = format!(r#"{{"cmd":"send","service":"sink","metadata":{{"pad":"{}"}}}}"#, "p".repeat(40 << 20));
    let _ = s.write_all(req.as_bytes());
    let _ = s.write_all(b"\n");
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut reply).expect("reply");
    assert!(reply.contains("too large") && reply.contains("limit"), "{reply}");
    // 20 MB of tiny JSON values: refused before it is parsed into a tree of hundreds of MB.
    let before = peak_rss(rt.pid());
    let mut s = control_connect(rt.data.path());
    let values = "0,".repeat(10 << 20);
    let req = format!(r#"{{"cmd":"send","service":"sink","metadata":{{"m":[{values}0]}}}}"#);
    let _ = s.write_all(req.as_bytes());
    let _ = s.write_all(b"\n");
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut reply).expect("reply");
    assert!(reply.contains("JSON values"), "{reply}");
    assert!(peak_rss(rt.pid()).saturating_sub(before) < 100 << 20, "{} MiB", (peak_rss(rt.pid()) - before) >> 20);
    let file = rt.path("huge.json");
    std::fs::write(&file, serde_json::json!({"pad": "p".repeat(17 << 20)}).to_string()).expect("write");
    let (ok, _, err) = rt.cli(&["kanban", "send", "sink", "--metadata", &format!("@{}", file.display())]);
    assert!(!ok && err.contains("too large"), "{err}");
}

/// D21: the CLI gives up on a frozen runtime after its timeout, and a stop it gave up on is not carried out
/// later.
#[test]
fn the_cli_times_out_on_a_frozen_runtime_and_stale_requests_are_ignored() {
    let mut rt = Runtime::start(LOGGING_YAML);
    let pid = nix::unistd::Pid::from_raw(rt.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
    let (ok, _, err) = rt.cli(&["--timeout", "2", "status"]);
    assert!(!ok && err.contains("timed out"), "{err}");
    let (ok, _, err) = rt.cli(&["--timeout", "2", "stop"]);
    assert!(!ok && err.contains("timed out"), "{err}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("cont");
    // The abandoned stop is read now, and ignored: the runtime keeps running.
    wait_until("the stale stop read", Duration::from_secs(30), || rt.stderr().contains("expired").then_some(()));
    assert!(rt.child.as_mut().expect("child").try_wait().expect("wait").is_none(), "still running");
    let (ok, _, err) = rt.cli(&["status"]);
    assert!(ok, "{err}");
    assert_eq!(rt.stop(), 0);
}

/// Runs `aion run` on `yaml` in `data`/`work` expecting it to refuse to start; returns its stderr.
fn run_refused(data: &std::path::Path, work: &std::path::Path, yaml: &str) -> String {
    let file = work.join("refused.yml");
    std::fs::write(
        &file,
        yaml.replace("{testkit}", &common::example("testkit")).replace("{work}", &work.display().to_string()),
    )
    .expect("write");
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(data)
        .arg("run")
        .arg(&file)
        .env_remove("AION_HOME")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "refused: {err}");
    err
}

const SLOW_YAML: &str = r#"
microservices:
  slow:
    command: ["{testkit}"]
    always: yes
    env: { SLOW_MS: 600000, WINDOW: 1 }
"#;

fn queue_rows(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open");
    c.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).expect("count")
}

/// D12: a clean stop leaves the queue in `aion.db` itself (checkpointed: a copy of that one file has it all); a
/// store found truncated, replaced or damaged at start is refused with a clear error instead of starting with
/// part of the queue.
#[test]
fn a_truncated_or_damaged_store_is_refused_at_start() {
    let mut rt = Runtime::start(SLOW_YAML);
    for i in 0..50 {
        rt.send("slow", &["--metadata", &format!(r#"{{"seq":{i}}}"#)]);
    }
    assert_eq!(rt.stop(), 0);
    let db = rt.data.path().join("aion.db");
    let wal = rt.data.path().join("aion.db-wal");
    assert!(std::fs::metadata(&wal).map_or(0, |m| m.len()) == 0, "the WAL is checkpointed at a clean stop");
    let copy = rt.work.path().join("copy.db");
    std::fs::copy(&db, &copy).expect("copy");
    assert_eq!(queue_rows(&copy), 50, "aion.db alone holds the queue");

    // Truncated after a clean stop.
    let saved = std::fs::read(&db).expect("read");
    std::fs::write(&db, b"").expect("truncate");
    let err = run_refused(rt.data.path(), rt.work.path(), SLOW_YAML);
    assert!(err.contains("50 queued kanbans") && err.contains("aion.db.state"), "{err}");

    // Damaged pages.
    let mut damaged = saved.clone();
    let mid = damaged.len() / 2;
    for (i, b) in damaged[mid..].iter_mut().take(8192).enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    std::fs::write(&db, &damaged).expect("damage");
    let err = run_refused(rt.data.path(), rt.work.path(), SLOW_YAML);
    assert!(
        err.contains("aion.db")
            && (err.contains("damaged") || err.contains("malformed") || err.contains("not a database")),
        "{err}"
    );

    // Restored: runs again with the whole queue.
    std::fs::write(&db, &saved).expect("restore");
    let rt2 = rt.crash_and_restart(SLOW_YAML);
    let s = rt2.wait_status("backlog", |s| {
        s["instances"][0]["queue_depth"].as_u64().unwrap_or(0) + s["instances"][0]["inflight"].as_u64().unwrap_or(0)
            == 50
    });
    drop(s);

    // Emptied after a crash (no clean stop): a store existed here, refused too.
    let mut rt2 = rt2;
    rt2.kill9();
    let db = rt2.data.path().join("aion.db");
    for f in ["aion.db", "aion.db-wal", "aion.db-shm"] {
        let _ = std::fs::remove_file(rt2.data.path().join(f));
    }
    std::fs::write(&db, b"").expect("empty");
    let err = run_refused(rt2.data.path(), rt2.work.path(), SLOW_YAML);
    assert!(err.contains("empty") && err.contains("aion.db.state"), "{err}");
}

/// D14: the runtime raises its open-file soft limit to the hard limit (as Go programs such as AION do), so many
/// instances start under a low default soft limit.
#[test]
fn many_instances_start_under_a_low_soft_fd_limit() {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |l| l.1);
    if hard < 4096 {
        eprintln!("SKIPPED: the hard open-file limit here is {hard}; this test needs at least 4096");
        return;
    }
    let (data, work) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let file = work.path().join("s.yml");
    let yaml = format!(
        "microservices:\n  many:\n    command: [\"{}\"]\n    scale: 150\n    startup: yes\n    always: yes\n",
        common::example("testkit")
    );
    std::fs::write(&file, yaml).expect("write");
    let mut child = Reaped(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -Sn 256 && exec {} --data-dir {} run {}",
                common::AION,
                data.path().display(),
                file.display()
            ))
            .env_remove("AION_HOME")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
        data.path().join("run/aion.sock"),
    );
    let s = wait_until("150 instances connected", Duration::from_secs(120), || {
        let s = cli(data.path(), &["status", "--json"]).ok()?;
        let up = s["instances"].as_array()?.iter().filter(|i| i["connected"] == true).count();
        (up == 150).then_some(s)
    });
    assert!(s["instances"].as_array().is_some_and(|a| a.iter().all(|i| i["last_exit"].is_null())), "none failed");
    cli(data.path(), &["stop"]).expect("stop");
    assert_eq!(child.0.wait().expect("wait").code(), Some(0));
}

/// A runtime started by hand, killed with its instances if the test fails.
struct Reaped(std::process::Child, std::path::PathBuf);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for pid in common::processes_with_env(&format!("AION_SOCKET={}", self.1.display())) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// D17: `aion logs` shows a log with bytes that are not UTF-8 as they are (like `cat`), and `-n` reads the end.
#[test]
fn logs_show_any_bytes_and_tail_from_the_end() {
    let yaml = r#"
microservices:
  bin:
    command: ["sh", "-c", "printf 'caf\\351\\n'; i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; echo last; exec sleep 1000"]
    startup: yes
"#;
    let rt = Runtime::start(yaml);
    let log = rt.data.path().join("logs/bin_1.log");
    wait_until("the output logged", Duration::from_secs(30), || {
        std::fs::read(&log).ok().filter(|b| b.ends_with(b"last\n")).map(|_| ())
    });
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::AION)
            .arg("--data-dir")
            .arg(rt.data.path())
            .args(args)
            .output()
            .expect("aion logs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let all = run(&["logs", "bin"]);
    assert!(all.starts_with(b"caf\xe9\nline0\n") && all.ends_with(b"line1999\nlast\n"), "{:?}", &all[..16]);
    assert_eq!(run(&["logs", "bin", "-n", "2"]), b"line1999\nlast\n");
    assert_eq!(run(&["logs", "bin", "-n", "0"]), b"");
    assert_eq!(run(&["logs", "bin", "-n", "5000"]), all, "more lines than the file has: all of it");
    // The running runtime is asked where the output is: an instance it does not have is a clear error.
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(rt.data.path())
        .args(["logs", "bin", "--instance", "2"])
        .output()
        .expect("aion logs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no instance 2 of service \"bin\""), "{out:?}");
}

/// D22: when the runtime ends a session with an error, the instance is free again before the client reads the
/// error: an immediate reconnect is welcomed, never refused as "already has a session".
#[test]
fn a_reconnect_right_after_a_session_error_is_welcomed() {
    use aion::transport::codec::FrameDecoder;
    use aion::transport::{ServerMsg, PROTOCOL_VERSION};
    use common::raw::{frames, hello};
    use std::io::{Read, Write};
    let rt = Runtime::start(POISON_YAML);
    let read_until = |s: &mut std::os::unix::net::UnixStream, want: fn(&ServerMsg) -> bool| -> ServerMsg {
        let mut dec = FrameDecoder::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "closed early");
            dec.push(&buf[..n]);
            while let Ok(Some(m)) = dec.decode::<ServerMsg>() {
                if want(&m) {
                    return m;
                }
            }
        }
    };
    for round in 0..100 {
        let mut s = std::os::unix::net::UnixStream::connect(rt.socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        s.write_all(&frames(&[hello("relay", 1, PROTOCOL_VERSION)])).expect("hello");
        read_until(&mut s, |m| matches!(m, ServerMsg::Welcome { .. }));
        s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).expect("garbage");
        read_until(&mut s, |m| matches!(m, ServerMsg::Error { .. }));
        // Reconnect at once, as the SDK does.
        let mut again = std::os::unix::net::UnixStream::connect(rt.socket()).expect("connect");
        again.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        again.write_all(&frames(&[hello("relay", 1, PROTOCOL_VERSION)])).expect("hello");
        let first = read_until(&mut again, |_| true);
        assert!(matches!(first, ServerMsg::Welcome { .. }), "round {round}: {first:?}");
        again.write_all(&frames(&[aion::transport::ClientMsg::Bye])).expect("bye");
        let mut rest = Vec::new();
        let _ = again.read_to_end(&mut rest);
    }
}

/// D22 (SDK): a service refused because its instance still has a session (its previous session being closed —
/// here held open by another client) retries within its reconnect window instead of giving up: once the
/// instance is free it connects.
#[test]
fn the_sdk_retries_while_its_instance_still_has_a_session() {
    use aion::transport::{ServerMsg, PROTOCOL_VERSION};
    use common::raw::{frames, hello};
    use std::io::{Read, Write};
    let rt = Runtime::start(POISON_YAML);
    let mut squatter = std::os::unix::net::UnixStream::connect(rt.socket()).expect("connect");
    squatter.write_all(&frames(&[hello("relay", 1, PROTOCOL_VERSION)])).expect("hello");
    let mut dec = aion::transport::codec::FrameDecoder::default();
    let mut buf = [0u8; 4096];
    let n = squatter.read(&mut buf).expect("welcome");
    dec.push(&buf[..n]);
    assert!(matches!(dec.decode::<ServerMsg>(), Ok(Some(ServerMsg::Welcome { .. }))));
    // An SDK service for the same instance, started by hand: refused while the squatter holds it.
    let mut svc = std::process::Command::new(common::example("testkit"))
        .env("AION_SOCKET", rt.socket())
        .env("SERVICE_NAME", "relay")
        .env("MS_NUMBER", "1")
        .env("FORWARD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("testkit");
    wait_until("the service refused", Duration::from_secs(30), || {
        rt.stderr().contains("already has a session").then_some(())
    });
    assert!(svc.try_wait().expect("wait").is_none(), "still trying, not given up");
    drop(squatter);
    let s = rt.wait_status("the service connected", |s| instance_of(s, "relay")["connected"] == true);
    assert_eq!(s["sessions"], 2, "{s}");
    assert!(svc.try_wait().expect("wait").is_none());
    let _ = svc.kill();
    let _ = svc.wait();
}

/// D23: how long the oldest delivery has been waiting for its acknowledgement is in the status; with
/// `--ack-timeout`, a hung service is killed (and restarted) and a hung client's session is cut, so the kanbans they
/// held are redelivered.
#[test]
fn a_hung_service_is_visible_and_cut_off_after_the_ack_timeout() {
    let hung = r#"
microservices:
  hung:
    command: ["{testkit}"]
    always: yes
    env: { SLOW_MS: 600000, WINDOW: 1 }
"#;
    // Without a timeout: visible only.
    let rt = Runtime::start(hung);
    rt.send("hung", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_status("age visible", |s| s["instances"][0]["oldest_inflight_ms"].as_u64() > Some(300));
    drop(rt);
    // With one: killed, restarted, and the kanban redelivered (and so on).
    let hang_at_2 = hung.replace("SLOW_MS: 600000", "HANG_AT: 2");
    let rt = Runtime::start_with_args(&hang_at_2, &["--ack-timeout", "1"]);
    // It handles one kanban (a sign of life), then hangs on the next.
    rt.send("hung", &["--metadata", r#"{"seq":1}"#]);
    rt.send("hung", &["--metadata", r#"{"seq":2}"#]);
    let s = rt.wait_status("cut off and redelivered", |s| {
        let i = &s["instances"][0];
        i["ack_timeouts"].as_u64() >= Some(1)
            && i["restarts"].as_u64() >= Some(1)
            && i["redelivered"].as_u64() >= Some(1)
    });
    assert!(rt.stderr().contains("no acknowledgement"), "logged: {s}");

    // A raw client that takes a delivery and never acknowledges it: its session is cut.
    use aion::transport::{ServerMsg, PROTOCOL_VERSION};
    use common::raw::{frames, hello};
    use std::io::{Read, Write};
    let rt = Runtime::start_with_args(POISON_YAML, &["--ack-timeout", "1"]);
    let mut s = std::os::unix::net::UnixStream::connect(rt.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(&frames(&[hello("relay", 1, PROTOCOL_VERSION)])).expect("hello");
    rt.send("relay", &["--metadata", r#"{"seq":1}"#]);
    let mut dec = aion::transport::codec::FrameDecoder::default();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "closed",
            Ok(n) => dec.push(&buf[..n]),
            Err(e) => panic!("the runtime never cut the session: {e}"),
        }
        while let Ok(Some(m)) = dec.decode::<ServerMsg>() {
            // The first delivery is acknowledged (a sign of life); the second is held for ever.
            if let ServerMsg::Deliver { seq: 1, .. } = m {
                s.write_all(&frames(&[aion::transport::ClientMsg::Ack { upto: 1 }])).expect("ack");
                rt.send("relay", &["--metadata", r#"{"seq":2}"#]);
            }
            got.push(m);
        }
    };
    assert_eq!(end, "closed");
    assert!(got.iter().any(|m| matches!(m, ServerMsg::Deliver { .. })), "{got:?}");
    // Its held kanban went back to the queue, and to the relay process the runtime then starts, which handles it.
    let st = rt.wait_status("requeued and handled", |s| {
        let r = instance_of(s, "relay");
        r["redelivered"].as_u64() >= Some(1)
            && r["pid"].as_u64() > Some(0)
            && r["inflight"] == 0
            && r["queue_depth"] == 0
    });
    assert!(instance_of(&st, "relay")["ack_timeouts"].as_u64() >= Some(1), "{st}");
}

/// Live processes whose command line is exactly `cmd` (e.g. `sleep 4321`).
fn processes_running(cmd: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        let args: Vec<&[u8]> = line.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        if !zombie && args.join(&b' ') == cmd.as_bytes() {
            out.push(pid);
        }
    }
    out
}

/// D24: processes that leave their instance's process group (`setsid`) are stopped with it: when the instance
/// ends, and at `aion stop`.
#[test]
fn processes_that_escape_the_process_group_are_stopped_too() {
    let yaml = r#"
microservices:
  escaper:
    command: ["sh", "-c", "setsid sleep 4321 & exec sleep 4322"]
    startup: yes
    always: yes
  job:
    command: ["sh", "-c", "setsid sleep 4323 & echo started"]
    startup: yes
"#;
    let mut rt = Runtime::start(yaml);
    wait_until("both escapes running", Duration::from_secs(30), || {
        (!processes_running("sleep 4321").is_empty() && rt.instance("job", 1)["state"] == "completed").then_some(())
    });
    wait_until("the job's escaped process stopped with it", Duration::from_secs(30), || {
        processes_running("sleep 4323").is_empty().then_some(())
    });
    assert_eq!(rt.stop(), 0);
    assert!(processes_running("sleep 4321").is_empty(), "stopped with the runtime");
    assert!(rt.live_children().is_empty(), "nothing left behind");
}

/// D25: the data dir is the runtime's alone: 0700, and its databases and logs 0600, whatever the umask.
#[test]
fn the_data_dir_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut rt = Runtime::start_with_args(LOGGING_YAML, &["--archive"]);
    rt.send("sink", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_lines("sink.jsonl", 1);
    assert_eq!(rt.stop(), 0);
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    let d = rt.data.path();
    for f in ["aion.db", "archive.db", "logs/sink_1.log"] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    for sub in ["logs", "Data", "run"] {
        assert_eq!(mode(&d.join(sub)), 0o700, "{sub}");
    }
    // A data dir the operator made open is left as it is, with a warning (aion does not chmod what it did not make).
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut rt2 = rt.crash_and_restart(LOGGING_YAML);
    rt2.wait_status("up", |_| true);
    assert!(rt2.stderr().contains("open to other users"), "{}", rt2.stderr());
    assert_eq!(mode(rt2.data.path()), 0o755);
    assert_eq!(rt2.stop(), 0);
    // One it makes is private whatever the umask (the test runs with the usual 022).
    let fresh = rt2.work.path().join("fresh-data");
    let (child, _work) = spawn_in(LOGGING_YAML, &fresh);
    let mut child = Reaped(child, fresh.join("run/aion.sock"));
    assert_eq!(mode(&fresh), 0o700, "made private");
    cli(&fresh, &["stop"]).expect("stop");
    assert_eq!(child.0.wait().expect("wait").code(), Some(0));
}

/// Starts `aion run` on `yaml` with `data` as its data dir (created by aion when missing); returns once it
/// answers.
fn spawn_in(yaml: &str, data: &std::path::Path) -> (std::process::Child, tempfile::TempDir) {
    let work = tempfile::tempdir().expect("tmp");
    let yaml =
        yaml.replace("{testkit}", &common::example("testkit")).replace("{work}", &work.path().display().to_string());
    let file = work.path().join("services.yml");
    std::fs::write(&file, yaml).expect("write");
    let child = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(data)
        .arg("run")
        .arg(&file)
        .env_remove("AION_HOME")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn aion");
    wait_until("control socket", Duration::from_secs(30), || cli(data, &["status", "--json"]).ok());
    (child, work)
}

/// Review finding on D7: a backlog page requested while the store is retrying a write it has no room for (a full
/// store) is answered — the consumer pages its backlog in, acknowledges, frees space, and the flow resumes —
/// instead of being dropped and leaving the instance's producers blocked for good.
#[test]
fn a_backlog_pages_in_while_the_store_is_full() {
    const N: u64 = 1500;
    let yaml = |sink_env: &str| {
        format!(
            r#"
microservices:
  src:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: {N}, PAD: 2000 }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{{testkit}}"]
    always: yes
    env: {{ RECORD: "{{work}}/sink.jsonl", {sink_env} }}
"#
        )
    };
    let mut rt = Runtime::start_with_args(&yaml("SLOW_MS: 600000, WINDOW: 1"), &["--store-max-mb", "2"]);
    let s = rt.wait_status("the store full", |s| s["store"]["errors"].as_u64() > Some(0));
    let held = instance_of(&s, "sink")["queue_depth"].as_u64().unwrap_or(0);
    assert!(held > 256, "more than one page of backlog: {held}");
    // Restart with a fast sink: the backlog (more than one page) pages in while the source, emitting again from
    // the start, keeps running into the full store.
    // A small queue: the backlog comes in many pages, each asked for as the sink makes room.
    let rt2 = rt.crash_and_restart_with(&yaml(""), &["--store-max-mb", "2", "--queue-capacity", "20"]);
    let seqs = wait_until("every kanban at the sink", Duration::from_secs(120), || {
        let seqs: BTreeSet<i64> =
            read_lines(&rt2.path("sink.jsonl")).iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
        (seqs.len() as u64 == N).then_some(seqs)
    });
    assert_eq!(seqs, (1..=N as i64).collect());
}

/// Review finding on D11/D21: sends waiting for room in a full queue are given up at their deadline (not
/// carried out later), and cannot take the connections `status` and `stop` need.
#[test]
fn waiting_sends_end_at_their_deadline_and_leave_room_for_status() {
    let mut rt = Runtime::start_with_args(SLOW_YAML, &["--queue-capacity", "1"]);
    rt.send("slow", &["--metadata", r#"{"seq":0}"#]); // in flight
    rt.wait_status("in flight", |s| s["instances"][0]["inflight"] == 1);
    rt.send("slow", &["--metadata", r#"{"seq":1}"#]); // queued: the queue is full
    let data = rt.data.path().to_owned();
    let senders: Vec<_> = (2..22)
        .map(|i| {
            let data = data.clone();
            std::thread::spawn(move || {
                cli(&data, &["--timeout", "3", "kanban", "send", "slow", "--metadata", &format!(r#"{{"seq":{i}}}"#)])
            })
        })
        .collect();
    // While they wait, status is answered.
    let (ok, _, err) = rt.cli(&["--timeout", "20", "status", "--json"]);
    assert!(ok, "status answered while sends wait: {err}");
    for s in senders {
        let r = s.join().expect("sender");
        let e = r.expect_err("a send into a full queue times out");
        assert!(e.contains("timed out") || e.contains("busy"), "{e}");
    }
    wait_until("the runtime gave the sends up", Duration::from_secs(30), || {
        (rt.stderr().matches("given up at its deadline").count() >= 16).then_some(())
    });
    let s = rt.status();
    assert_eq!(s["instances"][0]["queue_depth"], 1, "none of the abandoned sends was queued later: {s}");
    assert_eq!(rt.stop(), 0);
}

/// Review finding on D15: under `nohup` (SIGHUP ignored when the runtime starts), SIGHUP does not stop it.
#[test]
fn sighup_is_ignored_under_nohup() {
    let (data, work) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let file = work.path().join("s.yml");
    std::fs::write(
        &file,
        LOGGING_YAML
            .replace("{testkit}", &common::example("testkit"))
            .replace("{work}", &work.path().display().to_string()),
    )
    .expect("write");
    let child = std::process::Command::new("nohup")
        .arg(common::AION)
        .arg("--data-dir")
        .arg(data.path())
        .arg("run")
        .arg(&file)
        .env_remove("AION_HOME")
        .current_dir(work.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nohup aion");
    let mut child = Reaped(child, data.path().join("run/aion.sock"));
    let s = wait_until("running", Duration::from_secs(30), || cli(data.path(), &["status", "--json"]).ok());
    // SIGHUP stays ignored: no handler was installed over nohup's choice.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).expect("proc status");
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0)
    };
    assert_eq!(mask("SigIgn:") & 1, 1, "SIGHUP ignored");
    assert_eq!(mask("SigCgt:") & 1, 0, "SIGHUP not caught");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGHUP)
        .expect("hup");
    // Still answering after the signal (a status round trip after it was delivered), then stops on request.
    let again = cli(data.path(), &["status", "--json"]).expect("still running");
    assert_eq!(again["pid"], s["pid"]);
    assert!(child.0.try_wait().expect("wait").is_none(), "still running");
    cli(data.path(), &["stop"]).expect("stop");
    assert_eq!(child.0.wait().expect("wait").code(), Some(0));
}

/// Review finding on D23: the ack timeout measures a lack of progress once a session has shown a sign of life —
/// a service still in a long `start`, or a seeded source emitting while it holds its seed, is not killed.
#[test]
fn the_ack_timeout_spares_slow_starts_and_busy_sources() {
    let yaml = r#"
microservices:
  slowstart:
    command: ["{testkit}"]
    always: yes
    env: { START_MS: 4000, RECORD: "{work}/slowstart.jsonl" }
  seeded:
    command: ["{testkit}"]
    startup: yes
    always: yes
    env: { SEED: 1, TICK_MS: 100, EMIT_FOREVER: 1 }
    nextService: { default: [ { name: sink } ] }
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;
    let rt = Runtime::start_with_args(yaml, &["--ack-timeout", "1"]);
    rt.send("slowstart", &["--metadata", r#"{"seq":1}"#]);
    // The slow starter handles its kanban once its start is over (4 s, past the 1 s timeout), and the seeded
    // source keeps emitting (30 ticks = 3 s) while it holds its seed: neither was cut off.
    rt.wait_lines("slowstart.jsonl", 1);
    rt.wait_lines("sink.jsonl", 30);
    let s = rt.status();
    for svc in ["slowstart", "seeded"] {
        assert_eq!(instance_of(&s, svc)["ack_timeouts"], 0, "{svc}: {s}");
        assert_eq!(instance_of(&s, svc)["restarts"], 0, "{svc}: {s}");
    }
}

/// Review finding on D23: a client that never shows a sign of life is cut off too, after ten times the ack
/// timeout (it may have been starting).
#[test]
fn a_silent_session_is_cut_off_after_the_start_grace() {
    use aion::transport::PROTOCOL_VERSION;
    use common::raw::{frames, hello};
    use std::io::{Read, Write};
    let rt = Runtime::start_with_args(POISON_YAML, &["--ack-timeout", "0.2"]);
    let mut s = std::os::unix::net::UnixStream::connect(rt.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.write_all(&frames(&[hello("relay", 1, PROTOCOL_VERSION)])).expect("hello");
    rt.send("relay", &["--metadata", r#"{"seq":1}"#]);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("closed by the runtime");
    let st = rt.status();
    assert!(instance_of(&st, "relay")["ack_timeouts"].as_u64() >= Some(1), "{st}");
}
