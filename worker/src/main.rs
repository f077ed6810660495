//! `kv-worker`: parse flags, set up logging, run until Ctrl-C or SIGTERM
//! (the first leaves the cluster, handing the keys over; the second stops).

use clap::Parser;
use kv_worker::lifecycle::stop_on_signals;
use kv_worker::{run, Config, Listeners, Stop};

fn main() -> anyhow::Result<()> {
    kv_alloc::configure();
    let config = Config::parse();
    let (runtime, sizing) = kv_service::runtime::for_flag(config.threads)?;
    runtime.block_on(serve(config, sizing))
}

async fn serve(config: Config, sizing: kv_service::runtime::Sizing) -> anyhow::Result<()> {
    kv_service::init_logging();
    kv_service::runtime::log(sizing);
    let listeners = Listeners::bind(config.listen, config.wire_listen)?;
    let stop = Stop::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    run(config, listeners, stop).await?;
    Ok(())
}
