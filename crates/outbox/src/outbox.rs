//! The public entry points: [`Outbox`] (enqueue), [`OutboxBuilder`] (queues and handlers) and
//! [`OutboxHandle`] (the running engine).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sea_orm::{DatabaseConnection, TransactionSession};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Db, Dialect};
use crate::config::{OutboxConfig, RetryPolicy, validate_retry};
use crate::enqueue::{self, EnqueueConn, Resolved};
use crate::error::{OutboxError, Result};
use crate::handler::{
    LeasedBatchHandler, LeasedHandler, LeasedPerMessage, QueueHandler, TransactionalBatchHandler,
    TransactionalHandler,
};
use crate::message::{
    MessageId, NewMessage, Partitions, partition_for_key, validate_headers, validate_payload_type,
    validate_queue_name,
};
use crate::processor::transactional::TxnHandler;
use crate::queues::{QueueInfo, QueueSpec};
use crate::signals::Signals;

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) config: OutboxConfig,
    pub(crate) instance_id: String,
    pub(crate) queues: HashMap<String, Arc<QueueInfo>>,
    pub(crate) signals: Arc<Signals>,
    /// The ids of the partitions this instance processes, as an SQL list (`1, 2, 3`; empty
    /// when it processes none): a PostgreSQL sequencer pass tells the other instances whether
    /// a free lease will be taken here.
    pub(crate) processed_here: String,
    /// Rows the sequencer hands straight to local leased processors.
    pub(crate) handoffs: crate::processor::handoff::Handoffs,
    /// Where the sequencer's next probe window starts (partition id) when more partitions
    /// have rows than one pass takes (see `sequencer::probe_window`).
    pub(crate) sequencer_from: std::sync::atomic::AtomicI64,
}

/// The outbox: enqueue messages inside your transactions. Cheap to clone, `Send + Sync`.
///
/// Get one from [`OutboxBuilder::build`] (producer only) or [`OutboxHandle::outbox`].
#[derive(Clone)]
pub struct Outbox {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("instance_id", &self.inner.instance_id)
            .field("queues", &self.inner.queues.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Outbox {
    /// Starts describing an outbox on `db` (PostgreSQL, MySQL/MariaDB or SQLite).
    pub fn builder(db: DatabaseConnection) -> OutboxBuilder {
        OutboxBuilder {
            db,
            config: OutboxConfig::default(),
            queues: Vec::new(),
        }
    }

    /// The dead-letter API on this outbox's database.
    pub fn dead_letters(&self) -> crate::dead_letters::DeadLetters {
        crate::dead_letters::DeadLetters::from_db(self.inner.db.clone())
    }

    /// Statistics of every partition and the dead letters (see [`crate::collect_stats`]).
    pub async fn stats(&self) -> Result<crate::stats::OutboxStats> {
        crate::stats::collect_stats(&self.inner.db.conn).await
    }

    /// This instance's lease owner name.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Partition count of a registered queue.
    pub fn partitions(&self, queue: &str) -> Option<Partitions> {
        self.inner
            .queues
            .get(queue)
            .map(|q| Partitions::of(q.partitions))
    }

    /// Enqueues one message into `queue`/`partition` inside `txn`.
    ///
    /// Returns the message id. Nothing is written when the input is invalid (unknown queue,
    /// partition out of range, payload too large, malformed payload type).
    pub async fn enqueue<C: EnqueueConn>(
        &self,
        txn: &C,
        queue: &str,
        partition: u32,
        payload: impl Into<Bytes>,
        payload_type: &str,
    ) -> Result<MessageId> {
        let msg = NewMessage::new(queue, partition, payload, payload_type);
        self.enqueue_message(txn, msg).await
    }

    /// Enqueues one message whose partition is derived from `key` (see
    /// [`partition_for_key`]): the same key always lands in the same partition.
    pub async fn enqueue_keyed<C: EnqueueConn>(
        &self,
        txn: &C,
        queue: &str,
        key: impl AsRef<[u8]>,
        payload: impl Into<Bytes>,
        payload_type: &str,
    ) -> Result<MessageId> {
        let partitions = self
            .partitions(queue)
            .ok_or_else(|| OutboxError::UnknownQueue(queue.to_owned()))?;
        let msg = NewMessage::new(
            queue,
            partition_for_key(key, partitions),
            payload,
            payload_type,
        );
        self.enqueue_message(txn, msg).await
    }

    /// Enqueues one fully described message (headers included).
    pub async fn enqueue_message<C: EnqueueConn>(
        &self,
        txn: &C,
        msg: NewMessage,
    ) -> Result<MessageId> {
        let ids = self.enqueue_batch(txn, std::slice::from_ref(&msg)).await?;
        Ok(ids[0])
    }

    /// Enqueues many messages in one call (few round trips). Returns their ids in input order.
    /// Messages of one partition are delivered in input order. All-or-nothing: one invalid
    /// message rejects the whole batch before anything is written.
    pub async fn enqueue_batch<C: EnqueueConn>(
        &self,
        txn: &C,
        msgs: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let resolved = msgs
            .iter()
            .map(|m| self.resolve(m))
            .collect::<Result<Vec<_>>>()?;
        let d = self.inner.db.dialect;
        let span = tracing::debug_span!("outbox.enqueue", messages = msgs.len());
        async {
            let ids = if txn.in_transaction() {
                // Not committed yet. A sequencer in this process is woken now and re-checks for
                // a short while until the rows become visible. Without one, PostgreSQL notifies
                // every instance on commit; elsewhere the fallback poll finds the rows.
                let local = self.inner.signals.has_local_sequencer();
                let ids = enqueue::insert(txn, d, &resolved, !local).await?;
                self.inner.signals.enqueued();
                ids
            } else {
                let own = txn.begin().await?;
                // Committed here, so the local wake-up is exact; NOTIFY only reaches others.
                let local = self.inner.signals.has_local_sequencer();
                let ids = enqueue::insert(&own, d, &resolved, !local).await?;
                own.commit().await?;
                self.inner.signals.incoming_committed();
                ids
            };
            Ok(ids)
        }
        .instrument(span)
        .await
    }

    fn resolve<'a>(&self, m: &'a NewMessage) -> Result<Resolved<'a>> {
        let q = self
            .inner
            .queues
            .get(&m.queue)
            .ok_or_else(|| OutboxError::UnknownQueue(m.queue.clone()))?;
        if m.partition >= q.partitions {
            return Err(OutboxError::PartitionOutOfRange {
                queue: m.queue.clone(),
                partition: m.partition,
                partitions: q.partitions,
            });
        }
        if m.payload.len() > self.inner.config.max_payload_bytes {
            return Err(OutboxError::PayloadTooLarge {
                size: m.payload.len(),
                limit: self.inner.config.max_payload_bytes,
            });
        }
        validate_payload_type(&m.payload_type)?;
        let headers = validate_headers(&m.headers)?;
        Ok(Resolved {
            msg: m,
            partition_id: q.partition_ids[m.partition as usize],
            headers,
        })
    }
}

/// Describes an outbox: configuration and queues. Finish with [`OutboxBuilder::start`] (run the
/// pipeline) or [`OutboxBuilder::build`] (producer only).
pub struct OutboxBuilder {
    db: DatabaseConnection,
    config: OutboxConfig,
    queues: Vec<QueueSpec>,
}

impl std::fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("config", &self.config)
            .field(
                "queues",
                &self.queues.iter().map(|q| &q.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Describes one queue; finish it with a handler ([`QueueBuilder::leased`],
/// [`QueueBuilder::transactional`], their batch forms) or [`QueueBuilder::producer_only`].
pub struct QueueBuilder {
    parent: OutboxBuilder,
    spec: QueueSpec,
}

impl std::fmt::Debug for QueueBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl OutboxBuilder {
    /// Replaces the engine configuration.
    pub fn config(mut self, config: OutboxConfig) -> Self {
        self.config = config;
        self
    }

    /// Declares a queue with its partition count.
    pub fn queue(self, name: impl Into<String>, partitions: Partitions) -> QueueBuilder {
        QueueBuilder {
            parent: self,
            spec: QueueSpec {
                name: name.into(),
                partitions,
                handler: None,
                retry: None,
                batch_size: None,
            },
        }
    }

    async fn prepare(self) -> Result<Outbox> {
        self.config.validate()?;
        let dialect = Dialect::of(&self.db)?;
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            validate_queue_name(&q.name)?;
            q.partitions.validate()?;
            if !seen.insert(q.name.clone()) {
                return Err(OutboxError::DuplicateQueue(q.name.clone()));
            }
            if let Some(r) = &q.retry {
                validate_retry(r)?;
            }
            if let Some(b) = q.batch_size
                && (b == 0 || b > 10_000)
            {
                return Err(OutboxError::InvalidConfig(format!(
                    "queue `{}`: batch_size must be 1..=10000",
                    q.name
                )));
            }
        }
        if dialect == Dialect::Sqlite {
            crate::backend::sqlite::prepare(&self.db).await?;
        }
        let db = Db::new(self.db, dialect);
        crate::schema::check(&db).await?;
        let queues =
            crate::queues::register(&db, self.queues, self.config.retry, self.config.batch_size)
                .await?;
        let instance_id = self.config.instance_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )
        });
        let processed_here = crate::queues::processed_partition_ids(&queues)
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Outbox {
            inner: Arc::new(Inner {
                db,
                config: self.config,
                instance_id,
                queues,
                signals: Arc::new(Signals::default()),
                processed_here,
                handoffs: Default::default(),
                sequencer_from: Default::default(),
            }),
        })
    }

    /// Registers the queues and returns a producer-only outbox: `enqueue` works, no worker
    /// runs (another process, e.g. a worker tier, runs the pipeline).
    pub async fn build(self) -> Result<Outbox> {
        self.prepare().await
    }

    /// Registers the queues and starts the pipeline: sequencer, one processor per partition of
    /// every queue with a handler, vacuum and the fallback poll (plus `LISTEN` on PostgreSQL).
    pub async fn start(self) -> Result<OutboxHandle> {
        let outbox = self.prepare().await?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        crate::workers::spawn_all(&outbox, &cancel, &mut tasks);
        tracing::info!(
            instance = %outbox.inner.instance_id,
            queues = outbox.inner.queues.len(),
            "outbox started"
        );
        Ok(OutboxHandle {
            outbox,
            cancel,
            tasks,
        })
    }
}

impl QueueBuilder {
    /// Retry policy of this queue (default: [`OutboxConfig::retry`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.retry = Some(policy);
        self
    }

    /// Messages per handler batch for this queue (default: [`OutboxConfig::batch_size`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.spec.batch_size = Some(n);
        self
    }

    fn finish(mut self, handler: Option<QueueHandler>) -> OutboxBuilder {
        self.spec.handler = handler;
        self.parent.queues.push(self.spec);
        self.parent
    }

    /// Leased (at-least-once) processing with a per-message handler.
    pub fn leased(self, handler: impl LeasedHandler) -> OutboxBuilder {
        self.finish(Some(QueueHandler::Leased(Arc::new(LeasedPerMessage(
            handler,
        )))))
    }

    /// Leased processing with a batch handler.
    pub fn leased_batch(self, handler: impl LeasedBatchHandler) -> OutboxBuilder {
        self.finish(Some(QueueHandler::Leased(Arc::new(handler))))
    }

    /// Transactional (exactly-once database side effects) processing, per message.
    pub fn transactional(self, handler: impl TransactionalHandler) -> OutboxBuilder {
        self.finish(Some(QueueHandler::Transactional(TxnHandler::PerMessage(
            Arc::new(handler),
        ))))
    }

    /// Transactional processing with a batch handler.
    pub fn transactional_batch(self, handler: impl TransactionalBatchHandler) -> OutboxBuilder {
        self.finish(Some(QueueHandler::Transactional(TxnHandler::Batch(
            Arc::new(handler),
        ))))
    }

    /// No handler in this process: messages are only enqueued here.
    pub fn producer_only(self) -> OutboxBuilder {
        self.finish(None)
    }
}

/// The running engine. [`OutboxHandle::stop`] shuts it down gracefully; dropping the handle
/// stops every task at once (leases then expire after their TTL).
pub struct OutboxHandle {
    outbox: Outbox,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for OutboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxHandle")
            .field("outbox", &self.outbox)
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl OutboxHandle {
    /// The outbox, for enqueueing. Cheap to clone.
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Stops the engine: in-flight batches finish (within
    /// [`OutboxConfig::shutdown_timeout`]; tasks still running after it are aborted), then every
    /// lease this instance holds is released in one statement, so another instance takes over
    /// at once.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let deadline = self.outbox.inner.config.shutdown_timeout;
        let drain = async {
            while let Some(r) = self.tasks.join_next().await {
                if let Err(e) = r
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "outbox task panicked");
                }
            }
        };
        if tokio::time::timeout(deadline, drain).await.is_err() {
            tracing::warn!(
                ?deadline,
                "outbox tasks did not stop in time; aborting them"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        // No processor runs any more (ended or aborted): hand every lease over at once.
        let inner = &self.outbox.inner;
        let leased = crate::queues::processed_partition_ids(&inner.queues);
        if !leased.is_empty()
            && let Err(e) =
                crate::processor::lease::release_all(&inner.db, &leased, &inner.instance_id).await
        {
            tracing::warn!(error = %e, "could not release leases on shutdown; they lapse instead");
        }
        tracing::info!(instance = %inner.instance_id, "outbox stopped");
    }

    /// Aborts every task at once, like a crash (no lease release). For tests and emergencies.
    pub fn abort(mut self) {
        self.cancel.cancel();
        self.tasks.abort_all();
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tasks.abort_all();
    }
}
