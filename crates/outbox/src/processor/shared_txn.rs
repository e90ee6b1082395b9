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

use std::sync::Arc;

use chrono::Utc;
use sea_orm::DatabaseTransaction;
use tokio::task::JoinSet;

use super::coalesce::{Coalescer, Shared};
use super::transactional::{FirstTry, Locked, TxnHandler, first_try, lock_and_fetch};
use super::{CursorMove, Step, at, cursor_moves, retry_wait};
use crate::backend::{Dialect, execute};
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
    let span =
        tracing::debug_span!(parent: None, "outbox.shared_txn", instance = %inner.instance_id);
    let inner = inner.clone();
    Coalescer::spawn(tasks, MAX_SHARED_PARTITIONS, span, move |reqs| {
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

/// Moves every cursor of a fully acknowledged shared step: one guarded `UPDATE`. Returns the
/// rows it changed (all of them: the rows are locked by this transaction).
async fn write_cursors(txn: &DatabaseTransaction, d: Dialect, moves: &[CursorMove]) -> Result<u64> {
    let (sql, args) = cursor_moves(d, moves, None);
    Ok(execute(txn, d, &sql, args).await?)
}

/// One shared transaction. `Err` only before any handler ran (nothing was delivered).
async fn shared_step(inner: &Inner, reqs: &[TxnReq]) -> Result<Vec<TxnRes>> {
    let db = &inner.db;
    let d = db.dialect;
    let w = db.begin_write().await?;
    let parts: Vec<(i64, usize)> = reqs
        .iter()
        .map(|r| (r.partition_id, r.queue.batch_size))
        .collect();
    let mut rows_of = match lock_and_fetch(&w.txn, d, &parts).await {
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
        let locked = match Locked::from_rows(&rows, &req.queue, req.index) {
            Ok(l) => l,
            Err(e) => {
                drop(w);
                return Err(e);
            }
        };
        if let Some(wait) = retry_wait(locked.retry_at, !locked.msgs.is_empty(), now) {
            out[i] = Some(TxnRes::Done(wait));
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
            let moves: Vec<CursorMove> = work
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
