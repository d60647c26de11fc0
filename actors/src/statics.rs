//! Static kanbans (reference §3.8): a per-topic store with ids, get, delete, and subscriptions.

use crate::endpoint::Outgoing;
use aion_runtime::WireKanban;
use aion_transport::ServerMsg;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Subscribers receive [`ServerMsg::StaticEvent`] through their session's outgoing queue.
type Subscriber = mpsc::Sender<Outgoing>;

#[derive(Default)]
struct Topic {
    entries: BTreeMap<u64, WireKanban>,
    subs: Vec<Subscriber>,
}

/// The static-kanban store. Bounded per topic (oldest entries are evicted past 10 000, with a log line).
#[derive(Default)]
pub struct StaticStore {
    inner: Mutex<(u64, HashMap<String, Topic>)>,
}

const MAX_PER_TOPIC: usize = 10_000;

impl StaticStore {
    /// Stores a kanban; returns its id and notifies subscribers.
    pub fn put(&self, topic: &str, k: WireKanban) -> u64 {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let id = g.0;
        let t = g.1.entry(topic.to_owned()).or_default();
        if t.entries.len() >= MAX_PER_TOPIC {
            if let Some((old, _)) = t.entries.pop_first() {
                tracing::warn!(topic, id = old, "static topic full; oldest entry evicted");
            }
        }
        t.entries.insert(id, k.clone());
        t.subs.retain(|s| {
            match s.try_send(Outgoing::Msg(ServerMsg::StaticEvent {
                topic: topic.to_owned(),
                id,
                kanban: Box::new(k.clone()),
            })) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::error!(topic, id, "static subscriber too slow; subscription dropped");
                    false
                }
            }
        });
        id
    }

    /// Every entry of a topic, oldest first.
    pub fn get(&self, topic: &str) -> Vec<(u64, WireKanban)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.get(topic).map(|t| t.entries.iter().map(|(i, k)| (*i, k.clone())).collect()).unwrap_or_default()
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
            if tx
                .try_send(Outgoing::Msg(ServerMsg::StaticEvent {
                    topic: topic.to_owned(),
                    id: *id,
                    kanban: Box::new(k.clone()),
                }))
                .is_err()
            {
                tracing::error!(topic, "static subscriber too slow for the backlog; subscription dropped");
                return;
            }
        }
        t.subs.push(tx);
    }
}
