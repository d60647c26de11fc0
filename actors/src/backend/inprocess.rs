//! In-process services: registered with an [`InProcessRegistry`], each instance a task inside the runtime on a
//! direct session (no socket, no copy of the kanban), stopped by a shutdown signal or aborted.

use super::{Backend, Control, Description, ExitInfo, LogSource, Running};
use crate::session::{Endpoint, EndpointMsg};
use aion_runtime::actor::Addr;
use aion_runtime::config::Microservice;
use aion_runtime::task::Tasks;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

type Runner = Arc<
    dyn Fn(
            crate::session::direct::DirectSession,
            watch::Receiver<bool>,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Services that run inside the runtime process instead of as processes.
#[derive(Clone, Default)]
pub struct InProcessRegistry {
    runners: HashMap<String, Runner>,
}

impl InProcessRegistry {
    /// Registers `service` to run in-process: `factory` builds a fresh service value per instance start.
    pub fn register<S: aion_sdk::Service, F: Fn() -> S + Send + Sync + 'static>(&mut self, service: &str, factory: F) {
        let factory = Arc::new(factory);
        let runner: Runner = Arc::new(move |port, mut stop: watch::Receiver<bool>| {
            let svc = factory();
            Box::pin(async move {
                let shutdown = async move {
                    while !*stop.borrow_and_update() {
                        if stop.changed().await.is_err() {
                            return;
                        }
                    }
                };
                let info = port.info().clone();
                aion_sdk::run_direct(svc, info, Box::new(port), shutdown).await.map_err(|e| e.to_string())
            })
        });
        self.runners.insert(service.to_owned(), runner);
    }

    /// True if `service` is registered.
    pub fn contains(&self, service: &str) -> bool {
        self.runners.contains_key(service)
    }

    /// The services registered.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.runners.keys().cloned().collect()
    }
}

/// The in-process backend (see the module docs).
pub struct InProcessBackend {
    registry: InProcessRegistry,
    endpoint: Addr<Endpoint>,
    tasks: Tasks,
}

impl InProcessBackend {
    /// Runs the services of `registry` on direct sessions of `endpoint`, as tasks of `tasks`.
    pub fn new(registry: InProcessRegistry, endpoint: Addr<Endpoint>, tasks: Tasks) -> InProcessBackend {
        InProcessBackend { registry, endpoint, tasks }
    }

    /// True if `service` runs in-process.
    pub fn runs(&self, service: &str) -> bool {
        self.registry.contains(service)
    }
}

/// A task with a shutdown signal.
struct TaskControl {
    stop: watch::Sender<bool>,
    abort: tokio::task::AbortHandle,
}

impl Control for TaskControl {
    fn terminate(&self) {
        let _ = self.stop.send(true);
    }
    fn kill(&self) {
        self.abort.abort();
    }
}

/// Reports an in-process instance's exit however its task ends: with its result, as a panic, or as a kill when
/// the task is aborted.
struct Reporter(Option<oneshot::Sender<ExitInfo>>);

impl Reporter {
    fn report(&mut self, info: ExitInfo) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(info);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let info = if std::thread::panicking() {
            ExitInfo { code: None, signal: None, error: Some("panicked".to_owned()) }
        } else {
            ExitInfo { code: None, signal: Some(9), error: None }
        };
        self.report(info);
    }
}

impl Backend for InProcessBackend {
    fn start<'a>(&'a self, ms: &'a Microservice, instance: u32, _gen: u64) -> BoxFuture<'a, Result<Running, String>> {
        Box::pin(async move {
            let runner = self.registry.runners.get(&ms.name).cloned().ok_or("not a registered in-process service")?;
            let (reply, opened) = oneshot::channel();
            let msg = EndpointMsg::AttachDirect { service: ms.name.clone(), instance, reply };
            self.endpoint.send(msg).await.map_err(|_| "the endpoint is not running".to_owned())?;
            let port = match opened.await {
                Ok(Ok(port)) => port,
                // Refused (logged by the endpoint).
                Ok(Err(e)) => return Err(format!("no session: {e}")),
                Err(_) => return Err("the endpoint is not running".to_owned()),
            };
            let (stop, stop_rx) = watch::channel(false);
            let (done, exit) = oneshot::channel::<ExitInfo>();
            let mut reporter = Reporter(Some(done));
            let abort = self.tasks.spawn("in-process service", async move {
                let info = match runner(port, stop_rx).await {
                    Ok(()) => ExitInfo { code: Some(0), signal: None, error: None },
                    Err(e) => ExitInfo { code: Some(1), signal: None, error: Some(e) },
                };
                reporter.report(info);
            });
            let exit =
                Box::pin(async move { exit.await.unwrap_or(ExitInfo { code: None, signal: Some(9), error: None }) });
            Ok(Running { pid: 0, control: Box::new(TaskControl { stop, abort }), exit })
        })
    }

    fn exited(&self, _service: &str, _instance: u32, _gen: u64) {}

    fn recover(&self) -> usize {
        // Instances of a previous broker were killed by it when it stopped; tasks still unwinding go now.
        0
    }

    fn all_stopped(&self) {}

    fn logs(&self, _service: &str, _instance: u32) -> LogSource {
        LogSource::Unavailable { reason: "an in-process service writes to the runtime's own log".to_owned() }
    }

    fn describe(&self, ms: &Microservice) -> Description {
        Description { backend: "in-process".to_owned(), runs: format!("registered service {}", ms.name) }
    }
}
