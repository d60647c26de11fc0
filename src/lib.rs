//! AION in Rust: an edge runtime for kanban-passing microservices, a drop-in for latonaio/aion-core.
//!
//! This facade re-exports the layers:
//! - [`sdk`]: write a microservice ([`sdk::Service`], [`sdk::main`]);
//! - [`model`]: the kanban model (ids, metadata, AION protojson) and time: no actors, no I/O;
//! - [`runtime`]: actor facade, supervision, `services.yml` model and loader (re-exports the model);
//! - [`transport`]: the wire protocol;
//! - [`actors`]: broker, status-kanban endpoint, backends, and the [`actors::Node`] that runs them.

pub use aion_actors as actors;
pub use aion_model as model;
pub use aion_runtime as runtime;
pub use aion_sdk as sdk;
pub use aion_transport as transport;
