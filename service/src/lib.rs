//! The plumbing kv's services share, so each is written once: logging
//! set-up, the runtime and its size, termination signals, JSON API errors,
//! the metrics text and the backoff between retries.

pub mod api;
pub mod backoff;
pub mod runtime;
pub mod signals;

pub use api::ApiError;
pub use backoff::Backoff;
use tracing_subscriber::filter::{LevelFilter, Targets};

/// Logs to stdout, at the levels `RUST_LOG` gives (`info` when unset or
/// unreadable; see [`log_filter`]), in colour only for a person at a
/// terminal, not for log collectors or log files.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let (filter, unreadable) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .with(filter)
        .init();
    if let Some(why) = unreadable {
        tracing::warn!("RUST_LOG not understood ({why}): logging at info");
    }
}

/// The log levels `spec` (`RUST_LOG`) asks for: a level for everything
/// (`debug`), levels by target (`kv_worker=debug,info`), as env_logger
/// reads them; `info` for everything when unset, and when unreadable, with
/// why. (tracing's `EnvFilter` also filters by span and field, and brings
/// a regex engine into every build for it.)
pub fn log_filter(spec: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(LevelFilter::INFO);
    match spec.map(str::trim).filter(|s| !s.is_empty()) {
        None => (info(), None),
        Some(spec) => match spec.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (info(), Some(format!("{spec:?}: {e}"))),
        },
    }
}

/// The OpenMetrics text of every metric in `registry`.
pub fn render_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_gives_levels_by_target_and_info_when_unset_or_unreadable() {
        let (unset, none) = log_filter(None);
        assert!(none.is_none());
        assert!(unset.would_enable("kv_worker::node", &Level::INFO));
        assert!(!unset.would_enable("kv_worker::node", &Level::DEBUG));
        assert!(log_filter(Some(" ")).1.is_none(), "blank is unset");

        let (debug, _) = log_filter(Some("debug"));
        assert!(debug.would_enable("fjall", &Level::DEBUG));

        let (by_target, none) = log_filter(Some("kv_worker=debug,warn"));
        assert!(none.is_none());
        assert!(by_target.would_enable("kv_worker::node", &Level::DEBUG));
        assert!(!by_target.would_enable("kv_controller", &Level::INFO));
        assert!(by_target.would_enable("kv_controller", &Level::WARN));

        let (fallback, why) = log_filter(Some("kv_worker=loud"));
        assert!(fallback.would_enable("kv_worker", &Level::INFO));
        assert!(!fallback.would_enable("kv_worker", &Level::DEBUG));
        let why = why.expect("a reason");
        assert!(why.contains("kv_worker=loud"), "{why}");
    }
}
