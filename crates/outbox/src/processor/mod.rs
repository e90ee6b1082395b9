//! Processors: one task per partition of every queue with a handler, and at most one active
//! processor per partition across all instances.
//!
//! * **Leased** (at-least-once): the instance takes the partition's lease (`lease.rs`), runs the
//!   handler outside any transaction while renewing the lease every third of its TTL, and acks
//!   with an ownership-guarded update that also extends the lease. A lost lease cancels the
//!   running handler. An idle partition's lease is not released (no write): it lapses after its
//!   TTL, or is reused without a write when work arrives first, so a busy partition keeps its
//!   owner. `stop()` releases every lease at once, in one statement after the processors end.
//! * **Transactional** (exactly-once database side effects): the handler runs inside the
//!   transaction that advances the cursor, under a `SKIP LOCKED` row lock on the partition's
//!   `processor` row (`transactional.rs`: no savepoint unless a message fails).
//!
//! An idle partition costs one read when woken and no write. Retries wait head-of-line with
//! backoff (`retry_at`), which new arrivals do not cut short.

pub(crate) mod coalesce;
pub(crate) mod handoff;
pub(crate) mod lease;
pub(crate) mod shared_txn;
pub(crate) mod transactional;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use sea_orm::{ConnectionTrait, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Db, Dialect, execute, get_opt_time, get_time};
use crate::error::{OutboxError, Result};
use crate::handler::{HandlerResult, Outcome, QueueHandler};
use crate::message::{Message, decode_headers};
use crate::outbox::Inner;
use crate::queues::QueueInfo;

/// Runs a handler future, turning a panic into a handler error (the partition retries instead of
/// losing its processor task).
pub(crate) async fn catch_panic<F>(fut: F) -> HandlerResult
where
    F: Future<Output = HandlerResult>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            Err(format!("handler panicked: {what}").into())
        }
    }
}

async fn catch_panic_batch<F>(fut: F, n: usize) -> Vec<HandlerResult>
where
    F: Future<Output = Vec<HandlerResult>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(_) => {
            let mut v: Vec<HandlerResult> = Vec::with_capacity(1);
            if n > 0 {
                v.push(Err("batch handler panicked".into()));
            }
            v
        }
    }
}

/// What the processor loop does next.
pub(crate) enum Step {
    /// Nothing to do until a signal arrives.
    Idle,
    /// More work is waiting: go again now.
    More,
    /// Check again at this instant. A retry backoff (`interruptible: false`) is honoured even
    /// when new messages arrive; a wait for someone else's lease ends early on any signal.
    At { at: Instant, interruptible: bool },
}

/// Cursor and lease state of one partition.
struct State {
    high: i64,
    processed: i64,
    attempts: i64,
    retry_at: Option<DateTime<Utc>>,
    locked_by: Option<String>,
    locked_until: Option<DateTime<Utc>>,
}

impl State {
    /// The state columns of the first row; a missing row means a partition without its
    /// `processor` row (schema out of sync).
    fn from_first(rows: &[sea_orm::QueryResult], partition_id: i64) -> Result<State> {
        let r = rows.first().ok_or_else(|| {
            OutboxError::Db(sea_orm::DbErr::RecordNotFound(format!(
                "processor row of partition {partition_id}"
            )))
        })?;
        Ok(State {
            high: r.try_get("", "high")?,
            processed: r.try_get("", "processed_seq")?,
            attempts: r.try_get("", "attempts")?,
            retry_at: get_opt_time(r, "retry_at")?,
            locked_by: r.try_get("", "locked_by")?,
            locked_until: get_opt_time(r, "locked_until")?,
        })
    }
}

fn row_to_message(
    r: &sea_orm::QueryResult,
    queue: &QueueInfo,
    index: u32,
    after: i64,
    head_attempts: i64,
) -> Result<Message> {
    let seq: i64 = r.try_get("", "seq")?;
    let payload: Vec<u8> = r.try_get("", "payload")?;
    Ok(Message {
        id: r.try_get("", "id")?,
        queue: queue.name.clone(),
        partition: index,
        seq,
        payload: payload.into(),
        payload_type: r.try_get("", "payload_type")?,
        headers: decode_headers(r.try_get("", "headers")?),
        attempts: if seq == after + 1 {
            u32::try_from(head_attempts.saturating_add(1)).unwrap_or(u32::MAX)
        } else {
            1
        },
        created_at: get_time(r, "created_at")?,
    })
}

/// State and the next batch of `n` partitions in one round trip (leased mode; see
/// [`coalesce`]). Seqs are gapless, so a batch is the range `(processed_seq, processed_seq +
/// batch_size]`; an idle partition yields one row with no message. Placeholders: the batch
/// size, then the `n` partition ids. No `ORDER BY`: the rows are grouped by partition and
/// sorted by seq in [`messages_in`] (on MariaDB the sort's temporary table cost ~40 % of the
/// statement's time).
pub(crate) fn state_and_batch_sql(db: &Db, n: usize) -> String {
    // PostgreSQL reads each partition's window through a `LATERAL` subquery: with a plain join
    // its planner, on `outgoing` stats that a queue table's churn keeps stale (or, on a fresh
    // schema, has none of), hashed a sequential scan of all of `outgoing` against the
    // partitions (seen with `auto_explain` at 64 partitions: 2.6 ms per read instead of 0.9 at
    // 8). The lateral form is one `(partition_id, seq)` index range per partition whatever the
    // estimates; `OFFSET 0` keeps the planner from pulling the subquery up into the same join.
    // MariaDB has no `LATERAL`; MySQL and SQLite keep the join (their plans use the key, see
    // PERFORMANCE.md).
    let window = if db.dialect == Dialect::Postgres {
        "LEFT JOIN LATERAL (SELECT w.seq, w.body_id FROM modkit_outbox_outgoing w \
           WHERE w.partition_id = pr.partition_id AND w.seq > pr.processed_seq \
           AND w.seq <= pr.processed_seq + ? OFFSET 0) o ON true"
    } else {
        "LEFT JOIN modkit_outbox_outgoing o ON o.partition_id = pr.partition_id \
           AND o.seq > pr.processed_seq AND o.seq <= pr.processed_seq + ?"
    };
    format!(
        "SELECT pr.partition_id AS pid, p.{seq} AS high, pr.processed_seq, pr.attempts, \
         pr.retry_at, pr.locked_by, pr.locked_until, o.seq, b.id, b.payload, b.payload_type, \
         b.headers, b.created_at \
         FROM modkit_outbox_processor pr \
         JOIN modkit_outbox_partitions p ON p.id = pr.partition_id \
         {window} \
         LEFT JOIN modkit_outbox_body b ON b.id = o.body_id \
         WHERE {}",
        db.dialect.in_list("pr.partition_id", n),
        seq = db.dialect.q("sequence")
    )
}

async fn read_state_and_batch(p: &Partition) -> Result<(State, Vec<Message>)> {
    let req = (p.id, p.queue.batch_size);
    let rows = match &p.io {
        Some(io) => io.reads.call(req).await.ok_or_else(shutting_down)?,
        None => coalesce::read_many(&p.inner.db, &[req])
            .await
            .pop()
            .unwrap_or_else(|| Ok(Vec::new())),
    }
    .map_err(|e| OutboxError::Db(sea_orm::DbErr::Custom(e)))?;
    let st = State::from_first(&rows, p.id)?;
    let msgs = messages_in(&rows, &p.queue, p.index, st.processed, st.attempts)?;
    Ok((st, msgs))
}

/// The messages among batch rows, in seq order; a row without `seq` (the `LEFT JOIN` of a
/// partition with nothing to deliver) is skipped.
fn messages_in(
    rows: &[sea_orm::QueryResult],
    queue: &QueueInfo,
    index: u32,
    after: i64,
    head_attempts: i64,
) -> Result<Vec<Message>> {
    let mut msgs = Vec::with_capacity(rows.len());
    for r in rows {
        if r.try_get::<Option<i64>>("", "seq")?.is_some() {
            msgs.push(row_to_message(r, queue, index, after, head_attempts)?);
        }
    }
    msgs.sort_unstable_by_key(|m| m.seq);
    Ok(msgs)
}

/// The cursor update a batch's results call for.
struct Applied<'m> {
    processed: i64,
    attempts: i64,
    last_error: Option<String>,
    retry_at: Option<DateTime<Utc>>,
    dead: Vec<(&'m Message, String)>,
    acked: usize,
}

/// The failure reason to store for a result, bounded and NUL-free
/// ([`crate::MAX_ERROR_TEXT_BYTES`]).
fn error_text(r: &HandlerResult) -> String {
    match r {
        Ok(Outcome::Retry(s)) | Ok(Outcome::Reject(s)) => crate::message::storable_error(s),
        Ok(Outcome::Ack) => String::new(),
        Err(e) => crate::message::storable_error(&e.to_string()),
    }
}

/// Folds handler results into a cursor update: `Ack`/`Reject` advance, the first
/// `Retry`/error stops (dead-lettering the message once its attempts are exhausted).
fn apply<'m>(
    msgs: &'m [Message],
    results: &[HandlerResult],
    start: i64,
    head_attempts: i64,
    queue: &QueueInfo,
) -> Applied<'m> {
    let mut a = Applied {
        processed: start,
        attempts: head_attempts,
        last_error: None,
        retry_at: None,
        dead: Vec::new(),
        acked: 0,
    };
    for (m, r) in msgs.iter().zip(results) {
        match r {
            Ok(Outcome::Ack) => {
                a.processed = m.seq;
                a.attempts = 0;
                a.acked += 1;
            }
            Ok(Outcome::Reject(reason)) => {
                a.dead.push((m, reason.clone()));
                a.processed = m.seq;
                a.attempts = 0;
            }
            other => {
                let text = error_text(other);
                if m.attempts >= queue.retry.max_attempts {
                    a.dead.push((m, text));
                    a.processed = m.seq;
                    a.attempts = 0;
                } else {
                    a.attempts = i64::from(m.attempts);
                    let delay = queue.retry.backoff(m.attempts);
                    a.retry_at = Some(Utc::now() + delay);
                    a.last_error = Some(text);
                }
                break;
            }
        }
    }
    a
}

/// Writes dead letters for the messages `apply` gave up on.
async fn insert_dead_letters<C: ConnectionTrait>(
    c: &C,
    p: &Partition,
    dead: &[(&Message, String)],
) -> Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let d = p.inner.db.dialect;
    let now = d.time(Utc::now());
    let chunks = crate::backend::byte_chunks(
        dead,
        200,
        crate::backend::MAX_STATEMENT_BYTES,
        |(m, err)| m.payload.len() + err.len() + m.payload_type.len(),
    );
    for chunk in chunks {
        let sql = format!(
            "INSERT INTO modkit_outbox_dead_letters (partition_id, queue, {part}, seq, message_id, \
             payload, payload_type, headers, created_at, failed_at, last_error, attempts, status) \
             VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')"; chunk.len()].join(", "),
            part = d.q("partition")
        );
        let mut args = Vec::with_capacity(12 * chunk.len());
        for (m, err) in chunk {
            args.push(Value::from(p.id));
            args.push(Value::from(&*m.queue));
            args.push(Value::from(m.partition as i32));
            args.push(Value::from(m.seq));
            args.push(Value::from(m.id));
            args.push(Value::from(m.payload.to_vec()));
            args.push(Value::from(m.payload_type.as_str()));
            args.push(Value::from(crate::message::encode_headers(&m.headers)));
            args.push(d.time(m.created_at));
            args.push(now.clone());
            args.push(Value::from(err.as_str()));
            args.push(Value::from(i64::from(m.attempts)));
        }
        execute(c, d, &sql, args).await?;
        for (m, err) in chunk {
            tracing::warn!(queue = %m.queue, partition = m.partition, seq = m.seq,
                attempts = m.attempts, error = %err, "message dead-lettered");
        }
    }
    Ok(())
}

/// Moves the cursor. `owner` adds the lease guard (leased mode). Returns false when the guard
/// did not match (lease lost, or the cursor moved under us). `bookkeeping`: the statement
/// commits on its own and may skip the WAL flush on PostgreSQL (a lost leased ack only means
/// the batch is delivered again).
async fn write_cursor<C: ConnectionTrait>(
    c: &C,
    p: &Partition,
    from: i64,
    a: &Applied<'_>,
    owner: Option<(&str, DateTime<Utc>)>,
    bookkeeping: bool,
) -> Result<bool> {
    let d = p.inner.db.dialect;
    let mut sql = String::from(
        "UPDATE modkit_outbox_processor SET processed_seq = ?, attempts = ?, last_error = ?, retry_at = ?",
    );
    let mut args = vec![
        Value::from(a.processed),
        Value::from(a.attempts),
        Value::from(a.last_error.clone()),
        match a.retry_at {
            Some(t) => d.time(t),
            None => d.null_time(),
        },
    ];
    if let Some((_, until)) = owner {
        sql.push_str(", locked_until = ?");
        args.push(d.time(until));
    }
    sql.push_str(" WHERE partition_id = ? AND processed_seq = ?");
    args.push(Value::from(p.id));
    args.push(Value::from(from));
    if let Some((who, _)) = owner {
        sql.push_str(lease::ACK_GUARD);
        args.push(Value::from(who));
    }
    if bookkeeping && d == crate::backend::Dialect::Postgres {
        sql.push_str(crate::backend::postgres::ASYNC_COMMIT_CONDITION);
    }
    Ok(execute(c, d, &sql, args).await? == 1)
}

/// A clean cursor move of one partition: `(partition id, from, to)`.
pub(crate) type CursorMove = (i64, i64, i64);

/// One `UPDATE` that moves several cursors, each only from the position it was read at
/// (attempts and errors reset). `lease`: also write `locked_until` and require the holder
/// (leased acks). Used by the coalesced ack and the shared transactional step. On PostgreSQL
/// the moves are three arrays joined through `unnest` (one statement text for any number).
fn cursor_moves(
    d: Dialect,
    moves: &[CursorMove],
    lease: Option<(Value, &str)>,
) -> (String, Vec<Value>) {
    let until = if lease.is_some() {
        ", locked_until = ?"
    } else {
        ""
    };
    let guard = if lease.is_some() {
        lease::ACK_GUARD
    } else {
        ""
    };
    let (lease_until, holder) = lease.unzip();
    let mut args = Vec::with_capacity(5 * moves.len() + 2);
    let sql = if d == Dialect::Postgres {
        let column =
            |f: fn(&CursorMove) -> i64| Value::from(moves.iter().map(f).collect::<Vec<_>>());
        args.extend(lease_until);
        args.extend([column(|m| m.0), column(|m| m.1), column(|m| m.2)]);
        format!(
            "UPDATE modkit_outbox_processor SET processed_seq = w.to_seq, attempts = 0, \
             last_error = NULL, retry_at = NULL{until} FROM unnest(CAST(? AS BIGINT[]), \
             CAST(? AS BIGINT[]), CAST(? AS BIGINT[])) AS w(pid, from_seq, to_seq) \
             WHERE partition_id = w.pid AND processed_seq = w.from_seq{guard}"
        )
    } else {
        for (pid, _, to) in moves {
            args.push(Value::from(*pid));
            args.push(Value::from(*to));
        }
        args.extend(lease_until);
        args.extend(moves.iter().map(|(pid, _, _)| Value::from(*pid)));
        for (pid, from, _) in moves {
            args.push(Value::from(*pid));
            args.push(Value::from(*from));
        }
        let case = vec!["WHEN ? THEN ?"; moves.len()].join(" ");
        format!(
            "UPDATE modkit_outbox_processor SET processed_seq = CASE partition_id {case} END, \
             attempts = 0, last_error = NULL, retry_at = NULL{until} \
             WHERE partition_id IN ({ids}) AND processed_seq = CASE partition_id {case} END{guard}",
            ids = crate::backend::placeholders(moves.len()),
        )
    };
    args.extend(holder.map(Value::from));
    (sql, args)
}

/// One partition's processor.
pub(crate) struct Partition {
    pub(crate) inner: Arc<Inner>,
    pub(crate) queue: Arc<QueueInfo>,
    pub(crate) index: u32,
    pub(crate) id: i64,
    notify: Arc<Notify>,
    holds_lease: bool,
    /// When our lease ends, as we last wrote it (acquire, renewal, ack).
    lease_expires: DateTime<Utc>,
    /// Coalesced reads and acks (leased queues).
    io: Option<coalesce::LeasedIo>,
    /// Shared transactions (transactional queues).
    shared: Option<shared_txn::SharedTxns>,
    /// The next transactional step runs in a transaction of its own (the last one saw a
    /// message fail, or read a full batch).
    txn_alone: bool,
    /// Leased: the cursor as this processor last wrote or read it, while it is known to be
    /// clean (no attempts, no retry pending) under our lease. Lets it take a [`handoff`].
    clean_cursor: Option<i64>,
}

/// The coalescing driver is gone: the engine is stopping.
fn shutting_down() -> OutboxError {
    OutboxError::Db(sea_orm::DbErr::Custom(
        "outbox engine is shutting down".to_owned(),
    ))
}

/// What follows an ack: the retry backoff, another batch, or (when the cursor reached `high`,
/// the partition's sequence when the batch was read) sleep. Rows sequenced after that read
/// wake the processor (in-process, or `NOTIFY` from another instance), so no extra read is
/// needed to find the partition empty.
fn next_after_ack(a: &Applied<'_>, high: i64) -> Step {
    match a.retry_at {
        Some(t) => at(t, false),
        None if a.processed >= high => Step::Idle,
        None => Step::More,
    }
}

/// Shortest wait before a transactional step looks at a pending retry again (its time may
/// pass between locking the row and checking it; never a busy loop).
const RETRY_RECHECK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(5);

/// When a transactional step must not deliver because of a pending retry: its time has not
/// come, or no batch was read (the read skips a partition whose retry is not due when its row
/// is locked, even if it is due by now). Then look again at `retry_at`, never sooner than
/// [`RETRY_RECHECK`].
pub(super) fn retry_wait(
    retry_at: Option<DateTime<Utc>>,
    batch_read: bool,
    now: DateTime<Utc>,
) -> Option<Step> {
    let t = retry_at?;
    (t > now || !batch_read).then(|| at(t.max(now + RETRY_RECHECK), false))
}

fn at(t: DateTime<Utc>, interruptible: bool) -> Step {
    let delta = (t - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    Step::At {
        at: Instant::now() + delta,
        interruptible,
    }
}

impl Partition {
    pub(crate) fn new(
        inner: Arc<Inner>,
        queue: Arc<QueueInfo>,
        index: u32,
        io: Option<coalesce::LeasedIo>,
        shared: Option<shared_txn::SharedTxns>,
    ) -> Self {
        let id = queue.partition_ids[index as usize];
        let notify = inner.signals.processor(id);
        if io.is_some() {
            inner.handoffs.register(id, queue.batch_size);
        }
        Self {
            inner,
            queue,
            index,
            id,
            notify,
            holds_lease: false,
            lease_expires: DateTime::<Utc>::MIN_UTC,
            io,
            shared,
            txn_alone: false,
            clean_cursor: None,
        }
    }

    fn lease_until(&self) -> DateTime<Utc> {
        Utc::now() + self.inner.config.lease_ttl
    }

    /// The processor task.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let span = tracing::debug_span!(parent: None, "outbox.processor", queue = %self.queue.name,
            partition = self.index, instance = %self.inner.instance_id);
        let mut next: Option<Instant> = Some(Instant::now());
        let mut interruptible = true;
        let mut error_backoff = Duration::from_millis(100);
        loop {
            let wake = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = self.notify.notified() => {
                    // A retry backoff is honoured: a new arrival does not cut it short.
                    if !interruptible && next.is_some_and(|t| t > Instant::now()) {
                        continue;
                    }
                }
                _ = wake => {}
            }
            next = None;
            interruptible = true;
            let step = self.step().instrument(span.clone()).await;
            if self.io.is_some() {
                self.inner
                    .handoffs
                    .set_open(self.id, self.clean_cursor.is_some());
            }
            match step {
                Ok(Step::Idle) => {
                    error_backoff = Duration::from_millis(100);
                }
                Ok(Step::More) => {
                    error_backoff = Duration::from_millis(100);
                    next = Some(Instant::now());
                }
                Ok(Step::At {
                    at,
                    interruptible: i,
                }) => {
                    error_backoff = Duration::from_millis(100);
                    next = Some(at);
                    interruptible = i;
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue.name, partition = self.index, error = %e,
                        "processor step failed; retrying");
                    next = Some(Instant::now() + error_backoff);
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
        // The lease, if held, is released by `stop()` once every processor has ended, for all
        // partitions in one statement.
    }
}

impl Partition {
    async fn step(&mut self) -> Result<Step> {
        let handler = match self.queue.handler.clone() {
            Some(QueueHandler::Leased(h)) => h,
            // Its own locked read tells whether there is work: no read before it (a woken
            // processor nearly always has work; the reconciler wakes only those that do).
            Some(QueueHandler::Transactional(h)) => return self.step_transactional(h).await,
            None => return Ok(Step::Idle),
        };
        let known = self.clean_cursor.take();
        let (st, msgs) = match self.handed(known) {
            Some(handed) => handed,
            None => read_state_and_batch(self).await?,
        };
        // Idle or backing off: no write at all. A lease we hold simply lapses after its TTL
        // (or is reused if work arrives first), so idle partitions cause no lease churn.
        if st.high <= st.processed {
            let me = self.inner.instance_id.as_str();
            let clean = st.attempts == 0 && st.retry_at.is_none();
            self.clean_cursor = (clean && self.holds_lease && st.locked_by.as_deref() == Some(me))
                .then_some(st.processed);
            return Ok(Step::Idle);
        }
        if let Some(t) = st.retry_at
            && t > Utc::now()
        {
            return Ok(at(t, false));
        }
        self.step_leased(st, msgs, handler).await
    }

    /// The rows this instance's sequencer handed over (see [`handoff`]) as state and batch,
    /// when `known` (the clean cursor) and the lease allow taking them without a read.
    fn handed(&self, known: Option<i64>) -> Option<(State, Vec<Message>)> {
        let waiting = self.inner.handoffs.take(self.id)?;
        let processed = known?;
        let half = self.inner.config.lease_ttl / 2;
        if !self.holds_lease || self.lease_expires <= Utc::now() + half {
            return None;
        }
        let mut rows = waiting.rows;
        rows.retain(|r| r.seq > processed);
        // Consecutive by construction: usable when they start right after the cursor.
        if rows.first()?.seq != processed + 1 {
            return None;
        }
        rows.truncate(self.queue.batch_size);
        let msgs = rows
            .into_iter()
            .map(|r| r.into_message(self.queue.name.clone(), self.index))
            .collect();
        let st = State {
            high: waiting.high,
            processed,
            attempts: 0,
            retry_at: None,
            locked_by: Some(self.inner.instance_id.clone()),
            locked_until: Some(self.lease_expires),
        };
        self.inner.handoffs.delivered_one();
        Some((st, msgs))
    }

    async fn step_leased(
        &mut self,
        mut st: State,
        mut msgs: Vec<Message>,
        handler: Arc<dyn crate::handler::LeasedBatchHandler>,
    ) -> Result<Step> {
        let db = self.inner.db.clone();
        let inner = self.inner.clone();
        let me = inner.instance_id.as_str();
        let now = Utc::now();
        let mine = st.locked_by.as_deref() == Some(me);
        let until = st.locked_until.unwrap_or(DateTime::<Utc>::MIN_UTC);
        // Ours with at least half a TTL left: go on without a write (acks extend it).
        let half = inner.config.lease_ttl / 2;
        if mine && until > now + half {
            self.lease_expires = until;
        } else {
            if !mine && st.locked_by.is_some() && until > now {
                // Someone else processes this partition; look again when its lease ends.
                return Ok(at(until + chrono::Duration::milliseconds(10), true));
            }
            let asked = self.lease_until();
            let taken = match &self.io {
                // One statement for every processor taking a lease now (a start, a takeover).
                Some(io) => io
                    .acquires
                    .call((self.id, asked))
                    .await
                    .ok_or_else(shutting_down)?
                    .map_err(|e| OutboxError::Db(sea_orm::DbErr::Custom(e)))?,
                None => lease::acquire_many(&db, &[self.id], me, asked)
                    .await?
                    .contains(&self.id)
                    .then_some(asked),
            };
            let Some(new_until) = taken else {
                return Ok(at(Utc::now() + chrono::Duration::milliseconds(50), true));
            };
            self.lease_expires = new_until;
            // Ours but run out: another instance may have taken it, written a retry or a dead
            // letter, and released it between our read and this acquire.
            let lapsed = until <= now;
            if !mine || lapsed {
                tracing::debug!(queue = %self.queue.name, partition = self.index, "lease acquired");
                // The state read before the lease may predate the previous owner's last write.
                let (fresh, fresh_msgs) = read_state_and_batch(self).await?;
                if fresh.high <= fresh.processed || fresh.retry_at.is_some_and(|t| t > Utc::now()) {
                    self.holds_lease = true;
                    return Ok(Step::More);
                }
                st = fresh;
                msgs = fresh_msgs;
            }
        }
        self.holds_lease = true;
        if msgs.is_empty() {
            return Ok(Step::Idle);
        }
        let results = match self.run_leased(&handler, &msgs).await? {
            Some(r) => r,
            None => {
                self.holds_lease = false;
                tracing::warn!(queue = %self.queue.name, partition = self.index,
                    "lease lost while the handler ran; handler cancelled");
                return Ok(Step::More);
            }
        };
        let a = apply(&msgs, &results, st.processed, st.attempts, &self.queue);
        if a.processed == st.processed && a.retry_at.is_none() {
            // The handler answered none of the messages: offer them again later.
            return Ok(at(Utc::now() + chrono::Duration::milliseconds(100), false));
        }
        let mut new_until = self.lease_until();
        let shared_ack = self
            .io
            .as_ref()
            .filter(|_| a.dead.is_empty() && a.retry_at.is_none());
        let acked = if let Some(io) = shared_ack {
            // Every message acked: one statement shared with the other partitions acking now.
            let req = coalesce::AckReq {
                partition_id: self.id,
                from: st.processed,
                to: a.processed,
                until: new_until,
            };
            let res = io.acks.call(req).await.ok_or_else(shutting_down)?;
            match res.map_err(|e| OutboxError::Db(sea_orm::DbErr::Custom(e)))? {
                Some(written) => {
                    new_until = written;
                    true
                }
                None => false,
            }
        } else if a.dead.is_empty() {
            // One statement, one round trip.
            let _gate = db.write_gate().await;
            write_cursor(
                &db.conn,
                self,
                st.processed,
                &a,
                Some((me, new_until)),
                true,
            )
            .await?
        } else {
            let w = db.begin_bookkeeping().await?;
            insert_dead_letters(&w.txn, self, &a.dead).await?;
            let ok =
                write_cursor(&w.txn, self, st.processed, &a, Some((me, new_until)), false).await?;
            if ok {
                w.commit().await?;
            } else {
                w.rollback().await?;
            }
            ok
        };
        if !acked {
            self.holds_lease = false;
            tracing::warn!(queue = %self.queue.name, partition = self.index,
                "ack rejected: lease lost or cursor moved; the batch will be delivered again");
            return Ok(Step::More);
        }
        self.lease_expires = new_until;
        let clean = a.dead.is_empty() && a.retry_at.is_none() && a.attempts == 0;
        self.clean_cursor = clean.then_some(a.processed);
        self.after_ack(&a, &msgs);
        Ok(next_after_ack(&a, st.high))
    }

    /// Runs the handler while renewing the lease; `None` when the lease was lost or ran out
    /// before a renewal succeeded (the handler future is then dropped, i.e. cancelled).
    ///
    /// The handler is cancelled no later than the expiry written in the database: the local
    /// deadline counts down from that expiry as of the batch's start, and after a renewal from
    /// an instant taken before the renewal computed its new expiry. Another instance may take
    /// the partition once that expiry passes, so a handler must not outlive it, whether the
    /// renewals fail fast, time out or hang. The handler keeps running while a renewal is in
    /// flight.
    async fn run_leased(
        &mut self,
        handler: &Arc<dyn crate::handler::LeasedBatchHandler>,
        msgs: &[Message],
    ) -> Result<Option<Vec<HandlerResult>>> {
        type Renewal = (
            Instant,
            DateTime<Utc>,
            Option<std::result::Result<bool, sea_orm::DbErr>>,
        );
        let ttl = self.inner.config.lease_ttl;
        let renew_every = ttl / 3;
        let work = catch_panic_batch(handler.handle_batch(msgs), msgs.len());
        tokio::pin!(work);
        let left = (self.lease_expires - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let mut expires = Instant::now() + left;
        let first = renew_every.min(left / 2);
        let mut tick = tokio::time::interval_at(Instant::now() + first, renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewal: Option<std::pin::Pin<Box<dyn Future<Output = Renewal> + Send>>> = None;
        loop {
            tokio::select! {
                r = &mut work => return Ok(Some(r)),
                () = tokio::time::sleep_until(expires) => {
                    tracing::warn!(queue = %self.queue.name, partition = self.index,
                        "lease ran out before a renewal succeeded; cancelling the handler");
                    return Ok(None);
                }
                _ = tick.tick(), if renewal.is_none() => {
                    let (db, me, id) =
                        (self.inner.db.clone(), self.inner.instance_id.clone(), self.id);
                    // Taken before the new expiry is computed: `started + ttl` is never later
                    // than the expiry the renewal writes.
                    let started = Instant::now();
                    let until = Utc::now() + ttl;
                    renewal = Some(Box::pin(async move {
                        let r = tokio::time::timeout(renew_every, lease::renew(&db, id, &me, until))
                            .await
                            .ok();
                        (started, until, r)
                    }));
                }
                (started, until, r) = async {
                    match renewal.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if renewal.is_some() => {
                    renewal = None;
                    match r {
                        Some(Ok(true)) => {
                            expires = started + ttl;
                            self.lease_expires = until;
                        }
                        Some(Ok(false)) => return Ok(None),
                        Some(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                        None => tracing::warn!("lease renewal timed out"),
                    }
                }
            }
        }
    }

    fn after_ack(&self, a: &Applied<'_>, msgs: &[Message]) {
        tracing::debug!(queue = %self.queue.name, partition = self.index,
            processed_seq = a.processed, acked = a.acked, dead = a.dead.len(),
            retry = a.retry_at.is_some(), batch = msgs.len(), "batch done");
        if a.processed > msgs.first().map(|m| m.seq - 1).unwrap_or(a.processed) {
            self.inner.signals.wake_vacuum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_moves_match_their_arguments() {
        for d in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
            for n in [1i64, 5] {
                let moves: Vec<CursorMove> = (1..=n).map(|p| (p, p * 10, p * 10 + 3)).collect();
                let (sql, args) = cursor_moves(d, &moves, None);
                assert_eq!(sql.matches('?').count(), args.len(), "{d:?}: {sql}");
                assert!(!sql.contains("locked_by"));
                let (sql, args) = cursor_moves(d, &moves, Some((d.time(Utc::now()), "me")));
                assert_eq!(sql.matches('?').count(), args.len(), "{d:?}: {sql}");
                // The holder binds the last placeholder, the guard that ends the statement.
                assert!(sql.ends_with(lease::ACK_GUARD), "{sql}");
                assert_eq!(args.last(), Some(&Value::from("me")));
            }
        }
    }
}
