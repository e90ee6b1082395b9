//! HTTP admin API for modkit-outbox: statistics and dead letters, as an axum [`Router`] that a
//! ModKit module (or any axum app) mounts under a prefix, and that `outbox serve` runs
//! standalone.
//!
//! | route | what |
//! |---|---|
//! | `GET /stats` | per-partition backlog, lag, leases, retries; dead letters per status |
//! | `GET /dead-letters` | list, filters + keyset cursor (`before`), newest first |
//! | `GET /dead-letters/{id}` | one dead letter |
//! | `POST /dead-letters/replay` | re-enqueue pending dead letters |
//! | `POST /dead-letters/discard` | discard pending dead letters |
//! | `POST /dead-letters/purge` | delete finished dead letters older than a cutoff |
//! | `GET /openapi.json` | the OpenAPI 3.1 document |
//!
//! Errors are RFC 9457 `application/problem+json`. Bad input is a 400 with a precise `detail`
//! and changes nothing; an unknown id is a 404; a wrong state a 409. With
//! [`AdminOptions::bearer_token`] every route but `/openapi.json` needs
//! `Authorization: Bearer <token>`.
//!
//! ```no_run
//! # async fn mount(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! let admin = modkit_outbox_admin::router(db, modkit_outbox_admin::AdminOptions::default())?;
//! let app: axum::Router = axum::Router::new().nest("/outbox", admin);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use modkit_outbox::{
    DEFAULT_PAGE_SIZE, DEFAULT_PURGE_CHUNK, DeadLetter, DeadLetterFilter, DeadLetterPage,
    DeadLetterStatus, DeadLetters, OutboxError, OutboxStats, PartitionStats, ReplayReport,
    StatusCount,
};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

/// Dead letters one replay/discard request handles when it gives no `limit`.
pub const DEFAULT_ACTION_LIMIT: u64 = 100;

/// Router options.
#[derive(Debug, Clone, Default)]
pub struct AdminOptions {
    /// Require `Authorization: Bearer <token>` on every route but `/openapi.json`.
    pub bearer_token: Option<String>,
}

struct AppState {
    conn: DatabaseConnection,
    dead_letters: DeadLetters,
    token: Option<String>,
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// Problem type URI (`about:blank` for plain HTTP semantics).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What exactly went wrong.
    pub detail: String,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = (status, Json(&self)).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<OutboxError> for Problem {
    fn from(e: OutboxError) -> Self {
        let status = match &e {
            OutboxError::NotFound(_) => StatusCode::NOT_FOUND,
            OutboxError::WrongState { .. } | OutboxError::Conflict(_) => StatusCode::CONFLICT,
            OutboxError::InvalidInput(_)
            | OutboxError::InvalidQueueName { .. }
            | OutboxError::InvalidPayloadType { .. }
            | OutboxError::InvalidHeader { .. }
            | OutboxError::InvalidConfig(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "outbox admin request failed");
            return Problem::new(status, "internal error; see the server log");
        }
        Problem::new(status, e.to_string())
    }
}

fn bad_request(detail: impl std::fmt::Display) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, detail.to_string())
}

type ApiResult<T> = Result<Json<T>, Problem>;

/// Query string of `GET /dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this partition.
    pub partition: Option<u32>,
    /// Only this payload type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub payload_type: Option<String>,
    /// Only this status.
    pub status: Option<DeadLetterStatus>,
    /// Failed at or after (RFC 3339).
    pub failed_after: Option<DateTime<Utc>>,
    /// Failed before (RFC 3339).
    pub failed_before: Option<DateTime<Utc>>,
    /// Page size, 1..=1000 (default 50).
    pub limit: Option<u64>,
    /// Cursor: the previous page's `next_cursor`.
    pub before: Option<i64>,
}

/// Body of `POST /dead-letters/replay` and `/discard`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Which dead letters (only `pending` ones are touched).
    #[serde(default)]
    pub filter: DeadLetterFilter,
    /// At most this many, 1..=500 (default 100).
    pub limit: Option<u64>,
}

/// Body of `POST /dead-letters/purge`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Delete finished dead letters completed more than this many seconds ago.
    pub older_than_seconds: u64,
}

/// Result of a discard.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DiscardReport {
    /// Dead letters discarded.
    pub discarded: u64,
}

/// Result of a purge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurgeReport {
    /// Dead letters deleted.
    pub purged: u64,
}

/// Statistics of every partition and the dead letters.
#[utoipa::path(get, path = "/stats", responses(
    (status = 200, body = OutboxStats), (status = 401, body = Problem), (status = 500, body = Problem)))]
async fn stats(State(s): State<Arc<AppState>>) -> ApiResult<OutboxStats> {
    Ok(Json(modkit_outbox::collect_stats(&s.conn).await?))
}

/// Dead letters, newest first, with filters and a keyset cursor.
#[utoipa::path(get, path = "/dead-letters", params(ListQuery), responses(
    (status = 200, body = DeadLetterPage), (status = 400, body = Problem), (status = 401, body = Problem)))]
async fn list(
    State(s): State<Arc<AppState>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<DeadLetterPage> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let filter = DeadLetterFilter {
        queue: q.queue,
        partition: q.partition,
        payload_type: q.payload_type,
        status: q.status,
        failed_after: q.failed_after,
        failed_before: q.failed_before,
        ids: None,
    };
    Ok(Json(
        s.dead_letters
            .list(&filter, q.limit.unwrap_or(DEFAULT_PAGE_SIZE), q.before)
            .await?,
    ))
}

/// One dead letter.
#[utoipa::path(get, path = "/dead-letters/{id}", params(("id" = i64, Path, description = "Dead-letter id")),
    responses((status = 200, body = DeadLetter), (status = 400, body = Problem), (status = 404, body = Problem)))]
async fn show(
    State(s): State<Arc<AppState>>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<DeadLetter> {
    let Path(id) = id.map_err(|e| bad_request(e.body_text()))?;
    let dl = s
        .dead_letters
        .get(id)
        .await?
        .ok_or(OutboxError::NotFound(id))?;
    Ok(Json(dl))
}

/// Re-enqueues pending dead letters into their original queue and partition.
#[utoipa::path(post, path = "/dead-letters/replay", request_body = ActionRequest, responses(
    (status = 200, body = ReplayReport), (status = 400, body = Problem), (status = 409, body = Problem)))]
async fn replay(
    State(s): State<Arc<AppState>>,
    body: Result<Json<ActionRequest>, JsonRejection>,
) -> ApiResult<ReplayReport> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let limit = req.limit.unwrap_or(DEFAULT_ACTION_LIMIT);
    Ok(Json(s.dead_letters.replay(&req.filter, limit).await?))
}

/// Marks pending dead letters as discarded.
#[utoipa::path(post, path = "/dead-letters/discard", request_body = ActionRequest, responses(
    (status = 200, body = DiscardReport), (status = 400, body = Problem)))]
async fn discard(
    State(s): State<Arc<AppState>>,
    body: Result<Json<ActionRequest>, JsonRejection>,
) -> ApiResult<DiscardReport> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let limit = req.limit.unwrap_or(DEFAULT_ACTION_LIMIT);
    let discarded = s.dead_letters.discard(&req.filter, limit).await?;
    Ok(Json(DiscardReport { discarded }))
}

/// Deletes replayed, resolved and discarded dead letters completed before the cutoff.
#[utoipa::path(post, path = "/dead-letters/purge", request_body = PurgeRequest, responses(
    (status = 200, body = PurgeReport), (status = 400, body = Problem)))]
async fn purge(
    State(s): State<Arc<AppState>>,
    body: Result<Json<PurgeRequest>, JsonRejection>,
) -> ApiResult<PurgeReport> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let age = i64::try_from(req.older_than_seconds)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .ok_or_else(|| bad_request("older_than_seconds is too large"))?;
    let cutoff = Utc::now()
        .checked_sub_signed(age)
        .ok_or_else(|| bad_request("older_than_seconds is too large"))?;
    let purged = s
        .dead_letters
        .purge(cutoff, DEFAULT_PURGE_CHUNK, |_| {})
        .await?;
    Ok(Json(PurgeReport { purged }))
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "modkit-outbox admin API", description = "Statistics and dead letters of a modkit-outbox database."),
    paths(stats, list, show, replay, discard, purge),
    components(schemas(
        OutboxStats, PartitionStats, StatusCount, DeadLetter, DeadLetterPage, DeadLetterStatus,
        DeadLetterFilter, ReplayReport, ActionRequest, PurgeRequest, DiscardReport, PurgeReport,
        Problem
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Compares without an early exit, so the time taken does not reveal the matching prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return Problem::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no such route")
}

/// The admin router. Mount it with `Router::nest("/outbox", router)` or serve it as is.
pub fn router(conn: DatabaseConnection, options: AdminOptions) -> Result<Router, OutboxError> {
    if options.bearer_token.as_deref().is_some_and(str::is_empty) {
        return Err(OutboxError::InvalidConfig("empty bearer token".into()));
    }
    let state = Arc::new(AppState {
        dead_letters: DeadLetters::new(conn.clone())?,
        conn,
        token: options.bearer_token,
    });
    let guarded = Router::new()
        .route("/stats", get(stats))
        .route("/dead-letters", get(list))
        .route("/dead-letters/{id}", get(show))
        .route("/dead-letters/replay", post(replay))
        .route("/dead-letters/discard", post(discard))
        .route("/dead-letters/purge", post(purge))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Ok(Router::new()
        .route("/openapi.json", get(openapi))
        .merge(guarded)
        .fallback(not_found)
        .with_state(state))
}
