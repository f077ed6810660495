//! kv's test support, one crate for every test suite: a controller with
//! fake workers ([`fake`], the controller's tests), a controller and
//! workers in the test's process ([`inproc`]), a cluster of real processes
//! with a seeded write load and the acknowledged-write checker ([`procs`],
//! the fault, rolling-restart and durability suites), and `kvctl local` as
//! a user runs it ([`local`]).
//!
//! A test fails by panicking, so unwrapping is how this crate reports; its
//! items are helpers named for what they do, documented where a name is
//! not enough.
#![allow(missing_docs, clippy::unwrap_used)]

pub mod fake;
pub mod inproc;
pub mod local;
pub mod procs;

use bytes::Bytes;
use serde_json::Value;
use std::future::Future;
use std::time::{Duration, Instant};

/// The user and system CPU time process `pid` (`"self"`: this one), all
/// its threads, has used so far, from `/proc/<pid>/stat`. Benchmarks
/// report it: on a shared machine the CPU an operation costs is steadier
/// than how many run in a second.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // utime and stime, the 14th and 15th fields, counted after the
    // command's closing parenthesis (a command may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let field = |i: usize| -> u64 { rest.split_whitespace().nth(i).unwrap().parse().unwrap() };
    // /proc counts in USER_HZ, 100 a second on Linux whatever the kernel's tick.
    Duration::from_millis((field(11) + field(12)) * 10)
}

/// How long an in-process test waits for what it expects: generous, since
/// many clusters share 2 cores when tests run in parallel.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `check` returning `Some`, polling, for at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(PATIENCE, Duration::from_millis(20), what, check).await
}

/// Awaits `check` returning `Some`, polling every `poll`, for at most
/// `patience`; then fails the test saying what it waited for.
pub async fn eventually_within<T, F, Fut>(
    patience: Duration,
    poll: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(poll).await;
    }
}

/// One HTTP request; the status and the body as JSON (or as a string).
pub async fn http(method: &str, url: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let (status, bytes) = http_raw(method, url, body.into()).await;
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// One HTTP request; the status and the body as it came.
pub async fn http_raw(method: &str, url: &str, body: Bytes) -> (u16, Bytes) {
    http_authorized(method, url, body, None).await
}

/// A request with an `Authorization` header, if given.
pub async fn http_authorized(
    method: &str,
    url: &str,
    body: Bytes,
    authorization: Option<&str>,
) -> (u16, Bytes) {
    kv_client::HttpClient::new()
        .request_authorized(method.parse().unwrap(), url, body, authorization)
        .await
        .unwrap()
}

/// The `kvctl` binary of this build, for the process-level tests.
///
/// Cargo builds a package's binaries before its integration tests and puts
/// both under the same profile directory (`target/debug/kvctl`, the tests
/// in `target/debug/deps/`); only those tests see `CARGO_BIN_EXE_kvctl`,
/// so the path is worked out from the running test instead.
pub fn kvctl_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let kvctl = profile.join("kvctl");
    assert!(
        kvctl.is_file(),
        "{} is missing: the process-level tests run from kvctl's tests, which build it",
        kvctl.display()
    );
    kvctl
}
