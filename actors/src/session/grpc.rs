//! gRPC sessions: AION's kanban API (`kanbanpb.Kanban`) for unmodified AION microservices (Python and Go).
//!
//! One more kind of session on the session layer (see `docs/grpc.md`):
//! - `ReceiveKanban` opens a session on the instance's slot (with AION's seed kanban for
//!   `START_SERVICE_WITHOUT_KANBAN`) and streams its queue. AION's clients never acknowledge: a delivered kanban
//!   counts as acknowledged when the next one is written to the stream, or when the instance's terminate kanban
//!   arrives; a session that ends any other way gives its last kanban back to the front of the queue. The same
//!   sans-IO [`ServerSession`] counts what is in flight, with a window of 2.
//! - `SendKanban` is an output of the instance `microserviceName`-`processNumber` (AION's `kanban:after` key),
//!   routed like any output; it is answered once accepted (committed, for durable targets).
//! - The terminate kanban is not routed: it marks the instance terminated and ends its `ReceiveKanban` stream
//!   with OK (the Python library's `close()` waits for that).
//! - A newer `ReceiveKanban` for an instance replaces an older gRPC one (which ends with OK); a native session
//!   holding the instance refuses it (`FAILED_PRECONDITION`).
//! - Static kanbans map onto the runtime's static topics (non-destructive reads).

use crate::routing::dead::Reason;
use crate::session::link::{Machine, Release};
use crate::session::statics::{StaticEvent, Subscriber};
use crate::session::{accept_output, ack_wants_ids, acknowledge, open_session, requeue_start, Shared};
use aion_runtime::kanban::{KanbanId, WireKanban};
use aion_runtime::task::Tasks;
use aion_transport::grpc::kanbanpb::kanban_server::{Kanban as KanbanApi, KanbanServer};
use aion_transport::grpc::kanbanpb::{
    DeleteStaticRequest, InitializeService, InitializeType, Request as SendRequest, Response as SendResponse,
    ResponseStatus, StaticKanban, StaticRequest, StatusKanban, Topic,
};
use aion_transport::grpc::{kanban_from_status, status_from_kanban, terminate_target, MAX_GRPC_MESSAGE};
use aion_transport::session::ServerSession;
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How a gRPC session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The instance sent its terminate kanban: everything delivered is acknowledged; the stream ends with OK.
    Terminated,
    /// A newer `ReceiveKanban` for the instance: the last kanban goes back; the stream ends with OK.
    Replaced,
    /// The client went away: the last kanban goes back.
    Gone,
    /// The runtime is stopping: the last kanban goes back; the stream ends with `UNAVAILABLE`.
    Shutdown,
}

/// A live `ReceiveKanban` session, as the other calls see it.
struct Live {
    id: u64,
    end: Option<oneshot::Sender<End>>,
    /// Completed when the session has released its instance.
    released: watch::Receiver<bool>,
    /// The trace and hop count of the kanban it is handling (its outputs continue that chain).
    handling: Arc<Mutex<Option<(KanbanId, u32)>>>,
}

/// Counters of the gRPC endpoint, for status.
#[derive(Debug, Default)]
pub struct GrpcStats {
    /// `ReceiveKanban` sessions opened.
    pub sessions: AtomicU64,
    /// Outputs received (`SendKanban`).
    pub outputs: AtomicU64,
    /// Calls refused (unknown service, bad request, native session holding the instance…).
    pub refused: AtomicU64,
}

/// Who may speak for an instance on the endpoint (the Kubernetes backend's pod-network gate,
/// `backend::kube::auth`). Without one, whoever reaches the endpoint may (it listens on loopback by default).
pub trait Gate: Send + Sync {
    /// May a caller at `peer` with credential `token` act as `service`-`instance`?
    ///
    /// # Errors
    /// Why not (sent to the caller with `PERMISSION_DENIED`).
    fn admit(&self, service: &str, instance: u32, peer: Option<SocketAddr>, token: Option<&str>) -> Result<(), String>;

    /// May a caller use instance-less calls (static kanbans)? It must be one of `instances` (the project's).
    ///
    /// # Errors
    /// Why not.
    fn admit_any(
        &self,
        peer: Option<SocketAddr>,
        token: Option<&str>,
        instances: &[(String, u32)],
    ) -> Result<(), String>;
}

/// The credential a call carries: `authorization: Bearer <token>` or `aion-token: <token>`.
fn credential<T>(req: &Request<T>) -> Option<String> {
    let md = req.metadata();
    if let Some(v) = md.get("aion-token").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let auth = md.get("authorization").and_then(|v| v.to_str().ok())?;
    auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).map(|t| t.trim().to_owned())
}

/// The `kanbanpb.Kanban` service.
#[derive(Clone)]
pub struct GrpcKanban {
    gate: Option<Arc<dyn Gate>>,
    shared: Shared,
    tasks: Tasks,
    live: Arc<Mutex<HashMap<(String, u32), Live>>>,
    next: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
    stats: Arc<GrpcStats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `kanbanpb.Kanban` on `listener` until `stopping` turns true (then open streams end with
/// `UNAVAILABLE`).
pub(crate) async fn serve(
    shared: Shared,
    tasks: Tasks,
    listener: tokio::net::TcpListener,
    mut stopping: watch::Receiver<bool>,
    stats: Arc<GrpcStats>,
    gate: Option<Arc<dyn Gate>>,
) {
    let svc = GrpcKanban {
        gate,
        shared,
        tasks,
        live: Arc::default(),
        next: Arc::default(),
        stopping: stopping.clone(),
        stats,
    };
    // Requests up to 16 MiB are decoded so that one over gRPC's 4 MiB gets `RESOURCE_EXHAUSTED` from us (as
    // AION's grpc-go server answered), not tonic's `OUT_OF_RANGE`; beyond 16 MiB tonic refuses it unread.
    let server = KanbanServer::new(svc)
        .max_decoding_message_size(4 * MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let until = async move {
        while !*stopping.borrow_and_update() {
            if stopping.changed().await.is_err() {
                return;
            }
        }
    };
    let r = tonic::transport::Server::builder()
        // AION's clients ping every 10 s (Go, also when idle) and 20 s (Python): answered, never refused.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(server)
        .serve_with_incoming_shutdown(incoming, until)
        .await;
    if let Err(e) = r {
        tracing::error!("gRPC endpoint stopped: {e}");
    }
}

/// Binds the gRPC listener (before any instance starts).
///
/// # Errors
/// A one-line reason (the address is taken, not an address of this host…).
pub(crate) fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    crate::session::bind_tcp(
        addr,
        "AION's gRPC API",
        " (another aion, or AION's status-kanban, listens there; `aion run --grpc ADDR` picks another address, `--grpc off` turns the gRPC API off)",
    )
}

impl GrpcKanban {
    fn refuse(&self, s: Status) -> Status {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(code = ?s.code(), "gRPC call refused: {}", s.message());
        s
    }

    /// The gate's verdict on a call for `service`-`instance` (`None`: an instance-less call).
    fn admit<T>(&self, req: &Request<T>, claim: Option<(&str, u32)>) -> Result<(), Status> {
        self.admit_as(req.remote_addr(), credential(req), claim)
    }

    /// [`GrpcKanban::admit`] for a caller at `peer` with credential `token`.
    fn admit_as(
        &self,
        peer: Option<SocketAddr>,
        token: Option<String>,
        claim: Option<(&str, u32)>,
    ) -> Result<(), Status> {
        let Some(gate) = &self.gate else { return Ok(()) };
        let verdict = match claim {
            Some((s, n)) => gate.admit(s, n, peer, token.as_deref()),
            None => {
                let cfg = self.shared.router.config();
                let all: Vec<(String, u32)> = cfg
                    .microservices
                    .values()
                    .flat_map(|m| (1..=m.scale.max(1)).map(move |n| (m.name.clone(), n)))
                    .collect();
                gate.admit_any(peer, token.as_deref(), &all)
            }
        };
        verdict.map_err(|why| self.refuse(Status::permission_denied(why)))
    }

    fn not_found(&self, service: &str) -> Status {
        let cfg = self.shared.router.config();
        let mut known: Vec<&str> = cfg.microservices.keys().map(String::as_str).collect();
        known.sort_unstable();
        self.refuse(Status::not_found(format!("unknown service {service:?}; services here: {}", known.join(", "))))
    }

    /// Ends the live gRPC session of an instance, if any, and waits (at most 5 s) until it released it.
    async fn end_live(&self, key: &(String, u32), why: End) {
        let released = {
            let mut live = lock(&self.live);
            match live.get_mut(key) {
                Some(l) => {
                    if let Some(tx) = l.end.take() {
                        let _ = tx.send(why);
                    }
                    Some(l.released.clone())
                }
                None => None,
            }
        };
        if let Some(mut r) = released {
            let _ = tokio::time::timeout(Duration::from_secs(5), r.wait_for(|done| *done)).await;
        }
    }
}

type KanbanStream = ReceiverStream<Result<StatusKanban, Status>>;
type StaticStream = ReceiverStream<Result<StaticKanban, Status>>;

#[tonic::async_trait]
impl KanbanApi for GrpcKanban {
    type ReceiveKanbanStream = KanbanStream;
    type ReceiveStaticKanbanStream = StaticStream;

    async fn receive_kanban(&self, req: Request<InitializeService>) -> Result<Response<KanbanStream>, Status> {
        let peer = req.remote_addr();
        let init = req.get_ref();
        let service = init.microservice_name.clone();
        let instance = u32::try_from(init.process_number.max(1)).unwrap_or(1);
        self.admit(&req, Some((&service, instance)))?;
        let init = req.into_inner();
        let cfg = self.shared.router.config();
        let Some(ms) = cfg.microservices.get(&service) else {
            return Err(self.not_found(&service));
        };
        if instance > ms.scale.max(1) {
            let why = format!("service {service:?} has instances 1..={}, not {instance}", ms.scale.max(1));
            return Err(self.refuse(Status::not_found(why)));
        }
        if *self.stopping.borrow() {
            return Err(Status::unavailable("the runtime is shutting down"));
        }
        let key = (service.clone(), instance);
        // The newest gRPC session replaces an older one (after a network blip the old stream can look alive).
        self.end_live(&key, End::Replaced).await;
        let seed = init.init_type == InitializeType::StartServiceWithoutKanban as i32;
        let opened = open_session(&self.shared, &service, instance, 0, seed).map_err(|reason| {
            let code = if reason.contains("already has a session") {
                Status::failed_precondition(format!("{reason} (a native SDK session holds it)"))
            } else {
                Status::not_found(reason)
            };
            self.refuse(code)
        })?;
        opened.slot.set_session_kind(crate::routing::slot::SessionKind::Grpc);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service, instance, peer = ?peer, seed, "gRPC session opened");
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (end_tx, end_rx) = oneshot::channel();
        let (released_tx, released_rx) = watch::channel(false);
        let handling = Arc::new(Mutex::new(None));
        lock(&self.live)
            .insert(key.clone(), Live { id, end: Some(end_tx), released: released_rx, handling: handling.clone() });
        // Capacity 1: a kanban counts as written when the transport took the one before.
        let (tx, rx) = mpsc::channel(1);
        let session = StreamSession {
            shared: self.shared.clone(),
            opened,
            tx,
            end: end_rx,
            stopping: self.stopping.clone(),
            handling,
        };
        let live = self.live.clone();
        self.tasks.spawn("gRPC session", async move {
            session.run().await;
            let _ = released_tx.send(true);
            let mut l = lock(&live);
            if l.get(&key).is_some_and(|x| x.id == id) {
                l.remove(&key);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn send_kanban(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        // The caller acts as the producer `microserviceName`-`processNumber` (AION's `kanban:after` key), or as
        // the instance its terminate kanban names: the gate admits it as exactly that instance (below).
        let (peer, token) = (req.remote_addr(), credential(&req));
        let req = req.into_inner();
        let service = req.microservice_name;
        let Some(message) = req.message else {
            return Err(self.refuse(Status::invalid_argument("a SendKanban request without `message`")));
        };
        too_large(&message).map_err(|s| self.refuse(s))?;
        let cfg = self.shared.router.config();
        let Some(ms) = cfg.microservices.get(&service) else {
            return Err(self.not_found(&service));
        };
        let scale = ms.scale.max(1);
        let k = kanban_from_status(message);
        if let Some((name, number)) = terminate_target(&k) {
            let n = number.unwrap_or(k.process_number).clamp(1, scale);
            // Only the instance itself ends itself (a pod cannot terminate another instance).
            self.admit_as(peer, token.clone(), Some((&service, n)))?;
            let producer = k.process_number.clamp(1, scale);
            if producer != n {
                self.admit_as(peer, token, Some((&service, producer)))?;
            }
            if name.as_deref().is_some_and(|nm| nm != service) {
                let detail = format!("terminate kanban from {service} names service `{}`", name.unwrap_or_default());
                self.shared.router.dead_letter(Reason::BadTerminate, detail, Box::new(k.into_wire()));
                return Ok(Response::new(SendResponse {
                    status: ResponseStatus::Success as i32,
                    error: String::new(),
                }));
            }
            tracing::info!(service, instance = n, success = k.prior_success, "terminate kanban received (gRPC)");
            self.shared.router.terminated(&service, n).await;
            self.end_live(&(service, n), End::Terminated).await;
            return success();
        }
        // AION routed an output from `kanban:after:<service>:<processNumber>`: that instance produced it.
        let producer = k.process_number.clamp(1, scale);
        self.admit_as(peer, token, Some((&service, producer)))?;
        let Some(slot) = self.shared.router.slot(&service, producer) else {
            return Err(self.not_found(&service));
        };
        let handling = lock(&self.live).get(&(service.clone(), producer)).and_then(|l| *lock(&l.handling));
        let id = KanbanId::generate();
        let (trace, hops) = match handling {
            Some((trace, hops)) => (trace, hops.saturating_add(1)),
            None => (id, 0),
        };
        let mut w = k.into_wire();
        w.id = id;
        w.trace_id = trace;
        self.stats.outputs.fetch_add(1, Ordering::Relaxed);
        let persisted = accept_output(&self.shared, &slot, Box::new(w), hops).await;
        if persisted {
            if let Some(store) = self.shared.router.store() {
                store.barrier().await.map_err(|e| Status::unavailable(format!("store unavailable: {e}")))?;
            }
        }
        success()
    }

    async fn send_static_kanban(&self, req: Request<StaticRequest>) -> Result<Response<SendResponse>, Status> {
        self.admit(&req, None)?;
        let req = req.into_inner();
        let topic = req.topic.map(|t| t.name).unwrap_or_default();
        if topic.is_empty() {
            return Err(self.refuse(Status::invalid_argument("a static kanban without `topic.name`")));
        }
        if topic.len() > aion_transport::proto::MAX_TOPIC_BYTES {
            let why = format!(
                "static topic name of {} bytes (limit {})",
                topic.len(),
                aion_transport::proto::MAX_TOPIC_BYTES
            );
            return Err(self.refuse(Status::invalid_argument(why)));
        }
        let Some(message) = req.message else {
            return Err(self.refuse(Status::invalid_argument("a static kanban without `message`")));
        };
        too_large(&message).map_err(|s| self.refuse(s))?;
        let mut w = kanban_from_status(message).into_wire();
        w.id = KanbanId::generate();
        w.trace_id = w.id;
        if let Err(e) = w.check_size() {
            return Err(self.refuse(Status::resource_exhausted(e.to_string())));
        }
        self.shared.statics.put_durable(&topic, w).await;
        success()
    }

    async fn receive_static_kanban(&self, req: Request<Topic>) -> Result<Response<StaticStream>, Status> {
        self.admit(&req, None)?;
        let topic = req.into_inner().name;
        if topic.is_empty() || topic.len() > aion_transport::proto::MAX_TOPIC_BYTES {
            return Err(self.refuse(Status::invalid_argument("a topic name of 1 to 1024 bytes is needed")));
        }
        // Subscribed before the retained entries are read, so none falls between the two (ids only grow).
        let (ev_tx, mut ev_rx) = mpsc::channel::<StaticEvent>(1024);
        self.shared.statics.subscribe(&topic, Subscriber::Session(ev_tx));
        let retained = self.shared.statics.get(&topic);
        let (tx, rx) = mpsc::channel(16);
        let mut stopping = self.stopping.clone();
        self.tasks.spawn("gRPC static subscription", async move {
            let mut last = 0u64;
            for (id, k) in retained {
                last = last.max(id);
                if !send_static(&tx, id, &k).await {
                    return;
                }
            }
            loop {
                tokio::select! {
                    ev = ev_rx.recv() => match ev {
                        Some(StaticEvent { id, kanban, .. }) if id > last => {
                            last = id;
                            if !send_static(&tx, id, &kanban).await {
                                return;
                            }
                        }
                        Some(_) => {}
                        None => {
                            let _ = tx.send(Err(Status::unavailable("static subscription ended (too slow)"))).await;
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                    _ = stopped(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("the runtime is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delete_static_kanban(&self, req: Request<DeleteStaticRequest>) -> Result<Response<SendResponse>, Status> {
        self.admit(&req, None)?;
        let req = req.into_inner();
        let topic = req.topic.map(|t| t.name).unwrap_or_default();
        if topic.is_empty() {
            return Err(self.refuse(Status::invalid_argument("a delete without `topic.name`")));
        }
        // An id that is not one of ours names nothing: deleting nothing succeeds, as in AION.
        if let Ok(id) = req.id.trim().parse::<u64>() {
            self.shared.statics.delete_durable(&topic, id).await;
        }
        success()
    }
}

/// AION's `Response{status: SUCCESS}` (errors are gRPC statuses: a client never sees `FAILED` in a body).
fn success() -> Result<Response<SendResponse>, Status> {
    Ok(Response::new(SendResponse { status: ResponseStatus::Success as i32, error: String::new() }))
}

/// Refuses a kanban over gRPC's 4 MiB message limit.
fn too_large(m: &StatusKanban) -> Result<(), Status> {
    let n = m.encoded_len();
    if n > MAX_GRPC_MESSAGE {
        return Err(Status::resource_exhausted(format!(
            "a kanban of {n} bytes, over the 4 MiB limit of AION's gRPC API"
        )));
    }
    Ok(())
}

/// Completes once the runtime is stopping (or the signal is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn send_static(tx: &mpsc::Sender<Result<StaticKanban, Status>>, id: u64, k: &WireKanban) -> bool {
    let status = match status_from_kanban(k) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(id, "static kanban with undecodable metadata skipped: {e}");
            return true;
        }
    };
    tx.send(Ok(StaticKanban { id: id.to_string(), status_kanban: Some(status) })).await.is_ok()
}

/// One `ReceiveKanban` stream: the driver of a [`ServerSession`] whose acknowledgements are implicit.
struct StreamSession {
    shared: Shared,
    opened: crate::session::Opened,
    tx: mpsc::Sender<Result<StatusKanban, Status>>,
    end: oneshot::Receiver<End>,
    stopping: watch::Receiver<bool>,
    handling: Arc<Mutex<Option<(KanbanId, u32)>>>,
}

impl StreamSession {
    async fn run(mut self) {
        let slot = self.opened.slot.clone();
        let sess = self.opened.sess;
        // Window 2: the kanban written last, and the next one, taken when it comes and written, which
        // acknowledges the one before.
        let sm: Machine = Mutex::new(ServerSession::new(2));
        let mut release = Release::new(&slot, sess, &sm);
        let mut ks: Vec<Box<WireKanban>> = Vec::new();
        let end = 'session: loop {
            tokio::select! {
                biased;
                e = &mut self.end => break 'session e.unwrap_or(End::Replaced),
                _ = stopped(&mut self.stopping) => break 'session End::Shutdown,
                _ = self.tx.closed() => break 'session End::Gone,
                _ = slot.take(sess, 2, &mut ks) => {
                    if ks.is_empty() {
                        break 'session End::Replaced; // the slot has a newer session (or cut this one off)
                    }
                }
            }
            for k in ks.drain(..) {
                let status = match status_from_kanban(&k) {
                    Ok(s) if s.encoded_len() <= MAX_GRPC_MESSAGE - 64 => s,
                    other => {
                        // Never written: a gRPC client would fail the stream on it and get it again forever.
                        let why = match other {
                            Ok(s) => format!("{} bytes, over gRPC's 4 MiB message limit", s.encoded_len()),
                            Err(e) => format!("undecodable metadata: {e}"),
                        };
                        let detail = format!("queued for {}-{} (a gRPC session): {why}", slot.service, slot.instance);
                        let (id, bytes) = (k.id, k.mem_size());
                        self.shared.router.dead_letter(Reason::TooLarge, detail, k);
                        acknowledge(&self.shared, &slot, sess, 1, bytes, vec![id]).await;
                        continue;
                    }
                };
                let current = (k.trace_id, k.hops);
                lock(&sm).deliver(k);
                let sent = tokio::select! {
                    biased;
                    e = &mut self.end => Err(e.unwrap_or(End::Replaced)),
                    _ = stopped(&mut self.stopping) => Err(End::Shutdown),
                    r = self.tx.send(Ok(status)) => r.map_err(|_| End::Gone),
                };
                if let Err(e) = sent {
                    // Not written: it goes back with the session's end.
                    break 'session e;
                }
                *lock(&self.handling) = Some(current);
                // Written: the one before it is acknowledged.
                let done = {
                    let mut g = lock(&sm);
                    let n = g.in_flight().saturating_sub(1);
                    g.acknowledge_oldest(n)
                };
                self.ack(&done).await;
            }
        };
        if end == End::Terminated {
            // The service finished: what it was handling is done.
            let done = lock(&sm).acknowledge_oldest(usize::MAX);
            self.ack(&done).await;
        }
        let n = release.release();
        tracing::info!(service = %slot.service, instance = slot.instance, requeued = n, end = ?end, "gRPC session closed");
        if end == End::Gone {
            // An AION client whose stream broke reconnects within seconds, or is wedged (docs/grpc.md): the
            // broker restarts it if it does not come back.
            slot.grpc_lost();
        }
        if end == End::Shutdown {
            let _ = self.tx.send(Err(Status::unavailable("the runtime is shutting down"))).await;
        }
        // Dropping the sender ends the stream with OK (terminated, replaced).
        drop(self.tx);
        requeue_start(&self.shared.router, &slot).await;
    }

    #[allow(clippy::vec_box)]
    async fn ack(&self, done: &[Box<WireKanban>]) {
        if done.is_empty() {
            return;
        }
        let slot = &self.opened.slot;
        let ids = if ack_wants_ids(&self.shared, slot) { done.iter().map(|k| k.id).collect() } else { Vec::new() };
        let bytes = done.iter().map(|k| k.mem_size()).sum();
        acknowledge(&self.shared, slot, self.opened.sess, done.len(), bytes, ids).await;
    }
}
