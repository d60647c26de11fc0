//! The service broker: starts instances (at startup or lazily on their first kanban), restarts `always`
//! instances with exponential backoff, re-runs `always: no` jobs when more kanbans arrive, reports crash loops,
//! and stops everything in order at shutdown.

use crate::backend::{Control, ExitInfo, Running, SharedBackend};
use crate::routing::{Lifecycle, Router};
use aion_runtime::actor::{Actor, Context};
use aion_runtime::task::Tasks;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
// Tokio's clock (the same as std's outside tests): the broker's timing is tested on a paused clock.
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Restart backoff: starts at 100 ms, doubles per quick exit, capped at 10 s; reset after 10 s of stable running.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Backoff cap.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Running at least this long counts as stable and resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Before a session's first acknowledgement or output, the ack timeout is this many times longer (the service may
/// be in a long start).
pub const START_GRACE_FACTOR: u32 = 10;

/// This many consecutive quick exits is a crash loop.
pub const CRASH_LOOP_AFTER: u32 = 5;

/// Messages of the broker.
pub enum BrokerMsg {
    /// From the router.
    Lifecycle(Lifecycle),
    /// An instance ended.
    Exited {
        /// Service.
        service: String,
        /// Instance.
        instance: u32,
        /// Incarnation it belongs to.
        gen: u64,
        /// How it ended.
        info: ExitInfo,
    },
    /// A backoff delay elapsed.
    RestartDue {
        /// Service.
        service: String,
        /// Instance.
        instance: u32,
        /// Incarnation that scheduled it.
        gen: u64,
    },
    /// Snapshot of every instance.
    Status(oneshot::Sender<Vec<InstanceStatus>>),
    /// Stop every instance (SIGTERM, then SIGKILL after `grace`); replies when all have exited.
    Shutdown(Duration, oneshot::Sender<()>),
    /// The grace period of a shutdown elapsed.
    KillRemaining,
    /// Time to check for instances that do not acknowledge (with an ack timeout), and for gRPC clients that
    /// lost their session and did not come back.
    CheckLiveness,
    /// The router has a new configuration ([`crate::routing::Router::reconfigure`]): start the instances of
    /// services added, restart those of services changed (SIGTERM, SIGKILL after `grace`), stop those of services
    /// removed. Replies once it has begun (instances stop and start on their own time).
    Reconfigure(crate::routing::Change, Duration, oneshot::Sender<()>),
    /// The grace period of an instance being retired by a reconfiguration elapsed.
    KillRetired(String, u32, u64),
}

/// What happens to an instance stopped by a reconfiguration once it has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retire {
    /// Its service (or this instance number) is gone: forget it.
    Remove,
    /// Its service changed: start it again with the new definition.
    Restart,
}

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Not started yet (started on its first kanban).
    Idle,
    /// Running.
    Running,
    /// Waiting to be restarted.
    Backoff,
    /// Restarting repeatedly after quick exits; still retried at the capped backoff.
    CrashLoop,
    /// A job (`always: no`) that finished successfully; started again by its next kanban.
    Completed,
    /// A job that failed with nothing left to process.
    Failed,
    /// Could not be started (see `last_exit`).
    NotRunnable,
    /// Being stopped.
    Stopping,
    /// Stopped at shutdown.
    Stopped,
}

impl State {
    /// Every state, in the order of the lifecycle (the series of `aion_instance_state`).
    pub const ALL: [State; 9] = [
        State::Idle,
        State::Running,
        State::Stopping,
        State::Backoff,
        State::CrashLoop,
        State::NotRunnable,
        State::Completed,
        State::Failed,
        State::Stopped,
    ];

    /// Its name in `aion status` (as serialised: kebab-case).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Running => "running",
            State::Backoff => "backoff",
            State::CrashLoop => "crash-loop",
            State::Completed => "completed",
            State::Failed => "failed",
            State::NotRunnable => "not-runnable",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

/// One row of `aion status` (and of `instances` in `aion status --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Service.
    pub service: String,
    /// Instance number.
    pub instance: u32,
    /// State.
    pub state: State,
    /// Process id (0 when not running or in-process).
    pub pid: u32,
    /// Restarts so far.
    pub restarts: u32,
    /// Kanbans queued for it.
    pub kanbans_in: u64,
    /// Outputs accepted from it.
    pub kanbans_out: u64,
    /// Kanbans waiting (in memory, and not yet paged in from the store).
    pub queue_depth: usize,
    /// Memory held by its queued and in-flight kanbans (bytes).
    #[serde(default)]
    pub queue_bytes: usize,
    /// Delivered, not yet acknowledged.
    pub inflight: usize,
    /// A session is connected.
    pub connected: bool,
    /// The kind of the connected session's client (`native`, `in-process`, `grpc`).
    #[serde(default)]
    pub session: Option<crate::routing::slot::SessionKind>,
    /// Redeliveries after a session ended unacknowledged.
    pub redelivered: u64,
    /// Duplicate outputs dropped.
    pub duplicates: u64,
    /// How long the oldest unacknowledged delivery has been waiting (ms; 0 when none is in flight).
    #[serde(default)]
    pub oldest_inflight_ms: u64,
    /// Sessions cut off (and processes killed) for no acknowledgement within `--ack-timeout`.
    #[serde(default)]
    pub ack_timeouts: u64,
    /// Restarts because its gRPC client lost its session and did not come back within `--grpc-reconnect`.
    #[serde(default)]
    pub grpc_lost: u64,
    /// How it last ended.
    pub last_exit: Option<String>,
    /// It sent a terminate kanban.
    pub terminated: bool,
    /// What runs it: the backend and the program (or image, or registered service).
    #[serde(default)]
    pub backend: Option<crate::backend::Description>,
    /// Its pod, when it runs on Kubernetes (state from the API server, not from "we sent the request").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::backend::PodState>,
}

struct Inst {
    state: State,
    gen: u64,
    pid: u32,
    control: Option<Box<dyn Control>>,
    restarts: u32,
    quick_exits: u32,
    started_at: Option<Instant>,
    last_exit: Option<String>,
    terminated: bool,
    /// Being stopped by a reconfiguration, and what then.
    retire: Option<Retire>,
}

impl Inst {
    fn idle() -> Inst {
        Inst {
            state: State::Idle,
            gen: 0,
            pid: 0,
            control: None,
            restarts: 0,
            quick_exits: 0,
            started_at: None,
            last_exit: None,
            terminated: false,
            retire: None,
        }
    }
}

/// The broker actor.
pub struct Broker {
    router: Arc<Router>,
    backend: SharedBackend,
    /// What the backend runs for each service.
    described: BTreeMap<String, crate::backend::Description>,
    insts: BTreeMap<(String, u32), Inst>,
    next_gen: u64,
    shutdown: Option<(Vec<oneshot::Sender<()>>, bool)>,
    pending_start: VecDeque<(String, u32)>,
    ack_timeout: Option<Duration>,
    /// How long a gRPC client that lost its session may take to come back before it is restarted.
    grpc_reconnect: Option<Duration>,
    /// The exit watchers, restart timers and liveness ticker of this incarnation (aborted with it: a later
    /// incarnation starts its incarnation numbers afresh).
    tasks: Tasks,
    /// What the liveness checker last saw of each connected instance.
    progress: std::collections::HashMap<(String, u32), Progress>,
}

/// An instance's progress as last seen by the liveness checker.
struct Progress {
    session: u64,
    /// Outputs accepted plus acknowledgements.
    progress: u64,
    /// When it last changed (or deliveries were last all acknowledged).
    at: Instant,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.tasks.abort_quietly();
    }
}

impl Broker {
    /// A broker over `router`'s services, running them on `backend`.
    pub fn new(router: Arc<Router>, backend: SharedBackend) -> Broker {
        let mut insts = BTreeMap::new();
        let mut described = BTreeMap::new();
        for ms in router.config().microservices.values() {
            described.insert(ms.name.clone(), backend.describe(ms));
            for n in 1..=ms.scale.max(1) {
                insts.insert((ms.name.clone(), n), Inst::idle());
            }
        }
        Broker {
            router,
            backend,
            described,
            insts,
            next_gen: 0,
            shutdown: None,
            pending_start: VecDeque::new(),
            ack_timeout: None,
            grpc_reconnect: None,
            tasks: Tasks::new("broker"),
            progress: std::collections::HashMap::new(),
        }
    }

    /// Cuts off (and kills) an instance whose oldest delivery has waited longer than `timeout` for its
    /// acknowledgement (a hung service); `None`: never (the age is still shown in the status).
    pub fn with_ack_timeout(mut self, timeout: Option<Duration>) -> Broker {
        self.ack_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Restarts an instance whose gRPC client lost its session (no terminate kanban) and has not opened one again
    /// within `bound`: AION's Python client can stay alive doing nothing after its stream failed (docs/grpc.md).
    /// A process that never had a gRPC session is never restarted for that.
    pub fn with_grpc_reconnect(mut self, bound: Option<Duration>) -> Broker {
        self.grpc_reconnect = bound.filter(|b| !b.is_zero());
        self
    }

    fn check_grpc_lost(&mut self) {
        let Some(bound) = self.grpc_reconnect else { return };
        if self.shutdown.is_some() {
            return;
        }
        for slot in self.router.slots() {
            let Some(lost) = slot.grpc_lost_for() else { continue };
            if lost <= bound {
                continue;
            }
            slot.clear_grpc_lost();
            let Some(inst) = self.insts.get(&(slot.service.clone(), slot.instance)) else { continue };
            let Some(control) = &inst.control else { continue };
            slot.stats.grpc_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                service = %slot.service,
                instance = slot.instance,
                lost_ms = lost.as_millis() as u64,
                "unhealthy: its gRPC client lost its session without a terminate kanban and did not come back within {}s; restarting it",
                bound.as_secs_f64()
            );
            control.kill();
        }
    }

    /// Kills and cuts off every instance past the ack timeout; their kanbans are redelivered.
    /// Cuts off the instances that made no progress (no acknowledgement, no output) for longer than the ack
    /// timeout while deliveries were in flight — once their session has shown a sign of life: a service still in
    /// a long `start` is not judged, and one busy emitting is making progress.
    fn check_liveness(&mut self) {
        let Some(limit) = self.ack_timeout else { return };
        if self.shutdown.is_some() {
            return;
        }
        let now = Instant::now();
        for slot in self.router.slots() {
            let key = (slot.service.clone(), slot.instance);
            let Some((session, busy, progress, alive)) = slot.liveness() else {
                self.progress.remove(&key);
                continue;
            };
            let seen = self.progress.entry(key.clone()).or_insert(Progress { session, progress, at: now });
            if seen.session != session || seen.progress != progress || !busy {
                *seen = Progress { session, progress, at: now };
                continue;
            }
            let stalled = now.duration_since(seen.at);
            // Before any sign of life the service may still be starting: it gets ten times as long.
            let allowed = if alive { limit } else { limit * START_GRACE_FACTOR };
            if stalled <= allowed {
                continue;
            }
            tracing::warn!(
                service = %slot.service,
                instance = slot.instance,
                stalled_ms = stalled.as_millis() as u64,
                "no acknowledgement and no output within the ack timeout ({}s) with deliveries waiting: the instance is cut off and killed; its kanbans are redelivered",
                limit.as_secs_f64()
            );
            self.progress.remove(&key);
            let client = slot.session_pid();
            slot.evict();
            // Kill our process only if the hung session is its (a stranger's session is cut off, no more).
            if let Some(inst) = self.insts.get(&key) {
                if let (Some(st), true) = (&inst.control, inst.pid > 0 && client == Some(inst.pid)) {
                    st.kill();
                }
            }
        }
    }

    async fn start(&mut self, service: &str, instance: u32, ctx: &Context<Self>) {
        if self.shutdown.is_some() {
            return;
        }
        let key = (service.to_owned(), instance);
        let Some(inst) = self.insts.get(&key) else {
            return;
        };
        if matches!(inst.state, State::Running | State::Stopping | State::Backoff | State::CrashLoop) {
            return; // already running, or a restart is scheduled
        }
        let Some(ms) = self.router.config().microservices.get(service).cloned() else {
            return;
        };
        self.next_gen += 1;
        let gen = self.next_gen;
        let backend = self.backend.clone();
        let started: Result<Running, String> = backend.start(&ms, instance, gen).await;
        let Some(inst) = self.insts.get_mut(&key) else {
            return;
        };
        match started {
            Ok(s) => {
                tracing::info!(service, instance, pid = s.pid, "instance started");
                if inst.started_at.is_some() {
                    inst.restarts += 1; // every start after the first: restarts, and job re-runs
                }
                inst.state = State::Running;
                inst.gen = gen;
                inst.pid = s.pid;
                inst.control = Some(s.control);
                inst.started_at = Some(Instant::now());
                let addr = ctx.addr();
                let (svc, exit) = (service.to_owned(), s.exit);
                self.tasks.spawn("exit watcher", async move {
                    let info = exit.await;
                    let _ = addr.send(BrokerMsg::Exited { service: svc, instance, gen, info }).await;
                });
            }
            Err(e) => {
                tracing::error!(service, instance, "{e}");
                inst.state = State::NotRunnable;
                inst.last_exit = Some(e);
                inst.gen = gen;
                if let Some(slot) = self.router.slot(service, instance) {
                    slot.start_requested.store(false, Ordering::SeqCst);
                }
                // Retry with backoff like a crash, so a transient spawn failure heals; shown as not runnable
                // meanwhile.
                self.schedule_restart(service, instance, ctx);
                if let Some(inst) = self.insts.get_mut(&key) {
                    inst.state = State::NotRunnable;
                }
            }
        }
    }

    fn schedule_restart(&mut self, service: &str, instance: u32, ctx: &Context<Self>) {
        let Some(inst) = self.insts.get_mut(&(service.to_owned(), instance)) else {
            return;
        };
        inst.quick_exits += 1;
        let exp = inst.quick_exits.saturating_sub(1).min(16);
        let delay = (BACKOFF_START * 2u32.pow(exp)).min(BACKOFF_MAX);
        inst.state = if inst.quick_exits >= CRASH_LOOP_AFTER { State::CrashLoop } else { State::Backoff };
        if inst.state == State::CrashLoop {
            tracing::error!(service, instance, quick_exits = inst.quick_exits, ?delay, "crash loop");
        }
        let gen = inst.gen;
        let addr = ctx.addr();
        let service = service.to_owned();
        self.tasks.spawn("restart timer", async move {
            tokio::time::sleep(delay).await;
            let _ = addr.send(BrokerMsg::RestartDue { service, instance, gen }).await;
        });
    }

    async fn exited(&mut self, service: String, instance: u32, gen: u64, info: ExitInfo, ctx: &Context<Self>) {
        let key = (service.clone(), instance);
        let always = self.router.config().microservices.get(&service).is_some_and(|m| m.always);
        let depth = self.router.slot(&service, instance).map_or(0, |s| s.depth());
        let Some(inst) = self.insts.get_mut(&key) else {
            return;
        };
        if inst.gen != gen {
            return;
        }
        inst.pid = 0;
        inst.control = None;
        inst.last_exit = Some(info.to_string());
        self.backend.exited(&service, instance, gen);
        match inst.retire.take() {
            Some(Retire::Remove) => {
                tracing::info!(service, instance, "{info}; removed by the new configuration");
                self.insts.remove(&key);
                if !self.insts.keys().any(|(s, _)| *s == service)
                    && !self.router.config().microservices.contains_key(&service)
                {
                    self.described.remove(&service);
                }
                self.maybe_finish_shutdown();
                return;
            }
            Some(Retire::Restart) if self.shutdown.is_none() => {
                tracing::info!(service, instance, "{info}; starting it with its new definition");
                inst.state = State::Idle;
                inst.quick_exits = 0;
                let startup = self.router.config().microservices.get(&service).is_some_and(|m| m.startup);
                if always || startup || depth > 0 {
                    self.pending_start.push_back(key);
                }
                return;
            }
            _ => {}
        }
        let ran = inst.started_at.map_or(Duration::ZERO, |t| t.elapsed());
        if ran >= STABLE_AFTER {
            inst.quick_exits = 0;
        }
        if let Some(slot) = self.router.slot(&service, instance) {
            slot.start_requested.store(false, Ordering::SeqCst);
        }
        if self.shutdown.is_some() {
            inst.state = State::Stopped;
            tracing::info!(service, instance, "{info}; stopped");
            self.maybe_finish_shutdown();
            return;
        }
        tracing::info!(service, instance, ran_ms = ran.as_millis() as u64, "instance ended: {info}");
        if always {
            self.schedule_restart(&service, instance, ctx);
        } else if info.success() {
            inst.state = State::Completed;
            inst.quick_exits = 0;
            if depth > 0 {
                self.pending_start.push_back(key);
            }
        } else if depth > 0 {
            self.schedule_restart(&service, instance, ctx);
        } else {
            inst.state = State::Failed;
        }
    }

    /// Carries out a new configuration (see [`BrokerMsg::Reconfigure`]).
    async fn reconfigure(&mut self, ch: &crate::routing::Change, grace: Duration, ctx: &Context<Self>) {
        if self.shutdown.is_some() {
            return;
        }
        let cfg = self.router.config();
        let mut to_start: Vec<(String, u32)> = Vec::new();
        for name in ch.removed.iter().chain(&ch.changed).chain(&ch.added) {
            let new = cfg.microservices.get(name);
            if let Some(ms) = new {
                self.described.insert(name.clone(), self.backend.describe(ms));
            }
            let scale = new.map_or(0, |m| m.scale.max(1));
            let changed = ch.changed.contains(name);
            let existing: Vec<u32> = self.insts.keys().filter(|(s, _)| s == name).map(|(_, n)| *n).collect();
            for n in existing {
                let retire = if n > scale {
                    Retire::Remove
                } else if changed {
                    Retire::Restart
                } else {
                    continue;
                };
                let key = (name.clone(), n);
                let Some(inst) = self.insts.get_mut(&key) else { continue };
                match &inst.control {
                    Some(st) => {
                        tracing::info!(service = %name, instance = n, pid = inst.pid, "stopping: its definition changed");
                        st.terminate();
                        inst.state = State::Stopping;
                        inst.retire = Some(retire);
                        let (addr, s, gen) = (ctx.addr(), name.clone(), inst.gen);
                        self.tasks.spawn("retire grace", async move {
                            tokio::time::sleep(grace).await;
                            let _ = addr.send(BrokerMsg::KillRetired(s, n, gen)).await;
                        });
                    }
                    None if retire == Retire::Remove => {
                        self.insts.remove(&key);
                    }
                    None => {
                        // Not running (idle, completed, failed, backing off): the new definition is used at its next
                        // start; a pending restart timer of the old incarnation is ignored (new incarnation number).
                        inst.state = State::Idle;
                        inst.quick_exits = 0;
                        self.next_gen += 1;
                        inst.gen = self.next_gen;
                        if new.is_some_and(|m| m.startup) {
                            to_start.push(key);
                        }
                    }
                }
            }
            if let Some(ms) = new {
                for n in 1..=scale {
                    if let std::collections::btree_map::Entry::Vacant(e) = self.insts.entry((name.clone(), n)) {
                        e.insert(Inst::idle());
                        if ms.startup {
                            to_start.push((name.clone(), n));
                        }
                    }
                }
            } else if !self.insts.keys().any(|(s, _)| s == name) {
                self.described.remove(name);
            }
        }
        tracing::info!(added = ?ch.added, changed = ?ch.changed, removed = ?ch.removed, "new configuration applied");
        for (s, n) in to_start {
            self.start(&s, n, ctx).await;
        }
        // Kanbans already queued for a service added back (kept in its slot) start it too.
        for slot in self.router.slots() {
            if slot.depth() > 0 && ch.added.contains(&slot.service) {
                self.start(&slot.service, slot.instance, ctx).await;
            }
        }
    }

    fn maybe_finish_shutdown(&mut self) {
        let all_down = self.insts.values().all(|i| i.control.is_none());
        if all_down {
            self.backend.all_stopped();
            if let Some((waiters, _)) = self.shutdown.as_mut() {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }

    fn status(&self) -> Vec<InstanceStatus> {
        self.insts
            .iter()
            .map(|((s, n), i)| {
                let slot = self.router.slot(s, *n);
                let slot = slot.as_deref();
                let st = |f: fn(&crate::routing::slot::SlotStats) -> &std::sync::atomic::AtomicU64| {
                    slot.map_or(0, |sl| f(&sl.stats).load(Ordering::Relaxed))
                };
                InstanceStatus {
                    service: s.clone(),
                    instance: *n,
                    state: i.state,
                    pid: i.pid,
                    restarts: i.restarts,
                    kanbans_in: st(|x| &x.kanbans_in),
                    kanbans_out: st(|x| &x.kanbans_out),
                    queue_depth: slot.map_or(0, |sl| sl.depth()),
                    queue_bytes: slot.map_or(0, |sl| sl.bytes()),
                    inflight: slot.map_or(0, |sl| sl.inflight()),
                    connected: slot.is_some_and(|sl| sl.connected.load(Ordering::SeqCst)),
                    session: slot.and_then(|sl| sl.session_kind()),
                    redelivered: st(|x| &x.redelivered),
                    duplicates: st(|x| &x.duplicates),
                    oldest_inflight_ms: slot
                        .and_then(|sl| sl.oldest_inflight_age())
                        .map_or(0, |a| a.as_millis().min(u64::MAX as u128) as u64),
                    ack_timeouts: st(|x| &x.ack_timeouts),
                    grpc_lost: st(|x| &x.grpc_lost),
                    last_exit: i.last_exit.clone(),
                    terminated: i.terminated,
                    backend: self.described.get(s).cloned(),
                    pod: self.backend.observe(s, *n),
                }
            })
            .collect()
    }
}

impl Actor for Broker {
    type Msg = BrokerMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) {
        let checked = [self.ack_timeout, self.grpc_reconnect].into_iter().flatten().min();
        if let Some(limit) = checked {
            let addr = ctx.addr();
            let every = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
            self.tasks.spawn("liveness ticker", async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if addr.send(BrokerMsg::CheckLiveness).await.is_err() {
                        return;
                    }
                }
            });
        }
        // A fresh incarnation knows no instances: clean up whatever a previous one (or a killed runtime) left.
        let n = self.backend.recover();
        if n > 0 {
            tracing::warn!(killed = n, "cleaned up instances left by a previous run");
        }
        let startup: Vec<(String, u32)> = self
            .router
            .config()
            .microservices
            .values()
            .filter(|m| m.startup)
            .flat_map(|m| (1..=m.scale.max(1)).map(move |n| (m.name.clone(), n)))
            .collect();
        // Also anything already queued (kanbans that arrived before a broker restart).
        let queued: Vec<(String, u32)> =
            self.router.slots().iter().filter(|s| s.depth() > 0).map(|s| (s.service.clone(), s.instance)).collect();
        for (s, n) in startup.into_iter().chain(queued) {
            self.start(&s, n, ctx).await;
        }
    }

    async fn handle(&mut self, msg: BrokerMsg, ctx: &mut Context<Self>) {
        match msg {
            BrokerMsg::Lifecycle(Lifecycle::Start(s, n)) => {
                let running = self.insts.get(&(s.clone(), n)).is_some_and(|i| i.state == State::Running);
                self.start(&s, n, ctx).await;
                if !running {
                    if let Some(i) = self.insts.get(&(s.clone(), n)) {
                        if i.state != State::Running {
                            // Not started (backoff or shutdown): let the next kanban or restart ask again.
                            if let Some(slot) = self.router.slot(&s, n) {
                                slot.start_requested.store(false, Ordering::SeqCst);
                            }
                        }
                    }
                }
            }
            BrokerMsg::Lifecycle(Lifecycle::Terminated(s, n)) => {
                if let Some(i) = self.insts.get_mut(&(s, n)) {
                    i.terminated = true;
                }
            }
            BrokerMsg::Exited { service, instance, gen, info } => {
                self.exited(service, instance, gen, info, ctx).await;
            }
            BrokerMsg::RestartDue { service, instance, gen } => {
                let due = self.insts.get(&(service.clone(), instance)).is_some_and(|i| {
                    i.gen == gen && matches!(i.state, State::Backoff | State::CrashLoop | State::NotRunnable)
                });
                if due {
                    let always = self.router.config().microservices.get(&service).is_some_and(|m| m.always);
                    let depth = self.router.slot(&service, instance).map_or(0, |s| s.depth());
                    let startup = self.router.config().microservices.get(&service).is_some_and(|m| m.startup);
                    if always || depth > 0 || startup {
                        if let Some(i) = self.insts.get_mut(&(service.clone(), instance)) {
                            i.state = State::Idle;
                        }
                        self.start(&service, instance, ctx).await;
                    } else if let Some(i) = self.insts.get_mut(&(service, instance)) {
                        i.state = State::Failed;
                    }
                }
            }
            BrokerMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            BrokerMsg::Shutdown(grace, reply) => {
                let first = self.shutdown.is_none();
                self.shutdown.get_or_insert_with(|| (Vec::new(), false)).0.push(reply);
                if first {
                    // Producers being stopped must not stay blocked on full queues downstream: their outputs are
                    // accepted without waiting (bounded by their output windows), so they finish and exit.
                    self.router.stopping();
                    for ((s, n), i) in self.insts.iter_mut() {
                        if let Some(st) = &i.control {
                            tracing::info!(service = %s, instance = n, pid = i.pid, "stopping");
                            st.terminate();
                            i.state = State::Stopping;
                        } else if i.state != State::Idle {
                            i.state = State::Stopped;
                        }
                    }
                    let addr = ctx.addr();
                    self.tasks.spawn("shutdown grace", async move {
                        tokio::time::sleep(grace).await;
                        let _ = addr.send(BrokerMsg::KillRemaining).await;
                    });
                }
                self.maybe_finish_shutdown();
            }
            BrokerMsg::CheckLiveness => {
                self.check_liveness();
                self.check_grpc_lost();
            }
            BrokerMsg::Reconfigure(ch, grace, reply) => {
                self.reconfigure(&ch, grace, ctx).await;
                let _ = reply.send(());
            }
            BrokerMsg::KillRetired(s, n, gen) => {
                if let Some(i) = self.insts.get(&(s.clone(), n)).filter(|i| i.gen == gen && i.retire.is_some()) {
                    if let Some(st) = &i.control {
                        tracing::warn!(service = %s, instance = n, pid = i.pid, "did not stop within the grace period; SIGKILL");
                        st.kill();
                    }
                }
            }
            BrokerMsg::KillRemaining => {
                for ((s, n), i) in &self.insts {
                    if let Some(st) = &i.control {
                        tracing::warn!(service = %s, instance = n, pid = i.pid, "did not stop within the grace period; SIGKILL");
                        st.kill();
                    }
                }
            }
        }
        while let Some((s, n)) = self.pending_start.pop_front() {
            self.start(&s, n, ctx).await;
        }
    }

    async fn stopped(&mut self) {
        // Stopped without a Shutdown (e.g. a supervisor restart of the tree): do not leave processes behind.
        for i in self.insts.values() {
            if let Some(st) = &i.control {
                st.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The broker's policy against a scripted backend, on a paused clock: which instances start when, the
    //! restart backoff, job re-runs, start failures and the shutdown sequence.
    use super::*;
    use crate::backend::{Backend, Description, LogSource};
    use crate::routing::slot::QueueLimits;
    use aion_runtime::actor::{spawn, Addr};
    use aion_runtime::config::{load_str, Microservice};
    use aion_runtime::kanban::Kanban;
    use futures::future::BoxFuture;
    use std::collections::HashMap;

    #[test]
    fn state_names_are_the_serialised_ones() {
        for s in State::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;
    use tokio::sync::mpsc;
    use tokio::time::Instant as TInstant;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Recover,
        Start(String, u32),
        StartFailed(String, u32),
        Terminate(String, u32),
        Kill(String, u32),
        Exited(String, u32),
        AllStopped,
    }

    type Exits = Arc<Mutex<HashMap<(String, u32), oneshot::Sender<ExitInfo>>>>;

    struct Scripted {
        events: mpsc::UnboundedSender<(Ev, TInstant)>,
        exits: Exits,
        fail_starts: AtomicU32,
    }

    struct Ctl {
        key: (String, u32),
        events: mpsc::UnboundedSender<(Ev, TInstant)>,
    }

    impl Control for Ctl {
        fn terminate(&self) {
            let _ = self.events.send((Ev::Terminate(self.key.0.clone(), self.key.1), TInstant::now()));
        }
        fn kill(&self) {
            let _ = self.events.send((Ev::Kill(self.key.0.clone(), self.key.1), TInstant::now()));
        }
    }

    impl Scripted {
        fn ev(&self, e: Ev) {
            let _ = self.events.send((e, TInstant::now()));
        }
    }

    impl Backend for Scripted {
        fn start<'a>(&'a self, ms: &'a Microservice, n: u32, _gen: u64) -> BoxFuture<'a, Result<Running, String>> {
            Box::pin(async move {
                let left = self.fail_starts.load(Ordering::SeqCst);
                if left > 0 {
                    self.fail_starts.store(left - 1, Ordering::SeqCst);
                    self.ev(Ev::StartFailed(ms.name.clone(), n));
                    return Err("no such program".to_owned());
                }
                let (tx, rx) = oneshot::channel();
                self.exits.lock().expect("exits").insert((ms.name.clone(), n), tx);
                self.ev(Ev::Start(ms.name.clone(), n));
                let exit =
                    Box::pin(async move { rx.await.unwrap_or(ExitInfo { code: None, signal: Some(9), error: None }) });
                Ok(Running {
                    pid: 0,
                    control: Box::new(Ctl { key: (ms.name.clone(), n), events: self.events.clone() }),
                    exit,
                })
            })
        }
        fn exited(&self, service: &str, instance: u32, _gen: u64) {
            self.ev(Ev::Exited(service.to_owned(), instance));
        }
        fn recover(&self) -> usize {
            self.ev(Ev::Recover);
            0
        }
        fn all_stopped(&self) {
            self.ev(Ev::AllStopped);
        }
        fn logs(&self, _: &str, _: u32) -> LogSource {
            LogSource::Unavailable { reason: "scripted".to_owned() }
        }
        fn describe(&self, _: &Microservice) -> Description {
            Description { backend: "scripted".to_owned(), runs: String::new() }
        }
    }

    struct Harness {
        broker: Addr<Broker>,
        router: Arc<Router>,
        events: mpsc::UnboundedReceiver<(Ev, TInstant)>,
        exits: Exits,
        backend: Arc<Scripted>,
        _lifecycle: mpsc::Receiver<Lifecycle>,
    }

    const YAML: &str = "microservices:\n  up:\n    command: [x]\n    startup: yes\n    always: yes\n    scale: 2\n  job:\n    command: [x]\n  boot:\n    command: [x]\n    startup: yes\n";

    fn harness() -> Harness {
        let cfg = load_str("t.yml", YAML).config.expect("valid");
        let (lc_tx, lc_rx) = mpsc::channel(16);
        let router = Arc::new(Router::new(Arc::new(cfg), QueueLimits::default(), lc_tx));
        let (tx, events) = mpsc::unbounded_channel();
        let exits: Exits = Arc::default();
        let backend = Arc::new(Scripted { events: tx, exits: exits.clone(), fail_starts: AtomicU32::new(0) });
        let broker = spawn("broker", Broker::new(router.clone(), backend.clone()), 64, |_| {});
        Harness { broker, router, events, exits, backend, _lifecycle: lc_rx }
    }

    fn ok() -> ExitInfo {
        ExitInfo { code: Some(0), signal: None, error: None }
    }

    fn failed() -> ExitInfo {
        ExitInfo { code: Some(1), signal: None, error: None }
    }

    impl Harness {
        /// The backend's next event (an hour of paused time without one fails the test).
        async fn next(&mut self) -> (Ev, TInstant) {
            tokio::time::timeout(Duration::from_secs(3600), self.events.recv())
                .await
                .expect("an event within the hour")
                .expect("the broker's backend is alive")
        }
        /// The next event that is not about `skip`.
        async fn next_not(&mut self, skip: &str) -> (Ev, TInstant) {
            loop {
                let (e, t) = self.next().await;
                let about = match &e {
                    Ev::Start(s, _)
                    | Ev::StartFailed(s, _)
                    | Ev::Terminate(s, _)
                    | Ev::Kill(s, _)
                    | Ev::Exited(s, _) => Some(s.as_str()),
                    _ => None,
                };
                if about != Some(skip) {
                    return (e, t);
                }
            }
        }
        fn exit(&self, s: &str, n: u32, info: ExitInfo) {
            let tx = self.exits.lock().expect("exits").remove(&(s.to_owned(), n)).expect("it is running");
            tx.send(info).expect("the broker watches its exit");
        }
        async fn state(&self, s: &str, n: u32) -> State {
            let all = aion_runtime::actor::supervisor::ask(&self.broker, BrokerMsg::Status).await.expect("status");
            all.into_iter().find(|i| i.service == s && i.instance == n).expect("instance").state
        }
        /// Takes what is queued for an instance (as its session would).
        async fn drain(&self, s: &str, n: u32) {
            let slot = self.router.slot(s, n).expect("slot");
            let session = slot.open_session().expect("session");
            let mut got = Vec::new();
            slot.take(session, 64, &mut got).await;
            assert!(!got.is_empty());
            assert_eq!(slot.depth(), 0);
        }
        fn queue(&self, s: &str, n: u32) {
            let k = Kanban { connection_key: "k".into(), ..Kanban::default() };
            self.router.slot(s, n).expect("slot").restore(Box::new(k.into_wire()));
        }
        /// Recovery, then the startup instances (`up` ×2, `boot`).
        async fn started(&mut self) {
            assert_eq!(self.next().await.0, Ev::Recover, "a fresh broker cleans up first");
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(self.next().await.0);
            }
            got.sort_by_key(|e| format!("{e:?}"));
            assert_eq!(got, vec![Ev::Start("boot".into(), 1), Ev::Start("up".into(), 1), Ev::Start("up".into(), 2)]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn startup_instances_start_at_once_and_the_others_on_their_first_kanban() {
        let mut h = harness();
        h.started().await;
        assert_eq!(h.state("job", 1).await, State::Idle, "no kanban yet: not started");
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("job".into(), 1))).await.is_ok());
        assert_eq!(h.next().await.0, Ev::Start("job".into(), 1));
        assert_eq!(h.state("job", 1).await, State::Running);
        // Asked again while it runs: not a second copy.
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("job".into(), 1))).await.is_ok());
        assert_eq!(h.state("job", 1).await, State::Running);
        assert!(h.events.try_recv().is_err(), "no second start");
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_instance_restarts_with_a_doubling_backoff_until_a_crash_loop() {
        let mut h = harness();
        h.started().await;
        let mut last = TInstant::now();
        let mut delays = Vec::new();
        for round in 0..7u32 {
            h.exit("up", 1, failed());
            assert_eq!(h.next().await.0, Ev::Exited("up".into(), 1));
            let want = if round + 1 >= CRASH_LOOP_AFTER { State::CrashLoop } else { State::Backoff };
            assert_eq!(h.state("up", 1).await, want, "after {} quick exits", round + 1);
            let (e, at) = h.next().await;
            assert_eq!(e, Ev::Start("up".into(), 1), "round {round}");
            delays.push(at.duration_since(last));
            last = at;
        }
        let expected = [100u64, 200, 400, 800, 1600, 3200, 6400];
        for (d, want) in delays.iter().zip(expected) {
            let ms = d.as_millis() as u64;
            assert!(ms >= want && ms < want + 50, "restart after {ms} ms, expected {want} ms: {delays:?}");
        }
        // The next quick exit waits at the cap, and the state says crash loop meanwhile.
        h.exit("up", 1, failed());
        assert_eq!(h.next().await.0, Ev::Exited("up".into(), 1));
        assert_eq!(h.state("up", 1).await, State::CrashLoop);
        let (e, at) = h.next().await;
        assert_eq!(e, Ev::Start("up".into(), 1));
        assert_eq!(at.duration_since(last).as_millis() as u64 / 100, BACKOFF_MAX.as_millis() as u64 / 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_run_resets_the_backoff() {
        let mut h = harness();
        h.started().await;
        for _ in 0..3 {
            h.exit("up", 1, failed());
            assert_eq!(h.next().await.0, Ev::Exited("up".into(), 1));
            assert_eq!(h.next().await.0, Ev::Start("up".into(), 1));
        }
        // The fourth start ran long enough to count as stable.
        tokio::time::sleep(STABLE_AFTER + Duration::from_secs(1)).await;
        h.exit("up", 1, failed());
        let (_, exited) = h.next().await;
        let (e, again) = h.next().await;
        assert_eq!(e, Ev::Start("up".into(), 1));
        assert_eq!(again.duration_since(exited), BACKOFF_START, "back to the first delay");
        assert_eq!(h.state("up", 1).await, State::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_startup_job_stays_failed_with_nothing_to_do() {
        let mut h = harness();
        h.started().await;
        h.exit("boot", 1, failed());
        assert_eq!(h.next().await.0, Ev::Exited("boot".into(), 1));
        assert_eq!(h.state("boot", 1).await, State::Failed);
        // Its next kanban starts it again.
        h.queue("boot", 1);
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("boot".into(), 1))).await.is_ok());
        assert_eq!(h.next().await.0, Ev::Start("boot".into(), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_runs_again_while_kanbans_wait_and_completes_when_none_do() {
        let mut h = harness();
        h.started().await;
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("job".into(), 1))).await.is_ok());
        assert_eq!(h.next_not("up").await.0, Ev::Start("job".into(), 1));
        // It ends with a kanban waiting: run again at once (no backoff for a job that succeeded).
        h.queue("job", 1);
        h.exit("job", 1, ok());
        let (_, exited) = h.next_not("up").await;
        let (e, again) = h.next_not("up").await;
        assert_eq!(e, Ev::Start("job".into(), 1));
        assert_eq!(again, exited, "re-run without delay");
        // Nothing waits now: it completes and stays down.
        h.drain("job", 1).await;
        h.exit("job", 1, ok());
        assert_eq!(h.next_not("up").await.0, Ev::Exited("job".into(), 1));
        assert_eq!(h.state("job", 1).await, State::Completed);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.state("job", 1).await, State::Completed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_job_is_retried_while_kanbans_wait_and_failed_when_none_do() {
        let mut h = harness();
        h.started().await;
        h.queue("job", 1);
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("job".into(), 1))).await.is_ok());
        assert_eq!(h.next_not("up").await.0, Ev::Start("job".into(), 1));
        h.exit("job", 1, failed());
        let (_, exited) = h.next_not("up").await;
        assert_eq!(h.state("job", 1).await, State::Backoff);
        let (e, again) = h.next_not("up").await;
        assert_eq!(e, Ev::Start("job".into(), 1));
        assert_eq!(again.duration_since(exited), BACKOFF_START);
        h.drain("job", 1).await;
        h.exit("job", 1, failed());
        assert_eq!(h.next_not("up").await.0, Ev::Exited("job".into(), 1));
        assert_eq!(h.state("job", 1).await, State::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_failure_is_not_runnable_and_retried_with_backoff() {
        let mut h = harness();
        h.backend.fail_starts.store(2, Ordering::SeqCst);
        assert_eq!(h.next().await.0, Ev::Recover);
        // Two of the three startup instances fail to start, then are retried and start.
        let mut failed = 0;
        let mut started = 0;
        while started < 3 {
            match h.next().await.0 {
                Ev::StartFailed(..) => {
                    failed += 1;
                    if failed == 1 {
                        let states: Vec<State> = aion_runtime::actor::supervisor::ask(&h.broker, BrokerMsg::Status)
                            .await
                            .expect("status")
                            .into_iter()
                            .map(|i| i.state)
                            .collect();
                        assert!(states.contains(&State::NotRunnable), "{states:?}");
                    }
                }
                Ev::Start(..) => started += 1,
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(failed, 2);
        assert_eq!(h.state("boot", 1).await, State::Running);
        assert_eq!(h.state("up", 1).await, State::Running);
        assert_eq!(h.state("up", 2).await, State::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_terminates_then_kills_after_the_grace_and_answers_when_all_ended() {
        let mut h = harness();
        h.started().await;
        let grace = Duration::from_secs(3);
        let (tx, mut done) = oneshot::channel();
        assert!(h.broker.send(BrokerMsg::Shutdown(grace, tx)).await.is_ok());
        let mut terminated_at = None;
        let mut terminated = 0;
        // `up` instances stop when asked; `boot` ignores the polite stop.
        while terminated < 3 {
            match h.next().await {
                (Ev::Terminate(s, n), at) => {
                    terminated += 1;
                    terminated_at = Some(at);
                    if s == "up" {
                        h.exit(&s, n, ExitInfo { code: None, signal: Some(15), error: None });
                    }
                }
                (Ev::Exited(..), _) => {}
                (e, _) => panic!("unexpected {e:?}"),
            }
        }
        assert!(done.try_recv().is_err(), "boot is still running: no answer yet");
        let (e, killed_at) = loop {
            match h.next().await {
                (Ev::Exited(..), _) => {}
                other => break other,
            }
        };
        assert_eq!(e, Ev::Kill("boot".into(), 1));
        assert!(killed_at.duration_since(terminated_at.expect("terminated")) >= grace - Duration::from_millis(1));
        h.exit("boot", 1, ExitInfo { code: None, signal: Some(9), error: None });
        assert_eq!(h.next().await.0, Ev::Exited("boot".into(), 1));
        assert_eq!(h.next().await.0, Ev::AllStopped, "a last sweep once every instance ended");
        done.await.expect("shutdown answered");
        assert_eq!(h.state("boot", 1).await, State::Stopped);
        assert_eq!(h.state("job", 1).await, State::Idle, "never started, nothing to stop");
        // No restart after shutdown, whatever the policy says.
        assert!(h.broker.send(BrokerMsg::Lifecycle(Lifecycle::Start("job".into(), 1))).await.is_ok());
        assert_eq!(h.state("job", 1).await, State::Idle);
    }
}
