//! MySQL/MariaDB specifics. There is no `INSERT … RETURNING` on MySQL 8, and `LAST_INSERT_ID()`
//! gives only the first id of a multi-row insert (the rest need not be consecutive: interleaved
//! auto-increment locking, `auto_increment_increment` > 1 on clusters). A batch therefore tags its
//! body rows with a random `batch_token` and reads the ids back in id order.

/// Reads back the ids of the body rows a batch insert tagged with its token.
pub(crate) const BATCH_IDS: &str = "SELECT id FROM modkit_outbox_body \
     WHERE id >= ? AND batch_token = ? ORDER BY id LIMIT ?";

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::MAX_IN_LIST;

/// The writes of a sequencing pass as a few text-protocol round trips instead of three prepared
/// statements (and, for a new row count, a prepare each): every batch is `INSERT` of up to
/// [`MAX_IN_LIST`] `outgoing` rows plus the `DELETE` of the same rows' `incoming` ids, and the
/// last batch also advances the partitions' sequences. The statements and their order inside
/// the transaction are what the prepared path sends, under the same partition-row locks.
///
/// Every value is an integer the engine read or computed, or `now` rendered by us: nothing
/// from a caller is spliced into SQL. Returns each batch with the rows it must affect (MySQL
/// sums the affected rows of a multi-statement batch): `outgoing[k]` belongs to
/// `incoming_ids[k]`.
pub(crate) fn sequence_writes(
    outgoing: &[(i64, i64, i64)],
    incoming_ids: &[i64],
    new_seq: &[(i64, i64)],
    now: DateTime<Utc>,
) -> Vec<(String, u64)> {
    debug_assert_eq!(outgoing.len(), incoming_ids.len());
    let at = now.format("'%Y-%m-%d %H:%M:%S%.6f'").to_string();
    let chunks = outgoing.len().div_ceil(MAX_IN_LIST).max(1);
    let mut out = Vec::with_capacity(chunks);
    for (i, (rows, ids)) in outgoing
        .chunks(MAX_IN_LIST)
        .zip(incoming_ids.chunks(MAX_IN_LIST))
        .enumerate()
    {
        let mut sql = String::with_capacity(64 * rows.len() + 256);
        sql.push_str(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES ",
        );
        for (k, (pid, body, seq)) in rows.iter().enumerate() {
            let sep = if k > 0 { ", " } else { "" };
            let _ = write!(sql, "{sep}({pid}, {body}, {seq}, {at})");
        }
        // Driven by the ids, never a scan (see `Dialect::delete_ids`).
        let _ = write!(
            sql,
            "; DELETE t FROM ({}) k STRAIGHT_JOIN modkit_outbox_incoming t ON t.id = k.id",
            super::ids_table(ids.iter())
        );
        let mut expected = 2 * rows.len() as u64;
        if i + 1 == chunks {
            sql.push_str("; UPDATE modkit_outbox_partitions SET `sequence` = CASE id");
            for (pid, s) in new_seq {
                let _ = write!(sql, " WHEN {pid} THEN {s}");
            }
            sql.push_str(" END WHERE id IN (");
            push_list(&mut sql, new_seq.iter().map(|(pid, _)| pid));
            sql.push(')');
            expected += new_seq.len() as u64;
        }
        out.push((sql, expected));
    }
    out
}

/// The partition lock of a pass that follows a pass which moved rows, without the separate
/// candidate probe (which would then almost always find some): locks the `partitions` rows of
/// up to `limit` partitions that have incoming rows, and returns their `sequence` as `seq`.
///
/// What it locks, under READ COMMITTED (checked on MariaDB 10.11 with `EXPLAIN` and a second
/// session): the derived table of partition ids is a plain consistent read (a loose index scan
/// of `(partition_id, id)`: no incoming row is locked, an uncommitted producer row not even
/// seen), and the forced join order locks only the `partitions` rows of those ids (`eq_ref` on
/// the primary key). Without `STRAIGHT_JOIN … FORCE INDEX` MariaDB plans a scan of
/// `partitions` that locks every row of it, and an `EXISTS` form locks every row it examines
/// too. `SKIP LOCKED` drops a partition another sequencer holds. (Folding the incoming read in
/// as well, with a locking join, was measured and is slower: paired MariaDB B=1 runs, p50
/// 9.5 against 6.0 ms; its derived tables, sort and row locks cost more than the round trip.)
///
/// Binds: this instance's id and the current time, for [`NOT_LEASED_ELSEWHERE`].
pub(crate) fn lock_partitions_with_rows(limit: usize) -> String {
    format!(
        "SELECT p.id, p.`sequence` AS seq \
         FROM (SELECT DISTINCT partition_id FROM modkit_outbox_incoming LIMIT {limit}) k \
         STRAIGHT_JOIN modkit_outbox_partitions p FORCE INDEX (PRIMARY) ON p.id = k.partition_id \
         WHERE {NOT_LEASED_ELSEWHERE} ORDER BY p.id FOR UPDATE SKIP LOCKED"
    )
}

/// Condition on `p` (a `partitions` row): no other instance holds a live lease on it. MySQL
/// has no `NOTIFY`: rows another instance's sequencer moved do not wake the lease holder's
/// processors (nor reach them as a hand-off), so they waited for the holder's next pass or its
/// reconcile. Every lease holder runs a sequencer, so a MySQL sequencer leaves such partitions
/// to it (a free or expired lease is anyone's). Binds: this instance's id, the current time.
/// A plain subquery: it reads `processor` without locking it, also inside a locking statement
/// (checked with a second session and `NOWAIT`), so lease renewals never wait on a pass.
pub(crate) const NOT_LEASED_ELSEWHERE: &str = "NOT EXISTS (SELECT 1 FROM modkit_outbox_processor \
     pr WHERE pr.partition_id = p.id AND pr.locked_by <> ? AND pr.locked_until > ?)";

fn push_list<'a>(sql: &mut String, ids: impl Iterator<Item = &'a i64>) {
    for (k, id) in ids.enumerate() {
        let sep = if k > 0 { ", " } else { "" };
        let _ = write!(sql, "{sep}{id}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_writes_batch_rows_and_count_what_they_affect() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T06:10:40.123456Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let b = sequence_writes(&[(1, 10, 4), (2, 11, 1)], &[7, 8], &[(1, 4), (2, 1)], now);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0].0,
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES \
             (1, 10, 4, '2026-11-23 06:10:40.123456'), (2, 11, 1, '2026-11-23 06:10:40.123456'); \
             DELETE t FROM (SELECT 7 AS id UNION ALL SELECT 8) k STRAIGHT_JOIN \
             modkit_outbox_incoming t ON t.id = k.id; \
             UPDATE modkit_outbox_partitions SET `sequence` = CASE id WHEN 1 THEN 4 WHEN 2 THEN 1 \
             END WHERE id IN (1, 2)"
        );
        assert_eq!(b[0].1, 2 + 2 + 2);

        // Big passes: IN lists stay below MariaDB's subquery conversion; the update comes last.
        let n = MAX_IN_LIST + 3;
        let rows: Vec<(i64, i64, i64)> = (0..n as i64).map(|k| (1, 100 + k, k + 1)).collect();
        let ids: Vec<i64> = (0..n as i64).collect();
        let b = sequence_writes(&rows, &ids, &[(1, n as i64)], now);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].1, 2 * MAX_IN_LIST as u64);
        assert_eq!(b[1].1, 2 * 3 + 1);
        assert!(!b[0].0.contains("UPDATE") && b[1].0.contains("UPDATE"));
    }

    /// The hot-pass lock on a real server: it returns only the partitions with committed rows
    /// that nobody else holds, never waits for a held one, and leaves every other `partitions`
    /// row and every `incoming` row unlocked (a `NOWAIT` lock from another session succeeds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_pass_lock_takes_only_partitions_with_rows() {
        modkit_outbox_tests::run(modkit_outbox_tests::Backend::MySql, |db| async move {
            use sea_orm::{ConnectionTrait, IsolationLevel, TransactionTrait};
            use sea_orm_migration::MigratorTrait;
            modkit_outbox_migration::Migrator::up(&db.conn, None)
                .await
                .expect("migrate");
            let c = &db.conn;
            let run = |sql: String| async move { c.execute_unprepared(&sql).await.expect(&sql) };
            run("INSERT INTO modkit_outbox_partitions (queue, `partition`) VALUES \
                 ('q', 0), ('q', 1), ('q', 2), ('q', 3), ('q', 4), ('q', 5)"
                .into())
            .await;
            let ids: Vec<i64> = c
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::MySql,
                    "SELECT id FROM modkit_outbox_partitions ORDER BY `partition`",
                ))
                .await
                .expect("ids")
                .iter()
                .map(|r| r.try_get::<i64>("", "id").expect("id"))
                .collect();
            let (held, free, pending, empty) = (ids[0], ids[1], ids[2], ids[3]);
            // Leased by another live instance / by one whose lease expired.
            let (elsewhere, expired) = (ids[4], ids[5]);
            run(format!(
                "INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES \
                 ({held}, 1), ({free}, 2), ({free}, 3), ({elsewhere}, 4), ({expired}, 5)"
            ))
            .await;
            run(format!(
                "INSERT INTO modkit_outbox_processor (partition_id, locked_by, locked_until) VALUES \
                 ({elsewhere}, 'other', UTC_TIMESTAMP(6) + INTERVAL 1 HOUR), \
                 ({expired}, 'other', UTC_TIMESTAMP(6) - INTERVAL 1 HOUR), \
                 ({free}, 'me', UTC_TIMESTAMP(6) + INTERVAL 1 HOUR)"
            ))
            .await;
            let rc = || c.begin_with_config(Some(IsolationLevel::ReadCommitted), None);
            // Another sequencer holds one partition; a producer has not committed its row yet.
            let other = rc().await.expect("begin");
            other
                .execute_unprepared(&format!(
                    "SELECT id FROM modkit_outbox_partitions WHERE id = {held} FOR UPDATE"
                ))
                .await
                .expect("hold");
            let producer = rc().await.expect("begin");
            producer
                .execute_unprepared(&format!(
                    "INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES ({pending}, 4)"
                ))
                .await
                .expect("pending row");

            let pass = rc().await.expect("begin");
            let locked: Vec<i64> = pass
                .query_all_raw(sea_orm::Statement::from_sql_and_values(
                    sea_orm::DbBackend::MySql,
                    lock_partitions_with_rows(500),
                    [
                        sea_orm::Value::from("me"),
                        sea_orm::Value::from(chrono::Utc::now()),
                    ],
                ))
                .await
                .expect("lock")
                .iter()
                .map(|r| r.try_get::<i64>("", "id").expect("id"))
                .collect();
            // Not `held` (locked), `pending` (uncommitted) or `empty`; not `elsewhere`, whose
            // live lease belongs to another instance; `expired`'s lease is anyone's.
            assert_eq!(locked, vec![free, expired]);

            // Nothing but `free`'s partition row is locked by the pass.
            for (table, key, id) in [
                ("modkit_outbox_partitions", "id", pending),
                ("modkit_outbox_partitions", "id", empty),
                ("modkit_outbox_partitions", "id", elsewhere),
                ("modkit_outbox_processor", "partition_id", elsewhere),
                ("modkit_outbox_processor", "partition_id", free),
                ("modkit_outbox_incoming", "id", 2),
                ("modkit_outbox_incoming", "id", 3),
            ] {
                let probe = rc().await.expect("begin");
                probe
                    .execute_unprepared(&format!(
                        "SELECT {key} FROM {table} WHERE {key} = {id} FOR UPDATE NOWAIT"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("{table} row {id} is locked: {e}"));
                probe.rollback().await.expect("rollback");
            }
            let probe = rc().await.expect("begin");
            let refused = probe
                .execute_unprepared(&format!(
                    "SELECT id FROM modkit_outbox_partitions WHERE id = {free} FOR UPDATE NOWAIT"
                ))
                .await;
            assert!(refused.is_err(), "the pass holds its partition");
            probe.rollback().await.expect("rollback");
            // Producers keep inserting into the partition being sequenced.
            let producer2 = rc().await.expect("begin");
            producer2
                .execute_unprepared("SET SESSION innodb_lock_wait_timeout = 2")
                .await
                .expect("timeout");
            producer2
                .execute_unprepared(&format!(
                    "INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES ({free}, 5)"
                ))
                .await
                .expect("a producer is not blocked");
            producer2.commit().await.expect("commit");
            for t in [pass, producer, other] {
                t.rollback().await.expect("rollback");
            }
        })
        .await;
    }
}
