//! The correctness checks every engine run ends with. A run that breaks one is reported as a
//! `CORRECTNESS VIOLATION` and the harness exits with status 2, whatever its figures.
//!
//! Checked, from the handler's own record of what it saw:
//! * per queue and partition, the seqs arrive as 1, 2, 3 … (no gap, none twice);
//! * every enqueued message arrives (at least once; exactly once in transactional mode), and
//!   nothing else does (an id no producer committed);
//! * each message arrives on the queue and partition its producer addressed;
//! * one producer's messages to one partition arrive in the order it enqueued them.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// One delivery as the handler saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    /// Queue index (`bench<q>`) the handler saw the message on.
    pub queue: u32,
    pub partition: u32,
    pub seq: i64,
    /// Producer index and the producer's message number, parsed from the payload.
    pub producer: u32,
    pub k: u32,
    pub at: Instant,
}

/// What a clean run measured on the way.
#[derive(Debug)]
pub struct Verified {
    /// Commit → first delivery, per message whose commit instant is known, in ms.
    pub latencies_ms: Vec<f64>,
    /// Deliveries of a message seen before (leased mode may redeliver).
    pub duplicates: usize,
}

/// At most this many problems are listed (the count of missing messages is always added).
const MAX_LISTED: usize = 10;

/// Where the harness's producers send their messages: message `k` of producer `p` goes to
/// queue `(p + k) % queues`, partition `(p + k) % partitions`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub queues: u32,
    pub partitions: u32,
}

impl Layout {
    /// The run's queues and partitions per queue.
    pub fn of_args(args: &crate::Args) -> Self {
        Self {
            queues: args.queues,
            partitions: args.partitions,
        }
    }

    /// Queue index and partition of message `k` of producer `producer`: the producers send
    /// there, the checks expect it there.
    pub fn of(&self, producer: u32, k: u32) -> (u32, u32) {
        let n = producer.wrapping_add(k);
        (n % self.queues.max(1), n % self.partitions.max(1))
    }
}

/// Checks `deliveries` (in the order they happened) against `total` messages the producers
/// committed (`commits`: id → commit instant) as `layout` spreads them. `exactly_once`: a
/// repeated delivery is a violation too.
pub fn verify(
    mut deliveries: Vec<Delivery>,
    commits: &HashMap<i64, Instant>,
    total: usize,
    layout: Layout,
    exactly_once: bool,
) -> Result<Verified, String> {
    // Stable: a batch's messages share an instant and keep their order.
    deliveries.sort_by_key(|d| d.at);
    let mut seen: HashSet<i64> = HashSet::with_capacity(total);
    let mut latencies_ms = Vec::with_capacity(total);
    let mut duplicates = 0;
    let mut next_seq: HashMap<(u32, u32), i64> = HashMap::new();
    let mut last_k: HashMap<(u32, u32, u32), u32> = HashMap::new();
    let mut problems = Vec::new();
    for d in &deliveries {
        if !seen.insert(d.id) {
            duplicates += 1;
            continue;
        }
        match commits.get(&d.id) {
            Some(c) => latencies_ms.push(d.at.saturating_duration_since(*c).as_secs_f64() * 1000.0),
            None if problems.len() < MAX_LISTED => {
                problems.push(format!("message {} delivered but never committed", d.id));
            }
            None => {}
        }
        let (queue, partition) = layout.of(d.producer, d.k);
        if (d.queue, d.partition) != (queue, partition) && problems.len() < MAX_LISTED {
            problems.push(format!(
                "producer {} message {}: delivered on queue {} partition {}, sent to {queue} / {partition}",
                d.producer, d.k, d.queue, d.partition
            ));
        }
        let expect = next_seq.entry((queue, d.partition)).or_insert(1);
        if d.seq != *expect && problems.len() < MAX_LISTED {
            problems.push(format!(
                "queue {queue} partition {}: seq {} where {} was due",
                d.partition, d.seq, expect
            ));
        }
        *expect = d.seq + 1;
        if let Some(prev) = last_k.insert((d.producer, queue, d.partition), d.k)
            && prev >= d.k
            && problems.len() < MAX_LISTED
        {
            problems.push(format!(
                "producer {} partition {}: message {} after {prev}",
                d.producer, d.partition, d.k
            ));
        }
    }
    if seen.len() != total {
        problems.push(format!(
            "{} distinct messages delivered, {total} enqueued",
            seen.len()
        ));
    }
    if duplicates > 0 && exactly_once {
        problems.push(format!(
            "{duplicates} duplicate deliveries in transactional mode"
        ));
    }
    if problems.is_empty() {
        Ok(Verified {
            latencies_ms,
            duplicates,
        })
    } else {
        Err(format!("CORRECTNESS VIOLATION: {}", problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LAYOUT: Layout = Layout {
        queues: 1,
        partitions: 3,
    };

    /// A clean run: 2 producers × 6 messages, 1 queue, 3 partitions; message `k` of producer
    /// `p` goes to partition `(p + k) % 3`, seqs numbered per partition in delivery order.
    fn clean() -> (Vec<Delivery>, HashMap<i64, Instant>) {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut commits = HashMap::new();
        let mut seq = [0i64; 3];
        for k in 0..6u32 {
            for p in 0..2u32 {
                let partition = (p + k) % 3;
                seq[partition as usize] += 1;
                let id = i64::from(p * 100 + k);
                commits.insert(id, t0);
                out.push(Delivery {
                    id,
                    queue: 0,
                    partition,
                    seq: seq[partition as usize],
                    producer: p,
                    k,
                    at: t0 + Duration::from_millis(u64::from(k * 2 + p) + 1),
                });
            }
        }
        (out, commits)
    }

    #[test]
    fn a_clean_run_passes_with_a_latency_per_message() {
        let (d, c) = clean();
        let v = verify(d, &c, 12, LAYOUT, true).expect("clean");
        assert_eq!(v.duplicates, 0);
        assert_eq!(v.latencies_ms.len(), 12);
        assert!(v.latencies_ms.iter().all(|l| *l >= 1.0));
    }

    #[test]
    fn a_seq_gap_is_a_violation() {
        let (mut d, c) = clean();
        // Partition 0's second message claims seq 3.
        let i = d
            .iter()
            .position(|x| x.partition == 0 && x.seq == 2)
            .expect("row");
        d[i].seq = 3;
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("gap");
        assert!(e.starts_with("CORRECTNESS VIOLATION"), "{e}");
        assert!(e.contains("partition 0: seq 3 where 2 was due"), "{e}");
    }

    #[test]
    fn a_missing_message_is_a_violation() {
        let (mut d, c) = clean();
        d.pop();
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("missing");
        assert!(
            e.contains("11 distinct messages delivered, 12 enqueued"),
            "{e}"
        );
    }

    #[test]
    fn a_redelivery_is_counted_and_fails_only_exactly_once() {
        let (mut d, c) = clean();
        let mut again = d[3].clone();
        again.at += Duration::from_secs(1);
        d.push(again);
        let v = verify(d.clone(), &c, 12, LAYOUT, false).expect("leased: at least once");
        assert_eq!(v.duplicates, 1);
        let e = verify(d, &c, 12, LAYOUT, true).expect_err("transactional");
        assert!(e.contains("1 duplicate deliveries"), "{e}");
    }

    #[test]
    fn a_producer_out_of_order_is_a_violation() {
        let (mut d, c) = clean();
        // Producer 0's messages 0 and 3 both go to partition 0 (seqs 1 and 3): swap what they
        // carry, so the partition's seqs stay gapless but the producer's order is reversed.
        let a = d
            .iter()
            .position(|x| x.producer == 0 && x.k == 0)
            .expect("k0");
        let b = d
            .iter()
            .position(|x| x.producer == 0 && x.k == 3)
            .expect("k3");
        let (ka, ida) = (d[a].k, d[a].id);
        d[a].k = d[b].k;
        d[a].id = d[b].id;
        d[b].k = ka;
        d[b].id = ida;
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("order");
        assert!(
            e.contains("producer 0 partition 0: message 0 after 3"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_id_cannot_stand_in_for_a_missing_message() {
        let (mut d, c) = clean();
        let i = d.len() - 1;
        d[i].id = 999_999;
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("unknown id");
        assert!(
            e.contains("message 999999 delivered but never committed"),
            "{e}"
        );
    }

    #[test]
    fn a_message_on_the_wrong_partition_or_queue_is_a_violation() {
        let (mut d, c) = clean();
        // Producer 1's message 0 belongs to partition 1.
        let i = d
            .iter()
            .position(|x| x.producer == 1 && x.k == 0)
            .expect("row");
        d[i].partition = 2;
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("partition");
        assert!(
            e.contains("producer 1 message 0: delivered on queue 0 partition 2, sent to 0 / 1"),
            "{e}"
        );
        let (mut d, c) = clean();
        d[0].queue = 1;
        let e = verify(d, &c, 12, LAYOUT, false).expect_err("queue");
        assert!(e.contains("delivered on queue 1 partition"), "{e}");
    }
}
