//! In-process wake-ups between the stages. A `Notify` keeps one permit when nobody waits, so a
//! signal sent while a stage is busy is never lost: the stage runs again when it gets back.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;

/// How long after an enqueue the sequencer keeps re-checking when it finds nothing: the enqueue
/// signal is sent before the producer commits, so the rows may become visible a little later.
/// Later commits are caught by the sequencer's own look (at least every `poll_interval`).
pub(crate) const PENDING_COMMIT_WINDOW: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(crate) struct Signals {
    sequencer: Notify,
    reconcile: Notify,
    vacuum: Notify,
    processors: DashMap<i64, Arc<Notify>>,
    last_enqueue: Mutex<Option<Instant>>,
    /// Sequencer tasks running in this process on this outbox (see [`SequencerAlive`]).
    local_sequencers: AtomicUsize,
}

/// Held by a running sequencer task: while one exists, producers in this process wake it
/// directly instead of asking the database to notify every instance on commit.
pub(crate) struct SequencerAlive(Arc<Signals>);

impl SequencerAlive {
    pub(crate) fn new(signals: Arc<Signals>) -> Self {
        signals.local_sequencers.fetch_add(1, Ordering::SeqCst);
        Self(signals)
    }
}

impl Drop for SequencerAlive {
    fn drop(&mut self) {
        self.0.local_sequencers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Signals {
    /// A producer enqueued (its transaction may not have committed yet).
    pub(crate) fn enqueued(&self) {
        if let Ok(mut g) = self.last_enqueue.lock() {
            *g = Some(Instant::now());
        }
        self.sequencer.notify_one();
    }

    /// Whether a sequencer runs in this process (it then hears of this process's enqueues
    /// directly).
    pub(crate) fn has_local_sequencer(&self) -> bool {
        self.local_sequencers.load(Ordering::SeqCst) > 0
    }

    /// Incoming rows were committed (known after commit or from `NOTIFY`).
    pub(crate) fn incoming_committed(&self) {
        self.sequencer.notify_one();
    }

    /// When the last in-process enqueue signal was sent.
    pub(crate) fn last_enqueue(&self) -> Option<Instant> {
        self.last_enqueue.lock().ok().and_then(|g| *g)
    }

    pub(crate) async fn sequencer_wait(&self) {
        self.sequencer.notified().await
    }

    pub(crate) fn processor(&self, partition_id: i64) -> Arc<Notify> {
        self.processors.entry(partition_id).or_default().clone()
    }

    pub(crate) fn wake_processor(&self, partition_id: i64) {
        if let Some(n) = self.processors.get(&partition_id) {
            n.notify_one();
        }
    }

    pub(crate) fn wake_vacuum(&self) {
        self.vacuum.notify_one();
    }

    pub(crate) async fn vacuum_wait(&self) {
        self.vacuum.notified().await
    }

    /// Asks for an immediate reconcile (after a `LISTEN` reconnect, say).
    pub(crate) fn reconcile_now(&self) {
        self.reconcile.notify_one();
    }

    pub(crate) async fn reconcile_wait(&self) {
        self.reconcile.notified().await
    }
}
