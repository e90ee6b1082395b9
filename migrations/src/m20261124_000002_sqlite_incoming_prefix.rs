//! SQLite only: drops the `(partition_id, id)` index of `incoming`.
//!
//! SQLite has one writer, so every committed `incoming` row's id is above every earlier
//! commit's, and the sequencer reads the table's prefix in rowid order instead of per partition.
//! Nothing else looks rows up by partition on the hot path, and the index cost every enqueue a
//! B-tree insert at one place per partition: with 64 partitions a 100-row commit dirtied pages
//! all over the index, each written to the WAL at commit (paired B=100 runs at 64 partitions:
//! 21.3k msg/s with the index and the old pass, 29.0k without). PostgreSQL and MySQL keep theirs: their
//! sequencers lock and read per partition, several at once.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// Drops SQLite's `modkit_outbox_incoming_partition_idx`; a no-op on PostgreSQL and MySQL.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000002_sqlite_incoming_prefix"
    }
}

// The trait's signature elides `SchemaManager`'s lifetime; naming it breaks the async-trait impl.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Sqlite {
            manager
                .get_connection()
                .execute_unprepared("DROP INDEX IF EXISTS modkit_outbox_incoming_partition_idx")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Sqlite {
            // `down` of the whole schema runs after this one and drops the table anyway; on a
            // partial rollback the index is back as the first migration created it.
            let conn = manager.get_connection();
            let exists = conn
                .query_one_raw(sea_orm_migration::sea_orm::Statement::from_string(
                    DbBackend::Sqlite,
                    "SELECT 1 AS one FROM sqlite_master WHERE type = 'table' \
                     AND name = 'modkit_outbox_incoming'",
                ))
                .await?
                .is_some();
            if exists {
                conn.execute_unprepared(
                    "CREATE INDEX IF NOT EXISTS modkit_outbox_incoming_partition_idx \
                     ON modkit_outbox_incoming (partition_id, id)",
                )
                .await?;
            }
        }
        Ok(())
    }
}
