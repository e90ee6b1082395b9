//! Transactional processing: the handler runs inside the transaction that moves the partition
//! cursor, so its writes commit exactly when the messages are acknowledged.
//!
//! A step is one transaction and, on the path every healthy batch takes, four round trips:
//! `BEGIN`; lock the `processor` row (`SKIP LOCKED`) and read the batch, one statement on
//! PostgreSQL and SQLite (two on MySQL, whose locking clause cannot be confined to one table of
//! a join on MariaDB); the handler, with no savepoint around it; the cursor update; `COMMIT`.
//!
//! When a message is not acknowledged (retry, reject, error, panic), that transaction is rolled
//! back as a whole and the batch is replayed in a fresh one, each message in its own savepoint:
//! acknowledged messages keep their writes, the others leave none. A per-message handler is not
//! called again for the message that failed (its result is reused); the messages before it run
//! again, because their first writes went with the rollback. A batch handler's batch is replayed
//! one message at a time, as documented on [`TransactionalBatchHandler`].

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseTransaction, QueryResult, TransactionTrait, Value};

use super::shared_txn::{TxnReq, TxnRes};
use super::{
    Partition, Step, apply, at, catch_panic, catch_panic_batch, get_opt_time, insert_dead_letters,
    messages_in, next_after_ack, shutting_down, write_cursor,
};
use crate::backend::{Dialect, placeholders, query_all};
use crate::error::{OutboxError, Result};
use crate::handler::{
    HandlerError, HandlerResult, Outcome, TransactionalBatchHandler, TransactionalHandler,
    TxnBroken,
};
use crate::message::Message;
use crate::queues::QueueInfo;

/// A transactional queue's handler, as registered.
#[derive(Clone)]
pub(crate) enum TxnHandler {
    /// One message per call.
    PerMessage(Arc<dyn TransactionalHandler>),
    /// Consecutive messages per call.
    Batch(Arc<dyn TransactionalBatchHandler>),
}

/// How the first try of a batch ended.
pub(super) enum FirstTry {
    /// Every message acknowledged: commit.
    Acked(Vec<HandlerResult>),
    /// Something was not acknowledged: roll back and replay. `known` is the failing message's
    /// seq and result when it need not run again (per-message handlers).
    Replay { known: Option<(i64, HandlerResult)> },
}

/// How one transaction of a step ended.
enum Tried {
    /// Committed or rolled back for good: what the processor does next.
    Done(Step),
    /// The fast try saw a message that was not acknowledged and rolled back: replay carefully,
    /// reusing this seq's result if it is still the one due.
    Replay(Option<(i64, HandlerResult)>),
}

/// The locked cursor and the batch after it.
pub(super) struct Locked {
    pub(super) processed: i64,
    pub(super) attempts: i64,
    pub(super) retry_at: Option<DateTime<Utc>>,
    pub(super) msgs: Vec<Message>,
}

impl Locked {
    /// One partition's rows as [`lock_and_fetch`] returns them: the cursor in the first row,
    /// a message in every row with a seq.
    pub(super) fn from_rows(rows: &[QueryResult], queue: &QueueInfo, index: u32) -> Result<Self> {
        let Some(r) = rows.first() else {
            return Err(OutboxError::Db(sea_orm::DbErr::RecordNotFound(format!(
                "processor row of partition {index} of queue {}",
                queue.name
            ))));
        };
        let processed: i64 = r.try_get("", "processed_seq")?;
        let attempts: i64 = r.try_get("", "attempts")?;
        Ok(Self {
            processed,
            attempts,
            retry_at: get_opt_time(r, "retry_at")?,
            msgs: messages_in(rows, queue, index, processed, attempts)?,
        })
    }
}

/// PostgreSQL/SQLite: lock the cursor rows that are free (the CTE is never inlined, so the
/// lock stays on `processor` alone) and read each one's batch after it, in one statement.
/// Seqs are gapless, so a batch is the range `(processed_seq, processed_seq + batch_size]`; a
/// partition with nothing to do yields one row without a message. Placeholders: PostgreSQL,
/// two arrays (partition ids, batch sizes: one statement text for any number of partitions);
/// SQLite, the partition ids, then a `WHEN id THEN batch size` pair per partition.
fn lock_and_fetch_sql(d: Dialect, n: usize) -> String {
    let (pr, limit) = if d == Dialect::Postgres {
        (
            "SELECT p.partition_id, p.processed_seq, p.attempts, p.retry_at, w.lim \
             FROM modkit_outbox_processor p JOIN unnest(CAST(? AS BIGINT[]), \
             CAST(? AS BIGINT[])) AS w(pid, lim) ON p.partition_id = w.pid \
             FOR NO KEY UPDATE OF p SKIP LOCKED"
                .to_owned(),
            "pr.lim".to_owned(),
        )
    } else {
        (
            format!(
                "SELECT partition_id, processed_seq, attempts, retry_at \
                 FROM modkit_outbox_processor WHERE partition_id IN ({}){}",
                placeholders(n),
                d.lock_skip_locked()
            ),
            format!(
                "CASE pr.partition_id {} END",
                vec!["WHEN ? THEN ?"; n].join(" ")
            ),
        )
    };
    format!(
        "WITH pr AS ({pr}) \
         SELECT pr.partition_id AS pid, pr.processed_seq, pr.attempts, pr.retry_at, o.seq, \
         b.id, b.payload, b.payload_type, b.headers, b.created_at FROM pr \
         LEFT JOIN modkit_outbox_outgoing o ON o.partition_id = pr.partition_id \
           AND o.seq > pr.processed_seq AND o.seq <= pr.processed_seq + {limit} \
         LEFT JOIN modkit_outbox_body b ON b.id = o.body_id ORDER BY pr.partition_id, o.seq"
    )
}

/// Locks the `processor` rows of `parts` (partition id, batch size) that no other transaction
/// holds (`SKIP LOCKED`) and reads each locked partition's batch: its rows by partition id,
/// for [`Locked::from_rows`]. A partition missing from the answer is held elsewhere.
pub(super) async fn lock_and_fetch(
    txn: &DatabaseTransaction,
    d: Dialect,
    parts: &[(i64, usize)],
) -> Result<HashMap<i64, Vec<QueryResult>>> {
    let ids = || parts.iter().map(|(pid, _)| Value::from(*pid));
    let mut rows_of: HashMap<i64, Vec<QueryResult>> = HashMap::new();
    if d != Dialect::MySql {
        let args = if d == Dialect::Postgres {
            let pids: Vec<i64> = parts.iter().map(|(pid, _)| *pid).collect();
            let batches: Vec<i64> = parts.iter().map(|(_, b)| *b as i64).collect();
            vec![Value::from(pids), Value::from(batches)]
        } else {
            let mut args: Vec<Value> = ids().collect();
            for (pid, batch) in parts {
                args.push(Value::from(*pid));
                args.push(Value::from(*batch as i64));
            }
            args
        };
        for row in query_all(txn, d, &lock_and_fetch_sql(d, parts.len()), args).await? {
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
        placeholders(parts.len()),
        d.lock_skip_locked()
    );
    let locked = query_all(txn, d, &sql, ids().collect()).await?;
    let batch_of: HashMap<i64, usize> = parts.iter().copied().collect();
    let mut ranges = Vec::with_capacity(locked.len());
    let mut args = Vec::with_capacity(3 * locked.len());
    for row in &locked {
        let pid: i64 = row.try_get("", "pid")?;
        let processed: i64 = row.try_get("", "processed_seq")?;
        if get_opt_time(row, "retry_at")?.is_none_or(|t| t <= Utc::now()) {
            let batch = batch_of.get(&pid).copied().unwrap_or(1) as i64;
            ranges.push("(o.partition_id = ? AND o.seq > ? AND o.seq <= ?)");
            args.push(Value::from(pid));
            args.push(Value::from(processed));
            args.push(Value::from(processed.saturating_add(batch)));
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

impl Partition {
    /// One transactional step: the fast try (in a shared transaction when the partition may
    /// share, see `shared_txn.rs`), and the careful replay when it saw a message that was not
    /// acknowledged.
    pub(super) async fn step_transactional(&mut self, handler: TxnHandler) -> Result<Step> {
        let (step, failed) = self.txn_step(handler).await?;
        // Alone next time after a failure (it would only roll the shared transaction back
        // again) or a full batch (a backlog: the partitions' own transactions run in parallel,
        // and one commit per full batch is cheap).
        self.txn_alone = failed || matches!(step, Step::More);
        Ok(step)
    }

    /// The step, and whether a message failed in its fast try.
    async fn txn_step(&mut self, handler: TxnHandler) -> Result<(Step, bool)> {
        let limit = self.inner.config.shared_txn_max_handler_time;
        let shared = self
            .shared
            .as_ref()
            .filter(|_| !self.txn_alone && self.queue.handler_time() < limit);
        if let Some(shared) = shared {
            let req = TxnReq {
                partition_id: self.id,
                index: self.index,
                queue: self.queue.clone(),
                handler: handler.clone(),
            };
            let res = shared.call(req).await.ok_or_else(shutting_down)?;
            match res.map_err(|e| OutboxError::Db(sea_orm::DbErr::Custom(e)))? {
                TxnRes::Done(step) => return Ok((step, false)),
                TxnRes::Replay(known) => return Ok((self.replay(&handler, known).await?, true)),
                TxnRes::Solo => {}
            }
        }
        match self.txn_try(&handler, None).await? {
            Tried::Done(step) => Ok((step, false)),
            Tried::Replay(known) => Ok((self.replay(&handler, known).await?, true)),
        }
    }

    /// The careful replay after a fast try that saw a message fail.
    async fn replay(
        &mut self,
        handler: &TxnHandler,
        known: Option<(i64, HandlerResult)>,
    ) -> Result<Step> {
        match self.txn_try(handler, Some(known)).await? {
            Tried::Done(step) => Ok(step),
            // The careful try never asks for another replay.
            Tried::Replay(_) => Ok(Step::More),
        }
    }

    /// Locks the cursor and reads the batch; `None` when another instance holds the row.
    async fn lock_own(&self, txn: &DatabaseTransaction) -> Result<Option<Locked>> {
        let d = self.inner.db.dialect;
        let mut rows_of = lock_and_fetch(txn, d, &[(self.id, self.queue.batch_size)]).await?;
        rows_of
            .remove(&self.id)
            .map(|rows| Locked::from_rows(&rows, &self.queue, self.index))
            .transpose()
    }

    /// One transaction. `replay: None` is the fast try (no savepoints; it may end in
    /// [`Tried::Replay`]); `Some(known)` is the careful replay.
    async fn txn_try(
        &mut self,
        handler: &TxnHandler,
        replay: Option<Option<(i64, HandlerResult)>>,
    ) -> Result<Tried> {
        let db = self.inner.db.clone();
        let w = db.begin_write().await?;
        let Some(Locked {
            processed,
            attempts,
            retry_at,
            msgs,
        }) = self.lock_own(&w.txn).await?
        else {
            // Another instance is processing this partition right now.
            w.rollback().await?;
            return Ok(Tried::Done(at(
                Utc::now() + chrono::Duration::milliseconds(200),
                true,
            )));
        };
        if let Some(wait) = super::retry_wait(retry_at, !msgs.is_empty(), Utc::now()) {
            w.rollback().await?;
            return Ok(Tried::Done(wait));
        }
        if msgs.is_empty() {
            w.rollback().await?;
            return Ok(Tried::Done(Step::Idle));
        }
        let results = match replay {
            None => match first_try(&w.txn, handler, &msgs, &self.queue).await {
                FirstTry::Acked(r) => r,
                FirstTry::Replay { known } => {
                    // Everything the handler wrote goes; the replay starts clean.
                    w.rollback().await?;
                    return Ok(Tried::Replay(known));
                }
            },
            // The batch read now may differ from the first try's (another instance moved the
            // cursor in between): a known result applies only to the seq it was for.
            Some(known) => one_by_one(&w.txn, handler, &msgs, known).await,
        };
        if let Some(Err(e)) = results
            .iter()
            .find(|r| matches!(r, Err(e) if e.is::<TxnBroken>()))
        {
            // Dropping the transaction rolls everything back, acked messages included.
            let msg = e.to_string();
            drop(w);
            return Err(OutboxError::Db(sea_orm::DbErr::Custom(msg)));
        }
        let a = apply(&msgs, &results, processed, attempts, &self.queue);
        if a.processed == processed && a.retry_at.is_none() {
            // No result at all (a batch handler that answered nothing): try again shortly.
            w.rollback().await?;
            return Ok(Tried::Done(at(
                Utc::now() + chrono::Duration::milliseconds(100),
                false,
            )));
        }
        insert_dead_letters(&w.txn, self, &a.dead).await?;
        if !write_cursor(&w.txn, self, processed, &a, None, false).await? {
            w.rollback().await?;
            return Ok(Tried::Done(Step::More));
        }
        w.commit().await?;
        self.after_ack(&a, &msgs);
        // Fewer than a full batch: the partition was drained when it was read.
        let high = if msgs.len() < self.queue.batch_size {
            msgs.last().map_or(processed, |m| m.seq)
        } else {
            i64::MAX
        };
        Ok(Tried::Done(next_after_ack(&a, high)))
    }
}

/// The fast try: the handler runs directly in the step's transaction. Its time goes into the
/// queue's average (which decides whether the queue shares transactions).
pub(super) async fn first_try(
    txn: &DatabaseTransaction,
    handler: &TxnHandler,
    msgs: &[Message],
    queue: &QueueInfo,
) -> FirstTry {
    let started = std::time::Instant::now();
    let tried = first_try_untimed(txn, handler, msgs).await;
    queue.record_handler_time(started.elapsed(), msgs.len());
    tried
}

async fn first_try_untimed(
    txn: &DatabaseTransaction,
    handler: &TxnHandler,
    msgs: &[Message],
) -> FirstTry {
    match handler {
        TxnHandler::Batch(h) => {
            let results = catch_panic_batch(h.handle_batch(txn, msgs), msgs.len()).await;
            if results.len() == msgs.len() && results.iter().all(|r| matches!(r, Ok(Outcome::Ack)))
            {
                FirstTry::Acked(results)
            } else {
                FirstTry::Replay { known: None }
            }
        }
        TxnHandler::PerMessage(h) => {
            let mut results = Vec::with_capacity(msgs.len());
            for m in msgs {
                let r = catch_panic(h.handle(txn, m)).await;
                if !matches!(r, Ok(Outcome::Ack)) {
                    return FirstTry::Replay {
                        known: Some((m.seq, r)),
                    };
                }
                results.push(r);
            }
            FirstTry::Acked(results)
        }
    }
}

/// The careful replay: each message in its own savepoint, in order, stopping after the first
/// one that neither acks nor rejects. `known` is a result already obtained for one seq (that
/// message is not run again; its writes went with the first try's rollback).
async fn one_by_one(
    txn: &DatabaseTransaction,
    handler: &TxnHandler,
    msgs: &[Message],
    mut known: Option<(i64, HandlerResult)>,
) -> Vec<HandlerResult> {
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let r = match known.take_if(|(seq, _)| *seq == m.seq) {
            Some((_, r)) => r,
            None => match in_savepoint(txn, handler, m).await {
                Ok(r) => r,
                Err(broken) => {
                    out.push(Err(broken));
                    break;
                }
            },
        };
        let stop = !matches!(r, Ok(Outcome::Ack) | Ok(Outcome::Reject(_)));
        out.push(r);
        if stop {
            break;
        }
    }
    out
}

/// Runs one message inside a savepoint, kept when it acks and rolled back otherwise. `Err` is
/// a savepoint statement that failed: the transaction is unusable ([`TxnBroken`]).
async fn in_savepoint(
    txn: &DatabaseTransaction,
    handler: &TxnHandler,
    m: &Message,
) -> std::result::Result<HandlerResult, HandlerError> {
    let sp = txn
        .begin()
        .await
        .map_err(|e| Box::new(TxnBroken(e)) as HandlerError)?;
    let r = match handler {
        TxnHandler::PerMessage(h) => catch_panic(h.handle(&sp, m)).await,
        TxnHandler::Batch(h) => {
            let mut r = catch_panic_batch(h.handle_batch(&sp, std::slice::from_ref(m)), 1).await;
            if r.is_empty() {
                Err("batch handler returned no result".into())
            } else {
                r.swap_remove(0)
            }
        }
    };
    if matches!(r, Ok(Outcome::Ack)) {
        sp.commit()
            .await
            .map_err(|e| Box::new(TxnBroken(e)) as HandlerError)?;
    } else {
        sp.rollback()
            .await
            .map_err(|e| Box::new(TxnBroken(e)) as HandlerError)?;
    }
    Ok(r)
}
