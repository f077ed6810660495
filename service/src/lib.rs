//! The plumbing kv's services share, so each is written once: logging
//! set-up, the runtime and its size, termination signals, JSON API errors,
//! the metrics text and the backoff between retries.

pub mod api;
pub mod backoff;
pub mod runtime;
pub mod signals;

pub use api::ApiError;
pub use backoff::Backoff;

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
