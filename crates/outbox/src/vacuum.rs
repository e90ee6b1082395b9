//! Vacuum: deletes processed `outgoing` rows and their bodies in bounded chunks, and collects
//! orphaned bodies.
//!
//! `vacuum_counter.counter` is the partition's vacuum watermark: every outgoing row with
//! `seq <= counter` is gone. A partition needs work when `processor.processed_seq > counter`, so
//! finding work is one indexed join and idle partitions cost nothing.
//!
//! Each chunk is one transaction over up to 64 partitions: lock their `vacuum_counter` rows
//! (`SKIP LOCKED`, so two instances never vacuum one partition at once), delete up to
//! `vacuum_chunk` processed rows in all (oldest first per partition: seqs are gapless, so each
//! partition's share is a `(partition_id, seq)` range known without reading it), delete their
//! bodies by primary key (never a
//! `DELETE … IN (SELECT … same table)`, which MySQL rejects), advance the watermarks. A run
//! costs the same handful of statements for one partition or sixty-four. Processors wake the
//! vacuum after every ack (at most every 200 ms), so tables stay small under sustained load.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DatabaseTransaction, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Dialect, MAX_IN_LIST, execute, postgres, query_all, update_per_key};
use crate::error::Result;
use crate::outbox::Inner;

/// Shortest pause between two vacuum runs triggered by acks (batches the work).
const MIN_PAUSE: Duration = Duration::from_millis(200);
/// Partitions one vacuum transaction works on (bounds every statement's bind parameters).
const PARTITIONS_PER_CHUNK: usize = 64;

/// Vacuums every partition that has processed rows left. Returns the rows deleted.
pub(crate) async fn run_once(inner: &Inner) -> Result<u64> {
    let db = &inner.db;
    let rows = db
        .query_all(
            "SELECT pr.partition_id, pr.processed_seq, vc.counter \
             FROM modkit_outbox_processor pr \
             JOIN modkit_outbox_vacuum_counter vc ON vc.partition_id = pr.partition_id \
             WHERE pr.processed_seq > vc.counter ORDER BY pr.partition_id",
            vec![],
        )
        .await?;
    let work: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get("", "partition_id")?,
                r.try_get("", "processed_seq")?,
            ))
        })
        .collect::<std::result::Result<_, sea_orm::DbErr>>()?;
    let mut total = 0;
    for group in work.chunks(PARTITIONS_PER_CHUNK) {
        let mut pending = group.to_vec();
        while !pending.is_empty() {
            let (n, unfinished) = vacuum_chunk(inner, &pending).await?;
            total += n;
            pending = unfinished;
        }
    }
    Ok(total)
}

/// One transaction over several partitions (`(partition id, processed_seq)`): at most
/// `vacuum_chunk` outgoing rows in all. Returns the outgoing rows deleted and the partitions
/// that still have processed rows left after it. Partitions locked by another instance's
/// vacuum are skipped (that vacuum does them).
async fn vacuum_chunk(inner: &Inner, parts: &[(i64, i64)]) -> Result<(u64, Vec<(i64, i64)>)> {
    let db = &inner.db;
    let d = db.dialect;
    let w = db.begin_bookkeeping().await?;
    let t = &w.txn;
    let lock = format!(
        "SELECT partition_id, counter FROM modkit_outbox_vacuum_counter \
         WHERE {} ORDER BY partition_id{}",
        d.in_list("partition_id", parts.len()),
        d.lock_skip_locked()
    );
    let ids: Vec<i64> = parts.iter().map(|(p, _)| *p).collect();
    let locked: HashMap<i64, i64> = query_all(t, d, &lock, d.list_args(&ids))
        .await?
        .iter()
        .map(|r| Ok((r.try_get("", "partition_id")?, r.try_get("", "counter")?)))
        .collect::<std::result::Result<_, sea_orm::DbErr>>()?;
    // (partition, counter, processed) of the partitions this transaction works on.
    let todo: Vec<(i64, i64, i64)> = parts
        .iter()
        .filter_map(|(p, processed)| {
            locked
                .get(p)
                .filter(|counter| **counter < *processed)
                .map(|counter| (*p, *counter, *processed))
        })
        .collect();
    if todo.is_empty() {
        w.rollback().await?;
        return Ok((0, Vec::new()));
    }
    // Seqs are gapless, so a partition's oldest `share` processed rows are exactly the window
    // `(counter, min(processed, counter + share)]`: no read is needed to find them.
    let share = inner.config.vacuum_chunk.div_ceil(todo.len()).max(1) as i64;
    let mut marks = Vec::with_capacity(todo.len());
    let mut unfinished = Vec::new();
    for (p, counter, processed) in &todo {
        let high = (*processed).min(counter.saturating_add(share));
        if high < *processed {
            unfinished.push((*p, *processed));
        }
        marks.push((*p, *counter, high));
    }
    let (deleted, bodies) = delete_windows(t, d, &marks).await?;
    for chunk in bodies.chunks(MAX_IN_LIST) {
        let sql = d.delete_ids("modkit_outbox_body", chunk.len(), "");
        execute(t, d, &sql, d.list_args(chunk)).await?;
    }
    let watermarks: Vec<(i64, i64)> = marks.iter().map(|(p, _, high)| (*p, *high)).collect();
    let (sql, args) = update_per_key(
        d,
        "modkit_outbox_vacuum_counter",
        "partition_id",
        "counter",
        &watermarks,
    );
    execute(t, d, &sql, args).await?;
    w.commit().await?;
    tracing::debug!(partitions = marks.len(), deleted, "vacuumed");
    Ok((deleted, unfinished))
}

/// Deletes the windows `(partition, after, up to)` of processed `outgoing` rows; returns the
/// rows deleted and their bodies. PostgreSQL: one `DELETE … RETURNING`, the windows bound as
/// three arrays (one statement text for any number of partitions, see [`Dialect::in_list`]).
/// SQLite: one `DELETE … RETURNING` of `OR`ed key ranges (statements are prepared in-process).
/// MySQL, which has no `DELETE … RETURNING`: the bodies are read first, then the same ranges
/// deleted, both through the `(partition_id, seq)` primary key (`FORCE INDEX`: never a scan
/// that would lock rows a producer holds).
async fn delete_windows(
    t: &DatabaseTransaction,
    d: Dialect,
    marks: &[(i64, i64, i64)],
) -> Result<(u64, Vec<i64>)> {
    let body_ids = |rows: Vec<sea_orm::QueryResult>| {
        rows.iter()
            .map(|r| r.try_get::<i64>("", "body_id"))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    if d == Dialect::Postgres {
        let column =
            |f: fn(&(i64, i64, i64)) -> i64| Value::from(marks.iter().map(f).collect::<Vec<i64>>());
        let args = vec![column(|m| m.0), column(|m| m.1), column(|m| m.2)];
        let bodies = body_ids(query_all(t, d, postgres::VACUUM_WINDOWS, args).await?)?;
        return Ok((bodies.len() as u64, bodies));
    }
    let ranges = vec!["(partition_id = ? AND seq > ? AND seq <= ?)"; marks.len()].join(" OR ");
    let mut args = Vec::with_capacity(3 * marks.len());
    for (p, after, upto) in marks {
        args.extend([Value::from(*p), Value::from(*after), Value::from(*upto)]);
    }
    if d == Dialect::Sqlite {
        let sql = format!("DELETE FROM modkit_outbox_outgoing WHERE {ranges} RETURNING body_id");
        let bodies = body_ids(query_all(t, d, &sql, args).await?)?;
        return Ok((bodies.len() as u64, bodies));
    }
    const KEY: &str = "PRIMARY";
    let read =
        format!("SELECT body_id FROM modkit_outbox_outgoing FORCE INDEX ({KEY}) WHERE {ranges}");
    let bodies = body_ids(query_all(t, d, &read, args.clone()).await?)?;
    let deleted = execute(
        t,
        d,
        &d.delete_using("modkit_outbox_outgoing", KEY, &ranges),
        args,
    )
    .await?;
    Ok((deleted, bodies))
}

/// Deletes bodies that no incoming or outgoing row references and that are older than
/// `orphan_min_age` (a body is written in the same transaction as its incoming row, so orphans
/// only come from manual deletes or foreign tooling). Returns the bodies deleted.
///
/// `incoming` and `outgoing` have no `body_id` index (it would cost every message two index
/// entries for a sweep that runs every ten minutes), so a chunk reads each of them once, whole:
/// PostgreSQL plans `NOT EXISTS` as a hash anti-join; SQLite builds a transient index for an
/// uncorrelated `NOT IN` (`body_id` is `NOT NULL`, so it means `NOT EXISTS`); MySQL gets
/// `DISTINCT` derived tables, which MySQL 8 and MariaDB always materialize with a key on
/// `body_id` (their `NOT IN` may be run as a scan of the whole table per body when the
/// statistics say the tables are small).
pub(crate) async fn sweep_orphans(inner: &Inner) -> Result<u64> {
    let db = &inner.db;
    let d = db.dialect;
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(inner.config.orphan_min_age).unwrap_or_default();
    let find = match d {
        Dialect::Postgres => {
            "SELECT b.id FROM modkit_outbox_body b WHERE b.created_at < ? \
             AND NOT EXISTS (SELECT 1 FROM modkit_outbox_incoming i WHERE i.body_id = b.id) \
             AND NOT EXISTS (SELECT 1 FROM modkit_outbox_outgoing o WHERE o.body_id = b.id) \
             ORDER BY b.id LIMIT ?"
        }
        Dialect::Sqlite => {
            "SELECT b.id FROM modkit_outbox_body b WHERE b.created_at < ? \
             AND b.id NOT IN (SELECT body_id FROM modkit_outbox_incoming) \
             AND b.id NOT IN (SELECT body_id FROM modkit_outbox_outgoing) \
             ORDER BY b.id LIMIT ?"
        }
        Dialect::MySql => {
            "SELECT b.id FROM modkit_outbox_body b \
             LEFT JOIN (SELECT DISTINCT body_id FROM modkit_outbox_incoming) i ON i.body_id = b.id \
             LEFT JOIN (SELECT DISTINCT body_id FROM modkit_outbox_outgoing) o ON o.body_id = b.id \
             WHERE b.created_at < ? AND i.body_id IS NULL AND o.body_id IS NULL \
             ORDER BY b.id LIMIT ?"
        }
    };
    let mut total = 0;
    loop {
        let rows = db
            .query_all(
                find,
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
        let mut vals = d.list_args(&ids);
        vals.push(d.time(cutoff));
        let sql = d.delete_ids("modkit_outbox_body", ids.len(), "created_at < ?");
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
