//! `kv-worker`: parse flags, set up logging, run until Ctrl-C or SIGTERM
//! (the first leaves the cluster, handing the keys over; the second stops).

use clap::Parser;
use kv_worker::lifecycle::stop_on_signals;
use kv_worker::{run, Config, Listeners, Stop};

fn main() -> anyhow::Result<()> {
    kv_alloc::configure();
    tokio::runtime::Runtime::new()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    kv_service::init_logging();
    let config = Config::parse();
    let listeners = Listeners::bind(config.listen, config.wire_listen)?;
    let stop = Stop::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    run(config, listeners, stop).await?;
    Ok(())
}
