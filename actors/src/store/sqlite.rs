//! The embedded queue store's SQLite side: schema and migrations, the state file and integrity check at open,
//! and the writer thread (group commit, retries on a full disk, backlog pages served between batches).

#![allow(clippy::wildcard_imports)]
use super::*;
/// Migrations of `aion.db`, one per version step.
pub(super) const QUEUE_MIGRATIONS: &[&str] = &[
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
/// What `aion.db.state` (beside the database) says about the store: written `clean: false` at start and
/// `clean: true` with the number of queued kanbans at a clean stop, so that a database found truncated, emptied
/// or replaced is noticed at the next start instead of starting with part of the queue.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct StoreState {
    pub(super) clean: bool,
    pub(super) queued: u64,
}

pub(super) fn state_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

pub(super) fn read_state(db: &Path) -> Option<StoreState> {
    serde_json::from_slice(&std::fs::read(state_path(db)).ok()?).ok()
}

/// Writes the state file durably (file and directory synced, so it survives a power cut with the database).
pub(super) fn write_state(db: &Path, st: StoreState) -> std::io::Result<()> {
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
pub(super) fn mark_running(db: &Path) -> Result<(), StoreError> {
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
pub(super) const QUICK_CHECK_MAX: u64 = 256 << 20;

/// Checks the database against its state file and SQLite's own integrity check before anything is read.
pub(super) fn check_integrity(path: &Path, conn: &Connection, state: Option<StoreState>) -> Result<(), StoreError> {
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
pub(super) fn spawn_writer(
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

pub(super) fn sq(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

pub(super) fn id_bytes(id: KanbanId) -> [u8; 16] {
    id.0.to_be_bytes()
}

/// Opens (creating or migrating) a database and applies the pragmas.
pub(super) fn open_conn(path: &Path, migrations: &[&str]) -> Result<Connection, StoreError> {
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
pub(super) fn apply(conn: &Connection, batch: &[Op]) -> rusqlite::Result<(u64, u64, u64)> {
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

pub(super) fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// On a full store: commits the batch's acknowledgements (and static deletions) on their own and removes them from
/// the batch, together with enqueues of kanbans acknowledged in the same batch (delivered and done; nothing to
/// keep). Returns the number of queue rows deleted.
pub(super) fn apply_deletes_only(conn: &Connection, batch: &mut Vec<Op>) -> rusqlite::Result<u64> {
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

/// Takes the backlog page requests out of a batch (reads, answered before the batch's writes), in order.
pub(crate) fn take_pages(batch: &mut Vec<Op>) -> Vec<PageRequest> {
    if !batch.iter().any(|op| matches!(op, Op::Page(_))) {
        return Vec::new();
    }
    let mut pages = Vec::new();
    batch.retain_mut(|op| match std::mem::replace(op, Op::Exported(Vec::new())) {
        Op::Page(req) => {
            pages.push(req);
            false
        }
        other => {
            *op = other;
            true
        }
    });
    pages
}

/// Answers (and removes from the batch) every backlog page request.
pub(super) fn serve_pages(conn: &Connection, batch: &mut Vec<Op>) {
    for req in take_pages(batch) {
        let page = read_page(conn, &req).map_err(|e| e.to_string());
        let _ = req.reply.send(page);
    }
}

pub(super) fn read_page(conn: &Connection, req: &PageRequest) -> rusqlite::Result<Page> {
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
pub(super) fn writer(
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
            let began = std::time::Instant::now();
            match apply(&conn, &batch) {
                Ok((enq, acked, archived)) => {
                    stats.committed(began.elapsed());
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
                    tracing::error!(path = %path.display(), "store commit failed, retrying in {delay:?}: {e}");
                    stats.commit_failed(e.to_string());
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
pub(super) fn close(conn: &Connection, path: &Path, stats: &StoreStats) {
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
