//! The embedded durable store: SQLite in WAL mode in the data directory, written by one thread with group
//! commit.
//!
//! Writes are submitted without waiting ([`Store::enqueue`], [`Store::ack`]); a [`Store::barrier`] completes once
//! everything submitted before it is committed. The writer drains every pending operation into one transaction,
//! so many kanbans share one fsync. If a commit fails (disk full, I/O error) the writer keeps the batch, logs,
//! counts, and retries with backoff: barriers wait meanwhile, so producers get back-pressure and nothing
//! accepted is lost.

#[cfg(feature = "redis")]
pub mod redis;
use aion_runtime::{KanbanId, WireKanban};
use rusqlite::{params, Connection, OptionalExtension};
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
/// outbox is `(device, 0)` (instance numbers start at 1, so the two never meet).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKey {
    /// Instance `instance` of `service`.
    Instance {
        /// Service.
        service: String,
        /// Instance (from 1).
        instance: u32,
    },
    /// Kanbans waiting to cross to `device`.
    Outbox {
        /// The device.
        device: String,
    },
}

impl QueueKey {
    /// The queue of an instance.
    pub fn instance(service: &str, instance: u32) -> QueueKey {
        QueueKey::Instance { service: service.to_owned(), instance }
    }

    /// The outbox towards a device.
    pub fn outbox(device: &str) -> QueueKey {
        QueueKey::Outbox { device: device.to_owned() }
    }

    /// The stored row key (see the type's docs).
    pub fn row(&self) -> (&str, u32) {
        match self {
            QueueKey::Instance { service, instance } => (service, *instance),
            QueueKey::Outbox { device } => (device, 0),
        }
    }

    /// The queue of a stored row key.
    pub fn from_row(name: String, n: u32) -> QueueKey {
        if n == 0 {
            QueueKey::Outbox { device: name }
        } else {
            QueueKey::Instance { service: name, instance: n }
        }
    }
}

impl std::fmt::Display for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueKey::Instance { service, instance } => write!(f, "{service}-{instance}"),
            QueueKey::Outbox { device } => write!(f, "outbox to {device}"),
        }
    }
}

/// Migrations of `aion.db`, one per version step.
const QUEUE_MIGRATIONS: &[&str] = &[
    // 0 -> 1: durable instance queues.
    "CREATE TABLE queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        instance INTEGER NOT NULL,
        id BLOB NOT NULL,
        kanban BLOB NOT NULL,
        UNIQUE (service, instance, id)
    );",
    // 1 -> 2: static kanbans (topic store).
    "CREATE TABLE static_kanban (
        topic TEXT NOT NULL,
        id INTEGER NOT NULL,
        kanban BLOB NOT NULL,
        PRIMARY KEY (topic, id)
    );",
    // 2 -> 3: the hop count of each queued kanban's chain (the runtime's, not part of the kanban's encoding).
    "ALTER TABLE queue ADD COLUMN hops INTEGER NOT NULL DEFAULT 0;",
    // 3 -> 4: the encoding of each stored kanban (`KANBAN_FORMAT`); rows written before were format 1.
    "ALTER TABLE queue ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE static_kanban ADD COLUMN format INTEGER NOT NULL DEFAULT 1;",
];

/// Migrations of `archive.db`. A separate file with its own writer: archive load never delays the commits
/// that durable delivery waits for.
const ARCHIVE_MIGRATIONS: &[&str] = &[
    // 0 -> 1: one row per hop, written by the replicator; `exported` for external sinks (MongoDB).
    "CREATE TABLE archive (
        row INTEGER PRIMARY KEY AUTOINCREMENT,
        kanban_id BLOB NOT NULL,
        trace_id BLOB NOT NULL,
        from_service TEXT NOT NULL,
        from_instance INTEGER NOT NULL,
        to_service TEXT,
        to_instance INTEGER,
        connection_key TEXT NOT NULL,
        outcome TEXT NOT NULL,
        accepted_at INTEGER NOT NULL,
        acked_at INTEGER,
        kanban BLOB NOT NULL,
        exported INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX archive_trace ON archive (trace_id);
    CREATE INDEX archive_kanban ON archive (kanban_id);
    CREATE INDEX archive_target ON archive (to_service, to_instance, kanban_id);
    CREATE INDEX archive_time ON archive (accepted_at);
    CREATE INDEX archive_export ON archive (exported, row);",
    // 1 -> 2: the encoding of each archived kanban (`KANBAN_FORMAT`); rows written before were format 1.
    "ALTER TABLE archive ADD COLUMN format INTEGER NOT NULL DEFAULT 1;",
];

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

/// What `aion.db.state` (beside the database) says about the store: written `clean: false` at start and
/// `clean: true` with the number of queued kanbans at a clean stop, so that a database found truncated, emptied
/// or replaced is noticed at the next start instead of starting with part of the queue.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct StoreState {
    clean: bool,
    queued: u64,
}

fn state_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

fn read_state(db: &Path) -> Option<StoreState> {
    serde_json::from_slice(&std::fs::read(state_path(db)).ok()?).ok()
}

/// Writes the state file durably (file and directory synced, so it survives a power cut with the database).
fn write_state(db: &Path, st: StoreState) -> std::io::Result<()> {
    use std::io::Write;
    let path = state_path(db);
    let tmp = path.with_extension("state.tmp");
    let bytes = serde_json::to_vec(&st).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Marks the store as running (not cleanly stopped): without that, a crash of this run would leave the last
/// clean stop's count behind and the next start would refuse a store that is fine. When the state cannot be
/// written (a full disk), it is removed instead (which needs no space); when neither works, the store is not
/// opened.
fn mark_running(db: &Path) -> Result<(), StoreError> {
    if write_state(db, StoreState { clean: false, queued: 0 }).is_ok() {
        return Ok(());
    }
    let path = state_path(db);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Damaged(format!(
            "cannot update the store's state file {} ({e}): a crash could later make a sound store look damaged",
            path.display()
        ))),
    }
}

/// The largest store SQLite's integrity check runs on after a clean stop.
const QUICK_CHECK_MAX: u64 = 256 << 20;

/// Checks the database against its state file and SQLite's own integrity check before anything is read.
fn check_integrity(path: &Path, conn: &Connection, state: Option<StoreState>) -> Result<(), StoreError> {
    let state_file = state_path(path);
    let how = format!(
        "restore it from a backup; or, to start with what it holds, delete {} (kanbans it lost are lost)",
        state_file.display()
    );
    // SQLite's check reads the whole file: always after a crash, and after a clean stop for stores up to 256 MiB
    // (a large store on slow flash would take long to start; its clean stop was counted and is checked below).
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let check: String = if size <= QUICK_CHECK_MAX || !state.is_some_and(|s| s.clean) {
        conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(sq(path))?
    } else {
        "ok".to_owned()
    };
    if check != "ok" {
        return Err(StoreError::Damaged(format!(
            "{} is damaged (SQLite integrity check: {check}); {how}",
            path.display()
        )));
    }
    if let Some(StoreState { clean: true, queued }) = state {
        let found: i64 = conn.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).map_err(sq(path))?;
        if found as u64 != queued {
            return Err(StoreError::Damaged(format!(
                "{} holds {found} queued kanbans, but the last clean stop left {queued} queued kanbans: the file was \
                 truncated or replaced; {how}",
                path.display()
            )));
        }
    }
    Ok(())
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

/// One archive write.
#[derive(Debug, Clone)]
pub enum ArchiveOp {
    /// A hop decided by the router: queued for `to`, or dead-lettered with a reason.
    Hop {
        /// The kanban.
        kanban: Box<WireKanban>,
        /// Target service and instance (`None` for a dead letter without a target).
        to: Option<(String, u32)>,
        /// `queued` or the dead-letter reason.
        outcome: &'static str,
        /// Unix milliseconds.
        at: i64,
        /// Its memory, reserved from the archive's budget.
        charge: Charge,
    },
    /// The target acknowledged these kanbans.
    Acked {
        /// Service.
        service: String,
        /// Instance.
        instance: u32,
        /// Kanban ids.
        ids: Vec<KanbanId>,
        /// Unix milliseconds.
        at: i64,
    },
}

/// How long archive rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Rows older than this many milliseconds are deleted.
    pub max_age_ms: i64,
    /// At most this many rows are kept (the oldest go first).
    pub max_rows: i64,
}

impl Default for Retention {
    /// 7 days, 1 000 000 rows.
    fn default() -> Self {
        Retention { max_age_ms: 7 * 24 * 3600 * 1000, max_rows: 1_000_000 }
    }
}

/// One archive row, as `aion kanban log` and `aion kanban trace` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HopRow {
    /// Kanban id.
    pub kanban_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Producer `service-instance`.
    pub from: String,
    /// Target `service-instance`, if routed.
    pub to: Option<String>,
    /// Connection key.
    pub connection_key: String,
    /// `queued` or the dead-letter reason.
    pub outcome: String,
    /// RFC 3339 time the runtime accepted it.
    pub accepted_at: String,
    /// RFC 3339 time the target acknowledged it.
    pub acked_at: Option<String>,
    /// Milliseconds from accepted to acknowledged.
    pub latency_ms: Option<i64>,
    /// The kanban's metadata.
    pub metadata: serde_json::Value,
}

/// Filters of [`query_log`].
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Rows where this service is the producer or the target.
    pub service: Option<String>,
    /// Rows accepted at or after this Unix millisecond.
    pub since_ms: Option<i64>,
    /// At most this many rows (the most recent).
    pub limit: usize,
}

fn row_to_hop(r: &rusqlite::Row<'_>) -> rusqlite::Result<HopRow> {
    let hex = |b: Vec<u8>| {
        let mut a = [0u8; 16];
        let n = b.len().min(16);
        a[16 - n..].copy_from_slice(&b[b.len() - n..]);
        KanbanId(u128::from_be_bytes(a)).to_string()
    };
    let to_service: Option<String> = r.get(4)?;
    let to_instance: Option<u32> = r.get(5)?;
    let accepted: i64 = r.get(8)?;
    let acked: Option<i64> = r.get(9)?;
    let bytes: Vec<u8> = r.get(10)?;
    let metadata = decode_stored(r.get(11)?, &bytes)
        .ok()
        .and_then(|k| k.metadata.decode().ok())
        .map(|m| aion_runtime::kanban::metadata_to_json(&m))
        .unwrap_or(serde_json::Value::Null);
    Ok(HopRow {
        kanban_id: hex(r.get(0)?),
        trace_id: hex(r.get(1)?),
        from: format!("{}-{}", r.get::<_, String>(2)?, r.get::<_, u32>(3)?),
        to: to_service.map(|s| format!("{s}-{}", to_instance.unwrap_or(0))),
        connection_key: r.get(6)?,
        outcome: r.get(7)?,
        accepted_at: aion_runtime::time::rfc3339_from_unix_millis(accepted),
        acked_at: acked.map(aion_runtime::time::rfc3339_from_unix_millis),
        latency_ms: acked.map(|a| a - accepted),
        metadata,
    })
}

const HOP_COLUMNS: &str = "kanban_id, trace_id, from_service, from_instance, to_service, to_instance, connection_key, \
     outcome, accepted_at, acked_at, kanban";

/// The `format` column of a store read without migrating it (`aion kanban log` on an archive an older aion
/// wrote): the column, or the format every row of that older schema has.
fn format_column(conn: &Connection) -> &'static str {
    let has = conn.prepare("SELECT format FROM archive LIMIT 0").is_ok();
    if has {
        "format"
    } else {
        "1"
    }
}

fn open_read(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq(path))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sq(path))?;
    Ok(conn)
}

/// An archive row waiting for an external sink.
pub struct PendingExport {
    /// Archive row number.
    pub row: i64,
    /// The kanban.
    pub kanban: WireKanban,
    /// Target service and instance.
    pub to: Option<(String, u32)>,
    /// `queued` or the dead-letter reason.
    pub outcome: String,
    /// Unix ms accepted.
    pub accepted_at: i64,
    /// Unix ms acknowledged.
    pub acked_at: Option<i64>,
}

/// Archive rows not yet exported that are final (acknowledged, dead-lettered, or older than a minute),
/// oldest first.
///
/// # Errors
/// [`StoreError`] if the store cannot be read.
pub fn pending_exports(path: &Path, limit: usize) -> Result<Vec<PendingExport>, StoreError> {
    let conn = open_read(path)?;
    let sql = format!(
        "SELECT row, kanban, to_service, to_instance, outcome, accepted_at, acked_at, {} FROM archive \
         WHERE exported = 0 AND (acked_at IS NOT NULL OR outcome != 'queued' OR accepted_at < ?1) \
         ORDER BY row LIMIT ?2",
        format_column(&conn)
    );
    let mut stmt = conn.prepare(&sql).map_err(sq(path))?;
    let rows = stmt
        .query_map(params![now_ms() - 60_000, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<u32>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, u32>(7)?,
            ))
        })
        .map_err(sq(path))?;
    let mut out = Vec::new();
    for row in rows {
        let (row, bytes, ts, ti, outcome, accepted_at, acked_at, format) = row.map_err(sq(path))?;
        match decode_stored(format, &bytes) {
            Ok(kanban) => out.push(PendingExport {
                row,
                kanban,
                to: ts.map(|s| (s, ti.unwrap_or(0))),
                outcome,
                accepted_at,
                acked_at,
            }),
            Err(e) => tracing::error!(row, "unreadable archive row skipped by the export: {e}"),
        }
    }
    Ok(out)
}

/// The most recent archive rows matching `f`, oldest first.
///
/// # Errors
/// [`StoreError`] if the store cannot be read.
pub fn query_log(path: &Path, f: &LogFilter) -> Result<Vec<HopRow>, StoreError> {
    let conn = open_read(path)?;
    let sql = format!(
        "SELECT {HOP_COLUMNS}, {} FROM archive WHERE (?1 IS NULL OR from_service = ?1 OR to_service = ?1) \
         AND (?2 IS NULL OR accepted_at >= ?2) ORDER BY row DESC LIMIT ?3",
        format_column(&conn)
    );
    let mut stmt = conn.prepare(&sql).map_err(sq(path))?;
    let rows = stmt.query_map(params![f.service, f.since_ms, f.limit.max(1) as i64], row_to_hop).map_err(sq(path))?;
    let mut out: Vec<HopRow> = rows.collect::<Result<_, _>>().map_err(sq(path))?;
    out.reverse();
    Ok(out)
}

/// Every hop of the chain that `id` (a kanban id or a trace id) belongs to, in order.
///
/// # Errors
/// [`StoreError`] if the store cannot be read.
pub fn query_trace(path: &Path, id: KanbanId) -> Result<Vec<HopRow>, StoreError> {
    let conn = open_read(path)?;
    let key = id_bytes(id).to_vec();
    let trace: Vec<u8> = conn
        .query_row("SELECT trace_id FROM archive WHERE kanban_id = ?1 LIMIT 1", params![key], |r| r.get(0))
        .optional()
        .map_err(sq(path))?
        .unwrap_or(key);
    let sql = format!("SELECT {HOP_COLUMNS}, {} FROM archive WHERE trace_id = ?1 ORDER BY row", format_column(&conn));
    let mut stmt = conn.prepare(&sql).map_err(sq(path))?;
    let rows = stmt.query_map(params![trace], row_to_hop).map_err(sq(path))?;
    rows.collect::<Result<_, _>>().map_err(sq(path))
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

fn spawn_writer(
    name: &str,
    conn: Connection,
    stats: Arc<StoreStats>,
    path: &Path,
    retention: Option<Retention>,
) -> Result<mpsc::Sender<Op>, StoreError> {
    let (tx, rx) = mpsc::channel(64 * 1024);
    let p = path.to_owned();
    std::thread::Builder::new().name(name.into()).spawn(move || writer(conn, rx, stats, p, retention)).map_err(
        |e| StoreError::Sqlite { path: path.to_owned(), source: rusqlite::Error::InvalidPath(e.to_string().into()) },
    )?;
    Ok(tx)
}

fn sq(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

fn id_bytes(id: KanbanId) -> [u8; 16] {
    id.0.to_be_bytes()
}

/// Opens (creating or migrating) a database and applies the pragmas.
fn open_conn(path: &Path, migrations: &[&str]) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sq(path))?;
    // Private, whatever the umask; SQLite gives the WAL and shared-memory files the database file's mode.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), "cannot make the database private: {e}");
        }
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sq(path))?;
    // Queues: fsync every commit (survives power loss). The archive is diagnostic: WAL with NORMAL survives a
    // crash of the process and skips the per-commit fsync.
    let sync = if std::ptr::eq(migrations, ARCHIVE_MIGRATIONS) { "NORMAL" } else { "FULL" };
    conn.pragma_update(None, "synchronous", sync).map_err(sq(path))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sq(path))?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);")
        .map_err(sq(path))?;
    let version: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
        .optional()
        .map_err(sq(path))?
        .unwrap_or(0);
    if version > migrations.len() as i64 {
        return Err(StoreError::TooNew { path: path.to_owned(), found: version });
    }
    for (v, sql) in migrations.iter().enumerate().skip(version as usize) {
        let next = v as i64 + 1;
        let tx = conn.unchecked_transaction().map_err(sq(path))?;
        tx.execute_batch(sql).map_err(sq(path))?;
        tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)", params![next])
            .map_err(sq(path))?;
        tx.commit().map_err(sq(path))?;
        tracing::info!(path = %path.display(), version = next, "store schema migrated");
    }
    Ok(conn)
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
            .send(Op::Enqueue { service: service.to_owned(), instance, id: k.id, hops: k.hops, bytes })
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
        self.tx.send(Op::Ack { service: service.to_owned(), instance, ids }).await.map_err(|_| StoreError::Closed)
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
            service: service.to_owned(),
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

fn apply(conn: &Connection, batch: &[Op]) -> rusqlite::Result<(u64, u64, u64)> {
    let tx = conn.unchecked_transaction()?;
    let (mut enq, mut acked, mut archived) = (0, 0, 0);
    {
        // Statements are prepared (and cached) per operation: each file has only its own tables.
        const HOP: &str = "INSERT INTO archive (kanban_id, trace_id, from_service, from_instance, to_service, \
             to_instance, connection_key, outcome, accepted_at, kanban, format) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
        const HOP_ACK: &str = "UPDATE archive SET acked_at = ?4 WHERE to_service = ?1 AND to_instance = ?2 \
             AND kanban_id = ?3 AND acked_at IS NULL";
        const INS: &str = "INSERT OR IGNORE INTO queue (service, instance, id, kanban, hops, format) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
        const DEL: &str = "DELETE FROM queue WHERE service = ?1 AND instance = ?2 AND id = ?3";
        for op in batch {
            match op {
                Op::Enqueue { service, instance, id, hops, bytes } => {
                    enq += tx.prepare_cached(INS)?.execute(params![
                        service,
                        instance,
                        &id_bytes(*id)[..],
                        bytes,
                        hops,
                        KANBAN_FORMAT
                    ])? as u64;
                }
                Op::Ack { service, instance, ids } => {
                    for id in ids {
                        acked +=
                            tx.prepare_cached(DEL)?.execute(params![service, instance, &id_bytes(*id)[..]])? as u64;
                    }
                }
                Op::Archive(ops) => {
                    for a in ops {
                        match a {
                            ArchiveOp::Hop { kanban, to, outcome, at, .. } => {
                                let bytes = encode_stored(kanban);
                                let (ts, ti) = match to {
                                    Some((s, i)) => (Some(s.as_str()), Some(*i)),
                                    None => (None, None),
                                };
                                tx.prepare_cached(HOP)?.execute(params![
                                    &id_bytes(kanban.id)[..],
                                    &id_bytes(kanban.trace_id)[..],
                                    kanban.origin.service,
                                    kanban.origin.instance,
                                    ts,
                                    ti,
                                    kanban.connection_key,
                                    outcome,
                                    at,
                                    bytes,
                                    KANBAN_FORMAT
                                ])?;
                                archived += 1;
                            }
                            ArchiveOp::Acked { service, instance, ids, at } => {
                                for id in ids {
                                    tx.prepare_cached(HOP_ACK)?.execute(params![
                                        service,
                                        instance,
                                        &id_bytes(*id)[..],
                                        at
                                    ])?;
                                }
                            }
                        }
                    }
                }
                Op::Exported(rows) => {
                    let mut up = tx.prepare_cached("UPDATE archive SET exported = 1 WHERE row = ?1")?;
                    for r in rows {
                        up.execute(params![r])?;
                    }
                }
                Op::StaticPut { topic, id, bytes } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO static_kanban (topic, id, kanban, format) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![topic, *id as i64, bytes, KANBAN_FORMAT])?;
                }
                Op::StaticDelete { topic, id } => {
                    tx.prepare_cached("DELETE FROM static_kanban WHERE topic = ?1 AND id = ?2")?
                        .execute(params![topic, *id as i64])?;
                }
                Op::Barrier(_) | Op::Page(_) | Op::Close(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok((enq, acked, archived))
}

/// Moves operations already queued on `rx` into `batch`, up to `limit` in all; never waits.
pub(crate) fn take_queued(rx: &mut mpsc::Receiver<Op>, batch: &mut Vec<Op>, limit: usize) {
    while batch.len() < limit {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Empties an applied batch, completing its barriers.
pub(crate) fn complete_barriers(batch: &mut Vec<Op>) {
    for op in batch.drain(..) {
        if let Op::Barrier(done) = op {
            let _ = done.send(());
        }
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// On a full store: commits the batch's acknowledgements (and static deletions) on their own and removes them from
/// the batch, together with enqueues of kanbans acknowledged in the same batch (delivered and done; nothing to
/// keep). Returns the number of queue rows deleted.
fn apply_deletes_only(conn: &Connection, batch: &mut Vec<Op>) -> rusqlite::Result<u64> {
    let mut acked: std::collections::HashSet<(String, u32, KanbanId)> = std::collections::HashSet::new();
    for op in batch.iter() {
        if let Op::Ack { service, instance, ids } = op {
            acked.extend(ids.iter().map(|id| (service.clone(), *instance, *id)));
        }
    }
    let tx = conn.unchecked_transaction()?;
    let mut freed = 0u64;
    for op in batch.iter() {
        match op {
            Op::Ack { service, instance, ids } => {
                for id in ids {
                    freed += tx
                        .prepare_cached("DELETE FROM queue WHERE service = ?1 AND instance = ?2 AND id = ?3")?
                        .execute(params![service, instance, &id_bytes(*id)[..]])? as u64;
                }
            }
            Op::StaticDelete { topic, id } => {
                tx.prepare_cached("DELETE FROM static_kanban WHERE topic = ?1 AND id = ?2")?
                    .execute(params![topic, *id as i64])?;
            }
            _ => {}
        }
    }
    tx.commit()?;
    batch.retain(|op| match op {
        Op::Ack { .. } | Op::StaticDelete { .. } => false,
        Op::Enqueue { service, instance, id, .. } => !acked.contains(&(service.clone(), *instance, *id)),
        _ => true,
    });
    Ok(freed)
}

/// Answers (and removes from the batch) every backlog page request.
fn serve_pages(conn: &Connection, batch: &mut Vec<Op>) {
    if !batch.iter().any(|op| matches!(op, Op::Page(_))) {
        return;
    }
    let mut rest = Vec::with_capacity(batch.len());
    for op in batch.drain(..) {
        match op {
            Op::Page(req) => {
                let page = read_page(conn, &req).map_err(|e| e.to_string());
                let _ = req.reply.send(page);
            }
            other => rest.push(other),
        }
    }
    *batch = rest;
}

fn read_page(conn: &Connection, req: &PageRequest) -> rusqlite::Result<Page> {
    let (Cursor::Seq(after), Cursor::Seq(until)) = (&req.after, &req.until) else {
        return Ok(Page::default());
    };
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kanban, hops, format FROM queue WHERE service = ?1 AND instance = ?2 AND seq > ?3 AND seq <= ?4 \
         ORDER BY seq LIMIT ?5",
    )?;
    let mut rows = stmt.query(params![req.service, req.instance, after, until, req.max_rows as i64])?;
    let mut page = Page::default();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        // A row that cannot be read is skipped (logged, left in the store), never a reason to stall the queue.
        let blob: Vec<u8> = match r.get(1) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(service = %req.service, instance = req.instance, seq, "unreadable queued kanban kept in the store: {e}");
                page.next = Some(Cursor::Seq(seq));
                continue;
            }
        };
        if !page.kanbans.is_empty() && bytes + blob.len() > req.max_bytes {
            break;
        }
        bytes += blob.len();
        page.next = Some(Cursor::Seq(seq));
        match decode_stored(r.get(3)?, &blob) {
            Ok(mut k) => {
                k.hops = r.get::<_, i64>(2).map_or(0, |h| h.clamp(0, i64::from(u32::MAX)) as u32);
                page.kanbans.push(Box::new(k));
            }
            // Left in the store (and skipped): the next page starts after it.
            Err(e) => {
                tracing::error!(service = %req.service, instance = req.instance, seq, "unreadable queued kanban kept in the store: {e}")
            }
        }
    }
    Ok(page)
}

/// Deletes archive rows beyond the retention limits.
fn retain(conn: &Connection, r: Retention) -> rusqlite::Result<usize> {
    let cutoff = now_ms() - r.max_age_ms;
    let mut n = conn.execute("DELETE FROM archive WHERE accepted_at < ?1", params![cutoff])?;
    n += conn.execute("DELETE FROM archive WHERE row <= (SELECT MAX(row) FROM archive) - ?1", params![r.max_rows])?;
    Ok(n)
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn writer(
    conn: Connection,
    mut rx: mpsc::Receiver<Op>,
    stats: Arc<StoreStats>,
    path: PathBuf,
    retention: Option<Retention>,
) {
    let mut batch: Vec<Op> = Vec::new();
    let mut since_retention: u64 = 0;
    if let Some(r) = retention {
        if let Err(e) = retain(&conn, r) {
            tracing::error!("archive retention failed: {e}");
        }
    }
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        take_queued(&mut rx, &mut batch, 8192);
        let mut delay = Duration::from_millis(10);
        loop {
            // Reads need no space: pages that arrived during a retry are answered at once (a consumer paging its
            // backlog in is what frees space on a full store).
            serve_pages(&conn, &mut batch);
            match apply(&conn, &batch) {
                Ok((enq, acked, archived)) => {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    stats.enqueued.fetch_add(enq, Ordering::Relaxed);
                    stats.acked.fetch_add(acked, Ordering::Relaxed);
                    stats.archived.fetch_add(archived, Ordering::Relaxed);
                    since_retention += archived;
                    if let Some(retention) = retention.filter(|_| since_retention >= 10_000) {
                        since_retention = 0;
                        match retain(&conn, retention) {
                            Ok(n) if n > 0 => tracing::info!(rows = n, "archive retention removed old rows"),
                            Ok(_) => {}
                            Err(e) => tracing::error!("archive retention failed: {e}"),
                        }
                    }
                    break;
                }
                Err(e) => {
                    // Keep the batch: nothing is acknowledged to producers until it is committed. A full disk
                    // (or --store-max-mb) must not block the acknowledgements that free space: commit those alone.
                    if is_full(&e) {
                        // Acknowledgements that arrived meanwhile are what frees space: take them in (after the
                        // batch, so order is kept).
                        take_queued(&mut rx, &mut batch, 65_536);
                        match apply_deletes_only(&conn, &mut batch) {
                            Ok(freed) if freed > 0 => {
                                stats.acked.fetch_add(freed, Ordering::Relaxed);
                                tracing::warn!(path = %path.display(), freed, "store full: committed acknowledgements first to free space");
                            }
                            Ok(_) => {}
                            Err(e2) => {
                                tracing::error!(path = %path.display(), "store full, and deleting acknowledged kanbans failed too: {e2}")
                            }
                        }
                    }
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %path.display(), "store commit failed, retrying in {delay:?}: {e}");
                    if let Ok(mut l) = stats.last_error.lock() {
                        *l = Some(e.to_string());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        if let Some(done) = take_close(&mut batch) {
            complete_barriers(&mut batch);
            close(&conn, &path, &stats);
            let _ = done.send(());
            return;
        }
        complete_barriers(&mut batch);
    }
}

/// Takes the close request out of a batch, if there is one.
pub(crate) fn take_close(batch: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
    let i = batch.iter().position(|op| matches!(op, Op::Close(_)))?;
    match batch.remove(i) {
        Op::Close(done) => Some(done),
        _ => None,
    }
}

/// A clean stop of a database: checkpoint the WAL into the file, then (for the queue store) record its size.
fn close(conn: &Connection, path: &Path, stats: &StoreStats) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(path = %path.display(), "WAL checkpoint at stop failed: {e}");
    }
    let queued: Result<i64, _> = conn.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0));
    if let Ok(queued) = queued {
        if let Err(e) = write_state(path, StoreState { clean: true, queued: queued as u64 }) {
            tracing::warn!(path = %path.display(), "cannot record the clean stop in the state file: {e}");
        }
    }
    let _ = stats;
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
        for q in [QueueKey::instance("svc", 3), QueueKey::outbox("edge-2")] {
            let (name, n) = q.row();
            assert_eq!(QueueKey::from_row(name.to_owned(), n), q);
        }
        assert_eq!(QueueKey::outbox("edge-2").to_string(), "outbox to edge-2");
    }
}
