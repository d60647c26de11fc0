//! Routing (reference §3.7, without the original's bugs): connection key with `default` fallback, fan-out,
//! `pattern: n` instance affinity with the target instance stamped on the forwarded copy, remote devices queued
//! in their route's outbox (cluster mode; dead-lettered `no-federation` when this runtime does not federate),
//! terminate kanbans never forwarded.

pub mod dead;
pub mod slot;

use crate::export::replicator::ArchiveSink;
use crate::routing::dead::{DeadLetters, Reason};
use crate::routing::slot::{QueueLimits, Slot};
use crate::store::{now_ms, ArchiveOp, Store};
use aion_runtime::config::Delivery;
use aion_runtime::config::{Microservice, NextService, ServicesFile};
use aion_runtime::WireKanban;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A request from the router to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Start this instance (it has kanbans waiting).
    Start(String, u32),
    /// The instance sent a terminate kanban.
    Terminated(String, u32),
}

/// The routing table and every instance's slot, shared by all sessions. The table is replaced whole when the
/// configuration changes ([`Router::reconfigure`]): routing reads one consistent table, without a lock.
pub struct Router {
    table: arc_swap::ArcSwap<Table>,
    limits: QueueLimits,
    /// Cluster mode: the bounds of each outbox (`None`: this router has no outboxes).
    outbox_limits: Option<QueueLimits>,
    /// Cluster mode, on a master: routes it relays for workers that cannot reach each other, by (device, service).
    relay_routes: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Dead letters.
    pub dead: Arc<DeadLetters>,
    lifecycle: mpsc::Sender<Lifecycle>,
    store: Option<Store>,
    archive: Option<ArchiveSink>,
    hop_limit: u32,
    outbound: Option<Arc<dyn Outbound>>,
}

/// One configuration's routing table.
struct Table {
    cfg: Arc<ServicesFile>,
    slots: HashMap<String, Vec<Arc<Slot>>>,
    /// Cluster mode: the outbox of each route to another device, by (device, service).
    outboxes: HashMap<(String, String), Arc<Slot>>,
}

impl Table {
    /// The table of `cfg`, keeping the slots (and their queues) of `old` wherever they still exist; `relayed`
    /// adds outboxes for routes a master relays.
    fn build(
        cfg: Arc<ServicesFile>,
        limits: QueueLimits,
        outboxes: Option<(QueueLimits, bool)>,
        old: Option<&Table>,
        relayed: &std::collections::BTreeSet<(String, String)>,
    ) -> Table {
        let slots = cfg
            .microservices
            .values()
            .map(|ms| {
                let durable = ms.delivery == Delivery::Durable;
                let prev = old.and_then(|o| o.slots.get(&ms.name));
                let v = (1..=ms.scale.max(1))
                    .map(|n| {
                        prev.and_then(|p| p.get(n as usize - 1))
                            .cloned()
                            .unwrap_or_else(|| Arc::new(Slot::with_delivery(&ms.name, n, limits, durable)))
                    })
                    .collect();
                (ms.name.clone(), v)
            })
            .collect();
        let mut boxes = HashMap::new();
        if let Some((limits, durable)) = outboxes {
            let targets: std::collections::BTreeSet<&String> =
                cfg.microservices.values().flat_map(|m| m.next_service.values().flatten().map(|t| &t.name)).collect();
            let relayed = relayed.iter().filter(|(d, _)| cfg.devices.contains_key(d)).map(|(d, s)| (d, s));
            let routes = cfg
                .devices
                .keys()
                .filter(|d| **d != cfg.device_name)
                .flat_map(|d| targets.iter().map(move |s| (d, *s)))
                .chain(relayed);
            {
                for (device, service) in routes {
                    let key = (device.clone(), service.clone());
                    // The device's own bounds (`devices.<name>.outbox…`) over the runtime's.
                    let bounds = cfg.devices.get(device).map(|d| d.outbox).unwrap_or_default();
                    let limits = QueueLimits {
                        kanbans: bounds.kanbans.unwrap_or(limits.kanbans),
                        bytes: bounds.bytes.unwrap_or(limits.bytes),
                    };
                    let slot = match old.and_then(|o| o.outboxes.get(&key)) {
                        Some(s) => {
                            s.set_limits(limits);
                            s.clone()
                        }
                        None => Arc::new(Slot::outbox(device, service, limits, durable)),
                    };
                    boxes.insert(key, slot);
                }
            }
        }
        Table { cfg, slots, outboxes: boxes }
    }

    fn slot(&self, service: &str, instance: u32) -> Option<&Arc<Slot>> {
        self.slots.get(service)?.get((instance as usize).checked_sub(1)?)
    }

    /// The slot of `service`-`instance`, or why there is none.
    fn instance_slot(&self, service: &str, instance: u32) -> Result<&Arc<Slot>, Reason> {
        let list = self.slots.get(service).ok_or(Reason::UnknownService)?;
        (instance as usize).checked_sub(1).and_then(|i| list.get(i)).ok_or(Reason::NoSuchInstance)
    }

    fn outbox(&self, device: &str, service: &str) -> Option<&Arc<Slot>> {
        self.outboxes.get(&(device.to_owned(), service.to_owned()))
    }
}

/// What a new configuration changed ([`Router::reconfigure`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    /// Services that are new.
    pub added: Vec<String>,
    /// Services whose definition changed (their instances restart).
    pub changed: Vec<String>,
    /// Services that are gone.
    pub removed: Vec<String>,
    /// Devices whose routes changed (their links restart): new or gone devices, new or gone routes, a new address.
    pub devices: Vec<String>,
}

impl Change {
    /// The services added, changed and removed from `old` to `new` (devices not compared).
    pub fn services(old: &ServicesFile, new: &ServicesFile) -> Change {
        let mut ch = Change::default();
        for (name, ms) in &new.microservices {
            match old.microservices.get(name) {
                None => ch.added.push(name.clone()),
                Some(o) if o != ms => ch.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        ch.removed = old.microservices.keys().filter(|n| !new.microservices.contains_key(*n)).cloned().collect();
        ch
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty() && self.devices.is_empty()
    }
}

/// Where one copy of an output goes.
pub(crate) enum Destination<'a> {
    /// An instance on this device.
    Local(&'a Arc<Slot>),
    /// A service on another device (the copy carries the device and the target instance).
    Remote {
        /// The device.
        device: String,
        /// The service there.
        service: String,
    },
}

/// What [`Outbound::send`] gives back when it cannot take a kanban: the dead-letter reason, its detail, and the
/// kanban.
pub type Refused = (Reason, String, Box<WireKanban>);

/// Carries kanbans to services on other devices: the seam of cluster mode (a federation link's durable outbox).
/// A router without one dead-letters such kanbans as `no-federation`.
pub trait Outbound: Send + Sync + 'static {
    /// Takes `k` for `service` on `device` (the copy carries `next_device_name` and the target instance in
    /// `process_number`). Returns true when it went to the durable store: the producer's acknowledgement then
    /// waits for the store's commit, as for a local durable queue.
    ///
    /// # Errors
    /// Why it cannot be taken (the kanban becomes a dead letter with that reason), with the kanban given back.
    fn send<'a>(
        &'a self,
        device: &'a str,
        service: &'a str,
        k: Box<WireKanban>,
    ) -> futures::future::BoxFuture<'a, Result<bool, Refused>>;
}

/// Metadata larger than this is not copied into the archive (a note with its size is archived instead).
pub const ARCHIVED_METADATA_MAX: usize = 1 << 20;

/// The default hop limit: how many times a chain may be routed before it is taken for a routing cycle. Far above
/// any pipeline's length, so only a loop reaches it — a runaway one within seconds; a loop that is meant to run
/// long (a ping-pong, a service polling through itself) needs `--hop-limit 0` (or a higher limit).
pub const DEFAULT_HOP_LIMIT: u32 = 1000;

impl Router {
    /// Builds slots (1..=scale per service, each within `limits`) for `cfg`; lifecycle requests go to `lifecycle`.
    pub fn new(cfg: Arc<ServicesFile>, limits: QueueLimits, lifecycle: mpsc::Sender<Lifecycle>) -> Router {
        Router {
            table: arc_swap::ArcSwap::from_pointee(Table::build(cfg, limits, None, None, &Default::default())),
            limits,
            outbox_limits: None,
            relay_routes: Default::default(),
            dead: Arc::default(),
            lifecycle,
            store: None,
            archive: None,
            hop_limit: DEFAULT_HOP_LIMIT,
            outbound: None,
        }
    }

    /// Cluster mode: an outbox (within `limits`, durable when the router has a store) for every route a kanban
    /// can take to another device: each remote device in `devices` × each service named as a `nextService`
    /// target (a service's `nextDeviceName` may send any of its targets to any device).
    pub fn with_outboxes(mut self, limits: QueueLimits) -> Router {
        self.outbox_limits = Some(limits);
        let cfg = self.table.load().cfg.clone();
        let t = Table::build(cfg, self.limits, Some((limits, self.store.is_some())), None, &Default::default());
        self.table = arc_swap::ArcSwap::from_pointee(t);
        self
    }

    /// Replaces the configuration: services added get slots, those removed lose theirs (their queued kanbans:
    /// durable ones stay in the store, those in memory become dead letters), those kept keep their queues.
    /// Returns what changed, for the broker (instances to start, restart, stop) and the federation (links).
    pub fn reconfigure(&self, cfg: Arc<ServicesFile>) -> Change {
        let old = self.table.load_full();
        let outboxes = self.outbox_limits.map(|l| (l, self.store.is_some()));
        let relayed = self.relay_routes.lock().map(|r| r.clone()).unwrap_or_default();
        let new = Table::build(cfg.clone(), self.limits, outboxes, Some(&old), &relayed);
        let mut ch = Change::services(&old.cfg, &cfg);
        let devices: std::collections::BTreeSet<&String> = old.cfg.devices.keys().chain(cfg.devices.keys()).collect();
        for d in devices {
            let routes = |t: &Table| -> Vec<String> {
                let mut v: Vec<String> = t.outboxes.keys().filter(|(x, _)| x == d).map(|(_, s)| s.clone()).collect();
                v.sort();
                v
            };
            if routes(&old) != routes(&new) || old.cfg.devices.get(d) != cfg.devices.get(d) {
                ch.devices.push(d.clone());
            }
        }
        // Queues that are gone (a service removed, a scale lowered, a route gone): what they held in memory is
        // not silently dropped.
        let kept: std::collections::HashSet<*const Slot> =
            new.slots.values().flatten().chain(new.outboxes.values()).map(Arc::as_ptr).collect();
        let gone: Vec<Arc<Slot>> = old
            .slots
            .values()
            .flatten()
            .chain(old.outboxes.values())
            .filter(|s| !kept.contains(&Arc::as_ptr(s)))
            .cloned()
            .collect();
        self.table.store(Arc::new(new));
        for slot in gone {
            slot.set_stopping();
            let left = slot.drain();
            if left.is_empty() {
                continue;
            }
            let persisted = self.durable_store(&slot).is_some();
            tracing::warn!(queue = %slot.queue_key(), kanbans = left.len(), persisted, "queue removed by a new configuration");
            if !persisted {
                for k in left {
                    let detail = format!(
                        "{} was removed from the configuration while this kanban waited for it",
                        slot.queue_key()
                    );
                    self.dead_letter(Reason::UnknownService, detail, k);
                }
            }
        }
        ch
    }
    /// Cluster mode, on a master: queues a kanban from one worker for `service` on `device` (another worker that
    /// the first cannot reach), in the outbox of that route (made the first time). Returns true when it went to
    /// the durable store, and whether the route is new (its link must be started).
    ///
    /// # Errors
    /// `device` is not a device of this configuration; the kanban is given back.
    pub async fn relay(
        &self,
        device: &str,
        service: &str,
        k: Box<WireKanban>,
    ) -> Result<(bool, bool), Box<WireKanban>> {
        let mut new = false;
        if self.outbox(device, service).is_none() {
            let Some(limits) = self.outbox_limits else { return Err(k) };
            if let Ok(mut r) = self.relay_routes.lock() {
                new = r.insert((device.to_owned(), service.to_owned()));
            }
            let old = self.table.load_full();
            let relayed = self.relay_routes.lock().map(|r| r.clone()).unwrap_or_default();
            let t =
                Table::build(old.cfg.clone(), self.limits, Some((limits, self.store.is_some())), Some(&old), &relayed);
            self.table.store(Arc::new(t));
        }
        let Some(slot) = self.outbox(device, service) else { return Err(k) };
        self.archive_remote_hop(&k, service, device, "relayed");
        let store = self.durable_store(&slot);
        if let Some(store) = store {
            if let Err(e) = store.enqueue(&slot.queue_key(), &k).await {
                tracing::error!(queue = %slot.queue_key(), kanban = %k.id, "not persisted: {e}");
            }
        }
        slot.push(k, None).await;
        Ok((store.is_some(), new))
    }

    /// The outboxes to `device`, by service.
    pub fn outboxes_to(&self, device: &str) -> Vec<Arc<Slot>> {
        let t = self.table.load();
        let mut v: Vec<&Arc<Slot>> = t.outboxes.iter().filter(|((d, _), _)| d == device).map(|(_, s)| s).collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v.into_iter().cloned().collect()
    }

    /// The outbox of kanbans waiting to cross to `service` on `device`.
    pub fn outbox(&self, device: &str, service: &str) -> Option<Arc<Slot>> {
        self.table.load().outbox(device, service).cloned()
    }

    /// Kanbans for services on other devices go to `outbound` (cluster mode) instead of the dead letters.
    pub fn with_outbound(mut self, outbound: Arc<dyn Outbound>) -> Router {
        self.outbound = Some(outbound);
        self
    }

    /// Dead-letters (`hop-limit`) a kanban whose chain has already been routed `limit` times (0: no limit).
    pub fn with_hop_limit(mut self, limit: u32) -> Router {
        self.hop_limit = if limit == 0 { u32::MAX } else { limit };
        self
    }

    /// Records every hop through `sink` (the kanban replicator).
    pub fn with_archive(mut self, sink: ArchiveSink) -> Router {
        self.archive = Some(sink);
        self
    }

    /// The archive sink, if hops are archived.
    pub fn archive(&self) -> Option<&ArchiveSink> {
        self.archive.as_ref()
    }

    /// Records a hop in the archive unless a service involved has `withoutKanban: yes`.
    pub fn archive_hop(&self, k: &WireKanban, to: Option<(&str, u32)>, outcome: &'static str) {
        let Some(sink) = &self.archive else { return };
        let t = self.table.load();
        let skip = |s: &str| t.cfg.microservices.get(s).is_some_and(|m| m.without_kanban);
        if skip(&k.origin.service) || to.is_some_and(|(s, _)| skip(s)) {
            return;
        }
        let mut kanban = Box::new(k.clone());
        if kanban.metadata.0.len() > ARCHIVED_METADATA_MAX {
            // The archive is for tracing, not a second copy of large payloads.
            let mut note = aion_runtime::Metadata::new();
            note.insert("aion_metadata_not_archived_bytes".into(), (kanban.metadata.0.len() as u64).into());
            kanban.metadata = aion_runtime::MetadataBytes::encode(&note);
        }
        sink.record(ArchiveOp::Hop {
            kanban,
            to: to.map(|(s, i)| (s.to_owned(), i)),
            outcome,
            at: now_ms(),
            charge: crate::store::Charge::default(),
        });
    }

    /// Records a hop to `service` on another device (`service@device` in the archive), when hops are archived.
    pub(crate) fn archive_remote_hop(&self, k: &WireKanban, service: &str, device: &str, outcome: &'static str) {
        if self.archive.is_some() {
            let to = format!("{service}@{device}");
            self.archive_hop(k, Some((&to, k.process_number)), outcome);
        }
    }

    /// Records a dead letter: log, counter, and archive.
    pub(crate) fn dead_letter(&self, reason: Reason, detail: String, k: Box<WireKanban>) {
        self.archive_hop(&k, None, reason.as_str());
        self.dead.record(reason, detail, k);
    }

    /// Persists kanbans queued for `durable` services in `store`.
    pub fn with_store(mut self, store: Store) -> Router {
        self.store = Some(store);
        self
    }

    /// The store, if kanbans queued in `slot` are durable.
    pub fn durable_store(&self, slot: &Slot) -> Option<&Store> {
        self.store.as_ref().filter(|_| slot.durable)
    }

    /// The store, if there is one.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> Arc<ServicesFile> {
        self.table.load().cfg.clone()
    }

    /// The slot of an instance.
    pub fn slot(&self, service: &str, instance: u32) -> Option<Arc<Slot>> {
        self.table.load().slot(service, instance).cloned()
    }

    /// Marks every instance as stopping (shutdown): their outputs no longer wait for room downstream, and those
    /// already waiting are woken.
    pub fn stopping(&self) {
        let t = self.table.load();
        for s in t.slots.values().flatten() {
            s.set_stopping();
        }
        for s in t.slots.values().flatten() {
            s.wake_producers();
        }
    }

    /// Every instance's slot, by service then instance.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let t = self.table.load();
        let mut names: Vec<&String> = t.slots.keys().collect();
        names.sort();
        names.into_iter().flat_map(|n| t.slots[n].iter().cloned()).collect()
    }

    /// Queues `k` for an instance (waiting for space) and asks the broker to start it if needed. Returns true
    /// when the kanban was handed to the durable store (the caller then waits for a commit barrier).
    ///
    /// # Errors
    /// [`Reason::UnknownService`] / [`Reason::NoSuchInstance`]; the kanban is given back.
    pub async fn deliver(
        &self,
        service: &str,
        instance: u32,
        k: Box<WireKanban>,
    ) -> Result<bool, (Reason, Box<WireKanban>)> {
        let slot = self.table.load().instance_slot(service, instance).cloned();
        match slot {
            Ok(slot) => Ok(self.enqueue(None, &slot, k).await),
            Err(reason) => Err((reason, k)),
        }
    }

    /// Puts a kanban found in the store back in its instance's queue (beyond the capacity: it was accepted
    /// before). Returns the slot, or `None` when the instance is not in this configuration (the kanban then
    /// stays in the store).
    pub fn restore(&self, r: crate::store::Recovered) -> Option<Arc<Slot>> {
        let slot = self.queue_slot(&r.queue)?;
        slot.restore(r.kanban);
        Some(slot)
    }

    /// The slot of a stored queue: an instance's, or an outbox.
    pub fn queue_slot(&self, q: &crate::store::QueueKey) -> Option<Arc<Slot>> {
        match q {
            crate::store::QueueKey::Instance { service, instance } => self.slot(service, *instance),
            crate::store::QueueKey::Outbox { device, service } => self.outbox(device, service),
        }
    }

    /// Queues `k` from `from` in `slot` (waiting for space, unless `from` is stopping), persisting it first when
    /// the slot is durable, and asks the broker to start the instance if needed. Returns true when the kanban went
    /// to the durable store.
    async fn enqueue(&self, from: Option<&Slot>, slot: &Slot, k: Box<WireKanban>) -> bool {
        let (service, instance) = (slot.service.as_str(), slot.instance);
        self.archive_hop(&k, Some((service, instance)), "queued");
        let store = self.durable_store(slot);
        let persisted = store.is_some();
        if let Some(store) = store {
            // Committed by the next group commit; the session waits for it before acknowledging the producer.
            if let Err(e) = store.enqueue(&slot.queue_key(), &k).await {
                tracing::error!(service, instance, kanban = %k.id, "not persisted: {e}");
            }
        }
        slot.push(k, from).await;
        self.request_start(slot).await;
        persisted
    }

    /// Queues `k` from `from` in an outbox (waiting for space unless `from` is stopping), persisting it first
    /// when the outbox is durable. Returns true when the kanban went to the durable store.
    async fn enqueue_outbox(&self, from: &Slot, slot: &Slot, k: Box<WireKanban>) -> bool {
        self.archive_remote_hop(&k, &slot.service, slot.device.as_deref().unwrap_or_default(), "outbox");
        let store = self.durable_store(slot);
        let persisted = store.is_some();
        if let Some(store) = store {
            if let Err(e) = store.enqueue(&slot.queue_key(), &k).await {
                tracing::error!(queue = %slot.queue_key(), kanban = %k.id, "not persisted: {e}");
            }
        }
        slot.push(k, Some(from)).await;
        persisted
    }

    /// The start request for `slot`, unless it is connected or a start is already pending (claims the pending
    /// flag; the broker resets it when it handles the request).
    fn claim_start(&self, slot: &Slot) -> Option<Lifecycle> {
        (!slot.connected.load(Ordering::SeqCst) && !slot.start_requested.swap(true, Ordering::SeqCst))
            .then(|| Lifecycle::Start(slot.service.clone(), slot.instance))
    }

    /// Tells the broker that an instance sent its terminate kanban.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) async fn terminated(&self, service: &str, instance: u32) {
        let _ = self.lifecycle.send(Lifecycle::Terminated(service.to_owned(), instance)).await;
    }

    /// Asks the broker to start the instance unless it is connected or a start is already pending.
    pub async fn request_start(&self, slot: &Slot) {
        if let Some(msg) = self.claim_start(slot) {
            // Bounded: waits if the broker is busy.
            if self.lifecycle.send(msg).await.is_err() {
                tracing::error!(service = %slot.service, instance = slot.instance, "broker is gone; instance not started");
            }
        }
    }

    /// [`Router::request_start`] without waiting: when the broker's mailbox is full, a task delivers it.
    fn request_start_now(&self, slot: &Slot) {
        let Some(msg) = self.claim_start(slot) else { return };
        match self.lifecycle.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.lifecycle.clone();
                tokio::spawn(async move {
                    if tx.send(msg).await.is_err() {
                        tracing::error!("broker is gone; instance not started");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!(service = %slot.service, instance = slot.instance, "broker is gone; instance not started");
            }
        }
    }

    /// Where one copy of an output of `ms` goes for the `nextService` entry `t`, with the target instance and
    /// the target device stamped on the copy: an instance's slot here, or a service on another device — or why it
    /// cannot be delivered (a dead letter).
    fn target<'t>(
        table: &'t Table,
        ms: &Microservice,
        t: &NextService,
        copy: &mut WireKanban,
    ) -> Result<Destination<'t>, (Reason, String)> {
        let cfg = &table.cfg;
        let device = if copy.next_device_name.is_empty() { &t.device } else { &copy.next_device_name };
        let n = t.target_instance(copy.process_number);
        if !device.is_empty() && *device != cfg.device_name && cfg.devices.contains_key(device) {
            let device = device.clone();
            copy.process_number = n;
            copy.next_device_name.clone_from(&device);
            return Ok(Destination::Remote { device, service: t.name.clone() });
        }
        copy.process_number = n;
        if copy.next_device_name != cfg.device_name {
            copy.next_device_name.clone_from(&cfg.device_name);
        }
        table.instance_slot(&t.name, n).map(Destination::Local).map_err(|reason| {
            let detail = match reason {
                Reason::NoSuchInstance => {
                    format!("{} > {} instance {n} does not exist (scale too small)", ms.name, t.name)
                }
                _ => format!("{} > {}: service not defined", ms.name, t.name),
            };
            (reason, detail)
        })
    }

    /// Routes one output of `from` without waiting, in the common case only: one local target, in memory (not
    /// durable, no archive), with room in its queue. Anything else (fan-out, terminate, dead letters, durable
    /// targets, a full queue) gives the kanban back for [`Router::route`]; the result is then the same as if
    /// `route` had been called directly (the stamps [`Router::route`] puts on the copy are the same).
    ///
    /// # Errors
    /// The kanban, when it needs [`Router::route`].
    pub fn try_route(&self, from: &Slot, mut k: Box<WireKanban>) -> Result<(), Box<WireKanban>> {
        if k.connection_key == aion_runtime::kanban::TERMINATE_KEY || self.archive.is_some() || k.hops > self.hop_limit
        {
            return Err(k);
        }
        let table = self.table.load();
        let Some(ms) = table.cfg.microservices.get(&from.service) else { return Err(k) };
        let Some([t]) = ms.routes(k.route_key()) else { return Err(k) };
        let Ok(Destination::Local(slot)) = Self::target(&table, ms, t, &mut k) else { return Err(k) };
        if self.durable_store(slot).is_some() {
            return Err(k);
        }
        slot.try_push(k)?;
        self.request_start_now(slot);
        Ok(())
    }

    /// Routes one output of `from`. Returns when every target has queued it (back-pressure); true if any copy
    /// went to the durable store.
    pub async fn route(&self, from: &Slot, k: Box<WireKanban>) -> bool {
        let mut persisted = false;
        if k.is_terminate() {
            let name = k.metadata_str("name").unwrap_or_else(|| from.service.clone());
            if name != from.service {
                let detail = format!("terminate kanban from {} names service `{name}`", from.service);
                self.dead_letter(Reason::BadTerminate, detail, k);
                return persisted;
            }
            tracing::info!(service = %from.service, instance = from.instance, "terminate kanban received");
            let _ = self.lifecycle.send(Lifecycle::Terminated(from.service.clone(), from.instance)).await;
            return persisted;
        }
        if k.hops > self.hop_limit {
            let detail = format!(
                "{}-{} emitted a kanban whose chain has already made {} hops, the hop limit (--hop-limit): a routing cycle?",
                from.service,
                from.instance,
                self.hop_limit
            );
            self.dead_letter(Reason::HopLimit, detail, k);
            return persisted;
        }
        // One table for the whole output (a new configuration applies from the next one); held as an Arc across
        // the waits for room below.
        let table = self.table.load_full();
        let Some(ms) = table.cfg.microservices.get(&from.service) else {
            self.dead_letter(Reason::UnknownService, format!("source `{}` is not defined", from.service), k);
            return persisted;
        };
        let key = k.route_key().to_owned();
        let targets = match ms.routes(&key) {
            Some(t) if !t.is_empty() => t,
            _ => {
                let detail = if ms.next_service.is_empty() {
                    format!("{} has no nextService (end of chain) and emitted on `{key}`", ms.name)
                } else {
                    format!("{} has no nextService entry for connection key `{key}` and no `default`", ms.name)
                };
                self.dead_letter(Reason::NoRoute, detail, k);
                return persisted;
            }
        };
        let last = targets.len() - 1;
        let mut k = Some(k);
        // Targets already served by this fan-out: a second copy for the same instance gets its own id.
        let mut served: Vec<usize> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            // Every target gets its own copy (fan-out); the last one takes the original, so the common
            // single-target route never clones.
            let Some(mut copy) = (if i == last { k.take() } else { k.clone() }) else { break };
            match Self::target(&table, ms, t, &mut copy) {
                Ok(Destination::Remote { device, service }) => match &self.outbound {
                    _ if table.outbox(&device, &service).is_some() => {
                        let Some(slot) = table.outbox(&device, &service) else { continue };
                        let at = Arc::as_ptr(slot) as usize;
                        let again = served.iter().filter(|p| **p == at).count() as u32;
                        served.push(at);
                        if again > 0 {
                            copy.id = copy.id.copy(again);
                        }
                        persisted |= self.enqueue_outbox(from, slot, copy).await
                    }
                    Some(out) => match out.send(&device, &service, copy).await {
                        Ok(p) => persisted |= p,
                        Err((reason, detail, copy)) => self.dead_letter(reason, detail, copy),
                    },
                    None => {
                        let detail = format!(
                            "{} > {service} targets device `{device}`; cross-device delivery is not available \
                             (this runtime is not in a cluster)",
                            ms.name
                        );
                        self.dead_letter(Reason::NoFederation, detail, copy)
                    }
                },
                Ok(Destination::Local(slot)) => {
                    let at = Arc::as_ptr(slot) as usize;
                    let again = served.iter().filter(|p| **p == at).count() as u32;
                    served.push(at);
                    if again > 0 {
                        copy.id = copy.id.copy(again);
                    }
                    persisted |= self.enqueue(Some(from), slot, copy).await
                }
                Err((reason, detail)) => self.dead_letter(reason, detail, copy),
            }
        }
        persisted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aion_runtime::config::load_str;
    use aion_runtime::kanban::{Kanban, KanbanId, Metadata, Origin, Value, TERMINATE_KEY};

    const YAML: &str = "deviceName: here\ndevices:\n  there: {addr: 10.0.0.2}\nmicroservices:\n  src:\n    nextService:\n      default: [{name: a}]\n      both: [{name: a}, {name: b}]\n      far: [{name: b, device: there}]\n      tosave: [{name: saved}]\n      twice: [{name: a}, {name: a}]\n  a:\n    delivery: memory\n  b:\n    delivery: memory\n  saved: {}\n";

    fn router(capacity: usize) -> (Router, mpsc::Receiver<Lifecycle>) {
        let cfg = load_str("t.yml", YAML).config.expect("valid");
        let (tx, rx) = mpsc::channel(16);
        (Router::new(Arc::new(cfg), QueueLimits { kanbans: capacity, ..QueueLimits::default() }, tx), rx)
    }

    fn out(key: &str) -> Box<WireKanban> {
        let k = Kanban {
            origin: Origin { service: "src".into(), instance: 1 },
            connection_key: key.into(),
            process_number: 1,
            ..Kanban::default()
        };
        Box::new(k.into_wire())
    }

    #[tokio::test]
    async fn try_route_takes_the_common_case_and_asks_for_a_start() {
        let (r, mut lc) = router(8);
        let from = r.slot("src", 1).expect("slot").clone();
        assert!(r.try_route(&from, out("")).is_ok());
        let a = r.slot("a", 1).expect("slot");
        assert_eq!(a.depth(), 1);
        assert_eq!(lc.try_recv().ok(), Some(Lifecycle::Start("a".into(), 1)), "a is not running: start it");
        assert!(r.try_route(&from, out("default")).is_ok());
        assert!(lc.try_recv().is_err(), "one start request while it is pending");
        let sess = a.open_session().expect("session");
        let mut got = Vec::new();
        a.take(sess, 8, &mut got).await;
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].process_number, got[0].next_device_name.as_str()), (1, "here"));
    }

    #[tokio::test]
    async fn try_route_declines_what_needs_the_full_router() {
        let (r, _lc) = router(1);
        let from = r.slot("src", 1).expect("slot").clone();
        // Fan-out, a remote device, and a full queue are left to `route`.
        assert!(r.try_route(&from, out("both")).is_err());
        assert!(r.try_route(&from, out("far")).is_err());
        assert!(r.try_route(&from, out("")).is_ok());
        assert!(r.try_route(&from, out("")).is_err(), "a's queue (capacity 1) is full");
        // Terminate kanbans and unknown keys (dead letters) too.
        let mut md = Metadata::new();
        md.insert("type".into(), Value::from("terminate"));
        let t = Kanban { connection_key: TERMINATE_KEY.into(), metadata: md, ..Kanban::default() };
        assert!(r.try_route(&from, Box::new(t.into_wire())).is_err());
        let (r2, _lc2) = router(8);
        let lonely = r2.slot("a", 1).expect("slot").clone();
        assert!(r2.try_route(&lonely, out("")).is_err(), "a has no nextService: a dead letter");
    }

    #[tokio::test]
    async fn two_copies_for_one_instance_get_two_ids() {
        let (r, _lc) = router(8);
        let from = r.slot("src", 1).expect("slot").clone();
        let k = out("twice");
        let id = k.id;
        r.route(&from, k).await;
        let a = r.slot("a", 1).expect("slot");
        let sess = a.open_session().expect("session");
        let mut got = Vec::new();
        a.take(sess, 8, &mut got).await;
        let ids: Vec<KanbanId> = got.iter().map(|k| k.id).collect();
        assert_eq!(ids, vec![id, id.copy(1)], "the first copy keeps the id, the second gets its own");
    }

    #[tokio::test]
    async fn try_route_leaves_durable_targets_to_the_store_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, _) = Store::open(&dir.path().join("aion.db"), &dir.path().join("archive.db"), Default::default())
            .expect("store");
        let (r, _lc) = router(8);
        let r = r.with_store(store);
        let from = r.slot("src", 1).expect("slot").clone();
        assert!(r.try_route(&from, out("tosave")).is_err(), "saved is durable (the default)");
        assert!(r.try_route(&from, out("")).is_ok(), "a is memory");
    }

    /// Records what crosses to other devices.
    struct Recorder(std::sync::Mutex<Vec<(String, String, u32, String)>>);
    impl Outbound for Recorder {
        fn send<'a>(
            &'a self,
            device: &'a str,
            service: &'a str,
            k: Box<WireKanban>,
        ) -> futures::future::BoxFuture<'a, Result<bool, Refused>> {
            Box::pin(async move {
                let row = (device.to_owned(), service.to_owned(), k.process_number, k.next_device_name.clone());
                self.0.lock().expect("recorder").push(row);
                Ok(false)
            })
        }
    }

    #[tokio::test]
    async fn a_remote_target_goes_to_the_outbound_or_is_a_dead_letter_without_one() {
        let (r, _lc) = router(8);
        let from = r.slot("src", 1).expect("slot").clone();
        r.route(&from, out("far")).await;
        assert_eq!(r.dead.recent().len(), 1, "no federation: a dead letter");
        let (r, _lc) = router(8);
        let rec = Arc::new(Recorder(std::sync::Mutex::new(Vec::new())));
        let r = r.with_outbound(rec.clone());
        let from = r.slot("src", 1).expect("slot").clone();
        r.route(&from, out("far")).await;
        assert!(r.dead.recent().is_empty());
        let got = rec.0.lock().expect("recorder").clone();
        assert_eq!(got, vec![("there".to_owned(), "b".to_owned(), 1, "there".to_owned())]);
        assert_eq!(r.slot("b", 1).expect("slot").depth(), 0, "nothing queued here");
    }
}
