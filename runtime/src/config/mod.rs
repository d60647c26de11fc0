//! The `services.yml` model (AION's `YamlAionSetting`) and its loader.
//!
//! [`load_file`] / [`load_str`] apply yaml.v2 semantics (YAML 1.1 booleans, raw text for string fields, nulls
//! as empty), AION's defaults, and our validation. Every problem is reported at once as a [`Diagnostic`] with
//! `file:line:column`.

mod load;
pub mod yaml;

pub use load::{load_file, load_str};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file is refused.
    Error,
    /// Accepted (AION accepted it too), but probably a mistake. `--strict` refuses it.
    Warning,
}

/// One problem found in a services.yml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file as given.
    pub file: String,
    /// 1-based line (0 when not tied to a place).
    pub line: usize,
    /// 1-based column (0 when not tied to a place).
    pub column: usize,
    /// What is wrong, naming the path in the document (e.g. `microservices.a.scale`).
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.line > 0 {
            write!(f, "{}:{}:{}: {sev}: {}", self.file, self.line, self.column, self.message)
        } else {
            write!(f, "{}: {sev}: {}", self.file, self.message)
        }
    }
}

/// The result of loading: the config if there were no errors, and every diagnostic.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// `Some` unless an error was found.
    pub config: Option<ServicesFile>,
    /// Errors and warnings, in document order.
    pub diagnostics: Vec<Diagnostic>,
    /// Where some values are in the file (`microservices.<name>.command` → line, column), for diagnostics made
    /// after loading (a command not found).
    pub positions: BTreeMap<String, (usize, usize)>,
    /// The file name used in diagnostics.
    pub file: String,
}

/// The largest services.yml read (bytes). Real files are a few KiB; this bounds what a hostile one costs.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

impl Loaded {
    /// Adds a warning at a recorded position (see [`Loaded::positions`]), keeping document order.
    pub fn warn_at(&mut self, path: &str, message: String) {
        let (line, column) = self.positions.get(path).copied().unwrap_or((0, 0));
        self.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            file: self.file.clone(),
            line,
            column,
            message,
        });
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
    }

    /// True if any diagnostic is an error (or, with `strict`, a warning).
    pub fn failed(&self, strict: bool) -> bool {
        self.diagnostics.iter().any(|d| d.severity == Severity::Error || strict)
    }
}

/// The whole file (AION `AionSetting`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicesFile {
    /// This device's name (`DEVICE_NAME` of every microservice).
    pub device_name: String,
    /// `DEBUG` of every microservice (overrides `env.DEBUG`).
    pub debug: String,
    /// Peer devices by name.
    pub devices: BTreeMap<String, Device>,
    /// Directories (absolute) besides the data directory that files named in `fileList` may be sent from to
    /// other devices (Send Anything).
    #[serde(default)]
    pub file_roots: Vec<String>,
    /// Microservices by name.
    pub microservices: BTreeMap<String, Microservice>,
}

/// A peer device (`devices.<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// IP or host name.
    pub addr: String,
    /// Legacy, default `/var/lib/aion`.
    pub aion_home: String,
    /// Legacy (SFTP), default 22.
    pub ssh_port: i32,
    /// Legacy, default `aion`.
    pub username: String,
    /// Legacy, default `aion`.
    pub password: String,
    /// Bounds of the outboxes to this device (`outboxKanbans`, `outboxBytes`, `outboxMaxAge`); what is unset
    /// is the runtime's (`--outbox-capacity`, `--outbox-bytes`, `--outbox-max-age`).
    #[serde(default)]
    pub outbox: OutboxBounds,
}

/// Per-device outbox bounds (`devices.<name>.outbox…`); `None`: the runtime's option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxBounds {
    /// Kanbans waiting per route to the device (in memory; durable ones are paged).
    pub kanbans: Option<usize>,
    /// Bytes waiting per route to the device.
    pub bytes: Option<usize>,
    /// How long kanbans wait for an unreachable device before they are dead letters (`expired`), in seconds;
    /// `Some(0)`: forever.
    pub max_age_secs: Option<u64>,
}

/// Parses an age: `90s`, `10m`, `2h`, `1d`; `0` or `never` is `None` (no bound).
///
/// # Errors
/// What is wrong with it.
pub fn parse_age(s: &str) -> Result<Option<std::time::Duration>, String> {
    let s = s.trim();
    if s == "0" || s == "never" {
        return Ok(None);
    }
    let bad = || format!("`{s}` is not an age (90s, 10m, 2h, 1d, or never)");
    let (i, unit) = s.char_indices().last().ok_or_else(bad)?;
    let n: u64 = s[..i].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok(Some(std::time::Duration::from_secs(n.saturating_mul(secs))))
}

/// Parses a size in bytes: `1048576`, `512KiB`, `64MiB`, `2GiB` (also `KB`, `MB`, `GB` as powers of 1000).
///
/// # Errors
/// What is wrong with it.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a size (1048576, 512KiB, 64MiB, 2GiB)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let mul: u64 = match s[split..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let v = n.checked_mul(mul).filter(|v| *v > 0).ok_or_else(bad)?;
    usize::try_from(v).map_err(|_| bad())
}

impl Default for Device {
    fn default() -> Self {
        Device {
            addr: String::new(),
            aion_home: "/var/lib/aion".into(),
            ssh_port: 22,
            username: "aion".into(),
            password: "aion".into(),
            outbox: OutboxBounds::default(),
        }
    }
}

/// One `nextService` target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextService {
    /// Target microservice.
    pub name: String,
    /// `n` keeps the source instance number; anything else means instance 1. Default `n`.
    pub pattern: String,
    /// Target device; remote if it names an entry of `devices`.
    pub device: String,
}

impl NextService {
    /// The target instance for a kanban from instance `source`.
    pub fn target_instance(&self, source: u32) -> u32 {
        if self.pattern == "n" {
            source.max(1)
        } else {
            1
        }
    }
}

/// A container/Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// Port name (unique per service).
    pub name: String,
    /// `TCP`, `UDP`, `SCTP`, or empty (TCP).
    pub protocol: String,
    /// Container port.
    pub port: i32,
    /// NodePort (only with `network: NodePort`).
    pub node_port: i32,
}

/// A `volumeMountPathList` entry: `<containerPath>:<hostPath>[:Bidirectional]` (container first, as AION).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// `Bidirectional` mount propagation.
    pub bidirectional: bool,
}

/// `resources.requests` / `resources.limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResourceConfig {
    /// Memory quantity, e.g. `512Mi`.
    pub memory: String,
    /// CPU quantity, e.g. `500m`.
    pub cpu: String,
}

/// `resources`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// Requests.
    pub requests: ResourceConfig,
    /// Limits.
    pub limits: ResourceConfig,
}

/// A microservice (`microservices.<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Microservice {
    /// The map key: process/pod name and image name.
    pub name: String,
    /// argv (no shell). Empty: the image entrypoint (Kubernetes only).
    pub command: Vec<String>,
    /// Image tag, default `latest`.
    pub tag: String,
    /// Independent instances 1..=scale (values < 1 become 1).
    pub scale: u32,
    /// Start every instance with the runtime.
    pub startup: bool,
    /// Keep running (restart on exit); otherwise a run-to-completion job.
    pub always: bool,
    /// AION `multiple` (kept; the local backend never starts an instance twice).
    pub multiple: bool,
    /// Environment of every instance.
    pub env: BTreeMap<String, String>,
    /// Routing table: connection key → targets.
    pub next_service: BTreeMap<String, Vec<NextService>>,
    /// Ports.
    pub ports: Vec<Port>,
    /// `NodePort` or `ClusterIP` (default; any other value means ClusterIP).
    pub network: String,
    /// Kubernetes service account, default `default`.
    pub service_account: String,
    /// Privileged container.
    pub privileged: bool,
    /// Volume mounts.
    pub volume_mount_path_list: Vec<VolumeMount>,
    /// Only the replicator reads it (skip archiving this service).
    pub without_kanban: bool,
    /// Node placement (cluster mode).
    pub target_node: String,
    /// Resource requests and limits.
    pub resources: Resources,
    /// Legacy, default `Runtime`.
    pub position: String,
    /// Legacy.
    pub directory_path: String,
    /// Unused by AION (a TODO there).
    pub interval: i32,
    /// Our extension: the working directory of local processes (relative to the services.yml directory).
    pub working_dir: Option<String>,
    /// Our extension: how kanbans queued for this service are kept (`durable`, the default, or `memory`).
    pub delivery: Delivery,
    /// Our extension: where its instances run when the run's backend is not what this service needs.
    #[serde(default)]
    pub backend: BackendChoice,
}

/// Where a service's instances run (`backend:`, our extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The run's backend (`aion run --backend`).
    #[default]
    Run,
    /// A local process, also when the run's backend is Kubernetes (a service that needs the device's hardware).
    Process,
    /// Kubernetes: the run must use `--backend kubernetes`.
    Kubernetes,
}

/// How kanbans queued for a service are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// In the embedded store until the service acknowledges them: they survive a crash of the runtime.
    #[default]
    Durable,
    /// In memory only: the fastest path; queued kanbans are lost if the runtime crashes.
    Memory,
}

impl Microservice {
    /// A microservice with AION's defaults.
    pub fn with_defaults(name: &str) -> Microservice {
        Microservice {
            name: name.to_owned(),
            command: Vec::new(),
            tag: "latest".into(),
            scale: 1,
            startup: false,
            always: false,
            multiple: false,
            env: BTreeMap::new(),
            next_service: BTreeMap::new(),
            ports: Vec::new(),
            network: "ClusterIP".into(),
            service_account: "default".into(),
            privileged: false,
            volume_mount_path_list: Vec::new(),
            without_kanban: false,
            target_node: String::new(),
            resources: Resources::default(),
            position: "Runtime".into(),
            directory_path: String::new(),
            interval: 0,
            working_dir: None,
            delivery: Delivery::Durable,
            backend: BackendChoice::Run,
        }
    }

    /// Targets for a connection key: an exact match, else `default`.
    pub fn routes(&self, key: &str) -> Option<&[NextService]> {
        self.next_service.get(key).or_else(|| self.next_service.get("default")).map(Vec::as_slice)
    }
}

/// True if `name` is an RFC 1035 label (lower-case alphanumerics and `-`, starting with a letter, ending with an
/// alphanumeric, at most 63 characters).
pub fn is_dns1035_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// True if `q` is a Kubernetes resource quantity (`500m`, `1.5`, `512Mi`, `1e3`, `2G`).
pub fn is_quantity(q: &str) -> bool {
    let s = q.strip_prefix(['+', '-']).unwrap_or(q);
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    let dots = num.matches('.').count();
    if num.is_empty() || num == "." || dots > 1 {
        return false;
    }
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" => true,
        e => {
            let Some(exp) = e.strip_prefix(['e', 'E']) else {
                return false;
            };
            let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            !exp.is_empty() && exp.bytes().all(|c| c.is_ascii_digit())
        }
    }
}
