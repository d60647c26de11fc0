//! Converts a [`Node`] tree into the model with yaml.v2 semantics, collecting every diagnostic.

use super::yaml::{parse_document, Node, Pos};
use super::*;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;

/// Loads and validates a services.yml file.
///
/// # Examples
/// ```
/// let l = aion_runtime::config::load_str("s.yml", "microservices:\n  a:\n    startup: yes\n    scale: 2\n");
/// let cfg = l.config.unwrap();
/// assert!(cfg.microservices["a"].startup);
/// assert_eq!(cfg.microservices["a"].scale, 2);
/// ```
pub fn load_file(path: &Path) -> Loaded {
    let file = path.display().to_string();
    let refuse = |message: String| Loaded {
        config: None,
        diagnostics: vec![Diagnostic { severity: Severity::Error, file: file.clone(), line: 0, column: 0, message }],
        positions: BTreeMap::new(),
        file: file.clone(),
    };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return refuse(format!("the file is {} bytes; a services.yml may have at most {MAX_FILE_BYTES}", m.len()))
        }
        _ => {}
    }
    match std::fs::read_to_string(path) {
        Ok(src) => load_str(&file, &src),
        Err(e) => refuse(format!("cannot read file: {e}")),
    }
}

/// Loads and validates services.yml text; `file` names it in diagnostics.
pub fn load_str(file: &str, src: &str) -> Loaded {
    let mut cx = Cx { file, diags: Vec::new(), positions: BTreeMap::new(), edges: Vec::new() };
    // A byte order mark (Windows editors) is not part of the document, as in yaml.v2.
    let src = src.strip_prefix('\u{feff}').unwrap_or(src);
    let doc = match parse_document(src) {
        Ok(d) => d,
        Err(e) => {
            cx.err(e.pos, format!("YAML syntax error: {}", e.message));
            return Loaded { config: None, diagnostics: cx.diags, positions: cx.positions, file: file.to_owned() };
        }
    };
    if let Some(pos) = doc.second_document {
        cx.warn(pos, "a second YAML document starts here; it is ignored (only the first is read, as AION did)".into());
    }
    let cfg = match &doc.root {
        None => Some(ServicesFile::default()),
        Some(n) if n.is_null() => Some(ServicesFile::default()),
        Some(n) => top(&mut cx, n),
    };
    warn_cycles(&mut cx);
    if cfg.as_ref().is_some_and(|c| c.microservices.is_empty()) {
        let pos = cx.positions.get("microservices").map_or(Pos { line: 1, col: 1 }, |&(line, col)| Pos { line, col });
        cx.warn(pos, "no microservices are defined: nothing will run".into());
    }
    cx.diags.sort_by_key(|d| (d.line, d.column));
    let failed = cx.diags.iter().any(|d| d.severity == Severity::Error);
    Loaded {
        config: if failed { None } else { cfg },
        diagnostics: cx.diags,
        positions: cx.positions,
        file: file.to_owned(),
    }
}

struct Cx<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
    positions: BTreeMap<String, (usize, usize)>,
    /// Local routes (from, to, where the target is named), for the cycle check.
    edges: Vec<(String, String, Pos)>,
}

impl Cx<'_> {
    fn push(&mut self, severity: Severity, pos: Pos, message: String) {
        self.diags.push(Diagnostic { severity, file: self.file.to_owned(), line: pos.line, column: pos.col, message });
    }
    fn err(&mut self, pos: Pos, message: String) {
        self.push(Severity::Error, pos, message)
    }
    fn warn(&mut self, pos: Pos, message: String) {
        self.push(Severity::Warning, pos, message)
    }
}

/// The entries of a mapping with string keys; reports non-scalar and duplicate keys. Null → no entries.
fn entries<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<Vec<(String, Pos, &'n Node)>> {
    let items = match node {
        Node::Map(items, _) => items,
        n if n.is_null() => return Some(Vec::new()),
        n => {
            cx.err(n.pos(), format!("{path}: expected a mapping, found {}", n.kind()));
            return None;
        }
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Node::Scalar { value, .. } = k else {
            cx.err(k.pos(), format!("{path}: a key must be a scalar, found {}", k.kind()));
            continue;
        };
        if !seen.insert(value.clone()) {
            cx.err(k.pos(), format!("{path}: key `{value}` is defined more than once"));
            continue;
        }
        out.push((value.clone(), k.pos(), v));
    }
    Some(out)
}

fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    match node {
        n if n.is_null() => Some(String::new()),
        Node::Scalar { value, .. } => Some(value.clone()),
        n => {
            cx.err(n.pos(), format!("{path}: expected a string, found {}", n.kind()));
            None
        }
    }
}

fn boolean(cx: &mut Cx, node: &Node, path: &str) -> Option<bool> {
    if node.is_null() {
        return Some(false);
    }
    if let Node::Scalar { value, plain: true, tag: None, .. } = node {
        match value.as_str() {
            "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => return Some(true),
            "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => return Some(false),
            _ => {}
        }
    }
    let shown = match node {
        Node::Scalar { value, .. } => format!("`{value}`"),
        n => n.kind().to_owned(),
    };
    cx.err(node.pos(), format!("{path}: expected a boolean (yes/no, true/false, on/off), found {shown}"));
    None
}

/// Parses a YAML 1.1 integer (decimal, 0x, 0o/leading-0 octal, 0b, with `_` separators).
fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let body: String = body.chars().filter(|c| *c != '_').collect();
    let v = if let Some(h) = body.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(b) = body.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()?
    } else if let Some(o) = body.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()?
    } else if !body.is_empty() && body.bytes().all(|c| c.is_ascii_digit()) {
        body.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

fn int(cx: &mut Cx, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
    if node.is_null() {
        return Some(0);
    }
    let parsed = match node {
        Node::Scalar { value, plain: true, .. } => parse_int(value).or_else(|| {
            // yaml.v2 accepts an integral float into an int field.
            value.parse::<f64>().ok().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64)
        }),
        _ => None,
    };
    match parsed {
        Some(v) if v >= min && v <= max => Some(v),
        Some(v) => {
            cx.err(node.pos(), format!("{path}: {v} is out of range ({min}..={max})"));
            None
        }
        None => {
            let shown = match node {
                Node::Scalar { value, .. } => format!("`{value}`"),
                n => n.kind().to_owned(),
            };
            cx.err(node.pos(), format!("{path}: expected an integer, found {shown}"));
            None
        }
    }
}

fn string_list(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<(String, Pos)>> {
    match node {
        n if n.is_null() => Some(Vec::new()),
        Node::Seq(items, _) => {
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate() {
                out.push((string(cx, it, &format!("{path}[{i}]"))?, it.pos()));
            }
            Some(out)
        }
        n => {
            cx.err(n.pos(), format!("{path}: expected a list of strings, found {}", n.kind()));
            None
        }
    }
}

fn unknown(cx: &mut Cx, pos: Pos, path: &str, key: &str) {
    cx.warn(pos, format!("{path}: unknown key `{key}` (ignored)"));
}

fn top(cx: &mut Cx, root: &Node) -> Option<ServicesFile> {
    let mut cfg = ServicesFile::default();
    let es = entries(cx, root, "document")?;
    // Collect names first: routing checks need every service and device.
    let mut service_names = BTreeSet::new();
    let mut device_names = BTreeSet::new();
    for (k, _, v) in &es {
        if let Node::Map(items, _) = v {
            for (name, _) in items {
                if let Node::Scalar { value, .. } = name {
                    match k.as_str() {
                        "microservices" => service_names.insert(value.clone()),
                        "devices" => device_names.insert(value.clone()),
                        _ => false,
                    };
                }
            }
        }
    }
    let mut ok = true;
    let mut services_node = None;
    for (k, pos, v) in &es {
        match k.as_str() {
            "deviceName" => cfg.device_name = string(cx, v, k).unwrap_or_else(|| bad(&mut ok)),
            "debug" => cfg.debug = string(cx, v, k).unwrap_or_else(|| bad(&mut ok)),
            "fileRoots" => match string_list(cx, v, k) {
                Some(list) => {
                    for (r, pos) in list {
                        if r.starts_with('/') {
                            cfg.file_roots.push(r);
                        } else {
                            cx.err(pos, format!("fileRoots: `{r}` is not an absolute path"));
                            ok = false;
                        }
                    }
                }
                None => ok = false,
            },
            "devices" => match entries(cx, v, "devices") {
                Some(devs) => {
                    for (name, _, d) in devs {
                        match device(cx, &name, d) {
                            Some(dev) => {
                                cfg.devices.insert(name, dev);
                            }
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            },
            "microservices" => {
                cx.positions.insert("microservices".into(), (v.pos().line, v.pos().col));
                services_node = Some(*v)
            }
            _ => unknown(cx, *pos, "document", k),
        }
    }
    if let Some(v) = services_node {
        let env = RouteEnv { services: &service_names, devices: &device_names, this_device: &cfg.device_name };
        match entries(cx, v, "microservices") {
            Some(svcs) => {
                for (name, pos, s) in svcs {
                    match microservice(cx, &name, pos, s, &env) {
                        Some(ms) => {
                            cfg.microservices.insert(name, ms);
                        }
                        None => ok = false,
                    }
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(cfg)
}

fn bad<T: Default>(ok: &mut bool) -> T {
    *ok = false;
    T::default()
}

fn device(cx: &mut Cx, name: &str, node: &Node) -> Option<Device> {
    let path = format!("devices.{name}");
    let mut d = Device::default();
    let mut ok = true;
    for (k, pos, v) in entries(cx, node, &path)? {
        let p = format!("{path}.{k}");
        match k.as_str() {
            "addr" => d.addr = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "aionHome" => d.aion_home = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "username" => d.username = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "password" => d.password = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "sshPort" => d.ssh_port = int(cx, v, &p, 0, 65535).unwrap_or_else(|| bad(&mut ok)) as i32,
            "outboxKanbans" => match int(cx, v, &p, 1, 1 << 32) {
                Some(n) => d.outbox.kanbans = (n > 0).then_some(n as usize),
                None => ok = false,
            },
            "outboxBytes" => match string(cx, v, &p).map(|s| super::parse_bytes(&s)) {
                Some(Ok(n)) => d.outbox.bytes = Some(n),
                Some(Err(e)) => {
                    cx.err(v.pos(), format!("{p}: {e}"));
                    ok = false
                }
                None => ok = false,
            },
            "outboxMaxAge" => match string(cx, v, &p).map(|s| super::parse_age(&s)) {
                Some(Ok(a)) => d.outbox.max_age_secs = Some(a.map_or(0, |a| a.as_secs())),
                Some(Err(e)) => {
                    cx.err(v.pos(), format!("{p}: {e}"));
                    ok = false
                }
                None => ok = false,
            },
            _ => unknown(cx, pos, &path, &k),
        }
    }
    let dflt = Device::default();
    if d.aion_home.is_empty() {
        d.aion_home = dflt.aion_home;
    }
    if d.ssh_port == 0 {
        d.ssh_port = dflt.ssh_port;
    }
    if d.username.is_empty() {
        d.username = dflt.username;
    }
    if d.password.is_empty() {
        d.password = dflt.password;
    }
    ok.then_some(d)
}

struct RouteEnv<'a> {
    services: &'a BTreeSet<String>,
    devices: &'a BTreeSet<String>,
    this_device: &'a str,
}

fn microservice(cx: &mut Cx, name: &str, name_pos: Pos, node: &Node, env: &RouteEnv) -> Option<Microservice> {
    let path = format!("microservices.{name}");
    let mut ok = true;
    if !is_dns1035_label(name) || name.len() > 55 {
        cx.err(
            name_pos,
            format!(
                "{path}: `{name}` is not a valid service name: it becomes process and pod names (`{name}-001-srv`), \
                 so it must be lower-case letters, digits and `-`, start with a letter, end with a letter or digit, \
                 and be at most 55 characters"
            ),
        );
        ok = false;
    }
    if node.is_null() {
        cx.err(name_pos, format!("{path}: yaml format is wrong: the service has no fields (AION refused this too)"));
        return None;
    }
    let mut ms = Microservice::with_defaults(name);
    let mut scale_seen = None;
    for (k, pos, v) in entries(cx, node, &path)? {
        let p = format!("{path}.{k}");
        match k.as_str() {
            "command" => {
                cx.positions.insert(p.clone(), (v.pos().line, v.pos().col));
                match v {
                    Node::Scalar { .. } if !v.is_null() => {
                        cx.err(v.pos(), format!("{p}: expected a list (argv, no shell), e.g. [\"python3\", \"main.py\"], found a scalar"));
                        ok = false;
                    }
                    // Fine for an in-process service or an image (Kubernetes); a local process needs a program, and
                    // `aion run` refuses the file then, saying so.
                    Node::Seq(items, _) if items.is_empty() => {
                        cx.warn(v.pos(), format!("{p}: the command is empty: this service cannot run as a local process (only in-process, or as an image); give the program and its arguments, e.g. [\"python3\", \"main.py\"]"));
                    }
                    _ => match string_list(cx, v, &p) {
                        Some(l) => {
                            for (i, (arg, apos)) in l.iter().enumerate() {
                                if i == 0 && arg.is_empty() {
                                    cx.err(*apos, format!("{p}[0]: the program name is empty"));
                                    ok = false;
                                }
                                if arg.contains('\0') {
                                    cx.err(
                                        *apos,
                                        format!("{p}[{i}]: contains a NUL byte, which no process argument can hold"),
                                    );
                                    ok = false;
                                }
                            }
                            ms.command = l.into_iter().map(|(s, _)| s).collect()
                        }
                        None => ok = false,
                    },
                }
            }
            "tag" => ms.tag = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "scale" => match int(cx, v, &p, i32::MIN as i64, 10_000) {
                Some(s) => scale_seen = Some((s, v.pos())),
                None => ok = false,
            },
            "startup" => ms.startup = boolean(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "always" => ms.always = boolean(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "multiple" => ms.multiple = boolean(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "privileged" => ms.privileged = boolean(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "withoutKanban" => ms.without_kanban = boolean(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "network" => ms.network = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "serviceAccount" => ms.service_account = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "targetNode" => ms.target_node = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "position" => ms.position = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "directoryPath" => ms.directory_path = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok)),
            "interval" => {
                ms.interval = int(cx, v, &p, i32::MIN as i64, i32::MAX as i64).unwrap_or_else(|| bad(&mut ok)) as i32
            }
            "workingDir" => ms.working_dir = string(cx, v, &p).filter(|s| !s.is_empty()),
            "backend" => match string(cx, v, &p).as_deref() {
                Some("") => ms.backend = BackendChoice::Run,
                Some("process") | Some("local") => ms.backend = BackendChoice::Process,
                Some("kubernetes") => ms.backend = BackendChoice::Kubernetes,
                Some(other) => {
                    cx.err(v.pos(), format!("{p}: `{other}` is not `process` or `kubernetes`"));
                    ok = false;
                }
                None => ok = false,
            },
            "delivery" => match string(cx, v, &p).as_deref() {
                Some("durable") | Some("") => ms.delivery = Delivery::Durable,
                Some("memory") => ms.delivery = Delivery::Memory,
                Some(other) => {
                    cx.err(v.pos(), format!("{p}: `{other}` is not `durable` or `memory`"));
                    ok = false;
                }
                None => ok = false,
            },
            "env" => match entries(cx, v, &p) {
                Some(es) => {
                    for (ek, kpos, ev) in es {
                        if ek.is_empty() {
                            cx.err(kpos, format!("{p}: an empty env key"));
                            ok = false;
                        } else if ek.contains('=') {
                            cx.err(
                                kpos,
                                format!(
                                    "{p}: env key `{ek}` contains `=`, which no environment variable name can hold"
                                ),
                            );
                            ok = false;
                        } else if ek.contains('\0') {
                            cx.err(kpos, format!("{p}: env key `{}` contains a NUL byte", ek.escape_debug()));
                            ok = false;
                        }
                        match string(cx, ev, &format!("{p}.{ek}")) {
                            Some(s) if s.contains('\0') => {
                                cx.err(
                                    ev.pos(),
                                    format!("{p}.{ek}: contains a NUL byte, which no environment value can hold"),
                                );
                                ok = false;
                            }
                            Some(s) => {
                                if ek == "CONNECTION_MODE" && s == "direct" {
                                    cx.warn(ev.pos(), format!("{p}.CONNECTION_MODE: `direct` makes AION's Python library ignore KANBAN_ADDR and dial aion-statuskanban:10000, which does not exist here; aion runs the service with CONNECTION_MODE=normal"));
                                }
                                ms.env.insert(ek, s);
                            }
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            },
            "nextService" => {
                if let Node::Seq(..) = v {
                    cx.err(v.pos(), format!("{p}: expected a mapping of connection key to a list of targets (`default:` then `- name: …`), found a list"));
                    ok = false;
                } else if !next_service(cx, v, &p, env, &mut ms) {
                    ok = false;
                }
            }
            "ports" => {
                if !ports(cx, v, &p, &mut ms) {
                    ok = false;
                }
            }
            "volumeMountPathList" => match string_list(cx, v, &p) {
                Some(l) => {
                    for (i, (entry, epos)) in l.into_iter().enumerate() {
                        match volume(&entry) {
                            Ok(vm) => {
                                if let Some(third) = entry.splitn(3, ':').nth(2) {
                                    if third != "Bidirectional" {
                                        cx.warn(epos, format!("{p}[{i}]: mount propagation `{third}` is not `Bidirectional`; AION treated it as none"));
                                    }
                                }
                                ms.volume_mount_path_list.push(vm)
                            }
                            Err(why) => {
                                cx.err(epos, format!("{p}[{i}]: `{entry}` {why}; expected `<containerPath>:<hostPath>[:Bidirectional]`"));
                                ok = false;
                            }
                        }
                    }
                }
                None => ok = false,
            },
            "resources" => {
                if !resources(cx, v, &p, &mut ms.resources) {
                    ok = false;
                }
            }
            _ => unknown(cx, pos, &path, &k),
        }
    }
    if let Some((s, spos)) = scale_seen {
        if s < 1 {
            cx.warn(spos, format!("{path}.scale: {s} is less than 1; using 1 (as AION did)"));
            ms.scale = 1;
        } else {
            ms.scale = s as u32;
        }
    }
    if ms.tag.is_empty() {
        ms.tag = "latest".into();
    }
    if ms.network.is_empty() {
        ms.network = "ClusterIP".into();
    } else if ms.network != "NodePort" && ms.network != "ClusterIP" {
        cx.warn(
            node.pos(),
            format!("{path}.network: `{}` is neither NodePort nor ClusterIP; ClusterIP is used", ms.network),
        );
    }
    if ms.service_account.is_empty() {
        ms.service_account = "default".into();
    }
    if ms.position.is_empty() {
        ms.position = "Runtime".into();
    }
    ok.then_some(ms)
}

fn next_service(cx: &mut Cx, node: &Node, path: &str, env: &RouteEnv, ms: &mut Microservice) -> bool {
    let Some(keys) = entries(cx, node, path) else {
        return false;
    };
    let mut ok = true;
    for (key, _, list) in keys {
        let kp = format!("{path}.{key}");
        let items: &[Node] = match list {
            Node::Seq(items, _) => items,
            n if n.is_null() => &[],
            n => {
                cx.err(n.pos(), format!("{kp}: expected a list of targets (`- name: …`), found {}", n.kind()));
                ok = false;
                continue;
            }
        };
        let mut targets = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ip = format!("{kp}[{i}]");
            let Some(fields) = entries(cx, item, &ip) else {
                ok = false;
                continue;
            };
            let mut t = NextService { name: String::new(), pattern: "n".into(), device: String::new() };
            let mut name_pos = item.pos();
            let mut device_pos = item.pos();
            for (fk, fpos, fv) in fields {
                let fp = format!("{ip}.{fk}");
                match fk.as_str() {
                    "name" => {
                        name_pos = fv.pos();
                        t.name = string(cx, fv, &fp).unwrap_or_else(|| bad(&mut ok));
                    }
                    "pattern" => t.pattern = string(cx, fv, &fp).unwrap_or_else(|| bad(&mut ok)),
                    "device" => {
                        device_pos = fv.pos();
                        t.device = string(cx, fv, &fp).unwrap_or_else(|| bad(&mut ok));
                    }
                    _ => unknown(cx, fpos, &ip, &fk),
                }
            }
            if t.pattern.is_empty() {
                t.pattern = "n".into();
            }
            if t.name.is_empty() {
                cx.err(item.pos(), format!("{ip}: a target needs a `name`"));
                ok = false;
                continue;
            }
            let remote = !t.device.is_empty() && t.device != env.this_device && env.devices.contains(&t.device);
            // A service on another device is defined in that device's services.yml.
            if !remote && !env.services.contains(&t.name) {
                cx.warn(
                    name_pos,
                    format!(
                        "{ip}.name: `{}` is not defined in microservices; kanbans routed to it are dead-lettered",
                        t.name
                    ),
                );
            }
            if !t.device.is_empty() && t.device != env.this_device && !env.devices.contains(&t.device) {
                cx.warn(device_pos, format!("{ip}.device: `{}` is not listed in devices; the kanban is delivered on this device (as AION did)", t.device));
            }
            let local = t.device.is_empty() || t.device == env.this_device || !env.devices.contains(&t.device);
            if local && env.services.contains(&t.name) {
                cx.edges.push((ms.name.clone(), t.name.clone(), name_pos));
            }
            targets.push(t);
        }
        ms.next_service.insert(key, targets);
    }
    ok
}

/// Warns once per routing cycle among local routes (a depth-first search; each back edge closes a cycle),
/// naming it and pointing at its first route.
fn warn_cycles(cx: &mut Cx) {
    let mut adj: BTreeMap<&str, Vec<(&str, Pos)>> = BTreeMap::new();
    for (from, to, pos) in &cx.edges {
        adj.entry(from.as_str()).or_default().push((to.as_str(), *pos));
    }
    // 0: unvisited, 1: on the current path, 2: done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    let mut found: Vec<(Pos, String)> = Vec::new();
    let mut seen_sets: BTreeSet<Vec<&str>> = BTreeSet::new();
    let starts: Vec<&str> = adj.keys().copied().collect();
    for start in starts {
        if state.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        // Iterative DFS: (node, index of the next edge to follow); `path` mirrors the stack's nodes.
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        let mut path: Vec<&str> = vec![start];
        state.insert(start, 1);
        while let Some((node, next)) = stack.last_mut() {
            let (node, i) = (*node, *next);
            let edges = adj.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if i >= edges.len() {
                state.insert(node, 2);
                stack.pop();
                path.pop();
                continue;
            }
            *next += 1;
            let to = edges[i].0;
            match state.get(to).copied().unwrap_or(0) {
                0 => {
                    state.insert(to, 1);
                    stack.push((to, 0));
                    path.push(to);
                }
                1 => {
                    let at = path.iter().position(|n| *n == to).unwrap_or(0);
                    let cycle: Vec<&str> = path[at..].to_vec();
                    let mut set = cycle.clone();
                    set.sort_unstable();
                    if seen_sets.insert(set) {
                        // Point at the route out of the cycle's first service into the next one.
                        let next_name = cycle.get(1).copied().unwrap_or(to);
                        let pos = adj
                            .get(cycle[0])
                            .and_then(|es| es.iter().find(|(t, _)| *t == next_name))
                            .map_or(edges[i].1, |e| e.1);
                        let mut names = cycle.join(" > ");
                        names.push_str(&format!(" > {to}"));
                        found.push((pos, names));
                    }
                }
                _ => {}
            }
        }
    }
    for (pos, names) in found {
        cx.warn(
            pos,
            format!(
                "routing cycle {names}: a kanban on it goes round until the hop limit (`aion run --hop-limit`, default 1000; 0 for none) dead-letters it"
            ),
        );
    }
}

fn ports(cx: &mut Cx, node: &Node, path: &str, ms: &mut Microservice) -> bool {
    let items: &[Node] = match node {
        Node::Seq(items, _) => items,
        n if n.is_null() => return true,
        n => {
            cx.err(n.pos(), format!("{path}: expected a list of ports, found {}", n.kind()));
            return false;
        }
    };
    let mut ok = true;
    let mut names: BTreeSet<String> = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        let Some(fields) = entries(cx, item, &ip) else {
            ok = false;
            continue;
        };
        let mut port = Port { name: String::new(), protocol: String::new(), port: 0, node_port: 0 };
        let mut name_pos = item.pos();
        for (k, kpos, v) in fields {
            let p = format!("{ip}.{k}");
            match k.as_str() {
                "name" => {
                    name_pos = v.pos();
                    port.name = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok));
                }
                "protocol" => {
                    port.protocol = string(cx, v, &p).unwrap_or_else(|| bad(&mut ok));
                    if !matches!(port.protocol.as_str(), "" | "TCP" | "UDP" | "SCTP") {
                        cx.err(v.pos(), format!("{p}: `{}` is not TCP, UDP or SCTP", port.protocol));
                        ok = false;
                    }
                }
                "port" => port.port = int(cx, v, &p, 1, 65535).unwrap_or_else(|| bad(&mut ok)) as i32,
                "nodePort" => port.node_port = int(cx, v, &p, 0, 65535).unwrap_or_else(|| bad(&mut ok)) as i32,
                _ => unknown(cx, kpos, &ip, &k),
            }
        }
        if port.name.is_empty() {
            cx.warn(
                item.pos(),
                format!("{ip}: a port without `name` (Kubernetes needs one when a Service has several ports)"),
            );
        } else if !names.insert(port.name.clone()) {
            cx.err(name_pos, format!("{ip}.name: duplicate port name `{}`", port.name));
            ok = false;
        }
        ms.ports.push(port);
    }
    ok
}

fn volume(entry: &str) -> Result<VolumeMount, &'static str> {
    let parts: Vec<&str> = entry.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err("must have two or three `:`-separated parts");
    }
    if parts[0].is_empty() || parts[1].is_empty() {
        return Err("has an empty path");
    }
    if !parts[0].starts_with('/') || !parts[1].starts_with('/') {
        return Err("must use absolute paths");
    }
    Ok(VolumeMount {
        container_path: parts[0].to_owned(),
        host_path: parts[1].to_owned(),
        bidirectional: parts.get(2) == Some(&"Bidirectional"),
    })
}

fn resources(cx: &mut Cx, node: &Node, path: &str, out: &mut Resources) -> bool {
    let Some(es) = entries(cx, node, path) else {
        return false;
    };
    let mut ok = true;
    for (k, kpos, v) in es {
        let p = format!("{path}.{k}");
        let target = match k.as_str() {
            "requests" => &mut out.requests,
            "limits" => &mut out.limits,
            _ => {
                unknown(cx, kpos, path, &k);
                continue;
            }
        };
        let Some(fields) = entries(cx, v, &p) else {
            ok = false;
            continue;
        };
        for (fk, fpos, fv) in fields {
            let fp = format!("{p}.{fk}");
            let slot = match fk.as_str() {
                "memory" => &mut target.memory,
                "cpu" => &mut target.cpu,
                _ => {
                    unknown(cx, fpos, &p, &fk);
                    continue;
                }
            };
            let Some(q) = string(cx, fv, &fp) else {
                ok = false;
                continue;
            };
            if !q.is_empty() && !is_quantity(&q) {
                cx.err(fv.pos(), format!("{fp}: `{q}` is not a resource quantity (e.g. `500m`, `1.5`, `512Mi`, `2G`)"));
                ok = false;
            }
            *slot = q;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_scalars() {
        let l = load_str(
            "t.yml",
            "microservices:\n  a:\n    startup: on\n    always: Yes\n    env:\n      P: 3306\n      K: true\n      N:\n      Q: 'x'\n      O: 0o17\n    nextService:\n      default:\n        - name: a\n          pattern: 0\n",
        );
        // Only the self-loop `a > a` is worth a warning.
        assert!(l.diagnostics.iter().all(|d| d.message.contains("routing cycle a > a")), "{:?}", l.diagnostics);
        let a = &l.config.expect("config").microservices["a"];
        assert!(a.startup && a.always);
        assert_eq!(a.env["P"], "3306");
        assert_eq!(a.env["K"], "true");
        assert_eq!(a.env["N"], "");
        assert_eq!(a.env["O"], "0o17");
        assert_eq!(a.next_service["default"][0].pattern, "0");
        assert_eq!(a.next_service["default"][0].target_instance(3), 1);
    }

    #[test]
    fn device_outbox_bounds() {
        let l = load_str(
            "t.yml",
            "devices:\n  b: { addr: \"10.0.0.2:11030\", outboxKanbans: 100, outboxBytes: 2MiB, outboxMaxAge: 12h }\n  c: { outboxMaxAge: never }\n  d: {}\n",
        );
        let cfg = l.config.expect("config");
        let b = cfg.devices["b"].outbox;
        assert_eq!((b.kanbans, b.bytes, b.max_age_secs), (Some(100), Some(2 << 20), Some(12 * 3600)));
        assert_eq!(cfg.devices["c"].outbox.max_age_secs, Some(0), "never");
        assert_eq!(cfg.devices["d"].outbox, crate::config::OutboxBounds::default());
        let l =
            load_str("t.yml", "devices:\n  b:\n    outboxBytes: 2 lots\n    outboxMaxAge: 5y\n    outboxKanbans: -1\n");
        assert!(l.config.is_none());
        let msgs: Vec<String> =
            l.diagnostics.iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect();
        assert!(msgs.iter().any(|m| m.starts_with("3:18") && m.contains("`2 lots` is not a size")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("4:19") && m.contains("`5y` is not an age")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("5:20") && m.contains("out of range")), "{msgs:?}");
    }

    #[test]
    fn ages_and_sizes() {
        use crate::config::{parse_age, parse_bytes};
        assert_eq!(parse_age("90s"), Ok(Some(std::time::Duration::from_secs(90))));
        assert_eq!(parse_age("7d"), Ok(Some(std::time::Duration::from_secs(7 * 86_400))));
        assert_eq!(parse_age("never"), Ok(None));
        assert_eq!(parse_age("0"), Ok(None));
        for bad in ["", "d", "0s", "-1m", "1w", "1.5h"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("3 KB"), Ok(3000));
        for bad in ["", "0", "MiB", "1TiB", "99999999999999999999GiB", "-1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ints() {
        assert_eq!(parse_int("0x1F"), Some(31));
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int("-1_000"), Some(-1000));
        assert_eq!(parse_int("xxxx"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("-"), None);
    }

    #[test]
    fn quantities() {
        for q in ["500m", "1", "1.5", "512Mi", "2G", "1e3", "+1", ".5"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["abc", "1.2.3", "5 Mi", "Mi", "1e", "12x", ""] {
            assert!(!is_quantity(q), "{q}");
        }
    }

    #[test]
    fn column_is_one_based() {
        let l = load_str("t.yml", "microservices:\n  a:\n    scale: xxxx\n");
        let d = &l.diagnostics[0];
        assert_eq!((d.line, d.column), (3, 12), "{d}");
    }
}
