//! Handler traits: per-message and batch, for leased (at-least-once) and transactional
//! (exactly-once database side effects) processing.

use std::sync::Arc;

use async_trait::async_trait;
use sea_orm::DatabaseTransaction;

use crate::message::Message;

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: the partition cursor moves past the message.
    Ack,
    /// Try again later with backoff; after the queue's `max_attempts` the message is
    /// dead-lettered. The partition waits (head-of-line) meanwhile.
    Retry(String),
    /// Give up now: the message goes to the dead letters and the partition moves on.
    Reject(String),
}

/// Error type a handler may return; treated like [`Outcome::Retry`] with its text.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler returns per message.
pub type HandlerResult = Result<Outcome, HandlerError>;

/// Per-message handler for leased (at-least-once) processing. Runs outside any database
/// transaction while the instance holds the partition's lease; a message can be delivered again
/// after a crash, so make the effect idempotent (e.g. keyed by [`Message::id`]).
#[async_trait]
pub trait LeasedHandler: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, msg: &Message) -> HandlerResult;
}

/// Batch handler for leased processing: receives up to `batch_size` consecutive messages of one
/// partition and returns one result per message, in order. Results are applied in order: `Ack`
/// and `Reject` move on, the first `Retry`/error stops there and the rest of the batch is
/// delivered again later. A shorter result list leaves the unanswered messages for later
/// without counting an attempt.
#[async_trait]
pub trait LeasedBatchHandler: Send + Sync + 'static {
    /// Handles consecutive messages of one partition.
    async fn handle_batch(&self, msgs: &[Message]) -> Vec<HandlerResult>;
}

/// Per-message handler for transactional processing: `txn` is the transaction that also advances
/// the partition cursor, so the handler's writes commit exactly when the message is acknowledged;
/// on `Retry`, `Reject`, an error or a panic they are rolled back.
///
/// The messages of a batch first run one after another in that transaction, with no savepoint.
/// If one of them does not ack, the transaction is rolled back and the batch replayed in a new
/// one, each message in its own savepoint: the failed message is not called again (its result
/// stands), but the acked messages before it are, since their first writes were rolled back.
/// So a handler may see a message more than once; its writes commit exactly once.
#[async_trait]
pub trait TransactionalHandler: Send + Sync + 'static {
    /// Handles one message inside `txn`.
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Message) -> HandlerResult;
}

/// Batch handler for transactional processing. The batch runs in the transaction that moves the
/// cursor; if every result is `Ack` its writes commit with the cursor. Otherwise that
/// transaction is rolled back and the batch is replayed in a new one, one message at a time
/// (each in its own savepoint), so acknowledged messages keep their writes exactly once and
/// retried or rejected ones leave none.
#[async_trait]
pub trait TransactionalBatchHandler: Send + Sync + 'static {
    /// Handles consecutive messages of one partition inside `txn`.
    async fn handle_batch(&self, txn: &DatabaseTransaction, msgs: &[Message])
    -> Vec<HandlerResult>;
}

#[async_trait]
impl<F, Fut> LeasedHandler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, msg: &Message) -> HandlerResult {
        (self)(msg.clone()).await
    }
}

/// The handler a queue runs, in the engine's internal (batch) shape.
#[derive(Clone)]
pub(crate) enum QueueHandler {
    Leased(Arc<dyn LeasedBatchHandler>),
    Transactional(crate::processor::transactional::TxnHandler),
}

/// Adapts a per-message leased handler to the batch shape.
pub(crate) struct LeasedPerMessage<H>(pub H);

#[async_trait]
impl<H: LeasedHandler> LeasedBatchHandler for LeasedPerMessage<H> {
    async fn handle_batch(&self, msgs: &[Message]) -> Vec<HandlerResult> {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let r = crate::processor::catch_panic(self.0.handle(m)).await;
            let stop = !matches!(r, Ok(Outcome::Ack) | Ok(Outcome::Reject(_)));
            out.push(r);
            if stop {
                break;
            }
        }
        out
    }
}

/// A savepoint statement failed: the surrounding transaction is unusable (e.g. MySQL rolled it
/// back on a deadlock), so the whole step must be abandoned, never committed.
#[derive(Debug, thiserror::Error)]
#[error("savepoint failed, transaction abandoned: {0}")]
pub(crate) struct TxnBroken(pub(crate) sea_orm::DbErr);
