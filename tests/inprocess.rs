//! Embedding: the same SDK service types run in-process inside a node (no sockets, no encoding), mixed with
//! the same routing, lifecycle and status as process services.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aion::actors::{InProcessRegistry, Node, NodeOptions};
use aion::runtime::config::load_str;
use aion::sdk::{Ctx, Error, Kanban, Output, Service, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

struct Source(u64);
impl Service for Source {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        for i in 1..=self.0 {
            ctx.emit(Output::new().meta("seq", i)).await?;
        }
        ctx.terminate().await
    }
    async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
        Ok(())
    }
}

struct Double;
impl Service for Double {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let n = k.metadata.get("seq").and_then(Value::as_f64).unwrap_or(0.0) as u64;
        ctx.emit(Output::new().meta("seq", n).meta("double", n * 2)).await
    }
}

struct Collect(mpsc::UnboundedSender<Kanban>);
impl Service for Collect {
    async fn handle(&mut self, k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
        let _ = self.0.send(k);
        Ok(())
    }
}

#[test]
fn in_process_pipeline_through_a_node() {
    actix::System::new().block_on(async {
        let yaml = "microservices:\n  source:\n    startup: yes\n    nextService: {default: [{name: double}]}\n  double:\n    always: yes\n    nextService: {default: [{name: collect}]}\n  collect:\n    always: yes\n";
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut reg = InProcessRegistry::default();
        reg.register("source", || Source(1000));
        reg.register("double", || Double);
        reg.register("collect", move || Collect(tx.clone()));
        let dir = tempfile::tempdir().expect("tmp");
        let node = start_node(dir.path(), yaml, reg).await;
        for i in 1..=1000u64 {
            let k = next(&mut rx).await;
            assert_eq!(k.metadata["seq"], Value::U64(i), "order kept");
            assert_eq!(k.metadata["double"], Value::U64(2 * i));
            assert_eq!(k.origin.service, "double");
        }
        let st = node.instances().await;
        let source = st.iter().find(|i| i.service == "source").expect("source");
        assert!(source.terminated);
        assert_eq!(source.pid, 0, "in-process instances have no pid");
        let double = st.iter().find(|i| i.service == "double").expect("double");
        assert_eq!((double.kanbans_in, double.kanbans_out), (1000, 1000));
        assert_eq!(double.backend.as_ref().map(|d| d.backend.as_str()), Some("in-process"));
        // `aion logs` asks the runtime where the output is: an in-process service has no log of its own.
        let control = aion::actors::paths::Paths::new(dir.path()).control();
        let ask = |service: &str| aion::actors::control::Request::Logs { service: service.into(), instance: 1 };
        let v = aion::actors::control::call(&control, &ask("double"), Duration::from_secs(10)).await.expect("logs");
        let source: aion::actors::backend::LogSource = serde_json::from_value(v).expect("a log source");
        assert!(
            matches!(&source, aion::actors::backend::LogSource::Unavailable { reason } if reason.contains("runtime's own log")),
            "{source:?}"
        );
        let e = aion::actors::control::call(&control, &ask("nosuch"), Duration::from_secs(10)).await.expect_err("unknown");
        assert!(e.contains("no instance 1 of service \"nosuch\""), "{e}");
        node.shutdown().await.expect("clean shutdown");
    });
}

/// Panics once, on the kanban whose `seq` is `at`, before emitting anything for it.
struct PanicOnce {
    at: u64,
    armed: Arc<std::sync::atomic::AtomicBool>,
}
impl Service for PanicOnce {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let n = k.metadata.get("seq").and_then(Value::as_f64).unwrap_or(0.0) as u64;
        if n == self.at && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("planned panic at {n}");
        }
        ctx.emit(Output::new().meta("seq", n)).await
    }
}

/// The next message, within 30 s.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("in time").expect("open")
}

fn start_node(dir: &std::path::Path, yaml: &str, reg: InProcessRegistry) -> impl std::future::Future<Output = Node> {
    let cfg = load_str("inproc.yml", yaml).config.expect("valid");
    let mut opts = NodeOptions::new(dir, cfg);
    opts.inproc = reg;
    async move { Node::start(opts).await.expect("node") }
}

/// A direct in-process session takes kanbans in batches; a panic in the middle of one must neither lose the
/// kanbans behind it in the batch nor redeliver the ones already handled.
#[test]
fn panic_mid_batch_redelivers_only_the_unhandled() {
    actix::System::new().block_on(async {
        let yaml = "microservices:\n  source:\n    startup: yes\n    nextService: {default: [{name: flaky}]}\n  flaky:\n    always: yes\n    nextService: {default: [{name: collect}]}\n  collect:\n    always: yes\n";
        let (tx, mut rx) = mpsc::unbounded_channel();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut reg = InProcessRegistry::default();
        reg.register("source", || Source(2000));
        let a = armed.clone();
        reg.register("flaky", move || PanicOnce { at: 700, armed: a.clone() });
        reg.register("collect", move || Collect(tx.clone()));
        let dir = tempfile::tempdir().expect("tmp");
        let node = start_node(dir.path(), yaml, reg).await;
        let mut seen = vec![0u32; 2001];
        for _ in 0..2000 {
            let k = next(&mut rx).await;
            let n = k.metadata["seq"].as_f64().unwrap_or(0.0) as usize;
            seen[n] += 1;
        }
        assert!(!armed.load(std::sync::atomic::Ordering::SeqCst), "the panic happened");
        let missing: Vec<usize> = (1..=2000).filter(|&i| seen[i] == 0).collect();
        let twice: Vec<usize> = (1..=2000).filter(|&i| seen[i] > 1).collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        assert!(twice.is_empty(), "delivered twice: {twice:?}");
        let st = node.instances().await;
        let flaky = st.iter().find(|i| i.service == "flaky").expect("flaky");
        assert_eq!(flaky.restarts, 1, "restarted once after the panic");
        assert!(flaky.redelivered >= 1, "the kanban it panicked on went back to its queue");
        node.shutdown().await.expect("clean shutdown");
    });
}

/// Durable in-process services: outputs are committed before the inputs that produced them are acknowledged,
/// so a node stopped while kanbans are queued (and a consumer stuck mid-kanban) delivers every one of them after
/// a restart on the same data dir.
#[test]
fn durable_in_process_queue_survives_a_restart() {
    /// Emits `n` kanbans, waits until they are durable, then says so.
    struct FlushSource(u64, Option<tokio::sync::oneshot::Sender<()>>);
    impl Service for FlushSource {
        async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
            for i in 1..=self.0 {
                ctx.emit(Output::new().meta("seq", i)).await?;
            }
            ctx.flush().await?;
            if let Some(done) = self.1.take() {
                let _ = done.send(());
            }
            Ok(())
        }
        async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
            Ok(())
        }
    }
    /// Reports every kanban, and blocks forever on the 100th.
    struct Stuck(mpsc::UnboundedSender<Kanban>, u32);
    impl Service for Stuck {
        async fn handle(&mut self, k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
            let _ = self.0.send(k);
            self.1 += 1;
            if self.1 == 100 {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }
    const N: u64 = 3000;
    let dir = tempfile::tempdir().expect("tmp");
    let yaml = "microservices:\n  source:\n    startup: yes\n    nextService: {default: [{name: double}]}\n  double:\n    always: yes\n    nextService: {default: [{name: collect}]}\n  collect:\n    always: yes\n";
    let mut seen = std::collections::BTreeSet::new();
    actix::System::new().block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let done_tx = Arc::new(Mutex::new(Some(done_tx)));
        let mut reg = InProcessRegistry::default();
        reg.register("source", move || FlushSource(N, done_tx.lock().expect("lock").take()));
        reg.register("double", || Double);
        reg.register("collect", move || Stuck(tx.clone(), 0));
        let cfg = load_str("inproc.yml", yaml).config.expect("valid");
        let mut opts = NodeOptions::new(dir.path(), cfg);
        opts.inproc = reg;
        opts.queue_capacity = 4096;
        opts.grace = Duration::from_millis(500);
        let node = Node::start(opts).await.expect("node");
        tokio::time::timeout(Duration::from_secs(30), done_rx).await.expect("in time").expect("source flushed");
        while seen.len() < 100 {
            let k = next(&mut rx).await;
            seen.insert(k.metadata["seq"].as_f64().unwrap_or(0.0) as u64);
        }
        node.shutdown().await.expect("clean shutdown");
        while let Ok(k) = rx.try_recv() {
            seen.insert(k.metadata["seq"].as_f64().unwrap_or(0.0) as u64);
        }
    });
    assert!(seen.len() < N as usize, "the first run stopped mid-flow ({} seen)", seen.len());
    // Second run, the source emits nothing: what was queued (durable by default) must all arrive.
    actix::System::new().block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut reg = InProcessRegistry::default();
        reg.register("source", || Source(0));
        reg.register("double", || Double);
        reg.register("collect", move || Collect(tx.clone()));
        let node = start_node(dir.path(), yaml, reg).await;
        while seen.len() < N as usize {
            let k = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("lost kanbans: {} of {N} arrived", seen.len()))
                .expect("open");
            seen.insert(k.metadata["seq"].as_f64().unwrap_or(0.0) as u64);
        }
        node.shutdown().await.expect("clean shutdown");
    });
}

/// `aion_sdk::run_on_link`: a service on an in-memory link gets the full session protocol (handshake, credit,
/// acks, Accepted) without a socket, routed like any other instance.
#[test]
fn a_service_on_an_in_memory_link_speaks_the_session_protocol() {
    actix::System::new().block_on(async {
        // `linked` is served by the link below; its command would only run if it were started on its own.
        let yaml = "microservices:\n  linked:\n    command: [\"/bin/false\"]\n    delivery: memory\n    nextService: {default: [{name: collect}]}\n  collect:\n    always: yes\n";
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut reg = InProcessRegistry::default();
        reg.register("collect", move || Collect(tx.clone()));
        let dir = tempfile::tempdir().expect("tmp");
        let node = start_node(dir.path(), yaml, reg).await;
        let (client, server) = aion::transport::mem_pair(16);
        assert!(node.attach(server).await);
        /// `Double`, saying when its session is up (`start` runs right after the handshake).
        struct Up(Option<tokio::sync::oneshot::Sender<()>>);
        impl Service for Up {
            async fn start(&mut self, _ctx: &mut Ctx) -> Result<(), Error> {
                if let Some(up) = self.0.take() {
                    let _ = up.send(());
                }
                Ok(())
            }
            async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
                Double.handle(k, ctx).await
            }
        }
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = tokio::spawn(aion::sdk::run_on_link(
            Up(Some(up_tx)),
            "linked",
            1,
            client,
            aion::sdk::Options::default(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        tokio::time::timeout(Duration::from_secs(30), up_rx).await.expect("in time").expect("the link session opened");
        for i in 1..=3u64 {
            node.inject("linked", 1, "default", serde_json::json!({ "seq": i })).await.expect("inject");
        }
        for i in 1..=3u64 {
            let k = next(&mut rx).await;
            assert_eq!(k.metadata["double"], Value::U64(2 * i));
            assert_eq!(k.origin.service, "linked");
        }
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), svc).await.expect("stops").expect("joins").expect("clean");
        node.shutdown().await.expect("clean shutdown");
    });
}

/// Static kanbans from an in-process service (direct session): put, get, subscribe, delete.
#[test]
fn static_kanbans_from_an_in_process_service() {
    struct Statics(mpsc::UnboundedSender<String>);
    impl Service for Statics {
        async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
            let mut events = ctx.static_subscribe("t").await?;
            let id = ctx.static_put("t", Output::new().meta("v", "a")).await?;
            for (_, k) in ctx.static_get("t").await? {
                let _ = self.0.send(format!("get:{}", k.metadata["v"].as_str().unwrap_or("?")));
            }
            if let Some((eid, k)) = events.recv().await {
                let _ = self.0.send(format!("event:{}:{}", eid == id, k.metadata["v"].as_str().unwrap_or("?")));
            }
            let _ = self.0.send(format!("deleted:{}", ctx.static_delete("t", id).await?));
            let _ = self.0.send(format!("left:{}", ctx.static_get("t").await?.len()));
            Ok(())
        }
        async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
            Ok(())
        }
    }
    actix::System::new().block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut reg = InProcessRegistry::default();
        reg.register("statics", move || Statics(tx.clone()));
        let dir = tempfile::tempdir().expect("tmp");
        let node = start_node(dir.path(), "microservices:\n  statics:\n    startup: yes\n", reg).await;
        let mut got = Vec::new();
        while got.len() < 4 {
            got.push(next(&mut rx).await);
        }
        assert_eq!(got, ["get:a", "event:true:a", "deleted:true", "left:0"]);
        node.shutdown().await.expect("clean shutdown");
    });
}
