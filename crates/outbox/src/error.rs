//! Typed errors of the public API.

use sea_orm::DbErr;

/// Everything the outbox API can fail with.
///
/// Validation errors (`UnknownQueue` … `InvalidHeader`) are raised before anything is written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The queue was not registered on this outbox (see [`crate::OutboxBuilder::queue`]).
    #[error("unknown queue `{0}`")]
    UnknownQueue(String),
    /// The partition index is not below the queue's partition count.
    #[error("partition {partition} out of range for queue `{queue}` ({partitions} partitions)")]
    PartitionOutOfRange {
        /// Queue name.
        queue: String,
        /// Requested partition.
        partition: u32,
        /// Partition count of the queue.
        partitions: u32,
    },
    /// The payload is larger than [`crate::OutboxConfig::max_payload_bytes`].
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A queue name that does not match `[a-z0-9][a-z0-9_.-]{0,62}`.
    #[error("invalid queue name `{name}`: {reason}")]
    InvalidQueueName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A payload type that is empty, longer than 255 bytes or contains control characters.
    #[error("invalid payload type `{payload_type}`: {reason}")]
    InvalidPayloadType {
        /// The rejected payload type.
        payload_type: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A header name or value that breaks the header rules (see [`crate::Headers`]).
    #[error("invalid header `{name}`: {reason}")]
    InvalidHeader {
        /// Header name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A partition count of zero or above [`crate::MAX_PARTITIONS`].
    #[error("invalid partition count {0}: must be 1..={max}", max = crate::MAX_PARTITIONS)]
    InvalidPartitionCount(u32),
    /// The queue already exists in the database with another partition count.
    #[error("queue `{queue}` already exists with {existing} partitions, {requested} requested")]
    PartitionCountConflict {
        /// Queue name.
        queue: String,
        /// Partition count stored in the database.
        existing: u32,
        /// Partition count this builder asked for.
        requested: u32,
    },
    /// The same queue was declared twice on one builder.
    #[error("queue `{0}` declared twice")]
    DuplicateQueue(String),
    /// A configuration value outside its allowed range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An argument outside its allowed range or format (admin API inputs).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No dead letter with this id.
    #[error("dead letter {0} not found")]
    NotFound(i64),
    /// A dead-letter transition attempted from a state that does not allow it; nothing changed.
    #[error("dead letter {id} is {status}, expected {expected}; nothing changed")]
    WrongState {
        /// Dead-letter id.
        id: i64,
        /// Its current status.
        status: crate::dead_letters::DeadLetterStatus,
        /// What the transition needs.
        expected: String,
    },
    /// Rows changed under a multi-row operation, which was rolled back; retry it.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend is not one the outbox supports.
    #[error("unsupported database backend {0}")]
    UnsupportedBackend(String),
    /// The outbox schema is missing: run the `modkit-outbox-migration` migrations first.
    #[error("outbox schema missing (run the modkit-outbox migrations): {0}")]
    SchemaMissing(DbErr),
    /// The outbox schema predates this engine: a migration of `modkit-outbox-migration` has not
    /// been applied. Nothing was written; run the migrations, then build the outbox again.
    #[error(
        "outbox schema is older than this engine: apply migration `{migration}` (modkit-outbox-migration)"
    )]
    SchemaOutdated {
        /// The newest migration the engine needs.
        migration: &'static str,
    },
    /// A database error.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// Result alias for the outbox API.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;
