//! Embedding: the same SDK service types run in-process inside a node (no sockets, no encoding), mixed with
//! the same routing, lifecycle and status as process services.
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
        let cfg = load_str("inproc.yml", yaml).config.expect("valid");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let tx = Arc::new(Mutex::new(tx));
        let mut reg = InProcessRegistry::default();
        reg.register("source", || Source(1000));
        reg.register("double", || Double);
        reg.register("collect", move || Collect(tx.lock().expect("lock").clone()));
        let dir = tempfile::tempdir().expect("tmp");
        let mut opts = NodeOptions::new(dir.path(), cfg);
        opts.inproc = reg;
        let node = Node::start(opts).await.expect("node");
        for i in 1..=1000u64 {
            let k = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("in time").expect("open");
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
        node.shutdown().await;
    });
}
