//! Link sessions: the driver of [`ServerSession`] over a link (a Unix socket, or an in-memory link for embedders).
//!
//! The protocol's state and rules (credit window, deliveries in flight, cumulative acks, `Accepted` counts, `Bye`,
//! what is requeued at the end) live in the state machine; this driver does the I/O: it reads client messages,
//! routes outputs, answers static requests, takes deliveries from the instance's slot and writes them. The
//! session's end — however it comes, a panic included — releases the instance and requeues what was in flight
//! ([`Release`]).

use crate::routing::slot::Slot;
use crate::session::statics::{StaticEvent, Subscriber};
use crate::session::{accept_output, ack_wants_ids, acknowledge, open_session, requeue_start, Opened, Shared};
use aion_runtime::kanban::{KanbanId, WireKanban};
use aion_transport::proto::DeliverRef;
use aion_transport::session::{accept_hello, ServerInput, ServerSession, StaticRequest};
use aion_transport::{ClientMsg, LinkReader, LinkWriter, ServerMsg};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a new connection has to say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Static events buffered per session before a subscription is dropped as too slow.
const STATIC_EVENTS: usize = 1024;

/// A session's state machine, shared by its reader and writer halves.
pub(crate) type Machine = Mutex<ServerSession<Box<WireKanban>>>;

fn lock(m: &Machine) -> std::sync::MutexGuard<'_, ServerSession<Box<WireKanban>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases the instance when the session ends, however it ends (returned, aborted, or panicked): its
/// unacknowledged deliveries go back to the front of the queue and the instance can open a new session.
pub(crate) struct Release<'a> {
    slot: &'a Slot,
    sess: u64,
    sm: &'a Machine,
    done: bool,
}

impl<'a> Release<'a> {
    pub(crate) fn new(slot: &'a Slot, sess: u64, sm: &'a Machine) -> Release<'a> {
        Release { slot, sess, sm, done: false }
    }

    /// Releases now; returns how many deliveries were requeued.
    pub(crate) fn release(&mut self) -> usize {
        if std::mem::replace(&mut self.done, true) {
            return 0;
        }
        let unacked = lock(self.sm).close();
        let n = unacked.len();
        self.slot.close_session(self.sess, unacked);
        n
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if !self.done {
            let n = self.release();
            tracing::error!(service = %self.slot.service, instance = self.slot.instance, requeued = n,
                "session ended abnormally; instance released");
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
pub(crate) async fn session(shared: Shared, mut r: LinkReader<ClientMsg>, mut w: LinkWriter<ServerMsg>) {
    let mut msgs = Vec::new();
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv(&mut msgs)).await;
    // `msgs` keeps whatever followed the Hello in the same read; the read loop handles it first.
    let hello = match (first, msgs.is_empty()) {
        (Ok(Ok(true)), false) => match msgs.remove(0) {
            ClientMsg::Hello(h) => h,
            other => return refuse(&shared, &mut w, format!("expected Hello, got {}", msg_name(&other))).await,
        },
        (Ok(Ok(_)), _) => return refuse(&shared, &mut w, "closed before the handshake".into()).await,
        (Ok(Err(e)), _) => return refuse(&shared, &mut w, format!("bad handshake: {e}")).await,
        (Err(_), _) => {
            let why = format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            return refuse(&shared, &mut w, why).await;
        }
    };
    let hs = match accept_hello(hello) {
        Ok(h) => h,
        Err(reason) => return refuse(&shared, &mut w, reason).await,
    };
    let Opened { slot, sess, session_no, data_path } =
        match open_session(&shared, &hs.service, hs.instance, hs.pid, hs.seed) {
            Ok(o) => o,
            Err(reason) => return refuse(&shared, &mut w, reason).await,
        };
    let sm: Machine = Mutex::new(ServerSession::new(hs.window));
    let mut release = Release::new(&slot, sess, &sm);
    let welcome =
        ServerMsg::Welcome { session: session_no, device_name: shared.router.config().device_name.clone(), data_path };
    if w.send_one(welcome).await.is_err() {
        release.release();
        return;
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Outgoing>(1024);
    let (ev_tx, mut ev_rx) = mpsc::channel::<StaticEvent>(STATIC_EVENTS);
    let outcome: Mutex<Result<(), String>> = Mutex::new(Ok(()));
    // Set when a write was abandoned half-way: nothing more can be written on this stream.
    let cut = AtomicBool::new(false);

    // The writer owns the socket's sending half and is never cancelled mid-write: the session ends when it
    // returns (Close from the reader, a write error, or the session being replaced by a newer one). The error that
    // ends a session is written after the instance is released (below), so a client that reconnects as soon as
    // it reads it is welcomed.
    let writer = async {
        let mut ctl: Vec<Outgoing> = Vec::new();
        let mut events: Vec<StaticEvent> = Vec::new();
        let mut ks: Vec<Box<WireKanban>> = Vec::new();
        let window = hs.window;
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
                // The slot hands out what the credit window allows (the state machine counts what is in flight).
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
                    let (r, undeliverable) = deliver(&sm, &mut w, &mut ks);
                    if !undeliverable.is_empty() {
                        dead_letter_undeliverable(&shared, &slot, sess, undeliverable).await;
                    }
                    r
                }
                // Static events last: deliveries are the hot path. Never closed while the writer runs: the reader
                // below holds a sender.
                _ = ev_rx.recv_many(&mut events, 256) => {
                    let mut r = Ok(());
                    for StaticEvent { topic, id, kanban } in events.drain(..) {
                        r = r.and_then(|_| w.push(ServerMsg::StaticEvent { topic, id, kanban: Box::new(kanban) }));
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
        let r = read_loop(&shared, &slot, sess, &mut r, early, &sm, &ctl_tx, &ev_tx).await;
        *outcome.lock().unwrap_or_else(|p| p.into_inner()) = r;
        let _ = ctl_tx.send(Outgoing::Close).await;
        std::future::pending::<()>().await
    };

    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    let n = release.release();
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

/// Records `ks` as delivered and queues their `Deliver` messages, encoded from the copy the state machine keeps
/// for redelivery. Returns the write result and the kanbans no frame can carry (stored by a build without the
/// size check): those are taken back, never sent, and must not go back to the queue.
#[allow(clippy::vec_box)] // the boxes the queue holds, moved on, never copied
fn deliver(
    sm: &Machine,
    w: &mut LinkWriter<ServerMsg>,
    ks: &mut Vec<Box<WireKanban>>,
) -> (std::io::Result<()>, Vec<Box<WireKanban>>) {
    let mut g = lock(sm);
    let mut r = Ok(());
    let mut undeliverable = Vec::new();
    for k in ks.drain(..) {
        let seq = g.deliver(k);
        let Some(k) = g.last_delivered() else { continue };
        let wire = DeliverRef::Deliver { seq, kanban: k };
        match w.push_as(&wire, || ServerMsg::Deliver { seq, kanban: k.clone() }) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => undeliverable.extend(g.undeliver()),
            // Kept in flight: the session ends and it is requeued.
            Err(e) => r = Err(e),
        }
    }
    (r, undeliverable)
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
pub(crate) enum Outgoing {
    /// A message to send.
    Msg(ServerMsg),
    /// Flush and end the session.
    Close,
}

/// Reads client messages until Bye, end of stream, or a protocol error.
#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shared: &Shared,
    slot: &Slot,
    sess: u64,
    r: &mut LinkReader<ClientMsg>,
    early: Vec<ClientMsg>,
    sm: &Machine,
    ctl_tx: &mpsc::Sender<Outgoing>,
    ev_tx: &mpsc::Sender<StaticEvent>,
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
        let mut persisted = false;
        let mut bye = false;
        for m in msgs.drain(..) {
            // One lock per message: the state machine's answer and, for an output, its hop count (the runtime's:
            // an output belongs to the input being handled).
            let (input, hops) = {
                let mut g = lock(sm);
                let input = g.on_message(m).map_err(|e| e.to_string())?;
                let hops = match &input {
                    Some(ServerInput::Output(_)) => g.handling().map_or(0, |parent| parent.hops.saturating_add(1)),
                    _ => 0,
                };
                (input, hops)
            };
            match input {
                None => {}
                Some(ServerInput::Output(k)) => {
                    persisted |= accept_output(shared, slot, k, hops).await;
                }
                Some(ServerInput::Acknowledged(done)) => {
                    let ids =
                        if ack_wants_ids(shared, slot) { done.iter().map(|k| k.id).collect() } else { Vec::new() };
                    let bytes = done.iter().map(|k| k.mem_size()).sum();
                    acknowledge(shared, slot, sess, done.len(), bytes, ids).await;
                }
                Some(ServerInput::Static(req)) => {
                    if let Some(reply) = answer_static(shared, req, ev_tx).await? {
                        let _ = ctl_tx.send(Outgoing::Msg(reply)).await;
                    }
                }
                Some(ServerInput::Bye) => bye = true,
            }
        }
        let accepted = lock(sm).take_accepted();
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

/// Answers a static-kanban request (none for a subscription: its events follow).
///
/// # Errors
/// A request the session must end for (a topic name or kanban over the limits).
async fn answer_static(
    shared: &Shared,
    req: StaticRequest,
    ev_tx: &mpsc::Sender<StaticEvent>,
) -> Result<Option<ServerMsg>, String> {
    Ok(Some(match req {
        StaticRequest::Put { req, topic, kanban } => {
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
            ServerMsg::StaticPutOk { req, id }
        }
        StaticRequest::Get { req, topic } => {
            // One reply frame: as many entries (oldest first) as fit; the rest are left out, logged.
            let entries = shared.statics.get_within(&topic, aion_transport::codec::MAX_FRAME - (64 << 10));
            ServerMsg::StaticList { req, entries }
        }
        StaticRequest::Delete { req, topic, id } => {
            let found = shared.statics.delete_durable(&topic, id).await;
            ServerMsg::StaticDeleted { req, found }
        }
        StaticRequest::Subscribe { topic } => {
            shared.statics.subscribe(&topic, Subscriber::Session(ev_tx.clone()));
            return Ok(None);
        }
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u64) -> Box<WireKanban> {
        Box::new(aion_runtime::Kanban { id: KanbanId(n as u128), ..Default::default() }.into_wire())
    }

    /// A link session that panics (or is aborted) releases its instance and requeues what it had in flight,
    /// in order: the instance is not left marked connected for good.
    #[tokio::test]
    async fn a_session_that_panics_releases_its_instance_and_requeues_in_order() {
        let slot = Slot::new("svc", 1, 16);
        slot.restore(k(1));
        slot.restore(k(2));
        let sess = slot.open_session().expect("a first session opens");
        let sm: Machine = Mutex::new(ServerSession::new(8));
        let mut taken = Vec::new();
        slot.take(sess, 8, &mut taken).await;
        for t in taken {
            lock(&sm).deliver(t);
        }
        assert_eq!(slot.inflight(), 2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _release = Release::new(&slot, sess, &sm);
            panic!("a bug in the session");
        }));
        assert!(r.is_err());
        assert!(slot.session_pid().is_none(), "the instance is released");
        let sess2 = slot.open_session().expect("a new session is welcomed");
        let mut again = Vec::new();
        slot.take(sess2, 8, &mut again).await;
        let ids: Vec<u128> = again.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![1, 2], "requeued at the front, in order");
    }

    #[tokio::test]
    async fn a_released_session_is_not_released_twice() {
        let slot = Slot::new("svc", 1, 16);
        let sess = slot.open_session().expect("a first session opens");
        let sm: Machine = Mutex::new(ServerSession::new(8));
        let mut release = Release::new(&slot, sess, &sm);
        assert_eq!(release.release(), 0);
        // A newer session opened meanwhile must not be closed by the guard's drop.
        let sess2 = slot.open_session().expect("a new session opens");
        drop(release);
        assert!(slot.session_pid().is_some(), "the newer session {sess2} is still connected");
    }
}
