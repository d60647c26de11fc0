//! The direct in-process path: a service running inside the runtime process talks to the runtime through a
//! [`Port`] instead of a link. There is no I/O task, no session task and no encoding of messages: an output is
//! routed by the service's own task straight into the next instances' queues, and a delivery is taken straight
//! from this instance's queue. The guarantees are those of a link session (at-least-once, redelivery of what was
//! not acknowledged when the service panics or stops, output deduplication, durable outputs committed before the
//! inputs that produced them are acknowledged).
//!
//! Services never implement [`Port`]; the runtime does (`aion_actors`), and runs the service with [`run_direct`].

use crate::client::{handle_one, start_until, Conn, Ctx};
use crate::Kanban;
use crate::{Error, InstanceInfo, Service};
use aion_model::kanban::WireKanban;
use futures::future::BoxFuture;
use std::future::Future;
use tokio::sync::mpsc;

/// The runtime side of an in-process session. Calls come from one task, in order.
pub trait Port: Send {
    /// Waits until kanbans are available for this instance, appends them to `out` (metadata left encoded), and
    /// returns true; false when the session has ended (replaced by a newer one).
    ///
    /// # Cancel safety
    /// Must be cancel safe: nothing is taken unless the future completes.
    fn take<'a>(&'a mut self, out: &'a mut Vec<Kanban>) -> BoxFuture<'a, bool>;

    /// Routes one output of this instance. `None` when it is done already (the common case: nothing to wait
    /// for); otherwise a future that finishes the routing and resolves once every target has queued it
    /// (back-pressure), with [`Error::Closed`] when the runtime is shutting down.
    fn output(&mut self, kanban: Box<WireKanban>) -> Option<BoxFuture<'_, Result<(), Error>>>;

    /// The oldest `n` kanbans taken were handled: makes the outputs emitted so far durable (when they went to
    /// the store), then acknowledges the `n` inputs.
    ///
    /// # Errors
    /// [`Error::Closed`] when the store is gone (the inputs are then redelivered).
    fn done(&mut self, n: usize) -> BoxFuture<'_, Result<(), Error>>;

    /// Waits until every output emitted so far is durable ([`Ctx::flush`]).
    ///
    /// # Errors
    /// [`Error::Closed`] when the store is gone.
    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>>;

    /// Stores a static kanban; returns its entry id.
    fn static_put(&mut self, topic: String, kanban: Box<WireKanban>) -> BoxFuture<'_, u64>;

    /// Every static kanban of `topic`, oldest first.
    fn static_get(&mut self, topic: &str) -> Vec<(u64, WireKanban)>;

    /// Deletes a static kanban; returns whether it existed.
    fn static_delete(&mut self, topic: String, id: u64) -> BoxFuture<'_, bool>;

    /// Sends every current and future entry of `topic` to `tx`.
    fn static_subscribe(&mut self, topic: String, tx: mpsc::Sender<(u64, Kanban)>);
}

/// Runs `service` on a [`Port`] until the session ends, the service stops ([`Ctx::stop`], terminate), or
/// `shutdown` completes (the kanban being handled is finished first).
///
/// # Errors
/// A panic or a fatal error in the service ([`Error::Service`]), or [`Error::Closed`].
pub async fn run_direct<S: Service>(
    mut service: S,
    info: InstanceInfo,
    port: Box<dyn Port>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let mut ctx = Ctx::new(info, Conn::Direct(port));
    tokio::pin!(shutdown);
    let stopped = start_until(&mut service, &mut ctx, &mut shutdown).await?;
    let mut batch: Vec<Kanban> = Vec::new();
    while !stopped && !ctx.stop_requested() {
        let more = {
            let port = ctx.port().ok_or(Error::Closed)?;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                more = port.take(&mut batch) => more,
            }
        };
        if !more {
            break;
        }
        // Acknowledged once per batch; what was not handled stays with the port and is redelivered.
        let mut handled = 0;
        let mut failed = None;
        for k in batch.drain(..) {
            if let Err(e) = handle_one(&mut service, &mut ctx, k).await {
                failed = Some(e);
                break;
            }
            handled += 1;
            if ctx.stop_requested() {
                break;
            }
        }
        let acked = ctx.port().ok_or(Error::Closed)?.done(handled).await;
        if let Some(e) = failed {
            return Err(e);
        }
        acked?;
    }
    // Outputs of the last kanbans are routed; make them durable before the port closes.
    ctx.port().ok_or(Error::Closed)?.flush().await
}
