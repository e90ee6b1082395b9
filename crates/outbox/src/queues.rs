//! Queue registration: the `partitions`, `processor` and `vacuum_counter` rows of every declared
//! queue, created idempotently at build time after every input was validated.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::Value;

use crate::backend::Db;
use crate::config::RetryPolicy;
use crate::error::{OutboxError, Result};
use crate::handler::QueueHandler;

/// A queue as declared on the builder.
pub(crate) struct QueueSpec {
    pub(crate) name: String,
    pub(crate) partitions: crate::Partitions,
    pub(crate) handler: Option<QueueHandler>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) batch_size: Option<usize>,
}

/// A registered queue.
pub(crate) struct QueueInfo {
    pub(crate) name: Arc<str>,
    pub(crate) partitions: u32,
    /// Row id of each partition, by partition index.
    pub(crate) partition_ids: Vec<i64>,
    pub(crate) handler: Option<QueueHandler>,
    pub(crate) retry: RetryPolicy,
    pub(crate) batch_size: usize,
    /// The handler's time per message, averaged over recent calls (nanoseconds; 0 before the
    /// first call). Transactional queues share transactions only while it stays small.
    handler_nanos: AtomicU64,
}

impl QueueInfo {
    /// Folds one handler call into the average (weight 1/8; the first call sets it).
    pub(crate) fn record_handler_time(&self, took: Duration, msgs: usize) {
        let per = u64::try_from(took.as_nanos() / msgs.max(1) as u128).unwrap_or(u64::MAX);
        let old = self.handler_nanos.load(Ordering::Relaxed);
        // Racing updates from two partitions may lose one sample: it is an estimate.
        let new = if old == 0 {
            per.max(1)
        } else {
            old - old / 8 + per / 8
        };
        self.handler_nanos.store(new, Ordering::Relaxed);
    }

    /// The handler's recent time per message.
    pub(crate) fn handler_time(&self) -> Duration {
        Duration::from_nanos(self.handler_nanos.load(Ordering::Relaxed))
    }
}

/// The partitions this instance processes (queues with a handler), in no particular order.
pub(crate) fn processed_partition_ids(queues: &HashMap<String, Arc<QueueInfo>>) -> Vec<i64> {
    queues
        .values()
        .filter(|q| q.handler.is_some())
        .flat_map(|q| q.partition_ids.iter().copied())
        .collect()
}

async fn existing_partitions(db: &Db, queue: &str) -> Result<Vec<(i64, i32)>> {
    let d = db.dialect;
    let sql = format!(
        "SELECT id, {p} AS part FROM modkit_outbox_partitions WHERE queue = ? ORDER BY {p}",
        p = d.q("partition")
    );
    let rows = db
        .query_all(&sql, vec![Value::from(queue)])
        .await
        .map_err(OutboxError::SchemaMissing)?;
    rows.iter()
        .map(|r| Ok((r.try_get::<i64>("", "id")?, r.try_get::<i32>("", "part")?)))
        .collect()
}

/// Creates (or finds) the rows of every queue. Fails with [`OutboxError::PartitionCountConflict`]
/// before writing anything if a queue exists with another partition count.
pub(crate) async fn register(
    db: &Db,
    specs: Vec<QueueSpec>,
    default_retry: RetryPolicy,
    default_batch: usize,
) -> Result<HashMap<String, Arc<QueueInfo>>> {
    // Read-only pass first: nothing is written when any queue conflicts.
    let mut plans = Vec::with_capacity(specs.len());
    for spec in specs {
        let n = spec.partitions.validate()?;
        let existing = existing_partitions(db, &spec.name).await?;
        if !existing.is_empty() && existing.len() != n as usize {
            return Err(OutboxError::PartitionCountConflict {
                queue: spec.name,
                existing: existing.len() as u32,
                requested: n,
            });
        }
        plans.push((spec, n, existing));
    }

    let d = db.dialect;
    let mut out = HashMap::new();
    for (spec, n, mut existing) in plans {
        if existing.is_empty() {
            let values = (0..n).map(|_| "(?, ?, 0)").collect::<Vec<_>>().join(", ");
            let sql = d.insert_ignore(
                &format!(
                    "modkit_outbox_partitions (queue, {}, {})",
                    d.q("partition"),
                    d.q("sequence")
                ),
                &values,
            );
            let mut args = Vec::with_capacity(2 * n as usize);
            for p in 0..n {
                args.push(Value::from(spec.name.as_str()));
                args.push(Value::from(p as i32));
            }
            crate::backend::execute(&db.conn, d, &sql, args).await?;
            existing = existing_partitions(db, &spec.name).await?;
            if existing.len() != n as usize {
                // Another instance registered the queue with another count at the same moment.
                return Err(OutboxError::PartitionCountConflict {
                    queue: spec.name,
                    existing: existing.len() as u32,
                    requested: n,
                });
            }
        }
        let ids: Vec<i64> = existing.iter().map(|(id, _)| *id).collect();
        for table in ["modkit_outbox_processor", "modkit_outbox_vacuum_counter"] {
            let sql = d.insert_ignore(
                &format!("{table} (partition_id)"),
                &vec!["(?)"; ids.len()].join(", "),
            );
            crate::backend::execute(
                &db.conn,
                d,
                &sql,
                ids.iter().map(|i| Value::from(*i)).collect(),
            )
            .await?;
        }
        let info = QueueInfo {
            name: Arc::from(spec.name.as_str()),
            partitions: n,
            partition_ids: ids,
            handler: spec.handler,
            retry: spec.retry.unwrap_or(default_retry),
            batch_size: spec.batch_size.unwrap_or(default_batch),
            handler_nanos: AtomicU64::new(0),
        };
        out.insert(spec.name, Arc::new(info));
    }
    Ok(out)
}
