//! Dead letters: listing, replay and cleanup.
//!
//! Status machine (see `docs/DEAD_LETTERS.md`), enforced by every statement's `WHERE status = …`
//! guard, so a transition attempted from the wrong state changes nothing and reports
//! [`OutboxError::WrongState`]:
//!
//! ```text
//!             replay (re-enqueue)                      purge
//!   pending ───────────────────────────▶ replayed ──────────────▶ (deleted)
//!      │  ▲                                                  ▲
//!      │  │ fail                         resolve              │
//!      │  └──────── reprocessing ───────────────▶ resolved ───┤
//!      │   claim ─▶  (deadline; reclaimable                    │
//!      │             after it)                                 │
//!      └──────────────────────────────────▶ discarded ─────────┘
//!                 discard
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, QueryResult, Value};
use serde::{Deserialize, Serialize};

use crate::backend::{Db, Dialect, get_opt_time, get_time, placeholders, postgres, query_all};
use crate::error::{OutboxError, Result};
use crate::message::{Headers, decode_headers};

/// Most rows one list page returns.
pub const MAX_PAGE_SIZE: u64 = 1000;
/// Page size when none is given.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Rows one purge statement deletes.
pub const DEFAULT_PURGE_CHUNK: u64 = 500;
/// Most dead letters one replay, claim or discard call handles (and most ids a filter may
/// name): one statement's `IN` list stays below MariaDB's conversion threshold.
pub const MAX_BATCH: u64 = crate::backend::MAX_IN_LIST as u64;

/// Where a dead letter is in its life (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStatus {
    /// Waiting for an operator: replay, claim or discard.
    Pending,
    /// Claimed by a caller that processes it itself, until `deadline`.
    Reprocessing,
    /// Re-enqueued into its original queue and partition.
    Replayed,
    /// Processed by the claimer.
    Resolved,
    /// Dropped on purpose.
    Discarded,
}

impl DeadLetterStatus {
    /// Every status.
    pub const ALL: [DeadLetterStatus; 5] = [
        DeadLetterStatus::Pending,
        DeadLetterStatus::Reprocessing,
        DeadLetterStatus::Replayed,
        DeadLetterStatus::Resolved,
        DeadLetterStatus::Discarded,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "pending",
            DeadLetterStatus::Reprocessing => "reprocessing",
            DeadLetterStatus::Replayed => "replayed",
            DeadLetterStatus::Resolved => "resolved",
            DeadLetterStatus::Discarded => "discarded",
        }
    }

    /// Whether the dead letter is finished (purgeable).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeadLetterStatus::Replayed | DeadLetterStatus::Resolved | DeadLetterStatus::Discarded
        )
    }
}

impl std::fmt::Display for DeadLetterStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadLetterStatus {
    type Err = OutboxError;
    fn from_str(s: &str) -> Result<Self> {
        DeadLetterStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| OutboxError::InvalidInput(format!("unknown dead-letter status `{s}`")))
    }
}

/// A dead letter with everything its message carried.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    /// Dead-letter id.
    pub id: i64,
    /// Original queue.
    pub queue: String,
    /// Original partition.
    pub partition: u32,
    /// Original sequence number.
    pub seq: i64,
    /// Original message id.
    pub message_id: i64,
    /// Payload: UTF-8 text as is, anything else as `base16:<hex>`.
    #[serde(serialize_with = "ser_bytes")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub payload: Vec<u8>,
    /// Payload type.
    pub payload_type: String,
    /// Headers.
    pub headers: Headers,
    /// When the message was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
    /// The last error (handler's reason).
    pub last_error: Option<String>,
    /// Delivery attempts (plus failed reprocessing attempts).
    pub attempts: i64,
    /// Current status.
    pub status: DeadLetterStatus,
    /// Who claimed it (reprocessing).
    pub claimed_by: Option<String>,
    /// When it reached a final status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Until when the claim holds (reprocessing).
    pub deadline: Option<DateTime<Utc>>,
}

fn ser_bytes<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    match std::str::from_utf8(b) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.serialize_str(&format!("base16:{}", hex(b))),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which dead letters a call applies to. Every field narrows; the default matches all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeadLetterFilter {
    /// Exact queue.
    pub queue: Option<String>,
    /// Exact partition (with or without `queue`).
    pub partition: Option<u32>,
    /// Exact payload type.
    pub payload_type: Option<String>,
    /// Exact status.
    pub status: Option<DeadLetterStatus>,
    /// `failed_at >= failed_after`.
    pub failed_after: Option<DateTime<Utc>>,
    /// `failed_at < failed_before`.
    pub failed_before: Option<DateTime<Utc>>,
    /// Only these ids.
    pub ids: Option<Vec<i64>>,
}

impl DeadLetterFilter {
    fn validate(&self) -> Result<()> {
        // Longer than any stored value or with control characters (PostgreSQL text cannot even
        // hold a NUL): a typed error, not a database one.
        for (what, value, max) in [
            ("queue", &self.queue, crate::message::MAX_QUEUE_NAME_BYTES),
            (
                "payload_type",
                &self.payload_type,
                crate::message::MAX_PAYLOAD_TYPE_BYTES,
            ),
        ] {
            if let Some(v) = value
                && (v.len() > max || v.chars().any(char::is_control))
            {
                return Err(OutboxError::InvalidInput(format!(
                    "the {what} filter must be at most {max} bytes, without control characters"
                )));
            }
        }
        if let (Some(a), Some(b)) = (self.failed_after, self.failed_before)
            && a >= b
        {
            return Err(OutboxError::InvalidInput(
                "failed_after must be before failed_before".into(),
            ));
        }
        if let Some(ids) = &self.ids
            && (ids.is_empty() || ids.len() as u64 > MAX_BATCH)
        {
            return Err(OutboxError::InvalidInput(format!(
                "ids must name 1..={MAX_BATCH} dead letters"
            )));
        }
        Ok(())
    }

    /// `WHERE` conditions (joined with AND, `1 = 1` when empty) and their values.
    fn sql(&self, d: Dialect) -> (String, Vec<Value>) {
        let mut conds = vec!["1 = 1".to_owned()];
        let mut vals = Vec::new();
        if let Some(q) = &self.queue {
            conds.push("queue = ?".into());
            vals.push(Value::from(q.as_str()));
        }
        if let Some(p) = self.partition {
            conds.push(format!("{} = ?", d.q("partition")));
            vals.push(Value::from(p as i32));
        }
        if let Some(t) = &self.payload_type {
            conds.push("payload_type = ?".into());
            vals.push(Value::from(t.as_str()));
        }
        if let Some(s) = self.status {
            conds.push("status = ?".into());
            vals.push(Value::from(s.as_str()));
        }
        if let Some(t) = self.failed_after {
            conds.push("failed_at >= ?".into());
            vals.push(d.time(t));
        }
        if let Some(t) = self.failed_before {
            conds.push("failed_at < ?".into());
            vals.push(d.time(t));
        }
        if let Some(ids) = &self.ids {
            conds.push(format!("id IN ({})", placeholders(ids.len())));
            vals.extend(ids.iter().map(|i| Value::from(*i)));
        }
        (conds.join(" AND "), vals)
    }
}

/// How many dead letters have one status.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusCount {
    /// The status.
    pub status: DeadLetterStatus,
    /// Dead letters in it.
    pub count: u64,
}

/// One page of [`DeadLetters::list`]: newest first.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeadLetterPage {
    /// The dead letters, newest (highest id) first.
    pub items: Vec<DeadLetter>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_cursor: Option<i64>,
}

const COLUMNS: &str = "id, queue, {part} AS part, seq, message_id, payload, payload_type, headers, \
     created_at, failed_at, last_error, attempts, status, claimed_by, completed_at, deadline";

fn columns(d: Dialect) -> String {
    COLUMNS.replace("{part}", &d.q("partition"))
}

fn row_to_dead_letter(r: &QueryResult) -> Result<DeadLetter> {
    let status: String = r.try_get("", "status")?;
    Ok(DeadLetter {
        id: r.try_get("", "id")?,
        queue: r.try_get("", "queue")?,
        partition: r.try_get::<i32>("", "part")? as u32,
        seq: r.try_get("", "seq")?,
        message_id: r.try_get("", "message_id")?,
        payload: r.try_get("", "payload")?,
        payload_type: r.try_get("", "payload_type")?,
        headers: decode_headers(r.try_get("", "headers")?),
        created_at: get_time(r, "created_at")?,
        failed_at: get_time(r, "failed_at")?,
        last_error: r.try_get("", "last_error")?,
        attempts: r.try_get("", "attempts")?,
        status: status.parse()?,
        claimed_by: r.try_get("", "claimed_by")?,
        completed_at: get_opt_time(r, "completed_at")?,
        deadline: get_opt_time(r, "deadline")?,
    })
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplayReport {
    /// Dead letters re-enqueued (now `replayed`).
    pub replayed: u64,
}

/// The dead-letter API. Works on any connection to an outbox database; it needs no running
/// engine and no registered queues (the CLI and the HTTP API use it standalone).
#[derive(Clone)]
pub struct DeadLetters {
    db: Db,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// The dead-letter API on `conn`.
    pub fn new(conn: DatabaseConnection) -> Result<Self> {
        let d = Dialect::of(&conn)?;
        Ok(Self {
            db: Db::new(conn, d),
        })
    }

    pub(crate) fn from_db(db: Db) -> Self {
        Self { db }
    }

    /// Lists dead letters matching `filter`, newest first, `limit` per page (1..=
    /// [`MAX_PAGE_SIZE`]); `before` is the previous page's `next_cursor` (keyset pagination).
    pub async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: u64,
        before: Option<i64>,
    ) -> Result<DeadLetterPage> {
        filter.validate()?;
        if limit == 0 || limit > MAX_PAGE_SIZE {
            return Err(OutboxError::InvalidInput(format!(
                "limit must be 1..={MAX_PAGE_SIZE}"
            )));
        }
        let d = self.db.dialect;
        let (mut wh, mut vals) = filter.sql(d);
        if let Some(c) = before {
            wh.push_str(" AND id < ?");
            vals.push(Value::from(c));
        }
        vals.push(Value::from(limit + 1));
        let sql = format!(
            "SELECT {} FROM modkit_outbox_dead_letters WHERE {wh} ORDER BY id DESC LIMIT ?",
            columns(d)
        );
        let rows = self.db.query_all(&sql, vals).await?;
        let mut items = rows
            .iter()
            .map(row_to_dead_letter)
            .collect::<Result<Vec<_>>>()?;
        let next_cursor = if items.len() as u64 > limit {
            items.truncate(limit as usize);
            items.last().map(|x| x.id)
        } else {
            None
        };
        Ok(DeadLetterPage { items, next_cursor })
    }

    /// Counts dead letters matching `filter`.
    pub async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        filter.validate()?;
        let (wh, vals) = filter.sql(self.db.dialect);
        let rows = self
            .db
            .query_all(
                &format!("SELECT COUNT(*) AS n FROM modkit_outbox_dead_letters WHERE {wh}"),
                vals,
            )
            .await?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get("", "n"))
            .transpose()?
            .unwrap_or(0);
        Ok(n as u64)
    }

    /// One dead letter, `None` if there is no such id.
    pub async fn get(&self, id: i64) -> Result<Option<DeadLetter>> {
        let sql = format!(
            "SELECT {} FROM modkit_outbox_dead_letters WHERE id = ?",
            columns(self.db.dialect)
        );
        let rows = self.db.query_all(&sql, vec![Value::from(id)]).await?;
        rows.first().map(row_to_dead_letter).transpose()
    }

    /// Counts per status (every status present, zero when none).
    pub async fn count_by_status(&self) -> Result<Vec<StatusCount>> {
        let rows = self
            .db
            .query_all(
                "SELECT status, COUNT(*) AS n FROM modkit_outbox_dead_letters GROUP BY status",
                vec![],
            )
            .await?;
        let mut out: Vec<StatusCount> = DeadLetterStatus::ALL
            .iter()
            .map(|s| StatusCount {
                status: *s,
                count: 0,
            })
            .collect();
        for r in &rows {
            let s: String = r.try_get("", "status")?;
            let n: i64 = r.try_get("", "n")?;
            if let Ok(st) = s.parse::<DeadLetterStatus>()
                && let Some(slot) = out.iter_mut().find(|c| c.status == st)
            {
                slot.count = n as u64;
            }
        }
        Ok(out)
    }

    /// Locks up to `limit` rows matching `filter` and `status_cond`, oldest first.
    async fn lock_matching<C: ConnectionTrait>(
        &self,
        c: &C,
        filter: &DeadLetterFilter,
        status_cond: &str,
        extra: Vec<Value>,
        limit: u64,
    ) -> Result<Vec<DeadLetter>> {
        let d = self.db.dialect;
        let (wh, mut vals) = filter.sql(d);
        vals.extend(extra);
        vals.push(Value::from(limit));
        let sql = format!(
            "SELECT {} FROM modkit_outbox_dead_letters WHERE {wh} AND {status_cond} \
             ORDER BY id LIMIT ?{}",
            columns(d),
            d.lock_skip_locked()
        );
        let rows = query_all(c, d, &sql, vals).await?;
        rows.iter().map(row_to_dead_letter).collect()
    }

    fn check_batch(limit: u64) -> Result<()> {
        if limit == 0 || limit > MAX_BATCH {
            return Err(OutboxError::InvalidInput(format!(
                "limit must be 1..={MAX_BATCH}"
            )));
        }
        Ok(())
    }

    /// Re-enqueues up to `limit` **pending** dead letters matching `filter` into their original
    /// queue and partition, after the partition's current tail, in their original relative
    /// order (dead-letter id order), and marks them `replayed` in the same transaction. Safe
    /// with several callers at once: rows another caller is replaying are skipped.
    pub async fn replay(&self, filter: &DeadLetterFilter, limit: u64) -> Result<ReplayReport> {
        filter.validate()?;
        Self::check_batch(limit)?;
        let d = self.db.dialect;
        let w = self.db.begin_write().await?;
        let rows = self
            .lock_matching(&w.txn, filter, "status = 'pending'", vec![], limit)
            .await?;
        if rows.is_empty() {
            w.rollback().await?;
            return Ok(ReplayReport::default());
        }
        // Partition ids of the originals (FK'd, so they exist).
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let pid_rows = query_all(
            &w.txn,
            d,
            &format!(
                "SELECT id, partition_id FROM modkit_outbox_dead_letters WHERE id IN ({})",
                placeholders(ids.len())
            ),
            ids.iter().map(|i| Value::from(*i)).collect(),
        )
        .await?;
        let mut pid = std::collections::HashMap::new();
        for r in &pid_rows {
            pid.insert(
                r.try_get::<i64>("", "id")?,
                r.try_get::<i64>("", "partition_id")?,
            );
        }
        let msgs: Vec<crate::message::NewMessage> = rows
            .iter()
            .map(|r| crate::message::NewMessage {
                queue: r.queue.clone(),
                partition: r.partition,
                payload: r.payload.clone().into(),
                payload_type: r.payload_type.clone(),
                headers: r.headers.clone(),
            })
            .collect();
        let resolved: Vec<crate::enqueue::Resolved<'_>> = msgs
            .iter()
            .zip(&rows)
            .map(|(m, r)| crate::enqueue::Resolved {
                msg: m,
                partition_id: pid[&r.id],
                headers: crate::message::encode_headers(&m.headers),
            })
            .collect();
        crate::enqueue::insert(&w.txn, d, &resolved, true).await?;
        let now = Utc::now();
        let n = crate::backend::execute(
            &w.txn,
            d,
            &format!(
                "UPDATE modkit_outbox_dead_letters SET status = 'replayed', completed_at = ?, \
                 claimed_by = NULL, deadline = NULL WHERE status = 'pending' AND id IN ({})",
                placeholders(ids.len())
            ),
            std::iter::once(d.time(now))
                .chain(ids.iter().map(|i| Value::from(*i)))
                .collect(),
        )
        .await?;
        if n != ids.len() as u64 {
            w.rollback().await?;
            return Err(OutboxError::Conflict(
                "dead letters changed during replay; nothing replayed".into(),
            ));
        }
        if d == Dialect::Postgres {
            query_all(&w.txn, d, postgres::NOTIFY_INCOMING, vec![]).await?;
        }
        w.commit().await?;
        tracing::info!(replayed = n, "dead letters re-enqueued");
        Ok(ReplayReport { replayed: n })
    }

    /// Claims up to `limit` dead letters matching `filter` for the caller to process itself:
    /// `pending` ones, and `reprocessing` ones whose deadline passed (an earlier claimer gave up
    /// or died). They become `reprocessing` with `deadline = now + lease`, owned by `claimer`.
    pub async fn claim(
        &self,
        filter: &DeadLetterFilter,
        limit: u64,
        lease: Duration,
        claimer: &str,
    ) -> Result<Vec<DeadLetter>> {
        filter.validate()?;
        Self::check_batch(limit)?;
        if claimer.is_empty() || claimer.len() > 64 {
            return Err(OutboxError::InvalidInput(
                "claimer must be 1..=64 bytes".into(),
            ));
        }
        let d = self.db.dialect;
        let now = Utc::now();
        let deadline = chrono::Duration::from_std(lease)
            .ok()
            .and_then(|l| now.checked_add_signed(l))
            .ok_or_else(|| OutboxError::InvalidInput("claim lease too long".into()))?;
        let w = self.db.begin_write().await?;
        let mut rows = self
            .lock_matching(
                &w.txn,
                filter,
                "(status = 'pending' OR (status = 'reprocessing' AND deadline < ?))",
                vec![d.time(now)],
                limit,
            )
            .await?;
        if rows.is_empty() {
            w.rollback().await?;
            return Ok(rows);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let mut vals = vec![d.time(deadline), Value::from(claimer), d.time(now)];
        vals.extend(ids.iter().map(|i| Value::from(*i)));
        let n = crate::backend::execute(
            &w.txn,
            d,
            &format!(
                "UPDATE modkit_outbox_dead_letters SET status = 'reprocessing', deadline = ?, \
                 claimed_by = ? WHERE (status = 'pending' OR (status = 'reprocessing' AND deadline < ?)) \
                 AND id IN ({})",
                placeholders(ids.len())
            ),
            vals,
        )
        .await?;
        if n != ids.len() as u64 {
            w.rollback().await?;
            return Err(OutboxError::Conflict(
                "dead letters changed during claim; nothing claimed".into(),
            ));
        }
        w.commit().await?;
        for r in &mut rows {
            r.status = DeadLetterStatus::Reprocessing;
            r.deadline = Some(deadline);
            r.claimed_by = Some(claimer.to_owned());
        }
        Ok(rows)
    }

    async fn transition(&self, id: i64, sql: &str, vals: Vec<Value>, want: &str) -> Result<()> {
        let n = self.db.exec_write(sql, vals).await?;
        if n == 1 {
            return Ok(());
        }
        match self.get(id).await? {
            None => Err(OutboxError::NotFound(id)),
            Some(dl) => Err(OutboxError::WrongState {
                id,
                status: dl.status,
                expected: want.to_owned(),
            }),
        }
    }

    /// Marks a claimed dead letter as processed. Only its claimer can, and only while it is
    /// `reprocessing`.
    pub async fn resolve(&self, id: i64, claimer: &str) -> Result<()> {
        let d = self.db.dialect;
        self.transition(
            id,
            "UPDATE modkit_outbox_dead_letters SET status = 'resolved', completed_at = ?, deadline = NULL \
             WHERE id = ? AND status = 'reprocessing' AND claimed_by = ?",
            vec![d.time(Utc::now()), Value::from(id), Value::from(claimer)],
            "reprocessing (claimed by the caller)",
        )
        .await
    }

    /// Gives a claimed dead letter back as `pending`, recording the error (bounded as
    /// [`crate::MAX_ERROR_TEXT_BYTES`] says) and one more attempt.
    pub async fn fail(&self, id: i64, claimer: &str, error: &str) -> Result<()> {
        self.transition(
            id,
            "UPDATE modkit_outbox_dead_letters SET status = 'pending', last_error = ?, \
             attempts = attempts + 1, deadline = NULL, claimed_by = NULL \
             WHERE id = ? AND status = 'reprocessing' AND claimed_by = ?",
            vec![
                Value::from(crate::message::storable_error(error)),
                Value::from(id),
                Value::from(claimer),
            ],
            "reprocessing (claimed by the caller)",
        )
        .await
    }

    /// Discards pending dead letters matching `filter` (up to `limit`); returns how many.
    pub async fn discard(&self, filter: &DeadLetterFilter, limit: u64) -> Result<u64> {
        filter.validate()?;
        Self::check_batch(limit)?;
        let d = self.db.dialect;
        let w = self.db.begin_write().await?;
        let rows = self
            .lock_matching(&w.txn, filter, "status = 'pending'", vec![], limit)
            .await?;
        if rows.is_empty() {
            w.rollback().await?;
            return Ok(0);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let mut vals = vec![d.time(Utc::now())];
        vals.extend(ids.iter().map(|i| Value::from(*i)));
        let n = crate::backend::execute(
            &w.txn,
            d,
            &format!(
                "UPDATE modkit_outbox_dead_letters SET status = 'discarded', completed_at = ? \
                 WHERE status = 'pending' AND id IN ({})",
                placeholders(ids.len())
            ),
            vals,
        )
        .await?;
        w.commit().await?;
        Ok(n)
    }

    /// Deletes finished dead letters (`replayed`, `resolved`, `discarded`) that completed before
    /// `cutoff`, `chunk` rows per statement, calling `progress(deleted_so_far)` after each chunk.
    /// Returns the total deleted.
    pub async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        chunk: u64,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<u64> {
        Self::check_batch(chunk)?;
        let d = self.db.dialect;
        let mut total = 0;
        loop {
            // Read ids first, then delete by primary key: MySQL rejects a DELETE whose subquery
            // reads the same table.
            let rows = self
                .db
                .query_all(
                    "SELECT id FROM modkit_outbox_dead_letters \
                     WHERE status IN ('replayed', 'resolved', 'discarded') AND completed_at < ? \
                     ORDER BY id LIMIT ?",
                    vec![d.time(cutoff), Value::from(chunk)],
                )
                .await?;
            if rows.is_empty() {
                return Ok(total);
            }
            let ids: Vec<i64> = rows
                .iter()
                .map(|r| r.try_get::<i64>("", "id"))
                .collect::<std::result::Result<_, _>>()?;
            let mut vals = d.list_args(&ids);
            vals.push(d.time(cutoff));
            let n = self
                .db
                .exec_write(
                    &d.delete_ids(
                        "modkit_outbox_dead_letters",
                        ids.len(),
                        "status IN ('replayed', 'resolved', 'discarded') AND completed_at < ?",
                    ),
                    vals,
                )
                .await?;
            total += n;
            progress(total);
            if (rows.len() as u64) < chunk {
                return Ok(total);
            }
        }
    }
}
