//! Test harness: runs the real `aion` binary on a temporary data dir with real microservice processes
//! built from `examples/`.
#![allow(dead_code)]

pub mod raw;
pub mod scenarios;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const AION: &str = env!("CARGO_BIN_EXE_aion");

/// Where cargo put the example binaries (target/<profile>/examples).
pub fn examples_dir() -> PathBuf {
    Path::new(AION).parent().expect("bin dir").join("examples")
}

/// `yaml` with `{testkit}`, `{source}`, `{transform}`, `{sink}` (the example binaries) and `{work}` substituted.
pub fn fill(yaml: &str, work: &Path) -> String {
    yaml.replace("{testkit}", &example("testkit"))
        .replace("{source}", &example("pipeline-source"))
        .replace("{transform}", &example("pipeline-transform"))
        .replace("{sink}", &example("pipeline-sink"))
        .replace("{work}", &work.display().to_string())
}

pub fn example(name: &str) -> String {
    let p = examples_dir().join(name);
    assert!(p.is_file(), "{} is missing: `cargo test` builds the examples, `cargo test --test X` does not (run `cargo build --examples` first)", p.display());
    p.display().to_string()
}

pub struct Runtime {
    pub child: Option<Child>,
    pub data: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub stderr_log: PathBuf,
    /// Extra `aion run` arguments, reused by [`Runtime::crash_and_restart`].
    pub args: Vec<String>,
    /// A command the runtime runs under (`ip netns exec NS`), reused by [`Runtime::crash_and_restart`].
    pub wrapper: Vec<String>,
    /// The whole command after `--data-dir DIR`, when it is not `run services.yml` (`master …`, `worker …`).
    pub cmd: Option<Vec<String>>,
}

impl Runtime {
    /// Writes `yaml` (with `{testkit}`, `{source}`, `{transform}`, `{sink}` and `{work}` substituted) and runs it;
    /// returns once the runtime printed its readiness line.
    pub fn start(yaml: &str) -> Runtime {
        let data = tempfile::tempdir().expect("tempdir");
        let work = tempfile::tempdir().expect("tempdir");
        Self::start_in(yaml, data, work)
    }

    pub fn start_in(yaml: &str, data: tempfile::TempDir, work: tempfile::TempDir) -> Runtime {
        Self::start_full(yaml, data, work, &[])
    }

    /// [`Runtime::start`] with extra `aion run` arguments.
    pub fn start_with_args(yaml: &str, args: &[&str]) -> Runtime {
        Self::start_full(yaml, tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"), args)
    }

    pub fn start_full(yaml: &str, data: tempfile::TempDir, work: tempfile::TempDir, args: &[&str]) -> Runtime {
        Self::start_wrapped(&[], yaml, data, work, args)
    }

    /// [`Runtime::start_full`] under `wrapper` (for example `ip netns exec NS`: the runtime on another host).
    pub fn start_wrapped(
        wrapper: &[String],
        yaml: &str,
        data: tempfile::TempDir,
        work: tempfile::TempDir,
        args: &[&str],
    ) -> Runtime {
        let yaml = fill(yaml, work.path());
        let file = work.path().join("services.yml");
        std::fs::write(&file, yaml).expect("write yaml");
        let mut argv: Vec<String> = vec!["run".into(), file.display().to_string()];
        if !args.contains(&"--grace") {
            argv.extend(["--grace".to_owned(), "5".to_owned()]);
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut rt = Self::start_cmd(wrapper, data, work, &argv);
        rt.cmd = None;
        rt.args = args.iter().map(|a| a.to_string()).collect();
        rt
    }

    /// Runs `aion --data-dir DATA argv…` (under `wrapper`) and waits for its readiness line.
    pub fn start_cmd(wrapper: &[String], data: tempfile::TempDir, work: tempfile::TempDir, argv: &[String]) -> Runtime {
        let stderr_log = work.path().join("aion.stderr");
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(AION);
                c
            }
            None => Command::new(AION),
        };
        let mut child = cmd
            .arg("--data-dir")
            .arg(data.path())
            .args(argv)
            .env("RUST_LOG", "info")
            .env_remove("AION_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aion");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = stderr_log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(&log_path).expect("log");
            let mut ready = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
                if line.starts_with("aion: running") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let rt = Runtime {
            child: Some(child),
            data,
            work,
            stderr_log,
            args: Vec::new(),
            wrapper: wrapper.to_vec(),
            cmd: Some(argv.to_vec()),
        };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!("runtime did not become ready:\n{}", rt.stderr());
        }
        rt
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs an `aion` CLI command against this runtime; returns (exit ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(AION)
            .arg("--data-dir")
            .arg(self.data.path())
            .args(args)
            .env_remove("AION_HOME")
            .output()
            .expect("run aion cli");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    pub fn status(&self) -> serde_json::Value {
        let (ok, out, err) = self.cli(&["status", "--json"]);
        assert!(ok, "status failed: {err}");
        serde_json::from_str(&out).expect("status json")
    }

    pub fn instance(&self, service: &str, n: u64) -> serde_json::Value {
        let s = self.status();
        s["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["service"] == service && i["instance"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no instance {service}-{n} in {s}"))
    }

    pub fn send(&self, service: &str, args: &[&str]) {
        let mut a = vec!["kanban", "send", service];
        a.extend_from_slice(args);
        let (ok, _, err) = self.cli(&a);
        assert!(ok, "kanban send failed: {err}");
    }

    /// Waits (bounded) until `cond` holds on the status document.
    pub fn wait_status(&self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_until(what, Duration::from_secs(60), || {
            let s = self.status();
            cond(&s).then_some(s)
        })
    }

    /// Waits until the JSON-lines file `name` in the work dir has at least `n` lines; returns them.
    pub fn wait_lines(&self, name: &str, n: usize) -> Vec<serde_json::Value> {
        let path = self.path(name);
        let start = Instant::now();
        loop {
            let lines = read_lines(&path);
            if lines.len() >= n {
                return lines;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("timed out waiting for {n} lines in {name} (have {})\n{}", lines.len(), self.diagnose());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runtime stderr, status and instance logs, for failure messages.
    pub fn diagnose(&self) -> String {
        let mut out = format!("--- runtime stderr ---\n{}\n", self.stderr());
        out += &format!("--- status ---\n{}\n", self.cli(&["status"]).1);
        if let Ok(rd) = std::fs::read_dir(self.data.path().join("logs")) {
            for e in rd.flatten() {
                out += &format!(
                    "--- {} ---\n{}\n",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let st = child.wait().expect("wait");
        st.code().unwrap_or(-1)
    }

    /// SIGKILL the runtime (not its children); nothing to do when it has already stopped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.data.path().join("run/aion.sock")
    }

    /// Pids of live processes started for this data dir (found by their AION_SOCKET).
    pub fn live_children(&self) -> Vec<u32> {
        processes_with_env(&format!("AION_SOCKET={}", self.socket().display()))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.live_children() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: the writer may be in the middle of one.
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// Polls `f` every 20 ms until it returns Some, or panics after `limit` naming `what`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (not zombie) processes whose environment contains `needle` exactly.
pub fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Number of complete lines in a file (cheap, for large sinks).
pub fn line_count(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|c| **c == b'\n').count()).unwrap_or(0)
}

impl Runtime {
    /// Kills the runtime with SIGKILL (if it still runs) and starts a new one on the same data and work
    /// directories with `yaml`.
    pub fn crash_and_restart(&mut self, yaml: &str) -> Runtime {
        let args: Vec<String> = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.crash_and_restart_with(yaml, &args)
    }

    /// [`Runtime::crash_and_restart`] with other `aion run` arguments.
    pub fn crash_and_restart_with(&mut self, yaml: &str, args: &[&str]) -> Runtime {
        self.kill9();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().expect("tmp"));
        let work = std::mem::replace(&mut self.work, tempfile::tempdir().expect("tmp"));
        match self.cmd.clone() {
            Some(argv) => Runtime::start_cmd(&self.wrapper.clone(), data, work, &argv),
            None => Runtime::start_wrapped(&self.wrapper.clone(), yaml, data, work, args),
        }
    }
}

/// Parses JSON lines (CLI `--json` output).
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// True when every instance in a status document has a connected session.
pub fn all_connected(s: &serde_json::Value) -> bool {
    s["instances"].as_array().is_some_and(|a| a.iter().all(|i| i["connected"] == true))
}

/// services.yml of the testkit pipeline `source > relay > sink` (the relay forwards). Each argument is the
/// inside of that stage's `env` map; the source starts at boot, the others when kanbans arrive.
pub fn pipeline(source_env: &str, relay_env: &str, sink_env: &str) -> String {
    let with = |fixed: &str, extra: &str| if extra.is_empty() { fixed.to_owned() } else { format!("{fixed}, {extra}") };
    let (relay_env, sink_env) = (with("FORWARD: 1", relay_env), with(r#"RECORD: "{work}/sink.jsonl""#, sink_env));
    format!(
        r#"
microservices:
  source:
    command: ["{{testkit}}"]
    startup: yes
    env: {{ {source_env} }}
    nextService: {{ default: [ {{ name: relay }} ] }}
  relay:
    command: ["{{testkit}}"]
    always: yes
    env: {{ {relay_env} }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{{testkit}}"]
    always: yes
    env: {{ {sink_env} }}
"#
    )
}

/// Waits until every `metadata.seq` in 1..=n is in the sink file; returns how often each arrived.
pub fn every_seq_at_sink(sink: &Path, n: u64, limit: Duration) -> std::collections::BTreeMap<i64, u64> {
    let lines = wait_until("every kanban at the sink", limit, || {
        let lines = read_lines(sink);
        let distinct: std::collections::BTreeSet<i64> =
            lines.iter().filter_map(|l| l["metadata"]["seq"].as_i64()).collect();
        (distinct.len() as u64 == n).then_some(lines)
    });
    let mut count = std::collections::BTreeMap::new();
    for l in &lines {
        *count.entry(l["metadata"]["seq"].as_i64().expect("seq")).or_default() += 1;
    }
    assert_eq!(count.keys().copied().collect::<Vec<_>>(), (1..=n as i64).collect::<Vec<_>>(), "nothing lost");
    count
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// A real `redis-server` (Debian package `redis-server`) on a free loopback port, with append-only persistence
/// fsynced on every write, in its own directory.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis { child: None, port: free_port(), dir };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: `apt-get install redis-server` (the README's set-up does it)");
        self.child = Some(child);
        wait_until("redis-server answering PING", Duration::from_secs(30), || {
            (self.cli(&["PING"]).trim() == "PONG").then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out =
            Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An integer reply.
    pub fn int(&self, args: &[&str]) -> i64 {
        let out = self.cli(args);
        out.trim().parse().unwrap_or_else(|_| panic!("redis-cli {args:?}: not an integer: {out:?}"))
    }

    /// SIGKILL, then start again on the same port and directory (the append-only file brings the data back).
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_owned() };
    (code, body)
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
