//! Erlang/OTP-style supervisors.
//!
//! A [`Supervisor`] starts its children in order, watches their exits and restarts them according to its
//! [`Strategy`] and each child's [`Restart`] policy. If more than `max_restarts` restarts happen within
//! `within`, it gives up: it stops the remaining children (in reverse start order) and exits with
//! [`ExitReason::Failed`], which its own parent sees as a child failure (escalation). Supervisors nest: a
//! supervisor is itself a child.

use super::{run_incarnation, spawn_future, Actor, Addr, ExitReason, Mailbox};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Which children are restarted when one exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only the child that exited.
    OneForOne,
    /// Every child (the others are stopped first, in reverse start order).
    OneForAll,
    /// The child that exited and every child started after it.
    RestForOne,
}

/// Whether a child is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always restarted.
    Permanent,
    /// Restarted only after an abnormal exit (panic, failure, kill).
    Transient,
    /// Never restarted.
    Temporary,
}

/// Restart intensity: at most `max_restarts` within `within`, else escalate.
#[derive(Debug, Clone, Copy)]
pub struct Intensity {
    /// Maximum number of restarts in the window.
    pub max_restarts: u32,
    /// The sliding window.
    pub within: Duration,
}

impl Default for Intensity {
    /// OTP's default: 3 restarts in 5 seconds.
    fn default() -> Self {
        Intensity { max_restarts: 3, within: Duration::from_secs(5) }
    }
}

/// One supervision event, kept for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The child's name.
    pub child: String,
    /// Why it exited.
    pub reason: ExitReason,
    /// True when the supervisor restarted it.
    pub restarted: bool,
}

/// Shared, read-only view of what a supervisor did.
#[derive(Debug, Default)]
pub struct Journal {
    events: Mutex<Vec<Event>>,
}

impl Journal {
    /// Every event so far (bounded: the most recent 1024).
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn push(&self, ev: Event) {
        if let Ok(mut e) = self.events.lock() {
            if e.len() >= 1024 {
                e.remove(0);
            }
            e.push(ev);
        }
    }
}

type ExitTx = mpsc::Sender<(usize, u64, ExitReason)>;

/// A running child, as the supervisor sees it.
trait Running: Send {
    fn stop(&self);
    fn kill(&self);
}

/// How to (re)start a child.
trait Starter: Send {
    /// Starts a new incarnation; its exit is reported on `exits` tagged with `(index, generation)`.
    fn start(&mut self, index: usize, generation: u64, exits: ExitTx) -> Box<dyn Running>;
}

/// The specification of one child.
pub struct ChildSpec {
    name: String,
    restart: Restart,
    starter: Box<dyn Starter>,
}

struct ActorStarter<A: Actor, F> {
    factory: F,
    mailbox: Arc<Mutex<Option<Mailbox<A>>>>,
    addr: Addr<A>,
}

impl<A: Actor> Running for Addr<A> {
    fn stop(&self) {
        Addr::stop(self)
    }
    fn kill(&self) {
        Addr::kill(self)
    }
}

impl<A: Actor, F: FnMut() -> A + Send + 'static> Starter for ActorStarter<A, F> {
    fn start(&mut self, index: usize, generation: u64, exits: ExitTx) -> Box<dyn Running> {
        let actor = (self.factory)();
        let slot = self.mailbox.clone();
        let taken = self.mailbox.lock().ok().and_then(|mut m| m.take());
        match taken {
            Some(mb) => spawn_future(async move {
                let (reason, mb) = run_incarnation(actor, mb).await;
                if let Ok(mut s) = slot.lock() {
                    *s = Some(mb);
                }
                let _ = exits.send((index, generation, reason)).await;
            }),
            None => {
                // Cannot happen: the supervisor waits for an exit (which returns the mailbox) before restarting.
                let _ = exits.try_send((index, generation, ExitReason::Failed("mailbox still in use".into())));
            }
        }
        Box::new(self.addr.clone())
    }
}

impl ChildSpec {
    /// A child actor built by `factory` on every (re)start, with a mailbox of `capacity` that survives restarts.
    /// Returns the spec and the child's permanent address.
    pub fn actor<A: Actor, F: FnMut() -> A + Send + 'static>(
        name: &str,
        restart: Restart,
        capacity: usize,
        factory: F,
    ) -> (ChildSpec, Addr<A>) {
        let mb = Mailbox::new(name, capacity);
        let addr = mb.addr();
        let starter = ActorStarter { factory, mailbox: Arc::new(Mutex::new(Some(mb))), addr: addr.clone() };
        (ChildSpec { name: name.to_owned(), restart, starter: Box::new(starter) }, addr)
    }

    /// A nested supervisor as a child.
    pub fn supervisor(name: &str, restart: Restart, sup: Supervisor) -> ChildSpec {
        ChildSpec {
            name: name.to_owned(),
            restart,
            starter: Box::new(SupStarter { slot: Arc::new(Mutex::new(Some(sup))) }),
        }
    }
}

/// A supervisor specification.
pub struct Supervisor {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    children: Vec<ChildSpec>,
    journal: Arc<Journal>,
    deferred: VecDeque<(usize, u64, ExitReason)>,
}

/// Handle to a running supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    ctl: mpsc::Sender<Ctl>,
    journal: Arc<Journal>,
    done: Arc<tokio::sync::watch::Sender<Option<ExitReason>>>,
}

enum Ctl {
    Stop,
    Kill,
}

impl Running for SupervisorHandle {
    fn stop(&self) {
        let _ = self.ctl.try_send(Ctl::Stop);
    }
    fn kill(&self) {
        let _ = self.ctl.try_send(Ctl::Kill);
    }
}

impl SupervisorHandle {
    /// Stops every child in reverse start order, then the supervisor; waits until done.
    pub async fn shutdown(&self) -> ExitReason {
        let _ = self.ctl.send(Ctl::Stop).await;
        self.wait().await
    }

    /// Waits until the supervisor has exited and returns why.
    pub async fn wait(&self) -> ExitReason {
        let mut rx = self.done.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return ExitReason::Failed("supervisor vanished".into());
            }
        }
    }

    /// What the supervisor did so far.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }
}

struct SupStarter {
    slot: Arc<Mutex<Option<Supervisor>>>,
}

impl Starter for SupStarter {
    fn start(&mut self, index: usize, generation: u64, exits: ExitTx) -> Box<dyn Running> {
        // The spec comes back into `slot` when the previous incarnation has exited.
        match self.slot.lock().ok().and_then(|mut s| s.take()) {
            Some(sup) => {
                let handle = sup.start_into(self.slot.clone());
                let h2 = handle.clone();
                spawn_future(async move {
                    let reason = h2.wait().await;
                    let _ = exits.send((index, generation, reason)).await;
                });
                Box::new(handle)
            }
            None => {
                let _ = exits.try_send((index, generation, ExitReason::Failed("supervisor spec in use".into())));
                Box::new(NoChild)
            }
        }
    }
}

struct NoChild;
impl Running for NoChild {
    fn stop(&self) {}
    fn kill(&self) {}
}

impl Supervisor {
    /// A supervisor with no children yet.
    pub fn new(name: &str, strategy: Strategy, intensity: Intensity) -> Supervisor {
        Supervisor {
            name: name.to_owned(),
            strategy,
            intensity,
            children: Vec::new(),
            journal: Arc::default(),
            deferred: VecDeque::new(),
        }
    }

    /// Adds a child; children start in the order they are added and stop in reverse.
    pub fn child(mut self, spec: ChildSpec) -> Supervisor {
        self.children.push(spec);
        self
    }

    /// Starts every child and supervises them.
    pub fn start(self) -> SupervisorHandle {
        self.start_into(Arc::new(Mutex::new(None)))
    }

    /// Starts; when the supervisor exits, its spec is put back into `slot` so it can be started again.
    fn start_into(self, slot: Arc<Mutex<Option<Supervisor>>>) -> SupervisorHandle {
        let (ctl, ctl_rx) = mpsc::channel(4);
        let (done, _) = tokio::sync::watch::channel(None);
        let handle = SupervisorHandle { ctl, journal: self.journal.clone(), done: Arc::new(done) };
        let h = handle.clone();
        spawn_future(async move {
            let (reason, spec) = self.run(ctl_rx).await;
            if let Ok(mut s) = slot.lock() {
                *s = Some(spec);
            }
            h.done.send_replace(Some(reason));
        });
        handle
    }

    async fn run(mut self, mut ctl: mpsc::Receiver<Ctl>) -> (ExitReason, Supervisor) {
        let n = self.children.len();
        let (exit_tx, mut exit_rx) = mpsc::channel::<(usize, u64, ExitReason)>(n.max(1) * 4);
        let mut running: Vec<Option<Box<dyn Running>>> = (0..n).map(|_| None).collect();
        let mut generation = vec![0u64; n];
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        for i in 0..n {
            running[i] = Some(self.children[i].starter.start(i, generation[i], exit_tx.clone()));
        }
        let reason = loop {
            let exit = match self.deferred.pop_front() {
                Some(e) => e,
                None => tokio::select! {
                    c = ctl.recv() => {
                        let kill = matches!(c, Some(Ctl::Kill));
                        self.stop_range(0..n, &mut running, &mut generation, &mut exit_rx, kill).await;
                        break if kill { ExitReason::Killed } else { ExitReason::Stopped };
                    }
                    Some(e) = exit_rx.recv() => e,
                },
            };
            {
                let (i, gen, reason) = exit;
                {
                    if gen != generation[i] || running[i].is_none() {
                        continue; // a stale exit of an incarnation we already replaced
                    }
                    running[i] = None;
                    let spec = &self.children[i];
                    let restart = match spec.restart {
                        Restart::Permanent => true,
                        Restart::Transient => reason.is_abnormal(),
                        Restart::Temporary => false,
                    };
                    tracing::warn!(supervisor = %self.name, child = %spec.name, ?reason, restart, "child exited");
                    self.journal.push(Event { child: spec.name.clone(), reason: reason.clone(), restarted: restart });
                    if !restart {
                        continue;
                    }
                    let now = Instant::now();
                    restarts.push_back(now);
                    while restarts.front().is_some_and(|t| now.duration_since(*t) > self.intensity.within) {
                        restarts.pop_front();
                    }
                    if restarts.len() as u32 > self.intensity.max_restarts {
                        tracing::error!(supervisor = %self.name, "restart intensity exceeded; escalating");
                        self.stop_range(0..n, &mut running, &mut generation, &mut exit_rx, false).await;
                        break ExitReason::Failed(format!(
                            "{}: more than {} restarts in {:?} (last: {} {:?})",
                            self.name,
                            self.intensity.max_restarts,
                            self.intensity.within,
                            self.children[i].name,
                            reason
                        ));
                    }
                    let range = match self.strategy {
                        Strategy::OneForOne => i..i + 1,
                        Strategy::OneForAll => 0..n,
                        Strategy::RestForOne => i..n,
                    };
                    self.stop_range(range.clone(), &mut running, &mut generation, &mut exit_rx, false).await;
                    for j in range {
                        generation[j] += 1;
                        running[j] = Some(self.children[j].starter.start(j, generation[j], exit_tx.clone()));
                    }
                }
            }
        };
        (reason, self)
    }

    /// Stops the running children in `range`, last first, and waits for each exit (kill after 5 s).
    async fn stop_range(
        &mut self,
        range: std::ops::Range<usize>,
        running: &mut [Option<Box<dyn Running>>],
        generation: &mut [u64],
        exit_rx: &mut mpsc::Receiver<(usize, u64, ExitReason)>,
        kill: bool,
    ) {
        for j in range.rev() {
            let Some(child) = running[j].take() else {
                continue;
            };
            let already = self.deferred.iter().position(|(i, g, _)| *i == j && *g == generation[j]);
            if let Some(pos) = already {
                self.deferred.remove(pos); // it exited on its own while we were stopping another child
                continue;
            }
            if kill {
                child.kill();
            } else {
                child.stop();
            }
            let deadline = tokio::time::sleep(Duration::from_secs(5));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    ev = exit_rx.recv() => match ev {
                        Some((i, g, _)) if i == j && g == generation[j] => break,
                        // Another child exited meanwhile: handle it after this stop completes.
                        Some(other) => self.deferred.push_back(other),
                        None => break,
                    },
                    _ = &mut deadline => {
                        tracing::error!(supervisor = %self.name, child = %self.children[j].name, "did not stop in 5 s; killing");
                        child.kill();
                        deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// A oneshot-based request helper: send `make(reply_tx)` to `addr` and await the reply.
///
/// # Errors
/// `None` when the actor is gone or dropped the reply.
pub async fn ask<A: Actor, R>(addr: &Addr<A>, make: impl FnOnce(oneshot::Sender<R>) -> A::Msg) -> Option<R> {
    let (tx, rx) = oneshot::channel();
    addr.send(make(tx)).await.ok()?;
    rx.await.ok()
}
