//! AION's data model, shared by the SDK, the wire protocol and the runtime — and nothing else: no actor
//! executor, no I/O, no configuration loader, so a microservice built on the SDK compiles only what it uses.
//!
//! - [`kanban`]: the kanban card, its ids ([`KanbanId`]), its free-form JSON metadata ([`kanban::Value`], kept
//!   encoded until read: [`kanban::LazyMetadata`]) and AION's protojson form.
//! - [`time`]: RFC 3339 UTC timestamps without a calendar dependency.

pub mod kanban;
pub mod time;

pub use kanban::{Kanban, KanbanId, Metadata, MetadataBytes, Origin, Value, WireKanban};

/// The text of a caught panic's payload (`&str` or `String`; anything else is described as such).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
