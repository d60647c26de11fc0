//! The status-kanban endpoint: the actor that owns the Unix socket microservices connect to, and the session
//! logic (handshake, credit-based delivery, acks, output routing, static kanbans).

pub mod direct;
pub mod statics;

use crate::routing::slot::Slot;
use crate::routing::Router;
use crate::session::statics::StaticStore;
use aion_runtime::actor::{Actor, Context};
use aion_runtime::kanban::{Kanban, KanbanId, Origin, WireKanban};
use aion_transport::proto::{DeliverRef, MAGIC};
use aion_transport::{unix_split, ClientMsg, LinkReader, LinkWriter, ServerMsg, PROTOCOL_VERSION};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The server side of a link.
pub type ServerLink = (LinkReader<ClientMsg>, LinkWriter<ServerMsg>);

/// Messages of the endpoint actor.
pub enum EndpointMsg {
    /// Serve an in-process service's link.
    Attach(ServerLink),
    /// Open a direct session for an in-process service instance (see [`crate::direct`]).
    AttachDirect {
        /// Service.
        service: String,
        /// Instance.
        instance: u32,
        /// The session, or why it was refused.
        reply: tokio::sync::oneshot::Sender<Result<crate::session::direct::DirectSession, String>>,
    },
    /// Stop accepting new connections (shutdown step 1); replies when done.
    StopAccepting(tokio::sync::oneshot::Sender<()>),
}

/// Shared session counters.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Sessions opened.
    pub sessions: AtomicU64,
    /// Connections closed for a protocol violation (garbage, bad version, unknown service…).
    pub rejected: AtomicU64,
}

/// The status-kanban endpoint actor.
pub struct Endpoint {
    router: Arc<Router>,
    statics: Arc<StaticStore>,
    socket: PathBuf,
    data_root: PathBuf,
    stats: Arc<EndpointStats>,
    accept: Option<AbortHandle>,
    prebound: Option<tokio::net::UnixListener>,
}

impl Endpoint {
    /// An endpoint that will listen on `socket`; `prebound` is used instead of binding when given (the node
    /// binds before announcing readiness, so clients never race the first incarnation).
    pub fn new(
        router: Arc<Router>,
        statics: Arc<StaticStore>,
        socket: PathBuf,
        data_root: PathBuf,
        stats: Arc<EndpointStats>,
        prebound: Option<tokio::net::UnixListener>,
    ) -> Endpoint {
        Endpoint { router, statics, socket, data_root, stats, accept: None, prebound }
    }

    fn shared(&self) -> Shared {
        Shared {
            router: self.router.clone(),
            statics: self.statics.clone(),
            data_root: self.data_root.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

/// What every session uses.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) router: Arc<Router>,
    pub(crate) statics: Arc<StaticStore>,
    data_root: PathBuf,
    stats: Arc<EndpointStats>,
}

/// A session that passed the handshake checks.
pub(crate) struct Opened {
    pub(crate) slot: Arc<Slot>,
    pub(crate) sess: u64,
    pub(crate) session_no: u64,
    pub(crate) data_path: String,
}

/// The handshake checks common to link and direct sessions: the instance exists and has no session yet. Opens
/// the session, creates the data directory, and queues the seed kanban if asked for and the queue is empty.
///
/// # Errors
/// Why the session is refused.
pub(crate) fn open_session(
    shared: &Shared,
    service: &str,
    instance: u32,
    pid: u32,
    seed: bool,
) -> Result<Opened, String> {
    let Some(slot) = shared.router.slot(service, instance).cloned() else {
        return Err(match shared.router.config().microservices.get(service) {
            Some(ms) => format!("service `{service}` has instances 1..={}, not {instance}", ms.scale),
            None => format!("unknown service `{service}`"),
        });
    };
    let Some(sess) = slot.open_session_for(pid) else {
        return Err(format!("instance {}-{} already has a session", slot.service, slot.instance));
    };
    let session_no = shared.stats.sessions.fetch_add(1, Ordering::Relaxed) + 1;
    let data_path = shared.data_root.join("Data").join(format!("{}_{}", slot.service, slot.instance));
    let _ = std::fs::create_dir_all(&data_path);
    let data_path = data_path.display().to_string();
    tracing::info!(service = %slot.service, instance = slot.instance, session = session_no, pid, "session opened");
    if seed && slot.depth() == 0 {
        let id = KanbanId::generate();
        let seed = Kanban {
            id,
            trace_id: id,
            origin: Origin { service: "aion".into(), instance: 0 },
            start_at: aion_runtime::time::rfc3339_now(),
            connection_key: String::new(),
            process_number: slot.instance,
            data_path: data_path.clone(),
            ..Kanban::default()
        };
        // Beyond the capacity if need be: one per session, and never dropped.
        slot.restore(Box::new(seed.into_wire()));
    }
    Ok(Opened { slot, sess, session_no, data_path })
}

/// Accepts one output of `slot`'s instance: fixes its origin, drops it if it is a duplicate (counted), routes
/// it. Returns true when a copy went to the durable store (the caller waits for a commit barrier before
/// acknowledging it).
pub(crate) async fn accept_output(shared: &Shared, slot: &Slot, mut k: Box<WireKanban>, hops: u32) -> bool {
    k.hops = hops;
    if let Some(refused) = admit_output(slot, &mut k) {
        refuse_output(shared, slot, refused, k);
        return false;
    }
    let id = k.id;
    // The common case routes without a future: one local in-memory target with room in its queue.
    let persisted = match shared.router.try_route(slot, k) {
        Ok(()) => false,
        Err(k) => shared.router.route(slot, k).await,
    };
    slot.remember_output(id);
    slot.stats.kanbans_out.fetch_add(1, Ordering::Relaxed);
    persisted
}

/// Why an output is not routed.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Already accepted from this instance (a resend after a reconnect, or a redelivered input handled again).
    Duplicate,
    /// Over the kanban size limit: it could never be delivered.
    TooLarge(aion_runtime::kanban::TooLarge),
}

/// Drops a refused output: a duplicate silently (it was counted and the original routed), anything else as a
/// dead letter (logged, counted, archived) so the producer's session moves on.
pub(crate) fn refuse_output(shared: &Shared, slot: &Slot, why: Refused, k: Box<WireKanban>) {
    if let Refused::TooLarge(e) = why {
        // A resend of it is then a duplicate, not a second dead letter.
        slot.remember_output(k.id);
        slot.stats.kanbans_out.fetch_add(1, Ordering::Relaxed);
        let detail = format!("output of {}-{}: {e}", slot.service, slot.instance);
        shared.router.dead_letter(crate::routing::dead::Reason::TooLarge, detail, k);
    }
}

/// Fixes an output's origin and id and tells whether it is to be routed (`None`) or not, and why.
///
/// The id the client proposed is made unique to this producing instance ([`KanbanId::of_producer`]): clients
/// derive output ids from the input's id, which every branch of a fan-out shares, so without this the branches'
/// outputs would meet downstream as different kanbans with one id.
pub(crate) fn admit_output(slot: &Slot, k: &mut WireKanban) -> Option<Refused> {
    k.id = k.id.of_producer(slot.producer);
    // Never trust the client's idea of who it is; reuse its string when it is right.
    if k.origin.service != slot.service {
        k.origin.service.clone_from(&slot.service);
    }
    k.origin.instance = slot.instance;
    if k.process_number == 0 {
        k.process_number = slot.instance;
    }
    if slot.is_duplicate_output(k.id) {
        return Some(Refused::Duplicate);
    }
    k.check_size().err().map(Refused::TooLarge)
}

/// Acknowledges `n` deliveries of `sess`, of `bytes` in all (whose ids are `ids` when the store or the archive
/// needs them).
pub(crate) async fn acknowledge(shared: &Shared, slot: &Slot, sess: u64, n: usize, bytes: usize, ids: Vec<KanbanId>) {
    slot.acked(sess, n, bytes);
    if let Some(a) = shared.router.archive() {
        let op = crate::store::ArchiveOp::Acked {
            service: slot.service.clone(),
            instance: slot.instance,
            ids: ids.clone(),
            at: crate::store::now_ms(),
        };
        a.record(op);
    }
    if let Some(store) = shared.router.durable_store(slot) {
        if let Err(e) = store.ack(&slot.service, slot.instance, ids).await {
            tracing::error!(service = %slot.service, "ack not persisted: {e}");
        }
    }
}

/// True when acknowledgements need the kanban ids (durable queue or archive).
pub(crate) fn ack_wants_ids(shared: &Shared, slot: &Slot) -> bool {
    shared.router.durable_store(slot).is_some() || shared.router.archive().is_some()
}

/// Binds a Unix socket with owner-only permissions, replacing a stale socket file.
///
/// # Errors
/// I/O errors.
pub fn bind_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl Actor for Endpoint {
    type Msg = EndpointMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) {
        let listener = match self.prebound.take().map_or_else(|| bind_private(&self.socket), Ok) {
            Ok(l) => l,
            Err(e) => return ctx.fail(format!("cannot listen on {}: {e}", self.socket.display())),
        };
        tracing::info!(socket = %self.socket.display(), "status-kanban endpoint listening");
        let shared = self.shared();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (r, w) = unix_split(stream);
                        tokio::spawn(session(shared.clone(), r, w));
                    }
                    Err(e) => {
                        tracing::error!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        self.accept = Some(task.abort_handle());
    }

    async fn handle(&mut self, msg: EndpointMsg, _ctx: &mut Context<Self>) {
        match msg {
            EndpointMsg::Attach((r, w)) => {
                tokio::spawn(session(self.shared(), r, w));
            }
            EndpointMsg::AttachDirect { service, instance, reply } => {
                let shared = self.shared();
                let opened = open_session(&shared, &service, instance, 0, false)
                    .map(|o| crate::session::direct::DirectSession::new(shared, o));
                if let Err(reason) = &opened {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("in-process session refused: {reason}");
                }
                let _ = reply.send(opened);
            }
            EndpointMsg::StopAccepting(done) => {
                if let Some(a) = self.accept.take() {
                    a.abort();
                }
                let _ = std::fs::remove_file(&self.socket);
                let _ = done.send(());
            }
        }
    }
}

async fn refuse(shared: &Shared, w: &mut LinkWriter<ServerMsg>, reason: String) {
    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("closing connection: {reason}");
    let _ = w.send_one(ServerMsg::Error { reason }).await;
    w.close().await;
}

/// One connection, from handshake to close.
async fn session(shared: Shared, mut r: LinkReader<ClientMsg>, mut w: LinkWriter<ServerMsg>) {
    let mut msgs = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(5), r.recv(&mut msgs)).await;
    // `msgs` keeps whatever followed the Hello in the same read; the read loop handles it first.
    let hello = match (first, msgs.is_empty()) {
        (Ok(Ok(true)), false) => match msgs.remove(0) {
            ClientMsg::Hello(h) => h,
            other => return refuse(&shared, &mut w, format!("expected Hello, got {}", msg_name(&other))).await,
        },
        (Ok(Ok(_)), _) => return refuse(&shared, &mut w, "closed before the handshake".into()).await,
        (Ok(Err(e)), _) => return refuse(&shared, &mut w, format!("bad handshake: {e}")).await,
        (Err(_), _) => return refuse(&shared, &mut w, "no handshake within 5 s".into()).await,
    };
    if hello.magic != MAGIC || hello.version != PROTOCOL_VERSION {
        let reason =
            format!("protocol version {} not supported (this runtime speaks {PROTOCOL_VERSION})", hello.version);
        return refuse(&shared, &mut w, reason).await;
    }
    let window = hello.window.clamp(1, 4096) as usize;
    let Opened { slot, sess, session_no, data_path } =
        match open_session(&shared, &hello.service, hello.instance, hello.pid, hello.seed) {
            Ok(o) => o,
            Err(reason) => return refuse(&shared, &mut w, reason).await,
        };
    let welcome =
        ServerMsg::Welcome { session: session_no, device_name: shared.router.config().device_name.clone(), data_path };
    if w.send_one(welcome).await.is_err() {
        slot.close_session(sess, Vec::new());
        return;
    }
    // Deliveries sent and not acknowledged yet, in sequence order.
    let inflight: Mutex<VecDeque<(u64, Box<WireKanban>)>> = Mutex::new(VecDeque::new());
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Outgoing>(1024);
    let outcome: Mutex<Result<(), String>> = Mutex::new(Ok(()));
    // Set when a write was abandoned half-way: nothing more can be written on this stream.
    let cut = std::sync::atomic::AtomicBool::new(false);

    // The writer owns the socket's sending half and is never cancelled mid-write: the session ends when it
    // returns (Close from the reader, a write error, or the session being replaced by a newer one). The error that
    // ends a session is written after the instance is released (below), so a client that reconnects as soon as
    // it reads it is welcomed.
    let writer = async {
        let mut ctl: Vec<Outgoing> = Vec::new();
        let mut ks: Vec<Box<WireKanban>> = Vec::new();
        let mut seq: u64 = 0;
        loop {
            let mut close = false;
            let queued: std::io::Result<()> = tokio::select! {
                biased;
                n = ctl_rx.recv_many(&mut ctl, 256) => {
                    close = n == 0;
                    let mut r = Ok(());
                    for o in ctl.drain(..) {
                        match o {
                            Outgoing::Msg(m) => r = r.and_then(|_| w.push(m)),
                            Outgoing::Close => close = true,
                        }
                    }
                    r
                }
                _ = slot.take(sess, window, &mut ks) => {
                    if ks.is_empty() {
                        if slot.is_evicted(sess) {
                            let why = "no acknowledgement within the ack timeout: session cut off, its kanbans are redelivered";
                            *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Err(why.into());
                        } else {
                            tracing::info!(service = %slot.service, instance = slot.instance, "session replaced by a newer one");
                        }
                        return;
                    }
                    // Keep each kanban once (for redelivery) and encode the delivery from that copy.
                    let mut undeliverable = Vec::new();
                    let r = {
                        let mut g = inflight.lock().unwrap_or_else(|p| p.into_inner());
                        let mut r = Ok(());
                        for k in ks.drain(..) {
                            let s = seq + 1;
                            let wire = DeliverRef::Deliver { seq: s, kanban: &k };
                            match w.push_as(&wire, || ServerMsg::Deliver { seq: s, kanban: k.clone() }) {
                                Ok(()) => {
                                    seq = s;
                                    g.push_back((s, k));
                                }
                                // Too large for a frame (stored by a build without the size check): it can never
                                // be delivered, so it must not go back to the queue.
                                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => undeliverable.push(k),
                                Err(e) => {
                                    seq = s;
                                    g.push_back((s, k));
                                    r = Err(e);
                                }
                            }
                        }
                        r
                    };
                    if !undeliverable.is_empty() {
                        dead_letter_undeliverable(&shared, &slot, sess, undeliverable).await;
                    }
                    r
                }
            };
            if let Err(e) = queued {
                tracing::error!(service = %slot.service, instance = slot.instance, "cannot encode a message: {e}");
                return;
            }
            // A client that does not read blocks this write: cutting the session off (the ack timeout) must reach
            // it here too.
            let flushed = tokio::select! {
                r = w.flush() => r,
                _ = slot.evicted(sess) => {
                    let why = "no acknowledgement within the ack timeout (and not reading): session cut off";
                    *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Err(why.into());
                    cut.store(true, Ordering::Relaxed);
                    return;
                }
            };
            if let Err(e) = flushed {
                tracing::warn!(service = %slot.service, instance = slot.instance, "write failed: {e}");
                return;
            }
            if close {
                return;
            }
        }
    };

    let early = std::mem::take(&mut msgs);
    let reader = async {
        let r = read_loop(&shared, &slot, sess, &mut r, early, &inflight, &ctl_tx).await;
        *outcome.lock().unwrap_or_else(|p| p.into_inner()) = r;
        let _ = ctl_tx.send(Outgoing::Close).await;
        std::future::pending::<()>().await
    };

    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    let unacked: Vec<Box<WireKanban>> =
        inflight.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().map(|(_, k)| k).collect();
    let n = unacked.len();
    slot.close_session(sess, unacked);
    match outcome.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Ok(()) => tracing::info!(service = %slot.service, instance = slot.instance, requeued = n, "session closed"),
        Err(reason) => {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %slot.service, instance = slot.instance, requeued = n, "session closed: {reason}");
            if !cut.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_secs(5), w.send_one(ServerMsg::Error { reason })).await;
            }
        }
    }
    w.close().await;
    requeue_start(&shared.router, &slot).await;
}

/// Kanbans taken from the queue that no frame can carry: dead-lettered `too-large` and acknowledged (removed from
/// the durable queue), so the queue behind them moves on. (Boxes, as the queue holds them: moved, never copied.)
#[allow(clippy::vec_box)]
async fn dead_letter_undeliverable(shared: &Shared, slot: &Slot, sess: u64, ks: Vec<Box<WireKanban>>) {
    let ids: Vec<KanbanId> = ks.iter().map(|k| k.id).collect();
    let bytes: usize = ks.iter().map(|k| k.mem_size()).sum();
    let n = ks.len();
    for k in ks {
        let size = k.encoded_len();
        let detail = format!(
            "queued for {}-{}: {}",
            slot.service,
            slot.instance,
            aion_runtime::kanban::TooLarge { size, limit: aion_runtime::kanban::MAX_KANBAN_BYTES }
        );
        shared.router.dead_letter(crate::routing::dead::Reason::TooLarge, detail, k);
    }
    acknowledge(shared, slot, sess, n, bytes, ids).await;
}

/// What the reader hands the writer.
// Boxing the message would cost an allocation per message on the hot path; Close is rare.
#[allow(clippy::large_enum_variant)]
pub enum Outgoing {
    /// A message to send.
    Msg(ServerMsg),
    /// Flush and end the session.
    Close,
}

/// Reads client messages until Bye, end of stream, or a protocol error.
async fn read_loop(
    shared: &Shared,
    slot: &Slot,
    sess: u64,
    r: &mut LinkReader<ClientMsg>,
    early: Vec<ClientMsg>,
    inflight: &Mutex<VecDeque<(u64, Box<WireKanban>)>>,
    ctl_tx: &mpsc::Sender<Outgoing>,
) -> Result<(), String> {
    // Messages that arrived together with the Hello come first.
    let mut msgs: Vec<ClientMsg> = early;
    loop {
        if msgs.is_empty() {
            match r.recv(&mut msgs).await {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(format!("bad frame: {e}")),
            }
        }
        let mut accepted = 0u32;
        let mut persisted = false;
        let mut bye = false;
        for m in msgs.drain(..) {
            if bye {
                break; // nothing may follow Bye
            }
            match m {
                ClientMsg::Output(k) => {
                    // The hop count is the runtime's: an output belongs to the input being handled, which is the
                    // oldest unacknowledged delivery (clients handle in order and acknowledge cumulatively); with
                    // nothing in flight it starts a chain.
                    let hops = {
                        let g = inflight.lock().unwrap_or_else(|p| p.into_inner());
                        g.front().map_or(0, |(_, parent)| parent.hops.saturating_add(1))
                    };
                    persisted |= accept_output(shared, slot, k, hops).await;
                    accepted += 1;
                }
                ClientMsg::Ack { upto } => {
                    let want_ids = ack_wants_ids(shared, slot);
                    let mut ids = Vec::new();
                    let (n, bytes) = {
                        let mut g = inflight.lock().unwrap_or_else(|p| p.into_inner());
                        let (mut n, mut bytes) = (0, 0);
                        while g.front().is_some_and(|(s, _)| *s <= upto) {
                            if let Some((_, k)) = g.pop_front() {
                                bytes += k.mem_size();
                                if want_ids {
                                    ids.push(k.id);
                                }
                            }
                            n += 1;
                        }
                        (n, bytes)
                    };
                    acknowledge(shared, slot, sess, n, bytes, ids).await;
                }
                ClientMsg::StaticPut { req, topic, kanban } => {
                    if topic.len() > aion_transport::proto::MAX_TOPIC_BYTES {
                        return Err(format!(
                            "static topic name of {} bytes is too long (limit {})",
                            topic.len(),
                            aion_transport::proto::MAX_TOPIC_BYTES
                        ));
                    }
                    if let Err(e) = kanban.check_size() {
                        return Err(format!("static kanban refused: {e}"));
                    }
                    let id = shared.statics.put_durable(&topic, *kanban).await;
                    let _ = ctl_tx.send(Outgoing::Msg(ServerMsg::StaticPutOk { req, id })).await;
                }
                ClientMsg::StaticGet { req, topic } => {
                    // One reply frame: as many entries (oldest first) as fit; the rest are left out, logged.
                    let entries = shared.statics.get_within(&topic, aion_transport::codec::MAX_FRAME - (64 << 10));
                    let _ = ctl_tx.send(Outgoing::Msg(ServerMsg::StaticList { req, entries })).await;
                }
                ClientMsg::StaticDelete { req, topic, id } => {
                    let found = shared.statics.delete_durable(&topic, id).await;
                    let _ = ctl_tx.send(Outgoing::Msg(ServerMsg::StaticDeleted { req, found })).await;
                }
                ClientMsg::StaticSubscribe { topic } => shared.statics.subscribe(&topic, ctl_tx.clone()),
                ClientMsg::Bye => bye = true,
                ClientMsg::Hello(_) => return Err("second Hello in a session".into()),
            }
        }
        if accepted > 0 {
            // Durable before acknowledged: one group commit covers the whole batch.
            if let Some(store) = shared.router.store().filter(|_| persisted) {
                if let Err(e) = store.barrier().await {
                    return Err(format!("store unavailable: {e}"));
                }
            }
            let _ = ctl_tx.send(Outgoing::Msg(ServerMsg::Accepted { count: accepted })).await;
        }
        if bye {
            return Ok(());
        }
    }
}

/// After a session ends with kanbans still queued, make sure the instance is started again.
pub(crate) async fn requeue_start(router: &Router, slot: &Slot) {
    if slot.depth() > 0 {
        router.request_start(slot).await;
    }
}

fn msg_name(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Hello(_) => "Hello",
        ClientMsg::Output(_) => "Output",
        ClientMsg::Ack { .. } => "Ack",
        ClientMsg::StaticPut { .. } => "StaticPut",
        ClientMsg::StaticGet { .. } => "StaticGet",
        ClientMsg::StaticDelete { .. } => "StaticDelete",
        ClientMsg::StaticSubscribe { .. } => "StaticSubscribe",
        ClientMsg::Bye => "Bye",
    }
}
