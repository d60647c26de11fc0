//! A [`Slot`] is one instance's bounded input queue plus its counters. It outlives sessions and process
//! restarts, so nothing queued is lost when an instance crashes or reconnects.

use aion_runtime::{KanbanId, WireKanban};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Counters of one instance.
#[derive(Debug, Default)]
pub struct SlotStats {
    /// Kanbans queued for this instance.
    pub kanbans_in: AtomicU64,
    /// Outputs accepted from this instance.
    pub kanbans_out: AtomicU64,
    /// Deliveries sent (including redeliveries).
    pub delivered: AtomicU64,
    /// Kanbans put back because a session ended before acking them.
    pub redelivered: AtomicU64,
    /// Kanbans acknowledged.
    pub acked: AtomicU64,
    /// Outputs dropped as duplicates (same id already accepted).
    pub duplicates: AtomicU64,
    /// Sessions cut because no acknowledgement came within the ack timeout.
    pub ack_timeouts: AtomicU64,
    /// Restarts because a gRPC client lost its session and did not come back (a wedged AION client).
    pub grpc_lost: AtomicU64,
}

/// WireKanban ids are already uniformly mixed (random or derived), so hashing folds the two halves instead of
/// running SipHash on the hot path. HashDoS is not a concern: ids come from local, authenticated sessions.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = ((v as u64) ^ ((v >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdSet = HashSet<KanbanId, BuildHasherDefault<IdHasher>>;

/// The kind of client of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionKind {
    /// The native protocol (the SDK over the Unix socket or an in-memory link).
    #[default]
    Native,
    /// An in-process service on a direct session.
    InProcess,
    /// AION's gRPC API.
    Grpc,
}

impl SessionKind {
    /// Its name in `aion status` (as serialised: kebab-case).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Native => "native",
            SessionKind::InProcess => "in-process",
            SessionKind::Grpc => "grpc",
        }
    }
}

struct Inner {
    ready: VecDeque<Box<WireKanban>>,
    /// Deliveries outstanding in the current session.
    inflight: usize,
    /// Memory held by the queue: ready and in-flight kanbans ([`WireKanban::mem_size`]).
    bytes: usize,
    /// Kanbans queued before this run that are still in the store, not in memory (paged in as there is room).
    backlog: usize,
    /// Producers must wait even with room: the queue is being paged in from the store (new kanbans go after it).
    loading: bool,
    session: u64,
    seen: IdSet,
    seen_order: VecDeque<KanbanId>,
    /// While deliveries are in flight: when the oldest of them was sent, or the last acknowledgement came (with
    /// cumulative acknowledgements, either is when the oldest unacknowledged delivery started waiting).
    /// (Milliseconds of [`coarse_ms`], 0 for none: reading it costs a few nanoseconds on the hot path.)
    progress_at: u64,
    /// A session cut off (see [`Slot::evict`]): its `take` ends it.
    evicted: Option<u64>,
    /// Producers waiting for room, in arrival order (their tickets): admitted first come, first served, so a large
    /// kanban waiting for room is not overtaken for ever by small ones.
    waiters: VecDeque<u64>,
    next_ticket: u64,
    /// The progress counter (outputs + acknowledgements) when the current session opened.
    progress_base: u64,
    /// The pid the current session's client gave (0: in-process or unknown).
    session_pid: u32,
    /// What kind of client the current session is.
    session_kind: SessionKind,
    /// When a gRPC session ended without a terminate kanban (its client went away), until a session opens again.
    grpc_lost_at: Option<std::time::Instant>,
}

impl Inner {
    /// True when a producer (in the line) or the backlog feeder waits for room: only then is freed room worth a
    /// wake-up (notifying costs a lock even with nobody waiting). Both register under the lock before they wait.
    fn someone_waits_for_room(&self) -> bool {
        !self.waiters.is_empty() || self.loading
    }

    /// True when a new kanban of `size` bytes must wait: the queue is full in kanbans or in bytes (an empty queue
    /// always takes one, whatever its size), or the backlog is still being paged in.
    fn must_wait(&self, capacity: usize, max_bytes: usize, size: usize) -> bool {
        self.loading || self.ready.len() >= capacity || (self.bytes > 0 && self.bytes.saturating_add(size) > max_bytes)
    }
}

/// One instance's queue.
pub struct Slot {
    /// Service name.
    pub service: String,
    /// Instance number.
    pub instance: u32,
    /// Bounds in kanbans and bytes (an outbox's change with the device's `outbox…` settings).
    capacity: AtomicUsize,
    max_bytes: AtomicUsize,
    inner: Mutex<Inner>,
    items: Notify,
    space: Notify,
    /// Counters.
    pub stats: SlotStats,
    /// A session is connected.
    pub connected: AtomicBool,
    /// The broker has been asked to start it (cleared when it is running or has exited).
    pub start_requested: AtomicBool,
    /// Its service has `delivery: durable` (decided once from the configuration, read on every hop).
    pub durable: bool,
    /// An output id was ever remembered (until then the duplicate check needs no lock).
    remembered: AtomicBool,
    /// The instance is being stopped (its outputs are accepted without waiting for room downstream).
    pub stopping: AtomicBool,
    /// This instance as a producer ([`KanbanId::producer_key`]): mixed into the id of every output it emits.
    pub producer: u128,
    /// For an outbox (cluster mode: kanbans waiting to cross to `service` on another device), that device;
    /// `None` for an instance's queue.
    pub device: Option<String>,
}

/// Milliseconds of the coarse monotonic clock, plus one (so that 0 means "none"): a few nanoseconds to read, and
/// millisecond resolution is what in-flight ages need.
fn coarse_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(1, |t| (t.tv_sec().max(0) as u64) * 1000 + (t.tv_nsec().max(0) as u64) / 1_000_000 + 1)
}

/// A producer's place in a slot's line of waiting producers; leaving (the push future dropped) gives it up.
struct Place<'a> {
    slot: &'a Slot,
    ticket: Option<u64>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            let mut g = self.slot.lock();
            g.waiters.retain(|w| *w != t);
            drop(g);
            self.slot.space.notify_waiters();
        }
    }
}

/// How many output ids per instance are remembered for deduplication.
const DEDUP_WINDOW: usize = 4096;

/// Default bound of the memory an instance's queue holds (ready and in-flight kanbans): 64 MiB.
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;

/// The bounds of an instance's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Kanbans waiting (not delivered). Default 1024.
    pub kanbans: usize,
    /// Memory of the kanbans waiting and in flight (an empty queue still takes one kanban of any size).
    pub bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits { kanbans: 1024, bytes: DEFAULT_QUEUE_BYTES }
    }
}

impl Slot {
    /// An empty queue of `capacity` kanbans (and [`DEFAULT_QUEUE_BYTES`]).
    pub fn new(service: &str, instance: u32, capacity: usize) -> Slot {
        Slot::with_delivery(service, instance, QueueLimits { kanbans: capacity, bytes: DEFAULT_QUEUE_BYTES }, false)
    }

    /// An empty queue within `limits`, whose kanbans are persisted when `durable`.
    pub fn with_delivery(service: &str, instance: u32, limits: QueueLimits, durable: bool) -> Slot {
        Slot {
            service: service.to_owned(),
            instance,
            capacity: AtomicUsize::new(limits.kanbans.max(1)),
            max_bytes: AtomicUsize::new(limits.bytes.max(1)),
            inner: Mutex::new(Inner {
                ready: VecDeque::new(),
                inflight: 0,
                bytes: 0,
                backlog: 0,
                loading: false,
                session: 0,
                seen: IdSet::default(),
                seen_order: VecDeque::new(),
                progress_at: 0,
                evicted: None,
                waiters: VecDeque::new(),
                next_ticket: 0,
                progress_base: 0,
                session_pid: 0,
                session_kind: SessionKind::Native,
                grpc_lost_at: None,
            }),
            items: Notify::new(),
            space: Notify::new(),
            stats: SlotStats::default(),
            connected: AtomicBool::new(false),
            start_requested: AtomicBool::new(false),
            durable,
            remembered: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            producer: KanbanId::producer_key(service, instance),
            device: None,
        }
    }

    /// The outbox of kanbans waiting to cross to `service` on `device`, within `limits`, durable or not.
    pub fn outbox(device: &str, service: &str, limits: QueueLimits, durable: bool) -> Slot {
        Slot { device: Some(device.to_owned()), ..Slot::with_delivery(service, 0, limits, durable) }
    }

    /// Takes every kanban waiting (not those in flight): the queue is being removed.
    #[allow(clippy::vec_box)] // as `take`
    pub fn drain(&self) -> Vec<Box<WireKanban>> {
        let mut g = self.lock();
        let out: Vec<Box<WireKanban>> = g.ready.drain(..).collect();
        g.bytes = g.bytes.saturating_sub(out.iter().map(|k| k.mem_size()).sum());
        drop(g);
        self.space.notify_waiters();
        out
    }

    /// The durable queue this slot's kanbans are stored in.
    pub fn queue_key(&self) -> crate::store::QueueKey {
        match &self.device {
            Some(d) => crate::store::QueueKey::outbox(d, &self.service),
            None => crate::store::QueueKey::instance(&self.service, self.instance),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic while holding it; the queue itself is still consistent (every
        // critical section is a few VecDeque operations), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a kanban, waiting while the queue is full in kanbans or bytes, or still loading its backlog
    /// (back-pressure to the producer) — unless the `producer` instance is stopping: its outputs no longer wait
    /// (they are accepted so that it can finish and exit; it has at most its output window in flight).
    ///
    /// # Cancel safety
    /// Cancel safe: the kanban is either queued or not, never half-way.
    pub async fn push(&self, k: Box<WireKanban>, producer: Option<&Slot>) {
        let size = k.mem_size();
        let mut k = Some(k);
        // Our place in the line once we have to wait (given up if this future is dropped).
        let mut place = Place { slot: self, ticket: None };
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.lock();
                let stopping = producer.is_some_and(|p| p.stopping.load(Ordering::Acquire));
                let first = match place.ticket {
                    None => g.waiters.is_empty(),
                    Some(t) => g.waiters.front() == Some(&t),
                };
                if stopping || (first && !g.must_wait(self.capacity(), self.max_bytes(), size)) {
                    if let Some(t) = place.ticket.take() {
                        g.waiters.retain(|w| *w != t);
                    }
                    if let Some(k) = k.take() {
                        g.ready.push_back(k);
                        g.bytes += size;
                    }
                    let more = !g.waiters.is_empty();
                    drop(g);
                    self.stats.kanbans_in.fetch_add(1, Ordering::Relaxed);
                    self.items.notify_waiters();
                    if more {
                        self.space.notify_waiters(); // the next in line may fit too
                    }
                    return;
                }
                if place.ticket.is_none() {
                    let t = g.next_ticket;
                    g.next_ticket += 1;
                    g.waiters.push_back(t);
                    place.ticket = Some(t);
                }
            }
            notified.await;
        }
    }

    /// Queues without waiting; gives the kanban back when it would have to wait.
    ///
    /// # Errors
    /// The kanban, when the queue is full (or loading its backlog).
    pub fn try_push(&self, k: Box<WireKanban>) -> Result<(), Box<WireKanban>> {
        let size = k.mem_size();
        let mut g = self.lock();
        if !g.waiters.is_empty() || g.must_wait(self.capacity(), self.max_bytes(), size) {
            return Err(k);
        }
        g.ready.push_back(k);
        g.bytes += size;
        drop(g);
        self.stats.kanbans_in.fetch_add(1, Ordering::Relaxed);
        self.items.notify_waiters();
        Ok(())
    }

    /// Puts back a kanban accepted before (a seed, a kanban adopted from the store), ignoring the bounds.
    pub fn restore(&self, k: Box<WireKanban>) {
        let mut g = self.lock();
        g.bytes += k.mem_size();
        g.ready.push_back(k);
        drop(g);
        self.stats.kanbans_in.fetch_add(1, Ordering::Relaxed);
        self.items.notify_waiters();
    }

    /// Declares `n` kanbans queued before this run and still in the store: they count in the depth, and producers
    /// wait until they are all paged in ([`Slot::end_backlog`]), so that they are delivered first, in order.
    pub fn set_backlog(&self, n: usize) {
        let mut g = self.lock();
        g.backlog = n;
        g.loading = true;
    }

    /// Waits until the queue has room for more of its backlog; returns how many kanbans and bytes may come (at
    /// least one kanban, of any size, when the queue is empty).
    pub async fn backlog_room(&self) -> (usize, usize) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                let (cap, max) = (self.capacity(), self.max_bytes());
                if g.ready.len() < cap && g.bytes < max {
                    return (cap - g.ready.len(), max - g.bytes);
                }
            }
            notified.await;
        }
    }

    /// Queues a kanban of the backlog (paged in from the store).
    pub fn restore_paged(&self, k: Box<WireKanban>) {
        let mut g = self.lock();
        g.bytes += k.mem_size();
        g.ready.push_back(k);
        g.backlog = g.backlog.saturating_sub(1);
        drop(g);
        self.stats.kanbans_in.fetch_add(1, Ordering::Relaxed);
        self.items.notify_waiters();
    }

    /// The whole backlog is in memory: producers may queue again.
    pub fn end_backlog(&self) {
        let mut g = self.lock();
        g.backlog = 0;
        g.loading = false;
        drop(g);
        self.space.notify_waiters();
    }

    /// The instance is being stopped: its outputs no longer wait for room in their targets' queues (see
    /// [`Slot::push`]); wakes producers waiting on this queue so that they notice.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Wakes every producer waiting for room here (to re-check whether it is stopping).
    pub fn wake_producers(&self) {
        self.space.notify_waiters();
    }

    /// Starts a new session and returns its number, unless a session is already connected (an instance has
    /// at most one session; a second client for a live instance is refused).
    pub fn open_session(&self) -> Option<u64> {
        self.open_session_for(0)
    }

    /// [`Slot::open_session`] for a client that says it is process `pid`.
    pub fn open_session_for(&self, pid: u32) -> Option<u64> {
        let mut g = self.lock();
        if self.connected.load(Ordering::SeqCst) {
            return None;
        }
        g.session_pid = pid;
        g.session_kind = SessionKind::Native;
        g.grpc_lost_at = None;
        g.session += 1;
        g.inflight = 0;
        g.progress_at = 0;
        g.evicted = None;
        g.progress_base = self.progress_count();
        self.connected.store(true, Ordering::SeqCst);
        self.items.notify_waiters();
        Some(g.session)
    }

    /// Takes up to `window - inflight` kanbans for `session`, waiting until at least one is available.
    /// Returns an empty vector when `session` is no longer current.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken unless the future completes.
    #[allow(clippy::vec_box)] // the queue holds boxes: they move through, never copied
    pub async fn take(&self, session: u64, window: usize, out: &mut Vec<Box<WireKanban>>) {
        loop {
            let notified = self.items.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.lock();
                if g.session != session || g.evicted == Some(session) {
                    return;
                }
                let room = window.saturating_sub(g.inflight);
                if room > 0 && !g.ready.is_empty() {
                    let n = room.min(g.ready.len());
                    out.extend(g.ready.drain(..n));
                    if g.inflight == 0 {
                        g.progress_at = coarse_ms();
                    }
                    g.inflight += n;
                    let wake = g.someone_waits_for_room();
                    drop(g);
                    self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    if wake {
                        self.space.notify_waiters();
                    }
                    return;
                }
            }
            notified.await;
        }
    }

    /// `n` deliveries of `session`, of `bytes` in all ([`WireKanban::mem_size`]), were acknowledged.
    pub fn acked(&self, session: u64, n: usize, bytes: usize) {
        let mut g = self.lock();
        if g.session == session {
            g.inflight = g.inflight.saturating_sub(n);
            g.progress_at = if g.inflight > 0 { coarse_ms() } else { 0 };
        }
        g.bytes = g.bytes.saturating_sub(bytes);
        let wake = g.someone_waits_for_room();
        drop(g);
        self.stats.acked.fetch_add(n as u64, Ordering::Relaxed);
        self.items.notify_waiters();
        if wake {
            self.space.notify_waiters();
        }
    }

    /// Ends `session`: its unacknowledged kanbans go back to the front of the queue, in order.
    #[allow(clippy::vec_box)] // as `take`
    pub fn close_session(&self, session: u64, unacked: Vec<Box<WireKanban>>) {
        let mut g = self.lock();
        let n = unacked.len();
        for k in unacked.into_iter().rev() {
            g.ready.push_front(k);
        }
        if g.session == session {
            g.inflight = 0;
            g.progress_at = 0;
            g.evicted = None;
            self.connected.store(false, Ordering::SeqCst);
        }
        drop(g);
        self.stats.redelivered.fetch_add(n as u64, Ordering::Relaxed);
        self.items.notify_waiters();
    }

    /// How long the oldest unacknowledged delivery of the current session has been waiting.
    pub fn oldest_inflight_age(&self) -> Option<std::time::Duration> {
        let since = self.lock().progress_at;
        (since > 0).then(|| std::time::Duration::from_millis(coarse_ms().saturating_sub(since)))
    }

    fn progress_count(&self) -> u64 {
        self.stats.kanbans_out.load(Ordering::Relaxed).wrapping_add(self.stats.acked.load(Ordering::Relaxed))
    }

    /// What liveness checks need: the current session (if any), whether deliveries are in flight, its progress
    /// counter (outputs accepted plus acknowledgements: sampled, so the hot path pays nothing for it), and whether
    /// the session has made progress since it opened (a sign of life).
    pub fn liveness(&self) -> Option<(u64, bool, u64, bool)> {
        let g = self.lock();
        if !self.connected.load(Ordering::SeqCst) {
            return None;
        }
        let progress = self.progress_count();
        Some((g.session, g.inflight > 0, progress, progress != g.progress_base))
    }

    /// Cuts the current session off (no acknowledgement within the ack timeout): its next `take` ends it, and
    /// its unacknowledged kanbans go back to the queue. Returns false when no session is connected.
    pub fn evict(&self) -> bool {
        let mut g = self.lock();
        if !self.connected.load(Ordering::SeqCst) {
            return false;
        }
        g.evicted = Some(g.session);
        drop(g);
        self.stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
        self.items.notify_waiters();
        true
    }

    /// Records what kind of client the current session is (shown in the status).
    pub fn set_session_kind(&self, kind: SessionKind) {
        self.lock().session_kind = kind;
    }

    /// Records that a gRPC session ended because its client went away (no terminate kanban).
    pub fn grpc_lost(&self) {
        self.lock().grpc_lost_at = Some(std::time::Instant::now());
    }

    /// How long ago a gRPC client went away without coming back (`None`: it did not, or a session is open).
    pub fn grpc_lost_for(&self) -> Option<std::time::Duration> {
        let g = self.lock();
        if self.connected.load(Ordering::SeqCst) {
            return None;
        }
        g.grpc_lost_at.map(|t| t.elapsed())
    }

    /// Forgets a lost gRPC session (the instance was restarted for it).
    pub fn clear_grpc_lost(&self) {
        self.lock().grpc_lost_at = None;
    }

    /// What kind of client the connected session is, if one is.
    pub fn session_kind(&self) -> Option<SessionKind> {
        let g = self.lock();
        self.connected.load(Ordering::SeqCst).then_some(g.session_kind)
    }

    /// The pid the connected session's client gave, if a session is connected.
    pub fn session_pid(&self) -> Option<u32> {
        let g = self.lock();
        self.connected.load(Ordering::SeqCst).then_some(g.session_pid)
    }

    /// Completes when `session` is cut off by [`Slot::evict`] (or is no longer the current one).
    pub async fn evicted(&self, session: u64) {
        loop {
            let notified = self.items.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                if g.session != session || g.evicted == Some(session) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// True when `session` was cut off by [`Slot::evict`].
    pub fn is_evicted(&self, session: u64) -> bool {
        self.lock().evicted == Some(session)
    }

    /// Wakes a session waiting in [`Slot::take`] so it notices it was replaced.
    pub fn kick(&self) {
        self.items.notify_waiters();
    }

    /// True if `id` was already accepted as an output of this instance (counted as a duplicate).
    pub fn is_duplicate_output(&self, id: KanbanId) -> bool {
        if !self.remembered.load(Ordering::Acquire) {
            return false;
        }
        let dup = self.lock().seen.contains(&id);
        if dup {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        dup
    }

    /// Remembers an accepted output id (after it has been routed).
    pub fn remember_output(&self, id: KanbanId) {
        let mut g = self.lock();
        self.remembered.store(true, Ordering::Release);
        if g.seen.insert(id) {
            g.seen_order.push_back(id);
            if g.seen_order.len() > DEDUP_WINDOW {
                if let Some(old) = g.seen_order.pop_front() {
                    g.seen.remove(&old);
                }
            }
        }
    }

    /// Kanbans waiting (not delivered): in memory, and in the store's backlog.
    pub fn depth(&self) -> usize {
        let g = self.lock();
        g.ready.len() + g.backlog
    }

    /// Memory held by the queue's kanbans (waiting and in flight).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Its memory bound.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Changes its bounds (an outbox whose device's `outbox…` settings changed); producers waiting for room
    /// look again.
    pub fn set_limits(&self, limits: QueueLimits) {
        let (k, b) = (limits.kanbans.max(1), limits.bytes.max(1));
        let grew = self.capacity.swap(k, Ordering::Relaxed) < k;
        let grew = self.max_bytes.swap(b, Ordering::Relaxed) < b || grew;
        if grew {
            self.space.notify_waiters();
        }
    }

    /// Deliveries outstanding in the current session.
    pub fn inflight(&self) -> usize {
        self.lock().inflight
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_kind_names_are_the_serialised_ones() {
        for k in [SessionKind::Native, SessionKind::InProcess, SessionKind::Grpc] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
    use std::sync::Arc;

    fn k(n: u64) -> Box<WireKanban> {
        Box::new(aion_runtime::Kanban { id: KanbanId(n as u128), ..Default::default() }.into_wire())
    }

    #[tokio::test]
    async fn full_queue_blocks_producer_until_space() {
        let s = Arc::new(Slot::new("a", 1, 2));
        s.push(k(1), None).await;
        s.push(k(2), None).await;
        assert!(s.try_push(k(3)).is_err());
        let s2 = s.clone();
        let producer = tokio::spawn(async move { s2.push(k(3), None).await });
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 1, &mut out).await;
        producer.await.expect("producer");
        assert_eq!(s.depth(), 2);
        assert_eq!(out[0].id, KanbanId(1));
    }

    #[tokio::test]
    async fn unacked_go_back_in_order() {
        let s = Slot::new("a", 1, 10);
        for i in 1..=4 {
            s.push(k(i), None).await;
        }
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 3, &mut out).await;
        assert_eq!(out.len(), 3);
        s.close_session(sess, out);
        let sess = s.open_session().expect("free");
        let mut again = Vec::new();
        s.take(sess, 10, &mut again).await;
        let ids: Vec<u128> = again.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![1, 2, 3, 4]);
    }

    #[test]
    fn dedup() {
        let s = Slot::new("a", 1, 1);
        assert!(!s.is_duplicate_output(KanbanId(9)));
        s.remember_output(KanbanId(9));
        assert!(s.is_duplicate_output(KanbanId(9)));
        assert_eq!(s.stats.duplicates.load(Ordering::Relaxed), 1);
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;
    use std::sync::Arc;

    fn sized(n: u64, bytes: usize) -> Box<WireKanban> {
        let mut k = aion_runtime::Kanban { id: KanbanId(n as u128), ..Default::default() }.into_wire();
        k.metadata = aion_runtime::MetadataBytes(vec![0; bytes]);
        Box::new(k)
    }

    #[tokio::test]
    async fn memory_bound_applies_back_pressure_and_takes_one_kanban_of_any_size() {
        let limits = QueueLimits { kanbans: 100, bytes: 10_000 };
        let s = Arc::new(Slot::with_delivery("a", 1, limits, false));
        s.push(sized(1, 50_000), None).await; // empty queue: taken whatever its size
        assert!(s.try_push(sized(2, 10)).is_err(), "over the bound: the next one waits");
        let s2 = s.clone();
        let producer = tokio::spawn(async move { s2.push(sized(2, 4_000), None).await });
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 10, &mut out).await;
        assert!(!producer.is_finished(), "in flight still counts");
        s.acked(sess, 1, out[0].mem_size());
        producer.await.expect("producer");
        assert!(s.bytes() < 10_000 && s.bytes() >= 4_000, "{}", s.bytes());
    }

    #[tokio::test]
    async fn producers_waiting_for_room_are_admitted_in_order_so_a_large_kanban_is_never_starved() {
        let s = Arc::new(Slot::with_delivery("a", 1, QueueLimits { kanbans: 100, bytes: 10_000 }, false));
        s.push(sized(1, 8_000), None).await;
        let s2 = s.clone();
        let large = tokio::spawn(async move { s2.push(sized(2, 5_000), None).await });
        while s.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        // There is room for a small one, but the large one waits first: the small one waits behind it.
        assert!(s.try_push(sized(3, 100)).is_err(), "no overtaking a waiting producer");
        let s3 = s.clone();
        let small = tokio::spawn(async move { s3.push(sized(4, 100), None).await });
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 1, &mut out).await;
        s.acked(sess, 1, out[0].mem_size());
        large.await.expect("large admitted");
        small.await.expect("small admitted after it");
        let mut rest = Vec::new();
        s.take(sess, 10, &mut rest).await;
        let ids: Vec<u128> = rest.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![2, 4], "in arrival order");
    }

    #[tokio::test]
    async fn a_producer_that_gives_up_leaves_the_line() {
        let s = Arc::new(Slot::with_delivery("a", 1, QueueLimits { kanbans: 1, bytes: 1 << 20 }, false));
        s.push(sized(1, 10), None).await;
        let s2 = s.clone();
        let waiting = tokio::spawn(async move { s2.push(sized(2, 10), None).await });
        while s.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        assert!(s.lock().waiters.is_empty(), "its place is given up");
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 1, &mut out).await;
        assert!(s.try_push(sized(3, 10)).is_ok(), "the next producer is not held by a ghost");
    }

    #[tokio::test]
    async fn a_backlog_holds_producers_until_paged_in_and_counts_in_the_depth() {
        let s = Arc::new(Slot::with_delivery("a", 1, QueueLimits { kanbans: 2, bytes: 1 << 20 }, true));
        s.set_backlog(3);
        assert_eq!(s.depth(), 3);
        assert!(s.try_push(sized(9, 10)).is_err(), "new kanbans go after the backlog");
        assert_eq!(s.backlog_room().await.0, 2);
        s.restore_paged(sized(1, 10));
        s.restore_paged(sized(2, 10));
        assert_eq!(s.depth(), 3);
        let s2 = s.clone();
        let room = tokio::spawn(async move { s2.backlog_room().await });
        let sess = s.open_session().expect("free");
        let mut out = Vec::new();
        s.take(sess, 1, &mut out).await;
        assert_eq!(room.await.expect("room").0, 1, "room again once one was taken");
        s.restore_paged(sized(3, 10));
        s.end_backlog();
        s.take(sess, 10, &mut out).await;
        s.push(sized(9, 10), None).await;
        s.take(sess, 10, &mut out).await;
        let ids: Vec<u128> = out.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![1, 2, 3, 9], "backlog first, in order");
    }
}
