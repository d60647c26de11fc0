//! Tests of the session state machines: scripted sequences for each rule, and a model of a runtime queue, a
//! server session, a client session and a service driven through random interleavings of deliveries, handling,
//! reads, lost messages and reconnects.
use super::*;
use aion_model::{Kanban, KanbanId};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn k(id: u128) -> Box<WireKanban> {
    Box::new(Kanban { id: KanbanId(id), ..Kanban::default() }.into_wire())
}

fn hello(version: u16, window: u32) -> Hello {
    Hello { magic: MAGIC, version, service: "s".into(), instance: 2, window, seed: true, pid: 9 }
}

#[test]
fn hello_checks_magic_version_range_and_window() {
    let h = accept_hello(hello(PROTOCOL_VERSION, 0)).expect("accepted");
    assert_eq!((h.service.as_str(), h.instance, h.window, h.seed, h.pid), ("s", 2, 1, true, 9));
    assert_eq!(accept_hello(hello(MIN_PROTOCOL_VERSION, 1 << 20)).map(|h| h.window), Ok(MAX_WINDOW as usize));
    let e = accept_hello(hello(PROTOCOL_VERSION + 1, 8)).expect_err("too new");
    assert!(e.contains("not supported") && e.contains(&format!("{MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}")), "{e}");
    assert!(accept_hello(Hello { magic: 1, ..hello(PROTOCOL_VERSION, 8) }).is_err());
}

#[test]
fn server_numbers_deliveries_and_acknowledges_cumulatively() {
    let mut s = ServerSession::new(3);
    assert_eq!(s.room(), 3);
    assert_eq!((s.deliver(10), s.deliver(11), s.deliver(12)), (1, 2, 3));
    assert_eq!((s.room(), s.handling(), s.last_delivered()), (0, Some(&10), Some(&12)));
    assert_eq!(s.on_message(ClientMsg::Ack { upto: 2 }), Ok(Some(ServerInput::Acknowledged(vec![10, 11]))));
    assert_eq!(s.handling(), Some(&12));
    assert_eq!(
        s.on_message(ClientMsg::Ack { upto: 2 }),
        Ok(Some(ServerInput::Acknowledged(vec![]))),
        "a repeat is a no-op"
    );
    assert_eq!(
        s.on_message(ClientMsg::Ack { upto: 9 }),
        Err(ProtocolError::AckBeyondSent { upto: 9, sent: 3 }),
        "never sent"
    );
    assert_eq!(s.deliver(13), 4);
    assert_eq!(s.close(), vec![12, 13], "unacknowledged go back, oldest first");
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn server_counts_outputs_for_accepted_and_ends_at_bye() {
    let mut s: ServerSession<u32> = ServerSession::new(4);
    assert!(matches!(s.on_message(ClientMsg::Output(k(1))), Ok(Some(ServerInput::Output(_)))));
    assert!(matches!(s.on_message(ClientMsg::Output(k(2))), Ok(Some(ServerInput::Output(_)))));
    assert_eq!(s.take_accepted(), 2);
    assert_eq!(s.take_accepted(), 0, "counted once");
    assert_eq!(s.on_message(ClientMsg::Hello(hello(1, 1))), Err(ProtocolError::SecondHello));
    assert_eq!(s.on_message(ClientMsg::Bye), Ok(Some(ServerInput::Bye)));
    assert!(s.said_bye());
    assert_eq!(s.on_message(ClientMsg::Output(k(3))), Ok(None), "nothing may follow Bye");
    assert_eq!(s.take_accepted(), 0);
}

#[test]
fn server_takes_back_an_undeliverable_and_acknowledges_the_oldest_n() {
    let mut s = ServerSession::new(8);
    s.deliver(1);
    s.deliver(2);
    assert_eq!(s.undeliver(), Some(2));
    assert_eq!(s.deliver(3), 2, "the sequence number is reused: it was never sent");
    s.deliver(4);
    assert_eq!(s.acknowledge_oldest(2), vec![1, 3]);
    assert_eq!(s.acknowledge_oldest(9), vec![4]);
}

#[test]
fn client_keeps_outputs_until_accepted_and_completes_flushes_in_order() {
    let mut c = ClientSession::new();
    assert_eq!(c.flush(), None, "nothing sent: nothing to wait for");
    c.output(k(1));
    c.output(k(2));
    assert_eq!(c.last_output().map(|k| k.id), Some(KanbanId(2)));
    let t1 = c.flush().expect("waits");
    c.output(k(3));
    let t2 = c.flush().expect("waits");
    let mut ev = Vec::new();
    c.on_message(ServerMsg::Accepted { count: 2 }, &mut ev);
    assert_eq!(ev, vec![ClientEvent::Accepted(2), ClientEvent::Flushed(vec![t1])]);
    ev.clear();
    c.on_message(ServerMsg::Accepted { count: 5 }, &mut ev);
    assert_eq!(ev, vec![ClientEvent::Accepted(1), ClientEvent::Flushed(vec![t2])], "never more than sent");
    assert_eq!(c.unaccepted(), 0);
}

#[test]
fn client_acknowledges_the_current_session_only_and_resends_after_a_reconnect() {
    let mut c = ClientSession::new();
    c.handled(0, 3);
    c.handled(0, 2);
    assert_eq!(c.take_ack(), Some(ClientMsg::Ack { upto: 3 }), "cumulative: the highest");
    assert_eq!(c.take_ack(), None);
    c.output(k(7));
    c.request(5, ClientMsg::StaticGet { req: 5, topic: "t".into() });
    c.subscribe("t".into());
    c.handled(0, 4);
    let again = c.reconnected();
    assert_eq!(c.epoch(), 1);
    assert_eq!(c.take_ack(), None, "a delivery of the old session is not acknowledged: it is redelivered");
    assert_eq!(
        again,
        vec![
            ClientMsg::Output(k(7)),
            ClientMsg::StaticGet { req: 5, topic: "t".into() },
            ClientMsg::StaticSubscribe { topic: "t".into() }
        ]
    );
    c.handled(0, 9);
    assert_eq!(c.take_ack(), None, "old epoch");
    let mut ev = Vec::new();
    c.on_message(ServerMsg::StaticList { req: 5, entries: vec![] }, &mut ev);
    c.on_message(ServerMsg::StaticList { req: 5, entries: vec![] }, &mut ev);
    assert_eq!(ev.len(), 1, "a reply is delivered once");
    assert!(c.reconnected().iter().all(|m| !matches!(m, ClientMsg::StaticGet { .. })), "answered: not resent");
    c.close();
    assert!(!c.can_say_bye(), "an output awaits acceptance");
    ev.clear();
    c.on_message(ServerMsg::Accepted { count: 1 }, &mut ev);
    assert!(c.can_say_bye());
    c.on_message(ServerMsg::Error { reason: "x".into() }, &mut ev);
    assert_eq!(ev.last(), Some(&ClientEvent::Reset("x".into())));
}

/// One step of the model.
#[derive(Debug, Clone)]
enum Step {
    /// The runtime sends deliveries while credit allows.
    ServerDeliver,
    /// The runtime reads up to n client messages (routing outputs, answering with `Accepted`).
    ServerRead(usize),
    /// The client reads up to n runtime messages.
    ClientRead(usize),
    /// The service handles its next kanban: one output derived from it, then handled.
    Handle,
    /// The client writes its pending acknowledgement.
    WriteAck,
    /// The connection breaks: messages in flight both ways are lost, the runtime requeues what was not
    /// acknowledged, the client reconnects and resends.
    Disconnect,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::ServerDeliver),
        4 => (1usize..8).prop_map(Step::ServerRead),
        4 => (1usize..8).prop_map(Step::ClientRead),
        6 => Just(Step::Handle),
        2 => Just(Step::WriteAck),
        1 => Just(Step::Disconnect),
    ]
}

/// The runtime's queue, its session, the client, the service, and the link between them.
struct Model {
    queue: VecDeque<Box<WireKanban>>,
    server: ServerSession<Box<WireKanban>>,
    client: ClientSession,
    c2s: VecDeque<ClientMsg>,
    s2c: VecDeque<ServerMsg>,
    /// Deliveries the service has not handled yet: (epoch, seq, input id).
    inbox: VecDeque<(u64, u64, KanbanId)>,
    window: usize,
    /// Output ids the runtime has routed (deduplicated by id, as the runtime does), in order.
    routed: Vec<KanbanId>,
    seen: BTreeSet<KanbanId>,
    /// Input ids the service handled (repeats included), and acknowledged ones.
    handled: Vec<KanbanId>,
    acked: BTreeSet<KanbanId>,
    disconnects: usize,
}

impl Model {
    fn new(n: u128, window: usize) -> Model {
        Model {
            queue: (1..=n).map(k).collect(),
            server: ServerSession::new(window),
            client: ClientSession::new(),
            c2s: VecDeque::new(),
            s2c: VecDeque::new(),
            inbox: VecDeque::new(),
            window,
            routed: Vec::new(),
            seen: BTreeSet::new(),
            handled: Vec::new(),
            acked: BTreeSet::new(),
            disconnects: 0,
        }
    }

    fn apply(&mut self, s: &Step) -> Result<(), TestCaseError> {
        match s {
            Step::ServerDeliver => {
                while self.server.room() > 0 {
                    let Some(item) = self.queue.pop_front() else { break };
                    let seq = self.server.deliver(item);
                    let kanban = self.server.last_delivered().cloned().ok_or_else(|| TestCaseError::fail("no back"))?;
                    self.s2c.push_back(ServerMsg::Deliver { seq, kanban });
                }
            }
            Step::ServerRead(n) => {
                for _ in 0..*n {
                    let Some(m) = self.c2s.pop_front() else { break };
                    match self.server.on_message(m).map_err(|e| TestCaseError::fail(e.to_string()))? {
                        Some(ServerInput::Output(o)) if self.seen.insert(o.id) => self.routed.push(o.id),
                        Some(ServerInput::Acknowledged(items)) => self.acked.extend(items.iter().map(|k| k.id)),
                        _ => {}
                    }
                }
                let count = self.server.take_accepted();
                if count > 0 {
                    self.s2c.push_back(ServerMsg::Accepted { count });
                }
            }
            Step::ClientRead(n) => {
                for _ in 0..*n {
                    let Some(m) = self.s2c.pop_front() else { break };
                    let mut ev = Vec::new();
                    self.client.on_message(m, &mut ev);
                    for e in ev {
                        if let ClientEvent::Deliver { epoch, seq, kanban } = e {
                            // The credit bounds the current session's deliveries not yet handled.
                            let current = self.inbox.iter().filter(|(e, _, _)| *e == epoch).count();
                            prop_assert!(current < self.window, "a delivery beyond the credit window");
                            self.inbox.push_back((epoch, seq, kanban.id));
                        }
                    }
                }
            }
            Step::Handle => {
                let Some((epoch, seq, id)) = self.inbox.pop_front() else { return Ok(()) };
                if epoch != self.client.epoch() {
                    return Ok(()); // of a session that has ended: the runtime redelivers it
                }
                self.handled.push(id);
                // Deterministic output id, derived from the input (as the SDK does).
                self.client.output(k(KanbanId::derive(id, 0).0));
                if let Some(a) = self.client.take_ack() {
                    self.c2s.push_back(a);
                }
                let out = self.client.last_output().cloned().ok_or_else(|| TestCaseError::fail("no output"))?;
                self.c2s.push_back(ClientMsg::Output(Box::new(out)));
                self.client.handled(epoch, seq);
            }
            Step::WriteAck => {
                if let Some(a) = self.client.take_ack() {
                    self.c2s.push_back(a);
                }
            }
            Step::Disconnect => {
                self.disconnects += 1;
                self.c2s.clear();
                self.s2c.clear();
                for item in self.server.close().into_iter().rev() {
                    self.queue.push_front(item);
                }
                self.server = ServerSession::new(self.window);
                self.c2s.extend(self.client.reconnected());
            }
        }
        Ok(())
    }

    /// Runs the link without faults until nothing moves.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..100_000 {
            let before = (self.queue.len(), self.c2s.len(), self.s2c.len(), self.inbox.len(), self.server.in_flight());
            for s in [Step::ServerDeliver, Step::ClientRead(64), Step::Handle, Step::WriteAck, Step::ServerRead(64)] {
                self.apply(&s)?;
            }
            let after = (self.queue.len(), self.c2s.len(), self.s2c.len(), self.inbox.len(), self.server.in_flight());
            if before == after && after == (0, 0, 0, 0, 0) {
                return Ok(());
            }
        }
        Err(TestCaseError::fail("did not settle"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No kanban lost, every output routed exactly once (deduplicated by id), repeats of handling only within the
    /// credit window per disconnect, outputs in the order of their inputs.
    #[test]
    fn random_interleavings_lose_nothing_and_keep_order(
        n in 1u128..40,
        window in 1usize..6,
        steps in prop::collection::vec(step(), 0..300),
    ) {
        let mut m = Model::new(n, window);
        for s in &steps {
            m.apply(s)?;
        }
        m.settle()?;
        let inputs: BTreeSet<KanbanId> = (1..=n).map(KanbanId).collect();
        prop_assert_eq!(m.handled.iter().copied().collect::<BTreeSet<_>>(), inputs.clone(), "every kanban handled");
        prop_assert_eq!(&m.acked, &inputs, "every kanban acknowledged");
        let want: Vec<KanbanId> = (1..=n).map(|i| KanbanId::derive(KanbanId(i), 0)).collect();
        prop_assert_eq!(&m.routed, &want, "each output routed once, in the order of the inputs");
        let repeats = m.handled.len() - n as usize;
        prop_assert!(repeats <= m.disconnects * window, "{} repeats, {} disconnects, window {}", repeats, m.disconnects, window);
        prop_assert_eq!(m.client.unaccepted(), 0);
    }
}
