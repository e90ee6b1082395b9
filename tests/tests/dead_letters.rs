//! The dead-letter API on every backend: filters, keyset pagination, every transition and
//! wrong-state attempt, both replay styles with racing callers, purge in chunks, and replay end
//! to end (reject → fix → re-enqueue → delivered after the tail, in original order).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Recorder, eventually, fast_config, migrate, scalar};
use modkit_outbox::{
    DeadLetterFilter, DeadLetterStatus, DeadLetters, HandlerResult, Message, NewMessage, Outbox,
    OutboxError, Outcome, Partitions,
};
use modkit_outbox_tests::{TestDb, backend_tests};

/// Starts an engine whose handler rejects payloads starting with "bad" until `fixed` is set.
async fn rejecting_engine(
    db: &TestDb,
    fixed: Arc<AtomicBool>,
    rec: &Recorder,
) -> modkit_outbox::OutboxHandle {
    let rec = rec.clone();
    Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("dl", Partitions::of(2))
        .leased(move |m: Message| {
            let (rec, fixed) = (rec.clone(), fixed.clone());
            async move {
                if m.payload.starts_with(b"bad") && !fixed.load(Ordering::SeqCst) {
                    return Ok(Outcome::Reject(format!("cannot handle {}", m.payload_type)));
                }
                rec.push(&m);
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .queue("other", Partitions::of(1))
        .leased(|_m: Message| async { HandlerResult::Ok(Outcome::Reject("nope".into())) })
        .start()
        .await
        .expect("start")
}

async fn wait_dead(db: &TestDb, n: i64) {
    let conn = db.conn.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            let conn = conn.clone();
            async move {
                scalar(
                    &conn,
                    "SELECT COUNT(*) AS n FROM modkit_outbox_dead_letters",
                )
                .await
                    == n
            }
        })
        .await,
        "{:?}: {n} dead letters expected",
        db.backend
    );
}

async fn filters_pagination_and_transitions(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let h = rejecting_engine(&db, Arc::new(AtomicBool::new(false)), &rec).await;
    let o = h.outbox();
    let mut msgs = Vec::new();
    for i in 0..12u32 {
        msgs.push(NewMessage::new(
            "dl",
            i % 2,
            format!("bad-{i}"),
            if i < 8 { "type.a" } else { "type.b" },
        ));
    }
    msgs.push(NewMessage::new("other", 0, "x", "type.c"));
    o.enqueue_batch(&db.conn, &msgs).await.expect("enqueue");
    wait_dead(&db, 13).await;
    h.stop().await;

    let dl = DeadLetters::new(db.conn.clone()).expect("api");
    let all = DeadLetterFilter::default();
    assert_eq!(dl.count(&all).await.expect("count"), 13);
    let f = |q: Option<&str>, p: Option<u32>, t: Option<&str>| DeadLetterFilter {
        queue: q.map(str::to_owned),
        partition: p,
        payload_type: t.map(str::to_owned),
        ..Default::default()
    };
    assert_eq!(dl.count(&f(Some("dl"), None, None)).await.expect("q"), 12);
    assert_eq!(
        dl.count(&f(Some("dl"), Some(1), None)).await.expect("qp"),
        6
    );
    assert_eq!(
        dl.count(&f(None, None, Some("type.b"))).await.expect("t"),
        4
    );
    assert_eq!(
        dl.count(&f(Some("other"), None, Some("type.c")))
            .await
            .expect("qt"),
        1
    );
    let pending = DeadLetterFilter {
        status: Some(DeadLetterStatus::Pending),
        ..Default::default()
    };
    assert_eq!(dl.count(&pending).await.expect("status"), 13);
    let future = DeadLetterFilter {
        failed_after: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert_eq!(dl.count(&future).await.expect("range"), 0);
    let past = DeadLetterFilter {
        failed_before: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        failed_after: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert_eq!(dl.count(&past).await.expect("range"), 13);
    let bad_range = DeadLetterFilter {
        failed_after: Some(chrono::Utc::now()),
        failed_before: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert!(matches!(
        dl.count(&bad_range).await,
        Err(OutboxError::InvalidInput(_))
    ));
    assert!(matches!(
        dl.list(&all, 0, None).await,
        Err(OutboxError::InvalidInput(_))
    ));

    // Keyset pagination, newest first, no overlap, nothing missed.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = dl.list(&all, 5, cursor).await.expect("page");
        assert!(page.items.len() <= 5);
        seen.extend(page.items.iter().map(|d| d.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 13);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");
    let one = dl.get(seen[0]).await.expect("get").expect("exists");
    assert_eq!(one.status, DeadLetterStatus::Pending);
    assert!(
        one.last_error.as_deref().is_some_and(|e| !e.is_empty()),
        "reason kept"
    );
    assert!(one.attempts >= 1);
    assert!(dl.get(999_999).await.expect("get").is_none());

    // Transitions: claim → resolve; claim → fail → pending; discard; wrong states.
    let a_filter = DeadLetterFilter {
        payload_type: Some("type.a".into()),
        ..Default::default()
    };
    let claimed = dl
        .claim(&a_filter, 3, Duration::from_secs(60), "worker-1")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3);
    assert!(
        claimed
            .iter()
            .all(|d| d.status == DeadLetterStatus::Reprocessing)
    );
    let (c0, c1, c2) = (claimed[0].id, claimed[1].id, claimed[2].id);
    dl.resolve(c0, "worker-1").await.expect("resolve");
    assert!(matches!(
        dl.resolve(c0, "worker-1").await,
        Err(OutboxError::WrongState {
            status: DeadLetterStatus::Resolved,
            ..
        })
    ));
    assert!(matches!(
        dl.resolve(c1, "someone-else").await,
        Err(OutboxError::WrongState { .. })
    ));
    dl.fail(c1, "worker-1", "still broken").await.expect("fail");
    let back = dl.get(c1).await.expect("get").expect("row");
    assert_eq!(back.status, DeadLetterStatus::Pending);
    assert_eq!(back.last_error.as_deref(), Some("still broken"));
    assert_eq!(back.attempts, claimed[1].attempts + 1);
    assert!(matches!(
        dl.fail(c1, "worker-1", "x").await,
        Err(OutboxError::WrongState {
            status: DeadLetterStatus::Pending,
            ..
        })
    ));
    assert!(matches!(
        dl.resolve(424_242, "w").await,
        Err(OutboxError::NotFound(424_242))
    ));
    // A claimed one cannot be discarded or replayed; a pending one can be discarded once.
    let only_c2 = DeadLetterFilter {
        ids: Some(vec![c2]),
        ..Default::default()
    };
    assert_eq!(dl.discard(&only_c2, 10).await.expect("discard claimed"), 0);
    assert_eq!(
        dl.replay(&only_c2, 10)
            .await
            .expect("replay claimed")
            .replayed,
        0
    );
    let only_c1 = DeadLetterFilter {
        ids: Some(vec![c1]),
        ..Default::default()
    };
    assert_eq!(dl.discard(&only_c1, 10).await.expect("discard"), 1);
    assert_eq!(dl.discard(&only_c1, 10).await.expect("discard again"), 0);
    assert_eq!(
        dl.get(c1).await.expect("get").expect("row").status,
        DeadLetterStatus::Discarded
    );
    // An expired claim can be taken over by another claimer.
    let stale = dl
        .claim(
            &DeadLetterFilter {
                ids: Some(vec![c2]),
                ..Default::default()
            },
            1,
            Duration::ZERO,
            "w2",
        )
        .await
        .expect("claim");
    assert!(stale.is_empty(), "c2 is still claimed by worker-1 for 60 s");
    let short = dl
        .claim(
            &DeadLetterFilter {
                payload_type: Some("type.b".into()),
                ..Default::default()
            },
            1,
            Duration::from_millis(1),
            "w3",
        )
        .await
        .expect("claim");
    assert_eq!(short.len(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = dl
        .claim(
            &DeadLetterFilter {
                ids: Some(vec![short[0].id]),
                ..Default::default()
            },
            1,
            Duration::from_secs(60),
            "w4",
        )
        .await
        .expect("reclaim");
    assert_eq!(again.len(), 1);
    assert!(
        matches!(
            dl.resolve(short[0].id, "w3").await,
            Err(OutboxError::WrongState { .. })
        ),
        "the first claimer lost it"
    );
    dl.resolve(short[0].id, "w4")
        .await
        .expect("new claimer resolves");

    let by_status = dl.count_by_status().await.expect("by status");
    let get = |s: DeadLetterStatus| {
        by_status
            .iter()
            .find(|c| c.status == s)
            .map(|c| c.count)
            .unwrap_or(0)
    };
    assert_eq!(get(DeadLetterStatus::Resolved), 2);
    assert_eq!(get(DeadLetterStatus::Discarded), 1);
    assert_eq!(get(DeadLetterStatus::Reprocessing), 1);
    assert_eq!(get(DeadLetterStatus::Pending), 9);

    // Purge: only final ones older than the cutoff, in chunks.
    let mut progress = Vec::new();
    let purged = dl
        .purge(chrono::Utc::now() - chrono::Duration::hours(1), 1, |n| {
            progress.push(n)
        })
        .await
        .expect("purge none");
    assert_eq!(purged, 0);
    let purged = dl
        .purge(chrono::Utc::now() + chrono::Duration::seconds(1), 1, |n| {
            progress.push(n)
        })
        .await
        .expect("purge");
    assert_eq!(purged, 3);
    assert_eq!(progress, vec![1, 2, 3], "one chunk at a time");
    assert_eq!(dl.count(&all).await.expect("count"), 10);
}

async fn replay_end_to_end_after_the_tail(db: TestDb) {
    migrate(&db).await;
    let fixed = Arc::new(AtomicBool::new(false));
    let rec = Recorder::default();
    let h = rejecting_engine(&db, fixed.clone(), &rec).await;
    let o = h.outbox();
    // Partition 0: good, bad-1, good, bad-2, bad-3, good.
    let names = ["ok-1", "bad-1", "ok-2", "bad-2", "bad-3", "ok-3"];
    let msgs: Vec<NewMessage> = names
        .iter()
        .map(|n| NewMessage::new("dl", 0, *n, "t").header("h", *n))
        .collect();
    o.enqueue_batch(&db.conn, &msgs).await.expect("enqueue");
    wait_dead(&db, 3).await;
    assert!(rec.wait_for(3, Duration::from_secs(10)).await);
    // The tail grows before the replay.
    o.enqueue(&db.conn, "dl", 0, "ok-4", "t")
        .await
        .expect("enqueue");
    assert!(rec.wait_for(4, Duration::from_secs(10)).await);

    fixed.store(true, Ordering::SeqCst); // the fix is deployed
    let report = o
        .dead_letters()
        .replay(
            &DeadLetterFilter {
                queue: Some("dl".into()),
                ..Default::default()
            },
            100,
        )
        .await
        .expect("replay");
    assert_eq!(report.replayed, 3);
    assert!(
        rec.wait_for(7, Duration::from_secs(10)).await,
        "{:?}: replayed messages delivered",
        db.backend
    );
    h.stop().await;
    let got: Vec<(String, i64)> = rec
        .all()
        .iter()
        .map(|m| (String::from_utf8_lossy(&m.payload).to_string(), m.seq))
        .collect();
    let order: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        order,
        ["ok-1", "ok-2", "ok-3", "ok-4", "bad-1", "bad-2", "bad-3"]
    );
    assert_eq!(got[4].1, 8, "replayed after the tail (seq 7 was ok-4)");
    assert!(
        rec.all()[4].headers.get("h").is_some_and(|v| v == "bad-1"),
        "headers kept"
    );
    let dl = DeadLetters::new(db.conn.clone()).expect("api");
    let replayed = DeadLetterFilter {
        status: Some(DeadLetterStatus::Replayed),
        ..Default::default()
    };
    assert_eq!(dl.count(&replayed).await.expect("count"), 3);
    // Replaying again finds nothing pending.
    assert_eq!(
        dl.replay(&DeadLetterFilter::default(), 100)
            .await
            .expect("again")
            .replayed,
        0
    );
}

async fn racing_replays_and_claims_never_double(db: TestDb) {
    migrate(&db).await;
    let rec = Recorder::default();
    let h = rejecting_engine(&db, Arc::new(AtomicBool::new(false)), &rec).await;
    let msgs: Vec<NewMessage> = (0..60u32)
        .map(|i| NewMessage::new("dl", i % 2, format!("bad-{i}"), "t"))
        .collect();
    h.outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    wait_dead(&db, 60).await;
    h.stop().await;
    // Two "instances" (own pools) claim concurrently: every dead letter is claimed once.
    let a = DeadLetters::new(db.connect().await).expect("a");
    let b = DeadLetters::new(db.connect().await).expect("b");
    let all = DeadLetterFilter::default();
    let (ra, rb) = tokio::join!(
        async {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.extend(
                    a.claim(&all, 4, Duration::from_secs(60), "a")
                        .await
                        .expect("claim a"),
                );
            }
            got
        },
        async {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.extend(
                    b.claim(&all, 4, Duration::from_secs(60), "b")
                        .await
                        .expect("claim b"),
                );
            }
            got
        }
    );
    let ids: HashSet<i64> = ra.iter().chain(rb.iter()).map(|d| d.id).collect();
    assert_eq!(
        ids.len(),
        ra.len() + rb.len(),
        "{:?}: a dead letter claimed twice",
        db.backend
    );
    assert!(ra.len() + rb.len() <= 60);
    // Two replays race over the rest: each pending dead letter is re-enqueued exactly once.
    let (x, y) = tokio::join!(a.replay(&all, 30), b.replay(&all, 30));
    let replayed = x.map(|r| r.replayed).unwrap_or(0) + y.map(|r| r.replayed).unwrap_or(0);
    let pending_left = a
        .count(&DeadLetterFilter {
            status: Some(DeadLetterStatus::Pending),
            ..Default::default()
        })
        .await
        .expect("count");
    assert_eq!(replayed + pending_left + (ra.len() + rb.len()) as u64, 60);
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM modkit_outbox_incoming").await as u64,
        replayed,
        "one new message per replayed dead letter"
    );
}

/// A failure reason the database could not store as given (70 kB, longer than MySQL's `TEXT`;
/// a NUL, which PostgreSQL text refuses) must not keep a message from being dead-lettered:
/// the reason is stored cut and cleaned, in leased and in transactional mode, and through
/// `DeadLetters::fail`.
async fn unstorable_failure_reasons_still_dead_letter(db: TestDb) {
    migrate(&db).await;
    let reason = format!("bad\0{}", "x".repeat(70_000));
    let r = reason.clone();
    let handle = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("leased", Partitions::of(1))
        .leased(move |_m: Message| {
            let r = r.clone();
            async move { HandlerResult::Ok(Outcome::Retry(r)) }
        })
        .queue("txn", Partitions::of(1))
        .transactional(FailsWith(reason.clone()))
        .start()
        .await
        .expect("start");
    for q in ["leased", "txn"] {
        handle
            .outbox()
            .enqueue(&db.conn, q, 0, &b"p"[..], "t")
            .await
            .expect("enqueue");
    }
    wait_dead(&db, 2).await;
    let dl = DeadLetters::new(db.conn.clone()).expect("api");
    let page = dl
        .list(&DeadLetterFilter::default(), 10, None)
        .await
        .expect("list");
    assert_eq!(page.items.len(), 2);
    for item in &page.items {
        let e = item.last_error.as_deref().unwrap_or_default();
        assert!(
            e.len() <= modkit_outbox::MAX_ERROR_TEXT_BYTES,
            "{}",
            e.len()
        );
        assert!(
            e.starts_with("bad\u{FFFD}xxx") && !e.contains('\0'),
            "{:?}",
            &e[..20]
        );
    }
    handle.stop().await;
    // The operator's reason takes the same path.
    let claimed = dl
        .claim(
            &DeadLetterFilter::default(),
            1,
            Duration::from_secs(60),
            "op",
        )
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].id;
    dl.fail(id, "op", &reason)
        .await
        .expect("fail with an unstorable reason");
    let e = dl
        .get(id)
        .await
        .expect("get")
        .expect("row")
        .last_error
        .unwrap_or_default();
    assert!(e.len() <= modkit_outbox::MAX_ERROR_TEXT_BYTES && !e.contains('\0'));
}

/// A transactional handler that fails every message with the given text.
struct FailsWith(String);

#[async_trait::async_trait]
impl modkit_outbox::TransactionalHandler for FailsWith {
    async fn handle(&self, _txn: &sea_orm::DatabaseTransaction, _m: &Message) -> HandlerResult {
        Err(self.0.clone().into())
    }
}

/// Twenty payloads of ~1 MB (20 MB in all, over MariaDB's default 16 MiB packet) through one
/// enqueue call, one rejected batch and one replay: every multi-row insert that carries
/// payloads is cut by bytes, so none exceeds `max_allowed_packet` and nothing is stuck.
async fn megabyte_payloads_enqueue_dead_letter_and_replay(db: TestDb) {
    migrate(&db).await;
    let handle = Outbox::builder(db.conn.clone())
        .config(fast_config())
        .queue("big", Partitions::of(1))
        .leased(|_m: Message| async { HandlerResult::Ok(Outcome::Reject("no".into())) })
        .start()
        .await
        .expect("start");
    let msgs: Vec<NewMessage> = (0..20u8)
        .map(|i| NewMessage::new("big", 0, vec![i; 1_000_000], "t"))
        .collect();
    handle
        .outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("20 MB in one enqueue call");
    wait_dead(&db, 20).await;
    handle.stop().await;
    let dl = DeadLetters::new(db.conn.clone()).expect("api");
    let report = dl
        .replay(&DeadLetterFilter::default(), 500)
        .await
        .expect("replay 20 MB");
    assert_eq!(report.replayed, 20);
    assert_eq!(
        scalar(&db.conn, "SELECT COUNT(*) AS n FROM modkit_outbox_incoming").await,
        20,
        "{:?}: the replayed messages wait in incoming",
        db.backend
    );
}

backend_tests!(
    filters_pagination_and_transitions,
    megabyte_payloads_enqueue_dead_letter_and_replay,
    unstorable_failure_reasons_still_dead_letter,
    replay_end_to_end_after_the_tail,
    racing_replays_and_claims_never_double,
);
