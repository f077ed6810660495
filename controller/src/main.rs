//! `kv-controller`: parse flags, set up logging, run until Ctrl-C or SIGTERM.

use clap::Parser;
use kv_controller::{run, Config, Listeners};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    kv_alloc::configure();
    let config = Config::parse();
    let (runtime, sizing) = kv_service::runtime::for_flag(config.threads)?;
    runtime.block_on(serve(config, sizing))
}

async fn serve(config: Config, sizing: kv_service::runtime::Sizing) -> anyhow::Result<()> {
    kv_service::init_logging();
    kv_service::runtime::log(sizing);
    let listeners = Listeners::bind(config.listen)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(kv_service::signals::cancel_on_signal(shutdown.clone()));
    run(config, listeners, shutdown).await?;
    Ok(())
}
