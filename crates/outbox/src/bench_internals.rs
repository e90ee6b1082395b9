//! The engine's statement builders, reachable from the criterion micro-benchmarks in
//! `benches/benches/hot_paths.rs` (feature `bench-internals`; not a supported API).
//!
//! Each function builds, with synthetic ids, what the engine builds on a hot path and hands
//! to sea-orm: the SQL text with `?` already rewritten to `$n` on PostgreSQL, and its bind
//! values. Nothing is sent anywhere.

use chrono::Utc;
use sea_orm::{Statement, Value};

use crate::backend::{Dialect, mysql, postgres, sqlite};
use crate::enqueue::{self, Resolved};
use crate::message::{NewMessage, encode_headers};

/// A backend, as the engine's SQL dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// MySQL / MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Backend {
    /// All three, in the order the benchmarks report them.
    pub const ALL: [Backend; 3] = [Backend::Postgres, Backend::MySql, Backend::Sqlite];

    /// Lower-case name for benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
            Backend::Sqlite => "sqlite",
        }
    }

    fn dialect(self) -> Dialect {
        match self {
            Backend::Postgres => Dialect::Postgres,
            Backend::MySql => Dialect::MySql,
            Backend::Sqlite => Dialect::Sqlite,
        }
    }
}

/// The statements that enqueue `msgs` inside the caller's transaction, as the engine builds
/// them for one call: one statement for a single message on PostgreSQL and SQLite, otherwise
/// the `body` insert and the `incoming` insert (body ids made up: on a database they come back
/// from the first statement). Headers are encoded per message, as `enqueue` does. The MySQL
/// batch id read-back is a constant statement and left out.
pub fn enqueue_statements(b: Backend, msgs: &[NewMessage]) -> Vec<Statement> {
    let d = b.dialect();
    let now = Utc::now();
    let resolved: Vec<Resolved<'_>> = msgs
        .iter()
        .map(|m| Resolved {
            msg: m,
            partition_id: i64::from(m.partition) + 1,
            headers: encode_headers(&m.headers),
        })
        .collect();
    if resolved.len() == 1 && d != Dialect::MySql {
        let (sql, args) = enqueue::one_message_statement(d, &resolved[0], now, false);
        return vec![d.stmt(sql, args)];
    }
    let mut out = Vec::new();
    for chunk in enqueue::chunks(&resolved) {
        let token = (d == Dialect::MySql && chunk.len() > 1).then_some(42);
        let (sql, args) = enqueue::bodies_statement(d, chunk, now, token);
        out.push(d.stmt(&sql, args));
        let ids: Vec<i64> = (1..=chunk.len() as i64).collect();
        let (sql, args) = enqueue::incoming_statement(d, chunk, &ids, false);
        out.push(d.stmt(&sql, args));
    }
    out
}

/// The coalesced leased ack of `partitions` partitions (each moving its cursor by 10), with
/// the lease guard and expiry, as the ack driver sends it (PostgreSQL: with its asynchronous
/// commit condition and `RETURNING`).
pub fn ack_statement(b: Backend, partitions: usize) -> Statement {
    let d = b.dialect();
    let moves: Vec<crate::processor::CursorMove> = (1..=partitions as i64)
        .map(|p| (p, 100 * p, 100 * p + 10))
        .collect();
    let (sql, args) = crate::processor::coalesce::ack_sql(d, &moves, Utc::now(), "bench-1");
    d.stmt(&sql, args)
}

/// The writes of one sequencer pass that moves `rows` rows spread over `partitions`
/// partitions. PostgreSQL: the whole pass is one statement (the trickle form with hand-off,
/// what a B=1 load sends), whose text does not depend on the row count. MySQL: the
/// text-protocol write batches. SQLite: the write statements of the pass.
pub fn sequencer_pass(b: Backend, rows: usize, partitions: usize) -> Vec<Statement> {
    let d = b.dialect();
    let parts = partitions.max(1) as i64;
    let outgoing: Vec<(i64, i64, i64)> = (0..rows as i64)
        .map(|k| (k % parts + 1, 1_000_000 + k, 5_000 + k / parts))
        .collect();
    let incoming: Vec<i64> = (0..rows as i64).map(|k| 2_000_000 + k).collect();
    let new_seq: Vec<(i64, i64)> = (1..=parts.min(rows as i64))
        .map(|p| (p, 5_000 + rows as i64 / parts))
        .collect();
    match d {
        Dialect::Postgres => {
            let here = (1..=parts)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let sql = postgres::sequence_pass_sql(
                postgres::PassCandidates::Probe(crate::sequencer::MAX_PARTITIONS_PER_PASS),
                &here,
                true,
            );
            let open: Vec<i64> = (1..=parts).collect();
            let mut args = vec![Value::from("bench-1"), Value::from(100i64)];
            args.extend(d.list_args(&open));
            vec![d.stmt(&sql, args)]
        }
        Dialect::MySql => mysql::sequence_writes(&outgoing, &incoming, &new_seq, Utc::now())
            .into_iter()
            .map(|(sql, _)| Statement::from_string(d.backend(), sql))
            .collect(),
        Dialect::Sqlite => {
            let (writes, _) = sqlite::sequence_writes(&outgoing, &incoming, &new_seq, Utc::now());
            writes
                .into_iter()
                .map(|(sql, args)| d.stmt(&sql, args))
                .collect()
        }
    }
}

/// Vacuum's body delete for `ids` ids (MySQL: the id-driven join; elsewhere an `IN` list, on
/// PostgreSQL one array).
pub fn delete_bodies(b: Backend, ids: usize) -> Statement {
    let d = b.dialect();
    let list: Vec<i64> = (1..=ids as i64).collect();
    let sql = d.delete_ids("modkit_outbox_body", ids, "");
    d.stmt(&sql, d.list_args(&list))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders_match(s: &Statement) {
        let n = s.values.as_ref().map_or(0, |v| v.0.len());
        let marks = if s.db_backend == sea_orm::DbBackend::Postgres {
            s.sql.matches('$').count()
        } else {
            s.sql.matches('?').count()
        };
        assert_eq!(marks, n, "{}", s.sql);
    }

    #[test]
    fn every_builder_binds_what_it_marks() {
        let msgs: Vec<NewMessage> = (0..3u32)
            .map(|p| NewMessage::new("q", p, vec![7u8; 100], "t").header("k", "v"))
            .collect();
        for b in Backend::ALL {
            for n in [1, 3] {
                let stmts = enqueue_statements(b, &msgs[..n]);
                let expect = if n == 1 && b != Backend::MySql { 1 } else { 2 };
                assert_eq!(stmts.len(), expect, "{b:?} {n}");
                stmts.iter().for_each(placeholders_match);
            }
            placeholders_match(&ack_statement(b, 8));
            placeholders_match(&delete_bodies(b, 100));
            let pass = sequencer_pass(b, 15, 8);
            assert!(!pass.is_empty());
            if b != Backend::MySql {
                pass.iter().for_each(placeholders_match);
            }
        }
    }
}
