//! The sending side of a link: dials a peer device and sends it the kanbans of its outboxes.
//!
//! Three loops share one connection: control (hello, heartbeats), data (takes from the outboxes within the
//! credit window, sends batches) and acknowledgements (gives acknowledged kanbans back to their outboxes, which
//! then forget them, in the store too). A cut connection leaves its unacknowledged kanbans in the link's resend
//! list, sent first on the next connection; if the link itself ends (its actor restarts, the runtime stops),
//! they go back to the front of their outboxes, in order ([`Pump`]'s drop).

use super::{files, read_frame, resolve, write_frame, Federation, LinkState, Peer};
use crate::routing::slot::Slot;
use aion_runtime::{KanbanId, WireKanban};
use aion_transport::federation::{kanbans_frame, Crossing, CrossingRef, LinkError, Sender, BATCH_BYTES};
use aion_transport::FrameDecoder;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A kanban in flight on the link.
pub(super) struct Tag {
    route: usize,
    id: KanbanId,
    /// What it counts in its outbox's byte bound.
    mem: usize,
    /// Its encoding (a [`CrossingRef`]): sent as is, and again after a cut.
    bytes: Vec<u8>,
}

/// Microseconds of a monotonic clock (the protocol machines' time).
pub(super) fn mono_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

/// A list of kanbans the link holds, locked; a panic elsewhere while it was locked does not lose them (the guard
/// is taken back from the poison).
fn held<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The link's hold on its outboxes: a session on each, the kanbans in flight, and those to send again.
struct Pump {
    routes: Vec<Arc<Slot>>,
    sessions: Vec<u64>,
    sender: Mutex<Option<Sender<Tag>>>,
    resend: Mutex<VecDeque<Tag>>,
    next_route: std::sync::atomic::AtomicUsize,
    router: Arc<crate::routing::Router>,
    /// Kanbans whose files go first (Send Anything), in the order they were taken; the front one is being sent.
    pending: Mutex<VecDeque<files::Pending>>,
    pending_added: tokio::sync::Notify,
    /// Kanbans whose files are in place there, rewritten, to send next.
    ready: Mutex<VecDeque<Tag>>,
    ready_added: tokio::sync::Notify,
}

impl Pump {
    /// Opens a session on every outbox (none may have one: one link per device).
    fn open(routes: Vec<Arc<Slot>>, router: Arc<crate::routing::Router>) -> Result<Pump, String> {
        let mut sessions = Vec::new();
        for (i, s) in routes.iter().enumerate() {
            match s.open_session() {
                Some(sess) => sessions.push(sess),
                None => {
                    for (r, sess) in routes.iter().zip(&sessions).take(i) {
                        r.close_session(*sess, Vec::new());
                    }
                    return Err(format!("the outbox to {} already has a link", s.service));
                }
            }
        }
        Ok(Pump {
            routes,
            sessions,
            sender: Mutex::new(None),
            resend: Mutex::new(VecDeque::new()),
            next_route: Default::default(),
            router,
            pending: Mutex::new(VecDeque::new()),
            pending_added: tokio::sync::Notify::new(),
            ready: Mutex::new(VecDeque::new()),
            ready_added: tokio::sync::Notify::new(),
        })
    }

    fn sender<R>(&self, f: impl FnOnce(&mut Sender<Tag>) -> R) -> Option<R> {
        self.sender.lock().ok()?.as_mut().map(f)
    }

    /// Takes up to `room` kanbans: first those to send again, then those whose files are in place there, else
    /// from the outboxes (waiting for one, round-robin over them so that a busy route does not starve the others).
    /// A kanban with files is not returned but set aside for the transfer loop. Cancel safe.
    async fn take(&self, room: usize) -> Result<Vec<Tag>, String> {
        loop {
            {
                let mut resend = held(&self.resend);
                if !resend.is_empty() {
                    let n = room.min(resend.len());
                    return Ok(resend.drain(..n).collect());
                }
            }
            {
                let mut ready = held(&self.ready);
                if !ready.is_empty() {
                    let n = room.min(ready.len());
                    return Ok(ready.drain(..n).collect());
                }
            }
            let n = self.routes.len();
            let start = self.next_route.fetch_add(1, Ordering::Relaxed) % n.max(1);
            let futs = (0..n).map(|i| {
                let r = (start + i) % n;
                let (slot, sess) = (&self.routes[r], self.sessions[r]);
                Box::pin(async move {
                    let mut out = Vec::new();
                    slot.take(sess, slot.inflight() + room, &mut out).await;
                    (r, out)
                })
            });
            let (r, out) = tokio::select! {
                ((r, out), _, _) = futures::future::select_all(futs) => (r, out),
                _ = self.ready_added.notified() => continue,
            };
            if out.is_empty() {
                return Err(format!("the outbox to {} was taken by another link", self.routes[r].service));
            }
            let service = &self.routes[r].service;
            let mut tags = Vec::with_capacity(out.len());
            for k in out {
                let mem = k.mem_size();
                if k.file_list.is_empty() {
                    let bytes = CrossingRef { service, hops: k.hops, kanban: &k }.encode();
                    tags.push(Tag { route: r, id: k.id, mem, bytes });
                } else {
                    held(&self.pending).push_back(files::Pending {
                        route: r,
                        kanban: k,
                        service: service.clone(),
                        mem,
                    });
                    self.pending_added.notify_one();
                }
            }
            if !tags.is_empty() {
                return Ok(tags);
            }
        }
    }

    /// The kanban whose files are to go next (it stays set aside until [`Pump::files_done`]); waits for one.
    async fn next_pending(&self) -> files::Pending {
        loop {
            let front = held(&self.pending).front().cloned();
            if let Some(p) = front {
                return p;
            }
            self.pending_added.notified().await;
        }
    }

    /// The front kanban's files are in place there: `k` (rewritten) is sent next.
    fn files_done(&self, k: &WireKanban) {
        let Some(p) = held(&self.pending).pop_front() else { return };
        let bytes = CrossingRef { service: &p.service, hops: k.hops, kanban: k }.encode();
        held(&self.ready).push_back(Tag { route: p.route, id: k.id, mem: p.mem, bytes });
        self.ready_added.notify_one();
    }

    /// The front kanban cannot go with its files: a dead letter, and gone from its outbox.
    async fn files_failed(&self, reason: crate::routing::dead::Reason, detail: String) {
        let Some(p) = held(&self.pending).pop_front() else { return };
        let tag = Tag { route: p.route, id: p.kanban.id, mem: p.mem, bytes: Vec::new() };
        self.router.dead_letter(reason, detail, p.kanban);
        self.acked(vec![tag]).await;
    }

    /// Every kanban the link holds, taken out, by route, in order: set aside for their files, rewritten and
    /// ready, and to send again.
    #[allow(clippy::vec_box)] // boxed as the outboxes hold them (`Slot::close_session` takes them back so)
    fn held(&self) -> Vec<Vec<Box<WireKanban>>> {
        let mut per: Vec<Vec<Box<WireKanban>>> = vec![Vec::new(); self.routes.len()];
        for x in held(&self.pending).drain(..) {
            per[x.route].push(x.kanban);
        }
        let mut tags: Vec<Tag> = held(&self.ready).drain(..).collect();
        tags.extend(held(&self.resend).drain(..));
        for t in tags {
            match postcard::from_bytes::<Crossing>(&t.bytes) {
                Ok(c) => {
                    let mut k = Box::new(c.kanban);
                    k.hops = c.hops;
                    per[t.route].push(k);
                }
                // Cannot happen (we encoded it); the kanban stays in the store for the next run.
                Err(e) => tracing::error!(kanban = %t.id, "cannot take back a held kanban: {e}"),
            }
        }
        per
    }

    /// The receiver committed these: their outboxes forget them (in the store too).
    async fn acked(&self, tags: Vec<Tag>) {
        let mut per: Vec<(usize, usize, Vec<KanbanId>)> = vec![(0, 0, Vec::new()); self.routes.len()];
        for t in tags {
            let e = &mut per[t.route];
            e.0 += 1;
            e.1 += t.mem;
            e.2.push(t.id);
        }
        for (r, (n, bytes, ids)) in per.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let slot = &self.routes[r];
            slot.acked(self.sessions[r], n, bytes);
            if let Some(store) = self.router.durable_store(slot) {
                if let Err(e) = store.ack(&slot.queue_key(), ids).await {
                    tracing::error!(queue = %slot.queue_key(), "ack not persisted: {e}");
                }
            }
        }
    }

    /// The device has been unreachable for longer than `max`: every kanban waiting for it (to send again, and in
    /// its outboxes) becomes a dead letter (`expired`) and leaves the store. Returns how many.
    async fn expire(&self, device: &str, max: Duration) -> usize {
        let per = self.held();
        let mut n = 0;
        for (r, mut ks) in per.into_iter().enumerate() {
            let slot = &self.routes[r];
            // Those in flight (to send again) are the session's: acknowledged to it, freeing their room.
            let inflight = ks.len();
            if inflight > 0 {
                let bytes = ks.iter().map(|k| k.mem_size()).sum();
                slot.acked(self.sessions[r], inflight, bytes);
            }
            ks.extend(slot.drain());
            if ks.is_empty() {
                continue;
            }
            n += ks.len();
            let ids: Vec<KanbanId> = ks.iter().map(|k| k.id).collect();
            for k in ks {
                let detail = format!(
                    "waited for {} on device `{device}`, unreachable for longer than the outbox age bound ({}s)",
                    slot.service,
                    max.as_secs()
                );
                self.router.dead_letter(crate::routing::dead::Reason::Expired, detail, k);
            }
            if let Some(store) = self.router.durable_store(slot) {
                if let Err(e) = store.ack(&slot.queue_key(), ids).await {
                    tracing::error!(queue = %slot.queue_key(), "expired kanbans not removed from the store: {e}");
                }
            }
        }
        n
    }

    /// The connection is gone: what it had in flight goes first on the next one.
    fn lost(&self) -> usize {
        let Some(lost) = held(&self.sender).take().map(Sender::lost) else { return 0 };
        let n = lost.len();
        let mut resend = held(&self.resend);
        let later: Vec<Tag> = resend.drain(..).collect();
        resend.extend(lost);
        resend.extend(later);
        n
    }
}

impl Drop for Pump {
    /// The link ends: every kanban it held goes back to the front of its outbox, in order.
    fn drop(&mut self) {
        self.lost();
        let back = self.held();
        for ((slot, sess), ks) in self.routes.iter().zip(&self.sessions).zip(back) {
            slot.close_session(*sess, ks);
        }
    }
}

/// A connection that lasted this long was a working link (its end resets the backoff and the relay decision).
const STABLE: Duration = Duration::from_secs(10);

/// Why one connection ended.
enum End {
    Down(String),
    Refused(String),
}

/// Runs the link to `peer` for good (dialling again after each loss, with backoff); returns only if its outboxes
/// cannot be taken.
pub(super) async fn run(f: Arc<Federation>, peer: Arc<Peer>, routes: Vec<Arc<Slot>>) -> String {
    // The link this one replaces may still be letting go of the outboxes (an aborted task is dropped soon, not at
    // once): wait a little for them.
    let mut tries = 0;
    let pump = loop {
        match Pump::open(routes.clone(), f.router.clone()) {
            Ok(p) => break p,
            Err(e) if tries >= 100 => return e,
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut backoff = Duration::from_millis(50);
    // Relaying through the master: when the device has been unreachable directly for two heartbeat bounds, every
    // other attempt goes through the master (a worker's only); a direct attempt that works ends it.
    let relay_after = Duration::from_micros(f.opts.timing.dead_after.saturating_mul(2));
    let mut direct_down_since: Option<std::time::Instant> = None;
    let mut via_master_next = false;
    loop {
        peer.set_state(LinkState::Connecting);
        let started = std::time::Instant::now();
        let via = f.relay.get().filter(|m| via_master_next && **m != peer.name).cloned();
        let end = connection(&f, &peer, &pump, via.as_deref()).await;
        let stable = started.elapsed() >= STABLE;
        if via.is_none() {
            direct_down_since = if stable { None } else { direct_down_since.or(Some(started)) };
        }
        via_master_next = !via_master_next && direct_down_since.is_some_and(|t| t.elapsed() >= relay_after);
        let lost = pump.lost();
        if lost > 0 {
            peer.resent.fetch_add(lost as u64, Ordering::Relaxed);
        }
        let (state, why) = match end {
            End::Down(w) => (LinkState::Down(w.clone()), w),
            End::Refused(w) => (LinkState::Refused(w.clone()), w),
        };
        let refused = matches!(state, LinkState::Refused(_));
        peer.set_state(state);
        // The device's own bound (`devices.<name>.outboxMaxAge`, 0: none) over the runtime's.
        let max_age = match f.router.config().devices.get(&peer.name).and_then(|d| d.outbox.max_age_secs) {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => f.opts.max_age,
        };
        if let Some(max) = max_age {
            let down_ms = super::wall_ms().saturating_sub(peer.last_up.load(Ordering::Relaxed));
            if down_ms > max.as_millis() as u64 {
                let n = pump.expire(&peer.name, max).await;
                if n > 0 {
                    peer.expired.fetch_add(n as u64, Ordering::Relaxed);
                    tracing::error!(device = %peer.name, kanbans = n, "device unreachable for longer than the outbox age bound ({}s): its kanbans are dead letters (expired)", max.as_secs());
                }
            }
        }
        if refused {
            tracing::error!(device = %peer.name, "federation link refused: {why}");
        } else {
            tracing::warn!(device = %peer.name, in_flight = lost, "federation link down: {why}");
        }
        if stable {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(if refused { backoff.max(Duration::from_secs(2)) } else { backoff }).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection to `peer`, directly or (`via`) through the master, which relays.
async fn connection(f: &Federation, peer: &Peer, pump: &Pump, via: Option<&str>) -> End {
    let (dial_name, addr) = match via {
        Some(m) => match f.peer(m).and_then(|p| p.addr()) {
            Some(a) => (m.to_owned(), a),
            None => return End::Down(format!("no address for the master `{m}` to relay through")),
        },
        None => match peer.addr() {
            Some(a) => (peer.name.clone(), a),
            None => return End::Down("no address".into()),
        },
    };
    let to = match resolve(&addr).await {
        Ok(a) => a,
        Err(e) => return End::Down(e),
    };
    let conn = match f.dial(to, &dial_name).await {
        Ok(c) => c,
        Err(super::DialError::Refused(e)) => return End::Refused(e),
        Err(super::DialError::Down(e)) => return End::Down(e),
    };
    peer.connects.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut v) = peer.via.lock() {
        *v = via.map(str::to_owned);
    }
    let end = open_link(f, peer, pump, &conn, via.is_none()).await;
    conn.close(quinn::VarInt::from_u32(0), b"link ended");
    end
}

async fn open_link(f: &Federation, peer: &Peer, pump: &Pump, conn: &quinn::Connection, direct: bool) -> End {
    let timing = f.opts.timing;
    let dead = Duration::from_micros(timing.dead_after);
    fn down<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> End {
        move |e| End::Down(format!("{what}: {e}"))
    }
    let (mut cs, mut cr) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return End::Down(format!("cannot open the control stream: {e}")),
    };
    let (sender, hello) = Sender::<Tag>::new(&f.me, &peer.name, timing, mono_us());
    if let Err(e) = write_frame(&mut cs, &hello).await {
        return End::Down(format!("hello: {e}"));
    }
    let mut cdec = FrameDecoder::default();
    let welcome = match tokio::time::timeout(dead, read_frame(&mut cr, &mut cdec)).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return End::Down("the peer closed the control stream".into()),
        Ok(Err(e)) => return End::Down(format!("waiting for the welcome: {e}")),
        Err(_) => return End::Down("no welcome in time".into()),
    };
    let mut sender = sender;
    match sender.on_frame(welcome, mono_us()) {
        Ok(_) => {}
        Err(LinkError::Refused(why)) => return End::Refused(why),
        Err(e @ LinkError::Version(..)) => return End::Refused(e.to_string()),
        Err(e) => return End::Down(e.to_string()),
    }
    if let Ok(mut s) = pump.sender.lock() {
        *s = Some(sender);
    }
    let (mut ds, mut dr) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return End::Down(format!("cannot open the kanban stream: {e}")),
    };
    peer.heard();
    peer.set_state(LinkState::Up);
    peer.last_up.store(super::wall_ms(), Ordering::Relaxed);
    match peer.via.lock().ok().and_then(|v| v.clone()) {
        Some(m) => {
            tracing::warn!(device = %peer.name, via = %m, "federation link up through the master (the device is unreachable directly)")
        }
        None => tracing::info!(device = %peer.name, "federation link up"),
    }
    let room = tokio::sync::Notify::new();

    let control = async {
        let mut tick = super::heartbeat_tick(&timing);
        loop {
            tokio::select! {
                r = read_frame(&mut cr, &mut cdec) => {
                    let frame = r.map_err(down("control stream"))?.ok_or_else(|| End::Down("the peer closed the control stream".into()))?;
                    let now = mono_us();
                    match pump.sender(|s| s.on_frame(frame, now)) {
                        Some(Ok(_)) => {}
                        Some(Err(LinkError::Refused(w))) => return Err(End::Refused(w)),
                        Some(Err(e)) => return Err(End::Down(e.to_string())),
                        None => return Err(End::Down("link state gone".into())),
                    }
                    peer.heard();
                    if let Some(Some(rtt)) = pump.sender(|s| s.rtt()) {
                        peer.rtt_us.store(rtt.max(1), Ordering::Relaxed);
                    }
                }
                _ = tick.tick() => {
                    let now = mono_us();
                    match pump.sender(|s| s.tick(now)) {
                        Some(Ok(Some(ping))) => write_frame(&mut cs, &ping).await.map_err(down("ping"))?,
                        Some(Ok(None)) => {}
                        Some(Err(e)) => return Err(End::Down(e.to_string())),
                        None => return Err(End::Down("link state gone".into())),
                    }
                }
            }
        }
    };
    let acks = async {
        let mut dec = FrameDecoder::default();
        loop {
            let frame = read_frame(&mut dr, &mut dec)
                .await
                .map_err(down("kanban stream"))?
                .ok_or_else(|| End::Down("the peer closed the kanban stream".into()))?;
            let now = mono_us();
            let tags = match pump.sender(|s| s.on_frame(frame, now)) {
                Some(Ok(t)) => t,
                Some(Err(e)) => return Err(End::Down(e.to_string())),
                None => return Err(End::Down("link state gone".into())),
            };
            peer.heard();
            peer.acked.fetch_add(tags.len() as u64, Ordering::Relaxed);
            pump.acked(tags).await;
            room.notify_one();
        }
    };
    let data = async {
        let mut buf = Vec::new();
        loop {
            let free = pump.sender(|s| s.room()).unwrap_or(0);
            if free == 0 {
                room.notified().await;
                continue;
            }
            let tags = pump.take(free).await.map_err(End::Down)?;
            // Frames of about BATCH_BYTES, numbered on; the kanbans are the link's (in flight) before the first
            // byte is written, so a failed write loses none of them.
            buf.clear();
            let Some(mut seq) = pump.sender(|s| s.next_seq()) else { return Err(End::Down("link state gone".into())) };
            let mut i = 0;
            while i < tags.len() {
                let mut j = i;
                let mut bytes = 0;
                while j < tags.len() && (j == i || bytes + tags[j].bytes.len() <= BATCH_BYTES) {
                    bytes += tags[j].bytes.len();
                    j += 1;
                }
                kanbans_frame(seq, tags[i..j].iter().map(|t| t.bytes.as_slice()), &mut buf);
                seq += (j - i) as u64;
                i = j;
            }
            let n = tags.len() as u64;
            if pump.sender(|s| s.sent(tags)).is_none() {
                return Err(End::Down("link state gone".into()));
            }
            peer.sent.fetch_add(n, Ordering::Relaxed);
            ds.write_all(&buf).await.map_err(|e| End::Down(format!("kanban stream: {e}")))?;
        }
    };
    // Files go on direct links only (a master does not relay them): through the master they wait.
    let transfers = async {
        if direct {
            transfer_loop(f, peer, pump, conn).await
        } else {
            std::future::pending().await
        }
    };
    let r: Result<(), End> = tokio::select! {
        r = control => r,
        r = acks => r,
        r = data => r,
        r = transfers => r,
    };
    r.err().unwrap_or_else(|| End::Down("link ended".into()))
}

/// Sends the files of the kanbans set aside, one kanban at a time, in order; each, once its files are in place
/// there, goes to the kanban stream rewritten. A receiver that cannot take a file now (disk full, quota, busy) is
/// asked again later (backoff up to 30 s): the kanban waits, nothing is lost.
async fn transfer_loop(f: &Federation, peer: &Peer, pump: &Pump, conn: &quinn::Connection) -> Result<(), End> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let p = pump.next_pending().await;
        match files::transfer(f, peer, conn, &p).await {
            Ok(k) => {
                pump.files_done(&k);
                backoff = Duration::from_secs(1);
            }
            Err(files::Failure::Dead(reason, detail)) => {
                f.files.device(&peer.name).failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(device = %peer.name, kanban = %p.kanban.id, "kanban not sent: {detail}");
                pump.files_failed(reason, detail).await;
            }
            Err(files::Failure::Later(why)) => {
                tracing::warn!(device = %peer.name, kanban = %p.kanban.id, "files not sent yet ({why}); trying again in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(files::Failure::Connection(e)) => {
                if conn.close_reason().is_some() {
                    return Err(End::Down(format!("file stream: {e}")));
                }
                tracing::warn!(device = %peer.name, kanban = %p.kanban.id, "file stream broken ({e}); trying again in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
