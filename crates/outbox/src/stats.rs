//! Statistics: what every partition and the dead letters look like right now. Three cheap
//! queries (one row per partition, one per partition with unsequenced rows, one per dead-letter
//! status), so polling every few seconds is fine.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, Value};
use serde::Serialize;

use crate::backend::{Db, Dialect, get_opt_time};
use crate::dead_letters::{DeadLetters, StatusCount};
use crate::error::Result;

/// One partition's pipeline state.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PartitionStats {
    /// Queue name.
    pub queue: String,
    /// Partition index.
    pub partition: u32,
    /// Enqueued (committed) but not yet sequenced.
    pub unsequenced: u64,
    /// Sequenced but not yet processed: `sequence - processed_seq`.
    pub unprocessed: u64,
    /// Highest sequence number given out.
    pub sequence: i64,
    /// Last processed sequence number.
    pub processed_seq: i64,
    /// Age in milliseconds of the oldest message not yet processed (sequenced or not).
    pub oldest_pending_age_ms: Option<i64>,
    /// Instance holding the lease (leased mode), if any.
    pub lease_holder: Option<String>,
    /// When that lease ends.
    pub lease_until: Option<DateTime<Utc>>,
    /// Failed attempts of the head message.
    pub attempts: i64,
    /// Last error of the head message.
    pub last_error: Option<String>,
    /// When the head message is retried.
    pub retry_at: Option<DateTime<Utc>>,
}

/// The whole outbox at one moment.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxStats {
    /// When the figures were read.
    pub collected_at: DateTime<Utc>,
    /// Every partition of every queue, by queue then partition.
    pub partitions: Vec<PartitionStats>,
    /// Dead letters per status.
    pub dead_letters: Vec<StatusCount>,
}

impl OutboxStats {
    /// Sum of `unsequenced + unprocessed` over all partitions.
    pub fn backlog(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.unsequenced + p.unprocessed)
            .sum()
    }
}

/// Reads the statistics on any connection to an outbox database.
pub async fn collect_stats(conn: &DatabaseConnection) -> Result<OutboxStats> {
    let d = Dialect::of(conn)?;
    let db = Db::new(conn.clone(), d);
    let now = Utc::now();
    let head = db
        .query_all(
            &format!(
                "SELECT p.id, p.queue, p.{part} AS part, p.{seq} AS seq, pr.processed_seq, \
                 pr.attempts, pr.last_error, pr.retry_at, pr.locked_by, pr.locked_until, \
                 (SELECT b.created_at FROM modkit_outbox_outgoing o \
                    JOIN modkit_outbox_body b ON b.id = o.body_id \
                    WHERE o.partition_id = p.id AND o.seq = pr.processed_seq + 1) AS head_created \
                 FROM modkit_outbox_partitions p \
                 JOIN modkit_outbox_processor pr ON pr.partition_id = p.id \
                 ORDER BY p.queue, p.{part}",
                part = d.q("partition"),
                seq = d.q("sequence")
            ),
            vec![],
        )
        .await?;
    let incoming = db
        .query_all(
            "SELECT i.partition_id, COUNT(*) AS n, MIN(b.created_at) AS oldest \
             FROM modkit_outbox_incoming i JOIN modkit_outbox_body b ON b.id = i.body_id \
             GROUP BY i.partition_id",
            Vec::<Value>::new(),
        )
        .await?;
    let mut unseq: HashMap<i64, (u64, Option<DateTime<Utc>>)> = HashMap::new();
    for r in &incoming {
        let n: i64 = r.try_get("", "n")?;
        unseq.insert(
            r.try_get("", "partition_id")?,
            (n as u64, get_opt_time(r, "oldest")?),
        );
    }
    let mut partitions = Vec::with_capacity(head.len());
    for r in &head {
        let id: i64 = r.try_get("", "id")?;
        let seq: i64 = r.try_get("", "seq")?;
        let processed: i64 = r.try_get("", "processed_seq")?;
        let (unsequenced, oldest_in) = unseq.get(&id).copied().unwrap_or((0, None));
        let oldest = match (get_opt_time(r, "head_created")?, oldest_in) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        partitions.push(PartitionStats {
            queue: r.try_get("", "queue")?,
            partition: r.try_get::<i32>("", "part")? as u32,
            unsequenced,
            unprocessed: (seq - processed).max(0) as u64,
            sequence: seq,
            processed_seq: processed,
            oldest_pending_age_ms: oldest.map(|t| (now - t).num_milliseconds().max(0)),
            lease_holder: r.try_get("", "locked_by")?,
            lease_until: get_opt_time(r, "locked_until")?,
            attempts: r.try_get("", "attempts")?,
            last_error: r.try_get("", "last_error")?,
            retry_at: get_opt_time(r, "retry_at")?,
        });
    }
    let dead_letters = DeadLetters::from_db(db).count_by_status().await?;
    Ok(OutboxStats {
        collected_at: now,
        partitions,
        dead_letters,
    })
}
