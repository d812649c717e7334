//! Persistence. Every job state change is one transaction that updates the
//! job row and appends to `job_events` (and, when money moves, `ledger_ops`),
//! so a crash at any point leaves a consistent database.
//!
//! Two engines run the same queries through sqlx's `Any` driver:
//! - **SQLite** (embedded, WAL, synchronous=FULL), the default: one file in
//!   the state directory, nothing to install.
//! - **PostgreSQL** (`--db postgres://…`), when one machine is not enough.
//!
//! The SQL is written once for both: `$N` placeholders (SQLite reads them
//! too), `ON CONFLICT`, `RETURNING`, and aggregates cast to `BIGINT`. Only
//! the schema differs (`migrations/sqlite`, `migrations/postgres`: types and
//! identity columns), with the same table and column names.
//!
//! Writers are serialized on both engines, which is what every read-then-
//! write transaction here relies on: SQLite's `BEGIN IMMEDIATE` takes the
//! database's one write lock; on PostgreSQL each write transaction takes the
//! transaction-scoped advisory lock [`WRITE_LOCK`] first, so processes
//! sharing one database (replicas) queue behind each other exactly as
//! SQLite's writers do, and the lock is released by commit, rollback or a
//! dropped connection (a killed process never leaves it held).

use std::str::FromStr;
use std::time::Duration;

use kiln_protocol::{
    BuyerId, CapabilityAdvert, ContentId, Credits, ProviderId, Signed, UnixMillis,
};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory-lock key every PostgreSQL write transaction takes
/// (`pg_advisory_xact_lock`): "KILNWRIT" in ASCII.
pub const WRITE_LOCK: i64 = 0x4B49_4C4E_5752_4954;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error(
        "unsupported database '{0}': use a SQLite file path (or sqlite://PATH) or a postgres://user:password@host/dbname URL"
    )]
    Unsupported(String),
}

fn corrupt(table: &'static str, reason: impl ToString) -> DbError {
    DbError::Corrupt {
        table,
        reason: reason.to_string(),
    }
}

/// A provider as stored.
#[derive(Clone, Debug)]
pub struct ProviderRecord {
    pub advert: Signed<CapabilityAdvert>,
    pub last_seen: UnixMillis,
}

/// A blob a buyer may read.
#[derive(Clone, Debug, Serialize)]
pub struct BlobRecord {
    pub cid: ContentId,
    pub size: u64,
    pub name: String,
    pub created_at: UnixMillis,
}

/// Which engine a [`Db`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Where the database is: a SQLite file, or a PostgreSQL URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbLocation {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl DbLocation {
    /// `postgres://…` / `postgresql://…`, `sqlite://PATH`, or a plain path
    /// (a SQLite file).
    pub fn parse(s: &str) -> Result<Self, DbError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self::Postgres(s.to_string()))
        } else if let Some(path) = s.strip_prefix("sqlite://") {
            Ok(Self::Sqlite(path.into()))
        } else if s.contains("://") {
            Err(DbError::Unsupported(redact(s)))
        } else {
            Ok(Self::Sqlite(s.into()))
        }
    }

    /// For logs: a PostgreSQL URL without its password.
    pub fn display(&self) -> String {
        match self {
            Self::Sqlite(p) => p.display().to_string(),
            Self::Postgres(url) => redact(url),
        }
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// Serializes this process's write transactions (see [`Tx`]).
    write_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse<T: FromStr>(table: &'static str, s: &str) -> Result<T, DbError>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| corrupt(table, e))
}

/// `$first, $first+1, …` (`n` placeholders) for an `IN (…)` list.
pub(crate) fn marks(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|k| format!("${k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A write transaction. It holds this process's write gate until it
/// commits or is dropped (rolled back), so writers in one process queue on
/// an async mutex, in order, instead of in the engine: SQLite's busy
/// handler would make a waiting writer sleep and poll (1, 2, 5, 10 … 100
/// ms), and on PostgreSQL every waiter would hold a pooled connection
/// blocked on the advisory lock. Writers in *other* processes still queue
/// in the engine. Derefs to the connection: `&mut **tx` is an executor.
pub struct Tx<'c> {
    inner: sqlx::Transaction<'c, sqlx::Any>,
    _gate: tokio::sync::OwnedMutexGuard<()>,
}

impl<'c> Tx<'c> {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.inner.commit().await
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Db {
    /// Opens (creating if needed) the database at `location` and migrates it.
    pub async fn open(location: &DbLocation) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        match location {
            DbLocation::Sqlite(path) => Self::open_sqlite(path).await,
            DbLocation::Postgres(url) => {
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await?;
                POSTGRES_MIGRATOR.run(&pool).await?;
                Ok(Self {
                    pool,
                    backend: Backend::Postgres,
                    write_gate: Default::default(),
                })
            }
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // What SqliteConnectOptions would set: WAL (readers never
                    // block the writer), a full fsync per commit, writers
                    // waiting for the lock instead of failing, and foreign keys.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
            write_gate: Default::default(),
        })
    }

    /// Starts a write transaction, serialized with every other writer (see
    /// the module docs). SQLite: `BEGIN IMMEDIATE` takes the write lock up
    /// front, so concurrent writers queue on the busy timeout instead of
    /// failing with SQLITE_BUSY when a read transaction tries to upgrade.
    pub async fn begin(&self) -> Result<Tx<'static>, DbError> {
        let gate = self.write_gate.clone().lock_owned().await;
        let inner = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                // pg_advisory_xact_lock returns `void`, which the Any driver
                // cannot decode: count the one row instead.
                sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        Ok(Tx { inner, _gate: gate })
    }

    /// Records a nonce; `false` if this (signer, nonce) was seen before.
    pub async fn claim_nonce(
        tx: &mut Tx<'_>,
        signer: &str,
        nonce: &str,
        domain: &str,
        expires_at: UnixMillis,
    ) -> Result<bool, DbError> {
        let r = sqlx::query("INSERT INTO seen_nonces (signer, nonce, domain, expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(signer)
            .bind(nonce)
            .bind(domain)
            .bind(i(expires_at.0))
            .execute(&mut **tx)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn upsert_provider(&self, advert: &Signed<CapabilityAdvert>) -> Result<(), DbError> {
        let bytes = advert.to_bytes().map_err(|e| corrupt("providers", e))?;
        let js = serde_json::to_string(&advert.payload).map_err(|e| corrupt("providers", e))?;
        let now = i(UnixMillis::now().0);
        sqlx::query(
            "INSERT INTO providers (id, advert, advert_json, last_seen, registered_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET advert = excluded.advert, advert_json = excluded.advert_json, last_seen = excluded.last_seen",
        )
        .bind(advert.payload.provider.to_string())
        .bind(bytes)
        .bind(js)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn provider_known(&self, id: &ProviderId) -> Result<bool, DbError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM providers WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Providers seen since `since`. A row that no longer decodes (written by
    /// an older protocol version) is skipped with a warning, not fatal: the
    /// provider's next heartbeat rewrites it.
    pub async fn providers_seen_since(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<ProviderRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, advert, last_seen FROM providers WHERE last_seen >= $1 ORDER BY id",
        )
        .bind(i(since.0))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.extend(provider_row(r)?);
        }
        Ok(out)
    }

    /// One provider's last advert (skipped like [`Self::providers_seen_since`]
    /// when unreadable).
    pub async fn provider(&self, id: &ProviderId) -> Result<Option<ProviderRecord>, DbError> {
        let row = sqlx::query("SELECT id, advert, last_seen FROM providers WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => provider_row(&r)?,
            None => None,
        })
    }

    /// Where to dial a provider: the listen addresses of its last advert
    /// (none if it never registered; the swarm may still know a route).
    pub async fn provider_addrs(
        &self,
        provider: &ProviderId,
    ) -> Result<Vec<kiln_net::Addr>, DbError> {
        Ok(self
            .provider(provider)
            .await?
            .map(|p| {
                p.advert
                    .payload
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// A provider's reputation score (`REPUTATION_START` if never audited).
    pub async fn reputation(&self, provider: &ProviderId) -> Result<u32, DbError> {
        let s: Option<i64> = sqlx::query_scalar("SELECT score FROM reputation WHERE provider = $1")
            .bind(provider.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(s.and_then(|s| u32::try_from(s).ok())
            .unwrap_or(crate::challenge::REPUTATION_START))
    }

    /// Records a verifiable event about `provider` (in the caller's
    /// transaction) and returns its new reputation score.
    pub async fn reputation_event(
        tx: &mut Tx<'_>,
        provider: &ProviderId,
        event: crate::verification::reputation::Event,
    ) -> Result<u32, DbError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT good, bad FROM reputation WHERE provider = $1")
                .bind(provider.to_string())
                .fetch_optional(&mut **tx)
                .await?;
        let before = row
            .map(|(g, b)| crate::verification::reputation::Evidence {
                good: u(g),
                bad: u(b),
            })
            .unwrap_or_default();
        let after = before.after(event);
        let score = after.score();
        sqlx::query(
            "INSERT INTO reputation (provider, score, good, bad) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (provider) DO UPDATE SET score = excluded.score, good = excluded.good, bad = excluded.bad",
        )
        .bind(provider.to_string())
        .bind(i64::from(score))
        .bind(i(after.good))
        .bind(i(after.bad))
        .execute(&mut **tx)
        .await?;
        Ok(score)
    }

    pub async fn record_blob(tx: &mut Tx<'_>, cid: &ContentId, size: u64) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO blobs (cid, size, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(cid.to_string())
        .bind(i(size))
        .bind(i(UnixMillis::now().0))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Lets `buyer` read `cid` through the API (idempotent; the first name stays).
    pub async fn grant_blob(
        tx: &mut Tx<'_>,
        buyer: &BuyerId,
        cid: &ContentId,
        size: u64,
        name: &str,
    ) -> Result<(), DbError> {
        Self::record_blob(tx, cid, size).await?;
        sqlx::query(
            "INSERT INTO blob_owners (buyer, cid, size, name, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(buyer.to_string())
        .bind(cid.to_string())
        .bind(i(size))
        .bind(name)
        .bind(i(UnixMillis::now().0))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Bytes counted against `buyer`'s blob quota: every blob it may
    /// read, once each.
    pub async fn blob_usage_in(tx: &mut Tx<'_>, buyer: &BuyerId) -> Result<u64, DbError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blob_owners WHERE buyer = $1",
        )
        .bind(buyer.to_string())
        .fetch_one(&mut **tx)
        .await?;
        Ok(u(n))
    }

    /// [`Self::blob_usage_in`] outside a transaction.
    pub async fn blob_usage(&self, buyer: &BuyerId) -> Result<u64, DbError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blob_owners WHERE buyer = $1",
        )
        .bind(buyer.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(u(n))
    }

    /// Takes away `buyer`'s claim on `cid`; its size if it had one.
    pub async fn revoke_blob(
        tx: &mut Tx<'_>,
        buyer: &BuyerId,
        cid: &ContentId,
    ) -> Result<Option<u64>, DbError> {
        let size: Option<i64> = sqlx::query_scalar(
            "DELETE FROM blob_owners WHERE buyer = $1 AND cid = $2 RETURNING size",
        )
        .bind(buyer.to_string())
        .bind(cid.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(size.map(u))
    }

    /// Whether anyone still holds a claim on `cid`; if not, forgets it
    /// (the caller then removes the bytes).
    pub async fn forget_blob_if_unheld(tx: &mut Tx<'_>, cid: &ContentId) -> Result<bool, DbError> {
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blob_owners WHERE cid = $1")
            .bind(cid.to_string())
            .fetch_one(&mut **tx)
            .await?;
        if held > 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM blobs WHERE cid = $1")
            .bind(cid.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(true)
    }

    /// Whether `buyer` may read `cid`.
    pub async fn blob_readable(&self, buyer: &BuyerId, cid: &ContentId) -> Result<bool, DbError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM blob_owners WHERE buyer = $1 AND cid = $2")
                .bind(buyer.to_string())
                .bind(cid.to_string())
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    /// Which of `cids` `buyer` may read.
    pub async fn readable_of(
        &self,
        buyer: &BuyerId,
        cids: &[ContentId],
    ) -> Result<std::collections::HashSet<ContentId>, DbError> {
        let mut out = std::collections::HashSet::new();
        // SQLite binds at most 32k parameters; stay well below.
        for batch in cids.chunks(500) {
            let marks = marks(2, batch.len());
            let sql = format!(
                "SELECT DISTINCT cid FROM blob_owners WHERE buyer = $1 AND cid IN ({marks})"
            );
            let mut q =
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(buyer.to_string());
            for c in batch {
                q = q.bind(c.to_string());
            }
            for c in q.fetch_all(&self.pool).await? {
                if let Ok(c) = c.parse() {
                    out.insert(c);
                }
            }
        }
        Ok(out)
    }

    /// The blobs `buyer` may read, newest first.
    pub async fn blobs_of(&self, buyer: &BuyerId, limit: u32) -> Result<Vec<BlobRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT cid, size, name, created_at FROM blob_owners WHERE buyer = $1 ORDER BY created_at DESC, cid LIMIT $2",
        )
        .bind(buyer.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let cid: String = r.try_get("cid")?;
            let Ok(cid) = cid.parse() else { continue };
            out.push(BlobRecord {
                cid,
                size: u(r.try_get("size")?),
                name: r.try_get("name")?,
                created_at: UnixMillis(u(r.try_get("created_at")?)),
            });
        }
        Ok(out)
    }

    pub async fn append_ledger_entry(
        tx: &mut Tx<'_>,
        seq: u64,
        entry: &[u8],
        at: UnixMillis,
    ) -> Result<(), DbError> {
        sqlx::query("INSERT INTO ledger_entries (seq, entry, at) VALUES ($1, $2, $3)")
            .bind(i(seq))
            .bind(entry)
            .bind(i(at.0))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn set_balance(tx: &mut Tx<'_>, account: &str, balance: u64) -> Result<(), DbError> {
        sqlx::query("INSERT INTO balances (account, balance) VALUES ($1, $2) ON CONFLICT (account) DO UPDATE SET balance = excluded.balance")
            .bind(account)
            .bind(i(balance))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Ledger entries (seq, canonical bytes) from `from`, in order.
    pub async fn ledger_entries(
        &self,
        from: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, entry FROM ledger_entries WHERE seq >= $1 ORDER BY seq LIMIT $2",
        )
        .bind(i(from))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((u(r.try_get("seq")?), r.try_get("entry")?)))
            .collect()
    }

    /// The stored balances, by account.
    pub async fn balances(
        &self,
    ) -> Result<std::collections::BTreeMap<kiln_contracts::AccountId, Credits>, DbError> {
        let rows = sqlx::query("SELECT account, balance FROM balances")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let a: String = r.try_get("account")?;
                Ok((parse("balances", &a)?, Credits(u(r.try_get("balance")?))))
            })
            .collect()
    }

    /// All settlement operations in the order they were applied.
    pub async fn ledger_ops(&self) -> Result<Vec<String>, DbError> {
        Ok(sqlx::query_scalar("SELECT op FROM ledger_ops ORDER BY seq")
            .fetch_all(&self.pool)
            .await?)
    }
}

/// A `providers` row, or `None` (with a warning) if its advert no longer
/// decodes.
fn provider_row(r: &AnyRow) -> Result<Option<ProviderRecord>, DbError> {
    let b: Vec<u8> = r.try_get("advert")?;
    match Signed::from_bytes(&b) {
        Ok(advert) => Ok(Some(ProviderRecord {
            advert,
            last_seen: UnixMillis(u(r.try_get("last_seen")?)),
        })),
        Err(e) => {
            tracing::warn!(provider = %r.try_get::<String, _>("id")?, "skipping an unreadable provider advert: {e}");
            Ok(None)
        }
    }
}

/// One GPU's verified speed, as the last checked challenge left it (see
/// `challenge::GpuSpeed`; MFLOP/s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuSpeedRecord {
    pub gpu_uuid: String,
    pub gpu_name: String,
    /// What the scheduler credits: the observed floor, at most advertised.
    pub verified_mflops: u64,
    pub observed_mflops: u64,
    pub advertised_mflops: u64,
    pub proven_flops: u64,
    pub round_trip_us: u64,
    pub challenge_id: String,
    pub at: UnixMillis,
}

impl Db {
    /// Replaces `provider`'s verified GPU speeds with `rows` (none: it has
    /// no verified figure), in the caller's transaction.
    pub async fn set_gpu_speeds(
        tx: &mut Tx<'_>,
        provider: &ProviderId,
        rows: &[GpuSpeedRecord],
    ) -> Result<(), DbError> {
        sqlx::query("DELETE FROM gpu_speed WHERE provider = $1")
            .bind(provider.to_string())
            .execute(&mut **tx)
            .await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO gpu_speed (provider, gpu_uuid, gpu_name, verified_mflops, observed_mflops, \
                 advertised_mflops, proven_flops, round_trip_us, challenge_id, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (provider, gpu_uuid) DO UPDATE SET gpu_name = excluded.gpu_name, \
                 verified_mflops = excluded.verified_mflops, observed_mflops = excluded.observed_mflops, \
                 advertised_mflops = excluded.advertised_mflops, proven_flops = excluded.proven_flops, \
                 round_trip_us = excluded.round_trip_us, challenge_id = excluded.challenge_id, at = excluded.at",
            )
            .bind(provider.to_string())
            .bind(&r.gpu_uuid)
            .bind(&r.gpu_name)
            .bind(i(r.verified_mflops))
            .bind(i(r.observed_mflops))
            .bind(i(r.advertised_mflops))
            .bind(i(r.proven_flops))
            .bind(i(r.round_trip_us))
            .bind(&r.challenge_id)
            .bind(i(r.at.0))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// `provider`'s verified GPU speeds, by GPU UUID.
    /// `(GPU model, verified MFLOP/s)` of every GPU's latest challenge
    /// that verified a speed.
    pub async fn verified_speeds(&self) -> Result<Vec<(String, u64)>, DbError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT gpu_name, verified_mflops FROM gpu_speed WHERE verified_mflops > 0",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(n, v)| (n, u(v))).collect())
    }

    pub async fn gpu_speeds(&self, provider: &ProviderId) -> Result<Vec<GpuSpeedRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT gpu_uuid, gpu_name, verified_mflops, observed_mflops, advertised_mflops, \
             proven_flops, round_trip_us, challenge_id, at FROM gpu_speed WHERE provider = $1 ORDER BY gpu_uuid",
        )
        .bind(provider.to_string())
        .fetch_all(&self.pool)
        .await?;
        let num = |r: &AnyRow, col: &str| -> Result<u64, DbError> {
            let v: i64 = r.try_get(col)?;
            u64::try_from(v).map_err(|_| corrupt("gpu_speed", format!("negative {col} {v}")))
        };
        rows.iter()
            .map(|r| {
                Ok(GpuSpeedRecord {
                    gpu_uuid: r.try_get("gpu_uuid")?,
                    gpu_name: r.try_get("gpu_name")?,
                    verified_mflops: num(r, "verified_mflops")?,
                    observed_mflops: num(r, "observed_mflops")?,
                    advertised_mflops: num(r, "advertised_mflops")?,
                    proven_flops: num(r, "proven_flops")?,
                    round_trip_us: num(r, "round_trip_us")?,
                    challenge_id: r.try_get("challenge_id")?,
                    at: UnixMillis(num(r, "at")?),
                })
            })
            .collect()
    }
}

/// Statements (`ledger_accounts`: which accounts each ledger entry moves)
/// and the public provider listing.
impl Db {
    /// Records that ledger entry `seq` moves `account` (idempotent).
    pub async fn index_ledger_account(
        tx: &mut Tx<'_>,
        account: &str,
        seq: u64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO ledger_accounts (account, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(account)
        .bind(i(seq))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The last ledger entry indexed by account (`None`: none yet).
    pub async fn ledger_indexed_through(&self) -> Result<Option<u64>, DbError> {
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM ledger_accounts")
            .fetch_one(&self.pool)
            .await?;
        Ok(last.map(u))
    }

    /// The ledger entries (seq, canonical bytes) that move `account`, from
    /// `from`, in order: one page of its statement.
    pub async fn statement_page(
        &self,
        account: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let rows = sqlx::query(
            "SELECT e.seq, e.entry FROM ledger_accounts a JOIN ledger_entries e ON e.seq = a.seq \
             WHERE a.account = $1 AND a.seq >= $2 ORDER BY a.seq LIMIT $3",
        )
        .bind(account)
        .bind(i(from))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((u(r.try_get("seq")?), r.try_get("entry")?)))
            .collect()
    }

    /// [`Self::providers_seen_since`] with each one's reputation score
    /// (`REPUTATION_START` if never scored), in one query.
    pub async fn providers_with_reputation(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<(ProviderRecord, u32)>, DbError> {
        let rows = sqlx::query(
            "SELECT p.id, p.advert, p.last_seen, r.score FROM providers p \
             LEFT JOIN reputation r ON r.provider = p.id WHERE p.last_seen >= $1 ORDER BY p.id",
        )
        .bind(i(since.0))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let score: Option<i64> = r.try_get("score")?;
            let score = score
                .and_then(|s| u32::try_from(s).ok())
                .unwrap_or(crate::challenge::REPUTATION_START);
            if let Some(p) = provider_row(r)? {
                out.push((p, score));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_never_show_a_password() {
        let pg = DbLocation::parse("postgres://kiln:s3cret@db.internal:5432/kiln").unwrap();
        assert_eq!(pg.display(), "postgres://kiln:***@db.internal:5432/kiln");
        assert!(matches!(
            DbLocation::parse("postgresql://h/db").unwrap(),
            DbLocation::Postgres(_)
        ));
        assert_eq!(
            DbLocation::parse("sqlite:///var/lib/kiln/kiln.db").unwrap(),
            DbLocation::Sqlite("/var/lib/kiln/kiln.db".into())
        );
        assert_eq!(
            DbLocation::parse("state/kiln.db").unwrap(),
            DbLocation::Sqlite("state/kiln.db".into())
        );
        let e = DbLocation::parse("mysql://root:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(e.contains("postgres://") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn in_lists_number_their_placeholders_from_where_they_start() {
        assert_eq!(marks(2, 3), "$2, $3, $4");
        assert_eq!(marks(1, 1), "$1");
    }

    /// SQLite through the Any driver keeps what SqliteConnectOptions gave
    /// (WAL), migrates, and reads `$N` placeholders. (PostgreSQL: the
    /// `it_postgres` suite.)
    #[tokio::test]
    async fn sqlite_through_any_keeps_wal_and_refuses_a_replayed_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DbLocation::Sqlite(dir.path().join("kiln.db")))
            .await
            .unwrap();
        assert_eq!(db.backend, Backend::Sqlite);
        let mut tx = db.begin().await.unwrap();
        assert!(
            Db::claim_nonce(&mut tx, "s", "n", "d", UnixMillis(1))
                .await
                .unwrap()
        );
        assert!(
            !Db::claim_nonce(&mut tx, "s", "n", "d", UnixMillis(1))
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
    }
}
