#!/usr/bin/env bash
# Runs the docs/PERFORMANCE.md matrix with the release harness and appends one JSON line per
# configuration (medians of RUNS runs) to OUT. Then: python3 benches/scripts/table.py OUT
# BACKENDS (default "postgres mysql sqlite") limits it to some backends; the memory row runs
# with postgres.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench-results.jsonl}
RUNS=${RUNS:-3}
PG=${PG:-postgres://postgres@127.0.0.1:5432/outbox_bench}
MY=${MY:-mysql://root@127.0.0.1:3306/outbox_bench}
cargo build -q --release -p outbox-bench
BIN=${CARGO_TARGET_DIR:-target}/release/outbox-bench
run() { "$BIN" --runs "$RUNS" "$@" | tail -n 1 >> "$OUT"; }
BACKENDS=${BACKENDS:-postgres mysql sqlite}
for backend in $BACKENDS; do
    case "$backend" in
        postgres) url=$PG ;;
        mysql) url=$MY ;;
        sqlite) url=sqlite ;;
        *) echo "unknown backend $backend" >&2; exit 2 ;;
    esac
    run --url "$url" --batch 100 --partitions 8
    run --url "$url" --batch 100 --partitions 64
    run --url "$url" --batch 100 --partitions 8 --mode transactional
    run --url "$url" --batch 1 --partitions 8 --enqueue-only
    run --url "$url" --batch 1 --partitions 8 --mode transactional
    if [ "$url" != sqlite ]; then
        run --url "$url" --batch 100 --partitions 8 --instances 3
        run --url "$url" --batch 1 --partitions 8 --instances 3
        # Replicas that all produce: each producer enqueues through its own instance.
        run --url "$url" --batch 1 --partitions 8 --instances 3 --producers-in each
    fi
    # A producer-only process (web tier) beside the engine: latency at a steady 200 msg/s.
    run --url "$url" --batch 1 --partitions 8 --producers-in apart --rate 200 --messages 3000 --no-floor
done
# Memory with a 100,000-message backlog (producers far ahead of the pipeline).
case " $BACKENDS " in *" postgres "*) ;; *) exit 0 ;; esac
"$BIN" --url "$PG" --batch 100 --partitions 8 --messages 100000 --no-floor | tail -n 1 >> "$OUT"
