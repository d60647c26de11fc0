//! AION's gRPC kanban API (`kanbanpb.Kanban`, the `grpc` feature): the generated messages, server and client,
//! and the conversions between AION's `StatusKanban` and the runtime's kanban. Pure functions, no I/O: the
//! runtime's gRPC endpoint (in `aion-actors`) drives them.
//!
//! Metadata is a `google.protobuf.Struct`, whose numbers are all doubles: an integral double within ±2^53 becomes
//! an integer (so `as_u64` works on what a Python client sent as `3`), any other number a float; on the way out
//! every number becomes a double (integers beyond 2^53 lose precision, as in JSON). An absent `metadata` is `{}`.

use aion_model::kanban::{Kanban, Metadata, Value, WireKanban, TERMINATE_KEY};
use prost_types::value::Kind;
use std::collections::BTreeMap;

/// The generated code of `proto/status.proto` (package `kanbanpb`).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod kanbanpb {
    tonic::include_proto!("kanbanpb");
}

pub use kanbanpb::StatusKanban;

/// The largest message either side accepts: gRPC's default receive limit (4 MiB), which AION's clients keep.
pub const MAX_GRPC_MESSAGE: usize = 4 << 20;

/// The largest integer a double holds exactly.
const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53

/// A Struct value as the runtime's metadata value.
pub fn value_from_proto(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_metadata(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_from_proto).collect()),
    }
}

fn number(n: f64) -> Value {
    if n.is_finite() && n.fract() == 0.0 && n.abs() <= EXACT {
        if n >= 0.0 {
            // Exact: integral and within 2^53.
            Value::U64(n as u64)
        } else {
            Value::I64(n as i64)
        }
    } else {
        Value::F64(n)
    }
}

/// The runtime's metadata value as a Struct value.
pub fn value_to_proto(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::I64(n) => Kind::NumberValue(*n as f64),
        Value::U64(n) => Kind::NumberValue(*n as f64),
        Value::F64(n) => Kind::NumberValue(*n),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(value_to_proto).collect() }),
        Value::Object(o) => Kind::StructValue(metadata_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A Struct as the runtime's metadata.
pub fn struct_to_metadata(s: &prost_types::Struct) -> Metadata {
    s.fields.iter().map(|(k, v)| (k.clone(), value_from_proto(v))).collect()
}

/// The runtime's metadata as a Struct.
pub fn metadata_to_struct(m: &Metadata) -> prost_types::Struct {
    prost_types::Struct { fields: m.iter().map(|(k, v)| (k.clone(), value_to_proto(v))).collect::<BTreeMap<_, _>>() }
}

/// What a gRPC client sent, as a kanban (id, trace, origin and hops are the runtime's to set). A negative or zero
/// `processNumber` is 1, as AION's clients mean it.
pub fn kanban_from_status(sk: StatusKanban) -> Kanban {
    let metadata = sk.metadata.as_ref().map(struct_to_metadata).unwrap_or_default();
    Kanban {
        start_at: sk.start_at,
        finish_at: sk.finish_at,
        next_device_name: sk.next_device_name,
        connection_key: sk.connection_key,
        process_number: u32::try_from(sk.process_number.max(1)).unwrap_or(1),
        prior_success: sk.prior_success,
        data_path: sk.data_path,
        file_list: sk.file_list,
        metadata,
        ..Kanban::default()
    }
}

/// A kanban as a gRPC client receives it: the fields its producer sent, unchanged (no `startAt` filled in).
///
/// # Errors
/// When its metadata does not decode (a kanban the runtime accepted always decodes).
pub fn status_from_kanban(k: &WireKanban) -> Result<StatusKanban, postcard::Error> {
    let metadata = k.metadata.decode()?;
    Ok(StatusKanban {
        start_at: k.start_at.clone(),
        finish_at: k.finish_at.clone(),
        next_device_name: k.next_device_name.clone(),
        connection_key: k.connection_key.clone(),
        process_number: i32::try_from(k.process_number).unwrap_or(i32::MAX),
        prior_success: k.prior_success,
        data_path: k.data_path.clone(),
        file_list: k.file_list.clone(),
        metadata: Some(metadata_to_struct(&metadata)),
    })
}

/// AION's terminate kanban as its clients send it: `metadata.type == "terminate"` with connection key
/// `service-broker` (a normal end) or `""` (the Python library's close after an error). Returns the instance it
/// names (`metadata.name`, `metadata.number` as a string or a number) when it is one.
pub fn terminate_target(k: &Kanban) -> Option<(Option<String>, Option<u32>)> {
    let is = k.metadata.get("type").and_then(Value::as_str) == Some("terminate")
        && (k.connection_key == TERMINATE_KEY || k.connection_key.is_empty());
    if !is {
        return None;
    }
    let name = k.metadata.get("name").and_then(Value::as_str).map(str::to_owned);
    let number = match k.metadata.get("number") {
        Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
        Some(v) => v.as_f64().filter(|n| *n >= 1.0 && *n <= f64::from(u32::MAX)).map(|n| n as u32),
        None => None,
    };
    Some((name, number))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(fields: Vec<(&str, prost_types::Value)>) -> prost_types::Struct {
        prost_types::Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
    }

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value { kind: Some(Kind::NumberValue(n)) }
    }

    #[test]
    fn integral_doubles_become_integers_and_others_stay_floats() {
        let m = struct_to_metadata(&st(vec![
            ("seq", num(3.0)),
            ("neg", num(-2.0)),
            ("half", num(0.5)),
            ("big", num(1e300)),
            ("edge", num(EXACT)),
            ("beyond", num(EXACT * 2.0)),
        ]));
        assert_eq!(m["seq"], Value::U64(3));
        assert_eq!(m["neg"], Value::I64(-2));
        assert_eq!(m["half"], Value::F64(0.5));
        assert_eq!(m["big"], Value::F64(1e300));
        assert_eq!(m["edge"], Value::U64(1 << 53));
        assert_eq!(m["beyond"], Value::F64(EXACT * 2.0));
    }

    #[test]
    fn absent_metadata_is_empty_and_a_zero_process_number_is_one() {
        let k = kanban_from_status(StatusKanban { process_number: 0, ..StatusKanban::default() });
        assert!(k.metadata.is_empty());
        assert_eq!(k.process_number, 1);
        let k = kanban_from_status(StatusKanban { process_number: -5, ..StatusKanban::default() });
        assert_eq!(k.process_number, 1);
    }

    #[test]
    fn terminate_kanbans_of_both_clients_are_recognised() {
        let mut md = Metadata::new();
        md.insert("type".into(), Value::from("terminate"));
        md.insert("name".into(), Value::from("svc"));
        md.insert("number".into(), Value::from("2"));
        let go = Kanban { connection_key: TERMINATE_KEY.into(), metadata: md.clone(), ..Kanban::default() };
        assert_eq!(terminate_target(&go), Some((Some("svc".into()), Some(2))));
        md.insert("number".into(), Value::F64(3.0));
        let py_failed = Kanban { connection_key: String::new(), metadata: md.clone(), ..Kanban::default() };
        assert_eq!(terminate_target(&py_failed), Some((Some("svc".into()), Some(3))));
        let data = Kanban { connection_key: "default".into(), metadata: md, ..Kanban::default() };
        assert_eq!(terminate_target(&data), None, "a kanban on a data key is data");
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0u64..(1 << 53)).prop_map(Value::U64),
            (-(1i64 << 53)..0).prop_map(Value::I64),
            (-1e12f64..1e12).prop_filter("not integral", |f| f.fract() != 0.0).prop_map(Value::F64),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(Value::Object),
            ]
        })
    }

    proptest! {
        /// Every metadata value a Struct can carry exactly comes back as it went: integers within 2^53, non-integral
        /// floats, strings, booleans, nulls, nested lists and objects.
        #[test]
        fn metadata_round_trips_through_a_struct(m in prop::collection::btree_map(".{0,8}", value(), 0..6)) {
            let back = struct_to_metadata(&metadata_to_struct(&m));
            prop_assert_eq!(back, m);
        }

        /// A kanban's AION fields round-trip through `StatusKanban`.
        #[test]
        fn status_kanban_round_trips(key in ".{0,10}", n in 1u32..1000, ok in any::<bool>(), files in prop::collection::vec(".{0,8}", 0..3)) {
            let k = Kanban { connection_key: key, process_number: n, prior_success: ok, file_list: files, ..Kanban::default() };
            let sk = status_from_kanban(&k.clone().into_wire()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = kanban_from_status(sk);
            prop_assert_eq!(back, k);
        }
    }
}
