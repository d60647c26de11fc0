//! services.yml → Kubernetes objects: pure functions, no client (unit-tested against AION's real files).
//!
//! Per instance `n` of service `svc` (AION's contract, `docs/kubernetes.md`):
//! - a **Deployment** `svc-00n` (`always: yes`; one replica, `Recreate`: never two pods of one instance) or a
//!   **Job** `svc-00n` (otherwise; one completion);
//! - a **Service** `svc-00n-srv` when the service has `ports` (`NodePort` when `network: NodePort`);
//! - a **Secret** `svc-00n-aion` holding the instance's endpoint credential (`AION_TOKEN` in the pod);
//! - labels `run: svc-00n` (AION's), `app.kubernetes.io/{name,instance,managed-by,part-of}`, and
//!   `aion.latona.io/{project,service,instance}`; every object owned by the project's anchor ConfigMap, so that
//!   deleting the project cascades.
//!
//! Only fields that Kubernetes 1.20 knows are ever set (server-side apply rejects unknown ones).

use aion_runtime::config::Microservice;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, HostPathVolumeSource, PodSpec, PodTemplateSpec,
    ResourceRequirements, Secret, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use std::collections::BTreeMap;

/// The field manager of every object the backend writes (server-side apply).
pub const FIELD_MANAGER: &str = "aion";
/// Label: the project.
pub const LABEL_PROJECT: &str = "aion.latona.io/project";
/// Label: the microservice.
pub const LABEL_SERVICE: &str = "aion.latona.io/service";
/// Label: the instance number.
pub const LABEL_INSTANCE: &str = "aion.latona.io/instance";
/// Label: who manages the object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// AION's own selector label, `run: <svc>-<NNN>`.
pub const LABEL_RUN: &str = "run";
/// The Secret key holding an instance's endpoint credential.
pub const TOKEN_KEY: &str = "token";
/// Where the instance's data directory is mounted in its pod (`$AION_HOME/Data`, as AION).
pub const POD_AION_HOME: &str = "/var/lib/aion";

/// What the objects need beyond the microservice's own definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The namespace every object goes to.
    pub namespace: String,
    /// The project's name (a label value; the anchor ConfigMap is `aion-project-<project>`).
    pub project: String,
    /// Image = `<image_prefix>/<service>:<tag>` (AION's `REPOSITORY_PREFIX`); empty: `<service>:<tag>`.
    pub image_prefix: String,
    /// `deviceName` (`DEVICE_NAME`).
    pub device_name: String,
    /// `debug` (`DEBUG`).
    pub debug: String,
    /// The runtime's kanban endpoint as pods reach it (`KANBAN_ADDR`, `host:port`).
    pub endpoint: String,
    /// The host directory mounted as `$AION_HOME/Data` (AION: `/var/lib/aion/<namespace>/Data`); empty: none.
    pub data_host_path: String,
    /// The `imagePullSecrets` (AION's `REGISTRY_SECRET`); empty: none.
    pub pull_secret: String,
}

impl Target {
    /// The anchor ConfigMap's name.
    pub fn anchor_name(&self) -> String {
        format!("aion-project-{}", self.project)
    }

    /// The labels every object of the project carries.
    pub fn project_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
            (LABEL_PROJECT.to_owned(), self.project.clone()),
        ])
    }

    /// The label selector of the project's objects.
    pub fn selector(&self) -> String {
        format!("{LABEL_MANAGED_BY}={FIELD_MANAGER},{LABEL_PROJECT}={}", self.project)
    }
}

/// The run-to-completion or long-running object of an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// `always: yes`.
    Deployment(Box<Deployment>),
    /// Otherwise.
    Job(Box<Job>),
}

impl Workload {
    /// `Deployment` or `Job`.
    pub fn kind(&self) -> &'static str {
        match self {
            Workload::Deployment(_) => "Deployment",
            Workload::Job(_) => "Job",
        }
    }
}

/// Everything one instance is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceObjects {
    /// `svc-00n`.
    pub name: String,
    /// Its Deployment or Job.
    pub workload: Workload,
    /// Its Service, when it has ports.
    pub service: Option<Service>,
    /// Its credential.
    pub secret: Secret,
}

/// AION's instance name: `<svc>-<NNN>` (three digits at least).
pub fn instance_name(service: &str, instance: u32) -> String {
    format!("{service}-{instance:03}")
}

/// True if `s` is a DNS-1035 label (lower-case letters, digits and `-`, a letter first, not ending in `-`) of at
/// most `max` characters.
fn dns1035(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// True if `s` is a DNS-1123 label of at most `max` characters (lower-case letters, digits and `-`, alphanumeric
/// at both ends).
pub fn dns1123(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// `s` made a DNS-1123 label of at most 50 characters (lower case; anything else `-`; `aion` if nothing is
/// left): a project name from a device name such as `ip-10-0-0-1.ec2.internal`.
pub fn label_value(s: &str) -> String {
    let mapped: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(50).collect();
    let t = mapped.trim_matches('-');
    if t.is_empty() {
        "aion".to_owned()
    } else {
        t.to_owned()
    }
}

/// Checks that a service can be run on Kubernetes (its name, ports, mounts), with a clear error.
///
/// # Errors
/// What is wrong, naming the service and the field.
pub fn check(ms: &Microservice) -> Result<(), String> {
    // `<svc>-<NNN>-srv` must be a DNS-1035 label of at most 63 characters.
    if !dns1035(&ms.name, 55) {
        return Err(format!(
            "microservice `{}`: not a valid Kubernetes name (lower-case letters, digits and `-`, a letter first, at \
             most 55 characters)",
            ms.name
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for p in &ms.ports {
        if !dns1035(&p.name, 15) {
            return Err(format!(
                "microservice `{}`: port name `{}` is not a valid Kubernetes port name (lower-case letters, digits \
                 and `-`, at most 15 characters)",
                ms.name, p.name
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(format!("microservice `{}`: port name `{}` is used twice", ms.name, p.name));
        }
        if !(1..=65535).contains(&p.port) {
            return Err(format!("microservice `{}`: port `{}` is {}, not 1-65535", ms.name, p.name, p.port));
        }
        if !matches!(protocol(&p.protocol), "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "microservice `{}`: port `{}` protocol `{}` is not TCP, UDP or SCTP",
                ms.name, p.name, p.protocol
            ));
        }
    }
    for v in &ms.volume_mount_path_list {
        if !v.container_path.starts_with('/') || !v.host_path.starts_with('/') {
            return Err(format!(
                "microservice `{}`: volume `{}:{}` needs absolute paths (container path first, as AION)",
                ms.name, v.container_path, v.host_path
            ));
        }
        if v.bidirectional && !ms.privileged {
            return Err(format!(
                "microservice `{}`: volume `{}` asks for Bidirectional propagation, which Kubernetes allows only \
                 with `privileged: yes`",
                ms.name, v.container_path
            ));
        }
    }
    Ok(())
}

fn protocol(p: &str) -> &str {
    if p.is_empty() {
        "TCP"
    } else {
        p
    }
}

/// The labels of one instance's objects (and of its pods).
pub fn instance_labels(t: &Target, service: &str, instance: u32) -> BTreeMap<String, String> {
    let mut l = t.project_labels();
    l.insert(LABEL_SERVICE.to_owned(), service.to_owned());
    l.insert(LABEL_INSTANCE.to_owned(), instance.to_string());
    l.insert(LABEL_RUN.to_owned(), instance_name(service, instance));
    l.insert("app.kubernetes.io/name".to_owned(), service.to_owned());
    l.insert("app.kubernetes.io/instance".to_owned(), instance_name(service, instance));
    l.insert("app.kubernetes.io/part-of".to_owned(), t.project.clone());
    l
}

fn meta(t: &Target, name: String, labels: BTreeMap<String, String>, owner: Option<&OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(t.namespace.clone()),
        labels: Some(labels),
        owner_references: owner.map(|o| vec![o.clone()]),
        ..ObjectMeta::default()
    }
}

/// The project's anchor: a ConfigMap every object of the project is owned by (deleting it cascades). It names
/// the device and the services (not their definitions: `env` may hold credentials, and ConfigMaps are readable
/// by more people than Secrets).
pub fn anchor(t: &Target, services: &[&str]) -> ConfigMap {
    ConfigMap {
        metadata: meta(t, t.anchor_name(), t.project_labels(), None),
        data: Some(BTreeMap::from([
            ("deviceName".to_owned(), t.device_name.clone()),
            ("services".to_owned(), services.join("\n")),
        ])),
        ..ConfigMap::default()
    }
}

/// An owner reference to the anchor (its uid comes from the API server).
pub fn owner(t: &Target, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "ConfigMap".to_owned(),
        name: t.anchor_name(),
        uid: uid.to_owned(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), value_from: None }
}

fn quantities(r: &aion_runtime::config::ResourceConfig) -> Option<BTreeMap<String, Quantity>> {
    let mut m = BTreeMap::new();
    if !r.cpu.is_empty() {
        m.insert("cpu".to_owned(), Quantity(r.cpu.clone()));
    }
    if !r.memory.is_empty() {
        m.insert("memory".to_owned(), Quantity(r.memory.clone()));
    }
    (!m.is_empty()).then_some(m)
}

/// The environment of an instance's container: the service's `env`, then what AION sets (`SERVICE_NAME`,
/// `MS_NUMBER`, `AION_HOME`, `DEVICE_NAME`, `DEBUG` override it, as AION), what its client libraries need
/// (`KANBAN_ADDR`, `SERVICE`, `MSNUMBER`) and the credential from the instance's Secret.
fn container_env(t: &Target, ms: &Microservice, instance: u32, secret: &str) -> Vec<EnvVar> {
    let mut vars: BTreeMap<String, String> = ms.env.clone();
    for (k, v) in crate::backend::process::aion_client_env(ms, Some(&t.endpoint)) {
        vars.insert(k, v);
    }
    vars.insert("SERVICE_NAME".to_owned(), ms.name.clone());
    vars.insert("MS_NUMBER".to_owned(), instance.to_string());
    vars.insert("MSNUMBER".to_owned(), instance.to_string());
    vars.insert("AION_HOME".to_owned(), POD_AION_HOME.to_owned());
    vars.insert("AION_DATA_PATH".to_owned(), format!("{POD_AION_HOME}/Data/{}_{instance}", ms.name));
    vars.insert("DEVICE_NAME".to_owned(), t.device_name.clone());
    vars.insert("DEBUG".to_owned(), t.debug.clone());
    vars.insert("AION_ENDPOINT".to_owned(), t.endpoint.clone());
    vars.remove("AION_TOKEN");
    let mut out: Vec<EnvVar> = vars.into_iter().map(|(k, v)| env(&k, v)).collect();
    out.push(EnvVar {
        name: "AION_TOKEN".to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: TOKEN_KEY.to_owned(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    });
    out
}

fn pod_template(t: &Target, ms: &Microservice, instance: u32, secret: &str, job: bool) -> PodTemplateSpec {
    let name = instance_name(&ms.name, instance);
    let image = if t.image_prefix.is_empty() {
        format!("{}:{}", ms.name, ms.tag)
    } else {
        format!("{}/{}:{}", t.image_prefix.trim_end_matches('/'), ms.name, ms.tag)
    };
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if !t.data_host_path.is_empty() {
        volumes.push(Volume {
            name: "aion-data".to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: t.data_host_path.clone(),
                type_: Some("DirectoryOrCreate".to_owned()),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "aion-data".to_owned(),
            mount_path: format!("{POD_AION_HOME}/Data"),
            ..VolumeMount::default()
        });
    }
    for (i, v) in ms.volume_mount_path_list.iter().enumerate() {
        let vname = format!("data-{i}");
        volumes.push(Volume {
            name: vname.clone(),
            host_path: Some(HostPathVolumeSource { path: v.host_path.clone(), type_: None }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: vname,
            mount_path: v.container_path.clone(),
            mount_propagation: v.bidirectional.then(|| "Bidirectional".to_owned()),
            ..VolumeMount::default()
        });
    }
    let resources = {
        let requests = quantities(&ms.resources.requests);
        let limits = quantities(&ms.resources.limits);
        (requests.is_some() || limits.is_some()).then_some(ResourceRequirements {
            requests,
            limits,
            ..ResourceRequirements::default()
        })
    };
    let ports: Vec<ContainerPort> = ms
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.clone()),
            container_port: p.port,
            protocol: Some(protocol(&p.protocol).to_owned()),
            ..ContainerPort::default()
        })
        .collect();
    let container = Container {
        name: name.clone(),
        image: Some(image),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: (!ms.command.is_empty()).then(|| ms.command.clone()),
        env: Some(container_env(t, ms, instance, secret)),
        ports: (!ports.is_empty()).then_some(ports),
        resources,
        security_context: ms
            .privileged
            .then(|| SecurityContext { privileged: Some(true), ..SecurityContext::default() }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    };
    let node_selector = (!ms.target_node.is_empty())
        .then(|| BTreeMap::from([("kubernetes.io/hostname".to_owned(), ms.target_node.clone())]));
    let sa = if ms.service_account.is_empty() { "default".to_owned() } else { ms.service_account.clone() };
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(instance_labels(t, &ms.name, instance)), ..ObjectMeta::default() }),
        spec: Some(PodSpec {
            hostname: Some(name),
            containers: vec![container],
            service_account_name: Some(sa),
            node_selector,
            volumes: (!volumes.is_empty()).then_some(volumes),
            restart_policy: Some(if job { "OnFailure" } else { "Always" }.to_owned()),
            image_pull_secrets: (!t.pull_secret.is_empty())
                .then(|| vec![k8s_openapi::api::core::v1::LocalObjectReference { name: t.pull_secret.clone() }]),
            ..PodSpec::default()
        }),
    }
}

/// The objects of instance `instance` of `ms`, owned by `owner` (the anchor) when given, with `token` as its
/// credential.
///
/// # Errors
/// [`check`]'s.
pub fn instance_objects(
    t: &Target,
    ms: &Microservice,
    instance: u32,
    token: &str,
    owner: Option<&OwnerReference>,
) -> Result<InstanceObjects, String> {
    check(ms)?;
    let name = instance_name(&ms.name, instance);
    let labels = instance_labels(t, &ms.name, instance);
    let secret_name = format!("{name}-aion");
    let secret = Secret {
        metadata: meta(t, secret_name.clone(), labels.clone(), owner),
        data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([(LABEL_RUN.to_owned(), name.clone())])),
        match_expressions: None,
    };
    let workload = if ms.always {
        Workload::Deployment(Box::new(Deployment {
            metadata: meta(t, name.clone(), labels.clone(), owner),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector,
                strategy: Some(DeploymentStrategy { type_: Some("Recreate".to_owned()), rolling_update: None }),
                template: pod_template(t, ms, instance, &secret_name, false),
                ..DeploymentSpec::default()
            }),
            status: None,
        }))
    } else {
        Workload::Job(Box::new(Job {
            metadata: meta(t, name.clone(), labels.clone(), owner),
            spec: Some(JobSpec {
                completions: Some(1),
                parallelism: Some(1),
                backoff_limit: Some(1),
                template: pod_template(t, ms, instance, &secret_name, true),
                ..JobSpec::default()
            }),
            status: None,
        }))
    };
    let service = (!ms.ports.is_empty()).then(|| {
        let node_port = ms.network == "NodePort";
        Service {
            metadata: meta(t, format!("{name}-srv"), labels.clone(), owner),
            spec: Some(ServiceSpec {
                type_: Some(if node_port { "NodePort" } else { "ClusterIP" }.to_owned()),
                selector: Some(BTreeMap::from([(LABEL_RUN.to_owned(), name.clone())])),
                ports: Some(
                    ms.ports
                        .iter()
                        .map(|p| ServicePort {
                            name: Some(p.name.clone()),
                            protocol: Some(protocol(&p.protocol).to_owned()),
                            port: p.port,
                            target_port: Some(IntOrString::Int(p.port)),
                            node_port: (node_port && p.node_port > 0).then_some(p.node_port),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    });
    Ok(InstanceObjects { name, workload, service, secret })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aion_runtime::config::{Port, VolumeMount as Mount};
    use serde_json::json;

    fn target() -> Target {
        Target {
            namespace: "edge".into(),
            project: "demo".into(),
            image_prefix: "latonaio".into(),
            device_name: "dev1".into(),
            debug: "false".into(),
            endpoint: "aion-endpoint.edge.svc:11010".into(),
            data_host_path: "/var/lib/aion/edge/Data".into(),
            pull_secret: String::new(),
        }
    }

    fn env_of(pod: &PodTemplateSpec) -> BTreeMap<String, serde_json::Value> {
        let spec = pod.spec.as_ref().unwrap();
        spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), serde_json::to_value(e).unwrap()))
            .collect()
    }

    #[test]
    fn always_is_a_deployment_with_one_recreated_replica() {
        let mut ms = Microservice::with_defaults("camera");
        ms.always = true;
        ms.tag = "1.2".into();
        ms.command = vec!["python3".into(), "-u".into(), "main.py".into()];
        ms.env.insert("MS_NUMBER".into(), "9".into());
        ms.env.insert("DEVICE_NAME".into(), "mine".into());
        ms.env.insert("KANBAN_ADDR".into(), "aion-statuskanban:10000".into());
        ms.env.insert("MYSQL_PORT".into(), "3306".into());
        let o = instance_objects(&target(), &ms, 2, "tok", None).unwrap();
        assert_eq!(o.name, "camera-002");
        let Workload::Deployment(d) = &o.workload else { panic!("not a deployment") };
        let v = serde_json::to_value(d.as_ref()).unwrap();
        assert_eq!(v["spec"]["replicas"], 1);
        assert_eq!(v["spec"]["strategy"]["type"], "Recreate");
        assert_eq!(v["spec"]["selector"]["matchLabels"], json!({"run": "camera-002"}));
        assert_eq!(v["metadata"]["labels"]["aion.latona.io/project"], "demo");
        assert_eq!(v["metadata"]["labels"]["aion.latona.io/instance"], "2");
        assert_eq!(v["metadata"]["namespace"], "edge");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "latonaio/camera:1.2");
        assert_eq!(c["command"], json!(["python3", "-u", "main.py"]));
        assert!(c.get("securityContext").is_none(), "privileged only when asked");
        assert_eq!(v["spec"]["template"]["spec"]["restartPolicy"], "Always");
        assert_eq!(v["spec"]["template"]["spec"]["serviceAccountName"], "default");
        assert_eq!(v["spec"]["template"]["metadata"]["labels"]["run"], "camera-002");
        let env = env_of(&d.spec.as_ref().unwrap().template);
        // AION's variables override the service's own, as AION does.
        assert_eq!(env["MS_NUMBER"]["value"], "2");
        assert_eq!(env["MSNUMBER"]["value"], "2");
        assert_eq!(env["DEVICE_NAME"]["value"], "dev1");
        assert_eq!(env["MYSQL_PORT"]["value"], "3306");
        assert_eq!(env["SERVICE_NAME"]["value"], "camera");
        assert_eq!(env["SERVICE"]["value"], "camera");
        // AION's in-cluster kanban server name is replaced by the runtime's endpoint.
        assert_eq!(env["KANBAN_ADDR"]["value"], "aion-endpoint.edge.svc:11010");
        assert_eq!(env["AION_TOKEN"]["valueFrom"]["secretKeyRef"], json!({"name": "camera-002-aion", "key": "token"}));
        assert!(o.service.is_none(), "no ports, no Service");
        assert_eq!(o.secret.data.as_ref().unwrap()["token"].0, b"tok");
    }

    #[test]
    fn otherwise_a_job_and_ports_make_a_service() {
        let mut ms = Microservice::with_defaults("web");
        ms.ports = vec![
            Port { name: "http".into(), protocol: String::new(), port: 8080, node_port: 30080 },
            Port { name: "metrics".into(), protocol: "UDP".into(), port: 9000, node_port: 0 },
        ];
        ms.network = "NodePort".into();
        ms.target_node = "edge-1".into();
        ms.service_account = "camera-sa".into();
        ms.privileged = true;
        ms.resources.requests.cpu = "100m".into();
        ms.resources.limits.memory = "256Mi".into();
        ms.volume_mount_path_list = vec![
            Mount { container_path: "/devices".into(), host_path: "/dev".into(), bidirectional: true },
            Mount { container_path: "/data".into(), host_path: "/srv/data".into(), bidirectional: false },
        ];
        let o = instance_objects(&target(), &ms, 1, "tok", Some(&owner(&target(), "uid-1"))).unwrap();
        let Workload::Job(j) = &o.workload else { panic!("not a job") };
        let v = serde_json::to_value(j.as_ref()).unwrap();
        assert_eq!(v["spec"]["completions"], 1);
        assert_eq!(v["spec"]["parallelism"], 1);
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "ConfigMap");
        assert_eq!(v["metadata"]["ownerReferences"][0]["name"], "aion-project-demo");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "OnFailure");
        assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/hostname": "edge-1"}));
        assert_eq!(pod["serviceAccountName"], "camera-sa");
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"], json!({"privileged": true}));
        assert_eq!(c["resources"], json!({"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}));
        assert_eq!(c["ports"][0], json!({"name": "http", "containerPort": 8080, "protocol": "TCP"}));
        assert_eq!(c["volumeMounts"][0], json!({"name": "aion-data", "mountPath": "/var/lib/aion/Data"}));
        assert_eq!(
            c["volumeMounts"][1],
            json!({"name": "data-0", "mountPath": "/devices", "mountPropagation": "Bidirectional"})
        );
        assert_eq!(c["volumeMounts"][2], json!({"name": "data-1", "mountPath": "/data"}));
        assert_eq!(pod["volumes"][1], json!({"name": "data-0", "hostPath": {"path": "/dev"}}));
        let s = serde_json::to_value(o.service.as_ref().unwrap()).unwrap();
        assert_eq!(s["metadata"]["name"], "web-001-srv");
        assert_eq!(s["spec"]["type"], "NodePort");
        assert_eq!(s["spec"]["selector"], json!({"run": "web-001"}));
        // Kubernetes 1.20's server-side apply needs the protocol spelled out.
        assert_eq!(
            s["spec"]["ports"][0],
            json!({"name": "http", "protocol": "TCP", "port": 8080, "targetPort": 8080, "nodePort": 30080})
        );
        assert_eq!(s["spec"]["ports"][1]["protocol"], "UDP");
        assert!(s["spec"]["ports"][1].get("nodePort").is_none());
        ms.network = "anything".into();
        let o = instance_objects(&target(), &ms, 1, "tok", None).unwrap();
        assert_eq!(
            o.service.unwrap().spec.unwrap().type_.as_deref(),
            Some("ClusterIP"),
            "AION: anything else is ClusterIP"
        );
    }

    #[test]
    fn names_ports_and_mounts_kubernetes_refuses_are_clear_errors() {
        let mut ms = Microservice::with_defaults("Bad_Name");
        assert!(check(&ms).unwrap_err().contains("`Bad_Name`: not a valid Kubernetes name"));
        ms.name = "a".repeat(56);
        assert!(check(&ms).is_err());
        ms.name = "ok".into();
        ms.ports = vec![Port { name: "HTTP".into(), protocol: String::new(), port: 80, node_port: 0 }];
        assert!(check(&ms).unwrap_err().contains("port name `HTTP`"));
        ms.ports = vec![
            Port { name: "a".into(), protocol: String::new(), port: 80, node_port: 0 },
            Port { name: "a".into(), protocol: String::new(), port: 81, node_port: 0 },
        ];
        assert!(check(&ms).unwrap_err().contains("used twice"));
        ms.ports = vec![Port { name: "a".into(), protocol: "ICMP".into(), port: 80, node_port: 0 }];
        assert!(check(&ms).unwrap_err().contains("ICMP"));
        ms.ports.clear();
        ms.volume_mount_path_list =
            vec![Mount { container_path: "/devices".into(), host_path: "/dev".into(), bidirectional: true }];
        assert!(check(&ms).unwrap_err().contains("privileged: yes"));
        ms.privileged = true;
        assert!(check(&ms).is_ok());
    }

    #[test]
    fn project_names_from_device_names() {
        assert_eq!(label_value("ip-10-0-0-1.ec2.internal"), "ip-10-0-0-1-ec2-internal");
        assert_eq!(label_value("Edge_1"), "edge-1");
        assert_eq!(label_value(""), "aion");
        assert_eq!(label_value("--"), "aion");
        assert!(dns1123(&label_value(&"x".repeat(80)), 50));
    }

    #[test]
    fn nothing_newer_than_kubernetes_1_20_is_set() {
        // Fields server-side apply on 1.20 rejects: pod `hostUsers`, `os`, `resizePolicy`, job `podFailurePolicy`,
        // `suspend` is 1.21, service `ipFamilyPolicy` and `internalTrafficPolicy`...
        let mut ms = Microservice::with_defaults("web");
        ms.ports = vec![Port { name: "http".into(), protocol: String::new(), port: 80, node_port: 0 }];
        for always in [true, false] {
            ms.always = always;
            let o = instance_objects(&target(), &ms, 1, "t", None).unwrap();
            let text = match &o.workload {
                Workload::Deployment(d) => serde_json::to_string(d).unwrap(),
                Workload::Job(j) => serde_json::to_string(j).unwrap(),
            } + &serde_json::to_string(&o.service).unwrap();
            for newer in [
                "hostUsers",
                "\"os\"",
                "resizePolicy",
                "podFailurePolicy",
                "suspend",
                "ipFamilyPolicy",
                "internalTrafficPolicy",
                "completionMode",
                "minReadySeconds",
                "schedulingGates",
            ] {
                assert!(!text.contains(newer), "{newer} in {text}");
            }
        }
    }
}
