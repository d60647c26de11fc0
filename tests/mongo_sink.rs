//! The MongoDB archive sink against a real MongoDB-wire server (`secantusd-py` from the `secantusdb` PyPI
//! package; no mongod can be installed here). The code path is the official `mongodb` driver, as with a real
//! mongod. Covers export, document shape, an outage with catch-up, and no duplicates.
#![cfg(feature = "mongo")]
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::{free_port, wait_until, Runtime};
use mongodb::bson::{doc, Document};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Mongo {
    child: Child,
    port: u16,
}

impl Mongo {
    fn start(port: u16, storage: &std::path::Path) -> Mongo {
        let child = Command::new("secantusd-py")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--storage-path"])
            .arg(storage)
            .args(["--log-level", "WARNING", "--sync-on-commit"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("secantusd-py not found: `pip install secantusdb` (the README's set-up does it)");
        wait_until("MongoDB-wire server listening", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Mongo { child, port }
    }

    /// Stops the server (SIGTERM, so the test server itself keeps what it acknowledged).
    fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        self.kill();
    }
}

fn docs(rt: &tokio::runtime::Runtime, port: u16) -> Option<Vec<Document>> {
    rt.block_on(async {
        let mut opts = mongodb::options::ClientOptions::parse(format!("mongodb://127.0.0.1:{port}")).await.ok()?;
        opts.server_selection_timeout = Some(Duration::from_secs(2));
        let client = mongodb::Client::with_options(opts).ok()?;
        let coll = client.database("AionCore").collection::<Document>("kanban");
        let mut cur = coll.find(doc! {}).await.ok()?;
        let mut out = Vec::new();
        while cur.advance().await.ok()? {
            out.push(cur.deserialize_current().ok()?);
        }
        Some(out)
    })
}

#[test]
fn archive_reaches_mongodb_and_catches_up_after_an_outage() {
    let tokio_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let storage = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut mongo = Mongo::start(port, &storage.path().join("db"));
    let uri = format!("mongodb://127.0.0.1:{}", mongo.port);
    let yaml = format!("deviceName: edge-1\n{}", common::pipeline("EMIT_COUNT: 20", "", ""));
    let mut rt = Runtime::start_with_args(&yaml, &["--mongo", &uri]);
    let exported = wait_until("40 documents in AionCore.kanban", Duration::from_secs(60), || {
        docs(&tokio_rt, port).filter(|d| d.len() == 40)
    });
    let d = exported
        .iter()
        .find(|d| d.get_str("streamKey") == Ok("kanban:before:relay:001"))
        .expect("a source > relay hop");
    assert_eq!(d.get_i32("processNumber"), Ok(1));
    assert_eq!(d.get_str("connectionKey"), Ok("default"));
    assert_eq!(d.get_str("outcome"), Ok("queued"));
    assert_eq!(d.get_str("deviceName"), Ok("edge-1"));
    assert!(d.get_document("from").is_ok_and(|f| f.get_str("service") == Ok("source")));
    assert!(d.get_datetime("acceptedAt").is_ok() && d.get_datetime("ackedAt").is_ok(), "{d}");
    assert!(d.get_document("metadata").is_ok_and(|m| m.contains_key("seq")), "{d}");

    // Outage: kanbans keep flowing, rows wait in the embedded archive, the sink reports errors.
    mongo.kill();
    for i in 1..=10 {
        rt.send("relay", &["--metadata", &format!(r#"{{"seq":{}}}"#, 100 + i)]);
    }
    rt.wait_lines("sink.jsonl", 30);
    let s = rt.wait_status("export errors reported", |s| s["mongo"]["errors"].as_u64() >= Some(1));
    assert!(s["mongo"]["last_error"].is_string(), "{}", s["mongo"]);
    // MongoDB back on the same port and storage: the sink catches up, nothing twice.
    let _mongo2 = Mongo::start(port, &storage.path().join("db"));
    let start = std::time::Instant::now();
    let all = loop {
        let d = docs(&tokio_rt, port);
        if d.as_ref().is_some_and(|d| d.len() >= 60) {
            break d.unwrap_or_default();
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!("no catch-up: {:?} documents; status {}", d.map(|d| d.len()), rt.status()["mongo"]);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(all.len(), 60, "each hop exported exactly once");
    let s = rt.status();
    assert_eq!(s["mongo"]["exported"], 60, "{}", s["mongo"]);
    assert_eq!(rt.stop(), 0);
}
