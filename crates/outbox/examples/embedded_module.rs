//! A ModKit-style module that embeds the outbox:
//!
//! * its own migrator splices the outbox migrations in next to its business table;
//! * `OrdersService::place_order` writes the order row and its event in one transaction;
//! * a transactional handler maintains a projection table exactly once per event;
//! * the module's lifecycle (`start` with a cancellation token, `stop`) runs the engine.
//!
//! ```sh
//! cargo run -p modkit-outbox --example embedded_module              # temporary SQLite file
//! cargo run -p modkit-outbox --example embedded_module -- postgres://postgres@127.0.0.1:5432/test
//! ```
#![allow(clippy::print_stdout)]

use std::time::Duration;

use async_trait::async_trait;
use modkit_outbox::{
    HandlerResult, Message, Outbox, OutboxConfig, OutboxHandle, Outcome, Partitions,
    TransactionalHandler,
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, Statement, TransactionTrait,
};
use sea_orm_migration::prelude::*;
use tokio_util::sync::CancellationToken;

// ---- the module's migrations -------------------------------------------------------------

struct CreateOrders;

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m20261123_100000_create_orders"
    }
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait]
impl MigrationTrait for CreateOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let c = manager.get_connection();
        c.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, customer VARCHAR(64) NOT NULL, total BIGINT NOT NULL)",
        )
        .await?;
        c.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS customer_totals (customer VARCHAR(64) PRIMARY KEY, total BIGINT NOT NULL, orders BIGINT NOT NULL)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let c = manager.get_connection();
        c.execute_unprepared("DROP TABLE IF EXISTS customer_totals")
            .await?;
        c.execute_unprepared("DROP TABLE IF EXISTS orders").await?;
        Ok(())
    }
}

/// The host module's migrator: outbox tables first, then the module's own.
struct OrdersMigrator;

#[async_trait]
impl MigratorTrait for OrdersMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = modkit_outbox_migration::outbox_migrations();
        all.push(Box::new(CreateOrders));
        all
    }
}

// ---- the module's service -----------------------------------------------------------------

const QUEUE: &str = "orders.events";

#[derive(Clone)]
struct OrdersService {
    db: DatabaseConnection,
    outbox: Outbox,
}

impl OrdersService {
    /// Writes the order and its `order.placed` event atomically.
    async fn place_order(
        &self,
        id: i64,
        customer: &str,
        total: i64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let txn = self.db.begin().await?;
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            match txn.get_database_backend() {
                sea_orm::DbBackend::Postgres => {
                    "INSERT INTO orders (id, customer, total) VALUES ($1, $2, $3)"
                }
                _ => "INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)",
            },
            [id.into(), customer.into(), total.into()],
        ))
        .await?;
        let payload = format!("{{\"id\":{id},\"customer\":\"{customer}\",\"total\":{total}}}");
        self.outbox
            .enqueue_keyed(&txn, QUEUE, customer, payload, "order.placed")
            .await?;
        txn.commit().await?;
        Ok(())
    }
}

/// Maintains `customer_totals` inside the outbox transaction: exactly once per event.
struct Projection;

#[async_trait]
impl TransactionalHandler for Projection {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Message) -> HandlerResult {
        let text = String::from_utf8_lossy(&msg.payload).to_string();
        let field = |name: &str| -> Option<String> {
            let start = text.find(&format!("\"{name}\":"))? + name.len() + 3;
            let rest = &text[start..];
            let end = rest.find([',', '}'])?;
            Some(rest[..end].trim_matches('"').to_owned())
        };
        let (Some(customer), Some(total)) = (field("customer"), field("total")) else {
            return Ok(Outcome::Reject(format!("malformed event: {text}")));
        };
        let total: i64 = total.parse()?;
        let backend = txn.get_database_backend();
        let (update, insert) = match backend {
            sea_orm::DbBackend::Postgres => (
                "UPDATE customer_totals SET total = total + $1, orders = orders + 1 WHERE customer = $2",
                "INSERT INTO customer_totals (customer, total, orders) VALUES ($1, $2, 1)",
            ),
            _ => (
                "UPDATE customer_totals SET total = total + ?, orders = orders + 1 WHERE customer = ?",
                "INSERT INTO customer_totals (customer, total, orders) VALUES (?, ?, 1)",
            ),
        };
        let res = txn
            .execute_raw(Statement::from_sql_and_values(
                backend,
                update,
                [total.into(), customer.clone().into()],
            ))
            .await?;
        if res.rows_affected() == 0 {
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                insert,
                [customer.into(), total.into()],
            ))
            .await?;
        }
        Ok(Outcome::Ack)
    }
}

// ---- the module and its lifecycle ----------------------------------------------------------

struct OrdersModule {
    db: DatabaseConnection,
    engine: Option<OutboxHandle>,
    service: Option<OrdersService>,
}

impl OrdersModule {
    async fn init(db: DatabaseConnection) -> Result<Self, Box<dyn std::error::Error>> {
        OrdersMigrator::up(&db, None).await?;
        Ok(Self {
            db,
            engine: None,
            service: None,
        })
    }

    /// Starts the engine; it stops when `cancel` fires (the host's shutdown signal).
    async fn start(
        &mut self,
        cancel: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error>> {
        // Every engine setting has a documented default (`OutboxConfig::default()`). This
        // module's events feed a projection users read right after placing an order, so it
        // gives up the sequencer's linger (more passes, each message moved at once) for latency.
        let config = OutboxConfig {
            sequencer_linger: Some(Duration::ZERO),
            ..OutboxConfig::default()
        };
        let handle = Outbox::builder(self.db.clone())
            .config(config)
            .queue(QUEUE, Partitions::of(4))
            .transactional(Projection)
            .start()
            .await?;
        self.service = Some(OrdersService {
            db: self.db.clone(),
            outbox: handle.outbox(),
        });
        self.engine = Some(handle);
        let engine = self.engine.take();
        Ok(tokio::spawn(async move {
            cancel.cancelled().await;
            if let Some(h) = engine {
                h.stop().await;
            }
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let url = std::env::args().nth(1).unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            tmp.path().join("module.sqlite").display()
        )
    });
    let mut opts = sea_orm::ConnectOptions::new(url.clone());
    // Ping pooled connections only once they have been idle a while, not on every checkout
    // (one round trip saved per transaction; docs/OPERATIONS.md, "Connection pool").
    opts.test_before_acquire_if_idle_for(std::time::Duration::from_secs(30));
    if url.starts_with("sqlite:") {
        // SQLite has one writer: the module's writes and the outbox share one connection.
        opts.max_connections(1);
    }
    let db = sea_orm::Database::connect(opts).await?;
    let mut module = OrdersModule::init(db.clone()).await?;
    let cancel = CancellationToken::new();
    let stopped = module.start(cancel.clone()).await?;
    let service = module.service.clone().ok_or("service not started")?;

    let read = |sql: &'static str| {
        let db = db.clone();
        async move {
            let rows = db
                .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String>("", "customer")?,
                        r.try_get::<i64>("", "total")?,
                    ))
                })
                .collect::<Result<Vec<_>, DbErr>>()
        }
    };
    let sql = "SELECT customer, total FROM customer_totals ORDER BY customer";
    let before: i64 = read(sql).await?.iter().map(|(_, t)| t).sum();

    let base: i64 = rand_base();
    for (i, (customer, total)) in [("ada", 30), ("bob", 12), ("ada", 5), ("cy", 7), ("bob", 8)]
        .iter()
        .enumerate()
    {
        service
            .place_order(base + i as i64, customer, *total)
            .await?;
    }
    println!("placed 5 orders; waiting for the projection");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let totals = read(sql).await?;
        let sum: i64 = totals.iter().map(|(_, t)| t).sum();
        if sum - before == 62 {
            for (c, t) in &totals {
                println!("  {c:>4}: {t}");
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("projection incomplete: {totals:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel(); // the host shuts the module down
    stopped.await?;
    println!("module stopped");
    Ok(())
}

/// Order ids unique per run, so the example can run again on a persistent database.
fn rand_base() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    (nanos / 1000) % 1_000_000_000_000
}
