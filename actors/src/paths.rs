//! The data directory layout.
//!
//! ```text
//! <data>/aion.db              embedded store: durable queues, static kanbans (SQLite, WAL; checkpointed at a
//!                             clean stop, so the file alone holds the queue)
//! <data>/aion.db.state        what the last clean stop left (checked at start: a truncated or replaced store is
//!                             refused)
//! <data>/archive.db           the kanban archive written by the replicator (SQLite, WAL)
//! (the data dir is 0700 when this user owns it; databases and logs are 0600)
//! <data>/run/aion.sock        status-kanban endpoint (0600)
//! <data>/run/control.sock     CLI control API (0600)
//! <data>/run/instances.json   process groups started by the runtime (for cleanup after kill -9)
//! <data>/run/lock             held (flock) by the runtime that owns the data dir; holds its pid
//! <data>/run/dir-id           this data dir's random id (marks the processes started for it)
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
    /// The lock file of the runtime that owns the data dir.
    pub fn lock(&self) -> PathBuf {
        self.run_dir().join("lock")
    }
    /// This data dir's id: random, made on first use and kept in `run/dir-id`. Processes started for the data dir
    /// are marked with it (two data dirs never share one, whatever their paths).
    ///
    /// # Errors
    /// I/O errors.
    pub fn dir_id(&self) -> std::io::Result<String> {
        let path = self.run_dir().join("dir-id");
        if let Ok(id) = std::fs::read_to_string(&path) {
            let id = id.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_owned());
            }
        }
        // 64 random bits (the process-unique prefix of a generated kanban id) and the time.
        let id = format!(
            "{:016x}{:016x}",
            (aion_runtime::KanbanId::generate().0 >> 64) as u64,
            crate::store::now_ms() as u64
        );
        std::fs::write(&path, &id)?;
        Ok(id)
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

    /// Creates the directories. The data dir is made private (0700) when this user owns it — its queues, archive
    /// and logs hold every kanban's payload — and `run/` always is.
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let private = |p: &Path| std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p);
        let existed = self.root.exists();
        private(&self.root)?;
        if !existed {
            // Made by us: private whatever the umask (an existing directory is the operator's; see below).
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        } else if std::fs::metadata(&self.root).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!(
                data_dir = %self.root.display(),
                "the data dir is open to other users; its queues, archive and logs hold every kanban's payload (chmod 700 it)"
            );
        }
        private(&self.run_dir())?;
        std::fs::set_permissions(self.run_dir(), std::fs::Permissions::from_mode(0o700))?;
        private(&self.log_dir())?;
        private(&self.root.join("Data"))?;
        Ok(())
    }
}

/// Writes a file only its owner may read (mode 0600; keys, identities), whole or not at all: written to a
/// temporary name, synced, renamed into place.
///
/// # Errors
/// The file cannot be written.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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

/// Why the data dir could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it (its pid, as written in the lock file).
    Held(Option<u32>),
    /// The lock file cannot be opened or locked.
    Io(String),
}

/// The exclusive lock of a data directory (`run/lock`, `flock`), held for the runtime's lifetime and released
/// by the kernel when the process ends, however it ends. It holds the owner's pid.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock without waiting.
    ///
    /// # Errors
    /// [`LockError::Held`] when another runtime owns the data dir.
    pub fn acquire(paths: &Paths) -> Result<DataDirLock, LockError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = paths.lock();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| LockError::Io(format!("cannot open {}: {e}", path.display())))?;
        let mut file = file;
        // The lock goes with the open file: closing it (drop, or the process ending) releases it.
        #[allow(deprecated)] // `Flock` would do the same, but panics in `drop` if unlocking fails
        match nix::fcntl::flock(std::os::fd::AsRawFd::as_raw_fd(&file), nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(()) => {}
            Err(nix::errno::Errno::EWOULDBLOCK) => {
                // The owner writes its pid right after locking; give it a moment if it has only just started.
                for _ in 0..50 {
                    let mut pid = String::new();
                    let _ = file.rewind().and_then(|_| file.read_to_string(&mut pid));
                    if let Ok(pid) = pid.trim().parse() {
                        return Err(LockError::Held(Some(pid)));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                return Err(LockError::Held(None));
            }
            Err(e) => return Err(LockError::Io(format!("cannot lock {}: {e}", path.display()))),
        }
        let written = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id()));
        if let Err(e) = written {
            return Err(LockError::Io(format!("cannot write {}: {e}", path.display())));
        }
        Ok(DataDirLock { _file: file })
    }
}
