//! MySQL 8.0+ / MariaDB 10.6+ DDL (InnoDB, utf8mb4). MySQL has no `CREATE INDEX IF NOT EXISTS`,
//! so every index lives inside its `CREATE TABLE IF NOT EXISTS`, which both servers create
//! atomically: after a crash a table exists with all its indexes or not at all.
//! Times are `TIMESTAMP(6)` in UTC (sqlx sets the session time zone to `+00:00`).
//!
//! As on every backend, `incoming` and `outgoing` have no foreign keys (docs/SCHEMA.md). Here it
//! matters twice: an InnoDB check takes a shared lock on the parent `partitions` row until the
//! producer commits, and the sequencer must lock that row exclusively (with `SKIP LOCKED`) to
//! advance the partition's sequence, so every open producer transaction would hold the
//! sequencer off its partition.

pub(super) const UP: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_body (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        payload LONGBLOB NOT NULL,
        payload_type VARCHAR(255) NOT NULL,
        headers TEXT NULL,
        batch_token BIGINT NULL,
        created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_partitions (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        queue VARCHAR(63) NOT NULL,
        `partition` INT NOT NULL,
        `sequence` BIGINT NOT NULL DEFAULT 0,
        UNIQUE KEY modkit_outbox_partitions_queue_partition_uq (queue, `partition`)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_incoming (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        partition_id BIGINT NOT NULL,
        body_id BIGINT NOT NULL,
        KEY modkit_outbox_incoming_partition_idx (partition_id, id),
        KEY modkit_outbox_incoming_body_idx (body_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_outgoing (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        partition_id BIGINT NOT NULL,
        body_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        sequenced_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        UNIQUE KEY modkit_outbox_outgoing_partition_seq_uq (partition_id, seq),
        KEY modkit_outbox_outgoing_body_idx (body_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_dead_letters (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        partition_id BIGINT NOT NULL,
        queue VARCHAR(63) NOT NULL,
        `partition` INT NOT NULL,
        seq BIGINT NOT NULL,
        message_id BIGINT NOT NULL,
        payload LONGBLOB NOT NULL,
        payload_type VARCHAR(255) NOT NULL,
        headers TEXT NULL,
        created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        failed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        last_error TEXT NULL,
        attempts BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL,
        claimed_by VARCHAR(64) NULL,
        completed_at TIMESTAMP(6) NULL DEFAULT NULL,
        deadline TIMESTAMP(6) NULL DEFAULT NULL,
        KEY modkit_outbox_dead_letters_replay_idx (status, deadline),
        KEY modkit_outbox_dead_letters_list_idx (status, failed_at),
        KEY modkit_outbox_dead_letters_partition_idx (partition_id, seq),
        CONSTRAINT modkit_outbox_dead_letters_partition_fk FOREIGN KEY (partition_id)
            REFERENCES modkit_outbox_partitions (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_processor (
        partition_id BIGINT NOT NULL PRIMARY KEY,
        processed_seq BIGINT NOT NULL DEFAULT 0,
        attempts BIGINT NOT NULL DEFAULT 0,
        last_error TEXT NULL,
        retry_at TIMESTAMP(6) NULL DEFAULT NULL,
        locked_by VARCHAR(64) NULL,
        locked_until TIMESTAMP(6) NULL DEFAULT NULL,
        CONSTRAINT modkit_outbox_processor_partition_fk FOREIGN KEY (partition_id)
            REFERENCES modkit_outbox_partitions (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
    r#"CREATE TABLE IF NOT EXISTS modkit_outbox_vacuum_counter (
        partition_id BIGINT NOT NULL PRIMARY KEY,
        counter BIGINT NOT NULL DEFAULT 0,
        CONSTRAINT modkit_outbox_vacuum_counter_partition_fk FOREIGN KEY (partition_id)
            REFERENCES modkit_outbox_partitions (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
];
