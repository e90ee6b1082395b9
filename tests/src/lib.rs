//! The backend test matrix shared by every integration suite.
//!
//! [`backend_tests!`] turns `async fn name(db: TestDb)` into three tests, `name::sqlite`,
//! `name::postgres` and `name::mysql`, each on a fresh, isolated database that is dropped
//! afterwards (also when the test panics), so suites run in parallel.
//!
//! Servers come from `OUTBOX_TEST_PG_URL` and `OUTBOX_TEST_MYSQL_URL`, defaulting to the local
//! servers ([`DEFAULT_PG_URL`], [`DEFAULT_MYSQL_URL`]). When a server is unreachable a local run
//! skips that backend with a loud notice on stderr; when `CI` is set (or
//! `OUTBOX_REQUIRE_ALL_BACKENDS=1`) the test fails instead.
#![allow(clippy::print_stderr)]

use std::future::Future;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};

/// PostgreSQL server used when `OUTBOX_TEST_PG_URL` is not set.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432";
/// MySQL/MariaDB server used when `OUTBOX_TEST_MYSQL_URL` is not set.
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306";
/// Longest a single matrix test may run before it fails (a hang must not stall CI).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(300);

/// One of the three backends the outbox supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, on a temporary file.
    Sqlite,
    /// PostgreSQL, a fresh database on the test server.
    Postgres,
    /// MySQL/MariaDB, a fresh database on the test server.
    MySql,
}

impl Backend {
    /// The sea-orm backend enum for this backend.
    pub fn db_backend(self) -> DbBackend {
        match self {
            Backend::Sqlite => DbBackend::Sqlite,
            Backend::Postgres => DbBackend::Postgres,
            Backend::MySql => DbBackend::MySql,
        }
    }
}

/// Whether an unreachable server must fail the test instead of skipping it.
pub fn require_all_backends() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
        || std::env::var("OUTBOX_REQUIRE_ALL_BACKENDS").is_ok_and(|v| v == "1")
}

/// A fresh database for one test.
pub struct TestDb {
    /// Which backend this is.
    pub backend: Backend,
    /// Connection URL of the fresh database (open more pools with [`TestDb::connect`]).
    pub url: String,
    /// A pool on the fresh database.
    pub conn: DatabaseConnection,
}

impl TestDb {
    /// Opens another, independent pool on the same database (e.g. a second engine instance).
    pub async fn connect(&self) -> DatabaseConnection {
        connect(&self.url, 10)
            .await
            .unwrap_or_else(|e| panic!("cannot reconnect to {}: {e}", self.url))
    }

    /// Same as [`TestDb::connect`] with a chosen pool size.
    pub async fn connect_with_pool(&self, max_connections: u32) -> DatabaseConnection {
        connect(&self.url, max_connections)
            .await
            .unwrap_or_else(|e| panic!("cannot reconnect to {}: {e}", self.url))
    }
}

async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    Database::connect(opts).await
}

/// Splits `scheme://user@host:port/db?query` into the server part and the query string.
fn server_part(url: &str) -> (String, String) {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let server = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, _db)) => format!("{scheme}://{authority}"),
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    (server, query)
}

/// What must be undone after the test: the database to drop, or the temp dir to delete.
enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Server {
        admin: DatabaseConnection,
        drop_sql: String,
    },
}

fn unique_name() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("outbox_t_{}", &id[..16])
}

/// Provisions a fresh database on `backend`. `Ok(None)` means the server is unreachable and the
/// run may skip it; `Err` means it must fail.
async fn provision(backend: Backend) -> Result<Option<(TestDb, Cleanup)>, String> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let path = dir.path().join("outbox.sqlite");
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let conn = connect(&url, 10)
                .await
                .map_err(|e| format!("sqlite {url}: {e}"))?;
            Ok(Some((TestDb { backend, url, conn }, Cleanup::Sqlite(dir))))
        }
        Backend::Postgres | Backend::MySql => {
            let (var, default) = if backend == Backend::Postgres {
                ("OUTBOX_TEST_PG_URL", DEFAULT_PG_URL)
            } else {
                ("OUTBOX_TEST_MYSQL_URL", DEFAULT_MYSQL_URL)
            };
            let configured = std::env::var(var).unwrap_or_else(|_| default.to_owned());
            let (server, query) = server_part(&configured);
            let admin_url = if backend == Backend::Postgres {
                format!("{server}/postgres{query}")
            } else {
                format!("{server}{query}")
            };
            let admin = match connect(&admin_url, 2).await {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("{backend:?} server at {admin_url} ({var}) unreachable: {e}");
                    if require_all_backends() {
                        return Err(msg);
                    }
                    eprintln!("\n!!!!! SKIPPING {backend:?}: {msg}\n");
                    return Ok(None);
                }
            };
            let name = unique_name();
            let (create, drop_sql) = if backend == Backend::Postgres {
                (
                    format!("CREATE DATABASE {name}"),
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )
            } else {
                (
                    format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
                    format!("DROP DATABASE IF EXISTS `{name}`"),
                )
            };
            admin
                .execute_unprepared(&create)
                .await
                .map_err(|e| format!("{create}: {e}"))?;
            let url = format!("{server}/{name}{query}");
            let conn = connect(&url, 10)
                .await
                .map_err(|e| format!("connect {url}: {e}"))?;
            Ok(Some((
                TestDb { backend, url, conn },
                Cleanup::Server { admin, drop_sql },
            )))
        }
    }
}

async fn cleanup(c: Cleanup) {
    if let Cleanup::Server { admin, drop_sql } = c {
        if let Err(e) = admin.execute_unprepared(&drop_sql).await {
            eprintln!("warning: test database cleanup failed ({drop_sql}): {e}");
        }
        let _ = admin.close().await;
    }
}

/// Runs `test` on a fresh database of `backend`, then drops the database, also if the test
/// panicked (the panic is then re-raised). Used by [`backend_tests!`].
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(TestDb) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (db, undo) = match provision(backend).await {
        Ok(Some(pair)) => pair,
        Ok(None) => return,
        Err(msg) => panic!("backend {backend:?} required but not available: {msg}"),
    };
    let task = tokio::spawn(async move { test(db).await });
    let abort = task.abort_handle();
    let outcome = tokio::time::timeout(TEST_TIMEOUT, task).await;
    if outcome.is_err() {
        abort.abort();
    }
    cleanup(undo).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Ok(Err(join)) => panic!("{backend:?}: test task failed: {join}"),
        Err(_) => panic!("{backend:?}: test timed out after {TEST_TIMEOUT:?}"),
    }
}

/// Declares each `async fn name(db: TestDb)` as three tests, one per backend:
/// `name::sqlite`, `name::postgres`, `name::mysql`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                $crate::run($crate::Backend::Sqlite, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                $crate::run($crate::Backend::Postgres, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn mysql() {
                $crate::run($crate::Backend::MySql, super::$name).await
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::server_part;

    #[test]
    fn server_part_strips_database_and_keeps_query() {
        assert_eq!(
            server_part("postgres://u@h:5432/db?sslmode=disable"),
            (
                "postgres://u@h:5432".to_owned(),
                "?sslmode=disable".to_owned()
            )
        );
        assert_eq!(
            server_part("mysql://root@127.0.0.1:3306"),
            ("mysql://root@127.0.0.1:3306".to_owned(), String::new())
        );
    }
}
