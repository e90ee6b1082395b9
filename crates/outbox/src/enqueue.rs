//! Enqueue: body and incoming rows written inside the caller's transaction.
//!
//! Batch ids pair with their bodies on every backend without assuming consecutive ids:
//! PostgreSQL and SQLite return the inserted ids (`RETURNING`), MySQL reads back the rows tagged
//! with the batch's random token. Ids are assigned in row order, so sorting them pairs id *k*
//! with message *k*, and a producer's messages keep their order in `incoming`.
//!
//! A single message is one statement on PostgreSQL (a CTE) and one call on SQLite (two
//! statements in one query string, run by one hop to sqlx's worker thread).

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait, Value};

use crate::backend::{Dialect, mysql, postgres, query_all, sqlite};
use crate::error::{OutboxError, Result};
use crate::message::{MessageId, NewMessage};

/// Rows per insert statement (keeps every backend well below its bind-parameter limit); an
/// insert is also cut at [`crate::backend::MAX_STATEMENT_BYTES`] of payloads and headers.
pub(crate) const ENQUEUE_CHUNK: usize = 1000;

/// A connection or transaction messages can be enqueued on.
///
/// Pass the transaction that writes your business rows: the messages then commit or roll back
/// with it. On a bare [`DatabaseConnection`] the outbox opens (and commits) a transaction of its
/// own, so a batch is still all-or-nothing.
pub trait EnqueueConn: ConnectionTrait + TransactionTrait + Sync {
    /// Whether this is already a transaction.
    fn in_transaction(&self) -> bool;
}

impl EnqueueConn for DatabaseTransaction {
    fn in_transaction(&self) -> bool {
        true
    }
}

impl EnqueueConn for DatabaseConnection {
    fn in_transaction(&self) -> bool {
        false
    }
}

/// A validated message with its partition's row id resolved.
pub(crate) struct Resolved<'a> {
    pub(crate) msg: &'a NewMessage,
    pub(crate) partition_id: i64,
    pub(crate) headers: Option<String>,
}

/// Writes the rows; returns the body ids in message order. `notify` (PostgreSQL only) adds a
/// `NOTIFY` that wakes every instance's sequencer when the transaction commits.
pub(crate) async fn insert<C: ConnectionTrait>(
    c: &C,
    d: Dialect,
    msgs: &[Resolved<'_>],
    notify: bool,
) -> Result<Vec<MessageId>> {
    let now = chrono::Utc::now();
    if msgs.len() == 1 && d != Dialect::MySql {
        let (sql, args) = one_message_statement(d, &msgs[0], now, notify);
        let rows = query_all(c, d, sql, args).await?;
        let id = rows
            .first()
            .map(|r| r.try_get::<i64>("", "id"))
            .transpose()?
            .ok_or_else(|| sea_orm::DbErr::RecordNotInserted)?;
        return Ok(vec![id]);
    }

    let mut ids = Vec::with_capacity(msgs.len());
    for chunk in chunks(msgs) {
        let body_ids = insert_bodies(c, d, chunk, now).await?;
        let (sql, args) = incoming_statement(d, chunk, &body_ids, notify);
        if d == Dialect::Postgres && notify {
            query_all(c, d, &sql, args).await?;
        } else {
            crate::backend::execute(c, d, &sql, args).await?;
        }
        ids.extend(body_ids);
    }
    Ok(ids)
}

/// The messages of one enqueue call, split into inserts: at most [`ENQUEUE_CHUNK`] rows and
/// [`crate::backend::MAX_STATEMENT_BYTES`] of payloads and headers each.
pub(crate) fn chunks<'a, 'm>(msgs: &'a [Resolved<'m>]) -> Vec<&'a [Resolved<'m>]> {
    crate::backend::byte_chunks(
        msgs,
        ENQUEUE_CHUNK,
        crate::backend::MAX_STATEMENT_BYTES,
        |m| m.msg.payload.len() + m.headers.as_ref().map_or(0, String::len),
    )
}

async fn insert_bodies<C: ConnectionTrait>(
    c: &C,
    d: Dialect,
    chunk: &[Resolved<'_>],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<i64>> {
    let token: Option<i64> =
        (d == Dialect::MySql && chunk.len() > 1).then(|| rand::random_range(1..i64::MAX));
    let (insert, args) = bodies_statement(d, chunk, now, token);
    let mut ids: Vec<i64> = match d {
        Dialect::Postgres | Dialect::Sqlite => {
            let rows = query_all(c, d, &insert, args).await?;
            rows.iter()
                .map(|r| r.try_get::<i64>("", "id"))
                .collect::<std::result::Result<_, _>>()?
        }
        Dialect::MySql => {
            let res = c.execute_raw(d.stmt(&insert, args)).await?;
            let first = res.last_insert_id() as i64;
            match token {
                None => vec![first],
                Some(t) => {
                    let rows = query_all(
                        c,
                        d,
                        mysql::BATCH_IDS,
                        vec![
                            Value::from(first),
                            Value::from(t),
                            Value::from(chunk.len() as u64),
                        ],
                    )
                    .await?;
                    rows.iter()
                        .map(|r| r.try_get::<i64>("", "id"))
                        .collect::<std::result::Result<_, _>>()?
                }
            }
        }
    };
    if ids.len() != chunk.len() {
        return Err(OutboxError::Db(sea_orm::DbErr::Custom(format!(
            "enqueue: inserted {} bodies but read back {} ids",
            chunk.len(),
            ids.len()
        ))));
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The one statement (PostgreSQL: a CTE; SQLite: two statements in one call) that enqueues a
/// single message, and its arguments. Not used on MySQL (two prepared inserts).
pub(crate) fn one_message_statement(
    d: Dialect,
    m: &Resolved<'_>,
    now: chrono::DateTime<chrono::Utc>,
    notify: bool,
) -> (&'static str, Vec<Value>) {
    let sql = match d {
        Dialect::Postgres if notify => postgres::ENQUEUE_ONE_NOTIFY,
        Dialect::Postgres => postgres::ENQUEUE_ONE,
        _ => sqlite::ENQUEUE_ONE,
    };
    let args = vec![
        Value::from(m.msg.payload.to_vec()),
        Value::from(m.msg.payload_type.as_str()),
        Value::from(m.headers.clone()),
        d.time(now),
        Value::from(m.partition_id),
    ];
    (sql, args)
}

/// The `body` insert of one chunk (with `RETURNING id` where the backend has it) and its
/// arguments. `token` tags a MySQL batch so its ids can be read back.
pub(crate) fn bodies_statement(
    d: Dialect,
    chunk: &[Resolved<'_>],
    now: chrono::DateTime<chrono::Utc>,
    token: Option<i64>,
) -> (String, Vec<Value>) {
    let mut args = Vec::with_capacity(5 * chunk.len());
    for m in chunk {
        args.push(Value::from(m.msg.payload.to_vec()));
        args.push(Value::from(m.msg.payload_type.as_str()));
        args.push(Value::from(m.headers.clone()));
        args.push(Value::from(token));
        args.push(d.time(now));
    }
    let values = vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ");
    let returning = if d == Dialect::MySql {
        ""
    } else {
        " RETURNING id"
    };
    let sql = format!(
        "INSERT INTO modkit_outbox_body (payload, payload_type, headers, batch_token, created_at) \
         VALUES {values}{returning}"
    );
    (sql, args)
}

/// The `incoming` insert of one chunk whose bodies got `body_ids` (in message order), and its
/// arguments; `notify` (PostgreSQL) adds the `NOTIFY` for the other instances.
pub(crate) fn incoming_statement(
    d: Dialect,
    chunk: &[Resolved<'_>],
    body_ids: &[i64],
    notify: bool,
) -> (String, Vec<Value>) {
    let values = vec!["(?, ?)"; chunk.len()].join(", ");
    let mut args = Vec::with_capacity(2 * chunk.len());
    for (m, id) in chunk.iter().zip(body_ids) {
        args.push(Value::from(m.partition_id));
        args.push(Value::from(*id));
    }
    let sql = if d == Dialect::Postgres && notify {
        format!(
            "WITH i AS (INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES {values}) {}",
            postgres::NOTIFY_INCOMING
        )
    } else {
        format!("INSERT INTO modkit_outbox_incoming (partition_id, body_id) VALUES {values}")
    };
    (sql, args)
}
