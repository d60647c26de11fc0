//! Direct sessions: the runtime side of [`aion_sdk::Port`] for in-process services.
//!
//! A link session moves every kanban through four tasks (the service's, the SDK's I/O task, the runtime's session
//! reader and writer). A direct session has none: the service's task routes its outputs itself (what a link
//! session's `accept_output` does: origin fix-up, deduplication, routing, back-pressure) and takes its
//! deliveries straight from its [`Slot`]. It keeps what it delivered until the service has handled it, so a
//! panicking or stopped service gets its unhandled kanbans redelivered exactly as a process would.

use crate::routing::slot::Slot;
use crate::session::statics::Subscriber;
use crate::session::{ack_wants_ids, acknowledge, admit_output, refuse_output, requeue_start, Opened, Shared};
use aion_runtime::kanban::{KanbanId, WireKanban};
use aion_sdk::Kanban;
use aion_sdk::{Error, InstanceInfo, Port};
use aion_transport::session::ServerSession;
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Deliveries taken at once (the credit window of a direct session).
const WINDOW: usize = 256;

/// An open direct session of one in-process instance. Dropping it ends the session: what was taken and not
/// handled goes back to the front of the queue.
pub struct DirectSession {
    shared: Shared,
    slot: Arc<Slot>,
    sess: u64,
    info: InstanceInfo,
    /// The protocol's bookkeeping: taken and not yet acknowledged, oldest first.
    sm: ServerSession<Box<WireKanban>>,
    /// Scratch for [`Slot::take`], which hands out the boxes its queue holds (moved on, never copied).
    #[allow(clippy::vec_box)]
    taken: Vec<Box<WireKanban>>,
    /// An output went to the durable store since the last commit barrier.
    unflushed: bool,
    /// Ids of the outputs emitted since the last acknowledgement. Only these can be emitted again (by a
    /// redelivered input), so only these are added to the instance's deduplication window, when the session
    /// ends with unacknowledged inputs — not every output, as link sessions must.
    recent: Vec<KanbanId>,
}

impl DirectSession {
    pub(crate) fn new(shared: Shared, o: Opened) -> DirectSession {
        let info = InstanceInfo {
            service: o.slot.service.clone(),
            instance: o.slot.instance,
            device_name: shared.router.config().device_name.clone(),
            data_path: o.data_path,
        };
        DirectSession {
            shared,
            slot: o.slot,
            sess: o.sess,
            info,
            sm: ServerSession::new(WINDOW),
            taken: Vec::new(),
            unflushed: false,
            recent: Vec::new(),
        }
    }

    /// Who the session is for (what a link session's welcome tells the SDK).
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    fn accepted(&mut self, id: KanbanId) {
        self.recent.push(id);
        self.slot.stats.kanbans_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn barrier(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        let Some(store) = self.shared.router.store() else { return Ok(()) };
        store.barrier().await.map_err(|e| {
            tracing::error!(service = %self.slot.service, instance = self.slot.instance, "store unavailable: {e}");
            Error::Closed
        })
    }
}

impl Port for DirectSession {
    fn take<'a>(&'a mut self, out: &'a mut Vec<Kanban>) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.slot.take(self.sess, self.sm.room().max(1), &mut self.taken).await;
            if self.taken.is_empty() {
                tracing::info!(service = %self.slot.service, instance = self.slot.instance, "session replaced by a newer one");
                return false;
            }
            for k in self.taken.drain(..) {
                out.push(k.to_lazy());
                self.sm.deliver(k);
            }
            true
        })
    }

    fn output(&mut self, mut kanban: Box<WireKanban>) -> Option<BoxFuture<'_, Result<(), Error>>> {
        if let Some(refused) = admit_output(&self.slot, &mut kanban) {
            refuse_output(&self.shared, &self.slot, refused, kanban);
            return None;
        }
        let id = kanban.id;
        match self.shared.router.try_route(&self.slot, kanban) {
            Ok(()) => {
                self.accepted(id);
                None
            }
            Err(kanban) => Some(Box::pin(async move {
                self.unflushed |= self.shared.router.route(&self.slot, kanban).await;
                self.accepted(id);
                Ok(())
            })),
        }
    }

    fn done(&mut self, n: usize) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if n == 0 {
                return Ok(());
            }
            // Durable before acknowledged: the outputs of these inputs are committed first.
            self.barrier().await?;
            let done = self.sm.acknowledge_oldest(n);
            let want_ids = ack_wants_ids(&self.shared, &self.slot);
            let ids = if want_ids { done.iter().map(|k| k.id).collect() } else { Vec::new() };
            let bytes = done.iter().map(|k| k.mem_size()).sum();
            let n = done.len();
            if self.sm.in_flight() == 0 {
                // Every input of the batch is acknowledged: none of these outputs can be emitted again.
                self.recent.clear();
            }
            acknowledge(&self.shared, &self.slot, self.sess, n, bytes, ids).await;
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.barrier())
    }

    fn static_put(&mut self, topic: String, kanban: Box<WireKanban>) -> BoxFuture<'_, u64> {
        Box::pin(async move { self.shared.statics.put_durable(&topic, *kanban).await })
    }

    fn static_get(&mut self, topic: &str) -> Vec<(u64, WireKanban)> {
        self.shared.statics.get(topic)
    }

    fn static_delete(&mut self, topic: String, id: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.shared.statics.delete_durable(&topic, id).await })
    }

    fn static_subscribe(&mut self, topic: String, tx: mpsc::Sender<(u64, Kanban)>) {
        self.shared.statics.subscribe(&topic, Subscriber::Service(tx));
    }
}

impl Drop for DirectSession {
    fn drop(&mut self) {
        let unacked = self.sm.close();
        let n = unacked.len();
        if n > 0 {
            for id in self.recent.drain(..) {
                self.slot.remember_output(id);
            }
        }
        self.slot.close_session(self.sess, unacked);
        tracing::info!(service = %self.slot.service, instance = self.slot.instance, requeued = n, "session closed");
        if self.slot.depth() > 0 {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (router, slot) = (self.shared.router.clone(), self.slot.clone());
                rt.spawn(async move { requeue_start(&router, &slot).await });
            }
        }
    }
}
