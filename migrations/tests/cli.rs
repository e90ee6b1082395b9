//! `cargo run -p modkit-outbox-migration -- up|status|down|fresh|refresh` as a subprocess against a
//! fresh database on every backend.

use std::process::Command;

use modkit_outbox_tests::{Backend, TestDb, backend_tests};
use sea_orm::{ConnectionTrait, Statement};

fn cli(db: &TestDb, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_modkit-outbox-migration"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("DATABASE_SCHEMA")
        .output()
        .expect("spawn migration CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{:?}: `{}` failed ({}):\n{text}",
        db.backend,
        args.join(" "),
        out.status
    );
    text
}

async fn outbox_table_count(db: &TestDb) -> i64 {
    let sql = match db.backend {
        Backend::Postgres => {
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name LIKE 'modkit_outbox_%'"
        }
        Backend::MySql => {
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name LIKE 'modkit_outbox_%'"
        }
        Backend::Sqlite => {
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name LIKE 'modkit_outbox_%'"
        }
    };
    let row = db
        .conn
        .query_one_raw(Statement::from_string(db.conn.get_database_backend(), sql))
        .await
        .expect("count tables")
        .expect("one row");
    row.try_get("", "n").expect("n")
}

async fn cli_up_status_down_fresh_refresh(db: TestDb) {
    let migration = "m20261123_000001_create_schema";

    let status = cli(&db, &["status"]);
    assert!(
        status.contains(migration) && status.contains("Pending"),
        "status before up:\n{status}"
    );

    cli(&db, &["up"]);
    assert_eq!(outbox_table_count(&db).await, 7);
    let status = cli(&db, &["status"]);
    assert!(
        status.contains(migration) && status.contains("Applied"),
        "status after up:\n{status}"
    );

    cli(&db, &["up"]); // nothing pending: harmless
    assert_eq!(outbox_table_count(&db).await, 7);

    // `down` rolls back the newest migration only (sea-orm's default of one step): the queue
    // index migration and the SQLite index migration leave every table in place.
    cli(&db, &["down"]);
    assert_eq!(outbox_table_count(&db).await, 7);
    cli(&db, &["down"]);
    assert_eq!(outbox_table_count(&db).await, 7);
    cli(&db, &["down"]);
    assert_eq!(outbox_table_count(&db).await, 0);

    cli(&db, &["fresh"]);
    assert_eq!(outbox_table_count(&db).await, 7);

    cli(&db, &["refresh"]);
    assert_eq!(outbox_table_count(&db).await, 7);

    // `-u` works as well as DATABASE_URL.
    let out = Command::new(env!("CARGO_BIN_EXE_modkit-outbox-migration"))
        .args(["-u", &db.url, "status"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("spawn");
    assert!(out.status.success());
}

async fn cli_reports_a_bad_url_with_a_failing_exit_code(db: TestDb) {
    let bad = match db.backend {
        Backend::Sqlite => "sqlite:///nonexistent-dir/x/y.sqlite".to_owned(),
        _ => db.url.replace("outbox_t_", "outbox_missing_"),
    };
    let out = Command::new(env!("CARGO_BIN_EXE_modkit-outbox-migration"))
        .args(["-u", &bad, "up"])
        .output()
        .expect("spawn");
    assert!(
        !out.status.success(),
        "{:?}: up against {bad} succeeded",
        db.backend
    );
}

backend_tests!(
    cli_up_status_down_fresh_refresh,
    cli_reports_a_bad_url_with_a_failing_exit_code
);
