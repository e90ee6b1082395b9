//! `outbox demo`: migrate, enqueue orders inside business transactions (one of them rolled
//! back), process them in order per partition, dead-letter a poison message, and show that
//! vacuum emptied the pipeline tables.

use std::time::Duration;

use crate::output::out;

use modkit_outbox::{
    HandlerResult, Message, NewMessage, Outbox, OutboxConfig, Outcome, Partitions,
};
use modkit_outbox_migration::Migrator;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, Statement, TransactionTrait};
use sea_orm_migration::MigratorTrait;

async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> Result<i64, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// Runs the demo against `url`.
pub async fn run(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    out!("modkit-outbox demo on {url}");

    let mut opts = ConnectOptions::new(url.to_owned());
    if url.starts_with("sqlite:") {
        // SQLite has one writer: the demo's writes and the engine share one connection.
        opts.max_connections(1);
    }
    let db = Database::connect(opts).await?;
    Migrator::up(&db, None).await?;
    out!("1. migrated the outbox schema (7 modkit_outbox_ tables)");
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS demo_orders (id BIGINT NOT NULL, amount BIGINT NOT NULL)",
    )
    .await?;
    let dead_before = scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_dead_letters").await?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handle = Outbox::builder(db.clone())
        .config(OutboxConfig {
            retry: modkit_outbox::RetryPolicy {
                max_attempts: 3,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(200),
            },
            ..OutboxConfig::default()
        })
        .queue("orders", Partitions::of(4))
        .leased(move |m: Message| {
            let tx = tx.clone();
            async move {
                let body = String::from_utf8_lossy(&m.payload).to_string();
                if body.contains("\"amount\":-") {
                    let _ = tx.send(format!(
                        "   rejected  orders/{} seq={} (attempt {}) {body}",
                        m.partition, m.seq, m.attempts
                    ));
                    return Ok(Outcome::Reject("amount must be positive".into()));
                }
                let _ = tx.send(format!(
                    "   handled   orders/{} seq={} id={} {} {body}",
                    m.partition, m.seq, m.id, m.payload_type
                ));
                HandlerResult::Ok(Outcome::Ack)
            }
        })
        .start()
        .await?;
    out!("2. started the engine: queue `orders`, 4 partitions, leased handler");

    let outbox = handle.outbox();
    let orders: [(i64, i64); 6] = [(1, 30), (2, 12), (3, -5), (4, 99), (5, 7), (6, 41)];
    for chunk in orders.chunks(3) {
        let txn = db.begin().await?;
        let mut msgs = Vec::new();
        for (id, amount) in chunk {
            txn.execute_unprepared(&format!(
                "INSERT INTO demo_orders (id, amount) VALUES ({id}, {amount})"
            ))
            .await?;
            let key = format!("order-{id}");
            let part = modkit_outbox::partition_for_key(&key, Partitions::of(4));
            msgs.push(
                NewMessage::new(
                    "orders",
                    part,
                    format!("{{\"order\":{id},\"amount\":{amount}}}"),
                    "order.created",
                )
                .header("idempotency-key", key),
            );
        }
        outbox.enqueue_batch(&txn, &msgs).await?;
        txn.commit().await?;
    }
    let txn = db.begin().await?;
    outbox
        .enqueue(&txn, "orders", 0, "{\"order\":99}", "order.created")
        .await?;
    txn.rollback().await?;
    out!("3. enqueued 6 orders in 2 committed transactions, 1 more in a rolled-back one");

    let mut seen = 0;
    while seen < 6 {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(line)) => {
                out!("{line}");
                seen += 1;
            }
            _ => return Err("timed out waiting for deliveries".into()),
        }
    }
    out!(
        "4. every committed order was delivered, in order per partition; the rolled-back one never was"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_outgoing").await?
            + scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_body").await?;
        if left == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead =
        scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_dead_letters").await? - dead_before;
    out!("5. dead letters added by this run: {dead} (the negative amount)");
    out!(
        "6. vacuum: outgoing={} body={} incoming={} rows left",
        scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_outgoing").await?,
        scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_body").await?,
        scalar(&db, "SELECT COUNT(*) AS n FROM modkit_outbox_incoming").await?,
    );
    handle.stop().await;
    out!("7. stopped gracefully (leases released)");
    Ok(())
}
