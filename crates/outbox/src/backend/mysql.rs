//! MySQL/MariaDB specifics. There is no `INSERT … RETURNING` on MySQL 8, and `LAST_INSERT_ID()`
//! gives only the first id of a multi-row insert (the rest need not be consecutive: interleaved
//! auto-increment locking, `auto_increment_increment` > 1 on clusters). A batch therefore tags its
//! body rows with a random `batch_token` and reads the ids back in id order.

/// Reads back the ids of the body rows a batch insert tagged with its token.
pub(crate) const BATCH_IDS: &str = "SELECT id FROM modkit_outbox_body \
     WHERE id >= ? AND batch_token = ? ORDER BY id LIMIT ?";
