//! The start-up check that the database has the schema this engine's SQL is written for.
//!
//! The engine does not run migrations itself (a host module runs them with its own, see the
//! `modkit-outbox-migration` crate). A database migrated by an older release still answers most
//! statements, only worse: on MySQL, vacuum's `FORCE INDEX (PRIMARY)` on the old `outgoing`
//! (keyed by a surrogate id) would scan the table. So [`check`] looks at the catalogue once, when
//! an outbox is built, and names the missing migration instead.

use sea_orm::Value;

use crate::backend::{Db, Dialect};
use crate::error::{OutboxError, Result};

/// The newest migration whose shape the engine's statements depend on.
pub(crate) const REQUIRED_MIGRATION: &str = "m20261124_000003_lean_queue_indexes";

/// Fails with [`OutboxError::SchemaMissing`] when `modkit_outbox_outgoing` does not exist, and
/// with [`OutboxError::SchemaOutdated`] when it still has the first migration's surrogate `id`.
pub(crate) async fn check(db: &Db) -> Result<()> {
    let sql = match db.dialect {
        // Resolved through the search path, like every engine statement (not just the first
        // schema of the path).
        Dialect::Postgres => {
            "SELECT attname::text AS name FROM pg_attribute \
             WHERE attrelid = to_regclass(CAST(? AS text)) AND attnum > 0 AND NOT attisdropped"
        }
        Dialect::MySql => {
            "SELECT CAST(column_name AS CHAR) AS name FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
        Dialect::Sqlite => "SELECT name FROM pragma_table_info(?)",
    };
    let columns = db
        .query_all(sql, vec![Value::from("modkit_outbox_outgoing")])
        .await
        .map_err(OutboxError::SchemaMissing)?
        .iter()
        .map(|r| r.try_get::<String>("", "name"))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if columns.is_empty() {
        return Err(OutboxError::SchemaMissing(sea_orm::DbErr::Custom(
            "table modkit_outbox_outgoing not found".to_owned(),
        )));
    }
    if columns.iter().any(|c| c == "id") {
        return Err(OutboxError::SchemaOutdated {
            migration: REQUIRED_MIGRATION,
        });
    }
    Ok(())
}
