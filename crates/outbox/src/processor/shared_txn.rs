//! Shared transactional steps: the fast tries of every transactional partition woken at the same
//! moment run in ONE transaction, with one lock-and-read statement, one cursor update and one
//! durable commit for all of them.
//!
//! At a trickle a transactional step carries one or two messages, and its commit (a WAL flush
//! on PostgreSQL, a redo-log flush on MariaDB) is what it costs; a sequencer pass typically
//! wakes several partitions at once. Leased queues coalesce their reads and acks for the same
//! reason (`coalesce.rs`); here the handlers' writes must commit with the cursors, so the unit
//! that is shared is the transaction.
//!
//! * The handlers run one after another in the shared transaction (never concurrently: a
//!   handler may open savepoints on it). So a queue shares only while its handler averages
//!   less than [`crate::OutboxConfig::shared_txn_max_handler_time`] per message; a slower
//!   handler gets a transaction per partition and partitions run in parallel.
//! * Each partition's `processor` row is locked with `SKIP LOCKED` exactly as in a step of its
//!   own, so a partition held by another instance is skipped, not waited for.
//! * If any message is not acknowledged, the shared transaction is rolled back as a whole. The
//!   partition whose message failed replays its batch carefully (`transactional.rs`), reusing
//!   the result it got; every other partition runs a step of its own. Nothing the rolled-back
//!   handlers wrote remains, and each message is still committed exactly once.
//! * A partition whose last step read a full batch (a backlog) runs its next step alone: one
//!   commit per full batch is cheap, and the partitions' own transactions run in parallel.
//! * A failure after the handlers ran (the cursor update, the commit) also sends every
//!   partition to a step of its own, so one partition's handler whose writes cannot commit does
//!   not hold back the others.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use sea_orm::{DatabaseTransaction, QueryResult, Value};
use tokio::task::JoinSet;

use super::coalesce::{Coalescer, Shared};
use super::transactional::{FirstTry, Locked, TxnHandler, first_try};
use super::{Step, at, get_opt_time, messages_in};
use crate::backend::{Dialect, execute, placeholders, query_all};
use crate::error::Result;
use crate::handler::HandlerResult;
use crate::outbox::Inner;
use crate::queues::QueueInfo;

/// Most partitions in one shared transaction (their handlers run one after another).
const MAX_SHARED_PARTITIONS: usize = 64;

/// One partition's request to take part in the next shared transaction.
pub(crate) struct TxnReq {
    pub(crate) partition_id: i64,
    pub(crate) index: u32,
    pub(crate) queue: Arc<QueueInfo>,
    pub(crate) handler: TxnHandler,
}

/// How a partition's part in a shared transaction ended.
pub(crate) enum TxnRes {
    /// Finished (committed, nothing to do, backing off, or held by another instance).
    Done(Step),
    /// One of this partition's messages was not acknowledged and everything was rolled back:
    /// replay the batch carefully, reusing this seq's result if it is still the one due.
    Replay(Option<(i64, HandlerResult)>),
    /// Rolled back because of another partition (or a failure after the handlers ran): run a
    /// step of its own.
    Solo,
}

/// The driver every transactional partition of this instance hands its fast try to.
pub(crate) type SharedTxns = Coalescer<TxnReq, Shared<TxnRes>>;

/// Spawns the driver.
pub(crate) fn spawn(inner: &Arc<Inner>, tasks: &mut JoinSet<()>) -> SharedTxns {
    let inner = inner.clone();
    Coalescer::spawn(tasks, MAX_SHARED_PARTITIONS, move |reqs| {
        let inner = inner.clone();
        async move { run(&inner, reqs).await }
    })
}

async fn run(inner: &Inner, reqs: Vec<TxnReq>) -> Vec<Shared<TxnRes>> {
    match shared_step(inner, &reqs).await {
        Ok(out) => out.into_iter().map(Ok).collect(),
        Err(e) => {
            let e = e.to_string();
            reqs.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

/// PostgreSQL/SQLite: lock the cursor rows that are free and read each one's batch, in one
/// statement (see `transactional.rs` for the one-partition form). Placeholders: the partition
/// ids, then a `WHEN id THEN batch size` pair per partition.
fn lock_and_fetch_sql(d: Dialect, n: usize) -> String {
    format!(
        "WITH pr AS (SELECT partition_id, processed_seq, attempts, retry_at \
         FROM modkit_outbox_processor WHERE partition_id IN ({ids}){lock}) \
         SELECT pr.partition_id AS pid, pr.processed_seq, pr.attempts, pr.retry_at, o.seq, \
         b.id, b.payload, b.payload_type, b.headers, b.created_at FROM pr \
         LEFT JOIN modkit_outbox_outgoing o ON o.partition_id = pr.partition_id \
           AND o.seq > pr.processed_seq \
           AND o.seq <= pr.processed_seq + CASE pr.partition_id {case} END \
         LEFT JOIN modkit_outbox_body b ON b.id = o.body_id ORDER BY pr.partition_id, o.seq",
        ids = placeholders(n),
        case = vec!["WHEN ? THEN ?"; n].join(" "),
        lock = d.lock_skip_locked()
    )
}

/// The rows of each partition that was locked, by partition id.
async fn lock_and_fetch(
    txn: &DatabaseTransaction,
    d: Dialect,
    reqs: &[TxnReq],
) -> Result<HashMap<i64, Vec<QueryResult>>> {
    let ids = || reqs.iter().map(|r| Value::from(r.partition_id));
    let mut rows_of: HashMap<i64, Vec<QueryResult>> = HashMap::new();
    if d != Dialect::MySql {
        let mut args: Vec<Value> = ids().collect();
        for r in reqs {
            args.push(Value::from(r.partition_id));
            args.push(Value::from(r.queue.batch_size as i64));
        }
        for row in query_all(txn, d, &lock_and_fetch_sql(d, reqs.len()), args).await? {
            rows_of
                .entry(row.try_get("", "pid")?)
                .or_default()
                .push(row);
        }
        return Ok(rows_of);
    }
    // MySQL: the lock alone (MariaDB cannot confine a join's lock to one table), then the
    // batches of the partitions it got, each a range of the `(partition_id, seq)` key.
    let sql = format!(
        "SELECT partition_id AS pid, processed_seq, attempts, retry_at \
         FROM modkit_outbox_processor WHERE partition_id IN ({}){}",
        placeholders(reqs.len()),
        d.lock_skip_locked()
    );
    let locked = query_all(txn, d, &sql, ids().collect()).await?;
    let batch_of: HashMap<i64, i64> = reqs
        .iter()
        .map(|r| (r.partition_id, r.queue.batch_size as i64))
        .collect();
    let mut ranges = Vec::with_capacity(locked.len());
    let mut args = Vec::with_capacity(3 * locked.len());
    for row in &locked {
        let pid: i64 = row.try_get("", "pid")?;
        let processed: i64 = row.try_get("", "processed_seq")?;
        if get_opt_time(row, "retry_at")?.is_none_or(|t| t <= Utc::now()) {
            ranges.push("(o.partition_id = ? AND o.seq > ? AND o.seq <= ?)");
            args.push(Value::from(pid));
            args.push(Value::from(processed));
            args.push(Value::from(
                processed.saturating_add(batch_of.get(&pid).copied().unwrap_or(1)),
            ));
        }
    }
    let mut batches: HashMap<i64, Vec<QueryResult>> = HashMap::new();
    if !ranges.is_empty() {
        let sql = format!(
            "SELECT o.partition_id AS pid, o.seq, b.id, b.payload, b.payload_type, b.headers, \
             b.created_at FROM modkit_outbox_outgoing o \
             JOIN modkit_outbox_body b ON b.id = o.body_id \
             WHERE {} ORDER BY o.partition_id, o.seq",
            ranges.join(" OR ")
        );
        for row in query_all(txn, d, &sql, args).await? {
            batches
                .entry(row.try_get("", "pid")?)
                .or_default()
                .push(row);
        }
    }
    for row in locked {
        let pid: i64 = row.try_get("", "pid")?;
        let mut rows = vec![row];
        rows.extend(batches.remove(&pid).unwrap_or_default());
        rows_of.insert(pid, rows);
    }
    Ok(rows_of)
}

/// The cursor state (first row) and the messages of one partition's rows.
fn parse(rows: &[QueryResult], req: &TxnReq) -> Result<Locked> {
    let Some(r) = rows.first() else {
        return Err(crate::error::OutboxError::Db(
            sea_orm::DbErr::RecordNotFound(format!(
                "processor row of partition {}",
                req.partition_id
            )),
        ));
    };
    let processed: i64 = r.try_get("", "processed_seq")?;
    let attempts: i64 = r.try_get("", "attempts")?;
    Ok(Locked {
        processed,
        attempts,
        retry_at: get_opt_time(r, "retry_at")?,
        msgs: messages_in(rows, &req.queue, req.index, processed, attempts)?,
    })
}

/// Moves every cursor of a fully acknowledged shared step: one guarded `UPDATE`. Returns the
/// rows it changed (all of them: the rows are locked by this transaction).
async fn write_cursors(
    txn: &DatabaseTransaction,
    d: Dialect,
    moves: &[(i64, i64, i64)],
) -> Result<u64> {
    let case = vec!["WHEN ? THEN ?"; moves.len()].join(" ");
    let sql = format!(
        "UPDATE modkit_outbox_processor SET processed_seq = CASE partition_id {case} END, \
         attempts = 0, last_error = NULL, retry_at = NULL \
         WHERE partition_id IN ({}) AND processed_seq = CASE partition_id {case} END",
        placeholders(moves.len()),
    );
    let mut args = Vec::with_capacity(5 * moves.len());
    for (pid, _, to) in moves {
        args.push(Value::from(*pid));
        args.push(Value::from(*to));
    }
    args.extend(moves.iter().map(|(pid, _, _)| Value::from(*pid)));
    for (pid, from, _) in moves {
        args.push(Value::from(*pid));
        args.push(Value::from(*from));
    }
    Ok(execute(txn, d, &sql, args).await?)
}

/// One shared transaction. `Err` only before any handler ran (nothing was delivered).
async fn shared_step(inner: &Inner, reqs: &[TxnReq]) -> Result<Vec<TxnRes>> {
    let db = &inner.db;
    let d = db.dialect;
    let w = db.begin_write().await?;
    let mut rows_of = match lock_and_fetch(&w.txn, d, reqs).await {
        Ok(r) => r,
        Err(e) => {
            drop(w);
            return Err(e);
        }
    };
    let now = Utc::now();
    let mut out: Vec<Option<TxnRes>> = reqs.iter().map(|_| None).collect();
    // The partitions with messages to deliver: request index and what was read.
    let mut work: Vec<(usize, Locked)> = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.iter().enumerate() {
        let Some(rows) = rows_of.remove(&req.partition_id) else {
            // Another instance is processing this partition right now.
            out[i] = Some(TxnRes::Done(at(
                now + chrono::Duration::milliseconds(200),
                true,
            )));
            continue;
        };
        let locked = match parse(&rows, req) {
            Ok(l) => l,
            Err(e) => {
                drop(w);
                return Err(e);
            }
        };
        if let Some(t) = locked.retry_at
            && t > now
        {
            out[i] = Some(TxnRes::Done(at(t, false)));
        } else if locked.msgs.is_empty() {
            out[i] = Some(TxnRes::Done(Step::Idle));
        } else {
            work.push((i, locked));
        }
    }
    if work.is_empty() {
        w.rollback().await?;
        return Ok(out.into_iter().map(|o| o.unwrap_or(TxnRes::Solo)).collect());
    }
    let mut failed = None;
    for (i, l) in &work {
        let req = &reqs[*i];
        if let FirstTry::Replay { known } =
            first_try(&w.txn, &req.handler, &l.msgs, &req.queue).await
        {
            failed = Some((*i, known));
            break;
        }
    }
    let committed = match failed {
        Some((fi, known)) => {
            // Everything the handlers wrote goes; the failing partition replays carefully.
            if let Err(e) = w.rollback().await {
                tracing::warn!(error = %e, "shared transactional step: rollback failed");
            }
            out[fi] = Some(TxnRes::Replay(known));
            false
        }
        None => {
            let moves: Vec<(i64, i64, i64)> = work
                .iter()
                .map(|(i, l)| {
                    let to = l.msgs.last().map_or(l.processed, |m| m.seq);
                    (reqs[*i].partition_id, l.processed, to)
                })
                .collect();
            match write_cursors(&w.txn, d, &moves).await {
                Ok(n) if n == moves.len() as u64 => match w.commit().await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e,
                            "shared transactional step: commit failed; partitions retry alone");
                        false
                    }
                },
                other => {
                    tracing::warn!(result = ?other.map_err(|e| e.to_string()), expected = moves.len(),
                        "shared transactional step: cursor update failed; partitions retry alone");
                    drop(w);
                    false
                }
            }
        }
    };
    for (i, l) in &work {
        if out[*i].is_some() {
            continue;
        }
        out[*i] = Some(if committed {
            let req = &reqs[*i];
            tracing::debug!(queue = %req.queue.name, partition = req.index,
                processed_seq = l.msgs.last().map_or(l.processed, |m| m.seq),
                acked = l.msgs.len(), "batch done (shared transaction)");
            // Fewer than a full batch: the partition was drained when it was read.
            TxnRes::Done(if l.msgs.len() < req.queue.batch_size {
                Step::Idle
            } else {
                Step::More
            })
        } else {
            TxnRes::Solo
        });
    }
    if committed {
        inner.signals.wake_vacuum();
    }
    Ok(out.into_iter().map(|o| o.unwrap_or(TxnRes::Solo)).collect())
}
