//! The AION microservice SDK.
//!
//! A service is an actor: implement [`Service`] (handle one kanban at a time, emit outputs through the
//! [`Ctx`]), then call [`main`] from `fn main`. The runtime starts the process with everything the SDK needs in
//! its environment (`AION_SOCKET`, `SERVICE_NAME`, `MS_NUMBER`, `DEVICE_NAME`, `AION_HOME`).
//!
//! ```no_run
//! use aion_sdk::{Ctx, Kanban, Output, Service};
//!
//! struct Upper;
//! impl Service for Upper {
//!     async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), aion_sdk::Error> {
//!         let text = k.metadata.get("text").and_then(|v| v.as_str()).unwrap_or("").to_uppercase();
//!         ctx.emit(Output::new().meta("text", text)).await
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     aion_sdk::main(Upper)
//! }
//! ```
//!
//! Delivery: a kanban is acknowledged to the runtime only after `handle` returned (and its outputs were sent),
//! so a crash means redelivery (at-least-once). Outputs produced while handling a kanban get ids derived from
//! the input's id, so the runtime drops the duplicates a redelivery would otherwise create.
//!
//! The same service runs in-process: the runtime runs services registered with it through [`run_direct`],
//! which routes outputs from the service's own task straight into the next queues (no sockets, no encoding, no
//! session tasks); [`run_on_link`] runs it on an in-memory link instead.

mod client;
pub mod direct;

pub use aion_model::kanban::{metadata_from_json, metadata_to_json, LazyMetadata, Metadata, Value};
pub use aion_model::KanbanId;

/// A kanban as a service receives it. Its metadata is decoded on first read (`k.metadata.get("x")`,
/// `k.metadata["x"]`), so a service that forwards it untouched ([`Output::with_metadata`]) never decodes or
/// re-encodes it.
pub type Kanban = aion_model::Kanban<LazyMetadata>;
pub use client::{run_on_link, Ctx, InstanceInfo};
pub use direct::{run_direct, Port};

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// SDK errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required environment variable is missing or invalid.
    #[error("environment: {0}")]
    Env(String),
    /// The runtime could not be reached.
    #[error("cannot reach the runtime at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The runtime refused the session (unknown service, bad instance, version mismatch…).
    #[error("the runtime refused the session: {0}")]
    Refused(String),
    /// The connection to the runtime is gone and the service is shutting down.
    #[error("the runtime connection is closed")]
    Closed,
    /// A service-defined failure.
    #[error("{0}")]
    Service(String),
    /// An output (or static kanban) over [`MAX_KANBAN_BYTES`](aion_model::kanban::MAX_KANBAN_BYTES): it was
    /// not sent, and the session goes on.
    #[error("output not sent: {0}")]
    TooLarge(#[from] aion_model::kanban::TooLarge),
}

impl Error {
    /// A service-defined error from any message.
    pub fn msg(m: impl std::fmt::Display) -> Error {
        Error::Service(m.to_string())
    }
}

/// A microservice.
pub trait Service: Send + 'static {
    /// Called once after connecting, before any kanban. A source produces its kanbans here (AION's
    /// START_SERVICE_WITHOUT_KANBAN). Default: nothing.
    fn start(&mut self, _ctx: &mut Ctx) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }

    /// Handles one input kanban. An `Err` is logged and the kanban is acknowledged (it will not be redelivered);
    /// a panic ends the service without acknowledging it, so the runtime redelivers it after a restart.
    fn handle(&mut self, kanban: Kanban, ctx: &mut Ctx) -> impl Future<Output = Result<(), Error>> + Send;
}

/// An output kanban under construction (AION's `NewOutputData` options).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub(crate) key: Option<String>,
    pub(crate) metadata: LazyMetadata,
    pub(crate) file_list: Vec<String>,
    pub(crate) data_path: String,
    pub(crate) process_number: Option<u32>,
    pub(crate) device: String,
    pub(crate) failed: bool,
}

impl Output {
    /// An output on connection key `default`.
    pub fn new() -> Output {
        Output::default()
    }
    /// The connection key that selects the `nextService` branch (`SetConnectionKey`).
    pub fn key(mut self, key: impl Into<String>) -> Output {
        self.key = Some(key.into());
        self
    }
    /// Replaces the metadata with a JSON object (`SetMetadata`).
    pub fn metadata(mut self, json: serde_json::Value) -> Output {
        self.metadata = metadata_from_json(json).into();
        self
    }
    /// Replaces the metadata, e.g. with an input's to forward it: `Output::new().with_metadata(k.metadata)`.
    /// Metadata that was received and not changed is passed on as the bytes that arrived (never decoded).
    pub fn with_metadata(mut self, metadata: impl Into<LazyMetadata>) -> Output {
        self.metadata = metadata.into();
        self
    }
    /// Sets one metadata field.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Output {
        self.metadata.insert(key.into(), value.into());
        self
    }
    /// Adds a file or directory path (`SetFileList`).
    pub fn file(mut self, path: impl Into<String>) -> Output {
        self.file_list.push(path.into());
        self
    }
    /// Sets the data path (`SetDataPath`).
    pub fn data_path(mut self, path: impl Into<String>) -> Output {
        self.data_path = path.into();
        self
    }
    /// Overrides the process number used for `pattern: n` (default: this instance's number).
    pub fn process_number(mut self, n: u32) -> Output {
        self.process_number = Some(n);
        self
    }
    /// Forces the target device (`SetDeviceName`).
    pub fn device(mut self, name: impl Into<String>) -> Output {
        self.device = name.into();
        self
    }
    /// Marks the result as failed (`SetResult(false)`).
    pub fn failed(mut self) -> Output {
        self.failed = true;
        self
    }
}

/// Where the SDK finds the runtime and who it is, read from the environment the runtime sets.
#[derive(Debug, Clone)]
pub struct Env {
    /// `AION_SOCKET`.
    pub socket: PathBuf,
    /// `SERVICE_NAME`.
    pub service: String,
    /// `MS_NUMBER` (also accepts the Go client's `MSNUMBER`), default 1.
    pub instance: u32,
}

impl Env {
    /// Reads the environment.
    ///
    /// # Errors
    /// [`Error::Env`] if `AION_SOCKET` or `SERVICE_NAME` is missing or `MS_NUMBER` is not a number.
    pub fn from_env() -> Result<Env, Error> {
        let socket = std::env::var_os("AION_SOCKET").ok_or_else(|| Error::Env("AION_SOCKET is not set".into()))?;
        let service = std::env::var("SERVICE_NAME").map_err(|_| Error::Env("SERVICE_NAME is not set".into()))?;
        let n = std::env::var("MS_NUMBER").or_else(|_| std::env::var("MSNUMBER")).unwrap_or_else(|_| "1".into());
        let instance: u32 = n.parse().map_err(|_| Error::Env(format!("MS_NUMBER `{n}` is not a number")))?;
        Ok(Env { socket: socket.into(), service, instance: instance.max(1) })
    }
}

/// Options of a process-mode run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deliveries in flight at once (credit window). Default 256.
    pub window: u32,
    /// Outputs awaiting acceptance at once. Default 1024.
    pub output_window: u32,
    /// Ask for the seed kanban AION gave START_SERVICE_WITHOUT_KANBAN services. Default false.
    pub seed: bool,
    /// Give up reconnecting after this long without the runtime. Default 60 s.
    pub reconnect_for: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { window: 256, output_window: 1024, seed: false, reconnect_for: Duration::from_secs(60) }
    }
}

/// Runs a service as a process: reads [`Env`], connects, handles kanbans until the runtime closes the session,
/// the service calls [`Ctx::stop`], or SIGTERM/SIGINT arrives (the kanban being handled is finished first).
///
/// # Errors
/// Environment, connection or refusal errors, and a panic in the service (reported as [`Error::Service`]).
pub async fn run<S: Service>(service: S, opts: Options) -> Result<(), Error> {
    let env = Env::from_env()?;
    client::run_socket(service, env, opts).await
}

/// Stderr that ignores write errors: when the runtime that reads our output dies (kill -9), the pipe breaks,
/// and the service must keep running (and reconnect) instead of panicking in the logger.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `fn main` for a service process: sets up logging (`RUST_LOG`, default info) and a single-threaded tokio
/// runtime, runs the service with default [`Options`], and maps the outcome to an exit code.
pub fn main<S: Service>(service: S) -> std::process::ExitCode {
    main_with(service, Options::default())
}

/// [`main`] with explicit options.
pub fn main_with<S: Service>(service: S, opts: Options) -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| QuietStderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(service, opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("service failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
