//! The Kubernetes backend: each instance a Deployment (`always: yes`) or a Job, reconciled against the API
//! server (`aion run --backend kubernetes`; `docs/kubernetes.md`).
//!
//! - [`objects`]: services.yml → objects, pure;
//! - [`auth`]: the per-instance credentials and the gate of the kanban endpoint on the pod network;
//! - [`KubeBackend`]: the [`Backend`]. `start` writes an instance's objects with server-side apply (field
//!   manager `aion`, forced: fields we own are ours) and records it as *wanted*; its exit completes when a Job
//!   finishes (Complete → exit 0, Failed → an error) or, after `terminate`/`kill`, when its workload is gone from
//!   the API server (foreground deletion: its pods are gone too, so a restarted instance never runs twice);
//! - the **reconciler**, supervised actors under `kubernetes`: one watcher per kind (Deployments, Jobs,
//!   Services, Secrets, the anchor ConfigMap, Pods; relisting after `410 Gone` or a lost connection, with
//!   backoff) keeps a cache of what the API server has; every change marks its instance dirty, and the reconcile
//!   loop brings each dirty instance back to what is wanted: a deleted workload is created again, a workload
//!   whose spec someone changed (its `generation` moved) is applied again (a foreign edit to a field we own is
//!   reverted and logged), a Service or Secret edited or deleted is restored. Failed calls (a 409, a 5xx, the API
//!   server away) are retried after a second. Every 30 s everything is reconciled again, and objects of this
//!   project that nothing wants (left by an earlier run) are deleted.
//! - Instance status comes from the pods (phase, readiness, restarts, waiting reason), shown by `aion status`;
//!   `aion logs` reads the pod's log through the API ([`pod_logs`]).

pub mod auth;
pub mod objects;

use crate::backend::{Backend, Control, Description, ExitInfo, LogSource, PodState, Running};
use aion_runtime::actor::supervisor::{ChildSpec, Intensity, Restart, Strategy, Supervisor};
use aion_runtime::config::Microservice;
use aion_runtime::task::Tasks;
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Client, Resource, ResourceExt as _};
use objects::{InstanceObjects, Target, Workload, FIELD_MANAGER, LABEL_INSTANCE, LABEL_SERVICE};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// How the Kubernetes backend runs a project.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// The namespace; `None`: the client configuration's (in-cluster: the runtime pod's own).
    pub namespace: Option<String>,
    /// The project's name (labels, the anchor `aion-project-<project>`).
    pub project: String,
    /// Images are `<image_prefix>/<service>:<tag>` (AION's `REPOSITORY_PREFIX`).
    pub image_prefix: String,
    /// The kanban endpoint as pods reach it (`KANBAN_ADDR`); `None`: `aion-endpoint.<namespace>.svc:<port>`.
    pub endpoint: Option<String>,
    /// The gRPC endpoint's port (for the default `endpoint`).
    pub endpoint_port: u16,
    /// Host directory mounted as `$AION_HOME/Data` in pods; `None`: `/var/lib/aion/<namespace>/Data` (AION's).
    pub data_host_path: Option<String>,
    /// `imagePullSecrets` (AION's `REGISTRY_SECRET`).
    pub pull_secret: String,
    /// Everything is reconciled again this often. Default 30 s.
    pub resync: Duration,
    /// Objects of the project that nothing wants are deleted only this long after the start (the broker starts
    /// the `startup` instances first). Default 30 s.
    pub adopt_for: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            namespace: None,
            project: "aion".to_owned(),
            image_prefix: "latonaio".to_owned(),
            endpoint: None,
            endpoint_port: 11010,
            data_host_path: None,
            pull_secret: String::new(),
            resync: Duration::from_secs(30),
            adopt_for: Duration::from_secs(30),
        }
    }
}

/// Counters of the backend (`aion status --json`, `kubernetes`).
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Objects written (server-side apply).
    pub applied: AtomicU64,
    /// Objects deleted.
    pub deleted: AtomicU64,
    /// Drift repaired: a wanted object deleted or edited by someone else, restored.
    pub drift_repaired: AtomicU64,
    /// API calls that failed (retried).
    pub api_errors: AtomicU64,
    /// Watches (re)started with a full list (start, `410 Gone`, a lost connection).
    pub relists: AtomicU64,
}

type Key = (String, u32);

/// What the cache knows of one object.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The instance it belongs to (from its labels).
    key: Option<Key>,
    uid: String,
    generation: Option<i64>,
    rv: String,
    deleting: bool,
    /// A Job that finished: `Ok` complete, `Err` failed (why).
    finished: Option<Result<(), String>>,
}

/// One kind's cache, replaced whole when its watch relists.
#[derive(Default)]
struct Cache {
    live: HashMap<String, Seen>,
    pending: Option<HashMap<String, Seen>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Deployment,
    Job,
    Service,
    Secret,
    /// The project's anchor ConfigMap.
    Anchor,
    /// Pods (their status and IPs; no cache of their own kind).
    Pod,
}

/// What our last apply left.
#[derive(Debug, Clone, Default)]
struct Applied {
    workload: Option<Seen>,
    service: Option<String>,
    secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Terminated or killed (the signal reported as its exit).
    Stopping(i32),
    /// Finished (a Job), or its exit reported.
    Done,
}

struct Want {
    gen: u64,
    objects: InstanceObjects,
    applied: Applied,
    exit: Option<oneshot::Sender<ExitInfo>>,
    phase: Phase,
}

impl Want {
    fn finish(&mut self, info: ExitInfo) {
        self.phase = Phase::Done;
        if let Some(tx) = self.exit.take() {
            let _ = tx.send(info);
        }
    }
}

#[derive(Debug, Clone)]
struct PodSeen {
    key: Key,
    ip: Option<IpAddr>,
    created: String,
    state: PodState,
}

#[derive(Default)]
struct State {
    anchor_uid: Option<String>,
    wants: HashMap<Key, Want>,
    caches: HashMap<Kind, Cache>,
    pods: HashMap<String, PodSeen>,
    pods_pending: Option<HashMap<String, PodSeen>>,
    /// Instances whose `start` is writing their objects (never taken for leftovers).
    starting: std::collections::HashSet<Key>,
    /// Instances to reconcile.
    dirty: BTreeSet<Key>,
}

impl State {
    fn seen(&self, kind: Kind, name: &str) -> Option<&Seen> {
        self.caches.get(&kind).and_then(|c| c.live.get(name))
    }
}

struct Inner {
    client: Client,
    target: Target,
    gate: Arc<auth::PodGate>,
    services: Vec<String>,
    state: Mutex<State>,
    wake: Notify,
    stats: KubeStats,
    started: Instant,
    opts: KubeOptions,
    tasks: Tasks,
}

fn held<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn api_err(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn key_of(labels: &std::collections::BTreeMap<String, String>) -> Option<Key> {
    let s = labels.get(LABEL_SERVICE)?;
    let n = labels.get(LABEL_INSTANCE)?.parse().ok()?;
    Some((s.clone(), n))
}

fn seen_of<K: Resource>(o: &K) -> Seen {
    let m = o.meta();
    Seen {
        key: m.labels.as_ref().and_then(key_of),
        uid: m.uid.clone().unwrap_or_default(),
        generation: m.generation,
        rv: m.resource_version.clone().unwrap_or_default(),
        deleting: m.deletion_timestamp.is_some(),
        finished: None,
    }
}

/// A Job's end, from its `status.conditions` (`Complete` or `Failed` true).
fn job_finished(j: &DynamicObject) -> Option<Result<(), String>> {
    let conds = j.data.get("status")?.get("conditions")?.as_array()?;
    for c in conds {
        let text = |k: &str| c.get(k).and_then(|v| v.as_str());
        if text("status") != Some("True") {
            continue;
        }
        match text("type") {
            Some("Complete") => return Some(Ok(())),
            Some("Failed") => {
                let why: Vec<&str> = [text("reason"), text("message")].into_iter().flatten().collect();
                return Some(Err(format!("Job failed: {}", why.join(": "))));
            }
            _ => {}
        }
    }
    None
}

/// What `aion status` shows of a pod, from its status.
fn pod_state(p: &DynamicObject) -> PodState {
    let status = p.data.get("status");
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    let phase = text(status.and_then(|s| s.get("phase"))).unwrap_or_else(|| "Pending".to_owned());
    let empty = Vec::new();
    let cs = status.and_then(|s| s.get("containerStatuses")).and_then(|c| c.as_array()).unwrap_or(&empty);
    let ready = status.and_then(|s| s.get("conditions")).and_then(|c| c.as_array()).is_some_and(|c| {
        c.iter().any(|c| {
            c.get("type").and_then(|t| t.as_str()) == Some("Ready")
                && c.get("status").and_then(|t| t.as_str()) == Some("True")
        })
    });
    let restarts = cs
        .iter()
        .map(|c| c.get("restartCount").and_then(|n| n.as_u64()).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
        .fold(0u32, u32::saturating_add);
    let reason = cs.iter().find_map(|c| {
        let st = c.get("state")?;
        text(st.get("waiting").and_then(|w| w.get("reason")))
            .or_else(|| text(st.get("terminated").and_then(|t| t.get("reason"))))
    });
    let state = match phase.as_str() {
        "Running" if ready => "ready",
        "Running" => "running",
        "Succeeded" => "succeeded",
        "Failed" => "failed",
        "Pending" => "pending",
        _ => "unknown",
    };
    PodState {
        pod: p.name_any(),
        state: if p.metadata.deletion_timestamp.is_some() { "terminating".to_owned() } else { state.to_owned() },
        ready,
        restarts,
        reason,
        node: text(p.data.get("spec").and_then(|s| s.get("nodeName"))),
        ip: text(status.and_then(|s| s.get("podIP"))),
    }
}

/// The Kubernetes backend (see the module docs).
#[derive(Clone)]
pub struct KubeBackend {
    inner: Arc<Inner>,
}

impl KubeBackend {
    /// Connects (in-cluster configuration, or `KUBECONFIG` / `~/.kube/config`), writes the project's anchor
    /// naming `services` (checking the API server is there and lets us), and loads or creates the credentials'
    /// key in `data_dir`.
    /// The reconciler starts with [`KubeBackend::supervisor`].
    ///
    /// # Errors
    /// No configuration, the API server unreachable or refusing, the key unreadable.
    pub async fn connect(
        opts: KubeOptions,
        data_dir: &Path,
        device_name: &str,
        debug: &str,
        services: Vec<String>,
        tasks: Tasks,
    ) -> Result<KubeBackend, String> {
        let mut cfg = kube::Config::infer().await.map_err(|e| format!("Kubernetes: no client configuration: {e}"))?;
        // An API server that stops answering must not hold a call (and the broker waiting on it) for ever; a
        // watch idle that long is simply resumed from its resource version.
        cfg.read_timeout = Some(READ_TIMEOUT);
        cfg.reset_reader_on_write = true;
        let client = Client::try_from(cfg).map_err(|e| format!("Kubernetes: {e}"))?;
        Self::with_client(client, opts, data_dir, device_name, debug, services, tasks).await
    }

    /// [`KubeBackend::connect`] with a given client.
    ///
    /// # Errors
    /// As [`KubeBackend::connect`].
    pub async fn with_client(
        client: Client,
        opts: KubeOptions,
        data_dir: &Path,
        device_name: &str,
        debug: &str,
        services: Vec<String>,
        tasks: Tasks,
    ) -> Result<KubeBackend, String> {
        let namespace = opts.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        if !objects::dns1123(&opts.project, 50) {
            return Err(format!(
                "Kubernetes: project name `{}` is not a valid label value (lower-case letters, digits and `-`)",
                opts.project
            ));
        }
        let target = Target {
            namespace: namespace.clone(),
            project: opts.project.clone(),
            image_prefix: opts.image_prefix.clone(),
            device_name: device_name.to_owned(),
            debug: debug.to_owned(),
            endpoint: opts
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("aion-endpoint.{namespace}.svc:{}", opts.endpoint_port)),
            data_host_path: opts.data_host_path.clone().unwrap_or_else(|| format!("/var/lib/aion/{namespace}/Data")),
            pull_secret: opts.pull_secret.clone(),
        };
        let tokens = auth::Tokens::load_or_create(&data_dir.join("kube-endpoint.key"), &opts.project)?;
        let inner = Arc::new(Inner {
            client,
            target,
            gate: Arc::new(auth::PodGate::new(tokens)),
            services,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stats: KubeStats::default(),
            started: Instant::now(),
            opts,
            tasks,
        });
        inner.ensure_anchor().await.map_err(|e| format!("Kubernetes (namespace {namespace}): {e}"))?;
        tracing::info!(namespace, project = %inner.target.project, endpoint = %inner.target.endpoint,
            "Kubernetes backend connected");
        Ok(KubeBackend { inner })
    }

    /// The gate the kanban endpoint puts in front of pods.
    pub fn gate(&self) -> Arc<auth::PodGate> {
        self.inner.gate.clone()
    }

    /// The status section.
    pub fn report(&self) -> crate::control::KubernetesReport {
        let (s, g) = (&self.inner.stats, &self.inner.gate.stats);
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::control::KubernetesReport {
            namespace: self.inner.target.namespace.clone(),
            project: self.inner.target.project.clone(),
            applied: r(&s.applied),
            deleted: r(&s.deleted),
            drift_repaired: r(&s.drift_repaired),
            api_errors: r(&s.api_errors),
            relists: r(&s.relists),
            admitted_by_token: r(&g.by_token),
            admitted_by_pod_ip: r(&g.by_pod_ip),
            refused: r(&g.refused),
        }
    }

    /// The reconciler: a watcher per kind and the reconcile loop, each a supervised actor.
    pub fn supervisor(&self) -> Supervisor {
        let mut sup = Supervisor::new(
            "kubernetes",
            Strategy::OneForOne,
            Intensity { max_restarts: 20, within: Duration::from_secs(10) },
        );
        let i = &self.inner;
        macro_rules! watch {
            ($name:literal, $k:ty, $kind:expr) => {{
                let (w, t) = (Arc::downgrade(i), i.tasks.clone());
                let (spec, _) = ChildSpec::actor($name, Restart::Permanent, 4, move || {
                    crate::runner::Runner::new(t.clone(), watch_kind::<$k>(w.clone(), $kind))
                });
                sup = sup.child(spec);
            }};
        }
        watch!("kube-watch-deployments", Deployment, Kind::Deployment);
        watch!("kube-watch-jobs", Job, Kind::Job);
        watch!("kube-watch-services", Service, Kind::Service);
        watch!("kube-watch-secrets", Secret, Kind::Secret);
        watch!("kube-watch-anchor", ConfigMap, Kind::Anchor);
        watch!("kube-watch-pods", Pod, Kind::Pod);
        let (w, t) = (Arc::downgrade(i), i.tasks.clone());
        let (spec, _) = ChildSpec::actor("kube-reconciler", Restart::Permanent, 4, move || {
            crate::runner::Runner::new(t.clone(), reconcile_loop(w.clone()))
        });
        sup.child(spec)
    }
}

impl Inner {
    /// The API of kind `K`, read back as untyped objects: only what the backend looks at is decoded (the typed
    /// decoders of Deployment, Job and Pod would add megabytes to the binary).
    fn api<K>(&self) -> Api<DynamicObject>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced_with(self.client.clone(), &self.target.namespace, &ApiResource::erase::<K>(&()))
    }

    fn mark(&self, key: Key) {
        held(&self.state).dirty.insert(key);
        self.wake.notify_one();
    }

    /// Writes the anchor ConfigMap (if its uid is not known) and returns the owner reference to it.
    async fn ensure_anchor(&self) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference, String> {
        if let Some(uid) = held(&self.state).anchor_uid.clone() {
            return Ok(objects::owner(&self.target, &uid));
        }
        let names: Vec<&str> = self.services.iter().map(String::as_str).collect();
        let cm = objects::anchor(&self.target, &names);
        let written = self.apply(&cm).await.map_err(|e| e.to_string())?;
        let uid = written.metadata.uid.unwrap_or_default();
        held(&self.state).anchor_uid = Some(uid.clone());
        Ok(objects::owner(&self.target, &uid))
    }

    /// Server-side apply, forced (the fields in `obj` are ours).
    async fn apply<K>(&self, obj: &K) -> Result<DynamicObject, ApiFail>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + serde::Serialize + Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match self.api::<K>().patch(&name, &pp, &Patch::Apply(obj)).await {
            Ok(o) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                Ok(o)
            }
            Err(e) => {
                self.stats.api_errors.fetch_add(1, Ordering::Relaxed);
                let code = match &e {
                    kube::Error::Api(s) => Some(s.code),
                    _ => None,
                };
                Err(ApiFail { code, text: format!("cannot apply {} {name}: {}", K::kind(&()), api_err(&e)) })
            }
        }
    }

    /// Deletes an object (absent is fine).
    async fn delete<K>(&self, name: &str, dp: &DeleteParams) -> Result<(), String>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self.api::<K>().delete(name, dp).await {
            Ok(_) => {
                self.stats.deleted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => {
                self.stats.api_errors.fetch_add(1, Ordering::Relaxed);
                Err(format!("cannot delete {} {name}: {}", K::kind(&()), api_err(&e)))
            }
        }
    }

    /// Waits (at most `within`) until object `name` is gone from the API server.
    async fn gone<K>(&self, name: &str, within: Duration) -> Result<(), String>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        let left = || async { self.api::<K>().get_opt(name).await.map(|o| o.is_some()).map_err(|e| api_err(&e)) };
        until_none_left(within, left, || format!("{} {name} is still being deleted", K::kind(&()))).await
    }

    /// Writes an instance's Secret and Service (or deletes a Service it no longer has); their resource versions.
    async fn apply_parts(&self, o: &InstanceObjects) -> Result<(Option<String>, String), String> {
        let secret = self.apply(&o.secret).await.map_err(|e| e.to_string())?;
        let service = match &o.service {
            Some(s) => {
                Some(self.apply(s).await.map_err(|e| e.to_string())?.metadata.resource_version.unwrap_or_default())
            }
            None => {
                self.delete::<Service>(&format!("{}-srv", o.name), &DeleteParams::default()).await?;
                None
            }
        };
        Ok((service, secret.metadata.resource_version.unwrap_or_default()))
    }

    /// Writes an instance's Secret, Service and workload; returns what the API server answered.
    async fn apply_instance(&self, o: &InstanceObjects) -> Result<Applied, String> {
        let (service, secret) = self.apply_parts(o).await?;
        let workload = self.apply_workload(&o.workload).await.map_err(|e| e.to_string())?;
        Ok(Applied { workload: Some(seen_of(&workload)), service, secret: Some(secret) })
    }

    /// Writes a Deployment or Job.
    async fn apply_workload(&self, w: &Workload) -> Result<DynamicObject, ApiFail> {
        match w {
            Workload::Deployment(d) => self.apply(d.as_ref()).await,
            Workload::Job(j) => self.apply(j.as_ref()).await,
        }
    }

    async fn start(self: &Arc<Self>, ms: &Microservice, instance: u32, gen: u64) -> Result<Running, String> {
        let key = (ms.name.clone(), instance);
        // Marked as starting before the first call: the reconciler never takes its objects for leftovers.
        held(&self.state).starting.insert(key.clone());
        let r = tokio::time::timeout(START_WITHIN, self.start_inner(ms, instance, gen)).await;
        held(&self.state).starting.remove(&key);
        match r {
            Ok(r) => r,
            Err(_) => Err(format!("the API server did not let {}-{instance} start within {START_WITHIN:?}", ms.name)),
        }
    }

    async fn start_inner(self: &Arc<Self>, ms: &Microservice, instance: u32, gen: u64) -> Result<Running, String> {
        objects::check(ms)?;
        let owner = self.ensure_anchor().await?;
        let token = self.gate.tokens().token(&ms.name, instance);
        let objs = objects::instance_objects(&self.target, ms, instance, &token, Some(&owner))?;
        let name = objs.name.clone();
        // Another project's object of that name (two runtimes in one namespace with the same service names) is
        // never taken over.
        for existing in [self.api::<Deployment>().get_opt(&name).await, self.api::<Job>().get_opt(&name).await] {
            let existing = existing.map_err(|e| format!("cannot read {name}: {}", api_err(&e)))?;
            let project =
                existing.as_ref().and_then(|o| o.metadata.labels.as_ref()?.get(objects::LABEL_PROJECT).cloned());
            if let Some(p) = project.filter(|p| *p != self.target.project) {
                return Err(format!(
                    "{name} in namespace {} belongs to project `{p}` (another runtime): give each runtime its own \
                     namespace or services of other names",
                    self.target.namespace
                ));
            }
        }
        match &objs.workload {
            Workload::Deployment(_) => {
                // `always` changed from no to yes: the Job of that name goes first (and its pods).
                self.replace_job(&name, false).await?;
            }
            Workload::Job(_) => {
                self.delete::<Deployment>(&name, &foreground()).await?;
                self.gone::<Deployment>(&name, Duration::from_secs(60)).await?;
                // A finished Job is run again as a new one; a running one (an earlier run of this runtime that
                // was killed) is adopted, never started twice.
                self.replace_job(&name, true).await?;
            }
        }
        let (service, secret) = self.apply_parts(&objs).await?;
        let workload = match self.apply_workload(&objs.workload).await {
            Ok(w) => w,
            // A Job's pod template cannot change: an adopted Job of an older definition is replaced.
            Err(e) if e.code == Some(422) && matches!(objs.workload, Workload::Job(_)) => {
                tracing::warn!(job = name, "replacing a running Job of an older definition: {e}");
                self.replace_job(&name, false).await?;
                self.apply_workload(&objs.workload).await.map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let applied = Applied { workload: Some(seen_of(&workload)), service, secret: Some(secret) };
        let (tx, rx) = oneshot::channel();
        let key = (ms.name.clone(), instance);
        {
            let mut st = held(&self.state);
            if let Some(mut old) = st.wants.remove(&key) {
                old.finish(ExitInfo { code: None, signal: None, error: Some("replaced".to_owned()) });
            }
            let want = Want { gen, objects: objs.clone(), applied, exit: Some(tx), phase: Phase::Running };
            st.wants.insert(key.clone(), want);
            st.dirty.insert(key.clone());
        }
        self.wake.notify_one();
        tracing::info!(kind = objs.workload.kind(), name, namespace = %self.target.namespace, "instance applied");
        let exit = async move {
            rx.await.unwrap_or(ExitInfo { code: None, signal: None, error: Some("the backend stopped".to_owned()) })
        };
        Ok(Running {
            pid: 0,
            control: Box::new(KubeControl { inner: Arc::downgrade(self), key, gen }),
            exit: exit.boxed(),
        })
    }

    /// The Job `name`, if any, removed first — with its pods — unless it is still running and `adopt` (then it is
    /// kept: never a second copy of a running one).
    async fn replace_job(&self, name: &str, adopt: bool) -> Result<(), String> {
        let Some(j) = self.api::<Job>().get_opt(name).await.map_err(|e| api_err(&e))? else { return Ok(()) };
        let running = job_finished(&j).is_none() && j.metadata.deletion_timestamp.is_none();
        if running && adopt {
            tracing::info!(job = name, "adopting the Job left running by an earlier run");
            return Ok(());
        }
        self.delete::<Job>(name, &foreground()).await?;
        self.gone::<Job>(name, Duration::from_secs(60)).await?;
        self.pods_gone(name, Duration::from_secs(60)).await
    }

    /// Waits (at most `within`) until no pod of instance `name` is left.
    async fn pods_gone(&self, name: &str, within: Duration) -> Result<(), String> {
        let sel = format!("{},{}={name}", self.target.selector(), objects::LABEL_RUN);
        let left = || async {
            let pods = self.api::<Pod>().list(&ListParams::default().labels(&sel)).await.map_err(|e| api_err(&e))?;
            Ok(!pods.items.is_empty())
        };
        until_none_left(within, left, || format!("the pods of {name} are still being deleted")).await
    }

    /// Stops an instance: its objects deleted (foreground: its pods first), the exit reported when its workload
    /// is gone.
    async fn stop(self: &Arc<Self>, key: Key, gen: u64, signal: i32) {
        let name = {
            let mut st = held(&self.state);
            match st.wants.get_mut(&key).filter(|w| w.gen == gen) {
                // A kill after a terminate hurries it: the pods go at once.
                Some(w) if w.phase == Phase::Running || (signal == 9 && matches!(w.phase, Phase::Stopping(_))) => {
                    w.phase = Phase::Stopping(signal);
                    Some(w.objects.name.clone())
                }
                _ => None,
            }
        };
        let Some(name) = name else { return };
        if signal == 9 {
            // A kill ends the wait: if the API server has not confirmed the deletion by then (it is away), the
            // exit is reported anyway (the reconciler goes on deleting; a shutdown never hangs on it).
            let (w, k2, n2) = (Arc::downgrade(self), key.clone(), name.clone());
            self.tasks.spawn("kube kill bound", async move {
                tokio::time::sleep(KILL_CONFIRM).await;
                let Some(i) = w.upgrade() else { return };
                let mut st = held(&i.state);
                if let Some(w) = st.wants.get_mut(&k2).filter(|w| w.gen == gen && w.phase == Phase::Stopping(9)) {
                    tracing::warn!(name = n2, "the API server did not confirm the deletion; reported as stopped");
                    w.finish(ExitInfo {
                        code: None,
                        signal: Some(9),
                        error: Some(format!("deletion not confirmed by the API server within {KILL_CONFIRM:?}")),
                    });
                }
            });
        }
        // The workload first (foreground: no controller makes a new pod for it), then, for a kill, its pods at once.
        if let Err(e) = self.delete_instance(&name).await {
            tracing::warn!(name, "{e} (retried by the reconciler)");
        }
        if signal == 9 {
            self.kill_pods(&key).await;
        }
        self.mark(key);
    }

    async fn delete_instance(&self, name: &str) -> Result<(), String> {
        let fg = foreground();
        let mut failed = Vec::new();
        for r in [
            self.delete::<Deployment>(name, &fg).await,
            self.delete::<Job>(name, &fg).await,
            self.delete::<Service>(&format!("{name}-srv"), &DeleteParams::default()).await,
            self.delete::<Secret>(&format!("{name}-aion"), &DeleteParams::default()).await,
        ] {
            if let Err(e) = r {
                failed.push(e);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    async fn kill_pods(&self, key: &Key) {
        let sel =
            format!("{},{}={}", self.target.selector(), objects::LABEL_RUN, objects::instance_name(&key.0, key.1));
        let dp = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        if let Err(e) = self.api::<Pod>().delete_collection(&dp, &ListParams::default().labels(&sel)).await {
            self.stats.api_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(selector = sel, "cannot delete the pods: {}", api_err(&e));
        }
    }

    /// Brings one instance to what is wanted (see the module docs).
    async fn reconcile(&self, key: &Key) -> Result<(), String> {
        let name = objects::instance_name(&key.0, key.1);
        enum Do {
            Nothing,
            Apply(Box<InstanceObjects>, &'static str, u64),
            Delete(&'static str),
            /// A stopped instance's workload is not in the cache: confirmed gone by the API server first (the
            /// watch may never have seen it).
            ConfirmGone(i32, u64),
        }
        let todo = {
            let mut st = held(&self.state);
            let anchor_known = st.anchor_uid.is_some();
            let dep = st.seen(Kind::Deployment, &name).cloned();
            let job = st.seen(Kind::Job, &name).cloned();
            let svc = st.seen(Kind::Service, &format!("{name}-srv")).cloned();
            let sec = st.seen(Kind::Secret, &format!("{name}-aion")).cloned();
            let any = dep.is_some() || job.is_some() || svc.is_some() || sec.is_some();
            let grace_over = self.started.elapsed() >= self.opts.adopt_for && !st.starting.contains(key);
            match st.wants.get_mut(key) {
                Some(w) => match w.phase {
                    Phase::Done => Do::Nothing,
                    Phase::Stopping(sig) => {
                        let workload_left = dep.is_some() || job.is_some();
                        if !workload_left {
                            Do::ConfirmGone(sig, w.gen)
                        } else if dep.as_ref().or(job.as_ref()).is_some_and(|s| s.deleting) {
                            Do::Nothing // being deleted: its Delete event comes
                        } else {
                            Do::Delete("a stopped instance")
                        }
                    }
                    Phase::Running => {
                        let is_job = matches!(w.objects.workload, Workload::Job(_));
                        let actual = if is_job { job } else { dep };
                        let ours = w.applied.workload.clone().unwrap_or_default();
                        match actual {
                            Some(a) if is_job && a.uid == ours.uid && a.finished.is_some() => {
                                let info = match a.finished.clone() {
                                    Some(Err(e)) => ExitInfo { code: Some(1), signal: None, error: Some(e) },
                                    _ => ExitInfo { code: Some(0), signal: None, error: None },
                                };
                                w.finish(info);
                                Do::Nothing
                            }
                            Some(a) if a.deleting => Do::Nothing,
                            None => Do::Apply(Box::new(w.objects.clone()), "was deleted; created again", w.gen),
                            Some(_) if !anchor_known => {
                                Do::Apply(Box::new(w.objects.clone()), "lost its project anchor; owned again", w.gen)
                            }
                            Some(a) if a.uid != ours.uid || a.generation != ours.generation => {
                                Do::Apply(Box::new(w.objects.clone()), "was changed by someone else; reverted", w.gen)
                            }
                            Some(_) => {
                                let svc_drift = match (&w.objects.service, &svc) {
                                    (Some(_), None) => true,
                                    (Some(_), Some(s)) => Some(&s.rv) != w.applied.service.as_ref(),
                                    (None, Some(_)) => true,
                                    (None, None) => false,
                                };
                                let sec_drift = match &sec {
                                    None => true,
                                    Some(s) => Some(&s.rv) != w.applied.secret.as_ref(),
                                };
                                if svc_drift || sec_drift {
                                    Do::Apply(
                                        Box::new(w.objects.clone()),
                                        "had its Service or Secret changed; restored",
                                        w.gen,
                                    )
                                } else {
                                    Do::Nothing
                                }
                            }
                        }
                    }
                },
                None if any && grace_over => {
                    // Nothing wants it: left by an earlier run, or by a service no longer in the file. A finished
                    // Job stays (its pod's log can be read) until the instance runs again.
                    let finished_job = job.as_ref().is_some_and(|j| j.finished.is_some());
                    if dep.is_some()
                        || (job.is_some() && !finished_job)
                        || svc.is_some()
                        || sec.is_some() && !finished_job
                    {
                        if dep.as_ref().or(job.as_ref()).is_some_and(|s| s.deleting) {
                            Do::Nothing
                        } else {
                            Do::Delete("not wanted by this runtime")
                        }
                    } else {
                        Do::Nothing
                    }
                }
                None => Do::Nothing,
            }
        };
        match todo {
            Do::Nothing => Ok(()),
            Do::Delete(why) => {
                tracing::info!(name, "deleting {why}");
                self.delete_instance(&name).await
            }
            Do::ConfirmGone(sig, gen) => {
                let dep = self.api::<Deployment>().get_opt(&name).await.map_err(|e| api_err(&e))?;
                let job = self.api::<Job>().get_opt(&name).await.map_err(|e| api_err(&e))?;
                if dep.is_some() || job.is_some() {
                    // Still there (the watch has not seen it yet): deleted again; its Delete event comes.
                    return self.delete_instance(&name).await;
                }
                // Its Service and Secret go with it, before the exit is reported.
                self.delete_instance(&name).await?;
                if let Some(w) = held(&self.state).wants.get_mut(key).filter(|w| w.gen == gen) {
                    w.finish(ExitInfo { code: None, signal: Some(sig), error: None });
                }
                Ok(())
            }
            Do::Apply(objs, why, gen) => {
                let owner = self.ensure_anchor().await?;
                let mut objs = *objs;
                set_owner(&mut objs, &owner);
                let applied = self.apply_instance(&objs).await?;
                let mut st = held(&self.state);
                // Only into the incarnation it was planned for (a newer start recorded its own).
                if let Some(w) = st.wants.get_mut(key).filter(|w| w.phase == Phase::Running && w.gen == gen) {
                    let before = w.applied.clone();
                    let changed = before.workload.as_ref().map(|s| (&s.uid, s.generation))
                        != applied.workload.as_ref().map(|s| (&s.uid, s.generation))
                        || before.service != applied.service
                        || before.secret != applied.secret;
                    w.objects = objs;
                    w.applied = applied;
                    if changed {
                        self.stats.drift_repaired.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(name, kind = w.objects.workload.kind(), "drift: {why}");
                    }
                }
                Ok(())
            }
        }
    }
}

/// Every object the backend wrote carries its anchor as owner.
fn set_owner(o: &mut InstanceObjects, owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference) {
    let refs = Some(vec![owner.clone()]);
    o.secret.metadata.owner_references.clone_from(&refs);
    if let Some(s) = &mut o.service {
        s.metadata.owner_references.clone_from(&refs);
    }
    match &mut o.workload {
        Workload::Deployment(d) => d.metadata.owner_references = refs,
        Workload::Job(j) => j.metadata.owner_references = refs,
    }
}

/// A kind's watch: its cache kept, its instances marked (see the module docs). Never ends while the backend
/// lives (failures are retried with backoff and counted).
async fn watch_kind<K>(w: Weak<Inner>, kind: Kind) -> String
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let stream = {
        let Some(inner) = w.upgrade() else { return "the backend is gone".to_owned() };
        let cfg = watcher::Config::default().labels(&inner.target.selector());
        watcher(inner.api::<K>(), cfg).default_backoff()
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let Some(inner) = w.upgrade() else { return "the backend is gone".to_owned() };
        match ev {
            Ok(ev) if kind == Kind::Pod => inner.on_pod(ev),
            Ok(ev) => inner.on_event(kind, ev.map_seen(kind == Kind::Job)),
            Err(e) => {
                inner.stats.api_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?kind, "watch failed (retried with backoff): {e}");
            }
        }
    }
    format!("the {kind:?} watch ended")
}

/// A watch event reduced to what the cache keeps.
enum Ev {
    Apply(String, Seen),
    Delete(String, Seen),
    Init,
    InitApply(String, Seen),
    InitDone,
}

trait MapSeen {
    fn map_seen(self, job: bool) -> Ev;
}

impl MapSeen for watcher::Event<DynamicObject> {
    fn map_seen(self, job: bool) -> Ev {
        let conv = |o: &DynamicObject| {
            let mut s = seen_of(o);
            if job {
                s.finished = job_finished(o);
            }
            (o.metadata.name.clone().unwrap_or_default(), s)
        };
        match self {
            watcher::Event::Apply(o) => {
                let (n, s) = conv(&o);
                Ev::Apply(n, s)
            }
            watcher::Event::Delete(o) => {
                let (n, s) = conv(&o);
                Ev::Delete(n, s)
            }
            watcher::Event::Init => Ev::Init,
            watcher::Event::InitApply(o) => {
                let (n, s) = conv(&o);
                Ev::InitApply(n, s)
            }
            watcher::Event::InitDone => Ev::InitDone,
        }
    }
}

impl Inner {
    /// A watch event of a kind: the cache updated, the instances it concerns marked.
    fn on_event(&self, kind: Kind, ev: Ev) {
        let mut marks: Vec<Key> = Vec::new();
        let mut st = held(&self.state);
        let cache = st.caches.entry(kind).or_default();
        match ev {
            Ev::Init => {
                cache.pending = Some(HashMap::new());
                self.stats.relists.fetch_add(1, Ordering::Relaxed);
            }
            Ev::InitApply(n, s) => match cache.pending.as_mut() {
                Some(p) => {
                    p.insert(n, s);
                }
                None => {
                    marks.extend(s.key.clone());
                    cache.live.insert(n, s);
                }
            },
            Ev::InitDone => {
                // The list is complete: what it lacks was deleted while the watch was away.
                if let Some(p) = cache.pending.take() {
                    marks.extend(cache.live.values().chain(p.values()).filter_map(|s| s.key.clone()));
                    cache.live = p;
                }
                // And every wanted instance: one written while the watch was away is in neither list.
                marks.extend(st.wants.keys().cloned());
            }
            Ev::Apply(n, s) => {
                marks.extend(s.key.clone());
                cache.live.insert(n, s);
            }
            Ev::Delete(n, s) => {
                marks.extend(s.key.clone());
                cache.live.remove(&n);
            }
        }
        if kind == Kind::Anchor {
            let anchor = self.target.anchor_name();
            let now = st.seen(Kind::Anchor, &anchor).filter(|s| !s.deleting).map(|s| s.uid.clone());
            let relisting = st.caches.get(&Kind::Anchor).is_some_and(|c| c.pending.is_some());
            if !relisting && now != st.anchor_uid && (now.is_some() || st.anchor_uid.is_some()) {
                if now.is_none() {
                    tracing::warn!(
                        anchor,
                        "the project's anchor was deleted: writing it again and owning every object anew"
                    );
                }
                st.anchor_uid = now;
                marks.extend(st.wants.keys().cloned());
            }
        }
        if marks.is_empty() {
            return;
        }
        st.dirty.extend(marks);
        drop(st);
        self.wake.notify_one();
    }

    /// A pod event: the instance's status and the gate's pod IPs.
    fn on_pod(&self, ev: watcher::Event<DynamicObject>) {
        let seen = |p: &DynamicObject| -> Option<(String, PodSeen)> {
            let key = p.metadata.labels.as_ref().and_then(key_of)?;
            let st = pod_state(p);
            let ip = st.ip.as_deref().and_then(|i| i.parse().ok());
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            Some((p.name_any(), PodSeen { key, ip, created, state: st }))
        };
        let mut st = held(&self.state);
        match ev {
            watcher::Event::Init => {
                st.pods_pending = Some(HashMap::new());
                return;
            }
            watcher::Event::InitApply(p) => {
                if let Some((n, s)) = seen(&p) {
                    match st.pods_pending.as_mut() {
                        Some(pend) => {
                            pend.insert(n, s);
                        }
                        None => {
                            st.pods.insert(n, s);
                        }
                    }
                }
                return;
            }
            watcher::Event::InitDone => {
                if let Some(p) = st.pods_pending.take() {
                    st.pods = p;
                }
            }
            watcher::Event::Apply(p) => {
                if let Some((n, s)) = seen(&p) {
                    st.pods.insert(n, s);
                }
            }
            watcher::Event::Delete(p) => {
                st.pods.remove(&p.name_any());
            }
        }
        let ips: HashMap<IpAddr, Key> = st
            .pods
            .values()
            .filter(|p| !matches!(p.state.state.as_str(), "terminating" | "succeeded" | "failed"))
            .filter_map(|p| Some((p.ip?, p.key.clone())))
            .collect();
        drop(st);
        self.gate.set_pod_ips(ips);
    }

    /// The newest pod of an instance.
    fn pod_of(&self, key: &Key) -> Option<PodState> {
        let st = held(&self.state);
        st.pods.values().filter(|p| &p.key == key).max_by(|a, b| a.created.cmp(&b.created)).map(|p| p.state.clone())
    }

    fn mark_all(&self) {
        let mut st = held(&self.state);
        let mut keys: Vec<Key> = st.wants.keys().cloned().collect();
        for c in st.caches.values() {
            keys.extend(c.live.values().filter_map(|s| s.key.clone()));
        }
        st.dirty.extend(keys);
        drop(st);
        self.wake.notify_one();
    }
}

/// Asks `left` (is something still there?) with a growing pause (50 ms to 1 s) until it says no; after `within`,
/// the error `still` makes; an error of `left` ends the wait.
async fn until_none_left<F, Fut>(within: Duration, mut left: F, still: impl FnOnce() -> String) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let until = Instant::now() + within;
    let mut wait = Duration::from_millis(50);
    loop {
        if !left().await? {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(still());
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// A failed API call: its HTTP code when the API server answered, and a one-line text.
#[derive(Debug)]
struct ApiFail {
    code: Option<u16>,
    text: String,
}

impl std::fmt::Display for ApiFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Delete options that remove the dependents (pods) before the object (no controller makes a new pod meanwhile).
fn foreground() -> DeleteParams {
    DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..DeleteParams::default() }
}

/// How long a call to the API server may wait for its answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the objects of an instance may take to be written (the broker waits for it).
const START_WITHIN: Duration = Duration::from_secs(90);

/// How long a killed instance waits for the API server to confirm its deletion before its exit is reported.
const KILL_CONFIRM: Duration = Duration::from_secs(10);

/// How long a failed reconcile waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The reconcile loop: dirty instances brought to what is wanted, everything again every `resync`.
async fn reconcile_loop(w: Weak<Inner>) -> String {
    let Some(resync) = w.upgrade().map(|i| i.opts.resync) else { return "the backend is gone".to_owned() };
    let mut tick = tokio::time::interval(resync.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(inner) = w.upgrade() else { return "the backend is gone".to_owned() };
        let keys = std::mem::take(&mut held(&inner.state).dirty);
        if keys.is_empty() {
            tokio::select! {
                () = inner.wake.notified() => {}
                _ = tick.tick() => inner.mark_all(),
            }
            continue;
        }
        for key in keys {
            if let Err(e) = inner.reconcile(&key).await {
                tracing::warn!(service = key.0, instance = key.1, "reconcile failed (again in 1 s): {e}");
                let w2 = w.clone();
                inner.tasks.spawn("kube reconcile retry", async move {
                    tokio::time::sleep(RETRY_AFTER).await;
                    if let Some(i) = w2.upgrade() {
                        i.mark(key);
                    }
                });
            }
        }
    }
}

/// Stops a Kubernetes instance.
struct KubeControl {
    inner: Weak<Inner>,
    key: Key,
    gen: u64,
}

impl KubeControl {
    fn stop(&self, signal: i32) {
        let Some(inner) = self.inner.upgrade() else { return };
        let (key, gen, i) = (self.key.clone(), self.gen, inner.clone());
        inner.tasks.spawn("kube stop", async move { i.stop(key, gen, signal).await });
    }
}

impl Control for KubeControl {
    fn terminate(&self) {
        self.stop(15);
    }
    fn kill(&self) {
        self.stop(9);
    }
}

impl Backend for KubeBackend {
    fn start<'a>(&'a self, ms: &'a Microservice, instance: u32, gen: u64) -> BoxFuture<'a, Result<Running, String>> {
        Box::pin(self.inner.start(ms, instance, gen))
    }

    fn exited(&self, service: &str, instance: u32, gen: u64) {
        let mut st = held(&self.inner.state);
        let key = (service.to_owned(), instance);
        if st.wants.get(&key).is_some_and(|w| w.gen == gen) {
            st.wants.remove(&key);
        }
    }

    fn recover(&self) -> usize {
        // Objects an earlier run left are adopted when they are wanted again (a running Job is not started twice,
        // a Deployment is applied unchanged); the reconciler deletes the others after `adopt_for`.
        0
    }

    fn all_stopped(&self) {}

    fn logs(&self, service: &str, instance: u32) -> LogSource {
        match self.inner.pod_of(&(service.to_owned(), instance)) {
            Some(p) => LogSource::Pod { namespace: self.inner.target.namespace.clone(), pod: p.pod },
            None => LogSource::Unavailable { reason: format!("{service}-{instance} has no pod (yet)") },
        }
    }

    fn describe(&self, ms: &Microservice) -> Description {
        let t = &self.inner.target;
        let image = if t.image_prefix.is_empty() {
            format!("{}:{}", ms.name, ms.tag)
        } else {
            format!("{}/{}:{}", t.image_prefix.trim_end_matches('/'), ms.name, ms.tag)
        };
        let kind = if ms.always { "Deployment" } else { "Job" };
        Description { backend: "kubernetes".to_owned(), runs: format!("{kind} {}/{image}", t.namespace) }
    }

    fn observe(&self, service: &str, instance: u32) -> Option<PodState> {
        self.inner.pod_of(&(service.to_owned(), instance))
    }
}

/// Writes a pod's log to `out` (`tail`: its last lines; `follow`: then what it writes), read through the API
/// server with the same configuration as the runtime (in-cluster, or `KUBECONFIG`).
///
/// # Errors
/// No configuration, the pod unknown, the API server refusing.
pub async fn pod_logs(
    namespace: &str,
    pod: &str,
    follow: bool,
    tail: Option<usize>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), String> {
    use futures::AsyncBufReadExt as _;
    let client = Client::try_default().await.map_err(|e| format!("Kubernetes: no client configuration: {e}"))?;
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let lp = kube::api::LogParams {
        follow,
        tail_lines: tail.and_then(|t| i64::try_from(t).ok()),
        ..kube::api::LogParams::default()
    };
    let stream =
        api.log_stream(pod, &lp).await.map_err(|e| format!("log of pod {namespace}/{pod}: {}", api_err(&e)))?;
    let mut lines = stream.lines();
    while let Some(line) = lines.next().await {
        let line = line.map_err(|e| format!("log of pod {namespace}/{pod}: {e}"))?;
        if writeln!(out, "{line}").is_err() {
            return Ok(());
        }
    }
    Ok(())
}
