//! The Redis Streams backend of the durable queues (`aion run --store redis://…`), for AION setups that already
//! run Redis.
//!
//! Key names are AION's, so existing dashboards and tools still see the queues:
//! - `kanban:before:<svc>:<NNN>`: the input queue of instance NNN of `svc`, one entry per accepted kanban;
//! - `kanban:static:<topic>`: static kanbans.
//!
//! Each entry has the fields `kanban` (AION's protojson `StatusKanban`, what AION's tools read), `id` (our kanban
//! id, 32 hex digits), `wire` (the exact kanban, postcard; authoritative) and `fmt` (the encoding of `wire`,
//! [`crate::store::KANBAN_FORMAT`]; an entry without it is format 1). Static entries also carry `sid`. An outbox
//! (cluster mode) is the stream of instance 0 of the device's name (see [`crate::store::QueueKey`]).
//!
//! Delivery is at-least-once through a consumer group (`aion`) per stream, unlike AION (no acks, `MAXLEN 50`,
//! `FLUSHALL` at start):
//! - the writer `XADD`s a batch of accepted kanbans and, in the same pipeline, `XREADGROUP`s them into the
//!   pending list of this runtime's consumer (the runtime delivers them from memory; the pending list says
//!   "delivered, not yet acknowledged");
//! - the service's ack becomes `XACK` (and `XDEL`, unless acknowledged entries are retained);
//! - at start, `XAUTOCLAIM` takes over everything the consumers of earlier runs left pending, `XREADGROUP >`
//!   picks up entries never read, and both are delivered again; consumers left without pending entries are
//!   removed. Entries that AION itself wrote (no `wire` field) are imported from their protojson.
//!
//! Nothing is ever flushed, and nothing unacknowledged is ever trimmed. Acknowledged entries are deleted at once
//! by default; with a retention of N they are kept (newest N per stream) and trimmed with `XTRIM MINID` bounded
//! by the oldest pending entry.
//!
//! A Redis restart or network blip: the batch is retried on a new connection with backoff (producers wait: back-
//! pressure, nothing acknowledged early). A retried batch first checks which of its entries already reached the
//! stream, so a reply lost in the blip does not add a kanban twice.
//!
//! Durability across a Redis crash is Redis's own: use `appendonly yes` (and `appendfsync always` for the
//! same guarantee as the embedded store). The runtime warns at start when append-only is off.

use crate::store::{
    complete_barriers, decode_stored, encode_stored, take_pages, take_queued, Backlog, Cursor, Op, Page, PageRequest,
    QueueKey, Recovered, RecoveredStatic, StoreError, StoreStats, KANBAN_FORMAT,
};
use aion_runtime::{Kanban, KanbanId, Origin, WireKanban};
use redis::aio::MultiplexedConnection;
use redis::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The consumer group the runtime reads every queue stream with.
pub const GROUP: &str = "aion";

pub use super::RedisConfig;

/// Stream key of an instance's input queue (AION's name).
pub fn before_key(service: &str, instance: u32) -> String {
    format!("kanban:before:{service}:{instance:03}")
}

/// Stream key of a static-kanban topic (AION's name).
pub fn static_key(topic: &str) -> String {
    format!("kanban:static:{topic}")
}

fn parse_before_key(key: &str) -> Option<(String, u32)> {
    let rest = key.strip_prefix("kanban:before:")?;
    let (svc, n) = rest.rsplit_once(':')?;
    Some((svc.to_owned(), n.parse().ok()?))
}

fn rerr(url: &str) -> impl Fn(redis::RedisError) -> StoreError + '_ {
    move |e| StoreError::Redis { url: url.to_owned(), message: e.to_string() }
}

/// A stream entry: id and field/value pairs.
struct Entry {
    id: String,
    fields: HashMap<String, Vec<u8>>,
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Field/value pairs of a reply that is a map (RESP3) or a flat array (RESP2), e.g. `XINFO`, `CONFIG GET`.
fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m.iter().filter_map(|(a, b)| Some((string(a)?, b.clone()))).collect(),
        other => array(other).chunks(2).filter_map(|p| Some((string(p.first()?)?, p.get(1)?.clone()))).collect(),
    }
}

/// The string value of `field` in [`pairs`].
fn field(pairs: &[(String, Value)], name: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == name).and_then(|(_, v)| string(v))
}

/// `XADD key * kanban <AION protojson> <id_field> <id> wire <postcard> fmt <format> [hops <n>]`: the format of
/// every entry written (`hops`, the chain's hop count, on queue entries whose count is not 0).
fn xadd(key: &str, id_field: &str, id: &str, wire: &[u8], hops: u32) -> redis::Cmd {
    let json = decode_stored(KANBAN_FORMAT, wire).map(|k| k.to_aion_json()).unwrap_or_default();
    let mut c = redis::cmd("XADD");
    c.arg(key).arg("*").arg("kanban").arg(json).arg(id_field).arg(id).arg("wire").arg(wire);
    c.arg("fmt").arg(KANBAN_FORMAT);
    if hops > 0 {
        c.arg("hops").arg(hops);
    }
    c
}

/// Parses `[[id, [field, value, …]], …]` (entries deleted meanwhile come back as nil and are skipped).
fn entries(v: &Value) -> Vec<Entry> {
    array(v)
        .iter()
        .filter_map(|e| {
            let parts = array(e);
            let id = string(parts.first()?)?;
            let mut fields = HashMap::new();
            for kv in array(parts.get(1)?).chunks(2) {
                if let [k, v] = kv {
                    if let (Some(k), Some(v)) = (string(k), bytes(v)) {
                        fields.insert(k, v);
                    }
                }
            }
            Some(Entry { id, fields })
        })
        .collect()
}

/// Parses an `XREAD`/`XREADGROUP` reply: each stream's key and entries, from `[[key, entries], …]` (RESP2) or
/// a map (RESP3).
fn streams(v: &Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Map(m) => m.iter().filter_map(|(k, e)| Some((string(k)?, entries(e)))).collect(),
        other => array(other)
            .iter()
            .filter_map(|s| {
                let kv = array(s);
                Some((string(kv.first()?)?, entries(kv.get(1)?)))
            })
            .collect(),
    }
}

/// `(ms, seq)` of a stream id, for ordering.
fn stream_id(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('-').unwrap_or((s, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// A kanban id for an entry AION wrote: derived from the key and entry id, so it is the same on every start.
fn imported_id(key: &str, entry: &str) -> KanbanId {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in key.bytes().chain([0]).chain(entry.bytes()) {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
    }
    KanbanId(h)
}

/// Decodes an entry: ours (`wire`) or AION's (`kanban` protojson).
fn decode(key: &str, e: &Entry, origin: &str) -> Result<WireKanban, String> {
    if let Some(w) = e.fields.get("wire") {
        let format = e.fields.get("fmt").and_then(|f| std::str::from_utf8(f).ok()?.parse().ok()).unwrap_or(1);
        let mut k = decode_stored(format, w).map_err(|err| format!("`wire` field: {err}"))?;
        k.hops = e.fields.get("hops").and_then(|h| std::str::from_utf8(h).ok()?.parse().ok()).unwrap_or(0);
        return Ok(k);
    }
    let json = e.fields.get("kanban").ok_or("neither a `wire` nor a `kanban` field")?;
    let json = std::str::from_utf8(json).map_err(|_| "`kanban` field is not UTF-8".to_owned())?;
    let mut k = Kanban::from_aion_json(json).map_err(|err| format!("`kanban` field is not AION protojson: {err}"))?;
    k.id = imported_id(key, &e.id);
    k.trace_id = k.id;
    k.origin = Origin { service: origin.to_owned(), instance: 0 };
    Ok(k.into_wire())
}

async fn connect(client: &redis::Client, url: &str) -> Result<MultiplexedConnection, StoreError> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(rerr(url))
}

/// Creates the group unless it exists. `start` is `0` (read what is already there) or `$`.
async fn ensure_group(conn: &mut MultiplexedConnection, key: &str, start: &str) -> redis::RedisResult<()> {
    let r: redis::RedisResult<Value> =
        redis::cmd("XGROUP").arg("CREATE").arg(key).arg(GROUP).arg(start).arg("MKSTREAM").query_async(conn).await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut cursor = "0".to_owned();
    let mut keys = Vec::new();
    loop {
        let v: Value = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query_async(conn)
            .await?;
        let parts = array(&v);
        cursor = parts.first().and_then(string).unwrap_or_else(|| "0".into());
        keys.extend(parts.get(1).map(array).unwrap_or_default().iter().filter_map(string));
        if cursor == "0" {
            keys.sort();
            keys.dedup();
            return Ok(keys);
        }
    }
}

/// The writer's state: the connection and which stream entry holds each pending kanban.
struct Writer {
    client: redis::Client,
    url: String,
    conn: Option<MultiplexedConnection>,
    consumer: String,
    retain: usize,
    /// (service, instance, kanban id) → (stream key, entry id), for XACK.
    pending: HashMap<(String, u32, KanbanId), (String, String)>,
    /// (topic, static id) → entry id, for XDEL.
    statics: HashMap<(String, u64), String>,
    /// Streams whose group is known to exist on the current connection.
    groups: HashSet<String>,
    /// Acks since the last trim, per stream (retention mode).
    acks_since_trim: HashMap<String, usize>,
    stats: Arc<StoreStats>,
    /// Where adopted entries go (queued for delivery by the node).
    adopted: mpsc::UnboundedSender<Recovered>,
}

impl Writer {
    async fn conn(&mut self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let c = connect(&self.client, &self.url).await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Start-up: claims everything earlier runs left pending or unread (counted per stream and paged in later by
    /// [`Writer::page`]: the kanbans are decoded here only to learn their ids), and the static kanbans.
    async fn recover(&mut self) -> Result<(Vec<Backlog>, Vec<RecoveredStatic>), StoreError> {
        let url = self.url.clone();
        let mut conn = self.conn().await?;
        self.warn_if_not_persistent(&mut conn).await;
        let mut recovered = Vec::new();
        let mut dup_cleanup: Vec<(String, String)> = Vec::new();
        for key in scan(&mut conn, "kanban:before:*").await.map_err(rerr(&url))? {
            let Some((service, instance)) = parse_before_key(&key) else {
                tracing::warn!(key, "stream with an unexpected name left alone");
                continue;
            };
            // Entries written before the group existed (by AION itself) are read too: they are queued kanbans.
            ensure_group(&mut conn, &key, "0").await.map_err(rerr(&url))?;
            self.groups.insert(key.clone());
            let mut found: Vec<Entry> = Vec::new();
            let mut cursor = "0-0".to_owned();
            loop {
                let v: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(0)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(rerr(&url))?;
                let parts = array(&v);
                found.extend(parts.get(1).map(entries).unwrap_or_default());
                cursor = parts.first().and_then(string).unwrap_or_else(|| "0-0".into());
                if cursor == "0-0" {
                    break;
                }
            }
            loop {
                let v: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .map_err(rerr(&url))?;
                let got: Vec<Entry> = streams(&v).into_iter().flat_map(|(_, es)| es).collect();
                if got.is_empty() {
                    break;
                }
                found.extend(got);
            }
            found.sort_by_key(|e| stream_id(&e.id));
            let mut count = 0usize;
            let mut last = None;
            for e in found {
                match decode(&key, &e, "aion-import") {
                    Ok(k) => {
                        let slot = (service.clone(), instance, k.id);
                        if self.pending.contains_key(&slot) {
                            // The same kanban twice in one queue (a retried XADD): keep the first.
                            dup_cleanup.push((key.clone(), e.id));
                            continue;
                        }
                        last = Some(e.id.clone());
                        count += 1;
                        self.pending.insert(slot, (key.clone(), e.id));
                    }
                    Err(err) => {
                        // Not ours to drop: it stays pending in the stream, visible with XPENDING.
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(key, entry = e.id, "unreadable queued kanban left pending in Redis: {err}");
                    }
                }
            }
            if let Some(last) = last {
                recovered.push(Backlog {
                    queue: QueueKey::from_row(service.clone(), instance),
                    count,
                    after: Cursor::Entry("0-0".into()),
                    until: Cursor::Entry(last),
                    key: Some(key.clone()),
                });
            }
            self.remove_idle_consumers(&mut conn, &key).await;
        }
        if !dup_cleanup.is_empty() {
            tracing::info!(entries = dup_cleanup.len(), "duplicate queue entries (retried writes) removed");
            let mut p = redis::pipe();
            for (key, id) in &dup_cleanup {
                p.cmd("XACK").arg(key).arg(GROUP).arg(id).ignore();
                p.cmd("XDEL").arg(key).arg(id).ignore();
            }
            p.query_async::<()>(&mut conn).await.map_err(rerr(&url))?;
        }
        let mut statics = Vec::new();
        let mut imported: Vec<(String, String, WireKanban)> = Vec::new();
        for key in scan(&mut conn, "kanban:static:*").await.map_err(rerr(&url))? {
            let topic = key.trim_start_matches("kanban:static:").to_owned();
            let v: Value =
                redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(&mut conn).await.map_err(rerr(&url))?;
            for e in entries(&v) {
                let sid = e.fields.get("sid").and_then(|s| std::str::from_utf8(s).ok()?.parse::<u64>().ok());
                match (decode(&key, &e, "aion-static"), sid) {
                    (Ok(k), Some(sid)) => {
                        self.statics.insert((topic.clone(), sid), e.id);
                        statics.push(RecoveredStatic { topic: topic.clone(), id: sid, kanban: k });
                    }
                    (Ok(k), None) => imported.push((topic.clone(), e.id, k)),
                    (Err(err), _) => {
                        tracing::error!(key, entry = e.id, "unreadable static kanban left in Redis: {err}")
                    }
                }
            }
        }
        // AION's static entries get ids after ours; the id is written back so it stays the same.
        let mut next = statics.iter().map(|s| s.id).max().unwrap_or(0);
        for (topic, entry, k) in imported {
            next += 1;
            let _: redis::RedisResult<Value> =
                redis::cmd("XDEL").arg(static_key(&topic)).arg(&entry).query_async(&mut conn).await;
            let eid = self.static_put(&mut conn, &topic, next, &k).await.map_err(rerr(&url))?;
            self.statics.insert((topic.clone(), next), eid);
            statics.push(RecoveredStatic { topic, id: next, kanban: k });
        }
        statics.sort_by_key(|s| s.id);
        Ok((recovered, statics))
    }

    async fn static_put(
        &self,
        conn: &mut MultiplexedConnection,
        topic: &str,
        sid: u64,
        k: &WireKanban,
    ) -> redis::RedisResult<String> {
        let wire = encode_stored(k);
        xadd(&static_key(topic), "sid", &sid.to_string(), &wire, 0).query_async(conn).await
    }

    async fn warn_if_not_persistent(&self, conn: &mut MultiplexedConnection) {
        let r: redis::RedisResult<Value> = redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(conn).await;
        let on = match &r {
            Ok(v) => field(&pairs(v), "appendonly").map(|s| s == "yes"),
            Err(_) => None,
        };
        match on {
            Some(true) => {}
            Some(false) => tracing::warn!(
                url = %self.url,
                "Redis runs without append-only persistence: kanbans accepted since its last snapshot are lost if \
                 Redis itself crashes (set `appendonly yes`, and `appendfsync always` for per-commit durability)"
            ),
            None => tracing::info!("cannot read Redis' persistence settings (CONFIG GET refused); not checked"),
        }
    }

    /// Removes consumers of earlier runs once nothing is pending for them.
    async fn remove_idle_consumers(&self, conn: &mut MultiplexedConnection, key: &str) {
        let Ok(v) = redis::cmd("XINFO").arg("CONSUMERS").arg(key).arg(GROUP).query_async::<Value>(conn).await else {
            return;
        };
        for c in array(&v) {
            let p = pairs(c);
            let (name, pending) = (field(&p, "name"), field(&p, "pending"));
            if let (Some(name), Some("0")) = (name, pending.as_deref()) {
                if name != self.consumer {
                    let _: redis::RedisResult<Value> =
                        redis::cmd("XGROUP").arg("DELCONSUMER").arg(key).arg(GROUP).arg(&name).query_async(conn).await;
                }
            }
        }
    }

    /// One page of a backlog: the entries of the instance's stream after `req.after` up to `req.until` that are
    /// still pending for this consumer (acknowledged entries kept by retention are skipped).
    async fn page(&mut self, req: &PageRequest) -> Result<Page, StoreError> {
        let url = self.url.clone();
        let (Cursor::Entry(after), Cursor::Entry(until)) = (&req.after, &req.until) else {
            return Ok(Page::default());
        };
        let mut conn = self.conn().await?;
        // The stream as recovery found it (a stream written by another tool may not be zero-padded).
        let key = req.key.clone().unwrap_or_else(|| before_key(&req.service, req.instance));
        let mut after = after.clone();
        let mut page = Page::default();
        let mut bytes = 0usize;
        loop {
            let v: Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("({after}"))
                .arg(until)
                .arg("COUNT")
                .arg(req.max_rows.min(1000))
                .query_async(&mut conn)
                .await
                .map_err(rerr(&url))?;
            let es = entries(&v);
            if es.is_empty() {
                return Ok(page);
            }
            for e in es {
                let size = e.fields.values().map(Vec::len).sum::<usize>();
                if !page.kanbans.is_empty() && (bytes + size > req.max_bytes || page.kanbans.len() >= req.max_rows) {
                    return Ok(page);
                }
                after.clone_from(&e.id);
                page.next = Some(Cursor::Entry(e.id.clone()));
                match decode(&key, &e, "aion-import") {
                    Ok(k) => {
                        let held = self.pending.get(&(req.service.clone(), req.instance, k.id));
                        if held.is_some_and(|(_, eid)| *eid == e.id) {
                            bytes += size;
                            page.kanbans.push(Box::new(k));
                        }
                    }
                    Err(err) => {
                        tracing::error!(key, entry = e.id, "unreadable queued kanban left pending in Redis: {err}")
                    }
                }
            }
        }
    }

    /// Applies one batch. On error the caller reconnects and calls again with `retry = true`.
    async fn apply(&mut self, batch: &[Op], retry: bool) -> Result<(), StoreError> {
        let url = self.url.clone();
        let mut conn = self.conn().await?;
        // Group creation first (a Redis that restarted without its data has lost them).
        let mut new_keys: Vec<String> = Vec::new();
        for op in batch {
            if let Op::Enqueue { service, instance, .. } = op {
                let key = before_key(service, *instance);
                if !self.groups.contains(&key) && !new_keys.contains(&key) {
                    new_keys.push(key);
                }
            }
        }
        for key in new_keys {
            ensure_group(&mut conn, &key, "$").await.map_err(rerr(&url))?;
            self.groups.insert(key);
        }
        // After a failed attempt, find what already reached Redis so nothing is added twice.
        let mut already =
            if retry { self.written(&mut conn, batch).await.map_err(rerr(&url))? } else { HashMap::new() };
        let mut b = Pipeline::default();
        for op in batch {
            match op {
                Op::Enqueue { service, instance, id, hops, bytes } => {
                    let slot = (service.clone(), *instance, *id);
                    if self.pending.contains_key(&slot) || b.in_flight.contains(&slot) {
                        continue; // already queued (a re-sent output)
                    }
                    let key = before_key(service, *instance);
                    if let Some(found) = already.remove(&slot) {
                        // Written by the failed attempt, perhaps not read into our pending list yet: an ack for it
                        // must wait until this batch's XREADGROUP has run.
                        self.pending.insert(slot.clone(), found);
                        b.unread.insert(slot);
                    } else {
                        b.pipe.add_command(xadd(&key, "id", &id.to_string(), bytes, *hops));
                        b.replies.push(Reply::Added(slot.clone(), key.clone()));
                        b.in_flight.insert(slot);
                    }
                    if !b.read_keys.contains(&key) {
                        b.read_keys.push(key);
                    }
                }
                Op::Ack { service, instance, ids } => {
                    for id in ids {
                        let slot = (service.clone(), *instance, *id);
                        if b.in_flight.contains(&slot) || b.unread.contains(&slot) {
                            // Acknowledged in the batch that writes (or reads) it: run what is queued first, to
                            // learn its entry id and to have it in our pending list before the XACK.
                            self.run(&mut conn, &mut b).await?;
                        }
                        // Forgotten only once the XACK succeeded: a failed batch is retried whole.
                        let Some((key, eid)) = self.pending.get(&slot).cloned() else {
                            tracing::warn!(service = %slot.0, instance = slot.1, kanban = %slot.2,
                                "acknowledgement for an entry this store does not hold (already acknowledged?)");
                            self.stats.unknown_acks.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        b.pipe.cmd("XACK").arg(&key).arg(GROUP).arg(&eid);
                        b.replies.push(Reply::Acked(slot));
                        if self.retain == 0 {
                            b.pipe.cmd("XDEL").arg(&key).arg(&eid);
                            b.replies.push(Reply::Ignore);
                        } else {
                            *self.acks_since_trim.entry(key).or_default() += 1;
                        }
                    }
                }
                Op::StaticPut { topic, id, bytes } => {
                    b.pipe.add_command(xadd(&static_key(topic), "sid", &id.to_string(), bytes, 0));
                    b.replies.push(Reply::Static((topic.clone(), *id)));
                    b.statics_in_flight.insert((topic.clone(), *id));
                }
                Op::StaticDelete { topic, id } => {
                    let sk = (topic.clone(), *id);
                    if b.statics_in_flight.contains(&sk) {
                        self.run(&mut conn, &mut b).await?;
                    }
                    if let Some(eid) = self.statics.get(&sk).cloned() {
                        b.pipe.cmd("XDEL").arg(static_key(topic)).arg(eid);
                        b.replies.push(Reply::StaticDeleted(sk));
                    }
                }
                Op::Archive(_) | Op::Exported(_) | Op::Barrier(_) | Op::Page(_) | Op::Close(_) => {}
            }
        }
        self.run(&mut conn, &mut b).await?;
        if self.retain > 0 {
            self.trim(&mut conn).await.map_err(rerr(&url))?;
        }
        Ok(())
    }

    /// Runs the queued commands (plus one `XREADGROUP` moving the new entries into this consumer's pending
    /// list) and records what the replies say.
    async fn run(&mut self, conn: &mut MultiplexedConnection, b: &mut Pipeline) -> Result<(), StoreError> {
        if b.replies.is_empty() && b.read_keys.is_empty() {
            return Ok(());
        }
        if !b.read_keys.is_empty() {
            let c = b.pipe.cmd("XREADGROUP").arg("GROUP").arg(GROUP).arg(&self.consumer).arg("STREAMS");
            for k in &b.read_keys {
                c.arg(k);
            }
            for _ in &b.read_keys {
                c.arg(">");
            }
            b.replies.push(Reply::Read);
        }
        let began = std::time::Instant::now();
        let values: Vec<Value> = b.pipe.query_async(conn).await.map_err(rerr(&self.url))?;
        self.stats.committed(began.elapsed());
        let (mut enq, mut acked) = (0u64, 0u64);
        let mut added: HashSet<String> = HashSet::new();
        let mut strays: Vec<(String, String)> = Vec::new();
        for (reply, v) in b.replies.drain(..).zip(values.iter()) {
            match reply {
                Reply::Added(slot, key) => {
                    if let Some(eid) = string(v) {
                        added.insert(eid.clone());
                        self.pending.insert(slot, (key, eid));
                        enq += 1;
                    }
                }
                Reply::Read => self.read_strays(v, &added, &mut strays),
                Reply::Static(sk) => {
                    if let Some(eid) = string(v) {
                        self.statics.insert(sk, eid);
                    }
                }
                Reply::Acked(slot) => {
                    // Counted by what this store acknowledged, not by XACK's reply: a retried batch repeats an
                    // XACK that Redis executed before the connection broke, and that one answers 0.
                    if self.pending.remove(&slot).is_some() {
                        acked += 1;
                    }
                }
                Reply::StaticDeleted(sk) => {
                    self.statics.remove(&sk);
                }
                Reply::Ignore => {}
            }
        }
        self.stats.enqueued.fetch_add(enq, Ordering::Relaxed);
        self.stats.acked.fetch_add(acked, Ordering::Relaxed);
        *b = Pipeline::default();
        if !strays.is_empty() {
            let mut p = redis::pipe();
            for (key, eid) in &strays {
                p.cmd("XACK").arg(key).arg(GROUP).arg(eid).ignore();
                p.cmd("XDEL").arg(key).arg(eid).ignore();
            }
            let _: () = p.query_async(conn).await.map_err(rerr(&self.url))?;
        }
        Ok(())
    }

    /// Looks at what this batch's `XREADGROUP` moved into our pending list besides the entries it just wrote: an
    /// entry that another writer added meanwhile — in practice the last pipeline of a runtime killed mid-write,
    /// which Redis can still execute after this run's recovery scan. A second entry for a kanban already held is
    /// a duplicate (deleted after the round trip); any other is adopted, so its kanban's acknowledgement deletes
    /// it (and a restart recovers it). Logged and counted either way.
    fn read_strays(&mut self, v: &Value, added: &HashSet<String>, strays: &mut Vec<(String, String)>) {
        for (key, es) in streams(v) {
            let Some((service, instance)) = parse_before_key(&key) else { continue };
            for e in es.into_iter().filter(|e| !added.contains(&e.id)) {
                let k = match decode(&key, &e, "aion-import") {
                    Ok(k) => k,
                    Err(err) => {
                        self.stats.stray_entries.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(key, entry = e.id, "unreadable entry left pending in Redis: {err}");
                        continue;
                    }
                };
                let slot = (service.clone(), instance, k.id);
                let held = self.pending.get(&slot).map(|(_, eid)| eid.as_str());
                if held == Some(e.id.as_str()) {
                    continue; // ours: written by an attempt whose reply was lost, read now
                }
                self.stats.stray_entries.fetch_add(1, Ordering::Relaxed);
                if held.is_some() {
                    tracing::warn!(key, entry = e.id, kanban = %k.id, "duplicate entry written behind this run; deleted");
                    strays.push((key.clone(), e.id));
                } else {
                    tracing::warn!(key, entry = e.id, kanban = %k.id,
                        "entry written behind this run adopted and queued for delivery");
                    self.pending.insert(slot, (key.clone(), e.id));
                    let r = Recovered { queue: QueueKey::from_row(service.clone(), instance), kanban: Box::new(k) };
                    if self.adopted.send(r).is_err() {
                        tracing::error!(key, "the node is gone; the adopted entry stays pending in Redis");
                    }
                }
            }
        }
    }

    /// The entries of `batch`'s enqueues that are already in their streams (after a failure whose outcome is
    /// unknown).
    async fn written(
        &self,
        conn: &mut MultiplexedConnection,
        batch: &[Op],
    ) -> redis::RedisResult<HashMap<(String, u32, KanbanId), (String, String)>> {
        let mut per_key: BTreeMap<(String, u32), usize> = BTreeMap::new();
        for op in batch {
            if let Op::Enqueue { service, instance, .. } = op {
                *per_key.entry((service.clone(), *instance)).or_default() += 1;
            }
        }
        let mut found = HashMap::new();
        for ((service, instance), n) in per_key {
            let key = before_key(&service, instance);
            // The newest entries suffice: the batch's writes are the last ones to this stream.
            let v: Value =
                redis::cmd("XREVRANGE").arg(&key).arg("+").arg("-").arg("COUNT").arg(n + 64).query_async(conn).await?;
            for e in entries(&v) {
                let id = e.fields.get("id").and_then(|b| KanbanId::parse(std::str::from_utf8(b).ok()?));
                if let Some(id) = id {
                    found.insert((service.clone(), instance, id), (key.clone(), e.id));
                }
            }
        }
        Ok(found)
    }

    /// Retention mode: trims each stream with many new acknowledgements to its newest `retain` entries, never
    /// past the oldest pending (or unread) entry.
    async fn trim(&mut self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let every = (self.retain / 4).max(64);
        let due: Vec<String> =
            self.acks_since_trim.iter().filter(|(_, n)| **n >= every).map(|(k, _)| k.clone()).collect();
        for key in due {
            self.acks_since_trim.remove(&key);
            let (pend, info, newest): (Value, Value, Value) = redis::pipe()
                .cmd("XPENDING")
                .arg(&key)
                .arg(GROUP)
                .cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.retain)
                .query_async(conn)
                .await?;
            let mut bound: Option<String> = entries(&newest).last().map(|e| e.id.clone());
            let mut lower = |cand: Option<String>| {
                if let Some(c) = cand {
                    if bound.as_ref().is_none_or(|b| stream_id(&c) < stream_id(b)) {
                        bound = Some(c);
                    }
                }
            };
            // XPENDING summary: [count, smallest id, greatest id, consumers].
            let p = array(&pend);
            if p.first().and_then(string).is_some_and(|n| n != "0") {
                lower(p.get(1).and_then(string));
            }
            // Entries after the group's last-delivered id are unread: keep them too.
            for g in array(&info) {
                let p = pairs(g);
                if field(&p, "name").as_deref() == Some(GROUP) {
                    lower(field(&p, "last-delivered-id"));
                }
            }
            if let Some(b) = bound {
                let _: Value = redis::cmd("XTRIM").arg(&key).arg("MINID").arg(b).query_async(conn).await?;
            }
        }
        Ok(())
    }
}

/// What each reply of a pipeline means.
enum Reply {
    Added((String, u32, KanbanId), String),
    Static((String, u64)),
    Acked((String, u32, KanbanId)),
    StaticDeleted((String, u64)),
    /// The `XREADGROUP` that moves the batch's new entries into our pending list.
    Read,
    Ignore,
}

/// Commands queued for one round trip, with what their replies mean.
#[derive(Default)]
struct Pipeline {
    pipe: redis::Pipeline,
    replies: Vec<Reply>,
    read_keys: Vec<String>,
    in_flight: HashSet<(String, u32, KanbanId)>,
    /// Entries found written after a failed attempt, read into our pending list by this pipeline's XREADGROUP.
    unread: HashSet<(String, u32, KanbanId)>,
    statics_in_flight: HashSet<(String, u64)>,
}

/// Connects, recovers, and starts the writer thread (its own single-threaded Tokio runtime, so Redis I/O never
/// runs on the actors' threads). Returns the queued and static kanbans found in Redis.
///
/// # Errors
/// [`StoreError::Redis`] if Redis cannot be reached within `connect_wait` or the recovery fails.
pub(crate) fn spawn(
    cfg: &RedisConfig,
    rx: mpsc::Receiver<Op>,
    stats: Arc<StoreStats>,
    adopted: mpsc::UnboundedSender<Recovered>,
) -> Result<(Vec<Backlog>, Vec<RecoveredStatic>), StoreError> {
    let url = cfg.display_url();
    let client = redis::Client::open(cfg.url.as_str()).map_err(rerr(&url))?;
    let consumer = format!("aion-{}-{}", std::process::id(), crate::store::now_ms());
    let mut w = Writer {
        adopted,
        client,
        url: url.clone(),
        conn: None,
        consumer,
        retain: cfg.retain,
        pending: HashMap::new(),
        statics: HashMap::new(),
        groups: HashSet::new(),
        acks_since_trim: HashMap::new(),
        stats,
    };
    let wait = cfg.connect_wait;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("aion-store-redis".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = done_tx.send(Err(StoreError::Redis { url: w.url.clone(), message: e.to_string() }));
                    return;
                }
            };
            rt.block_on(async move {
                let deadline = tokio::time::Instant::now() + wait;
                let mut delay = Duration::from_millis(50);
                let recovered = loop {
                    match w.recover().await {
                        Ok(r) => break r,
                        Err(e) if tokio::time::Instant::now() + delay < deadline => {
                            tracing::warn!("waiting for Redis: {e}");
                            w.conn = None;
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(1));
                        }
                        Err(e) => {
                            let _ = done_tx.send(Err(e));
                            return;
                        }
                    }
                };
                let queued: usize = recovered.0.iter().map(|b| b.count).sum();
                tracing::info!(url = %w.url, queued, statics = recovered.1.len(), consumer = %w.consumer, "Redis store ready");
                if done_tx.send(Ok(recovered)).is_err() {
                    return;
                }
                writer(w, rx).await;
            });
        })
        .map_err(|e| StoreError::Redis { url: url.clone(), message: e.to_string() })?;
    done_rx.recv().map_err(|_| StoreError::Closed)?
}

/// Answers (and removes from the batch) every backlog page request; a page that fails is answered with the error
/// (its feeder retries) and the connection is renewed.
async fn serve_pages(w: &mut Writer, batch: &mut Vec<Op>) {
    for req in take_pages(batch) {
        let page = w.page(&req).await.map_err(|e| e.to_string());
        if page.is_err() {
            w.conn = None;
        }
        let _ = req.reply.send(page);
    }
}

async fn writer(mut w: Writer, mut rx: mpsc::Receiver<Op>) {
    let mut batch: Vec<Op> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take_queued(&mut rx, &mut batch, 8192);
        // Reads first (backlog pages): they only concern entries written before this run.
        serve_pages(&mut w, &mut batch).await;
        let mut delay = Duration::from_millis(20);
        let mut retry = false;
        while let Err(e) = w.apply(&batch, retry).await {
            // Keep the batch: nothing is acknowledged to producers until Redis has it.
            tracing::error!(url = %w.url, "Redis write failed, reconnecting in {delay:?}: {e}");
            w.stats.commit_failed(e.to_string());
            w.conn = None;
            w.groups.clear();
            retry = true;
            // Take in what arrived meanwhile (after the batch, so order is kept): acknowledgements free memory
            // on a Redis at its `maxmemory`, where only writes that grow it are refused.
            take_queued(&mut rx, &mut batch, 65_536);
            serve_pages(&mut w, &mut batch).await;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        if retry {
            tracing::info!(url = %w.url, "Redis writes resumed");
        }
        if let Some(done) = crate::store::take_close(&mut batch) {
            complete_barriers(&mut batch);
            let _ = done.send(());
            return;
        }
        complete_barriers(&mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_aion_and_parse_back() {
        assert_eq!(before_key("svc-a", 7), "kanban:before:svc-a:007");
        assert_eq!(parse_before_key("kanban:before:svc:a:012"), Some(("svc:a".into(), 12)));
        assert_eq!(parse_before_key("kanban:after:svc:001"), None);
        assert_eq!(parse_before_key("kanban:before:svc:x"), None);
        assert_eq!(static_key("t"), "kanban:static:t");
    }

    #[test]
    fn passwords_are_not_shown() {
        let c = RedisConfig { url: "redis://u:secret@h:1/0".into(), retain: 0, connect_wait: Duration::ZERO };
        assert_eq!(c.display_url(), "redis://***@h:1/0");
        assert!(stream_id("5-3") > stream_id("4-9") && stream_id("10-0") > stream_id("9-9"));
        assert_eq!(imported_id("k", "1-0"), imported_id("k", "1-0"));
        assert_ne!(imported_id("k", "1-0"), imported_id("k", "1-1"));
    }
}
