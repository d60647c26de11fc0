//! The MongoDB archive sink: exports final archive rows to `<database>.<collection>` (AION's
//! `AionCore.kanban`), in batches, idempotently.
//!
//! Rows wait in the embedded archive until they are exported, so MongoDB being down or slow never blocks
//! kanban flow and loses nothing: the sink retries with backoff and catches up (the original replicator
//! crashed on an insert error). Documents carry AION's fields (`streamKey`, `startAt`, `finishAt`,
//! `nextDeviceName`, `connectionKey`, `processNumber`, `priorSuccess`, `dataPath`, `fileList`, `metadata`) plus
//! ours (`kanbanId`, `traceId`, `from`, `to`, `outcome`, `acceptedAt`, `ackedAt`, `deviceName`). `_id` is
//! derived from the kanban id and the archive row, so a batch retried after a partial failure inserts nothing
//! twice.

//!
//! The sink itself is compiled with the `mongo` feature; without it, `--mongo` is refused with a clear error.

#[cfg(feature = "mongo")]
mod sink;
#[cfg(feature = "mongo")]
pub use sink::{MongoMsg, MongoSink};

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Where to export.
#[derive(Debug, Clone)]
pub struct MongoConfig {
    /// Connection string, e.g. `mongodb://127.0.0.1:27017`.
    pub uri: String,
    /// Database (AION: `AionCore`).
    pub database: String,
    /// Collection (AION: `kanban`).
    pub collection: String,
}

/// Counters of the sink, for status.
#[derive(Debug, Default)]
pub struct MongoStats {
    /// Documents exported.
    pub exported: AtomicU64,
    /// Failed export attempts (each retried).
    pub errors: AtomicU64,
    /// The last error.
    pub last_error: Mutex<Option<String>>,
}

/// Wakes an external archive sink after the replicator wrote rows. A kick that finds the sink's mailbox full is
/// redundant (one is already pending), so it is coalesced.
#[derive(Clone)]
pub struct Kicker(Arc<dyn Fn() + Send + Sync>);

impl Kicker {
    /// A kicker calling `kick`.
    pub fn new(kick: impl Fn() + Send + Sync + 'static) -> Kicker {
        Kicker(Arc::new(kick))
    }

    /// Signals that rows may be waiting.
    pub fn kick(&self) {
        (self.0)();
    }
}
