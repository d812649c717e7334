//! The suite's database. The integration tests are built twice from the
//! same source: `it` runs every coordinator on an embedded SQLite file,
//! `it_postgres` on PostgreSQL, a fresh database per coordinator, created
//! on the server named by `KILN_TEST_POSTGRES` (default
//! `postgres://kiln:kiln@127.0.0.1:5432/postgres`, the account `.ci/run`
//! creates: one that may `CREATE DATABASE`).
//!
//! Databases are named `kiln_it_<pid>_<n>`; the first one a process makes
//! also drops those left by processes that are gone, so repeated runs on a
//! developer's server do not pile up.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use kiln_coordinator::db::DbLocation;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

const DEFAULT_SERVER: &str = "postgres://kiln:kiln@127.0.0.1:5432/postgres";

/// Whether this test binary is the PostgreSQL build of the suite.
fn on_postgres() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("it_postgres"))
}

/// The database a new coordinator of this suite uses: `None` (SQLite in
/// its state directory) in `it`, a fresh PostgreSQL database in
/// `it_postgres`.
pub async fn database() -> anyhow::Result<Option<DbLocation>> {
    if !on_postgres() {
        return Ok(None);
    }
    let server = std::env::var("KILN_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.into());
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut admin = PgConnection::connect(&server).await.with_context(|| {
        format!(
            "the PostgreSQL run of the integration suite needs a server: none answered at {server} \
             (set KILN_TEST_POSTGRES to a URL whose account may CREATE DATABASE; `bash .ci/run` \
             installs and starts one)"
        )
    })?;
    SWEPT
        .get_or_try_init(|| sweep(&mut admin))
        .await
        .context("dropping databases left by earlier test runs")?;
    let name = format!(
        "kiln_it_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name} on {server}"))?;
    let (base, _) = server
        .rsplit_once('/')
        .context("KILN_TEST_POSTGRES must end in /DBNAME")?;
    Ok(Some(DbLocation::Postgres(format!("{base}/{name}"))))
}

/// Drops `kiln_it_<pid>_*` databases whose process is gone.
async fn sweep(admin: &mut PgConnection) -> anyhow::Result<()> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'kiln\\_it\\_%'")
            .fetch_all(&mut *admin)
            .await?;
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut *admin)
            .await?;
        }
    }
    Ok(())
}

/// A pool on a coordinator's database, for tests that look at or tamper
/// with what it stored.
pub async fn open_database(location: &DbLocation) -> anyhow::Result<sqlx::AnyPool> {
    sqlx::any::install_default_drivers();
    let url = match location {
        DbLocation::Sqlite(path) => format!("sqlite://{}", path.display()),
        DbLocation::Postgres(url) => url.clone(),
    };
    Ok(sqlx::AnyPool::connect(&url).await?)
}
