//! The cross-device systems of the comparison suite (`x-…`): one hop from a source on host 1 to a sink on host
//! 2 — two network namespaces joined by veth and a bridge when run as root, else loopback — side by side in one
//! run:
//! - `x-aion-memory`, `x-aion-durable`: two `aion run` runtimes (`AION_BIN`), one per host, federated over QUIC
//!   with mutual TLS (`aion cluster init` / `issue`), the source's `nextService` naming `device: b`; the sink's
//!   queue in memory or durable (the sending side's outbox is durable in both);
//! - `x-zenoh`: Zenoh peers, the sink listening on its host's address, the source connecting to it;
//! - `x-nats-core`, `x-nats-jetstream`: `nats-server` in the sink's namespace, the source publishing across the
//!   link.
//!
//! The stage processes are this binary's roles (the same code as the 3-stage runs, with one hop).

use super::{free_port, wait_result, Job, Res, Server, SinkResult};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../support/netns.rs"]
mod netns;

/// The cross-device systems, in report order.
pub const SYSTEMS: &[&str] = &["x-aion-memory", "x-aion-durable", "x-zenoh", "x-nats-core", "x-nats-jetstream"];

/// The two hosts of the cross-device runs.
pub struct Hosts {
    guard: netns::Hosts,
    hosts: Vec<(Vec<String>, String)>,
}

impl Hosts {
    /// Creates them (namespaces when root).
    pub fn new() -> Hosts {
        let (guard, hosts) = netns::Hosts::new();
        eprintln!("cross-device systems: {}", guard.kind());
        Hosts { guard, hosts }
    }

    /// What they are, for the notes.
    pub fn kind(&self) -> &'static str {
        if self.guard.namespaces() {
            "netns"
        } else {
            "loopback"
        }
    }

    fn addr(&self, i: usize) -> &str {
        &self.hosts[i].1
    }

    /// `program` to run on host `i`.
    fn cmd(&self, i: usize, program: &Path) -> Command {
        netns::command(&self.hosts[i].0, program)
    }

    /// Waits until something accepts TCP on `addr:port` as seen from host `i`.
    fn wait_port(&self, i: usize, addr: &str, port: u16, limit: Duration) -> Res<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let ok = self
                .cmd(i, Path::new("bash"))
                .args(["-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("nothing listening on {addr}:{port} after {limit:?}").into())
    }
}

/// The base system a cross-device one runs the roles of (`x-nats-core` → `nats-core`).
fn base(sys: &str) -> &str {
    sys.strip_prefix("x-").unwrap_or(sys)
}

/// A free base port for Zenoh's peers (loopback: the next two free too).
fn zenoh_base(hosts: &Hosts) -> Res<u16> {
    if hosts.guard.namespaces() {
        return Ok(17_447); // fresh namespaces: nothing else listens there
    }
    loop {
        let p = free_port()?;
        if p < 65_000 && [p + 1, p + 2].iter().all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok()) {
            return Ok(p);
        }
    }
}

/// The server side of a cross-device system: `nats-server` in host 2; Zenoh's base port; nothing for aion (a
/// fresh pair of runtimes per run).
pub fn start_server(sys: &str, hosts: &Hosts) -> Res<Server> {
    let dir = tempfile::tempdir()?;
    match sys {
        "x-nats-core" | "x-nats-jetstream" => {
            let port = if hosts.guard.namespaces() { 4222 } else { free_port()? };
            let addr = hosts.addr(1).to_owned();
            let child = hosts
                .cmd(1, Path::new("nats-server"))
                .process_group(0)
                .args(["-a", &addr, "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let server = Server { child: Some(child), url: format!("nats://{addr}:{port}"), _dir: dir };
            hosts.wait_port(0, &addr, port, Duration::from_secs(60))?;
            Ok(server)
        }
        "x-zenoh" => Ok(Server { child: None, url: zenoh_base(hosts)?.to_string(), _dir: dir }),
        _ => Ok(Server { child: None, url: String::new(), _dir: dir }),
    }
}

/// One cross-device run; returns the sink's result.
pub async fn run_once(
    sys: &str,
    hosts: &Hosts,
    server: &Server,
    size: usize,
    n: u64,
    rate: u64,
    run: usize,
) -> Res<SinkResult> {
    let me = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    // Zenoh's peers listen on fixed ports in the namespaces: a port per run (a closed listener's connections
    // linger in TIME_WAIT, and Zenoh does not reuse the address).
    let url = match (sys, server.url.parse::<u16>()) {
        ("x-zenoh", Ok(p)) if hosts.guard.namespaces() => (p + (run % 1000) as u16 * 3).to_string(),
        _ => server.url.clone(),
    };
    let job = Job {
        sys: base(sys).into(),
        url,
        n,
        size,
        rate,
        result: dir.path().join("result.json"),
        key: format!("x{}r{run}", std::process::id()),
        hops: 1,
        sink_host: hosts.addr(1).to_owned(),
        go: sys.starts_with("x-aion").then(|| dir.path().join("go")),
    };
    let limit = Duration::from_secs(300);
    if sys.starts_with("x-aion") {
        return aion_pair(hosts, &me, &job, if sys == "x-aion-durable" { "durable" } else { "memory" }, limit).await;
    }
    let mut procs: Vec<Child> = Vec::new();
    procs.push(hosts.cmd(1, &me).envs(job.env("sink")).stdout(Stdio::null()).spawn()?);
    // The subscription exists before the source starts (Zenoh's source also waits for it to be known).
    tokio::time::sleep(Duration::from_millis(500)).await;
    procs.push(hosts.cmd(0, &me).envs(job.env("source")).stdout(Stdio::null()).spawn()?);
    let r = wait_result(&job.result, limit, &mut procs).await;
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    r
}

fn aion_bin() -> Res<PathBuf> {
    let p = match std::env::var("AION_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => std::env::current_exe()?.parent().ok_or("no parent")?.join("aion"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} not found (set AION_BIN)", p.display()).into())
    }
}

fn aion_ok(aion: &Path, data: &Path, args: &[&str]) -> Res<()> {
    let out = Command::new(aion).arg("--data-dir").arg(data).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("aion {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()).into())
    }
}

/// Device `a` (host 1) runs the source, device `b` (host 2) the sink; the source starts when the link is up
/// and the sink connected.
async fn aion_pair(hosts: &Hosts, me: &Path, job: &Job, delivery: &str, limit: Duration) -> Res<SinkResult> {
    let aion = aion_bin()?;
    let (ta, tb) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (da, db) = (ta.path().to_owned(), tb.path().to_owned());
    aion_ok(&aion, &da, &["cluster", "init", "--name", "a"])?;
    aion_ok(&aion, &da, &["cluster", "issue", "b", "--out", &db.display().to_string()])?;
    let (a_addr, b_addr) = (hosts.addr(0), hosts.addr(1));
    let port = || -> Res<u16> {
        if hosts.guard.namespaces() {
            Ok(11_030)
        } else {
            Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
        }
    };
    let (pa, pb) = (port()?, port()?);
    let env = |role: &str| job.env(role).iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect::<Vec<_>>().join(", ");
    let cmd = format!("[\"{}\"]", me.display());
    let b_yaml = format!(
        "deviceName: b\ndevices:\n  a: {{ addr: \"{a_addr}:{pa}\" }}\nmicroservices:\n  sink:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ {} }}\n",
        env("sink")
    );
    let a_yaml = format!(
        "deviceName: a\ndevices:\n  b: {{ addr: \"{b_addr}:{pb}\" }}\nmicroservices:\n  source:\n    command: {cmd}\n    startup: yes\n    env: {{ {} }}\n    nextService: {{ default: [ {{ name: sink, device: b }} ] }}\n",
        env("source")
    );
    let start = |i: usize, data: &Path, yaml: &str, listen: String| -> Res<netns::Runtime> {
        let args = ["--listen", listen.as_str(), "--grpc", "off", "--outbox-capacity", "65536"];
        Ok(netns::Runtime::start(&aion, &hosts.hosts[i].0, data, yaml, &args)?)
    };
    let mut rb = start(1, &db, &b_yaml, format!("{b_addr}:{pb}"))?;
    let mut ra = start(0, &da, &a_yaml, format!("{a_addr}:{pa}"))?;
    if !(rb.ready(Duration::from_secs(30)) && ra.ready(Duration::from_secs(30))) {
        let log = |d: &Path| std::fs::read_to_string(d.join("aion.log")).unwrap_or_default();
        return Err(format!("a runtime did not start: {}{}", log(&da).trim(), log(&db).trim()).into());
    }
    let t = Instant::now();
    loop {
        let a = netns::status(&aion, &da);
        let b = netns::status(&aion, &db);
        let link_up = a.as_ref().is_some_and(|s| {
            s["federation"]["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["name"] == "b" && d["state"] == "up"))
        });
        let connected = |s: &Option<serde_json::Value>, svc: &str| {
            s.as_ref().is_some_and(|s| {
                s["instances"]
                    .as_array()
                    .is_some_and(|i| i.iter().any(|i| i["service"] == svc && i["connected"] == true))
            })
        };
        if link_up && connected(&a, "source") && connected(&b, "sink") {
            break;
        }
        for rt in [&mut ra, &mut rb] {
            if let Ok(Some(st)) = rt.child.try_wait() {
                let log = std::fs::read_to_string(rt.data.join("aion.log")).unwrap_or_default();
                return Err(format!("aion exited with {st}: {}", log.trim()).into());
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the link did not come up, or the stages did not connect, within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(go) = &job.go {
        std::fs::write(go, b"")?;
    }
    let r = wait_result(&job.result, limit, &mut []).await;
    drop(ra);
    drop(rb);
    r
}
