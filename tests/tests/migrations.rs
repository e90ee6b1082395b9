//! Schema and migration tests, on every backend: every table, column (type and nullability) and
//! index exists after `up`; `up` twice is harmless; a half-applied migration recovers; `down`
//! leaves nothing.

use modkit_outbox::{Outbox, OutboxError, Partitions};
use modkit_outbox_migration::{Migrator, TABLES};
use modkit_outbox_tests::{Backend, TestDb, backend_tests};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use sea_orm_migration::MigratorTrait;

/// Logical column types, mapped to what each backend's catalogue reports.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// Primary-key identity / autoincrement id.
    Id,
    BigInt,
    Int,
    Bytes,
    Text,
    VarChar,
    Time,
}

const N: bool = true; // nullable
const R: bool = false; // required

/// (column, type, nullable)
type ColumnSpec = (&'static str, Ty, bool);

fn expected_columns() -> Vec<(&'static str, Vec<ColumnSpec>)> {
    use Ty::*;
    vec![
        (
            "modkit_outbox_body",
            vec![
                ("id", Id, R),
                ("payload", Bytes, R),
                ("payload_type", VarChar, R),
                ("headers", Text, N),
                ("batch_token", BigInt, N),
                ("created_at", Time, R),
            ],
        ),
        (
            "modkit_outbox_partitions",
            vec![
                ("id", Id, R),
                ("queue", VarChar, R),
                ("partition", Int, R),
                ("sequence", BigInt, R),
            ],
        ),
        (
            "modkit_outbox_incoming",
            vec![
                ("id", Id, R),
                ("partition_id", BigInt, R),
                ("body_id", BigInt, R),
            ],
        ),
        (
            "modkit_outbox_outgoing",
            vec![
                ("partition_id", BigInt, R),
                ("body_id", BigInt, R),
                ("seq", BigInt, R),
                ("sequenced_at", Time, R),
            ],
        ),
        (
            "modkit_outbox_dead_letters",
            vec![
                ("id", Id, R),
                ("partition_id", BigInt, R),
                ("queue", VarChar, R),
                ("partition", Int, R),
                ("seq", BigInt, R),
                ("message_id", BigInt, R),
                ("payload", Bytes, R),
                ("payload_type", VarChar, R),
                ("headers", Text, N),
                ("created_at", Time, R),
                ("failed_at", Time, R),
                ("last_error", Text, N),
                ("attempts", BigInt, R),
                ("status", VarChar, R),
                ("claimed_by", VarChar, N),
                ("completed_at", Time, N),
                ("deadline", Time, N),
            ],
        ),
        (
            "modkit_outbox_processor",
            vec![
                ("partition_id", BigInt, R),
                ("processed_seq", BigInt, R),
                ("attempts", BigInt, R),
                ("last_error", Text, N),
                ("retry_at", Time, N),
                ("locked_by", VarChar, N),
                ("locked_until", Time, N),
            ],
        ),
        (
            "modkit_outbox_vacuum_counter",
            vec![("partition_id", BigInt, R), ("counter", BigInt, R)],
        ),
    ]
}

/// (table, columns in order, unique)
const EXPECTED_INDEXES: &[(&str, &[&str], bool)] = &[
    ("modkit_outbox_partitions", &["queue", "partition"], true),
    ("modkit_outbox_outgoing", &["partition_id", "seq"], true),
    ("modkit_outbox_dead_letters", &["status", "deadline"], false),
    (
        "modkit_outbox_dead_letters",
        &["status", "failed_at"],
        false,
    ),
    (
        "modkit_outbox_dead_letters",
        &["partition_id", "seq"],
        false,
    ),
];

/// (table, column, referenced table)
const EXPECTED_FKS: &[(&str, &str, &str)] = &[
    (
        "modkit_outbox_dead_letters",
        "partition_id",
        "modkit_outbox_partitions",
    ),
    (
        "modkit_outbox_processor",
        "partition_id",
        "modkit_outbox_partitions",
    ),
    (
        "modkit_outbox_vacuum_counter",
        "partition_id",
        "modkit_outbox_partitions",
    ),
];

fn type_matches(backend: Backend, ty: Ty, reported: &str) -> bool {
    let r = reported.to_ascii_lowercase();
    match backend {
        Backend::Postgres => match ty {
            Ty::Id | Ty::BigInt => r == "bigint",
            Ty::Int => r == "integer",
            Ty::Bytes => r == "bytea",
            Ty::Text => r == "text",
            Ty::VarChar => r == "character varying",
            Ty::Time => r == "timestamp with time zone",
        },
        Backend::MySql => match ty {
            Ty::Id | Ty::BigInt => r == "bigint",
            Ty::Int => r == "int",
            Ty::Bytes => r == "longblob",
            Ty::Text => r == "text",
            Ty::VarChar => r == "varchar",
            Ty::Time => r == "timestamp",
        },
        Backend::Sqlite => match ty {
            Ty::Id => r == "integer",
            Ty::BigInt => r == "bigint",
            Ty::Int => r == "integer",
            Ty::Bytes => r == "blob",
            Ty::Text | Ty::Time => r == "text",
            Ty::VarChar => r.starts_with("varchar"),
        },
    }
}

async fn rows(conn: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    conn.query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn s(row: &sea_orm::QueryResult, col: &str) -> String {
    row.try_get::<String>("", col)
        .unwrap_or_else(|e| panic!("column {col}: {e}"))
}

/// (column, type, nullable) as the catalogue reports them.
async fn columns_of(db: &TestDb, table: &str) -> Vec<(String, String, bool)> {
    let c = &db.conn;
    match db.backend {
        Backend::Postgres => rows(
            c,
            &format!(
                "SELECT column_name::text AS name, data_type::text AS ty, is_nullable::text AS nul \
                 FROM information_schema.columns WHERE table_schema = current_schema() \
                 AND table_name = '{table}' ORDER BY ordinal_position"
            ),
        )
        .await
        .iter()
        .map(|r| (s(r, "name"), s(r, "ty"), s(r, "nul") == "YES"))
        .collect(),
        Backend::MySql => rows(
            c,
            &format!(
                "SELECT CAST(COLUMN_NAME AS CHAR) AS name, CAST(DATA_TYPE AS CHAR) AS ty, \
                 CAST(IS_NULLABLE AS CHAR) AS nul FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = '{table}' \
                 ORDER BY ORDINAL_POSITION"
            ),
        )
        .await
        .iter()
        .map(|r| (s(r, "name"), s(r, "ty"), s(r, "nul") == "YES"))
        .collect(),
        Backend::Sqlite => rows(
            c,
            &format!(
                "SELECT name, type AS ty, \"notnull\" AS nn, pk FROM pragma_table_info('{table}')"
            ),
        )
        .await
        .iter()
        .map(|r| {
            let nn: i32 = r.try_get("", "nn").expect("notnull");
            let pk: i32 = r.try_get("", "pk").expect("pk");
            (s(r, "name"), s(r, "ty"), nn == 0 && pk == 0)
        })
        .collect(),
    }
}

/// Every index of `table` as (columns in order, unique).
async fn indexes_of(db: &TestDb, table: &str) -> Vec<(Vec<String>, bool)> {
    let c = &db.conn;
    match db.backend {
        Backend::Postgres => rows(
            c,
            &format!(
                "SELECT i.relname::text AS name, ix.indisunique AS uq, \
                 array_to_string(ARRAY(SELECT a.attname::text FROM unnest(ix.indkey) WITH ORDINALITY k(attnum, ord) \
                   JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum ORDER BY k.ord), ',') AS cols \
                 FROM pg_index ix JOIN pg_class t ON t.oid = ix.indrelid JOIN pg_class i ON i.oid = ix.indexrelid \
                 WHERE t.relname = '{table}'"
            ),
        )
        .await
        .iter()
        .map(|r| {
            let uq: bool = r.try_get("", "uq").expect("uq");
            (s(r, "cols").split(',').map(str::to_owned).collect(), uq)
        })
        .collect(),
        Backend::MySql => {
            let rs = rows(
                c,
                &format!(
                    "SELECT CAST(INDEX_NAME AS CHAR) AS name, CAST(COLUMN_NAME AS CHAR) AS col, \
                     CAST(NON_UNIQUE AS SIGNED) AS nu FROM information_schema.statistics \
                     WHERE table_schema = DATABASE() AND table_name = '{table}' \
                     ORDER BY INDEX_NAME, SEQ_IN_INDEX"
                ),
            )
            .await;
            let mut out: Vec<(String, Vec<String>, bool)> = Vec::new();
            for r in &rs {
                let name = s(r, "name");
                let nu: i64 = r.try_get("", "nu").expect("nu");
                match out.last_mut() {
                    Some((n, cols, _)) if *n == name => cols.push(s(r, "col")),
                    _ => out.push((name, vec![s(r, "col")], nu == 0)),
                }
            }
            out.into_iter().map(|(_, c, u)| (c, u)).collect()
        }
        Backend::Sqlite => {
            let list = rows(
                c,
                &format!("SELECT name, \"unique\" AS uq FROM pragma_index_list('{table}')"),
            )
            .await;
            let mut out = Vec::new();
            for r in &list {
                let name = s(r, "name");
                let uq: i32 = r.try_get("", "uq").expect("unique");
                let cols = rows(
                    c,
                    &format!("SELECT name FROM pragma_index_info('{name}') ORDER BY seqno"),
                )
                .await
                .iter()
                .map(|r| s(r, "name"))
                .collect();
                out.push((cols, uq != 0));
            }
            out
        }
    }
}

/// The primary key's columns, in key order.
async fn primary_key_of(db: &TestDb, table: &str) -> Vec<String> {
    let sql = match db.backend {
        Backend::Postgres => format!(
            "SELECT a.attname::text AS name FROM pg_index ix \
             CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum \
             WHERE ix.indrelid = '{table}'::regclass AND ix.indisprimary ORDER BY k.ord"
        ),
        Backend::MySql => format!(
            "SELECT CAST(COLUMN_NAME AS CHAR) AS name FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = '{table}' \
             AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX"
        ),
        Backend::Sqlite => {
            format!("SELECT name FROM pragma_table_info('{table}') WHERE pk > 0 ORDER BY pk")
        }
    };
    rows(&db.conn, &sql)
        .await
        .iter()
        .map(|r| s(r, "name"))
        .collect()
}

/// (column, referenced table) for every foreign key of `table`.
async fn foreign_keys_of(db: &TestDb, table: &str) -> Vec<(String, String)> {
    let c = &db.conn;
    let sql = match db.backend {
        Backend::Postgres => format!(
            "SELECT kcu.column_name::text AS col, ccu.table_name::text AS reft \
             FROM information_schema.table_constraints tc \
             JOIN information_schema.key_column_usage kcu ON tc.constraint_name = kcu.constraint_name \
               AND tc.table_schema = kcu.table_schema \
             JOIN information_schema.constraint_column_usage ccu ON ccu.constraint_name = tc.constraint_name \
               AND ccu.table_schema = tc.table_schema \
             WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_name = '{table}'"
        ),
        Backend::MySql => format!(
            "SELECT CAST(COLUMN_NAME AS CHAR) AS col, CAST(REFERENCED_TABLE_NAME AS CHAR) AS reft \
             FROM information_schema.key_column_usage WHERE table_schema = DATABASE() \
             AND table_name = '{table}' AND REFERENCED_TABLE_NAME IS NOT NULL"
        ),
        Backend::Sqlite => {
            format!(
                "SELECT \"from\" AS col, \"table\" AS reft FROM pragma_foreign_key_list('{table}')"
            )
        }
    };
    rows(c, &sql)
        .await
        .iter()
        .map(|r| (s(r, "col"), s(r, "reft")))
        .collect()
}

async fn outbox_tables(db: &TestDb) -> Vec<String> {
    let sql = match db.backend {
        Backend::Postgres => {
            "SELECT table_name::text AS name FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name LIKE 'modkit\\_outbox\\_%'"
        }
        Backend::MySql => {
            "SELECT CAST(TABLE_NAME AS CHAR) AS name FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name LIKE 'modkit\\_outbox\\_%'"
        }
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'modkit!_outbox!_%' ESCAPE '!'"
        }
    };
    let mut names: Vec<String> = rows(&db.conn, sql)
        .await
        .iter()
        .map(|r| s(r, "name"))
        .collect();
    names.sort();
    names
}

/// Asserts the complete schema: tables, columns with types and nullability, indexes, foreign keys.
async fn assert_full_schema(db: &TestDb) {
    let mut want: Vec<String> = TABLES.iter().map(|t| t.to_string()).collect();
    want.sort();
    assert_eq!(
        outbox_tables(db).await,
        want,
        "{:?}: outbox tables",
        db.backend
    );

    for (table, cols) in expected_columns() {
        let got = columns_of(db, table).await;
        assert_eq!(
            got.len(),
            cols.len(),
            "{:?}: {table} has columns {got:?}",
            db.backend
        );
        for (name, ty, nullable) in cols {
            let (_, reported, is_null) = got
                .iter()
                .find(|(n, _, _)| n == name)
                .unwrap_or_else(|| panic!("{:?}: {table}.{name} missing", db.backend));
            assert!(
                type_matches(db.backend, ty, reported),
                "{:?}: {table}.{name} has type {reported}, want {ty:?}",
                db.backend
            );
            assert_eq!(
                *is_null, nullable,
                "{:?}: {table}.{name} nullability",
                db.backend
            );
        }
    }

    for (table, cols, unique) in EXPECTED_INDEXES {
        let got = indexes_of(db, table).await;
        let want: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        assert!(
            got.iter().any(|(c, u)| *c == want && u == unique),
            "{:?}: {table} lacks index {want:?} (unique={unique}); has {got:?}",
            db.backend
        );
    }

    // The sequencers of PostgreSQL and MySQL read `incoming` per partition; SQLite's reads its
    // prefix in rowid order, and the second migration drops the index there (every enqueue
    // paid a scattered B-tree insert for it).
    let got = indexes_of(db, "modkit_outbox_incoming").await;
    let per_partition = vec!["partition_id".to_owned(), "id".to_owned()];
    assert_eq!(
        got.iter().any(|(c, u)| *c == per_partition && !u),
        db.backend != Backend::Sqlite,
        "{:?}: incoming's (partition_id, id) index; has {got:?}",
        db.backend
    );

    // The third migration: no `body_id` index on the queue tables (two index entries per
    // message for the orphan sweep alone), and `outgoing` keyed by `(partition_id, seq)`.
    for table in ["modkit_outbox_incoming", "modkit_outbox_outgoing"] {
        let got = indexes_of(db, table).await;
        assert!(
            !got.iter().any(|(c, _)| c.iter().any(|c| c == "body_id")),
            "{:?}: {table} has a body_id index; has {got:?}",
            db.backend
        );
    }
    assert_eq!(
        primary_key_of(db, "modkit_outbox_outgoing").await,
        ["partition_id", "seq"],
        "{:?}: outgoing's primary key",
        db.backend
    );

    for (table, col, reft) in EXPECTED_FKS {
        let got = foreign_keys_of(db, table).await;
        assert!(
            got.iter().any(|(c, r)| c == col && r == reft),
            "{:?}: {table}.{col} lacks a foreign key to {reft}; has {got:?}",
            db.backend
        );
    }
    // No keys on the hot path, on purpose (docs/SCHEMA.md).
    for table in ["modkit_outbox_incoming", "modkit_outbox_outgoing"] {
        let got = foreign_keys_of(db, table).await;
        assert!(
            got.is_empty(),
            "{:?}: {table} has foreign keys {got:?}",
            db.backend
        );
    }
}

async fn applied_count(conn: &DatabaseConnection) -> usize {
    Migrator::get_applied_migrations(conn)
        .await
        .expect("applied migrations")
        .len()
}

async fn up_creates_the_full_schema(db: TestDb) {
    Migrator::up(&db.conn, None).await.expect("up");
    assert_full_schema(&db).await;
    assert_eq!(applied_count(&db.conn).await, Migrator::migrations().len());
}

async fn up_twice_is_harmless(db: TestDb) {
    Migrator::up(&db.conn, None).await.expect("first up");
    // A second `up` with nothing pending...
    Migrator::up(&db.conn, None).await.expect("second up");
    // ...and one that re-runs every statement because the record was lost.
    db.conn
        .execute_unprepared("DELETE FROM seaql_migrations")
        .await
        .expect("forget records");
    Migrator::up(&db.conn, None).await.expect("re-run up");
    assert_full_schema(&db).await;
    assert_eq!(applied_count(&db.conn).await, Migrator::migrations().len());
}

async fn half_applied_migration_recovers(db: TestDb) {
    Migrator::up(&db.conn, None).await.expect("up");
    // Reproduce a crash half-way: the last tables and some indexes never got created and the
    // migration was not recorded.
    let c = &db.conn;
    for t in [
        "modkit_outbox_vacuum_counter",
        "modkit_outbox_processor",
        "modkit_outbox_dead_letters",
    ] {
        c.execute_unprepared(&format!("DROP TABLE {t}"))
            .await
            .expect("drop");
    }
    if db.backend == Backend::Postgres {
        // PostgreSQL creates indexes in separate statements; lose one.
        c.execute_unprepared("DROP INDEX modkit_outbox_incoming_partition_idx")
            .await
            .expect("drop index");
    }
    c.execute_unprepared("DELETE FROM seaql_migrations")
        .await
        .expect("forget records");
    assert_eq!(applied_count(c).await, 0);

    Migrator::up(c, None).await.expect("up after crash");
    assert_full_schema(&db).await;
    assert_eq!(applied_count(c).await, Migrator::migrations().len());
}

/// A one-byte payload literal, the current time, and the identifier quote, per backend.
fn literals(backend: Backend) -> (&'static str, &'static str, char) {
    match backend {
        Backend::Postgres => ("'\\x00'::bytea", "now()", '"'),
        Backend::MySql => ("X'00'", "CURRENT_TIMESTAMP(6)", '`'),
        Backend::Sqlite => ("X'00'", "'2026-01-01T00:00:00Z'", '"'),
    }
}

async fn down_leaves_nothing(db: TestDb) {
    Migrator::up(&db.conn, None).await.expect("up");
    // Rows in every table: `down` must drop in foreign-key order even when data references data.
    let c = &db.conn;
    let (ph, now, q) = literals(db.backend);
    for sql in [
        format!(
            "INSERT INTO modkit_outbox_body (payload, payload_type, created_at) VALUES ({ph}, 't', {now})"
        ),
        format!(
            "INSERT INTO modkit_outbox_partitions (queue, {q}partition{q}, {q}sequence{q}) VALUES ('q', 0, 1)"
        ),
        "INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES (1, 1)".to_owned(),
        format!(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES (1, 1, 1, {now})"
        ),
        "INSERT INTO modkit_outbox_processor (partition_id) VALUES (1)".to_owned(),
        "INSERT INTO modkit_outbox_vacuum_counter (partition_id) VALUES (1)".to_owned(),
    ] {
        c.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    Migrator::down(c, None).await.expect("down");
    assert!(
        outbox_tables(&db).await.is_empty(),
        "tables left after down"
    );
    assert_eq!(applied_count(c).await, 0);
    // And it comes back cleanly.
    Migrator::up(c, None).await.expect("up again");
    assert_full_schema(&db).await;
}

/// The third migration's `down` and `up` keep the queue rows, and its `up` finishes after a crash
/// between its steps (MySQL commits each DDL statement on its own).
async fn lean_indexes_migration_keeps_rows(db: TestDb) {
    Migrator::up(&db.conn, None).await.expect("up");
    let c = &db.conn;
    let (ph, now, q) = literals(db.backend);
    c.execute_unprepared(&format!(
        "INSERT INTO modkit_outbox_partitions (queue, {q}partition{q}, {q}sequence{q}) VALUES ('q', 0, 3)"
    ))
    .await
    .expect("partition");
    for seq in 1..=3 {
        c.execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_body (payload, payload_type, created_at) VALUES ({ph}, 't', {now})"
        ))
        .await
        .expect("body");
        c.execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) \
             VALUES (1, {seq}, {seq}, {now})"
        ))
        .await
        .expect("outgoing");
    }
    let outgoing = |c: DatabaseConnection| async move {
        rows(
            &c,
            "SELECT partition_id, body_id, seq FROM modkit_outbox_outgoing ORDER BY seq",
        )
        .await
        .iter()
        .map(|r| {
            let v = |col| r.try_get::<i64>("", col).expect(col);
            (v("partition_id"), v("body_id"), v("seq"))
        })
        .collect::<Vec<_>>()
    };
    let want = vec![(1, 1, 1), (1, 2, 2), (1, 3, 3)];

    Migrator::down(c, Some(1)).await.expect("down one");
    assert_eq!(
        outgoing(c.clone()).await,
        want,
        "{:?}: after down",
        db.backend
    );
    let cols: Vec<String> = columns_of(&db, "modkit_outbox_outgoing")
        .await
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert!(
        cols.iter().any(|n| n == "id"),
        "{:?}: down restores outgoing.id; has {cols:?}",
        db.backend
    );
    for table in ["modkit_outbox_incoming", "modkit_outbox_outgoing"] {
        let got = indexes_of(&db, table).await;
        assert!(
            got.iter().any(|(c, u)| *c == ["body_id"] && !u),
            "{:?}: down restores {table}'s body_id index; has {got:?}",
            db.backend
        );
    }
    // The old shape takes new rows again (the identity column fills itself).
    c.execute_unprepared(&format!(
        "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) \
         VALUES (1, 4, 4, {now})"
    ))
    .await
    .expect("outgoing in the old shape");
    c.execute_unprepared("DELETE FROM modkit_outbox_outgoing WHERE seq = 4")
        .await
        .expect("delete");

    if db.backend == Backend::MySql {
        // A crash after the first step: the incoming index is gone, outgoing is not rebuilt.
        c.execute_unprepared(
            "ALTER TABLE modkit_outbox_incoming DROP INDEX modkit_outbox_incoming_body_idx",
        )
        .await
        .expect("first step");
    }
    Migrator::up(c, None).await.expect("up again");
    assert_eq!(
        outgoing(c.clone()).await,
        want,
        "{:?}: after up",
        db.backend
    );
    assert_full_schema(&db).await;
    // The key refuses a second row at the same place.
    let dup = c
        .execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) \
             VALUES (1, 9, 2, {now})"
        ))
        .await;
    assert!(
        dup.is_err(),
        "{:?}: duplicate (partition, seq) accepted",
        db.backend
    );
}

/// The engine checks the schema when an outbox is built: no tables is `SchemaMissing`, a
/// database one migration behind is `SchemaOutdated` naming that migration, and neither writes
/// anything.
async fn engine_refuses_a_missing_or_outdated_schema(db: TestDb) {
    let build = |c: DatabaseConnection| async move {
        Outbox::builder(c)
            .queue("q", Partitions::of(2))
            .producer_only()
            .build()
            .await
    };
    let err = build(db.conn.clone()).await.err();
    assert!(
        matches!(err, Some(OutboxError::SchemaMissing(_))),
        "{:?}: no schema gave {err:?}",
        db.backend
    );

    Migrator::up(&db.conn, None).await.expect("up");
    Migrator::down(&db.conn, Some(1)).await.expect("down one");
    let err = build(db.conn.clone()).await.err();
    match &err {
        Some(e @ OutboxError::SchemaOutdated { migration }) => {
            assert_eq!(*migration, "m20261124_000003_lean_queue_indexes");
            assert!(e.to_string().contains(migration), "{e}");
        }
        other => panic!("{:?}: outdated schema gave {other:?}", db.backend),
    }
    let partitions = rows(&db.conn, "SELECT id FROM modkit_outbox_partitions").await;
    assert!(
        partitions.is_empty(),
        "{:?}: a refused build wrote partitions",
        db.backend
    );

    Migrator::up(&db.conn, None).await.expect("up again");
    build(db.conn.clone()).await.expect("current schema");

    if db.backend == Backend::Postgres {
        // The check resolves the table through the search path, as the engine's statements
        // do: tables in `public` behind an empty first schema are found.
        db.conn
            .execute_unprepared("CREATE SCHEMA app_first")
            .await
            .expect("schema");
        let sep = if db.url.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{sep}options=-c%20search_path%3Dapp_first%2Cpublic",
            db.url
        );
        let conn = sea_orm::Database::connect(url.as_str())
            .await
            .expect("connect with a search path");
        let first = rows(&conn, "SELECT current_schema()::text AS s").await;
        assert_eq!(
            s(&first[0], "s"),
            "app_first",
            "the search path took effect"
        );
        build(conn)
            .await
            .expect("tables found through the search path");
    }
}

backend_tests!(
    engine_refuses_a_missing_or_outdated_schema,
    lean_indexes_migration_keeps_rows,
    up_creates_the_full_schema,
    up_twice_is_harmless,
    half_applied_migration_recovers,
    down_leaves_nothing,
);
