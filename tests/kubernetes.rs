//! The Kubernetes backend against a real kube-apiserver v1.20 with etcd, the controller manager and the
//! scheduler (tests/common/k8s.rs; built by tests/k8s/build-k8s.sh, which `.ci/run` runs): the real `aion`
//! binary with `--backend kubernetes`, the test playing the kubelet. Skipped loudly without the binaries;
//! `AION_REQUIRE_K8S=1` (CI) makes that a failure.
//!
//! - every real AION services.yml maps to objects the API server accepts (server-side dry run);
//! - the reconcile loop converges; pod status reaches `aion status`; drift is repaired (a deleted Deployment,
//!   a scale to 0, a foreign edit of the image, a deleted Service); a Job runs, completes (the kubelet says
//!   Succeeded), and a later kanban runs it again as a new Job, never two at once; the endpoint admits a pod by
//!   its credential or its pod IP and refuses it as another instance;
//! - a watch that comes back from a compacted resource version (410 Gone) relists and misses nothing;
//! - the API server killed (-9) mid-reconcile and started again: the runtime converges;
//! - deleting the project's anchor cascades to every object;
//! - the shipped Role is enough for the backend (a real ServiceAccount token), and calls outside it get 403;
//! - the shipped manifests pass `kubectl apply --server-side --dry-run=server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

mod common;
#[path = "common/k8s.rs"]
mod k8s;

use aion::transport::grpc::kanbanpb::kanban_client::KanbanClient;
use aion::transport::grpc::kanbanpb::{InitializeService, InitializeType};
use common::{wait_until, Runtime};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

/// Polls `f` (an API read) until it gives `Some`, or panics naming `what`.
fn wait_api<T>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    mut f: impl FnMut() -> futures::future::BoxFuture<'static, Option<T>>,
) -> T {
    wait_until(what, LIMIT, || rt.block_on(f()))
}

/// Waits until `api` has the object `name` and `ok` holds for it; returns it.
fn wait_object<K>(rt: &tokio::runtime::Runtime, api: &Api<K>, name: &str, what: &str, ok: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_until(what, LIMIT, || rt.block_on(api.get_opt(name)).ok().flatten().filter(|o| ok(o)))
}

/// True once the status shows `service`'s pod ready.
fn pod_ready(s: &serde_json::Value, service: &str) -> bool {
    s["instances"].as_array().is_some_and(|a| a.iter().any(|i| i["service"] == service && i["pod"]["state"] == "ready"))
}

fn start_aion(kubeconfig: &Path, ns: &str, yaml: &str, extra: &[&str]) -> Runtime {
    let wrapper = vec!["env".to_owned(), format!("KUBECONFIG={}", kubeconfig.display())];
    let mut args = vec!["--backend", "kubernetes", "--namespace", ns, "--grpc", "127.0.0.1:0", "--project", "demo"];
    args.extend_from_slice(extra);
    Runtime::start_wrapped(&wrapper, yaml, tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), &args)
}

const YAML: &str = r#"
deviceName: edge
microservices:
  web:
    startup: yes
    always: yes
    tag: "1.0"
    command: ["python3", "-u", "main.py"]
    ports:
      - name: http
        port: 8080
    env:
      MODE: test
  sensor:
    backend: process
    startup: yes
    always: yes
    command: ["{testkit}"]
  job:
    scale: 2
    nextService:
      default:
        - name: web
"#;

fn grpc_port(rt: &Runtime) -> u16 {
    let s = rt.status();
    let addr = s["grpc"]["addr"].as_str().expect("grpc addr").to_owned();
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Opens `ReceiveKanban` for `service`-`n` with an optional credential; the gRPC status code it gets (`Ok` when
/// the stream opened).
async fn claim(port: u16, service: &str, n: i32, token: Option<&str>) -> tonic::Code {
    let mut c = KanbanClient::connect(format!("http://127.0.0.1:{port}")).await.expect("connect");
    let mut req = tonic::Request::new(InitializeService {
        microservice_name: service.to_owned(),
        process_number: n,
        init_type: InitializeType::StartServiceWithoutKanban as i32,
    });
    if let Some(t) = token {
        req.metadata_mut().insert("aion-token", t.parse().unwrap());
    }
    match c.receive_kanban(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// `SendKanban` as `service`-`n` from here: an output, or (`terminate`) the terminate kanban naming that number.
async fn send(port: u16, service: &str, n: i32, terminate: Option<u32>) -> tonic::Code {
    use prost_types::value::Kind;
    let mut c = KanbanClient::connect(format!("http://127.0.0.1:{port}")).await.expect("connect");
    let text = |s: &str| prost_types::Value { kind: Some(Kind::StringValue(s.to_owned())) };
    let mut fields = std::collections::BTreeMap::new();
    let key = match terminate {
        Some(t) => {
            fields.insert("type".to_owned(), text("terminate"));
            fields.insert("number".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(f64::from(t))) });
            "service-broker"
        }
        None => {
            fields.insert("text".to_owned(), text("out"));
            "default"
        }
    };
    let message = aion::transport::grpc::kanbanpb::StatusKanban {
        connection_key: key.to_owned(),
        process_number: n,
        metadata: Some(prost_types::Struct { fields }),
        ..Default::default()
    };
    let req =
        aion::transport::grpc::kanbanpb::Request { microservice_name: service.to_owned(), message: Some(message) };
    match c.send_kanban(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[test]
fn the_reconcile_loop_converges_repairs_drift_runs_jobs_again_and_gates_the_endpoint() {
    let Some(plane) = k8s::shared() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "conv"));
    let (kubelet, _task) = k8s::kubelet(&rt, &plane.kubeconfig, &ns);
    // The Job's pod gets the test's own address: a client from here is that pod.
    kubelet.lock().unwrap().ips.insert("job-001".into(), "127.0.0.1".into());
    let aion = start_aion(&plane.kubeconfig, &ns, YAML, &["--kube-resync", "3600"]);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // Converged: the startup service's Deployment, Service and Secret, owned by the project's anchor.
    let d = wait_object(&rt, &deps, "web-001", "Deployment web-001", |_| true);
    let anchor = rt.block_on(Api::<ConfigMap>::namespaced(client.clone(), &ns).get("aion-project-demo")).unwrap();
    assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, anchor.metadata.uid.clone().unwrap());
    assert_eq!(d.metadata.managed_fields.as_ref().unwrap()[0].manager.as_deref(), Some("aion"));
    let spec = d.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(1));
    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("latonaio/web:1.0"));
    assert!(rt.block_on(svcs.get_opt("web-001-srv")).unwrap().is_some());
    assert!(rt.block_on(secrets.get_opt("web-001-aion")).unwrap().is_some());
    assert!(rt.block_on(jobs.get_opt("job-001")).unwrap().is_none(), "a Job starts with its first kanban");
    // A service that asks for a local process (`backend: process`) runs here, not in the cluster.
    let s = aion.wait_status("sensor connected as a local process", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| i["service"] == "sensor" && i["connected"] == true)
    });
    let sensor = s["instances"].as_array().unwrap().iter().find(|i| i["service"] == "sensor").unwrap().clone();
    assert!(sensor["pid"].as_u64().unwrap() > 0 && sensor["backend"]["backend"] == "process", "{sensor}");
    assert!(rt.block_on(deps.get_opt("sensor-001")).unwrap().is_none());

    // Instance status comes from the pod: the kubelet marks it Running and Ready.
    let s = aion.wait_status("web-001's pod ready in aion status", |s| pod_ready(s, "web"));
    let web = s["instances"].as_array().unwrap().iter().find(|i| i["service"] == "web").unwrap().clone();
    assert_eq!(web["pod"]["node"], k8s::NODE, "{web}");
    assert!(web["pod"]["pod"].as_str().unwrap().starts_with("web-001-"), "{web}");
    let (ok, table, _) = aion.cli(&["status"]);
    assert!(ok && table.contains("POD") && table.contains("ready"), "{table}");

    // Drift 1: the Deployment deleted → created again (a new object).
    let uid = d.metadata.uid.clone().unwrap();
    rt.block_on(deps.delete("web-001", &DeleteParams::background())).unwrap();
    wait_object(&rt, &deps, "web-001", "web-001 created again", |d| d.metadata.uid.as_deref() != Some(&uid));
    // Drift 2: scaled to 0 by someone else → back to 1.
    let other = PatchParams::apply("someone-else").force();
    let scale0 = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 0}});
    rt.block_on(deps.patch("web-001", &other, &Patch::Apply(&scale0))).unwrap();
    wait_object(&rt, &deps, "web-001", "web-001 scaled back to 1", |d| {
        d.spec.as_ref().and_then(|s| s.replicas) == Some(1) && d.metadata.generation.unwrap_or(0) > 1
    });
    // Drift 3: a foreign edit of a field we own (the image) → reverted.
    let edit =
        serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "web-001", "image": "evil:1"}]}}}});
    rt.block_on(deps.patch("web-001", &PatchParams::default(), &Patch::Strategic(&edit))).unwrap();
    wait_object(&rt, &deps, "web-001", "the image edit reverted", |d| {
        let image = d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone());
        image == Some(Some("latonaio/web:1.0".to_owned()))
    });
    // Drift 4: the Service deleted → restored.
    rt.block_on(svcs.delete("web-001-srv", &DeleteParams::default())).unwrap();
    wait_object(&rt, &svcs, "web-001-srv", "web-001-srv restored", |_| true);
    // (Counted once the runtime has the API server's answer, which may come after the test sees the object.)
    aion.wait_status("four drifts repaired and counted", |s| s["kubernetes"]["drift_repaired"].as_u64() >= Some(4));
    assert!(aion.stderr().contains("drift"), "drift is logged");

    // A Job: started by a kanban, one copy.
    aion.send("job", &["--key", "default"]);
    let j1 = wait_object(&rt, &jobs, "job-001", "Job job-001", |_| true);
    // The endpoint: the pod (by its IP, here) may be job-001, not web-001; a credential opens its own instance only.
    let port = grpc_port(&aion);
    wait_api(&rt, "job-001's pod running", || {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        Box::pin(async move {
            let l = pods.list(&ListParams::default().labels("run=job-001")).await.unwrap();
            l.items
                .iter()
                .any(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some("127.0.0.1"))
                .then_some(())
        })
    });
    aion.wait_status("the gate to know job-001's pod", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| i["service"] == "job" && i["pod"]["ip"] == "127.0.0.1")
    });
    assert_eq!(rt.block_on(claim(port, "web", 1, None)), tonic::Code::PermissionDenied, "job-001's pod is not web-001");
    assert_eq!(rt.block_on(claim(port, "web", 1, Some("00ff"))), tonic::Code::PermissionDenied, "a forged credential");
    let web_token = rt.block_on(secrets.get("web-001-aion")).unwrap().data.unwrap()["token"].0.clone();
    let web_token = String::from_utf8(web_token).unwrap();
    assert_eq!(rt.block_on(claim(port, "web", 1, Some(&web_token))), tonic::Code::Ok, "web-001's own credential");
    assert_eq!(rt.block_on(claim(port, "job", 1, Some(&web_token))), tonic::Code::PermissionDenied, "not job-001's");
    assert_eq!(rt.block_on(claim(port, "job", 1, None)), tonic::Code::Ok, "job-001 from its pod's IP");
    // Nor may job-001's pod act as job-002: neither an output as job-002 nor job-002's terminate kanban.
    assert_eq!(rt.block_on(send(port, "job", 2, None)), tonic::Code::PermissionDenied, "an output as job-002");
    assert_eq!(rt.block_on(send(port, "job", 1, Some(2))), tonic::Code::PermissionDenied, "job-002's terminate");
    assert_eq!(rt.block_on(send(port, "job", 1, None)), tonic::Code::Ok, "its own output");
    let refused = aion.status()["kubernetes"]["refused"].as_u64().unwrap();
    assert!(refused >= 3, "refusals are counted: {refused}");

    // The Job's work done: the kubelet says Succeeded, the Job completes, the instance exits 0.
    kubelet.lock().unwrap().complete.insert("job-001".into());
    aion.wait_status("job-001 exited after its Job completed", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| i["service"] == "job" && i["last_exit"] == "exit code 0")
    });
    kubelet.lock().unwrap().complete.clear();
    // A later kanban runs it again: a new Job (the finished one replaced), never two.
    aion.send("job", &["--key", "default"]);
    let j2 = wait_object(&rt, &jobs, "job-001", "job-001 run again", |j| j.metadata.uid != j1.metadata.uid);
    assert!(j2.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) == 0, "the new Job has not run yet");
    let all = rt.block_on(jobs.list(&ListParams::default())).unwrap();
    assert_eq!(all.items.len(), 1, "one Job per instance");

    // `aion logs` goes to the API server for the pod's log (no kubelet here: the API server says so).
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(aion.data.path())
        .args(["logs", "web"])
        .env("KUBECONFIG", &plane.kubeconfig)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("log of pod") && err.contains("web-001-"), "{err}");
    drop(aion);
}

/// A TCP relay between the runtime and the API server that can cut every connection (a lost network).
struct Relay {
    port: u16,
    live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gen: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Relay {
    fn start(rt: &tokio::runtime::Runtime, to: u16) -> Relay {
        use std::sync::atomic::Ordering;
        let l = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let gen = std::sync::Arc::new(tx);
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c2, g2, l2) = (cut.clone(), gen.clone(), live.clone());
        rt.spawn(async move {
            loop {
                let Ok((mut a, _)) = l.accept().await else { return };
                // Subscribed before the flag is read: a cut after this closes it, a cut before drops it.
                let mut stop = g2.subscribe();
                if c2.load(Ordering::SeqCst) {
                    continue; // refused while cut (dropped at once)
                }
                let l3 = l2.clone();
                l3.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    l3.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Relay { port, live, cut, gen }
    }

    /// Cuts (every connection closed, new ones dropped; returns when none is left) or heals the network.
    fn cut(&self, on: bool) {
        self.cut.store(on, std::sync::atomic::Ordering::SeqCst);
        if on {
            self.gen.send_modify(|g| *g += 1);
            wait_until("the relay's connections closed", LIMIT, || {
                (self.live.load(std::sync::atomic::Ordering::SeqCst) == 0).then_some(())
            });
        }
    }
}

#[test]
fn a_watch_back_from_a_compacted_version_relists_and_misses_no_deletion() {
    let Some(plane) = k8s::shared() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "relist"));
    let (_kubelet, _task) = k8s::kubelet(&rt, &plane.kubeconfig, &ns);
    let relay = Relay::start(&rt, plane.port);
    let kc = plane.dir.path().join(format!("relay-{ns}.kubeconfig"));
    let text = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    std::fs::write(&kc, text.replace(&format!("127.0.0.1:{}", plane.port), &format!("127.0.0.1:{}", relay.port)))
        .unwrap();
    let aion = start_aion(&kc, &ns, YAML, &["--kube-resync", "3600"]);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = wait_object(&rt, &deps, "web-001", "Deployment web-001", |_| true);
    // Settled first: every watch listed, the pod seen ready (a cut in the middle of the first writes would be
    // repaired by the reconciler's retry instead of by the relist this test is about).
    let s = aion
        .wait_status("web-001's pod ready", |s| s["kubernetes"]["relists"].as_u64() >= Some(5) && pod_ready(s, "web"));
    let before = s["kubernetes"]["relists"].as_u64().unwrap();
    // The network goes; meanwhile the Deployment is deleted (an event the runtime cannot see) and etcd is
    // compacted past the runtime's last resource version.
    relay.cut(true);
    rt.block_on(deps.delete("web-001", &DeleteParams::background())).unwrap();
    for i in 0..20 {
        let cm =
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("churn-{i}")}});
        rt.block_on(Api::<ConfigMap>::namespaced(client.clone(), &ns).patch(
            &format!("churn-{i}"),
            &PatchParams::apply("test"),
            &Patch::Apply(&cm),
        ))
        .unwrap();
    }
    plane.compact_etcd();
    relay.cut(false);
    // Back: the watch from the old version gets 410, relists, finds the Deployment gone and creates it again
    // (the periodic resync is an hour away: only the relist can see it).
    wait_object(&rt, &deps, "web-001", "web-001 created again after the relist", |x| x.metadata.uid != d.metadata.uid);
    let after = aion.status()["kubernetes"]["relists"].as_u64().unwrap();
    assert!(after > before, "the watches relisted ({before} → {after}):\n{}", aion.stderr());
}

#[test]
fn the_api_server_killed_mid_reconcile_and_restarted_the_runtime_converges() {
    let Some(bin) = k8s::binaries() else { return };
    let plane = k8s::Plane::start(&bin, &[], true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(k8s::register_node(&plane.kubeconfig));
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "restart"));
    let yaml = r#"
microservices:
  a: {startup: yes, always: yes}
  b: {startup: yes, always: yes, scale: 3}
  c: {startup: yes, always: yes}
"#;
    let aion = start_aion(&plane.kubeconfig, &ns, yaml, &["--kube-resync", "3600"]);
    // Killed as soon as the first object is there: the rest is applied after the restart.
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_api(&rt, "a first Deployment", || {
        let deps = deps.clone();
        Box::pin(async move { (!deps.list(&ListParams::default()).await.unwrap().items.is_empty()).then_some(()) })
    });
    plane.kill_apiserver();
    plane.restart_apiserver();
    let client = rt.block_on(plane.client());
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_api(&rt, "all five Deployments", || {
        let deps = deps.clone();
        Box::pin(async move {
            let names: Vec<String> = deps
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter_map(|d| d.metadata.name)
                .collect();
            (names.len() == 5).then_some(())
        })
    });
    // The watches came back too: a deletion now is seen and repaired.
    let uid = rt.block_on(deps.get("b-002")).unwrap().metadata.uid;
    rt.block_on(deps.delete("b-002", &DeleteParams::background())).unwrap();
    let back = std::time::Instant::now();
    while rt.block_on(deps.get_opt("b-002")).ok().flatten().filter(|d| d.metadata.uid != uid).is_none() {
        assert!(back.elapsed() < LIMIT, "b-002 not created again:\n{}", aion.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(aion.status()["kubernetes"]["api_errors"].as_u64().unwrap() > 0, "the outage was seen and retried");
}

#[test]
fn deleting_the_project_anchor_cascades_to_every_object() {
    let Some(plane) = k8s::shared() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "cascade"));
    let (_kubelet, _task) = k8s::kubelet(&rt, &plane.kubeconfig, &ns);
    let mut aion = start_aion(&plane.kubeconfig, &ns, YAML, &[]);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_object(&rt, &deps, "web-001", "Deployment web-001", |_| true);
    // The runtime is gone without cleaning up (kill -9); the project is deleted by its anchor.
    aion.kill9();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    rt.block_on(cms.delete("aion-project-demo", &DeleteParams::foreground())).unwrap();
    wait_api(&rt, "every object of the project gone", || {
        let c = client.clone();
        let ns = ns.clone();
        Box::pin(async move {
            let sel = ListParams::default().labels("aion.latona.io/project=demo");
            let n = Api::<Deployment>::namespaced(c.clone(), &ns).list(&sel).await.ok()?.items.len()
                + Api::<Service>::namespaced(c.clone(), &ns).list(&sel).await.ok()?.items.len()
                + Api::<Secret>::namespaced(c.clone(), &ns).list(&sel).await.ok()?.items.len()
                + Api::<Pod>::namespaced(c.clone(), &ns).list(&sel).await.ok()?.items.len()
                + Api::<ConfigMap>::namespaced(c, &ns).list(&sel).await.ok()?.items.len();
            (n == 0).then_some(())
        })
    });
}

#[test]
fn every_real_aion_services_yml_maps_to_objects_the_api_server_accepts() {
    use aion::actors::backend::kube::objects;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion");
    let target = objects::Target {
        namespace: "default".into(),
        project: "fixtures".into(),
        image_prefix: "latonaio".into(),
        device_name: "edge".into(),
        debug: String::new(),
        endpoint: "aion-endpoint.default.svc:11010".into(),
        data_host_path: "/var/lib/aion/default/Data".into(),
        pull_secret: "dockerhub".into(),
    };
    let mut docs = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let loaded = aion::runtime::config::load_file(&path);
        let cfg = loaded.config.unwrap_or_else(|| panic!("{}: {:?}", path.display(), loaded.diagnostics));
        for ms in cfg.microservices.values() {
            match objects::instance_objects(&target, ms, 1, "t0k3n", None) {
                Ok(o) => {
                    let w = match &o.workload {
                        objects::Workload::Deployment(d) => serde_json::to_value(d).unwrap(),
                        objects::Workload::Job(j) => serde_json::to_value(j).unwrap(),
                    };
                    docs.push(w);
                    docs.push(serde_json::to_value(&o.secret).unwrap());
                    if let Some(s) = &o.service {
                        docs.push(serde_json::to_value(s).unwrap());
                    }
                }
                // AION let these through to fail at the API server; here they are a clear error first.
                Err(e) => {
                    eprintln!("refused with a clear error: {e}");
                    assert!(
                        e.contains("not a valid Kubernetes name")
                            || e.contains("port name")
                            || e.contains("privileged: yes"),
                        "{e}"
                    );
                }
            }
        }
    }
    assert!(docs.len() > 10, "the fixtures have services: {}", docs.len());
    let Some(plane) = k8s::shared() else { return };
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let file = plane.dir.path().join("fixtures.json");
    std::fs::write(&file, serde_json::to_vec(&list).unwrap()).unwrap();
    let (ok, out, err) =
        plane.kubectl(&["apply", "--server-side", "--dry-run=server", "-n", "default", "-f", file.to_str().unwrap()]);
    assert!(ok, "server-side dry run refused the objects:\n{out}\n{err}");
}

#[test]
fn the_shipped_manifests_pass_a_server_side_dry_run_and_their_role_is_enough_and_no_more() {
    let Some(plane) = k8s::shared() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "rbac"));
    // The namespace the overlays name must exist for a dry run of what goes into it.
    let _ = plane.kubectl(&["create", "namespace", "aion"]);
    for overlay in ["single", "cluster"] {
        let dir = root.join("overlays").join(overlay);
        let (ok, out, err) =
            plane.kubectl(&["apply", "--server-side", "--dry-run=server", "-k", dir.to_str().unwrap()]);
        assert!(ok, "{overlay}: {out}\n{err}");
    }
    // The base's ServiceAccount, Role and RoleBinding, for real, in a namespace of their own.
    let (ok, rendered, err) = plane.kubectl(&["kustomize", root.join("base").to_str().unwrap()]);
    assert!(ok, "{err}");
    let f = plane.dir.path().join(format!("base-{ns}.yaml"));
    std::fs::write(&f, rendered).unwrap();
    let (ok, out, err) = plane.kubectl(&["apply", "--server-side", "-n", &ns, "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let (ok, token, err) = plane.kubectl(&["create", "token", "aion", "-n", &ns]);
    assert!(ok, "{err}");
    let kc = plane.dir.path().join(format!("sa-{ns}.kubeconfig"));
    let admin = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    let ca = admin
        .lines()
        .find_map(|l| l.split("certificate-authority-data: ").nth(1))
        .unwrap()
        .trim_end_matches('}')
        .trim();
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"https://127.0.0.1:{}\", certificate-authority-data: {ca}}}\nusers:\n- name: sa\n  user: {{token: {}}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: sa, namespace: {ns}}}\ncurrent-context: t\n",
            plane.port,
            token.trim()
        ),
    )
    .unwrap();
    // The backend works with nothing more than the Role.
    let (_kubelet, _task) = k8s::kubelet(&rt, &plane.kubeconfig, &ns);
    let aion = start_aion(&kc, &ns, YAML, &[]);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_object(&rt, &deps, "web-001", "Deployment web-001 written with the ServiceAccount's token", |_| true);
    aion.wait_status("the pod seen through the ServiceAccount's watch", |s| pod_ready(s, "web"));
    assert_eq!(aion.status()["kubernetes"]["api_errors"], 0, "{}", aion.stderr());
    // Outside its scope: 403.
    for args in [
        vec!["get", "secrets", "-n", "default"],
        vec!["get", "nodes"],
        vec!["create", "namespace", "sneaky"],
        vec!["get", "deployments", "-n", "kube-system"],
        vec!["create", "clusterrolebinding", "x", "--clusterrole=cluster-admin", "--user=me"],
    ] {
        let (ok, _, err) = plane.kubectl_as(&kc, &args);
        assert!(!ok && err.to_lowercase().contains("forbidden"), "{args:?} must be forbidden: {err}");
    }
    let (ok, out, _) = plane.kubectl_as(&kc, &["auth", "can-i", "patch", "deployments", "-n", &ns]);
    assert!(ok && out.trim() == "yes", "{out}");
}

#[test]
fn a_stop_waits_for_the_pods_and_another_projects_objects_are_never_taken_over() {
    let Some(plane) = k8s::shared() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(plane.client());
    let ns = rt.block_on(k8s::namespace(&client, "stop"));
    let (_kubelet, _task) = k8s::kubelet(&rt, &plane.kubeconfig, &ns);
    let mut a = start_aion(&plane.kubeconfig, &ns, YAML, &[]);
    a.wait_status("web-001's pod ready", |s| pod_ready(s, "web"));
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let uid = rt.block_on(deps.get("web-001")).unwrap().metadata.uid;
    // A second runtime in the namespace with the same service names: refused, with the reason; the first one's
    // objects untouched.
    let wrapper = vec!["env".to_owned(), format!("KUBECONFIG={}", plane.kubeconfig.display())];
    let args = ["--backend", "kubernetes", "--namespace", &ns, "--grpc", "127.0.0.1:0", "--project", "other"];
    let b = Runtime::start_wrapped(&wrapper, YAML, tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), &args);
    let s = b.wait_status("the second runtime's web refused", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| {
            i["service"] == "web" && i["last_exit"].as_str().is_some_and(|e| e.contains("belongs to project `demo`"))
        })
    });
    assert!(s["kubernetes"]["applied"].as_u64().unwrap() <= 1, "only its own anchor: {}", s["kubernetes"]);
    drop(b);
    assert_eq!(rt.block_on(deps.get("web-001")).unwrap().metadata.uid, uid, "the first project's Deployment untouched");
    // `aion stop`: the runtime ends only once its instances' pods are gone (foreground deletion) and their
    // Services and Secrets with them.
    assert_eq!(a.stop(), 0, "{}", a.stderr());
    let sel = ListParams::default().labels("aion.latona.io/project=demo,app.kubernetes.io/name=web");
    let left = rt.block_on(async {
        Api::<Pod>::namespaced(client.clone(), &ns).list(&sel).await.unwrap().items.len()
            + Api::<Deployment>::namespaced(client.clone(), &ns).list(&sel).await.unwrap().items.len()
            + Api::<Service>::namespaced(client.clone(), &ns).list(&sel).await.unwrap().items.len()
            + Api::<Secret>::namespaced(client.clone(), &ns).list(&sel).await.unwrap().items.len()
    });
    assert_eq!(left, 0, "web-001's objects and pods are gone when the runtime has stopped");
}

#[test]
fn a_service_that_asks_for_kubernetes_is_refused_by_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.yml");
    std::fs::write(&file, "microservices:\n  cam:\n    backend: kubernetes\n    startup: yes\n").unwrap();
    let out = std::process::Command::new(common::AION)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("asks for `backend: kubernetes`"), "{err}");
    std::fs::write(&file, "microservices:\n  cam:\n    backend: cloud\n").unwrap();
    let out = std::process::Command::new(common::AION).arg("validate").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("services.yml:3:") && text.contains("`cloud` is not"), "{text}");
}
