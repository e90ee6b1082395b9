//! Coalesced leased I/O: the state-and-batch reads and the clean acks of every leased processor
//! of this instance go through two small driver tasks, and whatever requests are waiting when a
//! driver gets to run become ONE statement.
//!
//! A sequencer pass typically wakes several partitions at once. Each would otherwise pay its own
//! round trip to read and another to ack; at a trickle (one message per producer transaction)
//! those round trips, not the rows, are what the database and the engine spend their CPU on.
//! Nothing waits on a timer: a driver takes what is queued, and requests arriving while its
//! statement runs form the next one, so a lone request goes out at once.
//!
//! Only clean acks are coalesced (every message acked: the cursor moves, attempts reset, the
//! lease is extended). Retries and dead letters keep their per-partition statements.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{QueryResult, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::backend::{Db, Dialect, MAX_IN_LIST, execute, placeholders, postgres, query_all};
use crate::outbox::Inner;

/// A failure shared by every request of one combined statement.
pub(crate) type Shared<T> = std::result::Result<T, String>;

type Envelope<Req, Res> = (Req, oneshot::Sender<Res>);

/// Hands requests to a driver task that runs them in batches. Dropping the last clone ends the
/// driver (after it answered what was queued).
pub(crate) struct Coalescer<Req, Res> {
    tx: mpsc::UnboundedSender<Envelope<Req, Res>>,
}

impl<Req, Res> Clone for Coalescer<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Res: Send + 'static> Coalescer<Req, Res> {
    /// Spawns the driver in `span`. `run` gets every queued request (at most `limit`) and
    /// returns one answer per request, in order.
    pub(crate) fn spawn<F, Fut>(
        tasks: &mut JoinSet<()>,
        limit: usize,
        span: tracing::Span,
        run: F,
    ) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Res>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope<Req, Res>>();
        tasks.spawn(
            async move {
                while let Some(first) = rx.recv().await {
                    // Partitions woken by the same pass are runnable now: let them queue up.
                    tokio::task::yield_now().await;
                    let mut batch = vec![first];
                    while batch.len() < limit {
                        match rx.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    let (reqs, replies): (Vec<Req>, Vec<oneshot::Sender<Res>>) =
                        batch.into_iter().unzip();
                    for (reply, res) in replies.into_iter().zip(run(reqs).await) {
                        // The requester may have been cancelled meanwhile; nothing to do then.
                        let _ = reply.send(res);
                    }
                }
            }
            .instrument(span),
        );
        Self { tx }
    }

    /// Runs one request as part of the next combined statement. `None` when the driver is gone
    /// (the engine is shutting down).
    pub(crate) async fn call(&self, req: Req) -> Option<Res> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((req, tx)).ok()?;
        rx.await.ok()
    }
}

/// A state-and-batch read: partition id and batch size.
pub(crate) type ReadReq = (i64, usize);
/// The rows of one partition (see [`super::state_and_batch_sql`]'s columns).
pub(crate) type ReadRes = Shared<Vec<QueryResult>>;

/// A clean ack: the cursor moves `from` → `to`, and the lease is extended to at least `until`.
pub(crate) struct AckReq {
    pub(crate) partition_id: i64,
    pub(crate) from: i64,
    pub(crate) to: i64,
    pub(crate) until: DateTime<Utc>,
}
/// `Some(expiry written)` when the ack applied, `None` when its guard failed (lease lost or
/// cursor moved).
pub(crate) type AckRes = Shared<Option<DateTime<Utc>>>;

/// A lease to take: partition id and the expiry asked for.
pub(crate) type AcquireReq = (i64, DateTime<Utc>);
/// `Some(expiry written)` when the lease is ours now, `None` when another instance holds it.
pub(crate) type AcquireRes = Shared<Option<DateTime<Utc>>>;

/// The drivers of one engine instance.
#[derive(Clone)]
pub(crate) struct LeasedIo {
    pub(crate) reads: Coalescer<ReadReq, ReadRes>,
    pub(crate) acks: Coalescer<AckReq, AckRes>,
    pub(crate) acquires: Coalescer<AcquireReq, AcquireRes>,
}

impl LeasedIo {
    pub(crate) fn spawn(inner: &Arc<Inner>, tasks: &mut JoinSet<()>) -> Self {
        let i = inner.clone();
        let instance = &inner.instance_id;
        let span = tracing::debug_span!(parent: None, "outbox.leased.read", %instance);
        let reads = Coalescer::spawn(tasks, MAX_IN_LIST, span, move |reqs| {
            let i = i.clone();
            async move { read_many(&i.db, &reqs).await }
        });
        let i = inner.clone();
        let span = tracing::debug_span!(parent: None, "outbox.leased.ack", %instance);
        let acks = Coalescer::spawn(tasks, MAX_IN_LIST, span, move |reqs| {
            let i = i.clone();
            async move { ack_many(&i, &reqs).await }
        });
        let i = inner.clone();
        let span = tracing::debug_span!(parent: None, "outbox.leased.acquire", %instance);
        let acquires = Coalescer::spawn(tasks, MAX_IN_LIST, span, move |reqs| {
            let i = i.clone();
            async move { acquire_many(&i, &reqs).await }
        });
        Self {
            reads,
            acks,
            acquires,
        }
    }
}

/// Every lease asked for at once in one statement ([`super::lease::acquire_many`]), with one
/// expiry: the earliest asked for, so no processor believes in a longer lease than written.
async fn acquire_many(inner: &Inner, reqs: &[AcquireReq]) -> Vec<AcquireRes> {
    let until = reqs.iter().map(|(_, u)| *u).min().unwrap_or_else(Utc::now);
    let ids: Vec<i64> = reqs.iter().map(|(pid, _)| *pid).collect();
    match super::lease::acquire_many(&inner.db, &ids, &inner.instance_id, until).await {
        Ok(ours) => reqs
            .iter()
            .map(|(pid, _)| Ok(ours.contains(pid).then_some(until)))
            .collect(),
        Err(e) => {
            let e = e.to_string();
            reqs.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

/// One read per distinct batch size (normally one): rows grouped back by partition.
pub(crate) async fn read_many(db: &Db, reqs: &[ReadReq]) -> Vec<ReadRes> {
    let mut by_limit: HashMap<usize, Vec<i64>> = HashMap::new();
    for (pid, limit) in reqs {
        by_limit.entry(*limit).or_default().push(*pid);
    }
    let mut rows_of: HashMap<i64, Vec<QueryResult>> = HashMap::new();
    let mut failed: Option<String> = None;
    for (limit, pids) in by_limit {
        let sql = super::state_and_batch_sql(db, pids.len());
        let mut args = vec![Value::from(limit as i64)];
        args.extend(db.dialect.list_args(&pids));
        match db.query_all(&sql, args).await {
            Ok(rows) => {
                for r in rows {
                    match r.try_get::<i64>("", "pid") {
                        Ok(pid) => rows_of.entry(pid).or_default().push(r),
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
            }
            Err(e) => failed = Some(e.to_string()),
        }
    }
    reqs.iter()
        .map(|(pid, _)| match &failed {
            Some(e) => Err(e.clone()),
            None => Ok(rows_of.remove(pid).unwrap_or_default()),
        })
        .collect()
}

/// All clean acks in one guarded `UPDATE`. PostgreSQL and SQLite return the partitions it
/// applied to; on MySQL (no `UPDATE … RETURNING`) a count short of the request is resolved by
/// reading the cursors back.
async fn ack_many(inner: &Inner, reqs: &[AckReq]) -> Vec<AckRes> {
    match ack_statement(inner, reqs).await {
        Ok((applied, until)) => reqs
            .iter()
            .map(|r| Ok(applied.contains(&r.partition_id).then_some(until)))
            .collect(),
        Err(e) => {
            let e = e.to_string();
            reqs.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

/// The coalesced leased ack: every cursor move under our lease, extended to `until`; on
/// PostgreSQL committed without a WAL flush, and returning the partitions it applied to where
/// the backend can (not MySQL).
pub(crate) fn ack_sql(
    d: Dialect,
    moves: &[super::CursorMove],
    until: DateTime<Utc>,
    me: &str,
) -> (String, Vec<Value>) {
    let (mut sql, args) = super::cursor_moves(d, moves, Some((d.time(until), me)));
    if d == Dialect::Postgres {
        // A lost leased ack only means a redelivery: skip the WAL flush.
        sql.push_str(postgres::ASYNC_COMMIT_CONDITION);
    }
    if d != Dialect::MySql {
        sql.push_str(" RETURNING partition_id");
    }
    (sql, args)
}

async fn ack_statement(
    inner: &Inner,
    reqs: &[AckReq],
) -> std::result::Result<(Vec<i64>, DateTime<Utc>), sea_orm::DbErr> {
    let db = &inner.db;
    let d = db.dialect;
    let me = inner.instance_id.as_str();
    // One expiry for all: the earliest asked for, so no processor believes in a longer lease
    // than the one written.
    let until = reqs.iter().map(|r| r.until).min().unwrap_or_else(Utc::now);
    let moves: Vec<super::CursorMove> = reqs
        .iter()
        .map(|r| (r.partition_id, r.from, r.to))
        .collect();
    let (sql, args) = ack_sql(d, &moves, until, me);
    let _gate = db.write_gate().await;
    let applied = match d {
        Dialect::Postgres | Dialect::Sqlite => query_all(&db.conn, d, &sql, args)
            .await?
            .iter()
            .map(|r| r.try_get::<i64>("", "partition_id"))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Dialect::MySql => {
            let n = execute(&db.conn, d, &sql, args).await?;
            if n == reqs.len() as u64 {
                reqs.iter().map(|r| r.partition_id).collect()
            } else {
                // Some guards failed: the rows now showing our target cursor under our lease
                // are the ones this statement moved.
                tracing::debug!(
                    acks = reqs.len(),
                    applied = n,
                    "combined ack partly refused; reading the cursors back"
                );
                let rows = query_all(
                    &db.conn,
                    d,
                    &format!(
                        "SELECT partition_id, processed_seq, locked_by FROM \
                         modkit_outbox_processor WHERE partition_id IN ({})",
                        placeholders(reqs.len())
                    ),
                    reqs.iter().map(|r| Value::from(r.partition_id)).collect(),
                )
                .await?;
                let mut now: HashMap<i64, (i64, Option<String>)> = HashMap::new();
                for r in rows {
                    now.insert(
                        r.try_get("", "partition_id")?,
                        (r.try_get("", "processed_seq")?, r.try_get("", "locked_by")?),
                    );
                }
                reqs.iter()
                    .filter(|r| {
                        now.get(&r.partition_id)
                            .is_some_and(|(seq, by)| *seq == r.to && by.as_deref() == Some(me))
                    })
                    .map(|r| r.partition_id)
                    .collect()
            }
        }
    };
    Ok((applied, until))
}
