#!/usr/bin/env bash
# B=1 on PostgreSQL with commits as slow as the disk the issue's figures came from.
#
# The B=1 target (end-to-end >= 0.9 x the floor's commit rate) assumes that a single-message
# transaction is bound by its commit's WAL flush: the issue quotes a floor of 1.2-1.6k commits/s
# on PostgreSQL. This machine's disk now flushes in ~0.12 ms (pg_test_fsync), the floor commits
# 4-6k/s, and B=1 is bound by round trips and CPU instead, where the pipeline's own work per
# message shows.
#
# This script gives durable commits the latency of such a disk without changing the server's
# configuration: the harness connects as a throwaway role whose sessions set `commit_delay`
# (whoever leads a WAL flush waits that many microseconds first; `commit_siblings = 0` makes it
# wait always). Commits with `synchronous_commit = off` (the engine's bookkeeping) never flush,
# so they do not wait; the floor's commits, the producers' and the engine's durable ones do.
# What it models is commit latency, not a slow device's capacity: data-file writes and
# checkpoints stay fast. The waiting leader holds the WAL write lock, so while a run lasts every
# session of the cluster that flushes waits with it: run it on a server nothing else uses. It
# does nothing if the server runs with `fsync = off` or `synchronous_commit = off` (checked).
# The role is a superuser (`commit_delay` is a superuser setting) without a password, so the
# server must trust local connections for it, as this machine's does; the role and its database
# are dropped on exit. One run at a time.
#
# Usage: benches/scripts/slow-commit-pg.sh [OUT.jsonl [harness options...]]
#   env: DELAY_US=2000 RUNS=5 PGHOST PGPORT PGADMIN; BIN=path skips the release build
set -euo pipefail
OUT=${1:-slow-commit-pg.jsonl}
case "$OUT" in -*) echo "the first argument is the output file" >&2; exit 2 ;; esac
OUT=$(realpath -m -- "$OUT")
shift $(( $# > 0 ? 1 : 0 ))
cd "$(dirname "$0")/../.."
DELAY_US=${DELAY_US:-2000}
RUNS=${RUNS:-5}
HOST=${PGHOST:-127.0.0.1}
PORT=${PGPORT:-5432}
ADMIN=${PGADMIN:-postgres}
ROLE=outbox_bench_slow_commit
DB=outbox_bench_slow
psql_as() { # role, psql arguments...
    local role=$1
    shift
    PGOPTIONS="-c client_min_messages=warning" \
        psql -h "$HOST" -p "$PORT" -U "$role" -d postgres -qAt -v ON_ERROR_STOP=1 "$@"
}
cleanup() {
    psql_as "$ADMIN" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
        -c "DROP ROLE IF EXISTS $ROLE" || true
}
trap cleanup EXIT
cleanup
psql_as "$ADMIN" -c "CREATE ROLE $ROLE LOGIN SUPERUSER" \
    -c "ALTER ROLE $ROLE SET commit_delay = $DELAY_US" \
    -c "ALTER ROLE $ROLE SET commit_siblings = 0"
settings=$(psql_as "$ROLE" -c "SELECT current_setting('fsync') || ' ' || \
    current_setting('synchronous_commit') || ' ' || current_setting('commit_delay')")
if [ "$settings" != "on on $DELAY_US" ]; then
    echo "fsync, synchronous_commit, commit_delay are '$settings': nothing would wait" >&2
    exit 1
fi
if [ -z "${BIN:-}" ]; then
    cargo build -q --release -p outbox-bench
    BIN=${CARGO_TARGET_DIR:-target}/release/outbox-bench
fi
"$BIN" --url "postgres://$ROLE@$HOST:$PORT/$DB" \
    --batch 1 --partitions 8 --runs "$RUNS" "$@" | tee -a -- "$OUT"
