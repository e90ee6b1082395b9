#!/usr/bin/env bash
# B=1 on MariaDB with commits as slow as the disk the issue's figures came from (a floor of
# ~2.7k commits/s); the MariaDB counterpart of slow-commit-pg.sh, which explains why.
#
# MariaDB has no per-session commit delay, so this starts a throwaway server (its own data
# directory and port, stock settings otherwise) with the binary log on and binlog group commit
# told to wait WAIT_US microseconds for company before each flush. Every commit waits, the
# engine's included: MariaDB cannot commit bookkeeping without a flush, and a slow disk would
# make those commits wait too. The binary log itself costs the floor ~40 % here (two-phase
# commit), which is why the floor, not the delay, is what to match. Needs mariadbd and
# mariadb-install-db and permission to run them as the `mysql` user; the server and its
# directory are removed on exit.
#
# Usage: benches/scripts/slow-commit-mariadb.sh [OUT.jsonl [harness options...]]
#   env: WAIT_US=800 RUNS=5 PORT=3307; BIN=path skips the release build
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-slow-commit-mariadb.jsonl}
shift $(( $# > 0 ? 1 : 0 ))
WAIT_US=${WAIT_US:-800}
RUNS=${RUNS:-5}
PORT=${PORT:-3307}
DIR=$(mktemp -d /var/tmp/outbox-bench-mariadb.XXXXXX)
cleanup() {
    if [ -f "$DIR/mariadbd.pid" ]; then
        kill "$(cat "$DIR/mariadbd.pid")" 2>/dev/null || true
        for _ in $(seq 50); do [ -f "$DIR/mariadbd.pid" ] || break; sleep 0.2; done
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT
if mariadb -uroot -h127.0.0.1 -P"$PORT" -e "SELECT 1" > /dev/null 2>&1; then
    echo "port $PORT already has a server; set PORT" >&2
    exit 1
fi
chown mysql:mysql "$DIR"
mariadb-install-db --user=mysql --datadir="$DIR/data" --auth-root-authentication-method=normal \
    --skip-test-db > "$DIR/install.log" 2>&1
mariadbd --user=mysql --datadir="$DIR/data" --port="$PORT" --bind-address=127.0.0.1 \
    --socket="$DIR/mariadbd.sock" --pid-file="$DIR/mariadbd.pid" \
    --log-bin="$DIR/data/binlog" --binlog-commit-wait-count=1000 \
    --binlog-commit-wait-usec="$WAIT_US" > "$DIR/server.log" 2>&1 &
for _ in $(seq 100); do
    mariadb -uroot -h127.0.0.1 -P"$PORT" -e "SELECT 1" > /dev/null 2>&1 && break
    sleep 0.2
done
if [ -z "${BIN:-}" ]; then
    cargo build -q --release -p outbox-bench
    BIN=target/release/outbox-bench
fi
"$BIN" --url "mysql://root@127.0.0.1:$PORT/outbox_bench" \
    --batch 1 --partitions 8 --runs "$RUNS" "$@" | tee -a "$OUT"
