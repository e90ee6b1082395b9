#!/usr/bin/env bash
# B=1 on PostgreSQL with commits as slow as the disk the issue's figures came from.
#
# The B=1 target (end-to-end >= 0.9 x the floor's commit rate) assumes that a single-message
# transaction is bound by its commit's WAL flush: the issue quotes a floor of 1.2-1.6k commits/s
# on PostgreSQL. This machine's disk now flushes in ~0.12 ms (pg_test_fsync), the floor commits
# 4-6k/s, and B=1 is bound by CPU instead, where the pipeline's own work per message shows.
#
# This script brings the flush back to the issue's speed without touching the server's
# configuration: a throwaway superuser role whose sessions have `commit_delay` (the group-commit
# leader waits that many microseconds before each WAL flush; `commit_siblings = 0` makes it wait
# always). Only durable commits flush, so it slows the floor's commits, the producers' commits and
# the engine's durable commits alike, and leaves the engine's bookkeeping commits
# (`synchronous_commit = off`) as they are: what a slower disk does. The role is dropped on exit.
#
# Usage: benches/scripts/slow-commit-pg.sh [OUT.jsonl [harness options...]]
#   env: DELAY_US=1500 RUNS=5 PGHOST PGPORT PGADMIN; BIN=path skips the release build
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-slow-commit-pg.jsonl}
shift $(( $# > 0 ? 1 : 0 ))
DELAY_US=${DELAY_US:-1500}
RUNS=${RUNS:-5}
HOST=${PGHOST:-127.0.0.1}
PORT=${PGPORT:-5432}
ADMIN=${PGADMIN:-postgres}
ROLE=outbox_bench_slow_commit
psql_admin() { PGOPTIONS="-c client_min_messages=warning" psql -h "$HOST" -p "$PORT" -U "$ADMIN" -d postgres -qAt -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
    psql_admin -c "DROP DATABASE IF EXISTS outbox_bench_slow WITH (FORCE)" \
        -c "DROP ROLE IF EXISTS $ROLE" || true
}
trap cleanup EXIT
cleanup
psql_admin -c "CREATE ROLE $ROLE LOGIN SUPERUSER" \
    -c "ALTER ROLE $ROLE SET commit_delay = $DELAY_US" \
    -c "ALTER ROLE $ROLE SET commit_siblings = 0"
if [ -z "${BIN:-}" ]; then
    cargo build -q --release -p outbox-bench
    BIN=target/release/outbox-bench
fi
"$BIN" --url "postgres://$ROLE@$HOST:$PORT/outbox_bench_slow" \
    --batch 1 --partitions 8 --runs "$RUNS" "$@" | tee -a "$OUT"
