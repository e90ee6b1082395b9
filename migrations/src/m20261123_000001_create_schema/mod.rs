//! The initial outbox schema: seven tables, their indexes and foreign keys (none on the hot-path
//! tables `incoming` and `outgoing`: each would cost a locking lookup per message; see
//! docs/SCHEMA.md).
//!
//! Each backend gets its own DDL (identity columns, blob and time types differ too much for one
//! portable definition to stay readable). Every statement is idempotent, so `up` recovers from a
//! crash half-way on every backend: PostgreSQL and SQLite use `IF NOT EXISTS` on tables and indexes;
//! MySQL has no `CREATE INDEX IF NOT EXISTS`, so its indexes are declared inside `CREATE TABLE`,
//! which MySQL 8 and MariaDB 10.6+ create atomically.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

mod mysql;
mod postgres;
mod sqlite;

/// Creates the seven `modkit_outbox_` tables.
pub struct Migration;

impl MigrationName for Migration {
    // Spelled out: the derive would take the file name, which is `mod` for this module.
    fn name(&self) -> &str {
        "m20261123_000001_create_schema"
    }
}

fn ddl(backend: DbBackend) -> &'static [&'static str] {
    match backend {
        DbBackend::Postgres => postgres::UP,
        DbBackend::MySql => mysql::UP,
        DbBackend::Sqlite => sqlite::UP,
        // sea-orm's backend enum is non-exhaustive; a backend we do not know gets a clear error
        // from `up` instead of half a schema.
        #[allow(unreachable_patterns)]
        _ => &[],
    }
}

// The trait's signature elides `SchemaManager`'s lifetime; naming it breaks the async-trait impl.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        let statements = ddl(manager.get_database_backend());
        if statements.is_empty() {
            return Err(DbErr::Migration(format!(
                "modkit-outbox has no schema for backend {:?}",
                manager.get_database_backend()
            )));
        }
        for sql in statements {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        for table in crate::TABLES.iter().rev() {
            conn.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
        }
        Ok(())
    }
}
