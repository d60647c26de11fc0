//! (Included by tests/kubernetes.rs only: `#[path = "common/k8s.rs"] mod k8s;`.)
//!
//! A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
//! v1.20 (built by `tests/k8s/build-k8s.sh`), on free loopback ports, owned by the test; and the kubelet the
//! tests play (no container runtime can run here): it registers a Node, marks scheduled pods Running and Ready
//! (or Succeeded when a test says the Job's work is done) and finishes pod deletions.

use crate::common::wait_until;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The node the test kubelet plays.
pub const NODE: &str = "edge-1";

/// Where the control plane's binaries are: `AION_TEST_K8S_BIN`, else the cache `.ci/run` builds into.
/// `None` (the test says SKIPPED) without them, unless `AION_REQUIRE_K8S=1` (CI), where that fails the test.
pub fn binaries() -> Option<PathBuf> {
    let dir =
        std::env::var_os("AION_TEST_K8S_BIN").map_or_else(|| PathBuf::from("/var/cache/aion-k8s/bin"), PathBuf::from);
    let ok =
        ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"].iter().all(|b| dir.join(b).is_file())
            && which("kubectl")
            && which("openssl");
    if ok {
        return Some(dir);
    }
    let why = format!(
        "no Kubernetes control plane in {} (or no kubectl/openssl): build it with `tests/k8s/build-k8s.sh {}`",
        dir.display(),
        dir.parent().unwrap_or(&dir).display()
    );
    if std::env::var("AION_REQUIRE_K8S").is_ok_and(|v| v == "1") {
        panic!("AION_REQUIRE_K8S=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn which(prog: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    crate::common::free_port()
}

/// A running control plane (see the module docs). Dropping it kills its processes; a watchdog kills them too
/// if the test process dies first.
pub struct Plane {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub port: u16,
    pub etcd_port: u16,
    peer_port: u16,
    pub kubeconfig: PathBuf,
    procs: Mutex<HashMap<&'static str, Child>>,
    extra: Vec<String>,
}

impl Plane {
    /// Starts etcd, the API server (with `extra` flags) and, if `controllers`, the controller manager and the
    /// scheduler; registers the test kubelet's Node.
    pub fn start(bin: &Path, extra: &[&str], controllers: bool) -> Plane {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let pki = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s/pki.sh");
        let out = Command::new("bash").arg(&pki).arg(dir.path()).arg(port.to_string()).output().expect("pki.sh");
        assert!(out.status.success(), "pki.sh: {}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let p = Plane {
            bin: bin.to_path_buf(),
            port,
            etcd_port: free_port(),
            peer_port: free_port(),
            kubeconfig,
            procs: Mutex::new(HashMap::new()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        p.spawn_etcd();
        p.spawn_apiserver();
        p.wait_ready();
        if controllers {
            let kc = p.kubeconfig.display().to_string();
            let sa = p.dir.path().join("pki/sa.key").display().to_string();
            let ca = p.dir.path().join("pki/ca.crt").display().to_string();
            p.spawn(
                "kcm",
                "kube-controller-manager",
                &[
                    &format!("--kubeconfig={kc}"),
                    "--leader-elect=false",
                    "--port=0",
                    "--secure-port=0",
                    &format!("--service-account-private-key-file={sa}"),
                    &format!("--root-ca-file={ca}"),
                    "--controllers=*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-route,-service",
                    "--concurrent-gc-syncs=5",
                ],
            );
            p.spawn(
                "sched",
                "kube-scheduler",
                &[&format!("--kubeconfig={kc}"), "--leader-elect=false", "--port=0", "--secure-port=0"],
            );
        }
        p.watchdog();
        p
    }

    fn spawn(&self, name: &'static str, bin: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let child = Command::new(self.bin.join(bin))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}"));
        self.procs.lock().unwrap().insert(name, child);
    }

    fn spawn_etcd(&self) {
        let (c, pe) = (self.etcd_port, self.peer_port);
        let data = self.dir.path().join("etcd").display().to_string();
        self.spawn(
            "etcd",
            "etcd",
            &[
                "--name",
                "t",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{pe}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{pe}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{pe}"),
            ],
        );
    }

    fn spawn_apiserver(&self) {
        let d = self.dir.path().display().to_string();
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.port),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={d}/pki/apiserver.crt"),
            format!("--tls-private-key-file={d}/pki/apiserver.key"),
            format!("--client-ca-file={d}/pki/ca.crt"),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={d}/pki/sa.pub"),
            format!("--service-account-signing-key-file={d}/pki/sa.key"),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--profiling=false".into(),
            // As kubeadm and most clusters: privileged containers allowed (services.yml `privileged: yes`).
            "--allow-privileged=true".into(),
            format!("--cert-dir={d}/certs"),
        ];
        args.extend(self.extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn("apiserver", "kube-apiserver", &refs);
    }

    fn wait_ready(&self) {
        wait_until("the API server's /readyz", Duration::from_secs(90), || {
            let (ok, out, _) = self.kubectl(&["get", "--raw", "/readyz"]);
            (ok && out.trim() == "ok").then_some(())
        });
    }

    /// Kills every process of the plane when the test process is gone (a test that panics in a static plane's
    /// life never runs its Drop).
    fn watchdog(&self) {
        let pids: Vec<String> = self.procs.lock().unwrap().values().map(|c| c.id().to_string()).collect();
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pids} 2>/dev/null",
            me = std::process::id(),
            pids = pids.join(" ")
        );
        let _ = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
    }

    /// kill -9 the API server (etcd keeps the data).
    pub fn kill_apiserver(&self) {
        if let Some(mut c) = self.procs.lock().unwrap().remove("apiserver") {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the API server again, on the same port and etcd.
    pub fn restart_apiserver(&self) {
        self.spawn_apiserver();
        self.wait_ready();
        self.watchdog();
    }

    /// Compacts etcd to its current revision: watches from older resource versions get `410 Gone`.
    pub fn compact_etcd(&self) {
        let ep = format!("http://127.0.0.1:{}", self.etcd_port);
        let out = Command::new(self.bin.join("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &ep, "endpoint", "status", "--write-out=json"])
            .output()
            .expect("etcdctl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl json");
        let rev = v[0]["Status"]["header"]["revision"].as_i64().expect("revision");
        let out = Command::new(self.bin.join("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &ep, "compact", &rev.to_string()])
            .output()
            .expect("etcdctl compact");
        assert!(out.status.success(), "compact: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `kubectl --kubeconfig admin …`: (ok, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// `kubectl` with another kubeconfig.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().expect("kubectl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// A client with the admin identity.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// The API server's log (for diagnostics).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.lock().unwrap().drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

use std::os::unix::process::CommandExt as _;

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.expect("config");
    Client::try_from(cfg).expect("client")
}

/// The plane the tests of one binary share (each test in its own namespace); `None` when skipped.
pub fn shared() -> Option<&'static Plane> {
    static PLANE: OnceLock<Option<Plane>> = OnceLock::new();
    PLANE
        .get_or_init(|| {
            let bin = binaries()?;
            // No watch cache: a watch from a compacted resource version gets 410 (tests/kubernetes.rs relists).
            let p = Plane::start(&bin, &[WATCH_CACHE_OFF], true);
            let rt = tokio::runtime::Runtime::new().expect("tokio");
            rt.block_on(register_node(&p.kubeconfig));
            Some(p)
        })
        .as_ref()
}

/// Watch caches off for what the backend watches.
pub const WATCH_CACHE_OFF: &str =
    "--watch-cache-sizes=deployments.apps#0,jobs.batch#0,services#0,secrets#0,configmaps#0,pods#0";

/// Registers the test kubelet's Node: Ready, with capacity, without the not-ready taint.
pub async fn register_node(kubeconfig: &Path) {
    let c = client_for(kubeconfig).await;
    let nodes: Api<Node> = Api::all(c);
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
    }))
    .unwrap();
    let _ = nodes.create(&PostParams::default(), &node).await;
    let status = serde_json::json!({"status": {
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet",
            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
    }});
    nodes.patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status)).await.expect("node status");
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&serde_json::json!({"spec": {"taints": null}})))
        .await
        .expect("node taints");
}

fn now() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // RFC 3339 in UTC without a date library.
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// What the test kubelet is told.
#[derive(Default)]
pub struct KubeletCtl {
    /// Pod IP by instance name (`run` label); others get 10.231.0.N.
    pub ips: HashMap<String, String>,
    /// Instances (`run` label) whose Job pods are to succeed.
    pub complete: HashSet<String>,
    /// Pods marked running so far (names).
    pub started: Vec<String>,
}

/// Plays the kubelet of [`NODE`] for the pods of `namespace` until the returned handle is dropped.
pub fn kubelet(
    rt: &tokio::runtime::Runtime,
    kubeconfig: &Path,
    namespace: &str,
) -> (Arc<Mutex<KubeletCtl>>, tokio::task::JoinHandle<()>) {
    let ctl = Arc::new(Mutex::new(KubeletCtl::default()));
    let (kc, ns, c2) = (kubeconfig.to_path_buf(), namespace.to_owned(), ctl.clone());
    let task = rt.spawn(async move {
        let client = client_for(&kc).await;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let mut next_ip = 10u32;
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list.items {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let run = p.metadata.labels.as_ref().and_then(|l| l.get("run")).cloned().unwrap_or_default();
                    if p.metadata.deletion_timestamp.is_some() {
                        let _ = pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
                        continue;
                    }
                    if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() {
                        continue; // not scheduled yet
                    }
                    let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    let container = p.spec.as_ref().map(|s| s.containers[0].name.clone()).unwrap_or_default();
                    let image = p.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default();
                    let (ip, complete) = {
                        let c = c2.lock().unwrap();
                        let ip = c.ips.get(&run).cloned().unwrap_or_else(|| {
                            next_ip += 1;
                            format!("10.231.0.{}", next_ip % 250)
                        });
                        (ip, c.complete.contains(&run))
                    };
                    let status = if complete && phase == "Running" {
                        serde_json::json!({"status": {"phase": "Succeeded", "conditions": [
                            {"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
                            "containerStatuses": [{"name": container, "image": image, "imageID": "", "ready": false,
                                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})
                    } else if phase.is_empty() || phase == "Pending" {
                        serde_json::json!({"status": {"phase": "Running", "podIP": ip, "hostIP": "10.231.0.1",
                            "podIPs": [{"ip": ip}], "startTime": now(),
                            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                                {"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
                            "containerStatuses": [{"name": container, "image": image, "imageID": "", "ready": true,
                                "started": true, "restartCount": 0, "state": {"running": {"startedAt": now()}}}]}})
                    } else {
                        continue;
                    };
                    if pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok()
                        && !complete
                    {
                        c2.lock().unwrap().started.push(name);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (ctl, task)
}

/// Creates a namespace with a unique name (`prefix-N`).
pub async fn namespace(c: &Client, prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(c.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
    name
}
