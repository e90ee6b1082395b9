//! MySQL/MariaDB specifics. There is no `INSERT … RETURNING` on MySQL 8, and `LAST_INSERT_ID()`
//! gives only the first id of a multi-row insert (the rest need not be consecutive: interleaved
//! auto-increment locking, `auto_increment_increment` > 1 on clusters). A batch therefore tags its
//! body rows with a random `batch_token` and reads the ids back in id order.

/// Reads back the ids of the body rows a batch insert tagged with its token.
pub(crate) const BATCH_IDS: &str = "SELECT id FROM modkit_outbox_body \
     WHERE id >= ? AND batch_token = ? ORDER BY id LIMIT ?";

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::MAX_IN_LIST;

/// The writes of a sequencing pass as a few text-protocol round trips instead of three prepared
/// statements (and, for a new row count, a prepare each): every batch is `INSERT` of up to
/// [`MAX_IN_LIST`] `outgoing` rows plus the `DELETE` of the same rows' `incoming` ids, and the
/// last batch also advances the partitions' sequences. The statements and their order inside
/// the transaction are what the prepared path sends, under the same partition-row locks.
///
/// Every value is an integer the engine read or computed, or `now` rendered by us: nothing
/// from a caller is spliced into SQL. Returns each batch with the rows it must affect (MySQL
/// sums the affected rows of a multi-statement batch): `outgoing[k]` belongs to
/// `incoming_ids[k]`.
pub(crate) fn sequence_writes(
    outgoing: &[(i64, i64, i64)],
    incoming_ids: &[i64],
    new_seq: &[(i64, i64)],
    now: DateTime<Utc>,
) -> Vec<(String, u64)> {
    debug_assert_eq!(outgoing.len(), incoming_ids.len());
    let at = now.format("'%Y-%m-%d %H:%M:%S%.6f'").to_string();
    let chunks = outgoing.len().div_ceil(MAX_IN_LIST).max(1);
    let mut out = Vec::with_capacity(chunks);
    for (i, (rows, ids)) in outgoing
        .chunks(MAX_IN_LIST)
        .zip(incoming_ids.chunks(MAX_IN_LIST))
        .enumerate()
    {
        let mut sql = String::with_capacity(64 * rows.len() + 256);
        sql.push_str(
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES ",
        );
        for (k, (pid, body, seq)) in rows.iter().enumerate() {
            let sep = if k > 0 { ", " } else { "" };
            let _ = write!(sql, "{sep}({pid}, {body}, {seq}, {at})");
        }
        // Driven by the ids, never a scan (see `Dialect::delete_ids`).
        let _ = write!(
            sql,
            "; DELETE t FROM ({}) k STRAIGHT_JOIN modkit_outbox_incoming t ON t.id = k.id",
            super::ids_table(ids.iter())
        );
        let mut expected = 2 * rows.len() as u64;
        if i + 1 == chunks {
            sql.push_str("; UPDATE modkit_outbox_partitions SET `sequence` = CASE id");
            for (pid, s) in new_seq {
                let _ = write!(sql, " WHEN {pid} THEN {s}");
            }
            sql.push_str(" END WHERE id IN (");
            push_list(&mut sql, new_seq.iter().map(|(pid, _)| pid));
            sql.push(')');
            expected += new_seq.len() as u64;
        }
        out.push((sql, expected));
    }
    out
}

fn push_list<'a>(sql: &mut String, ids: impl Iterator<Item = &'a i64>) {
    for (k, id) in ids.enumerate() {
        let sep = if k > 0 { ", " } else { "" };
        let _ = write!(sql, "{sep}{id}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_writes_batch_rows_and_count_what_they_affect() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T06:10:40.123456Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let b = sequence_writes(&[(1, 10, 4), (2, 11, 1)], &[7, 8], &[(1, 4), (2, 1)], now);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0].0,
            "INSERT INTO modkit_outbox_outgoing (partition_id, body_id, seq, sequenced_at) VALUES \
             (1, 10, 4, '2026-11-23 06:10:40.123456'), (2, 11, 1, '2026-11-23 06:10:40.123456'); \
             DELETE t FROM (SELECT 7 AS id UNION ALL SELECT 8) k STRAIGHT_JOIN \
             modkit_outbox_incoming t ON t.id = k.id; \
             UPDATE modkit_outbox_partitions SET `sequence` = CASE id WHEN 1 THEN 4 WHEN 2 THEN 1 \
             END WHERE id IN (1, 2)"
        );
        assert_eq!(b[0].1, 2 + 2 + 2);

        // Big passes: IN lists stay below MariaDB's subquery conversion; the update comes last.
        let n = MAX_IN_LIST + 3;
        let rows: Vec<(i64, i64, i64)> = (0..n as i64).map(|k| (1, 100 + k, k + 1)).collect();
        let ids: Vec<i64> = (0..n as i64).collect();
        let b = sequence_writes(&rows, &ids, &[(1, n as i64)], now);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].1, 2 * MAX_IN_LIST as u64);
        assert_eq!(b[1].1, 2 * 3 + 1);
        assert!(!b[0].0.contains("UPDATE") && b[1].0.contains("UPDATE"));
    }
}
