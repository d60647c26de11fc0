//! AION's gRPC kanban API with real gRPC clients: Python microservices on `grpcio` from PyPI, written the way
//! AION's Python library drives the API (`tests/grpc/aionlike.py`: one channel, a receive thread, unary sends, the
//! terminate kanban on close, a reconnect with a new seed), the Go client's behaviour on the wire (two
//! connections, `MSNUMBER`, 1 s deadlines, absent metadata, a terminate number as a string), static kanbans, mixed
//! pipelines with Rust SDK services, and bad requests.
//!
//! Needs `python3` with `grpcio`, `grpcio-tools` and `python-dateutil` (`.ci/run` installs them). Without them the
//! tests say SKIPPED loudly and pass, unless `AION_REQUIRE_PY_GRPC=1` (CI), where they fail.
#![cfg(feature = "grpc")]
// A test fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Runtime;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn client() -> String {
    repo().join("tests/grpc/aionlike.py").display().to_string()
}

/// The Python stubs of `transport/proto/status.proto`, generated once per test binary; `None` when Python's gRPC
/// packages are missing (and that is allowed).
fn stubs() -> Option<&'static Path> {
    static STUBS: OnceLock<Option<PathBuf>> = OnceLock::new();
    STUBS
        .get_or_init(|| {
            let probe = Command::new("python3").args(["-c", "import grpc, grpc_tools, dateutil"]).output();
            if !probe.as_ref().is_ok_and(|o| o.status.success()) {
                let why = probe.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stderr).into_owned());
                if std::env::var_os("AION_REQUIRE_PY_GRPC").is_some() {
                    panic!(
                        "AION_REQUIRE_PY_GRPC is set but python3 cannot import grpc, grpc_tools and dateutil: {why}"
                    );
                }
                eprintln!("SKIPPED: the gRPC tests need python3 with grpcio, grpcio-tools and python-dateutil ({why})");
                return None;
            }
            let dir = std::env::temp_dir().join(format!("aion-grpc-stubs-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("stub dir");
            let include = Command::new("python3")
                .args([
                    "-c",
                    "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))",
                ])
                .output()
                .expect("grpc_tools path");
            let include = String::from_utf8_lossy(&include.stdout).trim().to_owned();
            let out = Command::new("python3")
                .args(["-m", "grpc_tools.protoc"])
                .arg(format!("-I{}", repo().join("transport/proto").display()))
                .arg(format!("-I{include}"))
                .arg(format!("--python_out={}", dir.display()))
                .arg(format!("--grpc_python_out={}", dir.display()))
                .arg("status.proto")
                .output()
                .expect("protoc");
            assert!(out.status.success(), "grpc_tools.protoc failed: {}", String::from_utf8_lossy(&out.stderr));
            Some(dir)
        })
        .as_deref()
}

fn yaml(template: &str, stubs: &Path) -> String {
    template.replace("{client}", &client()).replace("{stubs}", &stubs.display().to_string())
}

fn seqs(lines: &[serde_json::Value], field: &str) -> Vec<u64> {
    lines.iter().map(|l| l[field]["seq"].as_f64().expect("seq") as u64).collect()
}

/// Runs a Python snippet with the stubs on its path; returns (success, stdout, stderr).
fn python(stubs: &Path, code: &str, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new("python3").arg("-c").arg(code).args(args).env("PYTHONPATH", stubs).output().expect("python3");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn grpc_addr(rt: &Runtime) -> String {
    let s = rt.status();
    s["grpc"]["addr"].as_str().unwrap_or_else(|| panic!("no gRPC address in the status: {s}")).to_owned()
}

const PIPELINE: &str = r#"
microservices:
  py-source:
    command: ["python3", "{client}", "source"]
    startup: yes
    env:
      PYTHONPATH: "{stubs}"
      COUNT: "50"
      # As real AION services.yml files have it: replaced by the runtime's listener.
      KANBAN_ADDR: aion-statuskanban:10000
    nextService:
      default:
        - name: py-transform
  py-transform:
    command: ["python3", "{client}", "transform"]
    always: yes
    env:
      PYTHONPATH: "{stubs}"
    nextService:
      default:
        - name: py-sink
  py-sink:
    command: ["python3", "{client}", "sink"]
    always: yes
    env:
      PYTHONPATH: "{stubs}"
      OUT: "{work}/out.jsonl"
"#;

/// An unmodified-style Python pipeline: a source started without a kanban reads AION's seed kanban and emits 50,
/// a transform and a sink on `ReceiveKanban`; every kanban arrives once, in order, with AION's fields; the
/// source's `close()` returns because the runtime ends its stream on the terminate kanban, so it exits 0.
#[test]
fn a_python_pipeline_runs_with_the_seed_kanban_and_the_terminate_kanban() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(&yaml(PIPELINE, stubs));
    let lines = rt.wait_lines("out.jsonl", 50);
    assert_eq!(seqs(&lines, "md"), (1..=50).collect::<Vec<_>>(), "every kanban once, in order:\n{}", rt.diagnose());
    let device = rt.status()["device_name"].as_str().expect("device").to_owned();
    for l in &lines {
        let md = &l["md"];
        assert_eq!(md["double"].as_f64(), Some(md["seq"].as_f64().expect("seq") * 2.0));
        assert_eq!(md["via"], "py-transform");
        assert_eq!(md["from"], "py-source");
        assert_eq!(l["next"], device.as_str(), "nextDeviceName is this device");
        assert_eq!(l["pn"], 1, "processNumber is the receiving instance");
        assert_eq!(l["startAt"], "", "no startAt filled in on forwarded kanbans");
    }
    // close() returned: the source process ended with 0 after its terminate kanban.
    let st = rt.wait_status("the source to complete", |s| {
        s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["service"] == "py-source" && i["state"] == "completed")
    });
    let source = st["instances"].as_array().expect("instances").iter().find(|i| i["service"] == "py-source").cloned();
    assert_eq!(source.expect("source")["terminated"], true);
    let sink = rt.instance("py-sink", 1);
    assert_eq!(sink["session"], "grpc", "{sink}");
    let (ok, table, _) = rt.cli(&["status"]);
    let sink_row = table.lines().any(|l| l.starts_with("py-sink") && l.split_whitespace().nth(3) == Some("grpc"));
    assert!(ok && sink_row && table.contains("gRPC API (AION clients)"), "{table}");
    assert!(st["grpc"]["sessions"].as_u64().unwrap_or(0) >= 3, "{}", st["grpc"]);
    assert_eq!(st["grpc"]["outputs"].as_u64(), Some(100), "50 + 50 outputs (the terminate kanban is not one)");
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

const GO_LIKE: &str = r#"
microservices:
  go-source:
    command: ["python3", "{client}", "go-source"]
    startup: yes
    scale: 2
    env:
      PYTHONPATH: "{stubs}"
      COUNT: "10"
    nextService:
      default:
        - name: py-sink
  py-sink:
    command: ["python3", "{client}", "sink"]
    always: yes
    env:
      PYTHONPATH: "{stubs}"
      OUT: "{work}/out.jsonl"
"#;

/// The Go client's behaviour on the wire: instance 2 finds its number in `MSNUMBER`, receives and sends on two
/// connections, sends outputs with `processNumber` 1 and no metadata (odd ones), with 1 s deadlines, and closes
/// with a terminate kanban whose number is a string.
#[test]
fn the_go_clients_wire_behaviour_is_served() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(&yaml(GO_LIKE, stubs));
    let lines = rt.wait_lines("out.jsonl", 20);
    let mut with_seq: Vec<u64> = lines.iter().filter_map(|l| l["md"]["seq"].as_f64()).map(|s| s as u64).collect();
    with_seq.sort_unstable();
    assert_eq!(with_seq, vec![2, 2, 4, 4, 6, 6, 8, 8, 10, 10], "{lines:?}");
    let empty = lines.iter().filter(|l| l["md"].as_object().is_some_and(|o| o.is_empty())).count();
    assert_eq!(empty, 10, "absent metadata arrives as {{}}: {lines:?}");
    rt.wait_status("both sources to complete", |s| {
        s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["service"] == "go-source" && i["state"] == "completed" && i["terminated"] == true)
            .count()
            == 2
    });
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

const MIXED: &str = r#"
microservices:
  rust-source:
    command: ["{testkit}"]
    startup: yes
    env:
      EMIT_COUNT: "30"
      TERMINATE: "1"
    nextService:
      default:
        - name: py-transform
  py-transform:
    command: ["python3", "{client}", "transform"]
    always: yes
    env:
      PYTHONPATH: "{stubs}"
    nextService:
      default:
        - name: rust-sink
  rust-sink:
    command: ["{testkit}"]
    always: yes
    env:
      RECORD: "{work}/out.jsonl"
"#;

/// A Rust SDK service feeding a Python gRPC service feeding a Rust one: metadata numbers cross as doubles and come
/// back as integers (`seq` 3 is 3, not 3.0), so Rust readers of `as_u64` work.
#[test]
fn a_mixed_pipeline_rust_python_rust() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(&yaml(MIXED, stubs));
    let lines = rt.wait_lines("out.jsonl", 30);
    let seqs: Vec<u64> = lines.iter().map(|l| l["metadata"]["seq"].as_u64().expect("an integer seq")).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "{}", rt.diagnose());
    for l in &lines {
        assert_eq!(l["metadata"]["double"].as_u64(), Some(l["metadata"]["seq"].as_u64().expect("seq") * 2));
        assert_eq!(l["from"], "py-transform");
    }
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

const STATICS_AND_ERRORS: &str = r#"
microservices:
  svc:
    command: ["sleep", "1000"]
"#;

const STATIC_CLIENT: &str = r#"
import sys, grpc, status_pb2, status_pb2_grpc
from google.protobuf import struct_pb2
addr = sys.argv[1]
ch = grpc.insecure_channel(addr)
stub = status_pb2_grpc.KanbanStub(ch)
def sk(seq):
    m = status_pb2.StatusKanban(connectionKey="default")
    s = struct_pb2.Struct(); s.update({"seq": seq}); m.metadata.CopyFrom(s)
    return m
for i in (1, 2, 3):
    r = stub.SendStaticKanban(status_pb2.StaticRequest(topic=status_pb2.Topic(name="t"), message=sk(i)), timeout=1)
    assert r.status == status_pb2.SUCCESS
sub = stub.ReceiveStaticKanban(status_pb2.Topic(name="t"))
got = [next(sub) for _ in range(3)]
ids = [g.id for g in got]
assert [g.statusKanban.metadata["seq"] for g in got] == [1, 2, 3], got
assert len(set(ids)) == 3 and all(ids), ids
# A live one reaches the open subscription.
stub.SendStaticKanban(status_pb2.StaticRequest(topic=status_pb2.Topic(name="t"), message=sk(4)), timeout=1)
assert next(sub).statusKanban.metadata["seq"] == 4
sub.cancel()
# Deleting works (twice too), and a later subscriber no longer sees it.
for _ in range(2):
    r = stub.DeleteStaticKanban(status_pb2.DeleteStaticRequest(topic=status_pb2.Topic(name="t"), id=ids[0]), timeout=1)
    assert r.status == status_pb2.SUCCESS
stub.DeleteStaticKanban(status_pb2.DeleteStaticRequest(topic=status_pb2.Topic(name="t"), id="not-an-id"), timeout=1)
sub = stub.ReceiveStaticKanban(status_pb2.Topic(name="t"))
later = [next(sub).statusKanban.metadata["seq"] for _ in range(3)]
assert later == [2, 3, 4], later
sub.cancel()
print("statics ok")
"#;

const BAD_CLIENT: &str = r#"
import sys, grpc, status_pb2, status_pb2_grpc
from google.protobuf import struct_pb2
addr = sys.argv[1]
ch = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)])
stub = status_pb2_grpc.KanbanStub(ch)
def code(f):
    try:
        f()
    except grpc.RpcError as e:
        return e.code().name
    return "OK"
print("unknown", code(lambda: stub.SendKanban(status_pb2.Request(microserviceName="ghost", message=status_pb2.StatusKanban()), timeout=2)))
print("nomessage", code(lambda: stub.SendKanban(status_pb2.Request(microserviceName="svc"), timeout=2)))
big = status_pb2.StatusKanban(dataPath="x" * (5 << 20))
print("big", code(lambda: stub.SendKanban(status_pb2.Request(microserviceName="svc", message=big), timeout=5)))
print("instance", code(lambda: next(stub.ReceiveKanban(status_pb2.InitializeService(microserviceName="svc", processNumber=7), timeout=2))))
print("notopic", code(lambda: stub.SendStaticKanban(status_pb2.StaticRequest(message=status_pb2.StatusKanban()), timeout=2)))
print("unknownstream", code(lambda: next(stub.ReceiveKanban(status_pb2.InitializeService(microserviceName="ghost"), timeout=2))))
"#;

/// Static kanbans, the Go client's API: put (within its 1 s deadline), subscribe (every retained entry, then live
/// ones, each with a unique id), delete (twice, and an unknown id: success), and reads that do not consume.
#[test]
fn static_kanbans_over_grpc() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(STATICS_AND_ERRORS);
    let addr = grpc_addr(&rt);
    let (ok, out, err) = python(stubs, STATIC_CLIENT, &[&addr]);
    assert!(ok && out.contains("statics ok"), "{out}\n{err}\n{}", rt.diagnose());
    assert_eq!(rt.stop(), 0);
}

/// Bad requests get clear status codes, garbage on the port is refused, and the runtime goes on.
#[test]
fn bad_grpc_requests_get_clear_codes_and_garbage_is_survived() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(STATICS_AND_ERRORS);
    let addr = grpc_addr(&rt);
    // Garbage, a truncated HTTP/2 preface, and an HTTP/1.1 request on the gRPC port.
    for junk in [&b"\x00\xff garbage \x13\x37"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let _ = s.write_all(junk);
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }
    let (ok, out, err) = python(stubs, BAD_CLIENT, &[&addr]);
    assert!(ok, "{out}\n{err}");
    let codes: std::collections::HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(codes["unknown"], "NOT_FOUND", "{out}");
    assert_eq!(codes["nomessage"], "INVALID_ARGUMENT", "{out}");
    assert_eq!(codes["big"], "RESOURCE_EXHAUSTED", "{out}");
    assert_eq!(codes["instance"], "NOT_FOUND", "{out}");
    assert_eq!(codes["notopic"], "INVALID_ARGUMENT", "{out}");
    assert_eq!(codes["unknownstream"], "NOT_FOUND", "{out}");
    let s = rt.status();
    assert!(s["grpc"]["refused"].as_u64().unwrap_or(0) >= 4, "{}", s["grpc"]);
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

/// The listener is bound before any instance starts, and a taken port is a one-line error naming the way out.
#[test]
fn a_taken_grpc_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("s.yml");
    std::fs::write(&file, STATICS_AND_ERRORS).expect("yaml");
    let out = Command::new(common::AION)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["run", "--grpc", &addr])
        .arg(&file)
        .output()
        .expect("aion run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for AION's gRPC API on {addr}")) && err.contains("--grpc off"),
        "{err}"
    );
}

const SESSIONS: &str = r#"
microservices:
  plain:
    command: ["sleep", "1000"]
  native:
    command: ["{testkit}"]
    startup: yes
    always: yes
"#;

/// Replaces an older gRPC session; reads one kanban per line of stdin command.
const REPLACE_CLIENT: &str = r#"
import sys, threading, queue, grpc, status_pb2, status_pb2_grpc
from google.protobuf import json_format
addr = sys.argv[1]
def open_stream(name):
    ch = grpc.insecure_channel(addr)
    return ch, status_pb2_grpc.KanbanStub(ch).ReceiveKanban(status_pb2.InitializeService(microserviceName=name, processNumber=1))
def code(f):
    try:
        f()
    except grpc.RpcError as e:
        return e.code().name
    return "OK"
ch1, s1 = open_stream("plain")
k = next(s1)
print("first", json_format.MessageToDict(k.metadata)["n"], flush=True)
# A newer session for the same instance: the older stream ends with OK (StopIteration), and the kanban it held,
# unacknowledged, is delivered again to the newer one.
ch2, s2 = open_stream("plain")
ended = "running"
try:
    next(s1)
except StopIteration:
    ended = "ok"
except grpc.RpcError as e:
    ended = e.code().name
print("older", ended, flush=True)
k2 = next(s2)
print("again", json_format.MessageToDict(k2.metadata)["n"], flush=True)
# An instance held by a native SDK session is not taken over.
print("native", code(lambda: next(status_pb2_grpc.KanbanStub(ch2).ReceiveKanban(status_pb2.InitializeService(microserviceName="native", processNumber=1), timeout=3))), flush=True)
"#;

/// A newer `ReceiveKanban` for an instance replaces the older gRPC session, which ends with OK and gives back the
/// kanban it held (delivered again to the newer one); an instance held by a native SDK session refuses a gRPC one.
#[test]
fn a_newer_grpc_session_replaces_an_older_one_and_native_sessions_are_kept() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(SESSIONS);
    rt.wait_status("the native service to connect", |s| {
        s["instances"].as_array().into_iter().flatten().any(|i| i["service"] == "native" && i["connected"] == true)
    });
    rt.send("plain", &["--metadata", r#"{"n": 7}"#]);
    let addr = grpc_addr(&rt);
    let (ok, out, err) = python(stubs, REPLACE_CLIENT, &[&addr]);
    assert!(ok, "{out}\n{err}\n{}", rt.diagnose());
    let lines: std::collections::HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(lines["first"], "7.0");
    assert_eq!(lines["older"], "ok", "the older stream ends with OK: {out}");
    assert_eq!(lines["again"], "7.0", "the unacknowledged kanban is delivered again: {out}");
    assert_eq!(lines["native"], "FAILED_PRECONDITION", "{out}");
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

/// kill -9 of the runtime while a Python pipeline runs (durable queues): after the restart every kanban a source
/// had sent arrives — at least once, as the guarantee for gRPC clients says (the restarted source, started
/// without a kanban again, gets a new seed and sends its kanbans again: duplicates, never a gap).
#[test]
fn a_python_pipeline_survives_kill_9_of_the_runtime() {
    let Some(stubs) = stubs() else { return };
    // A slow transform (5 ms a kanban): most kanbans are still queued, durably, when the runtime dies.
    let y = PIPELINE.replace("COUNT: \"50\"", "COUNT: \"300\"").replace(
        "    command: [\"python3\", \"{client}\", \"transform\"]\n    always: yes\n    env:\n",
        "    command: [\"python3\", \"{client}\", \"transform\"]\n    always: yes\n    env:\n      SLOW_MS: \"5\"\n",
    );
    assert!(y.contains("SLOW_MS"));
    let y = yaml(&y, stubs);
    let mut rt = Runtime::start(&y);
    let before = rt.wait_lines("out.jsonl", 20).len();
    let mut rt = rt.crash_and_restart(&y);
    assert!(before < 250, "the runtime was killed mid-flow ({before} of 300 through)");
    let start = std::time::Instant::now();
    loop {
        let got: std::collections::BTreeSet<u64> =
            seqs(&common::read_lines(&rt.path("out.jsonl")), "md").into_iter().collect();
        if got.len() == 300 {
            assert_eq!(got.iter().next_back(), Some(&300));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{} of 300 after the restart\n{}", got.len(), rt.diagnose());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

const WEDGED: &str = r#"
microservices:
  wedged:
    command: ["python3", "{client}", "wedge"]
    startup: yes
    always: yes
    env:
      PYTHONPATH: "{stubs}"
  plain:
    command: ["sleep", "1000"]
    startup: yes
    always: yes
"#;

/// A gRPC client that lost its session without a terminate kanban and does not come back, while its process stays
/// alive, is restarted after `--grpc-reconnect`; a process that never spoke gRPC is never restarted for that.
#[test]
fn a_wedged_grpc_client_is_restarted_and_a_silent_process_is_not() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start_with_args(&yaml(WEDGED, stubs), &["--grpc-reconnect", "1"]);
    let st = rt.wait_status("the wedged client to be restarted", |s| {
        s["instances"].as_array().into_iter().flatten().any(|i| {
            i["service"] == "wedged" && i["grpc_lost"].as_u64() >= Some(1) && i["restarts"].as_u64() >= Some(1)
        })
    });
    let plain = st["instances"].as_array().expect("instances").iter().find(|i| i["service"] == "plain").cloned();
    let plain = plain.expect("plain");
    assert_eq!((plain["restarts"].as_u64(), plain["grpc_lost"].as_u64()), (Some(0), Some(0)), "{plain}");
    assert!(rt.stderr().contains("did not come back within 1s"), "{}", rt.stderr());
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

/// kill -9 of a Python service mid-flow: the runtime restarts it, and the sink sees what the documented guarantee
/// says — every kanban the service had handled, then the last one written to it again (requeued), then the rest:
/// the only loss is what the killed client had buffered and not handled (one contiguous run), and at most one
/// kanban comes twice (the last one, if it had been handled).
#[test]
fn kill_9_of_a_python_service_loses_only_what_its_client_had_buffered() {
    let Some(stubs) = stubs() else { return };
    let y = PIPELINE.replace("COUNT: \"50\"", "COUNT: \"300\"").replace(
        "    command: [\"python3\", \"{client}\", \"transform\"]\n    always: yes\n    env:\n",
        "    command: [\"python3\", \"{client}\", \"transform\"]\n    always: yes\n    env:\n      SLOW_MS: \"5\"\n",
    );
    let mut rt = Runtime::start(&yaml(&y, stubs));
    rt.wait_lines("out.jsonl", 30);
    let pid = rt.instance("py-transform", 1)["pid"].as_u64().expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let start = std::time::Instant::now();
    let got = loop {
        let got = seqs(&common::read_lines(&rt.path("out.jsonl")), "md");
        if got.last() == Some(&300) {
            break got;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "the pipeline did not go on: {got:?}\n{}", rt.diagnose());
        std::thread::sleep(Duration::from_millis(50));
    };
    let i = rt.instance("py-transform", 1);
    assert!(i["restarts"].as_u64() >= Some(1), "{i}");
    // In order, except one kanban seen again right after the restart.
    let dups = got.len() - got.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(dups <= 1, "more than the last kanban came twice: {got:?}");
    let mut unique = got.clone();
    unique.dedup();
    let mut sorted = unique.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let gaps: Vec<(u64, u64)> = sorted.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(gaps.len() <= 1, "more than one run lost: {gaps:?} in {got:?}");
    assert_eq!(sorted.first(), Some(&1));
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}

/// A source started without a kanban whose stream breaks reconnects with the same init type: it gets its seed
/// again (the seed it held, given back), not a second one piled up behind it.
#[test]
fn a_reconnecting_source_gets_its_seed_again() {
    let Some(stubs) = stubs() else { return };
    let mut rt = Runtime::start(SESSIONS);
    let addr = grpc_addr(&rt);
    let code = r#"
import sys, grpc, status_pb2, status_pb2_grpc
addr = sys.argv[1]
def seed():
    ch = grpc.insecure_channel(addr)
    s = status_pb2_grpc.KanbanStub(ch).ReceiveKanban(status_pb2.InitializeService(initType=status_pb2.START_SERVICE_WITHOUT_KANBAN, microserviceName="plain", processNumber=1))
    k = next(s)
    return ch, k
ch, k1 = seed()
ch.close()
ch, k2 = seed()
print(k1.dataPath == k2.dataPath and k2.connectionKey == "" and k2.processNumber == 1 and k1.startAt == k2.startAt)
ch.close()
"#;
    let (ok, out, err) = python(stubs, code, &[&addr]);
    assert!(ok && out.trim() == "True", "{out}\n{err}");
    // One seed in all: nothing left queued behind it.
    let i = rt.wait_status("the session to be gone", |s| {
        s["instances"].as_array().into_iter().flatten().any(|i| i["service"] == "plain" && i["connected"] == false)
    });
    let plain = i["instances"].as_array().expect("instances").iter().find(|i| i["service"] == "plain").cloned();
    assert_eq!(plain.expect("plain")["queue_depth"], 1, "the seed, given back; no second seed");
    assert_eq!(rt.stop(), 0, "{}", rt.diagnose());
}
