//! The embedded durable store: SQLite in WAL mode in the data directory, written by one thread with group
//! commit.
//!
//! Writes are submitted without waiting ([`Store::enqueue`], [`Store::ack`]); a [`Store::barrier`] completes once
//! everything submitted before it is committed. The writer drains every pending operation into one transaction,
//! so many kanbans share one fsync. If a commit fails (disk full, I/O error) the writer keeps the batch, logs,
//! counts, and retries with backoff: barriers wait meanwhile, so producers get back-pressure and nothing
//! accepted is lost.

use aion_runtime::{KanbanId, WireKanban};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The schema version this build writes. Older stores are migrated on open.
pub const SCHEMA_VERSION: i64 = 1;

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
    #[error("store {path} has schema version {found}; this build knows up to {SCHEMA_VERSION}")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: i64,
    },
    /// The writer thread is gone.
    #[error("the store writer has stopped")]
    Closed,
}

enum Op {
    Enqueue { service: String, instance: u32, id: KanbanId, bytes: Vec<u8> },
    Ack { service: String, instance: u32, ids: Vec<KanbanId> },
    Barrier(oneshot::Sender<()>),
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
    /// Failed commit attempts (each retried).
    pub errors: AtomicU64,
    /// The last error, if any.
    pub last_error: Mutex<Option<String>>,
}

/// A kanban recovered from the store at start-up.
pub struct Recovered {
    /// Target service.
    pub service: String,
    /// Target instance.
    pub instance: u32,
    /// The kanban.
    pub kanban: Box<WireKanban>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    /// Counters.
    pub stats: Arc<StoreStats>,
    path: PathBuf,
}

fn sq(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

fn id_bytes(id: KanbanId) -> [u8; 16] {
    id.0.to_be_bytes()
}

/// Opens (creating or migrating) the database and applies the pragmas.
fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sq(path))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sq(path))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(sq(path))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sq(path))?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);")
        .map_err(sq(path))?;
    let version: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
        .optional()
        .map_err(sq(path))?
        .unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew { path: path.to_owned(), found: version });
    }
    // Migrations, one per version step, each in its own transaction.
    const MIGRATIONS: &[&str] = &[
        // 0 -> 1: durable instance queues.
        "CREATE TABLE queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            service TEXT NOT NULL,
            instance INTEGER NOT NULL,
            id BLOB NOT NULL,
            kanban BLOB NOT NULL,
            UNIQUE (service, instance, id)
        );",
    ];
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
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
    pub fn open(path: &Path) -> Result<(Store, Vec<Recovered>), StoreError> {
        let conn = open_conn(path)?;
        let mut recovered = Vec::new();
        {
            let mut stmt =
                conn.prepare("SELECT service, instance, kanban FROM queue ORDER BY seq").map_err(sq(path))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, Vec<u8>>(2)?)))
                .map_err(sq(path))?;
            for row in rows {
                let (service, instance, bytes) = row.map_err(sq(path))?;
                match postcard::from_bytes::<WireKanban>(&bytes) {
                    Ok(k) => recovered.push(Recovered { service, instance, kanban: Box::new(k) }),
                    Err(e) => tracing::error!(service, instance, "unreadable queued kanban kept in the store: {e}"),
                }
            }
        }
        let (tx, rx) = mpsc::channel(64 * 1024);
        let stats = Arc::new(StoreStats::default());
        let st = stats.clone();
        let p = path.to_owned();
        std::thread::Builder::new().name("aion-store".into()).spawn(move || writer(conn, rx, st, p)).map_err(|e| {
            StoreError::Sqlite { path: path.to_owned(), source: rusqlite::Error::InvalidPath(e.to_string().into()) }
        })?;
        Ok((Store { tx, stats, path: path.to_owned() }, recovered))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a kanban for durable storage (committed by the next group commit).
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn enqueue(&self, service: &str, instance: u32, k: &WireKanban) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(k).map_err(|_| StoreError::Closed)?;
        self.tx
            .send(Op::Enqueue { service: service.to_owned(), instance, id: k.id, bytes })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Deletes acknowledged kanbans.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer stopped.
    pub async fn ack(&self, service: &str, instance: u32, ids: Vec<KanbanId>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.tx.send(Op::Ack { service: service.to_owned(), instance, ids }).await.map_err(|_| StoreError::Closed)
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

fn apply(conn: &Connection, batch: &[Op]) -> rusqlite::Result<(u64, u64)> {
    let tx = conn.unchecked_transaction()?;
    let (mut enq, mut acked) = (0, 0);
    {
        let mut ins =
            tx.prepare_cached("INSERT OR IGNORE INTO queue (service, instance, id, kanban) VALUES (?1, ?2, ?3, ?4)")?;
        let mut del = tx.prepare_cached("DELETE FROM queue WHERE service = ?1 AND instance = ?2 AND id = ?3")?;
        for op in batch {
            match op {
                Op::Enqueue { service, instance, id, bytes } => {
                    enq += ins.execute(params![service, instance, &id_bytes(*id)[..], bytes])? as u64;
                }
                Op::Ack { service, instance, ids } => {
                    for id in ids {
                        acked += del.execute(params![service, instance, &id_bytes(*id)[..]])? as u64;
                    }
                }
                Op::Barrier(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok((enq, acked))
}

fn writer(conn: Connection, mut rx: mpsc::Receiver<Op>, stats: Arc<StoreStats>, path: PathBuf) {
    let mut batch: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 8192 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(10);
        loop {
            match apply(&conn, &batch) {
                Ok((enq, acked)) => {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    stats.enqueued.fetch_add(enq, Ordering::Relaxed);
                    stats.acked.fetch_add(acked, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    // Keep the batch: nothing is acknowledged to producers until it is committed.
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
        for op in batch.drain(..) {
            if let Op::Barrier(done) = op {
                let _ = done.send(());
            }
        }
    }
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
            let (s, rec) = Store::open(&path).expect("open");
            assert!(rec.is_empty());
            for i in 1..=5 {
                s.enqueue("svc", 1, &k(i)).await.expect("enqueue");
            }
            s.enqueue("svc", 1, &k(3)).await.expect("duplicate is ignored");
            s.ack("svc", 1, vec![KanbanId(2), KanbanId(4)]).await.expect("ack");
            s.barrier().await.expect("barrier");
            assert_eq!(s.stats.enqueued.load(Ordering::Relaxed), 5);
            assert_eq!(s.stats.acked.load(Ordering::Relaxed), 2);
        }
        let (_s, rec) = Store::open(&path).expect("reopen");
        let ids: Vec<u128> = rec.iter().map(|r| r.kanban.id.0).collect();
        assert_eq!(ids, vec![1, 3, 5], "oldest first, acked ones gone");
        assert_eq!(rec[0].service, "svc");
    }

    #[test]
    fn schema_version_is_recorded_and_newer_stores_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("aion.db");
        drop(open_conn(&path).expect("open"));
        let conn = Connection::open(&path).expect("raw");
        let v: i64 = conn.query_row("SELECT value FROM meta WHERE key='schema_version'", [], |r| r.get(0)).expect("v");
        assert_eq!(v, SCHEMA_VERSION);
        conn.execute("UPDATE meta SET value = 99 WHERE key='schema_version'", []).expect("bump");
        drop(conn);
        assert!(matches!(open_conn(&path), Err(StoreError::TooNew { found: 99, .. })));
    }
}
