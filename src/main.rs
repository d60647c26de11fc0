//! The `aion` command.

use aion::actors::control::{self, Request, StatusReport};
use aion::actors::paths::{default_data_dir, Paths};
use aion::actors::{Node, NodeOptions};
use aion::runtime::config::{load_file, Severity};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[cfg(feature = "top")]
mod top;

/// Prints a line on stdout; a closed stdout (`aion status | head -1`) ends the output, it is not worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// Prints a line on stderr, ignoring a stderr that cannot be written.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

// mimalloc: the runtime allocates and frees small objects per kanban; measured faster than glibc malloc
// (docs/performance.md), and the same allocator as in the benchmarks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// AION in Rust: run kanban-passing microservices on this device.
#[derive(Parser)]
#[command(name = "aion", version, about)]
struct Cli {
    /// Data directory shared by `aion run` and the other commands
    /// [default: $AION_HOME, else /var/lib/aion as root, else ~/.local/state/aion]
    #[arg(long, global = true, env = "AION_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds the CLI waits for the runtime before giving up (a request it gave up on is not carried out later).
    #[arg(long, global = true, env = "AION_TIMEOUT", default_value_t = 30)]
    timeout: u64,
    /// Send the command to the runtime at `[NAME@]ADDR` (its QUIC `--listen` address) instead of the one on
    /// --data-dir, with the admin identity in --data-dir (`aion cluster issue NAME --admin --out DIR`): `status`,
    /// `apply`, `delete`, `kanban send`, `kanban trace`, `cluster remove`. NAME (the device there) defaults to the
    /// master the identity was issued by.
    #[arg(long, global = true, env = "AION_REMOTE")]
    remote: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run services.yml in the foreground (Ctrl-C stops it cleanly).
    Run {
        /// The services.yml.
        file: PathBuf,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Run the master-aion of a cluster: `aion apply` on its data dir places the services on the nodes
    /// (`targetNode`; services without one run here). Needs `aion cluster init` first.
    Master {
        /// This node's name (its certificate's; `aion cluster init --name`).
        #[arg(long)]
        name: String,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Run a worker-aion: join the master at ADDR (once, with a token from `aion cluster token`; later starts
    /// reconnect with the certificate kept in the data dir) and run the services it places here.
    Worker {
        /// The master's address (`host:port`, its `--listen`).
        #[arg(long)]
        join: String,
        /// A join token (only for the first start).
        #[arg(long, env = "AION_JOIN_TOKEN")]
        token: Option<String>,
        /// This node's name (its `targetNode` in services.yml).
        #[arg(long)]
        name: String,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Cluster mode: the cluster CA and device certificates (see docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Check services.yml files and report every problem with file:line:column.
    Validate {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings as errors.
        #[arg(long)]
        strict: bool,
        /// Print diagnostics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every instance of the running runtime (on a master: of every node of the cluster).
    Status {
        /// Print the stable JSON document.
        #[arg(long)]
        json: bool,
        /// On a master: only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show an instance's output (`transform`, `transform-2`, or `transform --instance 2`).
    Logs {
        /// Service, optionally suffixed with `-N` for instance N.
        service: String,
        /// Instance number.
        #[arg(long)]
        instance: Option<u32>,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Print only the last N lines first.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
    },
    /// Kanban tools.
    Kanban {
        #[command(subcommand)]
        cmd: KanbanCmd,
    },
    /// Apply a services.yml to the running runtime: services added start, services whose definition changed
    /// restart, services removed stop; the others go on untouched (their queues and sessions too).
    Apply {
        /// The services.yml.
        file: PathBuf,
        /// Refuse the file on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Remove every service of the running runtime (their instances stop; durable queues stay in the store).
    Delete,
    /// Stop the running runtime gracefully.
    Stop,
    /// The live view in the terminal: instances with state, rates and queues, dead letters, devices, cluster
    /// nodes, every second (`q` quits).
    Top {
        /// Print one frame as text and exit (also what happens when stdout is not a terminal).
        #[arg(long)]
        once: bool,
        /// `--once`: the frame's width in columns.
        #[arg(long, default_value_t = 140)]
        width: u16,
        /// `--once`: the frame's height in lines.
        #[arg(long, default_value_t = 30)]
        height: u16,
    },
    /// Files crossing to and from other devices now (Send Anything): file, progress, rate, time left.
    Transfers {
        /// Redraw every second until no transfer is left.
        #[arg(long, short)]
        follow: bool,
    },
}

/// The flags of `aion run`, `aion master` and `aion worker`.
#[derive(clap::Args)]
struct RunArgs {
    /// Refuse the file on warnings too.
    #[arg(long)]
    strict: bool,
    /// Seconds between SIGTERM and SIGKILL at shutdown.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Per-instance queue capacity (kanbans).
    #[arg(long, default_value_t = 1024)]
    queue_capacity: usize,
    /// Per-instance bound of the memory held by queued and in-flight kanbans (MiB); an empty queue still takes
    /// one kanban of any size. 0: no memory bound.
    #[arg(long, default_value_t = 64)]
    queue_max_mb: usize,
    /// Record every hop in the kanban archive (the replicator; `aion kanban log/trace`). Costs throughput
    /// (docs/performance.md); implied by --mongo.
    #[arg(long)]
    archive: bool,
    /// Keep archived hops this many days.
    #[arg(long, default_value_t = 7)]
    archive_days: u32,
    /// Keep at most this many archived hops.
    #[arg(long, default_value_t = 1_000_000)]
    archive_max_rows: u64,
    /// Also export archived hops to MongoDB (e.g. mongodb://127.0.0.1:27017), like AION's replicator.
    #[arg(long, env = "AION_MONGO_URI")]
    mongo: Option<String>,
    /// MongoDB database.
    #[arg(long, env = "KANBAN_DB", default_value = "AionCore")]
    mongo_db: String,
    /// MongoDB collection.
    #[arg(long, env = "KANBAN_COLLECTION", default_value = "kanban")]
    mongo_collection: String,
    /// Where durable queues live: `embedded` (SQLite in the data dir) or a Redis URL
    /// (`redis://host:6379/0`): AION's `kanban:before:*` streams with consumer groups and acks.
    #[arg(long, env = "AION_STORE", default_value = "embedded")]
    store: String,
    /// Embedded store: cap the queue database at this many MiB; past it producers wait (as on a full disk)
    /// until acknowledgements free space.
    #[arg(long)]
    store_max_mb: Option<u64>,
    /// Redis store: acknowledged entries kept per stream (0: deleted on acknowledgement).
    #[arg(long, default_value_t = 0)]
    redis_retain: usize,
    /// Redis store: seconds to wait for Redis at start.
    #[arg(long, default_value_t = 10)]
    redis_wait: u64,
    /// Cut off and kill an instance whose oldest delivery has waited this many seconds for its acknowledgement
    /// (a hung service; its kanbans are redelivered). 0: never (the wait is shown in `aion status --json`).
    #[arg(long, default_value_t = 0.0)]
    ack_timeout: f64,
    /// Dead-letter (`hop-limit`) a kanban whose chain has been routed this many times: a routing cycle
    /// (0: no limit).
    #[arg(long, default_value_t = aion::actors::DEFAULT_HOP_LIMIT)]
    hop_limit: u32,
    /// Serve AION's gRPC kanban API (`kanbanpb.Kanban`, plaintext HTTP/2) on `host:port` for unmodified AION
    /// microservices, which get `KANBAN_ADDR`; `off` turns it off. Loopback by default: exposing it beyond the
    /// host lets anyone who reaches it inject kanbans (with `--backend kubernetes` it admits each pod only as its
    /// own instance).
    #[arg(long, env = "AION_GRPC_ADDR", default_value = "127.0.0.1:11010")]
    grpc: String,
    /// Serve the HTTP endpoint on `host:port`: Prometheus metrics (`/metrics`), health (`/healthz`, `/readyz`)
    /// and the live web view (`/`); `off` turns it off. Loopback by default: beyond the host it shows anyone who
    /// reaches it the services, their counters and the dead letters' reasons (docs/observability.md).
    #[arg(long, env = "AION_HTTP_ADDR", default_value = "127.0.0.1:9480")]
    http: String,
    /// Restart an instance whose gRPC client lost its session without a terminate kanban and did not come
    /// back within this many seconds (AION's Python client can stay alive doing nothing). 0: never.
    #[arg(long, default_value_t = 30)]
    grpc_reconnect: u64,
    /// Cluster mode: accept links from the other devices of `devices:` on this UDP address (QUIC with mutual
    /// TLS; needs a cluster identity, `aion cluster`). Without it this device only dials the others.
    #[arg(long, env = "AION_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Cluster mode: seconds without hearing from a peer device before its link is declared lost.
    #[arg(long, default_value_t = 4.0)]
    peer_timeout: f64,
    /// Cluster mode: kanbans each route to another device keeps in memory (the rest wait in the store).
    #[arg(long, default_value_t = 65_536)]
    outbox_capacity: usize,
    /// Cluster mode: bytes each route to another device keeps in memory (`64MiB`, `512KiB`, a number).
    #[arg(long, default_value = "64MiB")]
    outbox_bytes: String,
    /// Cluster mode: bytes of partial files (Send Anything) each device may have here at once.
    #[arg(long, default_value = "16GiB")]
    transfer_quota: String,
    /// Cluster mode: a device unreachable for longer than this (`90s`, `10m`, `2h`, `7d`; `0`: never) has the
    /// kanbans waiting for it dead-lettered `expired`.
    #[arg(long, default_value = "7d")]
    outbox_max_age: String,
    /// Where instances run: `process` (local processes) or `kubernetes` (a Deployment for `always: yes`, a Job
    /// otherwise, written to the API server of the in-cluster configuration or KUBECONFIG; docs/kubernetes.md).
    #[arg(long, env = "AION_BACKEND", default_value = "process")]
    backend: String,
    /// Kubernetes: the namespace [default: the client configuration's].
    #[arg(long, env = "AION_NAMESPACE")]
    namespace: Option<String>,
    /// Kubernetes: the project's name (a label on every object; deleting the ConfigMap `aion-project-NAME`
    /// deletes them all) [default: deviceName, else `aion`].
    #[arg(long, env = "AION_PROJECT")]
    project: Option<String>,
    /// Kubernetes: images are `PREFIX/<service>:<tag>` (AION's REPOSITORY_PREFIX; empty: `<service>:<tag>`).
    #[arg(long, env = "REPOSITORY_PREFIX", default_value = "latonaio")]
    image_prefix: String,
    /// Kubernetes: the kanban endpoint as pods reach it (their KANBAN_ADDR)
    /// [default: aion-endpoint.<namespace>.svc:<the --grpc port>].
    #[arg(long, env = "AION_POD_ENDPOINT")]
    pod_endpoint: Option<String>,
    /// Kubernetes: the host directory mounted as $AION_HOME/Data in pods [default: /var/lib/aion/<namespace>/Data].
    #[arg(long, env = "AION_POD_DATA")]
    pod_data: Option<String>,
    /// Kubernetes: the image pull secret of every pod (AION's REGISTRY_SECRET).
    #[arg(long, env = "REGISTRY_SECRET", default_value = "")]
    pull_secret: String,
    /// Kubernetes: seconds between full reconciles (drift is also repaired as the API server reports it).
    #[arg(long, default_value_t = 30)]
    kube_resync: u64,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create the cluster CA and this device's identity in the data dir.
    Init {
        /// This device's name (its `deviceName`; the master's `--name`) [default: the host name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Issue an identity for another device, signed by the CA in the data dir, into that device's data dir.
    Issue {
        /// The device's name (its `deviceName`), or with --admin the admin's.
        name: String,
        /// The device's data dir (a directory `cluster/` is created there; copy it to the device).
        #[arg(long)]
        out: PathBuf,
        /// An admin identity (`NAME.aion-admin`), for `aion --data-dir OUT --remote ADDR apply …` from elsewhere;
        /// revoked with `aion cluster remove NAME.aion-admin`.
        #[arg(long)]
        admin: bool,
    },
    /// Mint a single-use join token for a worker (printed as the last line of stdout).
    Token {
        /// How long it is valid: `90s`, `10m`, `2h`.
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
    /// Revoke a device's certificate: a running master refuses it at once and tells its nodes; otherwise peers
    /// that load the new revocation list (`cluster/crl.pem`) refuse it.
    Remove {
        /// The device's name.
        name: String,
        /// Also write the revocation list into these data dirs (the peers').
        #[arg(long)]
        to: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KanbanCmd {
    /// Put a kanban into a service instance's input queue.
    Send {
        /// Target service.
        service: String,
        /// Connection key stamped on the kanban.
        #[arg(long, default_value = "default")]
        key: String,
        /// Target instance.
        #[arg(long, default_value_t = 1)]
        instance: u32,
        /// Metadata as a JSON object; `@FILE` reads it from a file, `-` from stdin (for metadata larger than a
        /// command line can hold).
        #[arg(long, default_value = "{}")]
        metadata: String,
    },
    /// Show archived hops, most recent last (works while the runtime runs or after it stopped).
    Log {
        /// Only hops produced by or queued for this service.
        #[arg(long)]
        service: Option<String>,
        /// Only hops since this time: RFC 3339 UTC (`2026-11-27T10:00:00Z`) or an age (`90s`, `10m`, `2h`, `1d`).
        #[arg(long)]
        since: Option<String>,
        /// At most this many hops.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the whole chain a kanban belongs to (by kanban id or trace id), with per-hop latency.
    Trace {
        /// Kanban id or trace id (hex, as `aion kanban send` and `log` print them).
        id: String,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let timeout = Duration::from_secs(cli.timeout.max(1));
    if let Some(r) = cli.remote.clone() {
        let _ = REMOTE.set(r);
    }
    let local_only = matches!(
        cli.cmd,
        Cmd::Logs { .. }
            | Cmd::Kanban { cmd: KanbanCmd::Log { .. } }
            | Cmd::Run { .. }
            | Cmd::Master { .. }
            | Cmd::Worker { .. }
    );
    let result = match cli.cmd {
        _ if local_only && REMOTE.get().is_some() => {
            Err("--remote: this command works on the device itself (ssh there); over the network: status, apply, delete, kanban send, kanban trace, cluster remove".to_owned())
        }
        Cmd::Validate { files, strict, json } => validate(&files, strict, json),
        Cmd::Run { file, args } => run_flags(args).and_then(|f| run(&data_dir, Source::File(&file), f)),
        Cmd::Master { name, args } => run_flags(args).and_then(|f| master(&data_dir, &name, f)),
        Cmd::Worker { join, token, name, args } => {
            run_flags(args).and_then(|f| worker(&data_dir, &join, token.as_deref(), &name, f))
        }
        Cmd::Cluster { cmd } => cluster(&data_dir, cmd),
        Cmd::Status { json, node } => block(status(&data_dir, json, node.as_deref(), timeout)),
        Cmd::Logs { service, instance, follow, lines } => logs(&data_dir, &service, instance, follow, lines, timeout),
        Cmd::Kanban { cmd: KanbanCmd::Send { service, key, instance, metadata } } => {
            block(send(&data_dir, service, key, instance, metadata, timeout))
        }
        Cmd::Kanban { cmd: KanbanCmd::Log { service, since, limit, json } } => {
            kanban_log(&data_dir, service, since.as_deref(), limit, json)
        }
        Cmd::Kanban { cmd: KanbanCmd::Trace { id, json } } => kanban_trace(&data_dir, &id, json),
        Cmd::Apply { file, strict } => block(apply(&data_dir, &file, strict, timeout)),
        Cmd::Delete => block(async {
            let v = ctl(&data_dir, &Request::Delete, timeout).await?;
            print_change(&v);
            Ok(())
        }),
        Cmd::Transfers { follow } => block(transfers(&data_dir, follow, timeout)),
        Cmd::Top { once, width, height } => top(&data_dir, once, width, height, timeout),
        Cmd::Stop => block(async {
            ctl(&data_dir, &Request::Stop, timeout).await?;
            out!("stop requested");
            Ok(())
        }),
    };
    // Whatever the runtime logged goes out before the verdict (bounded: a stuck stderr does not hold the exit).
    aion::runtime::log::LogSink::flush(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!("aion: {e}");
            ExitCode::FAILURE
        }
    }
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// One transfer in progress: direction, file, percentage, bytes, rate, time left.
fn transfer_line(device: &str, t: &aion::actors::control::TransferReport) -> String {
    let pct = if t.size == 0 { 100.0 } else { t.done as f64 * 100.0 / t.size as f64 };
    let left = if t.rate > 0 {
        format!("{:.0}s left", t.size.saturating_sub(t.done) as f64 / t.rate as f64)
    } else {
        "-".into()
    };
    let (arrow, who) = if t.direction == "out" { ("->", device) } else { ("<-", device) };
    format!(
        "{arrow} {who}  {}  {pct:5.1}%  {} of {}  {}/s  {left}  (kanban {})",
        t.file,
        human_bytes(t.done),
        human_bytes(t.size),
        human_bytes(t.rate),
        t.kanban
    )
}

/// `aion top`: the live view in the terminal, one status a second (`--once`, or stdout not a terminal: one
/// frame as text).
#[cfg(feature = "top")]
fn top(data_dir: &Path, once: bool, width: u16, height: u16, timeout: Duration) -> Result<(), String> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let fetch = || -> Result<StatusReport, String> {
        let v = block(ctl(data_dir, &Request::Status, timeout))?;
        serde_json::from_value(v).map_err(|e| format!("unexpected answer from the runtime: {e}"))
    };
    if once || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let r = fetch()?;
        out!("{}", top::render_text(&r, width.max(40), height.max(8))?.trim_end());
        return Ok(());
    }
    let first = fetch()?;
    let mut term = ratatui::init();
    let mut view = top::View::default();
    let mut next = Some(first);
    let res = loop {
        let r = match next.take().map_or_else(&fetch, Ok) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        view.update(&r);
        if let Err(e) = term.draw(|f| top::draw(f, &r, &view)) {
            break Err(e.to_string());
        }
        let until = std::time::Instant::now() + Duration::from_secs(1);
        let mut quit = false;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            match event::poll(left) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    quit = true;
                    tracing::error!("terminal: {e}");
                    break;
                }
            }
            if let Ok(Event::Key(k)) = event::read() {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => quit = true,
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => quit = true,
                    KeyCode::Down => view.scroll = (view.scroll + 1).min(r.instances.len().saturating_sub(1)),
                    KeyCode::Up => view.scroll = view.scroll.saturating_sub(1),
                    KeyCode::PageDown => view.scroll = (view.scroll + 20).min(r.instances.len().saturating_sub(1)),
                    KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(20),
                    _ => {}
                }
                if quit {
                    break;
                }
                // Scrolled: drawn again at once with the same status.
                if let Err(e) = term.draw(|f| top::draw(f, &r, &view)) {
                    tracing::error!("terminal: {e}");
                }
            }
        }
        if quit {
            break Ok(());
        }
    };
    ratatui::restore();
    res
}

#[cfg(not(feature = "top"))]
fn top(_: &Path, _: bool, _: u16, _: u16, _: Duration) -> Result<(), String> {
    Err("this aion was built without `aion top` (cargo feature `top`)".into())
}

/// `aion transfers`: the files crossing to and from other devices now; `--follow` redraws every second until
/// none are left (progress for a person watching a long transfer).
async fn transfers(data_dir: &Path, follow: bool, timeout: Duration) -> Result<(), String> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let v = ctl(data_dir, &Request::Status, timeout).await?;
        let r: aion::actors::control::StatusReport =
            serde_json::from_value(v).map_err(|e| format!("unexpected answer: {e}"))?;
        let lines: Vec<String> = r
            .federation
            .map(|f| {
                f.devices
                    .iter()
                    .flat_map(|d| d.files.active.iter().map(|t| transfer_line(&d.name, t)).collect::<Vec<_>>())
                    .collect()
            })
            .unwrap_or_default();
        if follow && tty {
            // Redraw in place (clear the screen, home).
            print!("\x1b[H\x1b[2J");
        }
        if lines.is_empty() {
            out!("no transfers in progress");
        }
        for l in &lines {
            out!("{l}");
        }
        if !follow || lines.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `--remote`: the runtime the commands go to over QUIC, `[NAME@]ADDR`.
static REMOTE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sends a control request to the runtime on `data_dir`, or (`--remote`) over QUIC with the admin identity in
/// `data_dir`; the reply object.
async fn ctl(data_dir: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value, String> {
    let Some(remote) = REMOTE.get() else {
        return control::call(&Paths::new(data_dir).control(), req, timeout).await;
    };
    remote_call(data_dir, remote, req).await
}

#[cfg(feature = "cluster")]
async fn remote_call(data_dir: &Path, remote: &str, req: &Request) -> Result<serde_json::Value, String> {
    use aion::actors::federation::tls;
    let dir = tls::ClusterDir::new(data_dir);
    let (name, addr) = match remote.split_once('@') {
        Some((n, a)) => (n.to_owned(), a.to_owned()),
        None => {
            let n = std::fs::read_to_string(dir.root.join("master")).map_err(|_| {
                format!("--remote {remote}: name the device there (`NAME@{remote}`): {} has no master name (an admin identity from `aion cluster issue NAME --admin` has)", dir.root.display())
            })?;
            (n.trim().to_owned(), remote.to_owned())
        }
    };
    let env = control::Envelope { request: req.clone(), deadline_ms: None };
    let line = serde_json::to_vec(&env).map_err(|e| e.to_string())?;
    let reply = aion::actors::federation::ask(data_dir, &addr, &name, line).await?;
    control::parse_reply(&reply, &name)
}

#[cfg(not(feature = "cluster"))]
async fn remote_call(_: &Path, _: &str, _: &Request) -> Result<serde_json::Value, String> {
    Err("--remote: this aion was built without cluster mode".into())
}

fn block<T, F: std::future::Future<Output = Result<T, String>>>(f: F) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start tokio: {e}"))?
        .block_on(f)
}

/// Directories put in front of the microservices' `PATH`: the `aion` binary's directory and its `examples/`.
fn path_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(dir.join("examples"));
        dirs.push(dir);
    }
    dirs
}

/// The directory a services.yml's relative paths resolve against.
fn base_dir_of(file: &Path) -> PathBuf {
    file.canonicalize().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."))
}

/// Loads a services.yml and checks what the file alone cannot tell: that each command can be found (a warning,
/// since the PATH at run time may differ).
fn load_checked(file: &Path) -> aion::runtime::config::Loaded {
    let mut loaded = load_file(file);
    let Some(cfg) = loaded.config.clone() else { return loaded };
    let (base, dirs) = (base_dir_of(file), path_dirs());
    for ms in cfg.microservices.values() {
        if let Some(r) = aion::actors::backend::resolve_program(ms, &base, &dirs) {
            if !r.found {
                let path = format!("microservices.{}.command", ms.name);
                let msg = format!(
                    "{path}: `{}` is not found (as a file, or in PATH with the aion directory first); the instance would fail to start",
                    r.program.display()
                );
                loaded.warn_at(&path, msg);
            }
        }
    }
    loaded
}

fn validate(files: &[PathBuf], strict: bool, json: bool) -> Result<(), String> {
    let mut failed = 0;
    let mut all = Vec::new();
    for f in files {
        let loaded = load_checked(f);
        if loaded.failed(strict) {
            failed += 1;
        }
        if json {
            all.extend(loaded.diagnostics);
        } else {
            for d in &loaded.diagnostics {
                out!("{d}");
            }
            let errors = loaded.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
            let warnings = loaded.diagnostics.len() - errors;
            let verdict = if loaded.failed(strict) { "invalid" } else { "ok" };
            out!("{}: {verdict} ({errors} errors, {warnings} warnings)", f.display());
        }
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?);
    }
    if failed > 0 {
        return Err(format!("{failed} of {} files invalid", files.len()));
    }
    Ok(())
}

/// The runtime's options from the flags of `aion run`, `aion master` and `aion worker`.
///
/// # Errors
/// An invalid flag, named.
fn run_flags(a: RunArgs) -> Result<RunFlags, String> {
    let RunArgs {
        strict,
        grace,
        queue_capacity,
        queue_max_mb,
        archive,
        archive_days,
        archive_max_rows,
        mongo,
        mongo_db,
        mongo_collection,
        store,
        store_max_mb,
        redis_retain,
        redis_wait,
        hop_limit,
        ack_timeout,
        grpc,
        http,
        grpc_reconnect,
        listen,
        peer_timeout,
        outbox_capacity,
        outbox_bytes,
        transfer_quota,
        outbox_max_age,
        backend,
        namespace,
        project,
        image_prefix,
        pod_endpoint,
        pod_data,
        pull_secret,
        kube_resync,
    } = a;
    let kubernetes = match backend.as_str() {
        "process" | "local" => None,
        "kubernetes" | "k8s" | "kube" => Some(KubeFlags {
            namespace,
            project,
            image_prefix,
            pod_endpoint,
            pod_data,
            pull_secret,
            resync: Duration::from_secs(kube_resync.max(1)),
        }),
        other => return Err(format!("--backend {other:?}: expected `process` or `kubernetes`")),
    };
    let mut cluster = aion::actors::node::ClusterOptions { listen, ..Default::default() };
    if peer_timeout.is_finite() && peer_timeout > 0.0 {
        cluster.dead_after = Duration::from_secs_f64(peer_timeout.clamp(0.2, 3600.0));
        cluster.ping_every = (cluster.dead_after / 4).max(Duration::from_millis(50));
    }
    cluster.outbox_kanbans = outbox_capacity.max(1);
    cluster.outbox_bytes =
        aion::runtime::config::parse_bytes(&outbox_bytes).map_err(|e| format!("--outbox-bytes: {e}"))?;
    cluster.transfer_quota =
        aion::runtime::config::parse_bytes(&transfer_quota).map_err(|e| format!("--transfer-quota: {e}"))? as u64;
    cluster.outbox_max_age =
        aion::runtime::config::parse_age(&outbox_max_age).map_err(|e| format!("--outbox-max-age: {e}"))?;
    let grpc = listen_addr("--grpc", &grpc)?;
    let http = listen_addr("--http", &http)?;
    let redis = match store.as_str() {
        "embedded" | "sqlite" => None,
        url if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://") => {
            Some(aion::actors::store::RedisConfig {
                url: url.to_owned(),
                retain: redis_retain,
                connect_wait: std::time::Duration::from_secs(redis_wait),
            })
        }
        other => {
            return Err(format!("--store {other:?}: expected `embedded` or a redis:// URL"));
        }
    };
    let mongo = mongo.map(|uri| aion::actors::export::mongo::MongoConfig {
        uri,
        database: mongo_db,
        collection: mongo_collection,
    });
    let retention = aion::actors::store::Retention {
        max_age_ms: i64::from(archive_days) * 86_400_000,
        max_rows: archive_max_rows.min(i64::MAX as u64) as i64,
    };
    let archive = archive || mongo.is_some();
    let store_max_bytes = store_max_mb.map(|m| m.saturating_mul(1 << 20));
    Ok(RunFlags {
        strict,
        grace,
        queue_capacity,
        // 0: no memory bound (the kanban count still bounds the queue).
        queue_max_bytes: if queue_max_mb == 0 { usize::MAX } else { queue_max_mb.saturating_mul(1 << 20) },
        archive,
        retention,
        mongo,
        redis,
        store_max_bytes,
        hop_limit,
        ack_timeout: (ack_timeout > 0.0 && ack_timeout.is_finite())
            .then(|| Duration::from_secs_f64(ack_timeout.min(1e9))),
        grpc,
        grpc_reconnect: Duration::from_secs(grpc_reconnect),
        http,
        cluster,
        kubernetes,
    })
}

/// A listening address flag: `host:port`, or `off` (or empty) for none.
fn listen_addr(flag: &str, value: &str) -> Result<Option<std::net::SocketAddr>, String> {
    match value.trim() {
        "off" | "" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|e| format!("{flag} {addr:?}: expected host:port (an IP address and a port) or `off`: {e}")),
    }
}

struct RunFlags {
    strict: bool,
    grace: u64,
    queue_capacity: usize,
    queue_max_bytes: usize,
    archive: bool,
    retention: aion::actors::store::Retention,
    mongo: Option<aion::actors::export::mongo::MongoConfig>,
    redis: Option<aion::actors::store::RedisConfig>,
    store_max_bytes: Option<u64>,
    hop_limit: u32,
    ack_timeout: Option<Duration>,
    grpc: Option<std::net::SocketAddr>,
    grpc_reconnect: Duration,
    http: Option<std::net::SocketAddr>,
    cluster: aion::actors::node::ClusterOptions,
    kubernetes: Option<KubeFlags>,
}

/// `--backend kubernetes` and its flags.
#[cfg_attr(not(feature = "kube"), allow(dead_code))]
struct KubeFlags {
    namespace: Option<String>,
    project: Option<String>,
    image_prefix: String,
    pod_endpoint: Option<String>,
    pod_data: Option<String>,
    pull_secret: String,
    resync: Duration,
}

/// What a runtime runs: a services.yml, or (master, worker) the configuration cluster mode gives it.
enum Source<'a> {
    File(&'a Path),
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    Config(aion::runtime::config::ServicesFile, String),
}

#[cfg(feature = "cluster")]
fn master(data_dir: &Path, name: &str, mut flags: RunFlags) -> Result<(), String> {
    use aion::actors::federation::tls;
    let dir = tls::ClusterDir::new(data_dir);
    if !dir.is_ca() {
        return Err(format!("{} holds no cluster CA: run `aion cluster init --name {name}` first", dir.root.display()));
    }
    if flags.cluster.listen.is_none() {
        return Err("aion master needs --listen ADDR (UDP, where workers join and links arrive)".into());
    }
    let current = std::fs::read_to_string(dir.node_name()).unwrap_or_default();
    let expiring = tls::expires_in(&dir).is_some_and(|s| s < tls::RENEW_BEFORE_SECS);
    if current.trim() != name || expiring {
        // The master holds the CA: it gives itself an identity for the name it runs as (and renews it).
        let id = tls::issue(&dir, name).map_err(|e| e.to_string())?;
        tls::install(&dir, &id).map_err(|e| e.to_string())?;
    }
    flags.cluster.role = aion::actors::node::ClusterRole::Master;
    let cfg = aion::actors::cluster::Master::stored_slice(data_dir, name);
    run(data_dir, Source::Config(cfg, format!("master-aion {name}")), flags)
}

#[cfg(feature = "cluster")]
fn worker(data_dir: &Path, join: &str, token: Option<&str>, name: &str, mut flags: RunFlags) -> Result<(), String> {
    use aion::actors::federation::tls;
    let dir = tls::ClusterDir::new(data_dir);
    if !dir.has_identity() || aion::actors::cluster::worker_start(data_dir, name).is_none() {
        let token = token.ok_or("this data dir has not joined a cluster yet: --token TOKEN (from `aion cluster token` on the master) is needed once")?;
        std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let master = block(aion::actors::cluster::join(data_dir, join, token, name))?;
        err!("aion: joined the cluster of master `{master}` as `{name}`");
    }
    let current = std::fs::read_to_string(dir.node_name()).unwrap_or_default();
    if current.trim() != name {
        return Err(format!("this data dir joined the cluster as `{}`, not `{name}`", current.trim()));
    }
    let Some((_, master, cfg)) = aion::actors::cluster::worker_start(data_dir, name) else {
        return Err("the cluster state in the data dir is unreadable".into());
    };
    flags.cluster.role = aion::actors::node::ClusterRole::Worker { join: join.to_owned(), master };
    if flags.cluster.listen.is_none() {
        flags.cluster.listen = Some(std::net::SocketAddr::from(([0, 0, 0, 0], aion::actors::federation::DEFAULT_PORT)));
    }
    run(data_dir, Source::Config(cfg, format!("worker-aion {name}")), flags)
}

#[cfg(not(feature = "cluster"))]
fn master(_: &Path, _: &str, _: RunFlags) -> Result<(), String> {
    Err("this aion was built without cluster mode (cargo feature `cluster`)".into())
}

#[cfg(not(feature = "cluster"))]
fn worker(_: &Path, _: &str, _: Option<&str>, _: &str, _: RunFlags) -> Result<(), String> {
    Err("this aion was built without cluster mode (cargo feature `cluster`)".into())
}

fn run(data_dir: &Path, source: Source<'_>, flags: RunFlags) -> Result<(), String> {
    let RunFlags {
        strict,
        grace,
        queue_capacity,
        queue_max_bytes,
        archive,
        retention,
        mongo,
        redis,
        store_max_bytes,
        hop_limit,
        ack_timeout,
        grpc,
        grpc_reconnect,
        http,
        cluster,
        kubernetes,
    } = flags;
    // Logging never panics nor blocks the runtime, whatever happens to stderr (see aion_runtime::log).
    aion::runtime::log::init();
    aion::actors::backend::become_subreaper();
    if let Some((before, after)) = aion::actors::backend::raise_fd_limit() {
        if after > before {
            tracing::info!(before, after, "raised the open-file limit");
        }
    }
    let (config, label, file) = match source {
        Source::File(file) => {
            // Commands of services run in pods are the images' business, not this host's.
            let loaded = if kubernetes.is_some() { load_file(file) } else { load_checked(file) };
            for d in &loaded.diagnostics {
                aion::runtime::log::say(d);
            }
            match loaded.config {
                Some(c) if !loaded.failed(strict) => (c, file.display().to_string(), Some(file)),
                _ => return Err(format!("{} is invalid; nothing started", file.display())),
            }
        }
        Source::Config(c, label) => (c, label, None),
    };
    let path_dirs = path_dirs();
    let mut opts = NodeOptions::new(data_dir, config);
    if let Some(file) = file {
        opts.config_path = Some(file.to_path_buf());
        opts.base_dir = base_dir_of(file);
    }
    opts.grace = Duration::from_secs(grace);
    opts.queue_capacity = queue_capacity;
    opts.queue_max_bytes = queue_max_bytes;
    opts.path_dirs = path_dirs;
    opts.archive = archive;
    opts.retention = retention;
    opts.mongo = mongo;
    opts.redis = redis;
    opts.store_max_bytes = store_max_bytes;
    opts.hop_limit = hop_limit;
    opts.ack_timeout = ack_timeout;
    opts.grpc = grpc;
    opts.grpc_reconnect = grpc_reconnect;
    opts.http = http;
    opts.cluster = cluster;
    match kubernetes {
        None => {}
        #[cfg(feature = "kube")]
        Some(k) => {
            // Each runtime its own project by default (runtimes sharing a namespace never touch each other's
            // objects): its deviceName made a label value.
            let project = k
                .project
                .unwrap_or_else(|| aion::actors::backend::kube::objects::label_value(&opts.config.device_name));
            opts.kubernetes = Some(aion::actors::backend::kube::KubeOptions {
                namespace: k.namespace,
                project,
                image_prefix: k.image_prefix,
                endpoint: k.pod_endpoint,
                data_host_path: k.pod_data,
                pull_secret: k.pull_secret,
                resync: k.resync,
                ..Default::default()
            });
        }
        #[cfg(not(feature = "kube"))]
        Some(_) => {
            return Err(
                "--backend kubernetes: this aion was built without the Kubernetes backend (cargo feature `kube`)"
                    .into(),
            )
        }
    }
    // The runtime runs inside an actix System: actors execute on its arbiter.
    actix::System::new().block_on(async move {
        // Signals are handled from before anything starts: SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH
        // session) all stop the runtime gracefully.
        use tokio::signal::unix::{signal, SignalKind};
        let handle = |kind: SignalKind, name: &str| signal(kind).map_err(|e| format!("cannot handle {name}: {e}"));
        let mut int = handle(SignalKind::interrupt(), "SIGINT")?;
        let mut term = handle(SignalKind::terminate(), "SIGTERM")?;
        // Under `nohup` (SIGHUP ignored when we start) the operator wants the runtime to outlive the session.
        let mut hup = if sighup_ignored() { None } else { Some(handle(SignalKind::hangup(), "SIGHUP")?) };

        let node = Node::start(opts).await.map_err(|e| e.to_string())?;
        aion::runtime::log::say(format_args!(
            "aion: running {label} (data dir {}); Ctrl-C or `aion stop` to stop",
            data_dir.display()
        ));
        let failure = tokio::select! {
            _ = int.recv() => None,
            _ = term.recv() => None,
            _ = hangup(&mut hup) => {
                tracing::info!("SIGHUP (terminal or session closed): stopping");
                None
            }
            _ = node.stop_requested() => None,
            r = node.failed() => Some(r),
        };
        // A second signal during the stop ends it at once: remaining instances are killed.
        let registry = aion::actors::paths::Paths::new(data_dir).registry();
        let stopped = tokio::select! {
            r = node.shutdown() => r,
            _ = int.recv() => Err(second_signal(&registry)),
            _ = term.recv() => Err(second_signal(&registry)),
            _ = hangup(&mut hup) => Err(second_signal(&registry)),
        };
        match failure {
            Some(r) => Err(format!("the supervision tree gave up: {r:?}")),
            None => stopped,
        }
    })
}

/// The next SIGHUP, or never when it is not handled.
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// True when SIGHUP was ignored when the runtime started (`nohup`): read from `/proc/self/status` (`SigIgn`).
fn sighup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigIgn:"))?.trim().to_owned();
            u64::from_str_radix(&mask, 16).ok()
        })
        .is_some_and(|m| m & 1 != 0)
}

/// A second stop signal: kill what is left and say so.
fn second_signal(registry: &Path) -> String {
    let killed = aion::actors::backend::cleanup_orphans(registry);
    format!("a second signal ended the stop at once ({killed} instances killed); queued kanbans are kept")
}

async fn apply(data_dir: &Path, file: &Path, strict: bool, timeout: Duration) -> Result<(), String> {
    let loaded = load_checked(file);
    for d in &loaded.diagnostics {
        err!("{d}");
    }
    if loaded.failed(strict) {
        return Err(format!("{}: not applied", file.display()));
    }
    let yaml = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let req = Request::Apply { file: file.display().to_string(), yaml };
    let v = ctl(data_dir, &req, timeout).await?;
    print_change(&v);
    Ok(())
}

/// Prints what an apply or a delete changed.
fn print_change(v: &serde_json::Value) {
    let list = |k: &str| -> String {
        let names: Vec<&str> =
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(" ")
        }
    };
    out!("added: {}", list("added"));
    out!("changed (restarted): {}", list("changed"));
    out!("removed: {}", list("removed"));
    if v["nodes"].is_object() {
        for (node, c) in v["nodes"].as_object().into_iter().flatten() {
            out!("node {node}: {}", c);
        }
    }
}

#[cfg(feature = "cluster")]
fn cluster(data_dir: &Path, cmd: ClusterCmd) -> Result<(), String> {
    use aion::actors::federation::tls;
    let dir = tls::ClusterDir::new(data_dir);
    match cmd {
        ClusterCmd::Init { name } => {
            let name = match name {
                Some(n) => n,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .map_err(|e| format!("cannot read the host name ({e}): give --name NAME"))?,
            };
            tls::init(&dir, &name).map_err(|e| format!("{e} (--name NAME sets another)"))?;
            out!("cluster CA and the identity of `{name}` created in {}", dir.root.display());
            out!("issue other devices' identities here with `aion cluster issue NAME --out THEIR_DATA_DIR`");
        }
        ClusterCmd::Issue { name, out, admin } => {
            let id = if admin { tls::issue_admin(&dir, &name) } else { tls::issue(&dir, &name) }
                .map_err(|e| e.to_string())?;
            let target = tls::ClusterDir::new(&out);
            tls::install(&target, &id).map_err(|e| e.to_string())?;
            if dir.crl().exists() {
                std::fs::copy(dir.crl(), target.crl()).map_err(|e| format!("{}: {e}", target.crl().display()))?;
            }
            if admin {
                // The device that issued it: where `--remote ADDR` goes by default.
                let master = std::fs::read_to_string(dir.node_name()).unwrap_or_default();
                let path = target.root.join("master");
                std::fs::write(&path, master.trim()).map_err(|e| format!("{}: {e}", path.display()))?;
                out!(
                    "admin identity `{}` written to {}: aion --data-dir {} --remote {}_ADDR apply FILE",
                    id.name,
                    target.root.display(),
                    out.display(),
                    master.trim().to_uppercase()
                );
            } else {
                out!("identity of `{name}` written to {}", target.root.display());
            }
        }
        ClusterCmd::Token { ttl } => {
            let ttl = aion::runtime::config::parse_age(&ttl)
                .map_err(|e| format!("--ttl: {e}"))?
                .ok_or("--ttl: a token cannot live forever: give an age (10m, 1h)")?;
            let master = std::fs::read_to_string(dir.node_name())
                .map_err(|_| "no cluster here: run `aion cluster init` first".to_owned())?;
            let t = tls::mint_token(&dir, master.trim(), ttl).map_err(|e| e.to_string())?;
            err!(
                "single-use join token, valid {}s: aion worker --join MASTER_ADDR --token TOKEN --name NAME",
                ttl.as_secs()
            );
            out!("{t}");
        }
        ClusterCmd::Remove { name, to } => {
            // A running master revokes at once and tells every node.
            let req = Request::ClusterRemove { name: name.clone() };
            if block(ctl(data_dir, &req, Duration::from_secs(10))).is_ok() {
                out!("`{name}` revoked: the master refuses it from now on and has sent the new revocation list to its nodes");
                return Ok(());
            }
            let crl = tls::revoke(&dir, &name).map_err(|e| e.to_string())?;
            for d in to {
                let t = tls::ClusterDir::new(&d);
                std::fs::write(t.crl(), &crl).map_err(|e| format!("{}: {e}", t.crl().display()))?;
            }
            out!("`{name}` revoked: {} (peers refuse it once they load it, at their next start)", dir.crl().display());
        }
    }
    Ok(())
}

#[cfg(not(feature = "cluster"))]
fn cluster(_: &Path, _: ClusterCmd) -> Result<(), String> {
    Err("this aion was built without cluster mode (cargo feature `cluster`)".into())
}

async fn status(data_dir: &Path, json: bool, node: Option<&str>, timeout: Duration) -> Result<(), String> {
    let mut v = ctl(data_dir, &Request::Status, timeout).await?;
    if let Some(n) = node {
        let Some(nodes) = v["cluster"]["nodes"].as_array_mut() else {
            return Err("--node: this runtime is not a cluster master".into());
        };
        nodes.retain(|x| x["name"] == n);
        if nodes.is_empty() {
            return Err(format!("--node: no node `{n}` in this cluster"));
        }
        if v["device_name"] != n {
            v["instances"] = serde_json::json!([]);
        }
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let r: StatusReport = serde_json::from_value(v).map_err(|e| format!("unexpected status document: {e}"))?;
    // On a master, every node's instances, each row naming its node.
    let master_nodes = r.cluster.as_ref().filter(|c| c.role == "master").map(|c| c.nodes.clone());
    let rows_of: Vec<(String, aion::actors::InstanceStatus)> = match &master_nodes {
        Some(nodes) => {
            nodes.iter().flat_map(|n| n.instances.iter().map(move |i| (n.name.clone(), i.clone()))).collect()
        }
        None => r.instances.iter().map(|i| (r.device_name.clone(), i.clone())).collect(),
    };
    let mut rows = vec![[
        "NODE",
        "SERVICE",
        "INSTANCE",
        "STATE",
        "SESSION",
        "PID",
        "RESTARTS",
        "IN",
        "OUT",
        "QUEUE",
        "INFLIGHT",
        "LAST EXIT",
        "POD",
    ]
    .map(String::from)
    .to_vec()];
    for (node, i) in &rows_of {
        rows.push(vec![
            if node.is_empty() { "-".to_owned() } else { node.clone() },
            i.service.clone(),
            i.instance.to_string(),
            i.state.as_str().to_owned(),
            i.session.map_or("-", |k| k.as_str()).to_owned(),
            if i.pid > 0 { i.pid.to_string() } else { "-".into() },
            i.restarts.to_string(),
            i.kanbans_in.to_string(),
            i.kanbans_out.to_string(),
            i.queue_depth.to_string(),
            i.inflight.to_string(),
            i.last_exit.clone().unwrap_or_else(|| "-".into()),
            i.pod.as_ref().map_or_else(
                || "-".to_owned(),
                |p| {
                    let mut t = format!("{} {}", p.pod, p.state);
                    if p.restarts > 0 {
                        t.push_str(&format!(" restarts={}", p.restarts));
                    }
                    if let Some(r) = &p.reason {
                        t.push_str(&format!(" ({r})"));
                    }
                    t
                },
            ),
        ]);
    }
    // The POD column only when instances run on Kubernetes.
    if rows_of.iter().all(|(_, i)| i.pod.is_none()) {
        for row in &mut rows {
            row.pop();
        }
    }
    // The NODE column only on a master (a single runtime's rows are all its own).
    if master_nodes.is_none() {
        for row in &mut rows {
            row.remove(0);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in &rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", line.join("  ").trim_end());
    }
    let dead: Vec<String> = r.dead_letters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out!(
        "\ndevice: {}  pid: {}  uptime: {}s  sessions: {}  rejected connections: {}  dead letters: {}",
        if r.device_name.is_empty() { "-" } else { &r.device_name },
        r.pid,
        r.uptime_secs,
        r.sessions,
        r.rejected_connections,
        if dead.is_empty() { "0".to_owned() } else { dead.join(" ") }
    );
    if let Some(g) = &r.grpc {
        out!(
            "gRPC API (AION clients): {}  sessions: {}  outputs: {}  refused: {}",
            g.addr,
            g.sessions,
            g.outputs,
            g.refused
        );
    }
    if let Some(nodes) = &master_nodes {
        out!("\ncluster (master {}):", r.cluster.as_ref().map_or("", |c| c.master.as_str()));
        let mut rows =
            vec![["NODE", "ROLE", "CONNECTED", "LAST SEEN", "VERSION", "ADDR", "INSTANCES"].map(String::from).to_vec()];
        for n in nodes {
            rows.push(vec![
                n.name.clone(),
                n.role.clone(),
                if n.connected { "yes".into() } else { "LOST".into() },
                n.last_seen_ms.map_or_else(|| "never".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
                if n.version.is_empty() { "-".into() } else { n.version.clone() },
                if n.addr.is_empty() { "-".into() } else { n.addr.clone() },
                n.instances.len().to_string(),
            ]);
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out!("{}", line.join("  ").trim_end());
        }
    } else if let Some(c) = r.cluster.as_ref().filter(|c| c.role == "worker") {
        out!(
            "\nworker of master {} (control connection {}), assignment {}",
            c.master,
            if c.master_connected { "up" } else { "DOWN: running the last assignment" },
            c.generation
        );
    }
    if let Some(f) = &r.federation {
        let refused: Vec<String> = f.refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out!(
            "\ncluster: device {}  listening: {}  links refused: {}",
            f.me,
            if f.listen.is_empty() { "-" } else { &f.listen },
            if refused.is_empty() { "0".to_owned() } else { refused.join(" ") }
        );
        let mut rows =
            vec![["DEVICE", "ADDR", "LINK", "LAST SEEN", "RTT", "OUTBOX", "SENT", "ACKED", "RECEIVED", "WHY"]
                .map(String::from)
                .to_vec()];
        for d in &f.devices {
            rows.push(vec![
                d.name.clone(),
                if d.addr.is_empty() { "-".into() } else { d.addr.clone() },
                d.state.clone(),
                d.last_seen_ms.map_or_else(|| "never".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
                d.rtt_us.map_or_else(|| "-".into(), |us| format!("{:.2}ms", us as f64 / 1000.0)),
                d.outbox.to_string(),
                d.sent.to_string(),
                d.acked.to_string(),
                d.received.to_string(),
                if d.why.is_empty() { "-".into() } else { d.why.clone() },
            ]);
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out!("{}", line.join("  ").trim_end());
        }
        // Send Anything: totals per device, and what is crossing now.
        let busy = |d: &&aion::actors::control::DeviceReport| {
            let x = &d.files;
            x.sent_files + x.received_files + x.refused + x.failed > 0 || !x.active.is_empty()
        };
        if f.devices.iter().any(|d| busy(&d)) {
            out!(
                "
files:"
            );
            for d in f.devices.iter().filter(busy) {
                let x = &d.files;
                out!(
                    "  {}: sent {} files ({}), received {} files ({}), {} not sent again (resumed), {} refused, {} kanbans failed",
                    d.name,
                    x.sent_files,
                    human_bytes(x.sent_bytes),
                    x.received_files,
                    human_bytes(x.received_bytes),
                    human_bytes(x.resumed_bytes),
                    x.refused,
                    x.failed
                );
                for t in &x.active {
                    out!("    {}", transfer_line(&d.name, t));
                }
            }
        }
    }
    // Trouble that would otherwise only show in --json.
    if let Some(st) = r.store.as_ref().filter(|st| st.errors > 0) {
        out!(
            "store errors: {} ({} {}); last error: {} — producers wait until it commits again",
            st.errors,
            st.backend,
            st.path,
            st.last_error.as_deref().unwrap_or("-")
        );
    }
    if let Some(m) = r.mongo.as_ref().filter(|m| m.errors > 0) {
        out!("mongodb export errors: {}; last error: {}", m.errors, m.last_error.as_deref().unwrap_or("-"));
    }
    if r.log.write_errors + r.log.dropped > 0 {
        out!(
            "runtime log lines lost: {} (stderr could not be written) + {} (stderr too slow)",
            r.log.write_errors,
            r.log.dropped
        );
    }
    Ok(())
}

async fn send(
    data_dir: &Path,
    service: String,
    key: String,
    instance: u32,
    metadata: String,
    timeout: Duration,
) -> Result<(), String> {
    let metadata = match metadata.as_str() {
        "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("--metadata -: cannot read stdin: {e}"))?;
            text
        }
        m if m.starts_with('@') => std::fs::read_to_string(&m[1..]).map_err(|e| format!("--metadata {m}: {e}"))?,
        _ => metadata,
    };
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).map_err(|e| format!("--metadata is not valid JSON: {e}"))?;
    if !metadata.is_object() {
        return Err("--metadata must be a JSON object".into());
    }
    let v = ctl(data_dir, &Request::Send { service, instance, key, metadata }, timeout).await?;
    out!("{}", v["kanban_id"].as_str().unwrap_or("sent"));
    Ok(())
}

/// A pod's log through the Kubernetes API (the runtime's backend runs the instance there).
#[cfg(feature = "kube")]
fn pod_logs(namespace: &str, pod: &str, follow: bool, lines: Option<usize>) -> Result<(), String> {
    let mut out = std::io::stdout();
    block(aion::actors::backend::kube::pod_logs(namespace, pod, follow, lines, &mut out))
}

#[cfg(not(feature = "kube"))]
fn pod_logs(namespace: &str, pod: &str, _: bool, _: Option<usize>) -> Result<(), String> {
    Err(format!("the instance runs in pod {namespace}/{pod}: this aion was built without the Kubernetes backend"))
}

fn logs(
    data_dir: &Path,
    service: &str,
    instance: Option<u32>,
    follow: bool,
    lines: Option<usize>,
    timeout: Duration,
) -> Result<(), String> {
    use aion::actors::backend::LogSource;
    use std::io::{Read, Seek, SeekFrom, Write};
    let paths = Paths::new(data_dir);
    let (name, n) = match (instance, service.rsplit_once('-')) {
        (Some(n), _) => (service.to_owned(), n),
        (None, Some((base, num))) if num.parse::<u32>().is_ok() && !paths.log_file(service, 1).exists() => {
            (base.to_owned(), num.parse().unwrap_or(1))
        }
        _ => (service.to_owned(), 1),
    };
    // A running runtime says where the instance's output is (its backend decides); without one, the log files of
    // local processes are still there to read.
    let req = Request::Logs { service: name.clone(), instance: n };
    let path = match block(control::call(&paths.control(), &req, timeout.min(Duration::from_secs(5)))) {
        Ok(v) => match serde_json::from_value::<LogSource>(v) {
            Ok(LogSource::File { path }) => path,
            Ok(LogSource::Unavailable { reason }) => return Err(format!("no log for {name} instance {n}: {reason}")),
            Ok(LogSource::Pod { namespace, pod }) => return pod_logs(&namespace, &pod, follow, lines),
            Err(e) => return Err(format!("unexpected answer from the runtime: {e}")),
        },
        Err(e) if e.contains("no instance") => return Err(e),
        Err(_) => paths.log_file(&name, n),
    };
    let mut f =
        std::fs::File::open(&path).map_err(|e| format!("no log for {name} instance {n} ({}: {e})", path.display()))?;
    let start = match lines {
        Some(l) => tail_start(&mut f, l).map_err(|e| format!("{}: {e}", path.display()))?,
        None => 0,
    };
    let out = std::io::stdout();
    let mut out = out.lock();
    // The log's bytes as they are (a service may print anything), streamed: never the whole file in memory. A
    // closed stdout (`aion logs x | head`) ends the command quietly.
    f.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut pos = start;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        if out.write_all(&buf[..n]).is_err() {
            return Ok(());
        }
        pos += n as u64;
    }
    if out.flush().is_err() || !follow {
        return Ok(());
    }
    loop {
        // Follow by polling the file (like `tail -f`); rotation (file shrank) restarts from the top.
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            pos = 0;
        }
        while len > pos {
            f.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
            let n = f.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
    }
}

/// Where the last `lines` lines of a file start, found by reading backwards from its end in blocks.
fn tail_start(f: &mut std::fs::File, lines: usize) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.seek(SeekFrom::End(0))?;
    if lines == 0 {
        return Ok(len);
    }
    let mut end = len;
    let mut newlines = 0usize;
    let mut block = vec![0u8; 64 << 10];
    // A final newline ends the last line; it does not start another.
    let mut skip_last = true;
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block[..n])?;
        for i in (0..n).rev() {
            if block[i] != b'\n' {
                skip_last = false;
                continue;
            }
            if std::mem::take(&mut skip_last) {
                continue;
            }
            newlines += 1;
            if newlines == lines {
                return Ok(start + i as u64 + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

fn store_path(data_dir: &Path) -> Result<PathBuf, String> {
    let p = Paths::new(data_dir).archive();
    if !p.is_file() {
        return Err(format!("no kanban archive at {} (has a runtime ever run on this data dir?)", p.display()));
    }
    Ok(p)
}

/// Parses `--since`: an age (`90s`, `10m`, `2h`, `1d`) or RFC 3339 UTC; returns Unix milliseconds.
fn parse_since(s: &str) -> Result<i64, String> {
    let now = aion::actors::store::now_ms();
    if let Some((num, unit)) = s.char_indices().last().and_then(|(i, c)| Some((s[..i].parse::<i64>().ok()?, c))) {
        let ms = match unit {
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => 0,
        };
        if ms > 0 {
            return Ok(now - num * ms);
        }
    }
    parse_rfc3339(s).ok_or_else(|| format!("--since `{s}` is neither an age (10m, 2h, 1d) nor RFC 3339 UTC"))
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // days_from_civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + millis)
}

fn print_hops(rows: &[aion::actors::store::HopRow], json: bool) -> Result<(), String> {
    if json {
        for r in rows {
            out!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
        return Ok(());
    }
    let devices = rows.iter().any(|r| !r.device.is_empty());
    let mut table = vec![["ACCEPTED", "FROM", "TO", "KEY", "OUTCOME", "LATENCY", "KANBAN"].map(String::from).to_vec()];
    if devices {
        table[0].insert(0, "DEVICE".into());
    }
    for r in rows {
        let mut row = vec![
            r.accepted_at.clone(),
            r.from.clone(),
            r.to.clone().unwrap_or_else(|| "-".into()),
            if r.connection_key.is_empty() { "-".into() } else { r.connection_key.clone() },
            r.outcome.clone(),
            r.latency_ms.map_or_else(|| "-".into(), |l| format!("{l} ms")),
            r.kanban_id.clone(),
        ];
        if devices {
            row.insert(0, r.device.clone());
        }
        table.push(row);
    }
    let widths: Vec<usize> = (0..table[0].len()).map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in &table {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

fn kanban_log(
    data_dir: &Path,
    service: Option<String>,
    since: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<(), String> {
    let since_ms = since.map(parse_since).transpose()?;
    let filter = aion::actors::store::LogFilter { service, since_ms, limit };
    let rows = aion::actors::store::query_log(&store_path(data_dir)?, &filter).map_err(|e| e.to_string())?;
    print_hops(&rows, json)
}

fn kanban_trace(data_dir: &Path, id: &str, json: bool) -> Result<(), String> {
    let kid = aion::runtime::KanbanId::parse(id).ok_or_else(|| format!("`{id}` is not a kanban id (32 hex digits)"))?;
    // A running runtime gathers the chain: a master from every node's archive, a device with peer devices from
    // theirs too. Without a running runtime, this data dir's archive is read directly.
    let req = Request::Trace { id: id.to_owned(), local: false };
    let rows = match block(ctl(data_dir, &req, Duration::from_secs(20))) {
        Ok(v) => serde_json::from_value(v["rows"].clone()).map_err(|e| format!("unexpected answer: {e}"))?,
        Err(e) if REMOTE.get().is_some() => return Err(e),
        Err(_) => aion::actors::store::query_trace(&store_path(data_dir)?, kid).map_err(|e| e.to_string())?,
    };
    if rows.is_empty() {
        return Err(format!("no archived hop for {id}"));
    }
    print_hops(&rows, json)?;
    if !json {
        let total: i64 = rows.iter().filter_map(|r| r.latency_ms).sum();
        out!("\n{} hops, {} ms accepted-to-acked in total", rows.len(), total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn tail_start_finds_the_last_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("log");
        for (text, n, want) in [
            ("a\nb\nc\n", 1, "c\n"),
            ("a\nb\nc\n", 2, "b\nc\n"),
            ("a\nb\nc", 1, "c"),
            ("a\nb\nc", 5, "a\nb\nc"),
            ("a\n\n", 1, "\n"),
            ("", 3, ""),
        ] {
            std::fs::write(&p, text).expect("write");
            let mut f = std::fs::File::open(&p).expect("open");
            let at = super::tail_start(&mut f, n).expect("tail") as usize;
            assert_eq!(&text[at..], want, "{text:?} -n {n}");
        }
    }

    #[test]
    fn rfc3339_round_trips_with_our_formatter() {
        for ms in [0i64, 951_782_400_000, 1_795_791_043_123] {
            let s = aion::runtime::time::rfc3339_from_unix_millis(ms);
            assert_eq!(parse_rfc3339(&s), Some(ms), "{s}");
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
