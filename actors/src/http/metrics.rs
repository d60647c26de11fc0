//! `/metrics`: one status snapshot, encoded as Prometheus (OpenMetrics) text by prometheus-client at scrape time.
//!
//! Nothing here runs per kanban: the counters are the ones `aion status` reads (atomics the hot path increments
//! anyway), the commit-latency histogram is updated once per committed batch. Labels are bounded by the
//! configuration: `service`, `instance`, `state`, `reason` (a fixed set), `device`, `node` — never a kanban id.

use crate::control::StatusReport;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Debug)]
struct Snapshot(Box<StatusReport>);

type Labels = Vec<(&'static str, String)>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, u64)]) -> Result<(), std::fmt::Error> {
    let mut d = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(d.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, f64)]) -> Result<(), std::fmt::Error> {
    let mut d = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(d.encode_family(labels)?)?;
    }
    Ok(())
}

fn instance_labels(i: &crate::InstanceStatus) -> Labels {
    vec![("service", i.service.clone()), ("instance", i.instance.to_string())]
}

/// One row per instance, of the value `f` reads.
fn per_instance<T>(r: &StatusReport, f: impl Fn(&crate::InstanceStatus) -> T) -> Vec<(Labels, T)> {
    r.instances.iter().map(|i| (instance_labels(i), f(i))).collect()
}

fn rss_bytes() -> Option<f64> {
    // VmRSS is in kB whatever the page size (arm64 devices may use 16 or 64 KB pages).
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024.0)
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // /proc reports CPU time in USER_HZ, which Linux fixes at 100 for user space on every architecture.
    Some(ticks / 100.0)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.0;
        let per = |f: &dyn Fn(&crate::InstanceStatus) -> u64| per_instance(r, f);
        let perf = |f: &dyn Fn(&crate::InstanceStatus) -> f64| per_instance(r, f);
        counter(&mut e, "aion_instance_kanbans_in", "Kanbans delivered to the instance.", &per(&|i| i.kanbans_in))?;
        counter(&mut e, "aion_instance_kanbans_out", "Outputs the instance produced.", &per(&|i| i.kanbans_out))?;
        gauge(
            &mut e,
            "aion_instance_queue_kanbans",
            "Kanbans waiting in the instance's queue.",
            &perf(&|i| i.queue_depth as f64),
        )?;
        gauge(
            &mut e,
            "aion_instance_queue_bytes",
            "Bytes held by the instance's queue and in-flight kanbans.",
            &perf(&|i| i.queue_bytes as f64),
        )?;
        gauge(
            &mut e,
            "aion_instance_inflight_kanbans",
            "Kanbans delivered and not yet acknowledged.",
            &perf(&|i| i.inflight as f64),
        )?;
        counter(
            &mut e,
            "aion_instance_redelivered",
            "Kanbans delivered again (a session ended before their acknowledgement).",
            &per(&|i| i.redelivered),
        )?;
        counter(
            &mut e,
            "aion_instance_duplicates",
            "Outputs recognised as duplicates and dropped.",
            &per(&|i| i.duplicates),
        )?;
        counter(
            &mut e,
            "aion_instance_restarts",
            "Starts of the instance after its first.",
            &per(&|i| u64::from(i.restarts)),
        )?;
        gauge(
            &mut e,
            "aion_instance_connected",
            "1 while the instance has a session with the runtime.",
            &perf(&|i| f64::from(u8::from(i.connected))),
        )?;
        let mut states = Vec::new();
        for i in &r.instances {
            for s in crate::State::ALL {
                let mut l = instance_labels(i);
                l.push(("state", s.as_str().to_owned()));
                states.push((l, f64::from(u8::from(i.state == s))));
            }
        }
        gauge(&mut e, "aion_instance_state", "1 for the state the instance is in.", &states)?;
        let dead: Vec<(Labels, u64)> = r.dead_letters.iter().map(|(k, v)| (vec![("reason", k.clone())], *v)).collect();
        counter(&mut e, "aion_dead_letters", "Kanbans set aside as dead letters, by reason.", &dead)?;
        counter(&mut e, "aion_sessions", "Native (SDK) sessions opened.", &[(vec![], r.sessions)])?;
        counter(
            &mut e,
            "aion_rejected_connections",
            "Connections refused at the handshake.",
            &[(vec![], r.rejected_connections)],
        )?;
        if let Some(g) = &r.grpc {
            counter(&mut e, "aion_grpc_sessions", "gRPC ReceiveKanban sessions opened.", &[(vec![], g.sessions)])?;
            counter(&mut e, "aion_grpc_outputs", "Outputs received over gRPC (SendKanban).", &[(vec![], g.outputs)])?;
            counter(&mut e, "aion_grpc_refused", "gRPC calls refused.", &[(vec![], g.refused)])?;
        }
        if let Some(st) = &r.store {
            let b = vec![("backend", st.backend.clone())];
            counter(&mut e, "aion_store_commits", "Store transactions committed.", &[(b.clone(), st.commits)])?;
            counter(&mut e, "aion_store_enqueued", "Kanbans written to the store.", &[(b.clone(), st.enqueued)])?;
            counter(
                &mut e,
                "aion_store_acked",
                "Kanbans deleted from the store after acknowledgement.",
                &[(b.clone(), st.acked)],
            )?;
            counter(&mut e, "aion_store_errors", "Failed store commits (each retried).", &[(b.clone(), st.errors)])?;
            let h = &st.commit_latency;
            let mut d = e.encode_descriptor(
                "aion_store_commit_duration_seconds",
                "Time to commit one batch to the store.",
                None,
                MetricType::Histogram,
            )?;
            let mut buckets: Vec<(f64, u64)> = h.bounds.iter().copied().zip(h.counts.iter().copied()).collect();
            buckets.push((f64::INFINITY, h.counts.get(h.bounds.len()).copied().unwrap_or(0)));
            d.encode_family(&b)?.encode_histogram::<Labels>(h.sum_seconds, h.count, &buckets, None)?;
        }
        if let Some(f) = &r.federation {
            // One series per device (a device without the value has none).
            let per_dev = |v: &dyn Fn(&crate::control::DeviceReport) -> Option<f64>| -> Vec<(Labels, f64)> {
                f.devices.iter().filter_map(|d| Some((vec![("device", d.name.clone())], v(d)?))).collect()
            };
            let up = per_dev(&|d| Some(f64::from(u8::from(d.state == "up"))));
            gauge(&mut e, "aion_link_up", "1 while the link to the device is up.", &up)?;
            let rtt = per_dev(&|d| Some(d.rtt_us? as f64 / 1e6));
            gauge(&mut e, "aion_link_rtt_seconds", "Round-trip time of the link's last ping.", &rtt)?;
            let out = per_dev(&|d| Some(d.outbox as f64));
            gauge(&mut e, "aion_outbox_kanbans", "Kanbans waiting to be sent to the device.", &out)?;
            let age = per_dev(&|d| Some(d.oldest_in_flight_ms.map_or(0.0, |ms| ms as f64 / 1e3)));
            gauge(
                &mut e,
                "aion_outbox_oldest_unacknowledged_age_seconds",
                "How long the oldest kanban sent to the device has waited for its acknowledgement (0: none).",
                &age,
            )?;
            let dev = |n: &str| -> Labels { vec![("device", n.to_owned())] };
            let sent: Vec<(Labels, u64)> = f.devices.iter().map(|d| (dev(&d.name), d.sent)).collect();
            counter(&mut e, "aion_link_kanbans_sent", "Kanbans sent to the device.", &sent)?;
            let bytes: Vec<(Labels, u64)> = f.devices.iter().map(|d| (dev(&d.name), d.files.sent_bytes)).collect();
            counter(&mut e, "aion_link_file_bytes_sent", "File bytes sent to the device (Send Anything).", &bytes)?;
            let seen = per_dev(&|d| Some(d.last_seen_ms? as f64 / 1e3));
            gauge(&mut e, "aion_link_last_seen_age_seconds", "Time since the device was last heard.", &seen)?;
        }
        if let Some(c) = &r.cluster {
            let nodes: Vec<(Labels, f64)> =
                c.nodes.iter().map(|n| (vec![("node", n.name.clone())], f64::from(u8::from(n.connected)))).collect();
            gauge(
                &mut e,
                "aion_cluster_node_connected",
                "1 while the node's control connection is up (master).",
                &nodes,
            )?;
        }
        if let Some(k) = &r.kubernetes {
            for (name, help, v) in [
                ("aion_kube_applied", "Objects written to the Kubernetes API server.", k.applied),
                ("aion_kube_drift_repaired", "Drift repaired.", k.drift_repaired),
                ("aion_kube_api_errors", "Failed Kubernetes API calls (retried).", k.api_errors),
                ("aion_kube_relists", "Watches restarted with a full list.", k.relists),
                ("aion_kube_endpoint_refused", "Endpoint calls refused by the pod gate.", k.refused),
            ] {
                counter(&mut e, name, help, &[(vec![], v)])?;
            }
        }
        gauge(&mut e, "aion_uptime_seconds", "Time since the runtime started.", &[(vec![], r.uptime_secs as f64)])?;
        for (name, help, v) in [
            ("process_resident_memory_bytes", "Resident memory.", rss_bytes()),
            ("process_open_fds", "Open file descriptors.", open_fds()),
        ] {
            if let Some(v) = v {
                gauge(&mut e, name, help, &[(vec![], v)])?;
            }
        }
        if let Some(v) = cpu_seconds() {
            let mut d =
                e.encode_descriptor("process_cpu_seconds", "User and system CPU time.", None, MetricType::Counter)?;
            ConstCounter::new(v).encode(d.encode_family(&Labels::new())?)?;
        }
        Ok(())
    }
}

/// The text of `/metrics` for a status snapshot.
pub fn encode(r: StatusReport) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Snapshot(Box::new(r))));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::error!("metrics encoding failed: {e}");
    }
    out
}
