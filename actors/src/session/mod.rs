//! Sessions: how microservice instances talk to the runtime.
//!
//! - [`endpoint`]: the status-kanban endpoint actor (the Unix socket services connect to);
//! - [`link`]: a session over a link, driving the sans-IO [`aion_transport::session::ServerSession`];
//! - [`direct`]: a direct session for an in-process service (no link, no encoding);
//! - [`statics`]: the static-kanban store, which emits domain events to its subscribers;
//! - `grpc` (feature `grpc`): AION's gRPC kanban API, whose sessions acknowledge implicitly (docs/grpc.md).
//!
//! What both kinds of session share lives here: opening a session (the handshake's checks against the routing
//! table), accepting an output (origin fix-up, deduplication, size check, routing), and acknowledging
//! deliveries (queue, store, archive).

pub mod direct;
pub(crate) mod endpoint;
#[cfg(feature = "grpc")]
pub mod grpc;
pub(crate) mod link;
pub mod statics;

pub use endpoint::{bind_private, Endpoint, EndpointMsg, EndpointStats, ServerLink};

use crate::routing::slot::Slot;
use crate::routing::Router;
use crate::session::statics::StaticStore;
use aion_runtime::kanban::{Kanban, KanbanId, Origin, WireKanban};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What every session uses.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) router: Arc<Router>,
    pub(crate) statics: Arc<StaticStore>,
    data_root: PathBuf,
    stats: Arc<EndpointStats>,
}

impl Shared {
    /// What every session of the node uses (the Unix endpoint's, the in-process ones, the gRPC API's).
    pub(crate) fn new(
        router: Arc<Router>,
        statics: Arc<StaticStore>,
        data_root: PathBuf,
        stats: Arc<EndpointStats>,
    ) -> Shared {
        Shared { router, statics, data_root, stats }
    }
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
    let Some(slot) = shared.router.slot(service, instance) else {
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
        if let Err(e) = store.ack(&slot.queue_key(), ids).await {
            tracing::error!(service = %slot.service, "ack not persisted: {e}");
        }
    }
}

/// True when acknowledgements need the kanban ids (durable queue or archive).
pub(crate) fn ack_wants_ids(shared: &Shared, slot: &Slot) -> bool {
    shared.router.durable_store(slot).is_some() || shared.router.archive().is_some()
}

/// After a session ends with kanbans still queued, make sure the instance is started again.
pub(crate) async fn requeue_start(router: &Router, slot: &Slot) {
    if slot.depth() > 0 {
        router.request_start(slot).await;
    }
}

/// Binds a TCP listener for one of the runtime's endpoints (`what`: "AION's gRPC API", "HTTP"), before anything
/// starts; an address in use gets `in_use_hint` appended.
///
/// # Errors
/// A one-line reason (the address is taken, not an address of this host…).
#[cfg(any(feature = "grpc", feature = "http"))]
pub(crate) fn bind_tcp(
    addr: std::net::SocketAddr,
    what: &str,
    in_use_hint: &str,
) -> Result<tokio::net::TcpListener, String> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse { in_use_hint } else { "" };
        format!("cannot listen for {what} on {addr}: {e}{hint}")
    })?;
    l.set_nonblocking(true).map_err(|e| format!("{what} listener {addr}: {e}"))?;
    tokio::net::TcpListener::from_std(l).map_err(|e| format!("{what} listener {addr}: {e}"))
}
