# modkit-outbox recipes. `just --list` shows them. None is needed by README's two commands.

db_url := env_var_or_default("DATABASE_URL", "sqlite://outbox-demo.sqlite?mode=rwc")

# Whole test suite on SQLite, PostgreSQL and MariaDB/MySQL
test:
    cargo test --workspace

# Only the PostgreSQL variants of the backend matrix
test-pg:
    OUTBOX_REQUIRE_ALL_BACKENDS=1 cargo test --workspace -- postgres

# Only the MySQL/MariaDB variants of the backend matrix
test-mysql:
    OUTBOX_REQUIRE_ALL_BACKENDS=1 cargo test --workspace -- mysql

# Only the SQLite variants of the backend matrix
test-sqlite:
    cargo test --workspace -- sqlite

# The demo: migrate, enqueue, process, print (on DATABASE_URL or the demo's SQLite file)
demo *ARGS:
    cargo run -p modkit-outbox-cli -- {{ARGS}} demo

# Run the outbox migrations (up|down|status|fresh|refresh) against DATABASE_URL
migrate CMD="up":
    DATABASE_URL="{{db_url}}" cargo run -p modkit-outbox-migration -- {{CMD}}

# The `outbox` operations CLI (stats, dead-letters …) against DATABASE_URL
outbox *ARGS:
    DATABASE_URL="{{db_url}}" cargo run -q -p modkit-outbox-cli -- {{ARGS}}

# Benchmark harness (release build)
bench *ARGS:
    cargo run --release -p outbox-bench -- {{ARGS}}

# Criterion micro-benchmarks of the statement builders (no database; `-- FILTER` narrows)
bench-micro *ARGS:
    cargo bench -p outbox-bench --bench hot_paths {{ARGS}}

# B=1 with PostgreSQL's durable commits as slow as the issue's disk (OUT.jsonl [harness options])
bench-slow-commit-pg *ARGS:
    bash benches/scripts/slow-commit-pg.sh {{ARGS}}

# B=1 on a throwaway MariaDB whose commits wait like the issue's disk (OUT.jsonl [options])
bench-slow-commit-mariadb *ARGS:
    bash benches/scripts/slow-commit-mariadb.sh {{ARGS}}

# fmt, clippy and rustdoc, as CI runs them
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
