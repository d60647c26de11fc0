//! Exporting what the runtime did: the kanban replicator (the archive of every hop) and the MongoDB sink.

pub mod mongo;
pub mod replicator;
