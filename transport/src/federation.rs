//! The federation protocol between two devices (cluster mode) as sans-IO state machines: no socket, no clock
//! (the time is an argument, in microseconds of any monotonic clock), no tokio. The QUIC driver in `aion-actors` feeds them frames and ticks.
//!
//! A link carries kanbans one way: the device that has kanbans for another dials it (the **sender**, client of
//! the QUIC connection) and the dialled device takes them (the **receiver**). Two devices that send both ways
//! hold two links. On one link:
//!
//! - the control stream carries [`Frame::Hello`] (sender) → [`Frame::Welcome`] or [`Frame::Refuse`]
//!   (receiver), then heartbeats ([`Frame::Ping`] → [`Frame::Pong`]);
//! - the kanban stream carries [`Frame::Kanbans`] (sender) and cumulative [`Frame::Ack`]s (receiver), so a
//!   burst of kanbans never delays a heartbeat.
//!
//! Kanbans get sequence numbers from 0 on each connection. The receiver acknowledges a sequence number only
//! once what it carried is committed on the receiving device (queued durably, or dead-lettered there with a
//! reason); the sender keeps every unacknowledged kanban and, when the connection is lost, gives them back in
//! order ([`Sender::lost`]) to go first on the next connection. The receiver drops what it has already taken
//! ([`Dedup`], keyed by target service and kanban id, kept across connections), so a link cut costs no loss,
//! no reordering and no duplicate; only a receiver that restarts between committing and acknowledging sees
//! the unacknowledged kanbans again (at most one window, as a single-device session after a crash).
//!
//! Flow control is by credit: the receiver grants a window in its welcome; the sender never has more than that
//! many kanbans unacknowledged, and a receiver that gets more closes the link (a broken or hostile peer).

use crate::codec::MAX_FRAME;
use aion_model::{KanbanId, WireKanban};
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};

/// The oldest protocol version this build speaks.
pub const VERSION_MIN: u16 = 1;
/// The newest protocol version this build speaks.
pub const VERSION_MAX: u16 = 1;
/// The QUIC application protocol (ALPN) of federation links.
pub const ALPN: &[u8] = b"aion-federation";

/// The default credit window: kanbans a sender may have unacknowledged on one link.
pub const DEFAULT_WINDOW: u32 = 4096;
/// A batch of kanbans is cut at this many encoded bytes (one larger kanban still goes alone).
pub const BATCH_BYTES: usize = 1 << 20;
// The largest kanban, alone in a batch with its service name, fits a frame.
const _: () = assert!(aion_model::kanban::MAX_KANBAN_BYTES + (32 << 10) <= MAX_FRAME);

/// One kanban crossing to another device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crossing {
    /// The service it goes to on the receiving device (the kanban's `process_number` is the instance).
    pub service: String,
    /// How many times its chain has been routed (the hop limit spans devices).
    pub hops: u32,
    /// The kanban.
    pub kanban: WireKanban,
}

/// What crosses a federation link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Sender → receiver, first on the control stream: the versions it speaks, who it is, whom it dials.
    Hello {
        /// Oldest version the sender speaks.
        min: u16,
        /// Newest version the sender speaks.
        max: u16,
        /// The sender's device name (its certificate must name it).
        from: String,
        /// The device it means to reach.
        to: String,
    },
    /// Receiver → sender: the link is open.
    Welcome {
        /// The version both speak (the newest in both ranges).
        version: u16,
        /// How many kanbans the sender may have unacknowledged.
        window: u32,
    },
    /// Receiver → sender: the link is refused, and why. The connection is closed after it.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Heartbeat (sender → receiver).
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Sender → receiver on the kanban stream: kanbans numbered `first`, `first + 1`, ….
    Kanbans {
        /// Sequence number of the first.
        first: u64,
        /// The kanbans.
        items: Vec<Crossing>,
    },
    /// Receiver → sender on the kanban stream: every kanban numbered below `upto` is committed here.
    Ack {
        /// One past the last committed sequence number.
        upto: u64,
    },
    // Cluster mode's control between a master-aion and its worker-aions (after the link frames: their postcard
    // indexes stay as they are).
    /// Worker → master, first frame of a connection without a certificate: join the cluster with a token.
    Join {
        /// The token's id.
        id: String,
        /// The token's secret.
        secret: String,
        /// The name the worker asks for (its device name).
        name: String,
        /// The public key to certify (ECDSA P-256, uncompressed point).
        public_key: Vec<u8>,
    },
    /// Master → worker: the worker's certificate (PEM), the cluster CA (PEM), the revocation list (PEM, may be
    /// empty) and the master's name.
    Joined {
        /// Certificate.
        cert: String,
        /// CA certificate.
        ca: String,
        /// Revocation list.
        crl: String,
        /// The master's device name.
        master: String,
    },
    /// Worker → master, first frame of its control connection (with its certificate).
    Attach {
        /// Oldest control version the worker speaks.
        min: u16,
        /// Newest control version the worker speaks.
        max: u16,
        /// Its name (its certificate must name it).
        name: String,
        /// Its aion version.
        version: String,
        /// Where it accepts links (`host:port`; an unspecified host means the address it connects from).
        listen: String,
        /// The assignment it runs.
        generation: u64,
    },
    /// Master → worker: the configuration it runs (services.yml's model as JSON), numbered.
    Assign {
        /// Increases with every change.
        generation: u64,
        /// The configuration.
        config: String,
    },
    /// Worker → master, every second (its heartbeat too): its instances (`aion status --json`'s `instances`).
    Report {
        /// JSON array.
        instances: String,
    },
    /// Master → worker: the cluster's revocation list changed (PEM).
    Crl {
        /// The list.
        pem: String,
    },
    /// Worker → master: its certificate expires soon; certify this new public key (ECDSA P-256).
    Renew {
        /// The new key's public point.
        public_key: Vec<u8>,
    },
    /// Master → worker: the renewed certificate (PEM).
    Renewed {
        /// Certificate.
        cert: String,
    },
    /// Master → worker: the archived hops of a kanban's chain (`aion kanban trace` on the master).
    TraceQuery {
        /// A kanban id or trace id (hex).
        id: String,
    },
    /// Worker → master: those hops (JSON array of the archive's rows; empty without an archive).
    TraceRows {
        /// JSON.
        rows: String,
    },
    /// A request over the network, the first frame of its own connection: a control request line (the Unix
    /// control socket's JSON) from an admin identity (`<name>.aion-admin`), or a local trace query from a peer
    /// device.
    Ask {
        /// The asking identity (its certificate must name it).
        from: String,
        /// The control request line.
        request: Vec<u8>,
    },
    /// The answer to an [`Frame::Ask`]: the control reply line.
    Answer {
        /// The reply line.
        reply: Vec<u8>,
    },
}

/// Why a link ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer refused the link.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// No version in common.
    #[error("no protocol version in common (ours {VERSION_MIN}..={VERSION_MAX}, theirs {0}..={1})")]
    Version(u16, u16),
    /// The peer broke the protocol (a frame out of place, a gap in the numbering, credit exceeded).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Nothing heard from the peer for too long (µs).
    #[error("peer silent for {} ms", .0 / 1000)]
    Silent(u64),
}

impl LinkError {
    /// The frame that tells the peer why its link is refused.
    pub fn refusal(&self) -> Frame {
        Frame::Refuse { reason: self.to_string() }
    }
}

/// Heartbeat timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A ping goes out this often (µs).
    pub ping_every: u64,
    /// The link is declared lost after this long without hearing anything (µs).
    pub dead_after: u64,
}

impl Default for Timing {
    /// A ping every second; lost after 4 s of silence.
    fn default() -> Self {
        Timing { ping_every: 1_000_000, dead_after: 4_000_000 }
    }
}

/// When the peer was last heard and the heartbeat state.
#[derive(Debug, Clone)]
struct Heartbeat {
    timing: Timing,
    heard: u64,
    pinged: u64,
    outstanding: Option<(u64, u64)>,
    next_nonce: u64,
    rtt: Option<u64>,
}

impl Heartbeat {
    fn new(timing: Timing, now: u64) -> Heartbeat {
        Heartbeat { timing, heard: now, pinged: now, outstanding: None, next_nonce: 1, rtt: None }
    }

    fn check(&self, now: u64) -> Result<(), LinkError> {
        let silent = now.saturating_sub(self.heard);
        if silent >= self.timing.dead_after {
            return Err(LinkError::Silent(silent));
        }
        Ok(())
    }
}

/// The sending side of a link. `T` is the driver's handle on each kanban in flight (given back when it is
/// acknowledged or when the link is lost).
#[derive(Debug)]
pub struct Sender<T> {
    open: Option<u16>,
    window: u64,
    /// Sequence number of `inflight[0]`.
    base: u64,
    inflight: VecDeque<T>,
    hb: Heartbeat,
}

impl<T> Sender<T> {
    /// A sender from `me` to `peer`, connected at `now` (µs), and its hello.
    pub fn new(me: &str, peer: &str, timing: Timing, now: u64) -> (Sender<T>, Frame) {
        let hello = Frame::Hello { min: VERSION_MIN, max: VERSION_MAX, from: me.to_owned(), to: peer.to_owned() };
        let s = Sender { open: None, window: 0, base: 0, inflight: VecDeque::new(), hb: Heartbeat::new(timing, now) };
        (s, hello)
    }

    /// The version in use once the peer welcomed the link.
    pub fn version(&self) -> Option<u16> {
        self.open
    }

    /// How many more kanbans may be sent now (0 until welcomed).
    pub fn room(&self) -> usize {
        if self.open.is_none() {
            return 0;
        }
        self.window.saturating_sub(self.inflight.len() as u64) as usize
    }

    /// Kanbans sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The last measured round trip (µs).
    pub fn rtt(&self) -> Option<u64> {
        self.hb.rtt
    }

    /// When the peer was last heard (µs, the clock of the arguments).
    pub fn last_heard(&self) -> u64 {
        self.hb.heard
    }

    /// The frame carrying `items` (at most [`Sender::room`]; the driver's handles in `tags`, one per item, in
    /// the same order).
    pub fn send(&mut self, items: Vec<Crossing>, tags: impl IntoIterator<Item = T>) -> Frame {
        let first = self.base + self.inflight.len() as u64;
        self.inflight.extend(tags);
        Frame::Kanbans { first, items }
    }

    /// The sequence number the next kanban gets.
    pub fn next_seq(&self) -> u64 {
        self.base + self.inflight.len() as u64
    }

    /// Records kanbans sent in a frame the driver encoded itself ([`kanbans_frame`] from [`Sender::next_seq`]):
    /// their handles, in order.
    pub fn sent(&mut self, tags: impl IntoIterator<Item = T>) {
        self.inflight.extend(tags);
    }

    /// Handles a frame from the receiver at `now`: the handles of the kanbans it acknowledges (in order).
    ///
    /// # Errors
    /// The link must close: refused, no common version, or a frame that breaks the protocol.
    pub fn on_frame(&mut self, f: Frame, now: u64) -> Result<Vec<T>, LinkError> {
        self.hb.heard = now;
        match f {
            Frame::Welcome { version, window } if self.open.is_none() => {
                if !(VERSION_MIN..=VERSION_MAX).contains(&version) {
                    return Err(LinkError::Version(version, version));
                }
                if window == 0 {
                    return Err(LinkError::Protocol("welcome with a window of 0".into()));
                }
                self.open = Some(version);
                self.window = u64::from(window);
                Ok(Vec::new())
            }
            Frame::Refuse { reason } => Err(LinkError::Refused(reason)),
            Frame::Pong { nonce } => {
                if let Some((n, at)) = self.hb.outstanding {
                    if n == nonce {
                        self.hb.rtt = Some(now.saturating_sub(at));
                        self.hb.outstanding = None;
                    }
                }
                Ok(Vec::new())
            }
            Frame::Ack { upto } if self.open.is_some() => {
                let end = self.base + self.inflight.len() as u64;
                if upto > end {
                    return Err(LinkError::Protocol(format!("ack up to {upto}, but only {end} sent")));
                }
                let n = upto.saturating_sub(self.base) as usize;
                self.base = self.base.max(upto);
                Ok(self.inflight.drain(..n).collect())
            }
            other => Err(LinkError::Protocol(format!("unexpected frame from the receiver: {}", frame_name(&other)))),
        }
    }

    /// Timers at `now`: the ping to send, if one is due.
    ///
    /// # Errors
    /// [`LinkError::Silent`] when the receiver has not been heard for too long.
    pub fn tick(&mut self, now: u64) -> Result<Option<Frame>, LinkError> {
        self.hb.check(now)?;
        if now.saturating_sub(self.hb.pinged) >= self.hb.timing.ping_every {
            self.hb.pinged = now;
            let nonce = self.hb.next_nonce;
            self.hb.next_nonce += 1;
            if self.hb.outstanding.is_none() {
                self.hb.outstanding = Some((nonce, now));
            }
            return Ok(Some(Frame::Ping { nonce }));
        }
        Ok(None)
    }

    /// The link is lost: the handles of every unacknowledged kanban, oldest first. They must be sent again on
    /// the next connection before anything new, in this order: then every kanban the receiver took after one of
    /// them was unacknowledged with it, so a [`Dedup`] of one window recognises all that comes again.
    pub fn lost(self) -> Vec<T> {
        self.inflight.into()
    }
}

/// What the receiver's driver does with a frame.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// Commit these kanbans (numbered from `first`), then call [`Receiver::committed`].
    Deliver {
        /// Sequence number of the first.
        first: u64,
        /// The kanbans, in order.
        items: Vec<Crossing>,
    },
    /// Send this frame back on the control stream.
    Reply(Frame),
}

/// The receiving side of a link.
#[derive(Debug)]
pub struct Receiver {
    version: u16,
    window: u64,
    /// Next sequence number expected.
    expected: u64,
    /// Everything below is committed and acknowledged.
    acked: u64,
    hb: Heartbeat,
}

impl Receiver {
    /// Answers a sender's hello (`hello` must be the first frame of the control stream), for device `me`, with
    /// a credit of `window` kanbans. The driver has already checked that the peer's certificate names the
    /// device the hello claims (`from`).
    ///
    /// # Errors
    /// Why the link is refused ([`LinkError::refusal`] is the frame to send back; the link then closes).
    pub fn accept(
        me: &str,
        hello: Frame,
        window: u32,
        timing: Timing,
        now: u64,
    ) -> Result<(Receiver, Frame), LinkError> {
        let refuse = |e: LinkError| e;
        let Frame::Hello { min, max, to, .. } = hello else {
            return Err(refuse(LinkError::Protocol(format!("expected a hello, got {}", frame_name(&hello)))));
        };
        if to != me {
            return Err(refuse(LinkError::Refused(format!("this is device `{me}`, not `{to}`"))));
        }
        let version = max.min(VERSION_MAX);
        if min > max || version < min.max(VERSION_MIN) {
            return Err(refuse(LinkError::Version(min, max)));
        }
        let window = window.max(1);
        let r = Receiver { version, window: u64::from(window), expected: 0, acked: 0, hb: Heartbeat::new(timing, now) };
        Ok((r, Frame::Welcome { version, window }))
    }

    /// The version in use.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// When the sender was last heard (µs).
    pub fn last_heard(&self) -> u64 {
        self.hb.heard
    }

    /// Handles a frame from the sender at `now`.
    ///
    /// # Errors
    /// The link must close: a gap in the numbering, more than the window unacknowledged, a frame out of place.
    pub fn on_frame(&mut self, f: Frame, now: u64) -> Result<Incoming, LinkError> {
        self.hb.heard = now;
        match f {
            Frame::Ping { nonce } => Ok(Incoming::Reply(Frame::Pong { nonce })),
            Frame::Kanbans { first, items } => {
                if first != self.expected {
                    return Err(LinkError::Protocol(format!(
                        "kanbans numbered from {first}, expected {}",
                        self.expected
                    )));
                }
                let end = first.saturating_add(items.len() as u64);
                if end.saturating_sub(self.acked) > self.window {
                    return Err(LinkError::Protocol(format!(
                        "{} kanbans unacknowledged, over the window of {}",
                        end - self.acked,
                        self.window
                    )));
                }
                self.expected = end;
                Ok(Incoming::Deliver { first, items })
            }
            other => Err(LinkError::Protocol(format!("unexpected frame from the sender: {}", frame_name(&other)))),
        }
    }

    /// Kanbans below `upto` are committed: the acknowledgement to send, if it says something new.
    pub fn committed(&mut self, upto: u64) -> Option<Frame> {
        let upto = upto.min(self.expected);
        (upto > self.acked).then(|| {
            self.acked = upto;
            Frame::Ack { upto }
        })
    }

    /// Timers at `now`.
    ///
    /// # Errors
    /// [`LinkError::Silent`] when the sender has not been heard for too long (it pings every
    /// [`Timing::ping_every`]).
    pub fn tick(&self, now: u64) -> Result<(), LinkError> {
        self.hb.check(now)
    }
}

impl Frame {
    /// The frame's kind, for messages about a frame out of place (never its content: it may be large).
    pub fn name(&self) -> &'static str {
        frame_name(self)
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Welcome { .. } => "welcome",
        Frame::Refuse { .. } => "refuse",
        Frame::Ping { .. } => "ping",
        Frame::Pong { .. } => "pong",
        Frame::Kanbans { .. } => "kanbans",
        Frame::Ack { .. } => "ack",
        Frame::Join { .. } => "join",
        Frame::Joined { .. } => "joined",
        Frame::Attach { .. } => "attach",
        Frame::Assign { .. } => "assign",
        Frame::Report { .. } => "report",
        Frame::Crl { .. } => "crl",
        Frame::Renew { .. } => "renew",
        Frame::Renewed { .. } => "renewed",
        Frame::TraceQuery { .. } => "trace query",
        Frame::TraceRows { .. } => "trace rows",
        Frame::Ask { .. } => "ask",
        Frame::Answer { .. } => "answer",
    }
}

/// The kanbans a receiver has taken from one sending device recently, by target service and id: a kanban sent
/// again after a link cut (committed here, its acknowledgement lost) is recognised and not taken twice. Kept
/// across connections; holds the last `capacity` (at least the window: the sender sends what a cut left
/// unacknowledged again first, so no more than a window was taken since the oldest of them).
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    seen: HashSet<(u64, KanbanId)>,
    order: VecDeque<(u64, KanbanId)>,
}

impl Dedup {
    /// Remembers the last `capacity` kanbans.
    pub fn new(capacity: usize) -> Dedup {
        Dedup { capacity: capacity.max(1), seen: HashSet::new(), order: VecDeque::new() }
    }

    /// True (and remembered) if `(service, id)` is new; false for a duplicate.
    pub fn first_time(&mut self, service: &str, id: KanbanId) -> bool {
        let key = (service_hash(service), id);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// FNV-1a: stable, and enough to tell a device's few target services apart.
fn service_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A [`Crossing`] by reference: encodes exactly as the owned one, so a kanban is encoded once, straight from
/// the queue, and the bytes are kept for a resend.
#[derive(Debug, Serialize)]
pub struct CrossingRef<'a> {
    /// See [`Crossing::service`].
    pub service: &'a str,
    /// See [`Crossing::hops`].
    pub hops: u32,
    /// See [`Crossing::kanban`].
    pub kanban: &'a WireKanban,
}

impl CrossingRef<'_> {
    /// Its postcard encoding (an item of [`kanbans_frame`]).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

/// The index of [`Frame::Kanbans`] among the frame's variants (postcard writes it as a varint).
const KANBANS_VARIANT: u64 = 5;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Appends one length-prefixed [`Frame::Kanbans`] made of already-encoded items ([`CrossingRef::encode`]) to
/// `out`: the same bytes as encoding the frame, without decoding or copying the kanbans again.
pub fn kanbans_frame<'a>(first: u64, items: impl ExactSizeIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    varint(KANBANS_VARIANT, out);
    varint(first, out);
    varint(items.len() as u64, out);
    for it in items {
        out.extend_from_slice(it);
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Splits `items` into batches of at most `max_items` and about [`BATCH_BYTES`] (by `size`), in order.
pub fn batches<I>(items: Vec<I>, max_items: usize, size: impl Fn(&I) -> usize) -> Vec<Vec<I>> {
    let mut out: Vec<Vec<I>> = Vec::new();
    let mut cur: Vec<I> = Vec::new();
    let mut bytes = 0usize;
    for it in items {
        let n = size(&it);
        if !cur.is_empty() && (cur.len() >= max_items.max(1) || bytes + n > BATCH_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += n;
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests;
