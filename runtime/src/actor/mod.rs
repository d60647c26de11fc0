//! Our small actor facade.
//!
//! An actor owns its state and handles one message at a time from a **bounded** mailbox. The facade hides the
//! executor: actors run on the current actix arbiter when there is one (the `aion` binary runs inside an
//! `actix::System`), and on the ambient tokio runtime otherwise. Swapping actix out means changing
//! [`spawn_future`] only.
//!
//! Semantics (see `docs/runtime-semantics.md`):
//! - messages from one sender are handled in the order they were sent;
//! - [`Addr::send`] waits for mailbox space (back-pressure); [`Addr::try_send`] fails fast and gives the message
//!   back; there is no unbounded send;
//! - a panic inside a handler is caught, ends that incarnation with [`ExitReason::Panicked`], and never takes the
//!   arbiter or the process down;
//! - the mailbox outlives an incarnation: a supervisor restart keeps queued messages and every [`Addr`] valid.

pub mod supervisor;

use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// An actor: state plus a message handler.
pub trait Actor: Send + Sized + 'static {
    /// The message type of its mailbox.
    type Msg: Send + 'static;

    /// Called once per incarnation before the first message.
    fn started(&mut self, _ctx: &mut Context<Self>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Handles one message. A panic here is caught and reported to the supervisor.
    fn handle(&mut self, msg: Self::Msg, ctx: &mut Context<Self>) -> impl Future<Output = ()> + Send;

    /// Called when the actor stops normally (not on kill or panic).
    fn stopped(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why an actor incarnation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The actor asked to stop ([`Context::stop`]). Dropping every [`Addr`] does not stop an actor.
    Normal,
    /// [`Addr::stop`] was called.
    Stopped,
    /// [`Addr::kill`] was called.
    Killed,
    /// A handler panicked; the text is the panic message.
    Panicked(String),
    /// The actor (or a supervisor) failed, e.g. a supervisor exceeded its restart intensity.
    Failed(String),
}

impl ExitReason {
    /// True when the exit is abnormal (restarted by a `Transient` policy).
    pub fn is_abnormal(&self) -> bool {
        matches!(self, ExitReason::Panicked(_) | ExitReason::Failed(_) | ExitReason::Killed)
    }
}

/// Control signal of an incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Run,
    Stop,
    Kill,
}

/// Error from [`Addr::send`]: the actor is gone for good; the message is given back.
#[derive(Debug)]
pub struct SendError<M>(pub M);

impl<M> std::fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("actor mailbox closed")
    }
}
impl<M: std::fmt::Debug> std::error::Error for SendError<M> {}

/// Error from [`Addr::try_send`]; the message is given back.
#[derive(Debug)]
pub enum TrySendError<M> {
    /// The mailbox is full (back-pressure).
    Full(M),
    /// The actor is gone for good.
    Closed(M),
}

/// A handle to an actor's mailbox. Cheap to clone; stays valid across supervisor restarts.
pub struct Addr<A: Actor> {
    tx: mpsc::Sender<A::Msg>,
    ctl: Arc<watch::Sender<Signal>>,
    name: Arc<str>,
}

impl<A: Actor> Clone for Addr<A> {
    fn clone(&self) -> Self {
        Addr { tx: self.tx.clone(), ctl: self.ctl.clone(), name: self.name.clone() }
    }
}

impl<A: Actor> Addr<A> {
    /// Sends a message, waiting for mailbox space.
    ///
    /// # Errors
    /// [`SendError`] when the mailbox is closed (the actor stopped and will not be restarted).
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped, the message was not queued.
    pub async fn send(&self, msg: A::Msg) -> Result<(), SendError<A::Msg>> {
        self.tx.send(msg).await.map_err(|e| SendError(e.0))
    }

    /// Sends a message without waiting.
    ///
    /// # Errors
    /// [`TrySendError::Full`] when the mailbox is full, [`TrySendError::Closed`] when the actor is gone.
    pub fn try_send(&self, msg: A::Msg) -> Result<(), TrySendError<A::Msg>> {
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) => TrySendError::Full(m),
            mpsc::error::TrySendError::Closed(m) => TrySendError::Closed(m),
        })
    }

    /// Asks the actor to stop after the message it is handling; `stopped` runs. Queued messages stay in the
    /// mailbox (a restarted incarnation handles them).
    pub fn stop(&self) {
        self.ctl.send_replace(Signal::Stop);
    }

    /// Stops the actor at its next await point, abandoning the current message; `stopped` does not run.
    pub fn kill(&self) {
        self.ctl.send_replace(Signal::Kill);
    }

    /// The actor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Messages waiting in the mailbox.
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// True while the mailbox can still take messages.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// What a handler can do to its own actor.
pub struct Context<A: Actor> {
    addr: Addr<A>,
    stop: bool,
    failed: Option<String>,
}

impl<A: Actor> Context<A> {
    /// The actor's own address.
    pub fn addr(&self) -> Addr<A> {
        self.addr.clone()
    }

    /// Stop after this message (exit reason [`ExitReason::Normal`]).
    pub fn stop(&mut self) {
        self.stop = true;
    }

    /// Stop after this message (or after `started`) with [`ExitReason::Failed`]: the supervisor treats it like
    /// a crash.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.failed = Some(reason.into());
        self.stop = true;
    }
}

/// A mailbox that exists independently of any incarnation.
pub struct Mailbox<A: Actor> {
    addr: Addr<A>,
    rx: mpsc::Receiver<A::Msg>,
    ctl_rx: watch::Receiver<Signal>,
}

impl<A: Actor> Mailbox<A> {
    /// A bounded mailbox of `capacity` messages (at least 1).
    pub fn new(name: &str, capacity: usize) -> Mailbox<A> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (ctl, ctl_rx) = watch::channel(Signal::Run);
        Mailbox { addr: Addr { tx, ctl: Arc::new(ctl), name: name.into() }, rx, ctl_rx }
    }

    /// The address of this mailbox.
    pub fn addr(&self) -> Addr<A> {
        self.addr.clone()
    }
}

/// The text of a caught panic payload.
pub use aion_model::panic_message;

/// Runs one incarnation of `actor` on `mailbox` until it exits; gives the mailbox back with the reason.
///
/// Panics in `started`, `handle` and `stopped` are caught.
pub async fn run_incarnation<A: Actor>(mut actor: A, mut mb: Mailbox<A>) -> (ExitReason, Mailbox<A>) {
    mb.addr.ctl.send_replace(Signal::Run);
    mb.ctl_rx.mark_unchanged();
    let mut ctx = Context { addr: mb.addr.clone(), stop: false, failed: None };
    if let Err(p) = AssertUnwindSafe(actor.started(&mut ctx)).catch_unwind().await {
        return (ExitReason::Panicked(panic_message(&*p)), mb);
    }
    if let Some(f) = ctx.failed.take() {
        return (ExitReason::Failed(f), mb);
    }
    let reason = loop {
        let sig = *mb.ctl_rx.borrow_and_update();
        match sig {
            Signal::Kill => break ExitReason::Killed,
            Signal::Stop => break ExitReason::Stopped,
            Signal::Run => {}
        }
        let msg = tokio::select! {
            biased;
            _ = mb.ctl_rx.changed() => continue,
            m = mb.rx.recv() => m,
        };
        let Some(msg) = msg else {
            break ExitReason::Normal;
        };
        let handled = AssertUnwindSafe(actor.handle(msg, &mut ctx)).catch_unwind();
        let killed = async {
            loop {
                if mb.ctl_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if *mb.ctl_rx.borrow() == Signal::Kill {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            r = handled => {
                if let Err(p) = r {
                    break ExitReason::Panicked(panic_message(&*p));
                }
            }
            _ = killed => break ExitReason::Killed,
        }
        if let Some(f) = ctx.failed.take() {
            break ExitReason::Failed(f);
        }
        if ctx.stop {
            break ExitReason::Normal;
        }
    };
    if matches!(reason, ExitReason::Normal | ExitReason::Stopped) {
        if let Err(p) = AssertUnwindSafe(actor.stopped()).catch_unwind().await {
            return (ExitReason::Panicked(panic_message(&*p)), mb);
        }
    }
    (reason, mb)
}

/// Runs a future on the executor: the current actix arbiter if there is one, else the ambient tokio runtime.
///
/// This is the one place that names actix; swap it here.
pub fn spawn_future<F: Future<Output = ()> + Send + 'static>(fut: F) {
    match actix::Arbiter::try_current() {
        Some(arbiter) => {
            if !arbiter.spawn(fut) {
                tracing::error!("actix arbiter is stopped; the actor could not be spawned");
            }
        }
        None => {
            tokio::spawn(fut);
        }
    }
}

/// Spawns an unsupervised actor with a mailbox of `capacity`. `on_exit` is called with the exit reason.
///
/// # Examples
/// ```
/// use aion_runtime::actor::{spawn, Actor, Context};
/// struct Counter(u64, tokio::sync::mpsc::Sender<u64>);
/// impl Actor for Counter {
///     type Msg = u64;
///     async fn handle(&mut self, n: u64, _ctx: &mut Context<Self>) {
///         self.0 += n;
///         let _ = self.1.send(self.0).await;
///     }
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let (tx, mut rx) = tokio::sync::mpsc::channel(4);
/// let addr = spawn("counter", Counter(0, tx), 16, |_| {});
/// addr.send(2).await.unwrap();
/// addr.send(3).await.unwrap();
/// assert_eq!(rx.recv().await, Some(2));
/// assert_eq!(rx.recv().await, Some(5));
/// # });
/// ```
pub fn spawn<A: Actor>(
    name: &str,
    actor: A,
    capacity: usize,
    on_exit: impl FnOnce(ExitReason) + Send + 'static,
) -> Addr<A> {
    let mb = Mailbox::new(name, capacity);
    let addr = mb.addr();
    spawn_future(async move {
        let (reason, _mb) = run_incarnation(actor, mb).await;
        on_exit(reason);
    });
    addr
}
