//! A configurable microservice for tests and experiments. Behaviour comes from the environment:
//!
//! - `EMIT_COUNT=N`: at start, emit N kanbans with `metadata.seq` 1..=N (and `metadata.key` routing, see
//!   `KEY`), then, if `TERMINATE=1`, send the terminate kanban and exit.
//! - `CHUNK=c`: with `EMIT_COUNT`, flush every c outputs and checkpoint the last accepted seq in the instance's
//!   data dir (`progress`); a restarted source resumes after it.
//! - `PAD=n`: with `EMIT_COUNT`, add a string of n bytes (`metadata.pad`) to every output (large kanbans);
//!   `PAD_SEQ=s`: only to the output with `seq == s`. An output the SDK refuses as too large is recorded as
//!   `{"emit_error": …, "seq": s}` and the source goes on.
//! - `WINDOW=n`, `OUTPUT_WINDOW=n`: the SDK's credit and output windows.
//! - `KEY=k`: the connection key of outputs (default: `metadata.route` of the input, else `default`).
//! - `FORWARD=1`: forward every input (metadata kept, `hops` extended with this instance).
//! - `RECORD=path`: append one JSON line per received kanban to `path` (the test's sink).
//! - `SLOW_MS=n`: sleep n ms per kanban.
//! - `EXIT_CODE=c`: exit with code c right after connecting (crash loop material).
//! - `DIE_AT=s`: abort the process (no ack) when receiving `seq == s` the first time (a marker file in the
//!   data dir remembers it happened).
//! - `ONESHOT=1`: stop after handling one kanban (a run-to-completion job).
//! - `SEED=1`: ask for AION's seed kanban at start (START_SERVICE_WITHOUT_KANBAN).
//! - `STATICS_READ=1`: at start, record the metadata of every static kanban on topic `t`.
//! - `STATICS=1`: put two static kanbans on topic `t`, delete the first, subscribe, and record what it sees.
//! - `HANG_AT=s`: hang (sleep for ever, without acknowledging) on the kanban with `seq == s`.
//! - `START_MS=n`: sleep n ms at the start, before anything else (a slow start: loading a model).
//! - `RATE=r`: with `EMIT_COUNT`, emit at r kanbans per second (paced from the first), flushing each.
//! - `STAMP=1`: outputs carry `metadata.t_us` (wall-clock µs at emission); a sink that records adds `lat_us`
//!   (now − `t_us`) to each line: the hop latency, across processes and hosts of one machine.
//! - `EMIT_FOREVER=1` with `TICK_MS=n`: on its first kanban (a seed), emit an output with `metadata.seq` 1, 2, …
//!   every n ms, for ever (a source that holds its seed kanban for its whole life).
//! - `FILES=n`: with `EMIT_COUNT`, each output first writes a directory `files-<seq>` in the instance's data dir
//!   (n small files in nested directories, content derived from seq and index) and names it in `fileList`;
//!   `BIG_MB=m` adds a file `big.bin` of m MiB (pseudo-random) to it. `FILE_LIST=p,q`: each output names these
//!   paths in `fileList` as they are (files that may not exist, or may not be sent).
//! - A sink that records (`RECORD`) lists, for each kanban, every file under its `fileList` entries as it finds
//!   them when it handles the kanban (`files`: relative name and size; `missing` for an entry not there).
use aion_sdk::{metadata_to_json, Ctx, Error, Kanban, Output, Service, Value};
use std::io::Write;

struct Kit {
    emit: u64,
    pad: usize,
    pad_seq: Option<u64>,
    terminate: bool,
    key: Option<String>,
    forward: bool,
    record: Option<std::fs::File>,
    slow: u64,
    die_at: Option<u64>,
    statics: bool,
    oneshot: bool,
    chunk: u64,
    start_ms: u64,
    forever_tick: Option<u64>,
    hang_at: Option<u64>,
    rate: Option<f64>,
    stamp: bool,
    files: usize,
    big_mb: usize,
    file_list: Vec<String>,
}

/// Writes the tree `files-<seq>` of an output under `dir`; returns its path.
fn write_tree(dir: &std::path::Path, seq: u64, n: usize, big_mb: usize) -> std::io::Result<String> {
    let root = dir.join(format!("files-{seq}"));
    for i in 0..n {
        let sub = root.join(format!("d{}", i % 3)).join(format!("e{}", i % 2));
        std::fs::create_dir_all(&sub)?;
        let body: Vec<u8> = (0..(100 + i * 37)).map(|j| ((seq as usize * 7 + i * 13 + j) % 251) as u8).collect();
        std::fs::write(sub.join(format!("f{i}.dat")), body)?;
    }
    std::fs::create_dir_all(&root)?;
    if big_mb > 0 {
        let mut f = std::io::BufWriter::new(std::fs::File::create(root.join("big.bin"))?);
        let mut x: u64 = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..big_mb {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    Ok(root.display().to_string())
}

/// Every file under `entry` (relative name, size), as found now.
fn list_files(entry: &str) -> Option<Vec<serde_json::Value>> {
    fn walk(p: &std::path::Path, name: String, out: &mut Vec<serde_json::Value>) -> Option<()> {
        let md = std::fs::metadata(p).ok()?;
        if md.is_dir() {
            let mut es: Vec<_> = std::fs::read_dir(p).ok()?.filter_map(Result::ok).collect();
            es.sort_by_key(std::fs::DirEntry::file_name);
            for e in es {
                walk(&e.path(), format!("{name}/{}", e.file_name().to_string_lossy()), out)?;
            }
        } else {
            out.push(serde_json::json!({ "name": name, "size": md.len() }));
        }
        Some(())
    }
    let p = std::path::Path::new(entry);
    let mut out = Vec::new();
    walk(p, p.file_name()?.to_string_lossy().into_owned(), &mut out)?;
    Some(out)
}

fn wall_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Kit {
    fn record(&mut self, line: serde_json::Value) -> Result<(), Error> {
        if let Some(f) = &mut self.record {
            // One write per line: with O_APPEND, lines of several instances never interleave.
            f.write_all(format!("{line}\n").as_bytes()).map_err(Error::msg)?;
        }
        Ok(())
    }
}

impl Service for Kit {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        if self.start_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(self.start_ms)).await;
        }
        if std::env::var("STATICS_READ").as_deref() == Ok("1") {
            let all: Vec<serde_json::Value> =
                ctx.static_get("t").await?.iter().map(|(_, k)| metadata_to_json(&k.metadata)).collect();
            self.record(serde_json::json!({ "static_read": all }))?;
        }
        if self.statics {
            let a = ctx.static_put("t", Output::new().meta("v", "first")).await?;
            let _b = ctx.static_put("t", Output::new().meta("v", "second")).await?;
            let deleted = ctx.static_delete("t", a).await?;
            let listed = ctx.static_get("t").await?;
            let mut sub = ctx.static_subscribe("t").await?;
            let seen = sub.recv().await.map(|(_, k)| metadata_to_json(&k.metadata));
            self.record(serde_json::json!({
                "statics": {"deleted": deleted, "listed": listed.len(), "subscribed_first": seen}
            }))?;
        }
        let progress = std::path::Path::new(ctx.data_path()).join("progress");
        let first = if self.chunk > 0 {
            std::fs::read_to_string(&progress).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) + 1
        } else {
            1
        };
        let paced_from = tokio::time::Instant::now();
        for i in first..=self.emit {
            if let Some(r) = self.rate {
                let at = paced_from + std::time::Duration::from_secs_f64((i - first) as f64 / r);
                tokio::time::sleep_until(at).await;
            }
            let mut out = Output::new().meta("seq", i).meta("origin_instance", u64::from(ctx.process_number()));
            if self.stamp {
                out = out.meta("t_us", wall_us());
            }
            if self.pad > 0 && self.pad_seq.is_none_or(|s| s == i) {
                out = out.meta("pad", "p".repeat(self.pad));
            }
            if let Some(k) = &self.key {
                out = out.key(k.clone());
            }
            if self.files > 0 || self.big_mb > 0 {
                let dir = std::path::Path::new(ctx.data_path()).to_owned();
                out = out.file(write_tree(&dir, i, self.files, self.big_mb).map_err(Error::msg)?);
            }
            for p in &self.file_list {
                out = out.file(p.clone());
            }
            match ctx.emit(out).await {
                Err(e @ Error::TooLarge { .. }) => {
                    self.record(serde_json::json!({"emit_error": e.to_string(), "seq": i}))?
                }
                other => other?,
            }
            if self.rate.is_some() {
                ctx.flush().await?;
            }
            if self.chunk > 0 && (i % self.chunk == 0 || i == self.emit) {
                ctx.flush().await?;
                // Atomically (a temporary file renamed over it): a kill -9 between a truncation and the write
                // would leave an empty checkpoint, and the source would start again from seq 1.
                let tmp = progress.with_extension("tmp");
                std::fs::write(&tmp, i.to_string())
                    .and_then(|()| std::fs::rename(&tmp, &progress))
                    .map_err(Error::msg)?;
            }
        }
        if self.terminate {
            ctx.terminate().await?;
        }
        Ok(())
    }

    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        if let Some(tick) = self.forever_tick {
            for seq in 1u64.. {
                ctx.emit(Output::new().meta("seq", seq)).await?;
                tokio::time::sleep(std::time::Duration::from_millis(tick)).await;
            }
        }
        let seq = k.metadata.get("seq").and_then(Value::as_f64).unwrap_or(-1.0) as i64;
        if let Some(d) = self.die_at {
            let marker = std::path::Path::new(ctx.data_path()).join("died");
            if seq as u64 == d && !marker.exists() {
                let _ = std::fs::write(&marker, b"1");
                std::process::abort();
            }
        }
        if self.slow > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(self.slow)).await;
        }
        if self.hang_at == Some(seq as u64) {
            std::future::pending::<()>().await;
        }
        // Large padding is recorded as its length, so sinks of big kanbans stay small.
        let mut shown = k.metadata.clone();
        if let Some(Value::String(p)) = shown.get("pad") {
            let n = p.len() as u64;
            shown.insert("pad".into(), Value::from(n));
        }
        let lat_us = k.metadata.get("t_us").and_then(Value::as_f64).map(|t| wall_us() as f64 - t);
        let line = serde_json::json!({
            "lat_us": lat_us,
            "svc": ctx.info().service, "instance": ctx.process_number(), "id": k.id.to_string(),
            "trace": k.trace_id.to_string(), "from": k.origin.service, "from_instance": k.origin.instance,
            "process_number": k.process_number, "key": k.connection_key, "metadata": metadata_to_json(&shown),
            "data_path": k.data_path,
            "file_list": k.file_list,
            "files": k.file_list.iter().map(|e| list_files(e).map_or(serde_json::json!({"missing": e}), serde_json::Value::from)).collect::<Vec<_>>(),
        });
        self.record(line)?;
        if self.forward {
            let key = self
                .key
                .clone()
                .or_else(|| k.metadata.get("route").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| "default".into());
            let mut md = k.metadata.clone();
            let hop = Value::from(format!("{}-{}", ctx.info().service, ctx.process_number()));
            match md.get_mut("hops") {
                Some(Value::Array(a)) => a.push(hop),
                _ => {
                    md.insert("hops".into(), Value::Array(vec![hop]));
                }
            }
            let mut out = Output::new().key(key);
            for (k, v) in md {
                out = out.meta(k, v);
            }
            ctx.emit(out).await?;
        }
        if self.oneshot {
            ctx.stop();
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if let Some(code) = var("EXIT_CODE").and_then(|c| c.parse::<u8>().ok()) {
        eprintln!("testkit: exiting with {code} as configured");
        return std::process::ExitCode::from(code);
    }
    let record = var("RECORD").and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    let mut opts = aion_sdk::Options { seed: var("SEED").as_deref() == Some("1"), ..Default::default() };
    if let Some(w) = var("WINDOW").and_then(|v| v.parse().ok()) {
        opts.window = w;
    }
    if let Some(w) = var("OUTPUT_WINDOW").and_then(|v| v.parse().ok()) {
        opts.output_window = w;
    }
    aion_sdk::main_with(
        Kit {
            emit: var("EMIT_COUNT").and_then(|v| v.parse().ok()).unwrap_or(0),
            pad: var("PAD").and_then(|v| v.parse().ok()).unwrap_or(0),
            pad_seq: var("PAD_SEQ").and_then(|v| v.parse().ok()),
            terminate: var("TERMINATE").as_deref() == Some("1"),
            key: var("KEY"),
            forward: var("FORWARD").as_deref() == Some("1"),
            record,
            slow: var("SLOW_MS").and_then(|v| v.parse().ok()).unwrap_or(0),
            die_at: var("DIE_AT").and_then(|v| v.parse().ok()),
            statics: var("STATICS").as_deref() == Some("1"),
            oneshot: var("ONESHOT").as_deref() == Some("1"),
            chunk: var("CHUNK").and_then(|v| v.parse().ok()).unwrap_or(0),
            start_ms: var("START_MS").and_then(|v| v.parse().ok()).unwrap_or(0),
            hang_at: var("HANG_AT").and_then(|v| v.parse().ok()),
            forever_tick: (var("EMIT_FOREVER").as_deref() == Some("1"))
                .then(|| var("TICK_MS").and_then(|v| v.parse().ok()).unwrap_or(100)),
            rate: var("RATE").and_then(|v| v.parse().ok()).filter(|r: &f64| *r > 0.0),
            stamp: var("STAMP").as_deref() == Some("1"),
            files: var("FILES").and_then(|v| v.parse().ok()).unwrap_or(0),
            big_mb: var("BIG_MB").and_then(|v| v.parse().ok()).unwrap_or(0),
            file_list: var("FILE_LIST").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        },
        opts,
    )
}
