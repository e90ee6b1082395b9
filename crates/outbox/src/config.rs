//! Engine configuration and its documented defaults.

use std::time::Duration;

use crate::backend::Dialect;
use crate::error::{OutboxError, Result};

/// Largest payload accepted by default (1 MiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Largest partition count a queue may have.
pub const MAX_PARTITIONS: u32 = 4096;
/// Messages handed to a handler per batch (per partition).
pub const DEFAULT_BATCH_SIZE: usize = 256;
/// Incoming rows the sequencer moves per partition in one pass.
pub const DEFAULT_SEQUENCER_BATCH: usize = 1000;
/// Concurrent sequencer transactions per instance on PostgreSQL (each on its own partitions).
/// SQLite always uses 1 (one writer).
pub const DEFAULT_SEQUENCER_WORKERS: usize = 4;
/// Concurrent sequencer transactions per instance on MySQL/MariaDB. With a backlog (B=100) two
/// took the median latency from ~420 to ~320 ms at the same throughput on a 2-core machine.
/// (Before the engine's deletes by id became key lookups, MariaDB planned them as scans and
/// concurrent sequencers deadlocked.)
pub const DEFAULT_SEQUENCER_WORKERS_MYSQL: usize = 2;
/// Delivery attempts before a message is dead-lettered (the first delivery counts).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Backoff before the second attempt; doubles per attempt, with ±25 % jitter.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Upper bound of the retry backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a processor lease lasts without renewal (leased mode). Renewed every third of it
/// while a handler runs; a crashed instance's partitions are taken over after it expires.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Fallback poll: how often every instance's sequencer looks for unannounced incoming rows
/// (at least; see [`FOREIGN_POLL_MIN`]) and its reconciler for unprocessed ones, so a missed
/// wake-up (another MySQL/SQLite instance, a lost `NOTIFY`) costs at most this long.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// MySQL and SQLite have no `NOTIFY`: rows that producers in another process commit reach an
/// engine only when its sequencer looks for them. It looks every `poll_interval` while idle;
/// when a look finds rows to move (rows nobody announced: producers in the same process wake
/// the sequencer themselves), it looks again after this delay, doubling while looks find
/// nothing until it is back at `poll_interval`. A steady stream from another process is then
/// picked up within milliseconds, while an idle engine still looks once per `poll_interval`.
/// A look is one plain read (the candidate probe; SQLite: `SELECT 1 FROM incoming LIMIT 1`).
/// Not configurable; PostgreSQL keeps `poll_interval` (`NOTIFY` announces such rows).
pub const FOREIGN_POLL_MIN: Duration = Duration::from_millis(2);
/// Rows vacuum deletes per transaction.
pub const DEFAULT_VACUUM_CHUNK: usize = 1000;
/// Longest the vacuum waits between runs when nothing wakes it.
pub const DEFAULT_VACUUM_INTERVAL: Duration = Duration::from_secs(1);
/// How often vacuum looks for bodies no incoming/outgoing row references.
pub const DEFAULT_ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Bodies younger than this are never collected as orphans.
pub const DEFAULT_ORPHAN_MIN_AGE: Duration = Duration::from_secs(3600);
/// How long `stop()` lets in-flight batches finish before aborting them.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// PostgreSQL's default [`OutboxConfig::sequencer_linger`]: after a pass that moved 4 to 63
/// rows, wait this long before the next, so a few more commits arrive and the next pass moves
/// them together. A sweep of B=1 runs (0, 1, 3, 6, 12 ms) put the knee at 3 ms; paired with the
/// floor, 3 ms against 1 ms gave 0.62–0.66 → 0.76–0.92 × the floor's commit rate at p50 1.8–2.0
/// → 3.0–3.1 ms; 6 ms gained nothing more. (Tokio's timer has a 1 ms tick, so a sleep ends on
/// the next tick at the earliest.)
pub const DEFAULT_SEQUENCER_LINGER_POSTGRES: Duration = Duration::from_millis(3);
/// MySQL/MariaDB's default [`OutboxConfig::sequencer_linger`]: none. The sequencer only
/// yields, so the processors that took the pass's hand-offs (and ready producers) run before
/// the next pass starts. Paired MariaDB B=1 runs (9 each) measured p50 4.8–5.1 ms without a
/// linger against 5.3–5.7 ms with a sleep to the next timer tick, at 1.5–7 % fewer messages
/// per second; 2 ms bought 0.67 against 0.60 × the floor only at p50 4.9–5.5 ms, at the 5 ms
/// latency target.
pub const DEFAULT_SEQUENCER_LINGER_MYSQL: Duration = Duration::ZERO;
/// SQLite's default [`OutboxConfig::sequencer_linger`]. Each pass holds the one writer and the
/// connection the producers share, and costs four calls to sqlx's worker thread (plus a
/// coalesced ack) against a producer's three per message, so at B=1 the pass count is what the
/// pipeline takes from the producers. Paired B=1 runs with the floor: 2 ms 0.73–0.79 × floor at
/// p50 2.1–2.6 ms; 8 ms median 0.87 at 5.2–5.6 ms; 10 ms 0.89–0.92 at 6.4 ms; 12 ms median 0.915
/// at 7.4 ms. 10 ms keeps a margin to SQLite's 10 ms p50 target.
pub const DEFAULT_SEQUENCER_LINGER_SQLITE: Duration = Duration::from_millis(10);
/// Longest [`OutboxConfig::sequencer_linger`] accepted. A linger only batches commits that
/// arrive while it waits; longer ones add latency and nothing else.
pub const MAX_SEQUENCER_LINGER: Duration = Duration::from_millis(100);
/// Longest [`OutboxConfig::lease_ttl`] accepted (a day). Lease expiries are timestamps the engine
/// computes; an unbounded TTL could overflow them.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest [`RetryPolicy::backoff_max`] accepted (30 days): retry times are timestamps the
/// engine computes and stores (on MySQL a `TIMESTAMP`, which ends in 2038).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 24 * 3600);

/// Transactional queues whose handler averages less than this per message let the partitions
/// woken together share one transaction (one commit instead of one per partition); their
/// handlers then run one after another in it. A slower handler gets a transaction per
/// partition, so partitions run in parallel. `Duration::ZERO` turns sharing off.
pub const DEFAULT_SHARED_TXN_MAX_HANDLER_TIME: Duration = Duration::from_millis(1);

/// Retry policy of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delivery attempts before the message is dead-lettered (≥ 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub backoff_base: Duration,
    /// Upper bound of the backoff.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl RetryPolicy {
    /// Backoff after `attempts` failed attempts (1-based): `base · 2^(attempts-1)`, capped at
    /// `backoff_max`, then scaled by a random factor in [0.75, 1.25).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let raw = self
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        let jitter: f64 = rand::random_range(0.75..1.25);
        raw.mul_f64(jitter)
    }
}

/// Engine-wide settings. Every field has a documented default constant.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Largest payload accepted by `enqueue` ([`DEFAULT_MAX_PAYLOAD_BYTES`]). On MySQL keep it
    /// well below the server's `max_allowed_packet`: a row must fit in one statement.
    pub max_payload_bytes: usize,
    /// Messages per handler batch ([`DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
    /// Incoming rows sequenced per partition per pass ([`DEFAULT_SEQUENCER_BATCH`]). At a
    /// trickle, and always on SQLite (one writer: it reads the oldest rows of all partitions
    /// together), this many rows per pass, or in a backlog this many times the partition count.
    pub sequencer_batch: usize,
    /// Concurrent sequencer transactions; `None` = the backend's default
    /// ([`DEFAULT_SEQUENCER_WORKERS`] on PostgreSQL, [`DEFAULT_SEQUENCER_WORKERS_MYSQL`] on
    /// MySQL/MariaDB). Always 1 on SQLite. Concurrent transactions are used only after a pass
    /// that moved a backlog; at a trickle one moves everything.
    pub sequencer_workers: Option<usize>,
    /// How long the sequencer waits after a pass that moved 4 to 63 rows before it starts the
    /// next, so that the commits arriving meanwhile are moved together: fewer, fuller passes
    /// leave more of the database to the producers, and each message waits up to this much
    /// longer. Passes of fewer rows (a light load), of more, and of a whole `sequencer_batch`
    /// (a backlog: more rows may be waiting) never wait. `None` =
    /// the backend's default ([`DEFAULT_SEQUENCER_LINGER_POSTGRES`] 3 ms,
    /// [`DEFAULT_SEQUENCER_LINGER_MYSQL`] none, [`DEFAULT_SEQUENCER_LINGER_SQLITE`] 10 ms); at
    /// most [`MAX_SEQUENCER_LINGER`]. Lower it for latency, raise it for throughput at
    /// saturation with single-message transactions.
    pub sequencer_linger: Option<Duration>,
    /// Lease duration in leased mode ([`DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Duration,
    /// Fallback poll interval ([`DEFAULT_POLL_INTERVAL`]); on MySQL and SQLite the sequencer
    /// looks sooner while rows arrive from other processes ([`FOREIGN_POLL_MIN`]).
    pub poll_interval: Duration,
    /// Rows per vacuum transaction ([`DEFAULT_VACUUM_CHUNK`]).
    pub vacuum_chunk: usize,
    /// Longest pause between vacuum runs ([`DEFAULT_VACUUM_INTERVAL`]).
    pub vacuum_interval: Duration,
    /// Orphaned-body sweep interval ([`DEFAULT_ORPHAN_SWEEP_INTERVAL`]).
    pub orphan_sweep_interval: Duration,
    /// Minimum age of a body collected as orphan ([`DEFAULT_ORPHAN_MIN_AGE`]).
    pub orphan_min_age: Duration,
    /// Grace period of `stop()` ([`DEFAULT_SHUTDOWN_TIMEOUT`]).
    pub shutdown_timeout: Duration,
    /// Default retry policy of queues that set none.
    pub retry: RetryPolicy,
    /// Transactional handlers faster than this per message (on average) share transactions
    /// across partitions; `Duration::ZERO` never shares ([`DEFAULT_SHARED_TXN_MAX_HANDLER_TIME`]).
    /// A shared transaction runs its handlers one after another, so a handler that sometimes
    /// stalls delays the others sharing it: use zero when handlers can block.
    pub shared_txn_max_handler_time: Duration,
    /// Lease owner name of this instance; a random unique one when `None`. At most 64 bytes,
    /// no control characters.
    pub instance_id: Option<String>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            batch_size: DEFAULT_BATCH_SIZE,
            sequencer_batch: DEFAULT_SEQUENCER_BATCH,
            sequencer_workers: None,
            sequencer_linger: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            poll_interval: DEFAULT_POLL_INTERVAL,
            vacuum_chunk: DEFAULT_VACUUM_CHUNK,
            vacuum_interval: DEFAULT_VACUUM_INTERVAL,
            orphan_sweep_interval: DEFAULT_ORPHAN_SWEEP_INTERVAL,
            orphan_min_age: DEFAULT_ORPHAN_MIN_AGE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            retry: RetryPolicy::default(),
            shared_txn_max_handler_time: DEFAULT_SHARED_TXN_MAX_HANDLER_TIME,
            instance_id: None,
        }
    }
}

impl OutboxConfig {
    /// The sequencer linger on `dialect`: the configured one, or the backend's default.
    pub(crate) fn sequencer_linger_for(&self, dialect: Dialect) -> Duration {
        self.sequencer_linger.unwrap_or(match dialect {
            Dialect::Postgres => DEFAULT_SEQUENCER_LINGER_POSTGRES,
            Dialect::MySql => DEFAULT_SEQUENCER_LINGER_MYSQL,
            Dialect::Sqlite => DEFAULT_SEQUENCER_LINGER_SQLITE,
        })
    }

    /// Concurrent sequencer transactions on `dialect` (after a pass that moved a backlog): the
    /// configured number, or the backend's default; always 1 on SQLite (one writer).
    pub(crate) fn sequencer_workers_for(&self, dialect: Dialect) -> usize {
        match (dialect, self.sequencer_workers) {
            (Dialect::Sqlite, _) => 1,
            (_, Some(w)) => w,
            (Dialect::Postgres, None) => DEFAULT_SEQUENCER_WORKERS,
            (Dialect::MySql, None) => DEFAULT_SEQUENCER_WORKERS_MYSQL,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(OutboxError::InvalidConfig(m.to_owned()));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad("batch_size must be 1..=10000");
        }
        if self.sequencer_batch == 0 || self.sequencer_batch > 10_000 {
            return bad("sequencer_batch must be 1..=10000");
        }
        if self.sequencer_workers.is_some_and(|w| w == 0 || w > 64) {
            return bad("sequencer_workers must be 1..=64");
        }
        if self
            .sequencer_linger
            .is_some_and(|l| l > MAX_SEQUENCER_LINGER)
        {
            return Err(OutboxError::InvalidConfig(format!(
                "sequencer_linger must be at most {MAX_SEQUENCER_LINGER:?}"
            )));
        }
        if self.vacuum_chunk == 0 || self.vacuum_chunk > 10_000 {
            return bad("vacuum_chunk must be 1..=10000");
        }
        if self.lease_ttl < Duration::from_millis(300) || self.lease_ttl > MAX_LEASE_TTL {
            return bad("lease_ttl must be 300 ms ..= 24 h");
        }
        if self.poll_interval.is_zero() || self.vacuum_interval.is_zero() {
            return bad("poll_interval and vacuum_interval must be positive");
        }
        if self.max_payload_bytes == 0 {
            return bad("max_payload_bytes must be positive");
        }
        validate_retry(&self.retry)?;
        if let Some(id) = &self.instance_id
            && (id.is_empty() || id.len() > 64 || id.chars().any(char::is_control))
        {
            return bad("instance_id must be 1..=64 bytes without control characters");
        }
        Ok(())
    }
}

pub(crate) fn validate_retry(r: &RetryPolicy) -> Result<()> {
    if r.max_attempts == 0 {
        return Err(OutboxError::InvalidConfig(
            "retry.max_attempts must be at least 1".into(),
        ));
    }
    if r.backoff_max > MAX_BACKOFF {
        return Err(OutboxError::InvalidConfig(
            "retry.backoff_max must be at most 30 days".into(),
        ));
    }
    if r.backoff_base > r.backoff_max {
        return Err(OutboxError::InvalidConfig(
            "retry.backoff_base must not exceed retry.backoff_max".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_could_overflow_a_timestamp_are_refused() {
        let ok = OutboxConfig::default();
        assert!(ok.validate().is_ok());
        let c = OutboxConfig {
            lease_ttl: Duration::MAX,
            ..OutboxConfig::default()
        };
        assert!(matches!(c.validate(), Err(OutboxError::InvalidConfig(_))));
        let c = OutboxConfig {
            retry: RetryPolicy {
                backoff_max: Duration::MAX,
                ..RetryPolicy::default()
            },
            ..OutboxConfig::default()
        };
        assert!(matches!(c.validate(), Err(OutboxError::InvalidConfig(_))));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(75) && b1 < Duration::from_millis(125));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(300) && b3 < Duration::from_millis(500));
            let b30 = p.backoff(u32::MAX);
            assert!(b30 < Duration::from_millis(1250));
        }
    }

    #[test]
    fn sequencer_workers_are_the_configured_ones_or_the_backends_default() {
        let c = OutboxConfig::default();
        assert_eq!(
            c.sequencer_workers_for(Dialect::Postgres),
            DEFAULT_SEQUENCER_WORKERS
        );
        assert_eq!(
            c.sequencer_workers_for(Dialect::MySql),
            DEFAULT_SEQUENCER_WORKERS_MYSQL
        );
        assert_eq!(c.sequencer_workers_for(Dialect::Sqlite), 1);
        let c = OutboxConfig {
            sequencer_workers: Some(7),
            ..Default::default()
        };
        assert_eq!(c.sequencer_workers_for(Dialect::Postgres), 7);
        assert_eq!(c.sequencer_workers_for(Dialect::MySql), 7);
        assert_eq!(c.sequencer_workers_for(Dialect::Sqlite), 1, "one writer");
    }

    #[test]
    fn sequencer_linger_is_the_configured_one_or_the_backends_default() {
        let c = OutboxConfig::default();
        assert_eq!(
            c.sequencer_linger_for(Dialect::Postgres),
            DEFAULT_SEQUENCER_LINGER_POSTGRES
        );
        assert_eq!(
            c.sequencer_linger_for(Dialect::MySql),
            DEFAULT_SEQUENCER_LINGER_MYSQL
        );
        assert_eq!(
            c.sequencer_linger_for(Dialect::Sqlite),
            DEFAULT_SEQUENCER_LINGER_SQLITE
        );
        let set = Duration::from_millis(7);
        let c = OutboxConfig {
            sequencer_linger: Some(set),
            ..Default::default()
        };
        for d in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
            assert_eq!(c.sequencer_linger_for(d), set);
        }
        let c = OutboxConfig {
            sequencer_linger: Some(Duration::ZERO),
            ..Default::default()
        };
        assert_eq!(c.sequencer_linger_for(Dialect::Sqlite), Duration::ZERO);
    }

    #[test]
    fn config_validation_rejects_nonsense() {
        assert!(OutboxConfig::default().validate().is_ok());
        let c = OutboxConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(OutboxError::InvalidConfig(_))));
        let c = OutboxConfig {
            retry: RetryPolicy {
                max_attempts: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(c.validate().is_err());
        for bad in ["", "a\tb", "x\n"] {
            let c = OutboxConfig {
                instance_id: Some(bad.to_owned()),
                ..Default::default()
            };
            assert!(
                matches!(c.validate(), Err(OutboxError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
        let c = OutboxConfig {
            instance_id: Some("api-7:eu".to_owned()),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        for (linger, ok) in [
            (Duration::ZERO, true),
            (MAX_SEQUENCER_LINGER, true),
            (MAX_SEQUENCER_LINGER + Duration::from_nanos(1), false),
            (Duration::from_secs(5), false),
        ] {
            let c = OutboxConfig {
                sequencer_linger: Some(linger),
                ..Default::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{linger:?}");
            if !ok {
                assert!(
                    matches!(c.validate(), Err(OutboxError::InvalidConfig(m)) if m.contains("sequencer_linger"))
                );
            }
        }
    }
}
