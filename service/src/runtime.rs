//! The async runtime a node runs on, sized by `--threads` (`KV_THREADS`).
//!
//! Without the flag a node takes one thread per CPU it may use, which the
//! standard library reads from the process's CPU affinity and its cgroup's
//! CPU quota: a pod with `limits.cpu: "1"`, or a compose service with
//! `cpus: 1`, gets one thread, whatever the machine's core count. Nodes
//! that share a machine without a quota (`kvctl local`) are given their
//! share with the flag. Measured on 2 cores with 4 workers: a runtime per
//! core each costs 10-20% more CPU per write than one thread each, in
//! wake-ups of idle threads and context switches.

use std::num::NonZeroUsize;

/// How many threads a node's runtime gets, and where that number came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Worker threads of the runtime.
    pub threads: usize,
    /// Why that many, for the log.
    pub source: &'static str,
}

/// The runtime size for `--threads` (`flag`), else for the CPUs this
/// process may use (`available`).
pub fn sizing(flag: Option<NonZeroUsize>, available: std::io::Result<NonZeroUsize>) -> Sizing {
    match (flag, available) {
        (Some(n), _) => Sizing {
            threads: n.get(),
            source: "--threads",
        },
        (None, Ok(n)) => Sizing {
            threads: n.get(),
            source: "the CPUs this process may use (its CPU quota and affinity)",
        },
        (None, Err(_)) => Sizing {
            threads: 1,
            source: "one: the CPUs this process may use are unknown",
        },
    }
}

/// A runtime of `sizing.threads` threads, with timers and I/O: for one
/// thread, tokio's current-thread scheduler, which runs the node's main
/// future and its tasks on the same thread and needs no work-stealing
/// queues; a multi-threaded one with a single worker would run the main
/// future on a thread of its own and hand every task it spawns across.
pub fn build(sizing: Sizing) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match sizing.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

/// The runtime for `--threads` (`flag`) on this machine.
pub fn for_flag(flag: Option<NonZeroUsize>) -> std::io::Result<(tokio::runtime::Runtime, Sizing)> {
    let sizing = sizing(flag, std::thread::available_parallelism());
    Ok((build(sizing)?, sizing))
}

/// Says in the log how many threads the runtime has, and why.
pub fn log(sizing: Sizing) {
    tracing::info!(threads = sizing.threads, from = sizing.source, "runtime");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn the_flag_wins_over_the_cpus_available() {
        assert_eq!(sizing(Some(n(3)), Ok(n(8))).threads, 3);
        assert_eq!(sizing(Some(n(3)), Ok(n(8))).source, "--threads");
    }

    #[test]
    fn without_the_flag_one_thread_per_cpu_available() {
        assert_eq!(sizing(None, Ok(n(2))).threads, 2);
        let unknown = std::io::Error::other("no /proc");
        assert_eq!(sizing(None, Err(unknown)).threads, 1);
    }

    #[test]
    fn the_runtime_has_the_threads_asked_for_one_on_the_current_thread_scheduler() {
        use tokio::runtime::RuntimeFlavor::{CurrentThread, MultiThread};
        for (threads, flavor) in [(1, CurrentThread), (3, MultiThread)] {
            let (runtime, _) = for_flag(Some(n(threads))).unwrap();
            assert_eq!(runtime.metrics().num_workers(), threads);
            assert_eq!(runtime.handle().runtime_flavor(), flavor);
        }
    }
}
