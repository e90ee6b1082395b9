//! The admin API over real HTTP on loopback, on every backend: each route, problem+json errors,
//! auth on and off, and an OpenAPI document that lists every route.

use std::time::Duration;

use modkit_outbox::{HandlerResult, Message, NewMessage, Outbox, Outcome, Partitions};
use modkit_outbox_admin::{AdminOptions, router};
use modkit_outbox_tests::{TestDb, backend_tests};
use sea_orm_migration::MigratorTrait;
use serde_json::{Value, json};

/// Migrates, dead-letters `n` messages through a rejecting engine, serves the admin router.
async fn setup(db: &TestDb, n: u32, token: Option<&str>) -> String {
    modkit_outbox_migration::Migrator::up(&db.conn, None)
        .await
        .expect("migrate");
    let h = Outbox::builder(db.conn.clone())
        .queue("orders", Partitions::of(2))
        .leased(|_m: Message| async { HandlerResult::Ok(Outcome::Reject("broken".into())) })
        .start()
        .await
        .expect("start");
    let msgs: Vec<NewMessage> = (0..n)
        .map(|i| {
            NewMessage::new(
                "orders",
                i % 2,
                format!("m{i}"),
                if i % 3 == 0 { "a" } else { "b" },
            )
        })
        .collect();
    h.outbox()
        .enqueue_batch(&db.conn, &msgs)
        .await
        .expect("enqueue");
    let dl = h.outbox().dead_letters();
    for _ in 0..500 {
        if dl.count(&Default::default()).await.expect("count") == u64::from(n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
    let app = router(
        db.conn.clone(),
        AdminOptions {
            bearer_token: token.map(str::to_owned),
        },
    )
    .expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, axum::Router::new().nest("/outbox", app)).await;
    });
    format!("http://{addr}/outbox")
}

async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = res.json().await.expect("problem json");
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

async fn every_route_and_error(db: TestDb) {
    let base = setup(&db, 12, None).await;
    let c = reqwest::Client::new();

    let stats: Value = c
        .get(format!("{base}/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["partitions"].as_array().map(Vec::len), Some(2));
    let pending = stats["dead_letters"]
        .as_array()
        .expect("dl")
        .iter()
        .find(|x| x["status"] == "pending")
        .expect("pending")["count"]
        .clone();
    assert_eq!(pending, 12);

    // list + filters + cursor
    let page: Value = c
        .get(format!("{base}/dead-letters?limit=5"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(5));
    let cursor = page["next_cursor"].as_i64().expect("cursor");
    let page2: Value = c
        .get(format!("{base}/dead-letters?limit=5&before={cursor}"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(page2["items"][0]["id"].as_i64().expect("id") < cursor);
    let typed: Value = c
        .get(format!(
            "{base}/dead-letters?type=a&partition=0&queue=orders&status=pending"
        ))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(typed["items"].as_array().map(Vec::len), Some(2), "{typed}");
    let future = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let none: Value = c
        .get(format!("{base}/dead-letters"))
        .query(&[("failed_after", future.as_str())])
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));

    // bad input: 400 problem, precise detail
    let p = problem(
        c.get(format!("{base}/dead-letters?limit=0"))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    assert!(p["detail"].as_str().expect("detail").contains("limit"));
    problem(
        c.get(format!("{base}/dead-letters?status=bogus"))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.get(format!("{base}/dead-letters?colour=red"))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.get(format!("{base}/dead-letters/abc"))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.post(format!("{base}/dead-letters/replay"))
            .json(&json!({"limit": 0}))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.post(format!("{base}/dead-letters/replay"))
            .json(&json!({"filtre": {}}))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.post(format!("{base}/dead-letters/replay"))
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    problem(
        c.post(format!("{base}/dead-letters/purge"))
            .json(&json!({}))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    // A cutoff before the earliest representable time, a NUL and an overlong filter value:
    // typed 400s, not a dropped connection or a database error.
    problem(
        c.post(format!("{base}/dead-letters/purge"))
            .json(&json!({"older_than_seconds": 9_000_000_000_000_i64}))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    let p = problem(
        c.get(format!("{base}/dead-letters?queue=a%00b"))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;
    assert!(p["detail"].as_str().expect("detail").contains("queue"));
    problem(
        c.get(format!("{base}/dead-letters?type={}", "t".repeat(300)))
            .send()
            .await
            .expect("req"),
        400,
    )
    .await;

    // show: 200 and 404
    let id = page["items"][0]["id"].as_i64().expect("id");
    let one: Value = c
        .get(format!("{base}/dead-letters/{id}"))
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json");
    assert_eq!(one["id"], id);
    assert_eq!(one["last_error"], "broken");
    problem(
        c.get(format!("{base}/dead-letters/987654"))
            .send()
            .await
            .expect("req"),
        404,
    )
    .await;
    problem(
        c.get(format!("{base}/nothing-here"))
            .send()
            .await
            .expect("req"),
        404,
    )
    .await;

    // nothing changed by the bad requests
    let count: Value = c
        .get(format!("{base}/dead-letters?status=pending&limit=100"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(count["items"].as_array().map(Vec::len), Some(12));

    // replay (filtered), discard, purge
    let r: Value = c
        .post(format!("{base}/dead-letters/replay"))
        .json(&json!({"filter": {"payload_type": "a"}, "limit": 10}))
        .send()
        .await
        .expect("replay")
        .json()
        .await
        .expect("json");
    assert_eq!(r["replayed"], 4);
    let d: Value = c
        .post(format!("{base}/dead-letters/discard"))
        .json(&json!({"filter": {"ids": [id]}}))
        .send()
        .await
        .expect("discard")
        .json()
        .await
        .expect("json");
    assert_eq!(
        d["discarded"],
        if one["payload_type"] == "a" { 0 } else { 1 }
    );
    let p: Value = c
        .post(format!("{base}/dead-letters/purge"))
        .json(&json!({"older_than_seconds": 0}))
        .send()
        .await
        .expect("purge")
        .json()
        .await
        .expect("json");
    assert!(p["purged"].as_u64().expect("purged") >= 4);
}

async fn bearer_token_guard(db: TestDb) {
    let base = setup(&db, 1, Some("s3cret")).await;
    let c = reqwest::Client::new();
    let res = c.get(format!("{base}/stats")).send().await.expect("req");
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    problem(res, 401).await;
    problem(
        c.get(format!("{base}/dead-letters"))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("req"),
        401,
    )
    .await;
    problem(
        c.post(format!("{base}/dead-letters/replay"))
            .json(&json!({}))
            .send()
            .await
            .expect("req"),
        401,
    )
    .await;
    let ok = c
        .get(format!("{base}/dead-letters"))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("req");
    assert_eq!(ok.status().as_u16(), 200);
    // The API description stays readable without a token.
    assert_eq!(
        c.get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("req")
            .status()
            .as_u16(),
        200
    );
}

async fn openapi_lists_every_route(db: TestDb) {
    let base = setup(&db, 1, None).await;
    let doc: Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/stats", "get"),
        ("/dead-letters", "get"),
        ("/dead-letters/{id}", "get"),
        ("/dead-letters/replay", "post"),
        ("/dead-letters/discard", "post"),
        ("/dead-letters/purge", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    // The document parses as OpenAPI 3.1 and every operation's parameters, body and responses
    // resolve.
    let spec = oas3::from_json(doc.to_string()).expect("valid OpenAPI 3.1 document");
    let mut ops = 0;
    for (path, method, op) in spec.operations() {
        ops += 1;
        for p in op
            .parameters(&spec)
            .unwrap_or_else(|e| panic!("{method} {path}: parameters: {e}"))
        {
            assert!(!p.name.is_empty());
        }
        if op.request_body.is_some() {
            op.request_body(&spec)
                .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"));
        }
        assert!(
            !op.responses(&spec).is_empty(),
            "{method} {path}: no responses"
        );
    }
    assert_eq!(ops, 6, "six operations besides /openapi.json");
    // Every referenced schema exists.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let text = doc.to_string();
    for r in text.split("\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().expect("name");
        assert!(schemas.contains_key(name), "dangling $ref to {name}");
    }
}

backend_tests!(
    every_route_and_error,
    bearer_token_guard,
    openapi_lists_every_route
);
