//! The MongoDB sink actor (the `mongo` feature).

use super::{MongoConfig, MongoStats};
use crate::store::{pending_exports, PendingExport, Store};
use aion_runtime::actor::{Actor, Context};
use mongodb::bson::{doc, Bson, DateTime, Document};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages of the sink.
pub enum MongoMsg {
    /// New archive rows may be waiting.
    Kick,
    /// A backoff delay elapsed.
    Retry,
}

/// The sink actor.
pub struct MongoSink {
    cfg: MongoConfig,
    store: Store,
    db_path: PathBuf,
    device: String,
    coll: Option<mongodb::Collection<Document>>,
    stats: Arc<MongoStats>,
    backoff: Duration,
    blocked_until: Option<Instant>,
}

impl MongoSink {
    /// A sink exporting `store`'s archive (at `db_path`) to `cfg`.
    pub fn new(cfg: MongoConfig, store: Store, db_path: PathBuf, device: String, stats: Arc<MongoStats>) -> MongoSink {
        MongoSink {
            cfg,
            store,
            db_path,
            device,
            coll: None,
            stats,
            backoff: Duration::from_millis(200),
            blocked_until: None,
        }
    }

    async fn collection(&mut self) -> Result<mongodb::Collection<Document>, mongodb::error::Error> {
        if let Some(c) = &self.coll {
            return Ok(c.clone());
        }
        let mut opts = mongodb::options::ClientOptions::parse(&self.cfg.uri).await?;
        opts.server_selection_timeout = Some(Duration::from_secs(2));
        opts.connect_timeout = Some(Duration::from_secs(2));
        opts.app_name = Some("aion-kanban-replicator".into());
        let client = mongodb::Client::with_options(opts)?;
        let c = client.database(&self.cfg.database).collection::<Document>(&self.cfg.collection);
        self.coll = Some(c.clone());
        Ok(c)
    }

    /// Exports batches until nothing is pending. Returns an error to retry later.
    async fn export(&mut self) -> Result<(), String> {
        loop {
            let path = self.db_path.clone();
            let pending = tokio::task::spawn_blocking(move || pending_exports(&path, 500))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if pending.is_empty() {
                return Ok(());
            }
            let rows: Vec<i64> = pending.iter().map(|p| p.row).collect();
            let docs: Vec<Document> = pending.iter().map(|p| to_document(p, &self.device)).collect();
            let coll = self.collection().await.map_err(|e| e.to_string())?;
            match coll.insert_many(docs).ordered(false).await {
                Ok(_) => {}
                // Duplicate `_id`s: already exported by an earlier attempt whose acknowledgement was lost.
                Err(e) if only_duplicates(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
            self.store.mark_exported(rows.clone()).await.map_err(|e| e.to_string())?;
            self.stats.exported.fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
    }
}

fn only_duplicates(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        mongodb::error::ErrorKind::InsertMany(ime) => {
            ime.write_concern_error.is_none()
                && ime.write_errors.as_ref().is_some_and(|w| !w.is_empty() && w.iter().all(|x| x.code == 11000))
        }
        _ => false,
    }
}

fn to_document(p: &PendingExport, device: &str) -> Document {
    let k = &p.kanban;
    let metadata = k
        .metadata
        .decode()
        .ok()
        .and_then(|m| mongodb::bson::to_bson(&aion_runtime::kanban::metadata_to_json(&m)).ok())
        .unwrap_or(Bson::Null);
    let stream_key = match &p.to {
        Some((s, i)) => format!("kanban:before:{s}:{i:03}"),
        None => format!("kanban:after:{}:{:03}", k.origin.service, k.origin.instance),
    };
    let to = match &p.to {
        Some((s, i)) => Bson::Document(doc! { "service": s, "instance": i64::from(*i) }),
        None => Bson::Null,
    };
    doc! {
        "_id": format!("{}-{}", k.id, p.row),
        "streamKey": stream_key,
        "startAt": &k.start_at,
        "finishAt": &k.finish_at,
        "nextDeviceName": &k.next_device_name,
        "connectionKey": &k.connection_key,
        "processNumber": k.process_number.min(i32::MAX as u32) as i32,
        "priorSuccess": k.prior_success,
        "dataPath": &k.data_path,
        "fileList": k.file_list.clone(),
        "metadata": metadata,
        "kanbanId": k.id.to_string(),
        "traceId": k.trace_id.to_string(),
        "from": { "service": &k.origin.service, "instance": i64::from(k.origin.instance) },
        "to": to,
        "outcome": &p.outcome,
        "acceptedAt": DateTime::from_millis(p.accepted_at),
        "ackedAt": p.acked_at.map_or(Bson::Null, |a| Bson::DateTime(DateTime::from_millis(a))),
        "deviceName": device,
    }
}

impl Actor for MongoSink {
    type Msg = MongoMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) {
        let _ = ctx.addr().try_send(MongoMsg::Retry);
    }

    async fn handle(&mut self, msg: MongoMsg, ctx: &mut Context<Self>) {
        if matches!(msg, MongoMsg::Kick) && self.blocked_until.is_some_and(|t| Instant::now() < t) {
            return; // backing off; the scheduled retry will run
        }
        match self.export().await {
            Ok(()) => {
                self.backoff = Duration::from_millis(200);
                self.blocked_until = None;
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut l) = self.stats.last_error.lock() {
                    *l = Some(e.clone());
                }
                tracing::warn!(uri = %self.cfg.uri, retry_in = ?self.backoff, "MongoDB export failed; rows wait in the archive: {e}");
                self.coll = None;
                self.blocked_until = Some(Instant::now() + self.backoff);
                let (addr, delay) = (ctx.addr(), self.backoff);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = addr.send(MongoMsg::Retry).await;
                });
                self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
