//! The service broker: starts instances (at startup or lazily on their first kanban), restarts `always`
//! instances with exponential backoff, re-runs `always: no` jobs when more kanbans arrive, reports crash loops,
//! and stops everything in order at shutdown.

use crate::backend::{self, ExitInfo, InProcessRegistry, ProcessEnv, RegistryEntry, Started, Stopper};
use crate::routing::{Lifecycle, Router};
use crate::session::Endpoint;
use aion_runtime::actor::{Actor, Addr, Context};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    /// Time to check for instances that do not acknowledge (with an ack timeout).
    CheckLiveness,
    /// A child process ended (SIGCHLD): collect adopted descendants.
    Reap,
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
    /// How it last ended.
    pub last_exit: Option<String>,
    /// It sent a terminate kanban.
    pub terminated: bool,
}

struct Inst {
    state: State,
    gen: u64,
    pid: u32,
    start_ticks: u64,
    stopper: Option<Stopper>,
    restarts: u32,
    quick_exits: u32,
    started_at: Option<Instant>,
    last_exit: Option<String>,
    terminated: bool,
}

/// The broker actor.
pub struct Broker {
    router: Arc<Router>,
    env: ProcessEnv,
    endpoint: Addr<Endpoint>,
    inproc: InProcessRegistry,
    insts: BTreeMap<(String, u32), Inst>,
    next_gen: u64,
    shutdown: Option<(Vec<oneshot::Sender<()>>, bool)>,
    pending_start: VecDeque<(String, u32)>,
    ack_timeout: Option<Duration>,
    /// The liveness ticker and SIGCHLD listener of this incarnation (stopped with it).
    tasks: Vec<tokio::task::AbortHandle>,
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
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Broker {
    /// A broker over `router`'s services.
    pub fn new(router: Arc<Router>, env: ProcessEnv, endpoint: Addr<Endpoint>, inproc: InProcessRegistry) -> Broker {
        let mut insts = BTreeMap::new();
        for ms in router.config().microservices.values() {
            for n in 1..=ms.scale.max(1) {
                insts.insert(
                    (ms.name.clone(), n),
                    Inst {
                        state: State::Idle,
                        gen: 0,
                        pid: 0,
                        start_ticks: 0,
                        stopper: None,
                        restarts: 0,
                        quick_exits: 0,
                        started_at: None,
                        last_exit: None,
                        terminated: false,
                    },
                );
            }
        }
        Broker {
            router,
            env,
            endpoint,
            inproc,
            insts,
            next_gen: 0,
            shutdown: None,
            pending_start: VecDeque::new(),
            ack_timeout: None,
            tasks: Vec::new(),
            progress: std::collections::HashMap::new(),
        }
    }

    /// Cuts off (and kills) an instance whose oldest delivery has waited longer than `timeout` for its
    /// acknowledgement (a hung service); `None`: never (the age is still shown in the status).
    pub fn with_ack_timeout(mut self, timeout: Option<Duration>) -> Broker {
        self.ack_timeout = timeout.filter(|t| !t.is_zero());
        self
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
                if let (Some(st), true) = (&inst.stopper, client == Some(inst.pid)) {
                    st.kill();
                }
            }
        }
    }

    fn write_registry(&self) {
        let entries: Vec<RegistryEntry> = self
            .insts
            .iter()
            .filter(|(_, i)| i.pid > 0 && matches!(i.state, State::Running | State::Stopping))
            .map(|((s, n), i)| RegistryEntry {
                service: s.clone(),
                instance: *n,
                pid: i.pid,
                start_ticks: i.start_ticks,
            })
            .collect();
        backend::write_registry(&self.env.paths.registry(), &entries);
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
        let started: Result<Started, String> = if self.inproc.contains(service) {
            self.inproc.start(service, instance, &self.endpoint).await.ok_or_else(|| "endpoint unavailable".to_owned())
        } else {
            backend::spawn_process(&ms, instance, gen, &self.env)
                .map_err(|e| format!("cannot start {:?}: {e}", ms.command))
        };
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
                inst.start_ticks = if s.pid > 0 { backend::proc_start_ticks(s.pid).unwrap_or(0) } else { 0 };
                inst.stopper = Some(s.stopper);
                inst.started_at = Some(Instant::now());
                let addr = ctx.addr();
                let (svc, exit) = (service.to_owned(), s.exit);
                tokio::spawn(async move {
                    let info = exit.await;
                    let _ = addr.send(BrokerMsg::Exited { service: svc, instance, gen, info }).await;
                });
                self.write_registry();
            }
            Err(e) => {
                tracing::error!(service, instance, "{e}");
                inst.state = State::NotRunnable;
                inst.last_exit = Some(e);
                inst.gen = gen;
                if let Some(slot) = self.router.slot(service, instance) {
                    slot.start_requested.store(false, Ordering::SeqCst);
                }
                // Retry with backoff like a crash, so a transient spawn failure heals.
                self.schedule_restart(service, instance, ctx);
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
        tokio::spawn(async move {
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
        inst.stopper = None;
        inst.last_exit = Some(info.to_string());
        // Its processes that left its process group (setsid, daemons) end with it (a scan of /proc: off the
        // broker's thread).
        let marker = backend::instance_marker(&self.env.run_marker, &service, instance, gen);
        let svc = service.clone();
        tokio::task::spawn_blocking(move || {
            let escaped = backend::kill_marked(&marker);
            if escaped > 0 {
                tracing::warn!(service = %svc, instance, processes = escaped, "killed processes that had left the instance's process group");
            }
        });
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
            self.write_registry();
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
        self.write_registry();
    }

    /// Collects the exits of adopted descendants (the runtime is their subreaper).
    fn reap(&self) {
        let keep: std::collections::HashSet<u32> = self.insts.values().map(|i| i.pid).filter(|p| *p > 0).collect();
        backend::reap_adopted(&keep);
    }

    fn maybe_finish_shutdown(&mut self) {
        let all_down = self.insts.values().all(|i| i.stopper.is_none());
        if all_down {
            let left = backend::kill_marked(&format!("{}/", self.env.run_marker));
            if left > 0 {
                tracing::warn!(processes = left, "killed processes of this run still alive after every instance ended");
            }
            self.reap();
            if let Some((waiters, _)) = self.shutdown.as_mut() {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            backend::write_registry(&self.env.paths.registry(), &[]);
        }
    }

    fn status(&self) -> Vec<InstanceStatus> {
        self.insts
            .iter()
            .map(|((s, n), i)| {
                let slot = self.router.slot(s, *n);
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
                    redelivered: st(|x| &x.redelivered),
                    duplicates: st(|x| &x.duplicates),
                    oldest_inflight_ms: slot
                        .and_then(|sl| sl.oldest_inflight_age())
                        .map_or(0, |a| a.as_millis().min(u64::MAX as u128) as u64),
                    ack_timeouts: st(|x| &x.ack_timeouts),
                    last_exit: i.last_exit.clone(),
                    terminated: i.terminated,
                }
            })
            .collect()
    }
}

impl Actor for Broker {
    type Msg = BrokerMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(limit) = self.ack_timeout {
            let addr = ctx.addr();
            let every = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
            let ticker = tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if addr.send(BrokerMsg::CheckLiveness).await.is_err() {
                        return;
                    }
                }
            });
            self.tasks.push(ticker.abort_handle());
        }
        // Descendants that escaped their instance become our children (we are their subreaper): collect them.
        if let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            let addr = ctx.addr();
            let reaper = tokio::spawn(async move {
                while sigchld.recv().await.is_some() {
                    if addr.send(BrokerMsg::Reap).await.is_err() {
                        return;
                    }
                }
            });
            self.tasks.push(reaper.abort_handle());
        }
        // A fresh incarnation knows no processes: clean up whatever a previous one (or a killed runtime) left.
        let n = backend::cleanup_orphans(&self.env.paths.registry()) + backend::cleanup_marked(&self.env.dir_id);
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
            self.router.slots().filter(|s| s.depth() > 0).map(|s| (s.service.clone(), s.instance)).collect();
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
                        if let Some(st) = &i.stopper {
                            tracing::info!(service = %s, instance = n, pid = i.pid, "stopping");
                            st.terminate();
                            i.state = State::Stopping;
                        } else if i.state != State::Idle {
                            i.state = State::Stopped;
                        }
                    }
                    let addr = ctx.addr();
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        let _ = addr.send(BrokerMsg::KillRemaining).await;
                    });
                }
                self.maybe_finish_shutdown();
            }
            BrokerMsg::CheckLiveness => self.check_liveness(),
            BrokerMsg::Reap => self.reap(),
            BrokerMsg::KillRemaining => {
                for ((s, n), i) in &self.insts {
                    if let Some(st) = &i.stopper {
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
            if let Some(st) = &i.stopper {
                st.kill();
            }
        }
    }
}
