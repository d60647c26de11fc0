//! Backends run microservice instances; the service broker decides when (policy), a backend does how.
//!
//! - [`Backend`]: start an instance, watch its exit, stop or kill it ([`Control`]), clean up after it, tell
//!   where its logs are and describe it;
//! - [`process::ProcessBackend`]: local processes (the default), each in its own process group, with log files;
//! - [`inprocess::InProcessBackend`]: services registered with an [`InProcessRegistry`], run as tasks inside the
//!   runtime on direct sessions;
//! - [`Local`]: what a node runs — in-process for registered services, processes for the rest.
//!
//! A Kubernetes backend (pods and jobs) implements the same trait.

pub mod inprocess;
#[cfg(feature = "kube")]
pub mod kube;
pub mod process;

pub use inprocess::{InProcessBackend, InProcessRegistry};
pub use process::{
    become_subreaper, cleanup_orphans, raise_fd_limit, resolve_program, LineSplitter, LogFile, ProcessBackend,
    ProcessEnv, Resolved, MAX_LOG_LINE,
};

use aion_runtime::config::Microservice;
use futures::future::BoxFuture;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if it was killed by one.
    pub signal: Option<i32>,
    /// An error text (spawn failure, in-process error or panic).
    pub error: Option<String>,
}

impl ExitInfo {
    /// True for exit code 0 without error.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.error.is_none()
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.error, self.code, self.signal) {
            (Some(e), _, _) => write!(f, "error: {e}"),
            (None, Some(c), _) => write!(f, "exit code {c}"),
            (None, None, Some(s)) => write!(f, "killed by signal {s}"),
            _ => f.write_str("unknown"),
        }
    }
}

/// Stops a running instance.
pub trait Control: Send + Sync {
    /// Polite stop (SIGTERM to a process group; the shutdown signal of an in-process service): it finishes the
    /// kanban it is handling and exits.
    fn terminate(&self);
    /// Forced stop (SIGKILL; abort).
    fn kill(&self);
}

/// A started instance.
pub struct Running {
    /// Its process id (the process group's), or 0 when it is not a local process.
    pub pid: u32,
    /// How to stop it.
    pub control: Box<dyn Control>,
    /// Completes with its exit.
    pub exit: BoxFuture<'static, ExitInfo>,
}

/// Where an instance's output is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum LogSource {
    /// A file on this device, rotated to `<file>.1` (readable after the runtime stopped, and followable).
    File {
        /// The file.
        path: PathBuf,
    },
    /// A pod's log, read through the Kubernetes API server.
    Pod {
        /// Its namespace.
        namespace: String,
        /// The pod.
        pod: String,
    },
    /// No log of its own here, and why (an in-process service's output is the runtime's log).
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What a backend says about an instance for the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Description {
    /// The backend's name (`process`, `in-process`, …).
    pub backend: String,
    /// What runs (a program path, a registered service, an image).
    pub runs: String,
}

/// What a backend that runs instances elsewhere (Kubernetes) observes of one: its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PodState {
    /// The pod's name.
    pub pod: String,
    /// `pending`, `running`, `ready`, `succeeded`, `failed`, `terminating` or `unknown`.
    pub state: String,
    /// Its Ready condition.
    pub ready: bool,
    /// Container restarts.
    pub restarts: u32,
    /// Why it waits or ended (`ImagePullBackOff`, `CrashLoopBackOff`, `Completed`…), when the kubelet says.
    pub reason: Option<String>,
    /// The node it runs on.
    pub node: Option<String>,
    /// Its IP.
    pub ip: Option<String>,
}

/// Runs instances of microservices (see the module docs). Calls come from the broker's task, one at a time;
/// nothing here may block it for long (slow work goes to a blocking task).
pub trait Backend: Send + Sync + 'static {
    /// Starts incarnation `gen` of instance `instance` of `ms`.
    ///
    /// # Errors
    /// Why it could not be started (the broker retries with backoff).
    fn start<'a>(&'a self, ms: &'a Microservice, instance: u32, gen: u64) -> BoxFuture<'a, Result<Running, String>>;

    /// Incarnation `gen` of the instance ended (its exit future completed): clean up after it (its processes that
    /// left its process group, its entry in the process registry).
    fn exited(&self, service: &str, instance: u32, gen: u64);

    /// A fresh broker knows no instances: cleans up whatever a previous one (or a killed runtime) left running.
    /// Returns how many it stopped.
    fn recover(&self) -> usize;

    /// Every instance has ended at shutdown: a last sweep.
    fn all_stopped(&self);

    /// Where an instance's output is.
    fn logs(&self, service: &str, instance: u32) -> LogSource;

    /// What runs for `ms`.
    fn describe(&self, ms: &Microservice) -> Description;

    /// What is observed of an instance running elsewhere (its pod), when the backend knows.
    fn observe(&self, _service: &str, _instance: u32) -> Option<PodState> {
        None
    }
}

/// A node's backend: in-process services that are registered; then, with a cluster backend (Kubernetes), every
/// service there except those that ask for a local process (`backend: process`); local processes for the rest.
pub struct Local {
    process: Box<dyn Backend>,
    inproc: InProcessBackend,
    cluster: Option<Box<dyn Backend>>,
    /// With a cluster backend: the services that run as local processes (learnt from their definitions, which
    /// the broker describes before it starts any instance).
    local: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl Local {
    /// In-process services and local processes.
    pub fn new(process: impl Backend, inproc: InProcessBackend) -> Local {
        Local { process: Box::new(process), inproc, cluster: None, local: Default::default() }
    }

    /// Also a cluster backend, which runs every service that does not ask for a local process.
    pub fn with_cluster(mut self, cluster: impl Backend) -> Local {
        self.cluster = Some(Box::new(cluster));
        self
    }

    fn pick(&self, service: &str) -> &dyn Backend {
        if self.inproc.runs(service) {
            return &self.inproc;
        }
        match &self.cluster {
            Some(c) if !self.local.read().unwrap_or_else(|p| p.into_inner()).contains(service) => c.as_ref(),
            _ => self.process.as_ref(),
        }
    }

    fn choose(&self, ms: &Microservice) -> &dyn Backend {
        if self.cluster.is_some() {
            let mut local = self.local.write().unwrap_or_else(|p| p.into_inner());
            if ms.backend == aion_runtime::config::BackendChoice::Process {
                local.insert(ms.name.clone());
            } else {
                local.remove(&ms.name);
            }
        }
        self.pick(&ms.name)
    }
}

impl Backend for Local {
    fn start<'a>(&'a self, ms: &'a Microservice, instance: u32, gen: u64) -> BoxFuture<'a, Result<Running, String>> {
        self.choose(ms).start(ms, instance, gen)
    }
    fn exited(&self, service: &str, instance: u32, gen: u64) {
        self.pick(service).exited(service, instance, gen);
    }
    fn recover(&self) -> usize {
        self.process.recover() + self.inproc.recover() + self.cluster.as_ref().map_or(0, |c| c.recover())
    }
    fn all_stopped(&self) {
        self.process.all_stopped();
        self.inproc.all_stopped();
        if let Some(c) = &self.cluster {
            c.all_stopped();
        }
    }
    fn logs(&self, service: &str, instance: u32) -> LogSource {
        self.pick(service).logs(service, instance)
    }
    fn describe(&self, ms: &Microservice) -> Description {
        self.choose(ms).describe(ms)
    }
    fn observe(&self, service: &str, instance: u32) -> Option<PodState> {
        self.pick(service).observe(service, instance)
    }
}

/// A shared backend.
pub type SharedBackend = Arc<dyn Backend>;
