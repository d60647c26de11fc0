//! Pipeline stage 2: upper-cases `metadata.text` and forwards the kanban.
use aion_sdk::{Ctx, Error, Kanban, Output, Service};

struct Transform;

impl Service for Transform {
    async fn handle(&mut self, k: Kanban, ctx: &mut Ctx) -> Result<(), Error> {
        let text = k.metadata.get("text").and_then(|v| v.as_str()).unwrap_or_default().to_uppercase();
        let mut out = Output::new().meta("text", text.clone());
        if let Some(seq) = k.metadata.get("seq") {
            out = out.meta("seq", seq.clone());
        }
        out = out.meta("transformed_by", format!("{}-{}", ctx.info().service, ctx.process_number()));
        ctx.emit(out).await?;
        println!("transform-{}: {text}", ctx.process_number());
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    aion_sdk::main(Transform)
}
