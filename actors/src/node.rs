//! A node: one runtime on one device — the supervision tree, the routing table, and the control API.

pub use crate::backend::InProcessRegistry;
use crate::backend::{InProcessBackend, Local, ProcessBackend, ProcessEnv, SharedBackend};
use crate::broker::{Broker, BrokerMsg, InstanceStatus};
use crate::control::{dead_json, event_text, Request, StatusReport, StoreReport};
use crate::paths::Paths;
use crate::routing::{Lifecycle, Router};
use crate::session::statics::StaticStore;
use crate::session::{Endpoint, EndpointMsg, EndpointStats};
use aion_runtime::actor::supervisor::{ask, ChildSpec, Intensity, Restart, Strategy, Supervisor, SupervisorHandle};
use aion_runtime::actor::{Addr, ExitReason};
use aion_runtime::config::ServicesFile;
use aion_runtime::kanban::{metadata_from_json, Kanban, KanbanId, Origin};
use aion_runtime::task::Tasks;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// How to start a node.
pub struct NodeOptions {
    /// Data directory (`AION_HOME` of the microservices).
    pub data_dir: PathBuf,
    /// The validated configuration.
    pub config: ServicesFile,
    /// Where it came from (for status).
    pub config_path: Option<PathBuf>,
    /// Directory relative commands and `workingDir` resolve against.
    pub base_dir: PathBuf,
    /// Per-instance queue capacity. Default 1024.
    pub queue_capacity: usize,
    /// Per-instance bound of the memory held by queued and in-flight kanbans. Default 64 MiB.
    pub queue_max_bytes: usize,
    /// SIGTERM → SIGKILL grace period at shutdown. Default 10 s.
    pub grace: Duration,
    /// Services that run in-process.
    pub inproc: InProcessRegistry,
    /// Directories put in front of the microservices' `PATH`.
    pub path_dirs: Vec<PathBuf>,
    /// Per-instance log cap in bytes. Default 10 MiB.
    pub log_cap: u64,
    /// Archive retention.
    pub retention: crate::store::Retention,
    /// Record every hop in the archive (the kanban replicator). Default false: it costs throughput.
    pub archive: bool,
    /// Also export the archive to MongoDB.
    pub mongo: Option<crate::export::mongo::MongoConfig>,
    /// Keep the durable queues and static kanbans on Redis Streams instead of the embedded store.
    pub redis: Option<crate::store::RedisConfig>,
    /// Cap of the embedded queue database in bytes (past it: back-pressure, as on a full disk).
    pub store_max_bytes: Option<u64>,
    /// A kanban whose chain has been routed this many times is dead-lettered `hop-limit` (a routing cycle); 0 for
    /// no limit. Default [`crate::routing::DEFAULT_HOP_LIMIT`].
    pub hop_limit: u32,
    /// Cut off and kill an instance whose oldest delivery waits longer than this for its acknowledgement (a hung
    /// service). Default `None`: never (the wait is shown in the status).
    pub ack_timeout: Option<Duration>,
    /// Serve AION's gRPC kanban API (`kanbanpb.Kanban`) on this address, bound before any instance starts; its
    /// instances get `KANBAN_ADDR`. Default `None` (the CLI's default is `127.0.0.1:11010`).
    pub grpc: Option<std::net::SocketAddr>,
    /// An instance whose gRPC client lost its session (no terminate kanban) and did not open one again within
    /// this is restarted. Default 30 s.
    pub grpc_reconnect: Duration,
    /// Cluster mode: links to the other devices of `devices:` (with the `cluster` feature and a cluster
    /// identity in the data dir).
    pub cluster: ClusterOptions,
    /// The HTTP endpoint's address (`aion run --http`; metrics, health, the web view); `None`: off.
    pub http: Option<std::net::SocketAddr>,
    /// Run instances on Kubernetes instead of as local processes (`aion run --backend kubernetes`).
    #[cfg(feature = "kube")]
    pub kubernetes: Option<crate::backend::kube::KubeOptions>,
}

/// What a runtime is in a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClusterRole {
    /// Not in a cluster (peer devices of `devices:` may still federate).
    #[default]
    Single,
    /// The master-aion: `aion apply` places the project's services on the nodes.
    Master,
    /// A worker-aion of the master at `join` (`host:port`) named `master`.
    Worker {
        /// The master's address.
        join: String,
        /// The master's device name.
        master: String,
    },
}

/// How this device federates with the others (cluster mode, `docs/cluster.md`).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Single, master or worker.
    pub role: ClusterRole,
    /// Accept links from peer devices on this UDP address (QUIC, mutual TLS). `None`: only dial them.
    pub listen: Option<std::net::SocketAddr>,
    /// Per route to another device: how many kanbans its outbox holds in memory (beyond them, durable outboxes
    /// keep the rest in the store; producers wait when it is full). Default 65 536.
    pub outbox_kanbans: usize,
    /// Per route: the bound of the memory its outbox holds. Default 64 MiB.
    pub outbox_bytes: usize,
    /// A device unreachable for longer than this has its outboxes emptied into dead letters (`expired`), and
    /// kanbans for it are dead-lettered while it stays unreachable. `None`: they wait for it for ever. Default 7
    /// days.
    pub outbox_max_age: Option<Duration>,
    /// Bytes of partial files each device may have here at once (Send Anything; disk used by transfers in
    /// progress).
    pub transfer_quota: u64,
    /// A ping on each link this often. Default 1 s.
    pub ping_every: Duration,
    /// A link silent this long is declared lost. Default 4 s.
    pub dead_after: Duration,
    /// Kanbans a peer may send unacknowledged on a link this device accepts. Default 4096.
    pub window: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            role: ClusterRole::Single,
            listen: None,
            outbox_kanbans: 65_536,
            outbox_bytes: 64 << 20,
            outbox_max_age: Some(Duration::from_secs(7 * 86_400)),
            transfer_quota: 16 << 30,
            ping_every: Duration::from_secs(1),
            dead_after: Duration::from_secs(4),
            window: 4096,
        }
    }
}

impl NodeOptions {
    /// Options with defaults for `config` on `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, config: ServicesFile) -> NodeOptions {
        NodeOptions {
            data_dir: data_dir.into(),
            config,
            config_path: None,
            base_dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            queue_capacity: 1024,
            queue_max_bytes: crate::routing::slot::DEFAULT_QUEUE_BYTES,
            grace: Duration::from_secs(10),
            inproc: InProcessRegistry::default(),
            path_dirs: Vec::new(),
            log_cap: 10 << 20,
            retention: crate::store::Retention::default(),
            archive: false,
            mongo: None,
            redis: None,
            store_max_bytes: None,
            hop_limit: crate::routing::DEFAULT_HOP_LIMIT,
            ack_timeout: None,
            grpc: None,
            grpc_reconnect: Duration::from_secs(30),
            cluster: ClusterOptions::default(),
            http: None,
            #[cfg(feature = "kube")]
            kubernetes: None,
        }
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Another runtime owns the data directory (its pid, when known).
    #[error("a runtime is already running on {} ({})", .0.display(), pid_text(*.1))]
    AlreadyRunning(PathBuf, Option<u32>),
    /// Filesystem or socket error.
    #[error("{0}")]
    Io(String),
    /// A service cannot run with this backend.
    #[error("{0}")]
    NotRunnable(String),
    /// Cluster mode cannot start (certificates, the listening socket).
    #[error("{0}")]
    Cluster(String),
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "its pid is unknown".to_owned(), |p| format!("pid {p}"))
}

/// How long a shutdown waits for sessions to end once their instances are stopped.
const SESSION_END_WAIT: Duration = Duration::from_secs(5);

/// How long a shutdown waits for the store's last commit (it cannot finish on a full disk).
pub const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    endpoint: Addr<Endpoint>,
    paths: Paths,
    grace: Duration,
    control: tokio::task::AbortHandle,
    forwarder: tokio::task::AbortHandle,
    /// Held until the node is dropped: the data dir is ours.
    _lock: crate::paths::DataDirLock,
}

struct Shared {
    mongo: Option<(String, Arc<crate::export::mongo::MongoStats>)>,
    router: Arc<Router>,
    broker: Addr<Broker>,
    sup: SupervisorHandle,
    stats: Arc<EndpointStats>,
    stop: Arc<Notify>,
    started: Instant,
    data_dir: String,
    services_file: String,
    /// Control connections refused because too many were being served.
    control_busy: std::sync::atomic::AtomicU64,
    /// The static-kanban store (for its counters).
    statics: Arc<StaticStore>,
    /// Kanban sends being handled (each may wait for room in a queue).
    send_slots: Arc<tokio::sync::Semaphore>,
    /// Large requests are parsed one at a time (what a parsed request costs is bounded by one).
    parse_lock: tokio::sync::Mutex<()>,
    /// The node's own tasks (control connections, backlog feeders, forwarders).
    tasks: Tasks,
    /// Sessions and the endpoint's accept loop.
    sessions: Tasks,
    /// The backend's tasks: in-process services, log pumps, the collector of adopted processes.
    instances: Tasks,
    /// What runs the instances.
    backend: SharedBackend,
    /// Ends the gRPC API's streams (with `UNAVAILABLE`) and stops it.
    grpc_stop: tokio::sync::watch::Sender<bool>,
    /// The gRPC API's address (as given to instances) and counters, when it is on.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    grpc: Option<(String, Arc<GrpcStatsHandle>)>,
    /// Cluster mode: the links to other devices.
    #[cfg(feature = "cluster")]
    federation: Option<Arc<crate::federation::Federation>>,
    /// SIGTERM → SIGKILL grace period (instances restarted by a new configuration get it too).
    grace: Duration,
    /// Services registered to run in-process.
    inproc: std::collections::BTreeSet<String>,
    /// Instances run on Kubernetes (`--backend kubernetes`).
    on_kubernetes: bool,
    /// The HTTP endpoint's address, when it is on.
    http: Option<String>,
    /// The endpoints are bound and the broker started (`/readyz`).
    started_up: std::sync::atomic::AtomicBool,
    /// A shutdown began (`/readyz`).
    stopping: std::sync::atomic::AtomicBool,
    /// One new configuration at a time.
    applying: tokio::sync::Mutex<()>,
    /// Cluster mode: this node is the master.
    #[cfg(feature = "cluster")]
    master: std::sync::OnceLock<Arc<crate::cluster::Master>>,
    /// Cluster mode: this node is a worker.
    #[cfg(feature = "cluster")]
    worker: std::sync::OnceLock<Arc<crate::cluster::WorkerView>>,
    /// The Kubernetes backend, when instances run there.
    #[cfg(feature = "kube")]
    kube: Option<crate::backend::kube::KubeBackend>,
}

/// Checks that every service of `cfg` can run where it will: in-process (`inproc`), on Kubernetes (with
/// `on_kubernetes`, unless it asks for a local process), or as a local process (which needs a `command`).
fn runnable(cfg: &ServicesFile, inproc: impl Fn(&str) -> bool, on_kubernetes: bool) -> Result<(), String> {
    use aion_runtime::config::BackendChoice;
    for ms in cfg.microservices.values().filter(|m| !inproc(&m.name)) {
        match (ms.backend, on_kubernetes) {
            (BackendChoice::Kubernetes, false) => {
                return Err(format!(
                    "service `{}` asks for `backend: kubernetes`: run with `--backend kubernetes`",
                    ms.name
                ));
            }
            (BackendChoice::Process, _) | (_, false) => {
                if ms.command.is_empty() {
                    return Err(format!(
                        "service `{}` has no `command`: the local-process backend needs one (an image-only service \
                         needs the Kubernetes backend)",
                        ms.name
                    ));
                }
            }
            _ => {
                #[cfg(feature = "kube")]
                crate::backend::kube::objects::check(ms)?;
            }
        }
    }
    Ok(())
}

/// Applies a new configuration to a running node (see [`Node::apply`]).
async fn apply(s: &Shared, mut cfg: ServicesFile) -> Result<crate::routing::Change, String> {
    let _one = s.applying.lock().await;
    let current = s.router.config();
    if cfg.device_name.is_empty() {
        cfg.device_name.clone_from(&current.device_name);
    }
    if cfg.device_name != current.device_name {
        return Err(format!(
            "deviceName cannot change while the runtime runs (it is `{}`, the file says `{}`): stop it and run the file",
            current.device_name, cfg.device_name
        ));
    }
    runnable(&cfg, |n| s.inproc.contains(n), s.on_kubernetes)?;
    let change = s.router.reconfigure(Arc::new(cfg));
    let grace = s.grace;
    ask(&s.broker, |tx| BrokerMsg::Reconfigure(change.clone(), grace, tx))
        .await
        .ok_or_else(|| "the service broker is not answering".to_owned())?;
    #[cfg(feature = "cluster")]
    if let Some(f) = &s.federation {
        f.reconfigure();
    }
    Ok(change)
}

/// The control plane's way into this node (a weak reference: the node owns the control plane).
#[cfg(feature = "cluster")]
fn hooks(s: &Arc<Shared>) -> crate::cluster::NodeHooks {
    let (a, b) = (Arc::downgrade(s), Arc::downgrade(s));
    crate::cluster::NodeHooks {
        apply: Box::new(move |cfg| {
            let s = a.upgrade();
            Box::pin(async move {
                match s {
                    Some(s) => apply(&s, cfg).await,
                    None => Err("the runtime is stopping".into()),
                }
            })
        }),
        instances: Box::new(move || {
            let s = b.upgrade();
            Box::pin(async move {
                match s {
                    Some(s) => ask(&s.broker, BrokerMsg::Status).await.unwrap_or_default(),
                    None => Vec::new(),
                }
            })
        }),
    }
}

/// Starts the master's or the worker's control plane.
#[cfg(feature = "cluster")]
fn start_cluster(s: &Arc<Shared>, c: &ClusterOptions, data_dir: &std::path::Path) {
    let Some(fed) = s.federation.clone() else { return };
    // Requests over the network (an admin identity's, a peer's trace query) go to the control handler.
    let weak = Arc::downgrade(s);
    fed.set_admin(Arc::new(move |line: Vec<u8>| {
        let weak = weak.clone();
        Box::pin(async move {
            match weak.upgrade() {
                Some(s) => handle_request(&s, &line).await,
                None => err_reply("the runtime is shutting down"),
            }
        })
    }));
    match &c.role {
        ClusterRole::Single => {}
        ClusterRole::Master => {
            let m = crate::cluster::Master::new(data_dir, fed.clone(), hooks(s), c.dead_after);
            let _ = fed.master.set(m.clone());
            let _ = s.master.set(m);
        }
        ClusterRole::Worker { join, master } => {
            let _ = fed.relay.set(master.clone());
            let (view, fut) = crate::cluster::run_worker(
                data_dir.to_owned(),
                fed,
                hooks(s),
                join.clone(),
                master.clone(),
                c.dead_after,
            );
            let _ = s.worker.set(view);
            let _ = s.tasks.spawn("control connection to the master", async move {
                let why = fut.await;
                tracing::error!("control connection to the master ended for good: {why}");
            });
        }
    }
}

fn change_json(c: &crate::routing::Change) -> serde_json::Value {
    serde_json::json!({"added": c.added, "changed": c.changed, "removed": c.removed, "devices": c.devices})
}

/// Whether this runtime federates: `devices:` names other devices and the data dir has a cluster identity (with
/// the `cluster` feature). Without an identity, kanbans for other devices are dead letters (`no-federation`),
/// as in single mode — unless `--listen` asked for cluster mode: then it is an error.
fn federates(cfg: &ServicesFile, data_dir: &std::path::Path, c: &ClusterOptions) -> Result<bool, NodeError> {
    let peers = cfg.devices.keys().any(|d| *d != cfg.device_name);
    #[cfg(feature = "cluster")]
    {
        let dir = crate::federation::tls::ClusterDir::new(data_dir);
        if dir.has_identity() {
            return Ok(peers || c.listen.is_some() || c.role != ClusterRole::Single);
        }
        if c.role != ClusterRole::Single {
            return Err(NodeError::Cluster(format!(
                "{} has no cluster identity: a master starts from `aion cluster init`, a worker joins with a token",
                dir.root.display()
            )));
        }
        if c.listen.is_some() {
            return Err(NodeError::Cluster(format!(
                "--listen: {} has no cluster identity: run `aion cluster init --name {}` (first device) or `aion cluster issue {} --out DATA_DIR` where the CA is",
                dir.root.display(),
                cfg.device_name,
                cfg.device_name
            )));
        }
        if peers {
            tracing::warn!(
                "devices: lists other devices, but {} has no cluster identity: kanbans for them are dead letters (no-federation); see `aion cluster init`",
                dir.root.display()
            );
        }
        Ok(false)
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (peers, data_dir);
        match c.listen {
            Some(a) => Err(NodeError::Cluster(format!(
                "--listen {a}: this aion was built without cluster mode (cargo feature `cluster`)"
            ))),
            None => Ok(false),
        }
    }
}

#[cfg(feature = "grpc")]
type GrpcStatsHandle = crate::session::grpc::GrpcStats;
/// Without the `grpc` feature: nothing to count.
#[cfg(not(feature = "grpc"))]
#[derive(Default)]
struct GrpcStatsHandle;

impl Node {
    /// Starts the node: checks the data dir is free, cleans up orphans of a killed previous run, starts the
    /// supervision tree (status-kanban endpoint, then broker, which starts the `startup` instances) and the
    /// control API.
    ///
    /// # Errors
    /// [`NodeError`] when the data dir is taken, a socket cannot be bound, or a service has no `command`.
    pub async fn start(opts: NodeOptions) -> Result<Node, NodeError> {
        #[cfg(feature = "kube")]
        let on_kubernetes = opts.kubernetes.is_some();
        #[cfg(not(feature = "kube"))]
        let on_kubernetes = false;
        if on_kubernetes && opts.grpc.is_none() {
            return Err(NodeError::NotRunnable(
                "the Kubernetes backend needs the kanban endpoint on the pod network (pods reach the runtime \
                 through it): `--grpc 0.0.0.0:11010`, not `--grpc off`"
                    .to_owned(),
            ));
        }
        runnable(&opts.config, |s| opts.inproc.contains(s), on_kubernetes).map_err(NodeError::NotRunnable)?;
        let paths = Paths::new(&opts.data_dir);
        paths.create().map_err(|e| NodeError::Io(format!("cannot create {}: {e}", paths.root.display())))?;
        // Before anything touches the data dir (orphans, store, sockets): one runtime per data dir.
        let lock = crate::paths::DataDirLock::acquire(&paths).map_err(|e| match e {
            crate::paths::LockError::Held(pid) => NodeError::AlreadyRunning(paths.root.clone(), pid),
            crate::paths::LockError::Io(e) => NodeError::Io(e),
        })?;
        let dir_id =
            paths.dir_id().map_err(|e| NodeError::Io(format!("cannot read or write the data dir's id: {e}")))?;
        let control_listener = crate::session::bind_private(&paths.control())
            .map_err(|e| NodeError::Io(format!("cannot bind {}: {e}", paths.control().display())))?;
        // Bind before anything starts, so errors are reported here and clients never race the endpoint actor.
        let prebound = crate::session::bind_private(&paths.socket())
            .map_err(|e| NodeError::Io(format!("cannot bind {}: {e}", paths.socket().display())))?;
        let prebound = std::sync::Mutex::new(Some(prebound));
        // AION's gRPC API: bound now too (a client that finds no server gives up).
        #[cfg(feature = "grpc")]
        let grpc_listener = match opts.grpc {
            Some(addr) => Some(crate::session::grpc::bind(addr).map_err(NodeError::Io)?),
            None => None,
        };
        #[cfg(not(feature = "grpc"))]
        if let Some(addr) = opts.grpc {
            return Err(NodeError::Io(format!(
                "--grpc {addr}: this aion was built without AION's gRPC API (cargo feature `grpc`)"
            )));
        }
        // The HTTP endpoint: bound now too (a clear error when the port is taken, before anything starts).
        #[cfg(feature = "http")]
        let http_listener = match opts.http {
            Some(addr) => Some(crate::http::bind(addr).map_err(NodeError::Io)?),
            None => None,
        };
        #[cfg(not(feature = "http"))]
        if let Some(addr) = opts.http {
            return Err(NodeError::Io(format!(
                "--http {addr}: this aion was built without the HTTP endpoint (cargo feature `http`)"
            )));
        }
        #[cfg(feature = "http")]
        let http_addr = match &http_listener {
            Some(l) => Some(l.local_addr().map_err(|e| NodeError::Io(format!("HTTP listener: {e}")))?.to_string()),
            None => None,
        };
        #[cfg(not(feature = "http"))]
        let http_addr: Option<String> = None;
        #[cfg(feature = "grpc")]
        let kanban_addr = match &grpc_listener {
            Some(l) => {
                let mut a = l.local_addr().map_err(|e| NodeError::Io(format!("gRPC listener: {e}")))?;
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                tracing::info!(addr = %a, "AION gRPC API listening");
                Some(a.to_string())
            }
            None => None,
        };
        #[cfg(not(feature = "grpc"))]
        let kanban_addr: Option<String> = None;

        let cfg = Arc::new(opts.config);
        let (lc_tx, mut lc_rx) = mpsc::channel::<Lifecycle>(1024);
        let (store, recovered, recovered_statics) = match &opts.redis {
            Some(rc) => crate::store::Store::open_redis(rc, &paths.archive(), opts.retention),
            None => {
                crate::store::Store::open_all(&paths.store(), &paths.archive(), opts.retention, opts.store_max_bytes)
            }
        }
        .map_err(|e| NodeError::Io(e.to_string()))?;
        let statics = Arc::new(StaticStore::durable(store.clone(), recovered_statics));
        let mongo_stats = Arc::new(crate::export::mongo::MongoStats::default());
        #[cfg_attr(not(feature = "mongo"), allow(unused_mut))]
        let mut mongo_spec = None;
        #[cfg_attr(not(feature = "mongo"), allow(unused_mut))]
        let mut kickers = Vec::new();
        #[cfg(feature = "mongo")]
        if let Some(mc) = opts.mongo.clone() {
            let (st, db, dev, ms) = (store.clone(), paths.archive(), cfg.device_name.clone(), mongo_stats.clone());
            let (spec, addr) = ChildSpec::actor("mongo-sink", Restart::Permanent, 1, move || {
                crate::export::mongo::MongoSink::new(mc.clone(), st.clone(), db.clone(), dev.clone(), ms.clone())
            });
            mongo_spec = Some(spec);
            kickers.push(crate::export::mongo::Kicker::new(move || {
                let _ = addr.try_send(crate::export::mongo::MongoMsg::Kick);
            }));
        }
        #[cfg(not(feature = "mongo"))]
        if opts.mongo.is_some() {
            return Err(NodeError::Io(
                "--mongo: this aion was built without the MongoDB sink (cargo feature `mongo`)".to_owned(),
            ));
        }
        let st2 = store.clone();
        let (replicator_spec, replicator) =
            ChildSpec::actor("kanban-replicator", Restart::Permanent, 16 * 1024, move || {
                crate::export::replicator::Replicator::new(st2.clone(), kickers.clone())
            });
        let limits = crate::routing::slot::QueueLimits { kanbans: opts.queue_capacity, bytes: opts.queue_max_bytes };
        let mut router = Router::new(cfg.clone(), limits, lc_tx).with_store(store).with_hop_limit(opts.hop_limit);
        if opts.archive {
            router = router.with_archive(crate::export::replicator::ArchiveSink::new(replicator));
        }
        let federate = federates(&cfg, &opts.data_dir, &opts.cluster)?;
        if federate {
            let limits = crate::routing::slot::QueueLimits {
                kanbans: opts.cluster.outbox_kanbans,
                bytes: opts.cluster.outbox_bytes,
            };
            router = router.with_outboxes(limits);
        }
        // Queued kanbans stay in the store; each instance's backlog is paged in as its queue has room.
        let (mut restored, mut kept) = (0usize, 0usize);
        // One feeder per instance, for its backlogs in order (a Redis queue may have been found under two keys).
        let mut backlogs: Vec<(Arc<crate::routing::slot::Slot>, Vec<crate::store::Backlog>)> = Vec::new();
        for b in recovered {
            // An instance's queue, or an outbox to another device (when this runtime federates).
            match router.queue_slot(&b.queue) {
                Some(slot) => {
                    restored += b.count;
                    match backlogs.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &slot)) {
                        Some((_, bs)) => bs.push(b),
                        None => backlogs.push((slot.clone(), vec![b])),
                    }
                }
                None => kept += b.count,
            }
        }
        for (slot, bs) in &backlogs {
            slot.set_backlog(bs.iter().map(|b| b.count).sum());
        }
        if restored > 0 {
            tracing::info!(kanbans = restored, "recovered queued kanbans from the store");
        }
        if kept > 0 {
            tracing::warn!(
                kanbans = kept,
                "queued kanbans for services, instances or devices not in this services.yml are kept in the store"
            );
        }
        let router = Arc::new(router);
        // Long-lived tasks belong to the node (sessions to their own set): a panic is counted, shutdown waits.
        let tasks = Tasks::new("node");
        let sessions = Tasks::new("sessions");
        // Cluster mode: the identity is loaded and the QUIC socket bound now, before anything starts.
        #[cfg(feature = "cluster")]
        let federation = if federate {
            let c = &opts.cluster;
            let fopts = crate::federation::FederationOptions {
                listen: c.listen,
                timing: aion_transport::federation::Timing {
                    ping_every: c.ping_every.as_micros() as u64,
                    dead_after: c.dead_after.as_micros() as u64,
                },
                window: c.window,
                max_age: c.outbox_max_age,
                transfer_quota: c.transfer_quota,
            };
            let f = crate::federation::Federation::new(&paths.root, router.clone(), fopts, tasks.clone())
                .map_err(|e| NodeError::Cluster(e.to_string()))?;
            Some(Arc::new(f))
        } else {
            None
        };
        for (slot, bs) in backlogs {
            let _ = tasks.spawn("backlog feeder", feed_backlog(router.clone(), slot, bs));
        }
        if let Some(mut adopted) = router.store().and_then(|s| s.take_adopted()) {
            // Kanbans the store found in its queues while running (see `redis_store`): deliver them.
            let r = router.clone();
            let _ = tasks.spawn("adopted kanbans", async move {
                while let Some(a) = adopted.recv().await {
                    let queue = a.queue.to_string();
                    match r.restore(a) {
                        Some(slot) => r.request_start(&slot).await,
                        None => {
                            tracing::warn!(queue,
                            "adopted kanban for a service or instance not in this services.yml is kept in the store")
                        }
                    }
                }
            });
        }
        let stats = Arc::new(EndpointStats::default());

        let instances = Tasks::new("instances");
        #[cfg(feature = "kube")]
        let kube = match &opts.kubernetes {
            Some(k) => {
                let mut k = k.clone();
                k.endpoint_port = kanban_addr
                    .as_deref()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(k.endpoint_port);
                let kb = crate::backend::kube::KubeBackend::connect(
                    k,
                    &paths.root,
                    &cfg.device_name,
                    &cfg.debug,
                    cfg.microservices.keys().cloned().collect(),
                    instances.clone(),
                )
                .await
                .map_err(NodeError::NotRunnable)?;
                Some(kb)
            }
            None => None,
        };
        let (grpc_stop, grpc_stopping) = tokio::sync::watch::channel(false);
        let grpc_stats = Arc::new(GrpcStatsHandle::default());
        let statics_handle = statics.clone();
        let shared = crate::session::Shared::new(router.clone(), statics, paths.root.clone(), stats.clone());
        #[cfg(feature = "kube")]
        let grpc_gate = kube.as_ref().map(|k| k.gate() as Arc<dyn crate::session::grpc::Gate>);
        #[cfg(all(feature = "grpc", not(feature = "kube")))]
        let grpc_gate = None;
        #[cfg(feature = "grpc")]
        if let Some(listener) = grpc_listener {
            let _ = sessions.spawn(
                "gRPC endpoint",
                crate::session::grpc::serve(
                    shared.clone(),
                    sessions.clone(),
                    listener,
                    grpc_stopping,
                    grpc_stats.clone(),
                    grpc_gate,
                ),
            );
        }
        #[cfg(not(feature = "grpc"))]
        drop(grpc_stopping);
        let (sock, ses) = (paths.socket(), sessions.clone());
        let (ep_spec, endpoint) = ChildSpec::actor("status-kanban", Restart::Permanent, 64, move || {
            let pre = prebound.lock().ok().and_then(|mut p| p.take());
            Endpoint::new(shared.clone(), sock.clone(), ses.clone(), pre)
        });
        let env = ProcessEnv {
            paths: paths.clone(),
            base_dir: opts.base_dir,
            path_dirs: opts.path_dirs,
            device_name: cfg.device_name.clone(),
            debug: cfg.debug.clone(),
            log_cap: opts.log_cap,
            run_marker: crate::backend::process::run_marker(&dir_id),
            dir_id,
            kanban_addr: kanban_addr.clone(),
        };
        let inproc_names = opts.inproc.names();
        let inproc = InProcessBackend::new(opts.inproc, endpoint.clone(), instances.clone());
        let local = Local::new(ProcessBackend::new(env, instances.clone()), inproc);
        #[cfg(feature = "kube")]
        let local = match &kube {
            Some(k) => local.with_cluster(k.clone()),
            None => local,
        };
        let backend: SharedBackend = Arc::new(local);
        let (r, b, ack_timeout) = (router.clone(), backend.clone(), opts.ack_timeout);
        let grpc_reconnect = opts.grpc.map(|_| opts.grpc_reconnect);
        let (broker_spec, broker) = ChildSpec::actor("service-broker", Restart::Permanent, 4096, move || {
            Broker::new(r.clone(), b.clone()).with_ack_timeout(ack_timeout).with_grpc_reconnect(grpc_reconnect)
        });
        let sup = Supervisor::new(
            "root",
            Strategy::OneForOne,
            Intensity { max_restarts: 5, within: Duration::from_secs(10) },
        )
        .child(replicator_spec)
        .child(ep_spec)
        .child(broker_spec);
        let sup = match mongo_spec {
            Some(spec) => sup.child(spec),
            None => sup,
        };
        #[cfg(feature = "cluster")]
        let sup = match &federation {
            Some(f) => sup.child(ChildSpec::supervisor("federation", Restart::Permanent, f.supervisor())),
            None => sup,
        };
        #[cfg(feature = "kube")]
        let sup = match &kube {
            Some(k) => sup.child(ChildSpec::supervisor("kubernetes", Restart::Permanent, k.supervisor())),
            None => sup,
        };
        let sup = sup.start();

        let b = broker.clone();
        let forwarder = tasks.spawn("lifecycle forwarder", async move {
            while let Some(l) = lc_rx.recv().await {
                if b.send(BrokerMsg::Lifecycle(l)).await.is_err() {
                    tracing::error!("broker mailbox closed; lifecycle request lost");
                }
            }
        });

        let stop = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            mongo: opts.mongo.as_ref().map(|m| (m.uri.clone(), mongo_stats.clone())),
            router: router.clone(),
            broker: broker.clone(),
            sup,
            stats,
            stop,
            started: Instant::now(),
            data_dir: paths.root.display().to_string(),
            services_file: opts.config_path.map(|p| p.display().to_string()).unwrap_or_default(),
            control_busy: Default::default(),
            statics: statics_handle,
            send_slots: Arc::new(tokio::sync::Semaphore::new(crate::control::MAX_SENDS)),
            parse_lock: tokio::sync::Mutex::new(()),
            tasks: tasks.clone(),
            sessions,
            instances,
            backend,
            grpc_stop,
            grpc: kanban_addr.map(|a| (a, grpc_stats)),
            #[cfg(feature = "cluster")]
            federation,
            grace: opts.grace,
            inproc: inproc_names,
            on_kubernetes,
            http: http_addr,
            started_up: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            applying: tokio::sync::Mutex::new(()),
            #[cfg(feature = "cluster")]
            master: std::sync::OnceLock::new(),
            #[cfg(feature = "cluster")]
            worker: std::sync::OnceLock::new(),
            #[cfg(feature = "kube")]
            kube,
        });
        #[cfg(feature = "cluster")]
        start_cluster(&shared, &opts.cluster, &paths.root);
        let node_shared = shared.clone();
        #[cfg(feature = "http")]
        if let Some(listener) = http_listener {
            let stopping = shared.grpc_stop.subscribe();
            let _ = tasks.spawn("HTTP endpoint", crate::http::serve(listener, shared.clone(), stopping));
        }
        shared.started_up.store(true, std::sync::atomic::Ordering::SeqCst);
        let control = tasks.spawn("control accept loop", accept_control(shared, control_listener));
        tracing::info!(data_dir = %paths.root.display(), services = cfg.microservices.len(), "runtime started");
        Ok(Node { shared: node_shared, endpoint, paths, grace: opts.grace, control, forwarder, _lock: lock })
    }

    /// The routing table and slots.
    pub fn router(&self) -> &Arc<Router> {
        &self.shared.router
    }

    /// The data directory layout.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Status of every instance.
    pub async fn instances(&self) -> Vec<InstanceStatus> {
        ask(&self.shared.broker, BrokerMsg::Status).await.unwrap_or_default()
    }

    /// Full status report.
    pub async fn status(&self) -> StatusReport {
        report(&self.shared).await
    }

    /// Applies a new configuration (what `aion apply` does): services added start (if `startup`), services whose
    /// definition changed restart with it, services removed stop; the others are not touched, their queues and
    /// sessions go on. `deviceName` cannot change.
    ///
    /// # Errors
    /// A `deviceName` change, or a service that cannot run here.
    pub async fn apply(&self, cfg: ServicesFile) -> Result<crate::routing::Change, String> {
        apply(&self.shared, cfg).await
    }

    /// Injects a kanban into a service instance's input queue (what `aion kanban send` does).
    ///
    /// # Errors
    /// Unknown service or instance.
    pub async fn inject(
        &self,
        service: &str,
        instance: u32,
        key: &str,
        metadata: serde_json::Value,
    ) -> Result<KanbanId, String> {
        inject(&self.shared.router, service, instance, key, metadata).await
    }

    /// Serves a session over an in-memory link: the full session protocol without a socket, for embedders that
    /// run a service with `aion_sdk::run_on_link` (registered in-process services use direct sessions instead).
    /// Returns false if the endpoint is gone.
    pub async fn attach(&self, link: crate::session::ServerLink) -> bool {
        self.endpoint.send(crate::session::EndpointMsg::Attach(link)).await.is_ok()
    }

    /// Completes when a stop was requested through the control API.
    pub async fn stop_requested(&self) {
        self.shared.stop.notified().await
    }

    /// Completes if the supervision tree gave up (restart intensity exceeded at the root).
    pub async fn failed(&self) -> ExitReason {
        self.shared.sup.wait().await
    }

    /// Graceful shutdown: stop accepting connections, stop every instance (SIGTERM, SIGKILL after the grace
    /// period), then stop the actors in reverse start order and wait (at most [`FINAL_COMMIT_WAIT`]) for the
    /// store's last commit. Durable queues stay in the store for the next run.
    ///
    /// # Errors
    /// When the store could not commit its last writes in time (a full disk): nothing acknowledged is lost —
    /// what was not committed was never acknowledged to its producer — but the operator should know.
    pub async fn shutdown(self) -> Result<(), String> {
        tracing::info!("shutting down");
        self.shared.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = ask(&self.endpoint, EndpointMsg::StopAccepting).await;
        let grace = self.grace;
        let _ = ask(&self.shared.broker, |tx| BrokerMsg::Shutdown(grace, tx)).await;
        // gRPC streams end with UNAVAILABLE (their instances are stopped), and the API stops.
        let _ = self.shared.grpc_stop.send(true);
        // Links to other devices close; what they had in flight stays in the outboxes' store for the next run.
        #[cfg(feature = "cluster")]
        if let Some(f) = &self.shared.federation {
            f.close();
        }
        // Every instance is stopped: their sessions end (and requeue what was in flight).
        let aborted = self.shared.sessions.shutdown(SESSION_END_WAIT).await;
        if aborted > 0 {
            tracing::warn!(sessions = aborted, "sessions still open after their instances stopped were aborted");
        }
        self.shared.sup.shutdown().await;
        let left: usize =
            self.shared.router.slots().iter().filter(|s| !s.durable).map(|s| s.depth() + s.inflight()).sum();
        if left > 0 {
            // `delivery: memory` queues: say so, with the count, rather than losing them silently.
            tracing::warn!(kanbans = left, "kanbans queued for `delivery: memory` services are discarded at exit");
        }
        let mut result = Ok(());
        if let Some(store) = self.shared.router.store() {
            match tokio::time::timeout(FINAL_COMMIT_WAIT, store.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(format!("the store could not commit its last writes: {e}")),
                Err(_) => {
                    let why = store.stats.last_error.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
                    result = Err(format!(
                        "the store could not commit its last writes within {}s ({why}); they were never \
                         acknowledged to their producers, and the kanbans those were made from are redelivered",
                        FINAL_COMMIT_WAIT.as_secs()
                    ));
                }
            }
        }
        self.control.abort();
        self.forwarder.abort();
        self.shared.tasks.shutdown(Duration::from_secs(1)).await;
        // Every instance has ended: its log pumps end as its pipes close; the collector of adopted processes goes.
        self.shared.instances.shutdown(Duration::from_secs(1)).await;
        let _ = std::fs::remove_file(self.paths.control());
        let _ = std::fs::remove_file(self.paths.socket());
        match &result {
            Ok(()) => tracing::info!("runtime stopped"),
            Err(e) => tracing::error!("runtime stopped, but {e}"),
        }
        result
    }
}

/// Pages an instance's backlogs in from the store as its queue has room, oldest first; then lets producers in.
async fn feed_backlog(
    router: Arc<Router>,
    slot: Arc<crate::routing::slot::Slot>,
    backlogs: Vec<crate::store::Backlog>,
) {
    let Some(store) = router.store().cloned() else {
        slot.end_backlog();
        return;
    };
    for b in backlogs {
        let mut after = b.after.clone();
        let mut delay = Duration::from_millis(50);
        loop {
            let (rows, bytes) = slot.backlog_room().await;
            match store.page(&b, &after, rows.min(256), bytes).await {
                Ok(page) => {
                    let Some(next) = page.next else { break };
                    after = next;
                    for k in page.kanbans {
                        slot.restore_paged(k);
                    }
                    delay = Duration::from_millis(50);
                }
                Err(crate::store::StoreError::Closed) => return, // shutting down
                Err(e) => {
                    tracing::error!(queue = %b.queue, "cannot read queued kanbans from the store, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    slot.end_backlog();
}

async fn inject(
    router: &Router,
    service: &str,
    instance: u32,
    key: &str,
    metadata: serde_json::Value,
) -> Result<KanbanId, String> {
    let k = injected(router, instance, key, metadata)?;
    deliver_injected(router, service, instance, k).await
}

/// The kanban `aion kanban send` puts into an instance's queue (checked against the size limit).
fn injected(
    router: &Router,
    instance: u32,
    key: &str,
    metadata: serde_json::Value,
) -> Result<Box<aion_runtime::WireKanban>, String> {
    let id = KanbanId::generate();
    let k = Kanban {
        id,
        trace_id: id,
        origin: Origin { service: "aion-cli".into(), instance: 0 },
        start_at: aion_runtime::time::rfc3339_now(),
        connection_key: key.to_owned(),
        process_number: instance,
        next_device_name: router.config().device_name.clone(),
        metadata: metadata_from_json(metadata),
        ..Kanban::default()
    };
    let k = Box::new(k.into_wire());
    k.check_size().map_err(|e| format!("not sent: {e}"))?;
    Ok(k)
}

/// Queues an injected kanban (waiting for room) and waits for its commit when durable.
async fn deliver_injected(
    router: &Router,
    service: &str,
    instance: u32,
    k: Box<aion_runtime::WireKanban>,
) -> Result<KanbanId, String> {
    let id = k.id;
    match router.deliver(service, instance, k).await {
        Ok(persisted) => {
            if let Some(store) = router.store().filter(|_| persisted) {
                store.barrier().await.map_err(|e| e.to_string())?;
            }
            Ok(id)
        }
        Err((crate::routing::dead::Reason::UnknownService, _)) => Err(format!("unknown service `{service}`")),
        Err((_, _)) => {
            let scale = router.config().microservices.get(service).map_or(0, |m| m.scale);
            Err(format!("service `{service}` has instances 1..={scale}, not {instance}"))
        }
    }
}

/// Parses and carries out one request, within its deadline (default: the CLI's, 30 s): a request whose client
/// has given up is not carried out, and none holds its connection for longer.
async fn handle_request(s: &Shared, line: &[u8]) -> Vec<u8> {
    // Large requests (a send with big metadata) are parsed one at a time, and turned into a kanban before the
    // next one is parsed: the memory of a parsed request is bounded by one.
    let guard = if line.len() > 64 << 10 { Some(s.parse_lock.lock().await) } else { None };
    let env = match crate::control::parse_request(line) {
        Err(e) => return err_reply(e),
        Ok(env) => env,
    };
    let now = crate::store::now_ms();
    if env.deadline_ms.is_some_and(|d| now > d) {
        tracing::warn!(request = ?env.request, "control request expired before it was read (the client gave up); not carried out");
        return err_reply("request expired before the runtime read it; not carried out");
    }
    let left = env.deadline_ms.map_or(Duration::from_secs(30), |d| Duration::from_millis((d - now).max(0) as u64));
    let deadline = tokio::time::Instant::now() + left;
    match env.request {
        Request::Status => {
            drop(guard);
            ok_reply(&report(s).await)
        }
        Request::Stop => {
            s.stop.notify_one();
            ok_reply(&serde_json::json!({}))
        }
        #[cfg(feature = "cluster")]
        Request::ClusterRemove { name } => match s.master.get() {
            Some(m) => match m.remove(&name).await {
                Ok(()) => ok_reply(&serde_json::json!({"removed": name})),
                Err(e) => err_reply(e),
            },
            None => err_reply("this runtime is not a cluster master (`aion master`)"),
        },
        #[cfg(not(feature = "cluster"))]
        Request::ClusterRemove { .. } => err_reply("this aion was built without cluster mode"),
        Request::Trace { id, local } => {
            let Some(kid) = aion_runtime::KanbanId::parse(&id) else {
                return err_reply(format!("`{id}` is not a kanban id (32 hex digits)"));
            };
            drop(guard);
            let dir = std::path::Path::new(&s.data_dir);
            #[cfg(feature = "cluster")]
            {
                let me = s.federation.as_ref().map(|f| f.me.clone()).unwrap_or_default();
                let rows = match (local, s.master.get(), &s.federation) {
                    (false, Some(m), _) => m.trace(dir, kid).await,
                    (false, None, Some(f)) => f.trace(dir, kid).await,
                    _ => crate::cluster::local_rows(dir, &id, &me),
                };
                ok_reply(&serde_json::json!({ "rows": rows }))
            }
            #[cfg(not(feature = "cluster"))]
            {
                let _ = local;
                let archive = crate::paths::Paths::new(dir).archive();
                let rows = if archive.is_file() {
                    crate::store::query_trace(&archive, kid).unwrap_or_default()
                } else {
                    Vec::new()
                };
                ok_reply(&serde_json::json!({ "rows": rows }))
            }
        }
        Request::Apply { file, yaml } => {
            let loaded = aion_runtime::config::load_str(&file, &yaml);
            drop(guard);
            let errors: Vec<String> = loaded
                .diagnostics
                .iter()
                .filter(|d| d.severity == aion_runtime::config::Severity::Error)
                .map(|d| d.to_string())
                .collect();
            match loaded.config {
                Some(cfg) if errors.is_empty() => {
                    #[cfg(feature = "cluster")]
                    if let Some(m) = s.master.get() {
                        return match m.apply(Some(cfg)).await {
                            Ok(v) => ok_reply(&v),
                            Err(e) => err_reply(e),
                        };
                    }
                    match apply(s, cfg).await {
                        Ok(c) => ok_reply(&change_json(&c)),
                        Err(e) => err_reply(e),
                    }
                }
                _ => err_reply(format!("not applied: {}", errors.join("; "))),
            }
        }
        Request::Delete => {
            #[cfg(feature = "cluster")]
            if let Some(m) = s.master.get() {
                drop(guard);
                return match m.apply(None).await {
                    Ok(v) => ok_reply(&v),
                    Err(e) => err_reply(e),
                };
            }
            let mut cfg = (*s.router.config()).clone();
            cfg.microservices.clear();
            drop(guard);
            match apply(s, cfg).await {
                Ok(c) => ok_reply(&change_json(&c)),
                Err(e) => err_reply(e),
            }
        }
        Request::Logs { service, instance } => match s.router.slot(&service, instance) {
            Some(_) => ok_reply(&s.backend.logs(&service, instance)),
            None => err_reply(format!("no instance {instance} of service {service:?} in this runtime")),
        },
        Request::Send { service, instance, key, metadata } => {
            let Ok(_slot) = s.send_slots.clone().try_acquire_owned() else {
                return err_reply(format!(
                    "busy: {} kanban sends are waiting for room in their queues; try again",
                    crate::control::MAX_SENDS
                ));
            };
            let k = match injected(&s.router, instance, &key, metadata) {
                Ok(k) => k,
                Err(e) => return err_reply(e),
            };
            drop(guard);
            match tokio::time::timeout_at(deadline, deliver_injected(&s.router, &service, instance, k)).await {
                Ok(Ok(id)) => ok_reply(&serde_json::json!({"kanban_id": id.to_string()})),
                Ok(Err(e)) => err_reply(e),
                Err(_) => {
                    tracing::warn!(
                        service,
                        instance,
                        "kanban send given up at its deadline (queue full or store not committing)"
                    );
                    err_reply("timed out waiting for room in the queue or for the store; the kanban was not queued, or queued and not yet committed")
                }
            }
        }
    }
}

async fn report(s: &Shared) -> StatusReport {
    let instances = ask(&s.broker, BrokerMsg::Status).await.unwrap_or_default();
    report_with(s, instances).await
}

/// The status document around the broker's answer.
async fn report_with(s: &Shared, instances: Vec<crate::InstanceStatus>) -> StatusReport {
    let recent = s.router.dead.recent();
    StatusReport {
        device_name: s.router.config().device_name.clone(),
        pid: std::process::id(),
        uptime_secs: s.started.elapsed().as_secs(),
        data_dir: s.data_dir.clone(),
        services_file: s.services_file.clone(),
        instances,
        dead_letters: s.router.dead.counts().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        recent_dead_letters: recent.iter().rev().take(20).map(dead_json).collect(),
        sessions: s.stats.sessions.load(Ordering::Relaxed),
        control_busy: s.control_busy.load(Ordering::Relaxed),
        static_lists_truncated: s.statics.truncated_lists(),
        rejected_connections: s.stats.rejected.load(Ordering::Relaxed),
        supervisor_events: s.sup.journal().events().iter().map(event_text).collect(),
        mongo: s.mongo.as_ref().map(|(uri, m)| crate::control::MongoReport {
            uri: uri.clone(),
            exported: m.exported.load(Ordering::Relaxed),
            errors: m.errors.load(Ordering::Relaxed),
            last_error: m.last_error.lock().ok().and_then(|l| l.clone()),
        }),
        store: s.router.store().map(|st| StoreReport {
            backend: st.backend().to_owned(),
            path: st.location().to_owned(),
            commits: st.stats.commits.load(Ordering::Relaxed),
            enqueued: st.stats.enqueued.load(Ordering::Relaxed),
            acked: st.stats.acked.load(Ordering::Relaxed),
            errors: st.stats.errors.load(Ordering::Relaxed),
            unknown_acks: st.stats.unknown_acks.load(Ordering::Relaxed),
            stray_entries: st.stats.stray_entries.load(Ordering::Relaxed),
            last_error: st.stats.last_error.lock().ok().and_then(|l| l.clone()),
            archived: st.stats.archived.load(Ordering::Relaxed),
            archive_dropped: s.router.archive().map_or(0, |a| a.dropped.load(Ordering::Relaxed)),
            commit_latency: st.stats.commit_latency.report(),
        }),
        log: crate::control::LogReport::now(),
        tasks: crate::control::TasksReport {
            sessions: s.sessions.running(),
            node: s.tasks.running(),
            instances: s.instances.running(),
            panicked: s.sessions.panicked() + s.tasks.panicked() + s.instances.panicked(),
        },
        grpc: grpc_report(s),
        federation: federation_report(s),
        cluster: cluster_report(s).await,
        kubernetes: kube_report(s),
        http: s.http.clone(),
    }
}

#[cfg(feature = "http")]
impl crate::http::Source for Shared {
    fn report(&self) -> futures::future::BoxFuture<'_, Option<StatusReport>> {
        Box::pin(async move {
            // The broker answers a status request, or the runtime is not healthy.
            let instances = ask(&self.broker, BrokerMsg::Status).await?;
            Some(report_with(self, instances).await)
        })
    }

    fn unready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.stopping.load(Ordering::SeqCst) {
            why.push("shutting down".to_owned());
        }
        if !self.started_up.load(Ordering::SeqCst) {
            why.push("starting".to_owned());
        }
        if let Some(st) = self.router.store() {
            if st.stats.failing.load(Ordering::Relaxed) {
                let last = st.stats.last_error.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
                why.push(format!("store ({}): commits are failing: {last}", st.backend()));
            }
        }
        why
    }

    fn graph(&self) -> serde_json::Value {
        let cfg = self.router.config();
        let services: Vec<serde_json::Value> = cfg
            .microservices
            .values()
            .map(|ms| {
                let next: Vec<serde_json::Value> = ms
                    .next_service
                    .iter()
                    .flat_map(|(key, targets)| {
                        targets.iter().map(move |t| serde_json::json!({"key": key, "name": t.name, "device": t.device}))
                    })
                    .collect();
                serde_json::json!({
                    "name": ms.name,
                    "scale": ms.scale.max(1),
                    "always": ms.always,
                    "startup": ms.startup,
                    "target_node": ms.target_node,
                    "next": next,
                })
            })
            .collect();
        let devices: Vec<&String> = cfg.devices.keys().collect();
        serde_json::json!({"device": cfg.device_name, "services": services, "devices": devices})
    }
}

#[cfg(feature = "kube")]
fn kube_report(s: &Shared) -> Option<crate::control::KubernetesReport> {
    s.kube.as_ref().map(|k| k.report())
}

#[cfg(not(feature = "kube"))]
fn kube_report(_: &Shared) -> Option<crate::control::KubernetesReport> {
    None
}

#[cfg(feature = "cluster")]
async fn cluster_report(s: &Shared) -> Option<crate::control::ClusterReport> {
    if let Some(m) = s.master.get() {
        return Some(m.report().await);
    }
    s.worker.get().map(|w| w.report())
}

#[cfg(not(feature = "cluster"))]
async fn cluster_report(_: &Shared) -> Option<crate::control::ClusterReport> {
    None
}

#[cfg(feature = "cluster")]
fn federation_report(s: &Shared) -> Option<crate::control::FederationReport> {
    s.federation.as_ref().map(|f| f.report())
}

#[cfg(not(feature = "cluster"))]
fn federation_report(_: &Shared) -> Option<crate::control::FederationReport> {
    None
}

#[cfg(feature = "grpc")]
fn grpc_report(s: &Shared) -> Option<crate::control::GrpcReport> {
    s.grpc.as_ref().map(|(addr, g)| crate::control::GrpcReport {
        addr: addr.clone(),
        sessions: g.sessions.load(Ordering::Relaxed),
        outputs: g.outputs.load(Ordering::Relaxed),
        refused: g.refused.load(Ordering::Relaxed),
    })
}

#[cfg(not(feature = "grpc"))]
fn grpc_report(_: &Shared) -> Option<crate::control::GrpcReport> {
    None
}

/// Serves the control socket: at most [`control::MAX_CONNECTIONS`] connections at once (others are told "busy"
/// and closed), each with a request deadline and a reply deadline.
async fn accept_control(shared: Arc<Shared>, listener: tokio::net::UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(crate::control::MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let s = shared.clone();
                    let _ = shared.tasks.spawn("control connection", async move {
                        serve_control(s, stream).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    shared.control_busy.fetch_add(1, Ordering::Relaxed);
                    let _ = shared.tasks.spawn("control busy reply", async move {
                        let line = format!(
                            "{}\n",
                            serde_json::json!({"ok": false, "error": format!("busy: {} control connections are being served; try again", crate::control::MAX_CONNECTIONS)})
                        );
                        let mut stream = stream;
                        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line.as_bytes())).await;
                    });
                }
            },
            Err(e) => {
                tracing::error!("control accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request line within [`control::REQUEST_TIMEOUT`] and at most [`control::MAX_REQUEST_BYTES`].
async fn read_request(r: &mut tokio::net::unix::OwnedReadHalf) -> Result<Option<Vec<u8>>, String> {
    let deadline = tokio::time::Instant::now() + crate::control::REQUEST_TIMEOUT;
    let mut line: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Err(_) => return Err(format!("no complete request within {}s", crate::control::REQUEST_TIMEOUT.as_secs())),
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Ok((!line.is_empty()).then_some(line));
        }
        let end = chunk[..n].iter().position(|b| *b == b'\n');
        let take = end.unwrap_or(n);
        if line.len() + take > crate::control::MAX_REQUEST_BYTES {
            return Err(crate::control::too_large_reply());
        }
        line.extend_from_slice(&chunk[..take]);
        if end.is_some() {
            return Ok(Some(line));
        }
    }
}

/// One reply line: `{"ok":true, …body}` serialised straight to bytes (no intermediate JSON tree).
fn ok_reply<T: serde::Serialize>(body: &T) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Reply<'a, T> {
        ok: bool,
        #[serde(flatten)]
        body: &'a T,
    }
    let mut v = serde_json::to_vec(&Reply { ok: true, body })
        .unwrap_or_else(|e| serde_json::json!({"ok": false, "error": e.to_string()}).to_string().into_bytes());
    v.push(b'\n');
    v
}

fn err_reply(e: impl std::fmt::Display) -> Vec<u8> {
    let mut v = serde_json::json!({"ok": false, "error": e.to_string()}).to_string().into_bytes();
    v.push(b'\n');
    v
}

async fn serve_control(s: Arc<Shared>, stream: tokio::net::UnixStream) {
    let (mut r, mut w) = stream.into_split();
    let resp = match read_request(&mut r).await {
        Ok(None) => return,
        Err(e) => err_reply(e),
        Ok(Some(line)) => handle_request(&s, &line).await,
    };
    if tokio::time::timeout(crate::control::REPLY_TIMEOUT, w.write_all(&resp)).await.is_err() {
        tracing::warn!(bytes = resp.len(), "control client did not read its reply; connection dropped");
    }
}
