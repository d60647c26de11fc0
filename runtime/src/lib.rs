//! AION runtime core.
//!
//! - [`actor`]: our small actor facade (bounded mailboxes, panic isolation) executed on actix arbiters, and
//!   Erlang/OTP-style [`actor::supervisor`]s.
//! - [`config`]: the `services.yml` model and a YAML 1.1-compatible loader that reports every problem with
//!   `file:line:column`.
//! - [`kanban`]: the kanban card and its free-form JSON [`kanban::Value`] metadata, which round-trips through
//!   non-self-describing formats such as postcard.
//! - [`log`]: the runtime's log output, which never panics nor blocks (lines it cannot write are counted).
//! - [`task`]: owned task sets: long-lived tasks belong to an owner, panics are caught and counted, shutdown
//!   waits for them.
//! - [`time`]: RFC 3339 UTC timestamps without a calendar dependency.

pub mod actor;
pub mod config;
pub mod log;
pub mod task;

// The data model lives in `aion-model` (no actors, no I/O: what the SDK and the wire protocol depend on); the
// runtime re-exports it so that `aion_runtime::kanban`, `aion_runtime::time` and the types keep working.
pub use aion_model::{kanban, time};
pub use aion_model::{Kanban, KanbanId, Metadata, MetadataBytes, Origin, Value, WireKanban};
