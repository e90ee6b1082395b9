//! Human-readable tables, JSON and progress bars, and the printing macros every command uses:
//! [`out!`] and [`err!`] never panic on a closed pipe (`outbox dead-letters list | head` would
//! otherwise end in a `println!` panic).

/// `println!` without the panic: on a closed stdout (`| head`) the process ends quietly with
/// status 0, as the reader wanted no more; another write error ends it with status 1.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::output::stdout_failed(e);
        }
    }};
}

/// `eprintln!` without the panic: a closed stderr loses the line, nothing else.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub(crate) use {err, out};

/// Ends the process after stdout could not be written.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    err!("outbox: cannot write to stdout: {e}");
    std::process::exit(1);
}

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use modkit_outbox::{DeadLetter, DeadLetterPage, OutboxStats};
use serde::Serialize;

pub fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => out!("{s}"),
        Err(e) => err!("outbox: cannot encode JSON: {e}"),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) if ms < 120_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m", ms / 60_000),
    }
}

pub fn stats_table(s: &OutboxStats) {
    let mut t = table(&[
        "queue",
        "part",
        "unsequenced",
        "unprocessed",
        "processed",
        "oldest",
        "lease",
        "retry",
    ]);
    for p in &s.partitions {
        let lease = match (&p.lease_holder, p.lease_until) {
            (Some(h), Some(u)) if u > s.collected_at => {
                format!("{h} ({}s)", (u - s.collected_at).num_seconds())
            }
            _ => "-".into(),
        };
        let retry = if p.attempts > 0 {
            format!(
                "{} attempt(s): {}",
                p.attempts,
                p.last_error.as_deref().unwrap_or("")
            )
        } else {
            "-".into()
        };
        t.add_row(vec![
            p.queue.clone(),
            p.partition.to_string(),
            p.unsequenced.to_string(),
            p.unprocessed.to_string(),
            p.processed_seq.to_string(),
            age(p.oldest_pending_age_ms),
            lease,
            retry,
        ]);
    }
    out!("{t}");
    let dead: Vec<String> = s
        .dead_letters
        .iter()
        .map(|c| format!("{}={}", c.status, c.count))
        .collect();
    out!(
        "backlog {} · dead letters: {} · at {}",
        s.backlog(),
        dead.join(" "),
        s.collected_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s: String = s.chars().take(48).collect();
    if b.len() > 48 { format!("{s}…") } else { s }
}

pub fn dead_letter_table(page: &DeadLetterPage) {
    let mut t = table(&[
        "id",
        "queue",
        "part",
        "seq",
        "type",
        "status",
        "attempts",
        "failed at",
        "error",
    ]);
    for d in &page.items {
        t.add_row(vec![
            d.id.to_string(),
            d.queue.clone(),
            d.partition.to_string(),
            d.seq.to_string(),
            d.payload_type.clone(),
            d.status.to_string(),
            d.attempts.to_string(),
            d.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            d.last_error.clone().unwrap_or_default(),
        ]);
    }
    out!("{t}");
    match page.next_cursor {
        Some(c) => out!("more: --before {c}"),
        None => out!("{} shown, no more", page.items.len()),
    }
}

pub fn dead_letter_detail(d: &DeadLetter) {
    let mut t = table(&["field", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("id", d.id.to_string()),
        (
            "queue / partition / seq",
            format!("{} / {} / {}", d.queue, d.partition, d.seq),
        ),
        ("message id", d.message_id.to_string()),
        ("payload type", d.payload_type.clone()),
        ("status", d.status.to_string()),
        ("attempts", d.attempts.to_string()),
        ("last error", d.last_error.clone().unwrap_or_default()),
        ("created at", d.created_at.to_rfc3339()),
        ("failed at", d.failed_at.to_rfc3339()),
        (
            "completed at",
            d.completed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ),
        (
            "claimed by / deadline",
            format!(
                "{} / {}",
                d.claimed_by.clone().unwrap_or_default(),
                d.deadline.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
        ),
        (
            "headers",
            serde_json::to_string(&d.headers).unwrap_or_default(),
        ),
        ("payload", preview(&d.payload)),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    out!("{t}");
}

/// A progress bar on a terminal, nothing otherwise (or with --json).
pub fn progress(total: u64, json: bool) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}

pub fn spinner(json: bool) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    ProgressBar::new_spinner()
}
