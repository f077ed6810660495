//! `kv-sim`: runs seeds of the deterministic simulation.
//!
//! ```text
//! kv-sim --seeds 1000            # seeds 0..1000, a line per failing seed
//! kv-sim --seed 42 --verbose     # one seed, replayed exactly, with its trace
//! ```

use clap::Parser;
use kv_sim::{run, Options, Report};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Runs seeds of kv's deterministic cluster simulation and checks each.
#[derive(Debug, Parser)]
#[command(name = "kv-sim", version)]
struct Args {
    /// Runs this many seeds, from --start; prints a line per failing seed
    /// and a final "N passed, N failed" line.
    #[arg(long, default_value_t = 100, conflicts_with = "seed")]
    seeds: u64,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Runs one seed and prints its "trace <hash>" line, the same on every
    /// run of that seed.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: prints every event of the run.
    #[arg(long, requires = "seed")]
    verbose: bool,
    /// Threads running seeds side by side (default: the CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// With --seeds: a seed still running after this many seconds is a
    /// failure, and ends the run (a seed takes well under a second: one
    /// that does not end spins, and its thread cannot be stopped).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    seed_limit: u64,
    /// A worker that leaves starts again on its data dir once it exited
    /// (a StatefulSet's rolling restart), rather than leaving for good.
    #[arg(long)]
    leavers_return: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        keep_log: args.verbose,
        leavers_return: args.leavers_return,
        ..Options::default()
    };
    if let Some(seed) = args.seed {
        let report = run(seed, &options);
        for line in &report.log {
            println!("{line}");
        }
        print_one(&report);
        println!("trace {:016x}", report.trace);
        return if report.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let began = Instant::now();
    let seeds: Vec<u64> = (args.start..args.start + args.seeds).collect();
    let limit = Duration::from_secs(args.seed_limit);
    let (passed, failed) = kv_sim::run_many(
        &seeds,
        &options,
        threads,
        limit,
        |report| {
            if !report.problems.is_empty() {
                print_one(report);
            }
        },
        |seed| {
            println!(
                "seed {seed}: FAILED: still running after {limit:?}; it never ends (replay it with --seed {seed} --verbose)"
            );
            std::process::exit(1);
        },
    );
    let took = began.elapsed();
    println!(
        "{passed} passed, {failed} failed ({:.0} seeds a minute on {threads} threads)",
        seeds.len() as f64 / took.as_secs_f64().max(1e-9) * 60.0
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_one(report: &Report) {
    let verdict = if report.problems.is_empty() {
        "passed".to_string()
    } else {
        format!("FAILED: {}", report.problems.join(" | "))
    };
    println!(
        "seed {}: {verdict} ({} ops, {} faults, {:.1} s simulated, trace {:016x})",
        report.seed,
        report.ops,
        report.faults,
        report.simulated.as_secs_f64(),
        report.trace
    );
}
