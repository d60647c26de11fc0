//! The runtime's log output: never panics, never blocks the thread that logs.
//!
//! A log line is formatted by `tracing-subscriber` into a [`LineWriter`] and handed to a bounded queue; one
//! thread (`aion-log`) writes the queue to stderr. When stderr cannot be written (a closed pipe, a full disk,
//! `/dev/full`), the line is counted in [`LogStats::write_errors`] and dropped; when stderr is slow (a stalled
//! pipe or terminal) and the queue is full, the line is counted in [`LogStats::dropped`] and dropped. Nothing is
//! printed about it (there is nowhere to print): the counters are in `aion status`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How many lines may wait for the writer thread.
const QUEUE: usize = 4096;

/// Counters of the log output.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Lines written.
    pub written: AtomicU64,
    /// Lines that could not be written (stderr failed).
    pub write_errors: AtomicU64,
    /// Lines dropped because the writer was behind (stderr too slow).
    pub dropped: AtomicU64,
    /// Lines queued and not written yet.
    pub pending: AtomicU64,
}

static STATS: LogStats = LogStats {
    written: AtomicU64::new(0),
    write_errors: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    pending: AtomicU64::new(0),
};
static SINK: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();

/// The counters of this process's log output.
pub fn stats() -> &'static LogStats {
    &STATS
}

/// The log output: a `tracing-subscriber` writer factory. [`LogSink::stderr`] starts the writer thread (once per
/// process; later calls share it).
#[derive(Clone, Copy, Debug)]
pub struct LogSink;

impl LogSink {
    /// The sink writing to this process's stderr.
    pub fn stderr() -> LogSink {
        SINK.get_or_init(|| {
            let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
            let spawned =
                std::thread::Builder::new().name("aion-log".into()).spawn(move || write_lines(rx, std::io::stderr()));
            if spawned.is_err() {
                // No thread: lines are then dropped (counted) as if stderr were full.
                STATS.dropped.fetch_add(1, Ordering::Relaxed);
            }
            tx
        });
        LogSink
    }

    /// Waits (at most `limit`) until every queued line has been written or has failed; for a clean exit.
    pub fn flush(limit: Duration) {
        let start = Instant::now();
        while STATS.pending.load(Ordering::Acquire) > 0 && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Queues one complete line (or several) for stderr; never blocks, never fails (a full queue drops it, counted).
pub fn emit(line: Vec<u8>) {
    let Some(tx) = SINK.get() else {
        // No sink installed (a tool or a test): write directly, ignoring errors.
        if std::io::stderr().write_all(&line).is_err() {
            STATS.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        return;
    };
    STATS.pending.fetch_add(1, Ordering::AcqRel);
    match tx.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            STATS.pending.fetch_sub(1, Ordering::AcqRel);
            STATS.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_lines(rx: Receiver<Vec<u8>>, mut out: impl Write) {
    while let Ok(line) = rx.recv() {
        match out.write_all(&line) {
            Ok(()) => STATS.written.fetch_add(1, Ordering::Relaxed),
            Err(_) => STATS.write_errors.fetch_add(1, Ordering::Relaxed),
        };
        STATS.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One event's formatted text, queued when dropped.
pub struct LineWriter {
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            emit(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter { buf: Vec::with_capacity(256) }
    }
}

/// Installs the runtime's logging: `RUST_LOG` (default `info`), through [`LogSink`], with colours only when
/// stderr is a terminal. Does nothing if a subscriber is already installed.
pub fn init() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(LogSink::stderr())
        .try_init();
}

/// Prints a line for the user on stderr, in order with the log; never panics.
pub fn say(text: impl std::fmt::Display) {
    emit(format!("{text}\n").into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(28))
        }
    }

    #[test]
    fn a_failing_output_is_counted_not_fatal() {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let before = STATS.write_errors.load(Ordering::Relaxed);
        STATS.pending.fetch_add(2, Ordering::AcqRel);
        tx.send(b"a\n".to_vec()).expect("queued");
        tx.send(b"b\n".to_vec()).expect("queued");
        drop(tx);
        write_lines(rx, Failing);
        assert!(STATS.write_errors.load(Ordering::Relaxed) >= before + 2);
    }
}
