//! SQLite DDL (SQLite 3.35 or newer; sqlx bundles a current one). Times are UTC RFC 3339 text.
//! `AUTOINCREMENT` keeps ids from being reused after vacuum deletes the newest rows, so a message
//! id stays a valid idempotency key.

pub(super) const UP: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_body (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        payload BLOB NOT NULL,
        payload_type VARCHAR(255) NOT NULL,
        headers TEXT NULL,
        batch_token BIGINT NULL,
        created_at TEXT NOT NULL
    )"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_partitions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue VARCHAR(63) NOT NULL,
        "partition" INTEGER NOT NULL,
        "sequence" BIGINT NOT NULL DEFAULT 0,
        CONSTRAINT modkit_outbox_partitions_queue_partition_uq UNIQUE (queue, "partition")
    )"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_incoming (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_id BIGINT NOT NULL,
        body_id BIGINT NOT NULL
    )"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_incoming_partition_idx
        ON modkit_outbox_incoming (partition_id, id)"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_incoming_body_idx
        ON modkit_outbox_incoming (body_id)"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_outgoing (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_id BIGINT NOT NULL,
        body_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        sequenced_at TEXT NOT NULL,
        CONSTRAINT modkit_outbox_outgoing_partition_seq_uq UNIQUE (partition_id, seq)
    )"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_outgoing_body_idx
        ON modkit_outbox_outgoing (body_id)"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_id BIGINT NOT NULL REFERENCES modkit_outbox_partitions (id),
        queue VARCHAR(63) NOT NULL,
        "partition" INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        message_id BIGINT NOT NULL,
        payload BLOB NOT NULL,
        payload_type VARCHAR(255) NOT NULL,
        headers TEXT NULL,
        created_at TEXT NOT NULL,
        failed_at TEXT NOT NULL,
        last_error TEXT NULL,
        attempts BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL,
        claimed_by VARCHAR(64) NULL,
        completed_at TEXT NULL,
        deadline TEXT NULL
    )"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_dead_letters_replay_idx
        ON modkit_outbox_dead_letters (status, deadline)"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_dead_letters_list_idx
        ON modkit_outbox_dead_letters (status, failed_at)"#,
    r#"CREATE INDEX IF NOT EXISTS modkit_outbox_dead_letters_partition_idx
        ON modkit_outbox_dead_letters (partition_id, seq)"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_processor (
        partition_id BIGINT PRIMARY KEY REFERENCES modkit_outbox_partitions (id),
        processed_seq BIGINT NOT NULL DEFAULT 0,
        attempts BIGINT NOT NULL DEFAULT 0,
        last_error TEXT NULL,
        retry_at TEXT NULL,
        locked_by VARCHAR(64) NULL,
        locked_until TEXT NULL
    )"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_vacuum_counter (
        partition_id BIGINT PRIMARY KEY REFERENCES modkit_outbox_partitions (id),
        counter BIGINT NOT NULL DEFAULT 0
    )"#,
];
