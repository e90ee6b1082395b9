//! The `outbox` binary as a subprocess against real databases: output, `--json`, exit codes.

use std::process::{Command, Output, Stdio};

use modkit_outbox_tests::{TestDb, backend_tests};

fn outbox(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .stdin(Stdio::null())
        .output()
        .expect("spawn outbox")
}

fn ok(db: &TestDb, args: &[&str]) -> String {
    let out = outbox(db, args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{:?}: outbox {} failed ({}):\n{text}\n{}",
        db.backend,
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn json(db: &TestDb, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(db, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

async fn cli_end_to_end(db: TestDb) {
    // migrate
    let st = json(&db, &["migrate", "status"]);
    assert_eq!(st["pending"].as_array().map(Vec::len), Some(3));
    let st = json(&db, &["migrate", "up"]);
    assert_eq!(st["applied"][0], "m20261123_000001_create_schema");
    assert_eq!(st["applied"][1], "m20261124_000002_sqlite_incoming_prefix");
    assert_eq!(st["applied"][2], "m20261124_000003_lean_queue_indexes");
    assert_eq!(st["pending"].as_array().map(Vec::len), Some(0));

    // demo: one dead letter (the negative amount)
    let demo = ok(&db, &["demo"]);
    assert!(demo.contains("dead letters added by this run: 1"), "{demo}");

    // stats
    let stats = json(&db, &["stats"]);
    let parts = stats["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 4);
    assert!(
        parts
            .iter()
            .all(|p| p["unprocessed"] == 0 && p["queue"] == "orders")
    );
    let pending = stats["dead_letters"]
        .as_array()
        .expect("dead letters")
        .iter()
        .find(|x| x["status"] == "pending")
        .map(|x| x["count"].as_u64())
        .expect("pending count");
    assert_eq!(pending, Some(1));
    let table = ok(&db, &["stats"]);
    assert!(
        table.contains("unprocessed") && table.contains("orders"),
        "{table}"
    );

    // dead letters: list (table and JSON), filters, show
    let page = json(
        &db,
        &[
            "dead-letters",
            "list",
            "--queue",
            "orders",
            "--status",
            "pending",
        ],
    );
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    let id = items[0]["id"].as_i64().expect("id");
    assert_eq!(items[0]["last_error"], "amount must be positive");
    assert!(
        items[0]["payload"]
            .as_str()
            .is_some_and(|p| p.contains("-5"))
    );
    let none = json(&db, &["dead-letters", "list", "--queue", "nope"]);
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));
    let listed = ok(&db, &["dead-letters", "list"]);
    assert!(listed.contains("amount must be positive"), "{listed}");
    let shown = json(&db, &["dead-letters", "show", &id.to_string()]);
    assert_eq!(shown["status"], "pending");
    assert_eq!(shown["headers"]["idempotency-key"], "order-3");

    // exit codes
    let missing = outbox(&db, &["dead-letters", "show", "999999"]);
    assert_eq!(missing.status.code(), Some(3), "not found");
    let refused = outbox(&db, &["dead-letters", "replay"]);
    assert_eq!(
        refused.status.code(),
        Some(5),
        "no --yes without a terminal"
    );
    let bad = outbox(&db, &["dead-letters", "list", "--status", "bogus"]);
    assert_eq!(bad.status.code(), Some(2), "invalid input");
    let bad_limit = outbox(&db, &["dead-letters", "list", "--limit", "0"]);
    assert_eq!(bad_limit.status.code(), Some(2), "invalid limit");
    let too_old = outbox(
        &db,
        &["dead-letters", "purge", "--older-than", "300000y", "--yes"],
    );
    assert_eq!(
        too_old.status.code(),
        Some(2),
        "a cutoff before year 1: usage, no panic"
    );
    let long_type = "t".repeat(300);
    let bad_type = outbox(&db, &["dead-letters", "list", "--type", &long_type]);
    assert_eq!(bad_type.status.code(), Some(2), "an overlong filter value");
    assert_eq!(
        json(&db, &["dead-letters", "list", "--status", "pending"])["items"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "the refused replay changed nothing"
    );

    // replay, then nothing left to replay; purge the replayed one
    let r = json(&db, &["dead-letters", "replay", "--yes"]);
    assert_eq!(r["replayed"], 1);
    let r = json(&db, &["dead-letters", "replay", "--yes"]);
    assert_eq!(r["replayed"], 0);
    let stats = json(&db, &["stats"]);
    let unsequenced: u64 = stats["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["unsequenced"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(unsequenced, 1, "the replayed message waits in incoming");
    let p = json(
        &db,
        &["dead-letters", "purge", "--older-than", "1h", "--yes"],
    );
    assert_eq!(p["purged"], 0, "too young");
    let p = json(
        &db,
        &["dead-letters", "purge", "--older-than", "0s", "--yes"],
    );
    assert_eq!(p["purged"], 1);

    // Run the demo again: its engine also delivers the replayed message, which its handler
    // still rejects, so two dead letters are pending; discard both.
    ok(&db, &["demo"]);
    let d = json(
        &db,
        &[
            "dead-letters",
            "discard",
            "--type",
            "order.created",
            "--yes",
        ],
    );
    assert_eq!(d["discarded"], 2);

    // fresh asks first, then drops the populated tables (partitions, processor rows, dead
    // letters: rows behind foreign keys) and migrates again
    let refused = outbox(&db, &["migrate", "fresh"]);
    assert_eq!(refused.status.code(), Some(5));
    let st = json(&db, &["migrate", "fresh", "--yes"]);
    assert_eq!(st["applied"].as_array().map(Vec::len), Some(3));
    assert_eq!(st["pending"].as_array().map(Vec::len), Some(0));
    let stats = json(&db, &["stats"]);
    assert_eq!(stats["partitions"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        json(&db, &["dead-letters", "list", "--status", "discarded"])["items"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "fresh emptied every table"
    );
    ok(&db, &["demo"]);

    // down asks first, then drops everything
    let refused = outbox(&db, &["migrate", "down"]);
    assert_eq!(refused.status.code(), Some(5));
    let st = json(&db, &["migrate", "down", "--yes"]);
    assert_eq!(st["pending"].as_array().map(Vec::len), Some(3));
}

async fn cli_reports_unreachable_database(db: TestDb) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "stats",
        ])
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1), "{:?}", db.backend);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// Kills the server when the test ends, whatever happens.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn wait_up(url: &str) {
    for _ in 0..200 {
        if reqwest::get(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("server at {url} did not come up");
}

async fn cli_serve_loopback_and_beyond(db: TestDb) {
    ok(&db, &["migrate", "up"]);
    // Loopback: no token needed.
    let port = free_port();
    let _s = Server(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &db.url)
            .env_remove("OUTBOX_ADMIN_TOKEN")
            .spawn()
            .expect("serve"),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{base}/openapi.json")).await;
    let res = reqwest::get(format!("{base}/stats")).await.expect("stats");
    assert_eq!(res.status().as_u16(), 200, "{:?}", db.backend);

    // Beyond loopback: a token is required by default (generated and printed).
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["serve", "--bind", &format!("0.0.0.0:{port}")])
        .env("DATABASE_URL", &db.url)
        .env_remove("OUTBOX_ADMIN_TOKEN")
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let _s2 = Server(child);
    // Read the printed token, then keep draining stderr so the server never hits a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(t) = line.split("bearer token: ").nth(1) {
                let _ = tx.send(t.trim().to_owned());
            }
        }
    });
    let token = tokio::task::spawn_blocking(move || {
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_default()
    })
    .await
    .expect("read token");
    assert_eq!(token.len(), 32, "a generated token was printed");
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{base}/openapi.json")).await;
    let c = reqwest::Client::new();
    assert_eq!(
        c.get(format!("{base}/stats"))
            .send()
            .await
            .expect("req")
            .status()
            .as_u16(),
        401
    );
    let res = c
        .get(format!("{base}/stats"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("req");
    assert_eq!(res.status().as_u16(), 200);
}

async fn cli_stats_watch_refreshes(db: TestDb) {
    ok(&db, &["migrate", "up"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--json", "stats", "--watch", "--interval", "100ms"])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = Server(child);
    // Count snapshots as they arrive (no fixed sleep: a loaded CI machine starts slowly).
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut snapshots = 0;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("\"collected_at\"") {
                snapshots += 1;
                if snapshots == 3 {
                    break;
                }
            }
        }
        snapshots
    });
    let snapshots = tokio::time::timeout(std::time::Duration::from_secs(60), seen)
        .await
        .expect("three snapshots within 60 s")
        .expect("reader");
    assert_eq!(snapshots, 3, "{:?}: --watch keeps refreshing", db.backend);
}

/// A reader that stops early (`outbox … | head`) ends the command quietly: no panic, status 0.
async fn cli_closed_stdout_ends_quietly(db: TestDb) {
    ok(&db, &["migrate", "up"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--json", "stats", "--watch", "--interval", "50ms"])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let _ = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        // Read the first snapshot's first line, then hang up.
        let mut first = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut first);
        first
    })
    .await
    .expect("reader");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    })
    .await
    .expect("waiter");
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
    let status = status.expect("outbox kept running after its reader hung up");
    assert!(!text.contains("panicked"), "{:?}: {text}", db.backend);
    assert_eq!(status.code(), Some(0), "{:?}: {text}", db.backend);
}

backend_tests!(
    cli_closed_stdout_ends_quietly,
    cli_stats_watch_refreshes,
    cli_end_to_end,
    cli_reports_unreachable_database,
    cli_serve_loopback_and_beyond
);
