//! PostgreSQL specifics: the one-round-trip enqueue with `pg_notify`, and the `LISTEN` task that
//! turns notifications from every instance into local wake-ups.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::signals::Signals;

/// Notification channel shared by all instances on one database.
pub(crate) const CHANNEL: &str = "modkit_outbox";
/// Payload telling sequencers that incoming rows were committed.
pub(crate) const INCOMING: &str = "i";
/// Prefix of the payload telling processors that partition `<id>` got new sequenced rows:
/// `s:<partition id>:<sender>\t<holder>`. The holder is the live lease holder's instance id;
/// empty when the lease is free (or expired) and the sender processes the partition itself;
/// [`NO_LOCAL_PROCESSOR`] when it is free and the sender does not. Instance ids hold no control
/// characters. See [`Wake`].
pub(crate) const SEQUENCED_PREFIX: &str = "s:";

/// Prefix of the payload telling one instance's sequencer that partitions whose live lease it
/// holds have incoming rows: `q:<holder instance id>`. A trickle pass leaves such partitions to
/// their holder (see [`sequence_pass_sql`]) and sends this instead; the holder's pass then
/// moves them with its own producers' rows and hands them to its processors.
pub(crate) const HOLDER_WAKE_PREFIX: &str = "q:";

/// Holder field of a free lease the sender will not take.
pub(crate) const NO_LOCAL_PROCESSOR: &str = "*";

/// How long another instance waits before its processor goes for a free lease that the
/// sequencing instance's own processor (woken in-process at once) is taking: delivery then
/// stays where the rows were sequenced, with no cross-instance hop per pass (at B=1 with three
/// instances in one process, leases split over instances ran at 0.6–0.8 × one instance). Only
/// if that processor fails to take it does another instance step in, this much later.
pub(crate) const FREE_LEASE_WAKE_DELAY: Duration = Duration::from_millis(100);

/// What a listener does with a "sequenced" notification.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Wake the partition's processor now (we hold the lease, the lease is free and the
    /// sender will not take it, or the sender did not say).
    Now(i64),
    /// The lease is free and the sender's own processor is taking it: wake after
    /// [`FREE_LEASE_WAKE_DELAY`].
    Later(i64),
    /// Our own notification, or the lease is held by another live instance (it was told).
    Ignore,
}

/// Reads a "sequenced" payload (the part after [`SEQUENCED_PREFIX`]) as seen by instance `me`.
/// Payloads without a holder (older engines) wake at once.
pub(crate) fn sequenced_wake(rest: &str, me: &str) -> Wake {
    let Some((id, tail)) = rest.split_once(':') else {
        return Wake::Ignore;
    };
    let Ok(id) = id.parse::<i64>() else {
        return Wake::Ignore;
    };
    let (from, holder) = match tail.rsplit_once('\t') {
        Some((from, holder)) => (from, Some(holder)),
        None => (tail, None),
    };
    match holder {
        _ if from == me => Wake::Ignore,
        None => Wake::Now(id),
        Some(h) if h == me || h == NO_LOCAL_PROCESSOR => Wake::Now(id),
        Some("") => Wake::Later(id),
        Some(_) => Wake::Ignore,
    }
}

/// One message: body, incoming row and notification in a single statement (one round trip).
///
/// Used when no sequencer runs in the producer's process. A `NOTIFY` costs the producer more
/// than a round trip: PostgreSQL serializes the commits of notifying transactions (a database-wide
/// lock held through the commit's WAL flush), so concurrent producers lose group commit.
pub(crate) const ENQUEUE_ONE_NOTIFY: &str = "WITH b AS (\
     INSERT INTO modkit_outbox_body (payload, payload_type, headers, created_at) \
     VALUES (?, ?, ?, ?) RETURNING id), \
   i AS (INSERT INTO modkit_outbox_incoming (partition_id, body_id) SELECT ?, id FROM b RETURNING body_id) \
   SELECT body_id AS id, pg_notify('modkit_outbox', 'i') AS n FROM i";

/// [`ENQUEUE_ONE_NOTIFY`] without the notification: the local sequencer is woken in-process.
pub(crate) const ENQUEUE_ONE: &str = "WITH b AS (\
     INSERT INTO modkit_outbox_body (payload, payload_type, headers, created_at) \
     VALUES (?, ?, ?, ?) RETURNING id) \
   INSERT INTO modkit_outbox_incoming (partition_id, body_id) SELECT ?, id FROM b RETURNING body_id AS id";

/// Condition on `pr` (a `processor` row) in [`sequence_pass_sql`]: another instance holds its
/// live lease (`me` is the statement's CTE holding this instance's id).
const LEASED_ELSEWHERE: &str = "pr.locked_by <> (SELECT id FROM me) AND pr.locked_until > now()";

/// A whole sequencer pass for a group of partitions in one statement (one round trip, committed
/// on its own): lock the partitions (`SKIP LOCKED`), take up to `$n` oldest incoming rows of
/// each, delete them, number the rows actually deleted after each partition's current sequence,
/// insert them into `outgoing`, advance the sequences, and notify the other instances.
///
/// Numbering uses the rows the `DELETE` really removed and the sequence value the lock returned
/// (READ COMMITTED re-reads a locked row at its newest version), so rows another sequencer moved
/// between this statement's snapshot and its lock are neither numbered nor moved twice: seqs stay
/// gapless. The last row reports how many partitions were locked.
///
/// Only partitions whose lease is not held by this instance are notified: our own processors
/// are woken in-process, and a `NOTIFY` serializes the commit behind every other notifying
/// transaction. The payload names the live lease holder, so only it wakes ([`Wake`]). The statement commits with `synchronous_commit = off` (bookkeeping; see
/// GUARANTEES.md: a crash can only lose a suffix of such commits, which the rows still in
/// `incoming` redo).
///
/// Without candidate ids ([`PassCandidates::Probe`]) the statement finds the partitions with
/// incoming rows itself (one index probe per partition), so a pass is a single round trip. That
/// form (a trickle) also leaves partitions whose live lease another instance holds to that
/// instance, and notifies each such holder once ([`HOLDER_WAKE_PREFIX`]): with producers in
/// several instances, each instance's sequencer chased its own producers' commits over the same
/// partitions (three instances at B=1: 7 × the passes of one, 1.8 rows each, 0.44 × its
/// throughput). Who moves a partition's rows never affects their order (the partition row lock
/// does); this only chooses the instance whose processors get them as a hand-off. A bigger pass
/// (ids form, after a backlog) still takes every partition it can lock.
///
/// Every row carries `locked_n`/`cand_n`/`held_n` as NULL except the last, which reports how
/// many partitions were locked and (probe form) how many had incoming rows (fewer locked than
/// found means another sequencer held some), and how many lease holders were woken. Placeholders: the instance id, the candidate ids array
/// (ids form), the per-partition limit, then (when handing off) the open partitions array.
pub(crate) fn sequence_pass_sql(c: PassCandidates, processed_here: &str, hand: bool) -> String {
    let ours = if processed_here.is_empty() {
        String::new()
    } else {
        format!("WHEN tops.partition_id IN ({processed_here}) THEN '' ")
    };
    let (cand, filter, cand_n, held_n) = match c {
        PassCandidates::Ids => (
            String::new(),
            "id = ANY(?)".to_owned(),
            "NULL::bigint",
            "NULL::bigint",
        ),
        PassCandidates::Probe(limit) => (
            format!(
                "cand AS MATERIALIZED ( \
                    SELECT p.id FROM modkit_outbox_partitions p WHERE EXISTS ( \
                        SELECT 1 FROM modkit_outbox_incoming i WHERE i.partition_id = p.id) \
                    AND NOT EXISTS (SELECT 1 FROM modkit_outbox_processor pr \
                        WHERE pr.partition_id = p.id AND {LEASED_ELSEWHERE}) \
                    ORDER BY p.id LIMIT {limit}), \
                 held AS MATERIALIZED ( \
                    SELECT COUNT(pg_notify('{CHANNEL}', '{HOLDER_WAKE_PREFIX}' || h.locked_by)) AS n \
                    FROM (SELECT DISTINCT pr.locked_by FROM modkit_outbox_processor pr \
                        WHERE {LEASED_ELSEWHERE} AND EXISTS (SELECT 1 FROM modkit_outbox_incoming i \
                              WHERE i.partition_id = pr.partition_id)) h), "
            ),
            "id IN (SELECT id FROM cand)".to_owned(),
            "(SELECT COUNT(*) FROM cand)",
            "(SELECT n FROM held)",
        ),
    };
    // The hand-off rows (see `processor::handoff`): every moved row of the partitions in the
    // last placeholder's array, with its body, when the pass moved fewer than
    // `HANDOFF_BELOW` rows in all; `body_id` tells them from the other rows.
    let (none, handed) = if hand {
        (
            ", NULL::bigint AS body_id, NULL::bytea AS payload, NULL::text AS payload_type, \
             NULL::text AS headers, NULL::timestamptz AS created_at"
                .to_owned(),
            format!(
                " UNION ALL SELECT nb.partition_id, nb.seq, NULL, NULL, NULL, NULL, b.id, b.payload, \
             b.payload_type, b.headers, b.created_at FROM numbered nb \
             JOIN modkit_outbox_body b ON b.id = nb.body_id \
             WHERE nb.partition_id = ANY(CAST(? AS BIGINT[])) \
               AND (SELECT COUNT(*) FROM numbered) < {HANDOFF_BELOW}"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "WITH me AS (SELECT CAST(? AS TEXT) AS id), {cand}locked AS ( \
            SELECT id, \"sequence\" AS seq FROM modkit_outbox_partitions \
            WHERE {filter} ORDER BY id FOR NO KEY UPDATE SKIP LOCKED), \
         picked AS ( \
            SELECT i.id, i.partition_id, i.body_id FROM locked l CROSS JOIN LATERAL ( \
                SELECT id, partition_id, body_id FROM modkit_outbox_incoming \
                WHERE partition_id = l.id ORDER BY id LIMIT ?) i), \
         moved AS ( \
            DELETE FROM modkit_outbox_incoming d USING picked p WHERE d.id = p.id \
            RETURNING d.id, d.partition_id, d.body_id), \
         numbered AS ( \
            SELECT m.partition_id, m.body_id, \
                   l.seq + ROW_NUMBER() OVER (PARTITION BY m.partition_id ORDER BY m.id) AS seq \
            FROM moved m JOIN locked l ON l.id = m.partition_id), \
         ins AS ( \
            INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) \
            SELECT partition_id, body_id, seq, now() FROM numbered), \
         tops AS ( \
            SELECT partition_id, MAX(seq) AS hi, COUNT(*) AS n FROM numbered GROUP BY partition_id), \
         upd AS ( \
            UPDATE modkit_outbox_partitions t SET \"sequence\" = tops.hi FROM tops \
            WHERE t.id = tops.partition_id), \
         cfg AS (SELECT set_config('synchronous_commit', 'off', true) AS v) \
         SELECT tops.partition_id, tops.hi, tops.n, NULL::bigint AS locked_n, \
             NULL::bigint AS cand_n, NULL::bigint AS held_n{none} FROM tops \
         LEFT JOIN modkit_outbox_processor pr ON pr.partition_id = tops.partition_id \
         CROSS JOIN LATERAL (SELECT CASE \
             WHEN pr.locked_by = (SELECT id FROM me) AND pr.locked_until > now() THEN NULL \
             ELSE pg_notify('{CHANNEL}', \
                 '{SEQUENCED_PREFIX}' || tops.partition_id || ':' || (SELECT id FROM me) || chr(9) \
                 || CASE WHEN pr.locked_until > now() THEN COALESCE(pr.locked_by, '') \
                    {ours}ELSE '{NO_LOCAL_PROCESSOR}' END) END) nx \
         UNION ALL SELECT NULL, NULL, NULL, (SELECT COUNT(*) FROM locked), {cand_n}, {held_n}{none} \
         FROM cfg\
         {handed}"
    )
}

/// A pass hands its rows to local processors only when it moved fewer than this many (a
/// trickle, where the processor's read is a round trip per few messages); bigger passes skip
/// reading the bodies.
pub(crate) const HANDOFF_BELOW: usize = 64;

/// Which partitions a sequencer pass statement works on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PassCandidates {
    /// The ids bound as one array (found by a separate probe).
    Ids,
    /// Whichever partitions have incoming rows, at most this many.
    Probe(usize),
}

/// Appended to the `WHERE` of a single-statement bookkeeping write (a leased ack): the
/// statement's own commit then skips the WAL flush (`synchronous_commit = off` for this
/// transaction only). The condition is always true; it only runs for rows the other conditions
/// matched, and without such a row nothing is written. See GUARANTEES.md on what a crash loses.
pub(crate) const ASYNC_COMMIT_CONDITION: &str =
    " AND set_config('synchronous_commit', 'off', true) IS NOT NULL";

/// Notifies every instance that incoming rows were committed (sent on commit).
pub(crate) const NOTIFY_INCOMING: &str = "SELECT pg_notify('modkit_outbox', 'i')";

/// Listens on [`CHANNEL`] until cancelled, reconnecting with backoff. After every (re)connect it
/// asks for a reconcile, since notifications sent while disconnected are lost.
pub(crate) async fn listen(
    conn: DatabaseConnection,
    signals: Arc<Signals>,
    instance: String,
    cancel: CancellationToken,
) {
    let pool = conn.get_postgres_connection_pool().clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "outbox LISTEN connection failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "outbox LISTEN failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        tracing::debug!(channel = CHANNEL, "outbox listening");
        backoff = Duration::from_millis(100);
        signals.reconcile_now();
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    let payload = n.payload();
                    // `i`: rows committed; `q:<us>`: rows left to us as their lease holder.
                    if payload == INCOMING
                        || payload.strip_prefix(HOLDER_WAKE_PREFIX) == Some(instance.as_str())
                    {
                        signals.incoming_committed();
                    } else if let Some(rest) = payload.strip_prefix(SEQUENCED_PREFIX) {
                        match sequenced_wake(rest, &instance) {
                            Wake::Now(id) => signals.wake_processor(id),
                            Wake::Later(id) => {
                                let signals = signals.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(FREE_LEASE_WAKE_DELAY).await;
                                    signals.wake_processor(id);
                                });
                            }
                            Wake::Ignore => {}
                        }
                    }
                }
                Ok(None) => {
                    // The connection dropped and sqlx reconnected: we may have missed some.
                    tracing::debug!("outbox LISTEN connection re-established");
                    signals.reconcile_now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox LISTEN connection lost; reconnecting");
                    signals.reconcile_now();
                    break;
                }
            }
        }
    }
}

/// Vacuum: deletes every locked partition's window of processed `outgoing` rows and returns
/// their bodies. Placeholders: three arrays of partition ids, exclusive lower and inclusive
/// upper seqs (one statement text for any number of partitions).
pub(crate) const VACUUM_WINDOWS: &str = "DELETE FROM modkit_outbox_outgoing o \
     USING unnest(CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[])) AS w(pid, lo, hi) \
     WHERE o.partition_id = w.pid AND o.seq > w.lo AND o.seq <= w.hi RETURNING o.body_id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequenced_payload_wakes_the_holder_and_delays_free_leases() {
        assert_eq!(sequenced_wake("7:a\tb", "b"), Wake::Now(7));
        assert_eq!(sequenced_wake("7:a\tc", "b"), Wake::Ignore);
        assert_eq!(sequenced_wake("7:a\t", "b"), Wake::Later(7));
        assert_eq!(
            sequenced_wake("7:a\t*", "b"),
            Wake::Now(7),
            "free, sender has no processor"
        );
        assert_eq!(sequenced_wake("7:b\t", "b"), Wake::Ignore, "our own");
        // Instance ids may hold ':'; an older engine's payload has no holder.
        assert_eq!(sequenced_wake("7:x:y\tb:1", "b:1"), Wake::Now(7));
        assert_eq!(sequenced_wake("7:a", "b"), Wake::Now(7));
        assert_eq!(sequenced_wake("7:b", "b"), Wake::Ignore);
        assert_eq!(sequenced_wake("x:a\t", "b"), Wake::Ignore);
    }
}
