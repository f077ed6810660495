//! `kvctl local` as a user runs it, for the process-level tests: started on
//! free ports, read until "Ready.", with its nodes' process ids.

use kv_client::HttpClient;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(60);

/// A base port whose controller and worker ports are all free now.
fn free_base() -> u16 {
    loop {
        let base = 20_000 + 1000 * fastrand::u16(0..40);
        let ports = std::iter::once(base)
            .chain((1..=4).flat_map(|i| [base + 100 * i + 1, base + 100 * i + 2]));
        let free = ports
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .all(|b| b.is_ok());
        if free {
            return base;
        }
    }
}

/// Whether a process is gone (or a zombie awaiting its reaper). A killed
/// process's first thread is a zombie as soon as it has exited, while
/// threads busy in disk I/O (fjall's, an fsync) may still be exiting with
/// its sockets and its data dir's lock held: only that first thread may be
/// left.
pub fn gone(pid: u32) -> bool {
    let zombie = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => return true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    };
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    zombie && threads <= 1
}

pub async fn json(http: &HttpClient, url: &str) -> (u16, Value) {
    let (status, body) = http
        .request("GET".parse().unwrap(), url, Default::default())
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Awaits `check` returning `Some`, polling, for at most [`PATIENCE`].
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    check: impl FnMut() -> F,
) -> T {
    crate::eventually_within(PATIENCE, Duration::from_millis(50), what, check).await
}

/// A running `kvctl local`.
pub struct Local {
    pub kvctl: Child,
    pub base: u16,
    pub logs: PathBuf,
    /// Process ids by node name, from the table it prints.
    pub pids: HashMap<String, u32>,
}

impl Local {
    /// Starts `kvctl [global...] local` on free ports and waits for "Ready.".
    pub fn start(global: &[&str]) -> Local {
        let base = free_base();
        let logs = std::env::temp_dir().join(format!(
            "kvctl-local-test-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut kvctl = Command::new(crate::kvctl_binary())
            .args(global)
            .args([
                "local",
                "--base-port",
                &base.to_string(),
                "--logs",
                logs.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = kvctl.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Drained to the end, so kvctl never writes to a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The table, then "Ready.".
        let mut pids = HashMap::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("kvctl local did not get ready");
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 2 && (fields[0] == "controller" || fields[0].starts_with("worker")) {
                if let Ok(pid) = fields[1].parse::<u32>() {
                    pids.insert(fields[0].to_string(), pid);
                }
            }
            if line.starts_with("Ready.") {
                break;
            }
        }
        Local {
            kvctl,
            base,
            logs,
            pids,
        }
    }

    pub fn controller(&self) -> String {
        format!("http://127.0.0.1:{}", self.base)
    }

    /// Worker `id`'s HTTP port.
    pub fn http_port(&self, id: &str) -> u16 {
        self.base + 100 * id.trim_start_matches("worker").parse::<u16>().unwrap() + 1
    }

    /// A node's log so far.
    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{node}.log"))).unwrap_or_default()
    }

    /// Kills kvctl hard and waits for every node to follow.
    pub async fn kill(mut self) {
        assert!(Command::new("kill")
            .args(["-9", &self.kvctl.id().to_string()])
            .status()
            .unwrap()
            .success());
        let _ = self.kvctl.wait();
        for (name, pid) in &self.pids {
            eventually(&format!("{name} to exit"), || async {
                gone(*pid).then_some(())
            })
            .await;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// A test that fails before [`Local::kill`] still takes its cluster down
/// (kvctl's nodes follow it), rather than leaving it running and holding
/// the test's output pipe open.
impl Drop for Local {
    fn drop(&mut self) {
        if let Ok(None) = self.kvctl.try_wait() {
            let _ = self.kvctl.kill();
            let _ = self.kvctl.wait();
        }
    }
}
