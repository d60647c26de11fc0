//! The kanban replicator: an actor that records every hop (accepted, routed target or dead-letter reason,
//! acknowledged) into the archive in the embedded store, in batches.
//!
//! It never blocks kanban flow: the router and sessions hand records over with `try_send`; when the
//! replicator's mailbox is full the record is dropped, logged and counted (`archive_dropped` in status) —
//! the kanban itself is unaffected.

use crate::store::{ArchiveOp, Store};
use aion_runtime::actor::{Actor, Addr, Context, TrySendError};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The replicator actor.
pub struct Replicator {
    store: Store,
    buf: Vec<ArchiveOp>,
    sinks: Vec<crate::export::mongo::Kicker>,
}

impl Replicator {
    /// A replicator writing to `store` and waking `sinks` (external archive sinks) after each batch.
    pub fn new(store: Store, sinks: Vec<crate::export::mongo::Kicker>) -> Replicator {
        Replicator { store, buf: Vec::with_capacity(1024), sinks }
    }

    async fn flush(&mut self) {
        let batch = std::mem::take(&mut self.buf);
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.archive(batch).await {
            tracing::error!("archive batch lost: {e}");
            return;
        }
        if !self.sinks.is_empty() {
            // The sinks read committed rows: wait for the commit, then wake them.
            let _ = self.store.archive_barrier().await;
            for s in &self.sinks {
                s.kick();
            }
        }
    }
}

impl Actor for Replicator {
    type Msg = ArchiveOp;

    async fn handle(&mut self, op: ArchiveOp, ctx: &mut Context<Self>) {
        self.buf.push(op);
        // Batch while records keep coming; write as soon as the mailbox is drained.
        if self.buf.len() >= 1024 || ctx.addr().queue_len() == 0 {
            self.flush().await;
        }
    }

    async fn stopped(&mut self) {
        self.flush().await;
    }
}

/// The memory archive records may hold on their way to the archive file (their kanban copies): past it,
/// records are dropped (counted), never the kanbans.
pub const ARCHIVE_MEMORY: usize = 64 << 20;

/// How the router and sessions reach the replicator.
#[derive(Clone)]
pub struct ArchiveSink {
    addr: Addr<Replicator>,
    /// Records dropped because the replicator was behind.
    pub dropped: Arc<AtomicU64>,
    /// Memory held by records on their way ([`ArchiveOp::Hop`]'s charge).
    in_flight: Arc<AtomicUsize>,
}

impl ArchiveSink {
    /// A sink sending to `addr`.
    pub fn new(addr: Addr<Replicator>) -> ArchiveSink {
        ArchiveSink { addr, dropped: Arc::default(), in_flight: Arc::default() }
    }

    /// Hands a record over without waiting.
    pub fn record(&self, mut op: ArchiveOp) {
        if let ArchiveOp::Hop { kanban, charge, .. } = &mut op {
            let size = kanban.mem_size();
            if self.in_flight.load(Ordering::Relaxed) + size > ARCHIVE_MEMORY {
                return self.drop_record("its memory budget is used up");
            }
            self.in_flight.fetch_add(size, Ordering::Relaxed);
            *charge = crate::store::Charge::new(self.in_flight.clone(), size);
        }
        if let Err(e) = self.addr.try_send(op) {
            let why = match e {
                TrySendError::Full(_) => "replicator is behind",
                TrySendError::Closed(_) => "replicator is stopped",
            };
            self.drop_record(why);
        }
    }

    fn drop_record(&self, why: &str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "archive record dropped: {why} (kanban flow is not affected)");
        }
    }
}
