use super::*;
use crate::codec::{encode_into, FrameDecoder};
use aion_model::kanban::{Kanban, KanbanId};
use proptest::prelude::*;

fn crossing(route: usize, n: u64) -> Crossing {
    let k = Kanban { id: KanbanId((route as u128) << 64 | u128::from(n)), process_number: 1, ..Kanban::default() };
    Crossing { service: format!("svc{route}"), hops: 1, kanban: k.into_wire() }
}

fn open_pair(window: u32) -> (Sender<(usize, u64)>, Receiver) {
    let (mut s, hello) = Sender::new("a", "b", Timing::default(), 0);
    let (r, welcome) = Receiver::accept("b", hello, window, Timing::default(), 0).expect("accepted");
    assert_eq!(s.on_frame(welcome, 0).expect("welcome"), Vec::<(usize, u64)>::new());
    (s, r)
}

#[test]
fn handshake_negotiates_the_newest_common_version_and_opens_the_window() {
    let (s, r) = open_pair(8);
    assert_eq!(s.version(), Some(VERSION_MAX));
    assert_eq!(r.version(), VERSION_MAX);
    assert_eq!(s.room(), 8);
}

#[test]
fn a_sender_has_no_room_before_the_welcome() {
    let (s, _) = Sender::<u32>::new("a", "b", Timing::default(), 0);
    assert_eq!(s.room(), 0);
}

#[test]
fn hellos_the_receiver_must_refuse() {
    let t = Timing::default();
    let hello = |min, max, to: &str| Frame::Hello { min, max, from: "a".into(), to: to.into() };
    let err = |f| Receiver::accept("b", f, 8, t, 0).expect_err("refused");
    let e = err(hello(VERSION_MAX + 1, VERSION_MAX + 5, "b"));
    assert_eq!(e, LinkError::Version(VERSION_MAX + 1, VERSION_MAX + 5));
    assert!(matches!(e.refusal(), Frame::Refuse { reason } if reason.contains("no protocol version in common")));
    assert_eq!(err(hello(5, 1, "b")), LinkError::Version(5, 1), "an empty range");
    assert!(matches!(err(hello(1, 1, "c")), LinkError::Refused(r) if r.contains("not `c`")), "wrong device");
    assert!(matches!(err(Frame::Ping { nonce: 1 }), LinkError::Protocol(_)), "not a hello");
}

#[test]
fn a_refusal_ends_the_sender() {
    let (mut s, _) = Sender::<u32>::new("a", "b", Timing::default(), 0);
    let e = s.on_frame(Frame::Refuse { reason: "revoked".into() }, 1).err();
    assert_eq!(e, Some(LinkError::Refused("revoked".into())));
}

#[test]
fn acks_give_back_the_handles_in_order_and_reopen_the_window() {
    let (mut s, mut r) = open_pair(4);
    let f = s.send((0..3).map(|n| crossing(0, n)).collect(), (0..3).map(|n| (0, n)));
    assert_eq!(s.room(), 1);
    let Incoming::Deliver { first, items } = r.on_frame(f, 1).expect("deliver") else { panic!("not a delivery") };
    assert_eq!((first, items.len()), (0, 3));
    let ack = r.committed(2).expect("ack");
    assert_eq!(s.on_frame(ack, 2).expect("acked"), vec![(0, 0), (0, 1)]);
    assert_eq!(s.room(), 3);
    assert_eq!(r.committed(2), None, "nothing new to acknowledge");
    assert_eq!(r.committed(99), Some(Frame::Ack { upto: 3 }), "never beyond what was received");
    assert_eq!(s.on_frame(Frame::Ack { upto: 3 }, 3).expect("acked"), vec![(0, 2)]);
    assert!(s.on_frame(Frame::Ack { upto: 9 }, 3).is_err(), "an ack for kanbans never sent");
}

#[test]
fn the_receiver_refuses_gaps_and_overdrawn_credit() {
    let (_, mut r) = open_pair(2);
    let gap = Frame::Kanbans { first: 1, items: vec![crossing(0, 1)] };
    assert!(matches!(r.on_frame(gap, 0), Err(LinkError::Protocol(m)) if m.contains("expected 0")));
    let (_, mut r) = open_pair(2);
    let over = Frame::Kanbans { first: 0, items: (0..3).map(|n| crossing(0, n)).collect() };
    assert!(matches!(r.on_frame(over, 0), Err(LinkError::Protocol(m)) if m.contains("over the window")));
    let (_, mut r) = open_pair(2);
    assert!(r.on_frame(Frame::Welcome { version: 1, window: 1 }, 0).is_err(), "a frame out of place");
}

#[test]
fn heartbeats_measure_the_round_trip_and_declare_silence() {
    let t = Timing { ping_every: 100, dead_after: 350 };
    let (mut s, hello) = Sender::<u32>::new("a", "b", t, 0);
    let (mut r, welcome) = Receiver::accept("b", hello, 8, t, 0).expect("accepted");
    s.on_frame(welcome, 0).expect("open");
    assert_eq!(s.tick(50).expect("alive"), None);
    let ping = s.tick(100).expect("alive").expect("a ping is due");
    let Incoming::Reply(pong) = r.on_frame(ping, 101).expect("pong") else { panic!("no pong") };
    s.on_frame(pong, 107).expect("pong");
    assert_eq!(s.rtt(), Some(7));
    assert!(r.tick(400).is_ok(), "heard at 101");
    assert_eq!(r.tick(451), Err(LinkError::Silent(350)));
    assert!(s.tick(400).is_ok());
    assert_eq!(s.tick(457), Err(LinkError::Silent(350)));
}

#[test]
fn dedup_remembers_a_bounded_window_per_service() {
    let mut d = Dedup::new(2);
    assert!(d.first_time("x", KanbanId(1)));
    assert!(!d.first_time("x", KanbanId(1)));
    assert!(d.first_time("y", KanbanId(1)), "the same id for another service is another kanban");
    assert!(d.first_time("x", KanbanId(2)));
    assert_eq!(d.len(), 2);
    assert!(d.first_time("x", KanbanId(1)), "forgotten past the window");
}

#[test]
fn batches_cut_by_count_and_bytes_and_keep_order() {
    let b = batches((0..10).collect::<Vec<u32>>(), 4, |_| 1);
    assert_eq!(b, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
    let b = batches(vec![1usize, BATCH_BYTES, 1, 1], 100, |n| *n);
    assert_eq!(b, vec![vec![1], vec![BATCH_BYTES], vec![1, 1]], "a large one goes alone");
}

#[test]
fn frames_survive_the_codec() {
    let f = Frame::Kanbans { first: 7, items: vec![crossing(1, 2)] };
    let mut wire = Vec::new();
    encode_into(&f, &mut wire).expect("encode");
    let mut d = FrameDecoder::default();
    d.push(&wire);
    assert_eq!(d.decode::<Frame>().expect("decode"), Some(f));
}

proptest! {
    #[test]
    fn a_frame_of_encoded_items_is_the_frame(first in any::<u64>(), n in 0usize..300) {
        let items: Vec<Crossing> = (0..n as u64).map(|i| crossing(1, i)).collect();
        let encoded: Vec<Vec<u8>> = items
            .iter()
            .map(|c| CrossingRef { service: &c.service, hops: c.hops, kanban: &c.kanban }.encode())
            .collect();
        let mut wire = Vec::new();
        kanbans_frame(first, encoded.iter().map(Vec::as_slice), &mut wire);
        let mut same = Vec::new();
        encode_into(&Frame::Kanbans { first, items: items.clone() }, &mut same).expect("encode");
        prop_assert_eq!(&wire, &same);
        let mut d = FrameDecoder::default();
        d.push(&wire);
        prop_assert_eq!(d.decode::<Frame>().expect("decode"), Some(Frame::Kanbans { first, items }));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut d = FrameDecoder::default();
        d.push(&bytes);
        let _ = d.decode::<Frame>();
    }
}

/// One step of the simulated network.
#[derive(Debug, Clone)]
enum Op {
    /// The sender sends up to this many kanbans (within its room).
    Send(usize),
    /// The network carries the next frame sender → receiver.
    Forward,
    /// The receiver commits this many of what it received.
    Commit(usize),
    /// The network carries the next frame receiver → sender.
    Back,
    /// The connection is lost; the receiver had committed this many more of what it received.
    Cut(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..8).prop_map(Op::Send),
        3 => Just(Op::Forward),
        2 => (0usize..6).prop_map(Op::Commit),
        3 => Just(Op::Back),
        1 => (0usize..6).prop_map(Op::Cut),
    ]
}

/// A sender device with per-route outboxes and a receiver device, joined by a connection that can be cut.
struct World {
    window: u32,
    outbox: Vec<VecDeque<u64>>,
    /// Kanbans lost with a connection: sent again first, before anything new.
    resend: VecDeque<(usize, u64)>,
    sender: Sender<(usize, u64)>,
    receiver: Receiver,
    to_receiver: VecDeque<Frame>,
    to_sender: VecDeque<Frame>,
    /// Received, not yet committed: (sequence number, route, n).
    received: VecDeque<(u64, usize, u64)>,
    dedup: Dedup,
    delivered: Vec<Vec<u64>>,
    next_route: usize,
}

impl World {
    fn new(routes: usize, per_route: u64, window: u32) -> World {
        let (sender, receiver) = open_pair(window);
        World {
            window,
            outbox: (0..routes).map(|_| (0..per_route).collect()).collect(),
            resend: VecDeque::new(),
            sender,
            receiver,
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            received: VecDeque::new(),
            dedup: Dedup::new(window as usize),
            delivered: vec![Vec::new(); routes],
            next_route: 0,
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Send(n) => {
                let n = n.min(self.sender.room());
                let mut tags: Vec<(usize, u64)> = Vec::new();
                while tags.len() < n {
                    let Some(t) = self.resend.pop_front() else { break };
                    tags.push(t);
                }
                // Then round-robin over the routes, each in its own order.
                while tags.len() < n {
                    let routes = self.outbox.len();
                    let Some(r) =
                        (0..routes).map(|i| (self.next_route + i) % routes).find(|r| !self.outbox[*r].is_empty())
                    else {
                        break;
                    };
                    self.next_route = r + 1;
                    if let Some(k) = self.outbox[r].pop_front() {
                        tags.push((r, k));
                    }
                }
                if !tags.is_empty() {
                    let items = tags.iter().map(|(r, k)| crossing(*r, *k)).collect();
                    let f = self.sender.send(items, tags);
                    self.to_receiver.push_back(f);
                }
            }
            Op::Forward => {
                if let Some(f) = self.to_receiver.pop_front() {
                    match self.receiver.on_frame(f, 0).expect("a correct sender never breaks the protocol") {
                        Incoming::Deliver { first, items } => {
                            for (i, c) in items.into_iter().enumerate() {
                                let r: usize = c.service[3..].parse().expect("route");
                                self.received.push_back((first + i as u64, r, c.kanban.id.0 as u64));
                            }
                        }
                        Incoming::Reply(f) => self.to_sender.push_back(f),
                    }
                }
            }
            Op::Commit(n) => {
                self.commit(n);
                let upto = self.received.front().map_or(u64::MAX, |(s, _, _)| *s);
                if let Some(ack) = self.receiver.committed(upto) {
                    self.to_sender.push_back(ack);
                }
            }
            Op::Back => {
                if let Some(f) = self.to_sender.pop_front() {
                    let acked = self.sender.on_frame(f, 0).expect("a correct receiver never breaks the protocol");
                    // Acknowledged kanbans leave the outbox for good (they already left the queue).
                    drop(acked);
                }
            }
            Op::Cut(n) => {
                // What the receiver was committing when the connection went completes (or not) in order.
                self.commit(n);
                self.received.clear();
                self.to_receiver.clear();
                self.to_sender.clear();
                let (s, hello) = Sender::new("a", "b", Timing::default(), 0);
                let old = std::mem::replace(&mut self.sender, s);
                // Unacknowledged kanbans go first on the next connection, in the order they were sent.
                let mut lost: VecDeque<(usize, u64)> = old.lost().into();
                lost.extend(self.resend.drain(..));
                self.resend = lost;
                let (rx, welcome) = Receiver::accept("b", hello, self.window, Timing::default(), 0).expect("accepted");
                self.receiver = rx;
                self.sender.on_frame(welcome, 0).expect("welcome");
            }
        }
    }

    fn commit(&mut self, n: usize) {
        for _ in 0..n {
            let Some((_, r, k)) = self.received.pop_front() else { break };
            if self.dedup.first_time(&format!("svc{r}"), KanbanId((r as u128) << 64 | u128::from(k))) {
                self.delivered[r].push(k);
            }
        }
    }

    fn drain(&mut self) {
        for _ in 0..100_000 {
            if self.outbox.iter().all(|o| o.is_empty()) && self.resend.is_empty() && self.sender.in_flight() == 0 {
                return;
            }
            for op in [Op::Send(8), Op::Forward, Op::Commit(8), Op::Back] {
                self.step(op);
            }
        }
        panic!("the link did not drain");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Random interleavings of sends, deliveries, commits, acks and connection cuts: every kanban arrives
    /// exactly once, in order per route.
    #[test]
    fn cuts_lose_nothing_duplicate_nothing_and_keep_order_per_route(
        ops in proptest::collection::vec(op(), 0..200),
        window in 1u32..12,
        routes in 1usize..4,
    ) {
        let per_route = 30u64;
        let mut w = World::new(routes, per_route, window);
        for op in ops {
            w.step(op);
        }
        w.drain();
        for r in 0..routes {
            prop_assert_eq!(&w.delivered[r], &(0..per_route).collect::<Vec<_>>(), "route {}", r);
        }
    }
}
