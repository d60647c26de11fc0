//! Pipeline stage 3: prints every kanban it receives (see `aion logs sink`). If `SINK_FILE` is set, also
//! appends one JSON line per kanban to it (the integration tests read it).
use aion_sdk::{metadata_to_json, Ctx, Error, Kanban, Service};
use std::io::Write;

struct Sink {
    file: Option<std::fs::File>,
}

impl Service for Sink {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let line = serde_json::json!({
            "id": k.id.to_string(),
            "trace": k.trace_id.to_string(),
            "from": format!("{}-{}", k.origin.service, k.origin.instance),
            "instance": ctx.process_number(),
            "process_number": k.process_number,
            "key": k.connection_key,
            "metadata": metadata_to_json(&k.metadata),
        });
        println!("sink-{}: {line}", ctx.process_number());
        if let Some(f) = &mut self.file {
            f.write_all(format!("{line}\n").as_bytes()).map_err(Error::msg)?;
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let file =
        std::env::var_os("SINK_FILE").and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    aion_sdk::main(Sink { file })
}
