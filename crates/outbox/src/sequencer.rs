//! The sequencer: moves committed `incoming` rows to `outgoing`, giving each partition gapless
//! sequence numbers 1, 2, 3… in incoming-id order among the rows visible at that moment.
//!
//! One pass, whatever the number of partitions, is one transaction of a handful of statements:
//! 1. find partitions with incoming rows (plain read; while passes keep moving rows, MySQL
//!    finds them inside step 2's statement instead, see [`mysql::lock_partitions_with_rows`];
//!    SQLite never looks for candidates, see step 3);
//! 2. lock their `partitions` rows with `SKIP LOCKED` (PostgreSQL `FOR NO KEY UPDATE`, which
//!    the key-share locks of foreign-key checks do not conflict with; MySQL `FOR UPDATE` under READ
//!    COMMITTED; SQLite's `BEGIN IMMEDIATE` already excludes other writers). Only the partitions
//!    this pass works on are locked, and the locks are on `partitions` rows, never on the
//!    incoming rows of other partitions;
//! 3. read up to `sequencer_batch` incoming rows per locked partition, oldest first (at a
//!    trickle: the oldest `sequencer_batch` rows of the locked partitions together; SQLite,
//!    with one writer, reads the oldest rows of the whole table, joined to their partitions'
//!    sequences, see `sqlite_read`);
//! 4. insert them into `outgoing`, advance each partition's `sequence`, delete them from
//!    `incoming` by primary key (and check that every row was still there). On MySQL these
//!    writes go as one text-protocol batch per 500 rows ([`mysql::sequence_writes`]);
//! 5. commit, hand the rows with their bodies to local leased processors that can take them
//!    (a trickle pass then also reads the bodies; see [`crate::processor::handoff`]), then wake
//!    the partitions' processors (PostgreSQL: `NOTIFY` to the other instances for partitions
//!    whose lease this instance does not hold).
//!
//! On PostgreSQL steps 2–5 are one statement per group, and a trickle pass (the previous one
//! moved fewer than [`SPLIT_ABOVE`] rows) is one statement including step 1. Groups run
//! concurrently only after a big pass: at a trickle they would only multiply round trips.
//!
//! A partition skipped because another instance holds it is not "empty": the pass reports it and
//! the loop re-checks shortly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sea_orm::{ConnectionTrait, Value};
use tokio_util::sync::CancellationToken;

use crate::backend::postgres::PassCandidates;
use crate::backend::{Dialect, MAX_IN_LIST, mysql, placeholders, postgres, query_all, sqlite};
use crate::config::FOREIGN_POLL_MIN;
use crate::error::{OutboxError, Result};
use crate::outbox::Inner;
use crate::processor::handoff::HandedRow;
use crate::signals::{PENDING_COMMIT_WINDOW, SequencerAlive};

/// First re-check delay after a pass found nothing right after an enqueue; doubles up to
/// [`RECHECK_MAX`].
const RECHECK_MIN: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(25);
/// The sequencer lingers (`OutboxConfig::sequencer_linger`, per backend by default) only after
/// a pass that moved at least this many rows: commits arrive faster than passes. Below it (a
/// pass finds one to three rows: the load leaves the sequencer idle between commits) it only
/// yields, and each commit is moved as soon as it arrives. A 3 ms linger after every small
/// pass only added latency at a steady 500 msg/s on PostgreSQL (p50 1.4 → 3.1 ms).
const LINGER_FROM: usize = 4;
/// The sequencer lingers only after a pass that moved fewer rows than this (a trickle): bigger
/// passes already carry many commits each.
const LINGER_BELOW: usize = 64;
/// PostgreSQL: after a pass that moved nothing and left rows to their lease holders in other
/// instances (woken with a `q:` notification), the next pass waits this long whatever local
/// commits signal: with producers in every instance, each commit re-ran a pass that only
/// notified the holder again (three instances at B=1: passes ran ~18 of 30 samples of
/// `pg_stat_activity`).
const HOLDER_RECHECK: Duration = Duration::from_millis(5);
/// Re-check delay when partitions were skipped because another instance held them.
const SKIPPED_RECHECK: Duration = Duration::from_millis(20);
/// Passes are split into concurrent groups only after a pass moved at least this many rows.
const SPLIT_ABOVE: usize = 256;
/// Partitions one pass works on (keeps every statement far below bind-parameter limits).
pub(crate) const MAX_PARTITIONS_PER_PASS: usize = MAX_IN_LIST;

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassResult {
    pub(crate) moved: usize,
    pub(crate) skipped: bool,
    /// PostgreSQL: rows were left to (and their lease holders woken by) another instance.
    pub(crate) left_to_holders: bool,
}

/// One sequencing pass over every partition that has incoming rows: the partitions are split
/// into up to `sequencer_workers` disjoint groups sequenced concurrently, each in its own
/// transaction (one group on SQLite, which has a single writer).
///
/// `hot`: the previous pass moved rows, so this one very likely finds some too. `hand`: the
/// previous pass moved fewer than [`LINGER_BELOW`] rows (a trickle of single-message commits),
/// so hand the moved rows to local processors (see [`crate::processor::handoff`]). In bigger
/// passes the processors' own reads are spread over big batches, and reading every body in
/// the sequencer's statement measured worse there (PostgreSQL B=100, paired runs: p50 latency
/// 35 against 28.5 ms). PostgreSQL also skips the bodies when the pass itself moved
/// [`postgres::HANDOFF_BELOW`] rows or more.
pub(crate) async fn pass(inner: &Inner, split: bool, hot: bool, hand: bool) -> Result<PassResult> {
    let db = &inner.db;
    if db.dialect == Dialect::Postgres && !split {
        // A trickle: finding and moving the rows is one statement, one round trip.
        return pass_group_postgres(inner, &[], hand).await;
    }
    if db.dialect == Dialect::MySql && hot && !split {
        // Rows keep coming: lock the partitions that have rows without the probe below (one
        // round trip less). A pass that moves nothing (or finds only partitions another
        // instance holds) falls through to the probe, which reports skipped partitions.
        let r = pass_group(inner, None, false, hand).await?;
        if r.moved > 0 {
            return Ok(r);
        }
    }
    if db.dialect == Dialect::Sqlite {
        // One writer, often one connection shared with the producers: the pass finds its rows
        // inside its own transaction (a prefix of `incoming`), so it queues for the connection
        // once. Only re-checks (while a commit may still be on its way) look first, with a
        // plain read that takes no write lock, so an idle engine does not take it either.
        if !hot
            && db
                .query_all(
                    "SELECT 1 AS one FROM modkit_outbox_incoming LIMIT 1",
                    vec![],
                )
                .await?
                .is_empty()
        {
            return Ok(PassResult::default());
        }
        return pass_group(inner, None, split, hand).await;
    }
    // One index probe per partition row: cheap however large the incoming backlog is. MySQL
    // leaves partitions another live instance holds the lease of to that instance's sequencer
    // (no `NOTIFY` would wake its processors; see `mysql::NOT_LEASED_ELSEWHERE`).
    let mut probe = "SELECT p.id FROM modkit_outbox_partitions p WHERE EXISTS \
         (SELECT 1 FROM modkit_outbox_incoming i WHERE i.partition_id = p.id)"
        .to_owned();
    let mut args = Vec::new();
    if db.dialect == Dialect::MySql {
        probe = format!("{probe} AND {}", mysql::NOT_LEASED_ELSEWHERE);
        args = not_leased_elsewhere_args(inner);
    }
    probe.push_str(" ORDER BY p.id");
    let candidates: Vec<i64> = db
        .query_all(&probe, args)
        .await?
        .iter()
        .map(|r| r.try_get::<i64>("", "id"))
        .collect::<std::result::Result<_, _>>()?;
    if candidates.is_empty() {
        return Ok(PassResult::default());
    }
    // Bounded statement size (bind-parameter limits); the loop runs another pass for the rest,
    // starting after where this one stopped.
    let from = inner.sequencer_from.load(Ordering::Relaxed);
    let (candidates, next) = probe_window(&candidates, from, MAX_PARTITIONS_PER_PASS);
    inner.sequencer_from.store(next, Ordering::Relaxed);
    let workers = if split {
        inner.config.sequencer_workers_for(db.dialect)
    } else {
        // A trickle: one statement moves it all; more would only multiply round trips.
        1
    };
    let per = candidates.len().div_ceil(workers);
    let results = futures::future::join_all(
        candidates
            .chunks(per)
            .map(|g| pass_group(inner, Some(g), split, hand)),
    )
    .await;
    let mut total = PassResult::default();
    for r in results {
        let r = r?;
        total.moved += r.moved;
        total.skipped |= r.skipped;
        total.left_to_holders |= r.left_to_holders;
    }
    Ok(total)
}

/// The partitions one pass takes from the probe's `candidates` (ascending ids): all of them
/// when they fit in `max`; otherwise `max` of them starting at the first id at or after `from`,
/// wrapping around, so that with more busy partitions than one pass takes, every one gets its
/// turn instead of the lowest ids taking every pass. Returns them in ascending order, with
/// where the next window starts.
fn probe_window(candidates: &[i64], from: i64, max: usize) -> (Vec<i64>, i64) {
    if candidates.len() <= max {
        return (candidates.to_vec(), 0);
    }
    let start = candidates.partition_point(|id| *id < from);
    let mut window: Vec<i64> = candidates
        .iter()
        .cycle()
        .skip(start)
        .take(max)
        .copied()
        .collect();
    let next = candidates[(start + max) % candidates.len()];
    window.sort_unstable();
    (window, next)
}

/// The binds of [`mysql::NOT_LEASED_ELSEWHERE`].
fn not_leased_elsewhere_args(inner: &Inner) -> Vec<Value> {
    vec![
        Value::from(inner.instance_id.as_str()),
        inner.db.dialect.time(chrono::Utc::now()),
    ]
}

/// Sequences one group of partitions in one transaction: the `candidates`, or (`None`: a busy
/// MySQL pass, or SQLite, whose `BEGIN IMMEDIATE` already excludes every other writer)
/// whichever partitions have incoming rows when the transaction starts.
async fn pass_group(
    inner: &Inner,
    candidates: Option<&[i64]>,
    split: bool,
    hand: bool,
) -> Result<PassResult> {
    let db = &inner.db;
    let d = db.dialect;
    if d == Dialect::Postgres {
        return pass_group_postgres(inner, candidates.unwrap_or_default(), hand).await;
    }
    let w = db.begin_bookkeeping().await?;
    let t = &w.txn;
    let Read {
        locked,
        rows,
        skipped,
        hand,
    } = if d == Dialect::Sqlite {
        sqlite_read(inner, t, split, hand).await?
    } else {
        lock_then_read(inner, t, candidates, split, hand).await?
    };
    if rows.is_empty() {
        w.rollback().await?;
        return Ok(PassResult {
            moved: 0,
            skipped,
            left_to_holders: false,
        });
    }
    // Per partition: (incoming id, body id, index of the row read).
    let mut by_partition: BTreeMap<i64, Vec<(i64, i64, usize)>> = BTreeMap::new();
    for (k, r) in rows.iter().enumerate() {
        let id: i64 = r.try_get("", "id")?;
        let pid: i64 = r.try_get("", "partition_id")?;
        let body: i64 = r.try_get("", "body_id")?;
        by_partition.entry(pid).or_default().push((id, body, k));
    }
    let now_utc = chrono::Utc::now();
    let mut outgoing: Vec<(i64, i64, i64)> = Vec::with_capacity(rows.len());
    let mut incoming_ids: Vec<i64> = Vec::with_capacity(rows.len());
    let mut new_seq: Vec<(i64, i64)> = Vec::with_capacity(by_partition.len());
    for (pid, list) in &mut by_partition {
        list.sort_unstable_by_key(|(id, _, _)| *id);
        let mut seq = locked[pid];
        for (id, body, _) in list.iter() {
            seq += 1;
            outgoing.push((*pid, *body, seq));
            incoming_ids.push(*id);
        }
        new_seq.push((*pid, seq));
    }

    let all_there = if d == Dialect::MySql {
        // A few text round trips instead of three prepared statements (see
        // [`mysql::sequence_writes`]); each batch must affect exactly its rows.
        let mut ok = true;
        for (sql, expected) in mysql::sequence_writes(&outgoing, &incoming_ids, &new_seq, now_utc) {
            ok &= t.execute_unprepared(&sql).await?.rows_affected() == expected;
        }
        ok
    } else {
        // SQLite (PostgreSQL returned above): one call at a trickle (see
        // [`sqlite::sequence_writes`]); together they must change exactly their rows.
        let (writes, expected) =
            sqlite::sequence_writes(&outgoing, &incoming_ids, &new_seq, now_utc);
        sqlite::execute_joined(t, writes).await? == expected
    };
    if !all_there {
        w.rollback().await?;
        return Err(OutboxError::Db(sea_orm::DbErr::Custom(format!(
            "sequencer: {} incoming rows read but the writes did not change exactly their rows; pass rolled back",
            incoming_ids.len()
        ))));
    }

    // (PostgreSQL never gets here: its pass is one statement, notifications included.)
    w.commit().await?;

    if hand {
        for (pid, list) in &by_partition {
            if !inner.handoffs.is_open(*pid) {
                continue;
            }
            // Committed already: a row that cannot be handed over is simply read by the
            // processor.
            match handed_rows(&rows, list, locked[pid]) {
                Ok(handed) => inner
                    .handoffs
                    .offer(*pid, locked[pid] + list.len() as i64, handed),
                Err(e) => tracing::debug!(partition_id = pid, error = %e, "no hand-off"),
            }
        }
    }
    for (pid, s) in &new_seq {
        tracing::trace!(partition_id = pid, sequence = s, "sequenced");
        inner.signals.wake_processor(*pid);
    }
    tracing::debug!(
        instance = %inner.instance_id,
        moved = incoming_ids.len(),
        partitions = new_seq.len(),
        "sequencer pass"
    );
    Ok(PassResult {
        moved: incoming_ids.len(),
        skipped,
        left_to_holders: false,
    })
}

/// What a pass locked and read: each locked partition's sequence, the incoming rows (oldest
/// first; with bodies when `hand`), and whether a candidate was skipped (another instance holds
/// it).
struct Read {
    locked: BTreeMap<i64, i64>,
    rows: Vec<sea_orm::QueryResult>,
    skipped: bool,
    hand: bool,
}

/// The body columns and join a trickle read adds when its rows go to a hand-off.
fn body_sql(hand: bool) -> (&'static str, &'static str) {
    if hand {
        (
            ", b.payload, b.payload_type, b.headers, b.created_at",
            " LEFT JOIN modkit_outbox_body b ON b.id = i.body_id",
        )
    } else {
        ("", "")
    }
}

/// MySQL: locks the partitions (the `candidates`, or with `None` those with incoming rows),
/// then reads their oldest incoming rows: two statements. (PostgreSQL's pass is one statement,
/// SQLite's is `sqlite_read`.)
async fn lock_then_read(
    inner: &Inner,
    t: &sea_orm::DatabaseTransaction,
    candidates: Option<&[i64]>,
    split: bool,
    hand: bool,
) -> Result<Read> {
    let d = inner.db.dialect;
    let seq = d.q("sequence");
    let (lock_sql, args) = match candidates {
        Some(c) => (
            format!(
                "SELECT id, {seq} AS seq FROM modkit_outbox_partitions WHERE id IN ({}) \
                 ORDER BY id{}",
                placeholders(c.len()),
                d.lock_skip_locked(),
            ),
            c.iter().map(|i| Value::from(*i)).collect(),
        ),
        None => (
            mysql::lock_partitions_with_rows(MAX_PARTITIONS_PER_PASS),
            not_leased_elsewhere_args(inner),
        ),
    };
    let locked: BTreeMap<i64, i64> = query_all(t, d, &lock_sql, args)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<i64>("", "id")?, r.try_get::<i64>("", "seq")?)))
        .collect::<std::result::Result<_, sea_orm::DbErr>>()?;
    let skipped = candidates.is_some_and(|c| locked.len() < c.len());
    if locked.is_empty() {
        return Ok(Read {
            locked,
            rows: Vec::new(),
            skipped,
            hand: false,
        });
    }
    let per = inner.config.sequencer_batch as u64;
    // A trickle pass also reads the bodies when a local leased processor can take them
    // straight from this pass (see `processor::handoff`).
    let hand = hand && !split && locked.keys().any(|p| inner.handoffs.is_open(*p));
    let (body_cols, body_join) = body_sql(hand);
    let rows = if split {
        // A backlog: oldest rows first, up to `per` for each partition, in one statement.
        let parts: Vec<String> = (0..locked.len())
            .map(|i| {
                format!(
                    "SELECT * FROM (SELECT id, partition_id, body_id FROM modkit_outbox_incoming \
                     WHERE partition_id = ? ORDER BY id LIMIT ?) t{i}"
                )
            })
            .collect();
        let mut args = Vec::with_capacity(2 * locked.len());
        for id in locked.keys() {
            args.push(Value::from(*id));
            args.push(Value::from(per));
        }
        query_all(t, d, &parts.join(" UNION ALL "), args).await?
    } else {
        // A trickle: the oldest `per` rows of these partitions, without a derived table per
        // partition (MariaDB materializes each). Any prefix in id order is a prefix of every
        // partition's rows, so what is left over is simply moved by the next pass.
        let sql = format!(
            "SELECT i.id, i.partition_id, i.body_id{body_cols} FROM modkit_outbox_incoming i\
             {body_join} WHERE i.partition_id IN ({}) ORDER BY i.id LIMIT ?",
            placeholders(locked.len())
        );
        let mut args: Vec<Value> = locked.keys().map(|id| Value::from(*id)).collect();
        args.push(Value::from(per));
        query_all(t, d, &sql, args).await?
    };
    Ok(Read {
        locked,
        rows,
        skipped,
        hand,
    })
}

/// SQLite: one writer (`BEGIN IMMEDIATE` excludes every other), so every committed incoming
/// row's id is above every earlier commit's, and the table's prefix in id order is a prefix of
/// every partition's rows. Reads that prefix in rowid order with each row's partition sequence
/// (`NOT INDEXED`: no per-partition lookups, no sort; `incoming` has no partition index on
/// SQLite, see the migration `m20261124_000002`): `sequencer_batch` rows, or in a backlog that
/// many for each of this instance's partitions.
async fn sqlite_read(
    inner: &Inner,
    t: &sea_orm::DatabaseTransaction,
    split: bool,
    hand: bool,
) -> Result<Read> {
    let d = inner.db.dialect;
    let per = inner.config.sequencer_batch as u64;
    let limit = if split {
        let partitions: usize = inner.queues.values().map(|q| q.partition_ids.len()).sum();
        per * partitions.clamp(1, MAX_PARTITIONS_PER_PASS) as u64
    } else {
        per
    };
    let hand = hand && !split && inner.handoffs.any_open();
    let (body_cols, body_join) = body_sql(hand);
    // `incoming` is the outer loop in rowid order (no sort; `CROSS JOIN` keeps SQLite's planner
    // from reordering); each row's partition is a primary-key lookup. The inner join skips a
    // row whose partition row is missing (the engine never writes one; no foreign key stops a
    // hand edit) instead of letting it block the prefix for good.
    let read = query_all(
        t,
        d,
        &format!(
            "SELECT i.id, i.partition_id, i.body_id, p.\"sequence\" AS seq{body_cols} \
             FROM modkit_outbox_incoming i NOT INDEXED \
             CROSS JOIN modkit_outbox_partitions p ON p.id = i.partition_id{body_join} \
             ORDER BY i.id LIMIT ?"
        ),
        vec![Value::from(limit)],
    )
    .await?;
    // At most `MAX_PARTITIONS_PER_PASS` partitions per pass (bounded per-key statements):
    // stop at the first row of one more. What is kept is still a prefix.
    let mut locked = BTreeMap::new();
    let mut rows = Vec::with_capacity(read.len());
    for r in read {
        let pid: i64 = r.try_get("", "partition_id")?;
        if !locked.contains_key(&pid) {
            if locked.len() == MAX_PARTITIONS_PER_PASS {
                break;
            }
            locked.insert(pid, r.try_get::<i64>("", "seq")?);
        }
        rows.push(r);
    }
    Ok(Read {
        locked,
        rows,
        skipped: false,
        hand,
    })
}

/// One partition's rows of a pass, with their bodies, as sequenced after `seq` (`list` in
/// incoming-id order). Stops at a row without a body (never expected: the processor reads it
/// and reports it as usual).
fn handed_rows(
    rows: &[sea_orm::QueryResult],
    list: &[(i64, i64, usize)],
    seq: i64,
) -> Result<Vec<HandedRow>> {
    let mut out = Vec::with_capacity(list.len());
    for (n, (_, body_id, k)) in list.iter().enumerate() {
        match HandedRow::from_row(&rows[*k], seq + 1 + n as i64, *body_id)? {
            Some(row) => out.push(row),
            None => break,
        }
    }
    Ok(out)
}

/// PostgreSQL: the whole group pass as one statement (see [`postgres::sequence_pass_sql`]):
/// on the given partitions (a backlog, split into groups), or (`ids` empty: a trickle) on
/// whichever have incoming rows. A trickle pass also returns the moved rows, with their bodies,
/// of the partitions whose local processor takes a hand-off.
async fn pass_group_postgres(inner: &Inner, ids: &[i64], hand: bool) -> Result<PassResult> {
    let db = &inner.db;
    let which = if ids.is_empty() {
        PassCandidates::Probe(MAX_PARTITIONS_PER_PASS)
    } else {
        PassCandidates::Ids
    };
    let open = if hand && ids.is_empty() {
        inner.handoffs.open_partitions()
    } else {
        Vec::new()
    };
    let hand = !open.is_empty();
    let sql = postgres::sequence_pass_sql(which, &inner.processed_here, hand);
    let mut args: Vec<Value> = vec![Value::from(inner.instance_id.as_str())];
    if !ids.is_empty() {
        args.extend(Dialect::Postgres.list_args(ids));
    }
    args.push(Value::from(inner.config.sequencer_batch as i64));
    if hand {
        args.extend(Dialect::Postgres.list_args(&open));
    }
    let rows = db.query_all(&sql, args).await?;
    let mut moved = 0usize;
    let (mut locked, mut found, mut held) = (0i64, ids.len() as i64, 0i64);
    let mut woken = Vec::new();
    let mut handed: BTreeMap<i64, Vec<HandedRow>> = BTreeMap::new();
    for r in &rows {
        let body_id = if hand {
            r.try_get::<Option<i64>>("", "body_id")?
        } else {
            None
        };
        match (r.try_get::<Option<i64>>("", "partition_id")?, body_id) {
            (Some(pid), Some(body_id)) => {
                // Committed already: a row that cannot be handed over is read as usual.
                let seq: i64 = r.try_get("", "hi")?;
                match HandedRow::from_row(r, seq, body_id) {
                    Ok(Some(row)) => handed.entry(pid).or_default().push(row),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(partition_id = pid, error = %e, "no hand-off"),
                }
            }
            (Some(pid), None) => {
                let n: i64 = r.try_get("", "n")?;
                moved += n as usize;
                tracing::trace!(partition_id = pid, moved = n, "sequenced");
                woken.push((pid, r.try_get::<i64>("", "hi")?));
            }
            (None, _) => {
                locked = r.try_get::<Option<i64>>("", "locked_n")?.unwrap_or(0);
                if let Some(n) = r.try_get::<Option<i64>>("", "cand_n")? {
                    found = n;
                }
                held = r.try_get::<Option<i64>>("", "held_n")?.unwrap_or(0);
            }
        }
    }
    for (pid, high) in woken {
        if let Some(mut rows) = handed.remove(&pid) {
            // Only a gapless run is kept (`offer`); the processor checks it starts at its cursor.
            rows.sort_unstable_by_key(|r| r.seq);
            inner.handoffs.offer(pid, high, rows);
        }
        inner.signals.wake_processor(pid);
    }
    if moved > 0 {
        tracing::debug!(
            instance = %inner.instance_id,
            moved,
            partitions = locked,
            "sequencer pass"
        );
    }
    Ok(PassResult {
        moved,
        skipped: locked < found,
        left_to_holders: held > 0,
    })
}

/// How long the sequencer waits after a pass that moved `moved` rows (fewer than
/// [`LINGER_BELOW`]): `linger` from [`LINGER_FROM`] rows on, nothing below (the load leaves the
/// sequencer idle between commits), and nothing after a pass that moved `sequencer_batch` rows
/// or more: it may have stopped at its read limit with more rows waiting, and with a small
/// configured batch a backlog would otherwise be moved one linger at a time.
fn linger_after(moved: usize, linger: Duration, sequencer_batch: usize) -> Duration {
    if moved < LINGER_FROM || moved >= sequencer_batch {
        Duration::ZERO
    } else {
        linger
    }
}

/// The sequencer task: runs passes while there is work, sleeps on signals otherwise. `_alive`
/// tells this process's producers that a local sequencer listens, until the task ends (or is
/// aborted: the future, and with it the guard, is dropped).
pub(crate) async fn run(inner: Arc<Inner>, cancel: CancellationToken, _alive: SequencerAlive) {
    let linger = inner.config.sequencer_linger_for(inner.db.dialect);
    let mut error_backoff = Duration::from_millis(50);
    let mut poll = Poll::new(
        inner.db.dialect != Dialect::Postgres,
        inner.config.poll_interval,
    );
    loop {
        // `start()` leaves a signal, so the first cycle runs at once.
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = inner.signals.sequencer_wait() => false,
            _ = tokio::time::sleep(poll.next) => true,
        };
        let mut moved_total = 0;
        let mut recheck = RECHECK_MIN;
        let mut skipped_rounds = 0;
        let mut split = false;
        let mut hot = false;
        let mut small = true;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let result = pass(&inner, split, hot, small).await;
            hot = result.as_ref().is_ok_and(|r| r.moved > 0);
            moved_total += result.as_ref().map_or(0, |r| r.moved);
            let (delay, interruptible) = match result {
                Ok(r) if r.moved > 0 => {
                    split = r.moved >= SPLIT_ABOVE;
                    small = r.moved < LINGER_BELOW;
                    error_backoff = Duration::from_millis(50);
                    recheck = RECHECK_MIN;
                    skipped_rounds = 0;
                    if small {
                        // A trickle: let a few more commits arrive so the next pass moves them
                        // together (a pass costs the same for 1 row or 100). Bounded, tiny.
                        let linger = linger_after(r.moved, linger, inner.config.sequencer_batch);
                        if linger.is_zero() {
                            tokio::task::yield_now().await;
                        } else {
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(linger) => {}
                            }
                        }
                    }
                    continue;
                }
                Ok(r) => {
                    error_backoff = Duration::from_millis(50);
                    split = false;
                    small = true;
                    if r.skipped && skipped_rounds < 50 {
                        skipped_rounds += 1;
                        (SKIPPED_RECHECK, true)
                    } else if inner
                        .signals
                        .last_enqueue()
                        .is_some_and(|t| t.elapsed() < PENDING_COMMIT_WINDOW)
                    {
                        if r.left_to_holders {
                            // The rows belong to lease holders elsewhere, now woken; their
                            // sequencers keep moving what our producers add while they find
                            // rows. Look again a little later, not at every local commit.
                            (HOLDER_RECHECK, false)
                        } else {
                            let d = recheck;
                            recheck = (recheck * 2).min(RECHECK_MAX);
                            (d, true)
                        }
                    } else {
                        poll.after_cycle(polled, moved_total);
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sequencer pass failed; retrying");
                    let d = error_backoff;
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                    (d, false)
                }
            };
            if interruptible {
                // A new signal cuts a re-check sleep short.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                    _ = inner.signals.sequencer_wait() => {}
                }
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// When the idle sequencer looks for rows nobody announced (see [`FOREIGN_POLL_MIN`]).
struct Poll {
    /// Whether looks speed up after finding rows (backends without `NOTIFY`).
    adaptive: bool,
    /// The slowest look: `poll_interval`.
    max: Duration,
    /// Delay until the next look.
    next: Duration,
}

impl Poll {
    /// Adaptive looks start fast: producers elsewhere may have started with this engine.
    fn new(adaptive: bool, max: Duration) -> Self {
        Self {
            adaptive,
            max,
            next: if adaptive {
                FOREIGN_POLL_MIN.min(max)
            } else {
                max
            },
        }
    }

    /// Adjusts the next look after a cycle of passes that a look (`polled`) or a signal
    /// started and that moved `moved` rows in all. Signalled cycles leave the pace alone.
    fn after_cycle(&mut self, polled: bool, moved: usize) {
        if !self.adaptive || !polled {
            return;
        }
        self.next = if moved > 0 {
            FOREIGN_POLL_MIN.min(self.max)
        } else {
            (self.next * 2).min(self.max)
        };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{FOREIGN_POLL_MIN, Poll, linger_after, probe_window};

    #[test]
    fn looks_speed_up_after_finding_rows_and_slow_down_when_idle() {
        let max = Duration::from_secs(1);
        let mut p = Poll::new(true, max);
        assert_eq!(p.next, FOREIGN_POLL_MIN, "fast after start");
        for _ in 0..20 {
            p.after_cycle(true, 0);
        }
        assert_eq!(p.next, max, "idle: back to poll_interval, never beyond");
        p.after_cycle(false, 10);
        assert_eq!(p.next, max, "a signalled cycle does not change the pace");
        p.after_cycle(true, 3);
        assert_eq!(p.next, FOREIGN_POLL_MIN, "a look found rows from elsewhere");
        p.after_cycle(true, 0);
        assert_eq!(p.next, FOREIGN_POLL_MIN * 2);
        p.after_cycle(false, 0);
        assert_eq!(p.next, FOREIGN_POLL_MIN * 2);
        for _ in 0..20 {
            p.after_cycle(true, 0);
        }
        assert_eq!(p.next, max, "back to poll_interval, never beyond");
        // With NOTIFY (PostgreSQL) the pace stays at poll_interval.
        let mut pg = Poll::new(false, max);
        assert_eq!(pg.next, max);
        pg.after_cycle(true, 5);
        assert_eq!(pg.next, max);
        // A poll_interval below the minimum is kept.
        let mut tiny = Poll::new(true, Duration::from_millis(1));
        tiny.after_cycle(true, 5);
        assert_eq!(tiny.next, Duration::from_millis(1));
    }

    #[test]
    fn probe_windows_take_turns_when_too_many_partitions_have_rows() {
        // Few enough: all, and the cursor resets.
        assert_eq!(probe_window(&[3, 5, 9], 7, 4), (vec![3, 5, 9], 0));
        // Too many: consecutive windows cover every partition, wrapping around.
        let ids: Vec<i64> = (1..=10).map(|i| i * 10).collect();
        let (w1, next) = probe_window(&ids, 0, 4);
        assert_eq!(w1, vec![10, 20, 30, 40]);
        let (w2, next) = probe_window(&ids, next, 4);
        assert_eq!(w2, vec![50, 60, 70, 80]);
        let (w3, next) = probe_window(&ids, next, 4);
        assert_eq!(w3, vec![10, 20, 90, 100]);
        assert_eq!(next, 30);
        // A cursor past the last id starts over; one between ids starts at the next one.
        assert_eq!(probe_window(&ids, 1000, 4).0, vec![10, 20, 30, 40]);
        assert_eq!(probe_window(&ids, 55, 4).0, vec![60, 70, 80, 90]);
    }

    #[test]
    fn a_pass_lingers_only_between_four_rows_and_its_batch() {
        let l = Duration::from_millis(10);
        // Below LINGER_FROM (4): the load leaves the sequencer idle between commits.
        assert_eq!(linger_after(3, l, 1000), Duration::ZERO);
        assert_eq!(linger_after(4, l, 1000), l);
        assert_eq!(linger_after(63, l, 1000), l);
        // A pass that moved a whole (small) batch may have more rows waiting: no linger, or a
        // backlog would move one batch per linger.
        assert_eq!(linger_after(32, l, 32), Duration::ZERO);
        assert_eq!(linger_after(31, l, 32), l);
        assert_eq!(linger_after(4, l, 4), Duration::ZERO);
    }
}
