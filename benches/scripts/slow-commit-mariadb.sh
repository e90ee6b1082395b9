#!/usr/bin/env bash
# B=1 on MariaDB with commits as slow as the disk the issue's figures came from (a floor of
# ~2.7k commits/s); the MariaDB counterpart of slow-commit-pg.sh, which explains why.
#
# MariaDB has no per-session commit delay, so this starts a throwaway server with compiled-in
# defaults (`--no-defaults`: no /etc/mysql option files; its own data directory, port and logs)
# with the binary log on and binlog group commit told to wait WAIT_US microseconds for company
# before each flush. Every commit waits, the engine's included: MariaDB cannot commit
# bookkeeping without a flush, and a slow disk would make those commits wait too. Two caveats:
# the binary log itself costs the floor ~40 % here (two-phase commit), which is why the floor,
# not the delay, is what to match; and MariaDB skips the wait when another transaction waits
# for a row lock held by a queued committer (`Binlog_group_commit_trigger_lock_wait`, printed at
# the end), which can only shorten the engine's commits. Needs mariadbd and mariadb-install-db
# and permission to run them as the `mysql` user. The server and its directory are removed on
# exit, and a server left behind by a killed earlier run is stopped first. One run at a time.
#
# Usage: benches/scripts/slow-commit-mariadb.sh [OUT.jsonl [harness options...]]
#   env: WAIT_US=800 RUNS=5 PORT=3307; BIN=path skips the release build
set -euo pipefail
OUT=${1:-slow-commit-mariadb.jsonl}
case "$OUT" in -*) echo "the first argument is the output file" >&2; exit 2 ;; esac
OUT=$(realpath -m -- "$OUT")
shift $(( $# > 0 ? 1 : 0 ))
cd "$(dirname "$0")/../.."
WAIT_US=${WAIT_US:-800}
RUNS=${RUNS:-5}
PORT=${PORT:-3307}
PREFIX=/var/tmp/outbox-bench-mariadb.

# Stops the server whose pid file is in $1 (TERM, then KILL after 10 s) and removes $1.
stop_dir() {
    local dir=$1 pid
    pid=$(cat "$dir/mariadbd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
for stale in "$PREFIX"*; do
    [ -d "$stale" ] && stop_dir "$stale"
done
if mariadb -uroot -h127.0.0.1 -P"$PORT" -e "SELECT 1" > /dev/null 2>&1; then
    echo "port $PORT already has a server that is not ours; set PORT" >&2
    exit 1
fi

DIR=$(mktemp -d "${PREFIX}XXXXXX")
cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        echo "--- server log ---" >&2
        cat "$DIR/install.log" "$DIR/server.log" >&2 2>/dev/null || true
    fi
    stop_dir "$DIR"
}
trap cleanup EXIT
chown mysql:mysql "$DIR"
mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/data" \
    --auth-root-authentication-method=normal --skip-test-db > "$DIR/install.log" 2>&1
mariadbd --no-defaults --user=mysql --datadir="$DIR/data" --port="$PORT" \
    --bind-address=127.0.0.1 --socket="$DIR/mariadbd.sock" --pid-file="$DIR/mariadbd.pid" \
    --log-error="$DIR/server.log" --log-bin="$DIR/data/binlog" \
    --binlog-commit-wait-count=1000 --binlog-commit-wait-usec="$WAIT_US" &
ready=
for _ in $(seq 150); do
    if mariadb -uroot -h127.0.0.1 -P"$PORT" -e "SELECT 1" > /dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.2
done
if [ -z "$ready" ]; then
    echo "the throwaway MariaDB did not start on port $PORT" >&2
    exit 1
fi
if [ -z "${BIN:-}" ]; then
    cargo build -q --release -p outbox-bench
    BIN=${CARGO_TARGET_DIR:-target}/release/outbox-bench
fi
"$BIN" --url "mysql://root@127.0.0.1:$PORT/outbox_bench" \
    --batch 1 --partitions 8 --runs "$RUNS" "$@" | tee -a -- "$OUT"
mariadb -uroot -h127.0.0.1 -P"$PORT" -N -e \
    "SHOW GLOBAL STATUS LIKE 'Binlog_group_commit%'" >&2
