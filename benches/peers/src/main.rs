//! The comparison suite (issue "performance suite"): one 3-stage pipeline `source > transform > sink`, each stage
//! a separate OS process, run on aion and on the systems AION users would otherwise use, in one run on one
//! machine. Run it with `benches/compare.sh` (builds in release mode, checks the servers, writes the results).
//!
//! Systems (`--only` takes these names):
//! - `aion-memory`, `aion-durable`: our runtime (embedded in this coordinator process, as `aion run` would run
//!   it) with three SDK processes, `delivery: memory` / `durable` (SQLite group commit, fsync per commit);
//! - `aion-inprocess`: the same three stages as in-process services of one runtime (not separate processes);
//! - `redis-aion`: AION's own path re-created on a real `redis-server`: the source `XADD`s to
//!   `kanban:after:source:001`, a router process (AION's service broker) `XREAD`s the after streams and `XADD`s to
//!   `kanban:before:<next>:001`, each service `XREAD`s its before stream one entry at a time and deletes the
//!   previous one (AION's kanban-server). AION's gRPC hop between kanban-server and the service is left out,
//!   which only flatters this peer;
//! - `rabbitmq`: `rabbitmq-server`, one durable queue per stage, persistent messages, publisher confirms (a
//!   window of outstanding confirms) and consumer acks after the next publish is confirmed, prefetch 1000;
//! - `nats-core`: `nats-server`, plain subjects (at-most-once: a slow consumer loses messages, reported);
//! - `nats-jetstream`: file-backed streams, acknowledged publishes (windowed), durable pull consumers, explicit
//!   acks;
//! - `zenoh`: the zenoh crate in peer mode over loopback TCP, reliable, `CongestionControl::Block`;
//! - `aion-grpc-py`: AION's Python microservices on aion's gRPC API (`benches/grpc_py.py`): a Python client
//!   sending `SendKanban` as AION's library does (one unary call per output) to `aion run`, each output routed to
//!   a Python sink on `ReceiveKanban`; closed loop, and hop latency at 500/s; the note carries the ratio to the
//!   same client against a trivial tonic server that only answers (the client's own ceiling);
//! - `x-aion-memory`, `x-aion-durable`, `x-zenoh`, `x-nats-core`, `x-nats-jetstream`: across devices, one hop
//!   from a source on one host to a sink on another (two network namespaces as root, else loopback): aion's
//!   cluster mode over QUIC, Zenoh peers, NATS with its server on the sink's host (`cross.rs`).
//!
//! Each system runs closed-loop (as fast as it accepts; sustained throughput) and open-loop (a fixed rate;
//! latency measured from each message's intended send time, so queueing behind a stall is counted: coordinated
//! omission aware), for small messages (100-byte payload) and 64 KiB ones. Latency is end to end over the two
//! hops; the hop figure is half of it.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cross;

use aion::actors::{InProcessRegistry, Node, NodeOptions};
use aion::runtime::config::load_str;
use aion::sdk::{Ctx, Error, Kanban, Output, Service, Value};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn hist() -> Histogram<u64> {
    // 1 ns .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// What a stage process needs, passed in the environment.
#[derive(Clone, Debug)]
struct Job {
    sys: String,
    url: String,
    n: u64,
    size: usize,
    /// Messages per second; 0 = closed loop.
    rate: u64,
    result: PathBuf,
    /// Unique per run: queue, subject and stream names.
    key: String,
    /// Hops from source to sink: 2 (source > transform > sink) or 1 (source > sink, the cross-device runs).
    hops: u8,
    /// The sink's host address (Zenoh's endpoints; loopback but in the cross-device runs).
    sink_host: String,
    /// A file whose appearance starts the aion source (the cross-device runs: once the link is up).
    go: Option<PathBuf>,
}

impl Job {
    fn from_env() -> Option<Job> {
        let v = |k: &str| std::env::var(k).ok();
        Some(Job {
            sys: v("PEER_SYS")?,
            url: v("PEER_URL").unwrap_or_default(),
            n: v("PEER_N")?.parse().ok()?,
            size: v("PEER_SIZE")?.parse().ok()?,
            rate: v("PEER_RATE")?.parse().ok()?,
            result: v("PEER_RESULT")?.into(),
            key: v("PEER_KEY")?,
            hops: v("PEER_HOPS").and_then(|h| h.parse().ok()).unwrap_or(2),
            sink_host: v("PEER_SINK_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            go: v("PEER_GO").filter(|g| !g.is_empty()).map(PathBuf::from),
        })
    }

    fn env(&self, role: &str) -> Vec<(String, String)> {
        vec![
            ("PEER_ROLE".into(), role.into()),
            ("PEER_SYS".into(), self.sys.clone()),
            ("PEER_URL".into(), self.url.clone()),
            ("PEER_N".into(), self.n.to_string()),
            ("PEER_SIZE".into(), self.size.to_string()),
            ("PEER_RATE".into(), self.rate.to_string()),
            ("PEER_RESULT".into(), self.result.display().to_string()),
            ("PEER_KEY".into(), self.key.clone()),
            ("PEER_HOPS".into(), self.hops.to_string()),
            ("PEER_SINK_HOST".into(), self.sink_host.clone()),
            ("PEER_GO".into(), self.go.as_ref().map(|g| g.display().to_string()).unwrap_or_default()),
        ]
    }
}

// ---------------------------------------------------------------- messages and pacing

/// A message: sequence number, intended send time (ns), then padding up to `size` bytes.
fn encode(seq: u64, t: u64, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size.max(16));
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&t.to_le_bytes());
    b.resize(size.max(16), b'x');
    b
}

fn decode(b: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
    let t = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    Some((seq, t))
}

/// Paces the source: closed loop returns `now`; open loop waits for the i-th intended time and returns it (so
/// the latency of a message delayed by a stall includes the stall).
struct Pacer {
    start: u64,
    start_i: Instant,
    rate: u64,
    last_wake: std::sync::atomic::AtomicU64,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            start: now_ns() + 20_000_000,
            start_i: Instant::now() + Duration::from_millis(20),
            rate,
            last_wake: std::sync::atomic::AtomicU64::new(0),
        }
    }
    /// The send time to stamp on message `i`. Open loop: when the source is behind schedule (the previous
    /// sends were held up by the system under test), the intended time, so that wait counts; when it is ahead, it
    /// sleeps and returns the time it woke (the timer's ~1 ms granularity is the harness's, not the system's).
    async fn next(&self, i: u64) -> u64 {
        if self.rate == 0 {
            return now_ns();
        }
        let offset = i * 1_000_000_000 / self.rate;
        let at = self.start_i + Duration::from_nanos(offset);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
            let woke = now_ns();
            self.last_wake.store(woke, std::sync::atomic::Ordering::Relaxed);
            return woke;
        }
        // Behind: messages due while the timer slept go out now, stamped no earlier than the wake-up; anything
        // later than that was held up by the sends themselves and counts.
        (self.start + offset).max(self.last_wake.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The sink's bookkeeping; writes the result file when `n` messages arrived (or when it gives up).
struct Recorder {
    job: Job,
    h: Histogram<u64>,
    seen: u64,
    first_t: u64,
    last_recv: u64,
    done: bool,
}

#[derive(Serialize, serde::Deserialize, Default, Clone, Debug)]
struct SinkResult {
    received: u64,
    expected: u64,
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    max_ns: u64,
    throughput: f64,
}

impl Recorder {
    fn new(job: Job) -> Recorder {
        Recorder { job, h: hist(), seen: 0, first_t: 0, last_recv: 0, done: false }
    }

    /// Records one message; true when all arrived.
    fn record(&mut self, b: &[u8]) -> bool {
        let Some((_seq, t)) = decode(b) else { return false };
        self.record_sent_at(t)
    }

    /// Records a message stamped with send time `t` (ns); true when all arrived.
    fn record_sent_at(&mut self, t: u64) -> bool {
        let now = now_ns();
        if self.seen == 0 {
            self.first_t = t;
        }
        self.seen += 1;
        self.last_recv = now;
        let _ = self.h.record(now.saturating_sub(t).max(1));
        if self.seen >= self.job.n {
            self.finish();
            return true;
        }
        false
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // Up to the last message received (a lossy system's sink gives up only after an idle period).
        let secs = self.last_recv.saturating_sub(self.first_t) as f64 / 1e9;
        let r = SinkResult {
            received: self.seen,
            expected: self.job.n,
            p50_ns: self.h.value_at_quantile(0.5),
            p99_ns: self.h.value_at_quantile(0.99),
            p999_ns: self.h.value_at_quantile(0.999),
            max_ns: self.h.max(),
            throughput: self.seen as f64 / secs.max(1e-9),
        };
        let tmp = self.job.result.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_string(&r).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.job.result);
        }
    }
}

/// How long a sink waits for the next message before reporting what it got (lossy systems).
const IDLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- aion (our runtime)

fn md_u64(k: &Kanban, key: &str) -> u64 {
    match k.metadata.get(key) {
        Some(Value::U64(v)) => *v,
        Some(v) => v.as_f64().unwrap_or(0.0) as u64,
        None => 0,
    }
}

struct AionSource(Job);
impl Service for AionSource {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        let pad = "x".repeat(self.0.size.saturating_sub(16));
        if let Some(go) = &self.0.go {
            while !go.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let pacer = Pacer::new(self.0.rate);
        for i in 0..self.0.n {
            let t = pacer.next(i).await;
            ctx.emit(Output::new().meta("seq", i).meta("t", t).meta("pad", pad.as_str())).await?;
        }
        Ok(())
    }
    async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
        Ok(())
    }
}

struct AionForward;
impl Service for AionForward {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        // Forwarded as received: the metadata is never decoded here.
        ctx.emit(Output::new().with_metadata(k.metadata)).await
    }
}

struct AionSink(Recorder);
impl Service for AionSink {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        if self.0.record_sent_at(md_u64(&k, "t")) {
            ctx.stop();
        }
        Ok(())
    }
}

fn aion_role(role: &str, job: Job) -> std::process::ExitCode {
    let opts = aion::sdk::Options { window: 1024, output_window: 4096, ..Default::default() };
    match role {
        "source" => aion::sdk::main_with(AionSource(job), opts),
        "transform" => aion::sdk::main_with(AionForward, opts),
        "sink" => aion::sdk::main_with(AionSink(Recorder::new(job)), opts),
        _ => std::process::ExitCode::FAILURE,
    }
}

fn aion_yaml(cmd: &str, delivery: &str, job: &Job) -> String {
    let env = |role: &str| job.env(role).iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "microservices:\n  source:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ {} }}\n    nextService: {{ default: [ {{ name: transform }} ] }}\n  transform:\n    command: {cmd}\n    always: yes\n    delivery: {delivery}\n    env: {{ {} }}\n    nextService: {{ default: [ {{ name: sink }} ] }}\n  sink:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ {} }}\n",
        env("source"),
        env("transform"),
        env("sink")
    )
}

async fn aion_node(yaml: &str, reg: InProcessRegistry) -> Res<Node> {
    let cfg = load_str("compare.yml", yaml).config.ok_or("bench config does not load")?;
    let dir = tempfile::tempdir()?.keep();
    let mut opts = NodeOptions::new(dir, cfg);
    opts.inproc = reg;
    opts.queue_capacity = 4096;
    Ok(Node::start(opts).await?)
}

// ---------------------------------------------------------------- redis: AION's original path

async fn redis_conn(url: &str) -> Res<redis::aio::MultiplexedConnection> {
    // No response timeout: the services block in XREAD as AION's did.
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&cfg).await?)
}

fn stream_entries(v: &redis::Value) -> Vec<(String, String, Vec<u8>)> {
    // XREAD reply: [[key, [[id, [field, value]], …]], …] (RESP2) or a map (RESP3).
    use redis::Value as V;
    let mut out = Vec::new();
    let streams: Vec<(V, V)> = match v {
        V::Array(a) => a
            .iter()
            .filter_map(|s| match s {
                V::Array(kv) if kv.len() == 2 => Some((kv[0].clone(), kv[1].clone())),
                _ => None,
            })
            .collect(),
        V::Map(m) => m.clone(),
        _ => Vec::new(),
    };
    for (key, entries) in streams {
        let key = match key {
            V::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            _ => continue,
        };
        if let V::Array(es) = entries {
            for e in es {
                if let V::Array(parts) = e {
                    if let (Some(V::BulkString(id)), Some(V::Array(fv))) = (parts.first(), parts.get(1)) {
                        if let Some(V::BulkString(val)) = fv.get(1) {
                            out.push((key.clone(), String::from_utf8_lossy(id).into_owned(), val.clone()));
                        }
                    }
                }
            }
        }
    }
    out
}

async fn redis_role(role: &str, job: &Job) -> Res<()> {
    let mut c = redis_conn(&job.url).await?;
    match role {
        "source" => {
            let pacer = Pacer::new(job.rate);
            for i in 0..job.n {
                let t = pacer.next(i).await;
                // kanban-server SendKanban: XADD to the after stream.
                let _: String = redis::cmd("XADD")
                    .arg("kanban:after:source:001")
                    .arg("*")
                    .arg("kanban")
                    .arg(encode(i, t, job.size))
                    .query_async(&mut c)
                    .await?;
            }
            Ok(())
        }
        "router" => {
            // The service broker: one watcher per after stream, routing to the next service's before stream.
            let mut last = ["0".to_owned(), "0".to_owned()];
            loop {
                let v: redis::Value = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(0)
                    .arg("COUNT")
                    .arg(1)
                    .arg("STREAMS")
                    .arg("kanban:after:source:001")
                    .arg("kanban:after:transform:001")
                    .arg(&last[0])
                    .arg(&last[1])
                    .query_async(&mut c)
                    .await?;
                for (key, id, val) in stream_entries(&v) {
                    let (idx, next) = if key.contains(":source:") {
                        (0, "kanban:before:transform:001")
                    } else {
                        (1, "kanban:before:sink:001")
                    };
                    let _: String =
                        redis::cmd("XADD").arg(next).arg("*").arg("kanban").arg(val).query_async(&mut c).await?;
                    last[idx] = id;
                }
            }
        }
        "transform" | "sink" => {
            let key = format!("kanban:before:{role}:001");
            let mut rec = (role == "sink").then(|| Recorder::new(job.clone()));
            let mut last = "0".to_owned();
            let mut prev: Option<String> = None;
            loop {
                // kanban-server WatchKanban: XREAD COUNT 1 from the last id, deleting the previous entry.
                let block = if rec.as_ref().is_some_and(|r| r.seen > 0) { IDLE.as_millis() as u64 } else { 0 };
                let v: redis::Value = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(block)
                    .arg("COUNT")
                    .arg(1)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut c)
                    .await?;
                let entries = stream_entries(&v);
                if entries.is_empty() {
                    if let Some(r) = rec.as_mut() {
                        r.finish();
                        return Ok(());
                    }
                    continue;
                }
                for (_, id, val) in entries {
                    if let Some(p) = prev.take() {
                        let _: i64 = redis::cmd("XDEL").arg(&key).arg(p).query_async(&mut c).await?;
                    }
                    prev = Some(id.clone());
                    last = id;
                    match rec.as_mut() {
                        Some(r) => {
                            if r.record(&val) {
                                return Ok(());
                            }
                        }
                        None => {
                            let _: String = redis::cmd("XADD")
                                .arg("kanban:after:transform:001")
                                .arg("*")
                                .arg("kanban")
                                .arg(val)
                                .query_async(&mut c)
                                .await?;
                        }
                    }
                }
            }
        }
        _ => Err("unknown role".into()),
    }
}

// ---------------------------------------------------------------- RabbitMQ

async fn amqp_channel(url: &str) -> Res<(lapin::Connection, lapin::Channel)> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let conn = lapin::Connection::connect(url, props).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
    for q in ["stage1", "stage2"] {
        ch.queue_declare(
            q,
            lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await?;
    }
    ch.basic_qos(1000, lapin::options::BasicQosOptions::default()).await?;
    Ok((conn, ch))
}

/// Publisher-confirm window: at most this many publishes awaiting their confirm.
const CONFIRM_WINDOW: usize = 1000;

/// The publisher side of RabbitMQ confirms and JetStream publish acks: at most [`CONFIRM_WINDOW`] outstanding.
struct Window<C>(std::collections::VecDeque<C>);

impl<C> Default for Window<C> {
    fn default() -> Self {
        Window(std::collections::VecDeque::new())
    }
}

impl<C, T, E> Window<C>
where
    C: std::future::IntoFuture<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    /// Adds a pending confirmation; waits for the oldest when the window is full.
    async fn push(&mut self, confirm: C) -> Res<()> {
        self.0.push_back(confirm);
        if self.0.len() >= CONFIRM_WINDOW {
            if let Some(c) = self.0.pop_front() {
                c.await.map_err(Into::into)?;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirmation.
    async fn drain(self) -> Res<()> {
        for c in self.0 {
            c.await.map_err(Into::into)?;
        }
        Ok(())
    }
}

async fn amqp_publish(ch: &lapin::Channel, q: &str, body: &[u8]) -> Res<lapin::publisher_confirm::PublisherConfirm> {
    Ok(ch
        .basic_publish(
            "",
            q,
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await?)
}

async fn rabbit_role(role: &str, job: &Job) -> Res<()> {
    let (_conn, ch) = amqp_channel(&job.url).await?;
    match role {
        "source" => {
            let pacer = Pacer::new(job.rate);
            let mut window = Window::default();
            for i in 0..job.n {
                let t = pacer.next(i).await;
                window.push(amqp_publish(&ch, "stage1", &encode(i, t, job.size)).await?).await?;
            }
            window.drain().await?;
        }
        "transform" | "sink" => {
            let q = if role == "transform" { "stage1" } else { "stage2" };
            let mut consumer = ch
                .basic_consume(
                    q,
                    role,
                    lapin::options::BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let mut rec = (role == "sink").then(|| Recorder::new(job.clone()));
            loop {
                let wait = if rec.as_ref().is_some_and(|r| r.seen > 0) { IDLE } else { Duration::from_secs(600) };
                let next = match tokio::time::timeout(wait, consumer.next()).await {
                    Ok(Some(d)) => d?,
                    _ => break,
                };
                match rec.as_mut() {
                    Some(r) => {
                        next.ack(lapin::options::BasicAckOptions::default()).await?;
                        if r.record(&next.data) {
                            return Ok(());
                        }
                    }
                    None => {
                        // Ack the input once its output is confirmed, without holding up the next input: the
                        // prefetch (1000) bounds what is in flight.
                        let confirm = amqp_publish(&ch, "stage2", &next.data).await?;
                        let (ch2, tag) = (ch.clone(), next.delivery_tag);
                        tokio::spawn(async move {
                            if confirm.await.is_ok() {
                                let _ = ch2.basic_ack(tag, lapin::options::BasicAckOptions::default()).await;
                            }
                        });
                    }
                }
            }
            if let Some(r) = rec.as_mut() {
                r.finish();
            }
        }
        _ => return Err("unknown role".into()),
    }
    Ok(())
}

// ---------------------------------------------------------------- NATS

async fn nats_role(role: &str, job: &Job, jetstream: bool) -> Res<()> {
    let client = async_nats::connect(&job.url).await?;
    let s1 = format!("{}.s1", job.key);
    let s2 = format!("{}.s2", job.key);
    // One hop (cross-device runs): the source publishes straight to the sink's subject.
    let first = if job.hops == 1 { s2.clone() } else { s1.clone() };
    if !jetstream {
        match role {
            "source" => {
                let pacer = Pacer::new(job.rate);
                for i in 0..job.n {
                    let t = pacer.next(i).await;
                    client.publish(first.clone(), encode(i, t, job.size).into()).await?;
                }
                client.flush().await?;
            }
            "transform" => {
                let mut sub = client.subscribe(s1).await?;
                while let Some(m) = sub.next().await {
                    client.publish(s2.clone(), m.payload).await?;
                }
            }
            "sink" => {
                let mut sub = client.subscribe(s2).await?;
                let mut rec = Recorder::new(job.clone());
                loop {
                    let wait = if rec.seen > 0 { IDLE } else { Duration::from_secs(600) };
                    match tokio::time::timeout(wait, sub.next()).await {
                        Ok(Some(m)) => {
                            if rec.record(&m.payload) {
                                return Ok(());
                            }
                        }
                        _ => break,
                    }
                }
                rec.finish();
            }
            _ => return Err("unknown role".into()),
        }
        return Ok(());
    }
    let js = async_nats::jetstream::new(client);
    for (name, subj) in [("S1", &s1), ("S2", &s2)] {
        let cfg = async_nats::jetstream::stream::Config {
            name: format!("{}{name}", job.key.replace('.', "_")),
            subjects: vec![subj.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        // Two stages may create the same stream at once; the loser sees "subjects overlap" and looks again.
        let mut attempt = 0;
        while let Err(e) = js.get_or_create_stream(cfg.clone()).await {
            attempt += 1;
            if attempt > 20 {
                return Err(e.into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let consumer = |stream: &str, name: &str| {
        let (js, stream, name) = (js.clone(), format!("{}{stream}", job.key.replace('.', "_")), name.to_owned());
        async move {
            let s = js.get_stream(stream).await?;
            let c: async_nats::jetstream::consumer::PullConsumer = s
                .get_or_create_consumer(
                    &name,
                    async_nats::jetstream::consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                )
                .await?;
            Ok::<_, BoxError>(c)
        }
    };
    match role {
        "source" => {
            let pacer = Pacer::new(job.rate);
            let mut window = Window::default();
            for i in 0..job.n {
                let t = pacer.next(i).await;
                window.push(js.publish(first.clone(), encode(i, t, job.size).into()).await?).await?;
            }
            window.drain().await?;
        }
        "transform" => {
            let c = consumer("S1", "transform").await?;
            let mut msgs = c.messages().await?;
            let mut pending: std::collections::VecDeque<(
                async_nats::jetstream::context::PublishAckFuture,
                async_nats::jetstream::Message,
            )> = Default::default();
            loop {
                // Settle (publish acks awaited, then input acks) when no input is ready or the window is full.
                let next = if pending.is_empty() {
                    msgs.next().await
                } else {
                    match tokio::time::timeout(Duration::from_micros(200), msgs.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            while let Some((a, m)) = pending.pop_front() {
                                a.await?;
                                m.ack().await?;
                            }
                            continue;
                        }
                    }
                };
                let Some(m) = next else { break };
                let m = m?;
                let ack = js.publish(s2.clone(), m.payload.clone()).await?;
                pending.push_back((ack, m));
                if pending.len() >= CONFIRM_WINDOW / 2 {
                    if let Some((a, m)) = pending.pop_front() {
                        a.await?;
                        m.ack().await?;
                    }
                }
            }
        }
        "sink" => {
            let c = consumer("S2", "sink").await?;
            let mut msgs = c.messages().await?;
            let mut rec = Recorder::new(job.clone());
            loop {
                let wait = if rec.seen > 0 { IDLE } else { Duration::from_secs(600) };
                match tokio::time::timeout(wait, msgs.next()).await {
                    Ok(Some(m)) => {
                        let m = m?;
                        m.ack().await?;
                        if rec.record(&m.payload) {
                            return Ok(());
                        }
                    }
                    _ => break,
                }
            }
            rec.finish();
        }
        _ => return Err("unknown role".into()),
    }
    Ok(())
}

// ---------------------------------------------------------------- Zenoh

async fn zenoh_role(role: &str, job: &Job) -> Res<()> {
    // Peer mode over TCP: sink listens on port P+2 (on its host), transform on P+1 (and connects to the sink), the
    // source connects to the transform (one hop: to the sink). No router, no multicast scouting.
    let base: u16 = job.url.parse()?;
    let (listen, connect): (Option<u16>, Vec<u16>) = match role {
        "sink" => (Some(base + 2), vec![]),
        "transform" => (Some(base + 1), vec![base + 2]),
        _ if job.hops == 1 => (None, vec![base + 2]),
        _ => (None, vec![base + 1]),
    };
    let host = |p: u16| if p == base + 2 { job.sink_host.clone() } else { "127.0.0.1".to_owned() };
    let mut config = zenoh::Config::default();
    config.insert_json5("mode", r#""peer""#)?;
    config.insert_json5("scouting/multicast/enabled", "false")?;
    if let Some(p) = listen {
        config.insert_json5("listen/endpoints", &format!(r#"["tcp/{}:{p}"]"#, host(p)))?;
    }
    let eps: Vec<String> = connect.iter().map(|p| format!("\"tcp/{}:{p}\"", host(*p))).collect();
    config.insert_json5("connect/endpoints", &format!("[{}]", eps.join(",")))?;
    let session = zenoh::open(config).await?;
    let k1 = format!("aion/bench/{}/s1", job.key);
    let k2 = format!("aion/bench/{}/s2", job.key);
    let first = if job.hops == 1 { k2.clone() } else { k1.clone() };
    match role {
        "source" => {
            let publisher =
                session.declare_publisher(first).congestion_control(zenoh::qos::CongestionControl::Block).await?;
            // Wait until the transform's subscription is known, or the first puts go nowhere.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let pacer = Pacer::new(job.rate);
            for i in 0..job.n {
                let t = pacer.next(i).await;
                publisher.put(encode(i, t, job.size)).await?;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        "transform" => {
            let publisher =
                session.declare_publisher(k2).congestion_control(zenoh::qos::CongestionControl::Block).await?;
            let sub = session.declare_subscriber(k1).await?;
            while let Ok(s) = sub.recv_async().await {
                publisher.put(s.payload().to_bytes().into_owned()).await?;
            }
        }
        "sink" => {
            let sub = session.declare_subscriber(k2).await?;
            let mut rec = Recorder::new(job.clone());
            loop {
                let wait = if rec.seen > 0 { IDLE } else { Duration::from_secs(600) };
                match tokio::time::timeout(wait, sub.recv_async()).await {
                    Ok(Ok(s)) => {
                        if rec.record(&s.payload().to_bytes()) {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            rec.finish();
        }
        _ => return Err("unknown role".into()),
    }
    Ok(())
}

// ---------------------------------------------------------------- stage processes

fn role_main(role: &str) -> std::process::ExitCode {
    let Some(job) = Job::from_env() else {
        eprintln!("aion-peers: PEER_* environment incomplete");
        return std::process::ExitCode::FAILURE;
    };
    if job.sys.starts_with("aion") {
        return aion_role(role, job);
    }
    // Zenoh requires the multi-thread scheduler (its docs: one worker thread suffices).
    let rt = if job.sys == "zenoh" {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aion-peers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match job.sys.as_str() {
            "redis-aion" => redis_role(role, &job).await,
            "rabbitmq" => rabbit_role(role, &job).await,
            "nats-core" => nats_role(role, &job, false).await,
            "nats-jetstream" => nats_role(role, &job, true).await,
            "zenoh" => zenoh_role(role, &job).await,
            other => Err(format!("unknown system {other}").into()),
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aion-peers {} {role}: {e}", job.sys);
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- servers

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, limit: Duration) -> Res<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listening on {port} after {limit:?}").into())
}

/// A peer server process, killed on drop.
struct Server {
    child: Option<Child>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The whole process group: rabbitmq-server is a script that leaves its Erlang VM behind otherwise.
            let _ = Command::new("kill").arg("-KILL").arg(format!("-{}", c.id())).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_server(sys: &str) -> Res<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let (child, url) = match sys {
        "redis-aion" => {
            // AION's Redis: default persistence (RDB snapshots, no append-only file).
            let c = Command::new("redis-server")
                .process_group(0)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()?;
            (Some(c), format!("redis://127.0.0.1:{port}"))
        }
        "rabbitmq" => {
            let dist = free_port()?;
            let c = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
                .process_group(0)
                // Erlang writes its crash dumps (MnesiaCore.*) to the working directory when the node is killed.
                .current_dir(dir.path())
                .env("HOME", dir.path())
                .env("RABBITMQ_NODENAME", format!("bench{port}@localhost"))
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_DIST_PORT", dist.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.path().join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.path().join("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.path().join("plugins"))
                .env("RABBITMQ_CONFIG_FILE", dir.path().join("rabbitmq"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            (Some(c), format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        }
        "nats-core" | "nats-jetstream" => {
            let c = Command::new("nats-server")
                .process_group(0)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            (Some(c), format!("nats://127.0.0.1:{port}"))
        }
        // Zenoh peers need no server: the URL is the base port of the three peers.
        "zenoh" => {
            let base = loop {
                let p = free_port()?;
                if p < 65_000 && [p + 1, p + 2].iter().all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok()) {
                    break p;
                }
            };
            return Ok(Server { child: None, url: base.to_string(), _dir: dir });
        }
        _ => return Ok(Server { child: None, url: String::new(), _dir: dir }),
    };
    let server = Server { child, url, _dir: dir };
    wait_port(port, Duration::from_secs(60))?;
    Ok(server)
}

// ---------------------------------------------------------------- coordinator

#[derive(Serialize, Clone, Debug)]
struct Row {
    system: String,
    size: usize,
    mode: String,
    rate: u64,
    received: u64,
    expected: u64,
    throughput: f64,
    e2e_p50_us: f64,
    e2e_p99_us: f64,
    e2e_p999_us: f64,
    hop_p50_us: f64,
    hop_p99_us: f64,
    note: String,
}

async fn wait_result(path: &Path, limit: Duration, procs: &mut [Child]) -> Res<SinkResult> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(r) = serde_json::from_str(&s) {
                return Ok(r);
            }
        }
        for p in procs.iter_mut() {
            if let Ok(Some(st)) = p.try_wait() {
                if !st.success() {
                    return Err(format!("a stage exited with {st}").into());
                }
            }
        }
        if start.elapsed() > limit {
            return Err("timed out".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One run of the pipeline on `sys`; returns the sink's result.
async fn run_once(sys: &str, server: &Server, size: usize, n: u64, rate: u64, run: usize) -> Res<SinkResult> {
    let me = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let job = Job {
        sys: sys.into(),
        url: server.url.clone(),
        n,
        size,
        rate,
        result: dir.path().join("result.json"),
        key: format!("b{}r{run}", std::process::id()),
        hops: 2,
        sink_host: "127.0.0.1".into(),
        go: None,
    };
    let limit = Duration::from_secs(300);
    if sys.starts_with("aion") {
        let (yaml, reg) = if sys == "aion-inprocess" {
            let mut reg = InProcessRegistry::default();
            let (j1, j2) = (job.clone(), job.clone());
            reg.register("source", move || AionSource(j1.clone()));
            reg.register("transform", || AionForward);
            reg.register("sink", move || AionSink(Recorder::new(j2.clone())));
            (aion_yaml("[]", "memory", &job), reg)
        } else {
            let delivery = if sys == "aion-durable" { "durable" } else { "memory" };
            (aion_yaml(&format!("[\"{}\"]", me.display()), delivery, &job), InProcessRegistry::default())
        };
        let node = aion_node(&yaml, reg).await?;
        let r = wait_result(&job.result, limit, &mut []).await;
        let _ = node.shutdown().await;
        return r;
    }
    if sys == "redis-aion" {
        // AION's key names are fixed: start every run on an empty database of the bench's own server.
        let mut c = redis_conn(&server.url).await?;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await?;
    }
    let mut roles = vec!["sink", "transform"];
    if sys == "redis-aion" {
        roles.push("router");
    }
    let mut procs = Vec::new();
    for role in &roles {
        procs.push(Command::new(&me).envs(job.env(role)).stdout(Stdio::null()).spawn()?);
    }
    // Consumers first (queues, streams and subscriptions exist before the source starts).
    tokio::time::sleep(Duration::from_millis(if sys == "zenoh" { 300 } else { 500 })).await;
    procs.push(Command::new(&me).envs(job.env("source")).stdout(Stdio::null()).spawn()?);
    let r = wait_result(&job.result, limit, &mut procs).await;
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    r
}

fn row(sys: &str, size: usize, rate: u64, r: &SinkResult, note: &str) -> Row {
    let us = |ns: u64| ns as f64 / 1000.0;
    let hops = if sys.starts_with("x-") { 1.0 } else { 2.0 };
    Row {
        system: sys.into(),
        size,
        mode: if rate == 0 { "closed-loop".into() } else { "open-loop".into() },
        rate,
        received: r.received,
        expected: r.expected,
        throughput: r.throughput,
        e2e_p50_us: us(r.p50_ns),
        e2e_p99_us: us(r.p99_ns),
        e2e_p999_us: us(r.p999_ns),
        hop_p50_us: us(r.p50_ns) / hops,
        hop_p99_us: us(r.p99_ns) / hops,
        note: note.into(),
    }
}

const ALL: &[&str] = &[
    "aion-inprocess",
    "aion-memory",
    "aion-durable",
    "aion-grpc-py",
    "redis-aion",
    "rabbitmq",
    "nats-core",
    "nats-jetstream",
    "zenoh",
    "x-aion-memory",
    "x-aion-durable",
    "x-zenoh",
    "x-nats-core",
    "x-nats-jetstream",
];

fn main() -> std::process::ExitCode {
    if let Ok(role) = std::env::var("PEER_ROLE") {
        return role_main(&role);
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    // --small-only: the 100-byte rows only (Zenoh's 64 KiB open loop across namespaces stalls this VM).
    let small_only = args.iter().any(|a| a == "--small-only");
    let only: Vec<String> = arg("--only").map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default();
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "target/bench-results".into()));
    let footprint_secs: u64 = arg("--idle-secs").and_then(|s| s.parse().ok()).unwrap_or(if quick { 10 } else { 60 });
    let systems: Vec<&str> = ALL.iter().copied().filter(|s| only.is_empty() || only.iter().any(|o| o == s)).collect();
    let mut rows: Vec<Row> = Vec::new();
    let mut footprint = serde_json::Value::Null;
    // The two hosts of the cross-device systems, made only when one of them runs.
    let hosts = systems.iter().any(|s| cross::SYSTEMS.contains(s)).then(cross::Hosts::new);
    actix::System::new().block_on(async {
        for sys in &systems {
            if *sys == "aion-grpc-py" {
                rows.extend(grpc_py_rows(quick));
                continue;
            }
            let started = match &hosts {
                Some(h) if sys.starts_with("x-") => cross::start_server(sys, h),
                _ => start_server(sys),
            };
            let server = match started {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{sys}: server did not start ({e}); skipped");
                    continue;
                }
            };
            for (size, n_closed, rate, n_open) in
                [(100usize, 100_000u64, 10_000u64, 30_000u64), (65_536, 5_000, 1_000, 3_000)]
            {
                if small_only && size != 100 {
                    continue;
                }
                let scale = if quick { 10 } else { 1 };
                // Closed loop, open loop at a demanding rate, and (small messages) at 1 000/s, a rate every
                // system sustains, for unloaded latency.
                let mut runs: Vec<(u64, u64)> = vec![(0, n_closed / scale), (rate, n_open / scale)];
                if size == 100 {
                    runs.push((1_000, 5_000 / scale));
                }
                for (i, (rate, n)) in runs.into_iter().enumerate() {
                    eprintln!(
                        "{sys}: {size} B, {} ...",
                        if rate == 0 { "closed loop".into() } else { format!("{rate}/s") }
                    );
                    let r = match &hosts {
                        Some(h) if sys.starts_with("x-") => {
                            cross::run_once(sys, h, &server, size, n, rate, i + 10 * size).await
                        }
                        _ => run_once(sys, &server, size, n, rate, i + 10 * size).await,
                    };
                    match r {
                        Ok(r) => {
                            let mut note = if r.received < r.expected {
                                format!("lost {} of {}", r.expected - r.received, r.expected)
                            } else {
                                String::new()
                            };
                            if let Some(h) = hosts.as_ref().filter(|_| sys.starts_with("x-")) {
                                note = [h.kind(), &note]
                                    .iter()
                                    .filter(|s| !s.is_empty())
                                    .copied()
                                    .collect::<Vec<_>>()
                                    .join("; ");
                            }
                            rows.push(row(sys, size, rate, &r, &note));
                        }
                        Err(e) => {
                            eprintln!("{sys}: {size} B rate {rate}: {e}");
                            rows.push(row(sys, size, rate, &SinkResult::default(), &format!("failed: {e}")));
                        }
                    }
                }
            }
            drop(server);
        }
        if only.is_empty() || only.iter().any(|o| o == "footprint") {
            footprint = footprint_report(footprint_secs);
        }
    });
    // --merge: keep the other systems' rows (and footprint) of an earlier run, replacing those run now.
    if args.iter().any(|a| a == "--merge") {
        if let Ok(old) = std::fs::read_to_string(out.join("compare.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&old) {
                let ran: Vec<&str> = rows.iter().map(|r| r.system.as_str()).collect();
                let mut kept: Vec<Row> = v["rows"]
                    .as_array()
                    .map(|a| a.iter().filter_map(row_from_json).filter(|r| !ran.contains(&r.system.as_str())).collect())
                    .unwrap_or_default();
                kept.extend(rows);
                kept.sort_by_key(|r| ALL.iter().position(|s| *s == r.system).unwrap_or(usize::MAX));
                rows = kept;
                if footprint.is_null() {
                    footprint = v["footprint"].clone();
                }
            }
        }
    }
    print_table(&rows, &footprint);
    if let Err(e) = write_outputs(&out, &rows, &footprint) {
        eprintln!("cannot write results to {}: {e}", out.display());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// The `aion-grpc-py` rows: `benches/grpc_py.py --json` (Python and grpcio on the machine; the runtime from
/// `AION_BIN`, the trivial tonic server from `target/release/examples/grpc-trivial`, both built by compare.sh).
fn grpc_py_rows(quick: bool) -> Vec<Row> {
    let n: u64 = if quick { 1_000 } else { 10_000 };
    eprintln!("aion-grpc-py: Python client, {n} SendKanban calls, then 500/s ...");
    let out = Command::new("python3").arg("benches/grpc_py.py").arg(n.to_string()).arg("--json").output();
    let failed = |why: String| {
        eprintln!("aion-grpc-py: {why}; skipped");
        Vec::new()
    };
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return failed(format!("benches/grpc_py.py exited {}: {}", o.status, String::from_utf8_lossy(&o.stderr)))
        }
        Err(e) => return failed(format!("python3: {e}")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(v) = text.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) else {
        return failed(format!("no JSON line in its output: {text}"));
    };
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let ratio = match v["trivial_tonic"].as_f64() {
        Some(t) if t > 0.0 => format!("{:.2} of the same client to a trivial tonic server ({:.0}/s)", f("aion") / t, t),
        _ => format!("{:.2} of the best trivial server", f("ratio")),
    };
    let (n, received) = (v["n"].as_u64().unwrap_or(0), v["received"].as_u64().unwrap_or(0));
    let lost = |received: u64, sent: u64| (received < sent).then(|| format!("lost {} of {sent}; ", sent - received));
    let base = Row {
        system: "aion-grpc-py".into(),
        // A StatusKanban with two metadata numbers (sequence, send time): a small kanban, shown with the 100 B rows.
        size: 100,
        mode: "closed-loop".into(),
        rate: 0,
        received,
        expected: n,
        throughput: f("aion"),
        e2e_p50_us: 0.0,
        e2e_p99_us: 0.0,
        e2e_p999_us: 0.0,
        hop_p50_us: 0.0,
        hop_p99_us: 0.0,
        note: format!("{}Python client > aion > Python sink, 1 hop; {ratio}", lost(received, n).unwrap_or_default()),
    };
    let (sent, received) = (v["latency_sent"].as_u64().unwrap_or(0), v["latency_received"].as_u64().unwrap_or(0));
    let open = Row {
        mode: "open-loop".into(),
        rate: v["latency_rate"].as_u64().unwrap_or(500),
        received,
        expected: sent,
        throughput: 0.0,
        e2e_p50_us: f("hop_p50_us"),
        e2e_p99_us: f("hop_p99_us"),
        hop_p50_us: f("hop_p50_us"),
        hop_p99_us: f("hop_p99_us"),
        note: format!("{}Python client > aion > Python sink, 1 hop", lost(received, sent).unwrap_or_default()),
        ..base.clone()
    };
    vec![base, open]
}

fn row_from_json(v: &serde_json::Value) -> Option<Row> {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Some(Row {
        system: v["system"].as_str()?.to_owned(),
        size: v["size"].as_u64()? as usize,
        mode: v["mode"].as_str().unwrap_or_default().to_owned(),
        rate: v["rate"].as_u64().unwrap_or(0),
        received: v["received"].as_u64().unwrap_or(0),
        expected: v["expected"].as_u64().unwrap_or(0),
        throughput: f("throughput"),
        e2e_p50_us: f("e2e_p50_us"),
        e2e_p99_us: f("e2e_p99_us"),
        e2e_p999_us: f("e2e_p999_us"),
        hop_p50_us: f("hop_p50_us"),
        hop_p99_us: f("hop_p99_us"),
        note: v["note"].as_str().unwrap_or_default().to_owned(),
    })
}

fn print_table(rows: &[Row], footprint: &serde_json::Value) {
    println!(
        "\n{:<15} {:>6} {:>12} {:>12} {:>11} {:>11} {:>11} {:>11}  note",
        "system", "bytes", "mode", "msgs/s", "hop p50 µs", "hop p99 µs", "e2e p99 µs", "e2e p999"
    );
    for r in rows {
        let mode = if r.rate == 0 { "closed".to_owned() } else { format!("{}/s", r.rate) };
        println!(
            "{:<15} {:>6} {:>12} {:>12.0} {:>11.1} {:>11.1} {:>11.1} {:>11.1}  {}",
            r.system, r.size, mode, r.throughput, r.hop_p50_us, r.hop_p99_us, r.e2e_p99_us, r.e2e_p999_us, r.note
        );
    }
    if !footprint.is_null() {
        println!("\nfootprint: {footprint}");
    }
}

fn write_outputs(out: &Path, rows: &[Row], footprint: &serde_json::Value) -> Res<()> {
    std::fs::create_dir_all(out)?;
    let machine = serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
    });
    let doc = serde_json::json!({ "machine": machine, "rows": rows, "footprint": footprint });
    std::fs::write(out.join("compare.json"), serde_json::to_string_pretty(&doc)?)?;
    let mut csv = String::from("system,size,mode,rate,received,expected,throughput,e2e_p50_us,e2e_p99_us,e2e_p999_us,hop_p50_us,hop_p99_us,note\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.0},{:.1},{:.1},{:.1},{:.1},{:.1},\"{}\"\n",
            r.system,
            r.size,
            r.mode,
            r.rate,
            r.received,
            r.expected,
            r.throughput,
            r.e2e_p50_us,
            r.e2e_p99_us,
            r.e2e_p999_us,
            r.hop_p50_us,
            r.hop_p99_us,
            r.note.replace('"', "'")
        ));
    }
    std::fs::write(out.join("compare.csv"), csv)?;
    std::fs::write(out.join("compare.svg"), svg(rows))?;
    println!("\nresults: {0}/compare.json, {0}/compare.csv, {0}/compare.svg", out.display());
    Ok(())
}

/// A two-panel bar chart (closed-loop throughput and hop p99 at 1 000 msgs/s, small messages), log scale.
fn svg(rows: &[Row]) -> String {
    let small: Vec<&Row> = rows.iter().filter(|r| r.size == 100).collect();
    let panel = |title: &str, pick: &dyn Fn(&Row) -> Option<f64>, x0: f64| -> String {
        let vals: Vec<(&str, f64)> = small.iter().filter_map(|r| pick(r).map(|v| (r.system.as_str(), v))).collect();
        let max = vals.iter().map(|v| v.1).fold(1.0f64, f64::max).log10().ceil().max(1.0);
        let mut s = format!(r#"<text x="{}" y="24" font-size="15" font-weight="bold">{title}</text>"#, x0 + 10.0);
        for (i, (name, v)) in vals.iter().enumerate() {
            let y = 44.0 + i as f64 * 30.0;
            let w = (v.max(1.0).log10() / max * 300.0).max(1.0);
            let color = if name.contains("aion") { "#d9534f" } else { "#5b7db1" };
            s.push_str(&format!(
                r#"<text x="{}" y="{}" font-size="12" text-anchor="end">{name}</text><rect x="{}" y="{}" width="{w:.1}" height="20" fill="{color}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
                x0 + 120.0, y + 14.0, x0 + 125.0, y, x0 + 130.0 + w, y + 14.0, fmt_num(*v)
            ));
        }
        s
    };
    let h = 60.0 + small.len() as f64 * 15.0;
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="1040" height="{h}" font-family="sans-serif">{}{}<text x="10" y="{}" font-size="10">100-byte messages, 3 processes, log scale. Red: aion. Source: target/bench-results/compare.json</text></svg>"#,
        panel(
            "closed-loop throughput (msgs/s, more is better)",
            &|r| (r.rate == 0 && r.throughput > 0.0).then_some(r.throughput),
            0.0
        ),
        panel(
            "hop p99 at 1 000 msgs/s (µs, less is better)",
            &|r| (r.rate == 1_000 && r.hop_p99_us > 0.0).then_some(r.hop_p99_us),
            520.0
        ),
        h - 8.0
    )
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

// ---------------------------------------------------------------- footprint

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Starts `aion run` on `yaml`, waits for its readiness line; returns the child and the time to ready.
fn aion_run(aion: &Path, yaml: &str, dir: &Path) -> Res<(Child, Duration)> {
    use std::io::BufRead;
    let file = dir.join("services.yml");
    std::fs::write(&file, yaml)?;
    let t = Instant::now();
    let mut child = Command::new(aion)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("run")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("aion: running") => break,
            Some(_) => {}
            None => return Err("aion exited before it was ready".into()),
        }
    }
    let ready = t.elapsed();
    std::thread::spawn(move || for _ in lines {});
    Ok((child, ready))
}

fn footprint_report(idle_secs: u64) -> serde_json::Value {
    let aion = match std::env::var("AION_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => std::env::current_exe().ok().and_then(|p| Some(p.parent()?.join("aion"))).unwrap_or_default(),
    };
    if !aion.exists() {
        eprintln!("footprint: {} not found (set AION_BIN); skipped", aion.display());
        return serde_json::Value::Null;
    }
    let go = || -> Res<serde_json::Value> {
        let idle = "microservices:\n  idle:\n    command: [\"sleep\", \"3600\"]\n    startup: yes\n    scale: SCALE\n";
        let d1 = tempfile::tempdir()?;
        let (mut one, ready) = aion_run(&aion, &idle.replace("SCALE", "1"), d1.path())?;
        std::thread::sleep(Duration::from_secs(2));
        let rss1 = rss_kib(one.id()).unwrap_or(0);
        let t0 = cpu_ticks(one.id()).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(idle_secs));
        let ticks = cpu_ticks(one.id()).unwrap_or(0).saturating_sub(t0);
        let _ = Command::new(&aion).arg("--data-dir").arg(d1.path().join("data")).arg("stop").output();
        let _ = one.wait();
        let d2 = tempfile::tempdir()?;
        let (mut many, _) = aion_run(&aion, &idle.replace("SCALE", "51"), d2.path())?;
        std::thread::sleep(Duration::from_secs(3));
        let rss51 = rss_kib(many.id()).unwrap_or(0);
        let _ = Command::new(&aion).arg("--data-dir").arg(d2.path().join("data")).arg("stop").output();
        let _ = many.wait();
        let hz = 100.0; // USER_HZ on Linux
        Ok(serde_json::json!({
            "binary_mb": std::fs::metadata(&aion)?.len() as f64 / 1e6,
            "ready_ms": ready.as_secs_f64() * 1000.0,
            "idle_rss_mb": rss1 as f64 / 1024.0,
            "rss_per_instance_kb": (rss51.saturating_sub(rss1)) as f64 / 50.0,
            "idle_cpu_percent": ticks as f64 / hz / idle_secs as f64 * 100.0,
            "idle_secs": idle_secs,
        }))
    };
    go().unwrap_or_else(|e| {
        eprintln!("footprint: {e}");
        serde_json::Value::Null
    })
}
