//! `kv-controller`: parse flags, set up logging, run until Ctrl-C or SIGTERM.

// glibc's malloc spent a third of a bulk load's CPU in allocation; mimalloc
// keeps per-thread free lists and is several times cheaper for our small,
// short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use kv_controller::{run, Config, Listeners};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kv_service::init_logging();
    let config = Config::parse();
    let listeners = Listeners::bind(config.listen)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(kv_service::signals::cancel_on_signal(shutdown.clone()));
    run(config, listeners, shutdown).await?;
    Ok(())
}
