//! Fuzzing on stable Rust: proptest-driven, time-bounded harnesses over what hostile input reaches first — the
//! wire decoder (status-kanban socket), the control protocol parser (control socket), and the services.yml
//! loader. Each target runs for `AION_FUZZ_SECS` seconds (default 3; CI runs longer), generating fresh random
//! cases batch after batch; a failure is shrunk to a minimal input and reported.
//!
//! Properties: never a panic (and, for the loader, never a stack overflow: nesting and aliases are bounded), and
//! what is accepted is well-formed (valid frames decode to what was encoded; every diagnostic points inside the
//! file).
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aion::actors::control::parse_request;
use aion::runtime::config::{load_str, Severity};
use aion::runtime::kanban::metadata_from_json;
use aion::runtime::{Kanban, KanbanId};
use aion::transport::codec::{encode_into, FrameDecoder};
use aion::transport::proto::MAGIC;
use aion::transport::{ClientMsg, Hello, ServerMsg};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::time::{Duration, Instant};

/// Runs `test` on cases from `strategy` until the time budget is spent.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let secs = std::env::var("AION_FUZZ_SECS").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let config = Config { cases: 256, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz target {name} failed: {e}");
        }
        cases += 256;
    }
    eprintln!("fuzz {name}: {cases} cases in {secs}s, no failure");
}

/// A mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Delete(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
    /// Overwrite 4 bytes with a length prefix (frames are length-prefixed).
    Length(prop::sample::Index, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let idx = any::<prop::sample::Index>();
    prop_oneof![
        (idx.clone(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (idx.clone(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (idx.clone(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (idx.clone(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        idx.clone().prop_map(Mutation::Truncate),
        (idx, prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(16 << 20), Just((16 << 20) + 1), any::<u32>()])
            .prop_map(|(i, n)| Mutation::Length(i, n)),
    ]
}

fn apply(mut v: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = v.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => v[i.index(len)] ^= b,
            Mutation::Set(i, b) if len > 0 => v[i.index(len)] = *b,
            Mutation::Insert(i, b) => {
                let at = i.index(len + 1);
                v.splice(at..at, b.iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                v.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => v.truncate(i.index(len + 1)),
            Mutation::Length(i, n) if len >= 4 => {
                let at = i.index(len - 3);
                v[at..at + 4].copy_from_slice(&n.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

fn kanban() -> impl Strategy<Value = Box<aion::runtime::WireKanban>> {
    (any::<u128>(), "[a-z-]{0,12}", ".{0,24}", prop::collection::vec(".{0,12}", 0..3), any::<u32>(), any::<bool>())
        .prop_map(|(id, key, text, files, n, ok)| {
            Box::new(
                Kanban {
                    id: KanbanId(id),
                    connection_key: key,
                    file_list: files,
                    process_number: n,
                    prior_success: ok,
                    metadata: metadata_from_json(serde_json::json!({ "text": text, "n": n })),
                    ..Kanban::default()
                }
                .into_wire(),
            )
        })
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        ("[a-z-]{0,10}", any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(service, instance, window, seed)| {
            ClientMsg::Hello(Hello { magic: MAGIC, version: 1, service, instance, window, seed, pid: 7 })
        }),
        kanban().prop_map(ClientMsg::Output),
        any::<u64>().prop_map(|upto| ClientMsg::Ack { upto }),
        (any::<u64>(), ".{0,8}", kanban()).prop_map(|(req, topic, kanban)| ClientMsg::StaticPut { req, topic, kanban }),
        (any::<u64>(), ".{0,8}").prop_map(|(req, topic)| ClientMsg::StaticGet { req, topic }),
        (any::<u64>(), ".{0,8}", any::<u64>()).prop_map(|(req, topic, id)| ClientMsg::StaticDelete { req, topic, id }),
        ".{0,8}".prop_map(|topic| ClientMsg::StaticSubscribe { topic }),
        Just(ClientMsg::Bye),
    ]
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u64>(), ".{0,8}", ".{0,16}").prop_map(|(session, device_name, data_path)| ServerMsg::Welcome {
            session,
            device_name,
            data_path
        }),
        (any::<u64>(), kanban()).prop_map(|(seq, kanban)| ServerMsg::Deliver { seq, kanban }),
        any::<u32>().prop_map(|count| ServerMsg::Accepted { count }),
        (any::<u64>(), any::<u64>()).prop_map(|(req, id)| ServerMsg::StaticPutOk { req, id }),
        ".{0,32}".prop_map(|reason| ServerMsg::Error { reason }),
    ]
}

/// Feeds `wire` to a decoder in the given chunk sizes; returns the messages decoded before the end or an error.
fn decode_all<T: serde::de::DeserializeOwned>(wire: &[u8], chunks: &[usize]) -> (Vec<T>, bool) {
    let mut d = FrameDecoder::default();
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    while at < wire.len() {
        let n = sizes.next().copied().unwrap_or(wire.len()).clamp(1, wire.len() - at);
        d.push(&wire[at..at + n]);
        at += n;
        loop {
            match d.decode::<T>() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, false),
            }
        }
    }
    (out, true)
}

#[test]
fn fuzz_wire_decoder() {
    let case = (
        prop::collection::vec(client_msg(), 1..6),
        prop::collection::vec(server_msg(), 1..6),
        prop::collection::vec(mutation(), 0..6),
        prop::collection::vec(1usize..64, 1..8),
        prop::collection::vec(any::<u8>(), 0..128),
    );
    fuzz("wire decoder", case, |(client, server, muts, chunks, garbage)| {
        let mut cw = Vec::new();
        for m in &client {
            encode_into(m, &mut cw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let mut sw = Vec::new();
        for m in &server {
            encode_into(m, &mut sw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        // Valid frames, in any chunking, decode to what was encoded.
        let (got, ok) = decode_all::<ClientMsg>(&cw, &chunks);
        prop_assert!(ok);
        prop_assert_eq!(&got, &client);
        let (got, ok) = decode_all::<ServerMsg>(&sw, &chunks);
        prop_assert!(ok);
        prop_assert_eq!(&got, &server);
        // Mutated and garbage streams: messages or an error, never a panic (either side's decoder).
        let _ = decode_all::<ClientMsg>(&apply(cw.clone(), &muts), &chunks);
        let _ = decode_all::<ServerMsg>(&apply(sw, &muts), &chunks);
        let _ = decode_all::<ClientMsg>(&garbage, &chunks);
        let mut spliced = garbage.clone();
        spliced.extend_from_slice(&cw);
        let _ = decode_all::<ClientMsg>(&spliced, &chunks);
        Ok(())
    });
}

fn control_request() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("{}".to_owned()),
        Just("null".to_owned()),
        Just("[1,2]".to_owned()),
        "[a-z0-9]{0,8}".prop_map(|s| format!("{{\"k\":\"{s}\"}}")),
        any::<f64>().prop_map(|f| format!("{{\"n\":{f}}}")),
        Just("1e400".to_owned()),
    ];
    prop_oneof![
        Just(r#"{"cmd":"status"}"#.to_owned()),
        Just(r#"{"cmd":"stop","deadline_ms":1}"#.to_owned()),
        ("[a-z-]{0,8}", any::<i64>(), "[a-z]{0,6}", value, any::<i64>()).prop_map(|(svc, n, key, md, dl)| {
            format!(
                r#"{{"cmd":"send","service":"{svc}","instance":{n},"key":"{key}","metadata":{md},"deadline_ms":{dl}}}"#
            )
        }),
    ]
}

#[test]
fn fuzz_control_parser() {
    let case = (control_request(), prop::collection::vec(mutation(), 0..5), prop::collection::vec(any::<u8>(), 0..64));
    fuzz("control parser", case, |(req, muts, garbage)| {
        // The requests the CLI sends parse; anything else is an error, never a panic.
        if let Ok(env) = parse_request(req.as_bytes()) {
            let again = serde_json::to_vec(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(parse_request(&again).is_ok(), "what parses, re-serialises and parses");
        }
        let _ = parse_request(&apply(req.into_bytes(), &muts));
        let _ = parse_request(&garbage);
        Ok(())
    });
}

fn fixtures() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("fixtures").flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().map(|f| std::fs::read_to_string(f).expect("read")).collect()
}

/// A services.yml-shaped document from a small grammar: services, routes (cycles included), anchors, aliases,
/// flow and block styles, deep nesting.
fn yaml_doc() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just("yes".to_owned()),
        Just("~".to_owned()),
        Just("0x1F".to_owned()),
        Just("\"q\\0\"".to_owned()),
        Just("'s'".to_owned()),
        "[a-z0-9]{0,6}",
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    let service = ("[a-c]", scalar.clone(), prop::collection::vec("[a-c]", 0..3), any::<bool>(), 0usize..40);
    (prop::collection::vec(service, 0..4), any::<bool>(), 0usize..12).prop_map(|(svcs, aliases, laughs)| {
        let mut y = String::new();
        if aliases {
            y += "common: &env {A: \"1\", B: [x, y]}\n";
            let mut prev = "env".to_owned();
            for i in 0..laughs {
                y += &format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n");
                prev = format!("l{i}");
            }
        }
        y += "microservices:\n";
        for (name, value, next, flow, depth) in svcs {
            y += &format!("  {name}:\n    command: [\"{value}\"]\n    scale: {value}\n    startup: {value}\n");
            if aliases {
                y += "    env: *env\n";
            }
            if !next.is_empty() {
                if flow {
                    let t: Vec<String> = next.iter().map(|n| format!("{{name: {n}}}")).collect();
                    y += &format!("    nextService: {{default: [{}]}}\n", t.join(", "));
                } else {
                    y += "    nextService:\n      default:\n";
                    for n in &next {
                        y += &format!("        - name: {n}\n");
                    }
                }
            }
            if depth > 0 {
                y += &format!("    deep: {}x\n", "- ".repeat(depth * 8));
            }
        }
        y
    })
}

/// The number of lines as YAML counts them: `\n`, `\r\n` and a lone `\r` all end a line (Rust's `lines()` does
/// not count a lone `\r`), plus the last line.
fn yaml_lines(text: &str) -> usize {
    let b = text.as_bytes();
    let breaks =
        b.iter().enumerate().filter(|(i, c)| **c == b'\n' || (**c == b'\r' && b.get(i + 1) != Some(&b'\n'))).count();
    breaks + 1
}

fn check_loader(text: &str) -> Result<(), TestCaseError> {
    let l = load_str("fuzz.yml", text);
    let lines = yaml_lines(text) + 1;
    for d in &l.diagnostics {
        prop_assert!(d.line <= lines, "{} points outside the file ({lines} lines)", d);
        prop_assert!(!d.message.is_empty());
    }
    let errors = l.diagnostics.iter().any(|d| d.severity == Severity::Error);
    prop_assert_eq!(l.config.is_none(), errors, "a config exactly when there is no error");
    Ok(())
}

#[test]
fn fuzz_services_yml_loader() {
    let files = fixtures();
    let n = files.len();
    let case = (
        yaml_doc(),
        0..n,
        prop::collection::vec(mutation(), 0..6),
        "[\\[\\]{}:,\\-#&*!|>'\" \\n\\ta-z0-9\\u{feff}]{0,12}",
        any::<prop::sample::Index>(),
    );
    fuzz("services.yml loader", case, |(doc, pick, muts, ins, at)| {
        check_loader(&doc)?;
        // Mutated real files: byte-level mutations (kept as text when they still are UTF-8) and YAML-ish inserts.
        let base = &files[pick];
        if let Ok(t) = String::from_utf8(apply(base.clone().into_bytes(), &muts)) {
            check_loader(&t)?;
        }
        let mut i = at.index(base.len() + 1);
        while !base.is_char_boundary(i) {
            i -= 1;
        }
        check_loader(&format!("{}{}{}", &base[..i], ins, &base[i..]))
    });
}

/// Found by the fuzzer: a lone `\r` is a line break to YAML, so a diagnostic may point at a line `str::lines()`
/// does not count. It is inside the file all the same.
#[test]
fn a_lone_carriage_return_counts_as_a_line() {
    let text = "microservices:\n  a:\r    command: [x\n";
    let l = load_str("cr.yml", text);
    assert!(l.diagnostics.iter().all(|d| d.line <= yaml_lines(text) + 1), "{:?}", l.diagnostics);
    assert_eq!(yaml_lines(text), 4);
}
