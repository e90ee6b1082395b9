//! Fresh databases for a run: a temp file on SQLite, a dropped-and-recreated database on
//! PostgreSQL and MySQL (the name comes from the URL's path).

use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, TransactionTrait,
};

/// Where a run's data lives; keeps the SQLite temp dir alive.
pub struct Target {
    pub url: String,
    pub backend: DbBackend,
    _dir: Option<tempfile::TempDir>,
}

/// A pool of `max` connections, all opened before it is returned: a long-running service has a
/// warm pool, and connection setup (TLS handshake, authentication) stalling a statement in the
/// first second of a run is not what the harness measures. Connections are pinged only after
/// 30 s idle, as docs/OPERATIONS.md advises (sqlx's default pings on every checkout: one more
/// round trip per transaction, for the floor and the engine alike).
pub async fn connect(url: &str, max: u32) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut o = ConnectOptions::new(url.to_owned());
    o.max_connections(max)
        .min_connections(max)
        .acquire_timeout(Duration::from_secs(60))
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(crate::profile::ENABLED.load(std::sync::atomic::Ordering::Relaxed));
    let db = Database::connect(o).await?;
    // Each open transaction holds its own connection: `max` of them at once open every one.
    let txns = futures::future::try_join_all((0..max).map(|_| db.begin())).await?;
    for t in txns {
        t.rollback().await?;
    }
    Ok(db)
}

/// Prepares an empty database for `url` (`sqlite` alone means a temporary file).
pub async fn fresh(url: &str) -> Result<Target, Box<dyn std::error::Error>> {
    if url == "sqlite" || url.starts_with("sqlite:") {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.sqlite").display()
        );
        return Ok(Target {
            url,
            backend: DbBackend::Sqlite,
            _dir: Some(dir),
        });
    }
    let (scheme, rest) = url.split_once("://").ok_or("URL without scheme")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, "outbox_bench"));
    let name = path
        .split('?')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("outbox_bench");
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("database name `{name}` must be [A-Za-z0-9_]").into());
    }
    let (backend, admin) = match scheme {
        "postgres" | "postgresql" => (
            DbBackend::Postgres,
            format!("{scheme}://{authority}/postgres"),
        ),
        "mysql" | "mariadb" => (DbBackend::MySql, format!("mysql://{authority}")),
        other => return Err(format!("unsupported scheme {other}").into()),
    };
    let a = connect(&admin, 1).await?;
    if backend == DbBackend::Postgres {
        a.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        a.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
    } else {
        a.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`"))
            .await?;
        a.execute_unprepared(&format!("CREATE DATABASE `{name}`"))
            .await?;
    }
    a.close().await?;
    let scheme = if backend == DbBackend::MySql {
        "mysql"
    } else {
        scheme
    };
    Ok(Target {
        url: format!("{scheme}://{authority}/{name}"),
        backend,
        _dir: None,
    })
}

/// Pool size of the producers (and the floor's writers): SQLite has one writer, so one
/// connection (more only add `SQLITE_BUSY` sleeps); servers get one per producer.
pub fn pool_size(backend: DbBackend, wanted: u32) -> u32 {
    match backend {
        DbBackend::Sqlite => 1,
        _ => wanted.max(2),
    }
}
