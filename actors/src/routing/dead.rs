//! Dead letters: every kanban the runtime could not deliver, with a reason, a log line and a counter.

use aion_runtime::WireKanban;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// Why a kanban was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Reason {
    /// No `nextService` entry for the connection key and no `default` (or no `nextService` at all).
    NoRoute,
    /// The target service is not defined in services.yml.
    UnknownService,
    /// The target instance number is above the target's `scale`.
    NoSuchInstance,
    /// The target is on another device, and cross-device delivery is not available.
    NoFederation,
    /// The target service cannot run here (for example no `command` for the local-process backend).
    NotRunnable,
    /// A terminate kanban named a service that is not the sender.
    BadTerminate,
    /// The kanban is over [`MAX_KANBAN_BYTES`](aion_runtime::kanban::MAX_KANBAN_BYTES): it cannot be delivered.
    TooLarge,
    /// Its chain has made as many hops as the hop limit allows (a routing cycle).
    HopLimit,
    /// It waited in an outbox for a device unreachable for longer than the outbox's age bound.
    Expired,
    /// A file of its `fileList` cannot be sent: gone, unreadable, not a regular file or directory, or outside
    /// the roots files may be sent from (Send Anything).
    FileUnreadable,
    /// The receiving device refuses a file of its `fileList` for good (a name it will not write, a service it
    /// does not run, larger than it takes).
    FileRefused,
}

impl Reason {
    /// The stable name used in logs, status and `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no-route",
            Reason::UnknownService => "unknown-service",
            Reason::NoSuchInstance => "no-such-instance",
            Reason::NoFederation => "no-federation",
            Reason::NotRunnable => "not-runnable",
            Reason::BadTerminate => "bad-terminate",
            Reason::TooLarge => "too-large",
            Reason::HopLimit => "hop-limit",
            Reason::Expired => "expired",
            Reason::FileUnreadable => "file-unreadable",
            Reason::FileRefused => "file-refused",
        }
    }
}

/// One dead letter, as kept for inspection.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Stable reason name.
    pub reason: &'static str,
    /// Human detail.
    pub detail: String,
    /// The kanban.
    pub kanban: Box<WireKanban>,
}

/// Counters by reason plus the most recent dead letters.
#[derive(Debug, Default)]
pub struct DeadLetters {
    inner: Mutex<(BTreeMap<&'static str, u64>, VecDeque<DeadLetter>)>,
}

const KEEP: usize = 256;
/// Dead letters are kept whole only up to this size; larger ones are kept without metadata and file list, so
/// the recent dead letters never hold more than `KEEP` × this in memory.
const KEEP_WHOLE_BYTES: usize = 64 << 10;

impl DeadLetters {
    /// Records a dead letter: logs it, counts it, keeps it among the recent ones.
    pub fn record(&self, reason: Reason, mut detail: String, mut kanban: Box<WireKanban>) {
        tracing::warn!(reason = reason.as_str(), kanban = %kanban.id, from = %kanban.origin.service, "dead letter: {detail}");
        if kanban.metadata.0.len() + kanban.file_list.iter().map(String::len).sum::<usize>() > KEEP_WHOLE_BYTES {
            detail.push_str(&format!(
                " (metadata of {} bytes and {} file paths not kept)",
                kanban.metadata.0.len(),
                kanban.file_list.len()
            ));
            kanban.metadata = aion_runtime::MetadataBytes::default();
            kanban.file_list = Vec::new();
        }
        if let Ok(mut g) = self.inner.lock() {
            *g.0.entry(reason.as_str()).or_default() += 1;
            if g.1.len() >= KEEP {
                g.1.pop_front();
            }
            g.1.push_back(DeadLetter { reason: reason.as_str(), detail, kanban });
        }
    }

    /// Counts by reason.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.inner.lock().map(|g| g.0.clone()).unwrap_or_default()
    }

    /// The most recent dead letters, oldest first.
    pub fn recent(&self) -> Vec<DeadLetter> {
        self.inner.lock().map(|g| g.1.iter().cloned().collect()).unwrap_or_default()
    }
}
