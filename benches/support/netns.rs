//! Two test hosts for the cross-device benches (`benches/cluster.rs`, the comparison suite's `x-` systems):
//! network namespaces joined by veth and a bridge when run as root (10.231.0.1 and .2), else loopback.
//! Also what runs on them: an `aion run` per host, stopped on drop. Shared by `#[path]` (not a bench target of its
//! own).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command quietly; true when it succeeded.
pub fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two hosts: `(wrapper, address)` each; namespaces deleted on drop.
pub struct Hosts {
    prefix: Option<String>,
}

impl Hosts {
    /// Creates the hosts (namespaces as root unless `AION_BENCH_LOOPBACK` is set; loopback otherwise).
    pub fn new() -> (Hosts, Vec<(Vec<String>, String)>) {
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if root && std::env::var("AION_BENCH_LOOPBACK").is_err() {
            let p = format!("ab{}", std::process::id() % 10_000);
            let sw = format!("{p}-sw");
            let mut ok = sh(&["ip", "netns", "add", &sw])
                && sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])
                && sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
            for i in 1..=2 {
                let (ns, a, b) = (format!("{p}-h{i}"), format!("{p}-h{i}-a"), format!("{p}-h{i}-b"));
                ok = ok
                    && sh(&["ip", "netns", "add", &ns])
                    && sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])
                    && sh(&["ip", "link", "set", &a, "netns", &ns])
                    && sh(&["ip", "link", "set", &b, "netns", &sw])
                    && sh(&["ip", "-n", &sw, "link", "set", &b, "master", "br0"])
                    && sh(&["ip", "-n", &sw, "link", "set", &b, "up"])
                    && sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])
                    && sh(&["ip", "-n", &ns, "link", "set", &a, "name", "eth0"])
                    && sh(&["ip", "-n", &ns, "addr", "add", &format!("10.231.0.{i}/24"), "dev", "eth0"])
                    && sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            }
            let hosts = Hosts { prefix: Some(p.clone()) };
            if ok {
                let on =
                    |i: usize| -> Vec<String> { vec!["ip".into(), "netns".into(), "exec".into(), format!("{p}-h{i}")] };
                return (hosts, vec![(on(1), "10.231.0.1".into()), (on(2), "10.231.0.2".into())]);
            }
            eprintln!("cannot create network namespaces; measuring on loopback");
        }
        (Hosts { prefix: None }, vec![(Vec::new(), "127.0.0.1".into()), (Vec::new(), "127.0.0.1".into())])
    }

    /// Whether they are namespaces (else loopback).
    pub fn namespaces(&self) -> bool {
        self.prefix.is_some()
    }

    /// What the hosts are, for the report.
    pub fn kind(&self) -> &'static str {
        if self.namespaces() {
            "two network namespaces over veth"
        } else {
            "loopback"
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(p) = &self.prefix {
            for n in ["h1", "h2", "sw"] {
                sh(&["ip", "netns", "del", &format!("{p}-{n}")]);
            }
        }
    }
}

/// `program` to run on a host under its `wrapper` (`ip netns exec NS`, or nothing on loopback).
pub fn command(wrapper: &[String], program: &Path) -> Command {
    match wrapper.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `aion status --json` of the runtime on `data`.
pub fn status(aion: &Path, data: &Path) -> Option<serde_json::Value> {
    let out = Command::new(aion).arg("--data-dir").arg(data).args(["status", "--json"]).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// An `aion run` on one host, its stderr in `<data>/aion.log`; stopped on drop (`aion stop`, then SIGKILL).
pub struct Runtime {
    /// The process.
    pub child: Child,
    /// Its data dir.
    pub data: PathBuf,
    aion: PathBuf,
}

impl Runtime {
    /// Writes `yaml` to `<data>/services.yml` and runs it with `args` under `wrapper`, logging the Send
    /// Anything module at info (its transfer lines).
    pub fn start(aion: &Path, wrapper: &[String], data: &Path, yaml: &str, args: &[&str]) -> std::io::Result<Runtime> {
        let file = data.join("services.yml");
        std::fs::write(&file, yaml)?;
        let child = command(wrapper, aion)
            .arg("--data-dir")
            .arg(data)
            .arg("run")
            .arg(&file)
            .args(args)
            .env("RUST_LOG", "warn,aion_actors::federation::files=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.join("aion.log"))?)
            .spawn()?;
        Ok(Runtime { child, data: data.to_owned(), aion: aion.to_owned() })
    }

    /// Waits until it answers `aion status` (at most `limit`).
    pub fn ready(&self, limit: Duration) -> bool {
        let t = Instant::now();
        while status(&self.aion, &self.data).is_none() {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = Command::new(&self.aion).arg("--data-dir").arg(&self.data).arg("stop").output();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
