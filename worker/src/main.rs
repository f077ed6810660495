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
    kv_service::init_logging();
    let config = Config::parse();
    let listeners = Listeners::bind(config.listen, config.wire_listen)?;
    let stop = Stop::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    run(config, listeners, stop).await?;
    Ok(())
}
