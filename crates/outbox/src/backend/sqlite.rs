//! SQLite specifics. One writer at a time: the engine serializes its own write transactions and
//! starts them with `BEGIN IMMEDIATE`, so they wait for producers (busy timeout) instead of failing
//! on a lock upgrade. Several processes on one file stay correct (every write transaction is
//! serialized by SQLite) but gain nothing; run one engine per file.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

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
