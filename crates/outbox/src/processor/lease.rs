//! Lease SQL of leased processing: one row per partition in `processor`, owned by `locked_by`
//! until `locked_until`. Every write is guarded by ownership, so an instance whose lease expired
//! and was taken over can change nothing.

use chrono::{DateTime, Utc};
use sea_orm::Value;

use crate::backend::{Db, Dialect, MAX_IN_LIST, execute, query_all};

/// Takes the leases of these partitions that are free, expired, or already ours, in one
/// statement (the leased processors go through the coalescer: every one taking a lease at that
/// moment, e.g. all partitions of an instance that starts or takes over). Returns the
/// partitions whose lease is ours now. PostgreSQL and SQLite return them from the `UPDATE`; on MySQL a count
/// short of the request is resolved by reading the owners back (a lease this statement took
/// cannot lapse before that read: it was written `lease_ttl` ahead). Unlike the leased ack,
/// the commit is durable on PostgreSQL too: a lease lost to a server crash could let a second
/// instance run the partition while this one still believes it holds it.
pub(crate) async fn acquire_many(
    db: &Db,
    partition_ids: &[i64],
    owner: &str,
    until: DateTime<Utc>,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    let d = db.dialect;
    let now = Utc::now();
    let mut sql = format!(
        "UPDATE modkit_outbox_processor SET locked_by = ?, locked_until = ? WHERE {} \
         AND (locked_by IS NULL OR locked_by = ? OR locked_until < ?)",
        d.in_list("partition_id", partition_ids.len())
    );
    let mut args = vec![Value::from(owner), d.time(until)];
    args.extend(d.list_args(partition_ids));
    args.push(Value::from(owner));
    args.push(d.time(now));
    let _gate = db.write_gate().await;
    let rows = match d {
        Dialect::Postgres | Dialect::Sqlite => {
            sql.push_str(" RETURNING partition_id");
            query_all(&db.conn, d, &sql, args).await?
        }
        Dialect::MySql => {
            if execute(&db.conn, d, &sql, args).await? == partition_ids.len() as u64 {
                return Ok(partition_ids.to_vec());
            }
            let mut args = d.list_args(partition_ids);
            args.push(Value::from(owner));
            query_all(
                &db.conn,
                d,
                &format!(
                    "SELECT partition_id FROM modkit_outbox_processor WHERE {} AND locked_by = ?",
                    d.in_list("partition_id", partition_ids.len())
                ),
                args,
            )
            .await?
        }
    };
    rows.iter()
        .map(|r| r.try_get::<i64>("", "partition_id"))
        .collect()
}

/// Extends our lease to `until`, never shortening it. Returns false when it is no longer ours.
///
/// A renewal whose caller gave up on it (timed out) may still run later, after an ack or a
/// newer renewal wrote a later expiry, for instance once a row lock it waited on is released:
/// it must not pull `locked_until` back below what the processor counts on. (MySQL reports the
/// matched row even when the value stays: the engine connects with `CLIENT_FOUND_ROWS`.)
pub(crate) async fn renew(
    db: &Db,
    partition_id: i64,
    owner: &str,
    until: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let later = match db.dialect {
        // SQLite's two-argument `MAX` is its scalar maximum; its times are text that sorts
        // as time. Every backend's maximum is NULL if an argument is, hence the `COALESCE`.
        Dialect::Sqlite => "MAX(COALESCE(locked_until, ?), ?)",
        _ => "GREATEST(COALESCE(locked_until, ?), ?)",
    };
    let until = db.dialect.time(until);
    let n = db
        .exec_write(
            &format!(
                "UPDATE modkit_outbox_processor SET locked_until = {later} \
                 WHERE partition_id = ? AND locked_by = ?"
            ),
            vec![
                until.clone(),
                until,
                Value::from(partition_id),
                Value::from(owner),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Gives up every lease `owner` holds among `partition_ids`, so other instances can take the
/// partitions at once: one statement per [`MAX_IN_LIST`] partitions (`stop()` runs it once the
/// processors have ended, instead of one write per partition).
pub(crate) async fn release_all(
    db: &Db,
    partition_ids: &[i64],
    owner: &str,
) -> Result<u64, sea_orm::DbErr> {
    let d = db.dialect;
    let mut released = 0;
    for chunk in partition_ids.chunks(MAX_IN_LIST) {
        let mut args = d.list_args(chunk);
        args.push(Value::from(owner));
        released += db
            .exec_write(
                &format!(
                    "UPDATE modkit_outbox_processor SET locked_by = NULL, locked_until = NULL \
                     WHERE {} AND locked_by = ?",
                    d.in_list("partition_id", chunk.len())
                ),
                args,
            )
            .await?;
    }
    Ok(released)
}

/// Guard of the leased ack: only the owner advances the cursor, and only from where it read.
pub(crate) const ACK_GUARD: &str = " AND locked_by = ?";

#[cfg(test)]
mod tests {
    use super::*;
    use modkit_outbox_tests::Backend;
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigratorTrait;

    /// One statement takes the free, the expired and the already-ours leases of a request and
    /// leaves another live instance's lease and a partition without a `processor` row alone
    /// (on MySQL the count falls short and the owners are read back).
    async fn acquire_many_takes_only_what_is_free(backend: Backend) {
        modkit_outbox_tests::run(backend, move |db| async move {
            modkit_outbox_migration::Migrator::up(&db.conn, None)
                .await
                .expect("migrate");
            let d = Dialect::of(&db.conn).expect("dialect");
            let q = if d == Dialect::MySql { '`' } else { '"' };
            let c = &db.conn;
            let run = |sql: String| async move { c.execute_unprepared(&sql).await.expect(&sql) };
            run(format!(
                "INSERT INTO modkit_outbox_partitions (queue, {q}partition{q}) VALUES \
                 ('q', 0), ('q', 1), ('q', 2), ('q', 3), ('q', 4)"
            ))
            .await;
            let id = |p: i64| p + 1; // ids follow insertion order on a fresh schema
            let now = Utc::now();
            let t = |s: i64| d.time(now + chrono::Duration::seconds(s));
            let dbx = Db::new(c.clone(), d);
            for (p, by, until) in [
                (0, None, None),
                (1, Some("other"), Some(t(3600))),
                (2, Some("other"), Some(t(-3600))),
                (3, Some("me"), Some(t(3600))),
            ] {
                dbx.exec_write(
                    "INSERT INTO modkit_outbox_processor (partition_id, locked_by, locked_until) \
                     VALUES (?, ?, ?)",
                    vec![
                        Value::from(id(p)),
                        Value::from(by),
                        until.unwrap_or(d.null_time()),
                    ],
                )
                .await
                .expect("processor row");
            }
            let until = now + chrono::Duration::seconds(30);
            let mut ours = acquire_many(&dbx, &[id(0), id(1), id(2), id(3), id(4)], "me", until)
                .await
                .expect("acquire");
            ours.sort_unstable();
            assert_eq!(ours, vec![id(0), id(2), id(3)], "{backend:?}");
            let rows = dbx
                .query_all(
                    "SELECT partition_id, locked_by FROM modkit_outbox_processor \
                     ORDER BY partition_id",
                    vec![],
                )
                .await
                .expect("read back");
            let owners: Vec<(i64, Option<String>)> = rows
                .iter()
                .map(|r| {
                    (
                        r.try_get("", "partition_id").expect("pid"),
                        r.try_get("", "locked_by").expect("by"),
                    )
                })
                .collect();
            let me = Some("me".to_owned());
            assert_eq!(
                owners,
                vec![
                    (id(0), me.clone()),
                    (id(1), Some("other".to_owned())),
                    (id(2), me.clone()),
                    (id(3), me),
                ],
                "{backend:?}"
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquire_many_postgres() {
        acquire_many_takes_only_what_is_free(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquire_many_mysql() {
        acquire_many_takes_only_what_is_free(Backend::MySql).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquire_many_sqlite() {
        acquire_many_takes_only_what_is_free(Backend::Sqlite).await;
    }
}
