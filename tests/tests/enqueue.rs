//! Enqueue: atomic with the caller's transaction, batch ids paired with the right bodies, typed
//! validation errors that write nothing.

mod common;

use common::{count, migrate};
use modkit_outbox::{NewMessage, Outbox, OutboxError, Partitions, partition_for_key};
use modkit_outbox_tests::{TestDb, backend_tests};
use sea_orm::{ConnectionTrait, Statement, TransactionTrait};

async fn producer(db: &TestDb) -> Outbox {
    Outbox::builder(db.conn.clone())
        .queue("orders", Partitions::of(4))
        .producer_only()
        .build()
        .await
        .expect("build")
}

async fn rollback_leaves_nothing(db: TestDb) {
    migrate(&db).await;
    let outbox = producer(&db).await;
    let txn = db.conn.begin().await.expect("begin");
    outbox
        .enqueue(&txn, "orders", 1, &b"x"[..], "t")
        .await
        .expect("enqueue");
    outbox
        .enqueue_batch(
            &txn,
            &[
                NewMessage::new("orders", 0, &b"a"[..], "t"),
                NewMessage::new("orders", 2, &b"b"[..], "t"),
            ],
        )
        .await
        .expect("batch");
    txn.rollback().await.expect("rollback");
    assert_eq!(count(&db.conn, "modkit_outbox_body").await, 0);
    assert_eq!(count(&db.conn, "modkit_outbox_incoming").await, 0);
}

async fn batch_of_1000_pairs_ids_with_bodies(db: TestDb) {
    migrate(&db).await;
    let outbox = producer(&db).await;
    // A concurrent producer interleaves its own rows, so ids need not be consecutive.
    let other = outbox.clone();
    let conn2 = db.connect().await;
    let noise = tokio::spawn(async move {
        for i in 0..50u32 {
            let txn = conn2.begin().await.expect("begin");
            other
                .enqueue(
                    &txn,
                    "orders",
                    i % 4,
                    format!("noise-{i}").into_bytes(),
                    "noise",
                )
                .await
                .expect("noise");
            txn.commit().await.expect("commit");
        }
    });
    let msgs: Vec<NewMessage> = (0..1000u32)
        .map(|i| {
            NewMessage::new("orders", i % 4, format!("payload-{i}").into_bytes(), "t")
                .header("n", i.to_string())
        })
        .collect();
    let txn = db.conn.begin().await.expect("begin");
    let ids = outbox.enqueue_batch(&txn, &msgs).await.expect("batch");
    txn.commit().await.expect("commit");
    noise.await.expect("noise task");
    assert_eq!(ids.len(), 1000);
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ids, "ids ascend in input order");
    for (i, id) in ids.iter().enumerate() {
        let row = db
            .conn
            .query_one_raw(Statement::from_string(
                db.conn.get_database_backend(),
                format!(
                    "SELECT b.payload, b.headers, i.partition_id, p.{q}partition{q} AS part \
                     FROM modkit_outbox_body b JOIN modkit_outbox_incoming i ON i.body_id = b.id \
                     JOIN modkit_outbox_partitions p ON p.id = i.partition_id WHERE b.id = {id}",
                    q = if db.backend == modkit_outbox_tests::Backend::MySql {
                        "`"
                    } else {
                        "\""
                    }
                ),
            ))
            .await
            .expect("read back")
            .unwrap_or_else(|| panic!("{:?}: no body/incoming for id {id}", db.backend));
        let payload: Vec<u8> = row.try_get("", "payload").expect("payload");
        assert_eq!(
            payload,
            format!("payload-{i}").into_bytes(),
            "{:?}: id {id}",
            db.backend
        );
        let part: i32 = row.try_get("", "part").expect("part");
        assert_eq!(part as u32, i as u32 % 4);
        let headers: String = row.try_get("", "headers").expect("headers");
        assert_eq!(headers, format!("{{\"n\":\"{i}\"}}"));
    }
    assert_eq!(count(&db.conn, "modkit_outbox_body").await, 1050);
}

async fn invalid_input_is_rejected_and_writes_nothing(db: TestDb) {
    migrate(&db).await;
    let outbox = Outbox::builder(db.conn.clone())
        .config(modkit_outbox::OutboxConfig {
            max_payload_bytes: 16,
            ..Default::default()
        })
        .queue("orders", Partitions::of(4))
        .producer_only()
        .build()
        .await
        .expect("build");
    let txn = db.conn.begin().await.expect("begin");
    let e = outbox.enqueue(&txn, "nope", 0, &b"x"[..], "t").await;
    assert!(matches!(e, Err(OutboxError::UnknownQueue(q)) if q == "nope"));
    let e = outbox.enqueue(&txn, "orders", 4, &b"x"[..], "t").await;
    assert!(matches!(
        e,
        Err(OutboxError::PartitionOutOfRange {
            partition: 4,
            partitions: 4,
            ..
        })
    ));
    let e = outbox.enqueue(&txn, "orders", 0, vec![0u8; 17], "t").await;
    assert!(matches!(
        e,
        Err(OutboxError::PayloadTooLarge {
            size: 17,
            limit: 16
        })
    ));
    let e = outbox
        .enqueue(&txn, "orders", 0, &b"x"[..], "bad type")
        .await;
    assert!(matches!(e, Err(OutboxError::InvalidPayloadType { .. })));
    let e = outbox
        .enqueue_message(
            &txn,
            NewMessage::new("orders", 0, &b"x"[..], "t").header("", "v"),
        )
        .await;
    assert!(matches!(e, Err(OutboxError::InvalidHeader { .. })));
    // One bad message rejects the whole batch.
    let e = outbox
        .enqueue_batch(
            &txn,
            &[
                NewMessage::new("orders", 0, &b"ok"[..], "t"),
                NewMessage::new("orders", 9, &b"bad"[..], "t"),
            ],
        )
        .await;
    assert!(matches!(e, Err(OutboxError::PartitionOutOfRange { .. })));
    // Headers within every per-header limit but over MySQL's TEXT column once encoded, on the
    // last message of a batch longer than one insert chunk: rejected before any row is written.
    let mut batch: Vec<NewMessage> = (0..1000)
        .map(|_| NewMessage::new("orders", 0, &b"ok"[..], "t"))
        .collect();
    let mut big = NewMessage::new("orders", 0, &b"ok"[..], "t");
    for i in 0..8 {
        big = big.header(
            format!("h{i}"),
            "v".repeat(modkit_outbox::MAX_HEADER_VALUE_BYTES),
        );
    }
    batch.push(big);
    let e = outbox.enqueue_batch(&txn, &batch).await;
    assert!(
        matches!(e, Err(OutboxError::InvalidHeader { .. })),
        "{:?}: {e:?}",
        db.backend
    );
    txn.commit().await.expect("commit");
    assert_eq!(count(&db.conn, "modkit_outbox_body").await, 0);
    assert_eq!(count(&db.conn, "modkit_outbox_incoming").await, 0);

    // Builder validation: malformed names, zero partitions, conflicting counts.
    let e = Outbox::builder(db.conn.clone())
        .queue("Bad Name", Partitions::of(1))
        .producer_only()
        .build()
        .await;
    assert!(matches!(e, Err(OutboxError::InvalidQueueName { .. })));
    let e = Outbox::builder(db.conn.clone())
        .queue("zero", Partitions::of(0))
        .producer_only()
        .build()
        .await;
    assert!(matches!(e, Err(OutboxError::InvalidPartitionCount(0))));
    let before = count(&db.conn, "modkit_outbox_partitions").await;
    let e = Outbox::builder(db.conn.clone())
        .queue("fresh", Partitions::of(2))
        .producer_only()
        .queue("orders", Partitions::of(8))
        .producer_only()
        .build()
        .await;
    assert!(matches!(
        e,
        Err(OutboxError::PartitionCountConflict {
            existing: 4,
            requested: 8,
            ..
        })
    ));
    assert_eq!(
        count(&db.conn, "modkit_outbox_partitions").await,
        before,
        "a conflicting builder writes nothing"
    );
    let e = Outbox::builder(db.conn.clone())
        .queue("dup", Partitions::of(1))
        .producer_only()
        .queue("dup", Partitions::of(1))
        .producer_only()
        .build()
        .await;
    assert!(matches!(e, Err(OutboxError::DuplicateQueue(_))));
}

async fn keyed_enqueue_uses_the_stable_hash(db: TestDb) {
    migrate(&db).await;
    let outbox = producer(&db).await;
    let id = outbox
        .enqueue_keyed(&db.conn, "orders", "customer-7", &b"k"[..], "t")
        .await
        .expect("keyed on a bare connection");
    let want = partition_for_key("customer-7", Partitions::of(4));
    let q = if db.backend == modkit_outbox_tests::Backend::MySql {
        "`"
    } else {
        "\""
    };
    let n = common::scalar(
        &db.conn,
        &format!(
            "SELECT CAST(p.{q}partition{q} AS SIGNED) AS n FROM modkit_outbox_incoming i \
             JOIN modkit_outbox_partitions p ON p.id = i.partition_id WHERE i.body_id = {id}"
        )
        .replace(
            "CAST(p.\"partition\" AS SIGNED)",
            "CAST(p.\"partition\" AS BIGINT)",
        ),
    )
    .await;
    assert_eq!(n as u32, want);
}

/// One message per transaction, the path of every B=1 producer: every byte value, quotes,
/// backslashes, SQL-looking text and non-ASCII text come back exactly, an empty payload is kept
/// as empty, the returned id is the message's own body even while another producer commits
/// beside it, and on MySQL a session with `NO_BACKSLASH_ESCAPES` changes nothing.
async fn single_messages_store_exactly_what_was_given(db: TestDb) {
    migrate(&db).await;
    let outbox = producer(&db).await;
    let other = outbox.clone();
    let conn2 = db.connect().await;
    let noise = tokio::spawn(async move {
        for i in 0..40u32 {
            let txn = conn2.begin().await.expect("begin");
            other
                .enqueue(&txn, "orders", i % 4, vec![0u8; 3], "noise")
                .await
                .expect("noise");
            txn.commit().await.expect("commit");
        }
    });
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    // (payload, payload type, one header)
    type Case<'a> = (Vec<u8>, &'a str, Option<(&'a str, &'a str)>);
    let cases: Vec<Case<'_>> = vec![
        (
            all_bytes.repeat(4),
            "t'\\\"é😀",
            Some(("k", "v' OR '1'='1 \\ \" ünï")),
        ),
        (Vec::new(), "empty", None),
        (
            b"x'); DROP TABLE modkit_outbox_body; --".to_vec(),
            "t",
            None,
        ),
        // 20 KiB.
        (all_bytes.repeat(80), "big", Some(("n", "1"))),
    ];
    for (round, (payload, ty, header)) in cases.iter().enumerate() {
        let txn = db.conn.begin().await.expect("begin");
        if db.backend == modkit_outbox_tests::Backend::MySql {
            txn.execute_unprepared(
                "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')",
            )
            .await
            .expect("sql_mode");
        }
        let mut msg = NewMessage::new("orders", round as u32 % 4, payload.clone(), *ty);
        if let Some((k, v)) = header {
            msg = msg.header(*k, *v);
        }
        let id = outbox.enqueue_message(&txn, msg).await.expect("enqueue");
        if db.backend == modkit_outbox_tests::Backend::MySql {
            txn.execute_unprepared("SET SESSION sql_mode = DEFAULT")
                .await
                .expect("sql_mode");
        }
        txn.commit().await.expect("commit");
        let row = db
            .conn
            .query_one_raw(Statement::from_string(
                db.conn.get_database_backend(),
                format!(
                    "SELECT b.payload, b.payload_type, b.headers, i.partition_id \
                     FROM modkit_outbox_body b JOIN modkit_outbox_incoming i ON i.body_id = b.id \
                     WHERE b.id = {id}"
                ),
            ))
            .await
            .expect("read back")
            .unwrap_or_else(|| panic!("{:?}: no body/incoming for id {id}", db.backend));
        let got: Vec<u8> = row.try_get("", "payload").expect("payload");
        assert_eq!(&got, payload, "{:?}: payload of case {round}", db.backend);
        let got: String = row.try_get("", "payload_type").expect("type");
        assert_eq!(got, *ty, "{:?}: type of case {round}", db.backend);
        let got: Option<String> = row.try_get("", "headers").expect("headers");
        let want = header.map(|(k, v)| serde_json::json!({ k: v }));
        assert_eq!(
            got.map(|h| serde_json::from_str::<serde_json::Value>(&h).expect("json")),
            want,
            "{:?}: headers of case {round}",
            db.backend
        );
    }
    noise.await.expect("noise task");
    assert_eq!(count(&db.conn, "modkit_outbox_body").await, 44);
    assert_eq!(count(&db.conn, "modkit_outbox_incoming").await, 44);
}

backend_tests!(
    rollback_leaves_nothing,
    single_messages_store_exactly_what_was_given,
    batch_of_1000_pairs_ids_with_bodies,
    invalid_input_is_rejected_and_writes_nothing,
    keyed_enqueue_uses_the_stable_hash,
);
