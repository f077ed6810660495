//! `kv-controller`: parse flags, set up logging, run until Ctrl-C or SIGTERM.

use clap::Parser;
use kv_controller::{run, Config, Listeners};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    kv_alloc::configure();
    tokio::runtime::Runtime::new()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    kv_service::init_logging();
    let config = Config::parse();
    let listeners = Listeners::bind(config.listen)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(kv_service::signals::cancel_on_signal(shutdown.clone()));
    run(config, listeners, shutdown).await?;
    Ok(())
}
