//! Messages of the microservice ↔ runtime protocol (version [`PROTOCOL_VERSION`]).
//!
//! A connection starts with [`ClientMsg::Hello`]; the runtime answers [`ServerMsg::Welcome`] or
//! [`ServerMsg::Error`] and closes. Then:
//! - the runtime sends [`ServerMsg::Deliver`] while fewer than `window` deliveries are unacknowledged (credit);
//! - the client acknowledges with a cumulative [`ClientMsg::Ack`] after handling (and after sending the outputs
//!   of) every kanban up to `upto`;
//! - the client sends outputs with [`ClientMsg::Output`]; the runtime answers [`ServerMsg::Accepted`] in order
//!   once each output is routed into its targets' queues (that is the back-pressure point). An output whose id
//!   the runtime has already accepted from that instance is acknowledged and not routed again.

use aion_model::WireKanban;
use serde::{Deserialize, Serialize};

/// The protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;

/// The longest static topic name the runtime accepts (bytes).
pub const MAX_TOPIC_BYTES: usize = 1024;

/// The magic number at the start of [`Hello`], so that a stray client is recognised at once.
pub const MAGIC: u32 = 0x4149_4f4e; // "AION"

/// The first message of a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Microservice name as in services.yml.
    pub service: String,
    /// Instance number, 1-based.
    pub instance: u32,
    /// How many deliveries may be unacknowledged at once (credit).
    pub window: u32,
    /// Ask for AION's seed kanban (START_SERVICE_WITHOUT_KANBAN) if the instance's queue is empty.
    pub seed: bool,
    /// The client's process id (0 in-process), for logs.
    pub pid: u32,
}

/// Client → runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Handshake; first message only.
    Hello(Hello),
    /// An output kanban to route.
    Output(Box<WireKanban>),
    /// Every delivery with `seq <= upto` is handled.
    Ack {
        /// Cumulative delivery sequence number.
        upto: u64,
    },
    /// Store a static kanban under a topic.
    StaticPut {
        /// Request id echoed in the reply.
        req: u64,
        /// Topic.
        topic: String,
        /// The kanban.
        kanban: Box<WireKanban>,
    },
    /// Read every static kanban of a topic.
    StaticGet {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
    },
    /// Delete one static kanban.
    StaticDelete {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Entry id from [`ServerMsg::StaticPutOk`] or a listing.
        id: u64,
    },
    /// Receive every current and future static kanban of a topic as [`ServerMsg::StaticEvent`].
    StaticSubscribe {
        /// Topic.
        topic: String,
    },
    /// Orderly close: the client will send nothing more.
    Bye,
}

/// Runtime → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Handshake accepted.
    Welcome {
        /// Session number (for logs).
        session: u64,
        /// This device's name.
        device_name: String,
        /// `$AION_HOME/Data/<svc>_<n>`.
        data_path: String,
    },
    /// A kanban for the instance. Redelivered (same `kanban.id`) if the connection drops before it is acked.
    Deliver {
        /// Delivery sequence number in this session.
        seq: u64,
        /// The kanban (boxed: kanbans move through several queues; serde's `Box` is wire-transparent).
        kanban: Box<WireKanban>,
    },
    /// The next `count` outputs (in send order) are accepted.
    Accepted {
        /// How many.
        count: u32,
    },
    /// Reply to [`ClientMsg::StaticPut`].
    StaticPutOk {
        /// Request id.
        req: u64,
        /// Entry id.
        id: u64,
    },
    /// Reply to [`ClientMsg::StaticGet`].
    StaticList {
        /// Request id.
        req: u64,
        /// Entries in insertion order.
        entries: Vec<(u64, WireKanban)>,
    },
    /// Reply to [`ClientMsg::StaticDelete`].
    StaticDeleted {
        /// Request id.
        req: u64,
        /// Whether the id existed.
        found: bool,
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
    /// The runtime refuses or ends the session; the connection closes after this.
    Error {
        /// Why.
        reason: String,
    },
}

/// Encodes exactly like [`ServerMsg::Deliver`] but borrows the kanban, so the runtime can send a kanban it
/// keeps for redelivery without cloning it. The unit variant keeps `Deliver` at index 1, as in [`ServerMsg`].
#[derive(Serialize)]
#[serde(rename = "ServerMsg")]
pub enum DeliverRef<'a> {
    /// Placeholder for `ServerMsg::Welcome` (keeps `Deliver` at index 1); never sent.
    WelcomeSlot,
    /// `ServerMsg::Deliver`.
    Deliver {
        /// Delivery sequence number.
        seq: u64,
        /// The kanban.
        kanban: &'a WireKanban,
    },
}

/// Encodes exactly like [`ClientMsg::Output`] but borrows the kanban, so the SDK can send an output it keeps
/// for resending without cloning it.
#[derive(Serialize)]
#[serde(rename = "ClientMsg")]
pub enum OutputRef<'a> {
    /// Placeholder for `ClientMsg::Hello` (keeps `Output` at index 1); never sent.
    HelloSlot,
    /// `ClientMsg::Output`.
    Output(&'a WireKanban),
}

#[cfg(test)]
mod tests {
    use super::*;
    use aion_model::KanbanId;

    #[test]
    fn deliver_ref_encodes_like_deliver() {
        let k = aion_model::Kanban { id: KanbanId::generate(), connection_key: "x".into(), ..Default::default() }
            .into_wire();
        let owned = postcard::to_stdvec(&ServerMsg::Deliver { seq: 7, kanban: Box::new(k.clone()) }).expect("owned");
        let borrowed = postcard::to_stdvec(&DeliverRef::Deliver { seq: 7, kanban: &k }).expect("borrowed");
        assert_eq!(owned, borrowed);
        let owned = postcard::to_stdvec(&ClientMsg::Output(Box::new(k.clone()))).expect("owned");
        let borrowed = postcard::to_stdvec(&OutputRef::Output(&k)).expect("borrowed");
        assert_eq!(owned, borrowed);
    }
}
