//! Pipeline stage 1: emits `COUNT` kanbans (default 10) every `INTERVAL_MS` (default 200), then terminates.
use aion_sdk::{Ctx, Error, Kanban, Output, Service};
use std::time::Duration;

struct Source {
    count: u64,
    interval: Duration,
}

impl Service for Source {
    async fn start(&mut self, ctx: &mut Ctx) -> Result<(), Error> {
        for i in 1..=self.count {
            ctx.emit(Output::new().meta("seq", i).meta("text", format!("hello #{i}"))).await?;
            println!("source: emitted #{i}");
            if !self.interval.is_zero() {
                tokio::time::sleep(self.interval).await;
            }
        }
        println!("source: done, terminating");
        ctx.terminate().await
    }

    async fn handle(&mut self, _k: Kanban, _ctx: &mut Ctx) -> Result<(), Error> {
        Ok(())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> std::process::ExitCode {
    aion_sdk::main(Source { count: env_u64("COUNT", 10), interval: Duration::from_millis(env_u64("INTERVAL_MS", 200)) })
}
