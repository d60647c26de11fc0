//! Cluster mode: federation links between devices over QUIC with mutual TLS (`docs/cluster.md`).
//!
//! ```text
//!   root supervisor
//!   └── federation (one-for-one)
//!       ├── federation-listener   accepts links from peers (receiving side), when this device listens
//!       ├── send-anything         housekeeping of file transfers (`files`)
//!       └── federation-links      one link per peer device with routes to it (dials it, sends its outboxes
//!                                 and the files their kanbans name), restarted when it fails, replaced when
//!                                 its routes or address change
//! ```
//!
//! A kanban for a service on another device goes to the outbox of that route (a slot like an instance's queue,
//! durable in the store under `QueueKey::Outbox`), so everything a local queue promises holds while the device
//! is unreachable: bounded, back-pressure, kept across restarts. The link to the device takes from its outboxes
//! like a session takes from an instance's queue, and acknowledges to them only when the receiving device has
//! committed the kanbans. The protocol is the sans-IO machine of `aion_transport::federation`; this module only
//! moves its frames over quinn. A connection's first frame may also be a request ([`Frame::Ask`]): an admin
//! identity's control request, or a peer's trace query, answered by the node's control handler.

pub mod files;
mod inbound;
mod outbound;
pub mod tls;

pub use crate::control::{DeviceReport, FederationReport};
use crate::routing::Router;
use aion_runtime::actor::supervisor::{ChildSpec, Intensity, Restart, Strategy, Supervisor};
use aion_runtime::task::Tasks;
use aion_transport::federation::{Dedup, Frame, Timing, DEFAULT_WINDOW};
use aion_transport::FrameDecoder;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The UDP port federation links use when `devices.<name>.addr` gives none.
pub const DEFAULT_PORT: u16 = 11030;

/// How to federate.
#[derive(Debug, Clone)]
pub struct FederationOptions {
    /// Accept links from peers on this address (UDP). `None`: only dial.
    pub listen: Option<SocketAddr>,
    /// Heartbeats.
    pub timing: Timing,
    /// Credit window of the links this device accepts.
    pub window: u32,
    /// Outboxes to a device unreachable for longer than this are emptied into dead letters (`expired`).
    pub max_age: Option<Duration>,
    /// Bytes of partial files each device may have here at once (Send Anything).
    pub transfer_quota: u64,
}

/// Default [`FederationOptions::transfer_quota`]: 16 GiB.
pub const DEFAULT_TRANSFER_QUOTA: u64 = 16 << 30;

impl Default for FederationOptions {
    fn default() -> Self {
        FederationOptions {
            listen: None,
            timing: Timing::default(),
            window: DEFAULT_WINDOW,
            max_age: None,
            transfer_quota: DEFAULT_TRANSFER_QUOTA,
        }
    }
}

/// A link's state, as shown by `aion status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "why")]
pub enum LinkState {
    /// Nothing to send there (no route to that device).
    Idle,
    /// Dialling.
    Connecting,
    /// Open.
    Up,
    /// Lost or unreachable; dialling again after a backoff.
    Down(String),
    /// The peer refused the link (a wrong certificate, a revoked one, a version mismatch).
    Refused(String),
}

/// Wall-clock milliseconds (for "last seen").
pub(crate) fn wall_ms() -> u64 {
    crate::store::now_ms().max(0) as u64
}

/// One peer device: the link to it, links from it, and their counters.
pub struct Peer {
    /// Its device name.
    pub name: String,
    /// Where it is dialled (`host:port`), if it has an address.
    addr: Mutex<Option<String>>,
    state: Mutex<LinkState>,
    /// When the peer was last heard on either link (wall ms; 0: never).
    pub last_heard: AtomicU64,
    /// Last measured round trip (µs; 0: none yet).
    pub rtt_us: AtomicU64,
    /// Kanbans sent (first time and again).
    pub sent: AtomicU64,
    /// Kanbans it acknowledged.
    pub acked: AtomicU64,
    /// Kanbans sent again after a cut.
    pub resent: AtomicU64,
    /// Connections opened to it.
    pub connects: AtomicU64,
    /// Links from it that are open now.
    pub inbound_open: AtomicU64,
    /// Kanbans received from it.
    pub received: AtomicU64,
    /// Kanbans received from it again (recognised, not taken twice).
    pub duplicates: AtomicU64,
    /// What it sent that could not be delivered here (dead letters here, with their reason).
    pub undeliverable: AtomicU64,
    /// Kanbans taken from it recently (across its connections), and the lock that makes one of its links
    /// deliver at a time.
    dedup: tokio::sync::Mutex<Dedup>,
    /// Ends its links from here (revoked).
    kick: tokio::sync::Notify,
    /// When the link to it was last up (wall ms; at first, when this runtime started).
    pub last_up: AtomicU64,
    /// The master the link to it goes through, when it is unreachable directly.
    pub via: Mutex<Option<String>>,
    /// Kanbans dead-lettered `expired` for it.
    pub expired: AtomicU64,
}

impl Peer {
    fn new(name: &str, addr: Option<String>, window: u32) -> Peer {
        Peer {
            name: name.to_owned(),
            addr: Mutex::new(addr),
            state: Mutex::new(LinkState::Idle),
            last_heard: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            inbound_open: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
            dedup: tokio::sync::Mutex::new(Dedup::new(2 * window as usize)),
            kick: tokio::sync::Notify::new(),
            last_up: AtomicU64::new(wall_ms()),
            via: Mutex::new(None),
            expired: AtomicU64::new(0),
        }
    }

    fn set_state(&self, s: LinkState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }

    /// The outbound link's state.
    pub fn state(&self) -> LinkState {
        self.state.lock().map(|g| g.clone()).unwrap_or(LinkState::Idle)
    }

    fn heard(&self) {
        self.last_heard.store(wall_ms(), Ordering::Relaxed);
    }

    /// Where it is dialled.
    pub fn addr(&self) -> Option<String> {
        self.addr.lock().ok().and_then(|a| a.clone())
    }
}

/// Links refused, by reason (`tls`, `unknown-device`, `wrong-name`, `version`, `protocol`, `not-for-us`).
#[derive(Default)]
pub struct Refusals(Mutex<BTreeMap<&'static str, u64>>);

impl Refusals {
    fn count(&self, reason: &'static str) {
        if let Ok(mut g) = self.0.lock() {
            *g.entry(reason).or_default() += 1;
        }
    }

    /// The counts.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|g| g.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()).unwrap_or_default()
    }
}

/// The federation of this device with its peers.
pub struct Federation {
    /// This device's name (the name in its certificate).
    pub me: String,
    /// Peer devices by name (those of the current configuration).
    peers: std::sync::RwLock<BTreeMap<String, Arc<Peer>>>,
    /// The address links are accepted on.
    pub listen: Option<SocketAddr>,
    /// Links refused, by reason.
    pub refused: Refusals,
    opts: FederationOptions,
    endpoint: quinn::Endpoint,
    router: Arc<Router>,
    /// Links and connections run as tasks of this set.
    tasks: Tasks,
    /// The actor that runs the links (once the subtree is built).
    links: std::sync::OnceLock<aion_runtime::actor::Addr<Links>>,
    /// How this device dials (replaced when the revocation list changes).
    client: Mutex<quinn::ClientConfig>,
    /// Cluster mode: this device is the master (it takes joins and its workers' control connections).
    pub(crate) master: std::sync::OnceLock<Arc<crate::cluster::Master>>,
    /// Cluster mode, on a worker: the master, through which links to unreachable devices are relayed.
    pub(crate) relay: std::sync::OnceLock<String>,
    /// Answers requests over the network ([`Frame::Ask`]): the node's control handler.
    pub(crate) admin: std::sync::OnceLock<AdminHook>,
    /// Send Anything: file transfers, their counters and progress.
    pub files: files::Files,
    data_dir: std::path::PathBuf,
}

/// The node's control handler, for requests over the network: a request line in, a reply line out.
pub type AdminHook =
    Arc<dyn Fn(Vec<u8>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> + Send + Sync>;

/// How long a request over the network may take (dial, ask, answer).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a control request to the runtime at `addr` over QUIC with the identity in `data_dir` (an admin
/// identity, `aion cluster issue NAME --admin`), and returns its reply line. `name` is the device expected at
/// `addr` (its certificate must name it).
///
/// # Errors
/// No identity, unreachable, refused, or no answer in time.
pub async fn ask(data_dir: &std::path::Path, addr: &str, name: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
    let dir = tls::ClusterDir::new(data_dir);
    let t = tls::load(&dir, &aion_transport::federation::Timing::default()).map_err(|e| e.to_string())?;
    let to = resolve(&dial_addr(addr)).await?;
    let bind = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let mut ep = quinn::Endpoint::client(bind.parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    ep.set_default_client_config(t.client);
    let connect = async {
        ep.connect(to, name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("cannot connect to {name} at {to}: {e}"))
    };
    let r = ask_on(connect, &t.name, name, request).await;
    ep.wait_idle().await;
    r
}

/// The first address `addr` resolves to.
pub(crate) async fn resolve(addr: &str) -> Result<std::net::SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

/// One request on the connection `connect` makes, within [`ASK_TIMEOUT`]: [`Frame::Ask`] (as `from`) out,
/// [`Frame::Answer`] back from `to`; the connection is closed after.
async fn ask_on(
    connect: impl std::future::Future<Output = Result<quinn::Connection, String>>,
    from: &str,
    to: &str,
    request: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let exchange = async {
        let conn = connect.await?;
        let answer = async {
            let (mut cs, mut cr) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut cs, &Frame::Ask { from: from.to_owned(), request }).await?;
            let _ = cs.finish();
            match read_frame(&mut cr, &mut FrameDecoder::default()).await {
                Ok(Some(Frame::Answer { reply })) => Ok(reply),
                Ok(Some(Frame::Refuse { reason })) => Err(format!("refused: {reason}")),
                Ok(Some(other)) => Err(format!("answered with a {} frame", other.name())),
                Ok(None) => Err("the connection closed without an answer".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        .await;
        conn.close(quinn::VarInt::from_u32(0), b"answered");
        answer
    };
    tokio::time::timeout(ASK_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {to} within {}s", ASK_TIMEOUT.as_secs()))?
}

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The TLS handshake failed: a certificate one side refuses (revoked, another CA, another name).
    #[error("{0}")]
    Refused(String),
    /// Unreachable, or no answer.
    #[error("{0}")]
    Down(String),
}

/// Errors starting the federation.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The identity does not match the configuration.
    #[error("{0}")]
    Config(String),
    /// The UDP socket.
    #[error("cannot listen on {0} (UDP): {1}")]
    Bind(String, std::io::Error),
}

/// `host[:port]` → `host:port` (the default port when none is given).
fn dial_addr(addr: &str) -> String {
    let a = addr.trim();
    if a.parse::<SocketAddr>().is_ok() {
        return a.to_owned();
    }
    if a.parse::<std::net::IpAddr>().is_ok() {
        // A bare IPv6 address needs brackets.
        return if a.contains(':') { format!("[{a}]:{DEFAULT_PORT}") } else { format!("{a}:{DEFAULT_PORT}") };
    }
    match a.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => a.to_owned(),
        _ => format!("{a}:{DEFAULT_PORT}"),
    }
}

impl Federation {
    /// Loads this device's identity from `data_dir`, binds the QUIC endpoint (before anything starts, so a
    /// taken port is a clear error at start), and prepares a peer for each device in the configuration.
    ///
    /// # Errors
    /// No identity, an identity for another name, or a socket that cannot be bound.
    pub fn new(
        data_dir: &std::path::Path,
        router: Arc<Router>,
        opts: FederationOptions,
        tasks: Tasks,
    ) -> Result<Federation, FederationError> {
        let cfg = router.config().clone();
        let tls = tls::load(&tls::ClusterDir::new(data_dir), &opts.timing)?;
        if tls.name != cfg.device_name {
            return Err(FederationError::Config(format!(
                "this device is `{}` (deviceName), but its certificate names `{}`: issue one for `{}` or set deviceName",
                cfg.device_name, tls.name, cfg.device_name
            )));
        }
        let bind = opts.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let socket = std::net::UdpSocket::bind(bind).map_err(|e| FederationError::Bind(bind.to_string(), e))?;
        let listen = opts.listen.and_then(|_| socket.local_addr().ok());
        let server = opts.listen.map(|_| tls.server);
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
            .map_err(|e| FederationError::Bind(bind.to_string(), e))?;
        let f = Federation {
            me: cfg.device_name.clone(),
            peers: Default::default(),
            listen,
            refused: Refusals::default(),
            opts,
            endpoint,
            router,
            tasks,
            links: std::sync::OnceLock::new(),
            client: Mutex::new(tls.client),
            master: std::sync::OnceLock::new(),
            relay: std::sync::OnceLock::new(),
            admin: std::sync::OnceLock::new(),
            files: files::Files::default(),
            data_dir: data_dir.to_owned(),
        };
        f.files.partial_quota.store(f.opts.transfer_quota, Ordering::Relaxed);
        f.update_peers();
        Ok(f)
    }

    /// The peers of the current configuration: new devices added, addresses updated, devices gone removed.
    fn update_peers(&self) {
        let cfg = self.router.config();
        let Ok(mut peers) = self.peers.write() else { return };
        peers.retain(|name, _| cfg.devices.contains_key(name) && *name != cfg.device_name);
        for (name, d) in cfg.devices.iter().filter(|(name, _)| **name != cfg.device_name) {
            let addr = (!d.addr.trim().is_empty()).then(|| dial_addr(&d.addr));
            match peers.get(name) {
                Some(p) => {
                    if let Ok(mut a) = p.addr.lock() {
                        *a = addr;
                    }
                }
                None => {
                    peers.insert(name.clone(), Arc::new(Peer::new(name, addr, self.opts.window)));
                }
            }
        }
    }

    /// Dials device `name` at `to` (mutual TLS: its certificate must name it).
    ///
    /// # Errors
    /// Why no connection was made: [`DialError::Refused`] when the handshake failed (a certificate one side does
    /// not take), [`DialError::Down`] otherwise.
    pub async fn dial(&self, to: SocketAddr, name: &str) -> Result<quinn::Connection, DialError> {
        let cfg = self.client.lock().map_err(|_| DialError::Down("client config poisoned".to_owned()))?.clone();
        let connecting =
            self.endpoint.connect_with(cfg, to, name).map_err(|e| DialError::Down(format!("cannot dial {to}: {e}")))?;
        let dead = Duration::from_micros(self.opts.timing.dead_after);
        match tokio::time::timeout(dead, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e @ (quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_)))) => {
                Err(DialError::Refused(format!("handshake with {name} at {to} failed: {e}")))
            }
            Ok(Err(e)) => Err(DialError::Down(format!("cannot connect to {name} at {to}: {e}"))),
            Err(_) => Err(DialError::Down(format!("no answer from {to} within {}s", dead.as_secs()))),
        }
    }

    /// Asks peer device `name` (dialled at its address) a control request; its reply line.
    ///
    /// # Errors
    /// It has no address, cannot be reached, refuses, or does not answer in time.
    pub async fn ask_peer(&self, name: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let addr = self.peer(name).and_then(|p| p.addr()).ok_or_else(|| format!("{name} has no address to dial"))?;
        let connect = async { self.dial(resolve(&addr).await?, name).await.map_err(|e| e.to_string()) };
        ask_on(connect, &self.me, name, request).await
    }

    /// The archived hops of kanban `id`'s chain here and on every peer device this one can dial (those that
    /// answer within [`ASK_TIMEOUT`]), each row naming its device, in time order: a chain across peer devices,
    /// whole, without a master.
    pub async fn trace(&self, data_dir: &std::path::Path, id: aion_runtime::KanbanId) -> Vec<crate::store::HopRow> {
        crate::cluster::trace_chain(id, |id| async move {
            let mut rows = crate::cluster::local_rows(data_dir, &id, &self.me);
            let env = crate::control::Envelope {
                request: crate::control::Request::Trace { id: id.clone(), local: true },
                deadline_ms: None,
            };
            let Ok(line) = serde_json::to_vec(&env) else { return rows };
            let peers: Vec<String> =
                self.peers().iter().filter(|p| p.addr().is_some()).map(|p| p.name.clone()).collect();
            let asks = peers.iter().map(|p| self.ask_peer(p, line.clone()));
            for (name, reply) in peers.iter().zip(futures::future::join_all(asks).await) {
                let theirs = reply.and_then(|r| crate::control::parse_reply(&r, name)).and_then(|v| {
                    serde_json::from_value::<Vec<crate::store::HopRow>>(v["rows"].clone()).map_err(|e| e.to_string())
                });
                match theirs {
                    Ok(mut theirs) => {
                        for r in &mut theirs {
                            r.device.clone_from(name);
                        }
                        rows.extend(theirs);
                    }
                    Err(e) => tracing::warn!(device = %name, "no trace rows from {name}: {e}"),
                }
            }
            rows
        })
        .await
    }

    /// Answers requests over the network with `hook` (the node's control handler).
    pub fn set_admin(&self, hook: AdminHook) {
        let _ = self.admin.set(hook);
    }

    /// Loads the certificates again (a new revocation list): new connections, both ways, use them.
    ///
    /// # Errors
    /// The certificates cannot be loaded.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        let t = tls::load(&tls::ClusterDir::new(&self.data_dir), &self.opts.timing)?;
        if self.listen.is_some() {
            self.endpoint.set_server_config(Some(t.server));
        }
        if let Ok(mut c) = self.client.lock() {
            *c = t.client;
        }
        tracing::info!("cluster certificates and revocation list loaded");
        Ok(())
    }

    /// Closes the links from device `name` (it was revoked).
    pub fn disconnect(&self, name: &str) {
        if let Some(p) = self.peer(name) {
            p.kick.notify_waiters();
        }
    }

    /// A peer device by name.
    pub fn peer(&self, name: &str) -> Option<Arc<Peer>> {
        self.peers.read().ok()?.get(name).cloned()
    }

    /// Every peer device.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.read().map(|p| p.values().cloned().collect()).unwrap_or_default()
    }

    /// The router has a new configuration: peers and links follow it (a link whose routes or address changed
    /// is replaced; its kanbans in flight go back to their outboxes and are sent again, recognised by the peer).
    pub fn reconfigure(&self) {
        self.update_peers();
        if let Some(l) = self.links.get() {
            let _ = l.try_send(LinksMsg::Sync);
        }
    }

    /// The federation's subtree: the listener (when listening) and the links.
    pub fn supervisor(self: &Arc<Self>) -> Supervisor {
        let tasks = &self.tasks;
        let mut sup = Supervisor::new(
            "federation",
            Strategy::OneForOne,
            Intensity { max_restarts: 20, within: Duration::from_secs(10) },
        );
        if self.listen.is_some() {
            let (f, t) = (self.clone(), tasks.clone());
            let (spec, _) = ChildSpec::actor("federation-listener", Restart::Permanent, 4, move || {
                crate::runner::Runner::new(t.clone(), inbound::accept_loop(f.clone()))
            });
            sup = sup.child(spec);
        }
        // Send Anything's housekeeping: partial transfers nobody resumed, and old records of transfers done.
        let (root, t) = (self.data_dir.clone(), tasks.clone());
        let (spec, _) = ChildSpec::actor("send-anything", Restart::Permanent, 4, move || {
            crate::runner::Runner::new(t.clone(), files::housekeeping(root.clone()))
        });
        sup = sup.child(spec);
        let f = self.clone();
        let (spec, addr) = ChildSpec::actor("federation-links", Restart::Permanent, 64, move || Links {
            f: f.clone(),
            running: HashMap::new(),
            next_gen: 0,
        });
        let _ = self.links.set(addr);
        sup.child(spec)
    }

    /// The status report.
    pub fn report(&self) -> FederationReport {
        let now = wall_ms();
        let devices = self
            .peers()
            .iter()
            .map(|p| {
                let routes = self.router.outboxes_to(&p.name);
                let (state, why) = match p.state() {
                    LinkState::Idle => ("idle", String::new()),
                    LinkState::Connecting => ("connecting", String::new()),
                    LinkState::Up => ("up", String::new()),
                    LinkState::Down(w) => ("down", w),
                    LinkState::Refused(w) => ("refused", w),
                };
                let heard = p.last_heard.load(Ordering::Relaxed);
                let rtt = p.rtt_us.load(Ordering::Relaxed);
                DeviceReport {
                    name: p.name.clone(),
                    addr: p.addr().unwrap_or_default(),
                    state: state.to_owned(),
                    why,
                    last_seen_ms: (heard > 0).then(|| now.saturating_sub(heard)),
                    rtt_us: (rtt > 0).then_some(rtt),
                    outbox: routes.iter().map(|s| s.depth() + s.inflight()).sum(),
                    in_flight: routes.iter().map(|s| s.inflight()).sum(),
                    oldest_in_flight_ms: routes
                        .iter()
                        .filter_map(|s| s.oldest_inflight_age())
                        .max()
                        .map(|a| a.as_millis().min(u128::from(u64::MAX)) as u64),
                    sent: p.sent.load(Ordering::Relaxed),
                    acked: p.acked.load(Ordering::Relaxed),
                    resent: p.resent.load(Ordering::Relaxed),
                    inbound: p.inbound_open.load(Ordering::Relaxed),
                    received: p.received.load(Ordering::Relaxed),
                    duplicates: p.duplicates.load(Ordering::Relaxed),
                    undeliverable: p.undeliverable.load(Ordering::Relaxed),
                    expired: p.expired.load(Ordering::Relaxed),
                    files: self.files.report(&p.name),
                    via: p
                        .via
                        .lock()
                        .ok()
                        .and_then(|v| v.clone())
                        .filter(|_| matches!(p.state(), LinkState::Up))
                        .unwrap_or_default(),
                }
            })
            .collect();
        FederationReport {
            me: self.me.clone(),
            listen: self.listen.map(|a| a.to_string()).unwrap_or_default(),
            refused: self.refused.counts(),
            devices,
        }
    }

    /// Closes every link (shutdown).
    pub fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
    }
}

/// Runs one link per peer device that has routes from here, as owned tasks: started, replaced when its routes
/// or address change, started again (after a pause) when it fails. Its drop (the actor stopped or restarted)
/// aborts them; each link's drop guard puts its kanbans in flight back in their outboxes.
struct Links {
    f: Arc<Federation>,
    running: HashMap<String, LinkRun>,
    next_gen: u64,
}

struct LinkRun {
    /// The address and the routes it was started with.
    sig: (String, Vec<String>),
    gen: u64,
    task: tokio::task::AbortHandle,
}

/// What the links actor handles.
enum LinksMsg {
    /// Bring the links in line with the peers and the routes.
    Sync,
    /// A link ended (it failed or panicked).
    Ended { device: String, gen: u64, why: String },
}

impl Drop for Links {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

impl Links {
    fn sync(&mut self, ctx: &aion_runtime::actor::Context<Self>) {
        let peers = self.f.peers();
        let names: std::collections::HashSet<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        self.running.retain(|d, r| {
            let keep = names.contains(d.as_str());
            if !keep {
                r.task.abort();
            }
            keep
        });
        for peer in peers {
            let routes = self.f.router.outboxes_to(&peer.name);
            if routes.is_empty() {
                if let Some(r) = self.running.remove(&peer.name) {
                    r.task.abort();
                }
                peer.set_state(LinkState::Idle);
                continue;
            }
            let Some(addr) = peer.addr() else {
                if let Some(r) = self.running.remove(&peer.name) {
                    r.task.abort();
                }
                let why = format!("devices.{}.addr is not set: kanbans for it wait in its outbox", peer.name);
                tracing::warn!(device = %peer.name, "{why}");
                peer.set_state(LinkState::Down(why));
                continue;
            };
            let sig = (addr, routes.iter().map(|r| r.service.clone()).collect::<Vec<_>>());
            if self.running.get(&peer.name).is_some_and(|r| r.sig == sig) {
                continue;
            }
            if let Some(r) = self.running.remove(&peer.name) {
                r.task.abort();
            }
            self.next_gen += 1;
            let gen = self.next_gen;
            let name = peer.name.clone();
            let (f, me, device) = (self.f.clone(), ctx.addr(), peer.name.clone());
            let task = self.f.tasks.spawn("federation link", async move {
                use futures::FutureExt as _;
                let why = match std::panic::AssertUnwindSafe(outbound::run(f, peer, routes)).catch_unwind().await {
                    Ok(why) => why,
                    Err(p) => format!("panicked: {}", aion_runtime::actor::panic_message(&*p)),
                };
                let _ = me.send(LinksMsg::Ended { device, gen, why }).await;
            });
            self.running.insert(name, LinkRun { sig, gen, task });
        }
    }
}

impl aion_runtime::actor::Actor for Links {
    type Msg = LinksMsg;

    async fn started(&mut self, ctx: &mut aion_runtime::actor::Context<Self>) {
        self.sync(ctx);
    }

    async fn handle(&mut self, msg: LinksMsg, ctx: &mut aion_runtime::actor::Context<Self>) {
        match msg {
            LinksMsg::Sync => self.sync(ctx),
            LinksMsg::Ended { device, gen, why } => {
                if self.running.get(&device).is_some_and(|r| r.gen == gen) {
                    self.running.remove(&device);
                    tracing::error!(device = %device, "federation link ended, starting it again in 1 s: {why}");
                    let me = ctx.addr();
                    self.f.tasks.spawn("federation link restart", async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = me.send(LinksMsg::Sync).await;
                    });
                }
            }
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReadError {
    /// The peer sent bytes that are not a frame (a broken or hostile peer).
    #[error("malformed: {0}")]
    Malformed(String),
    /// The stream failed (connection lost, reset).
    #[error("{0}")]
    Io(String),
}

impl From<ReadError> for String {
    fn from(e: ReadError) -> String {
        e.to_string()
    }
}

/// Reads the next frame from a QUIC stream (`None` when the peer finished it). Cancel safe: bytes read stay
/// in `dec`.
pub(crate) async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<T>, ReadError> {
    use tokio::io::AsyncReadExt as _;
    loop {
        if let Some(f) = dec.decode::<T>().map_err(|e| ReadError::Malformed(e.to_string()))? {
            return Ok(Some(f));
        }
        let buf = dec.read_buffer(64 << 10);
        match recv.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e.to_string())),
        }
    }
}

/// The timer both ends of a link check their heartbeats on: four times a ping period (at least every 10 ms).
pub(crate) fn heartbeat_tick(timing: &Timing) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_micros(timing.ping_every / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Writes one frame (a link's [`Frame`], or a file stream's message).
pub(crate) async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, f: &T) -> Result<(), String> {
    let mut buf = Vec::new();
    aion_transport::codec::encode_into(f, &mut buf).map_err(|e| e.to_string())?;
    send.write_all(&buf).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_addresses_get_the_default_port() {
        assert_eq!(dial_addr("10.0.0.2"), "10.0.0.2:11030");
        assert_eq!(dial_addr("10.0.0.2:7000"), "10.0.0.2:7000");
        assert_eq!(dial_addr("::1"), "[::1]:11030");
        assert_eq!(dial_addr("[::1]:7000"), "[::1]:7000");
        assert_eq!(dial_addr("edge-2"), "edge-2:11030");
        assert_eq!(dial_addr("edge-2:7000"), "edge-2:7000");
    }
}
