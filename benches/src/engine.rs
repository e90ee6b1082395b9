//! One engine run: fresh schema, `instances` engines (own pool each), producers enqueueing in
//! real transactions, a recording handler, then the figures and the correctness checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use modkit_outbox::{
    HandlerResult, LeasedBatchHandler, Message, NewMessage, Outbox, OutboxConfig, Outcome,
    Partitions, TransactionalBatchHandler,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use serde::Serialize;
use tracing::Instrument;

use crate::db::{Target, connect, pool_size};
use crate::profile;
use crate::stats::{Latency, latency, peak_rss_mib};
use crate::verify::{Delivery, Layout, verify};
use crate::{Args, Mode, ProducersIn};

#[derive(Debug, Clone, Serialize)]
pub struct EngineRun {
    pub enqueue_msg_per_s: f64,
    pub end_to_end_msg_per_s: f64,
    pub latency_ms: Latency,
    /// Seconds from the last delivery until `outgoing` and `body` were empty.
    pub vacuum_s: f64,
    pub peak_rss_mib: f64,
    pub delivered: usize,
    pub duplicates: usize,
    /// `--statement-profile`: the logged SQL calls from the first enqueue to the last
    /// delivery, by the part of the pipeline that made them (`profile.rs` says which calls and
    /// how sharp the window is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statements: Option<BTreeMap<String, profile::Group>>,
}

/// The handler's record: every delivery, and the distinct messages seen (a redelivered message
/// must not count towards the end of the run).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<(Vec<Delivery>, HashSet<i64>)>>);

impl Log {
    fn record(&self, msgs: &[Message]) {
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (v, distinct) = &mut *g;
        for m in msgs {
            let (producer, k) = parse(&m.payload);
            distinct.insert(m.id);
            v.push(Delivery {
                id: m.id,
                queue: m
                    .queue
                    .strip_prefix("bench")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(u32::MAX),
                partition: m.partition,
                seq: m.seq,
                producer,
                k,
                at: now,
            });
        }
    }
    /// Distinct messages delivered so far.
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }
}

fn parse(payload: &[u8]) -> (u32, u32) {
    let s = std::str::from_utf8(payload).unwrap_or("");
    let mut it = s.split(':');
    let p = it.next().and_then(|x| x.parse().ok()).unwrap_or(u32::MAX);
    let k = it.next().and_then(|x| x.parse().ok()).unwrap_or(u32::MAX);
    (p, k)
}

struct Leased {
    log: Log,
    delay: Duration,
}

#[async_trait]
impl LeasedBatchHandler for Leased {
    async fn handle_batch(&self, msgs: &[Message]) -> Vec<HandlerResult> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay * msgs.len() as u32).await;
        }
        self.log.record(msgs);
        msgs.iter().map(|_| Ok(Outcome::Ack)).collect()
    }
}

struct Transactional {
    log: Log,
    delay: Duration,
}

#[async_trait]
impl TransactionalBatchHandler for Transactional {
    async fn handle_batch(
        &self,
        _txn: &DatabaseTransaction,
        msgs: &[Message],
    ) -> Vec<HandlerResult> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay * msgs.len() as u32).await;
        }
        self.log.record(msgs);
        msgs.iter().map(|_| Ok(Outcome::Ack)).collect()
    }
}

fn payload(p: u32, k: u32, size: usize) -> Vec<u8> {
    let mut v = format!("{p}:{k}:").into_bytes();
    v.resize(size.max(v.len()), b'x');
    v
}

async fn count(c: &sea_orm::DatabaseConnection, table: &str) -> Result<i64, sea_orm::DbErr> {
    let row = c
        .query_one_raw(Statement::from_string(
            c.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// Drops and re-creates the outbox schema; returns the one-connection pool it used. One
/// connection: sea-orm's `fresh` turns SQLite's `PRAGMA foreign_keys` off, drops, and turns it
/// back on as separate statements, and on a bigger pool a `DROP TABLE` could run on another
/// connection with the checks still on and fail on the previous run's rows (a CI smoke run
/// did: "FOREIGN KEY constraint failed").
async fn fresh_schema(url: &str) -> Result<sea_orm::DatabaseConnection, sea_orm::DbErr> {
    let admin = connect(url, 1).await?;
    modkit_outbox_migration::Migrator::fresh(&admin).await?;
    Ok(admin)
}

pub async fn run(args: &Args, target: &Target) -> Result<EngineRun, Box<dyn std::error::Error>> {
    let b = target.backend;
    let admin = fresh_schema(&target.url).await?;
    let log = Log::default();
    let config = OutboxConfig {
        sequencer_workers: args.sequencer_workers,
        sequencer_linger: args.linger_ms.map(Duration::from_millis),
        ..OutboxConfig::default()
    };
    let mut handles = Vec::new();
    let mut shared = None;
    for _ in 0..args.instances {
        // The engine's own pool. SQLite has one writer: the engine and the producers share one
        // connection, as an embedding application should (two writers only trade the lock
        // through SQLite's sleeping busy handler: latency in the hundreds of milliseconds).
        let conn = connect(&target.url, if b == DbBackend::Sqlite { 1 } else { 10 }).await?;
        if b == DbBackend::Sqlite && shared.is_none() {
            shared = Some(conn.clone());
        }
        let mut builder = Outbox::builder(conn).config(config.clone());
        for q in 0..args.queues {
            let qb = builder.queue(format!("bench{q}"), Partitions::of(args.partitions));
            let delay = Duration::from_micros(args.handler_delay_us);
            builder = match args.mode {
                Mode::Leased => qb.leased_batch(Leased {
                    log: log.clone(),
                    delay,
                }),
                Mode::Transactional => qb.transactional_batch(Transactional {
                    log: log.clone(),
                    delay,
                }),
            };
        }
        handles.push(builder.start().await?);
    }
    let producers = match shared {
        Some(c) => c,
        None => connect(&target.url, pool_size(b, args.producers as u32)).await?,
    };
    let outboxes: Vec<Outbox> = match args.producers_in {
        ProducersIn::First => vec![handles[0].outbox()],
        ProducersIn::Each => handles.iter().map(|h| h.outbox()).collect(),
        ProducersIn::Apart => vec![producer_only(args, &producers).await?],
    };
    let per = (args.messages / args.producers) as u32;
    let total = per as usize * args.producers;
    let commits: Arc<Mutex<HashMap<i64, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total)));
    profile::reset();
    let start = Instant::now();
    produce(args, &outboxes, &producers, &commits).await?;
    let enqueue_secs = start.elapsed().as_secs_f64();

    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while log.len() < total {
        if Instant::now() > deadline {
            return Err(format!("timed out: {} of {total} delivered", log.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let statements = args.statement_profile.then(profile::take);
    let deliveries = std::mem::take(&mut log.0.lock().unwrap_or_else(|e| e.into_inner()).0);
    let last = deliveries.iter().map(|d| d.at).max().unwrap_or(start);
    let e2e_secs = (last - start).as_secs_f64();

    let vacuum_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if count(&admin, "modkit_outbox_outgoing").await? == 0
            && count(&admin, "modkit_outbox_body").await? == 0
        {
            break;
        }
        if Instant::now() > vacuum_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let vacuum_s = last.elapsed().as_secs_f64();
    for h in handles {
        h.stop().await;
    }

    // Correctness.
    let commits = commits.lock().unwrap_or_else(|e| e.into_inner());
    let checked = verify(
        deliveries,
        &commits,
        total,
        Layout::of_args(args),
        args.mode == Mode::Transactional,
    )?;
    Ok(EngineRun {
        enqueue_msg_per_s: total as f64 / enqueue_secs,
        end_to_end_msg_per_s: total as f64 / e2e_secs,
        latency_ms: latency(checked.latencies_ms),
        vacuum_s,
        peak_rss_mib: peak_rss_mib(),
        delivered: total,
        duplicates: checked.duplicates,
        statements,
    })
}

/// Runs the producers: `messages / producers` each, `batch` per transaction, recording each
/// message's commit instant.
async fn produce(
    args: &Args,
    outboxes: &[Outbox],
    producers: &sea_orm::DatabaseConnection,
    commits: &Arc<Mutex<HashMap<i64, Instant>>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let per = (args.messages / args.producers) as u32;
    let mut tasks = Vec::new();
    for p in 0..args.producers as u32 {
        let outbox = outboxes[p as usize % outboxes.len()].clone();
        let (conn, commits) = (producers.clone(), commits.clone());
        let (batch, size) = (args.batch as u32, args.payload_bytes);
        let layout = Layout::of_args(args);
        // Each producer commits one transaction of `batch` per period, the producers evenly
        // staggered over it (not a burst of all of them at once).
        let mut pace = (args.rate > 0).then(|| {
            let period = Duration::from_secs_f64(
                f64::from(batch) * args.producers as f64 / f64::from(args.rate),
            );
            let offset = period.mul_f64(f64::from(p) / args.producers as f64);
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let span = tracing::debug_span!(target: "outbox_bench", "bench.producer", producer = p);
        tasks.push(tokio::spawn(
            async move {
                let mut k = 0u32;
                while k < per {
                    if let Some(i) = pace.as_mut() {
                        i.tick().await;
                    }
                    let n = batch.min(per - k);
                    let msgs: Vec<NewMessage> = (k..k + n)
                        .map(|i| {
                            let (queue, partition) = layout.of(p, i);
                            NewMessage::new(
                                format!("bench{queue}"),
                                partition,
                                payload(p, i, size),
                                "bench",
                            )
                        })
                        .collect();
                    let txn = conn.begin().await?;
                    let ids = outbox.enqueue_batch(&txn, &msgs).await?;
                    txn.commit().await?;
                    let now = Instant::now();
                    let mut c = commits.lock().unwrap_or_else(|e| e.into_inner());
                    for id in ids {
                        c.insert(id, now);
                    }
                    k += n;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .instrument(span),
        ));
    }
    for t in tasks {
        t.await?.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The producer path alone: the same producers and transactions with no engine running (a
/// producer-only outbox), to split the engine's end-to-end rate into what the enqueue
/// transactions cost and what the running pipeline takes from them. On PostgreSQL a
/// producer-only process also `NOTIFY`s on each commit, which a process with a sequencer skips.
pub async fn enqueue_only(args: &Args, target: &Target) -> Result<f64, Box<dyn std::error::Error>> {
    fresh_schema(&target.url).await?;
    let conn = connect(
        &target.url,
        pool_size(target.backend, args.producers as u32),
    )
    .await?;
    let outbox = producer_only(args, &conn).await?;
    let commits = Arc::new(Mutex::new(HashMap::with_capacity(args.messages)));
    // The producers' own ceiling: never paced, whatever `--rate` says.
    let unpaced = Args {
        rate: 0,
        ..args.clone()
    };
    let start = Instant::now();
    produce(&unpaced, std::slice::from_ref(&outbox), &conn, &commits).await?;
    Ok(args.messages as f64 / start.elapsed().as_secs_f64())
}

/// An outbox that only enqueues: no sequencer, processors or listener in its process.
async fn producer_only(
    args: &Args,
    conn: &sea_orm::DatabaseConnection,
) -> Result<Outbox, Box<dyn std::error::Error>> {
    let mut builder = Outbox::builder(conn.clone());
    for q in 0..args.queues {
        builder = builder
            .queue(format!("bench{q}"), Partitions::of(args.partitions))
            .producer_only();
    }
    Ok(builder.build().await?)
}
