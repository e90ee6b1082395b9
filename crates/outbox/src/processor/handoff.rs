//! Sequencer → processor hand-off (leased queues): the rows a trickle pass of this instance
//! just committed, payloads included, are handed to the partition's local processor, which
//! then delivers them without reading them back.
//!
//! At one message per producer transaction the processor's read is a round trip on the
//! latency path of every message (and one of the handful of statements a pass costs). The
//! sequencer already reads each incoming row (MySQL, SQLite) or moves it in one statement
//! (PostgreSQL, which then also returns the moved rows); joining the body there costs a
//! primary-key lookup, not a round trip.
//!
//! A hand-off is only a shortcut, never the source of truth. A processor takes it only while
//! it knows its cursor exactly (its last ack was clean, so `attempts` and `retry_at` are reset)
//! and holds its lease with at least half a TTL left; the rows must start right after that
//! cursor. Anything else (a gap, a stale hand-off, no lease, a retry pending) falls back to the
//! normal read. The ack that follows is guarded like every leased ack (`processed_seq` and
//! `locked_by`), so a wrong belief costs at most a redelivery, as any lost lease does.
//! Memory is bounded: at most one batch of rows per partition waits, and only partitions whose
//! processor said it can take one are offered any.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sea_orm::QueryResult;

use crate::backend::get_time;
use crate::message::{Message, decode_headers};

/// One sequenced row with its body, as the sequencer read it.
pub(crate) struct HandedRow {
    pub(crate) seq: i64,
    pub(crate) body_id: i64,
    pub(crate) payload: Bytes,
    pub(crate) payload_type: String,
    pub(crate) headers: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
}

impl HandedRow {
    /// The row at `seq` from a sequencer read that joined the body (`payload`, `payload_type`,
    /// `headers`, `created_at`); `None` without a body (never expected: the processor then
    /// reads and reports it as usual).
    pub(crate) fn from_row(
        r: &QueryResult,
        seq: i64,
        body_id: i64,
    ) -> Result<Option<Self>, sea_orm::DbErr> {
        let Some(payload) = r.try_get::<Option<Vec<u8>>>("", "payload")? else {
            return Ok(None);
        };
        Ok(Some(Self {
            seq,
            body_id,
            payload: payload.into(),
            payload_type: r.try_get("", "payload_type")?,
            headers: r.try_get("", "headers")?,
            created_at: get_time(r, "created_at")?,
        }))
    }

    /// The message as a processor delivers it (first attempt: the cursor was clean).
    pub(crate) fn into_message(self, queue: Arc<str>, partition: u32) -> Message {
        Message {
            id: self.body_id,
            queue,
            partition,
            seq: self.seq,
            payload: self.payload,
            payload_type: self.payload_type,
            headers: decode_headers(self.headers),
            attempts: 1,
            created_at: self.created_at,
        }
    }
}

/// What waits for one partition's processor: consecutive rows and the partition's sequence
/// when they were committed (rows beyond those handed are read as usual).
pub(crate) struct Handoff {
    pub(crate) high: i64,
    pub(crate) rows: Vec<HandedRow>,
}

#[derive(Default)]
struct Slot {
    /// The processor can take a hand-off now (clean cursor, lease held).
    open: bool,
    /// Rows kept at most (the queue's batch size).
    cap: usize,
    waiting: Option<Handoff>,
}

/// The hand-off slots of one engine instance, one per local leased partition.
#[derive(Default)]
pub(crate) struct Handoffs {
    slots: DashMap<i64, Slot>,
    /// Batches delivered from a hand-off (read by tests).
    delivered: AtomicU64,
}

impl Handoffs {
    /// Registers a local leased processor (closed until its first clean ack).
    pub(crate) fn register(&self, partition_id: i64, cap: usize) {
        self.slots.insert(
            partition_id,
            Slot {
                cap: cap.max(1),
                ..Slot::default()
            },
        );
    }

    /// Whether the partition's processor takes hand-offs now (the sequencer reads bodies only
    /// when one of its partitions does).
    pub(crate) fn is_open(&self, partition_id: i64) -> bool {
        self.slots.get(&partition_id).is_some_and(|s| s.open)
    }

    /// Whether any local processor takes hand-offs now.
    pub(crate) fn any_open(&self) -> bool {
        self.slots.iter().any(|s| s.open)
    }

    /// The partitions whose processor takes hand-offs now.
    pub(crate) fn open_partitions(&self) -> Vec<i64> {
        self.slots
            .iter()
            .filter(|s| s.open)
            .map(|s| *s.key())
            .collect()
    }

    /// Opens or closes a partition's slot; closing drops what waits.
    pub(crate) fn set_open(&self, partition_id: i64, open: bool) {
        if let Some(mut s) = self.slots.get_mut(&partition_id) {
            s.open = open;
            if !open {
                s.waiting = None;
            }
        }
    }

    /// Offers rows just committed, in seq order, and the partition's new sequence. Only the
    /// consecutive run from the first row is kept (a row missing from a pass ends it). Rows
    /// that continue what already waits are appended up to the cap; otherwise what waits is
    /// kept and only the sequence raised (the processor reads the rest).
    pub(crate) fn offer(&self, partition_id: i64, high: i64, mut rows: Vec<HandedRow>) {
        let Some(mut s) = self.slots.get_mut(&partition_id) else {
            return;
        };
        if !s.open {
            return;
        }
        let run = rows
            .iter()
            .zip(rows.first().map_or(0, |r| r.seq)..)
            .take_while(|(r, seq)| r.seq == *seq)
            .count();
        rows.truncate(run);
        let cap = s.cap;
        match &mut s.waiting {
            Some(w) => {
                let continues = w.rows.last().map(|r| r.seq + 1) == rows.first().map(|r| r.seq);
                if continues && w.rows.len() + rows.len() <= cap {
                    w.rows.append(&mut rows);
                }
                w.high = w.high.max(high);
            }
            None => {
                rows.truncate(cap);
                s.waiting = Some(Handoff { high, rows });
            }
        }
    }

    /// Takes what waits for a partition.
    pub(crate) fn take(&self, partition_id: i64) -> Option<Handoff> {
        self.slots.get_mut(&partition_id)?.waiting.take()
    }

    /// Counts a batch delivered from a hand-off.
    pub(crate) fn delivered_one(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Batches delivered from hand-offs so far.
    #[cfg(test)]
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(seqs: std::ops::RangeInclusive<i64>) -> Vec<HandedRow> {
        seqs.map(|seq| HandedRow {
            seq,
            body_id: seq * 10,
            payload: Bytes::from_static(b"x"),
            payload_type: "t".into(),
            headers: None,
            created_at: Utc::now(),
        })
        .collect()
    }

    fn seqs(h: &Handoff) -> Vec<i64> {
        h.rows.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn only_open_slots_receive_and_closing_drops() {
        let h = Handoffs::default();
        h.offer(1, 3, rows(1..=3));
        assert!(h.take(1).is_none(), "unregistered partition");
        h.register(1, 10);
        h.offer(1, 3, rows(1..=3));
        assert!(h.take(1).is_none(), "closed slot");
        h.set_open(1, true);
        assert!(h.is_open(1));
        h.offer(1, 3, rows(1..=3));
        h.set_open(1, false);
        assert!(h.take(1).is_none(), "closing drops what waits");
    }

    #[test]
    fn consecutive_offers_append_up_to_the_cap() {
        let h = Handoffs::default();
        h.register(7, 4);
        h.set_open(7, true);
        h.offer(7, 2, rows(1..=2));
        h.offer(7, 4, rows(3..=4));
        h.offer(7, 6, rows(5..=6)); // would exceed the cap: only the sequence rises
        let w = h.take(7).expect("waiting");
        assert_eq!(seqs(&w), vec![1, 2, 3, 4]);
        assert_eq!(w.high, 6);
        assert!(h.take(7).is_none(), "taken once");

        h.offer(7, 12, rows(8..=12)); // more than the cap at once
        let w = h.take(7).expect("waiting");
        assert_eq!(seqs(&w), vec![8, 9, 10, 11]);
        assert_eq!(w.high, 12);
    }

    /// Counts deliveries and acks them.
    struct Count(Arc<AtomicU64>);

    #[async_trait::async_trait]
    impl crate::LeasedHandler for Count {
        async fn handle(&self, _msg: &crate::Message) -> crate::HandlerResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(crate::Outcome::Ack)
        }
    }

    /// The path is taken for real on every backend: after the first ack, messages enqueued one
    /// at a time come from hand-offs, not from reads (the cross-backend suite checks what
    /// arrives).
    async fn a_trickle_is_delivered_from_hand_offs(db: modkit_outbox_tests::TestDb) {
        use sea_orm_migration::MigratorTrait;
        modkit_outbox_migration::Migrator::up(&db.conn, None)
            .await
            .expect("migrate");
        let seen = Arc::new(AtomicU64::new(0));
        let handle = crate::Outbox::builder(db.conn.clone())
            .queue("h", crate::Partitions::of(1))
            .leased(Count(seen.clone()))
            .start()
            .await
            .expect("start");
        let outbox = handle.outbox();
        for i in 0..10u64 {
            outbox
                .enqueue(&db.conn, "h", 0, format!("m{i}"), "t")
                .await
                .expect("enqueue");
            let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen.load(Ordering::SeqCst) <= i {
                assert!(
                    tokio::time::Instant::now() < end,
                    "{:?}: message {i} not delivered",
                    db.backend
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let handed = outbox.inner.handoffs.delivered();
        assert!(
            handed >= 5,
            "{:?}: only {handed} of 9 possible batches were handed over",
            db.backend
        );
        assert_eq!(seen.load(Ordering::SeqCst), 10);
        handle.stop().await;
    }

    modkit_outbox_tests::backend_tests!(a_trickle_is_delivered_from_hand_offs);

    #[test]
    fn a_gap_keeps_the_older_rows() {
        let h = Handoffs::default();
        h.register(3, 100);
        h.set_open(3, true);
        h.offer(3, 2, rows(1..=2));
        h.offer(3, 9, rows(5..=9));
        let w = h.take(3).expect("waiting");
        assert_eq!(seqs(&w), vec![1, 2]);
        assert_eq!(w.high, 9);
    }
}
