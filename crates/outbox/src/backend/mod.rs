//! The portable core's view of the three backends: placeholders, identifier quoting, time values,
//! locking clauses and transactions. Backend-specific statements and extras live in the mirrored
//! modules `postgres.rs`, `mysql.rs` and `sqlite.rs`.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    IsolationLevel, QueryResult, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait, Value,
};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{OutboxError, Result};

pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod sqlite;

/// Which SQL dialect to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    pub(crate) fn of(db: &impl ConnectionTrait) -> Result<Self> {
        match db.get_database_backend() {
            DbBackend::Postgres => Ok(Dialect::Postgres),
            DbBackend::MySql => Ok(Dialect::MySql),
            DbBackend::Sqlite => Ok(Dialect::Sqlite),
            #[allow(unreachable_patterns)]
            other => Err(OutboxError::UnsupportedBackend(format!("{other:?}"))),
        }
    }

    pub(crate) fn backend(self) -> DbBackend {
        match self {
            Dialect::Postgres => DbBackend::Postgres,
            Dialect::MySql => DbBackend::MySql,
            Dialect::Sqlite => DbBackend::Sqlite,
        }
    }

    /// A statement from SQL written with `?` placeholders (rewritten to `$n` on PostgreSQL).
    /// The engine's SQL never contains a literal `?`.
    pub(crate) fn stmt(self, sql: &str, values: Vec<Value>) -> Statement {
        if self == Dialect::Postgres && sql.contains('?') {
            // `$n` is at most four bytes longer than `?` for any statement the engine sends.
            let mut out = String::with_capacity(sql.len() + sql.len() / 2);
            let (mut start, mut n) = (0, 0u32);
            for (i, b) in sql.bytes().enumerate() {
                if b == b'?' {
                    // `?` is ASCII, so `i` is a char boundary.
                    out.push_str(&sql[start..i]);
                    n += 1;
                    let _ = write!(out, "${n}");
                    start = i + 1;
                }
            }
            out.push_str(&sql[start..]);
            Statement::from_sql_and_values(self.backend(), out, values)
        } else {
            Statement::from_sql_and_values(self.backend(), sql, values)
        }
    }

    /// Quotes an identifier that is a keyword on some backend (`partition`, `sequence`).
    pub(crate) fn q(self, ident: &str) -> String {
        match self {
            Dialect::MySql => format!("`{ident}`"),
            _ => format!("\"{ident}\""),
        }
    }

    /// A point in time as a bind value. SQLite stores UTC RFC 3339 text with a fixed six-digit
    /// fraction, so text comparison orders like time.
    pub(crate) fn time(self, t: DateTime<Utc>) -> Value {
        match self {
            Dialect::Sqlite => Value::from(t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            _ => Value::from(t),
        }
    }

    /// A typed SQL `NULL` for a time column (PostgreSQL rejects an untyped text null).
    pub(crate) fn null_time(self) -> Value {
        match self {
            Dialect::Sqlite => Value::String(None),
            _ => Value::ChronoDateTimeUtc(None),
        }
    }

    /// `FOR UPDATE SKIP LOCKED` (PostgreSQL: `FOR NO KEY UPDATE`, which does not conflict with the
    /// key-share locks foreign-key checks take); nothing on SQLite, where the write transaction
    /// (`BEGIN IMMEDIATE`) already excludes every other writer.
    pub(crate) fn lock_skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR NO KEY UPDATE SKIP LOCKED",
            Dialect::MySql => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// `DELETE FROM <table> WHERE <alias-free condition>` that goes through `index` where
    /// the optimizer lets it (ranges of a key). For rows addressed by id, use
    /// [`Dialect::delete_ids`]: MariaDB plans an id `IN` list on a small table as a full scan
    /// even with the index hint.
    pub(crate) fn delete_using(self, table: &str, index: &str, condition: &str) -> String {
        match self {
            Dialect::MySql => {
                format!("DELETE t FROM {table} t FORCE INDEX ({index}) WHERE {condition}")
            }
            _ => format!("DELETE FROM {table} WHERE {condition}"),
        }
    }

    /// `DELETE` of the rows of `table` whose primary key `id` is one of `n` ids (arguments:
    /// [`Dialect::list_args`], then those of `extra`), and (when not empty) that also match
    /// `extra` (alias-free).
    ///
    /// On MySQL/MariaDB an `IN` list is not always a key lookup: on a small table (`incoming`
    /// at a trickle) MariaDB plans it as a full scan even under `FORCE INDEX (PRIMARY)`, and a
    /// scanning `DELETE` locks every row it reads and waits on every row another transaction
    /// holds (a producer's uncommitted insert, another sequencer's rows): stalls and
    /// deadlocks. There the ids are a derived table that drives the join, so each row is one
    /// primary-key lookup (`eq_ref`) whatever the table's size (see [`ids_table`]).
    pub(crate) fn delete_ids(self, table: &str, n: usize, extra: &str) -> String {
        match self {
            Dialect::MySql => {
                let mut sql = format!(
                    "DELETE t FROM ({}) k STRAIGHT_JOIN {table} t ON t.id = k.id",
                    ids_table(std::iter::repeat_n("?", n))
                );
                if !extra.is_empty() {
                    sql.push_str(" WHERE ");
                    sql.push_str(extra);
                }
                sql
            }
            _ => {
                let mut sql = format!("DELETE FROM {table} WHERE {}", self.in_list("id", n));
                if !extra.is_empty() {
                    sql.push_str(" AND ");
                    sql.push_str(extra);
                }
                sql
            }
        }
    }

    /// `column IN (…)` for a list of `n` ids; its arguments come from [`Dialect::list_args`].
    ///
    /// PostgreSQL binds the whole list as one array (`column = ANY(?)`), so the statement's
    /// text, prepared statement and plan do not depend on `n`. A list whose length changes from
    /// call to call (the partitions one pass woke, the bodies one vacuum run found) is
    /// otherwise a new statement for every length: parsed, prepared (one more round trip) and
    /// planned again on every connection, and it evicts the connection's other cached
    /// statements.
    pub(crate) fn in_list(self, column: &str, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("{column} = ANY(?)"),
            _ => format!("{column} IN ({})", placeholders(n)),
        }
    }

    /// The arguments of [`Dialect::in_list`] (and [`Dialect::delete_ids`]).
    pub(crate) fn list_args(self, ids: &[i64]) -> Vec<Value> {
        match self {
            Dialect::Postgres => vec![Value::from(ids.to_vec())],
            _ => ids.iter().map(|id| Value::from(*id)).collect(),
        }
    }

    /// `INSERT … ` prefix/suffix that ignores rows violating a unique key.
    pub(crate) fn insert_ignore(self, table_and_cols: &str, values: &str) -> String {
        match self {
            Dialect::Postgres => {
                format!("INSERT INTO {table_and_cols} VALUES {values} ON CONFLICT DO NOTHING")
            }
            Dialect::MySql => format!("INSERT IGNORE INTO {table_and_cols} VALUES {values}"),
            Dialect::Sqlite => format!("INSERT OR IGNORE INTO {table_and_cols} VALUES {values}"),
        }
    }
}

/// A derived table of ids for MySQL (`SELECT a AS id UNION ALL SELECT b …`): placeholders or
/// integers. Portable to MySQL 8 and MariaDB, unlike their two different `VALUES` table
/// constructors.
pub(crate) fn ids_table<T: std::fmt::Display>(ids: impl Iterator<Item = T>) -> String {
    let mut sql = String::new();
    for (k, id) in ids.enumerate() {
        if k == 0 {
            let _ = write!(sql, "SELECT {id} AS id");
        } else {
            let _ = write!(sql, " UNION ALL SELECT {id}");
        }
    }
    sql
}

/// Longest `IN (…)` list the engine sends. MariaDB turns an `IN` list of 1000 or more values
/// (`in_predicate_conversion_threshold`) into a subquery, and a `DELETE`/`UPDATE` with it then
/// scans and locks the whole table, deadlocking with every concurrent writer (the trap the
/// reference engine fell into). Below the threshold the list is a primary-key range lookup.
pub(crate) const MAX_IN_LIST: usize = 500;

/// Most bytes of payloads, headers and error texts one multi-row insert carries. MySQL refuses
/// a statement larger than `max_allowed_packet` (16 MiB by default on MariaDB, 64 MiB on
/// MySQL 8), so inserts that carry payloads are bounded by bytes as well as by rows; a single
/// larger row still goes alone.
pub(crate) const MAX_STATEMENT_BYTES: usize = 4 * 1024 * 1024;

/// Splits `items` into runs of at most `max_rows` items whose `size`s add up to at most
/// `max_bytes`; an item larger than `max_bytes` forms a run by itself.
pub(crate) fn byte_chunks<T>(
    items: &[T],
    max_rows: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let s = size(item);
        if i > start && (i - start >= max_rows || bytes.saturating_add(s) > max_bytes) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(s);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// `?, ?, …` with `n` placeholders, for `IN (…)` lists.
pub(crate) fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

/// `UPDATE table SET column = CASE key WHEN ? THEN ? … END WHERE key IN (…)`: a different value
/// per key in one statement (keys and values are the `(key, value)` pairs, in order). On
/// PostgreSQL the pairs are two arrays joined through `unnest`: one statement text whatever
/// their number (see [`Dialect::in_list`]).
pub(crate) fn update_per_key(
    d: Dialect,
    table: &str,
    key: &str,
    column: &str,
    pairs: &[(i64, i64)],
) -> (String, Vec<Value>) {
    if d == Dialect::Postgres {
        let sql = format!(
            "UPDATE {table} t SET {column} = w.v FROM unnest(CAST(? AS BIGINT[]), \
             CAST(? AS BIGINT[])) AS w(k, v) WHERE t.{key} = w.k"
        );
        let keys: Vec<i64> = pairs.iter().map(|(k, _)| *k).collect();
        let values: Vec<i64> = pairs.iter().map(|(_, v)| *v).collect();
        return (sql, vec![Value::from(keys), Value::from(values)]);
    }
    let sql = format!(
        "UPDATE {table} SET {column} = CASE {key} {} END WHERE {key} IN ({})",
        vec!["WHEN ? THEN ?"; pairs.len()].join(" "),
        placeholders(pairs.len())
    );
    let mut args = Vec::with_capacity(3 * pairs.len());
    for (k, v) in pairs {
        args.extend([Value::from(*k), Value::from(*v)]);
    }
    args.extend(pairs.iter().map(|(k, _)| Value::from(*k)));
    (sql, args)
}

/// Reads a time column written by [`Dialect::time`] (or by the database).
pub(crate) fn get_time(row: &QueryResult, col: &str) -> std::result::Result<DateTime<Utc>, DbErr> {
    row.try_get::<DateTime<Utc>>("", col)
}

pub(crate) fn get_opt_time(
    row: &QueryResult,
    col: &str,
) -> std::result::Result<Option<DateTime<Utc>>, DbErr> {
    row.try_get::<Option<DateTime<Utc>>>("", col)
}

/// Database access of the engine's own background work: the pool plus, on SQLite, a gate that
/// serializes the engine's write transactions (SQLite has one writer; a pool of connections
/// fighting for it only adds `SQLITE_BUSY` and latency).
#[derive(Clone)]
pub(crate) struct Db {
    pub(crate) conn: DatabaseConnection,
    pub(crate) dialect: Dialect,
    gate: Option<Arc<Mutex<()>>>,
}

/// An engine write transaction; on SQLite it also holds the write gate until it ends.
pub(crate) struct WriteTxn {
    pub(crate) txn: DatabaseTransaction,
    _gate: Option<OwnedMutexGuard<()>>,
}

impl WriteTxn {
    pub(crate) async fn commit(self) -> std::result::Result<(), DbErr> {
        self.txn.commit().await
    }

    pub(crate) async fn rollback(self) -> std::result::Result<(), DbErr> {
        self.txn.rollback().await
    }
}

impl Db {
    pub(crate) fn new(conn: DatabaseConnection, dialect: Dialect) -> Self {
        let gate = (dialect == Dialect::Sqlite).then(|| Arc::new(Mutex::new(())));
        Self {
            conn,
            dialect,
            gate,
        }
    }

    /// Begins an engine write transaction: READ COMMITTED on MySQL (fresh data after each lock,
    /// no gap locks against producers), the default READ COMMITTED on PostgreSQL, `BEGIN
    /// IMMEDIATE` behind the write gate on SQLite.
    pub(crate) async fn begin_write(&self) -> std::result::Result<WriteTxn, DbErr> {
        self.begin(true).await
    }

    /// Begins an engine bookkeeping transaction (sequencing, leased acks, vacuum). On
    /// PostgreSQL its commit does not wait for the WAL flush (`synchronous_commit = off`): a
    /// server crash may lose the last few hundred milliseconds of bookkeeping, which the engine
    /// then redoes (rows are sequenced again, a leased batch is delivered again, at least once).
    /// It never loses a message: the producer's commit and every later durable commit flush
    /// the WAL up to themselves. Keeps the engine's commits off the producers' fsync budget.
    pub(crate) async fn begin_bookkeeping(&self) -> std::result::Result<WriteTxn, DbErr> {
        self.begin(false).await
    }

    async fn begin(&self, durable: bool) -> std::result::Result<WriteTxn, DbErr> {
        let gate = match &self.gate {
            Some(g) => Some(g.clone().lock_owned().await),
            None => None,
        };
        let txn = match self.dialect {
            Dialect::MySql => {
                self.conn
                    .begin_with_config(Some(IsolationLevel::ReadCommitted), None)
                    .await?
            }
            Dialect::Postgres => {
                let t = self.conn.begin().await?;
                if !durable {
                    t.execute_unprepared("SET LOCAL synchronous_commit = off")
                        .await?;
                }
                t
            }
            Dialect::Sqlite => {
                self.conn
                    .begin_with_options(TransactionOptions {
                        isolation_level: None,
                        access_mode: None::<AccessMode>,
                        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    })
                    .await?
            }
        };
        Ok(WriteTxn { txn, _gate: gate })
    }

    /// Holds the SQLite write gate (nothing elsewhere) while a caller writes outside
    /// [`Db::begin_write`].
    pub(crate) async fn write_gate(&self) -> Option<OwnedMutexGuard<()>> {
        match &self.gate {
            Some(g) => Some(g.clone().lock_owned().await),
            None => None,
        }
    }

    /// Executes one write statement outside a transaction; on SQLite behind the write gate.
    pub(crate) async fn exec_write(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> std::result::Result<u64, DbErr> {
        let _gate = match &self.gate {
            Some(g) => Some(g.clone().lock_owned().await),
            None => None,
        };
        execute(&self.conn, self.dialect, sql, values).await
    }

    pub(crate) async fn query_all(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> std::result::Result<Vec<QueryResult>, DbErr> {
        self.conn
            .query_all_raw(self.dialect.stmt(sql, values))
            .await
    }
}

/// Runs a query on any connection or transaction.
pub(crate) async fn query_all<C: ConnectionTrait>(
    c: &C,
    d: Dialect,
    sql: &str,
    values: Vec<Value>,
) -> std::result::Result<Vec<QueryResult>, DbErr> {
    c.query_all_raw(d.stmt(sql, values)).await
}

/// Executes a statement on any connection or transaction; returns rows affected.
pub(crate) async fn execute<C: ConnectionTrait>(
    c: &C,
    d: Dialect,
    sql: &str,
    values: Vec<Value>,
) -> std::result::Result<u64, DbErr> {
    Ok(c.execute_raw(d.stmt(sql, values)).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chunks_bound_rows_and_bytes() {
        let sizes = [3usize, 3, 3, 10, 1, 1, 1, 1];
        let lens = |c: Vec<&[usize]>| c.iter().map(|c| c.len()).collect::<Vec<_>>();
        // By bytes (at most 6): the 10 goes alone.
        assert_eq!(lens(byte_chunks(&sizes, 100, 6, |s| *s)), [2, 1, 1, 4]);
        // By rows.
        assert_eq!(lens(byte_chunks(&sizes, 3, 100, |s| *s)), [3, 3, 2]);
        assert!(byte_chunks(&[] as &[usize], 3, 6, |s| *s).is_empty());
        let all: usize = byte_chunks(&sizes, 2, 5, |s| *s)
            .iter()
            .map(|c| c.len())
            .sum();
        assert_eq!(all, sizes.len());
    }

    #[test]
    fn placeholders_are_numbered_on_postgres_only() {
        let s = Dialect::Postgres.stmt("SELECT ? + ?", vec![1.into(), 2.into()]);
        assert_eq!(s.sql, "SELECT $1 + $2");
        // Placeholders at either end, side by side, and past nine.
        let s = Dialect::Postgres.stmt("?,??", vec![]);
        assert_eq!(s.sql, "$1,$2$3");
        let many = ["?"; 12].join(" ");
        let s = Dialect::Postgres.stmt(&many, vec![]);
        assert!(s.sql.ends_with("$11 $12"), "{}", s.sql);
        let s = Dialect::Postgres.stmt("SELECT 1", vec![]);
        assert_eq!(s.sql, "SELECT 1");
        let s = Dialect::MySql.stmt("SELECT ? + ?", vec![1.into(), 2.into()]);
        assert_eq!(s.sql, "SELECT ? + ?");
        assert_eq!(placeholders(3), "?, ?, ?");
    }

    #[test]
    fn sqlite_times_sort_as_text() {
        let a = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let b = a + chrono::Duration::microseconds(1);
        let (Value::String(Some(x)), Value::String(Some(y))) =
            (Dialect::Sqlite.time(a), Dialect::Sqlite.time(b))
        else {
            panic!("sqlite times are text");
        };
        assert!(x < y, "{x} < {y}");
        assert_eq!(x.len(), y.len());
    }

    const ALL: [Dialect; 3] = [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite];

    /// Every statement built for a list has exactly one argument per placeholder, and on
    /// PostgreSQL its text does not depend on the list's length.
    #[test]
    fn list_statements_match_their_arguments() {
        for d in ALL {
            let texts: Vec<String> = [1usize, 3, 64]
                .iter()
                .map(|&n| {
                    let ids: Vec<i64> = (1..=n as i64).collect();
                    let sql = d.in_list("id", n);
                    assert_eq!(sql.matches('?').count(), d.list_args(&ids).len(), "{d:?}");
                    let del = d.delete_ids("modkit_outbox_body", n, "created_at < ?");
                    assert_eq!(del.matches('?').count(), d.list_args(&ids).len() + 1);
                    let pairs: Vec<(i64, i64)> = ids.iter().map(|i| (*i, i * 10)).collect();
                    let (upd, args) = update_per_key(d, "t", "k", "v", &pairs);
                    assert_eq!(upd.matches('?').count(), args.len(), "{d:?}: {upd}");
                    format!("{sql} {upd}")
                })
                .collect();
            if d == Dialect::Postgres {
                assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
            }
        }
    }
}
