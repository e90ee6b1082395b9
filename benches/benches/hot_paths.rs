//! Criterion micro-benchmarks of the engine's client-side hot paths: building the statements it
//! sends (no database). They show what the engine's own CPU costs per call next to the round
//! trip the statement then makes (tenths of a millisecond to a millisecond on this machine).
//!
//! ```text
//! cargo bench -p outbox-bench --bench hot_paths            # measure
//! cargo test  -p outbox-bench --bench hot_paths            # run each once (CI smoke)
//! ```

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use modkit_outbox::NewMessage;
use modkit_outbox::bench_internals::{
    Backend, ack_statement, delete_bodies, enqueue_statements, sequencer_pass,
};

fn messages(n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|k| {
            NewMessage::new("bench", (k % 8) as u32, vec![b'x'; 100], "bench.msg").header(
                "trace",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
        })
        .collect()
}

fn enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("enqueue_statements");
    for n in [1usize, 100] {
        let msgs = messages(n);
        g.throughput(Throughput::Elements(n as u64));
        for b in Backend::ALL {
            g.bench_with_input(BenchmarkId::new(b.name(), n), &msgs, |bench, msgs| {
                bench.iter(|| enqueue_statements(b, black_box(msgs)))
            });
        }
    }
    g.finish();
}

fn ack(c: &mut Criterion) {
    let mut g = c.benchmark_group("ack_statement");
    for parts in [1usize, 8, 64] {
        for b in Backend::ALL {
            g.bench_with_input(BenchmarkId::new(b.name(), parts), &parts, |bench, &p| {
                bench.iter(|| ack_statement(b, black_box(p)))
            });
        }
    }
    g.finish();
}

fn pass(c: &mut Criterion) {
    let mut g = c.benchmark_group("sequencer_pass");
    for rows in [15usize, 500] {
        g.throughput(Throughput::Elements(rows as u64));
        for b in Backend::ALL {
            g.bench_with_input(BenchmarkId::new(b.name(), rows), &rows, |bench, &r| {
                bench.iter(|| sequencer_pass(b, black_box(r), 8))
            });
        }
    }
    g.finish();
}

fn vacuum(c: &mut Criterion) {
    let mut g = c.benchmark_group("vacuum_body_delete");
    for ids in [100usize, 500] {
        g.throughput(Throughput::Elements(ids as u64));
        for b in Backend::ALL {
            g.bench_with_input(BenchmarkId::new(b.name(), ids), &ids, |bench, &n| {
                bench.iter(|| delete_bodies(b, black_box(n)))
            });
        }
    }
    g.finish();
}

criterion_group!(hot_paths, enqueue, ack, pass, vacuum);
criterion_main!(hot_paths);
