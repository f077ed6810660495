//! SIGTERM (what Kubernetes and Docker send) and SIGINT (Ctrl-C), the two
//! ways a person or an orchestrator asks a process to stop.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Listens for SIGTERM and SIGINT for as long as it lives.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Starts listening; an error if the process cannot.
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Cancels `token` at the first SIGTERM or SIGINT. If signals cannot be
/// listened for, says so and leaves the process to be killed.
pub async fn cancel_on_signal(token: CancellationToken) {
    match Signals::new() {
        Ok(mut signals) => {
            signals.recv().await;
            token.cancel();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for signals; this process stops only when it is killed")
        }
    }
}
