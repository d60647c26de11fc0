//! AION's core actors and the node that assembles them.
//!
//! ```text
//!                 root supervisor (one-for-one)
//!                 ├── kanban-replicator  records every hop in the archive (with --archive)
//!                 ├── status-kanban      the Unix-socket endpoint microservices talk to
//!                 ├── service-broker     starts/stops/restarts instances (through their backend)
//!                 ├── mongo-sink         exports the archive to MongoDB (with --mongo)
//!                 └── federation         cluster mode: the listener and one link per device (`cluster` feature)
//! ```
//!
//! Domains:
//! - [`node`]: assembly — the supervision tree, the routing table, the control API ([`Node`]);
//! - `routing`: the router, each instance's queue (a slot: bounded in kanbans and bytes, outliving sessions),
//!   the outboxes of routes to other devices, dead letters;
//! - `session`: the status-kanban endpoint and the sessions on it (link sessions over a socket or an in-memory
//!   link, direct sessions for in-process services), static kanbans;
//! - [`store`]: durable queues (embedded SQLite, or Redis Streams with the `redis` feature) and the archive;
//! - [`backend`]: what runs instances (local processes, in-process services) and the broker's policy over them;
//! - [`export`]: the kanban replicator and the MongoDB sink (`mongo` feature);
//! - [`control`]: the control socket's protocol (the CLI's side) and server;
//! - `federation` (`cluster` feature): links to other devices over QUIC with mutual TLS, the cluster's
//!   certificates (`federation::tls`), the files that travel with kanbans (Send Anything, `federation::files`),
//!   requests over the network (admin identities, peers' trace queries);
//! - `cluster` (`cluster` feature): the master's placement and node status, a worker's join and assignment;
//! - [`paths`]: the data directory's layout.
//!
//! The routing fast path does not go through an actor mailbox: sessions route outputs straight into target slots
//! with the router, whose table a new configuration (`aion apply`) replaces whole. Lifecycle goes through the
//! broker's mailbox.

pub mod backend;
pub(crate) mod broker;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod control;
pub mod export;
#[cfg(feature = "cluster")]
pub mod federation;
#[cfg(any(feature = "cluster", feature = "kube"))]
pub(crate) mod hex;
#[cfg(feature = "http")]
pub mod http;
pub mod node;
pub mod paths;
pub(crate) mod routing;
#[cfg(any(feature = "cluster", feature = "kube"))]
pub(crate) mod runner;
pub(crate) mod session;
pub mod store;

pub use broker::{InstanceStatus, State};
pub use node::{InProcessRegistry, Node, NodeError, NodeOptions};
pub use routing::dead::Reason as DeadLetterReason;
pub use routing::slot::{QueueLimits, DEFAULT_QUEUE_BYTES};
pub use routing::{Outbound, DEFAULT_HOP_LIMIT};
