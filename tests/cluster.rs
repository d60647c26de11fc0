//! Cluster mode between real `aion` processes: kanbans crossing devices over QUIC with mutual TLS, store and
//! forward through link cuts and crashes, and peers refused for their certificates. On loopback (every user's
//! `cargo test`); `tests/cluster_netns.rs` runs the same across network namespaces.
// A test fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{read_lines, wait_until, Runtime, AION};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A free UDP port on loopback.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("port")
}

/// Runs `aion --data-dir DIR args…`; returns stdout, panics with stderr on failure.
fn aion(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(AION).arg("--data-dir").arg(dir).args(args).output().expect("run aion");
    assert!(out.status.success(), "aion {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into()
}

/// Data dirs for `names`: a cluster CA made in the first, an identity issued for each.
fn identities(names: &[&str]) -> Vec<tempfile::TempDir> {
    let dirs: Vec<tempfile::TempDir> = names.iter().map(|_| tempfile::tempdir().expect("tmp")).collect();
    aion(dirs[0].path(), &["cluster", "init", "--name", names[0]]);
    for (n, d) in names.iter().zip(&dirs).skip(1) {
        aion(dirs[0].path(), &["cluster", "issue", n, "--out", &d.path().display().to_string()]);
    }
    dirs
}

/// Device `a`: a source of `n` kanbans (checkpointing every 200) whose outputs go to `sink` on device `b`.
fn sender_yaml(n: u64, b_port: u16) -> String {
    format!(
        r#"
deviceName: a
devices:
  b: {{ addr: "127.0.0.1:{b_port}" }}
microservices:
  source:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: {n}, CHUNK: 200 }}
    nextService: {{ default: [ {{ name: sink, device: b }} ] }}
"#
    )
}

/// Device `b`: the sink (recording what it receives), accepting links from `a`.
const RECEIVER_YAML: &str = r#"
deviceName: b
devices:
  a: {}
microservices:
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;

struct Pair {
    a: Runtime,
    b: Runtime,
    b_listen: String,
}

fn pair(n: u64) -> Pair {
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let b_listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(RECEIVER_YAML, db, tempfile::tempdir().expect("tmp"), &["--listen", &b_listen]);
    let a = Runtime::start_full(&sender_yaml(n, port), da, tempfile::tempdir().expect("tmp"), &[]);
    Pair { a, b, b_listen }
}

/// The seqs the sink recorded, in order.
fn seqs(b: &Runtime) -> Vec<i64> {
    read_lines(&b.path("sink.jsonl")).iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect()
}

/// Waits until every seq 1..=n reached the sink; returns the seqs in arrival order.
fn wait_all(b: &Runtime, n: u64, limit: Duration) -> Vec<i64> {
    wait_until("every kanban at the sink on device b", limit, || {
        let s = seqs(b);
        let distinct: std::collections::BTreeSet<i64> = s.iter().copied().collect();
        (distinct.len() as u64 >= n).then_some(s)
    })
}

/// Checks that the first arrival of each seq is in order (the route's order), and returns how many arrived
/// twice.
fn in_order_with_duplicates(s: &[i64], n: u64) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    let firsts: Vec<i64> = s.iter().copied().filter(|x| seen.insert(*x)).collect();
    assert_eq!(firsts, (1..=n as i64).collect::<Vec<_>>(), "every kanban, first arrivals in the route's order");
    s.len() - firsts.len()
}

fn device<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["federation"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no device {name} in {status}"))
}

#[test]
fn a_pipeline_crosses_two_devices_in_order_exactly_once() {
    let n = 20_000;
    let p = pair(n);
    let s = wait_all(&p.b, n, Duration::from_secs(120));
    assert_eq!(s, (1..=n as i64).collect::<Vec<_>>(), "in order, each once (no cut, no crash)");
    let st = wait_until("device a to see every kanban acknowledged", Duration::from_secs(30), || {
        let st = p.a.status();
        (device(&st, "b")["acked"] == n && device(&st, "b")["outbox"] == 0).then_some(st)
    });
    assert_eq!(device(&st, "b")["state"], "up");
    assert!(device(&st, "b")["last_seen_ms"].as_u64().is_some_and(|ms| ms < 10_000), "{st}");
    let sb = p.b.status();
    assert_eq!(device(&sb, "a")["received"], n);
    assert_eq!(device(&sb, "a")["duplicates"], 0);
    assert_eq!(sb["federation"]["listen"], p.b_listen.as_str());
    // The link in /metrics: up, everything sent, nothing waiting.
    let (_, metrics) = common::http_get(st["http"].as_str().expect("http address"), "/metrics");
    let value = |name: &str| -> f64 {
        let prefix = format!("{name}{{device=\"b\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {name}:\n{metrics}"));
        line[prefix.len()..].trim().parse().expect("a number")
    };
    assert_eq!(value("aion_link_up"), 1.0);
    assert!(value("aion_link_kanbans_sent_total") >= n as f64);
    assert_eq!(value("aion_outbox_kanbans"), 0.0);
    assert_eq!(value("aion_outbox_oldest_unacknowledged_age_seconds"), 0.0);
    // The table names the devices and their links.
    let (ok, table, _) = p.a.cli(&["status"]);
    assert!(
        ok && table.contains("cluster: device a") && table.lines().any(|l| l.starts_with("b ") && l.contains(" up ")),
        "{table}"
    );
}

#[test]
fn a_receiver_killed_mid_flow_gets_everything_after_it_restarts() {
    let n = 30_000;
    let mut p = pair(n);
    wait_until("the flow to start", Duration::from_secs(60), || {
        (common::line_count(&p.b.path("sink.jsonl")) >= 2000).then_some(())
    });
    p.b.kill9();
    // The sender sees the link go down within the heartbeat bound, and keeps the rest in its outbox.
    let st = wait_until("device a to see the link down with kanbans waiting", Duration::from_secs(30), || {
        let st = p.a.status();
        let d = device(&st, "b");
        (d["state"] != "up" && d["outbox"].as_u64().unwrap_or(0) > 0).then(|| st.clone())
    });
    assert!(device(&st, "b")["state"] == "down" || device(&st, "b")["state"] == "connecting", "{st}");
    let args = ["--listen", p.b_listen.as_str()];
    let b2 = p.b.crash_and_restart_with(RECEIVER_YAML, &args);
    let s = wait_all(&b2, n, Duration::from_secs(180));
    let dups = in_order_with_duplicates(&s, n);
    eprintln!("receiver restarted: {dups} duplicates of {n}");
    // Only what b had committed and not yet acknowledged when it was killed (one credit window), plus what its
    // sink had taken and not acknowledged, can come again.
    assert!(dups <= 4096 + 1024, "{dups} duplicates");
    wait_until("the outbox to drain", Duration::from_secs(30), || {
        let st = p.a.status();
        (device(&st, "b")["outbox"] == 0 && device(&st, "b")["state"] == "up").then_some(())
    });
}

#[test]
fn a_sender_killed_mid_flow_resumes_from_its_durable_outbox() {
    let n = 30_000;
    let mut p = pair(n);
    wait_until("the flow to start", Duration::from_secs(60), || {
        (common::line_count(&p.b.path("sink.jsonl")) >= 2000).then_some(())
    });
    let port: u16 = p.b_listen.rsplit_once(':').and_then(|(_, x)| x.parse().ok()).expect("port");
    let a2 = p.a.crash_and_restart_with(&sender_yaml(n, port), &[]);
    let s = wait_all(&p.b, n, Duration::from_secs(180));
    let dups = in_order_with_duplicates(&s, n);
    eprintln!("sender restarted: {dups} duplicates of {n}");
    // The source resumes after its last checkpoint (at most 200 again); the outbox's unacknowledged kanbans are
    // recognised by b (it did not restart).
    assert!(dups <= 200, "{dups} duplicates");
    let sb = p.b.status();
    assert!(device(&sb, "a")["received"].as_u64().unwrap_or(0) >= n);
    drop(a2);
}

#[test]
fn a_kanban_for_a_service_the_other_device_lacks_is_a_dead_letter_there_and_leaves_the_outbox() {
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(RECEIVER_YAML, db, tempfile::tempdir().expect("tmp"), &["--listen", &listen]);
    let yaml = sender_yaml(3, port).replace("name: sink, device: b", "name: nowhere, device: b");
    let a = Runtime::start_full(&yaml, da, tempfile::tempdir().expect("tmp"), &[]);
    let sb = b.wait_status("three dead letters on b", |s| s["dead_letters"]["unknown-service"] == 3);
    assert_eq!(device(&sb, "a")["undeliverable"], 3);
    assert!(sb["recent_dead_letters"].to_string().contains("from device `a`"), "{sb}");
    a.wait_status("a's outbox to drain", |s| device(s, "b")["outbox"] == 0 && device(s, "b")["acked"] == 3);
}

/// Starts device `a` from `data` (its identity however it was made) dialling b at `port`, waits until b counts
/// one more refusal for `reason`, and checks that a shows its link as not up.
fn refused(b: &Runtime, data: tempfile::TempDir, name: &str, port: u16, reason: &str) {
    let before = b.status()["federation"]["refused"][reason].as_u64().unwrap_or(0);
    let yaml = sender_yaml(5, port).replace("deviceName: a", &format!("deviceName: {name}"));
    let a = Runtime::start_full(&yaml, data, tempfile::tempdir().expect("tmp"), &[]);
    b.wait_status(&format!("b to refuse {name} ({reason})"), |s| {
        s["federation"]["refused"][reason].as_u64().unwrap_or(0) > before
    });
    let st = a.status();
    assert_ne!(device(&st, "b")["state"], "up", "{st}");
    assert!(b.stderr().contains("federation link refused"), "the reason is logged");
}

#[test]
fn peers_without_a_valid_identity_are_refused_and_counted() {
    let mut dirs = identities(&["b", "a", "c", "x"]).into_iter();
    let (db, da, dc, dx) = (dirs.next().unwrap(), dirs.next().unwrap(), dirs.next().unwrap(), dirs.next().unwrap());
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    // b knows a and x (not c); x will be revoked before b starts.
    aion(db.path(), &["cluster", "remove", "x"]);
    let yaml = RECEIVER_YAML.replace("  a: {}", "  a: {}\n  x: {}");
    let b = Runtime::start_full(&yaml, db, tempfile::tempdir().expect("tmp"), &["--listen", &listen]);

    // A certificate from another cluster's CA.
    let other = tempfile::tempdir().expect("tmp");
    aion(other.path(), &["cluster", "init", "--name", "a"]);
    refused(&b, other, "a", port, "tls");
    // A revoked certificate.
    refused(&b, dx, "x", port, "tls");
    // A device b does not list.
    refused(&b, dc, "c", port, "unknown-device");
    // A device claiming to be a with c's certificate.
    let forged = tempfile::tempdir().expect("tmp");
    copy_dir(&da.path().join("cluster"), &forged.path().join("cluster"));
    let c_cert = tempfile::tempdir().expect("tmp");
    aion(b.data.path(), &["cluster", "issue", "c", "--out", &c_cert.path().display().to_string()]);
    for f in ["node.pem", "node.key"] {
        std::fs::copy(c_cert.path().join("cluster").join(f), forged.path().join("cluster").join(f)).expect("copy");
    }
    refused(&b, forged, "a", port, "wrong-name");
    // Nothing reached the sink, and b still takes the real a.
    assert!(read_lines(&b.path("sink.jsonl")).is_empty());
    let a = Runtime::start_full(&sender_yaml(5, port), da, tempfile::tempdir().expect("tmp"), &[]);
    let s = wait_all(&b, 5, Duration::from_secs(60));
    assert_eq!(s, vec![1, 2, 3, 4, 5]);
    drop(a);
    let counts: BTreeMap<String, u64> =
        serde_json::from_value(b.status()["federation"]["refused"].clone()).expect("counts");
    assert!(counts["tls"] >= 2 && counts["unknown-device"] >= 1 && counts["wrong-name"] >= 1, "{counts:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn cluster_commands_explain_what_is_missing() {
    let d = tempfile::tempdir().expect("tmp");
    let out = Command::new(AION)
        .arg("--data-dir")
        .arg(d.path())
        .args(["cluster", "issue", "w1", "--out", "/tmp/x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("aion cluster init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --name, the host name (when it can name a device).
    let h = tempfile::tempdir().expect("tmp");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
    let out = Command::new(AION).arg("--data-dir").arg(h.path()).args(["cluster", "init"]).output().expect("run");
    if out.status.success() {
        assert_eq!(std::fs::read_to_string(h.path().join("cluster/node.name")).expect("name").trim(), host);
    } else {
        assert!(String::from_utf8_lossy(&out.stderr).contains("--name"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    aion(d.path(), &["cluster", "init", "--name", "m"]);
    let again = Command::new(AION)
        .arg("--data-dir")
        .arg(d.path())
        .args(["cluster", "init", "--name", "m"])
        .output()
        .expect("run");
    assert!(!again.status.success(), "a second CA is refused");
    let bad = Command::new(AION)
        .arg("--data-dir")
        .arg(d.path())
        .args(["cluster", "issue", "no good", "--out", "/tmp/x"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot name a device"));
    // --listen without an identity is an error at start, not a silent single mode.
    let e = tempfile::tempdir().expect("tmp");
    let yml = e.path().join("s.yml");
    std::fs::write(&yml, "deviceName: z\nmicroservices: {}\n").expect("write");
    let run = Command::new(AION)
        .arg("--data-dir")
        .arg(e.path())
        .arg("run")
        .arg(&yml)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("no cluster identity"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// A raw QUIC client holding device `a`'s real identity (from its data dir): a peer that authenticates and
/// then misbehaves.
fn raw_client(a_data: &Path, rt: &tokio::runtime::Runtime) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = a_data.join("cluster");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).expect("ca")).expect("root");
    let chain = vec![CertificateDer::from_pem_file(dir.join("node.pem")).expect("cert")];
    let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    c.alpn_protocols = vec![aion::transport::federation::ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(c).expect("quic");
    let _g = rt.enter();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(q)));
    ep
}

fn frame(f: &aion::transport::federation::Frame) -> Vec<u8> {
    let mut v = Vec::new();
    aion::transport::codec::encode_into(f, &mut v).expect("encode");
    v
}

#[test]
fn garbage_from_an_authenticated_peer_closes_its_link_and_loses_nothing_already_taken() {
    use aion::transport::federation::{Crossing, Frame};
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(RECEIVER_YAML, db, tempfile::tempdir().expect("tmp"), &["--listen", &listen]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    let ep = raw_client(da.path(), &rt);
    let to: std::net::SocketAddr = listen.parse().expect("addr");
    let refused = |b: &Runtime| b.status()["federation"]["refused"]["protocol"].as_u64().unwrap_or(0);

    // Garbage instead of a hello.
    rt.block_on(async {
        let conn = ep.connect(to, "b").expect("connect").await.expect("handshake");
        let (mut s, mut r) = conn.open_bi().await.expect("stream");
        s.write_all(&[0xff; 64]).await.expect("write");
        let mut buf = vec![0u8; 4096];
        // b answers with a refusal (or closes): never a hang.
        let got = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await.expect("an answer");
        let _ = got;
    });
    b.wait_status("the garbage hello counted", |s| s["federation"]["refused"]["protocol"].as_u64().unwrap_or(0) >= 1);

    // A proper hello and one kanban, then garbage on the kanban stream.
    let before = refused(&b);
    rt.block_on(async {
        let conn = ep.connect(to, "b").expect("connect").await.expect("handshake");
        let (mut cs, mut cr) = conn.open_bi().await.expect("stream");
        cs.write_all(&frame(&Frame::Hello { min: 1, max: 1, from: "a".into(), to: "b".into() })).await.expect("hello");
        let welcome: Frame = read_msg(&mut cr).await;
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        let (mut ds, mut dr) = conn.open_bi().await.expect("data stream");
        let mut md = aion::model::Metadata::new();
        md.insert("seq".into(), 1u64.into());
        let k = aion::model::Kanban {
            id: aion::model::KanbanId(42),
            process_number: 1,
            metadata: md,
            ..Default::default()
        };
        let items = vec![Crossing { service: "sink".into(), hops: 1, kanban: k.into_wire() }];
        ds.write_all(&frame(&Frame::Kanbans { first: 0, items })).await.expect("kanbans");
        let ack: Frame = read_msg(&mut dr).await;
        assert_eq!(ack, Frame::Ack { upto: 1 }, "the kanban is committed on b before its ack");
        ds.write_all(&[0x05, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x00]).await.expect("garbage");
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        assert!(closed.is_ok(), "b closes the link of a peer that sends garbage");
    });
    b.wait_status("the broken link counted", |s| s["federation"]["refused"]["protocol"].as_u64().unwrap_or(0) > before);
    // What was taken before the garbage is delivered; b goes on taking the real a.
    let first = wait_until("the kanban sent before the garbage at the sink", Duration::from_secs(20), || {
        let l = read_lines(&b.path("sink.jsonl"));
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(first[0]["metadata"]["seq"], 1);
    let _a = Runtime::start_full(&sender_yaml(5, port), da, tempfile::tempdir().expect("tmp"), &[]);
    wait_until("a's kanbans after the garbage", Duration::from_secs(60), || (seqs(&b).len() >= 6).then_some(()));
    assert!(b.stderr().contains("malformed frame"), "the reason is logged");
}

#[test]
fn each_device_can_have_its_own_outbox_age_bound() {
    let mut dirs = identities(&["a", "b", "c"]).into_iter();
    let da = dirs.next().expect("a");
    // Nobody listens at either: b (bound 2 s in its `devices:` entry) and c (the runtime's 7 days) are unreachable.
    let (pb, pc) = (free_udp_port(), free_udp_port());
    let yaml = format!(
        r#"
deviceName: a
devices:
  b: {{ addr: "127.0.0.1:{pb}", outboxMaxAge: 2s, outboxKanbans: 4, outboxBytes: 1MiB }}
  c: {{ addr: "127.0.0.1:{pc}" }}
microservices:
  source:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: 6, CHUNK: 200 }}
    nextService: {{ default: [ {{ name: sink, device: b }}, {{ name: sink, device: c }} ] }}
"#
    );
    let a = Runtime::start_full(&yaml, da, tempfile::tempdir().expect("tmp"), &["--peer-timeout", "1"]);
    let st = a.wait_status("b's six kanbans expired", |s| device(s, "b")["expired"] == 6);
    assert_eq!(st["dead_letters"]["expired"], 6, "only b's: {st}");
    let st = a.wait_status("b's outbox empty", |s| device(s, "b")["outbox"] == 0);
    assert_eq!(device(&st, "c")["outbox"], 6, "c's wait (the runtime's bound): {st}");
    assert_eq!(device(&st, "c")["expired"], 0, "{st}");
}

#[test]
fn kanbans_for_a_device_unreachable_past_the_age_bound_become_dead_letters_and_leave_the_store() {
    let mut dirs = identities(&["a", "b"]).into_iter();
    let da = dirs.next().expect("a");
    // Nobody listens there: b is unreachable for good.
    let port = free_udp_port();
    let yaml = sender_yaml(10, port);
    let mut a = Runtime::start_full(
        &yaml,
        da,
        tempfile::tempdir().expect("tmp"),
        &["--outbox-max-age", "2s", "--peer-timeout", "1"],
    );
    let st = a.wait_status("the ten kanbans expired", |s| s["dead_letters"]["expired"] == 10);
    assert_eq!(device(&st, "b")["expired"], 10);
    a.wait_status("the outbox empty", |s| device(s, "b")["outbox"] == 0);
    assert!(st["recent_dead_letters"].to_string().contains("unreachable for longer than the outbox age bound"), "{st}");
    // They left the store too: after a restart nothing waits for b.
    let args = ["--outbox-max-age", "2s", "--peer-timeout", "1"];
    let a2 = a.crash_and_restart_with(&yaml, &args);
    let st = a2.status();
    assert_eq!(device(&st, "b")["outbox"], 0, "{st}");
}

#[test]
fn a_trace_on_a_peer_device_shows_the_hops_on_the_devices_it_reaches() {
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let b_listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(
        RECEIVER_YAML,
        db,
        tempfile::tempdir().expect("tmp"),
        &["--listen", &b_listen, "--archive"],
    );
    let a = Runtime::start_full(&sender_yaml(3, port), da, tempfile::tempdir().expect("tmp"), &["--archive"]);
    wait_all(&b, 3, Duration::from_secs(60));
    let id = read_lines(&b.path("sink.jsonl"))[0]["id"].as_str().expect("id").to_owned();
    // No master: device a asks b (which it dials) for b's rows of the chain.
    let rows = wait_until("both devices' hops", Duration::from_secs(30), || {
        let (ok, out, _) = a.cli(&["kanban", "trace", &id, "--json"]);
        let rows: Vec<serde_json::Value> = if ok { common::json_lines(&out) } else { Vec::new() };
        let devices: std::collections::BTreeSet<String> =
            rows.iter().filter_map(|r| r["device"].as_str().map(str::to_owned)).collect();
        (devices.len() == 2).then_some(rows)
    });
    let trace = rows[0]["trace_id"].clone();
    assert!(rows.iter().all(|r| r["trace_id"] == trace), "one chain: {rows:?}");
    assert!(
        rows.iter().any(|r| r["device"] == "b" && r["to"].as_str().is_some_and(|t| t.starts_with("sink"))),
        "{rows:?}"
    );
    // b cannot dial a (no address): its own rows only, and no error.
    let (ok, out, err) = b.cli(&["kanban", "trace", &id, "--json"]);
    assert!(ok, "{err}");
    assert!(common::json_lines(&out).iter().all(|r| r["device"] == "b"), "{out}");
    // A peer device may ask for trace rows, nothing else.
    let before = b.status()["federation"]["refused"]["not-admin"].as_u64().unwrap_or(0);
    let (ok, _, err) = a.cli(&["--remote", &format!("b@{b_listen}"), "status"]);
    assert!(!ok && err.contains("needs an admin identity"), "{err}");
    b.wait_status("the refusal counted", |s| s["federation"]["refused"]["not-admin"].as_u64().unwrap_or(0) > before);
}

// ------------------------------------------------------------------------------------------------ Send Anything

/// Every file under `dir` (relative name → bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(p: &Path, name: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).expect("read_dir").flatten() {
                walk(&e.path(), &format!("{name}/{}", e.file_name().to_string_lossy()), out);
            }
        } else {
            out.insert(name.to_owned(), std::fs::read(p).expect("read"));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, ".", &mut out);
    out
}

/// a (a source writing a tree per kanban) > b (the sink), b listening.
fn files_pair(env: &str, n: u64) -> (Runtime, Runtime, String) {
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(RECEIVER_YAML, db, tempfile::tempdir().expect("tmp"), &["--listen", &listen]);
    let yaml = format!(
        r#"
deviceName: a
devices:
  b: {{ addr: "127.0.0.1:{port}" }}
microservices:
  source:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ EMIT_COUNT: {n}, CHUNK: 1, {env} }}
    nextService: {{ default: [ {{ name: sink, device: b }} ] }}
"#
    );
    let a = Runtime::start_full(&yaml, da, tempfile::tempdir().expect("tmp"), &["--archive"]);
    (a, b, listen)
}

#[test]
fn files_travel_with_their_kanban_and_are_verified_in_place_before_it_is_delivered() {
    let (a, b, _) = files_pair("FILES: 7, BIG_MB: 3", 3);
    let lines = wait_until("three kanbans with their files at the sink", Duration::from_secs(120), || {
        let l = read_lines(&b.path("sink.jsonl"));
        (l.len() >= 3).then_some(l)
    });
    let b_data = b.data.path().canonicalize().expect("canon");
    for l in &lines {
        let seq = l["metadata"]["seq"].as_u64().expect("seq");
        let id = l["id"].as_str().expect("id");
        let dir = b_data.join("Data/sink_1").join(id);
        // fileList and dataPath rewritten to b's paths.
        assert_eq!(l["data_path"], dir.display().to_string(), "{l}");
        let entry = dir.join(format!("files-{seq}"));
        assert_eq!(l["file_list"], serde_json::json!([entry.display().to_string()]), "{l}");
        // Every file was there, whole, when the sink handled the kanban...
        let found = &l["files"][0];
        assert!(found.is_array(), "the files were there before the kanban: {l}");
        let source = a.data.path().join("Data/source_1").join(format!("files-{seq}"));
        let want = tree(&source);
        assert_eq!(found.as_array().map(Vec::len), Some(want.len()), "{l}");
        // ...and byte-identical to the source's.
        assert_eq!(tree(&entry), want, "kanban {seq}: the tree arrived byte-identical");
    }
    let st = a.status();
    let files = &device(&st, "b")["files"];
    assert_eq!(files["sent_files"], 3 * 8, "{st}");
    assert_eq!(files["failed"], 0, "{st}");
    let sb = b.status();
    assert_eq!(device(&sb, "a")["files"]["received_files"], 3 * 8, "{sb}");
    // Visible: totals in the status table, the transfer in the kanban's trace, nothing left in progress.
    let (ok, table, _) = a.cli(&["status"]);
    assert!(ok && table.contains("b: sent 24 files"), "{table}");
    let id = lines[0]["id"].as_str().expect("id");
    let trace = wait_until("the transfer in the trace", Duration::from_secs(30), || {
        let (ok, out, _) = a.cli(&["kanban", "trace", id]);
        (ok && out.contains("files-sent")).then_some(out)
    });
    assert!(trace.contains("sink@b"), "{trace}");
    let (ok, now, _) = a.cli(&["transfers"]);
    assert!(ok && now.contains("no transfers in progress"), "{now}");
    // Nothing half-written stays behind on b.
    let staging = b_data.join("Data/.transfers");
    let partials: Vec<_> = walk_names(&staging).into_iter().filter(|n| n.ends_with(".part")).collect();
    assert!(partials.is_empty(), "{partials:?}");
}

fn walk_names(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk_names(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_kanban_whose_files_cannot_be_sent_is_a_dead_letter_with_the_reason() {
    let (a, b, _) = files_pair("FILE_LIST: \"/etc/hostname\"", 1);
    let st = a.wait_status("the kanban dead-lettered", |s| s["dead_letters"]["file-unreadable"] == 1);
    assert!(st["recent_dead_letters"].to_string().contains("outside the roots"), "{st}");
    assert_eq!(device(&st, "b")["files"]["failed"], 1, "{st}");
    a.wait_status("it left the outbox", |s| device(s, "b")["outbox"] == 0);
    let (a2, _b2, _) = files_pair("FILE_LIST: \"Data/nope\"", 1);
    let st = a2.wait_status("the kanban dead-lettered", |s| s["dead_letters"]["file-unreadable"] == 1);
    assert!(st["recent_dead_letters"].to_string().contains("No such file"), "{st}");
    // Never a kanban whose files are missing at the sink.
    assert!(read_lines(&b.path("sink.jsonl")).is_empty());
}

/// Reads one message (a federation frame, a files-protocol message) from a raw client's stream.
async fn read_msg<T: serde::de::DeserializeOwned>(r: &mut quinn::RecvStream) -> T {
    let mut dec = aion::transport::FrameDecoder::default();
    loop {
        if let Some(m) = dec.decode::<T>().expect("message") {
            return m;
        }
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read")
            .expect("open");
        dec.push(&buf[..n]);
    }
}

#[test]
fn hostile_file_names_from_an_authenticated_peer_are_refused_and_a_done_file_is_not_written_twice() {
    use aion::transport::federation::Frame;
    use aion::transport::files::{chunk_header, end_marker, root, FileMsg};
    let mut dirs = identities(&["a", "b"]).into_iter();
    let (da, db) = (dirs.next().expect("a"), dirs.next().expect("b"));
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let b = Runtime::start_full(RECEIVER_YAML, db, tempfile::tempdir().expect("tmp"), &["--listen", &listen]);
    let kid = "000000000000000000000000000000aa";
    let target = b.data.path().join("Data/sink_1").join(kid);
    // A symbolic link planted in the target directory, pointing outside.
    let outside = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(&target).expect("dir");
    std::os::unix::fs::symlink(outside.path(), target.join("esc")).expect("symlink");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    let ep = raw_client(da.path(), &rt);
    let to: std::net::SocketAddr = listen.parse().expect("addr");
    let open = |path: &str, size: u64, service: &str| FileMsg::Open {
        transfer: "0123456789abcdef0123456789abcdef".into(),
        kanban: kid.into(),
        service: service.into(),
        instance: 1,
        index: 0,
        path: path.into(),
        size,
        mtime_ns: 1,
    };
    let encode = |m: &FileMsg| {
        let mut v = Vec::new();
        aion::transport::codec::encode_into(m, &mut v).expect("encode");
        v
    };
    rt.block_on(async {
        let conn = ep.connect(to, "b").expect("connect").await.expect("handshake");
        let (mut cs, mut cr) = conn.open_bi().await.expect("stream");
        cs.write_all(&frame(&Frame::Hello { min: 1, max: 1, from: "a".into(), to: "b".into() })).await.expect("hello");
        let welcome: Frame = read_msg(&mut cr).await;
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        let (mut ds, _dr) = conn.open_bi().await.expect("kanban stream");
        // The kanban stream exists once something is sent on it: an empty batch.
        ds.write_all(&frame(&Frame::Kanbans { first: 0, items: vec![] })).await.expect("empty batch");
        let refused = |m: FileMsg| matches!(m, FileMsg::Refused { retry: false, .. });
        for name in ["../escape", "/etc/evil", "a/../../b", "x/./y", "x\0y", "esc/pwned", "", "a//b"] {
            let (mut s, mut r) = conn.open_bi().await.expect("file stream");
            s.write_all(&encode(&open(name, 5, "sink"))).await.expect("open");
            let m = read_msg::<FileMsg>(&mut r).await;
            assert!(refused(m.clone()), "{name:?}: {m:?}");
        }
        let (mut s, mut r) = conn.open_bi().await.expect("file stream");
        s.write_all(&encode(&open("x", 5, "nosuch"))).await.expect("open");
        assert!(refused(read_msg::<FileMsg>(&mut r).await), "a service b does not run");
        // A good file, whole: placed.
        let data = b"hello";
        let send_file = |conn: quinn::Connection, corrupt: bool| async move {
            let (mut s, mut r) = conn.open_bi().await.expect("file stream");
            s.write_all(&encode(&open("out/good.txt", data.len() as u64, "sink"))).await.expect("open");
            let at = read_msg::<FileMsg>(&mut r).await;
            if matches!(at, FileMsg::At { path: Some(_), .. }) {
                return at;
            }
            assert!(matches!(at, FileMsg::At { offset: 0, .. }), "{at:?}");
            let (h, hash) = chunk_header(data);
            s.write_all(&h).await.expect("header");
            let body: &[u8] = if corrupt { b"HELLO" } else { data };
            s.write_all(body).await.expect("chunk");
            s.write_all(&end_marker(&root(&[hash]))).await.expect("end");
            let _ = s.finish();
            read_msg::<FileMsg>(&mut r).await
        };
        let bad = send_file(conn.clone(), true).await;
        assert!(matches!(bad, FileMsg::Refused { .. }), "a chunk that does not match its hash: {bad:?}");
        let placed = send_file(conn.clone(), false).await;
        let FileMsg::Placed { path } = placed else { panic!("{placed:?}") };
        assert_eq!(std::fs::read(&path).expect("placed"), data);
        assert!(path.ends_with(&format!("Data/sink_1/{kid}/out/good.txt")), "{path}");
        let before = std::fs::metadata(&path).expect("md").modified().expect("mtime");
        // The same file again (the kanban resent): recognised, not written twice.
        let again = send_file(conn.clone(), false).await;
        assert!(matches!(&again, FileMsg::At { path: Some(p), .. } if *p == path), "{again:?}");
        assert_eq!(std::fs::metadata(&path).expect("md").modified().expect("mtime"), before);
    });
    assert_eq!(std::fs::read_dir(outside.path()).expect("dir").count(), 0, "nothing written outside");
    assert!(!b.data.path().join("Data/escape").exists() && !Path::new("/etc/evil").exists());
    let st = b.status();
    assert_eq!(st["federation"]["refused"]["file-name"], 8, "{st}");
    assert_eq!(st["federation"]["refused"]["file-protocol"], 1, "the corrupt chunk: {st}");
    assert!(b.stderr().contains("file name refused"), "the reason is logged");
}
