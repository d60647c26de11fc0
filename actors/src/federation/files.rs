//! Send Anything: the files a kanban names (`fileList`) travel with it to another device.
//!
//! A kanban with files taken from an outbox does not go on the kanban stream at once: the link's transfer loop
//! (`transfer_loop`, outbound side) sends its files first, one QUIC stream per file at a lower priority than the
//! kanban stream (so a large file never delays small kanbans), from where the receiver's verified prefix ends; then the
//! kanban, its `fileList` and `dataPath` rewritten to the receiver's paths, is sent like any other. So the next
//! service never sees a kanban whose files are not verified in place. The protocol and its checks are sans-IO
//! (`aion_transport::files`); this module reads and writes.
//!
//! On the receiver (`receive`) each file is written to `Data/.transfers/<transfer>/<n>.part`, verified chunk
//! by chunk (BLAKE3), the hashes of its verified prefix recorded every 16 chunks (a resume checks the
//! `.part` against them, so what a crash lost before it reached the disk is sent again, never trusted),
//! and renamed to `Data/<service>_<instance>/<kanban id>/<name>` only when the root hash of the whole file
//! matches. A transfer done is remembered (`<n>.done`) so that the same kanban sent again (its acknowledgement
//! lost) is recognised and its files not written twice.

use super::{read_frame, write_frame, Federation, Peer};
use crate::control::{FilesReport, TransferReport};
use aion_runtime::{KanbanId, WireKanban};
use aion_transport::codec::FrameDecoder;
use aion_transport::files::{self as proto, FileMsg, Hash, Header, Receiving, CHUNK, HEADER};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncSeekExt;

/// The hashes of a partial file's verified prefix are recorded every this many chunks.
const RECORD_EVERY: u64 = 16;
/// Files received at once from one device (more wait: the sender is told to try again).
pub const STREAMS_PER_DEVICE: usize = 4;
/// Most files in one kanban's `fileList` (directories walked).
pub const MAX_FILES: usize = 100_000;
/// Chunks queued between a stream and its disk thread (at each end): the memory of a transfer is about this many
/// chunks.
const PIPELINE: usize = 4;
/// How long a stream may stay silent before it is given up.
const IDLE: Duration = Duration::from_secs(60);
/// Partial transfers nobody resumed are removed after this long; records of transfers done after [`DONE_KEEP`].
const PARTIAL_KEEP: Duration = Duration::from_secs(7 * 86_400);
const DONE_KEEP: Duration = Duration::from_secs(86_400);

/// Counters and transfers in progress, per device and direction.
#[derive(Debug, Default)]
pub struct Files {
    devices: Mutex<BTreeMap<String, Arc<DeviceFiles>>>,
    next: AtomicU64,
    active: Mutex<BTreeMap<u64, Active>>,
    /// Bytes of partial files each device may have here at once (disk used by transfers in progress).
    pub partial_quota: AtomicU64,
}

/// One device's counters.
#[derive(Debug, Default)]
pub struct DeviceFiles {
    /// Files sent to it (verified and placed there).
    pub sent_files: AtomicU64,
    /// Their bytes put on the wire.
    pub sent_bytes: AtomicU64,
    /// Bytes not sent again because the receiver had them (a resumed transfer, or one it had done).
    pub resumed_bytes: AtomicU64,
    /// Files received from it, verified and placed here.
    pub received_files: AtomicU64,
    /// Their bytes received.
    pub received_bytes: AtomicU64,
    /// Files refused here (names, quota, disk full, broken streams), and by it.
    pub refused: AtomicU64,
    /// Kanbans dead-lettered because a file could not be sent or was refused for good.
    pub failed: AtomicU64,
    /// Bytes of partial files from it being received now (against the quota).
    partial: AtomicU64,
}

#[derive(Debug, Clone)]
struct Active {
    device: String,
    outbound: bool,
    kanban: String,
    file: String,
    size: u64,
    done: Arc<AtomicU64>,
    /// What was done before this stream (a resumed prefix): not counted in the rate.
    from: u64,
    started: Instant,
}

/// Marks a transfer in progress for as long as it lives.
struct Tracked<'a> {
    files: &'a Files,
    id: u64,
    done: Arc<AtomicU64>,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.files.active.lock() {
            a.remove(&self.id);
        }
    }
}

impl Files {
    /// A device's counters.
    pub fn device(&self, name: &str) -> Arc<DeviceFiles> {
        let Ok(mut d) = self.devices.lock() else { return Arc::default() };
        d.entry(name.to_owned()).or_default().clone()
    }

    fn track(
        &self,
        device: &str,
        outbound: bool,
        kanban: &str,
        file: &str,
        size: u64,
        done_before: u64,
    ) -> Tracked<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(AtomicU64::new(done_before));
        let a = Active {
            device: device.to_owned(),
            outbound,
            kanban: kanban.to_owned(),
            file: file.to_owned(),
            size,
            done: done.clone(),
            from: done_before,
            started: Instant::now(),
        };
        if let Ok(mut m) = self.active.lock() {
            m.insert(id, a);
        }
        Tracked { files: self, id, done }
    }

    /// `device`'s report.
    pub fn report(&self, device: &str) -> FilesReport {
        let d = self.device(device);
        let active = self
            .active
            .lock()
            .map(|m| {
                m.values()
                    .filter(|a| a.device == device)
                    .map(|a| {
                        let done = a.done.load(Ordering::Relaxed);
                        let secs = a.started.elapsed().as_secs_f64().max(0.001);
                        TransferReport {
                            direction: if a.outbound { "out" } else { "in" }.to_owned(),
                            kanban: a.kanban.clone(),
                            file: a.file.clone(),
                            size: a.size,
                            done,
                            rate: (done.saturating_sub(a.from) as f64 / secs) as u64,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FilesReport {
            sent_files: l(&d.sent_files),
            sent_bytes: l(&d.sent_bytes),
            resumed_bytes: l(&d.resumed_bytes),
            received_files: l(&d.received_files),
            received_bytes: l(&d.received_bytes),
            refused: l(&d.refused),
            failed: l(&d.failed),
            active,
        }
    }
}

// ------------------------------------------------------------------------------------------------ messages

/// The next message on a file stream, within [`IDLE`].
async fn read_msg(recv: &mut quinn::RecvStream, dec: &mut FrameDecoder) -> Result<FileMsg, String> {
    match tokio::time::timeout(IDLE, read_frame::<FileMsg>(recv, dec)).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err("the stream ended".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("nothing for {}s", IDLE.as_secs())),
    }
}

// ------------------------------------------------------------------------------------------------ sending

/// A kanban whose files are to be sent before it.
#[derive(Clone)]
pub(super) struct Pending {
    /// Its route (outbox) in the link.
    pub route: usize,
    /// The kanban as it left the outbox.
    pub kanban: Box<WireKanban>,
    /// The target service there.
    pub service: String,
    /// What it counts in its outbox's byte bound.
    pub mem: usize,
}

/// Why a transfer did not complete.
pub(super) enum Failure {
    /// The kanban cannot go: a dead letter with this reason and detail.
    Dead(crate::routing::dead::Reason, String),
    /// Not now (the receiver is full, busy, or the file changed while it was read): try again later.
    Later(String),
    /// The connection is gone.
    Connection(String),
}

/// One file to send: where it is here, its name under the target directory there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub path: PathBuf,
    pub name: String,
}

/// The files of a `fileList` (directories walked, in name order), each confined to the roots files may be
/// sent from, and the top-level names (what `fileList` becomes there, under the target directory).
///
/// # Errors
/// A path that is not there, not readable, not a regular file or directory, outside the roots, or not UTF-8.
pub(crate) fn manifest(
    file_list: &[String],
    root: &Path,
    roots: &[PathBuf],
) -> Result<(Vec<Source>, Vec<String>), String> {
    let canon_roots: Vec<PathBuf> = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).collect();
    let inside = |p: &Path| canon_roots.iter().any(|r| p.starts_with(r));
    let mut out = Vec::new();
    let mut tops = Vec::new();
    for entry in file_list {
        let given = Path::new(entry);
        let abs = if given.is_absolute() { given.to_owned() } else { root.join(given) };
        let canon = std::fs::canonicalize(&abs).map_err(|e| format!("`{entry}`: {e}"))?;
        if !inside(&canon) {
            return Err(format!(
                "`{entry}` is outside the roots files may be sent from ({}; more with `fileRoots:`)",
                canon_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        let top = canon
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("`{entry}`: no UTF-8 file name"))?
            .to_owned();
        if tops.contains(&top) {
            return Err(format!("`{entry}`: two entries named `{top}` would land on the same path"));
        }
        walk(&canon, &top, &inside, &mut out)?;
        tops.push(top);
    }
    Ok((out, tops))
}

fn walk(p: &Path, name: &str, inside: &dyn Fn(&Path) -> bool, out: &mut Vec<Source>) -> Result<(), String> {
    let md = std::fs::metadata(p).map_err(|e| format!("`{}`: {e}", p.display()))?;
    if md.is_file() {
        if out.len() >= MAX_FILES {
            return Err(format!("more than {MAX_FILES} files"));
        }
        out.push(Source { path: p.to_owned(), name: name.to_owned() });
        return Ok(());
    }
    if !md.is_dir() {
        return Err(format!("`{}` is not a regular file or a directory", p.display()));
    }
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(p)
        .map_err(|e| format!("`{}`: {e}", p.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}`: {e}", p.display()))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let child = e.path();
        let leaf = e.file_name().into_string().map_err(|_| format!("`{}`: not a UTF-8 name", child.display()))?;
        // A symbolic link inside a tree is followed only to what lies inside the roots.
        let canon = std::fs::canonicalize(&child).map_err(|e| format!("`{}`: {e}", child.display()))?;
        if !inside(&canon) {
            return Err(format!("`{}` leads outside the roots files may be sent from", child.display()));
        }
        walk(&canon, &format!("{name}/{leaf}"), inside, out)?;
    }
    Ok(())
}

fn mtime_ns(md: &std::fs::Metadata) -> u64 {
    md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
}

/// Sends the files of `p` on `conn` to `peer`; returns the kanban rewritten to the receiver's paths.
pub(super) async fn transfer(
    f: &Federation,
    peer: &Peer,
    conn: &quinn::Connection,
    p: &Pending,
) -> Result<Box<WireKanban>, Failure> {
    use crate::routing::dead::Reason;
    let cfg = f.router.config();
    let mut roots = vec![f.data_dir.clone()];
    roots.extend(cfg.file_roots.iter().map(PathBuf::from));
    let k = &p.kanban;
    let (sources, tops) = {
        let (list, root) = (k.file_list.clone(), f.data_dir.clone());
        match tokio::task::spawn_blocking(move || manifest(&list, &root, &roots)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(Failure::Dead(Reason::FileUnreadable, e)),
            Err(e) => return Err(Failure::Later(format!("listing the files: {e}"))),
        }
    };
    let kanban = k.id.to_string();
    let transfer = proto::transfer_id(&f.me, &p.service, &kanban);
    let counters = f.files.device(&peer.name);
    let mut dir = None;
    let started = Instant::now();
    let mut bytes = 0u64;
    for (i, s) in sources.iter().enumerate() {
        let (d, sent) = send_file(f, peer, conn, p, &transfer, &kanban, i as u32, s, &counters).await?;
        dir.get_or_insert(d);
        bytes += sent;
    }
    // No files (empty directories only): the kanban goes as it is.
    let dir: String = dir.unwrap_or_default();
    let mut out = k.clone();
    if !dir.is_empty() {
        out.file_list = tops.iter().map(|t| format!("{dir}/{t}")).collect();
        out.data_path = dir;
    }
    f.router.archive_remote_hop(&out, &p.service, &peer.name, "files-sent");
    tracing::info!(
        device = %peer.name,
        kanban = %kanban,
        files = sources.len(),
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "files sent and verified in place"
    );
    Ok(out)
}

/// The receiver refused a file: later (`retry`), or for good (the kanban is a dead letter `file-refused`).
fn refused_by(peer: &Peer, s: &Source, counters: &DeviceFiles, reason: String, retry: bool) -> Failure {
    counters.refused.fetch_add(1, Ordering::Relaxed);
    let why = format!("{} refuses `{}`: {reason}", peer.name, s.name);
    if retry {
        Failure::Later(why)
    } else {
        Failure::Dead(crate::routing::dead::Reason::FileRefused, why)
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_file(
    f: &Federation,
    peer: &Peer,
    conn: &quinn::Connection,
    p: &Pending,
    transfer: &str,
    kanban: &str,
    index: u32,
    s: &Source,
    counters: &DeviceFiles,
) -> Result<(String, u64), Failure> {
    use crate::routing::dead::Reason;
    let gone = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            Failure::Dead(Reason::FileUnreadable, format!("`{}`: {e}", s.path.display()))
        }
        _ => Failure::Later(format!("`{}`: {e}", s.path.display())),
    };
    let file = tokio::fs::File::open(&s.path).await.map_err(gone)?;
    let md = file.metadata().await.map_err(gone)?;
    let size = md.len();
    let conn_err = |e: String| Failure::Connection(e);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Failure::Connection(e.to_string()))?;
    // Below the kanban stream: a large file never holds small kanbans back.
    let _ = send.set_priority(-1);
    let open = FileMsg::Open {
        transfer: transfer.to_owned(),
        kanban: kanban.to_owned(),
        service: p.service.clone(),
        instance: p.kanban.process_number,
        index,
        path: s.name.clone(),
        size,
        mtime_ns: mtime_ns(&md),
    };
    write_frame(&mut send, &open).await.map_err(conn_err)?;
    let mut dec = FrameDecoder::default();
    let (offset, dir) = match read_msg(&mut recv, &mut dec).await.map_err(conn_err)? {
        FileMsg::At { offset, dir, path: Some(_) } if offset == size => {
            counters.resumed_bytes.fetch_add(size, Ordering::Relaxed);
            let _ = send.finish();
            return Ok((dir, 0));
        }
        FileMsg::At { offset, dir, .. } if offset <= size && offset % CHUNK as u64 == 0 => (offset, dir),
        FileMsg::Refused { reason, retry } => return Err(refused_by(peer, s, counters, reason, retry)),
        other => return Err(Failure::Connection(format!("unexpected answer to a file: {other:?}"))),
    };
    counters.resumed_bytes.fetch_add(offset, Ordering::Relaxed);
    let tracked = f.files.track(&peer.name, true, kanban, &s.name, size, offset);
    // The disk side on its own thread: it hashes the prefix the receiver has (for the root), then reads and hashes
    // the rest chunk by chunk, a few ahead of the stream.
    enum Read {
        Prefix(Vec<Hash>),
        Chunk(Hash, Vec<u8>),
    }
    let (tx, mut chunks) = tokio::sync::mpsc::channel::<std::io::Result<Read>>(PIPELINE);
    let reader = {
        let std_file = file.into_std().await;
        tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Seek};
            let mut file = std_file;
            let mut go = || -> std::io::Result<()> {
                file.seek(std::io::SeekFrom::Start(0))?;
                let mut prefix = Vec::new();
                let mut pos = 0u64;
                let mut buf = vec![0u8; CHUNK];
                while pos < offset {
                    let n = (size - pos).min(CHUNK as u64) as usize;
                    file.read_exact(&mut buf[..n])?;
                    prefix.push(proto::chunk_hash(&buf[..n]));
                    pos += n as u64;
                }
                if tx.blocking_send(Ok(Read::Prefix(prefix))).is_err() {
                    return Ok(());
                }
                while pos < size {
                    let n = (size - pos).min(CHUNK as u64) as usize;
                    let mut data = vec![0u8; n];
                    file.read_exact(&mut data)?;
                    let hash = proto::chunk_hash(&data);
                    pos += n as u64;
                    if tx.blocking_send(Ok(Read::Chunk(hash, data))).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(e) = go() {
                let _ = tx.blocking_send(Err(e));
            }
        })
    };
    let read_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Failure::Later(format!("`{}` shrank while it was sent", s.path.display())),
        _ => gone(e),
    };
    let mut hashes: Vec<Hash> = match chunks.recv().await {
        Some(Ok(Read::Prefix(p))) => p,
        Some(Err(e)) => return Err(read_err(e)),
        _ => return Err(Failure::Later("the file reader stopped".into())),
    };
    let mut pos = offset;
    let mut sent = 0u64;
    while pos < size {
        let (hash, data) = match chunks.recv().await {
            Some(Ok(Read::Chunk(h, d))) => (h, d),
            Some(Err(e)) => return Err(read_err(e)),
            _ => return Err(Failure::Later("the file reader stopped".into())),
        };
        let n = data.len();
        hashes.push(hash);
        let h = proto::header(n, &hash);
        let wrote = async {
            send.write_all(&h).await?;
            send.write_all(&data).await
        };
        if let Err(e) = wrote.await {
            drop(chunks);
            let _ = reader.await;
            // The receiver stopped reading: it says why (a full disk, a broken chunk) before it lets go.
            return Err(match tokio::time::timeout(Duration::from_secs(5), read_msg(&mut recv, &mut dec)).await {
                Ok(Ok(FileMsg::Refused { reason, retry })) => refused_by(peer, s, counters, reason, retry),
                _ => Failure::Connection(e.to_string()),
            });
        }
        pos += n as u64;
        sent += n as u64;
        tracked.done.store(pos, Ordering::Relaxed);
        counters.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    drop(chunks);
    let _ = reader.await;
    send.write_all(&proto::end_marker(&proto::root(&hashes))).await.map_err(|e| Failure::Connection(e.to_string()))?;
    let _ = send.finish();
    match read_msg(&mut recv, &mut dec).await.map_err(conn_err)? {
        FileMsg::Placed { .. } => {
            counters.sent_files.fetch_add(1, Ordering::Relaxed);
            Ok((dir, sent))
        }
        FileMsg::Refused { reason, retry } => Err(refused_by(peer, s, counters, reason, retry)),
        other => Err(Failure::Connection(format!("unexpected answer to a file: {other:?}"))),
    }
}

// ------------------------------------------------------------------------------------------------ receiving

/// What a partial file's state records (beside the `.part`).
#[derive(Debug, Serialize, Deserialize)]
struct PartState {
    size: u64,
    mtime_ns: u64,
    name: String,
    hashes: Vec<String>,
}

/// Turns a file stream away for now (busy, or a relayed link): the sender tries again later.
pub(super) async fn turn_away(mut send: quinn::SendStream, reason: &str) {
    let _ = write_frame(&mut send, &FileMsg::Refused { reason: reason.to_owned(), retry: true }).await;
    let _ = send.finish();
}

/// Refuses a file on its stream: counted, logged, told.
async fn refuse(
    f: &Federation,
    peer: &Peer,
    send: &mut quinn::SendStream,
    reason: String,
    retry: bool,
    hostile: Option<&'static str>,
) {
    f.files.device(&peer.name).refused.fetch_add(1, Ordering::Relaxed);
    if let Some(counter) = hostile {
        f.refused.count(counter);
        tracing::warn!(device = %peer.name, "file refused: {reason}");
    } else if retry {
        tracing::warn!(device = %peer.name, "file not taken now: {reason}");
    } else {
        tracing::warn!(device = %peer.name, "file refused: {reason}");
    }
    let _ = write_frame(send, &FileMsg::Refused { reason, retry }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Is `base/rel` a place to create a regular file (`file`) or a directory: no symbolic link on the way from
/// `base` down, nothing but a regular file (or nothing) there for a file. Creates the directories.
fn prepare(base: &Path, rel: &Path, file: bool) -> Result<PathBuf, String> {
    let mut at = base.to_owned();
    let parts: Vec<_> = rel.components().collect();
    for (i, c) in parts.iter().enumerate() {
        at.push(c);
        let last = file && i + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(md) if md.file_type().is_symlink() => return Err(format!("`{}` is a symbolic link", at.display())),
            Ok(md) if last && !md.is_file() => {
                return Err(format!("`{}` exists and is not a regular file", at.display()))
            }
            Ok(md) if !last && !md.is_dir() => return Err(format!("`{}` exists and is not a directory", at.display())),
            Ok(_) => {}
            Err(_) if last => {}
            Err(_) => std::fs::create_dir(&at).map_err(|e| format!("`{}`: {e}", at.display()))?,
        }
    }
    Ok(at)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Receives one file from `peer` on a stream it opened: checks what it names, resumes a partial, verifies each
/// chunk and the whole, renames it into place.
pub(super) async fn receive(f: &Federation, peer: &Peer, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut dec = FrameDecoder::default();
    let (transfer, kanban, service, instance, index, name, size, mtime_ns) = match read_msg(&mut recv, &mut dec).await {
        Ok(FileMsg::Open { transfer, kanban, service, instance, index, path, size, mtime_ns }) => {
            (transfer, kanban, service, instance, index, path, size, mtime_ns)
        }
        Ok(other) => {
            return refuse(f, peer, &mut send, format!("expected a file, got {other:?}"), false, Some("file-protocol"))
                .await
        }
        Err(e) => {
            return refuse(f, peer, &mut send, format!("no file header: {e}"), false, Some("file-protocol")).await
        }
    };
    if !is_hex(&transfer, 32) || KanbanId::parse(&kanban).is_none() {
        return refuse(f, peer, &mut send, "malformed transfer or kanban id".into(), false, Some("file-protocol"))
            .await;
    }
    let rel = match proto::confine(&name) {
        Ok(r) => r,
        Err(e) => return refuse(f, peer, &mut send, format!("file name refused: {e}"), false, Some("file-name")).await,
    };
    let cfg = f.router.config();
    let scale = cfg.microservices.get(&service).map(|m| m.scale.max(1));
    if !scale.is_some_and(|s| instance >= 1 && instance <= s) {
        let why = format!("{service} instance {instance} is not a service of this device");
        return refuse(f, peer, &mut send, why, false, None).await;
    }
    let quota = f.files.partial_quota.load(Ordering::Relaxed);
    if size > quota {
        let why = format!("{size} bytes is more than a device may have in partial files here ({quota})");
        return refuse(f, peer, &mut send, why, false, None).await;
    }
    let data = f.data_dir.join("Data");
    // A service of this device (checked above) and a kanban id (hex): safe names.
    let inner = PathBuf::from(format!("{service}_{instance}")).join(&kanban);
    let dir = data.join(&inner);
    let staging = data.join(".transfers").join(&transfer);
    let (part, state_file, done_file) = (
        staging.join(format!("{index}.part")),
        staging.join(format!("{index}.state")),
        staging.join(format!("{index}.done")),
    );
    let target = {
        let (data, rel, staging) = (data.clone(), rel.clone(), staging.clone());
        tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
            std::fs::create_dir_all(&staging).map_err(|e| format!("`{}`: {e}", staging.display()))?;
            let d = prepare(&data, &inner, false)?;
            prepare(&d, &rel, true)
        })
        .await
    };
    let target = match target {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return refuse(f, peer, &mut send, format!("file `{name}` refused: {e}"), false, Some("file-name")).await
        }
        Err(e) => return refuse(f, peer, &mut send, e.to_string(), true, None).await,
    };
    let dir_s = dir.display().to_string();
    // Done before (the kanban sent again): recognised, not written twice.
    if let Ok(p) = tokio::fs::read_to_string(&done_file).await {
        if tokio::fs::metadata(&p).await.is_ok_and(|m| m.len() == size) {
            let _ = write_frame(&mut send, &FileMsg::At { offset: size, dir: dir_s, path: Some(p) }).await;
            let _ = send.finish();
            return;
        }
    }
    // A partial of the same file (size, time and name): resumed from its verified prefix.
    let kept: Vec<Hash> =
        match tokio::fs::read(&state_file).await.ok().and_then(|b| serde_json::from_slice::<PartState>(&b).ok()) {
            Some(s) if s.size == size && s.mtime_ns == mtime_ns && s.name == name => s
                .hashes
                .iter()
                .map(|h| crate::hex::unhex(h)?.try_into().ok())
                .collect::<Option<Vec<Hash>>>()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
    // The recorded prefix is trusted only as far as the `.part` on disk still matches it (a crash may have lost
    // what was not yet written back).
    let kept = {
        let part = part.clone();
        tokio::task::spawn_blocking(move || on_disk_prefix(&part, kept)).await.unwrap_or_default()
    };
    let rx = Receiving::new(size, kept);
    let counters = f.files.device(&peer.name);
    let reserve = size - rx.offset();
    if counters.partial.fetch_add(reserve, Ordering::Relaxed) + reserve > quota {
        counters.partial.fetch_sub(reserve, Ordering::Relaxed);
        let why = format!("partial files from {} would pass the quota ({quota} bytes)", peer.name);
        return refuse(f, peer, &mut send, why, true, None).await;
    }
    struct Release<'a>(&'a AtomicU64, u64);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(self.1, Ordering::Relaxed);
        }
    }
    let _release = Release(&counters.partial, reserve);
    let opened = async {
        let mut file = tokio::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&part).await?;
        // What is past the verified prefix was never recorded as verified: cut.
        file.set_len(rx.offset()).await?;
        file.seek(std::io::SeekFrom::Start(rx.offset())).await?;
        Ok::<_, std::io::Error>(file)
    };
    let file = match opened.await {
        Ok(fl) => fl,
        Err(e) => {
            return refuse(f, peer, &mut send, format!("cannot write `{}`: {e}", part.display()), true, None).await
        }
    };
    if write_frame(&mut send, &FileMsg::At { offset: rx.offset(), dir: dir_s, path: None }).await.is_err() {
        return;
    }
    let tracked = f.files.track(&peer.name, false, &kanban, &name, size, rx.offset());
    let rx_offset = rx.offset();
    let save = {
        let name = name.clone();
        move |rx: &Receiving| {
            let st = PartState {
                size,
                mtime_ns,
                name: name.clone(),
                hashes: rx.hashes().iter().map(|h| crate::hex::hex(h)).collect(),
            };
            serde_json::to_vec(&st).unwrap_or_default()
        }
    };
    // The disk side runs on its own thread (verify, write, record), fed through a short queue: the stream is read
    // while the previous chunks are written.
    let file = file.into_std().await;
    let (tx, mut queue) = tokio::sync::mpsc::channel::<(Header, Vec<u8>)>(PIPELINE);
    let writer = {
        let (done, counters, state_file, part) =
            (tracked.done.clone(), counters.clone(), state_file.clone(), part.clone());
        let mut rx = rx;
        let save = save.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = file;
            let mut since = 0u64;
            let r: Result<(), Stop> = (|| {
                while let Some((h, data)) = queue.blocking_recv() {
                    match h {
                        Header::Chunk { hash, .. } => {
                            rx.chunk(&hash, &data).map_err(|e| Stop::Broken(e.to_string()))?;
                            file.write_all(&data).map_err(|e| io_stop(&e, &part))?;
                            done.store(rx.offset(), Ordering::Relaxed);
                            counters.received_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            since += 1;
                            if since >= RECORD_EVERY {
                                since = 0;
                                write_atomic_sync(&state_file, &save(&rx)).map_err(|e| io_stop(&e, &state_file))?;
                            }
                        }
                        Header::End { root } => {
                            rx.end(&root).map_err(|e| Stop::Broken(e.to_string()))?;
                            file.sync_all().map_err(|e| io_stop(&e, &part))?;
                            return Ok(());
                        }
                    }
                }
                Err(Stop::Cut("the stream ended".to_owned()))
            })();
            (r, rx)
        })
    };
    let mut offset = rx_offset;
    let read: Result<(), Stop> = async {
        loop {
            let mut h = [0u8; HEADER];
            tokio::time::timeout(IDLE, recv.read_exact(&mut h))
                .await
                .map_err(|_| Stop::Cut("the sender went silent".to_owned()))?
                .map_err(|e| Stop::Cut(format!("stream: {e}")))?;
            let header = proto::parse_header(&h);
            let data = match header {
                Header::Chunk { len, .. } => {
                    if !proto::fits(size, offset, len) {
                        let e = proto::StreamError::BadLength { len, offset, size };
                        return Err(Stop::Broken(e.to_string()));
                    }
                    let mut data = vec![0u8; len];
                    tokio::time::timeout(IDLE, recv.read_exact(&mut data))
                        .await
                        .map_err(|_| Stop::Cut("the sender went silent".to_owned()))?
                        .map_err(|e| Stop::Cut(format!("stream: {e}")))?;
                    offset += len as u64;
                    data
                }
                Header::End { .. } => Vec::new(),
            };
            let end = matches!(header, Header::End { .. });
            if tx.send((header, data)).await.is_err() || end {
                // The writer stopped (it says why) or has the end.
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    let (written, rx) = match writer.await {
        Ok(r) => r,
        Err(e) => return refuse(f, peer, &mut send, format!("file writer: {e}"), true, None).await,
    };
    let outcome = match (read, written) {
        (Err(e), _) => Err(e),
        (Ok(()), w) => w,
    };
    match outcome {
        Ok(()) => {
            let placed = async {
                tokio::fs::rename(&part, &target).await?;
                write_atomic(&done_file, target.display().to_string().as_bytes()).await?;
                let _ = tokio::fs::remove_file(&state_file).await;
                Ok::<_, std::io::Error>(())
            };
            match placed.await {
                Ok(()) => {
                    counters.received_files.fetch_add(1, Ordering::Relaxed);
                    let _ = write_frame(&mut send, &FileMsg::Placed { path: target.display().to_string() }).await;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                }
                Err(e) => {
                    remove_partial(&part, &state_file).await;
                    refuse(f, peer, &mut send, io_stop(&e, &target).to_string(), true, None).await
                }
            }
        }
        Err(Stop::DiskFull(why)) => {
            // Nothing half-written stays behind; the sender tries again later (its kanban waits).
            remove_partial(&part, &state_file).await;
            tracing::error!(device = %peer.name, "{why}: the partial file is removed; the sender tries again later");
            refuse(f, peer, &mut send, why, true, None).await
        }
        Err(Stop::Cut(why)) => {
            // A cut, or a write that failed: the verified prefix is kept for the next attempt.
            let _ = write_atomic(&state_file, &save(&rx)).await;
            tracing::info!(device = %peer.name, file = %name, at = rx.offset(), "file transfer interrupted: {why}");
        }
        Err(Stop::Broken(why)) => {
            // A broken or hostile stream: its verified prefix is kept; the stream is refused and counted.
            let _ = write_atomic(&state_file, &save(&rx)).await;
            refuse(f, peer, &mut send, format!("broken file stream: {why}"), true, Some("file-protocol")).await
        }
    }
}

/// The longest prefix of `hashes` whose chunks the file at `part` holds (read back and hashed).
fn on_disk_prefix(part: &Path, hashes: Vec<Hash>) -> Vec<Hash> {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(part) else { return Vec::new() };
    let mut buf = vec![0u8; CHUNK];
    let mut good = 0;
    for h in &hashes {
        let mut n = 0;
        while n < CHUNK {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => break,
            }
        }
        if n == 0 || proto::chunk_hash(&buf[..n]) != *h {
            break;
        }
        good += 1;
    }
    let mut hashes = hashes;
    hashes.truncate(good);
    hashes
}

/// Why receiving a file stopped before it was placed.
enum Stop {
    /// The stream or a write failed (a cut link, silence): the verified prefix is kept for a resume.
    Cut(String),
    /// The disk is full: the partial file goes, the sender tries again later.
    DiskFull(String),
    /// The sender broke the protocol (a chunk that does not match its hash, a bad length): refused, counted.
    Broken(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cut(w) | Stop::DiskFull(w) | Stop::Broken(w) => f.write_str(w),
        }
    }
}

/// A failed write of `p`: a full disk (ENOSPC) is told apart.
fn io_stop(e: &std::io::Error, p: &Path) -> Stop {
    if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
        Stop::DiskFull(format!("receiver disk full writing `{}`", p.display()))
    } else {
        Stop::Cut(format!("`{}`: {e}", p.display()))
    }
}

async fn remove_partial(part: &Path, state: &Path) {
    let _ = tokio::fs::remove_file(part).await;
    let _ = tokio::fs::remove_file(state).await;
}

fn write_atomic_sync(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, p)
}

async fn write_atomic(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (p, bytes) = (p.to_owned(), bytes.to_vec());
    tokio::task::spawn_blocking(move || write_atomic_sync(&p, &bytes)).await.map_err(std::io::Error::other)?
}

/// Send Anything's housekeeping, hourly: [`collect_garbage`].
pub(crate) async fn housekeeping(root: PathBuf) -> String {
    loop {
        let r = root.clone();
        match tokio::task::spawn_blocking(move || collect_garbage(&r)).await {
            Ok(n) if n > 0 => tracing::info!(transfers = n, "old partial or finished transfers removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!("transfer housekeeping failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Removes partial transfers nobody resumed for [`PARTIAL_KEEP`] and records of transfers done longer than
/// [`DONE_KEEP`] ago. Returns how many transfer directories went.
pub(crate) fn collect_garbage(data_root: &Path) -> usize {
    let staging = data_root.join("Data").join(".transfers");
    let Ok(rd) = std::fs::read_dir(&staging) else { return 0 };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for e in rd.flatten() {
        let p = e.path();
        let Ok(files) = std::fs::read_dir(&p) else { continue };
        let mut newest = std::time::UNIX_EPOCH;
        let mut partial = false;
        for fe in files.flatten() {
            if let Ok(md) = fe.metadata() {
                newest = newest.max(md.modified().unwrap_or(std::time::UNIX_EPOCH));
            }
            partial |= fe.path().extension().is_some_and(|x| x == "part" || x == "state");
        }
        let age = now.duration_since(newest).unwrap_or_default();
        if age > if partial { PARTIAL_KEEP } else { DONE_KEEP } && std::fs::remove_dir_all(&p).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_walks_directories_in_order_and_stays_inside_the_roots() {
        let root = tempfile::tempdir().expect("tmp");
        let d = root.path().join("Data/svc_1/out");
        std::fs::create_dir_all(d.join("b/c")).expect("dirs");
        std::fs::write(d.join("z.txt"), b"z").expect("w");
        std::fs::write(d.join("b/a.bin"), b"a").expect("w");
        std::fs::write(d.join("b/c/deep"), b"d").expect("w");
        std::fs::write(root.path().join("single"), b"s").expect("w");
        let roots = vec![root.path().to_owned()];
        let (m, tops) =
            manifest(&["Data/svc_1/out".into(), root.path().join("single").display().to_string()], root.path(), &roots)
                .expect("manifest");
        let names: Vec<&str> = m.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["out/b/a.bin", "out/b/c/deep", "out/z.txt", "single"]);
        assert_eq!(tops, ["out", "single"]);
        // Outside the roots: refused, also through a symbolic link inside the tree.
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("secret"), b"x").expect("w");
        let e = manifest(&[outside.path().join("secret").display().to_string()], root.path(), &roots).unwrap_err();
        assert!(e.contains("outside the roots"), "{e}");
        std::os::unix::fs::symlink(outside.path().join("secret"), d.join("link")).expect("symlink");
        let e = manifest(&["Data/svc_1/out".into()], root.path(), &roots).unwrap_err();
        assert!(e.contains("leads outside the roots"), "{e}");
        // Gone, or not a file.
        assert!(manifest(&["nope".into()], root.path(), &roots).is_err());
    }

    #[test]
    fn a_target_is_refused_through_a_symbolic_link_or_onto_a_non_file() {
        let base = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(outside.path(), base.path().join("esc")).expect("symlink");
        assert!(prepare(base.path(), Path::new("esc/x"), true).unwrap_err().contains("symbolic link"));
        assert!(prepare(base.path(), Path::new("esc"), false).unwrap_err().contains("symbolic link"));
        std::fs::create_dir(base.path().join("d")).expect("dir");
        assert!(prepare(base.path(), Path::new("d"), true).unwrap_err().contains("not a regular file"));
        assert!(prepare(base.path(), Path::new("d"), false).is_ok());
        let ok = prepare(base.path(), Path::new("new/dir/file"), true).expect("prepare");
        assert_eq!(ok, base.path().join("new/dir/file"));
        assert!(base.path().join("new/dir").is_dir());
    }
}
