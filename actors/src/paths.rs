//! The data directory layout.
//!
//! ```text
//! <data>/aion.db              embedded store: durable queues, static kanbans (SQLite, WAL)
//! <data>/archive.db           the kanban archive written by the replicator (SQLite, WAL)
//! <data>/run/aion.sock        status-kanban endpoint (0600)
//! <data>/run/control.sock     CLI control API (0600)
//! <data>/run/instances.json   process groups started by the runtime (for cleanup after kill -9)
//! <data>/logs/<svc>_<n>.log   per-instance stdout+stderr (rotated to .log.1)
//! <data>/Data/<svc>_<n>/      per-instance data directory (AION's seed kanban dataPath)
//! ```

use std::path::{Path, PathBuf};

/// Resolved paths under one data directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The data directory (`AION_HOME` of the microservices).
    pub root: PathBuf,
}

impl Paths {
    /// Paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Paths {
        Paths { root: root.into() }
    }
    /// `run/`.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// The status-kanban socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("aion.sock")
    }
    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    /// The process registry.
    pub fn registry(&self) -> PathBuf {
        self.run_dir().join("instances.json")
    }
    /// The embedded store (`aion.db`, SQLite WAL).
    pub fn store(&self) -> PathBuf {
        self.root.join("aion.db")
    }
    /// The kanban archive (`archive.db`, SQLite WAL).
    pub fn archive(&self) -> PathBuf {
        self.root.join("archive.db")
    }
    /// `logs/`.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The log file of an instance.
    pub fn log_file(&self, service: &str, instance: u32) -> PathBuf {
        self.log_dir().join(format!("{service}_{instance}.log"))
    }
    /// `$AION_HOME/Data/<svc>_<n>`.
    pub fn data_path(&self, service: &str, instance: u32) -> PathBuf {
        self.root.join("Data").join(format!("{service}_{instance}"))
    }

    /// Creates the directories (run/ with mode 0700).
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.run_dir())?;
        std::fs::set_permissions(self.run_dir(), std::fs::Permissions::from_mode(0o700))?;
        std::fs::create_dir_all(self.log_dir())?;
        std::fs::create_dir_all(self.root.join("Data"))?;
        Ok(())
    }
}

/// The default data directory: `$AION_HOME` if set, else `/var/lib/aion` for root, else
/// `$XDG_STATE_HOME/aion` or `~/.local/state/aion`.
pub fn default_data_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("AION_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/aion");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|h| !h.is_empty()) {
        return Path::new(&x).join("aion");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/state/aion")
}
