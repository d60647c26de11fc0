//! AION wire protocol between microservices and the runtime's status-kanban endpoint.
//!
//! - [`proto`]: the messages and the versioned handshake.
//! - [`codec`]: sans-IO framing (`u32` little-endian length + postcard body), tested without sockets.
//! - [`session`]: the session protocol as sans-IO state machines (runtime side and client side), tested with
//!   scripted and random message sequences, disconnects included.
//! - `grpc` (feature `grpc`): AION's gRPC kanban API, generated from `proto/status.proto`, and its conversions.
//! - [`federation`]: the protocol between devices (cluster mode) as sans-IO state machines: handshake with a
//!   version range, heartbeats, credit, numbered kanbans and acknowledgements, resume after a cut.
//! - `files` (feature `files`): Send Anything's file streams: chunks with BLAKE3 hashes, resume from the last
//!   verified chunk, a root hash per file, the confinement of the names a peer sends.
//! - [`link`]: thin I/O drivers: a Unix-socket link and an in-memory link with the same API, so a service runs
//!   as a separate process or in-process unchanged.

pub mod codec;
pub mod federation;
#[cfg(feature = "files")]
pub mod files;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod link;
pub mod proto;
pub mod session;

pub use codec::{FrameDecoder, FrameError, MAX_FRAME};
pub use link::{mem_pair, unix_split, LinkReader, LinkWriter};
pub use proto::{ClientMsg, Hello, ServerMsg, PROTOCOL_VERSION};
