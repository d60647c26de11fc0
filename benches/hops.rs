//! Kanban hop benchmarks (a bench binary: HDR histograms, not timed tests).
//!
//! `cargo bench --bench hops` runs, on this machine:
//! 1. actor facade hop: `Addr::send` → `handle` on the same arbiter (one-way latency, closed loop);
//! 2. in-process service hop through the runtime: ping-pong between two in-process SDK services (hop = RTT/2);
//! 3. process-to-process hop through the runtime: the same ping-pong between two OS processes;
//! 4. 3-stage pipeline throughput, in-process and cross-process (source > relay > sink, max rate);
//! 5. runtime idle RSS (`aion run` with a 3-service config, after start-up).
//!
//! Results are printed as a table and written to `target/bench-results/hops.json`.
//! The binary re-executes itself as a microservice when `AION_BENCH_ROLE` is set.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aion::actors::{InProcessRegistry, Node, NodeOptions};
use aion::runtime::actor::{spawn, Actor, Context};
use aion::runtime::config::load_str;
use aion::sdk::{Ctx, Error, Kanban, Output, Service, Value};
use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

#[derive(Clone, serde::Serialize)]
struct Row {
    name: String,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    throughput_per_s: f64,
    samples: u64,
}

fn row(name: &str, h: &Histogram<u64>, divide: u64, throughput: f64) -> Row {
    let q = |x: f64| h.value_at_quantile(x) as f64 / divide as f64 / 1000.0;
    Row {
        name: name.into(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        throughput_per_s: throughput,
        samples: h.len(),
    }
}

/// Writes the histogram summary of a service role to `RESULT_FILE`.
fn write_result(h: &Histogram<u64>, throughput: f64) -> Result<(), Error> {
    let Ok(path) = std::env::var("RESULT_FILE") else { return Ok(()) };
    let v = serde_json::json!({
        "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999),
        "n": h.len(), "throughput": throughput,
    });
    std::fs::write(path, v.to_string()).map_err(Error::msg)
}

fn md_u64(k: &Kanban, key: &str) -> u64 {
    match k.metadata.get(key) {
        Some(Value::U64(v)) => *v,
        Some(v) => v.as_f64().unwrap_or(0.0) as u64,
        None => 0,
    }
}

/// Ping: emits one kanban, waits for it to come back, records the round trip, repeats `n` times.
struct Ping {
    n: u64,
    warmup: u64,
    seen: u64,
    h: Histogram<u64>,
    done: Option<Arc<Mutex<Option<Histogram<u64>>>>>,
}

impl Service for Ping {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        ctx.emit(Output::new().meta("t", now_ns())).await
    }
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let rtt = now_ns().saturating_sub(md_u64(&k, "t"));
        self.seen += 1;
        if self.seen > self.warmup {
            let _ = self.h.record(rtt.max(1));
        }
        if self.seen < self.n + self.warmup {
            ctx.emit(Output::new().meta("t", now_ns())).await
        } else {
            write_result(&self.h, 0.0)?;
            if let Some(d) = &self.done {
                if let Ok(mut g) = d.lock() {
                    *g = Some(self.h.clone());
                }
            }
            ctx.stop();
            Ok(())
        }
    }
}

/// Pong / relay: forwards every kanban, metadata unchanged.
struct Forward;
impl Service for Forward {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        // Forwarded as received: the metadata is never decoded here.
        ctx.emit(Output::new().with_metadata(k.metadata)).await
    }
}

/// Source: emits `n` kanbans as fast as the runtime accepts them.
struct Source {
    n: u64,
}
impl Service for Source {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        for i in 0..self.n {
            ctx.emit(Output::new().meta("t", now_ns()).meta("i", i)).await?;
        }
        Ok(())
    }
    async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
        Ok(())
    }
}

/// Where an in-process sink leaves its histogram and throughput.
type SinkResult = Arc<Mutex<Option<(Histogram<u64>, f64)>>>;

/// Sink: counts, records end-to-end latency, and computes throughput from the first emit to the last receive.
struct Sink {
    n: u64,
    seen: u64,
    first_t: u64,
    h: Histogram<u64>,
    done: Option<SinkResult>,
}
impl Service for Sink {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let t = md_u64(&k, "t");
        let now = now_ns();
        if self.seen == 0 {
            self.first_t = t;
        }
        self.seen += 1;
        let _ = self.h.record(now.saturating_sub(t).max(1));
        if self.seen == self.n {
            let secs = (now.saturating_sub(self.first_t)) as f64 / 1e9;
            let tput = self.n as f64 / secs.max(1e-9);
            write_result(&self.h, tput)?;
            if let Some(d) = &self.done {
                if let Ok(mut g) = d.lock() {
                    *g = Some((self.h.clone(), tput));
                }
            }
            ctx.stop();
        }
        Ok(())
    }
}

fn role_main(role: &str) -> std::process::ExitCode {
    let n: u64 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let opts = aion::sdk::Options { window: 1024, output_window: 4096, ..Default::default() };
    match role {
        "ping" => aion::sdk::main_with(Ping { n, warmup: (n / 10).min(1000), seen: 0, h: hist(), done: None }, opts),
        "forward" => aion::sdk::main_with(Forward, opts),
        "source" => aion::sdk::main_with(Source { n }, opts),
        "sink" => aion::sdk::main_with(Sink { n, seen: 0, first_t: 0, h: hist(), done: None }, opts),
        other => {
            eprintln!("unknown role {other}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------- 1. actor facade hop ----------

struct Echo(tokio::sync::mpsc::Sender<u64>);
impl Actor for Echo {
    type Msg = u64;
    async fn handle(&mut self, t: u64, _ctx: &mut Context<Self>) {
        let _ = self.0.send(t).await;
    }
}

async fn actor_hop(n: u64) -> Row {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let addr = spawn("echo", Echo(tx), 1024, |_| {});
    let mut h = hist();
    let start = Instant::now();
    let base = Instant::now();
    for _ in 0..n {
        let t0 = base.elapsed().as_nanos() as u64;
        let _ = addr.send(t0).await;
        let _ = rx.recv().await;
        let _ = h.record((base.elapsed().as_nanos() as u64 - t0).max(1));
    }
    let tput = n as f64 / start.elapsed().as_secs_f64();
    addr.stop();
    // The measured path is send → handle → reply: two mailbox hops; report one.
    row("actor facade hop (send→handle, same arbiter)", &h, 2, tput * 2.0)
}

// ---------- 2–4. through the runtime ----------

fn yaml_pingpong(cmd: &str, delivery: &str) -> String {
    format!(
        "microservices:\n  ping:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ AION_BENCH_ROLE: ping }}\n    nextService: {{ default: [ {{ name: pong }} ] }}\n  pong:\n    command: {cmd}\n    always: yes\n    delivery: {delivery}\n    env: {{ AION_BENCH_ROLE: forward }}\n    nextService: {{ default: [ {{ name: ping }} ] }}\n"
    )
}

fn yaml_pipeline(cmd: &str, delivery: &str) -> String {
    format!(
        "microservices:\n  source:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ AION_BENCH_ROLE: source }}\n    nextService: {{ default: [ {{ name: relay }} ] }}\n  relay:\n    command: {cmd}\n    always: yes\n    delivery: {delivery}\n    env: {{ AION_BENCH_ROLE: forward }}\n    nextService: {{ default: [ {{ name: sink }} ] }}\n  sink:\n    command: {cmd}\n    startup: yes\n    delivery: {delivery}\n    env: {{ AION_BENCH_ROLE: sink }}\n"
    )
}

async fn run_node(yaml: &str, reg: InProcessRegistry, n: u64, result_file: &std::path::Path) -> Node {
    run_node_with(yaml, reg, n, result_file, std::env::var("AION_BENCH_ARCHIVE").as_deref() == Ok("1"), None).await
}

async fn run_node_with(
    yaml: &str,
    reg: InProcessRegistry,
    n: u64,
    result_file: &std::path::Path,
    archive: bool,
    redis: Option<String>,
) -> Node {
    let mut cfg = load_str("bench.yml", yaml).config.expect("bench config");
    for ms in cfg.microservices.values_mut() {
        ms.env.insert("N".into(), n.to_string());
        ms.env.insert("RESULT_FILE".into(), result_file.display().to_string());
        ms.env.insert("RUST_LOG".into(), "warn".into());
    }
    let dir = tempfile::tempdir().expect("tmp").keep();
    let mut opts = NodeOptions::new(dir, cfg);
    // The ping-pong scenarios are a loop of N round trips by design.
    opts.hop_limit = 0;
    opts.inproc = reg;
    opts.queue_capacity = 4096;
    opts.archive = archive;
    opts.redis =
        redis.map(|url| aion::actors::store::RedisConfig { url, retain: 0, connect_wait: Duration::from_secs(10) });
    Node::start(opts).await.expect("node")
}

async fn wait_file(path: &std::path::Path) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str(&s) {
                return v;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(300), "benchmark did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn json_row(name: &str, v: &serde_json::Value, divide: f64) -> Row {
    let g = |k: &str| v[k].as_f64().unwrap_or(0.0) / divide / 1000.0;
    Row {
        name: name.into(),
        p50_us: g("p50"),
        p99_us: g("p99"),
        p999_us: g("p999"),
        throughput_per_s: v["throughput"].as_f64().unwrap_or(0.0),
        samples: v["n"].as_u64().unwrap_or(0),
    }
}

async fn inproc_pingpong(n: u64) -> Row {
    let done = Arc::new(Mutex::new(None));
    let mut reg = InProcessRegistry::default();
    let d = done.clone();
    reg.register("ping", move || Ping { n, warmup: 1000, seen: 0, h: hist(), done: Some(d.clone()) });
    reg.register("pong", || Forward);
    let rf = std::env::temp_dir().join(format!("aion-bench-{}-ipp.json", std::process::id()));
    let node = run_node(&yaml_pingpong("[]", "memory"), reg, n, &rf).await;
    let h = loop {
        if let Some(h) = done.lock().ok().and_then(|mut g| g.take()) {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = node.shutdown().await;
    let rtt_p50 = h.value_at_quantile(0.5) as f64;
    row("in-process hop via runtime, memory (RTT/2)", &h, 2, 2.0 * 1e9 / rtt_p50.max(1.0))
}

async fn inproc_pipeline(n: u64) -> Row {
    let done = Arc::new(Mutex::new(None));
    let mut reg = InProcessRegistry::default();
    let d = done.clone();
    reg.register("source", move || Source { n });
    reg.register("relay", || Forward);
    reg.register("sink", move || Sink { n, seen: 0, first_t: 0, h: hist(), done: Some(d.clone()) });
    let rf = std::env::temp_dir().join(format!("aion-bench-{}-ipl.json", std::process::id()));
    let node = run_node(&yaml_pipeline("[]", "memory"), reg, n, &rf).await;
    let (h, tput) = loop {
        if let Some(r) = done.lock().ok().and_then(|mut g| g.take()) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = node.shutdown().await;
    row("3-stage pipeline, in-process, memory", &h, 1, tput)
}

async fn process_run(yaml: String, n: u64, name: &str, divide: f64) -> Row {
    process_run_on(yaml, n, name, divide, None).await
}

async fn process_run_on(yaml: String, n: u64, name: &str, divide: f64, redis: Option<String>) -> Row {
    let rf = std::env::temp_dir().join(format!(
        "aion-bench-{}-{}.json",
        std::process::id(),
        name.chars().filter(char::is_ascii_alphanumeric).collect::<String>()
    ));
    let _ = std::fs::remove_file(&rf);
    let archive = std::env::var("AION_BENCH_ARCHIVE").as_deref() == Ok("1");
    let node = run_node_with(&yaml, InProcessRegistry::default(), n, &rf, archive, redis).await;
    let v = wait_file(&rf).await;
    let _ = node.shutdown().await;
    let _ = std::fs::remove_file(&rf);
    let mut r = json_row(name, &v, divide);
    if divide > 1.0 {
        r.throughput_per_s = 2.0 * 1e9 / v["p50"].as_f64().unwrap_or(1.0).max(1.0);
    }
    r
}

/// A `redis-server` for the Redis-store rows: append-only, fsync on every write (the embedded store's
/// guarantee), on a free port, killed on drop.
struct BenchRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl BenchRedis {
    fn start() -> Option<BenchRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir = tempfile::tempdir().ok()?;
        let fsync = std::env::var("AION_BENCH_REDIS_FSYNC").unwrap_or_else(|_| "always".into());
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &fsync, "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(BenchRedis { child, port, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kanban as the archive sees it: ~100 bytes of metadata.
fn archive_kanban(i: u64) -> aion::runtime::WireKanban {
    let mut k = aion::runtime::Kanban { id: aion::runtime::KanbanId(u128::from(i) + 1), ..Default::default() };
    k.trace_id = k.id;
    k.origin = aion::runtime::Origin { service: "source".into(), instance: 1 };
    k.metadata = aion::runtime::kanban::metadata_from_json(serde_json::json!({
        "seq": i, "sensor": "line-3/camera-2", "status": "ok", "score": 0.93, "tags": ["a", "b", "c"]
    }));
    k.into_wire()
}

/// Archive insert rate into the embedded archive (`archive.db`): hop records written in replicator-sized
/// batches, then their acknowledgements; and, when `secantusd-py` is on PATH, the MongoDB sink's export rate.
async fn archive_rates(n: u64) -> Vec<Row> {
    use aion::actors::store::{ArchiveOp, Retention, Store};
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) =
        Store::open(&dir.path().join("aion.db"), &dir.path().join("archive.db"), Retention::default()).expect("store");
    let t = Instant::now();
    let mut next = 0;
    while next < n {
        let end = (next + 512).min(n);
        let ops = (next..end)
            .map(|i| ArchiveOp::Hop {
                kanban: Box::new(archive_kanban(i)),
                to: Some(("sink".into(), 1)),
                outcome: "queued",
                at: aion::actors::store::now_ms(),
                charge: Default::default(),
            })
            .collect();
        store.archive(ops).await.expect("archive");
        let ids = (next..end).map(|i| aion::runtime::KanbanId(u128::from(i) + 1)).collect();
        let acked = ArchiveOp::Acked { service: "sink".into(), instance: 1, ids, at: aion::actors::store::now_ms() };
        store.archive(vec![acked]).await.expect("archive");
        next = end;
    }
    store.archive_barrier().await.expect("barrier");
    let secs = t.elapsed().as_secs_f64();
    #[cfg_attr(not(feature = "mongo"), allow(unused_mut))]
    let mut rows = vec![Row {
        name: "archive insert (hop + ack), SQLite archive.db".into(),
        p50_us: 0.0,
        p99_us: 0.0,
        p999_us: 0.0,
        throughput_per_s: n as f64 / secs,
        samples: n,
    }];
    #[cfg(feature = "mongo")]
    rows.extend(mongo_export_rate(store, dir.path(), n).await);
    rows
}

/// The MongoDB sink's export rate of the archive in `dir` (needs `secantusd-py` on PATH).
#[cfg(feature = "mongo")]
async fn mongo_export_rate(store: aion::actors::store::Store, dir: &std::path::Path, n: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(_) => return rows,
    };
    let mdir = tempfile::tempdir().expect("tmp");
    let Ok(mut mongo) = std::process::Command::new("secantusd-py")
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--storage-path"])
        .arg(mdir.path())
        .args(["--log-level", "WARNING"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("secantusd-py not found: MongoDB export row skipped");
        return rows;
    };
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = Arc::new(aion::actors::export::mongo::MongoStats::default());
    let cfg = aion::actors::export::mongo::MongoConfig {
        uri: format!("mongodb://127.0.0.1:{port}"),
        database: "AionCore".into(),
        collection: "kanban".into(),
    };
    let sink = aion::actors::export::mongo::MongoSink::new(
        cfg,
        store.clone(),
        dir.join("archive.db"),
        "bench".into(),
        stats.clone(),
    );
    let t = Instant::now();
    let _addr = aion::runtime::actor::spawn("mongo-sink", sink, 16, |_| {});
    while stats.exported.load(std::sync::atomic::Ordering::Relaxed) < n && t.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exported = stats.exported.load(std::sync::atomic::Ordering::Relaxed);
    rows.push(Row {
        name: "MongoDB sink export (secantusd-py, batches of 500)".into(),
        p50_us: 0.0,
        p99_us: 0.0,
        p999_us: 0.0,
        throughput_per_s: exported as f64 / t.elapsed().as_secs_f64(),
        samples: exported,
    });
    let _ = mongo.kill();
    let _ = mongo.wait();
    rows
}

fn idle_rss_kib() -> Option<u64> {
    let aion = env!("CARGO_BIN_EXE_aion");
    let dir = tempfile::tempdir().ok()?;
    let me = std::env::current_exe().ok()?.display().to_string();
    let yaml = format!(
        "microservices:\n  a:\n    command: [\"{me}\"]\n    startup: yes\n    always: yes\n    env: {{ AION_BENCH_ROLE: forward }}\n  b:\n    command: [\"{me}\"]\n    startup: yes\n    always: yes\n    env: {{ AION_BENCH_ROLE: forward }}\n  c:\n    command: [\"{me}\"]\n    startup: yes\n    always: yes\n    env: {{ AION_BENCH_ROLE: forward }}\n"
    );
    let file = dir.path().join("idle.yml");
    std::fs::write(&file, yaml).ok()?;
    let mut child = std::process::Command::new(aion)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    // Let it settle: every instance connected and idle.
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    rss
}

fn main() {
    if let Ok(role) = std::env::var("AION_BENCH_ROLE") {
        std::process::exit(match role_main(&role) {
            c if c == std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery: nothing to list.
    }
    let quick = std::env::var("AION_BENCH_QUICK").is_ok();
    let scale = if quick { 10 } else { 1 };
    let me = std::env::current_exe().expect("exe").display().to_string();
    let cmd = format!("[\"{me}\"]");
    let mut rows = Vec::new();
    // AION_BENCH_ONLY=actor,inproc-hop,process-hop,inproc-pipeline,process-pipeline,archive,redis,rss selects scenarios.
    let only = std::env::var("AION_BENCH_ONLY").ok();
    let on = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == name));
    actix::System::new().block_on(async {
        if on("actor") {
            rows.push(actor_hop(1_000_000 / scale).await);
        }
        if on("inproc-hop") {
            rows.push(inproc_pingpong(100_000 / scale).await);
        }
        for delivery in ["memory", "durable"] {
            if on("process-hop") {
                let name = format!("process-to-process hop via runtime, {delivery} (RTT/2)");
                // Durable: one kanban in flight means one fsync per hop; fewer round trips suffice.
                let n = if delivery == "durable" { 5_000 } else { 100_000 } / scale;
                rows.push(process_run(yaml_pingpong(&cmd, delivery), n, &name, 2.0).await);
            }
        }
        if on("inproc-pipeline") {
            rows.push(inproc_pipeline(500_000 / scale).await);
        }
        for delivery in ["memory", "durable"] {
            if on("process-pipeline") {
                let name = format!("3-stage pipeline, cross-process, {delivery}");
                rows.push(process_run(yaml_pipeline(&cmd, delivery), 500_000 / scale, &name, 1.0).await);
            }
        }
        if on("archive") {
            rows.extend(archive_rates(200_000 / scale).await);
        }
        // The Redis Streams store (a local redis-server, appendfsync always unless AION_BENCH_REDIS_FSYNC says).
        if on("redis") {
            match BenchRedis::start() {
                Some(r) => {
                    let url = format!("redis://127.0.0.1:{}", r.port);
                    let name = "process-to-process hop via runtime, durable on Redis (RTT/2)";
                    rows.push(
                        process_run_on(yaml_pingpong(&cmd, "durable"), 5_000 / scale, name, 2.0, Some(url.clone()))
                            .await,
                    );
                    let name = "3-stage pipeline, cross-process, durable on Redis";
                    rows.push(
                        process_run_on(yaml_pipeline(&cmd, "durable"), 200_000 / scale, name, 1.0, Some(url)).await,
                    );
                }
                None => eprintln!("redis-server not found or not starting: Redis rows skipped"),
            }
        }
    });
    let rss = if on("rss") { idle_rss_kib() } else { None };
    println!(
        "\n{:<56} {:>10} {:>10} {:>10} {:>14} {:>9}",
        "scenario", "p50 µs", "p99 µs", "p999 µs", "per second", "samples"
    );
    for r in &rows {
        println!(
            "{:<56} {:>10.2} {:>10.2} {:>10.2} {:>14.0} {:>9}",
            r.name, r.p50_us, r.p99_us, r.p999_us, r.throughput_per_s, r.samples
        );
    }
    if let Some(kib) = rss {
        println!("runtime idle RSS (aion run, 3 idle local services): {:.1} MB", kib as f64 / 1024.0);
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&out);
    let doc = serde_json::json!({ "rows": rows, "idle_rss_kib": rss });
    let _ = std::fs::write(out.join("hops.json"), serde_json::to_string_pretty(&doc).unwrap_or_default());
}
