//! # modkit-outbox
//!
//! A transactional outbox for sea-orm services on PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! A service writes a message in the same database transaction as its business change; the
//! engine then delivers it, in order per partition, to a handler: exactly once for database side
//! effects ([`QueueBuilder::transactional`]) or at least once with leases
//! ([`QueueBuilder::leased`]).
//!
//! Pipeline: **enqueue** (inside the caller's transaction: a `body` and an `incoming` row) →
//! **sequencer** (gapless per-partition `seq` in `outgoing`) → one **processor** per partition
//! across all instances → **dead letters** for rejected or exhausted messages → **vacuum**.
//! See `docs/ARCHITECTURE.md` and `docs/GUARANTEES.md` in the repository.
//!
//! ```no_run
//! use modkit_outbox::{Message, Outbox, Outcome, Partitions, HandlerResult};
//! use sea_orm::{ConnectOptions, Database, TransactionTrait};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // SQLite has one writer: the outbox and your writes share one connection.
//! let mut opts = ConnectOptions::new("sqlite://outbox.sqlite?mode=rwc");
//! opts.max_connections(1);
//! let db = Database::connect(opts).await?;
//! // (run modkit_outbox_migration::Migrator::up(&db, None) first)
//! let handle = Outbox::builder(db.clone())
//!     .queue("orders", Partitions::of(8))
//!     .leased(|msg: Message| async move {
//!         tracing::info!(seq = msg.seq, "order event");
//!         HandlerResult::Ok(Outcome::Ack)
//!     })
//!     .start()
//!     .await?;
//!
//! let outbox = handle.outbox();
//! let txn = db.begin().await?;
//! // ... business writes on `txn` ...
//! outbox.enqueue_keyed(&txn, "orders", "order-42", &b"{\"id\":42}"[..], "order.created").await?;
//! txn.commit().await?;
//!
//! handle.stop().await;
//! # Ok(()) }
//! ```

mod backend;
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod bench_internals;
mod config;
mod dead_letters;
mod enqueue;
mod error;
mod handler;
mod message;
mod outbox;
mod processor;
mod queues;
mod schema;
mod sequencer;
mod signals;
mod stats;
mod vacuum;
mod workers;

pub use config::{
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_BATCH_SIZE, DEFAULT_LEASE_TTL,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_ORPHAN_MIN_AGE,
    DEFAULT_ORPHAN_SWEEP_INTERVAL, DEFAULT_POLL_INTERVAL, DEFAULT_SEQUENCER_BATCH,
    DEFAULT_SEQUENCER_LINGER_MYSQL, DEFAULT_SEQUENCER_LINGER_POSTGRES,
    DEFAULT_SEQUENCER_LINGER_SQLITE, DEFAULT_SEQUENCER_WORKERS, DEFAULT_SEQUENCER_WORKERS_MYSQL,
    DEFAULT_SHARED_TXN_MAX_HANDLER_TIME, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_VACUUM_CHUNK,
    DEFAULT_VACUUM_INTERVAL, FOREIGN_POLL_MIN, MAX_BACKOFF, MAX_LEASE_TTL, MAX_PARTITIONS,
    MAX_SEQUENCER_LINGER, OutboxConfig, RetryPolicy,
};
pub use dead_letters::{
    DEFAULT_PAGE_SIZE, DEFAULT_PURGE_CHUNK, DeadLetter, DeadLetterFilter, DeadLetterPage,
    DeadLetterStatus, DeadLetters, MAX_BATCH, MAX_PAGE_SIZE, ReplayReport, StatusCount,
};
pub use enqueue::EnqueueConn;
pub use error::{OutboxError, Result};
pub use handler::{
    HandlerError, HandlerResult, LeasedBatchHandler, LeasedHandler, Outcome,
    TransactionalBatchHandler, TransactionalHandler,
};
pub use message::{
    Headers, MAX_ERROR_TEXT_BYTES, MAX_HEADER_NAME_BYTES, MAX_HEADER_VALUE_BYTES, MAX_HEADERS,
    MAX_HEADERS_BYTES, MAX_PAYLOAD_TYPE_BYTES, MAX_QUEUE_NAME_BYTES, Message, MessageId,
    NewMessage, Partitions, partition_for_key,
};
pub use outbox::{Outbox, OutboxBuilder, OutboxHandle, QueueBuilder};
pub use stats::{OutboxStats, PartitionStats, collect_stats};
