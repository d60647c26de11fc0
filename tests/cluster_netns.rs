//! Cluster mode across real network namespaces: a master-aion and two worker-aions, each an `aion` process on
//! its own host (a namespace
//! with a veth into a bridge, addresses in 10.231.0.0/24), so kanbans cross real UDP between hosts, and faults are
//! real: a bridge port taken down, packets dropped by nftables.
//!
//! Needs root (network namespaces). Without it the tests say so and pass (the same scenarios run on loopback in
//! `tests/cluster.rs`); with `AION_REQUIRE_NETNS=1` (CI) they fail instead.
// A test fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{read_lines, wait_until, Runtime, AION};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Hosts on one bridge: host i is namespace `<prefix>-h<i>` at 10.231.0.<i>. Deleted (with their links) on drop.
struct Hosts {
    prefix: String,
    n: usize,
}

impl Hosts {
    /// `n` hosts, or `None` (after saying why) when namespaces cannot be made here and CI does not require them.
    fn new(tag: char, n: usize) -> Option<Hosts> {
        let required = std::env::var("AION_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        let skip = |why: String| {
            assert!(!required, "AION_REQUIRE_NETNS=1 but {why}");
            eprintln!(
                "SKIPPED (needs root and iproute2 for network namespaces; tests/cluster.rs covers loopback): {why}"
            );
            None
        };
        if !nix::unistd::geteuid().is_root() {
            return skip("not root".into());
        }
        let prefix = format!("ak{}{tag}", std::process::id() % 10_000);
        sweep(&prefix);
        let h = Hosts { prefix: prefix.clone(), n };
        let sw = format!("{prefix}-sw");
        let mut cmds: Vec<Vec<String>> = vec![
            vec!["ip".into(), "netns".into(), "add".into(), sw.clone()],
            vec!["ip".into(), "-n".into(), sw.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
            vec![
                "ip".into(),
                "-n".into(),
                sw.clone(),
                "link".into(),
                "add".into(),
                "br0".into(),
                "type".into(),
                "bridge".into(),
            ],
            vec!["ip".into(), "-n".into(), sw.clone(), "link".into(), "set".into(), "br0".into(), "up".into()],
        ];
        for i in 1..=n {
            let (ns, a, b) = (h.ns(i), format!("{prefix}-h{i}-a"), format!("{prefix}-h{i}-b"));
            let addr = format!("{}/24", h.addr(i));
            for c in [
                format!("ip netns add {ns}"),
                format!("ip link add {a} type veth peer name {b}"),
                format!("ip link set {a} netns {ns}"),
                format!("ip link set {b} netns {sw}"),
                format!("ip -n {sw} link set {b} master br0"),
                format!("ip -n {sw} link set {b} up"),
                format!("ip -n {ns} link set lo up"),
                format!("ip -n {ns} link set {a} name eth0"),
                format!("ip -n {ns} addr add {addr} dev eth0"),
                format!("ip -n {ns} link set eth0 up"),
            ] {
                cmds.push(c.split(' ').map(str::to_owned).collect());
            }
        }
        for c in cmds {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            if let Err(e) = sh(&args) {
                return skip(e);
            }
        }
        Some(h)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.231.0.{i}")
    }

    /// The command that runs a program on host `i`.
    fn on(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(i)]
    }

    /// Takes host `i`'s port on the bridge down (`false`) or up (`true`): its link is cut or healed.
    fn link(&self, i: usize, up: bool) {
        let (sw, b) = (format!("{}-sw", self.prefix), format!("{}-h{i}-b", self.prefix));
        sh(&["ip", "-n", &sw, "link", "set", &b, if up { "up" } else { "down" }]).expect("link");
    }

    /// Drops every packet arriving at host `i` from host `from`: the two cannot talk (the others still can).
    fn partition(&self, i: usize, from: usize) {
        self.nft(i, &format!("ip saddr {} drop", self.addr(from)));
    }

    /// Drops `pct` % of the UDP packets arriving at host `i` (nftables `numgen`).
    fn loss(&self, i: usize, pct: u32) {
        self.nft(i, &format!("meta l4proto udp numgen random mod 100 < {pct} drop"));
    }

    /// Adds `rule` to an input chain of host `i` (nftables).
    fn nft(&self, i: usize, rule: &str) {
        let rules = format!(
            "table inet chaos {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables)");
        use std::io::Write;
        c.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("rules");
        assert!(c.wait().expect("nft").success(), "nft rules");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 1..=self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "netns", "del", &format!("{}-sw", self.prefix)]);
    }
}

/// Deletes namespaces a killed earlier run of this test left (same prefix).
fn sweep(prefix: &str) {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&out).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{prefix}-")) {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

fn aion(dir: &Path, args: &[&str]) {
    let out = Command::new(AION).arg("--data-dir").arg(dir).args(args).output().expect("run aion");
    assert!(out.status.success(), "aion {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn device<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["federation"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no device {name} in {status}"))
}

/// Waits until the sink saw every seq 1..=n; checks first arrivals are in order; returns the duplicates.
fn all_in_order(sink: &Runtime, n: u64, limit: Duration) -> usize {
    let s: Vec<i64> = wait_until("every kanban at the sink", limit, || {
        let s: Vec<i64> =
            read_lines(&sink.path("sink.jsonl")).iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
        let distinct: BTreeSet<i64> = s.iter().copied().collect();
        (distinct.len() as u64 >= n).then_some(s)
    });
    let mut seen = BTreeSet::new();
    let firsts: Vec<i64> = s.iter().copied().filter(|x| seen.insert(*x)).collect();
    assert_eq!(firsts, (1..=n as i64).collect::<Vec<_>>(), "nothing lost, first arrivals in order");
    s.len() - firsts.len()
}

/// A cluster on three hosts: worker `w1` (host 1) runs the source, worker `w2` (host 2) the relay, the master
/// `m` (host 3) the sink: `source > relay > sink`, placed by `targetNode`.
fn three_nodes(h: &Hosts, n: u64) -> (Runtime, Runtime, Runtime) {
    let mdata = tempfile::tempdir().expect("tmp");
    aion(mdata.path(), &["cluster", "init", "--name", "m"]);
    let token = |dir: &Path| {
        let out = Command::new(AION).arg("--data-dir").arg(dir).args(["cluster", "token"]).output().expect("token");
        String::from_utf8_lossy(&out.stdout).lines().last().expect("token").trim().to_owned()
    };
    let (t1, t2) = (token(mdata.path()), token(mdata.path()));
    let master_addr = format!("{}:11030", h.addr(3));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let tmp = || tempfile::tempdir().expect("tmp");
    let m = Runtime::start_cmd(&h.on(3), mdata, tmp(), &s(&["master", "--name", "m", "--listen", &master_addr]));
    let w = |i: usize, t: &str, name: &str| {
        let listen = format!("{}:11030", h.addr(i));
        Runtime::start_cmd(
            &h.on(i),
            tmp(),
            tmp(),
            &s(&["worker", "--join", &master_addr, "--token", t, "--name", name, "--listen", &listen]),
        )
    };
    let (w1, w2) = (w(1, &t1, "w1"), w(2, &t2, "w2"));
    m.wait_status("both workers attached", |st| {
        st["cluster"]["nodes"].as_array().is_some_and(|a| a.iter().filter(|x| x["connected"] == true).count() == 3)
    });
    let project = format!(
        "microservices:\n  source:\n    command: [\"{kit}\"]\n    startup: yes\n    targetNode: w1\n    env: {{ EMIT_COUNT: {n}, CHUNK: 500 }}\n    nextService: {{ default: [ {{ name: relay }} ] }}\n  relay:\n    command: [\"{kit}\"]\n    always: yes\n    targetNode: w2\n    env: {{ FORWARD: 1 }}\n    nextService: {{ default: [ {{ name: sink }} ] }}\n  sink:\n    command: [\"{kit}\"]\n    always: yes\n    env: {{ RECORD: \"{work}/sink.jsonl\" }}\n",
        kit = common::example("testkit"),
        work = m.work.path().display()
    );
    let f = m.path("project.yml");
    std::fs::write(&f, project).expect("write");
    let (ok, _, err) = m.cli(&["apply", &f.display().to_string()]);
    assert!(ok, "{err}");
    (w1, w2, m)
}

#[test]
fn a_pipeline_across_three_hosts_survives_a_thirty_second_link_cut() {
    let Some(h) = Hosts::new('c', 3) else { return };
    let n = 100_000;
    let (a, b, c) = three_nodes(&h, n);
    wait_until("the flow to start", Duration::from_secs(60), || {
        (common::line_count(&c.path("sink.jsonl")) >= 5_000).then_some(())
    });
    h.link(2, false);
    let cut = std::time::Instant::now();
    // w1 sees w2's link go down within the heartbeat bound, kanbans wait in its outbox; the master shows w2 lost.
    let st = a.wait_status("w1 to see w2 lost with kanbans waiting", |s| {
        device(s, "w2")["state"] != "up" && device(s, "w2")["outbox"].as_u64().unwrap_or(0) > 0
    });
    eprintln!("w1 saw w2 lost after {:?}: {}", cut.elapsed(), device(&st, "w2"));
    assert!(cut.elapsed() < Duration::from_secs(15), "lost within a few seconds");
    c.wait_status("the master to show w2 lost", |s| {
        s["cluster"]["nodes"].as_array().is_some_and(|a| a.iter().any(|x| x["name"] == "w2" && x["connected"] == false))
    });
    let before = common::line_count(&c.path("sink.jsonl"));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed()));
    h.link(2, true);
    let dups = all_in_order(&c, n, Duration::from_secs(300));
    eprintln!("{before} at the sink when the link was cut; {dups} duplicates after healing");
    assert_eq!(dups, 0, "a cut link loses nothing and repeats nothing (the receivers recognise what comes again)");
    let sa =
        a.wait_status("w1's outbox to drain", |s| device(s, "w2")["outbox"] == 0 && device(s, "w2")["state"] == "up");
    assert!(
        device(&sa, "w2")["resent"].as_u64().unwrap_or(0) > 0,
        "what was in flight at the cut was sent again: {sa}"
    );
    c.wait_status("the master to show w2 back", |s| {
        s["cluster"]["nodes"].as_array().is_some_and(|a| a.iter().all(|x| x["connected"] == true))
    });
    drop(b);
}

#[test]
fn ten_percent_packet_loss_loses_no_kanban() {
    let Some(h) = Hosts::new('l', 3) else { return };
    let n = 20_000;
    h.loss(2, 10);
    let (_a, _b, c) = three_nodes(&h, n);
    let dups = all_in_order(&c, n, Duration::from_secs(300));
    assert_eq!(dups, 0);
}

#[test]
fn a_worker_killed_mid_flow_on_its_host_loses_nothing() {
    let Some(h) = Hosts::new('k', 3) else { return };
    let n = 50_000;
    let (_a, mut b, c) = three_nodes(&h, n);
    wait_until("the flow to start", Duration::from_secs(60), || {
        (common::line_count(&c.path("sink.jsonl")) >= 5_000).then_some(())
    });
    // The worker restarts with its certificate and last assignment (no token needed).
    let b2 = b.crash_and_restart("");
    let dups = all_in_order(&c, n, Duration::from_secs(300));
    eprintln!("{dups} duplicates after w2 was killed and restarted");
    // w2's relay had at most its window in flight, and w2 at most one credit window unacknowledged on each link.
    assert!(dups <= 2 * 4096 + 1024, "{dups}");
    drop(b2);
}

#[test]
fn workers_that_cannot_reach_each_other_are_relayed_through_the_master() {
    let Some(h) = Hosts::new('r', 3) else { return };
    // w1 (host 1) and w2 (host 2) cannot talk; both reach the master (host 3).
    h.partition(2, 1);
    let n = 5_000;
    let (w1, _w2, m) = three_nodes(&h, n);
    let dups = all_in_order(&m, n, Duration::from_secs(300));
    assert_eq!(dups, 0);
    let st = w1.status();
    assert_eq!(device(&st, "w2")["via"], "m", "w1's link to w2 goes through the master: {}", device(&st, "w2"));
    assert!(m.stderr().contains("relaying a link from w1 to w2"), "the master says it relays");
}

// ------------------------------------------------------------------------------------------------ Send Anything

/// Peer devices across two hosts: `a` (host 1) runs a source writing a tree per kanban (`source_env`), `b`
/// (host 2, listening) the sink. `b_data` is b's data dir (a tmpfs, for the disk-full test).
fn file_hosts(h: &Hosts, source_env: &str, b_data: tempfile::TempDir) -> (Runtime, Runtime) {
    let da = tempfile::tempdir().expect("tmp");
    aion(da.path(), &["cluster", "init", "--name", "a"]);
    aion(da.path(), &["cluster", "issue", "b", "--out", &b_data.path().display().to_string()]);
    let b_listen = format!("{}:11030", h.addr(2));
    let b_yaml = "deviceName: b\ndevices:\n  a: {}\nmicroservices:\n  sink:\n    command: [\"{testkit}\"]\n    always: yes\n    env: { RECORD: \"{work}/sink.jsonl\" }\n";
    let b =
        Runtime::start_wrapped(&h.on(2), b_yaml, b_data, tempfile::tempdir().expect("tmp"), &["--listen", &b_listen]);
    let a_yaml = format!(
        "deviceName: a\ndevices:\n  b: {{ addr: \"{b_listen}\" }}\nmicroservices:\n  source:\n    command: [\"{{testkit}}\"]\n    startup: yes\n    env: {{ EMIT_COUNT: 1, CHUNK: 1, {source_env} }}\n    nextService: {{ default: [ {{ name: sink, device: b }} ] }}\n"
    );
    let a = Runtime::start_wrapped(&h.on(1), &a_yaml, da, tempfile::tempdir().expect("tmp"), &[]);
    (a, b)
}

/// Waits for the sink's first kanban; checks every file of its tree is byte-identical to the source's.
fn arrived_identical(a: &Runtime, b: &Runtime, limit: Duration) -> u64 {
    let line = wait_until("the kanban and its files at the sink", limit, || {
        read_lines(&b.path("sink.jsonl")).into_iter().next()
    });
    let entry = line["file_list"][0].as_str().expect("fileList rewritten").to_owned();
    assert!(line["files"][0].is_array(), "every file was in place when the sink got the kanban: {line}");
    let source = a.data.path().join("Data/source_1/files-1");
    let mut total = 0;
    let mut stack = vec![(source.clone(), Path::new(&entry).to_owned())];
    while let Some((s, r)) = stack.pop() {
        if s.is_dir() {
            for e in std::fs::read_dir(&s).expect("dir").flatten() {
                stack.push((e.path(), r.join(e.file_name())));
            }
            continue;
        }
        let (mut fs, mut fr) = (std::fs::File::open(&s).expect("source"), std::fs::File::open(&r).expect("received"));
        let (mut bs, mut br) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        use std::io::Read;
        loop {
            let n = fs.read(&mut bs).expect("read");
            fr.read_exact(&mut br[..n]).expect("as long");
            assert!(bs[..n] == br[..n], "{} differs from {}", r.display(), s.display());
            total += n as u64;
            if n == 0 {
                assert_eq!(fr.read(&mut br).expect("read"), 0, "{} is longer", r.display());
                break;
            }
        }
    }
    total
}

fn inbound_done(b: &Runtime) -> u64 {
    let st = b.status();
    st["federation"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "a"))
        .and_then(|d| d["files"]["active"].as_array().cloned())
        .and_then(|a| a.iter().filter_map(|t| t["done"].as_u64()).max())
        .unwrap_or(0)
}

#[test]
fn a_gigabyte_file_crosses_hosts_through_a_ten_second_cut_and_resumes_from_its_verified_prefix() {
    let Some(h) = Hosts::new('f', 2) else { return };
    let (a, b) = file_hosts(&h, "FILES: 20, BIG_MB: 1024", tempfile::tempdir().expect("tmp"));
    wait_until("a quarter of the big file across", Duration::from_secs(300), || {
        (inbound_done(&b) > 256 << 20).then_some(())
    });
    h.link(2, false);
    std::thread::sleep(Duration::from_secs(10));
    h.link(2, true);
    let total = arrived_identical(&a, &b, Duration::from_secs(600));
    let st = a.status();
    let files = &device(&st, "b")["files"];
    let sent = files["sent_bytes"].as_u64().expect("sent");
    let resumed = files["resumed_bytes"].as_u64().expect("resumed");
    eprintln!("{total} bytes; {sent} sent, {resumed} not sent again (resumed)");
    assert!(resumed > 0, "resumed from a verified prefix, not from zero: {files}");
    assert!(sent < total + total / 10, "bytes sent again are a small fraction: {sent} for {total}");
}

/// Kills the receiving (or the sending) runtime with a third of a 512 MB file across, restarts it: the tree
/// arrives whole, resumed from the receiver's verified prefix, not from zero.
fn killed_mid_transfer(tag: char, kill_sender: bool) {
    let Some(h) = Hosts::new(tag, 2) else { return };
    let (mut a, mut b) = file_hosts(&h, "FILES: 5, BIG_MB: 512", tempfile::tempdir().expect("tmp"));
    wait_until("a third of the big file across", Duration::from_secs(300), || {
        (inbound_done(&b) > 170 << 20).then_some(())
    });
    let restart = |rt: &mut Runtime| {
        let yaml = std::fs::read_to_string(rt.work.path().join("services.yml")).expect("services.yml");
        rt.crash_and_restart(&yaml)
    };
    // The sender's kanban is in its durable outbox: the restarted sender takes it again, the receiver says what it
    // has; a restarted receiver finds its partial file and its recorded prefix.
    let (a, b) = if kill_sender { (restart(&mut a), b) } else { (a, restart(&mut b)) };
    let total = arrived_identical(&a, &b, Duration::from_secs(600));
    let files = device(&a.status(), "b")["files"].clone();
    eprintln!("{total} bytes after a kill -9 of the {}: {files}", if kill_sender { "sender" } else { "receiver" });
    assert!(files["resumed_bytes"].as_u64().unwrap_or(0) > 0, "resumed, not from zero: {files}");
}

#[test]
fn the_receiving_runtime_killed_mid_transfer_resumes_after_its_restart() {
    killed_mid_transfer('g', false);
}

#[test]
fn the_sending_runtime_killed_mid_transfer_resumes_from_the_receivers_prefix_after_its_restart() {
    killed_mid_transfer('s', true);
}

#[test]
fn files_cross_ten_percent_packet_loss_whole() {
    let Some(h) = Hosts::new('p', 2) else { return };
    h.loss(2, 10);
    let (a, b) = file_hosts(&h, "FILES: 30, BIG_MB: 64", tempfile::tempdir().expect("tmp"));
    let total = arrived_identical(&a, &b, Duration::from_secs(600));
    assert!(total > 64 << 20);
}

/// A tmpfs mounted on a directory for as long as it lives.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sh(&["umount", "-l", &self.0.display().to_string()]);
    }
}

#[test]
fn a_full_disk_at_the_receiver_is_a_clear_error_and_the_transfer_completes_once_there_is_room() {
    let Some(h) = Hosts::new('d', 2) else { return };
    let b_data = tempfile::tempdir().expect("tmp");
    let path = b_data.path().display().to_string();
    sh(&["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", &path]).expect("tmpfs");
    let mnt = Tmpfs(b_data.path().to_owned());
    let (a, b) = file_hosts(&h, "FILES: 3, BIG_MB: 64", b_data);
    let st = wait_until("b to refuse for a full disk", Duration::from_secs(120), || {
        b.stderr().contains("receiver disk full").then(|| a.status())
    });
    assert!(read_lines(&b.path("sink.jsonl")).is_empty(), "no kanban without its files");
    // Partial files are removed, not left to fill the disk; the kanban waits at the sender.
    let parts = Command::new("find").args([&path, "-name", "*.part"]).output().expect("find").stdout;
    assert!(
        parts.is_empty() || String::from_utf8_lossy(&parts).trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&parts)
    );
    assert_eq!(device(&st, "b")["files"]["failed"], 0, "{st}");
    wait_until("the sender to say it waits", Duration::from_secs(60), || {
        a.stderr().contains("files not sent yet").then_some(())
    });
    sh(&["mount", "-o", "remount,size=512m", &path]).expect("remount");
    let total = arrived_identical(&a, &b, Duration::from_secs(300));
    assert!(total > 64 << 20);
    drop(a);
    drop(b);
    drop(mnt);
}
