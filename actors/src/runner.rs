//! [`Runner`]: a long-lived future (a federation listener, a Kubernetes watcher or reconciler) as a supervised
//! actor.

use aion_runtime::task::Tasks;

/// A supervised actor that runs one long-lived future (a link, the listener) as a task of the node: when the
/// future ends or panics, the actor fails and its supervisor starts it again (after the future's own state —
/// slot sessions, in-flight kanbans — was given back by its drop guards); when the actor stops, the task is
/// aborted.
pub(crate) struct Runner {
    tasks: Tasks,
    fut: Option<futures::future::BoxFuture<'static, String>>,
    task: Option<tokio::task::AbortHandle>,
}

/// Tells a [`Runner`] that its future ended.
pub(crate) struct Ended(String);

impl Runner {
    pub(crate) fn new(tasks: Tasks, fut: impl std::future::Future<Output = String> + Send + 'static) -> Runner {
        Runner { tasks, fut: Some(Box::pin(fut)), task: None }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl aion_runtime::actor::Actor for Runner {
    type Msg = Ended;

    async fn started(&mut self, ctx: &mut aion_runtime::actor::Context<Self>) {
        let Some(fut) = self.fut.take() else { return };
        let addr = ctx.addr();
        let task = self.tasks.spawn("supervised task", async move {
            use futures::FutureExt as _;
            let why = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                Ok(why) => why,
                Err(p) => format!("panicked: {}", aion_runtime::actor::panic_message(&*p)),
            };
            let _ = addr.send(Ended(why)).await;
        });
        self.task = Some(task);
    }

    async fn handle(&mut self, msg: Ended, ctx: &mut aion_runtime::actor::Context<Self>) {
        ctx.fail(msg.0);
    }
}
