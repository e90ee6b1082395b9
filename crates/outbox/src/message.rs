//! Messages going in ([`NewMessage`]) and coming out ([`Message`]), headers, partition counts,
//! and the input validation shared by every entry point.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::config::MAX_PARTITIONS;
use crate::error::{OutboxError, Result};

/// Per-message headers: a sorted string map stored with the body and handed to the handler
/// (W3C `traceparent`, idempotency keys…). Names are 1..=128 bytes without control characters
/// or whitespace; values at most 8 KiB; at most 64 headers per message, and at most
/// [`MAX_HEADERS_BYTES`] once encoded.
pub type Headers = BTreeMap<String, String>;

/// Most headers one message may carry.
pub const MAX_HEADERS: usize = 64;
/// Longest header name in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 128;
/// Longest header value in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// Most bytes a message's headers may take once stored (encoded as a JSON object). MySQL keeps
/// them in a `TEXT` column, which holds 65,535 bytes.
pub const MAX_HEADERS_BYTES: usize = 60 * 1024;
/// Longest failure reason stored, in bytes (a partition's `last_error`, a dead letter's). A
/// longer reason (a handler's `Retry`/`Reject` text, its error, or [`crate::DeadLetters::fail`]'s)
/// is cut at a character boundary and marked; NUL characters, which PostgreSQL text cannot
/// hold, are stored as U+FFFD. Storing the reason must never fail, or the attempt could not be
/// counted and the message would never be dead-lettered.
pub const MAX_ERROR_TEXT_BYTES: usize = 8 * 1024;
/// Longest payload type in bytes.
pub const MAX_PAYLOAD_TYPE_BYTES: usize = 255;
/// Longest queue name in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 63;

/// Partition count of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions(u32);

impl Partitions {
    /// `n` partitions, 1..=[`MAX_PARTITIONS`] (checked when the outbox starts).
    pub const fn of(n: u32) -> Self {
        Partitions(n)
    }

    /// The partition count.
    pub const fn count(self) -> u32 {
        self.0
    }

    pub(crate) fn validate(self) -> Result<u32> {
        if self.0 == 0 || self.0 > MAX_PARTITIONS {
            return Err(OutboxError::InvalidPartitionCount(self.0));
        }
        Ok(self.0)
    }
}

/// Stable id of a delivered message (the id of its body row). Never reused, so it serves as an
/// idempotency key for consumers.
pub type MessageId = i64;

/// A message handed to a handler.
#[derive(Debug, Clone)]
pub struct Message {
    /// Stable id (never reused): use it as an idempotency key.
    pub id: MessageId,
    /// Queue name.
    pub queue: Arc<str>,
    /// Partition index within the queue.
    pub partition: u32,
    /// Position in the partition: 1, 2, 3… without gaps.
    pub seq: i64,
    /// The payload as enqueued.
    pub payload: Bytes,
    /// The payload type as enqueued.
    pub payload_type: String,
    /// Headers as enqueued (empty when none).
    pub headers: Headers,
    /// This delivery's attempt number, starting at 1.
    pub attempts: u32,
    /// When the message was enqueued.
    pub created_at: DateTime<Utc>,
}

/// A message to enqueue with [`crate::Outbox::enqueue_batch`] or
/// [`crate::Outbox::enqueue_message`].
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Target queue.
    pub queue: String,
    /// Target partition.
    pub partition: u32,
    /// Payload bytes.
    pub payload: Bytes,
    /// Payload type (e.g. `order.created`).
    pub payload_type: String,
    /// Optional headers.
    pub headers: Headers,
}

impl NewMessage {
    /// A message for `queue`/`partition`.
    pub fn new(
        queue: impl Into<String>,
        partition: u32,
        payload: impl Into<Bytes>,
        payload_type: impl Into<String>,
    ) -> Self {
        Self {
            queue: queue.into(),
            partition,
            payload: payload.into(),
            payload_type: payload_type.into(),
            headers: Headers::new(),
        }
    }

    /// A message whose partition is chosen from `key` with [`partition_for_key`].
    pub fn keyed(
        queue: impl Into<String>,
        partitions: Partitions,
        key: impl AsRef<[u8]>,
        payload: impl Into<Bytes>,
        payload_type: impl Into<String>,
    ) -> Self {
        Self::new(
            queue,
            partition_for_key(key, partitions),
            payload,
            payload_type,
        )
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// Maps a key (an aggregate id, a tenant…) to a partition: `xxh3_64(key) % partitions`.
///
/// XXH3-64 with seed 0 is a fixed, documented algorithm, so the mapping is stable across
/// processes, versions and platforms: the same key always lands in the same partition as long
/// as the partition count stays the same.
pub fn partition_for_key(key: impl AsRef<[u8]>, partitions: Partitions) -> u32 {
    let n = u64::from(partitions.count().max(1));
    (xxhash_rust::xxh3::xxh3_64(key.as_ref()) % n) as u32
}

pub(crate) fn validate_queue_name(name: &str) -> Result<()> {
    let err = |reason| {
        Err(OutboxError::InvalidQueueName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return err("empty");
    }
    if name.len() > MAX_QUEUE_NAME_BYTES {
        return err("longer than 63 bytes");
    }
    let mut chars = name.chars();
    if !chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return err("must start with a-z or 0-9");
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c)) {
        return err("only a-z, 0-9, '_', '.' and '-' are allowed");
    }
    Ok(())
}

pub(crate) fn validate_payload_type(t: &str) -> Result<()> {
    let err = |reason| {
        Err(OutboxError::InvalidPayloadType {
            payload_type: t.to_owned(),
            reason,
        })
    };
    if t.is_empty() {
        return err("empty");
    }
    if t.len() > MAX_PAYLOAD_TYPE_BYTES {
        return err("longer than 255 bytes");
    }
    if t.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return err("contains whitespace or control characters");
    }
    Ok(())
}

/// Checks the header rules and returns the headers as stored ([`encode_headers`]), encoded once.
pub(crate) fn validate_headers(h: &Headers) -> Result<Option<String>> {
    if h.len() > MAX_HEADERS {
        return Err(OutboxError::InvalidHeader {
            name: format!("({} headers)", h.len()),
            reason: "more than 64 headers",
        });
    }
    for (name, value) in h {
        let err = |reason| {
            Err(OutboxError::InvalidHeader {
                name: name.clone(),
                reason,
            })
        };
        if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
            return err("name must be 1..=128 bytes");
        }
        if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return err("name contains whitespace or control characters");
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return err("value longer than 8 KiB");
        }
    }
    let stored = encode_headers(h);
    if stored.as_ref().map_or(0, String::len) > MAX_HEADERS_BYTES {
        return Err(OutboxError::InvalidHeader {
            name: format!("({} headers)", h.len()),
            reason: "more than 60 KiB once encoded",
        });
    }
    Ok(stored)
}

/// A failure reason as stored: at most [`MAX_ERROR_TEXT_BYTES`], without NUL characters.
pub(crate) fn storable_error(text: &str) -> String {
    const MARK: &str = " … (cut)";
    let text = text.replace('\0', "\u{FFFD}");
    if text.len() <= MAX_ERROR_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_ERROR_TEXT_BYTES - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = text[..end].to_owned();
    out.push_str(MARK);
    out
}

/// Headers as stored: `NULL` when empty, a JSON object otherwise.
pub(crate) fn encode_headers(h: &Headers) -> Option<String> {
    if h.is_empty() {
        None
    } else {
        serde_json::to_string(h).ok()
    }
}

pub(crate) fn decode_headers(s: Option<String>) -> Headers {
    s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_errors_are_bounded_and_nul_free() {
        assert_eq!(storable_error("plain"), "plain");
        assert_eq!(storable_error("a\0b"), "a\u{FFFD}b");
        // Multi-byte characters across the cut: still valid UTF-8, within the bound.
        let long = "é".repeat(MAX_ERROR_TEXT_BYTES);
        let s = storable_error(&long);
        assert!(s.len() <= MAX_ERROR_TEXT_BYTES, "{}", s.len());
        assert!(s.ends_with("(cut)") && s.starts_with("éé"));
        let exact = "x".repeat(MAX_ERROR_TEXT_BYTES);
        assert_eq!(storable_error(&exact), exact);
        // A NUL grows by two bytes when replaced: still within the bound.
        let nul = format!("\0{exact}");
        assert!(storable_error(&nul).len() <= MAX_ERROR_TEXT_BYTES);
    }

    #[test]
    fn headers_are_bounded_once_encoded() {
        let mut h = Headers::new();
        for i in 0..8 {
            h.insert(format!("h{i}"), "v".repeat(MAX_HEADER_VALUE_BYTES));
        }
        assert!(
            validate_headers(&h).is_err(),
            "8 × 8 KiB is over 60 KiB encoded"
        );
        h.remove("h7");
        assert!(validate_headers(&h).is_ok(), "7 × 8 KiB fits");
    }

    #[test]
    fn key_mapping_is_stable_and_in_range() {
        let p = Partitions::of(16);
        // Pinned values: changing them would move existing keys to other partitions.
        assert_eq!(
            partition_for_key("order-42", p),
            partition_for_key(b"order-42", p)
        );
        let a = partition_for_key("order-42", p);
        for _ in 0..10 {
            assert_eq!(partition_for_key("order-42", p), a);
        }
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(b""),
            0x2d06_8005_38d3_94c2,
            "XXH3-64 of the empty input is a published test vector"
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let part = partition_for_key(format!("k{i}"), p);
            assert!(part < 16);
            seen.insert(part);
        }
        assert_eq!(seen.len(), 16, "keys spread over every partition");
    }

    #[test]
    fn validation() {
        assert!(validate_queue_name("orders").is_ok());
        assert!(validate_queue_name("orders.v2-eu_1").is_ok());
        for bad in ["", "Orders", "_x", "a b", "ä", &"x".repeat(64)] {
            assert!(validate_queue_name(bad).is_err(), "{bad}");
        }
        assert!(validate_payload_type("order.created").is_ok());
        for bad in ["", "a b", "a\n", &"x".repeat(256)] {
            assert!(validate_payload_type(bad).is_err(), "{bad}");
        }
        let mut h = Headers::new();
        h.insert("traceparent".into(), "00-abc-def-01".into());
        assert!(validate_headers(&h).is_ok());
        h.insert("bad name".into(), "x".into());
        assert!(validate_headers(&h).is_err());
        assert!(Partitions::of(0).validate().is_err());
        assert!(Partitions::of(MAX_PARTITIONS + 1).validate().is_err());
    }

    #[test]
    fn headers_round_trip() {
        assert_eq!(encode_headers(&Headers::new()), None);
        let mut h = Headers::new();
        h.insert("k".into(), "v\"".into());
        assert_eq!(decode_headers(encode_headers(&h)), h);
    }
}
