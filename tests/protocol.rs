//! Hostile and broken clients on the status-kanban socket: each gets a clear refusal, the runtime keeps going.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use aion::runtime::Kanban;
use aion::transport::codec::FrameDecoder;
use aion::transport::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
use common::raw::{converse, error_reason, frames, hello};
use common::Runtime;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const YAML: &str = r#"
microservices:
  svc:
    command: ["{testkit}"]
    scale: 2
    env: { RECORD: "{work}/svc.jsonl" }
"#;

#[test]
fn sockets_are_owner_only() {
    let rt = Runtime::start(YAML);
    for p in [rt.socket(), rt.data.path().join("run/control.sock")] {
        let mode = std::fs::metadata(&p).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}

#[test]
fn garbage_unknown_service_wrong_version_and_bad_instance_are_refused() {
    let mut rt = Runtime::start(YAML);
    let r = error_reason(&converse(&rt, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(r.contains("bad handshake") || r.contains("Hello"), "{r}");
    let r = error_reason(&converse(&rt, &frames(&[hello("nope", 1, PROTOCOL_VERSION)])));
    assert!(r.contains("unknown service `nope`"), "{r}");
    let r = error_reason(&converse(&rt, &frames(&[hello("svc", 1, PROTOCOL_VERSION + 1)])));
    assert!(r.contains("protocol version"), "{r}");
    let r = error_reason(&converse(&rt, &frames(&[hello("svc", 3, PROTOCOL_VERSION)])));
    assert!(r.contains("instances 1..=2, not 3"), "{r}");
    let r = error_reason(&converse(&rt, &frames(&[ClientMsg::Ack { upto: 1 }])));
    assert!(r.contains("expected Hello"), "{r}");
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    let r = error_reason(&converse(&rt, &huge));
    assert!(r.contains("exceeds"), "{r}");
    // Garbage after a good handshake closes that session only.
    let mut s = UnixStream::connect(rt.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(&frames(&[hello("svc", 1, PROTOCOL_VERSION)])).expect("hello");
    let mut dec = FrameDecoder::default();
    let mut buf = [0u8; 4096];
    let mut msgs = Vec::new();
    while msgs.is_empty() {
        let n = s.read(&mut buf).expect("welcome");
        assert!(n > 0, "closed before welcome");
        dec.push(&buf[..n]);
        while let Ok(Some(m)) = dec.decode::<ServerMsg>() {
            msgs.push(m);
        }
    }
    assert!(matches!(msgs[0], ServerMsg::Welcome { .. }), "{msgs:?}");
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).expect("garbage");
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => dec.push(&buf[..n]),
        }
        while let Ok(Some(m)) = dec.decode::<ServerMsg>() {
            msgs.push(m);
        }
    }
    assert!(error_reason(&msgs).contains("bad frame"), "{msgs:?}");
    // Still serving: status works, a real kanban flows, and the refusals were counted.
    rt.send("svc", &["--metadata", r#"{"seq":1}"#]);
    assert_eq!(rt.wait_lines("svc.jsonl", 1)[0]["metadata"]["seq"], 1);
    let s = rt.status();
    assert!(s["rejected_connections"].as_u64() >= Some(7), "{s}");
    assert!(rt.stderr().contains("closing connection"));
    assert_eq!(rt.stop(), 0);
}

#[test]
fn a_raw_client_can_speak_the_protocol() {
    let mut rt = Runtime::start(YAML);
    // svc-2 has no kanban, so it is not running: this client plays its part.
    let out = Box::new(Kanban { id: aion::runtime::KanbanId::generate(), ..Kanban::default() }.into_wire());
    let raw = frames(&[
        hello("svc", 2, PROTOCOL_VERSION),
        ClientMsg::Output(out.clone()),
        ClientMsg::Output(out),
        ClientMsg::Bye,
    ]);
    let msgs = converse(&rt, &raw);
    assert!(matches!(msgs.first(), Some(ServerMsg::Welcome { .. })), "{msgs:?}");
    let accepted: u32 = msgs.iter().map(|m| if let ServerMsg::Accepted { count } = m { *count } else { 0 }).sum();
    assert_eq!(accepted, 2, "both outputs acknowledged");
    // svc has no nextService: the first output is dead-lettered (end of chain), the duplicate is dropped.
    let s = rt.wait_status("dead letter", |s| s["dead_letters"]["no-route"] == 1);
    let svc2 = s["instances"].as_array().and_then(|a| a.iter().find(|i| i["instance"] == 2)).cloned().expect("svc-2");
    assert_eq!(svc2["duplicates"], 1);
    // A live instance keeps its session: a second client is refused.
    rt.send("svc", &["--metadata", r#"{"seq":1}"#]);
    rt.wait_status("svc-1 connected", |s| s["instances"][0]["connected"] == true);
    let r = error_reason(&converse(&rt, &frames(&[hello("svc", 1, PROTOCOL_VERSION)])));
    assert!(r.contains("already has a session"), "{r}");
    assert_eq!(rt.stop(), 0);
}

/// 64 KiB kanbans flowing into and out of a relay at once fill both socket buffers of its session. The SDK reads
/// in its own task while it writes, so neither side can end up blocked writing to the other (this deadlocked
/// once: the relay was mid-write and not reading, the runtime was mid-write to it and not reading either).
#[test]
fn large_kanbans_both_ways_never_deadlock_a_session() {
    const N: usize = 5000;
    let yaml = common::pipeline(
        &format!("EMIT_COUNT: {N}, PAD: 65536, WINDOW: 1024, OUTPUT_WINDOW: 4096"),
        "WINDOW: 1024, OUTPUT_WINDOW: 4096",
        "WINDOW: 1024",
    );
    let rt = Runtime::start_with_args(&yaml, &["--queue-capacity", "4096"]);
    let lines = rt.wait_lines("sink.jsonl", N);
    assert!(lines.iter().all(|l| l["metadata"]["pad"] == 65536), "every kanban arrived whole");
}
