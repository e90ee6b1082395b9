//! PostgreSQL specifics: the one-round-trip enqueue with `pg_notify`, and the `LISTEN` task that
//! turns notifications from every instance into local wake-ups.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseConnection, Value};
use tokio_util::sync::CancellationToken;

use super::Dialect;
use crate::signals::Signals;

/// Notification channel shared by all instances on one database.
pub(crate) const CHANNEL: &str = "modkit_outbox";
/// Payload telling sequencers that incoming rows were committed.
pub(crate) const INCOMING: &str = "i";
/// Prefix of the payload telling processors that partition `<id>` got new sequenced rows:
/// `s:<partition id>:<instance id>`; an instance ignores its own (it already woke locally).
pub(crate) const SEQUENCED_PREFIX: &str = "s:";

/// One message: body, incoming row and notification in a single statement (one round trip).
pub(crate) const ENQUEUE_ONE: &str = "WITH b AS (\
     INSERT INTO modkit_outbox_body (payload, payload_type, headers, created_at) \
     VALUES (?, ?, ?, ?) RETURNING id), \
   i AS (INSERT INTO modkit_outbox_incoming (partition_id, body_id) SELECT ?, id FROM b RETURNING body_id) \
   SELECT body_id AS id, pg_notify('modkit_outbox', 'i') AS n FROM i";

/// Notifies every instance that incoming rows were committed (sent on commit).
pub(crate) const NOTIFY_INCOMING: &str = "SELECT pg_notify('modkit_outbox', 'i')";

/// Notifies processors of the given partition ids (sent on commit).
pub(crate) async fn notify_sequenced<C: ConnectionTrait>(
    c: &C,
    partition_ids: &[i64],
    instance: &str,
) -> Result<(), sea_orm::DbErr> {
    if partition_ids.is_empty() {
        return Ok(());
    }
    let payload = partition_ids
        .iter()
        .map(|p| format!("{SEQUENCED_PREFIX}{p}:{instance}"))
        .collect::<Vec<_>>();
    let sql = format!(
        "SELECT pg_notify('{CHANNEL}', x) FROM (VALUES {}) AS v(x)",
        super::placeholders(payload.len())
            .split(", ")
            .map(|p| format!("({p})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    super::query_all(
        c,
        Dialect::Postgres,
        &sql,
        payload.into_iter().map(Value::from).collect(),
    )
    .await
    .map(|_| ())
}

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
                    if payload == INCOMING {
                        signals.incoming_committed();
                    } else if let Some((id, from)) = payload
                        .strip_prefix(SEQUENCED_PREFIX)
                        .and_then(|s| s.split_once(':'))
                        && from != instance
                        && let Ok(id) = id.parse::<i64>()
                    {
                        signals.wake_processor(id);
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
