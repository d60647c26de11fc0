//! Placement: which node runs which service of a project, and the configuration each node runs (pure, tested).

use aion_runtime::config::{Device, ServicesFile};
use std::collections::BTreeMap;

/// The node a service runs on: its `targetNode`, else the master.
pub fn node_of<'a>(ms: &'a aion_runtime::config::Microservice, master: &'a str) -> &'a str {
    if ms.target_node.is_empty() {
        master
    } else {
        &ms.target_node
    }
}

/// The configuration node `node` runs for `project`: its own services only (a worker never gets another node's
/// definitions), every other node of the cluster as a device (with its address when known: `addrs`), and each
/// route to a service placed elsewhere pointed at that service's node (an explicit `device:` is kept).
pub fn slice(project: &ServicesFile, master: &str, node: &str, addrs: &BTreeMap<String, String>) -> ServicesFile {
    let mut cfg =
        ServicesFile { device_name: node.to_owned(), debug: project.debug.clone(), ..ServicesFile::default() };
    // Devices the project names itself (outside the cluster) stay; every node of the cluster is a device.
    cfg.devices = project.devices.clone();
    let mut nodes: Vec<&str> = project.microservices.values().map(|m| node_of(m, master)).collect();
    nodes.push(master);
    nodes.extend(addrs.keys().map(String::as_str));
    for n in nodes {
        if n != node {
            let addr = addrs.get(n).cloned().unwrap_or_default();
            cfg.devices.insert(n.to_owned(), Device { addr, ..Device::default() });
        }
    }
    cfg.devices.remove(node);
    for ms in project.microservices.values().filter(|m| node_of(m, master) == node) {
        let mut ms = ms.clone();
        for targets in ms.next_service.values_mut() {
            for t in targets.iter_mut().filter(|t| t.device.is_empty()) {
                if let Some(target) = project.microservices.get(&t.name) {
                    let there = node_of(target, master);
                    if there != node {
                        t.device = there.to_owned();
                    }
                }
            }
        }
        cfg.microservices.insert(ms.name.clone(), ms);
    }
    cfg
}

/// Every node the project places services on (the master included).
pub fn nodes(project: &ServicesFile, master: &str) -> std::collections::BTreeSet<String> {
    let mut v: std::collections::BTreeSet<String> =
        project.microservices.values().map(|m| node_of(m, master).to_owned()).collect();
    v.insert(master.to_owned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use aion_runtime::config::load_str;

    const PROJECT: &str = "microservices:\n  a:\n    command: [x]\n    targetNode: w1\n    env: { SECRET: a-only }\n    nextService: { default: [ { name: b } ] }\n  b:\n    command: [x]\n    targetNode: w2\n    nextService: { default: [ { name: c } ], far: [ { name: c, device: edge } ] }\n  c:\n    command: [x]\n";

    fn project() -> ServicesFile {
        load_str("p.yml", PROJECT).config.expect("valid")
    }

    #[test]
    fn each_node_gets_only_its_services_and_routes_to_the_others_nodes() {
        let p = project();
        let addrs: BTreeMap<String, String> = [("w1".to_owned(), "10.0.0.2:11030".to_owned())].into();
        let w1 = slice(&p, "m", "w1", &addrs);
        assert_eq!(w1.device_name, "w1");
        assert_eq!(w1.microservices.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(w1.microservices["a"].next_service["default"][0].device, "w2", "b runs on w2");
        assert_eq!(w1.devices.keys().collect::<Vec<_>>(), vec!["m", "w2"], "every other node, not itself");
        let w2 = slice(&p, "m", "w2", &addrs);
        assert_eq!(w2.microservices.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(w2.microservices["b"].next_service["default"][0].device, "m", "c runs on the master");
        assert_eq!(w2.microservices["b"].next_service["far"][0].device, "edge", "an explicit device is kept");
        assert_eq!(w2.devices["w1"].addr, "10.0.0.2:11030");
        assert!(!w2.microservices.values().any(|m| m.env.contains_key("SECRET")), "no other node's definitions");
        let m = slice(&p, "m", "m", &addrs);
        assert_eq!(m.microservices.keys().collect::<Vec<_>>(), vec!["c"], "no targetNode: the master");
        assert_eq!(nodes(&p, "m").into_iter().collect::<Vec<_>>(), vec!["m", "w1", "w2"]);
    }

    #[test]
    fn a_slice_changes_only_where_a_service_or_its_routes_change() {
        let p = project();
        let addrs = BTreeMap::new();
        let before = slice(&p, "m", "w1", &addrs);
        let mut p2 = p.clone();
        if let Some(c) = p2.microservices.get_mut("c") {
            c.env.insert("NEW".into(), "1".into());
        }
        assert_eq!(slice(&p2, "m", "w1", &addrs), before, "a change on the master does not touch w1");
        let mut p3 = p.clone();
        if let Some(b) = p3.microservices.get_mut("b") {
            b.target_node = "w1".into();
        }
        let after = slice(&p3, "m", "w1", &addrs);
        assert_eq!(after.microservices["a"].next_service["default"][0].device, "", "b moved next to a");
        assert!(after.microservices.contains_key("b"));
    }
}
