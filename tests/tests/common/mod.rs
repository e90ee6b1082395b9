//! Helpers shared by the engine suites.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modkit_outbox::{HandlerResult, LeasedHandler, Message, OutboxConfig, Outcome};
use modkit_outbox_migration::Migrator;
use modkit_outbox_tests::TestDb;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use sea_orm_migration::MigratorTrait;

/// Migrates the fresh database.
pub async fn migrate(db: &TestDb) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    Migrator::up(&db.conn, None).await.expect("migrate");
}

/// A configuration with short timers, so tests of leases and polls finish quickly.
pub fn fast_config() -> OutboxConfig {
    OutboxConfig {
        lease_ttl: Duration::from_secs(2),
        poll_interval: Duration::from_millis(200),
        vacuum_interval: Duration::from_millis(200),
        retry: modkit_outbox::RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
        },
        ..OutboxConfig::default()
    }
}

/// `SELECT COUNT(*)` of a table.
pub async fn count(conn: &DatabaseConnection, table: &str) -> i64 {
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await
        .expect("count")
        .expect("row");
    row.try_get("", "n").expect("n")
}

/// Runs a scalar query returning one i64 column `n`.
pub async fn scalar(conn: &DatabaseConnection, sql: &str) -> i64 {
    let row = conn
        .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("row");
    row.try_get("", "n").expect("n")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `partitions` processor cursors stand at `seq` (every message of a test run
/// processed); returns whether they did within `timeout`.
pub async fn cursors_reach(
    conn: &DatabaseConnection,
    timeout: Duration,
    seq: i64,
    partitions: i64,
) -> bool {
    let sql =
        format!("SELECT COUNT(*) AS n FROM modkit_outbox_processor WHERE processed_seq = {seq}");
    eventually(timeout, || {
        let (conn, sql) = (conn.clone(), sql.clone());
        async move { scalar(&conn, &sql).await == partitions }
    })
    .await
}

/// Records every delivery, per (queue, partition), in delivery order.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<Vec<Message>>>,
}

impl Recorder {
    pub fn push(&self, m: &Message) {
        self.inner.lock().expect("recorder").push(m.clone());
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("recorder").len()
    }

    pub fn all(&self) -> Vec<Message> {
        self.inner.lock().expect("recorder").clone()
    }

    /// Per partition: seqs in delivery order.
    pub fn seqs_by_partition(&self) -> HashMap<u32, Vec<i64>> {
        let mut out: HashMap<u32, Vec<i64>> = HashMap::new();
        for m in self.all() {
            out.entry(m.partition).or_default().push(m.seq);
        }
        out
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        eventually(timeout, || async { self.len() >= n }).await
    }
}

/// A recorder is also the simplest handler: it records and acks.
#[async_trait::async_trait]
impl LeasedHandler for Recorder {
    async fn handle(&self, msg: &Message) -> HandlerResult {
        self.push(msg);
        Ok(Outcome::Ack)
    }
}

/// Asserts that each partition saw seqs 1..=n exactly once, in order.
pub fn assert_gapless(rec: &Recorder) {
    for (p, seqs) in rec.seqs_by_partition() {
        let want: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, want, "partition {p}: seqs not 1..n in order");
    }
}
