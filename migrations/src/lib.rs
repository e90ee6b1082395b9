//! sea-orm migrations for the modkit-outbox schema.
//!
//! The outbox keeps its state in seven tables prefixed `modkit_outbox_` (see `docs/SCHEMA.md`).
//! A host module either runs [`Migrator`] on its own, or splices [`outbox_migrations`] into its own
//! migrator next to its business tables:
//!
//! ```no_run
//! use sea_orm_migration::prelude::*;
//!
//! struct HostMigrator;
//!
//! #[async_trait::async_trait]
//! impl MigratorTrait for HostMigrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all = modkit_outbox_migration::outbox_migrations();
//!         // all.push(Box::new(m20260101_000001_create_orders::Migration));
//!         all
//!     }
//! }
//! ```
//!
//! Every migration is idempotent: running `up` again after a crash half-way finishes the job on
//! PostgreSQL, MySQL/MariaDB and SQLite, and `down` drops the tables in foreign-key order.

use sea_orm_migration::prelude::*;

mod m20261123_000001_create_schema;
mod m20261124_000002_sqlite_incoming_prefix;
mod m20261124_000003_lean_queue_indexes;

/// Every table the outbox owns, in creation (foreign-key) order. `down` drops them in reverse.
pub const TABLES: [&str; 7] = [
    "modkit_outbox_body",
    "modkit_outbox_partitions",
    "modkit_outbox_incoming",
    "modkit_outbox_outgoing",
    "modkit_outbox_dead_letters",
    "modkit_outbox_processor",
    "modkit_outbox_vacuum_counter",
];

/// The outbox migrations, oldest first, for splicing into a host module's migrator.
pub fn outbox_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261123_000001_create_schema::Migration),
        Box::new(m20261124_000002_sqlite_incoming_prefix::Migration),
        Box::new(m20261124_000003_lean_queue_indexes::Migration),
    ]
}

/// Standalone migrator for the outbox schema (used by this crate's CLI and by the demo).
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        outbox_migrations()
    }
}
