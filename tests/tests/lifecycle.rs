//! Lifecycle and handler forms: `stop()` hands leases over at once, batch handlers (leased and
//! transactional) with partial results, handler panics, orphaned bodies.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Recorder, count, cursors_reach, eventually, fast_config, migrate, scalar};
use modkit_outbox::{
    HandlerResult, LeasedBatchHandler, Message, NewMessage, Outbox, OutboxConfig, Outcome,
    Partitions, TransactionalBatchHandler, TransactionalHandler,
};
use modkit_outbox_tests::{Backend, TestDb, backend_tests};
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement};

async fn stop_hands_leases_over_at_once(db: TestDb) {
    migrate(&db).await;
    // A long lease: only an explicit release lets B in quickly.
    let config = OutboxConfig {
        lease_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let a_rec = Recorder::default();
    let a = Outbox::builder(db.connect().await)
        .config(config.clone())
        .queue("handover", Partitions::of(2))
        .leased(a_rec.clone())
        .start()
        .await
        .expect("start A");
    let outbox = a.outbox();
    outbox
        .enqueue(&db.conn, "handover", 0, "1", "t")
        .await
        .expect("enqueue");
    outbox
        .enqueue(&db.conn, "handover", 1, "2", "t")
        .await
        .expect("enqueue");
    assert!(a_rec.wait_for(2, Duration::from_secs(10)).await);
    let t = Instant::now();
    a.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop() returned promptly"
    );
    assert_eq!(
        scalar(
            &db.conn,
            "SELECT COUNT(*) AS n FROM modkit_outbox_processor WHERE locked_by IS NOT NULL"
        )
        .await,
        0,
        "{:?}: stop() released the leases",
        db.backend
    );
    let b_rec = Recorder::default();
    let b = Outbox::builder(db.connect().await)
        .config(config)
        .queue("handover", Partitions::of(2))
        .leased(b_rec.clone())
        .start()
        .await
        .expect("start B");
    b.outbox()
        .enqueue(&db.conn, "handover", 0, "3", "t")
        .await
        .expect("enqueue");
    b.outbox()
        .enqueue(&db.conn, "handover", 1, "4", "t")
        .await
        .expect("enqueue");
    assert!(
        b_rec.wait_for(2, Duration::from_secs(5)).await,
        "B took over well before the 60 s lease would have expired"
    );
    b.stop().await;
}

/// Acks even seqs' predecessors... in short: acks until a message says "retry", rejects "bad".
struct Batchy {
    rec: Recorder,
    calls: Arc<AtomicUsize>,
}

fn outcome_for(m: &Message) -> Outcome {
    match &m.payload[..] {
        b"bad" => Outcome::Reject("bad".into()),
        b"flaky" if m.attempts < 2 => Outcome::Retry("first try fails".into()),
        _ => Outcome::Ack,
    }
}

#[async_trait]
impl LeasedBatchHandler for Batchy {
    async fn handle_batch(&self, msgs: &[Message]) -> Vec<HandlerResult> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::new();
        for m in msgs {
            let o = outcome_for(m);
            if o == Outcome::Ack {
                self.rec.push(m);
            }
            let stop = matches!(o, Outcome::Retry(_));
            out.push(Ok(o));
            if stop {
                break;
            }
        }
        out
    }
}

async fn leased_batch_handler_partial_results(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let h = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("lb", Partitions::of(1))
        .batch_size(50)
        .leased_batch(Batchy {
            rec: rec.clone(),
            calls: calls.clone(),
        })
        .start()
        .await
        .expect("start");
    let payloads = ["a", "b", "bad", "c", "flaky", "d", "e"];
    let msgs: Vec<NewMessage> = payloads
        .iter()
        .map(|p| NewMessage::new("lb", 0, *p, "t"))
        .collect();
    h.outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    assert!(
        rec.wait_for(6, Duration::from_secs(10)).await,
        "{:?}: got {}",
        db.backend,
        rec.len()
    );
    let got: Vec<String> = rec
        .all()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).to_string())
        .collect();
    assert_eq!(got, ["a", "b", "c", "flaky", "d", "e"]);
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the retry re-offered the rest of the batch"
    );
    assert_eq!(count(&db.conn, "modkit_outbox_dead_letters").await, 1);
    h.stop().await;
}

/// Writes one row per message; the whole batch rolls back when any message is not acked.
struct BatchWriter;

#[async_trait]
impl TransactionalBatchHandler for BatchWriter {
    async fn handle_batch(
        &self,
        txn: &DatabaseTransaction,
        msgs: &[Message],
    ) -> Vec<HandlerResult> {
        let mut out = Vec::new();
        for m in msgs {
            if let Err(e) = txn
                .execute_raw(Statement::from_string(
                    txn.get_database_backend(),
                    format!("INSERT INTO effects (message_id) VALUES ({})", m.id),
                ))
                .await
            {
                out.push(Err(e.into()));
                break;
            }
            let o = outcome_for(m);
            let stop = matches!(o, Outcome::Retry(_));
            out.push(Ok(o));
            if stop {
                break;
            }
        }
        out
    }
}

async fn transactional_batch_handler_replays_one_by_one(db: TestDb) {
    migrate(&db).await;
    db.conn
        .execute_unprepared("CREATE TABLE effects (message_id BIGINT NOT NULL)")
        .await
        .expect("effects");
    let h = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("tb", Partitions::of(1))
        .transactional_batch(BatchWriter)
        .start()
        .await
        .expect("start");
    let payloads = ["a", "b", "bad", "c", "flaky", "d"];
    let msgs: Vec<NewMessage> = payloads
        .iter()
        .map(|p| NewMessage::new("tb", 0, *p, "t"))
        .collect();
    let ids = h
        .outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    assert!(cursors_reach(&db.conn, Duration::from_secs(15), 6, 1).await);
    h.stop().await;
    // One effect per acked message; none for the rejected one; no doubles from the replays.
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM effects").await,
        5
    );
    assert_eq!(
        scalar(
            &db.conn,
            &format!(
                "SELECT COUNT(*) AS n FROM effects WHERE message_id = {}",
                ids[2]
            )
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM (SELECT message_id FROM effects GROUP BY message_id HAVING COUNT(*) > 1) d").await,
        0
    );
    assert_eq!(count(&db.conn, "modkit_outbox_dead_letters").await, 1);
}

/// `stop()` releases this instance's leases in one statement after its processors end, also
/// those of a processor it had to abort at the shutdown deadline, and never a lease another
/// instance holds.
async fn stop_releases_its_own_leases_even_after_aborting(db: TestDb) {
    migrate(&db).await;
    // Register the queue's rows, then let another owner hold partition 1 for a long time.
    Outbox::builder(db.conn.clone())
        .queue("stuck", Partitions::of(2))
        .producer_only()
        .build()
        .await
        .expect("register");
    let far = match db.backend {
        Backend::Postgres => "TIMESTAMPTZ '2037-01-01 00:00:00+00'",
        Backend::MySql => "TIMESTAMP('2037-01-01 00:00:00')",
        Backend::Sqlite => "'2037-01-01T00:00:00.000000Z'",
    };
    let p = if db.backend == Backend::MySql {
        "`partition`"
    } else {
        "\"partition\""
    };
    db.conn
        .execute_unprepared(&format!(
            "UPDATE modkit_outbox_processor SET locked_by = 'other-instance', locked_until = {far} \
             WHERE partition_id = (SELECT id FROM modkit_outbox_partitions WHERE queue = 'stuck' AND {p} = 1)"
        ))
        .await
        .expect("foreign lease");

    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let h = Outbox::builder(db.connect().await)
        .config(OutboxConfig {
            lease_ttl: Duration::from_secs(60),
            shutdown_timeout: Duration::from_millis(300),
            ..fast_config()
        })
        .queue("stuck", Partitions::of(2))
        .leased(move |_m: Message| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                // A handler that never returns: only the shutdown deadline ends it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start");
    h.outbox()
        .enqueue(&db.conn, "stuck", 0, "hang", "t")
        .await
        .expect("enqueue");
    let s = started.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = s.clone();
            async move { s.load(Ordering::SeqCst) > 0 }
        })
        .await,
        "{:?}: the handler started",
        db.backend
    );
    let t = Instant::now();
    h.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{:?}: stop() kept its deadline",
        db.backend
    );
    let holder = |part: i32| {
        let conn = db.conn.clone();
        async move {
            let rows = conn
                .query_all_raw(Statement::from_string(
                    conn.get_database_backend(),
                    format!(
                        "SELECT pr.locked_by FROM modkit_outbox_processor pr \
                         JOIN modkit_outbox_partitions pa ON pa.id = pr.partition_id \
                         WHERE pa.queue = 'stuck' AND pa.{p} = {part}"
                    ),
                ))
                .await
                .expect("holder");
            rows[0]
                .try_get::<Option<String>>("", "locked_by")
                .expect("locked_by")
        }
    };
    assert_eq!(
        holder(0).await,
        None,
        "{:?}: the aborted processor's lease was released",
        db.backend
    );
    assert_eq!(
        holder(1).await.as_deref(),
        Some("other-instance"),
        "{:?}: another instance's lease was left alone",
        db.backend
    );
}

async fn handler_panic_is_retried_not_fatal(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let r = rec.clone();
    let h = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("p", Partitions::of(1))
        .leased(move |m: Message| {
            let r = r.clone();
            async move {
                if m.attempts == 1 && &m.payload[..] == b"boom" {
                    panic!("handler bug");
                }
                r.push(&m);
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start");
    h.outbox()
        .enqueue(&db.conn, "p", 0, "boom", "t")
        .await
        .expect("enqueue");
    h.outbox()
        .enqueue(&db.conn, "p", 0, "next", "t")
        .await
        .expect("enqueue");
    assert!(
        rec.wait_for(2, Duration::from_secs(10)).await,
        "{:?}: the processor survived the panic",
        db.backend
    );
    assert_eq!(rec.all()[0].attempts, 2);
    h.stop().await;
}

async fn orphaned_bodies_are_collected(db: TestDb) {
    migrate(&db).await;
    let old = match db.backend {
        Backend::Postgres => "TIMESTAMPTZ '2020-01-01 00:00:00+00'",
        Backend::MySql => "TIMESTAMP('2020-01-01 00:00:00')",
        Backend::Sqlite => "'2020-01-01T00:00:00.000000Z'",
    };
    let blob = if db.backend == Backend::Postgres {
        "'\\x00'::bytea"
    } else {
        "X'00'"
    };
    for _ in 0..3 {
        db.conn
            .execute_unprepared(&format!(
                "INSERT INTO modkit_outbox_body (payload, payload_type, created_at) VALUES ({blob}, 'orphan', {old})"
            ))
            .await
            .expect("orphan");
    }
    // Old bodies that an `incoming` or an `outgoing` row still references must stay, however
    // old: here in a queue no engine serves, so nothing else moves them.
    let columns = if db.backend == Backend::MySql {
        "queue, `partition`, `sequence`"
    } else {
        "queue, \"partition\", \"sequence\""
    };
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_partitions ({columns}) VALUES ('idle', 0, 1)"
        ))
        .await
        .expect("idle partition");
    let idle = scalar(
        &db.conn,
        "SELECT id AS n FROM modkit_outbox_partitions WHERE queue = 'idle'",
    )
    .await;
    let mut referenced = Vec::new();
    for _ in 0..2 {
        db.conn
            .execute_unprepared(&format!(
                "INSERT INTO modkit_outbox_body (payload, payload_type, created_at) VALUES ({blob}, 'referenced', {old})"
            ))
            .await
            .expect("referenced body");
        referenced.push(
            scalar(
                &db.conn,
                "SELECT MAX(id) AS n FROM modkit_outbox_body WHERE payload_type = 'referenced'",
            )
            .await,
        );
    }
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES ({idle}, {})",
            referenced[0]
        ))
        .await
        .expect("incoming");
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES ({idle}, {}, 1, {old})",
            referenced[1]
        ))
        .await
        .expect("outgoing");
    let h = Outbox::builder(db.conn.clone())
        .config(OutboxConfig {
            orphan_min_age: Duration::from_secs(60),
            ..fast_config()
        })
        .queue("o", Partitions::of(1))
        .leased(Recorder::default())
        .start()
        .await
        .expect("start");
    // A young body that is still referenced must stay.
    h.outbox()
        .enqueue(&db.conn, "o", 0, "keep", "t")
        .await
        .expect("enqueue");
    let conn = db.conn.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let conn = conn.clone();
            async move {
                scalar(
                    &conn,
                    "SELECT COUNT(*) AS n FROM modkit_outbox_body WHERE payload_type = 'orphan'",
                )
                .await
                    == 0
            }
        })
        .await,
        "{:?}: orphans collected at start",
        db.backend
    );
    assert_eq!(
        scalar(
            &db.conn,
            "SELECT COUNT(*) AS n FROM modkit_outbox_body WHERE payload_type = 'referenced'",
        )
        .await,
        2,
        "{:?}: referenced bodies kept",
        db.backend
    );
    h.stop().await;
}

/// Per-message transactional handler that writes one row per call and retries `b` once.
#[derive(Clone, Default)]
struct RetryBOnce {
    calls: Arc<std::sync::Mutex<Vec<(String, u32)>>>,
}

#[async_trait]
impl TransactionalHandler for RetryBOnce {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Message) -> HandlerResult {
        let name = String::from_utf8_lossy(&msg.payload).to_string();
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.clone(), msg.attempts));
        txn.execute_raw(Statement::from_string(
            txn.get_database_backend(),
            format!("INSERT INTO effects (message_id) VALUES ({})", msg.id),
        ))
        .await?;
        Ok(if name == "b" && msg.attempts == 1 {
            Outcome::Retry("not yet".into())
        } else {
            Outcome::Ack
        })
    }
}

/// The fast try runs without savepoints; a non-ack rolls it back and replays one savepoint per
/// message, without calling the failed message again (its result stands).
async fn transactional_replay_keeps_the_failed_result(db: TestDb) {
    migrate(&db).await;
    db.conn
        .execute_unprepared("CREATE TABLE effects (message_id BIGINT NOT NULL)")
        .await
        .expect("effects");
    let handler = RetryBOnce::default();
    // Enqueued before the engine starts: one pass sequences all three, one step reads them.
    let producer = Outbox::builder(db.conn.clone())
        .queue("tm", Partitions::of(1))
        .producer_only()
        .build()
        .await
        .expect("producer");
    let msgs: Vec<NewMessage> = ["a", "b", "c"]
        .iter()
        .map(|p| NewMessage::new("tm", 0, *p, "t"))
        .collect();
    producer
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    let h = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("tm", Partitions::of(1))
        .transactional(handler.clone())
        .start()
        .await
        .expect("start");
    assert!(
        cursors_reach(&db.conn, Duration::from_secs(15), 3, 1).await,
        "{:?}: all three processed",
        db.backend
    );
    h.stop().await;
    let calls = handler
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let calls: Vec<(&str, u32)> = calls.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    // Fast try: a, b (retry) → rolled back. Replay: a again in a savepoint, b's retry stands.
    // After the backoff: b (attempt 2), c.
    assert_eq!(
        calls,
        [("a", 1), ("b", 1), ("a", 1), ("b", 2), ("c", 1)],
        "{:?}",
        db.backend
    );
    // Exactly one committed effect per message, whatever ran twice.
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM effects").await,
        3
    );
    assert_eq!(
        scalar(
            &db.conn,
            "SELECT COUNT(DISTINCT message_id) AS n FROM effects"
        )
        .await,
        3
    );
}

backend_tests!(
    stop_hands_leases_over_at_once,
    leased_batch_handler_partial_results,
    transactional_batch_handler_replays_one_by_one,
    transactional_replay_keeps_the_failed_result,
    handler_panic_is_retried_not_fatal,
    orphaned_bodies_are_collected,
    stop_releases_its_own_leases_even_after_aborting,
);
