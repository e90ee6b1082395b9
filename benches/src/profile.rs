//! `--statement-profile`: the SQL calls of the engine phase that sqlx logs, counted and timed by
//! the part of the pipeline that made them.
//!
//! sqlx reports each finished call as a `sqlx::query` event with its client-observed time
//! (`elapsed_secs`: the round trip, the server's work and any wait for a core). The engine runs
//! each task in a `debug` span named after it (`outbox.sequencer`, `outbox.leased.ack`,
//! `outbox.vacuum`, …), and the harness's producers run in `bench.producer`, so the span an
//! event happened in says who paid for it. Statement logging costs time itself: a profiled run
//! shows where the time goes, not how fast the engine is.
//!
//! Not every call is logged: sqlx 0.9 sends PostgreSQL's `BEGIN` without logging it, and runs
//! SQLite's `BEGIN` and `COMMIT` on its worker thread unlogged, so counts compare within a
//! backend, not across backends. The window starts right after the engines started (their
//! first pass, lease acquisitions and reads may fall in it) and ends within ~2 ms after the
//! last delivery (the last ack may or may not be in it); calls running at either edge count
//! when they finish.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Set once in `main` when `--statement-profile` is given: pools then log statements.
pub static ENABLED: AtomicBool = AtomicBool::new(false);

/// The span the harness's producer tasks run in: their whole transaction is theirs.
pub const PRODUCER_SPAN: &str = "bench.producer";

/// Calls and client-observed seconds of one part of the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Group {
    pub calls: u64,
    pub secs: f64,
}

static GROUPS: Mutex<BTreeMap<String, Group>> = Mutex::new(BTreeMap::new());

/// Forgets what was counted so far (the floor's statements, the schema's).
pub fn reset() {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// What was counted since the last [`reset`].
pub fn take() -> BTreeMap<String, Group> {
    std::mem::take(&mut *GROUPS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Who made a call: the producer span if the call ran inside one, else the innermost engine
/// span (`outbox.*`), else `other` (schema checks, the harness's own counting).
pub fn group_of<'a>(spans_leaf_first: impl IntoIterator<Item = &'a str>) -> &'a str {
    let mut innermost_engine = None;
    for name in spans_leaf_first {
        if name == PRODUCER_SPAN {
            return name;
        }
        if innermost_engine.is_none() && name.starts_with("outbox.") {
            innermost_engine = Some(name);
        }
    }
    innermost_engine.unwrap_or("other")
}

/// Adds one call of `secs` to `group`.
pub fn record(group: &str, secs: f64) {
    let mut g = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    let e = g.entry(group.to_owned()).or_default();
    e.calls += 1;
    e.secs += secs;
}

/// The layer that feeds [`record`] from sqlx's statement events.
pub struct Layer;

#[derive(Default)]
struct Elapsed(Option<f64>);

impl Visit for Elapsed {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl<S> tracing_subscriber::Layer<S> for Layer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // The layer is installed only with `--statement-profile`.
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut elapsed = Elapsed::default();
        event.record(&mut elapsed);
        let Some(secs) = elapsed.0 else { return };
        let names: Vec<&'static str> = ctx
            .event_scope(event)
            .map(|scope| scope.map(|s| s.name()).collect())
            .unwrap_or_default();
        record(group_of(names), secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_belongs_to_its_producer_or_its_innermost_engine_task() {
        // The enqueue span sits inside the producer's: the producer pays for its transaction.
        assert_eq!(group_of(["outbox.enqueue", PRODUCER_SPAN]), PRODUCER_SPAN);
        assert_eq!(
            group_of(["outbox.processor", "outbox.sequencer"]),
            "outbox.processor"
        );
        assert_eq!(group_of(["outbox.leased.ack"]), "outbox.leased.ack");
        assert_eq!(group_of(["something.else"]), "other");
        assert_eq!(group_of([]), "other");
    }

    #[test]
    fn records_sum_per_group_until_taken() {
        reset();
        record("outbox.vacuum", 0.5);
        record("outbox.vacuum", 0.25);
        record("bench.producer", 1.0);
        let got = take();
        assert_eq!(
            got["outbox.vacuum"],
            Group {
                calls: 2,
                secs: 0.75
            }
        );
        assert_eq!(got["bench.producer"].calls, 1);
        assert!(take().is_empty(), "take() empties it");
    }
}
