//! sea-orm-migration CLI for the outbox schema.
//!
//! `cargo run -p modkit-outbox-migration -- up|down|status|fresh|refresh` (or
//! `sea-orm-cli migrate -d migrations up`), with `DATABASE_URL` (or `-u URL`) pointing at
//! PostgreSQL, MySQL/MariaDB or SQLite (`sqlite://outbox.sqlite?mode=rwc`).

use sea_orm_migration::sea_orm::Database;

#[tokio::main]
async fn main() {
    // One connection: sea-orm's `fresh` on SQLite switches `PRAGMA foreign_keys` off, drops the
    // tables and switches it back on as separate statements, which must all run on the same
    // connection (on a bigger pool a drop can fail on the rows it finds).
    sea_orm_migration::cli::run_cli_with_connection(modkit_outbox_migration::Migrator, |mut o| {
        o.max_connections(1);
        Database::connect(o)
    })
    .await;
}
