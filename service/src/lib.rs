//! The plumbing kv's services share, so each is written once: logging
//! set-up, termination signals, JSON API errors, the metrics text and the
//! backoff between retries.

pub mod api;
pub mod backoff;
pub mod signals;

pub use api::ApiError;
pub use backoff::Backoff;

/// Keeps this process off transparent huge pages, as Redis does for
/// itself. The allocator asks for huge pages on its arenas, and the
/// kernel then zeroes (and, short of free 2 MiB blocks, compacts memory
/// for) a whole 2 MiB page at the first touch of any byte of it: while a
/// worker's store grows, that was 40% of its CPU time in a bulk load of
/// 1,000,000 keys here, and the load went from 172k to 265k keys/s without
/// it. Call it first thing in `main`: it holds for the whole process and
/// its children. A kernel without the switch is told nothing.
pub fn no_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("cannot turn transparent huge pages off for this process: {e}");
    }
}

/// Logs to stdout, at `RUST_LOG`'s levels (`info` when unset), in colour
/// only for a person at a terminal, not for log collectors or log files.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
}

/// The OpenMetrics text of every metric in `registry`.
pub fn render_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
