//! Sans-IO framing: each frame is a `u32` little-endian body length followed by a postcard body.
//!
//! No sockets, no clock: feed bytes in, get messages out. Any byte sequence yields messages or a
//! [`FrameError`], never a panic (property-tested).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest accepted frame body (16 MiB). A larger length prefix is an error, not an allocation.
pub const MAX_FRAME: usize = 16 << 20;

// A kanban the runtime accepted always fits the frame that delivers it, with room for what is added on the way.
const _: () = assert!(aion_model::kanban::MAX_KANBAN_BYTES + (32 << 10) <= MAX_FRAME);

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
}

/// Appends one frame holding `msg` to `out`.
///
/// # Errors
/// Only if `msg` cannot be serialised (our messages always can) or is larger than [`MAX_FRAME`].
pub fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Appends in place; on any error the buffer is cut back to where this frame began (the frames before it,
    // queued in the same buffer, are kept).
    if let Err(e) = postcard::serialize_with_flavor::<T, _, ()>(msg, Append(out)) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// A postcard output that appends to a borrowed buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Incremental frame decoder.
///
/// # Examples
/// ```
/// use aion_transport::codec::{encode_into, FrameDecoder};
/// let mut wire = Vec::new();
/// encode_into(&(7u32, "x".to_string()), &mut wire).unwrap();
/// let mut d = FrameDecoder::default();
/// d.push(&wire[..3]);
/// assert_eq!(d.decode::<(u32, String)>().unwrap(), None); // incomplete
/// d.push(&wire[3..]);
/// assert_eq!(d.decode::<(u32, String)>().unwrap(), Some((7, "x".to_string())));
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameDecoder {
    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// The buffer to append received bytes to (e.g. with `AsyncReadExt::read_buf`), with at least `reserve`
    /// bytes of spare capacity. Avoids copying reads through a second buffer.
    pub fn read_buffer(&mut self, reserve: usize) -> &mut Vec<u8> {
        self.compact();
        self.buf.reserve(reserve);
        &mut self.buf
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Decodes the next complete frame, if there is one.
    ///
    /// # Errors
    /// [`FrameError`] when the stream is corrupt; the decoder should then be discarded with its connection.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = &avail[4..4 + len];
        let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed(format!("{} trailing bytes in frame", rest.len())));
        }
        self.pos += 4 + len;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientMsg, Hello, MAGIC, PROTOCOL_VERSION};
    use aion_model::kanban::metadata_from_json;
    use aion_model::{Kanban, KanbanId};
    use proptest::prelude::*;

    fn sample() -> Vec<ClientMsg> {
        vec![
            ClientMsg::Hello(Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                service: "transform".into(),
                instance: 2,
                window: 64,
                seed: true,
                pid: 42,
            }),
            ClientMsg::Output(Box::new(
                Kanban {
                    id: KanbanId::generate(),
                    metadata: metadata_from_json(serde_json::json!({"a": [1, 2.5, "ü"], "b": {"c": null}})),
                    ..Kanban::default()
                }
                .into_wire(),
            )),
            ClientMsg::Ack { upto: u64::MAX },
            ClientMsg::Bye,
        ]
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = sample();
        let mut wire = Vec::new();
        for m in &msgs {
            encode_into(m, &mut wire).expect("encode");
        }
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(m) = d.decode::<ClientMsg>().expect("decode") {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let mut d = FrameDecoder::default();
        d.push(&u32::MAX.to_le_bytes());
        assert_eq!(d.decode::<ClientMsg>(), Err(FrameError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn an_oversized_frame_leaves_the_frames_before_it() {
        let mut wire = Vec::new();
        encode_into(&ClientMsg::Bye, &mut wire).expect("encode");
        let before = wire.clone();
        let big = ClientMsg::StaticSubscribe { topic: "t".repeat(MAX_FRAME) };
        assert!(matches!(encode_into(&big, &mut wire), Err(FrameError::TooLarge(_))));
        assert_eq!(wire, before, "cut back to the frame that failed");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut wire = Vec::new();
        encode_into(&ClientMsg::Bye, &mut wire).expect("encode");
        wire[0] += 1;
        wire.push(0);
        let mut d = FrameDecoder::default();
        d.push(&wire);
        assert!(matches!(d.decode::<ClientMsg>(), Err(FrameError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::default();
            for c in chunks {
                d.push(&c);
                while let Ok(Some(_)) = d.decode::<ClientMsg>() {}
            }
        }

        #[test]
        fn mutated_frames_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut wire = Vec::new();
            for m in sample() { encode_into(&m, &mut wire).expect("encode"); }
            let i = idx.index(wire.len());
            wire[i] = byte;
            let mut d = FrameDecoder::default();
            d.push(&wire);
            while let Ok(Some(_)) = d.decode::<ClientMsg>() {}
        }
    }
}
