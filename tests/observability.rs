//! The HTTP endpoint against the real `aion` binary: `/metrics` scraped while a pipeline runs and parsed by a
//! real Prometheus text-format parser (the Prometheus project's Python client, `prometheus_client`), with values
//! that match `aion status --json`; `/healthz` and `/readyz` through a store failure (Redis killed) and a
//! shutdown; the web view's page, graph and event stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{every_seq_at_sink, http_get as get, pipeline, wait_until, Redis, Runtime};
use std::io::{Read, Write};
use std::time::Duration;

fn http_addr(rt: &Runtime) -> String {
    rt.status()["http"].as_str().expect("the status names the HTTP address").to_owned()
}

/// Parses metrics text with the Prometheus project's Python client; returns {name: [(labels, value)]}.
fn parse_with_prometheus_client(text: &str) -> Option<serde_json::Value> {
    let script = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    print("MISSING"); sys.exit(0)
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.trim() == "MISSING" {
        if std::env::var("AION_REQUIRE_PY_PROMETHEUS").is_ok_and(|v| v == "1") {
            panic!("AION_REQUIRE_PY_PROMETHEUS=1 but the Python prometheus_client is not installed");
        }
        eprintln!("SKIPPED: the Python prometheus_client is not installed (pip install prometheus-client)");
        return None;
    }
    Some(serde_json::from_str(&stdout).unwrap())
}

fn sample(m: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m[name].as_array()?.iter().find_map(|s| labels.iter().all(|(k, v)| s[0][*k] == *v).then(|| s[1].as_f64()).flatten())
}

#[test]
fn metrics_parsed_by_a_real_prometheus_parser_match_the_status() {
    let mut rt = Runtime::start(&pipeline("EMIT_COUNT: 300", "", ""));
    every_seq_at_sink(&rt.path("sink.jsonl"), 300, Duration::from_secs(60));
    let addr = http_addr(&rt);
    let (code, text) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    let Some(m) = parse_with_prometheus_client(&text) else { return };
    let status = rt.status();
    for i in status["instances"].as_array().unwrap() {
        let (svc, n) = (i["service"].as_str().unwrap(), i["instance"].to_string());
        let l = [("service", svc), ("instance", n.as_str())];
        assert_eq!(sample(&m, "aion_instance_kanbans_in_total", &l), i["kanbans_in"].as_f64(), "{svc} in");
        assert_eq!(sample(&m, "aion_instance_kanbans_out_total", &l), i["kanbans_out"].as_f64(), "{svc} out");
        assert_eq!(sample(&m, "aion_instance_queue_kanbans", &l), i["queue_depth"].as_f64(), "{svc} depth");
        assert_eq!(sample(&m, "aion_instance_restarts_total", &l), i["restarts"].as_f64(), "{svc} restarts");
        let state = i["state"].as_str().unwrap();
        let mut ls = l.to_vec();
        ls.push(("state", state));
        assert_eq!(sample(&m, "aion_instance_state", &ls), Some(1.0), "{svc} is {state}");
    }
    assert_eq!(sample(&m, "aion_instance_kanbans_in_total", &[("service", "sink")]), Some(300.0));
    // The store's commits and their latency histogram (count = commits).
    let commits = sample(&m, "aion_store_commits_total", &[]).unwrap();
    assert!(commits > 0.0);
    let count = sample(&m, "aion_store_commit_duration_seconds_count", &[]).unwrap();
    assert_eq!(count, commits, "one latency observation per commit");
    let inf = sample(&m, "aion_store_commit_duration_seconds_bucket", &[("le", "+Inf")]).unwrap();
    assert_eq!(inf, count);
    assert!(sample(&m, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(sample(&m, "process_open_fds", &[]).unwrap() > 3.0);
    // No unbounded label: no kanban id anywhere.
    assert!(!text.contains("kanban_id") && !text.contains("trace"), "{text}");
    assert_eq!(rt.stop(), 0);
}

#[test]
fn readyz_says_why_through_a_store_failure_and_a_shutdown() {
    let mut redis = Redis::start();
    let yaml = r#"
microservices:
  sink:
    command: ["{testkit}"]
    always: yes
    startup: yes
  stubborn:
    command: ["sh", "-c", "trap '' TERM; exec sleep 1000"]
    always: yes
    startup: yes
"#;
    let mut rt = Runtime::start_with_args(yaml, &["--store", &redis.url(), "--grace", "8"]);
    let addr = http_addr(&rt);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    // The store fails: Redis killed; a kanban to write makes the commit fail.
    if let Some(mut c) = redis.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    // (The CLI waits for the commit that cannot happen: it gives up after a second; the kanban stays queued.)
    let _ = rt.cli(&["--timeout", "1", "kanban", "send", "sink"]);
    let why = wait_until("readyz to fail on the store", Duration::from_secs(30), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 503).then_some(body)
    });
    assert!(why.contains("store (redis): commits are failing"), "{why}");
    assert_eq!(get(&addr, "/healthz").0, 200, "alive all the same");
    redis.kill9_and_restart();
    wait_until("readyz back after Redis returned", Duration::from_secs(30), || {
        (get(&addr, "/readyz").0 == 200).then_some(())
    });
    // Shutdown: `stubborn` ignores SIGTERM, so the runtime waits its grace period; meanwhile readyz says so.
    let pid = rt.pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let why = wait_until("readyz to say it is shutting down", Duration::from_secs(10), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 503).then_some(body)
    });
    assert!(why.contains("shutting down"), "{why}");
    let st = rt.child.take().unwrap().wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", rt.stderr());
}

#[test]
fn the_web_view_serves_its_page_the_graph_and_live_ticks() {
    let rt = Runtime::start(&pipeline("EMIT_COUNT: 50", "", ""));
    every_seq_at_sink(&rt.path("sink.jsonl"), 50, Duration::from_secs(60));
    let addr = http_addr(&rt);
    let (code, page) = get(&addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<svg") && page.contains("EventSource(\"/events\")"), "the page is compiled in");
    // Nothing fetched from elsewhere: the only absolute URL is the SVG namespace (an identifier, never loaded).
    let urls = page.matches("http://").count() + page.matches("https://").count();
    assert_eq!(urls, page.matches("http://www.w3.org/2000/svg").count(), "no CDN or other site");
    let (code, graph) = get(&addr, "/api/graph");
    assert_eq!(code, 200);
    let g: serde_json::Value = serde_json::from_str(&graph).unwrap();
    let names: Vec<&str> = g["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["relay", "sink", "source"]);
    let relay = g["services"].as_array().unwrap().iter().find(|s| s["name"] == "relay").unwrap();
    assert_eq!(relay["next"][0]["name"], "sink");
    // The event stream: its first tick at once, carrying every instance's counters.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 8192];
    while !got.contains("event: tick") || !got[got.find("event: tick").unwrap()..].contains("\n\n") {
        let n = s.read(&mut buf).expect("an event within 10 s");
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let data = got.lines().find_map(|l| l.strip_prefix("data: ")).expect("data line");
    let tick: serde_json::Value = serde_json::from_str(data).unwrap();
    let sink = tick["instances"].as_array().unwrap().iter().find(|i| i[0] == "sink").unwrap().clone();
    assert_eq!(sink[3], 50, "the sink's kanbans in: {sink}");
    // The tick names the graph it goes with (an open view fetches the graph again when it changes).
    assert_eq!(tick["graph"], g["version"], "tick {tick} and graph {g}");
    assert!(g["version"].as_str().is_some_and(|v| !v.is_empty()), "{g}");
}

/// chromedriver on a free port, killed with the test.
struct Driver(std::process::Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromedriver() -> Option<Driver> {
    let found = ["chromium", "chromedriver"].iter().all(|p| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        if std::env::var("AION_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
            panic!("AION_REQUIRE_CHROMIUM=1 but chromium or chromedriver is missing (apt-get install chromium chromium-driver)");
        }
        eprintln!("SKIPPED: no chromium/chromedriver (apt-get install chromium chromium-driver)");
        return None;
    }
    let port = common::free_port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver");
    let d = Driver(child, port);
    wait_until("chromedriver listening", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    Some(d)
}

#[test]
fn the_web_view_in_headless_chromium_shows_the_graph_and_its_counters_move() {
    let Some(driver) = chromedriver() else { return };
    // A pipeline with a scaled stage, a job and a route to a service that is not there (dead letters).
    let yaml = r#"
microservices:
  source:
    command: ["{testkit}"]
    startup: yes
    env: { EMIT_COUNT: 20 }
    nextService: { default: [ { name: relay }, { name: audit }, { name: ghost } ] }
  relay:
    command: ["{testkit}"]
    always: yes
    scale: 3
    env: { FORWARD: 1 }
    nextService: { default: [ { name: sink } ] }
  audit:
    command: ["{testkit}"]
  sink:
    command: ["{testkit}"]
    always: yes
    env: { RECORD: "{work}/sink.jsonl" }
"#;
    let rt = Runtime::start(yaml);
    every_seq_at_sink(&rt.path("sink.jsonl"), 20, Duration::from_secs(60));
    let addr = http_addr(&rt);
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,700"]}),
        );
        let c = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
            .expect("a WebDriver session");
        c.goto(&format!("http://{addr}/")).await.unwrap();
        // The graph: one node per service, drawn from /api/graph.
        for svc in ["source", "relay", "audit", "sink"] {
            c.wait()
                .at_most(Duration::from_secs(20))
                .for_element(fantoccini::Locator::Css(&format!("g.node[data-service={svc}]")))
                .await
                .unwrap_or_else(|e| panic!("{svc} is not drawn: {e}"));
        }
        let counted = |c: &fantoccini::Client| {
            let c = c.clone();
            async move {
                let v = c
                    .execute(
                        "const r = document.querySelector('g.node[data-service=sink] text.rate'); return r ? Number(r.getAttribute('data-in') || -1) : -1;",
                        vec![],
                    )
                    .await
                    .unwrap();
                v.as_i64().unwrap_or(-1)
            }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while counted(&c).await != 20 {
            assert!(std::time::Instant::now() < deadline, "the sink's counter never showed 20");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Kanbans flow: the counter moves (server-sent events, no reload).
        for _ in 0..5 {
            rt.send("relay", &[]);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while counted(&c).await != 25 {
            assert!(std::time::Instant::now() < deadline, "the sink's counter did not move to 25");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        // (docs/web-view.png is this picture.)
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-view.png");
        std::fs::write(&out, &png).unwrap();
        // `aion apply` of a project with one more service: the open view draws it, no reload.
        let next = yaml.replace(
            "  sink:\n",
            "  archive:\n    command: [\"{testkit}\"]\n  sink:\n    nextService: { default: [ { name: archive } ] }\n",
        );
        let file = rt.path("next.yml");
        std::fs::write(&file, common::fill(&next, rt.work.path())).unwrap();
        let (ok, out, err) = rt.cli(&["apply", &file.display().to_string()]);
        assert!(ok && out.contains("added: archive"), "{out}{err}");
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(fantoccini::Locator::Css("g.node[data-service=archive]"))
            .await
            .unwrap_or_else(|e| panic!("the applied service is not drawn in the open view: {e}"));
        c.close().await.unwrap();
    });
}

#[test]
fn aion_top_draws_the_instances_with_their_counters() {
    let rt = Runtime::start(&pipeline("EMIT_COUNT: 30", "", ""));
    every_seq_at_sink(&rt.path("sink.jsonl"), 30, Duration::from_secs(60));
    let (ok, frame, err) = rt.cli(&["top", "--once", "--width", "130", "--height", "14"]);
    assert!(ok, "{err}");
    assert!(frame.starts_with("aion top"), "{frame}");
    assert!(frame.lines().count() <= 14, "one frame of the asked height:\n{frame}");
    for svc in ["source", "relay", "sink"] {
        let row = frame
            .lines()
            .find(|l| l.contains(&format!("│{svc} ")))
            .unwrap_or_else(|| panic!("{svc} missing:\n{frame}"));
        assert!(row.contains("running"), "{row}");
    }
    let sink = frame.lines().find(|l| l.contains("│sink ")).unwrap();
    let cols: Vec<&str> = sink.trim_matches('│').split_whitespace().collect();
    assert_eq!(cols[4], "30", "the sink's IN column: {sink}");
}
