//! Static kanbans (reference §3.8): a per-topic store with ids, get, delete, and subscriptions.

use aion_runtime::WireKanban;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// A new entry on a subscribed topic: what the store tells its subscribers (a session turns it into its own
/// message; a direct session hands it to the service).
#[derive(Debug, Clone, PartialEq)]
pub struct StaticEvent {
    /// Topic.
    pub topic: String,
    /// Entry id.
    pub id: u64,
    /// The kanban.
    pub kanban: WireKanban,
}

/// Where a subscription's events go.
#[derive(Debug, Clone)]
pub enum Subscriber {
    /// A session, which writes them to its client.
    Session(mpsc::Sender<StaticEvent>),
    /// An in-process service's subscription (what `aion_sdk::Ctx::static_subscribe` returns).
    Service(mpsc::Sender<(u64, aion_sdk::Kanban)>),
}

/// Why an event did not reach a subscriber.
enum Missed {
    /// The subscriber is gone.
    Closed,
    /// The subscriber is not keeping up.
    Full,
}

impl Subscriber {
    fn try_send(&self, e: StaticEvent) -> Result<(), Missed> {
        let r = match self {
            Subscriber::Session(tx) => tx.try_send(e).map_err(|e| matches!(e, mpsc::error::TrySendError::Full(_))),
            Subscriber::Service(tx) => {
                tx.try_send((e.id, e.kanban.into_lazy())).map_err(|e| matches!(e, mpsc::error::TrySendError::Full(_)))
            }
        };
        r.map_err(|full| if full { Missed::Full } else { Missed::Closed })
    }
}

#[derive(Default)]
struct Topic {
    entries: BTreeMap<u64, WireKanban>,
    subs: Vec<Subscriber>,
}

/// The static-kanban store. Bounded per topic (oldest entries are evicted past 10 000, with a log line).
/// With a durable [`Store`](crate::store::Store), entries survive restarts.
#[derive(Default)]
pub struct StaticStore {
    inner: Mutex<(u64, HashMap<String, Topic>)>,
    durable: Option<crate::store::Store>,
    truncated: std::sync::atomic::AtomicU64,
}

const MAX_PER_TOPIC: usize = 10_000;

impl StaticStore {
    /// A store persisting to `durable`, starting with the entries recovered from it.
    pub fn durable(store: crate::store::Store, recovered: Vec<crate::store::RecoveredStatic>) -> StaticStore {
        let mut next = 0;
        let mut topics: HashMap<String, Topic> = HashMap::new();
        for r in recovered {
            next = next.max(r.id);
            topics.entry(r.topic).or_default().entries.insert(r.id, r.kanban);
        }
        StaticStore { inner: Mutex::new((next, topics)), durable: Some(store), truncated: Default::default() }
    }

    /// Stores a kanban durably (when the store is durable) and returns its id once committed.
    pub async fn put_durable(&self, topic: &str, k: WireKanban) -> u64 {
        let Some(store) = self.durable.clone() else { return self.put(topic, k) };
        let bytes_k = k.clone();
        let id = self.put(topic, k);
        if let Err(e) = async {
            store.static_put(topic, id, &bytes_k).await?;
            store.barrier().await
        }
        .await
        {
            tracing::error!(topic, id, "static kanban not persisted: {e}");
        }
        id
    }

    /// Deletes durably (when the store is durable); returns whether it existed.
    pub async fn delete_durable(&self, topic: &str, id: u64) -> bool {
        let found = self.delete(topic, id);
        if let (true, Some(store)) = (found, &self.durable) {
            // Committed before the caller is answered, like a put: a crash right after cannot bring it back.
            if let Err(e) = async {
                store.static_delete(topic, id).await?;
                store.barrier().await
            }
            .await
            {
                tracing::error!(topic, id, "static kanban deletion not persisted: {e}");
            }
        }
        found
    }

    /// Stores a kanban in memory; returns its id and notifies subscribers.
    pub fn put(&self, topic: &str, k: WireKanban) -> u64 {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let id = g.0;
        let t = g.1.entry(topic.to_owned()).or_default();
        if t.entries.len() >= MAX_PER_TOPIC {
            if let Some((old, _)) = t.entries.pop_first() {
                tracing::warn!(topic, id = old, "static topic full; oldest entry evicted");
                if let Some(store) = &self.durable {
                    let (store, topic) = (store.clone(), topic.to_owned());
                    tokio::spawn(async move { store.static_delete(&topic, old).await });
                }
            }
        }
        t.entries.insert(id, k.clone());
        t.subs.retain(|s| match s.try_send(StaticEvent { topic: topic.to_owned(), id, kanban: k.clone() }) {
            Ok(()) => true,
            Err(Missed::Closed) => false,
            Err(Missed::Full) => {
                tracing::error!(topic, id, "static subscriber too slow; subscription dropped");
                false
            }
        });
        id
    }

    /// Every entry of a topic, oldest first.
    pub fn get(&self, topic: &str) -> Vec<(u64, WireKanban)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.get(topic).map(|t| t.entries.iter().map(|(i, k)| (*i, k.clone())).collect()).unwrap_or_default()
    }

    /// The oldest entries of a topic whose encodings add up to at most `max_bytes` (what one reply frame can carry);
    /// entries left out are logged and counted ([`StaticStore::truncated_lists`]).
    pub fn get_within(&self, topic: &str, max_bytes: usize) -> Vec<(u64, WireKanban)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = g.1.get(topic) else { return Vec::new() };
        let mut out = Vec::new();
        let mut used = 0usize;
        for (i, k) in &t.entries {
            let size = k.encoded_len() + 10;
            if used + size > max_bytes {
                let left = t.entries.len() - out.len();
                self.truncated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(topic, listed = out.len(), left_out = left, "static list larger than one reply frame; the newest entries are left out (read them with a subscription)");
                break;
            }
            used += size;
            out.push((*i, k.clone()));
        }
        out
    }

    /// How many static lists were cut to fit one reply frame.
    pub fn truncated_lists(&self) -> u64 {
        self.truncated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes an entry; returns whether it existed.
    pub fn delete(&self, topic: &str, id: u64) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.get_mut(topic).is_some_and(|t| t.entries.remove(&id).is_some())
    }

    /// Subscribes; current entries are sent at once.
    pub fn subscribe(&self, topic: &str, tx: Subscriber) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let t = g.1.entry(topic.to_owned()).or_default();
        for (id, k) in &t.entries {
            if tx.try_send(StaticEvent { topic: topic.to_owned(), id: *id, kanban: k.clone() }).is_err() {
                tracing::error!(topic, "static subscriber too slow for the backlog; subscription dropped");
                return;
            }
        }
        t.subs.push(tx);
    }
}
