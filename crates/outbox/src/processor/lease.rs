//! Lease SQL of leased processing: one row per partition in `processor`, owned by `locked_by`
//! until `locked_until`. Every write is guarded by ownership, so an instance whose lease expired
//! and was taken over can change nothing.

use chrono::{DateTime, Utc};
use sea_orm::Value;

use crate::backend::Db;

/// Takes the lease when it is free, expired, or already ours. Returns whether we own it now.
pub(crate) async fn acquire(
    db: &Db,
    partition_id: i64,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let d = db.dialect;
    let n = db
        .exec_write(
            "UPDATE modkit_outbox_processor SET locked_by = ?, locked_until = ? \
             WHERE partition_id = ? AND (locked_by IS NULL OR locked_by = ? OR locked_until < ?)",
            vec![
                Value::from(owner),
                d.time(until),
                Value::from(partition_id),
                Value::from(owner),
                d.time(now),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Extends our lease. Returns false when it is no longer ours.
pub(crate) async fn renew(
    db: &Db,
    partition_id: i64,
    owner: &str,
    until: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let n = db
        .exec_write(
            "UPDATE modkit_outbox_processor SET locked_until = ? \
             WHERE partition_id = ? AND locked_by = ?",
            vec![
                db.dialect.time(until),
                Value::from(partition_id),
                Value::from(owner),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Gives the lease up so another instance can take the partition at once.
pub(crate) async fn release(db: &Db, partition_id: i64, owner: &str) -> Result<(), sea_orm::DbErr> {
    db.exec_write(
        "UPDATE modkit_outbox_processor SET locked_by = NULL, locked_until = NULL \
         WHERE partition_id = ? AND locked_by = ?",
        vec![Value::from(partition_id), Value::from(owner)],
    )
    .await
    .map(|_| ())
}

/// Guard of the leased ack: only the owner advances the cursor, and only from where it read.
pub(crate) const ACK_GUARD: &str = " AND locked_by = ?";
