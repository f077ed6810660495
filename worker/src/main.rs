//! `kv-worker`: parse flags, set up logging, run until Ctrl-C or SIGTERM
//! (the first leaves the cluster, handing the keys over; the second stops).

// glibc's malloc spent a third of a bulk load's CPU in allocation; mimalloc
// keeps per-thread free lists and is several times cheaper for our small,
// short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use kv_worker::lifecycle::stop_on_signals;
use kv_worker::{run, Config, Listeners, Stop};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only for a person at a terminal, not for log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = Config::parse();
    let listeners = Listeners::bind(config.listen, config.wire_listen)?;
    let stop = Stop::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    run(config, listeners, stop).await?;
    Ok(())
}
