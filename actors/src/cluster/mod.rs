//! Cluster mode's control plane: a master-aion places the services of the applied project on its nodes
//! (`targetNode`), sends each worker-aion its own services only, and watches them; a worker joins with a
//! single-use token, keeps its certificate and its last assignment (it runs it while the master is away), and
//! reports its instances every second (`docs/cluster.md`).
//!
//! Kanbans never go through here: they cross on the federation links, worker to worker directly.

pub mod placement;

use crate::broker::InstanceStatus;
pub use crate::control::{ClusterReport, NodeReport};
use crate::federation::tls::{self, ClusterDir};
use crate::federation::{read_frame, wall_ms, write_frame, Federation};
use crate::routing::Change;
use aion_runtime::config::ServicesFile;
use aion_transport::federation::Frame;
use aion_transport::FrameDecoder;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The control protocol versions this build speaks.
const CONTROL_MIN: u16 = 1;
const CONTROL_MAX: u16 = 1;

/// How the control plane reaches the node it runs in.
pub struct NodeHooks {
    /// Applies a configuration to this node.
    pub apply: Box<dyn Fn(ServicesFile) -> BoxFuture<'static, Result<Change, String>> + Send + Sync>,
    /// This node's instances.
    pub instances: Box<dyn Fn() -> BoxFuture<'static, Vec<InstanceStatus>> + Send + Sync>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(path = %path.display(), "unreadable, ignored: {e}");
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The project applied on the master, as kept in its data dir.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    generation: u64,
    project: Option<ServicesFile>,
    /// Known nodes and where they accept links.
    nodes: BTreeMap<String, String>,
}

/// One node as the master sees it.
#[derive(Default)]
struct NodeState {
    connected: bool,
    last_seen_ms: u64,
    version: String,
    addr: String,
    instances: Vec<InstanceStatus>,
    /// Sends frames on its control connection.
    tx: Option<tokio::sync::mpsc::Sender<Frame>>,
    /// Which of its connections is current.
    conn: u64,
    /// Trace queries waiting for its answer, oldest first.
    traces: std::collections::VecDeque<tokio::sync::oneshot::Sender<String>>,
}

/// The master-aion's control plane.
pub struct Master {
    name: String,
    dir: ClusterDir,
    state_file: PathBuf,
    stored: Mutex<Stored>,
    nodes: Mutex<BTreeMap<String, NodeState>>,
    hooks: NodeHooks,
    fed: Arc<Federation>,
    next_conn: AtomicU64,
    dead_after: Duration,
    /// One apply at a time.
    applying: tokio::sync::Mutex<()>,
}

impl Master {
    /// The master of `fed`'s device, with its state (project, generation, nodes' addresses) from `data_dir`.
    pub fn new(data_dir: &Path, fed: Arc<Federation>, hooks: NodeHooks, dead_after: Duration) -> Arc<Master> {
        let dir = ClusterDir::new(data_dir);
        let state_file = dir.root.join("master.json");
        let stored: Stored = read_json(&state_file).unwrap_or_default();
        let nodes = stored
            .nodes
            .iter()
            .map(|(n, a)| (n.clone(), NodeState { addr: a.clone(), ..NodeState::default() }))
            .collect();
        Arc::new(Master {
            name: fed.me.clone(),
            dir,
            state_file,
            stored: Mutex::new(stored),
            nodes: Mutex::new(nodes),
            hooks,
            fed,
            next_conn: AtomicU64::new(1),
            dead_after,
            applying: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration the master runs at start: its slice of the last applied project (an empty one with
    /// its name when none was applied).
    pub fn stored_slice(data_dir: &Path, name: &str) -> ServicesFile {
        let dir = ClusterDir::new(data_dir);
        let stored: Stored = read_json(&dir.root.join("master.json")).unwrap_or_default();
        match &stored.project {
            Some(p) => placement::slice(p, name, name, &stored.nodes),
            None => ServicesFile { device_name: name.to_owned(), ..ServicesFile::default() },
        }
    }

    fn addrs(&self) -> BTreeMap<String, String> {
        self.stored.lock().map(|s| s.nodes.clone()).unwrap_or_default()
    }

    fn save(&self) {
        let s = self.stored.lock().map(|s| s.clone()).unwrap_or_default();
        if let Err(e) = write_json(&self.state_file, &s) {
            tracing::error!("cluster state not saved: {e}");
        }
    }

    /// Applies a project: persisted, this node's slice applied here, every connected worker sent its own
    /// (workers that are away get theirs when they attach). Returns what changed, service by service.
    ///
    /// # Errors
    /// This node's slice could not be applied (a service that cannot run here).
    pub async fn apply(&self, project: Option<ServicesFile>) -> Result<serde_json::Value, String> {
        let _one = self.applying.lock().await;
        let old = self.stored.lock().ok().and_then(|s| s.project.clone()).unwrap_or_default();
        let new = project.clone().unwrap_or_default();
        let diff = Change::services(&old, &new);
        let generation = {
            let Ok(mut s) = self.stored.lock() else { return Err("cluster state poisoned".into()) };
            s.generation += 1;
            s.project = project;
            s.generation
        };
        self.save();
        let local = self.push_all().await?;
        let placed: BTreeMap<String, Vec<String>> = new.microservices.values().fold(BTreeMap::new(), |mut m, ms| {
            m.entry(placement::node_of(ms, &self.name).to_owned()).or_default().push(ms.name.clone());
            m
        });
        let known: Vec<String> = self.nodes.lock().map(|n| n.keys().cloned().collect()).unwrap_or_default();
        let waiting: Vec<&String> = placed.keys().filter(|n| **n != self.name && !known.contains(n)).collect();
        for n in &waiting {
            tracing::warn!(node = %n, "services are placed on node `{n}`, which has not joined: they start when it does");
        }
        tracing::info!(generation, "project applied");
        Ok(serde_json::json!({
            "generation": generation,
            "added": diff.added, "changed": diff.changed, "removed": diff.removed,
            "nodes": placed, "waiting_for": waiting, "local": {"added": local.added, "changed": local.changed, "removed": local.removed},
        }))
    }

    /// Applies this node's slice here and sends every connected worker its own.
    async fn push_all(&self) -> Result<Change, String> {
        let (project, generation) = self
            .stored
            .lock()
            .map(|s| (s.project.clone().unwrap_or_default(), s.generation))
            .map_err(|_| "cluster state poisoned".to_owned())?;
        let addrs = self.addrs();
        let local = (self.hooks.apply)(placement::slice(&project, &self.name, &self.name, &addrs)).await?;
        let txs: Vec<(String, tokio::sync::mpsc::Sender<Frame>)> = self
            .nodes
            .lock()
            .map(|n| n.iter().filter_map(|(k, v)| v.tx.clone().map(|t| (k.clone(), t))).collect())
            .unwrap_or_default();
        for (node, tx) in txs {
            if let Some(f) = assignment(&project, &self.name, &node, &addrs, generation) {
                let _ = tx.try_send(f);
            }
        }
        Ok(local)
    }

    /// A worker joins with a token: its certificate is issued on the key it sent.
    pub(crate) fn join(&self, frame: Frame, remote: std::net::SocketAddr) -> Result<Frame, (&'static str, String)> {
        let Frame::Join { id, secret, name, public_key } = frame else {
            return Err(("protocol", "expected a join".into()));
        };
        tls::check_name(&name).map_err(|e| ("join", e.to_string()))?;
        if name == self.name {
            return Err(("join", format!("`{name}` is the master's own name")));
        }
        if self.nodes.lock().is_ok_and(|n| n.get(&name).is_some_and(|s| s.connected)) {
            return Err(("join", format!("a node named `{name}` is connected")));
        }
        tls::consume_token(&self.dir, &id, &secret).map_err(|e| ("token", e.to_string()))?;
        let (cert, ca) = tls::issue_for_key(&self.dir, &name, &public_key).map_err(|e| ("join", e.to_string()))?;
        let crl = std::fs::read_to_string(self.dir.crl()).unwrap_or_default();
        tracing::info!(node = %name, %remote, "node joined the cluster");
        if let Ok(mut n) = self.nodes.lock() {
            n.entry(name.clone()).or_default();
        }
        Ok(Frame::Joined { cert, ca, crl, master: self.name.clone() })
    }

    /// Serves a worker's control connection (its certificate names `name`) until it is lost.
    pub(crate) async fn attach(
        self: Arc<Self>,
        first: Frame,
        remote: std::net::SocketAddr,
        mut cs: quinn::SendStream,
        mut cr: quinn::RecvStream,
        mut dec: FrameDecoder,
    ) -> String {
        let Frame::Attach { min, max, name, version, listen, .. } = first else { return "expected an attach".into() };
        if min > CONTROL_MAX || max < CONTROL_MIN {
            let reason =
                format!("no control version in common (ours {CONTROL_MIN}..={CONTROL_MAX}, theirs {min}..={max})");
            let _ = write_frame(&mut cs, &Frame::Refuse { reason: reason.clone() }).await;
            return reason;
        }
        // Where it accepts links: its address as seen from here when it listens on every address.
        let addr = match listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => std::net::SocketAddr::new(remote.ip(), a.port()).to_string(),
            Ok(a) => a.to_string(),
            Err(_) => listen.clone(),
        };
        let conn_no = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
        let moved = {
            let Ok(mut nodes) = self.nodes.lock() else { return "state poisoned".into() };
            let n = nodes.entry(name.clone()).or_default();
            n.connected = true;
            n.last_seen_ms = wall_ms();
            n.version = version;
            n.tx = Some(tx.clone());
            n.conn = conn_no;
            let moved = n.addr != addr;
            n.addr = addr.clone();
            moved
        };
        tracing::info!(node = %name, %addr, "node attached");
        if moved {
            if let Ok(mut s) = self.stored.lock() {
                s.nodes.insert(name.clone(), addr.clone());
                s.generation += 1;
            }
            self.save();
            // Every node learns where this one is (its links start or move).
            if let Err(e) = self.push_all().await {
                tracing::error!("cannot apply this node's configuration: {e}");
            }
        } else {
            let (project, generation) =
                self.stored.lock().map(|s| (s.project.clone().unwrap_or_default(), s.generation)).unwrap_or_default();
            if let Some(f) = assignment(&project, &self.name, &name, &self.addrs(), generation) {
                let _ = tx.try_send(f);
            }
        }
        // Only the node's entry holds the sender now: removing the node ends this connection.
        drop(tx);
        let dead = self.dead_after;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut heard = tokio::time::Instant::now();
        let why = loop {
            tokio::select! {
                f = rx.recv() => {
                    let Some(f) = f else { break "superseded".to_owned() };
                    if let Err(e) = write_frame(&mut cs, &f).await { break e; }
                }
                r = read_frame(&mut cr, &mut dec) => match r {
                    Ok(Some(Frame::Report { instances })) => {
                        heard = tokio::time::Instant::now();
                        let list: Vec<InstanceStatus> = serde_json::from_str(&instances).unwrap_or_default();
                        if let Ok(mut nodes) = self.nodes.lock() {
                            if let Some(n) = nodes.get_mut(&name).filter(|n| n.conn == conn_no) {
                                n.last_seen_ms = wall_ms();
                                n.instances = list;
                            }
                        }
                    }
                    Ok(Some(Frame::Pong { .. })) => heard = tokio::time::Instant::now(),
                    Ok(Some(Frame::TraceRows { rows })) => {
                        heard = tokio::time::Instant::now();
                        let waiter = self.nodes.lock().ok().and_then(|mut n| n.get_mut(&name).and_then(|s| s.traces.pop_front()));
                        if let Some(w) = waiter {
                            let _ = w.send(rows);
                        }
                    }
                    Ok(Some(Frame::Renew { public_key })) => {
                        heard = tokio::time::Instant::now();
                        let reply = match tls::issue_for_key(&self.dir, &name, &public_key) {
                            Ok((cert, _)) => {
                                tracing::info!(node = %name, "certificate renewed");
                                Frame::Renewed { cert }
                            }
                            Err(e) => Frame::Refuse { reason: format!("renewal refused: {e}") },
                        };
                        if let Err(e) = write_frame(&mut cs, &reply).await { break e; }
                    }
                    Ok(Some(other)) => break format!("unexpected {} frame on the control connection", other.name()),
                    Ok(None) => break "the worker closed its control connection".to_owned(),
                    Err(e) => break e.to_string(),
                },
                _ = tick.tick() => {
                    if heard.elapsed() > dead {
                        break format!("silent for {} ms", heard.elapsed().as_millis());
                    }
                    if let Err(e) = write_frame(&mut cs, &Frame::Ping { nonce: 0 }).await { break e; }
                }
            }
        };
        if let Ok(mut nodes) = self.nodes.lock() {
            if let Some(n) = nodes.get_mut(&name).filter(|n| n.conn == conn_no) {
                n.connected = false;
                n.tx = None;
            }
        }
        tracing::warn!(node = %name, "node lost: {why}");
        why
    }

    /// Revokes node `name`: its certificate goes on the revocation list, which this master loads at once and sends
    /// to every node; its control connection and links are closed.
    ///
    /// # Errors
    /// Nothing was issued for `name` here.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let pem = tls::revoke(&self.dir, name).map_err(|e| e.to_string())?;
        self.fed.reload_tls().map_err(|e| e.to_string())?;
        let txs: Vec<tokio::sync::mpsc::Sender<Frame>> = {
            let Ok(mut nodes) = self.nodes.lock() else { return Err("state poisoned".into()) };
            if let Some(mut n) = nodes.remove(name) {
                n.tx = None;
            }
            nodes.values().filter_map(|n| n.tx.clone()).collect()
        };
        for tx in txs {
            let _ = tx.send(Frame::Crl { pem: pem.clone() }).await;
        }
        if let Ok(mut s) = self.stored.lock() {
            s.nodes.remove(name);
            s.generation += 1;
        }
        self.save();
        self.fed.disconnect(name);
        self.push_all().await.map(|_| ())
    }

    /// The archived hops of the chain of kanban `id` on every node (those that answer within 3 s), each row
    /// naming its node, in time order: a chain that crossed devices, whole.
    pub async fn trace(&self, data_dir: &Path, id: aion_runtime::KanbanId) -> Vec<crate::store::HopRow> {
        trace_chain(id, |id| async move { self.trace_round(data_dir, &id).await }).await
    }

    async fn trace_round(&self, data_dir: &Path, id: &str) -> Vec<crate::store::HopRow> {
        let mut rows = local_rows(data_dir, id, &self.name);
        let asks: Vec<(String, tokio::sync::oneshot::Receiver<String>)> = {
            let Ok(mut nodes) = self.nodes.lock() else { return rows };
            nodes
                .iter_mut()
                .filter_map(|(name, n)| {
                    let tx = n.tx.clone()?;
                    let (w, r) = tokio::sync::oneshot::channel();
                    tx.try_send(Frame::TraceQuery { id: id.to_owned() }).ok()?;
                    n.traces.push_back(w);
                    Some((name.clone(), r))
                })
                .collect()
        };
        for (name, r) in asks {
            match tokio::time::timeout(Duration::from_secs(3), r).await {
                Ok(Ok(json)) => {
                    let mut theirs: Vec<crate::store::HopRow> = serde_json::from_str(&json).unwrap_or_default();
                    for r in &mut theirs {
                        r.device.clone_from(&name);
                    }
                    rows.extend(theirs);
                }
                _ => tracing::warn!(node = %name, "no answer to a trace query within 3 s"),
            }
        }
        rows
    }

    /// The status of every node.
    pub async fn report(&self) -> ClusterReport {
        let local = (self.hooks.instances)().await;
        let generation = self.stored.lock().map(|s| s.generation).unwrap_or(0);
        let now = wall_ms();
        let mut nodes = vec![NodeReport {
            name: self.name.clone(),
            role: "master".into(),
            connected: true,
            last_seen_ms: Some(0),
            version: env!("CARGO_PKG_VERSION").into(),
            addr: self.fed.listen.map(|a| a.to_string()).unwrap_or_default(),
            instances: local,
        }];
        if let Ok(n) = self.nodes.lock() {
            for (name, s) in n.iter() {
                nodes.push(NodeReport {
                    name: name.clone(),
                    role: "worker".into(),
                    connected: s.connected,
                    last_seen_ms: (s.last_seen_ms > 0).then(|| now.saturating_sub(s.last_seen_ms)),
                    version: s.version.clone(),
                    addr: s.addr.clone(),
                    instances: s.instances.clone(),
                });
            }
        }
        ClusterReport { role: "master".into(), master: self.name.clone(), master_connected: true, generation, nodes }
    }
}

/// The hops of the chain of `id` in this node's archive (none without one).
/// The chain of kanban `id`, each round gathering the rows of an id from every device that answers: when they
/// all belong to one trace other than `id` (the id was a kanban of another device's part of the chain), gathered
/// again by that trace id; in time order.
pub(crate) async fn trace_chain<F, Fut>(id: aion_runtime::KanbanId, round: F) -> Vec<crate::store::HopRow>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Vec<crate::store::HopRow>>,
{
    let first = id.to_string();
    let mut rows = round(first.clone()).await;
    let traces: BTreeSet<String> = rows.iter().map(|r| r.trace_id.clone()).collect();
    if let Some(t) = traces.iter().next().filter(|t| traces.len() == 1 && **t != first) {
        rows = round(t.clone()).await;
    }
    rows.sort_by(|a, b| a.accepted_at.cmp(&b.accepted_at));
    rows
}

/// The rows of trace (or kanban) `id` in this device's archive, naming `device`.
pub(crate) fn local_rows(data_dir: &Path, id: &str, device: &str) -> Vec<crate::store::HopRow> {
    let mut rows = local_trace(data_dir, id);
    for r in &mut rows {
        r.device = device.to_owned();
    }
    rows
}

fn local_trace(data_dir: &Path, id: &str) -> Vec<crate::store::HopRow> {
    let path = crate::paths::Paths::new(data_dir).archive();
    let Some(kid) = aion_runtime::KanbanId::parse(id) else { return Vec::new() };
    if !path.is_file() {
        return Vec::new();
    }
    crate::store::query_trace(&path, kid).unwrap_or_default()
}

/// The assignment frame of `node`.
fn assignment(
    project: &ServicesFile,
    master: &str,
    node: &str,
    addrs: &BTreeMap<String, String>,
    generation: u64,
) -> Option<Frame> {
    let cfg = placement::slice(project, master, node, addrs);
    let config = serde_json::to_string(&cfg).ok()?;
    Some(Frame::Assign { generation, config })
}

/// A worker's record of its master and of the assignment it runs (in its data dir).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct WorkerState {
    master_addr: String,
    master: String,
    generation: u64,
    config: Option<ServicesFile>,
}

fn worker_file(data_dir: &Path) -> PathBuf {
    ClusterDir::new(data_dir).root.join("worker.json")
}

/// Joins the cluster of the master at `join` with `token` as `name` (once: the certificate is kept in the data dir
/// and used from then on). Returns the master's name.
///
/// # Errors
/// A bad token, a master that is not the token's, a refusal (the reason given by the master), or no answer.
pub async fn join(data_dir: &Path, join: &str, token: &str, name: &str) -> Result<String, String> {
    let dir = ClusterDir::new(data_dir);
    let t = tls::Token::parse(token).map_err(|e| e.to_string())?;
    tls::check_name(name).map_err(|e| e.to_string())?;
    let (key, public_key) = tls::new_key().map_err(|e| e.to_string())?;
    let to = tokio::net::lookup_host(join)
        .await
        .map_err(|e| format!("cannot resolve {join}: {e}"))?
        .next()
        .ok_or_else(|| format!("{join} resolves to no address"))?;
    let mut ep =
        quinn::Endpoint::client(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(|e| format!("{e}"))?)
            .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    ep.set_default_client_config(tls::join_client(&t.pin).map_err(|e| e.to_string())?);
    let conn = tokio::time::timeout(Duration::from_secs(10), ep.connect(to, &t.master).map_err(|e| e.to_string())?)
        .await
        .map_err(|_| format!("no answer from {join} within 10 s"))?
        .map_err(|e| format!("cannot join the master at {join}: {e}"))?;
    let (mut cs, mut cr) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut cs, &Frame::Join { id: t.id, secret: t.secret, name: name.to_owned(), public_key }).await?;
    let mut dec = FrameDecoder::default();
    let reply = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut cr, &mut dec))
        .await
        .map_err(|_| "the master did not answer the join".to_owned())??;
    conn.close(quinn::VarInt::from_u32(0), b"joined");
    ep.wait_idle().await;
    match reply {
        Some(Frame::Joined { cert, ca, crl, master }) => {
            let id = tls::Identity { name: name.to_owned(), cert, key, ca };
            tls::install(&dir, &id).map_err(|e| e.to_string())?;
            if !crl.is_empty() {
                std::fs::write(dir.crl(), crl).map_err(|e| format!("{}: {e}", dir.crl().display()))?;
            }
            let st = WorkerState { master_addr: join.to_owned(), master: master.clone(), ..WorkerState::default() };
            write_json(&worker_file(data_dir), &st)?;
            Ok(master)
        }
        Some(Frame::Refuse { reason }) => Err(format!("the master refused the join: {reason}")),
        Some(_) => Err("the master answered the join with something else".into()),
        None => Err("the master closed the connection".into()),
    }
}

/// What a worker knows at start: its master and the configuration it last ran.
pub fn worker_start(data_dir: &Path, name: &str) -> Option<(String, String, ServicesFile)> {
    let st: WorkerState = read_json(&worker_file(data_dir))?;
    let cfg =
        st.config.clone().unwrap_or_else(|| ServicesFile { device_name: name.to_owned(), ..ServicesFile::default() });
    Some((st.master_addr, st.master, cfg))
}

/// A worker's view for `aion status`.
pub struct WorkerView {
    /// The master's name.
    pub master: String,
    connected: std::sync::atomic::AtomicBool,
    generation: AtomicU64,
}

impl WorkerView {
    /// The worker's part of `aion status`.
    pub fn report(&self) -> ClusterReport {
        ClusterReport {
            role: "worker".into(),
            master: self.master.clone(),
            master_connected: self.connected.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            nodes: Vec::new(),
        }
    }
}

/// Runs a worker's control connection to its master for good: attach, run what is assigned (kept in the data
/// dir), report the instances every second; reconnects after a loss.
pub fn run_worker(
    data_dir: PathBuf,
    fed: Arc<Federation>,
    hooks: NodeHooks,
    join: String,
    master: String,
    dead_after: Duration,
) -> (Arc<WorkerView>, impl std::future::Future<Output = String> + Send) {
    let st: WorkerState = read_json(&worker_file(&data_dir)).unwrap_or_default();
    let view = Arc::new(WorkerView {
        master: master.clone(),
        connected: Default::default(),
        generation: AtomicU64::new(st.generation),
    });
    let v = view.clone();
    let fut = async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            let why = worker_session(&data_dir, &fed, &hooks, &join, &master, &v, dead_after).await;
            v.connected.store(false, Ordering::Relaxed);
            tracing::warn!(master = %master, "control connection to the master lost: {why}; running the last assignment meanwhile");
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    };
    (view, fut)
}

async fn worker_session(
    data_dir: &Path,
    fed: &Federation,
    hooks: &NodeHooks,
    join: &str,
    master: &str,
    view: &WorkerView,
    dead_after: Duration,
) -> String {
    let to = match tokio::net::lookup_host(join).await.ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => return format!("cannot resolve {join}"),
    };
    let conn = match fed.dial(to, master).await {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let (mut cs, mut cr) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let listen = fed.listen.map(|a| a.to_string()).unwrap_or_default();
    let attach = Frame::Attach {
        min: CONTROL_MIN,
        max: CONTROL_MAX,
        name: fed.me.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        listen,
        generation: view.generation.load(Ordering::Relaxed),
    };
    if let Err(e) = write_frame(&mut cs, &attach).await {
        return e;
    }
    view.connected.store(true, Ordering::Relaxed);
    tracing::info!(master, "attached to the master");
    let mut dec = FrameDecoder::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut heard = tokio::time::Instant::now();
    let dir = ClusterDir::new(data_dir);
    // A certificate close to its expiry is renewed on a new key (which never leaves this node).
    let mut renewing: Option<String> = None;
    if tls::expires_in(&dir).is_some_and(|s| s < tls::RENEW_BEFORE_SECS) {
        match tls::new_key() {
            Ok((key, public_key)) => {
                if write_frame(&mut cs, &Frame::Renew { public_key }).await.is_ok() {
                    renewing = Some(key);
                }
            }
            Err(e) => tracing::error!("cannot make a key to renew the certificate: {e}"),
        }
    }
    let why = loop {
        tokio::select! {
            r = read_frame(&mut cr, &mut dec) => match r {
                Ok(Some(Frame::Assign { generation, config })) => {
                    heard = tokio::time::Instant::now();
                    let mut cfg: ServicesFile = match serde_json::from_str(&config) {
                        Ok(c) => c,
                        Err(e) => break format!("unreadable assignment: {e}"),
                    };
                    // The master is where this worker reached it.
                    if let Some(d) = cfg.devices.get_mut(master) {
                        d.addr = join.to_owned();
                    }
                    let st = WorkerState { master_addr: join.to_owned(), master: master.to_owned(), generation, config: Some(cfg.clone()) };
                    if let Err(e) = write_json(&worker_file(data_dir), &st) {
                        tracing::error!("assignment not kept: {e}");
                    }
                    match (hooks.apply)(cfg).await {
                        Ok(c) => {
                            view.generation.store(generation, Ordering::Relaxed);
                            if !c.is_empty() {
                                tracing::info!(generation, added = ?c.added, changed = ?c.changed, removed = ?c.removed, "assignment applied");
                            }
                        }
                        Err(e) => tracing::error!(generation, "assignment not applied: {e}"),
                    }
                }
                Ok(Some(Frame::Crl { pem })) => {
                    heard = tokio::time::Instant::now();
                    let dir = ClusterDir::new(data_dir);
                    match std::fs::write(dir.crl(), pem) {
                        Ok(()) => if let Err(e) = fed.reload_tls() { tracing::error!("revocation list not loaded: {e}") },
                        Err(e) => tracing::error!("revocation list not kept: {e}"),
                    }
                }
                Ok(Some(Frame::Ping { .. })) => heard = tokio::time::Instant::now(),
                Ok(Some(Frame::TraceQuery { id })) => {
                    heard = tokio::time::Instant::now();
                    let rows = serde_json::to_string(&local_trace(data_dir, &id)).unwrap_or_else(|_| "[]".into());
                    if let Err(e) = write_frame(&mut cs, &Frame::TraceRows { rows }).await { break e; }
                }
                Ok(Some(Frame::Renewed { cert })) => {
                    heard = tokio::time::Instant::now();
                    if let Some(key) = renewing.take() {
                        match tls::install_renewed(&dir, &cert, &key) {
                            Ok(()) => {
                                tracing::info!("certificate renewed");
                                if let Err(e) = fed.reload_tls() { tracing::error!("renewed certificate not loaded: {e}") }
                            }
                            Err(e) => tracing::error!("renewed certificate not kept: {e}"),
                        }
                    }
                }
                Ok(Some(Frame::Refuse { reason })) if renewing.is_some() => {
                    renewing = None;
                    tracing::error!("{reason}");
                }
                Ok(Some(Frame::Refuse { reason })) => break format!("refused: {reason}"),
                Ok(Some(other)) => break format!("unexpected {} frame from the master", other.name()),
                Ok(None) => break "the master closed the control connection".to_owned(),
                Err(e) => break e.to_string(),
            },
            _ = tick.tick() => {
                if heard.elapsed() > dead_after {
                    break format!("master silent for {} ms", heard.elapsed().as_millis());
                }
                let instances = serde_json::to_string(&(hooks.instances)().await).unwrap_or_else(|_| "[]".into());
                if let Err(e) = write_frame(&mut cs, &Frame::Report { instances }).await { break e; }
            }
        }
    };
    conn.close(quinn::VarInt::from_u32(0), b"control connection ended");
    why
}
