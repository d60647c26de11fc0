//! The archive (`archive.db`): one row per hop, written by the replicator through the archive writer, read by
//! `aion kanban log`/`trace` and the external sinks, trimmed by retention.

#![allow(clippy::wildcard_imports)]
use super::*;
/// Migrations of `archive.db`. A separate file with its own writer: archive load never delays the commits
/// that durable delivery waits for.
pub(super) const ARCHIVE_MIGRATIONS: &[&str] = &[
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HopRow {
    /// The device whose archive holds it (cluster mode; empty for this device's own archive read directly).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
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

pub(super) fn row_to_hop(r: &rusqlite::Row<'_>) -> rusqlite::Result<HopRow> {
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
        device: String::new(),
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

pub(super) const HOP_COLUMNS: &str =
    "kanban_id, trace_id, from_service, from_instance, to_service, to_instance, connection_key, \
     outcome, accepted_at, acked_at, kanban";

/// The `format` column of a store read without migrating it (`aion kanban log` on an archive an older aion
/// wrote): the column, or the format every row of that older schema has.
pub(super) fn format_column(conn: &Connection) -> &'static str {
    let has = conn.prepare("SELECT format FROM archive LIMIT 0").is_ok();
    if has {
        "format"
    } else {
        "1"
    }
}

pub(super) fn open_read(path: &Path) -> Result<Connection, StoreError> {
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
/// Deletes archive rows beyond the retention limits.
pub(super) fn retain(conn: &Connection, r: Retention) -> rusqlite::Result<usize> {
    let cutoff = now_ms() - r.max_age_ms;
    let mut n = conn.execute("DELETE FROM archive WHERE accepted_at < ?1", params![cutoff])?;
    n += conn.execute("DELETE FROM archive WHERE row <= (SELECT MAX(row) FROM archive) - ?1", params![r.max_rows])?;
    Ok(n)
}
