//! Starting the pipeline's tasks, and the reconciler: the bounded fallback poll that wakes
//! processors a wake-up missed (rows sequenced by another MySQL/SQLite instance, a `NOTIFY`
//! lost while the listener reconnected). Unannounced incoming rows are the sequencer's own
//! look's job (`FOREIGN_POLL_MIN`).

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Dialect, MAX_IN_LIST, placeholders};
use crate::handler::QueueHandler;
use crate::outbox::{Inner, Outbox};
use crate::processor::Partition;
use crate::processor::coalesce::LeasedIo;

/// Every task of the pipeline runs in a `debug` span named after it (`outbox.sequencer`,
/// `outbox.vacuum`, `outbox.reconcile`, `outbox.listen`, the coalescing drivers'
/// `outbox.leased.read` / `.ack` / `.acquire` and `outbox.shared_txn`; processors open
/// `outbox.processor` per step), with the instance id, so a subscriber can tell which part of
/// the engine a statement or a log line came from (the bench's `--statement-profile` does).
/// They are roots (`parent: None`): a task outlives whatever span the caller of `start()` was
/// in, and must not keep that span open or put the engine's work into its trace.
pub(crate) fn spawn_all(outbox: &Outbox, cancel: &CancellationToken, tasks: &mut JoinSet<()>) {
    let inner = outbox.inner.clone();
    let instance = inner.instance_id.clone();
    let alive = crate::signals::SequencerAlive::new(inner.signals.clone());
    tasks.spawn(
        crate::sequencer::run(inner.clone(), cancel.child_token(), alive)
            .instrument(tracing::debug_span!(parent: None, "outbox.sequencer", %instance)),
    );
    tasks.spawn(
        crate::vacuum::run(inner.clone(), cancel.child_token())
            .instrument(tracing::debug_span!(parent: None, "outbox.vacuum", %instance)),
    );
    tasks.spawn(
        reconcile(inner.clone(), cancel.child_token())
            .instrument(tracing::debug_span!(parent: None, "outbox.reconcile", %instance)),
    );
    if inner.db.dialect == Dialect::Postgres {
        tasks.spawn(
            crate::backend::postgres::listen(
                inner.db.conn.clone(),
                inner.signals.clone(),
                inner.instance_id.clone(),
                cancel.child_token(),
            )
            .instrument(tracing::debug_span!(parent: None, "outbox.listen", %instance)),
        );
    }
    let any_leased = inner
        .queues
        .values()
        .any(|q| matches!(q.handler, Some(QueueHandler::Leased(_))));
    let any_transactional = inner
        .queues
        .values()
        .any(|q| matches!(q.handler, Some(QueueHandler::Transactional(_))));
    // The drivers end once every processor holding them has ended.
    let io = any_leased.then(|| LeasedIo::spawn(&inner, tasks));
    let shared = (any_transactional && !inner.config.shared_txn_max_handler_time.is_zero())
        .then(|| crate::processor::shared_txn::spawn(&inner, tasks));
    for q in inner.queues.values() {
        if q.handler.is_none() {
            continue;
        }
        let leased = matches!(q.handler, Some(QueueHandler::Leased(_)));
        for index in 0..q.partitions {
            let (io, shared) = if leased {
                (io.clone(), None)
            } else {
                (None, shared.clone())
            };
            let p = Partition::new(inner.clone(), q.clone(), index, io, shared);
            tasks.spawn(p.run(cancel.child_token()));
        }
    }
    // Whatever was left from before this start gets looked at at once.
    inner.signals.incoming_committed();
}

/// Every `poll_interval` (or on request, then also waking the sequencer): wake the processors
/// of this instance's partitions that have sequenced but unprocessed rows.
async fn reconcile(inner: Arc<Inner>, cancel: CancellationToken) {
    let ids = crate::queues::processed_partition_ids(&inner.queues);
    let d = inner.db.dialect;
    // Bounded `IN` lists (bind-parameter limits).
    let chunks: Vec<(String, Vec<i64>)> = ids
        .chunks(MAX_IN_LIST)
        .map(|c| {
            (
                format!(
                    "SELECT p.id FROM modkit_outbox_partitions p \
                     JOIN modkit_outbox_processor pr ON pr.partition_id = p.id \
                     WHERE p.{seq} > pr.processed_seq AND p.id IN ({})",
                    placeholders(c.len()),
                    seq = d.q("sequence")
                ),
                c.to_vec(),
            )
        })
        .collect();
    loop {
        // The sequencer looks for unannounced incoming rows on its own clock (at least every
        // `poll_interval`, sooner while rows keep arriving from elsewhere: see
        // `FOREIGN_POLL_MIN`); an explicit request wakes it too.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(inner.config.poll_interval) => {}
            _ = inner.signals.reconcile_wait() => inner.signals.incoming_committed(),
        }
        for (sql, ids) in &chunks {
            match inner
                .db
                .query_all(sql, ids.iter().map(|i| sea_orm::Value::from(*i)).collect())
                .await
            {
                Ok(rows) => {
                    for r in rows {
                        if let Ok(id) = r.try_get::<i64>("", "id") {
                            inner.signals.wake_processor(id);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reconcile query failed"),
            }
        }
    }
}
