//! SQLite specifics. One writer at a time: the engine serializes its own write transactions and
//! starts them with `BEGIN IMMEDIATE`, so they wait for producers (busy timeout) instead of failing
//! on a lock upgrade. Several processes on one file stay correct (every write transaction is
//! serialized by SQLite) but gain nothing; run one engine per file.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Value};

use super::{Dialect, MAX_IN_LIST, update_per_key};

/// One message's enqueue as one call: the body, then its `incoming` row pointing at it
/// (`last_insert_rowid()` is the body's id on this connection), returning that id. sqlx runs
/// both statements of the string in one request to its SQLite worker thread, binding the
/// arguments in order; each request is a thread hand-off, the cost that bounds a producer's
/// single-message transactions here (three hand-offs, like a plain one-row insert, instead of
/// four).
pub(crate) const ENQUEUE_ONE: &str = "INSERT INTO modkit_outbox_body \
     (payload, payload_type, headers, created_at) VALUES (?, ?, ?, ?); \
     INSERT INTO modkit_outbox_incoming (partition_id, body_id) \
     VALUES (?, last_insert_rowid()) RETURNING body_id AS id";

/// Switches the database to WAL (readers never block the writer) unless it is in memory.
pub(crate) async fn prepare(conn: &DatabaseConnection) -> Result<(), DbErr> {
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "PRAGMA journal_mode",
        ))
        .await?;
    let mode: String = row
        .map(|r| r.try_get_by_index::<String>(0))
        .transpose()?
        .unwrap_or_default();
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        conn.execute_unprepared("PRAGMA journal_mode = WAL").await?;
    }
    Ok(())
}

/// Statements [`execute_joined`] sends per call. sqlx caches each distinct query string with
/// a prepared statement for every statement in it, so a pass that moved a backlog (dozens of
/// 1000-row inserts and 500-id deletes) would otherwise cache one string per row count holding
/// all of them; four covers a trickle pass (insert, sequence update, one or two deletes).
pub(crate) const JOINED_MAX: usize = 4;

/// Runs statements with up to [`JOINED_MAX`] of them per call: their SQL joined with `;`, their
/// arguments concatenated (sqlx prepares each statement of the string and binds the `?`s in
/// order across them), so a group costs one hand-off to sqlx's SQLite worker thread instead of
/// one per statement. Returns the rows changed by all of them together; the first failing
/// statement fails the call and the ones after it do not run (inside a transaction, roll it
/// back).
pub(crate) async fn execute_joined<C: ConnectionTrait>(
    c: &C,
    stmts: Vec<(String, Vec<Value>)>,
) -> Result<u64, DbErr> {
    let mut changed = 0;
    let mut stmts = stmts.into_iter().peekable();
    while stmts.peek().is_some() {
        let mut sql = String::new();
        let mut args = Vec::new();
        for (s, a) in stmts.by_ref().take(JOINED_MAX) {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&s);
            args.extend(a);
        }
        // sqlx does not count arguments: a missing one binds NULL, a surplus one is ignored.
        debug_assert_eq!(
            sql.matches('?').count(),
            args.len(),
            "placeholders and arguments of a joined call"
        );
        changed += super::execute(c, Dialect::Sqlite, &sql, args).await?;
    }
    Ok(changed)
}

/// A sequencer pass's writes for [`execute_joined`]: the `outgoing` rows `(partition, body,
/// seq)` in inserts of up to 1000, each partition's new sequence in one update, the moved
/// `incoming` ids in key-driven deletes; with the change count they must sum to (every
/// outgoing row inserted, one sequence per partition, every incoming row deleted). The MySQL
/// counterpart is `mysql::sequence_writes`.
pub(crate) fn sequence_writes(
    outgoing: &[(i64, i64, i64)],
    incoming_ids: &[i64],
    new_seq: &[(i64, i64)],
    now: DateTime<Utc>,
) -> (Vec<(String, Vec<Value>)>, u64) {
    let d = Dialect::Sqlite;
    let now = d.time(now);
    let mut writes = Vec::new();
    for chunk in outgoing.chunks(1000) {
        let sql = format!(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES {}",
            vec!["(?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut args = Vec::with_capacity(4 * chunk.len());
        for (pid, body, seq) in chunk {
            args.push(Value::from(*pid));
            args.push(Value::from(*body));
            args.push(Value::from(*seq));
            args.push(now.clone());
        }
        writes.push((sql, args));
    }
    writes.push(update_per_key(
        d,
        "modkit_outbox_partitions",
        "id",
        &d.q("sequence"),
        new_seq,
    ));
    for chunk in incoming_ids.chunks(MAX_IN_LIST) {
        let sql = d.delete_ids("modkit_outbox_incoming", chunk.len(), "");
        writes.push((sql, d.list_args(chunk)));
    }
    let expected = outgoing.len() + new_seq.len() + incoming_ids.len();
    (writes, expected as u64)
}

#[cfg(test)]
mod tests {
    use sea_orm::{DbBackend, Statement};

    use super::*;

    /// One in-memory database (sea-orm keeps a `:memory:` pool at one connection).
    async fn memory() -> DatabaseConnection {
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        db.execute_unprepared("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
            .await
            .expect("table");
        db
    }

    async fn rows(db: &DatabaseConnection) -> Vec<(i64, i64)> {
        db.query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT k, v FROM t ORDER BY k",
        ))
        .await
        .expect("read")
        .iter()
        .map(|r| {
            (
                r.try_get("", "k").expect("k"),
                r.try_get("", "v").expect("v"),
            )
        })
        .collect()
    }

    fn stmt(sql: &str, args: &[i64]) -> (String, Vec<Value>) {
        (
            sql.to_owned(),
            args.iter().map(|a| Value::from(*a)).collect(),
        )
    }

    #[tokio::test]
    async fn joined_statements_bind_in_order_and_sum_their_changes() {
        let db = memory().await;
        let changed = execute_joined(
            &db,
            vec![
                stmt(
                    "INSERT INTO t (k, v) VALUES (?, ?), (?, ?)",
                    &[1, 10, 2, 20],
                ),
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[3, 30]),
                stmt("UPDATE t SET v = v + ? WHERE k IN (?, ?)", &[5, 1, 3]),
                stmt("DELETE FROM t WHERE k = ?", &[2]),
            ],
        )
        .await
        .expect("joined");
        assert_eq!(changed, 2 + 1 + 2 + 1);
        assert_eq!(rows(&db).await, vec![(1, 15), (3, 35)]);
    }

    #[tokio::test]
    async fn more_statements_than_one_call_takes_all_run_in_order() {
        let db = memory().await;
        let n = 3 * JOINED_MAX as i64 + 1;
        let mut stmts: Vec<_> = (1..=n)
            .map(|k| stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[k, k * 10]))
            .collect();
        // The last statement sees every row before it, whichever call they went in.
        stmts.push(stmt("UPDATE t SET v = v + 1 WHERE k <= ?", &[n]));
        let changed = execute_joined(&db, stmts).await.expect("joined");
        assert_eq!(changed, 2 * n as u64);
        let want: Vec<(i64, i64)> = (1..=n).map(|k| (k, k * 10 + 1)).collect();
        assert_eq!(rows(&db).await, want);
    }

    #[tokio::test]
    async fn a_failing_statement_stops_the_ones_after_it() {
        let db = memory().await;
        // Outside a transaction each statement commits on its own: the first stays, the
        // duplicate fails the call, the third never runs.
        let e = execute_joined(
            &db,
            vec![
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[1, 10]),
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[1, 11]),
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[2, 20]),
            ],
        )
        .await;
        assert!(e.is_err(), "duplicate key must fail the call: {e:?}");
        assert_eq!(rows(&db).await, vec![(1, 10)]);
        // Inside a transaction, the rollback takes the first one back too.
        let txn = sea_orm::TransactionTrait::begin(&db).await.expect("begin");
        let e = execute_joined(
            &txn,
            vec![
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[3, 30]),
                stmt("INSERT INTO t (k, v) VALUES (?, ?)", &[1, 12]),
            ],
        )
        .await;
        assert!(e.is_err(), "duplicate key must fail the call: {e:?}");
        txn.rollback().await.expect("rollback");
        assert_eq!(rows(&db).await, vec![(1, 10)]);
    }
}
