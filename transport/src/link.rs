//! Thin I/O drivers over the codec: a Unix-socket link and an in-memory link with the same API.
//!
//! Both move **batches**: a reader returns every message that has arrived, a writer sends a whole batch with
//! one write (socket) or one channel send (memory). In-memory links skip encoding altogether.

use crate::codec::{encode_into, FrameDecoder, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The receiving half of a link.
pub enum LinkReader<R> {
    /// A Unix socket.
    Unix {
        /// The socket.
        rd: OwnedReadHalf,
        /// Frames received but not decoded yet (reads go straight into its buffer).
        dec: FrameDecoder,
    },
    /// An in-memory channel of batches.
    Mem(mpsc::Receiver<Vec<R>>),
}

/// The sending half of a link.
pub enum LinkWriter<W> {
    /// A Unix socket.
    Unix {
        /// The socket.
        wr: OwnedWriteHalf,
        /// Encoding buffer.
        buf: Vec<u8>,
    },
    /// An in-memory channel of batches.
    Mem {
        /// The channel.
        tx: mpsc::Sender<Vec<W>>,
        /// Messages queued by [`LinkWriter::push`] and not flushed yet.
        pending: Vec<W>,
    },
}

fn invalid(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<R: DeserializeOwned> LinkReader<R> {
    /// Waits for at least one message and appends every message available to `out`.
    /// Returns `Ok(false)` on an orderly end of stream.
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for a corrupt frame (the connection must then be closed).
    ///
    /// # Cancel safety
    /// Cancel safe: bytes read stay buffered in the decoder.
    pub async fn recv(&mut self, out: &mut Vec<R>) -> io::Result<bool> {
        match self {
            LinkReader::Unix { rd, dec } => loop {
                let before = out.len();
                while let Some(m) = dec.decode::<R>().map_err(invalid)? {
                    out.push(m);
                }
                if out.len() > before {
                    return Ok(true);
                }
                let n = rd.read_buf(dec.read_buffer(64 << 10)).await?;
                if n == 0 {
                    if dec.pending() > 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-frame"));
                    }
                    return Ok(false);
                }
            },
            LinkReader::Mem(rx) => match rx.recv().await {
                Some(mut batch) => {
                    out.append(&mut batch);
                    while let Ok(mut more) = rx.try_recv() {
                        out.append(&mut more);
                    }
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }
}

impl<W: Serialize> LinkWriter<W> {
    /// Queues a message; nothing is sent before [`LinkWriter::flush`].
    ///
    /// # Errors
    /// `InvalidData` if it cannot be encoded (larger than the frame limit).
    pub fn push(&mut self, msg: W) -> io::Result<()> {
        match self {
            LinkWriter::Unix { buf, .. } => encode_into(&msg, buf).map_err(invalid),
            LinkWriter::Mem { pending, .. } => {
                pending.push(msg);
                Ok(())
            }
        }
    }

    /// Queues a message given as a borrowed value `wire` that encodes exactly like `W` (used to send a kanban
    /// without cloning it); in-memory links, which carry owned values, call `owned` instead.
    ///
    /// # Errors
    /// As [`LinkWriter::push`].
    pub fn push_as<T: Serialize>(&mut self, wire: &T, owned: impl FnOnce() -> W) -> io::Result<()> {
        match self {
            LinkWriter::Unix { buf, .. } => encode_into(wire, buf).map_err(invalid),
            LinkWriter::Mem { pending, .. } => {
                pending.push(owned());
                Ok(())
            }
        }
    }

    /// Sends everything queued with one write (socket) or one channel send (memory).
    ///
    /// # Errors
    /// I/O errors; `BrokenPipe` when the peer of an in-memory link is gone.
    pub async fn flush(&mut self) -> io::Result<()> {
        match self {
            LinkWriter::Unix { wr, buf } => {
                if buf.is_empty() {
                    return Ok(());
                }
                let r = wr.write_all(buf).await;
                buf.clear();
                if buf.capacity() > 1 << 20 {
                    *buf = Vec::with_capacity(64 << 10);
                }
                r
            }
            LinkWriter::Mem { tx, pending } => {
                if pending.is_empty() {
                    return Ok(());
                }
                tx.send(std::mem::take(pending))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "in-memory peer closed"))
            }
        }
    }

    /// Sends every message of `batch` (which is left empty), together with anything queued.
    ///
    /// # Errors
    /// I/O errors; `BrokenPipe` when the peer of an in-memory link is gone.
    pub async fn send(&mut self, batch: &mut Vec<W>) -> io::Result<()> {
        for m in batch.drain(..) {
            self.push(m)?;
        }
        self.flush().await
    }

    /// Sends one message.
    ///
    /// # Errors
    /// As [`LinkWriter::send`].
    pub async fn send_one(&mut self, msg: W) -> io::Result<()> {
        self.send(&mut vec![msg]).await
    }

    /// Closes the sending direction (socket shutdown; channel drop happens when the writer is dropped).
    pub async fn close(&mut self) {
        if let LinkWriter::Unix { wr, .. } = self {
            let _ = wr.shutdown().await;
        }
    }
}

/// Splits a Unix stream into a typed reader and writer.
pub fn unix_split<R, W>(stream: UnixStream) -> (LinkReader<R>, LinkWriter<W>) {
    let (rd, wr) = stream.into_split();
    (LinkReader::Unix { rd, dec: FrameDecoder::default() }, LinkWriter::Unix { wr, buf: Vec::with_capacity(64 << 10) })
}

/// An in-memory link: `(a_reader, a_writer)` talks to `(b_reader, b_writer)`. `capacity` bounds the batches in
/// flight each way.
#[allow(clippy::type_complexity)]
pub fn mem_pair<A, B>(capacity: usize) -> ((LinkReader<A>, LinkWriter<B>), (LinkReader<B>, LinkWriter<A>)) {
    let (a_tx, a_rx) = mpsc::channel(capacity.max(1));
    let (b_tx, b_rx) = mpsc::channel(capacity.max(1));
    (
        (LinkReader::Mem(a_rx), LinkWriter::Mem { tx: b_tx, pending: Vec::new() }),
        (LinkReader::Mem(b_rx), LinkWriter::Mem { tx: a_tx, pending: Vec::new() }),
    )
}
