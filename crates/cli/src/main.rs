//! `outbox`: operate a modkit-outbox database from the shell.
//!
//! ```sh
//! outbox migrate up                                   # DATABASE_URL or --database-url
//! outbox demo
//! outbox stats --watch
//! outbox dead-letters list --queue orders --status pending
//! outbox dead-letters replay --queue orders --yes
//! outbox dead-letters purge --older-than 7d --yes
//! ```

mod demo;
mod output;

use std::io::IsTerminal;

use crate::output::{err, out};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use modkit_outbox::{DeadLetterFilter, DeadLetterStatus, DeadLetters, MAX_BATCH, OutboxError};
use modkit_outbox_migration::Migrator;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;

/// Database used when neither `--database-url` nor `DATABASE_URL` is given: the demo's file.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://outbox-demo.sqlite?mode=rwc";

/// Exit codes (also listed in `outbox --help`).
mod exit {
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const CONFLICT: u8 = 4;
    pub const ABORTED: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Operate a modkit-outbox database: migrations, statistics, dead letters",
    after_help = "Exit codes: 0 ok, 1 error, 2 invalid input, 3 not found, 4 wrong state or conflict, \
                  5 aborted (no confirmation)."
)]
struct Cli {
    /// Database URL (PostgreSQL, MySQL/MariaDB or SQLite).
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the outbox schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Migrate, enqueue, process and print what happened.
    Demo,
    /// Backlog, lag, leases and retries per partition; dead letters per status.
    Stats {
        /// Refresh until interrupted.
        #[arg(long)]
        watch: bool,
        /// Refresh interval with --watch (e.g. 2s, 500ms).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Serve the HTTP admin API (stats, dead letters, /openapi.json).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Require `Authorization: Bearer <token>`. Beyond loopback a random token is generated
        /// and printed when none is given.
        #[arg(long, env = "OUTBOX_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Serve without a token even beyond loopback.
        #[arg(long, conflicts_with = "token")]
        no_auth: bool,
    },
    /// Inspect, replay, discard and purge dead letters.
    #[command(name = "dead-letters")]
    DeadLetters {
        #[command(subcommand)]
        action: DlAction,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply pending migrations.
    Up,
    /// Roll back every outbox migration (drops the outbox tables).
    Down {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Show applied and pending migrations.
    Status,
    /// Drop EVERY table of the database, then apply all migrations.
    Fresh {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Clone, Default)]
struct FilterArgs {
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Only this payload type.
    #[arg(long = "type")]
    payload_type: Option<String>,
    /// Only failures at or after this time (RFC 3339, e.g. 2026-11-23T00:00:00Z).
    #[arg(long)]
    failed_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Only failures before this time (RFC 3339).
    #[arg(long)]
    failed_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Only these ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<i64>,
}

impl FilterArgs {
    fn filter(&self, status: Option<DeadLetterStatus>) -> DeadLetterFilter {
        DeadLetterFilter {
            queue: self.queue.clone(),
            partition: self.partition,
            payload_type: self.payload_type.clone(),
            status,
            failed_after: self.failed_after,
            failed_before: self.failed_before,
            ids: (!self.ids.is_empty()).then(|| self.ids.clone()),
        }
    }
}

#[derive(Subcommand)]
enum DlAction {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this status (pending, reprocessing, replayed, resolved, discarded).
        #[arg(long)]
        status: Option<DeadLetterStatus>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Continue after this cursor (the previous page's `next_cursor`).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Show one dead letter with its payload.
    Show {
        /// Dead-letter id.
        id: i64,
    },
    /// Re-enqueue pending dead letters into their original queue and partition.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Replay at most this many (default: all that match).
        #[arg(long)]
        limit: Option<u64>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Mark pending dead letters as discarded.
    Discard {
        #[command(flatten)]
        filter: FilterArgs,
        /// Discard at most this many (default: all that match).
        #[arg(long)]
        limit: Option<u64>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Delete replayed, resolved and discarded dead letters completed before a cutoff.
    Purge {
        /// Age cutoff (e.g. 7d, 12h, 0s for everything finished).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<OutboxError> for Failure {
    fn from(e: OutboxError) -> Self {
        let code = match &e {
            OutboxError::NotFound(_) => exit::NOT_FOUND,
            OutboxError::WrongState { .. } | OutboxError::Conflict(_) => exit::CONFLICT,
            OutboxError::InvalidInput(_) => exit::USAGE,
            _ => exit::ERROR,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<sea_orm::DbErr> for Failure {
    fn from(e: sea_orm::DbErr) -> Self {
        Failure {
            code: exit::ERROR,
            message: format!("database error: {e}"),
        }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

async fn connect(url: &str) -> Result<DatabaseConnection, Failure> {
    open(url, |_| {}).await
}

/// A one-connection pool for migrations. sea-orm's `fresh` on SQLite turns `PRAGMA
/// foreign_keys` off, drops the tables and turns it back on as separate statements: on a bigger
/// pool a `DROP TABLE` can run on another connection with the checks still on and fail on the
/// rows it finds. Migrations run one statement at a time anyway.
async fn connect_migrator(url: &str) -> Result<DatabaseConnection, Failure> {
    open(url, |o| {
        o.max_connections(1)
            .acquire_timeout(Duration::from_secs(10));
    })
    .await
}

/// Opens a pool with the CLI's settings, adjusted by `tune`.
async fn open(
    url: &str,
    tune: impl FnOnce(&mut ConnectOptions),
) -> Result<DatabaseConnection, Failure> {
    let mut o = ConnectOptions::new(url.to_owned());
    o.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10));
    tune(&mut o);
    Database::connect(o)
        .await
        .map_err(|e| fail(exit::ERROR, format!("cannot connect to the database: {e}")))
}

/// Asks before a destructive action; refuses without a terminal.
fn confirm(yes: bool, what: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(fail(
            exit::ABORTED,
            format!("refusing to {what} without --yes (stdin is not a terminal)"),
        ));
    }
    {
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "{what}? [y/N] ").and_then(|()| e.flush());
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| fail(exit::ERROR, e.to_string()))?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(fail(exit::ABORTED, "aborted"))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            err!("outbox: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Demo => demo::run(&cli.database_url)
            .await
            .map_err(|e| fail(exit::ERROR, e.to_string())),
        Command::Migrate { action } => {
            let db = connect_migrator(&cli.database_url).await?;
            migrate(&db, action, cli.json).await
        }
        Command::Stats { watch, interval } => {
            let db = connect(&cli.database_url).await?;
            loop {
                let stats = modkit_outbox::collect_stats(&db).await?;
                if cli.json {
                    output::json(&stats);
                } else {
                    if watch && std::io::stdout().is_terminal() {
                        // Clear the terminal; the table that follows ends the line.
                        use std::io::Write as _;
                        if let Err(e) = write!(std::io::stdout().lock(), "\x1b[2J\x1b[H") {
                            output::stdout_failed(e);
                        }
                    }
                    output::stats_table(&stats);
                }
                if !watch {
                    return Ok(());
                }
                tokio::time::sleep(interval).await;
            }
        }
        Command::Serve {
            bind,
            token,
            no_auth,
        } => {
            let db = connect(&cli.database_url).await?;
            let token = match token {
                Some(t) => Some(t),
                None if !no_auth && !bind.ip().is_loopback() => {
                    let t = uuid::Uuid::new_v4().simple().to_string();
                    err!("outbox: listening beyond loopback; bearer token: {t}");
                    Some(t)
                }
                None => None,
            };
            let app = modkit_outbox_admin::router(
                db,
                modkit_outbox_admin::AdminOptions {
                    bearer_token: token,
                },
            )?;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .map_err(|e| fail(exit::ERROR, format!("cannot listen on {bind}: {e}")))?;
            err!("outbox: admin API on http://{bind} (GET /openapi.json)");
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .map_err(|e| fail(exit::ERROR, e.to_string()))
        }
        Command::DeadLetters { action } => {
            let db = connect(&cli.database_url).await?;
            let dl = DeadLetters::new(db)?;
            dead_letters(&dl, action, cli.json).await
        }
    }
}

async fn migrate(
    db: &DatabaseConnection,
    action: MigrateAction,
    json: bool,
) -> Result<(), Failure> {
    match action {
        MigrateAction::Up => Migrator::up(db, None).await?,
        MigrateAction::Down { yes } => {
            confirm(yes, "drop the outbox tables")?;
            Migrator::down(db, None).await?
        }
        MigrateAction::Fresh { yes } => {
            confirm(yes, "drop every table of this database and migrate")?;
            Migrator::fresh(db).await?
        }
        MigrateAction::Status => {}
    }
    let applied: Vec<String> = Migrator::get_applied_migrations(db)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let pending: Vec<String> = Migrator::get_pending_migrations(db)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    if json {
        output::json(&serde_json::json!({ "applied": applied, "pending": pending }));
    } else {
        for m in &applied {
            out!("applied  {m}");
        }
        for m in &pending {
            out!("pending  {m}");
        }
    }
    Ok(())
}

async fn dead_letters(dl: &DeadLetters, action: DlAction, json: bool) -> Result<(), Failure> {
    match action {
        DlAction::List {
            filter,
            status,
            limit,
            before,
        } => {
            let page = dl.list(&filter.filter(status), limit, before).await?;
            if json {
                output::json(&page);
            } else {
                output::dead_letter_table(&page);
            }
        }
        DlAction::Show { id } => {
            let one = dl.get(id).await?.ok_or(OutboxError::NotFound(id))?;
            if json {
                output::json(&one);
            } else {
                output::dead_letter_detail(&one);
            }
        }
        DlAction::Replay { filter, limit, yes } => {
            let n = bulk(dl, &filter, limit, yes, json, Bulk::Replay).await?;
            return report(json, "replayed", n);
        }
        DlAction::Discard { filter, limit, yes } => {
            let n = bulk(dl, &filter, limit, yes, json, Bulk::Discard).await?;
            return report(json, "discarded", n);
        }
        DlAction::Purge { older_than, yes } => {
            let cutoff = chrono::Duration::from_std(older_than)
                .ok()
                .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
                .ok_or_else(|| fail(exit::USAGE, "--older-than is too large"))?;
            confirm(
                yes,
                &format!("delete finished dead letters completed before {cutoff}"),
            )?;
            let bar = output::spinner(json);
            let n = dl
                .purge(cutoff, modkit_outbox::DEFAULT_PURGE_CHUNK, |n| {
                    bar.set_message(format!("{n} deleted"))
                })
                .await?;
            bar.finish_and_clear();
            return report(json, "purged", n);
        }
    }
    Ok(())
}

/// A bulk operation on pending dead letters.
#[derive(Clone, Copy)]
enum Bulk {
    Replay,
    Discard,
}

/// Applies `op` to the pending dead letters matching `filter` (at most `limit`), after
/// confirmation, in API-sized batches with a progress bar. Returns how many were handled.
async fn bulk(
    dl: &DeadLetters,
    filter: &FilterArgs,
    limit: Option<u64>,
    yes: bool,
    json: bool,
    op: Bulk,
) -> Result<u64, Failure> {
    let f = filter.filter(Some(DeadLetterStatus::Pending));
    let matching = dl.count(&f).await?;
    let total = limit.map_or(matching, |l| l.min(matching));
    if total == 0 {
        return Ok(0);
    }
    let verb = match op {
        Bulk::Replay => "replay",
        Bulk::Discard => "discard",
    };
    confirm(yes, &format!("{verb} {total} dead letters"))?;
    let bar = output::progress(total, json);
    let mut done = 0;
    while done < total {
        let chunk = (total - done).min(MAX_BATCH);
        let n = match op {
            Bulk::Replay => dl.replay(&f, chunk).await?.replayed,
            Bulk::Discard => dl.discard(&f, chunk).await?,
        };
        if n == 0 {
            break;
        }
        done += n;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    Ok(done)
}

fn report(json: bool, what: &str, n: u64) -> Result<(), Failure> {
    if json {
        output::json(&serde_json::json!({ what: n }));
    } else {
        out!("{what} {n} dead letter(s)");
    }
    Ok(())
}
