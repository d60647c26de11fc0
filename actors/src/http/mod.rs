//! The runtime's HTTP endpoint (`aion run --http ADDR`, default `127.0.0.1:9480`; docs/observability.md): off the
//! hot path — everything it shows is read from counters the runtime keeps anyway, when it is asked.
//!
//! - `/metrics`: Prometheus text format (prometheus-client), built from one status snapshot per scrape
//!   ([`metrics`]);
//! - `/healthz`: the runtime answers (its control plane and broker are alive);
//! - `/readyz`: the store is committing, the endpoints are bound, the runtime is not shutting down — or 503 with
//!   the reasons, one per line;
//! - `/`: the live web view (one page compiled into the binary), fed by `/api/graph` (the services.yml graph) and
//!   `/events` (server-sent events: what changed, every second);
//! - `/api/status`: the status document (`aion status --json`).

pub mod metrics;

use crate::control::StatusReport;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the endpoint shows, from the node.
pub(crate) trait Source: Send + Sync + 'static {
    /// The status document.
    fn report(&self) -> BoxFuture<'_, Option<StatusReport>>;
    /// Why the runtime is not ready (empty: ready).
    fn unready(&self) -> Vec<String>;
    /// The services.yml graph: services, their routes, devices.
    fn graph(&self) -> serde_json::Value;
}

/// The handlers' state: the node, and the latest tick for `/events` (one status snapshot a second for every
/// viewer together, taken only while someone watches).
#[derive(Clone)]
struct Shared {
    source: Arc<dyn Source>,
    ticks: watch::Receiver<String>,
    viewers: Arc<Viewers>,
}

/// Open `/events` streams: the ticker works only while there is one, and sleeps otherwise.
#[derive(Default)]
struct Viewers {
    open: std::sync::atomic::AtomicUsize,
    first: tokio::sync::Notify,
}

/// Counts an open `/events` stream while it lives.
struct Viewer(Arc<Viewers>);

impl Viewer {
    fn new(v: &Arc<Viewers>) -> Viewer {
        if v.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            v.first.notify_one();
        }
        Viewer(v.clone())
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Binds the HTTP listener (before anything starts).
///
/// # Errors
/// A one-line reason (the address is taken…).
pub(crate) fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    crate::session::bind_tcp(
        addr,
        "HTTP",
        " (another aion listens there: `--http ADDR` picks another address, `--http off` turns it off)",
    )
}

/// Serves until `stopping` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn Source>,
    mut stopping: watch::Receiver<bool>,
) {
    let (tick_tx, ticks) = watch::channel(String::new());
    let ticker_source = source.clone();
    let viewers = Arc::new(Viewers::default());
    let watching = viewers.clone();
    let ticker = async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Only while a view is open: asleep (no timer) until the first one opens.
            if watching.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                watching.first.notified().await;
                every.reset_immediately();
            }
            every.tick().await;
            if let Some(body) = tick_now(ticker_source.as_ref()).await {
                tick_tx.send_if_modified(|cur| {
                    if *cur == body {
                        false
                    } else {
                        *cur = body;
                        true
                    }
                });
            }
        }
    };
    let source = Shared { source, ticks, viewers };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(index))
        .route("/api/graph", get(graph))
        .route("/api/status", get(status))
        .route("/events", get(events))
        .with_state(source);
    let until = async move {
        while !*stopping.borrow_and_update() {
            if stopping.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        r = axum::serve(listener, app).with_graceful_shutdown(until) => {
            if let Err(e) = r {
                tracing::error!("HTTP endpoint failed: {e}");
            }
        }
        () = ticker => {}
    }
}

async fn metrics_page(State(s): State<Shared>) -> Response {
    match s.source.report().await {
        Some(r) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics::encode(r))
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "the runtime is not answering\n").into_response(),
    }
}

async fn healthz(State(s): State<Shared>) -> Response {
    // Alive: the broker answers a status request within a second.
    match tokio::time::timeout(Duration::from_secs(1), s.source.report()).await {
        Ok(Some(_)) => (StatusCode::OK, "ok\n").into_response(),
        Ok(None) => (StatusCode::SERVICE_UNAVAILABLE, "the service broker is not answering\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the runtime did not answer within 1 s\n").into_response(),
    }
}

async fn readyz(State(s): State<Shared>) -> Response {
    let why = s.source.unready();
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", why.join("\n"))).into_response()
    }
}

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("view.html")).into_response()
}

async fn graph(State(s): State<Shared>) -> Response {
    let mut g = s.source.graph();
    let version = graph_version(&g);
    if let Some(o) = g.as_object_mut() {
        o.insert("version".into(), version.into());
    }
    axum::Json(g).into_response()
}

/// A fingerprint of the graph, in every tick and in `/api/graph`: an open view fetches the graph again when it
/// changes (`aion apply`, `aion delete`). A string: a 64-bit number does not survive JavaScript.
fn graph_version(g: &serde_json::Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    g.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

async fn status(State(s): State<Shared>) -> Response {
    match s.source.report().await {
        Some(r) => axum::Json(r).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the runtime is not answering\n").into_response(),
    }
}

/// The tick of now, as sent on `/events` (`None` while the runtime does not answer).
async fn tick_now(source: &dyn Source) -> Option<String> {
    let r = source.report().await?;
    Some(tick(&r, &graph_version(&source.graph())).to_string())
}

/// The compact, per-second view of what moves: one row per instance, dead letters, devices, cluster nodes.
fn tick(r: &StatusReport, graph_version: &str) -> serde_json::Value {
    let instances: Vec<serde_json::Value> = r
        .instances
        .iter()
        .map(|i| {
            serde_json::json!([
                i.service,
                i.instance,
                i.state.as_str(),
                i.kanbans_in,
                i.kanbans_out,
                i.queue_depth,
                i.connected,
                i.restarts,
                i.pod.as_ref().map(|p| p.state.clone()),
            ])
        })
        .collect();
    let devices: Vec<serde_json::Value> = r
        .federation
        .iter()
        .flat_map(|f| f.devices.iter())
        .map(|d| serde_json::json!({"name": d.name, "state": d.state, "outbox": d.outbox, "rtt_us": d.rtt_us}))
        .collect();
    let nodes: Vec<serde_json::Value> = r
        .cluster
        .iter()
        .flat_map(|c| c.nodes.iter())
        .map(|n| serde_json::json!({"name": n.name, "role": n.role, "connected": n.connected, "instances": n.instances.len()}))
        .collect();
    serde_json::json!({
        "device": r.device_name,
        "graph": graph_version,
        "uptime_secs": r.uptime_secs,
        "instances": instances,
        "dead_letters": r.dead_letters,
        "recent_dead_letters": r.recent_dead_letters.iter().take(5).collect::<Vec<_>>(),
        "devices": devices,
        "nodes": nodes,
    })
}

/// Server-sent events: a `tick` of now at once, then each one that differs (at most one a second).
async fn events(State(s): State<Shared>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let viewer = Viewer::new(&s.viewers);
    let mut rx = s.ticks.clone();
    rx.borrow_and_update();
    let first = tick_now(s.source.as_ref()).await;
    let stream = futures::stream::unfold((rx, first, viewer), |(mut rx, first, viewer)| async move {
        if let Some(now) = first {
            return Some((Ok(Event::default().event("tick").data(now)), (rx, None, viewer)));
        }
        if rx.changed().await.is_err() {
            return None;
        }
        let body = rx.borrow_and_update().clone();
        Some((Ok(Event::default().event("tick").data(body)), (rx, None, viewer)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
