//! AION's core actors and the node that assembles them.
//!
//! ```text
//!                 root supervisor (one-for-one)
//!                 ├── broker        starts/stops/restarts instances (local processes or in-process services)
//!                 └── status-kanban the Unix-socket endpoint microservices talk to
//! ```
//! The routing fast path does not go through an actor mailbox: each instance has a [`slot::Slot`] (its bounded
//! input queue, which outlives sessions and restarts), and sessions route outputs straight into target slots
//! with the immutable [`router::Router`]. Lifecycle goes through the broker's mailbox.

pub mod backend;
pub mod broker;
pub mod control;
pub mod dead;
pub mod direct;
pub mod endpoint;
pub mod mongo;
pub mod node;
pub mod paths;
pub mod redis_store;
pub mod replicator;
pub mod router;
pub mod slot;
pub mod statics;
pub mod store;

pub use node::{InProcessRegistry, Node, NodeOptions};
