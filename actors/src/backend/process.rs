//! Local processes: each instance a process in its own process group, started with the AION environment, its
//! output in a size-capped log file; a registry of running groups (`run/instances.json`) and an environment
//! marker (`AION_INSTANCE`) so that what a killed runtime left, and what escaped an instance's group, is found and
//! stopped.

use super::{Backend, Control, Description, ExitInfo, LogSource, Running};
use crate::paths::Paths;
use aion_runtime::config::Microservice;
use aion_runtime::task::Tasks;
use futures::future::BoxFuture;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// What every local process gets.
#[derive(Debug, Clone)]
pub struct ProcessEnv {
    /// Data directory layout.
    pub paths: Paths,
    /// Directory of the services.yml (relative commands and `workingDir` resolve against it).
    pub base_dir: PathBuf,
    /// Directories put in front of `PATH` (the `aion` binary's directory and its `examples/`).
    pub path_dirs: Vec<PathBuf>,
    /// `deviceName`.
    pub device_name: String,
    /// `debug`.
    pub debug: String,
    /// Per-instance log size cap in bytes before rotation.
    pub log_cap: u64,
    /// The data dir's id ([`crate::paths::Paths::dir_id`]): every process of an instance carries
    /// `AION_INSTANCE=<dir id>:<run>/<service>-<n>/<incarnation>` in its environment, inherited by its descendants,
    /// so that processes that leave the instance's process group (`setsid`, daemons) are found and stopped with it.
    pub dir_id: String,
    /// This run's marker ([`run_marker`]).
    pub run_marker: String,
    /// The gRPC API's `host:port` for AION's client libraries (`KANBAN_ADDR`), when it is on.
    pub kanban_addr: Option<String>,
}

/// AION's in-cluster name of its kanban server, which real services.yml files put in `KANBAN_ADDR`.
const AION_KANBAN_HOST: &str = "aion-statuskanban";

/// What AION's client libraries need in an instance's environment, given its `env:` (the gRPC API's address,
/// the service's name, and `CONNECTION_MODE: direct` undone, which would ignore `KANBAN_ADDR`).
pub fn aion_client_env(ms: &Microservice, kanban_addr: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(addr) = kanban_addr {
        let explicit = ms.env.get("KANBAN_ADDR");
        let aion_default = explicit.is_some_and(|v| v.split(':').next() == Some(AION_KANBAN_HOST));
        if explicit.is_none() || aion_default {
            out.push(("KANBAN_ADDR".to_owned(), addr.to_owned()));
        }
    }
    if !ms.env.contains_key("SERVICE") {
        out.push(("SERVICE".to_owned(), ms.name.clone()));
    }
    if ms.env.get("CONNECTION_MODE").is_some_and(|m| m == "direct") {
        out.push(("CONNECTION_MODE".to_owned(), "normal".to_owned()));
    }
    out
}

/// The marker of this run on the data dir whose id is `dir_id`: the id (so that a later run finds what a killed
/// one left), then this process and its start time.
pub fn run_marker(dir_id: &str) -> String {
    format!("{dir_id}:{}-{}", std::process::id(), crate::store::now_ms())
}

/// The `AION_INSTANCE` value of one incarnation of an instance.
fn instance_marker(run: &str, service: &str, instance: u32, gen: u64) -> String {
    format!("{run}/{service}-{instance}/{gen}")
}

const MARKER_VAR: &[u8] = b"AION_INSTANCE=";

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`): a process that leaves
/// its instance's group and outlives its parent becomes the runtime's child, not init's, so it can be found and
/// its exit collected.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("cannot become the reaper of escaped descendants: {e}");
    }
}

/// Kills (SIGKILL) every process whose `AION_INSTANCE` starts with `prefix` (an instance's marker, a run's marker
/// followed by `/`, or a data dir's tag followed by `:`). Returns how many.
fn kill_marked(prefix: &str) -> usize {
    let me = std::process::id();
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let marked = env
            .split(|b| *b == 0)
            .any(|kv| kv.strip_prefix(MARKER_VAR).is_some_and(|v| v.starts_with(prefix.as_bytes())));
        if marked && nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
            n += 1;
        }
    }
    n
}

/// Collects the exit of every zombie child of this process that is not in `keep` (instance leaders, which their
/// own waiters collect): descendants adopted as the subreaper. Returns how many.
fn reap_adopted(keep: &std::collections::HashSet<u32>) -> usize {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    // Only a subreaper adopts: otherwise a zombie child here is someone else's to collect (an embedder's).
    if !nix::sys::prctl::get_child_subreaper().unwrap_or(false) {
        return 0;
    }
    let me = std::process::id();
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if keep.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z") && ppid == Some(me) {
            if let Ok(st) = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
                if !matches!(st, WaitStatus::StillAlive) {
                    n += 1;
                }
            }
        }
    }
    n
}

/// How the program of a service is found: its working directory, the search path, and the program's path.
pub struct Resolved {
    /// The working directory of its processes.
    pub workdir: PathBuf,
    /// The `PATH` its processes get: `path_dirs`, then the runtime's own `PATH`.
    pub path_var: Vec<PathBuf>,
    /// The program: a path, or the bare name when it was not found in `path_var`.
    pub program: PathBuf,
    /// True when the program exists as a file.
    pub found: bool,
}

/// Resolves the program of `ms` as its processes will be started: a relative path against its working
/// directory (`workingDir`, relative to `base_dir`), a bare name through `path_dirs` and then `PATH`.
pub fn resolve_program(ms: &Microservice, base_dir: &Path, path_dirs: &[PathBuf]) -> Option<Resolved> {
    let program = ms.command.first()?;
    let workdir = match &ms.working_dir {
        Some(w) => base_dir.join(w),
        None => base_dir.to_owned(),
    };
    let program = if program.contains('/') && Path::new(program).is_relative() {
        workdir.join(program)
    } else {
        PathBuf::from(program)
    };
    let mut path_var: Vec<PathBuf> = path_dirs.to_vec();
    if let Some(p) = std::env::var_os("PATH") {
        path_var.extend(std::env::split_paths(&p));
    }
    // Resolve bare names with our PATH (Command would use the parent's PATH).
    let (program, found) = if program.components().count() == 1 {
        match path_var.iter().map(|d| d.join(&program)).find(|c| c.is_file()) {
            Some(p) => (p, true),
            None => (program, false),
        }
    } else {
        let found = program.is_file();
        (program, found)
    };
    Some(Resolved { workdir, path_var, program, found })
}

/// A process group, stopped with signals.
struct ProcessGroup(i32);

impl Control for ProcessGroup {
    fn terminate(&self) {
        let _ = killpg(Pid::from_raw(self.0), Signal::SIGTERM);
    }
    fn kill(&self) {
        let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// The local-process backend (see the module docs).
pub struct ProcessBackend {
    env: ProcessEnv,
    /// Running process groups, by instance: written to the registry file on each change.
    running: Arc<Mutex<BTreeMap<(String, u32), RegistryEntry>>>,
    tasks: Tasks,
}

impl ProcessBackend {
    /// A backend starting processes with `env`; its log pumps and its collector of adopted descendants (the
    /// runtime is their subreaper) run in `tasks`. Must be called inside a tokio runtime.
    pub fn new(env: ProcessEnv, tasks: Tasks) -> ProcessBackend {
        let running: Arc<Mutex<BTreeMap<(String, u32), RegistryEntry>>> = Arc::default();
        if let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            let leaders = running.clone();
            tasks.spawn("reaper", async move {
                while sigchld.recv().await.is_some() {
                    // Instance leaders are collected by their own waiters; the rest is ours.
                    let keep: HashSet<u32> = lock(&leaders).values().map(|e| e.pid).collect();
                    let _ = tokio::task::spawn_blocking(move || reap_adopted(&keep)).await;
                }
            });
        }
        ProcessBackend { env, running, tasks }
    }

    fn write_registry(&self) {
        let entries: Vec<RegistryEntry> = lock(&self.running).values().cloned().collect();
        write_registry(&self.env.paths.registry(), &entries);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend for ProcessBackend {
    fn start<'a>(&'a self, ms: &'a Microservice, instance: u32, gen: u64) -> BoxFuture<'a, Result<Running, String>> {
        Box::pin(async move {
            let running = spawn_process(ms, instance, gen, &self.env, &self.tasks)
                .map_err(|e| format!("cannot start {:?}: {e}", ms.command))?;
            let entry = RegistryEntry {
                service: ms.name.clone(),
                instance,
                pid: running.pid,
                start_ticks: proc_start_ticks(running.pid).unwrap_or(0),
            };
            lock(&self.running).insert((ms.name.clone(), instance), entry);
            self.write_registry();
            Ok(running)
        })
    }

    fn exited(&self, service: &str, instance: u32, gen: u64) {
        lock(&self.running).remove(&(service.to_owned(), instance));
        self.write_registry();
        // Its processes that left its process group (setsid, daemons) end with it (a scan of /proc: off the
        // caller's thread).
        let marker = instance_marker(&self.env.run_marker, service, instance, gen);
        let svc = service.to_owned();
        tokio::task::spawn_blocking(move || {
            let escaped = kill_marked(&marker);
            if escaped > 0 {
                tracing::warn!(service = %svc, instance, processes = escaped, "killed processes that had left the instance's process group");
            }
        });
    }

    fn recover(&self) -> usize {
        let n = cleanup_orphans(&self.env.paths.registry()) + cleanup_marked(&self.env.dir_id);
        lock(&self.running).clear();
        n
    }

    fn all_stopped(&self) {
        let left = kill_marked(&format!("{}/", self.env.run_marker));
        if left > 0 {
            tracing::warn!(processes = left, "killed processes of this run still alive after every instance ended");
        }
        let _ = reap_adopted(&HashSet::new());
        lock(&self.running).clear();
        write_registry(&self.env.paths.registry(), &[]);
    }

    fn logs(&self, service: &str, instance: u32) -> LogSource {
        LogSource::File { path: self.env.paths.log_file(service, instance) }
    }

    fn describe(&self, ms: &Microservice) -> Description {
        let runs = match resolve_program(ms, &self.env.base_dir, &self.env.path_dirs) {
            Some(r) => r.program.display().to_string(),
            None => "(no command)".to_owned(),
        };
        Description { backend: "process".to_owned(), runs }
    }
}

/// Spawns one instance of `ms` as a process in its own process group, its output going to its log file.
fn spawn_process(
    ms: &Microservice,
    instance: u32,
    gen: u64,
    env: &ProcessEnv,
    tasks: &Tasks,
) -> std::io::Result<Running> {
    let Some(Resolved { workdir, path_var, program, .. }) = resolve_program(ms, &env.base_dir, &env.path_dirs) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no `command` to run"));
    };
    let path_joined = std::env::join_paths(&path_var).unwrap_or_default();
    let data_path = env.paths.data_path(&ms.name, instance);
    std::fs::create_dir_all(&data_path)?;
    let mut cmd = tokio::process::Command::new(&program);
    // The runtime's own KANBAN_ADDR (a shell that ran an AION service) does not leak into instances.
    cmd.env_remove("KANBAN_ADDR");
    cmd.args(&ms.command[1..])
        .current_dir(&workdir)
        .env("PATH", path_joined)
        .envs(&ms.env)
        .env("SERVICE_NAME", &ms.name)
        .env("MS_NUMBER", instance.to_string())
        .env("MSNUMBER", instance.to_string())
        .env("AION_HOME", &env.paths.root)
        .env("DEVICE_NAME", &env.device_name)
        .env("DEBUG", &env.debug)
        .env("AION_SOCKET", env.paths.socket())
        .env("AION_DATA_PATH", &data_path)
        .env("AION_INSTANCE", instance_marker(&env.run_marker, &ms.name, instance, gen))
        .envs(aion_client_env(ms, env.kanban_addr.as_deref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let log = Arc::new(Mutex::new(LogFile::open(env.paths.log_file(&ms.name, instance), env.log_cap)?));
    if let Some(out) = child.stdout.take() {
        tasks.spawn("log pump", pump(out, log.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tasks.spawn("log pump", pump(err, log.clone()));
    }
    let exit = Box::pin(async move {
        match child.wait().await {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                ExitInfo { code: st.code(), signal: st.signal(), error: None }
            }
            Err(e) => ExitInfo { code: None, signal: None, error: Some(format!("wait failed: {e}")) },
        }
    });
    Ok(Running { pid, control: Box::new(ProcessGroup(pid as i32)), exit })
}

/// A size-capped log file rotated to `<name>.1`.
pub struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    cap: u64,
}

impl LogFile {
    /// Opens for appending.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(path: PathBuf, cap: u64) -> std::io::Result<LogFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
        // A log made by an earlier version may be readable by others: it holds what the service printed.
        let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile { path, file, size, cap: cap.max(4096) })
    }

    /// Appends a line, rotating first if the cap would be exceeded (so with lines of at most the cap, a log file
    /// never exceeds it).
    pub fn write_line(&mut self, line: &[u8]) {
        use std::io::Write;
        if self.size + line.len() as u64 > self.cap {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            let _ = std::fs::rename(&self.path, &rotated);
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path) {
                Ok(f) => {
                    self.file = f;
                    self.size = 0;
                }
                Err(e) => tracing::error!(path = %self.path.display(), "log rotation failed: {e}"),
            }
        }
        if self.file.write_all(line).is_ok() {
            self.size += line.len() as u64;
        }
    }
}

/// The longest line written to an instance's log; longer output lines are split (a line of output without a
/// newline — a progress bar, a base64 dump — costs the runtime this much memory, not its length).
pub const MAX_LOG_LINE: usize = 64 << 10;

/// Cuts a byte stream into lines of at most `max` bytes (newline included), without holding more than one line.
#[derive(Debug)]
pub struct LineSplitter {
    line: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes (at least 2).
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter { line: Vec::new(), max: max.max(2) }
    }

    /// Takes bytes from `data` up to the end of the next complete line; returns how many were taken and the line
    /// when one is complete (a newline, or `max` bytes, whose last byte is then a newline added here).
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<&[u8]>) {
        let room = self.max - 1 - self.line.len();
        let window = &data[..data.len().min(room + 1)];
        if let Some(i) = window.iter().position(|b| *b == b'\n') {
            self.line.extend_from_slice(&window[..=i]);
            return (i + 1, Some(&self.line));
        }
        let take = window.len().min(room);
        self.line.extend_from_slice(&data[..take]);
        if self.line.len() == self.max - 1 {
            self.line.push(b'\n');
            return (take, Some(&self.line));
        }
        (take, None)
    }

    /// Starts the next line (after a complete one was written).
    pub fn clear(&mut self) {
        self.line.clear();
        if self.line.capacity() > 4096 {
            self.line.shrink_to(4096);
        }
    }

    /// What is left at the end of the stream, newline-terminated.
    pub fn finish(&mut self) -> Option<&[u8]> {
        if self.line.is_empty() {
            return None;
        }
        self.line.push(b'\n');
        Some(&self.line)
    }
}

async fn pump(stream: impl AsyncRead + Unpin, log: Arc<Mutex<LogFile>>) {
    let max = log.lock().map_or(MAX_LOG_LINE, |l| l.cap.min(MAX_LOG_LINE as u64) as usize);
    let mut rd = BufReader::with_capacity(64 << 10, stream);
    let mut lines = LineSplitter::new(max);
    loop {
        let data = match rd.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(d) => d,
        };
        let (taken, line) = lines.feed(data);
        if let Some(line) = line {
            if let Ok(mut l) = log.lock() {
                l.write_line(line);
            }
            lines.clear();
        }
        rd.consume(taken);
    }
    if let (Some(line), Ok(mut l)) = (lines.finish(), log.lock()) {
        l.write_line(line);
    }
}

/// Raises this process's open-file soft limit to its hard limit (as Go programs such as AION do): each instance
/// costs the runtime a few descriptors (pipes, its session), and the common soft default of 1024 would stop a few
/// hundred instances from starting. Children inherit the raised limit. Returns (before, after).
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let want = hard.min(1 << 20);
    if soft >= want {
        return Some((soft, soft));
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => Some((soft, want)),
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {soft} to {want}: {e}");
            Some((soft, soft))
        }
    }
}

/// One entry of the process registry (`run/instances.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RegistryEntry {
    /// Service.
    pub service: String,
    /// Instance.
    pub instance: u32,
    /// Process id = process group id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22), to avoid killing a reused pid.
    pub start_ticks: u64,
}

/// The start time of a process in clock ticks since boot, from `/proc/<pid>/stat`.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Writes the registry atomically.
fn write_registry(path: &Path, entries: &[RegistryEntry]) {
    let tmp = path.with_extension("json.tmp");
    let ok = serde_json::to_vec(entries)
        .ok()
        .and_then(|b| std::fs::write(&tmp, b).ok())
        .and_then(|_| std::fs::rename(&tmp, path).ok());
    if ok.is_none() {
        tracing::error!(path = %path.display(), "cannot write the process registry");
    }
}

/// Kills every process started for this data dir's instances, by any run (a fresh broker knows none of them:
/// after a kill -9 of the runtime, or a restart of the broker, what is left, escaped descendants included, goes).
/// Returns how many.
fn cleanup_marked(dir_id: &str) -> usize {
    kill_marked(&format!("{dir_id}:"))
}

/// Kills process groups left by a previous runtime on this data dir (after kill -9). Returns how many.
pub fn cleanup_orphans(path: &Path) -> usize {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let entries: Vec<RegistryEntry> = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable process registry: {e}");
            return 0;
        }
    };
    let mut n = 0;
    for e in entries {
        if e.pid > 1 && proc_start_ticks(e.pid) == Some(e.start_ticks) {
            tracing::warn!(service = %e.service, instance = e.instance, pid = e.pid, "killing an orphan from a previous run");
            let _ = killpg(Pid::from_raw(e.pid as i32), Signal::SIGKILL);
            n += 1;
        }
    }
    let _ = std::fs::remove_file(path);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(chunks: &[Vec<u8>], max: usize) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            let mut rest = &c[..];
            while !rest.is_empty() {
                let (n, line) = s.feed(rest);
                if let Some(l) = line {
                    out.push(l.to_vec());
                    s.clear();
                }
                rest = &rest[n..];
            }
        }
        if let Some(l) = s.finish() {
            out.push(l.to_vec());
        }
        out
    }

    #[test]
    fn lines_are_kept_and_long_ones_split() {
        let out = split(&[b"ab\ncd".to_vec(), b"efgh\n\nxyz".to_vec()], 4);
        let want: Vec<&[u8]> = vec![b"ab\n", b"cde\n", b"fgh\n", b"\n", b"xyz\n"];
        assert_eq!(out, want);
    }

    proptest! {
        #[test]
        fn nothing_is_lost_and_no_line_is_longer_than_max(
            chunks in prop::collection::vec(prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..64), 0..16),
            max in 2usize..20,
        ) {
            let out = split(&chunks, max);
            for l in &out {
                prop_assert!(l.len() <= max && l.ends_with(b"\n"), "{l:?}");
            }
            let input: Vec<u8> = chunks.concat().into_iter().filter(|b| *b != b'\n').collect();
            let output: Vec<u8> = out.concat().into_iter().filter(|b| *b != b'\n').collect();
            prop_assert_eq!(input, output);
        }
    }
}
