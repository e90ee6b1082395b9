//! sea-orm-migration CLI for the outbox schema.
//!
//! `cargo run -p modkit-outbox-migration -- up|down|status|fresh|refresh` (or
//! `sea-orm-cli migrate -d migrations up`), with `DATABASE_URL` (or `-u URL`) pointing at
//! PostgreSQL, MySQL/MariaDB or SQLite (`sqlite://outbox.sqlite?mode=rwc`).

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(modkit_outbox_migration::Migrator).await;
}
