//! Send Anything's figures: two `aion` runtimes on two hosts (network namespaces over veth and a bridge when run
//! as root, else loopback); device `a` sends a tree with one large file to device `b`:
//!
//! - file throughput (the whole tree, verified in place) beside what raw quinn moves on the same link in the same
//!   run (one stream, the same mutual TLS, nothing written), and raw quinn whose receiver writes what it reads
//!   to the receiving runtime's disk and fsyncs it (what the link and the disk carry together);
//! - small-kanban hop latency on the same link while the large file crosses (and without it), p50/p99;
//! - the RSS of both runtimes during the transfer, above their idle RSS;
//! - `scp` between the same hosts, when `sshd` is installed (Debian `openssh-server`).
//!
//! `cargo build --release --examples && cargo bench --bench files` (`AION_BENCH_FILE_MB`, default 1024). Results
//! also in `target/bench-results/files.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AION: &str = env!("CARGO_BIN_EXE_aion");

fn status(data: &Path) -> Option<serde_json::Value> {
    netns::status(Path::new(AION), data)
}

fn cmd(wrapper: &[String], program: &str) -> Command {
    netns::command(wrapper, Path::new(program))
}

fn start(wrapper: &[String], data: &Path, yaml: &str, listen: &str) -> netns::Runtime {
    let rt = netns::Runtime::start(Path::new(AION), wrapper, data, yaml, &["--listen", listen, "--grpc", "off"])
        .expect("spawn aion");
    assert!(rt.ready(Duration::from_secs(30)), "runtime did not start");
    rt
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|r| r.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ------------------------------------------------------------------------------------------------ raw quinn

fn tls_parts(
    data: &Path,
) -> (rustls::RootCertStore, Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)
{
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = data.join("cluster");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap()).unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join("node.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).unwrap();
    (roots, chain, key)
}

/// `AION_BENCH_QUINN=server|client`: one side of the raw quinn measurement (run on a host by the bench).
fn quinn_role(role: &str) {
    let data = PathBuf::from(std::env::var("QDATA").unwrap());
    let addr: std::net::SocketAddr = std::env::var("QADDR").unwrap().parse().unwrap();
    let bytes: u64 = std::env::var("QBYTES").unwrap().parse().unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let alpn = aion::transport::federation::ALPN.to_vec();
    rt.block_on(async move {
        let (roots, chain, key) = tls_parts(&data);
        if role == "server" {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
                .build()
                .unwrap();
            let mut c = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap();
            c.alpn_protocols = vec![alpn];
            let q = quinn::crypto::rustls::QuicServerConfig::try_from(c).unwrap();
            let ep = quinn::Endpoint::server(quinn::ServerConfig::with_crypto(std::sync::Arc::new(q)), addr).unwrap();
            println!("ready");
            let conn = ep.accept().await.unwrap().await.unwrap();
            let mut r = conn.accept_uni().await.unwrap();
            // QFILE: what is read is also written to that file on a thread of its own (behind a 4-buffer queue,
            // as aion's receiver does) and fsynced before the time is taken: the link and the disk together.
            let writer = std::env::var("QFILE").ok().filter(|p| !p.is_empty()).map(|path| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
                let t = std::thread::spawn(move || {
                    use std::io::Write;
                    let mut f = std::fs::File::create(path).unwrap();
                    for b in rx {
                        f.write_all(&b).unwrap();
                    }
                    f.sync_all().unwrap();
                });
                (tx, t)
            });
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            let mut t0 = None;
            while let Some(n) = r.read(&mut buf).await.unwrap() {
                t0.get_or_insert_with(Instant::now);
                got += n as u64;
                if let Some((tx, _)) = &writer {
                    tx.send(buf[..n].to_vec()).unwrap();
                }
            }
            if let Some((tx, t)) = writer {
                drop(tx);
                t.join().unwrap();
            }
            let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
            println!("{got} {secs}");
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
        } else {
            let mut c = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
            c.alpn_protocols = vec![alpn];
            let q = quinn::crypto::rustls::QuicClientConfig::try_from(c).unwrap();
            let bind: std::net::SocketAddr =
                if addr.ip().is_loopback() { "127.0.0.1:0" } else { "0.0.0.0:0" }.parse().unwrap();
            let mut ep = quinn::Endpoint::client(bind).unwrap();
            ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(q)));
            let conn = ep.connect(addr, "b").unwrap().await.unwrap();
            let mut s = conn.open_uni().await.unwrap();
            let buf = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            while sent < bytes {
                s.write_all(&buf).await.unwrap();
                sent += buf.len() as u64;
            }
            s.finish().unwrap();
            let _ = conn.closed().await;
        }
    });
}

/// Raw quinn from host 1 to host 2: bytes per second; with `into`, the receiver also writes what it reads to
/// that file and fsyncs it before the time is taken.
fn raw_quinn(hosts: &[(Vec<String>, String)], a: &Path, b: &Path, bytes: u64, into: Option<&Path>) -> f64 {
    let me = std::env::current_exe().unwrap().display().to_string();
    let port = if hosts[1].1 == "127.0.0.1" { free_port() } else { 11_099 };
    let addr = format!("{}:{port}", hosts[1].1);
    let mut server = cmd(&hosts[1].0, &me)
        .env("AION_BENCH_QUINN", "server")
        .env("QDATA", b)
        .env("QADDR", &addr)
        .env("QBYTES", bytes.to_string())
        .env("QFILE", into.map(|p| p.display().to_string()).unwrap_or_default())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let mut client = cmd(&hosts[0].0, &me)
        .env("AION_BENCH_QUINN", "client")
        .env("QDATA", a)
        .env("QADDR", &addr)
        .env("QBYTES", bytes.to_string())
        .spawn()
        .unwrap();
    let line = lines.next().unwrap().unwrap();
    let _ = client.wait();
    let _ = server.wait();
    let mut it = line.split_whitespace();
    let got: f64 = it.next().unwrap().parse().unwrap();
    let secs: f64 = it.next().unwrap().parse().unwrap();
    got / secs
}

// ------------------------------------------------------------------------------------------------ scp

/// `scp` of the large file from host 1 to host 2 through an `sshd` started on host 2 (key auth, a throwaway
/// config); `None` when sshd is not installed.
fn scp(hosts: &[(Vec<String>, String)], file: &Path, dest: &Path) -> Option<f64> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"].into_iter().find(|p| Path::new(p).exists())?;
    // sshd's privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    if hosts[1].1 == "127.0.0.1" {
        return None;
    }
    let d = tempfile::tempdir().ok()?;
    let key = d.path().join("id");
    let host_key = d.path().join("host");
    for k in [&key, &host_key] {
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(k).status().ok()?;
    }
    std::fs::copy(key.with_extension("pub"), d.path().join("authorized_keys")).ok()?;
    let cfg = d.path().join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port 2222\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin yes\nStrictModes no\nUsePAM no\nPidFile {}\nSubsystem sftp internal-sftp\n",
            hosts[1].1,
            host_key.display(),
            d.path().join("authorized_keys").display(),
            d.path().join("pid").display()
        ),
    )
    .ok()?;
    let mut server = cmd(&hosts[1].0, sshd).arg("-D").arg("-f").arg(&cfg).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let ok = cmd(&hosts[0].0, "scp")
        .args(["-q", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-P", "2222", "-i"])
        .arg(&key)
        .arg(file)
        .arg(format!("root@{}:{}", hosts[1].1, dest.display()))
        .status()
        .is_ok_and(|s| s.success());
    let secs = t.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    let len = std::fs::metadata(file).ok()?.len() as f64;
    ok.then_some(len / secs)
}

// ------------------------------------------------------------------------------------------------ the run

fn main() {
    if let Ok(role) = std::env::var("AION_BENCH_QUINN") {
        return quinn_role(&role);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kit = Path::new(AION).parent().unwrap().join("examples/testkit");
    assert!(kit.is_file(), "{} is missing: run `cargo build --release --examples` first", kit.display());
    let kit = kit.display().to_string();
    let mb: u64 = std::env::var("AION_BENCH_FILE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let (hosts_guard, hosts) = netns::Hosts::new();
    println!("files bench: a {mb} MiB file (and 20 small ones), {}", hosts_guard.kind());
    let (ta, tb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (da, db) = (ta.path().to_owned(), tb.path().to_owned());
    assert!(Command::new(AION)
        .arg("--data-dir")
        .arg(&da)
        .args(["cluster", "init", "--name", "a"])
        .status()
        .unwrap()
        .success());
    assert!(Command::new(AION)
        .arg("--data-dir")
        .arg(&da)
        .args(["cluster", "issue", "b", "--out", &db.display().to_string()])
        .status()
        .unwrap()
        .success());

    let raw = raw_quinn(&hosts, &da, &db, mb << 20, None);
    println!("  raw quinn, one stream a > b:                 {:>8.1} MB/s", raw / 1e6);
    // The same, the receiver writing to b's disk (where aion's receiver writes) and fsyncing before the clock
    // stops, as aion does before the rename: what this link and this disk carry together.
    let raw_disk_file = db.join("raw-quinn.bin");
    let raw_disk = raw_quinn(&hosts, &da, &db, mb << 20, Some(&raw_disk_file));
    let _ = std::fs::remove_file(&raw_disk_file);
    println!("  raw quinn, written and fsynced on b:         {:>8.1} MB/s", raw_disk / 1e6);

    let (a_addr, b_addr) = (&hosts[0].1, &hosts[1].1);
    let (pa, pb) = if a_addr == b_addr { (free_port(), free_port()) } else { (11_030, 11_030) };
    let rec = tempfile::tempdir().unwrap();
    let b_yaml = format!(
        "deviceName: b\ndevices:\n  a: {{ addr: \"{a_addr}:{pa}\" }}\nmicroservices:\n  sink:\n    command: [\"{kit}\"]\n    always: yes\n    env: {{ RECORD: \"{r}/files.jsonl\" }}\n  ticks:\n    command: [\"{kit}\"]\n    always: yes\n    env: {{ RECORD: \"{r}/ticks.jsonl\" }}\n",
        r = rec.path().display()
    );
    // The ticker starts with the files (startup) and stops at 20 s of ticks; the source writes its tree first.
    let a_yaml = format!(
        "deviceName: a\ndevices:\n  b: {{ addr: \"{b_addr}:{pb}\" }}\nmicroservices:\n  source:\n    command: [\"{kit}\"]\n    startup: yes\n    env: {{ EMIT_COUNT: 1, FILES: 20, BIG_MB: {mb} }}\n    nextService: {{ default: [ {{ name: sink, device: b }} ] }}\n  ticker:\n    command: [\"{kit}\"]\n    startup: yes\n    env: {{ EMIT_COUNT: 4000, RATE: 200, STAMP: 1 }}\n    nextService: {{ default: [ {{ name: ticks, device: b }} ] }}\n"
    );
    let rb = start(&hosts[1].0, &db, &b_yaml, &format!("{b_addr}:{pb}"));
    let ra = start(&hosts[0].0, &da, &a_yaml, &format!("{a_addr}:{pa}"));
    let (idle_a, idle_b) = (rss_kib(ra.child.id()), rss_kib(rb.child.id()));
    let active = |s: &serde_json::Value| -> Option<u64> {
        s["federation"]["devices"].as_array()?.iter().find(|d| d["name"] == "a")?["files"]["active"]
            .as_array()?
            .iter()
            .filter_map(|t| t["done"].as_u64())
            .max()
    };
    let (mut peak_a, mut peak_b) = (0u64, 0u64);
    let mut began: Option<(Instant, Instant)> = None; // (first seen, last seen while idle)
    let mut last_idle = Instant::now();
    let t0 = Instant::now();
    let wall = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as f64;
    let mut last_idle_us = wall();
    let mut began_us: Option<(f64, f64)> = None;
    let mut cpu0 = (0.0, 0.0);
    let (done, done_us) = loop {
        assert!(t0.elapsed() < Duration::from_secs(900), "the transfer did not complete");
        peak_a = peak_a.max(rss_kib(ra.child.id()));
        peak_b = peak_b.max(rss_kib(rb.child.id()));
        if let Ok(s) = std::fs::read_to_string(rec.path().join("files.jsonl")) {
            if !s.trim().is_empty() {
                break (Instant::now(), wall());
            }
        }
        match status(&db).as_ref().and_then(active) {
            Some(_) if began.is_none() => {
                cpu0 = (cpu_secs(ra.child.id()), cpu_secs(rb.child.id()));
                began = Some((Instant::now(), last_idle));
                began_us = Some((wall(), last_idle_us));
            }
            None if began.is_none() => {
                last_idle = Instant::now();
                last_idle_us = wall();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu1 = (cpu_secs(ra.child.id()), cpu_secs(rb.child.id()));
    let (first, idle) = began.expect("the transfer was seen in progress");
    // The transfer started between the last poll that saw none and the first that saw it.
    let start_t = idle + (first - idle) / 2;
    let bytes = (mb << 20) as f64 + 20.0 * 500.0;
    let rate = bytes / done.duration_since(start_t).as_secs_f64();
    println!(
        "  aion files a > b (verified, renamed in place): {:>8.1} MB/s ({:.0} % of raw quinn, {:.0} % of raw quinn written and fsynced)",
        rate / 1e6,
        rate * 100.0 / raw,
        rate * 100.0 / raw_disk
    );
    let span = done.duration_since(first).as_secs_f64();
    println!(
        "  CPU of the runtimes during the transfer: a {:.0} %, b {:.0} % (of one core)",
        (cpu1.0 - cpu0.0) * 100.0 / span,
        (cpu1.1 - cpu0.1) * 100.0 / span
    );
    println!(
        "  RSS during the transfer: a {:.1} MB (+{:.1} above idle), b {:.1} MB (+{:.1})",
        peak_a as f64 / 1024.0,
        peak_a.saturating_sub(idle_a) as f64 / 1024.0,
        peak_b as f64 / 1024.0,
        peak_b.saturating_sub(idle_b) as f64 / 1024.0
    );
    // Tick latency while the file crossed, and after it.
    std::thread::sleep(Duration::from_secs(5));
    let ticks: Vec<(f64, f64)> = std::fs::read_to_string(rec.path().join("ticks.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["metadata"]["t_us"].as_f64()?, v["lat_us"].as_f64()?)))
        .collect();
    let start_us = began_us.map_or(done_us, |(f, i)| i + (f - i) / 2.0);
    let (mut during, mut after): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for (t, lat) in ticks {
        if t >= start_us && t <= done_us {
            during.push(lat);
        } else if t > done_us {
            after.push(lat);
        }
    }
    let (nd, na) = (during.len(), after.len());
    let (d50, d99, a50, a99) =
        (pct(&mut during, 0.5), pct(&mut during, 0.99), pct(&mut after, 0.5), pct(&mut after, 0.99));
    println!("  small kanbans on the same link at 200/s: during the transfer p50 {d50:.0} µs p99 {d99:.0} µs ({nd}); after p50 {a50:.0} µs p99 {a99:.0} µs ({na})");
    // The sender's own account of the transfer (from the first file's stream to the last file placed).
    let log = std::fs::read_to_string(da.join("aion.log")).unwrap_or_default();
    if let Some(l) = log.lines().find(|l| l.contains("files sent and verified")) {
        println!("  sender's log: {}", l.split("files sent and verified in place").nth(1).unwrap_or(l).trim());
    }
    drop(ra);
    drop(rb);
    let big = da.join("Data/source_1/files-1/big.bin");
    let scp_rate = scp(&hosts, &big, &tb.path().join("scp.bin"));
    match scp_rate {
        Some(r) => println!("  scp a > b (sshd on b):                       {:>8.1} MB/s", r / 1e6),
        None => println!("  scp: sshd not installed (Debian openssh-server) or loopback: not measured"),
    }
    let out = serde_json::json!({
        "hosts": hosts_guard.kind(), "file_mb": mb,
        "raw_quinn_mbps": raw / 1e6, "files_mbps": rate / 1e6, "files_vs_raw": rate / raw,
        "raw_quinn_fsynced_mbps": raw_disk / 1e6, "files_vs_raw_fsynced": rate / raw_disk,
        "rss_a_mb": peak_a as f64 / 1024.0, "rss_b_mb": peak_b as f64 / 1024.0,
        "rss_a_above_idle_mb": peak_a.saturating_sub(idle_a) as f64 / 1024.0,
        "rss_b_above_idle_mb": peak_b.saturating_sub(idle_b) as f64 / 1024.0,
        "ticks_during_p50_us": d50, "ticks_during_p99_us": d99, "ticks_during": nd,
        "ticks_after_p50_us": a50, "ticks_after_p99_us": a99,
        "scp_mbps": scp_rate.map(|r| r / 1e6),
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("files.json"), serde_json::to_string_pretty(&out).unwrap());
}
