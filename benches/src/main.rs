//! `outbox-bench`: throughput and latency of modkit-outbox against the raw-database floor.
//!
//! ```sh
//! cargo run --release -p outbox-bench -- --url postgres://postgres@127.0.0.1:5432/outbox_bench
//! cargo run --release -p outbox-bench -- --url sqlite --batch 1 --runs 3
//! just bench --url mysql://root@127.0.0.1:3306/outbox_bench --partitions 64
//! just bench --url postgres://postgres@127.0.0.1:5432/outbox_bench --batch 1 --enqueue-only
//! just bench --url mysql://root@127.0.0.1:3306/outbox_bench --batch 1 --no-floor --statement-profile
//! just bench --url postgres://postgres@127.0.0.1:5432/outbox_bench --batch 1 --two-row-floor
//! ```
//!
//! Every run migrates a fresh schema, measures the floor (plain-SQL inserts and deletes of the
//! same rows) and then the engine, verifies the deliveries (gapless seqs per partition, each
//! message once, a producer's messages in order; `verify.rs`, with unit tests that break each
//! check), and prints one JSON line. A violation exits with status 2. With `--runs N` a final
//! JSON line holds the medians. `--enqueue-only` also
//! times the producers alone (a producer-only outbox, no engine running) and reports that rate
//! beside the floor, to tell what the enqueue transactions cost from what the running pipeline
//! takes from them. `--statement-profile` counts and times every SQL call of the engine phase
//! by the part of the pipeline that made it (`profile.rs`), and `--linger-ms` overrides the
//! sequencer's linger, for sweeps without a rebuild. `--two-row-floor` also times the floor's
//! inserts as two rows per message (a payload row and a row referencing it, sent as the
//! enqueue sends `body` and `incoming`): the most any producer path on this schema can reach.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod db;
mod engine;
mod floor;
mod profile;
mod stats;
mod verify;

use clap::{Parser, ValueEnum};
use serde::Serialize;
use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

/// Processing mode of the benchmarked queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// At-least-once with leases.
    Leased,
    /// Exactly-once database side effects.
    Transactional,
}

/// Where the producers enqueue (see [`Args::producers_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProducersIn {
    /// The first engine instance.
    First,
    /// Producer *p* through instance *p* mod `instances`.
    Each,
    /// A producer-only outbox with no engine in its process.
    Apart,
}

/// Benchmark parameters.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(version, about = "modkit-outbox throughput/latency harness")]
pub struct Args {
    /// Database: `sqlite` (temp file) or a PostgreSQL/MySQL URL whose database is dropped and
    /// recreated.
    #[arg(long, env = "OUTBOX_BENCH_URL", default_value = "sqlite")]
    pub url: String,
    /// Queues.
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Partitions per queue.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Messages in total.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Messages per producer transaction (B).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Processing mode.
    #[arg(long, value_enum, default_value_t = Mode::Leased)]
    pub mode: Mode,
    /// Handler delay per message, microseconds.
    #[arg(long, default_value_t = 0)]
    pub handler_delay_us: u64,
    /// Engine instances in this process, each with its own pool.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Which outbox the producers enqueue through: the first instance's, each instance's in
    /// turn (replicas that all produce and process), or a separate producer-only outbox whose
    /// process runs no engine (a web tier beside worker replicas).
    #[arg(long, value_enum, default_value_t = ProducersIn::First)]
    pub producers_in: ProducersIn,
    /// Concurrent sequencer transactions per instance (engine default when absent).
    #[arg(long)]
    pub sequencer_workers: Option<usize>,
    /// Sequencer linger after a small pass, in milliseconds (`OutboxConfig::sequencer_linger`;
    /// the backend's default when absent).
    #[arg(long)]
    pub linger_ms: Option<u64>,
    /// Runs; the last line then reports medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Skip the floor measurement.
    #[arg(long)]
    pub no_floor: bool,
    /// Only measure the floor.
    #[arg(long)]
    pub floor_only: bool,
    /// Also time the floor's inserts as two rows per message (a payload row and a row
    /// referencing it, as an enqueue writes `body` and `incoming`), plain SQL in the same
    /// transactions: what no engine with this schema can exceed (`floor.two_row_insert_msg_per_s`).
    #[arg(long)]
    pub two_row_floor: bool,
    /// Also measure the producer path alone (no engine running) and report its enqueue rate.
    #[arg(long)]
    pub enqueue_only: bool,
    /// Pace the producers to this many messages per second in all (0: as fast as they go).
    /// Latency at a rate the machine sustains is what a service sees in normal operation.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Count and time the SQL calls of the engine phase by the part of the pipeline that made
    /// them (producers, sequencer, acks, vacuum, …) and report them as `engine.statements`.
    /// sqlx does not log PostgreSQL's `BEGIN` nor SQLite's `BEGIN`/`COMMIT`. The statement log
    /// costs time itself: use it to see where the time goes, not for rates.
    #[arg(long)]
    pub statement_profile: bool,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    kind: &'static str,
    backend: String,
    args: &'a Args,
    #[serde(skip_serializing_if = "Option::is_none")]
    floor: Option<floor::Floor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<engine::EngineRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_ceiling: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_insert_floor: Option<f64>,
    /// `--enqueue-only`: the producers' rate with no engine running.
    #[serde(skip_serializing_if = "Option::is_none")]
    enqueue_only_msg_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enqueue_only_ratio_to_insert_floor: Option<f64>,
    /// `--two-row-floor`: the two-row floor's rate over the one-row floor's.
    #[serde(skip_serializing_if = "Option::is_none")]
    two_row_floor_ratio_to_insert_floor: Option<f64>,
    /// `--two-row-floor`: the engine's end-to-end rate over the two-row floor's.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_two_row_floor: Option<f64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        );
    // The profile needs sqlx's statement events and the spans they happen in, whatever
    // RUST_LOG prints.
    let statements = args.statement_profile.then(|| {
        profile::ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        // The engine's and the producers' spans, and sqlx's statement events; nothing else
        // (the engine's debug events would only be dropped).
        profile::Layer.with_filter(filter_fn(|m| {
            if m.is_span() {
                m.target().starts_with("modkit_outbox") || m.target().starts_with("outbox_bench")
            } else {
                m.target() == "sqlx::query" && *m.level() <= Level::INFO
            }
        }))
    });
    tracing_subscriber::registry()
        .with(log)
        .with(statements)
        .init();
    if args.producers == 0
        || args.batch == 0
        || args.messages < args.producers
        || args.partitions == 0
    {
        eprintln!("producers, batch, partitions must be positive and messages >= producers");
        std::process::exit(1);
    }
    match run(args).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            let code = if e.to_string().contains("CORRECTNESS VIOLATION") {
                2
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut floors = Vec::new();
    let mut engines = Vec::new();
    let mut alones = Vec::new();
    let mut backend = String::new();
    for _ in 0..args.runs {
        let target = db::fresh(&args.url).await?;
        backend = format!("{:?}", target.backend);
        let floor = if args.no_floor {
            None
        } else {
            Some(floor::run(&args, &target).await?)
        };
        let engine = if args.floor_only {
            None
        } else {
            Some(engine::run(&args, &target).await?)
        };
        let alone = if args.enqueue_only {
            Some(engine::enqueue_only(&args, &target).await?)
        } else {
            None
        };
        print_line(&args, &backend, "run", floor, engine.clone(), alone);
        floors.extend(floor);
        alones.extend(alone);
        engines.extend(engine);
    }
    if args.runs > 1 {
        let med =
            |f: &dyn Fn(&engine::EngineRun) -> f64| stats::median(engines.iter().map(f).collect());
        let floor = (!floors.is_empty()).then(|| floor::Floor {
            insert_rows_per_s: stats::median(floors.iter().map(|f| f.insert_rows_per_s).collect()),
            delete_rows_per_s: stats::median(floors.iter().map(|f| f.delete_rows_per_s).collect()),
            design_ceiling_msg_per_s: stats::median(
                floors.iter().map(|f| f.design_ceiling_msg_per_s).collect(),
            ),
            two_row_insert_msg_per_s: args.two_row_floor.then(|| {
                stats::median(
                    floors
                        .iter()
                        .filter_map(|f| f.two_row_insert_msg_per_s)
                        .collect(),
                )
            }),
        });
        let engine = (!engines.is_empty()).then(|| engine::EngineRun {
            enqueue_msg_per_s: med(&|e| e.enqueue_msg_per_s),
            end_to_end_msg_per_s: med(&|e| e.end_to_end_msg_per_s),
            latency_ms: stats::Latency {
                p50: med(&|e| e.latency_ms.p50),
                p90: med(&|e| e.latency_ms.p90),
                p99: med(&|e| e.latency_ms.p99),
                max: med(&|e| e.latency_ms.max),
            },
            vacuum_s: med(&|e| e.vacuum_s),
            peak_rss_mib: med(&|e| e.peak_rss_mib),
            delivered: engines[0].delivered,
            duplicates: engines.iter().map(|e| e.duplicates).sum(),
            // Per run only (each run line has its own).
            statements: None,
        });
        let alone = (!alones.is_empty()).then(|| stats::median(alones.clone()));
        print_line(&args, &backend, "median", floor, engine, alone);
    }
    Ok(())
}

fn print_line(
    args: &Args,
    backend: &str,
    kind: &'static str,
    floor: Option<floor::Floor>,
    engine: Option<engine::EngineRun>,
    enqueue_only: Option<f64>,
) {
    let ratio_to_ceiling = match (&floor, &engine) {
        (Some(f), Some(e)) => Some(e.end_to_end_msg_per_s / f.design_ceiling_msg_per_s),
        _ => None,
    };
    let ratio_to_insert_floor = match (&floor, &engine) {
        (Some(f), Some(e)) => Some(e.end_to_end_msg_per_s / f.insert_rows_per_s),
        _ => None,
    };
    let enqueue_only_ratio_to_insert_floor = match (&floor, enqueue_only) {
        (Some(f), Some(r)) => Some(r / f.insert_rows_per_s),
        _ => None,
    };
    let two_rows = floor.as_ref().and_then(|f| f.two_row_insert_msg_per_s);
    let two_row_floor_ratio_to_insert_floor = match (&floor, two_rows) {
        (Some(f), Some(t)) => Some(t / f.insert_rows_per_s),
        _ => None,
    };
    let ratio_to_two_row_floor = match (&engine, two_rows) {
        (Some(e), Some(t)) => Some(e.end_to_end_msg_per_s / t),
        _ => None,
    };
    let line = Line {
        kind,
        two_row_floor_ratio_to_insert_floor,
        ratio_to_two_row_floor,
        enqueue_only_msg_per_s: enqueue_only,
        enqueue_only_ratio_to_insert_floor,
        backend: backend.to_owned(),
        args,
        floor,
        engine,
        ratio_to_ceiling,
        ratio_to_insert_floor,
    };
    match serde_json::to_string(&line) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot serialize result: {e}"),
    }
}
