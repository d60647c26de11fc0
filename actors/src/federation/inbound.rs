//! The receiving side: accepts links from peer devices and delivers what they carry to the services here.
//!
//! A link is accepted only from a device this configuration lists, whose certificate (checked against the
//! cluster CA and its revocation list during the TLS handshake) names the device its hello claims. Kanbans are
//! acknowledged once committed here: queued (durably, for durable services, after the store's commit) or
//! dead-lettered here with their reason.

use super::outbound::mono_us;
use super::{read_frame, tls, write_frame, Federation, Peer};
use aion_transport::federation::{Frame, Incoming, LinkError, Receiver};
use aion_transport::FrameDecoder;
use rustls::pki_types::CertificateDer;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Accepts connections until the endpoint closes.
pub(super) async fn accept_loop(f: Arc<Federation>) -> String {
    if let Some(a) = f.listen {
        tracing::info!(addr = %a, device = %f.me, "federation listening (QUIC, mutual TLS)");
    }
    while let Some(incoming) = f.endpoint.accept().await {
        let f2 = f.clone();
        let _ = f.tasks.spawn("federation inbound link", serve(f2, incoming));
    }
    "the QUIC endpoint closed".into()
}

/// Counts a refusal, logs it with its reason, and tells the peer when there is a stream to tell it on.
async fn refuse(
    f: &Federation,
    reason: &'static str,
    remote: std::net::SocketAddr,
    why: String,
    cs: Option<&mut quinn::SendStream>,
) {
    f.refused.count(reason);
    tracing::warn!(%remote, reason, "federation link refused: {why}");
    if let Some(cs) = cs {
        let _ = write_frame(cs, &Frame::Refuse { reason: why }).await;
        let _ = cs.finish();
        // Let the refusal reach the peer before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(1), cs.stopped()).await;
    }
}

async fn serve(f: Arc<Federation>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let timing = f.opts.timing;
    let dead = Duration::from_micros(timing.dead_after);
    let conn = match tokio::time::timeout(dead, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refuse(&f, "tls", remote, format!("TLS handshake failed: {e}"), None).await,
        Err(_) => return refuse(&f, "tls", remote, "TLS handshake not completed in time".into(), None).await,
    };
    let cert: Option<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|v| v.into_iter().next());
    let (mut cs, mut cr) = match tokio::time::timeout(dead, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => return refuse(&f, "protocol", remote, "no control stream".into(), None).await,
    };
    let mut cdec = FrameDecoder::default();
    let hello = match tokio::time::timeout(dead, read_frame(&mut cr, &mut cdec)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Err(e)) => return refuse(&f, "protocol", remote, format!("unreadable hello: {e}"), Some(&mut cs)).await,
        _ => return refuse(&f, "protocol", remote, "no hello".into(), Some(&mut cs)).await,
    };
    let from = match &hello {
        Frame::Hello { from, .. } => from.clone(),
        Frame::Join { .. } => {
            let Some(m) = f.master.get().cloned() else {
                return refuse(&f, "not-master", remote, "this device is not a cluster master".into(), Some(&mut cs))
                    .await;
            };
            match m.join(hello, remote) {
                Ok(reply) => {
                    let _ = write_frame(&mut cs, &reply).await;
                    let _ = cs.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), cs.stopped()).await;
                }
                Err((reason, why)) => refuse(&f, reason, remote, format!("join refused: {why}"), Some(&mut cs)).await,
            }
            return;
        }
        Frame::Attach { name, .. } => {
            let name = name.clone();
            let Some(m) = f.master.get().cloned() else {
                return refuse(&f, "not-master", remote, "this device is not a cluster master".into(), Some(&mut cs))
                    .await;
            };
            match cert.as_ref().map(|c| tls::names(c, &name)) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    let why = format!("a node attaches as `{name}`, but {e}");
                    return refuse(&f, "wrong-name", remote, why, Some(&mut cs)).await;
                }
                None => return refuse(&f, "tls", remote, "no client certificate".into(), Some(&mut cs)).await,
            }
            let why = m.attach(hello, remote, cs, cr, cdec).await;
            tracing::debug!(node = %name, "control connection ended: {why}");
            conn.close(quinn::VarInt::from_u32(0), b"control connection ended");
            return;
        }
        Frame::Ask { from, request } => {
            let (from, request) = (from.clone(), request.clone());
            return answer(&f, remote, cert.as_ref(), &from, request, cs).await;
        }
        other => {
            let why = format!("expected a hello, got a {} frame", other.name());
            return refuse(&f, "protocol", remote, why, Some(&mut cs)).await;
        }
    };
    let Some(peer) = f.peer(&from) else {
        let why = format!("device `{from}` is not in this device's services.yml (devices:)");
        return refuse(&f, "unknown-device", remote, why, Some(&mut cs)).await;
    };
    match cert.as_ref().map(|c| tls::names(c, &from)) {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            let why = format!("the peer claims to be `{from}`, but {e}");
            return refuse(&f, "wrong-name", remote, why, Some(&mut cs)).await;
        }
        None => return refuse(&f, "tls", remote, "no client certificate".into(), Some(&mut cs)).await,
    }
    // A master relays a link for a device the sender cannot reach (docs/cluster.md: Topology).
    let relay_to: Option<String> = match &hello {
        Frame::Hello { to, .. } if *to != f.me && f.master.get().is_some() && f.peer(to).is_some() => Some(to.clone()),
        _ => None,
    };
    let me = relay_to.clone().unwrap_or_else(|| f.me.clone());
    let (rx, welcome) = match Receiver::accept(&me, hello, f.opts.window, timing, mono_us()) {
        Ok(r) => r,
        Err(e) => {
            let reply = e.refusal();
            let reason = match e {
                LinkError::Version(..) => "version",
                LinkError::Refused(_) => "not-for-us",
                _ => "protocol",
            };
            f.refused.count(reason);
            tracing::warn!(%remote, device = %from, reason, "federation link refused: {e}");
            let _ = write_frame(&mut cs, &reply).await;
            let _ = cs.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), cs.stopped()).await;
            return;
        }
    };
    if write_frame(&mut cs, &welcome).await.is_err() {
        return;
    }
    peer.heard();
    peer.inbound_open.fetch_add(1, Ordering::Relaxed);
    tracing::info!(device = %from, %remote, "federation link from {from} accepted");
    let rx = Mutex::new(rx);
    if let Some(to) = &relay_to {
        tracing::warn!(device = %from, to = %to, "relaying a link from {from} to {to} (it cannot reach {to} directly)");
    }
    let end = link(&f, &peer, &conn, &rx, cs, cr, cdec, relay_to.as_deref()).await;
    peer.inbound_open.fetch_sub(1, Ordering::Relaxed);
    match end {
        LinkEnd::Protocol(why) => {
            // A broken or hostile peer: what it had sent before is committed; the link closes, and is counted.
            f.refused.count("protocol");
            tracing::warn!(device = %from, %remote, "federation link from {from} closed: {why}");
        }
        LinkEnd::Other(why) => tracing::info!(device = %from, "federation link from {from} ended: {why}"),
    }
    conn.close(quinn::VarInt::from_u32(0), b"link ended");
}

/// A request over the network ([`Frame::Ask`]): from an admin identity, any control request but `stop`; from
/// a peer device of this one, a local trace query only. Refused (and counted) otherwise.
async fn answer(
    f: &Federation,
    remote: std::net::SocketAddr,
    cert: Option<&CertificateDer<'static>>,
    from: &str,
    request: Vec<u8>,
    mut cs: quinn::SendStream,
) {
    match cert.map(|c| tls::names(c, from)) {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            let why = format!("a request from `{from}`, but {e}");
            return refuse(f, "wrong-name", remote, why, Some(&mut cs)).await;
        }
        None => return refuse(f, "tls", remote, "no client certificate".into(), Some(&mut cs)).await,
    }
    let admin = from.ends_with(tls::ADMIN_SUFFIX);
    let req = crate::control::parse_request(&request).map(|e| e.request);
    let allowed = match &req {
        Ok(crate::control::Request::Stop) => {
            Err("`stop` is not taken over the network (stop the runtime on its device)")
        }
        Ok(_) if admin => Ok(()),
        Ok(crate::control::Request::Trace { local: true, .. }) if f.peer(from).is_some() => Ok(()),
        Ok(_) if f.peer(from).is_some() => {
            Err("a peer device may only ask for its trace rows; this needs an admin identity")
        }
        Ok(_) => Err("unknown identity: neither an admin (`aion cluster issue NAME --admin`) nor a device of this one"),
        Err(_) => Err("unreadable request"),
    };
    if let Err(why) = allowed {
        let reason = if req.is_err() { "protocol" } else { "not-admin" };
        return refuse(f, reason, remote, format!("request from `{from}` refused: {why}"), Some(&mut cs)).await;
    }
    let Some(hook) = f.admin.get().cloned() else {
        return refuse(f, "not-admin", remote, "this runtime takes no requests yet".into(), Some(&mut cs)).await;
    };
    if admin {
        tracing::info!(%remote, admin = %from, request = ?req.as_ref().ok(), "control request over the network");
    }
    let reply = hook(request).await;
    if write_frame(&mut cs, &Frame::Answer { reply }).await.is_ok() {
        let _ = cs.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), cs.stopped()).await;
    }
}

fn with<R>(rx: &Mutex<Receiver>, f: impl FnOnce(&mut Receiver) -> R) -> Result<R, String> {
    rx.lock().map(|mut g| f(&mut g)).map_err(|_| "link state poisoned".to_owned())
}

/// Why an accepted link ended: the peer broke the protocol (garbage, a gap, credit overdrawn: counted), or
/// anything else (a lost connection, silence, a shutdown).
enum LinkEnd {
    Protocol(String),
    Other(String),
}

impl From<String> for LinkEnd {
    fn from(e: String) -> LinkEnd {
        LinkEnd::Other(e)
    }
}

impl From<&str> for LinkEnd {
    fn from(e: &str) -> LinkEnd {
        LinkEnd::Other(e.to_owned())
    }
}

fn read_end(what: &str, e: super::ReadError) -> LinkEnd {
    match e {
        super::ReadError::Malformed(m) => LinkEnd::Protocol(format!("{what}: malformed frame: {m}")),
        super::ReadError::Io(m) => LinkEnd::Other(format!("{what}: {m}")),
    }
}

fn link_end(e: LinkError) -> LinkEnd {
    match e {
        LinkError::Silent(_) => LinkEnd::Other(e.to_string()),
        _ => LinkEnd::Protocol(e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn link(
    f: &Federation,
    peer: &Peer,
    conn: &quinn::Connection,
    rx: &Mutex<Receiver>,
    mut cs: quinn::SendStream,
    mut cr: quinn::RecvStream,
    mut cdec: FrameDecoder,
    relay_to: Option<&str>,
) -> LinkEnd {
    let timing = f.opts.timing;
    let control = async {
        let mut tick = super::heartbeat_tick(&timing);
        loop {
            tokio::select! {
                r = read_frame(&mut cr, &mut cdec) => {
                    let frame = r.map_err(|e| read_end("control stream", e))?.ok_or("the peer closed the control stream")?;
                    if matches!(frame, Frame::Kanbans { .. }) {
                        return Err(LinkEnd::Protocol("kanbans on the control stream".to_owned()));
                    }
                    let now = mono_us();
                    match with(rx, |r| r.on_frame(frame, now))? {
                        Ok(Incoming::Reply(p)) => write_frame(&mut cs, &p).await.map_err(|e| format!("pong: {e}"))?,
                        Ok(Incoming::Deliver { .. }) => return Err(LinkEnd::Protocol("kanbans on the control stream".to_owned())),
                        Err(e) => return Err(link_end(e)),
                    }
                    peer.heard();
                }
                _ = tick.tick() => {
                    let now = mono_us();
                    with(rx, |r| r.tick(now))?.map_err(link_end)?;
                }
            }
        }
    };
    tokio::pin!(control);
    // The kanban stream is the first the sender opens after the control stream; file streams come after it.
    let first = tokio::select! {
        s = conn.accept_bi() => s.map_err(|e| LinkEnd::Other(format!("no kanban stream: {e}"))),
        r = &mut control => Err(r.err().unwrap_or(LinkEnd::Other(String::new()))),
    };
    let (mut ds, mut dr) = match first {
        Ok(s) => s,
        Err(e) => return e,
    };
    // Send Anything: each file on its own stream, a few at once.
    let files = async {
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                s = conn.accept_bi() => {
                    let (send, recv) = s.map_err(|e| LinkEnd::Other(format!("connection: {e}")))?;
                    if relay_to.is_some() {
                        super::files::turn_away(send, "files are not relayed: they wait for a direct link").await;
                    } else if running.len() >= super::files::STREAMS_PER_DEVICE {
                        super::files::turn_away(send, "busy").await;
                    } else {
                        running.push(super::files::receive(f, peer, send, recv));
                    }
                }
                Some(()) = futures::StreamExt::next(&mut running), if !running.is_empty() => {}
            }
        }
    };
    let data = async {
        let mut dec = FrameDecoder::default();
        loop {
            let frame = read_frame(&mut dr, &mut dec)
                .await
                .map_err(|e| read_end("kanban stream", e))?
                .ok_or("the peer closed the kanban stream")?;
            let now = mono_us();
            let (first, items) = match with(rx, |r| r.on_frame(frame, now))? {
                Ok(Incoming::Deliver { first, items }) => (first, items),
                Ok(Incoming::Reply(p)) => {
                    write_frame(&mut ds, &p).await.map_err(|e| format!("kanban stream: {e}"))?;
                    continue;
                }
                Err(e) => return Err(link_end(e)),
            };
            peer.heard();
            let n = items.len() as u64;
            deliver(f, peer, items, relay_to).await?;
            if let Some(ack) = with(rx, |r| r.committed(first + n))? {
                write_frame(&mut ds, &ack).await.map_err(|e| format!("ack: {e}"))?;
            }
        }
    };
    let r: Result<(), LinkEnd> = tokio::select! {
        r = &mut control => r,
        r = data => r,
        r = files => r,
        _ = peer.kick.notified() => Err(LinkEnd::Other("revoked".to_owned())),
    };
    r.err().unwrap_or(LinkEnd::Other(String::new()))
}

/// Delivers kanbans from `peer` here, in order, each once (the peer's dedup window, held until they are
/// committed); returns once they are committed.
async fn deliver(
    f: &Federation,
    peer: &Peer,
    items: Vec<aion_transport::federation::Crossing>,
    relay_to: Option<&str>,
) -> Result<(), String> {
    let router = &f.router;
    let mut dedup = peer.dedup.lock().await;
    let mut persisted = false;
    let mut new_route = false;
    for c in items {
        peer.received.fetch_add(1, Ordering::Relaxed);
        if !dedup.first_time(&c.service, c.kanban.id) {
            peer.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device = %peer.name, kanban = %c.kanban.id, "kanban received again (recognised)");
            continue;
        }
        let mut k = Box::new(c.kanban);
        k.hops = c.hops;
        let instance = k.process_number;
        if let Some(to) = relay_to {
            // Into this master's outbox to `to`: committed here before the sender's acknowledgement.
            match router.relay(to, &c.service, k).await {
                Ok((p, new)) => {
                    persisted |= p;
                    new_route |= new;
                }
                Err(k) => {
                    peer.undeliverable.fetch_add(1, Ordering::Relaxed);
                    let detail = format!("from device `{}` to relay to `{to}`, which is not a device here", peer.name);
                    router.dead_letter(crate::routing::dead::Reason::UnknownService, detail, k);
                }
            }
            continue;
        }
        match router.deliver(&c.service, instance, k).await {
            Ok(p) => persisted |= p,
            Err((reason, k)) => {
                peer.undeliverable.fetch_add(1, Ordering::Relaxed);
                let detail = format!(
                    "from device `{}`: {} instance {instance} is not defined on this device (`{}`)",
                    peer.name, c.service, f.me
                );
                router.dead_letter(reason, detail, k);
            }
        }
    }
    if persisted {
        if let Some(store) = router.store() {
            store.barrier().await.map_err(|e| format!("the store did not commit: {e}"))?;
        }
    }
    if new_route {
        // A route relayed for the first time: the link to its device starts (or is replaced).
        f.reconfigure();
    }
    Ok(())
}
