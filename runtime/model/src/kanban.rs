//! The kanban card: every field of AION's `StatusKanban` plus identity and provenance.
//!
//! Metadata is free-form JSON. Because postcard (our wire format) is not self-describing,
//! `serde_json::Value` cannot be decoded from it; [`Value`] serialises as a tagged enum in binary formats and as
//! plain JSON in human-readable ones, so the same type works on the wire and in `--json` output.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Free-form kanban metadata: a JSON object.
pub type Metadata = BTreeMap<String, Value>;

/// A JSON value that survives non-self-describing formats (postcard) and human-readable ones (JSON) alike.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `null`.
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A negative integer (or any integer that fits `i64` and came in as signed).
    I64(i64),
    /// A non-negative integer.
    U64(u64),
    /// A floating-point number.
    F64(f64),
    /// A UTF-8 string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object with keys in sorted order.
    Object(BTreeMap<String, Value>),
}

impl Value {
    /// Converts from `serde_json::Value` (lossless).
    pub fn from_json(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    Value::U64(u)
                } else if let Some(i) = n.as_i64() {
                    Value::I64(i)
                } else {
                    Value::F64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(a) => Value::Array(a.into_iter().map(Value::from_json).collect()),
            serde_json::Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, Value::from_json(v))).collect())
            }
        }
    }

    /// Converts to `serde_json::Value`. A non-finite float becomes `null` (JSON cannot hold it).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::I64(i) => (*i).into(),
            Value::U64(u) => (*u).into(),
            Value::F64(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Object(o) => serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number inside as `f64`, if this is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::I64(i) => Some(*i as f64),
            Value::U64(u) => Some(*u as f64),
            Value::F64(f) => Some(*f),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<u64> for Value {
    fn from(u: u64) -> Self {
        Value::U64(u)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        if i >= 0 {
            Value::U64(i as u64)
        } else {
            Value::I64(i)
        }
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::F64(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// Converts a JSON object into [`Metadata`]; any other JSON value is put under the key `value`.
pub fn metadata_from_json(v: serde_json::Value) -> Metadata {
    match Value::from_json(v) {
        Value::Object(o) => o,
        Value::Null => Metadata::new(),
        other => BTreeMap::from([("value".to_owned(), other)]),
    }
}

/// Converts [`Metadata`] into a JSON object.
pub fn metadata_to_json(m: &Metadata) -> serde_json::Value {
    serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
}

#[derive(Serialize)]
enum TaggedRef<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    String(&'a str),
    Array(&'a [Value]),
    Object(&'a BTreeMap<String, Value>),
}

#[derive(Deserialize)]
enum Tagged {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    String(String),
    Array(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return self.to_json().serialize(s);
        }
        match self {
            Value::Null => TaggedRef::Null,
            Value::Bool(b) => TaggedRef::Bool(*b),
            Value::I64(i) => TaggedRef::I64(*i),
            Value::U64(u) => TaggedRef::U64(*u),
            Value::F64(f) => TaggedRef::F64(*f),
            Value::String(x) => TaggedRef::String(x),
            Value::Array(a) => TaggedRef::Array(a),
            Value::Object(o) => TaggedRef::Object(o),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            return serde_json::Value::deserialize(d).map(Value::from_json);
        }
        Ok(match Tagged::deserialize(d)? {
            Tagged::Null => Value::Null,
            Tagged::Bool(b) => Value::Bool(b),
            Tagged::I64(i) => Value::I64(i),
            Tagged::U64(u) => Value::U64(u),
            Tagged::F64(f) => Value::F64(f),
            Tagged::String(x) => Value::String(x),
            Tagged::Array(a) => Value::Array(a),
            Tagged::Object(o) => Value::Object(o),
        })
    }
}

/// A 128-bit kanban identifier: 64 random bits fixed per process, then a 64-bit counter. Shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KanbanId(pub u128);

static ID_COUNTER: AtomicU64 = AtomicU64::new(1);

fn process_prefix() -> u64 {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            // No entropy source: fall back to pid and time, still unique enough per process.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            return t ^ ((std::process::id() as u64) << 32);
        }
        u64::from_le_bytes(b)
    })
}

impl KanbanId {
    /// A fresh identifier, unique across processes with overwhelming probability.
    pub fn generate() -> KanbanId {
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        KanbanId(((process_prefix() as u128) << 64) | n as u128)
    }

    /// A deterministic identifier derived from a parent id and an index: the `index`-th output produced while
    /// handling `parent`. A redelivered input handled again yields the same output ids, so the runtime can
    /// deduplicate them.
    pub fn derive(parent: KanbanId, index: u32) -> KanbanId {
        // SplitMix-style mixing of both halves; collisions are as unlikely as for random ids.
        let mut x = parent.0 ^ ((index as u128 + 1) << 96) ^ (index as u128 + 1);
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        x ^= x >> 67;
        KanbanId(x)
    }

    /// A key identifying one producing instance, for [`KanbanId::of_producer`].
    pub fn producer_key(service: &str, instance: u32) -> u128 {
        // FNV-1a over the name, a separator and the instance number; then mixed like the ids.
        let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        for b in service.bytes().chain([0xff]).chain(instance.to_le_bytes()) {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
        }
        mix(h)
    }

    /// The id an output proposed as `self` gets once accepted from the producer whose key is `producer`
    /// ([`KanbanId::producer_key`]): the proposal with the producer's key in its high half. For one producer this is
    /// a bijection (different proposals stay different,
    /// the same proposal always maps to the same id, so redelivery deduplication still works); for different
    /// producers the same proposal maps to different ids. So the outputs of two branches of a fan-out, derived
    /// from the same input id, are two kanbans with two ids when they meet again downstream.
    #[inline]
    pub fn of_producer(self, producer: u128) -> KanbanId {
        // Only the high half changes: a producer's generated ids (random prefix, counter) stay in order, which
        // keeps the durable queue's index appending rather than inserting at random.
        KanbanId(self.0 ^ (producer & (u128::from(u64::MAX) << 64)))
    }

    /// The id of the `n`-th extra copy (n ≥ 1) of a kanban routed more than once to the same instance by one
    /// fan-out (`nextService: default: [{name: d}, {name: d}]`): each copy is its own kanban in that queue.
    pub fn copy(self, n: u32) -> KanbanId {
        KanbanId(mix(self.0 ^ (u128::from(n) << 64) ^ 0x5bd1_e995))
    }

    /// Parses 32 hex digits (as shown by [`fmt::Display`]).
    pub fn parse(s: &str) -> Option<KanbanId> {
        if s.is_empty() || s.len() > 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(KanbanId)
    }
}

/// A bijection of `u128` that spreads every input bit over the output (odd multiplications and xor-shifts).
fn mix(mut x: u128) -> u128 {
    x ^= x >> 67;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    x ^= x >> 61;
    x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93_A5B3_C4E5_F6A7_1F2B);
    x ^= x >> 64;
    x
}

impl fmt::Display for KanbanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for KanbanId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for KanbanId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            KanbanId::parse(&s).ok_or_else(|| D::Error::custom("kanban id must be up to 32 hex digits"))
        } else {
            u128::deserialize(d).map(KanbanId)
        }
    }
}

/// Where a kanban came from: the producing service and instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Origin {
    /// Producing microservice (`aion` for kanbans injected through the CLI).
    pub service: String,
    /// Producing instance number (1-based).
    pub instance: u32,
}

/// A kanban: AION's `StatusKanban` fields plus a unique id, a trace id kept along the whole chain, and its origin.
///
/// `M` is the metadata representation: [`Metadata`] (the default, what services see) or [`MetadataBytes`]
/// (encoded, what the runtime carries as [`WireKanban`] without ever decoding the payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kanban<M = Metadata> {
    /// Unique per kanban. Outputs derived from a redelivered input get the same id again (see [`KanbanId::derive`]).
    pub id: KanbanId,
    /// The id of the first kanban of the chain; copied to every output.
    pub trace_id: KanbanId,
    /// The producer, set by the runtime on acceptance.
    pub origin: Origin,
    /// RFC 3339 UTC time the chain (or this kanban, for seeds) started.
    pub start_at: String,
    /// RFC 3339 UTC finish time. AION never set it; kept for compatibility (the archive records finish times).
    pub finish_at: String,
    /// Forces the target device of the outputs (AION `SetDeviceName`).
    pub next_device_name: String,
    /// The routing key into `nextService` (`default` when empty).
    pub connection_key: String,
    /// Instance number: on outputs, the producer's; on delivery, the receiving instance's.
    pub process_number: u32,
    /// Result flag of the producer (AION `priorSuccess`).
    pub prior_success: bool,
    /// A data directory (seed kanbans: `$AION_HOME/Data/<svc>_<n>`).
    pub data_path: String,
    /// Paths of files or directories that travel with the kanban.
    pub file_list: Vec<String>,
    /// Free-form JSON object.
    pub metadata: M,
    /// How many times the runtime has routed this kanban's chain so far (0 for a kanban that starts a chain).
    /// Counted by the runtime, which refuses to route a chain past its hop limit (a routing cycle); it is not on
    /// the wire (services see 0) and is kept beside the kanban in the store.
    #[serde(skip)]
    pub hops: u32,
}

/// The kanban as the runtime carries it: routing fields decoded, metadata left encoded.
pub type WireKanban = Kanban<MetadataBytes>;

/// The largest kanban (its postcard encoding, metadata included) that the runtime accepts: 64 KiB under the
/// 16 MiB frame limit, so that what the runtime adds on the way (the device name stamped on a forwarded copy,
/// the delivery's sequence number, a static topic name) always fits in the frame that delivers it.
pub const MAX_KANBAN_BYTES: usize = (16 << 20) - (64 << 10);

/// A kanban over [`MAX_KANBAN_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("kanban of {size} bytes is too large: the limit is {limit} bytes (metadata, file list and paths included)")]
pub struct TooLarge {
    /// Its encoded size.
    pub size: usize,
    /// [`MAX_KANBAN_BYTES`].
    pub limit: usize,
}

/// Metadata that stays encoded until it is read: what a service receives. Reading (`Deref` to [`Metadata`]:
/// `k.metadata.get("x")`, `k.metadata["x"]`, iteration) decodes it once; changing it (`DerefMut`) drops the
/// encoded form. Forwarding it untouched into an output re-uses the received bytes: no decode, no encode.
///
/// Metadata that cannot be decoded (only a broken or hostile client can send it) reads as an empty object, and
/// the failure is logged.
///
/// # Examples
/// ```
/// use aion_model::kanban::{LazyMetadata, Metadata, MetadataBytes, Value};
/// let mut m = Metadata::new();
/// m.insert("seq".into(), Value::U64(7));
/// let lazy = LazyMetadata::from_bytes(MetadataBytes::encode(&m));
/// assert_eq!(lazy["seq"], Value::U64(7));
/// assert_eq!(lazy.into_bytes(), MetadataBytes::encode(&m)); // the received bytes, not re-encoded
/// ```
#[derive(Default, Clone)]
pub struct LazyMetadata {
    /// The encoded form, while it matches the map (dropped on the first mutable access).
    raw: Option<MetadataBytes>,
    map: std::sync::OnceLock<Metadata>,
}

impl LazyMetadata {
    /// Metadata as received, decoded on first read.
    pub fn from_bytes(bytes: MetadataBytes) -> LazyMetadata {
        LazyMetadata { raw: Some(bytes), map: std::sync::OnceLock::new() }
    }

    /// Already decoded metadata.
    pub fn from_map(map: Metadata) -> LazyMetadata {
        LazyMetadata { raw: None, map: std::sync::OnceLock::from(map) }
    }

    fn decoded(&self) -> &Metadata {
        self.map.get_or_init(|| decode_or_empty(self.raw.as_ref()))
    }

    /// True until the metadata is decoded (it has not been read).
    pub fn is_encoded(&self) -> bool {
        self.map.get().is_none()
    }

    /// The encoded form: the received bytes when the metadata was not changed, else a fresh encoding.
    pub fn into_bytes(self) -> MetadataBytes {
        match (self.raw, self.map.into_inner()) {
            (Some(b), _) => b,
            (None, Some(m)) => MetadataBytes::encode(&m),
            (None, None) => MetadataBytes::default(),
        }
    }

    /// The decoded map.
    pub fn into_map(self) -> Metadata {
        self.decoded();
        self.map.into_inner().unwrap_or_default()
    }
}

impl std::ops::Deref for LazyMetadata {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.decoded()
    }
}

impl std::ops::DerefMut for LazyMetadata {
    fn deref_mut(&mut self) -> &mut Metadata {
        let map = match self.map.take() {
            Some(m) => m,
            None => decode_or_empty(self.raw.as_ref()),
        };
        self.raw = None;
        self.map = std::sync::OnceLock::from(map);
        #[allow(clippy::expect_used)]
        self.map.get_mut().expect("the cell was set on the line above")
    }
}

static UNDECODABLE: AtomicU64 = AtomicU64::new(0);

/// How many received metadata objects could not be decoded in this process (each read as empty, and logged).
pub fn undecodable_metadata() -> u64 {
    UNDECODABLE.load(Ordering::Relaxed)
}

fn decode_or_empty(raw: Option<&MetadataBytes>) -> Metadata {
    match raw {
        Some(b) => b.decode().unwrap_or_else(|e| {
            UNDECODABLE.fetch_add(1, Ordering::Relaxed);
            tracing::error!("kanban metadata cannot be decoded ({} bytes), read as empty: {e}", b.0.len());
            Metadata::new()
        }),
        None => Metadata::new(),
    }
}

impl fmt::Debug for LazyMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.decoded(), f)
    }
}

impl PartialEq for LazyMetadata {
    fn eq(&self, other: &Self) -> bool {
        match (&self.raw, &other.raw) {
            (Some(a), Some(b)) if a == b => true,
            _ => self.decoded() == other.decoded(),
        }
    }
}

impl From<Metadata> for LazyMetadata {
    fn from(m: Metadata) -> Self {
        LazyMetadata::from_map(m)
    }
}

impl IntoIterator for LazyMetadata {
    type Item = (String, Value);
    type IntoIter = std::collections::btree_map::IntoIter<String, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.into_map().into_iter()
    }
}

impl<'a> IntoIterator for &'a LazyMetadata {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.decoded().iter()
    }
}

impl Serialize for LazyMetadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return self.decoded().serialize(s);
        }
        match &self.raw {
            Some(b) => b.serialize(s),
            None => MetadataBytes::encode(self.decoded()).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LazyMetadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(LazyMetadata::from_bytes(MetadataBytes::deserialize(d)?))
    }
}

/// Metadata encoded with postcard, carried opaquely. Serialises as a byte string in binary formats (one copy,
/// no tree of allocations) and as the decoded JSON object in human-readable ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataBytes(pub Vec<u8>);

impl MetadataBytes {
    /// Encodes metadata.
    pub fn encode(m: &Metadata) -> MetadataBytes {
        // Encoding a BTreeMap of our Value into a Vec cannot fail.
        MetadataBytes(postcard::to_stdvec(m).unwrap_or_default())
    }

    /// Decodes the metadata.
    ///
    /// # Errors
    /// When the bytes are not encoded metadata (a hostile or broken client sent them).
    pub fn decode(&self) -> Result<Metadata, postcard::Error> {
        if self.0.is_empty() {
            return Ok(Metadata::new());
        }
        postcard::from_bytes(&self.0)
    }
}

impl Serialize for MetadataBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return match self.decode() {
                Ok(m) => metadata_to_json(&m).serialize(s),
                Err(_) => s.collect_str(&format_args!("<{} undecodable bytes>", self.0.len())),
            };
        }
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for MetadataBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = serde_json::Value::deserialize(d)?;
            return Ok(MetadataBytes::encode(&metadata_from_json(v)));
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MetadataBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("encoded metadata bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<MetadataBytes, E> {
                Ok(MetadataBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<MetadataBytes, E> {
                Ok(MetadataBytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

impl<M> Kanban<M> {
    /// The same kanban with its metadata converted by `f`.
    pub fn map_metadata<N>(self, f: impl FnOnce(M) -> N) -> Kanban<N> {
        Kanban {
            id: self.id,
            trace_id: self.trace_id,
            origin: self.origin,
            start_at: self.start_at,
            finish_at: self.finish_at,
            next_device_name: self.next_device_name,
            connection_key: self.connection_key,
            process_number: self.process_number,
            prior_success: self.prior_success,
            data_path: self.data_path,
            file_list: self.file_list,
            metadata: f(self.metadata),
            hops: self.hops,
        }
    }

    /// The routing key, with AION's empty-means-default rule applied.
    #[inline]
    pub fn route_key(&self) -> &str {
        if self.connection_key.is_empty() {
            "default"
        } else {
            &self.connection_key
        }
    }
}

impl Kanban {
    /// Encodes the metadata for the wire.
    pub fn into_wire(self) -> WireKanban {
        let bytes = MetadataBytes::encode(&self.metadata);
        self.map_metadata(|_| bytes)
    }
}

impl From<Kanban> for Kanban<LazyMetadata> {
    /// A decoded kanban as a service receives one (e.g. to call a handler in a unit test).
    fn from(k: Kanban) -> Self {
        k.map_metadata(LazyMetadata::from_map)
    }
}

impl Kanban<LazyMetadata> {
    /// The wire form: the received metadata bytes when the metadata was not changed, else a fresh encoding.
    pub fn into_wire(self) -> WireKanban {
        self.map_metadata(LazyMetadata::into_bytes)
    }
}

impl WireKanban {
    /// The size of its encoding (what it costs in a frame, in the store and in memory).
    #[inline]
    pub fn encoded_len(&self) -> usize {
        postcard::serialize_with_flavor::<_, _, usize>(self, postcard::ser_flavors::Size::default())
            .unwrap_or(usize::MAX)
    }

    /// The memory it holds, roughly (its variable-size parts plus the fixed part): what queue memory bounds count.
    #[inline]
    pub fn mem_size(&self) -> usize {
        std::mem::size_of::<WireKanban>()
            + self.metadata.0.len()
            + self.file_list.iter().map(|f| f.len() + 24).sum::<usize>()
            + self.origin.service.len()
            + self.start_at.len()
            + self.finish_at.len()
            + self.next_device_name.len()
            + self.connection_key.len()
            + self.data_path.len()
    }

    /// Checks it against [`MAX_KANBAN_BYTES`].
    ///
    /// # Errors
    /// [`TooLarge`] with its size.
    #[inline]
    pub fn check_size(&self) -> Result<(), TooLarge> {
        // Most kanbans are far below the limit: a cheap upper bound avoids walking the encoding.
        let bound = self.metadata.0.len()
            + self.file_list.iter().map(|f| f.len() + 10).sum::<usize>()
            + [&self.origin.service, &self.start_at, &self.finish_at, &self.next_device_name, &self.connection_key]
                .iter()
                .map(|s| s.len() + 10)
                .sum::<usize>()
            + self.data_path.len()
            + 128;
        if bound <= MAX_KANBAN_BYTES {
            return Ok(());
        }
        match self.encoded_len() {
            size if size > MAX_KANBAN_BYTES => Err(TooLarge { size, limit: MAX_KANBAN_BYTES }),
            _ => Ok(()),
        }
    }

    /// Decodes the metadata.
    ///
    /// # Errors
    /// When the metadata bytes are corrupt.
    pub fn into_kanban(self) -> Result<Kanban, postcard::Error> {
        let m = self.metadata.decode()?;
        Ok(self.map_metadata(|_| m))
    }

    /// The kanban as a service receives it: metadata left encoded until read. No decoding, no copy.
    pub fn into_lazy(self) -> Kanban<LazyMetadata> {
        self.map_metadata(LazyMetadata::from_bytes)
    }

    /// A copy as a service receives it (the metadata bytes are copied, not decoded), leaving this kanban as it
    /// is: an in-process session keeps the original for redelivery.
    pub fn to_lazy(&self) -> Kanban<LazyMetadata> {
        Kanban {
            id: self.id,
            trace_id: self.trace_id,
            origin: self.origin.clone(),
            start_at: self.start_at.clone(),
            finish_at: self.finish_at.clone(),
            next_device_name: self.next_device_name.clone(),
            connection_key: self.connection_key.clone(),
            process_number: self.process_number,
            prior_success: self.prior_success,
            data_path: self.data_path.clone(),
            file_list: self.file_list.clone(),
            metadata: LazyMetadata::from_bytes(self.metadata.clone()),
            hops: self.hops,
        }
    }

    /// True for AION's terminate kanban; decodes the metadata only when the connection key says it may be one.
    #[inline]
    pub fn is_terminate(&self) -> bool {
        self.connection_key == TERMINATE_KEY
            && self.metadata.decode().is_ok_and(|m| m.get("type").and_then(Value::as_str) == Some("terminate"))
    }

    /// A string field of the metadata (decodes it).
    pub fn metadata_str(&self, key: &str) -> Option<String> {
        self.metadata.decode().ok()?.get(key).and_then(Value::as_str).map(str::to_owned)
    }
}

impl Default for Kanban {
    fn default() -> Self {
        Kanban {
            id: KanbanId::default(),
            trace_id: KanbanId::default(),
            origin: Origin::default(),
            start_at: String::new(),
            finish_at: String::new(),
            next_device_name: String::new(),
            connection_key: "default".to_owned(),
            process_number: 1,
            prior_success: true,
            data_path: String::new(),
            file_list: Vec::new(),
            metadata: Metadata::new(),
            hops: 0,
        }
    }
}

/// AION's `StatusKanban` in protojson form (lowerCamel names, default values omitted): what AION wrote into its
/// Redis stream entries (field `kanban`) and what its tools read.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct AionJson {
    #[serde(skip_serializing_if = "String::is_empty")]
    start_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    finish_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    next_device_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    connection_key: String,
    #[serde(skip_serializing_if = "is_zero")]
    process_number: i64,
    #[serde(skip_serializing_if = "is_false")]
    prior_success: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    data_path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    file_list: Vec<String>,
    metadata: serde_json::Value,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl WireKanban {
    /// The kanban as AION's protojson `StatusKanban` (only AION's fields; undecodable metadata becomes `{}`).
    pub fn to_aion_json(&self) -> String {
        let metadata = self.metadata.decode().map_or(serde_json::json!({}), |m| metadata_to_json(&m));
        let j = AionJson {
            start_at: self.start_at.clone(),
            finish_at: self.finish_at.clone(),
            next_device_name: self.next_device_name.clone(),
            connection_key: self.connection_key.clone(),
            process_number: i64::from(self.process_number),
            prior_success: self.prior_success,
            data_path: self.data_path.clone(),
            file_list: self.file_list.clone(),
            metadata,
        };
        // Serialising plain strings, numbers and JSON values into a String cannot fail.
        serde_json::to_string(&j).unwrap_or_default()
    }
}

impl Kanban {
    /// Reads a kanban written by AION (protojson `StatusKanban`). Missing fields take protobuf defaults (empty,
    /// 0, false), as AION's readers did; the id, trace id and origin are left for the caller to set.
    ///
    /// # Errors
    /// When `json` is not a JSON object of that shape.
    pub fn from_aion_json(json: &str) -> Result<Kanban, serde_json::Error> {
        let j: AionJson = serde_json::from_str(json)?;
        Ok(Kanban {
            start_at: j.start_at,
            finish_at: j.finish_at,
            next_device_name: j.next_device_name,
            connection_key: j.connection_key,
            process_number: u32::try_from(j.process_number.max(0)).unwrap_or(u32::MAX),
            prior_success: j.prior_success,
            data_path: j.data_path,
            file_list: j.file_list,
            metadata: metadata_from_json(j.metadata),
            ..Kanban::default()
        })
    }
}

/// The reserved connection key of terminate kanbans.
pub const TERMINATE_KEY: &str = "service-broker";

impl Kanban {
    /// True for AION's terminate kanban: connection key `service-broker` and `metadata.type == "terminate"`.
    #[inline]
    pub fn is_terminate(&self) -> bool {
        self.connection_key == TERMINATE_KEY && self.metadata.get("type").and_then(Value::as_str) == Some("terminate")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let mut m = Metadata::new();
        m.insert("seq".into(), Value::U64(7));
        m.insert("text".into(), Value::from("hi"));
        m
    }

    #[test]
    fn lazy_metadata_forwards_the_received_bytes_undecoded() {
        let bytes = MetadataBytes::encode(&sample());
        let lazy = LazyMetadata::from_bytes(bytes.clone());
        assert!(lazy.is_encoded());
        let copy = lazy.clone();
        assert_eq!(copy.into_bytes(), bytes, "untouched: the same bytes");
        assert_eq!(lazy["seq"], Value::U64(7), "reads decode");
        assert!(!lazy.is_encoded());
        assert_eq!(lazy.into_bytes(), bytes, "read but unchanged: still the received bytes");
    }

    #[test]
    fn lazy_metadata_changes_are_encoded() {
        let mut lazy = LazyMetadata::from_bytes(MetadataBytes::encode(&sample()));
        lazy.insert("more".into(), Value::Bool(true));
        let mut want = sample();
        want.insert("more".into(), Value::Bool(true));
        assert_eq!(lazy.clone().into_bytes().decode().ok(), Some(want.clone()));
        assert_eq!(lazy.into_iter().collect::<Metadata>(), want);
        let k: Kanban<LazyMetadata> = Kanban { metadata: sample(), ..Kanban::default() }.into();
        assert_eq!(k.into_wire().metadata.decode().ok(), Some(sample()));
    }

    #[test]
    fn undecodable_metadata_reads_as_empty_and_is_counted() {
        let before = undecodable_metadata();
        let lazy = LazyMetadata::from_bytes(MetadataBytes(vec![0xff, 0xff, 0xff]));
        assert!(lazy.is_empty());
        assert!(undecodable_metadata() > before);
        assert_eq!(lazy.into_bytes(), MetadataBytes(vec![0xff, 0xff, 0xff]), "passed on as received");
    }

    #[test]
    fn lazy_kanbans_cross_the_wire_as_wire_kanbans() {
        let k = Kanban { metadata: sample(), ..Kanban::default() }.into_wire();
        let bytes = postcard::to_stdvec(&k).expect("encodes");
        let lazy: Kanban<LazyMetadata> = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(lazy.metadata["text"], Value::from("hi"));
        assert_eq!(postcard::to_stdvec(&lazy).expect("encodes"), bytes, "same encoding both ways");
        let json = serde_json::to_value(&lazy).expect("json");
        assert_eq!(json["metadata"]["seq"], serde_json::json!(7));
    }
    use proptest::prelude::*;

    #[test]
    fn aion_protojson_round_trips_aion_fields() {
        let mut k = Kanban { connection_key: "key".into(), process_number: 2, ..Kanban::default() };
        k.metadata = metadata_from_json(serde_json::json!({"a": 1, "b": ["x"]}));
        k.file_list = vec!["/f".into()];
        let w = k.clone().into_wire();
        let j = w.to_aion_json();
        assert!(j.contains("\"connectionKey\":\"key\"") && j.contains("\"priorSuccess\":true"), "{j}");
        assert!(!j.contains("startAt"), "defaults omitted: {j}");
        let back = Kanban::from_aion_json(&j).expect("parse");
        assert_eq!(back, k);
        let sparse = Kanban::from_aion_json("{\"metadata\":{}}").expect("sparse");
        assert_eq!((sparse.process_number, sparse.prior_success, sparse.connection_key.as_str()), (0, false, ""));
        assert!(Kanban::from_aion_json("[1]").is_err());
    }

    fn sample_json() -> serde_json::Value {
        serde_json::json!({
            "nested": {"a": [1, -2, 3.5, {"deep": [true, false, null]}], "empty": {}, "arr": []},
            "big": u64::MAX, "neg": i64::MIN, "float": 1.0e-300, "pi": std::f64::consts::PI,
            "unicode": "カンバン 🚀 \u{0}\u{ffff}", "": "empty key"
        })
    }

    #[test]
    fn metadata_round_trips_through_postcard() {
        let json = sample_json();
        let k = Kanban { metadata: metadata_from_json(json.clone()), id: KanbanId::generate(), ..Kanban::default() };
        let bytes = postcard::to_stdvec(&k).expect("encode");
        let back: Kanban = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, k);
        assert_eq!(metadata_to_json(&back.metadata), json);
    }

    #[test]
    fn kanban_json_is_plain_json() {
        let k = Kanban { metadata: metadata_from_json(sample_json()), id: KanbanId(0xab), ..Kanban::default() };
        let s = serde_json::to_value(&k).expect("json");
        assert_eq!(s["id"], "000000000000000000000000000000ab");
        assert_eq!(s["metadata"], sample_json());
        let back: Kanban = serde_json::from_value(s).expect("back");
        assert_eq!(back, k);
    }

    #[test]
    fn wire_kanban_carries_metadata_opaquely() {
        let k = Kanban { metadata: metadata_from_json(sample_json()), id: KanbanId::generate(), ..Kanban::default() };
        let wire = k.clone().into_wire();
        let bytes = postcard::to_stdvec(&wire).expect("encode");
        let back: WireKanban = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back.clone().into_kanban().expect("metadata"), k);
        assert_eq!(serde_json::to_value(&back).expect("json")["metadata"], sample_json());
        let mut t = Kanban { connection_key: TERMINATE_KEY.into(), ..Kanban::default() };
        t.metadata.insert("type".into(), "terminate".into());
        assert!(t.into_wire().is_terminate());
        let bad = Kanban::default().into_wire().map_metadata(|_| MetadataBytes(vec![0xff, 0xff]));
        assert!(bad.clone().into_kanban().is_err());
        assert!(!bad.is_terminate());
    }

    #[test]
    fn derived_ids_are_deterministic_and_distinct() {
        let p = KanbanId::generate();
        assert_eq!(KanbanId::derive(p, 0), KanbanId::derive(p, 0));
        assert_ne!(KanbanId::derive(p, 0), KanbanId::derive(p, 1));
        assert_ne!(KanbanId::derive(p, 0), p);
    }

    #[test]
    fn producer_ids_differ_between_producers_and_are_stable_for_one() {
        let parent = KanbanId::generate();
        let proposal = KanbanId::derive(parent, 0);
        let (b, c) = (KanbanId::producer_key("b", 1), KanbanId::producer_key("c", 1));
        assert_ne!(b, c);
        assert_ne!(KanbanId::producer_key("b", 1), KanbanId::producer_key("b", 2));
        assert_ne!(proposal.of_producer(b), proposal.of_producer(c), "two branches, two ids");
        assert_eq!(proposal.of_producer(b), proposal.of_producer(b), "a resend keeps its id");
        assert_ne!(proposal.copy(1), proposal);
        assert_ne!(proposal.copy(1), proposal.copy(2));
    }

    #[test]
    fn size_check_is_exact_at_the_limit() {
        let mut k = Kanban::default().into_wire();
        let base = k.encoded_len();
        // Metadata bytes are length-prefixed: find the payload that lands exactly on the limit.
        let mut n = MAX_KANBAN_BYTES - base - 3;
        k.metadata = MetadataBytes(vec![0; n]);
        while k.encoded_len() < MAX_KANBAN_BYTES {
            n += 1;
            k.metadata = MetadataBytes(vec![0; n]);
        }
        assert_eq!(k.encoded_len(), MAX_KANBAN_BYTES);
        assert_eq!(k.check_size(), Ok(()));
        k.metadata.0.push(0);
        assert_eq!(k.check_size(), Err(TooLarge { size: MAX_KANBAN_BYTES + 1, limit: MAX_KANBAN_BYTES }));
        assert_eq!(postcard::to_stdvec(&k).map(|v| v.len()).ok(), Some(MAX_KANBAN_BYTES + 1));
    }

    #[test]
    fn terminate_detection() {
        let mut k = Kanban { connection_key: TERMINATE_KEY.into(), ..Kanban::default() };
        assert!(!k.is_terminate());
        k.metadata.insert("type".into(), "terminate".into());
        assert!(k.is_terminate());
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::U64),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::F64),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..8).prop_map(Value::Object),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_round_trips_postcard(v in arb_value()) {
            let bytes = postcard::to_stdvec(&v).expect("encode");
            let back: Value = postcard::from_bytes(&bytes).expect("decode");
            prop_assert_eq!(back, v);
        }

        #[test]
        fn of_producer_is_a_bijection_for_one_producer(a in any::<u128>(), b in any::<u128>(), k in any::<u128>()) {
            prop_assume!(a != b);
            prop_assert_ne!(KanbanId(a).of_producer(k), KanbanId(b).of_producer(k));
        }

        #[test]
        fn postcard_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<Kanban>(&bytes);
        }
    }
}
