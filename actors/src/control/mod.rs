//! The control API the CLI uses: JSON lines over `run/control.sock` (0600).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"send","service":S,"instance":N,"key":K,"metadata":{…}}`,
//! `{"cmd":"stop"}`, each with an optional `"deadline_ms"` (Unix milliseconds): a request read after its deadline
//! (the client gave up, e.g. on a frozen runtime) is answered with an error and not carried out. Every response
//! is one line: `{"ok":true,…}` or `{"ok":false,"error":"…"}`.
//!
//! Limits (a stuck or hostile client cannot starve the socket or the runtime's memory): at most
//! [`MAX_CONNECTIONS`] connections are served at once (others are told "busy"), a request must arrive whole within
//! [`REQUEST_TIMEOUT`] and be at most [`MAX_REQUEST_BYTES`], and a reply that cannot be written within
//! [`REPLY_TIMEOUT`] is abandoned.

use crate::broker::InstanceStatus;
use crate::routing::dead::DeadLetter;
use aion_runtime::actor::supervisor::Event;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Status of every instance.
    Status,
    /// Inject a kanban into a service's input queue.
    Send {
        /// Target service.
        service: String,
        /// Target instance (default 1).
        #[serde(default = "one")]
        instance: u32,
        /// Connection key stamped on the kanban.
        #[serde(default)]
        key: String,
        /// Metadata (a JSON object).
        #[serde(default)]
        metadata: serde_json::Value,
    },
    /// Graceful shutdown.
    Stop,
    /// Apply a new services.yml to the running runtime: services added start, those whose definition changed
    /// restart, those removed stop; the others are not touched (answered with the change).
    Apply {
        /// The file's name (for diagnostics).
        file: String,
        /// Its text.
        yaml: String,
    },
    /// Remove every service (the project): their instances stop; durable queues stay in the store.
    Delete,
    /// The archived hops of a kanban's chain: on a master, from every node; on a device with peer devices,
    /// from every peer it can dial; elsewhere (or `local`), this device's.
    Trace {
        /// Kanban id or trace id (hex).
        id: String,
        /// This device's rows only (what a peer device asks of another).
        #[serde(default)]
        local: bool,
    },
    /// Cluster mode, on the master: revoke a node (`aion cluster remove`).
    ClusterRemove {
        /// The node.
        name: String,
    },
    /// Where an instance's output is (answered with a [`crate::backend::LogSource`]).
    Logs {
        /// Service.
        service: String,
        /// Instance (default 1).
        #[serde(default = "one")]
        instance: u32,
    },
}

fn one() -> u32 {
    1
}

/// A request with its deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The request.
    #[serde(flatten)]
    pub request: Request,
    /// Unix milliseconds after which the client no longer waits for the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The largest request line (a `send` with metadata near the kanban size limit, as JSON).
pub const MAX_REQUEST_BYTES: usize = 24 << 20;
/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a reply may take to be written (a client that does not read is cut off).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most JSON values a request may hold: parsed JSON costs tens of bytes per value, so this bounds what one
/// request can cost in memory (a kanban's metadata with a million values is not one a CLI sends).
pub const MAX_JSON_VALUES: usize = 1_000_000;

/// Kanban sends handled at once (each may wait for room in a queue): the rest of the connections stay available
/// for `status` and `stop`.
pub const MAX_SENDS: usize = 16;

/// An upper bound of the number of JSON values in `text`, counted without parsing (separators and openings
/// outside strings).
pub fn json_values_bound(text: &[u8]) -> usize {
    let (mut n, mut in_str, mut esc) = (1usize, false, false);
    for &b in text {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b',' | b'[' | b'{' | b':' => n += 1,
            _ => {}
        }
    }
    n
}

/// Parses one request line (without its newline).
///
/// # Errors
/// A message for the client: not UTF-8, not JSON, not a known request, too many values.
pub fn parse_request(line: &[u8]) -> Result<Envelope, String> {
    if json_values_bound(line) > MAX_JSON_VALUES {
        return Err(format!("request too large: more than {MAX_JSON_VALUES} JSON values"));
    }
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// The error reply for a request that is over [`MAX_REQUEST_BYTES`].
pub fn too_large_reply() -> String {
    format!("request too large (the limit is {} MiB)", MAX_REQUEST_BYTES >> 20)
}

/// The `aion status --json` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// `deviceName`.
    pub device_name: String,
    /// Runtime pid.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Data directory.
    pub data_dir: String,
    /// services.yml path.
    pub services_file: String,
    /// Every instance.
    pub instances: Vec<InstanceStatus>,
    /// Dead letters by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// The most recent dead letters (up to 20).
    pub recent_dead_letters: Vec<serde_json::Value>,
    /// Sessions opened since start.
    pub sessions: u64,
    /// Connections refused or closed for protocol errors.
    pub rejected_connections: u64,
    /// Control connections told "busy" (too many at once).
    #[serde(default)]
    pub control_busy: u64,
    /// Static-kanban lists answered with their oldest entries only (the whole list did not fit one frame).
    #[serde(default)]
    pub static_lists_truncated: u64,
    /// Supervision events (actor exits and restarts).
    pub supervisor_events: Vec<String>,
    /// The embedded store.
    #[serde(default)]
    pub store: Option<StoreReport>,
    /// The MongoDB archive sink, when configured.
    #[serde(default)]
    pub mongo: Option<MongoReport>,
    /// The runtime's own log output.
    #[serde(default)]
    pub log: LogReport,
    /// The runtime's owned tasks.
    #[serde(default)]
    pub tasks: TasksReport,
    /// AION's gRPC API, when it is on.
    #[serde(default)]
    pub grpc: Option<GrpcReport>,
    /// Cluster mode: the links to other devices, when this device federates.
    #[serde(default)]
    pub federation: Option<FederationReport>,
    /// Cluster mode: on a master, every node and its instances; on a worker, its master.
    #[serde(default)]
    pub cluster: Option<ClusterReport>,
    /// The Kubernetes backend, when instances run there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesReport>,
    /// The HTTP endpoint's address (metrics, health, the web view), when it is on.
    #[serde(default)]
    pub http: Option<String>,
}

/// A latency histogram in [`StoreReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Bucket upper bounds, seconds.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more than `bounds`: the last is above every bound.
    pub counts: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

/// The Kubernetes backend's part of `aion status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KubernetesReport {
    /// The namespace.
    pub namespace: String,
    /// The project (label `aion.latona.io/project`).
    pub project: String,
    /// Objects written (server-side apply).
    pub applied: u64,
    /// Objects deleted.
    pub deleted: u64,
    /// Wanted objects deleted or edited by someone else, restored.
    pub drift_repaired: u64,
    /// API calls that failed (retried).
    pub api_errors: u64,
    /// Watches (re)started with a full list (start, `410 Gone`, a lost connection).
    pub relists: u64,
    /// Endpoint calls admitted by an instance credential.
    pub admitted_by_token: u64,
    /// Endpoint calls admitted by the caller's pod IP.
    pub admitted_by_pod_ip: u64,
    /// Endpoint calls refused (wrong or missing credential, another instance's pod).
    pub refused: u64,
}

/// The master's part of `aion status`: every node and its instances.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterReport {
    /// `master` or `worker`.
    pub role: String,
    /// The master's name.
    pub master: String,
    /// Worker: whether its control connection to the master is up.
    #[serde(default)]
    pub master_connected: bool,
    /// Master: the assignment generation; worker: the one it runs.
    pub generation: u64,
    /// Master: every node.
    #[serde(default)]
    pub nodes: Vec<NodeReport>,
}

/// One node in [`ClusterReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its name.
    pub name: String,
    /// `master` or `worker`.
    pub role: String,
    /// Its control connection is up (the master is always connected to itself).
    pub connected: bool,
    /// Milliseconds since it was last heard.
    pub last_seen_ms: Option<u64>,
    /// Its aion version.
    pub version: String,
    /// Where it accepts links.
    pub addr: String,
    /// Its instances, as it last reported them.
    pub instances: Vec<InstanceStatus>,
}

/// The federation's part of `aion status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct FederationReport {
    /// This device's name.
    pub me: String,
    /// Where links are accepted (empty: nowhere).
    pub listen: String,
    /// Links refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Every peer device.
    pub devices: Vec<DeviceReport>,
}

/// One peer device in `aion status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DeviceReport {
    /// Its name.
    pub name: String,
    /// Where it is dialled.
    pub addr: String,
    /// The link to it: `idle`, `connecting`, `up`, `down`, `refused`.
    pub state: String,
    /// Why it is down or refused.
    pub why: String,
    /// Milliseconds since it was last heard (absent: never).
    pub last_seen_ms: Option<u64>,
    /// Last round trip in microseconds.
    pub rtt_us: Option<u64>,
    /// Kanbans waiting in its outboxes (queued, in memory or paged from the store).
    pub outbox: usize,
    /// Of which sent and not yet acknowledged.
    pub in_flight: usize,
    /// How long the oldest kanban sent and not yet acknowledged has waited (milliseconds), if any.
    #[serde(default)]
    pub oldest_in_flight_ms: Option<u64>,
    /// Kanbans sent, acknowledged, sent again.
    pub sent: u64,
    /// Acknowledged by it.
    pub acked: u64,
    /// Sent again after a cut.
    pub resent: u64,
    /// Links from it open now.
    pub inbound: u64,
    /// Kanbans received from it.
    pub received: u64,
    /// Received again and recognised.
    pub duplicates: u64,
    /// Received but not deliverable here (dead letters here).
    pub undeliverable: u64,
    /// Dead-lettered `expired` (it was unreachable for longer than the outbox age bound).
    #[serde(default)]
    pub expired: u64,
    /// The master the link goes through (it is unreachable directly); empty when direct.
    #[serde(default)]
    pub via: String,
    /// Send Anything: files to and from it.
    #[serde(default)]
    pub files: FilesReport,
}

/// A transfer in progress, for `aion status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TransferReport {
    /// `out` (to the device) or `in` (from it).
    pub direction: String,
    /// The kanban.
    pub kanban: String,
    /// The file (relative name).
    pub file: String,
    /// Its size.
    pub size: u64,
    /// Bytes done (verified prefix included).
    pub done: u64,
    /// Bytes per second since it started (this connection).
    pub rate: u64,
}

/// One device's files in `aion status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FilesReport {
    /// Files sent and placed there.
    pub sent_files: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Bytes not sent again (the receiver had them).
    pub resumed_bytes: u64,
    /// Files received and placed here.
    pub received_files: u64,
    /// Bytes received.
    pub received_bytes: u64,
    /// Files refused (here or there).
    pub refused: u64,
    /// Kanbans dead-lettered for their files.
    pub failed: u64,
    /// Transfers in progress.
    pub active: Vec<TransferReport>,
}

/// AION's gRPC API in [`StatusReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrpcReport {
    /// The address instances are given (`KANBAN_ADDR`).
    pub addr: String,
    /// `ReceiveKanban` sessions opened.
    pub sessions: u64,
    /// Outputs received (`SendKanban`).
    pub outputs: u64,
    /// Calls refused (unknown service, bad request, an instance held by a native session…).
    pub refused: u64,
}

/// The runtime's owned tasks in [`StatusReport`] (see `aion_runtime::task`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TasksReport {
    /// Sessions (and the endpoint's accept loop) running.
    pub sessions: usize,
    /// The node's other tasks running (control connections, backlog feeders, forwarders).
    pub node: usize,
    /// The backend's tasks running (in-process services, log pumps of local processes).
    #[serde(default)]
    pub instances: usize,
    /// Tasks that panicked since start (each was logged; the runtime went on).
    pub panicked: u64,
}

/// Counters of the runtime's log output in [`StatusReport`]: lines that could not be written are counted here
/// (there is nowhere else to say so).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogReport {
    /// Lines written.
    pub written: u64,
    /// Lines lost because stderr could not be written (closed pipe, full disk).
    pub write_errors: u64,
    /// Lines lost because stderr was too slow and the queue was full.
    pub dropped: u64,
}

impl LogReport {
    /// The current counters.
    pub fn now() -> LogReport {
        use std::sync::atomic::Ordering::Relaxed;
        let s = aion_runtime::log::stats();
        LogReport {
            written: s.written.load(Relaxed),
            write_errors: s.write_errors.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
        }
    }
}

/// MongoDB sink counters in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MongoReport {
    /// Connection string.
    pub uri: String,
    /// Documents exported.
    pub exported: u64,
    /// Failed attempts (retried; rows wait in the embedded archive).
    pub errors: u64,
    /// The last error.
    pub last_error: Option<String>,
}

/// Store counters in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreReport {
    /// `sqlite` (embedded) or `redis`.
    #[serde(default)]
    pub backend: String,
    /// Database file, or Redis URL without password.
    pub path: String,
    /// Group commits.
    pub commits: u64,
    /// Kanbans persisted.
    pub enqueued: u64,
    /// Kanbans deleted after acknowledgement.
    pub acked: u64,
    /// Failed commits (retried; producers wait meanwhile).
    pub errors: u64,
    /// The last store error.
    pub last_error: Option<String>,
    /// Acknowledgements for kanbans the store did not hold (logged).
    #[serde(default)]
    pub unknown_acks: u64,
    /// Redis: entries another writer added to our streams meanwhile, adopted or deleted as duplicates.
    #[serde(default)]
    pub stray_entries: u64,
    /// Archive rows written by the replicator.
    #[serde(default)]
    pub archived: u64,
    /// Archive records dropped because the replicator was behind (kanbans are never affected).
    #[serde(default)]
    pub archive_dropped: u64,
    /// Time to commit one batch.
    #[serde(default)]
    pub commit_latency: LatencyReport,
}

pub(crate) fn dead_json(d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "reason": d.reason,
        "detail": d.detail,
        "kanban_id": d.kanban.id.to_string(),
        "from": format!("{}:{}", d.kanban.origin.service, d.kanban.origin.instance),
        "connection_key": d.kanban.connection_key,
    })
}

pub(crate) fn event_text(e: &Event) -> String {
    format!("{} exited ({:?}){}", e.child, e.reason, if e.restarted { ", restarted" } else { "" })
}

/// Sends one request to the runtime on `socket` and returns the response object, giving up after `timeout` (the
/// request carries that deadline, so a runtime that reads it later does not carry it out).
///
/// # Errors
/// A readable message when the runtime is not running, does not answer in time, or answered with an error.
pub async fn call(socket: &Path, req: &Request, timeout: std::time::Duration) -> Result<serde_json::Value, String> {
    let deadline_ms = crate::store::now_ms().saturating_add(timeout.as_millis().min(i64::MAX as u128) as i64);
    let exchange = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot reach the runtime on this data dir ({}: permission denied; it runs as another user?)",
                socket.display()
            ),
            _ => format!("no runtime is running on this data dir ({}: {e})", socket.display()),
        })?;
        let (r, mut w) = stream.into_split();
        let env = Envelope { request: req.clone(), deadline_ms: Some(deadline_ms) };
        let mut line = serde_json::to_vec(&env).map_err(|e| e.to_string())?;
        line.push(b'\n');
        // A runtime that refuses the connection at once (busy) answers before reading: read its answer even when
        // the request could not be written.
        let written = w.write_all(&line).await;
        let mut resp = String::new();
        let read = BufReader::new(r).read_line(&mut resp).await;
        match (written, read) {
            (_, Ok(n)) if n > 0 => Ok::<String, String>(resp),
            (Err(e), _) => Err(format!("control socket write failed: {e}")),
            (Ok(()), Err(e)) => Err(format!("control socket read failed: {e}")),
            (Ok(()), Ok(_)) => Ok(resp),
        }
    };
    let resp = tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        format!(
            "timed out after {}s waiting for the runtime (frozen, or waiting on its store); what was asked may not \
             have been done — a request read after its deadline is not carried out",
            timeout.as_secs()
        )
    })??;
    if resp.is_empty() {
        return Err("the runtime closed the connection without an answer".into());
    }
    parse_reply(resp.as_bytes(), "the runtime")
}

/// A reply line of the control protocol from `who`: the reply object, or the error it reports.
///
/// # Errors
/// The runtime's error, or a malformed reply.
pub fn parse_reply(line: &[u8], who: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| format!("malformed answer from {who}: {e}"))?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("the runtime reported an error").to_owned())
    }
}
