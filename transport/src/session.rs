//! The session protocol as sans-IO state machines: no sockets, no clock, no tasks. Drivers (the runtime's Unix
//! and in-memory link sessions, its direct sessions for in-process services, the SDK's client) feed them what
//! happened and do what they say; the machines hold the protocol's state and rules:
//!
//! - [`accept_hello`]: the handshake's checks (magic, a version in the accepted range, the credit window);
//! - [`ServerSession`]: the runtime's side of one session — deliveries in flight with their sequence numbers,
//!   cumulative acknowledgements, outputs awaiting their `Accepted`, `Bye`, and what goes back to the queue when
//!   the session ends. Generic over what it delivers, so that a peer link forwarding kanbans to another device
//!   (store-and-forward) reuses the same bookkeeping;
//! - [`ClientSession`]: a client's side — outputs kept until accepted and resent after a reconnect, requests
//!   awaiting replies, subscriptions, flushes, the coalesced acknowledgement, and the epoch that tells deliveries
//!   of a session that has ended from those of the current one.
//!
//! Every rule is checked here with scripted and random message sequences, disconnects and reconnects
//! included (see the tests: no kanban lost, duplicates only within the credit window, order kept).

use crate::proto::{ClientMsg, Hello, ServerMsg, MAGIC, PROTOCOL_VERSION};
use aion_model::WireKanban;
use std::collections::{BTreeMap, VecDeque};

/// The oldest protocol version this build accepts (the newest is [`PROTOCOL_VERSION`]).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The largest credit window a client may ask for.
pub const MAX_WINDOW: u32 = 4096;

/// What an accepted `Hello` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The service the client is an instance of.
    pub service: String,
    /// Its instance number.
    pub instance: u32,
    /// Deliveries it takes in flight at once (clamped to 1..=[`MAX_WINDOW`]).
    pub window: usize,
    /// It asks for AION's seed kanban.
    pub seed: bool,
    /// The process id it gave (0: in-process or unknown).
    pub pid: u32,
    /// The protocol version it speaks.
    pub version: u16,
}

/// Checks a client's `Hello`.
///
/// # Errors
/// The reason for the refusal (sent to the client): not a `Hello` of this protocol, or a version outside
/// [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`].
pub fn accept_hello(h: Hello) -> Result<Handshake, String> {
    if h.magic != MAGIC {
        return Err(format!("not an AION session (magic {:#010x})", h.magic));
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&h.version) {
        return Err(format!(
            "protocol version {} not supported (this runtime speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}): \
             rebuild the service with a matching aion-sdk",
            h.version
        ));
    }
    Ok(Handshake {
        service: h.service,
        instance: h.instance,
        window: h.window.clamp(1, MAX_WINDOW) as usize,
        seed: h.seed,
        pid: h.pid,
        version: h.version,
    })
}

/// A static-kanban request from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum StaticRequest {
    /// Store a kanban under a topic; answer with its id.
    Put {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// The kanban.
        kanban: Box<WireKanban>,
    },
    /// List a topic.
    Get {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
    },
    /// Delete one entry.
    Delete {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Entry id.
        id: u64,
    },
    /// Send every current and future entry of a topic.
    Subscribe {
        /// Topic.
        topic: String,
    },
}

/// What the runtime's driver must do with a client message ([`ServerSession::on_message`]).
#[derive(Debug, PartialEq)]
pub enum ServerInput<K> {
    /// Route this output (then count it in the next `Accepted`: [`ServerSession::take_accepted`]).
    Output(Box<WireKanban>),
    /// These deliveries were handled, oldest first: acknowledge them to the queue (and the store).
    Acknowledged(Vec<K>),
    /// Answer a static-kanban request.
    Static(StaticRequest),
    /// The client will send nothing more: end the session once what it sent is answered.
    Bye,
}

/// A protocol violation: the session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A `Hello` inside a session.
    #[error("second Hello in a session")]
    SecondHello,
    /// An acknowledgement of a delivery that was never sent.
    #[error("acknowledgement of delivery {upto}, but only {sent} were sent")]
    AckBeyondSent {
        /// What was acknowledged.
        upto: u64,
        /// The last sequence number sent.
        sent: u64,
    },
}

/// The runtime's side of one session, over items of type `K` (kanbans for a service; for a peer link, what it
/// forwards).
#[derive(Debug)]
pub struct ServerSession<K> {
    window: usize,
    /// Deliveries sent and not acknowledged, oldest first, with their sequence numbers.
    inflight: VecDeque<(u64, K)>,
    /// The last sequence number given (0: none yet).
    seq: u64,
    /// Outputs received and not yet counted in an `Accepted`.
    outputs: u32,
    bye: bool,
}

impl<K> ServerSession<K> {
    /// A session with a credit window of `window` deliveries.
    #[inline]
    pub fn new(window: usize) -> ServerSession<K> {
        ServerSession { window: window.max(1), inflight: VecDeque::new(), seq: 0, outputs: 0, bye: false }
    }

    /// The credit window.
    #[inline]
    pub fn window(&self) -> usize {
        self.window
    }

    /// How many more deliveries the client's credit allows now.
    #[inline]
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.inflight.len())
    }

    /// Deliveries in flight.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Records a delivery and returns its sequence number; the driver sends `Deliver { seq, item }` (the item is
    /// [`ServerSession::last_delivered`], kept here for redelivery).
    #[inline]
    pub fn deliver(&mut self, item: K) -> u64 {
        self.seq += 1;
        self.inflight.push_back((self.seq, item));
        self.seq
    }

    /// The item of the last delivery recorded.
    #[inline]
    pub fn last_delivered(&self) -> Option<&K> {
        self.inflight.back().map(|(_, k)| k)
    }

    /// Takes back the last delivery recorded, before it was sent (it could not be encoded).
    #[inline]
    pub fn undeliver(&mut self) -> Option<K> {
        let (_, k) = self.inflight.pop_back()?;
        self.seq -= 1;
        Some(k)
    }

    /// The item the client is handling now: the oldest unacknowledged delivery (clients handle in order and
    /// acknowledge cumulatively), `None` when nothing is in flight.
    #[inline]
    pub fn handling(&self) -> Option<&K> {
        self.inflight.front().map(|(_, k)| k)
    }

    /// True once the client said `Bye`.
    #[inline]
    pub fn said_bye(&self) -> bool {
        self.bye
    }

    /// Processes one client message: what the driver must do, if anything.
    ///
    /// # Errors
    /// A protocol violation: the session must end.
    #[inline]
    pub fn on_message(&mut self, m: ClientMsg) -> Result<Option<ServerInput<K>>, ProtocolError> {
        if self.bye {
            return Ok(None); // nothing may follow Bye
        }
        Ok(Some(match m {
            ClientMsg::Hello(_) => return Err(ProtocolError::SecondHello),
            ClientMsg::Output(k) => {
                self.outputs += 1;
                ServerInput::Output(k)
            }
            ClientMsg::Ack { upto } => return self.acknowledge_upto(upto).map(|v| Some(ServerInput::Acknowledged(v))),
            ClientMsg::StaticPut { req, topic, kanban } => {
                ServerInput::Static(StaticRequest::Put { req, topic, kanban })
            }
            ClientMsg::StaticGet { req, topic } => ServerInput::Static(StaticRequest::Get { req, topic }),
            ClientMsg::StaticDelete { req, topic, id } => ServerInput::Static(StaticRequest::Delete { req, topic, id }),
            ClientMsg::StaticSubscribe { topic } => ServerInput::Static(StaticRequest::Subscribe { topic }),
            ClientMsg::Bye => {
                self.bye = true;
                ServerInput::Bye
            }
        }))
    }

    /// Acknowledges every delivery up to sequence number `upto`, oldest first.
    ///
    /// # Errors
    /// [`ProtocolError::AckBeyondSent`] when `upto` was never sent.
    #[inline]
    pub fn acknowledge_upto(&mut self, upto: u64) -> Result<Vec<K>, ProtocolError> {
        if upto > self.seq {
            return Err(ProtocolError::AckBeyondSent { upto, sent: self.seq });
        }
        let mut done = Vec::new();
        while self.inflight.front().is_some_and(|(s, _)| *s <= upto) {
            if let Some((_, k)) = self.inflight.pop_front() {
                done.push(k);
            }
        }
        Ok(done)
    }

    /// Acknowledges the `n` oldest deliveries (a direct session: the service says how many it handled).
    #[inline]
    pub fn acknowledge_oldest(&mut self, n: usize) -> Vec<K> {
        let n = n.min(self.inflight.len());
        self.inflight.drain(..n).map(|(_, k)| k).collect()
    }

    /// The number of outputs received since the last call: the driver sends `Accepted { count }` once they are
    /// routed (and, for durable targets, committed). 0: nothing to answer.
    #[inline]
    pub fn take_accepted(&mut self) -> u32 {
        std::mem::take(&mut self.outputs)
    }

    /// Ends the session: the unacknowledged deliveries, oldest first, go back to the front of the queue.
    #[inline]
    pub fn close(&mut self) -> Vec<K> {
        self.inflight.drain(..).map(|(_, k)| k).collect()
    }
}

/// What the client's driver must do with a runtime message ([`ClientSession::on_message`]).
#[derive(Debug, PartialEq)]
pub enum ClientEvent {
    /// A kanban for the service, of session `epoch`; its acknowledgement is [`ClientSession::handled`].
    Deliver {
        /// The session it belongs to.
        epoch: u64,
        /// Its sequence number.
        seq: u64,
        /// The kanban.
        kanban: Box<WireKanban>,
    },
    /// `n` more outputs were accepted: `n` more may await acceptance.
    Accepted(usize),
    /// These flushes are complete (every output emitted before them is accepted).
    Flushed(Vec<u64>),
    /// The reply to request `req`.
    Reply {
        /// The request.
        req: u64,
        /// The reply.
        msg: ServerMsg,
    },
    /// A static kanban on a subscribed topic.
    StaticEvent {
        /// Topic.
        topic: String,
        /// Entry id.
        id: u64,
        /// The kanban.
        kanban: Box<WireKanban>,
    },
    /// The runtime ended the session: reconnect.
    Reset(String),
}

/// A client's side of its session with the runtime, across reconnects.
#[derive(Debug, Default)]
pub struct ClientSession {
    /// Which session deliveries belong to (bumped at each reconnect).
    epoch: u64,
    /// Outputs sent and not yet accepted, in order: resent after a reconnect.
    unaccepted: VecDeque<Box<WireKanban>>,
    /// Requests sent and not answered: resent after a reconnect.
    pending: BTreeMap<u64, ClientMsg>,
    /// Subscribed topics: subscribed again after a reconnect.
    subs: Vec<String>,
    /// Outputs ever sent, and ever accepted.
    sent: u64,
    accepted: u64,
    /// Flushes waiting: (outputs that must be accepted, ticket).
    flushes: VecDeque<(u64, u64)>,
    next_ticket: u64,
    /// The cumulative acknowledgement not sent yet.
    ack: Option<u64>,
    closing: bool,
}

impl ClientSession {
    /// A new client session (epoch 0).
    #[inline]
    pub fn new() -> ClientSession {
        ClientSession::default()
    }

    /// The current session's epoch.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Outputs awaiting acceptance.
    #[inline]
    pub fn unaccepted(&self) -> usize {
        self.unaccepted.len()
    }

    /// Records an output to send; it is kept until accepted (and resent after a reconnect). The driver encodes it
    /// from [`ClientSession::last_output`], after writing any acknowledgement pending
    /// ([`ClientSession::take_ack`]).
    #[inline]
    pub fn output(&mut self, k: Box<WireKanban>) {
        self.sent += 1;
        self.unaccepted.push_back(k);
    }

    /// The last output recorded.
    #[inline]
    pub fn last_output(&self) -> Option<&WireKanban> {
        self.unaccepted.back().map(|k| &**k)
    }

    /// The service handled delivery `seq` of session `epoch` (and its outputs were recorded before this): it will
    /// be acknowledged with the next write. A delivery of an older session is not: the runtime redelivers it.
    #[inline]
    pub fn handled(&mut self, epoch: u64, seq: u64) {
        if epoch == self.epoch {
            self.ack = Some(self.ack.map_or(seq, |a| a.max(seq)));
        }
    }

    /// The acknowledgement to write now, if any (one cumulative `Ack` covers every delivery handled).
    #[inline]
    pub fn take_ack(&mut self) -> Option<ClientMsg> {
        self.ack.take().map(|upto| ClientMsg::Ack { upto })
    }

    /// Records a request (a static kanban put, get or delete) with id `req`; the driver writes `m`. It is resent
    /// after a reconnect until its reply comes.
    #[inline]
    pub fn request(&mut self, req: u64, m: ClientMsg) {
        self.pending.insert(req, m);
    }

    /// Records a subscription (subscribed again after a reconnect); the driver writes the `StaticSubscribe`.
    #[inline]
    pub fn subscribe(&mut self, topic: String) {
        self.subs.push(topic);
    }

    /// A flush: `None` when every output sent so far is accepted already, else a ticket that a later
    /// [`ClientEvent::Flushed`] completes.
    #[inline]
    pub fn flush(&mut self) -> Option<u64> {
        if self.accepted >= self.sent {
            return None;
        }
        self.next_ticket += 1;
        self.flushes.push_back((self.sent, self.next_ticket));
        Some(self.next_ticket)
    }

    /// The service is done: say `Bye` once every output is accepted ([`ClientSession::can_say_bye`]).
    #[inline]
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// True when the session may end now: closing, and nothing awaits acceptance.
    #[inline]
    pub fn can_say_bye(&self) -> bool {
        self.closing && self.unaccepted.is_empty()
    }

    /// True once [`ClientSession::close`] was called.
    #[inline]
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Processes one runtime message; appends what the driver must do to `out`.
    #[inline]
    pub fn on_message(&mut self, m: ServerMsg, out: &mut Vec<ClientEvent>) {
        match m {
            ServerMsg::Deliver { seq, kanban } => out.push(ClientEvent::Deliver { epoch: self.epoch, seq, kanban }),
            ServerMsg::Accepted { count } => {
                let n = (count as usize).min(self.unaccepted.len());
                self.unaccepted.drain(..n);
                self.accepted += n as u64;
                out.push(ClientEvent::Accepted(n));
                let mut done = Vec::new();
                while self.flushes.front().is_some_and(|(t, _)| *t <= self.accepted) {
                    if let Some((_, ticket)) = self.flushes.pop_front() {
                        done.push(ticket);
                    }
                }
                if !done.is_empty() {
                    out.push(ClientEvent::Flushed(done));
                }
            }
            ServerMsg::StaticPutOk { req, .. }
            | ServerMsg::StaticList { req, .. }
            | ServerMsg::StaticDeleted { req, .. } => {
                if self.pending.remove(&req).is_some() {
                    out.push(ClientEvent::Reply { req, msg: m });
                }
            }
            ServerMsg::StaticEvent { topic, id, kanban } => out.push(ClientEvent::StaticEvent { topic, id, kanban }),
            ServerMsg::Welcome { .. } => {}
            ServerMsg::Error { reason } => out.push(ClientEvent::Reset(reason)),
        }
    }

    /// The link is back (a new session was welcomed): starts a new epoch (deliveries of the old one are not
    /// acknowledged: the runtime redelivers them) and returns what to send first — the outputs not accepted, in
    /// order, the requests not answered, and the subscriptions.
    #[inline]
    pub fn reconnected(&mut self) -> Vec<ClientMsg> {
        self.epoch += 1;
        self.ack = None;
        let mut again: Vec<ClientMsg> = self.unaccepted.iter().cloned().map(ClientMsg::Output).collect();
        again.extend(self.pending.values().cloned());
        again.extend(self.subs.iter().map(|t| ClientMsg::StaticSubscribe { topic: t.clone() }));
        again
    }
}

#[cfg(test)]
mod tests;
