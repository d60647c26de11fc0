//! Cluster mode with a master-aion and worker-aions, as real processes on loopback: joining with tokens,
//! `aion apply` placing services by `targetNode`, kanbans crossing nodes, a changed project restarting only
//! what changed, offline autonomy of a worker, a master restart, and refused or revoked nodes.
// A test fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{example, read_lines, wait_until, Runtime, AION};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("port")
}

/// `aion --data-dir DIR args…`: (ok, stdout, stderr).
fn aion(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(AION).arg("--data-dir").arg(dir).args(args).output().expect("run aion");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn token(master: &Path) -> String {
    let (ok, out, err) = aion(master, &["cluster", "token", "--ttl", "10m"]);
    assert!(ok, "{err}");
    out.lines().last().expect("token line").trim().to_owned()
}

struct Cluster {
    master: Runtime,
    workers: Vec<Runtime>,
    master_addr: String,
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn start_worker(master_addr: &str, token: &str, name: &str) -> Runtime {
    start_worker_with(master_addr, token, name, &[])
}

fn start_worker_with(master_addr: &str, token: &str, name: &str, extra: &[&str]) -> Runtime {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut cmd =
        argv(&["worker", "--join", master_addr, "--token", token, "--name", name, "--listen", &listen, "--grace", "5"]);
    cmd.extend(argv(extra));
    Runtime::start_cmd(&[], tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"), &cmd)
}

fn cluster(workers: &[&str]) -> Cluster {
    cluster_with(workers, &[])
}

fn cluster_with(workers: &[&str], extra: &[&str]) -> Cluster {
    let data = tempfile::tempdir().expect("tmp");
    let (ok, _, err) = aion(data.path(), &["cluster", "init", "--name", "m"]);
    assert!(ok, "{err}");
    let master_addr = format!("127.0.0.1:{}", free_udp_port());
    let mut cmd = argv(&["master", "--name", "m", "--listen", &master_addr, "--grace", "5"]);
    cmd.extend(argv(extra));
    let master = Runtime::start_cmd(&[], data, tempfile::tempdir().expect("tmp"), &cmd);
    let workers =
        workers.iter().map(|w| start_worker_with(&master_addr, &token(master.data.path()), w, extra)).collect();
    Cluster { master, workers, master_addr }
}

/// source on w1 > relay on w2 > sink on the master (no targetNode).
fn project(n: u64, relay_env: &str, sink_dir: &Path) -> String {
    format!(
        r#"
microservices:
  source:
    command: ["{kit}"]
    startup: yes
    targetNode: w1
    env: {{ EMIT_COUNT: {n}, CHUNK: 500 }}
    nextService: {{ default: [ {{ name: relay }} ] }}
  relay:
    command: ["{kit}"]
    always: yes
    startup: yes
    targetNode: w2
    env: {{ FORWARD: 1{relay_env} }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{kit}"]
    always: yes
    startup: yes
    env: {{ RECORD: "{sink}/sink.jsonl" }}
"#,
        kit = example("testkit"),
        sink = sink_dir.display()
    )
}

fn apply(master: &Runtime, yaml: &str) -> String {
    let f = master.path(&format!("project-{}.yml", std::process::id()));
    std::fs::write(&f, yaml).expect("write");
    let (ok, out, err) = master.cli(&["apply", &f.display().to_string()]);
    assert!(ok, "apply failed: {err}");
    out
}

fn node<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["cluster"]["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|x| x["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn pid_on(st: &serde_json::Value, node_name: &str, service: &str) -> u64 {
    node(st, node_name)["instances"]
        .as_array()
        .and_then(|i| i.iter().find(|x| x["service"] == service))
        .and_then(|x| x["pid"].as_u64())
        .unwrap_or(0)
}

fn all_connected(st: &serde_json::Value, names: &[&str]) -> bool {
    names.iter().all(|n| node(st, n)["connected"] == true)
}

fn wait_sink(dir: &Path, n: u64, limit: Duration) -> Vec<i64> {
    wait_until("every kanban at the sink on the master", limit, || {
        let s: Vec<i64> =
            read_lines(&dir.join("sink.jsonl")).iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
        let d: BTreeSet<i64> = s.iter().copied().collect();
        (d.len() as u64 >= n).then_some(s)
    })
}

#[test]
fn the_master_places_services_on_its_workers_and_kanbans_cross_them() {
    let c = cluster(&["w1", "w2"]);
    let st = c.master.wait_status("both workers attached", |s| all_connected(s, &["m", "w1", "w2"]));
    assert_eq!(node(&st, "w1")["role"], "worker");
    let sink_dir = tempfile::tempdir().expect("tmp");
    let n = 10_000;
    let out = apply(&c.master, &project(n, "", sink_dir.path()));
    assert!(out.contains("added: relay sink source"), "{out}");
    let s = wait_sink(sink_dir.path(), n, Duration::from_secs(120));
    assert_eq!(s, (1..=n as i64).collect::<Vec<_>>(), "every kanban, in order, once");
    // Each node runs only its own services; the master sees all of them.
    let st = c.master.wait_status("every node reporting its instances", |s| {
        pid_on(s, "w1", "source") > 0 && pid_on(s, "w2", "relay") > 0 && pid_on(s, "m", "sink") > 0
    });
    let services = |name: &str| -> Vec<String> {
        node(&st, name)["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["service"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        (services("w1"), services("w2"), services("m")),
        (vec!["source".to_owned()], vec!["relay".to_owned()], vec!["sink".to_owned()])
    );
    let w1 = c.workers[0].status();
    assert_eq!(w1["instances"].as_array().unwrap().len(), 1, "w1 was sent only its own service: {w1}");
    assert_eq!(w1["cluster"]["master"], "m");
    // --node filters; the table names every node.
    let (ok, one, _) = c.master.cli(&["status", "--json", "--node", "w2"]);
    assert!(ok);
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["cluster"]["nodes"].as_array().unwrap().len(), 1);
    let (_, table, _) = c.master.cli(&["status"]);
    assert!(
        table.contains("cluster (master m)") && table.lines().any(|l| l.starts_with("w2 ") && l.contains("relay")),
        "{table}"
    );

    // A changed project restarts only what changed, where it runs.
    let (source, relay, sink) = (pid_on(&st, "w1", "source"), pid_on(&st, "w2", "relay"), pid_on(&st, "m", "sink"));
    let out = apply(&c.master, &project(n, ", X: 2", sink_dir.path()));
    assert!(out.contains("changed (restarted): relay") && out.contains("added: -"), "{out}");
    let st = c.master.wait_status("relay restarted on w2", |s| {
        let p = pid_on(s, "w2", "relay");
        p > 0 && p != relay
    });
    assert_eq!(pid_on(&st, "w1", "source"), source, "source untouched");
    assert_eq!(pid_on(&st, "m", "sink"), sink, "sink untouched");
}

#[test]
fn a_worker_runs_its_last_assignment_while_the_master_is_away_and_everything_converges_after() {
    let mut c = cluster(&["w1", "w2"]);
    c.master.wait_status("both workers attached", |s| all_connected(s, &["w1", "w2"]));
    let sink_dir = tempfile::tempdir().expect("tmp");
    apply(&c.master, &project(100, "", sink_dir.path()));
    wait_sink(sink_dir.path(), 100, Duration::from_secs(60));
    c.master.kill9();
    // w1 restarts while the master is down: it runs what it had.
    let w1 = c.workers.remove(0);
    let mut w1 = w1;
    let w1b = w1.crash_and_restart("");
    let st = w1b.wait_status("w1 running its last assignment without the master", |s| {
        s["instances"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x["service"] == "source" && x["pid"].as_u64().unwrap_or(0) > 0))
            && s["cluster"]["master_connected"] == false
    });
    assert_eq!(st["cluster"]["master"], "m");
    // The master comes back: the workers reconnect and its status converges.
    let mb = c.master.crash_and_restart("");
    let st = mb.wait_status("both workers attached again", |s| {
        all_connected(s, &["w1", "w2"]) && pid_on(s, "w1", "source") > 0
    });
    assert!(node(&st, "w1")["last_seen_ms"].as_u64().is_some_and(|ms| ms < 5000));
    // A lost worker is shown as lost within a few seconds.
    let mut w2 = c.workers.remove(0);
    w2.kill9();
    let lost = std::time::Instant::now();
    mb.wait_status("w2 shown as lost", |s| node(s, "w2")["connected"] == false);
    assert!(lost.elapsed() < Duration::from_secs(15), "{:?}", lost.elapsed());
    drop(w1b);
}

#[test]
fn bad_tokens_are_refused_and_a_removed_node_is_cut_off() {
    let c = cluster(&["w1"]);
    c.master.wait_status("w1 attached", |s| all_connected(s, &["w1"]));
    let try_join = |token: &str, name: &str| {
        let d = tempfile::tempdir().expect("tmp");
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let out = Command::new(AION)
            .arg("--data-dir")
            .arg(d.path())
            .args(["worker", "--join", &c.master_addr, "--token", token, "--name", name, "--listen", &listen])
            .output()
            .expect("run");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let t = token(c.master.data.path());
    let wrong = {
        let mut parts: Vec<&str> = t.split(':').collect();
        parts[2] = "00000000000000000000000000000000";
        parts.join(":")
    };
    let (ok, err) = try_join(&wrong, "w9");
    assert!(!ok && err.contains("wrong join token secret"), "{err}");
    let (ok, err) = try_join("garbage", "w9");
    assert!(!ok && err.contains("not a join token"), "{err}");
    // A token pinned to another cluster's CA: the worker refuses the master.
    let other = tempfile::tempdir().expect("tmp");
    assert!(aion(other.path(), &["cluster", "init", "--name", "m"]).0);
    let foreign = token(other.path());
    let (ok, err) = try_join(&foreign, "w9");
    assert!(!ok && err.contains("cannot join"), "{err}");
    // A used token is refused the second time.
    let w2 = start_worker(&c.master_addr, &t, "w2");
    let (ok, err) = try_join(&t, "w3");
    assert!(!ok && err.contains("already used"), "{err}");
    let st = c.master.wait_status("w2 attached", |s| all_connected(s, &["w1", "w2"]));
    assert!(st["federation"]["refused"]["token"].as_u64().unwrap_or(0) >= 2, "{st}");

    // Removing w2 cuts it off: gone from the status, and refused when it tries again.
    let (ok, out, err) = c.master.cli(&["cluster", "remove", "w2"]);
    assert!(ok && out.contains("revoked"), "{out}{err}");
    let before = c.master.status()["federation"]["refused"]["tls"].as_u64().unwrap_or(0);
    c.master.wait_status("w2 gone and refused", |s| {
        node(s, "w2").is_null() && s["federation"]["refused"]["tls"].as_u64().unwrap_or(0) > before
    });
    w2.wait_status("w2 sees its master connection down", |s| s["cluster"]["master_connected"] == false);
}

#[test]
fn a_certificate_close_to_its_expiry_is_renewed_when_the_worker_attaches() {
    let c = cluster(&["w1"]);
    c.master.wait_status("w1 attached", |s| all_connected(s, &["m", "w1"]));
    let mut w1 = c.workers.into_iter().next().expect("w1");
    let dir = w1.data.path().join("cluster");
    let cert_before = std::fs::read_to_string(dir.join("node.pem")).expect("cert");
    // Ten days left: the next attach renews it.
    let soon = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 10 * 86_400;
    std::fs::write(dir.join("node.expires"), format!("{soon}\n")).expect("write");
    let w1b = w1.crash_and_restart("");
    wait_until("the certificate renewed", Duration::from_secs(30), || {
        let left: u64 = std::fs::read_to_string(dir.join("node.expires")).ok()?.trim().parse().ok()?;
        (left > soon + 300 * 86_400).then_some(())
    });
    assert_ne!(std::fs::read_to_string(dir.join("node.pem")).expect("cert"), cert_before);
    // The renewed certificate is used: w1 attaches again after a restart.
    let mut w1b = w1b;
    let w1c = w1b.crash_and_restart("");
    w1c.wait_status("w1 attached with its renewed certificate", |s| s["cluster"]["master_connected"] == true);
}

#[test]
fn a_trace_on_the_master_shows_the_hops_on_every_node() {
    let c = cluster_with(&["w1", "w2"], &["--archive"]);
    c.master.wait_status("both workers attached", |s| all_connected(s, &["w1", "w2"]));
    let sink_dir = tempfile::tempdir().expect("tmp");
    apply(&c.master, &project(3, "", sink_dir.path()));
    let lines = wait_until("three kanbans at the sink", Duration::from_secs(60), || {
        let l = read_lines(&sink_dir.path().join("sink.jsonl"));
        (l.len() >= 3).then_some(l)
    });
    let id = lines[0]["id"].as_str().expect("id").to_owned();
    let rows = wait_until("every node's hops", Duration::from_secs(30), || {
        let (ok, out, _) = c.master.cli(&["kanban", "trace", &id, "--json"]);
        let rows: Vec<serde_json::Value> = if ok { common::json_lines(&out) } else { Vec::new() };
        let devices: BTreeSet<String> = rows.iter().filter_map(|r| r["device"].as_str().map(str::to_owned)).collect();
        (devices.len() == 3).then_some(rows)
    });
    let trace = rows[0]["trace_id"].clone();
    assert!(rows.iter().all(|r| r["trace_id"] == trace), "one chain: {rows:?}");
    let (ok, table, err) = c.master.cli(&["kanban", "trace", &id]);
    assert!(ok, "{err}");
    assert!(table.starts_with("DEVICE") && table.contains("\nw1 ") && table.contains("\nw2 "), "{table}");
}

#[test]
fn an_admin_identity_administers_the_master_from_elsewhere_and_nothing_else_does() {
    let c = cluster(&["w1", "w2"]);
    c.master.wait_status("both workers attached", |s| all_connected(s, &["w1", "w2"]));
    let admin = tempfile::tempdir().expect("tmp");
    let (ok, out, err) =
        c.master.cli(&["cluster", "issue", "alice", "--admin", "--out", &admin.path().display().to_string()]);
    assert!(ok && out.contains("alice.aion-admin"), "{out}{err}");
    let remote = |dir: &Path, args: &[&str]| {
        let mut a = vec!["--remote", c.master_addr.as_str()];
        a.extend_from_slice(args);
        aion(dir, &a)
    };
    // apply, status and delete from the admin's own data dir (no runtime there): over QUIC to the master.
    let sink_dir = tempfile::tempdir().expect("tmp");
    let f = admin.path().join("project.yml");
    std::fs::write(&f, project(5, "", sink_dir.path())).expect("write");
    let (ok, out, err) = remote(admin.path(), &["apply", &f.display().to_string()]);
    assert!(ok, "remote apply: {out}{err}");
    wait_sink(sink_dir.path(), 5, Duration::from_secs(60));
    let (ok, out, err) = remote(admin.path(), &["status", "--json"]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(node(&st, "w1")["connected"], true, "{st}");
    // `stop` is not taken over the network; the runtime goes on.
    let (ok, _, err) = remote(admin.path(), &["stop"]);
    assert!(!ok && err.contains("not taken over the network"), "{err}");
    // A device's identity is not an admin's: refused and counted.
    let w1_dir = c.workers[0].data.path();
    let (ok, _, err) = aion(w1_dir, &["--remote", &format!("m@{}", c.master_addr), "apply", &f.display().to_string()]);
    assert!(!ok && err.contains("needs an admin identity"), "{err}");
    // Both refusals counted: the stop and the device's request.
    let st = c.master.wait_status("the refusals counted", |s| s["federation"]["refused"]["not-admin"] == 2);
    assert!(c.master.stderr().contains("request from `w1` refused"), "{st}");
    // Revoked: refused at the TLS handshake from then on.
    let (ok, out, err) = c.master.cli(&["cluster", "remove", "alice.aion-admin"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = remote(admin.path(), &["status"]);
    assert!(!ok, "a revoked admin is refused: {err}");
    let (ok, out, err) = remote(admin.path(), &["delete"]);
    assert!(!ok, "{out}{err}");
    // The local control socket still administers it.
    let (ok, _, err) = c.master.cli(&["delete"]);
    assert!(ok, "{err}");
}
