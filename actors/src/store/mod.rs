//! The embedded durable store: SQLite in WAL mode in the data directory, written by one thread with group
//! commit.
//!
//! Writes are submitted without waiting ([`Store::enqueue`], [`Store::ack`]); a [`Store::barrier`] completes once
//! everything submitted before it is committed. The writer drains every pending operation into one transaction,
//! so many kanbans share one fsync. If a commit fails (disk full, I/O error) the writer keeps the batch, logs,
//! counts, and retries with backoff: barriers wait meanwhile, so producers get back-pressure and nothing
//! accepted is lost.

pub mod archive;
#[cfg(feature = "redis")]
pub mod redis;
mod sqlite;

use aion_runtime::{KanbanId, WireKanban};
use archive::*;
pub use archive::{pending_exports, query_log, query_trace, ArchiveOp, HopRow, LogFilter, PendingExport, Retention};
use rusqlite::{params, Connection, OptionalExtension};
use sqlite::*;
#[cfg(feature = "redis")]
pub(crate) use sqlite::{complete_barriers, take_close, take_pages, take_queued};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Schema version of `aion.db` (queues, static kanbans). Older stores are migrated on open.
pub const SCHEMA_VERSION: i64 = 4;
/// Schema version of `archive.db` (the kanban archive).
pub const ARCHIVE_SCHEMA_VERSION: i64 = 2;

/// The encoding of the kanbans this build stores (a `format` column beside each stored kanban; a `fmt` field of
/// each Redis entry). Stored kanbans are postcard, which has no field names: a field added to the kanban makes
/// the old bytes unreadable as the new type. A change of the kanban's encoding bumps this number and teaches
/// [`decode_stored`] the previous format, so kanbans stored by an older build are read, never lost; a store
/// holding a format newer than this build knows is refused row by row with a clear error (kept, not deleted).
pub const KANBAN_FORMAT: u32 = 1;

/// Decodes a kanban stored with `format`.
///
/// # Errors
/// A format this build does not know (written by a newer aion), or bytes that do not decode.
pub fn decode_stored(format: u32, bytes: &[u8]) -> Result<WireKanban, String> {
    match format {
        1 => postcard::from_bytes::<WireKanban>(bytes).map_err(|e| format!("undecodable kanban (format 1): {e}")),
        f => Err(format!(
            "kanban stored in format {f}, newer than this aion reads (up to {KANBAN_FORMAT}): upgrade aion to read it"
        )),
    }
}

/// Encodes a kanban for storage in [`KANBAN_FORMAT`].
pub fn encode_stored(k: &WireKanban) -> Vec<u8> {
    postcard::to_stdvec(k).unwrap_or_default()
}

/// A durable queue: an instance's input queue, or (cluster mode) the outbox of kanbans bound for another device.
///
/// Stored rows keep two columns, `(service, instance)`: an instance queue is `(service, n)` with `n >= 1`, an
/// outbox is `("<device>\u{1f}<service>", 0)` (instance numbers start at 1, so the two never meet; the unit
/// separator appears in no device or service name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKey {
    /// Instance `instance` of `service`.
    Instance {
        /// Service.
        service: String,
        /// Instance (from 1).
        instance: u32,
    },
    /// Kanbans waiting to cross to `service` on `device` (one route of a federation link).
    Outbox {
        /// The device.
        device: String,
        /// The service there.
        service: String,
    },
}

impl QueueKey {
    /// The queue of an instance.
    pub fn instance(service: &str, instance: u32) -> QueueKey {
        QueueKey::Instance { service: service.to_owned(), instance }
    }

    /// The outbox towards `service` on `device`.
    pub fn outbox(device: &str, service: &str) -> QueueKey {
        QueueKey::Outbox { device: device.to_owned(), service: service.to_owned() }
    }

    /// The stored row key (see the type's docs).
    pub fn row(&self) -> (std::borrow::Cow<'_, str>, u32) {
        match self {
            QueueKey::Instance { service, instance } => (service.as_str().into(), *instance),
            QueueKey::Outbox { device, service } => (format!("{device}{OUTBOX_SEP}{service}").into(), 0),
        }
    }

    /// The queue of a stored row key.
    pub fn from_row(name: String, n: u32) -> QueueKey {
        if n == 0 {
            match name.split_once(OUTBOX_SEP) {
                Some((device, service)) => QueueKey::outbox(device, service),
                None => QueueKey::Outbox { device: name, service: String::new() },
            }
        } else {
            QueueKey::Instance { service: name, instance: n }
        }
    }
}

impl std::fmt::Display for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueKey::Instance { service, instance } => write!(f, "{service}-{instance}"),
            QueueKey::Outbox { device, service } => write!(f, "outbox to {service} on {device}"),
        }
    }
}

/// Separates device and service in an outbox's row name.
const OUTBOX_SEP: char = '\u{1f}';

/// Where and how to keep the queues on Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `unix:///path`).
    pub url: String,
    /// Acknowledged entries kept per stream (0: deleted when acknowledged).
    pub retain: usize,
    /// How long to keep trying to reach Redis at start before giving up.
    pub connect_wait: Duration,
}

impl RedisConfig {
    /// The URL without a password, for logs and status.
    pub fn display_url(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &self.url[..s + 3], &self.url[at..]),
            _ => self.url.clone(),
        }
    }
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The store was written by a newer version.
    #[error("store {path} has schema version {found}, newer than this build knows")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: i64,
    },
    /// The writer thread is gone.
    #[error("the store writer has stopped")]
    Closed,
    /// The store is not what it should be (damaged, truncated, replaced): refused rather than run with part of
    /// the queue.
    #[error("{0}")]
    Damaged(String),
    /// Redis failed or cannot be reached.
    #[error("Redis store {url}: {message}")]
    Redis {
        /// The Redis URL (without password).
        url: String,
        /// Cause.
        message: String,
    },
}

/// One write for a store writer (the SQLite threads or the Redis writer).
pub(crate) enum Op {
    Enqueue {
        service: String,
        instance: u32,
        id: KanbanId,
        hops: u32,
        bytes: Vec<u8>,
    },
    Ack {
        service: String,
        instance: u32,
        ids: Vec<KanbanId>,
    },
    Archive(Vec<ArchiveOp>),
    Exported(Vec<i64>),
    StaticPut {
        topic: String,
        id: u64,
        bytes: Vec<u8>,
    },
    StaticDelete {
        topic: String,
        id: u64,
    },
    Barrier(oneshot::Sender<()>),
    /// Reads the next page of an instance's backlog (a read: served before the batch's writes are applied).
    Page(PageRequest),
    /// A clean stop: commit, checkpoint the WAL into the database file, record the queue's size, stop.
    Close(oneshot::Sender<()>),
}

/// Where a backlog page starts (exclusive) or ends (inclusive): a row of the embedded store, or a Redis stream
/// entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// `queue.seq` (embedded store).
    Seq(i64),
    /// A stream entry id (Redis store).
    Entry(String),
}

/// Kanbans an instance had queued when the runtime started, left in the store and paged in as its queue has
/// room (so a large backlog never has to fit in memory).
#[derive(Debug, Clone)]
pub struct Backlog {
    /// The queue.
    pub queue: QueueKey,
    /// How many.
    pub count: usize,
    /// Page from after this…
    pub after: Cursor,
    /// …up to this (later rows are kanbans queued by this run, which are in memory already).
    pub until: Cursor,
    /// Where it is (Redis: the stream, as found; the embedded store needs none).
    pub key: Option<String>,
}

/// One page of a backlog, oldest first.
#[derive(Debug, Default)]
pub struct Page {
    /// The kanbans (with their hop counts).
    pub kanbans: Vec<Box<WireKanban>>,
    /// The cursor after the last one (`None` when the page is empty: the backlog is exhausted).
    pub next: Option<Cursor>,
}

/// A request for a backlog page.
pub(crate) struct PageRequest {
    /// The queue's row key (see [`QueueKey`]).
    pub(crate) service: String,
    pub(crate) instance: u32,
    pub(crate) after: Cursor,
    pub(crate) until: Cursor,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) key: Option<String>,
    pub(crate) max_rows: usize,
    /// At least one row is returned, whatever its size.
    pub(crate) max_bytes: usize,
    pub(crate) reply: oneshot::Sender<Result<Page, String>>,
}

/// A static kanban recovered at start-up.
pub struct RecoveredStatic {
    /// Topic.
    pub topic: String,
    /// Entry id.
    pub id: u64,
    /// The kanban.
    pub kanban: WireKanban,
}

/// Memory reserved for an archive record on its way to the archive, given back when the record is dropped
/// (written or not). A clone carries no reservation.
#[derive(Debug, Default)]
pub struct Charge(Option<(Arc<std::sync::atomic::AtomicUsize>, usize)>);

impl Charge {
    /// `bytes` reserved from `pool`.
    pub fn new(pool: Arc<std::sync::atomic::AtomicUsize>, bytes: usize) -> Charge {
        Charge(Some((pool, bytes)))
    }
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        Charge(None)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((pool, n)) = self.0.take() {
            pool.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Counters of the store, for status.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Kanbans written.
    pub enqueued: AtomicU64,
    /// Kanbans deleted after acknowledgement.
    pub acked: AtomicU64,
    /// Archive rows written.
    pub archived: AtomicU64,
    /// Failed commit attempts (each retried).
    pub errors: AtomicU64,
    /// Acknowledgements for kanbans the store did not hold (logged; nothing to delete).
    pub unknown_acks: AtomicU64,
    /// Redis: entries another writer added to our streams meanwhile (a killed run's last pipeline), adopted or
    /// deleted as duplicates (logged).
    pub stray_entries: AtomicU64,
    /// The last error, if any.
    pub last_error: Mutex<Option<String>>,
    /// Time to commit one batch (updated once per batch, never per kanban).
    pub commit_latency: LatencyHistogram,
    /// True while the last commit attempt failed (cleared by the next success): `/readyz` says why.
    pub failing: std::sync::atomic::AtomicBool,
}

impl StoreStats {
    /// A batch committed after `took`: its latency observed, the failing flag cleared, the commit counted.
    pub fn committed(&self, took: std::time::Duration) {
        self.commit_latency.record(took);
        self.failing.store(false, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// A commit failed (it is retried): counted, the failing flag set, the error kept as the last one.
    pub fn commit_failed(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(error);
        }
    }
}

/// Upper bounds (seconds) of [`LatencyHistogram`]'s buckets.
pub const LATENCY_BOUNDS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A lock-free latency histogram with fixed buckets ([`LATENCY_BOUNDS`] and one above them).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; 13],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn report(&self) -> crate::control::LatencyReport {
        crate::control::LatencyReport {
            bounds: LATENCY_BOUNDS.to_vec(),
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A kanban recovered from the store at start-up.
pub struct Recovered {
    /// The queue it was in.
    pub queue: QueueKey,
    /// The kanban.
    pub kanban: Box<WireKanban>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    atx: mpsc::Sender<Op>,
    /// Counters.
    pub stats: Arc<StoreStats>,
    location: String,
    backend: &'static str,
    archive_path: PathBuf,
    /// Kanbans the Redis writer found written behind this run and adopted (taken once, by the node).
    adopted: Arc<Mutex<Option<mpsc::UnboundedReceiver<Recovered>>>>,
}

impl Store {
    /// Opens the store at `path`, returns the kanbans still queued (oldest first) and starts the writer thread.
    ///
    /// # Errors
    /// [`StoreError`] if the database cannot be opened, migrated or read.
    pub fn open(path: &Path, archive: &Path, retention: Retention) -> Result<(Store, Vec<Backlog>), StoreError> {
        Store::open_all(path, archive, retention, None).map(|(s, q, _)| (s, q))
    }

    /// [`Store::open`], also returning the static kanbans. `max_bytes` caps the queue database (`aion run
    /// --store-max-mb`): past it, commits fail as on a full disk, producers wait, and acknowledgements still
    /// free space.
    ///
    /// # Errors
    /// [`StoreError`] if the database cannot be opened, migrated or read.
    #[allow(clippy::type_complexity)]
    pub fn open_all(
        path: &Path,
        archive: &Path,
        retention: Retention,
        max_bytes: Option<u64>,
    ) -> Result<(Store, Vec<Backlog>, Vec<RecoveredStatic>), StoreError> {
        let state = read_state(path);
        let empty = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        if let (Some(st), true) = (state, empty) {
            let what = if st.clean {
                format!(" (the last clean stop left {} queued kanbans)", st.queued)
            } else {
                String::new()
            };
            return Err(StoreError::Damaged(format!(
                "{} is missing or empty, but a store existed here{what}; restore it from a backup; or, to start with \
                 an empty store, delete {}",
                path.display(),
                state_path(path).display()
            )));
        }
        let conn = open_conn(path, QUEUE_MIGRATIONS).map_err(|e| match e {
            StoreError::Sqlite { source, .. }
                if matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::NotADatabase)) =>
            {
                StoreError::Damaged(format!(
                    "{} is damaged or not a database ({source}); restore it from a backup",
                    path.display()
                ))
            }
            other => other,
        })?;
        check_integrity(path, &conn, state)?;
        mark_running(path)?;
        if let Some(max) = max_bytes {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(sq(path))?;
            let pages = (max / page.max(512) as u64).max(16);
            let _: i64 =
                conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0)).map_err(sq(path))?;
        }
        let aconn = open_conn(archive, ARCHIVE_MIGRATIONS)?;
        let mut statics = Vec::new();
        {
            let mut stmt =
                conn.prepare("SELECT topic, id, kanban, format FROM static_kanban ORDER BY id").map_err(sq(path))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, u32>(3)?))
                })
                .map_err(sq(path))?;
            for row in rows {
                let (topic, id, bytes, format) = row.map_err(sq(path))?;
                match decode_stored(format, &bytes) {
                    Ok(kanban) => statics.push(RecoveredStatic { topic, id: id as u64, kanban }),
                    Err(e) => tracing::error!(topic, id, "unreadable static kanban kept in the store: {e}"),
                }
            }
        }
        // What each instance had queued: counted and bounded here, read page by page later (`Store::page`).
        let mut recovered = Vec::new();
        {
            let mut stmt = conn
                .prepare(
                    "SELECT service, instance, COUNT(*), MIN(seq) - 1, MAX(seq) FROM queue \
                     GROUP BY service, instance ORDER BY MIN(seq)",
                )
                .map_err(sq(path))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(Backlog {
                        queue: QueueKey::from_row(r.get(0)?, r.get(1)?),
                        count: r.get::<_, i64>(2)? as usize,
                        after: Cursor::Seq(r.get(3)?),
                        until: Cursor::Seq(r.get(4)?),
                        key: None,
                    })
                })
                .map_err(sq(path))?;
            for row in rows {
                recovered.push(row.map_err(sq(path))?);
            }
        }
        let stats = Arc::new(StoreStats::default());
        let tx = spawn_writer("aion-store", conn, stats.clone(), path, None)?;
        let atx = spawn_writer("aion-archive", aconn, stats.clone(), archive, Some(retention))?;
        let store = Store {
            tx,
            atx,
            stats,
            location: path.display().to_string(),
            backend: "sqlite",
            archive_path: archive.to_owned(),
            adopted: Arc::default(),
        };
        Ok((store, recovered, statics))
    }

    /// Opens a store whose queues and static kanbans live on Redis Streams (see [`crate::store::redis`]); the
    /// archive stays in the embedded `archive` file. Returns the queued and static kanbans found in Redis.
    ///
    /// # Errors
    /// [`StoreError`] if Redis cannot be reached within `cfg.connect_wait`, or the archive cannot be opened.
    #[allow(clippy::type_complexity)]
    #[cfg(feature = "redis")]
    pub fn open_redis(
        cfg: &RedisConfig,
        archive: &Path,
        retention: Retention,
    ) -> Result<(Store, Vec<Backlog>, Vec<RecoveredStatic>), StoreError> {
        let aconn = open_conn(archive, ARCHIVE_MIGRATIONS)?;
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::channel(64 * 1024);
        let (adopted_tx, adopted_rx) = mpsc::unbounded_channel();
        let (recovered, statics) = crate::store::redis::spawn(cfg, rx, stats.clone(), adopted_tx)?;
        let atx = spawn_writer("aion-archive", aconn, stats.clone(), archive, Some(retention))?;
        let store = Store {
            tx,
            atx,
            stats,
            location: cfg.display_url(),
            backend: "redis",
            archive_path: archive.to_owned(),
            adopted: Arc::new(Mutex::new(Some(adopted_rx))),
        };
        Ok((store, recovered, statics))
    }

    /// Built without the `redis` feature: a clear error.
    ///
    /// # Errors
    /// Always: this build has no Redis store.
    #[allow(clippy::type_complexity)]
    #[cfg(not(feature = "redis"))]
    pub fn open_redis(
        cfg: &RedisConfig,
        _archive: &Path,
        _retention: Retention,
    ) -> Result<(Store, Vec<Backlog>, Vec<RecoveredStatic>), StoreError> {
        Err(StoreError::Redis {
            url: cfg.display_url(),
            message: "this aion was built without the Redis store (cargo feature `redis`)".to_owned(),
        })
    }

    /// Kanbans found in the store while running (Redis: entries another writer added to our streams), to be
    /// queued for delivery. `None` after the first call, and for the embedded store.
    pub fn take_adopted(&self) -> Option<mpsc::UnboundedReceiver<Recovered>> {
        self.adopted.lock().ok().and_then(|mut g| g.take())
    }

    /// Marks archive rows as exported to an external sink.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn mark_exported(&self, rows: Vec<i64>) -> Result<(), StoreError> {
        self.atx.send(Op::Exported(rows)).await.map_err(|_| StoreError::Closed)?;
        self.archive_barrier().await
    }

    /// Completes when every archive write submitted before it is committed.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the archive writer stopped.
    pub async fn archive_barrier(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.atx.send(Op::Barrier(tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// The archive database file.
    pub fn archive_path(&self) -> &Path {
        &self.archive_path
    }

    /// Stores a static kanban.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn static_put(&self, topic: &str, id: u64, k: &WireKanban) -> Result<(), StoreError> {
        let bytes = encode_stored(k);
        self.tx.send(Op::StaticPut { topic: topic.to_owned(), id, bytes }).await.map_err(|_| StoreError::Closed)
    }

    /// Deletes a static kanban.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn static_delete(&self, topic: &str, id: u64) -> Result<(), StoreError> {
        self.tx.send(Op::StaticDelete { topic: topic.to_owned(), id }).await.map_err(|_| StoreError::Closed)
    }

    /// Where the queues are: the database file, or the Redis URL (without password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// `sqlite` (the embedded store) or `redis`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Queues a kanban for durable storage (committed by the next group commit).
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn enqueue(&self, queue: &QueueKey, k: &WireKanban) -> Result<(), StoreError> {
        let bytes = encode_stored(k);
        let (service, instance) = queue.row();
        self.tx
            .send(Op::Enqueue { service: service.into_owned(), instance, id: k.id, hops: k.hops, bytes })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Deletes acknowledged kanbans.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn ack(&self, queue: &QueueKey, ids: Vec<KanbanId>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (service, instance) = queue.row();
        self.tx.send(Op::Ack { service: service.into_owned(), instance, ids }).await.map_err(|_| StoreError::Closed)
    }

    /// Writes archive records (the replicator's batches).
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn archive(&self, ops: Vec<ArchiveOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.atx.send(Op::Archive(ops)).await.map_err(|_| StoreError::Closed)
    }

    /// The next page of a backlog: the kanbans after `after` up to `until`, oldest first, at most `max_rows` and
    /// (beyond the first) `max_bytes`.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped; a read error as [`StoreError::Redis`] or
    /// [`StoreError::Sqlite`]'s text.
    pub async fn page(
        &self,
        b: &Backlog,
        after: &Cursor,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let (reply, rx) = oneshot::channel();
        let (service, instance) = b.queue.row();
        let req = PageRequest {
            service: service.into_owned(),
            instance,
            after: after.clone(),
            until: b.until.clone(),
            key: b.key.clone(),
            max_rows: max_rows.max(1),
            max_bytes,
            reply,
        };
        self.tx.send(Op::Page(req)).await.map_err(|_| StoreError::Closed)?;
        // A dropped reply is not the writer stopping (that fails the send): the caller asks again.
        let page = rx.await.map_err(|_| StoreError::Redis {
            url: self.location.clone(),
            message: "the page request was not answered; retrying".into(),
        })?;
        page.map_err(|message| StoreError::Redis { url: self.location.clone(), message })
    }

    /// A clean stop of the queue store: commits what is pending, checkpoints the WAL into the database file (so
    /// that the file alone holds the queue), and records how many kanbans are queued; the writer then stops.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Close(tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Completes when everything submitted before it is committed.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Barrier(tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aion_runtime::Kanban;

    fn k(n: u128) -> WireKanban {
        Kanban { id: KanbanId(n), ..Kanban::default() }.into_wire()
    }

    #[tokio::test]
    async fn queued_kanbans_survive_reopen_until_acked() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("aion.db");
        {
            let (s, rec) = Store::open(&path, &dir.path().join("archive.db"), Retention::default()).expect("open");
            assert!(rec.is_empty());
            for i in 1..=5 {
                let mut q = k(i);
                q.hops = i as u32 * 10;
                s.enqueue(&QueueKey::instance("svc", 1), &q).await.expect("enqueue");
            }
            s.enqueue(&QueueKey::instance("svc", 1), &k(3)).await.expect("duplicate is ignored");
            s.ack(&QueueKey::instance("svc", 1), vec![KanbanId(2), KanbanId(4)]).await.expect("ack");
            s.barrier().await.expect("barrier");
            assert_eq!(s.stats.enqueued.load(Ordering::Relaxed), 5);
            assert_eq!(s.stats.acked.load(Ordering::Relaxed), 2);
        }
        let (s, rec) = Store::open(&path, &dir.path().join("archive.db"), Retention::default()).expect("reopen");
        assert_eq!((rec.len(), &rec[0].queue, rec[0].count), (1, &QueueKey::instance("svc", 1), 3));
        // Paged in oldest first, within the page's bounds (a first row always comes, whatever its size).
        let mut got = Vec::new();
        let mut after = rec[0].after.clone();
        loop {
            let page = s.page(&rec[0], &after, 2, 1).await.expect("page");
            let Some(next) = page.next else { break };
            assert_eq!(page.kanbans.len(), 1, "max_bytes 1: one row per page");
            after = next;
            got.extend(page.kanbans);
        }
        let ids: Vec<u128> = got.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![1, 3, 5], "oldest first, acked ones gone");
        let hops: Vec<u32> = got.iter().map(|k| k.hops).collect();
        assert_eq!(hops, vec![10, 30, 50], "hop counts are kept beside the kanbans");
        // Rows queued after the recovery are not part of the backlog.
        s.enqueue(&QueueKey::instance("svc", 1), &k(9)).await.expect("enqueue");
        s.barrier().await.expect("barrier");
        let page = s.page(&rec[0], &Cursor::Seq(0), 10, usize::MAX).await.expect("page");
        assert_eq!(page.kanbans.len(), 3);
    }

    #[tokio::test]
    async fn backlog_pages_are_answered_while_a_full_store_retries_a_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, archive) = (dir.path().join("aion.db"), dir.path().join("archive.db"));
        {
            let (s, _) = Store::open(&path, &archive, Retention::default()).expect("open");
            for i in 1..=200 {
                let mut q = k(i);
                q.metadata = aion_runtime::MetadataBytes(vec![7; 2000]);
                s.enqueue(&QueueKey::instance("svc", 1), &q).await.expect("enqueue");
            }
            s.close().await.expect("close");
        }
        // Reopened with a cap at its current size: the next write has no room, and is retried.
        let size = std::fs::metadata(&path).expect("size").len();
        let (s, rec, _) = Store::open_all(&path, &archive, Retention::default(), Some(size)).expect("reopen");
        let mut big = k(999);
        big.metadata = aion_runtime::MetadataBytes(vec![1; 200_000]);
        s.enqueue(&QueueKey::instance("svc", 1), &big).await.expect("enqueue");
        let barrier = {
            let s = s.clone();
            tokio::spawn(async move { s.barrier().await })
        };
        while s.stats.errors.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The writer is retrying: a page is a read, and is answered now.
        let page = tokio::time::timeout(Duration::from_secs(10), s.page(&rec[0], &rec[0].after, 10, usize::MAX))
            .await
            .expect("answered during the retry")
            .expect("page");
        assert_eq!(page.kanbans.len(), 10);
        assert!(!barrier.is_finished(), "the write itself still waits for room");
        // Acknowledgements free room; the write goes through; pages keep being answered.
        let ids: Vec<KanbanId> = (1..=200).map(KanbanId).collect();
        s.ack(&QueueKey::instance("svc", 1), ids).await.expect("ack");
        barrier.await.expect("task").expect("committed once acknowledgements freed room");
        let next = page.next.expect("cursor");
        let page = s.page(&rec[0], &next, 10, usize::MAX).await.expect("page");
        assert!(page.kanbans.is_empty() && page.next.is_none(), "the acknowledged backlog is gone");
    }

    #[tokio::test]
    async fn archive_records_hops_acks_traces_and_retention() {
        let dir = tempfile::tempdir().expect("tmp");
        let (s, _) = Store::open(
            &dir.path().join("aion.db"),
            &dir.path().join("archive.db"),
            Retention { max_age_ms: i64::MAX / 2, max_rows: 3 },
        )
        .expect("open");
        let path = dir.path().join("archive.db");
        let mut a = Kanban { id: KanbanId(1), trace_id: KanbanId(1), ..Kanban::default() };
        a.origin = aion_runtime::Origin { service: "src".into(), instance: 1 };
        let mut b = Kanban { id: KanbanId(2), trace_id: KanbanId(1), ..Kanban::default() };
        b.origin = aion_runtime::Origin { service: "mid".into(), instance: 1 };
        let hop = |k: &Kanban, to: &str| ArchiveOp::Hop {
            kanban: Box::new(k.clone().into_wire()),
            to: Some((to.into(), 1)),
            outcome: "queued",
            at: now_ms() - 10,
            charge: Charge::default(),
        };
        s.archive(vec![hop(&a, "mid"), hop(&b, "sink")]).await.expect("archive");
        s.archive(vec![ArchiveOp::Acked { service: "mid".into(), instance: 1, ids: vec![KanbanId(1)], at: now_ms() }])
            .await
            .expect("ack");
        s.archive_barrier().await.expect("barrier");
        let t = query_trace(&path, KanbanId(2)).expect("trace");
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].from.as_str(), t[0].to.as_deref()), ("src-1", Some("mid-1")));
        assert!(t[0].latency_ms.is_some_and(|l| l >= 0));
        assert!(t[1].acked_at.is_none());
        let log =
            query_log(&path, &LogFilter { service: Some("sink".into()), since_ms: None, limit: 10 }).expect("log");
        assert_eq!(log.len(), 1);
        let conn = Connection::open(&path).expect("raw");
        retain(&conn, Retention { max_age_ms: i64::MAX / 2, max_rows: 1 }).expect("retain");
        assert_eq!(query_log(&path, &LogFilter { limit: 10, ..LogFilter::default() }).expect("log").len(), 1);
    }

    #[test]
    fn schema_version_is_recorded_and_newer_stores_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("aion.db");
        drop(open_conn(&path, QUEUE_MIGRATIONS).expect("open"));
        let conn = Connection::open(&path).expect("raw");
        let v: i64 = conn.query_row("SELECT value FROM meta WHERE key='schema_version'", [], |r| r.get(0)).expect("v");
        assert_eq!(v, SCHEMA_VERSION);
        conn.execute("UPDATE meta SET value = 99 WHERE key='schema_version'", []).expect("bump");
        drop(conn);
        assert!(matches!(open_conn(&path, QUEUE_MIGRATIONS), Err(StoreError::TooNew { found: 99, .. })));
    }

    /// A store written by the previous schema (3: no `format` column, kanbans in format 1) is migrated and its
    /// queued and static kanbans are read.
    #[tokio::test]
    async fn a_store_of_the_previous_format_is_migrated_and_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, archive) = (dir.path().join("aion.db"), dir.path().join("archive.db"));
        {
            let conn = Connection::open(&path).expect("raw");
            conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);").expect("meta");
            for sql in &QUEUE_MIGRATIONS[..3] {
                conn.execute_batch(sql).expect("old schema");
            }
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', 3)", []).expect("v3");
            let old = postcard::to_stdvec(&k(7)).expect("encode");
            conn.execute(
                "INSERT INTO queue (service, instance, id, kanban, hops) VALUES ('svc', 2, ?1, ?2, 4)",
                params![&id_bytes(KanbanId(7))[..], old],
            )
            .expect("row");
            conn.execute("INSERT INTO static_kanban (topic, id, kanban) VALUES ('t', 1, ?1)", params![old])
                .expect("static");
        }
        let (s, rec, statics) = Store::open_all(&path, &archive, Retention::default(), None).expect("open");
        assert_eq!((rec.len(), &rec[0].queue, rec[0].count), (1, &QueueKey::instance("svc", 2), 1));
        let page = s.page(&rec[0], &rec[0].after, 10, usize::MAX).await.expect("page");
        assert_eq!(page.kanbans.len(), 1);
        assert_eq!((page.kanbans[0].id, page.kanbans[0].hops), (KanbanId(7), 4));
        assert_eq!(statics.len(), 1);
        assert_eq!(statics[0].kanban.id, KanbanId(7));
        s.close().await.expect("close");
        let conn = Connection::open(&path).expect("raw");
        let v: i64 = conn.query_row("SELECT value FROM meta WHERE key='schema_version'", [], |r| r.get(0)).expect("v");
        assert_eq!(v, SCHEMA_VERSION);
        let f: u32 = conn.query_row("SELECT format FROM queue", [], |r| r.get(0)).expect("format");
        assert_eq!(f, 1, "rows written before the column existed are format 1");
    }

    /// A kanban stored in a format newer than this build reads is refused with a clear reason, kept in the store,
    /// and does not stop the queue: the rows after it are read.
    #[tokio::test]
    async fn a_kanban_in_a_newer_format_is_kept_and_skipped_with_a_clear_error() {
        let err = decode_stored(KANBAN_FORMAT + 1, &[1, 2, 3]).expect_err("unknown format");
        assert!(err.contains("newer than this aion reads"), "{err}");
        let dir = tempfile::tempdir().expect("tmp");
        let (path, archive) = (dir.path().join("aion.db"), dir.path().join("archive.db"));
        {
            let (s, _) = Store::open(&path, &archive, Retention::default()).expect("open");
            for i in 1..=3 {
                s.enqueue(&QueueKey::instance("svc", 1), &k(i)).await.expect("enqueue");
            }
            s.close().await.expect("close");
        }
        {
            let conn = Connection::open(&path).expect("raw");
            conn.execute(
                "UPDATE queue SET format = ?1 WHERE id = ?2",
                params![KANBAN_FORMAT + 1, &id_bytes(KanbanId(2))[..]],
            )
            .expect("newer row");
        }
        let (s, rec) = Store::open(&path, &archive, Retention::default()).expect("reopen");
        let page = s.page(&rec[0], &rec[0].after, 10, usize::MAX).await.expect("page");
        let ids: Vec<u128> = page.kanbans.iter().map(|k| k.id.0).collect();
        assert_eq!(ids, vec![1, 3]);
        s.close().await.expect("close");
        let conn = Connection::open(&path).expect("raw");
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 3, "the unreadable row is kept");
    }

    #[test]
    fn queue_keys_map_to_rows_and_back() {
        for q in [QueueKey::instance("svc", 3), QueueKey::outbox("edge-2", "svc")] {
            let (name, n) = q.row();
            assert_eq!(QueueKey::from_row(name.into_owned(), n), q);
        }
        assert_eq!(QueueKey::outbox("edge-2", "svc").to_string(), "outbox to svc on edge-2");
    }
}
