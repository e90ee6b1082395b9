//! Delivery: per-partition order under concurrent producers, transactional exactly-once,
//! retries with honoured backoff, dead letters, vacuum, and prompt wake-ups.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Recorder, assert_gapless, count, eventually, fast_config, migrate, scalar};
use modkit_outbox::{
    HandlerResult, Message, NewMessage, Outbox, OutboxConfig, Outcome, Partitions, RetryPolicy,
    TransactionalHandler,
};
use modkit_outbox_tests::{Backend, TestDb, backend_tests};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement, TransactionTrait};

const PRODUCERS: u32 = 8;
const PARTITIONS: u32 = 16;
const PER_PRODUCER: u32 = 2000;

async fn ordering_under_concurrent_producers(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let handle = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("events", Partitions::of(PARTITIONS))
        .leased(rec.clone())
        .start()
        .await
        .expect("start");
    let outbox = handle.outbox();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let outbox = outbox.clone();
        let conn = db.connect_with_pool(2).await;
        producers.push(tokio::spawn(async move {
            // Mixed transaction sizes: single messages and batches of 50.
            let mut i = 0;
            while i < PER_PRODUCER {
                let txn = conn.begin().await.expect("begin");
                let n = if i % 200 < 100 { 1 } else { 50 };
                let batch: Vec<NewMessage> = (i..(i + n).min(PER_PRODUCER))
                    .map(|k| {
                        NewMessage::new(
                            "events",
                            k % PARTITIONS,
                            format!("{p}:{k}").into_bytes(),
                            "e",
                        )
                    })
                    .collect();
                i += batch.len() as u32;
                outbox.enqueue_batch(&txn, &batch).await.expect("enqueue");
                txn.commit().await.expect("commit");
            }
        }));
    }
    for p in producers {
        p.await.expect("producer");
    }
    let total = (PRODUCERS * PER_PRODUCER) as usize;
    assert!(
        rec.wait_for(total, Duration::from_secs(120)).await,
        "{:?}: delivered {} of {total}",
        db.backend,
        rec.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.len(), total, "no duplicates");
    assert_gapless(&rec);
    // One producer's messages to one partition arrive in enqueue order.
    let mut last: HashMap<(u32, u32), u32> = HashMap::new();
    for m in rec.all() {
        let s = String::from_utf8(m.payload.to_vec()).expect("utf8");
        let (p, k) = s.split_once(':').expect("p:k");
        let (p, k): (u32, u32) = (p.parse().expect("p"), k.parse().expect("k"));
        if let Some(prev) = last.insert((p, m.partition), k) {
            assert!(
                prev < k,
                "producer {p} partition {}: {k} after {prev}",
                m.partition
            );
        }
    }
    handle.stop().await;
}

/// Inserts one row per message into `effects` and randomly fails.
struct Flaky {
    seen: Arc<AtomicUsize>,
}

#[async_trait]
impl TransactionalHandler for Flaky {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Message) -> HandlerResult {
        self.seen.fetch_add(1, Ordering::Relaxed);
        txn.execute_raw(Statement::from_string(
            txn.get_database_backend(),
            format!(
                "INSERT INTO effects (message_id, attempt) VALUES ({}, {})",
                msg.id, msg.attempts
            ),
        ))
        .await?;
        let roll: u32 = rand::random_range(0..100);
        let kind = String::from_utf8_lossy(&msg.payload).to_string();
        if kind == "reject" {
            return Ok(Outcome::Reject("poison".into()));
        }
        match roll {
            0..10 => Ok(Outcome::Retry("flaky".into())),
            10..15 => Err("boom".into()),
            _ => Ok(Outcome::Ack),
        }
    }
}

async fn transactional_exactly_once(db: TestDb) {
    migrate(&db).await;
    db.conn
        .execute_unprepared(
            "CREATE TABLE effects (message_id BIGINT NOT NULL, attempt BIGINT NOT NULL)",
        )
        .await
        .expect("effects table");
    let seen = Arc::new(AtomicUsize::new(0));
    let mut config = fast_config();
    config.retry = RetryPolicy {
        max_attempts: 20,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
    };
    let handle = Outbox::builder(db.conn.clone())
        .config(config)
        .queue("tx", Partitions::of(4))
        .transactional(Flaky { seen: seen.clone() })
        .start()
        .await
        .expect("start");
    let outbox = handle.outbox();
    let msgs: Vec<NewMessage> = (0..400u32)
        .map(|i| {
            let body = if i % 40 == 7 { "reject" } else { "ok" };
            NewMessage::new("tx", i % 4, body, "t")
        })
        .collect();
    let txn = db.conn.begin().await.expect("begin");
    let ids = outbox.enqueue_batch(&txn, &msgs).await.expect("enqueue");
    txn.commit().await.expect("commit");
    let rejected: Vec<i64> = ids
        .iter()
        .zip(&msgs)
        .filter(|(_, m)| &m.payload[..] == b"reject")
        .map(|(id, _)| *id)
        .collect();
    let conn = db.conn.clone();
    let done = eventually(Duration::from_secs(90), || {
        let conn = conn.clone();
        async move {
            scalar(
                &conn,
                "SELECT COUNT(*) AS n FROM modkit_outbox_processor WHERE processed_seq = 100",
            )
            .await
                == 4
                && scalar(&conn, "SELECT COUNT(*) AS n FROM modkit_outbox_processor").await == 4
        }
    })
    .await;
    assert!(done, "{:?}: all 400 processed", db.backend);
    handle.stop().await;
    assert!(
        seen.load(Ordering::Relaxed) > 400,
        "some attempts failed and were retried"
    );
    // Exactly one effect per delivered message, none for rejected ones.
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM effects").await,
        (400 - rejected.len()) as i64
    );
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM (SELECT message_id FROM effects GROUP BY message_id HAVING COUNT(*) > 1) d").await,
        0,
        "no message has two effects"
    );
    for id in &rejected {
        assert_eq!(
            scalar(
                &db.conn,
                &format!("SELECT COUNT(*) AS n FROM effects WHERE message_id = {id}")
            )
            .await,
            0
        );
    }
    assert_eq!(
        count(&db.conn, "modkit_outbox_dead_letters").await,
        rejected.len() as i64
    );
}

async fn retries_back_off_then_dead_letter(db: TestDb) {
    migrate(&db).await;
    let attempts: Arc<std::sync::Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let a = attempts.clone();
    let mut config = fast_config();
    config.retry = RetryPolicy {
        max_attempts: 4,
        backoff_base: Duration::from_millis(300),
        backoff_max: Duration::from_secs(5),
    };
    let rec = Recorder::default();
    let r = rec.clone();
    let handle = Outbox::builder(db.conn.clone())
        .config(config)
        .queue("retry", Partitions::of(1))
        .leased(move |m: Message| {
            let a = a.clone();
            let r = r.clone();
            async move {
                if &m.payload[..] == b"bad" {
                    a.lock().expect("lock").push((m.attempts, Instant::now()));
                    return Err("always fails".into());
                }
                r.push(&m);
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start");
    let outbox = handle.outbox();
    outbox
        .enqueue_message(
            &db.conn,
            NewMessage::new("retry", 0, "bad", "t").header("traceparent", "00-abc-01"),
        )
        .await
        .expect("enqueue");
    // New arrivals behind the failing head must not cut the backoff short.
    let spam = {
        let outbox = outbox.clone();
        let conn = db.conn.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                outbox
                    .enqueue(&conn, "retry", 0, "good", "t")
                    .await
                    .expect("good");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    assert!(
        rec.wait_for(20, Duration::from_secs(30)).await,
        "good messages delivered after the dead letter"
    );
    spam.await.expect("spam");
    let seen = attempts.lock().expect("lock").clone();
    assert_eq!(
        seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for (i, w) in seen.windows(2).enumerate() {
        let gap = w[1].1 - w[0].1;
        let min = Duration::from_millis(300 * (1 << i)).mul_f64(0.75);
        assert!(
            gap >= min,
            "attempt {} came after {gap:?}, backoff at least {min:?}",
            i + 2
        );
    }
    let seqs: Vec<i64> = rec.all().iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (2..=21).collect::<Vec<_>>(),
        "the dead-lettered head kept seq 1"
    );
    // The dead letter keeps everything.
    let q = if db.backend == Backend::MySql {
        '`'
    } else {
        '"'
    };
    let row = db
        .conn
        .query_one_raw(Statement::from_string(
            db.conn.get_database_backend(),
            format!(
                "SELECT queue, {q}partition{q} AS part, seq, payload, payload_type, headers, last_error, attempts, status \
                 FROM modkit_outbox_dead_letters"
            ),
        ))
        .await
        .expect("dead letter")
        .expect("one dead letter");
    assert_eq!(row.try_get::<String>("", "queue").expect("queue"), "retry");
    assert_eq!(row.try_get::<i32>("", "part").expect("part"), 0);
    assert_eq!(row.try_get::<i64>("", "seq").expect("seq"), 1);
    assert_eq!(
        row.try_get::<Vec<u8>>("", "payload").expect("payload"),
        b"bad"
    );
    assert_eq!(row.try_get::<String>("", "payload_type").expect("t"), "t");
    assert!(
        row.try_get::<String>("", "headers")
            .expect("h")
            .contains("traceparent")
    );
    assert_eq!(
        row.try_get::<String>("", "last_error").expect("e"),
        "always fails"
    );
    assert_eq!(row.try_get::<i64>("", "attempts").expect("a"), 4);
    assert_eq!(row.try_get::<String>("", "status").expect("s"), "pending");
    handle.stop().await;
}

async fn vacuum_empties_tables_after_drain(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let handle = Outbox::builder(db.conn.clone())
        .config(OutboxConfig {
            vacuum_chunk: 100,
            ..fast_config()
        })
        .queue("v", Partitions::of(4))
        .leased(rec.clone())
        .start()
        .await
        .expect("start");
    let outbox = handle.outbox();
    let msgs: Vec<NewMessage> = (0..1000u32)
        .map(|i| NewMessage::new("v", i % 4, "x", "t"))
        .collect();
    outbox
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    assert!(rec.wait_for(1000, Duration::from_secs(60)).await);
    let conn = db.conn.clone();
    let empty = eventually(Duration::from_secs(10), || {
        let conn = conn.clone();
        async move {
            count(&conn, "modkit_outbox_outgoing").await == 0
                && count(&conn, "modkit_outbox_body").await == 0
                && count(&conn, "modkit_outbox_incoming").await == 0
        }
    })
    .await;
    assert!(empty, "{:?}: outgoing/body not vacuumed", db.backend);
    assert_eq!(
        scalar(
            &db.conn,
            "SELECT COUNT(*) AS n FROM modkit_outbox_vacuum_counter WHERE counter = 250"
        )
        .await,
        4
    );
    handle.stop().await;
}

async fn wake_up_is_prompt_without_polling(db: TestDb) {
    migrate(&db).await;
    let config = OutboxConfig {
        poll_interval: Duration::from_secs(30),
        ..fast_config()
    };
    let rec = Recorder::default();
    let handle = Outbox::builder(db.conn.clone())
        .config(config.clone())
        .queue("w", Partitions::of(2))
        .leased(rec.clone())
        .start()
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Same instance, inside a transaction committed a little later.
    let outbox = handle.outbox();
    let txn = db.conn.begin().await.expect("begin");
    outbox
        .enqueue(&txn, "w", 0, "a", "t")
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_millis(100)).await;
    txn.commit().await.expect("commit");
    assert!(
        rec.wait_for(1, Duration::from_secs(2)).await,
        "{:?}: same-instance wake-up",
        db.backend
    );

    if db.backend == Backend::Postgres {
        // Another instance (own pool, producer only) enqueues: NOTIFY wakes this one.
        let other = Outbox::builder(db.connect().await)
            .config(config)
            .queue("w", Partitions::of(2))
            .producer_only()
            .build()
            .await
            .expect("producer");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let conn = db.connect().await;
        let txn = conn.begin().await.expect("begin");
        other
            .enqueue(&txn, "w", 1, "b", "t")
            .await
            .expect("enqueue");
        txn.commit().await.expect("commit");
        assert!(
            rec.wait_for(2, Duration::from_secs(2)).await,
            "cross-instance wake-up via NOTIFY"
        );
    }
    handle.stop().await;
}

/// PostgreSQL: instance A runs a sequencer but no handler, instance B handles the queue; the
/// fallback poll is 30 s. A's producers wake A's sequencer in-process (no `NOTIFY` on their
/// commits), and A's sequencer notifies B, whose lease it does not hold. Both wake-ups must be
/// prompt.
async fn sequencer_notifies_the_lease_holder_elsewhere(db: TestDb) {
    if db.backend != Backend::Postgres {
        return;
    }
    migrate(&db).await;
    let config = OutboxConfig {
        poll_interval: Duration::from_secs(30),
        ..fast_config()
    };
    let pool = db.conn.get_postgres_connection_pool().clone();
    let mut listener = PgListener::connect_with(&pool).await.expect("listener");
    listener.listen("modkit_outbox").await.expect("listen");
    let a = Outbox::builder(db.connect().await)
        .config(config.clone())
        .queue("x", Partitions::of(1))
        .producer_only()
        .start()
        .await
        .expect("start A");
    let rec = Recorder::default();
    let b = Outbox::builder(db.connect().await)
        .config(config)
        .queue("x", Partitions::of(1))
        .leased(rec.clone())
        .start()
        .await
        .expect("start B");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 1..=2usize {
        let txn = db.conn.begin().await.expect("begin");
        a.outbox()
            .enqueue(&txn, "x", 0, format!("m{n}"), "t")
            .await
            .expect("enqueue");
        txn.commit().await.expect("commit");
        assert!(
            rec.wait_for(n, Duration::from_secs(3)).await,
            "message {n} reached the other instance promptly"
        );
    }
    let mut payloads = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await {
        payloads.push(n.payload().to_owned());
    }
    assert!(
        !payloads.iter().any(|p| p == "i"),
        "a producer with a local sequencer sent NOTIFY: {payloads:?}"
    );
    assert_eq!(
        payloads.iter().filter(|p| p.starts_with("s:")).count(),
        2,
        "one NOTIFY per pass for the partition leased elsewhere: {payloads:?}"
    );
    b.stop().await;
    a.stop().await;
}

backend_tests!(
    sequencer_notifies_the_lease_holder_elsewhere,
    ordering_under_concurrent_producers,
    transactional_exactly_once,
    retries_back_off_then_dead_letter,
    vacuum_empties_tables_after_drain,
    wake_up_is_prompt_without_polling,
);
