//! `kvctl load`: bulk load, batched per primary and pipelined, each key
//! acknowledged at W=2. Lines that cannot be read are reported with their
//! line numbers and skipped; keys that fail are reported one by one.
//!
//! Batches in flight follow a [`Window`]: it starts at one and grows while
//! batches come back quickly, and halves when one is slow or has keys that
//! failed, as TCP's congestion window does. A fixed window larger than the
//! cluster can answer within the timeouts only makes writes time out: with
//! 8 batches of 65,536 keys in flight, a durable cluster failed most of 3
//! million keys.

use crate::out::outln;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use kv_client::Client;
use kv_client::ClientError;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `kvctl load` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A file of JSON lines {"key":"...","value":"..."} or key<TAB>value lines; - for standard input.
    #[arg(required_unless_present = "generate")]
    file: Option<PathBuf>,
    /// Instead of a file, generate N keys `{prefix}{i}` for i in 0..N.
    #[arg(long, conflicts_with = "file")]
    generate: Option<u64>,
    /// Bytes per generated value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Prefix of generated keys.
    #[arg(long, default_value = "key:")]
    prefix: String,
    /// Keys per batch handed to the client (it splits them per primary).
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Batches in flight at once, at most (fewer while the cluster is slow
    /// to answer).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

/// A batch that takes longer than this is a sign of a queue: the window
/// shrinks. Well inside the client's 5 s call timeout and the workers'
/// 2 s write timeout.
const SLOW_BATCH: Duration = Duration::from_secs(1);

/// How many batches may be in flight: additive increase, multiplicative
/// decrease.
#[derive(Debug)]
struct Window {
    limit: usize,
    max: usize,
}

impl Window {
    fn new(max: usize) -> Window {
        Window {
            limit: 1,
            max: max.max(1),
        }
    }

    /// A batch came back after `took`, with or without keys that failed
    /// for a reason other than the caller's.
    fn done(&mut self, took: Duration, failed: bool) {
        self.limit = if failed || took > SLOW_BATCH {
            (self.limit / 2).max(1)
        } else {
            (self.limit + 1).min(self.max)
        };
    }
}

/// Keys and values to load.
type Items = Vec<(String, Bytes)>;

/// A line that could not be read.
struct Malformed {
    line: usize,
    reason: String,
}

/// Parses one line of a load file: JSON `{"key","value"}` or `key<TAB>value`.
fn parse_line(line: &str) -> Result<(String, Bytes), String> {
    if line.trim_start().starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Item {
            key: String,
            value: String,
        }
        let item: Item = serde_json::from_str(line)
            .map_err(|e| format!("not a {{\"key\",\"value\"}} JSON object: {e}"))?;
        Ok((item.key, Bytes::from(item.value)))
    } else if let Some((key, value)) = line.split_once('\t') {
        Ok((key.to_string(), Bytes::from(value.to_string())))
    } else {
        Err("neither a JSON object nor key<TAB>value".into())
    }
}

/// Reads a whole load file: the items and the malformed lines.
fn read_file(path: &PathBuf) -> Result<(Items, Vec<Malformed>)> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let (mut items, mut malformed) = (Vec::new(), Vec::new());
    for (i, line) in reader.lines().enumerate() {
        let number = i + 1;
        match line {
            Ok(line) if line.trim().is_empty() => {}
            Ok(line) => match parse_line(&line) {
                Ok(item) => items.push(item),
                Err(reason) => malformed.push(Malformed {
                    line: number,
                    reason,
                }),
            },
            Err(e) => malformed.push(Malformed {
                line: number,
                reason: format!("unreadable: {e}"),
            }),
        }
    }
    Ok((items, malformed))
}

/// A generated value: `value_size` bytes that differ per key (the key's
/// number in hex, repeated). Made a slice at a time: byte by byte, making
/// values took a fifth of the client's CPU in a load.
fn generated_value(i: u64, size: usize) -> Bytes {
    let seed = format!("{i:016x}");
    let mut value = Vec::with_capacity(size);
    while value.len() < size {
        let take = seed.len().min(size - value.len());
        value.extend_from_slice(&seed.as_bytes()[..take]);
    }
    Bytes::from(value)
}

/// Runs the load and prints the summary; fails if anything was not loaded.
pub async fn run(client: &Client, args: Args) -> Result<()> {
    let (items, malformed): (
        Box<dyn Iterator<Item = (String, Bytes)> + Send>,
        Vec<Malformed>,
    ) = match (&args.file, args.generate) {
        (_, Some(n)) => {
            let (prefix, size) = (args.prefix.clone(), args.value_size);
            (
                Box::new((0..n).map(move |i| (format!("{prefix}{i}"), generated_value(i, size)))),
                Vec::new(),
            )
        }
        (Some(path), None) => {
            let (items, malformed) = read_file(path)?;
            (Box::new(items.into_iter()), malformed)
        }
        (None, None) => bail!("give a FILE or --generate N"),
    };
    for m in &malformed {
        eprintln!("line {}: {}", m.line, m.reason);
    }
    let total = args.generate;
    let progress = Progress::new(total);
    let loaded = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut failures: Vec<(String, String)> = Vec::new();
    let batch = args.batch.max(1);
    let mut items = items.peekable();
    let mut batches = std::iter::from_fn(move || {
        let chunk: Vec<(String, Bytes)> = items.by_ref().take(batch).collect();
        (!chunk.is_empty()).then_some(chunk)
    });
    let mut window = Window::new(args.concurrency);
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < window.limit {
            let Some(chunk) = batches.next() else { break };
            running.push(async move {
                let sent = Instant::now();
                let outcomes = client.put_many(&chunk).await;
                (chunk, outcomes, sent.elapsed())
            });
        }
        let Some((chunk, outcomes, took)) = running.next().await else {
            break;
        };
        let mut failed = false;
        for ((key, value), outcome) in chunk.into_iter().zip(outcomes) {
            match outcome {
                Ok(_) => {
                    loaded.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add((key.len() + value.len()) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    failed |= !matches!(e, ClientError::Refused(_));
                    failures.push((key, e.to_string()));
                }
            }
        }
        window.done(took, failed);
        progress.update(loaded.load(Ordering::Relaxed), started);
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let (n, b) = (
        loaded.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    );
    for (key, reason) in &failures {
        eprintln!("failed {key}: {reason}");
    }
    outln!(
        "loaded {n} keys ({:.1} MB) in {secs:.2} s: {:.0} keys/s, {:.1} MB/s; {} failed, {} malformed lines",
        b as f64 / 1e6,
        n as f64 / secs,
        b as f64 / 1e6 / secs,
        failures.len(),
        malformed.len()
    );
    if !failures.is_empty() || !malformed.is_empty() {
        bail!(
            "{} keys failed and {} lines were malformed (listed above)",
            failures.len(),
            malformed.len()
        );
    }
    Ok(())
}

/// A progress bar on a terminal; a plain line a second otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = total.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
            let style = ProgressStyle::with_template("{bar:40} {pos}/{len} keys {per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn update(&self, done: u64, started: Instant) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_secs(1) {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    eprintln!("loaded {done} keys ({rate:.0} keys/s)");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_one_batch_at_a_time_and_halves_when_slow_or_failing() {
        let fast = Duration::from_millis(100);
        let mut w = Window::new(8);
        assert_eq!(w.limit, 1, "starts at one batch");
        for _ in 0..20 {
            w.done(fast, false);
        }
        assert_eq!(w.limit, 8, "grows up to --concurrency, no further");
        w.done(SLOW_BATCH + fast, false);
        assert_eq!(w.limit, 4, "a slow batch halves it");
        w.done(fast, true);
        assert_eq!(w.limit, 2, "a batch with failed keys halves it");
        for _ in 0..5 {
            w.done(SLOW_BATCH * 3, true);
        }
        assert_eq!(w.limit, 1, "never below one batch");
        w.done(fast, false);
        assert_eq!(w.limit, 2);
        assert_eq!(Window::new(0).max, 1, "--concurrency 0 still loads");
    }

    #[test]
    fn lines_parse_as_json_or_tab_separated_or_say_why_not() {
        assert_eq!(
            parse_line(r#"{"key":"a","value":"1"}"#).unwrap(),
            ("a".to_string(), Bytes::from("1"))
        );
        assert_eq!(
            parse_line("b\t2\t3").unwrap(),
            ("b".to_string(), Bytes::from("2\t3"))
        );
        assert!(parse_line(r#"{"key":"a"}"#)
            .unwrap_err()
            .contains("missing field"));
        assert!(parse_line("no separator")
            .unwrap_err()
            .contains("key<TAB>value"));
    }

    #[test]
    fn generated_values_have_the_asked_size_and_differ_per_key() {
        for size in [0, 1, 15, 16, 17, 100, 1024] {
            assert_eq!(generated_value(1, size).len(), size);
        }
        assert_eq!(&generated_value(0xab, 20)[..], b"00000000000000ab0000");
        assert_ne!(generated_value(1, 32), generated_value(2, 32));
    }
}
