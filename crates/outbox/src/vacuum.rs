//! Vacuum: deletes processed `outgoing` rows and their bodies in bounded chunks, and collects
//! orphaned bodies.
//!
//! `vacuum_counter.counter` is the partition's vacuum watermark: every outgoing row with
//! `seq <= counter` is gone. A partition needs work when `processor.processed_seq > counter`, so
//! finding work is one indexed join and idle partitions cost nothing.
//!
//! Each chunk is one transaction: lock the partition's `vacuum_counter` row (`SKIP LOCKED`, so
//! two instances never vacuum one partition at once), read the next `vacuum_chunk` processed
//! rows, delete them by `(partition_id, seq)` range, delete their bodies by primary key (never a
//! `DELETE … IN (SELECT … same table)`, which MySQL rejects), advance the watermark. Processors
//! wake the vacuum after every ack, so tables stay small under sustained load.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{MAX_IN_LIST, execute, placeholders, query_all};
use crate::error::Result;
use crate::outbox::Inner;

/// Shortest pause between two vacuum runs triggered by acks (batches the work).
const MIN_PAUSE: Duration = Duration::from_millis(200);

/// Vacuums every partition that has processed rows left. Returns the rows deleted.
pub(crate) async fn run_once(inner: &Inner) -> Result<u64> {
    let db = &inner.db;
    let rows = db
        .query_all(
            "SELECT pr.partition_id, pr.processed_seq, vc.counter \
             FROM modkit_outbox_processor pr \
             JOIN modkit_outbox_vacuum_counter vc ON vc.partition_id = pr.partition_id \
             WHERE pr.processed_seq > vc.counter",
            vec![],
        )
        .await?;
    let mut total = 0;
    for r in &rows {
        let pid: i64 = r.try_get("", "partition_id")?;
        let processed: i64 = r.try_get("", "processed_seq")?;
        loop {
            let n = vacuum_chunk(inner, pid, processed).await?;
            total += n;
            if n == 0 {
                break;
            }
        }
    }
    Ok(total)
}

/// One chunk of one partition. Returns the outgoing rows deleted (0: done or locked elsewhere).
async fn vacuum_chunk(inner: &Inner, pid: i64, processed: i64) -> Result<u64> {
    let db = &inner.db;
    let d = db.dialect;
    let w = db.begin_bookkeeping().await?;
    let t = &w.txn;
    let lock = format!(
        "SELECT counter FROM modkit_outbox_vacuum_counter WHERE partition_id = ?{}",
        d.lock_skip_locked()
    );
    let rows = query_all(t, d, &lock, vec![Value::from(pid)]).await?;
    let Some(counter) = rows
        .first()
        .map(|r| r.try_get::<i64>("", "counter"))
        .transpose()?
    else {
        w.rollback().await?;
        return Ok(0);
    };
    if counter >= processed {
        w.rollback().await?;
        return Ok(0);
    }
    let rows = query_all(
        t,
        d,
        "SELECT seq, body_id FROM modkit_outbox_outgoing \
         WHERE partition_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        vec![
            Value::from(pid),
            Value::from(counter),
            Value::from(processed),
            Value::from(inner.config.vacuum_chunk as u64),
        ],
    )
    .await?;
    let mut bodies = Vec::with_capacity(rows.len());
    let mut high = counter;
    for r in &rows {
        high = high.max(r.try_get::<i64>("", "seq")?);
        bodies.push(r.try_get::<i64>("", "body_id")?);
    }
    if rows.len() < inner.config.vacuum_chunk {
        // Everything up to the cursor is covered (rows may be missing if deleted by hand).
        high = processed;
    }
    let deleted = execute(
        t,
        d,
        &d.delete_using(
            "modkit_outbox_outgoing",
            "modkit_outbox_outgoing_partition_seq_uq",
            "partition_id = ? AND seq > ? AND seq <= ?",
        ),
        vec![Value::from(pid), Value::from(counter), Value::from(high)],
    )
    .await?;
    for chunk in bodies.chunks(MAX_IN_LIST) {
        let sql = d.delete_using(
            "modkit_outbox_body",
            "PRIMARY",
            &format!("id IN ({})", placeholders(chunk.len())),
        );
        execute(t, d, &sql, chunk.iter().map(|b| Value::from(*b)).collect()).await?;
    }
    execute(
        t,
        d,
        "UPDATE modkit_outbox_vacuum_counter SET counter = ? WHERE partition_id = ?",
        vec![Value::from(high), Value::from(pid)],
    )
    .await?;
    w.commit().await?;
    tracing::debug!(partition_id = pid, deleted, watermark = high, "vacuumed");
    Ok(deleted.max(u64::from(high > counter)))
}

/// Deletes bodies that no incoming or outgoing row references and that are older than
/// `orphan_min_age` (a body is written in the same transaction as its incoming row, so orphans
/// only come from manual deletes or foreign tooling). Returns the bodies deleted.
pub(crate) async fn sweep_orphans(inner: &Inner) -> Result<u64> {
    let db = &inner.db;
    let d = db.dialect;
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(inner.config.orphan_min_age).unwrap_or_default();
    let mut total = 0;
    loop {
        let rows = db
            .query_all(
                "SELECT b.id FROM modkit_outbox_body b WHERE b.created_at < ? \
                 AND NOT EXISTS (SELECT 1 FROM modkit_outbox_incoming i WHERE i.body_id = b.id) \
                 AND NOT EXISTS (SELECT 1 FROM modkit_outbox_outgoing o WHERE o.body_id = b.id) \
                 ORDER BY b.id LIMIT ?",
                vec![
                    d.time(cutoff),
                    Value::from(inner.config.vacuum_chunk as u64),
                ],
            )
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get::<i64>("", "id"))
            .collect::<std::result::Result<_, _>>()?;
        // By primary key only: a body older than `orphan_min_age` with no reference cannot
        // gain one (a reference is only ever written with a new body, or copied from an
        // incoming row by the sequencer), so no re-check (and no locking read) is needed.
        let mut vals: Vec<Value> = ids.iter().map(|i| Value::from(*i)).collect();
        vals.push(d.time(cutoff));
        let sql = d.delete_using(
            "modkit_outbox_body",
            "PRIMARY",
            &format!("id IN ({}) AND created_at < ?", placeholders(ids.len())),
        );
        let n = db.exec_write(&sql, vals).await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}

/// The vacuum task: runs after acks (at most every [`MIN_PAUSE`]), at least every
/// `vacuum_interval`, and sweeps orphans every `orphan_sweep_interval`.
pub(crate) async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut next_sweep = Instant::now();
    loop {
        if Instant::now() >= next_sweep {
            match sweep_orphans(&inner).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(bodies = n, "collected orphaned bodies"),
                Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
            }
            next_sweep = Instant::now() + inner.config.orphan_sweep_interval;
        }
        if let Err(e) = run_once(&inner).await {
            tracing::warn!(error = %e, "vacuum failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = inner.signals.vacuum_wait() => {}
            _ = tokio::time::sleep(inner.config.vacuum_interval) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(MIN_PAUSE) => {}
        }
    }
}
