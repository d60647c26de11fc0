//! The status-kanban endpoint: the actor that owns the Unix socket microservices connect to. It accepts
//! connections and runs each as a link session ([`crate::session::link`]) in the node's session task set, and
//! opens direct sessions for in-process services.

use crate::session::{open_session, Shared};
use aion_runtime::actor::{Actor, Context};
use aion_runtime::task::Tasks;
use aion_transport::{unix_split, ClientMsg, LinkReader, LinkWriter, ServerMsg};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::AbortHandle;

/// The server side of a link.
pub type ServerLink = (LinkReader<ClientMsg>, LinkWriter<ServerMsg>);

/// Messages of the endpoint actor.
pub enum EndpointMsg {
    /// Serve an in-process service's link.
    Attach(ServerLink),
    /// Open a direct session for an in-process service instance (see [`crate::direct`]).
    AttachDirect {
        /// Service.
        service: String,
        /// Instance.
        instance: u32,
        /// The session, or why it was refused.
        reply: tokio::sync::oneshot::Sender<Result<crate::session::direct::DirectSession, String>>,
    },
    /// Stop accepting new connections (shutdown step 1); replies when done.
    StopAccepting(tokio::sync::oneshot::Sender<()>),
}

/// Shared session counters.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Sessions opened.
    pub sessions: AtomicU64,
    /// Connections closed for a protocol violation (garbage, bad version, unknown service…).
    pub rejected: AtomicU64,
}

/// The status-kanban endpoint actor.
pub struct Endpoint {
    shared: Shared,
    socket: PathBuf,
    /// Sessions (and the accept loop): owned by the node, so they outlive a restart of this actor and the
    /// node's shutdown waits for them.
    tasks: Tasks,
    accept: Option<AbortHandle>,
    prebound: Option<tokio::net::UnixListener>,
}

impl Endpoint {
    /// An endpoint that will listen on `socket`; `prebound` is used instead of binding when given (the node
    /// binds before announcing readiness, so clients never race the first incarnation).
    pub(crate) fn new(
        shared: Shared,
        socket: PathBuf,
        tasks: Tasks,
        prebound: Option<tokio::net::UnixListener>,
    ) -> Endpoint {
        Endpoint { shared, socket, tasks, accept: None, prebound }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

/// Binds a Unix socket with owner-only permissions, replacing a stale socket file.
///
/// # Errors
/// I/O errors.
pub fn bind_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl Actor for Endpoint {
    type Msg = EndpointMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) {
        let listener = match self.prebound.take().map_or_else(|| bind_private(&self.socket), Ok) {
            Ok(l) => l,
            Err(e) => return ctx.fail(format!("cannot listen on {}: {e}", self.socket.display())),
        };
        tracing::info!(socket = %self.socket.display(), "status-kanban endpoint listening");
        let shared = self.shared.clone();
        let tasks = self.tasks.clone();
        let accept = self.tasks.spawn("accept loop", async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (r, w) = unix_split(stream);
                        let _ = tasks.spawn("link session", crate::session::link::session(shared.clone(), r, w));
                    }
                    Err(e) => {
                        tracing::error!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        self.accept = Some(accept);
    }

    async fn handle(&mut self, msg: EndpointMsg, _ctx: &mut Context<Self>) {
        match msg {
            EndpointMsg::Attach((r, w)) => {
                let _ = self.tasks.spawn("link session", crate::session::link::session(self.shared.clone(), r, w));
            }
            EndpointMsg::AttachDirect { service, instance, reply } => {
                let shared = self.shared.clone();
                let opened = open_session(&shared, &service, instance, 0, false)
                    .inspect(|o| o.slot.set_session_kind(crate::routing::slot::SessionKind::InProcess))
                    .map(|o| crate::session::direct::DirectSession::new(shared, o));
                if let Err(reason) = &opened {
                    self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("in-process session refused: {reason}");
                }
                let _ = reply.send(opened);
            }
            EndpointMsg::StopAccepting(done) => {
                if let Some(a) = self.accept.take() {
                    a.abort();
                }
                let _ = std::fs::remove_file(&self.socket);
                let _ = done.send(());
            }
        }
    }
}
