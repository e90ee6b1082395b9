//! Several instances: crash and takeover after lease expiry, lease renewal for slow handlers,
//! and never two processors on one partition at once.

#![allow(clippy::print_stderr)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Recorder, cursors_reach, eventually, fast_config, migrate, scalar};
use modkit_outbox::{
    HandlerResult, Message, NewMessage, Outbox, OutboxConfig, Outcome, Partitions,
};
use modkit_outbox_tests::{TestDb, backend_tests};
use sea_orm::{ConnectionTrait, Statement, TransactionTrait};

async fn crashed_instance_is_taken_over(db: TestDb) {
    migrate(&db).await;
    let config = OutboxConfig {
        batch_size: 10,
        ..fast_config()
    };
    // Instance A handles 25 messages of partition 0, then hangs mid-batch and is killed.
    let a_rec = Recorder::default();
    let a_count = Arc::new(AtomicUsize::new(0));
    let (r, c) = (a_rec.clone(), a_count.clone());
    let a = Outbox::builder(db.connect().await)
        .config(config.clone())
        .queue("crash", Partitions::of(2))
        .leased(move |m: Message| {
            let (r, c) = (r.clone(), c.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) >= 25 {
                    std::future::pending::<()>().await;
                }
                r.push(&m);
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start A");
    let msgs: Vec<NewMessage> = (0..200u32)
        .map(|i| NewMessage::new("crash", i % 2, i.to_string(), "t"))
        .collect();
    a.outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(20), || async {
            a_count.load(Ordering::SeqCst) > 25
        })
        .await,
        "A got stuck mid-batch"
    );
    a.abort(); // crash: no stop, no lease release

    let b_rec = Recorder::default();
    let b = Outbox::builder(db.connect().await)
        .config(config)
        .queue("crash", Partitions::of(2))
        .leased(b_rec.clone())
        .start()
        .await
        .expect("start B");
    assert!(
        cursors_reach(&db.conn, Duration::from_secs(30), 100, 2).await,
        "{:?}: B finished both partitions",
        db.backend
    );
    b.stop().await;
    // Nothing lost: every message was handled by A or B; B continued where A's acks ended.
    let mut seen: HashSet<(u32, i64)> = HashSet::new();
    for m in a_rec.all().iter().chain(b_rec.all().iter()) {
        seen.insert((m.partition, m.seq));
    }
    assert_eq!(seen.len(), 200, "every message delivered at least once");
    // Re-deliveries are limited to A's unacknowledged batch (at-least-once).
    let dup = a_rec.len() + b_rec.len() - 200;
    assert!(dup <= 10, "{dup} duplicates, more than one batch");
}

async fn slow_handler_keeps_its_lease(db: TestDb) {
    migrate(&db).await;
    let config = OutboxConfig {
        lease_ttl: Duration::from_millis(1500),
        ..fast_config()
    };
    let deliveries = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..2 {
        let d = deliveries.clone();
        handles.push(
            Outbox::builder(db.connect().await)
                .config(config.clone())
                .queue("slow", Partitions::of(1))
                .leased(move |_m: Message| {
                    let d = d.clone();
                    async move {
                        d.fetch_add(1, Ordering::SeqCst);
                        // Three lease TTLs long: only renewal keeps the lease.
                        tokio::time::sleep(Duration::from_millis(4500)).await;
                        HandlerResult::Ok(Outcome::Ack)
                    }
                })
                .start()
                .await
                .expect("start"),
        );
    }
    handles[0]
        .outbox()
        .enqueue(&db.conn, "slow", 0, "x", "t")
        .await
        .expect("enqueue");
    assert!(cursors_reach(&db.conn, Duration::from_secs(20), 1, 1).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        1,
        "{:?}: delivered once",
        db.backend
    );
    for h in handles {
        h.stop().await;
    }
}

/// Records when it is dropped: a handler future holding it was cancelled.
struct DroppedAt(Arc<std::sync::Mutex<Option<DateTime<Utc>>>>);

impl Drop for DroppedAt {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Utc::now());
    }
}

/// A handler whose lease cannot be renewed (another transaction holds the `processor` row, so
/// every renewal waits and times out) is cancelled by the time the expiry written in the
/// database passes: after that another instance may take the partition. The lease is reused
/// with less than a full TTL left (the partition sat idle after its first message), the case
/// where counting renewal rounds instead of the expiry let the handler run on. Nothing is lost:
/// once the row is free again the message is delivered again and acknowledged.
async fn handler_is_cancelled_when_its_lease_runs_out(db: TestDb) {
    migrate(&db).await;
    let config = OutboxConfig {
        lease_ttl: Duration::from_secs(3),
        ..fast_config()
    };
    let started = Arc::new(tokio::sync::Notify::new());
    let dropped: Arc<std::sync::Mutex<Option<DateTime<Utc>>>> = Arc::default();
    let hang = Arc::new(AtomicBool::new(true));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let (s, d, h, n) = (
        started.clone(),
        dropped.clone(),
        hang.clone(),
        deliveries.clone(),
    );
    let handle = Outbox::builder(db.connect().await)
        .config(config)
        .queue("expiry", Partitions::of(1))
        .leased(move |m: Message| {
            let (s, d, h, n) = (s.clone(), d.clone(), h.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if &m.payload[..] == b"hang" && h.swap(false, Ordering::SeqCst) {
                    let _guard = DroppedAt(d);
                    s.notify_one();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start");
    let outbox = handle.outbox();
    outbox
        .enqueue(&db.conn, "expiry", 0, "first", "t")
        .await
        .expect("enqueue");
    assert!(cursors_reach(&db.conn, Duration::from_secs(20), 1, 1).await);
    // Idle for under a third of the TTL: the next batch reuses the lease with ~2/3 of it left.
    tokio::time::sleep(Duration::from_millis(800)).await;
    outbox
        .enqueue(&db.conn, "expiry", 0, "hang", "t")
        .await
        .expect("enqueue");
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the second message reached the handler");

    let blocker = db.connect_with_pool(1).await;
    let txn = blocker.begin().await.expect("begin");
    let expiry: DateTime<Utc> = txn
        .query_one_raw(Statement::from_string(
            db.conn.get_database_backend(),
            "SELECT locked_until FROM modkit_outbox_processor",
        ))
        .await
        .expect("read the lease")
        .expect("a processor row")
        .try_get("", "locked_until")
        .expect("locked_until");
    // Holds the row (PostgreSQL, MySQL) or the database's write lock (SQLite) from now on.
    txn.execute_unprepared("UPDATE modkit_outbox_processor SET attempts = attempts")
        .await
        .expect("lock the processor row");
    let cancelled = eventually(Duration::from_secs(15), || {
        let d = dropped.clone();
        async move { d.lock().unwrap_or_else(|e| e.into_inner()).is_some() }
    })
    .await;
    let at = *dropped.lock().unwrap_or_else(|e| e.into_inner());
    txn.rollback().await.expect("release");
    assert!(
        cancelled,
        "{:?}: the handler was never cancelled",
        db.backend
    );
    let at = at.expect("cancelled");
    // Scheduling slack only: the deadline is the expiry itself.
    let late = at - expiry;
    assert!(
        late < chrono::TimeDelta::milliseconds(400),
        "{:?}: cancelled {late} after the lease expired at {expiry}",
        db.backend
    );
    assert!(
        cursors_reach(&db.conn, Duration::from_secs(30), 2, 1).await,
        "{:?}: the cancelled message was delivered again and acknowledged",
        db.backend
    );
    assert!(deliveries.load(Ordering::SeqCst) >= 3);
    handle.stop().await;
}

async fn three_instances_never_share_a_partition(db: TestDb) {
    migrate(&db).await;
    const PARTS: u32 = 8;
    let busy: Arc<Vec<AtomicBool>> = Arc::new((0..PARTS).map(|_| AtomicBool::new(false)).collect());
    let overlaps = Arc::new(AtomicUsize::new(0));
    let rec = Recorder::default();
    let mut handles = Vec::new();
    let mut per_instance = Vec::new();
    for _ in 0..3 {
        let (busy, overlaps, rec) = (busy.clone(), overlaps.clone(), rec.clone());
        let mine = Arc::new(AtomicUsize::new(0));
        per_instance.push(mine.clone());
        handles.push(
            Outbox::builder(db.connect().await)
                .config(OutboxConfig {
                    batch_size: 20,
                    ..fast_config()
                })
                .queue("shared", Partitions::of(PARTS))
                .leased(move |m: Message| {
                    let (busy, overlaps, rec, mine) =
                        (busy.clone(), overlaps.clone(), rec.clone(), mine.clone());
                    async move {
                        let flag = &busy[m.partition as usize];
                        if flag.swap(true, Ordering::SeqCst) {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        if m.seq % 50 == 0 {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        tokio::task::yield_now().await;
                        rec.push(&m);
                        mine.fetch_add(1, Ordering::SeqCst);
                        flag.store(false, Ordering::SeqCst);
                        HandlerResult::Ok(Outcome::Ack)
                    }
                })
                .start()
                .await
                .expect("start"),
        );
    }
    // Producers on every instance, in waves, so leases change hands.
    let total = 3 * 10 * 80u32;
    for wave in 0..10u32 {
        for (i, h) in handles.iter().enumerate() {
            let msgs: Vec<NewMessage> = (0..80u32)
                .map(|k| {
                    NewMessage::new("shared", (k + wave) % PARTS, format!("{i}-{wave}-{k}"), "t")
                })
                .collect();
            h.outbox()
                .enqueue_batch(&db.conn, &msgs)
                .await
                .expect("enqueue");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rec.wait_for(total as usize, Duration::from_secs(90)).await,
        "{:?}: delivered {} of {total}",
        db.backend,
        rec.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for h in handles {
        h.stop().await;
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two instances handled one partition at once"
    );
    let mut by_id: HashMap<i64, usize> = HashMap::new();
    for m in rec.all() {
        *by_id.entry(m.id).or_default() += 1;
    }
    assert_eq!(by_id.len(), total as usize, "every message delivered");
    assert!(
        by_id.values().all(|n| *n == 1),
        "no message delivered twice"
    );
    common::assert_gapless(&rec);
    let spread: Vec<usize> = per_instance
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .collect();
    eprintln!("{:?}: deliveries per instance {spread:?}", db.backend);
}

/// Eight partitions finish their batches at the same moment, so their acks tend to share one
/// statement; the even partitions' leases were taken meanwhile. Their acks must be refused (and
/// their messages delivered again once the thief lets go) while the odd ones go through.
async fn ack_under_a_stolen_lease_is_refused(db: TestDb) {
    const PARTS: u32 = 8;
    migrate(&db).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let rec = Recorder::default();
    let (g, r, c) = (gate.clone(), rec.clone(), running.clone());
    let handle = Outbox::builder(db.connect().await)
        .config(OutboxConfig {
            // Long enough that no renewal falls inside the test's window.
            lease_ttl: Duration::from_secs(60),
            ..fast_config()
        })
        .queue("steal", Partitions::of(PARTS))
        .leased(move |m: Message| {
            let (g, r, c) = (g.clone(), r.clone(), c.clone());
            async move {
                if r.all().iter().all(|x| x.id != m.id) {
                    // First delivery: wait for the test to open the gate.
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = g.acquire().await.map(|p| p.forget());
                }
                r.push(&m);
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await
        .expect("start");
    let msgs: Vec<NewMessage> = (0..PARTS)
        .map(|p| NewMessage::new("steal", p, p.to_string(), "t"))
        .collect();
    handle
        .outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(10), || async {
            running.load(Ordering::SeqCst) >= PARTS as usize
        })
        .await,
        "every handler started"
    );
    let part = if db.backend == modkit_outbox_tests::Backend::MySql {
        "`partition`"
    } else {
        "\"partition\""
    };
    let stolen = format!(
        "(SELECT id FROM modkit_outbox_partitions WHERE queue = 'steal' AND {part} % 2 = 0)"
    );
    let far = match db.backend {
        // Within MySQL's TIMESTAMP range.
        modkit_outbox_tests::Backend::Sqlite => "'2037-01-01T00:00:00.000000Z'",
        _ => "'2037-01-01 00:00:00'",
    };
    db.conn
        .execute_unprepared(&format!(
            "UPDATE modkit_outbox_processor SET locked_by = 'thief', locked_until = {far} \
             WHERE partition_id IN {stolen}"
        ))
        .await
        .expect("steal");
    gate.add_permits(PARTS as usize);
    let acked = |even: bool| {
        format!(
            "SELECT COUNT(*) AS n FROM modkit_outbox_processor \
             WHERE processed_seq = 1 AND partition_id {} {stolen}",
            if even { "IN" } else { "NOT IN" }
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(&db.conn, &acked(false)).await == i64::from(PARTS / 2)
        })
        .await,
        "{:?}: the odd partitions acked",
        db.backend
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scalar(&db.conn, &acked(true)).await,
        0,
        "{:?}: an ack under a lost lease moved a cursor",
        db.backend
    );
    assert_eq!(
        scalar(
            &db.conn,
            &format!(
                "SELECT COUNT(*) AS n FROM modkit_outbox_processor \
                 WHERE locked_by = 'thief' AND partition_id IN {stolen}"
            )
        )
        .await,
        i64::from(PARTS / 2),
        "the thief keeps its leases"
    );
    // The thief lets go: the unacknowledged messages are delivered again (at least once).
    db.conn
        .execute_unprepared(&format!(
            "UPDATE modkit_outbox_processor SET locked_by = NULL, locked_until = NULL \
             WHERE partition_id IN {stolen}"
        ))
        .await
        .expect("release");
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(&db.conn, &acked(true)).await == i64::from(PARTS / 2)
        })
        .await,
        "{:?}: the even partitions delivered again and acked",
        db.backend
    );
    handle.stop().await;
    let mut per_partition: HashMap<u32, usize> = HashMap::new();
    for m in rec.all() {
        *per_partition.entry(m.partition).or_default() += 1;
    }
    for p in 0..PARTS {
        let want = if p % 2 == 0 { 2 } else { 1 };
        assert_eq!(
            per_partition.get(&p),
            Some(&want),
            "deliveries of partition {p}"
        );
    }
}

backend_tests!(
    ack_under_a_stolen_lease_is_refused,
    crashed_instance_is_taken_over,
    handler_is_cancelled_when_its_lease_runs_out,
    slow_handler_keeps_its_lease,
    three_instances_never_share_a_partition,
);
