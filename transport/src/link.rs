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
        /// Frames received but not decoded yet.
        dec: FrameDecoder,
        /// Read buffer.
        buf: Vec<u8>,
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
    Mem(mpsc::Sender<Vec<W>>),
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
            LinkReader::Unix { rd, dec, buf } => loop {
                let before = out.len();
                while let Some(m) = dec.decode::<R>().map_err(invalid)? {
                    out.push(m);
                }
                if out.len() > before {
                    return Ok(true);
                }
                let n = rd.read(buf).await?;
                if n == 0 {
                    if dec.pending() > 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-frame"));
                    }
                    return Ok(false);
                }
                dec.push(&buf[..n]);
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
    /// Sends every message of `batch` (which is left empty).
    ///
    /// # Errors
    /// I/O errors; `BrokenPipe` when the peer of an in-memory link is gone.
    pub async fn send(&mut self, batch: &mut Vec<W>) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match self {
            LinkWriter::Unix { wr, buf } => {
                buf.clear();
                for m in batch.drain(..) {
                    encode_into(&m, buf).map_err(invalid)?;
                }
                wr.write_all(buf).await?;
                if buf.capacity() > 1 << 20 {
                    *buf = Vec::with_capacity(64 << 10);
                }
                Ok(())
            }
            LinkWriter::Mem(tx) => tx
                .send(std::mem::take(batch))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "in-memory peer closed")),
        }
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
    (
        LinkReader::Unix { rd, dec: FrameDecoder::default(), buf: vec![0; 64 << 10] },
        LinkWriter::Unix { wr, buf: Vec::with_capacity(64 << 10) },
    )
}

/// An in-memory link: `(a_reader, a_writer)` talks to `(b_reader, b_writer)`. `capacity` bounds the batches in
/// flight each way.
#[allow(clippy::type_complexity)]
pub fn mem_pair<A, B>(capacity: usize) -> ((LinkReader<A>, LinkWriter<B>), (LinkReader<B>, LinkWriter<A>)) {
    let (a_tx, a_rx) = mpsc::channel(capacity.max(1));
    let (b_tx, b_rx) = mpsc::channel(capacity.max(1));
    ((LinkReader::Mem(a_rx), LinkWriter::Mem(b_tx)), (LinkReader::Mem(b_rx), LinkWriter::Mem(a_tx)))
}
