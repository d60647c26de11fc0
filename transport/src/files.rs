//! Send Anything's file streams, sans-IO: the messages, the chunk framing with a BLAKE3 hash per chunk, the
//! receiving and sending state machines (resume from the last verified chunk, a root hash over the whole file),
//! and the confinement of the names a peer sends. No sockets, no files, no clock: the drivers in
//! `aion-actors` read and write, these decide.
//!
//! One file per QUIC stream (never the kanban or control streams, so a large file does not delay small
//! kanbans):
//!
//! 1. sender → [`FileMsg::Open`] (transfer, target service and instance, the file's relative name, size, mtime);
//! 2. receiver → [`FileMsg::At`] (the verified prefix it already has: resume from there; the whole size: it is
//!    already in place) or [`FileMsg::Refused`];
//! 3. sender → chunks from that offset, each `[len u32 LE][BLAKE3 of the chunk, 32 bytes][len bytes]`, then an end
//!    marker `[0u32][root]`, where the root is the BLAKE3 of the concatenated chunk hashes of the whole file;
//! 4. receiver → [`FileMsg::Placed`] (verified, renamed into place) or [`FileMsg::Refused`].

use serde::{Deserialize, Serialize};
use std::path::{Component, PathBuf};

/// Bytes per chunk (the unit of verification and of resume).
pub const CHUNK: usize = 1 << 20;
/// Header of a chunk or of the end marker.
pub const HEADER: usize = 36;
/// Longest relative name accepted.
pub const MAX_PATH: usize = 4096;
/// Deepest relative name accepted.
pub const MAX_DEPTH: usize = 64;
/// Longest name component accepted.
pub const MAX_NAME: usize = 255;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// The messages of a file stream (postcard frames of [`crate::codec`]); the chunks are framed by [`chunk_header`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileMsg {
    /// Sender → receiver, first: one file of a transfer.
    Open {
        /// The transfer ([`transfer_id`]).
        transfer: String,
        /// The kanban the file travels with (hex id).
        kanban: String,
        /// The service it goes to on the receiving device.
        service: String,
        /// Its instance there.
        instance: u32,
        /// The file's number in the transfer.
        index: u32,
        /// Its name relative to the target directory (`/`-separated; confined by the receiver, [`confine`]).
        path: String,
        /// Its size in bytes.
        size: u64,
        /// Its modification time at the sender (ns): a partial of another version is not resumed.
        mtime_ns: u64,
    },
    /// Receiver → sender: send from `offset` (a multiple of [`CHUNK`]; `size`: the file is already in place, at
    /// `path`). `dir` is the target directory on the receiver.
    At {
        /// The verified prefix the receiver has.
        offset: u64,
        /// The target directory (absolute, on the receiver).
        dir: String,
        /// Where the file is, when it is already in place.
        path: Option<String>,
    },
    /// Receiver → sender: verified and renamed into place at `path` (absolute, on the receiver).
    Placed {
        /// The file's path.
        path: String,
    },
    /// Receiver → sender: refused. `retry`: later it may work (disk full, quota, busy); else never (a name it will
    /// not write, a service it does not run).
    Refused {
        /// Why.
        reason: String,
        /// Worth trying again later.
        retry: bool,
    },
}

/// The id of the transfer of a kanban's files from `from` to `service` (32 hex digits): the same for the same
/// kanban sent again, so the receiver recognises a transfer it has (partly or wholly) done.
pub fn transfer_id(from: &str, service: &str, kanban: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(from.as_bytes());
    h.update(&[0x1f]);
    h.update(service.as_bytes());
    h.update(&[0x1f]);
    h.update(kanban.as_bytes());
    h.finalize().as_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a name from a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty.
    #[error("empty name")]
    Empty,
    /// Too long or too deep.
    #[error("name too long or too deep")]
    TooLong,
    /// Absolute.
    #[error("absolute name `{0}`")]
    Absolute(String),
    /// A `..`, `.` or empty component, or a NUL.
    #[error("name `{0}` leaves (or does not name a place in) the target directory")]
    Escapes(String),
}

/// The relative path a peer's `name` denotes inside the target directory, or why it is refused: `/`-separated
/// components, none empty, `.` or `..`, no NUL, not absolute, at most [`MAX_DEPTH`] deep and [`MAX_PATH`]
/// long. The result is made of normal components only (property-tested), so joined to the target directory it
/// stays inside it — symbolic links on the way are the driver's to refuse.
///
/// # Errors
/// Why the name is refused.
pub fn confine(name: &str) -> Result<PathBuf, PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if name.starts_with('/') {
        return Err(PathError::Absolute(name.to_owned()));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(PathError::TooLong);
    }
    let mut p = PathBuf::new();
    for part in parts {
        if part.is_empty() || part == "." || part == ".." || part.contains('\0') {
            return Err(PathError::Escapes(name.to_owned()));
        }
        if part.len() > MAX_NAME {
            return Err(PathError::TooLong);
        }
        p.push(part);
    }
    // Belt and braces: what was built is normal components only.
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p)
    } else {
        Err(PathError::Escapes(name.to_owned()))
    }
}

/// The hash of a chunk.
pub fn chunk_hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// The header announcing a chunk of `len` bytes whose hash is `hash` (`len` 0: the end marker, `hash` the root).
pub fn header(len: usize, hash: &Hash) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..].copy_from_slice(hash);
    h
}

/// The header of a chunk of `data`: its length and hash.
pub fn chunk_header(data: &[u8]) -> ([u8; HEADER], Hash) {
    let hash = chunk_hash(data);
    (header(data.len(), &hash), hash)
}

/// The end marker, carrying the root hash.
pub fn end_marker(root: &Hash) -> [u8; HEADER] {
    header(0, root)
}

/// The root hash of a file: BLAKE3 of its chunk hashes, in order.
pub fn root(hashes: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    for c in hashes {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// What a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A chunk of `len` bytes whose hash is `hash`.
    Chunk {
        /// Its length (1..=[`CHUNK`]).
        len: usize,
        /// Its hash.
        hash: Hash,
    },
    /// The end, with the file's root hash.
    End {
        /// The root hash.
        root: Hash,
    },
}

/// Why a file stream is broken (the peer is faulty or hostile, or the bytes were damaged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A chunk longer than [`CHUNK`], or past the announced size.
    #[error("chunk of {len} bytes at {offset} does not fit the file ({size} bytes, chunks of at most {CHUNK})")]
    BadLength {
        /// Announced length.
        len: usize,
        /// Where it would go.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// A chunk whose bytes do not match its hash.
    #[error("chunk at {0} does not match its hash")]
    ChunkHash(u64),
    /// The end came before the whole file.
    #[error("the file ended at {offset} of {size} bytes")]
    Short {
        /// Where it ended.
        offset: u64,
        /// The size.
        size: u64,
    },
    /// The root hash does not match the chunks.
    #[error("the file's hash does not match")]
    Root,
}

/// Parses a header.
pub fn parse_header(h: &[u8; HEADER]) -> Header {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&h[4..]);
    if len == 0 {
        Header::End { root: hash }
    } else {
        Header::Chunk { len, hash }
    }
}

/// Whether a chunk of `len` bytes may come at `offset` in a file of `size` bytes: at most [`CHUNK`], within the
/// file, and whole unless it is the last.
pub fn fits(size: u64, offset: u64, len: usize) -> bool {
    let left = size.saturating_sub(offset);
    len > 0 && len <= CHUNK && (len as u64) <= left && (len == CHUNK || len as u64 == left)
}

/// The receiving side of one file: the verified prefix (offset and chunk hashes) and what the next bytes must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiving {
    size: u64,
    offset: u64,
    hashes: Vec<Hash>,
}

impl Receiving {
    /// A file of `size` bytes of which the verified prefix with chunk `hashes` is already written (what a partial
    /// kept on disk says; each hash is a whole [`CHUNK`] but the last).
    pub fn new(size: u64, hashes: Vec<Hash>) -> Receiving {
        // A partial that claims more chunks than the file has is not trusted: start again.
        let (offset, hashes) = if hashes.len() as u64 > size.div_ceil(CHUNK as u64) {
            (0, Vec::new())
        } else {
            ((hashes.len() as u64).saturating_mul(CHUNK as u64).min(size), hashes)
        };
        Receiving { size, offset, hashes }
    }

    /// Where the sender is to resume.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The verified chunks' hashes (to keep with the partial).
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// Checks a chunk header before its bytes are read: returns their length.
    ///
    /// # Errors
    /// A length that does not fit.
    pub fn expect(&self, len: usize) -> Result<usize, StreamError> {
        if fits(self.size, self.offset, len) {
            Ok(len)
        } else {
            Err(StreamError::BadLength { len, offset: self.offset, size: self.size })
        }
    }

    /// Verifies a chunk: on success it is to be written at the returned offset.
    ///
    /// # Errors
    /// A length that does not fit, or bytes that do not match the hash.
    pub fn chunk(&mut self, hash: &Hash, data: &[u8]) -> Result<u64, StreamError> {
        self.expect(data.len())?;
        if chunk_hash(data) != *hash {
            return Err(StreamError::ChunkHash(self.offset));
        }
        let at = self.offset;
        self.offset += data.len() as u64;
        self.hashes.push(*hash);
        Ok(at)
    }

    /// The end marker: the file is whole and its root matches (it may be renamed into place).
    ///
    /// # Errors
    /// Short, or a root that does not match.
    pub fn end(&self, root_hash: &Hash) -> Result<(), StreamError> {
        if self.offset != self.size {
            return Err(StreamError::Short { offset: self.offset, size: self.size });
        }
        if root(&self.hashes) == *root_hash {
            Ok(())
        } else {
            Err(StreamError::Root)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunks(data: &[u8]) -> Vec<&[u8]> {
        if data.is_empty() {
            Vec::new()
        } else {
            data.chunks(CHUNK).collect()
        }
    }

    #[test]
    fn names_are_confined() {
        for ok in ["a", "a/b/c.txt", "dir/.hidden", "..a", "a..", "x y/z"] {
            assert!(confine(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "./a", "..", "a\0b"] {
            assert!(confine(bad).is_err(), "{bad:?}");
        }
        assert!(confine("a/".repeat(MAX_DEPTH).trim_end_matches('/')).is_ok());
        assert!(confine("a/".repeat(MAX_DEPTH + 1).trim_end_matches('/')).is_err());
        assert!(confine(&"x".repeat(MAX_NAME + 1)).is_err());
    }

    #[test]
    fn transfer_ids_are_stable_and_distinct() {
        let a = transfer_id("w1", "sink", "00ff");
        assert_eq!(a, transfer_id("w1", "sink", "00ff"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, transfer_id("w1", "sink2", "00ff"));
        assert_ne!(transfer_id("w1x", "y", "k"), transfer_id("w1", "xy", "k"));
    }

    #[test]
    fn a_damaged_chunk_or_root_is_caught() {
        let data = vec![7u8; CHUNK + 10];
        let mut r = Receiving::new(data.len() as u64, Vec::new());
        let (h, hash) = chunk_header(&data[..CHUNK]);
        assert_eq!(parse_header(&h), Header::Chunk { len: CHUNK, hash });
        let mut bad = data[..CHUNK].to_vec();
        bad[5] ^= 1;
        assert_eq!(r.chunk(&hash, &bad), Err(StreamError::ChunkHash(0)));
        assert_eq!(r.chunk(&hash, &data[..CHUNK]), Ok(0));
        assert!(r.end(&root(&[hash])).is_err(), "short");
        let (_, h2) = chunk_header(&data[CHUNK..]);
        // A chunk that is not the last must be whole; the last must end the file.
        assert!(r.expect(5).is_err());
        assert!(r.expect(11).is_err());
        assert_eq!(r.chunk(&h2, &data[CHUNK..]), Ok(CHUNK as u64));
        assert_eq!(r.end(&[0u8; 32]), Err(StreamError::Root));
        assert_eq!(r.end(&root(&[hash, h2])), Ok(()));
        assert_eq!(parse_header(&end_marker(&[3u8; 32])), Header::End { root: [3u8; 32] });
    }

    proptest! {
        /// Whatever the name, a confined path has only normal components (it cannot leave the directory).
        #[test]
        fn confined_names_stay_inside(name in "[a-z./\\\\\0-]{0,40}") {
            if let Ok(p) = confine(&name) {
                prop_assert!(p.is_relative());
                prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
                prop_assert!(!p.as_os_str().is_empty());
            }
        }

        /// A file sent in chunks, cut at random points and resumed from the receiver's verified prefix, arrives
        /// whole and verified; a byte flipped anywhere is caught.
        #[test]
        fn resumed_transfers_arrive_whole(len in 0usize..(3 * CHUNK + 17), cuts in proptest::collection::vec(0usize..6, 0..4), flip in proptest::option::of(0usize..(3 * CHUNK + 17))) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let all: Vec<(Hash, &[u8])> = chunks(&data).into_iter().map(|c| (chunk_header(c).1, c)).collect();
            let want_root = root(&all.iter().map(|(h, _)| *h).collect::<Vec<_>>());
            let mut written = vec![0u8; len];
            let mut kept: Vec<Hash> = Vec::new();
            let mut cuts = cuts.into_iter();
            loop {
                // A (re)connection: the receiver resumes from what it kept.
                let mut r = Receiving::new(len as u64, kept.clone());
                let start = (r.offset() as usize) / CHUNK;
                let cut_after = cuts.next();
                let mut cut = false;
                for (i, (h, c)) in all.iter().enumerate().skip(start) {
                    if cut_after == Some(i - start) {
                        cut = true;
                        break;
                    }
                    let mut bytes = c.to_vec();
                    let at = i * CHUNK;
                    if let Some(f) = flip.filter(|f| *f >= at && *f < at + c.len()) {
                        bytes[f - at] ^= 0x80;
                        prop_assert_eq!(r.chunk(h, &bytes), Err(StreamError::ChunkHash(at as u64)));
                        return Ok(());
                    }
                    let off = r.chunk(h, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))? as usize;
                    written[off..off + bytes.len()].copy_from_slice(&bytes);
                }
                kept = r.hashes().to_vec();
                if !cut {
                    prop_assert_eq!(r.end(&want_root), Ok(()));
                    prop_assert_eq!(&written, &data);
                    break;
                }
            }
        }
    }
}
