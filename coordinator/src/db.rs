//! Persistence. Every job state change is one transaction that updates the
//! job row and appends to `job_events` (and, when money moves, `ledger_ops`),
//! so a crash at any point leaves a consistent database.
//!
//! SQLite (embedded, WAL, synchronous=FULL) is the default; the SQL is kept
//! portable for the PostgreSQL backend to come.

use std::str::FromStr;
use std::time::Duration;

use kiln_protocol::{
    BuyerId, CapabilityAdvert, ContentId, Credits, JobId, JobSpec, Manifest, OfferId, ProviderId,
    ResultReceipt, Signed, UnixMillis,
};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
}

fn corrupt(table: &'static str, reason: impl ToString) -> DbError {
    DbError::Corrupt {
        table,
        reason: reason.to_string(),
    }
}

/// Lifecycle of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a provider that fits.
    Queued,
    /// Offered to a provider; waiting for it to accept.
    Dispatched,
    Running,
    Completed,
    Failed,
    TimedOut,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => Self::Queued,
            "dispatched" => Self::Dispatched,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "timed_out" => Self::TimedOut,
            "cancelled" => Self::Cancelled,
            other => return Err(format!("unknown job state `{other}`")),
        })
    }
}

/// A job as stored.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub id: JobId,
    pub owner: BuyerId,
    pub spec: JobSpec,
    pub label: Option<String>,
    pub state: JobState,
    pub reason: Option<String>,
    pub provider: Option<ProviderId>,
    pub offer_id: Option<OfferId>,
    pub attempts: u32,
    pub price_per_hour: Option<Credits>,
    pub max_cost: Credits,
    pub cost: Option<Credits>,
    pub exit_code: Option<i64>,
    pub receipt: Option<Signed<ResultReceipt>>,
    pub manifest: Option<Manifest>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// A provider as stored.
#[derive(Clone, Debug)]
pub struct ProviderRecord {
    pub advert: Signed<CapabilityAdvert>,
    pub last_seen: UnixMillis,
}

/// A recorded state change.
#[derive(Clone, Debug, Serialize)]
pub struct JobEvent {
    pub at: u64,
    pub state: String,
    pub detail: Option<String>,
}

/// A blob a buyer may read.
#[derive(Clone, Debug, Serialize)]
pub struct BlobRecord {
    pub cid: ContentId,
    pub size: u64,
    pub name: String,
    pub created_at: UnixMillis,
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: SqlitePool,
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

fn json<T: serde::de::DeserializeOwned>(table: &'static str, s: &str) -> Result<T, DbError> {
    serde_json::from_str(s).map_err(|e| corrupt(table, e))
}

const JOB_COLUMNS: &str = "id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
     max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at";

fn job_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<JobRecord, DbError> {
    const T: &str = "jobs";
    let opt_str =
        |c: &str| -> Result<Option<String>, DbError> { Ok(r.try_get::<Option<String>, _>(c)?) };
    Ok(JobRecord {
        id: parse(T, &r.try_get::<String, _>("id")?)?,
        owner: parse(T, &r.try_get::<String, _>("owner")?)?,
        spec: json(T, &r.try_get::<String, _>("spec_json")?)?,
        label: opt_str("label")?,
        state: parse(T, &r.try_get::<String, _>("state")?)?,
        reason: opt_str("reason")?,
        provider: opt_str("provider")?.map(|s| parse(T, &s)).transpose()?,
        offer_id: opt_str("offer_id")?.map(|s| parse(T, &s)).transpose()?,
        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(0),
        price_per_hour: r
            .try_get::<Option<i64>, _>("price_per_hour")?
            .map(|v| Credits(u(v))),
        max_cost: Credits(u(r.try_get("max_cost")?)),
        cost: r.try_get::<Option<i64>, _>("cost")?.map(|v| Credits(u(v))),
        exit_code: r.try_get("exit_code")?,
        receipt: r
            .try_get::<Option<Vec<u8>>, _>("receipt")?
            .map(|b| Signed::from_bytes(&b).map_err(|e| corrupt(T, e)))
            .transpose()?,
        manifest: opt_str("manifest_json")?.map(|s| json(T, &s)).transpose()?,
        created_at: UnixMillis(u(r.try_get("created_at")?)),
        updated_at: UnixMillis(u(r.try_get("updated_at")?)),
    })
}

/// What a state change carries besides the state itself.
#[derive(Default)]
pub struct Change<'a> {
    pub reason: Option<&'a str>,
    pub provider: Option<ProviderId>,
    pub offer_id: Option<OfferId>,
    pub price_per_hour: Option<Credits>,
    pub bump_attempts: bool,
    pub result: Option<ResultColumns<'a>>,
}

/// Columns filled when a verified result is recorded.
pub struct ResultColumns<'a> {
    pub receipt: &'a Signed<ResultReceipt>,
    pub manifest: &'a Manifest,
    pub cost: Credits,
}

pub type Tx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

impl Db {
    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self, DbError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// Starts a write transaction. `BEGIN IMMEDIATE` takes the write lock up
    /// front, so concurrent writers queue on the busy timeout instead of
    /// failing with SQLITE_BUSY when a read transaction tries to upgrade.
    pub async fn begin(&self) -> Result<Tx<'static>, DbError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Records a nonce; `false` if this (signer, nonce) was seen before.
    pub async fn claim_nonce(
        tx: &mut Tx<'_>,
        signer: &str,
        nonce: &str,
        domain: &str,
        expires_at: UnixMillis,
    ) -> Result<bool, DbError> {
        let r = sqlx::query("INSERT INTO seen_nonces (signer, nonce, domain, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
            .bind(signer)
            .bind(nonce)
            .bind(domain)
            .bind(i(expires_at.0))
            .execute(&mut **tx)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn insert_job(
        tx: &mut Tx<'_>,
        job: &JobRecord,
        submission: &[u8],
    ) -> Result<(), DbError> {
        let spec_json = serde_json::to_string(&job.spec).map_err(|e| corrupt("jobs", e))?;
        sqlx::query(
            "INSERT INTO jobs (id, owner, submission, spec_json, label, state, reason, attempts, max_cost, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        )
        .bind(job.id.to_string())
        .bind(job.owner.to_string())
        .bind(submission)
        .bind(spec_json)
        .bind(job.label.as_deref())
        .bind(job.state.as_str())
        .bind(job.reason.as_deref())
        .bind(i(job.max_cost.0))
        .bind(i(job.created_at.0))
        .bind(i(job.updated_at.0))
        .execute(&mut **tx)
        .await?;
        Self::event(tx, &job.id, job.state, job.reason.as_deref()).await
    }

    async fn event(
        tx: &mut Tx<'_>,
        job: &JobId,
        state: JobState,
        detail: Option<&str>,
    ) -> Result<(), DbError> {
        sqlx::query("INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, ?, ?)")
            .bind(job.to_string())
            .bind(i(UnixMillis::now().0))
            .bind(state.as_str())
            .bind(detail)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Moves a job from one of `from` to `to`. Returns false (changing
    /// nothing) if the job was not in one of those states: callers use this
    /// as a compare-and-set so concurrent updates cannot clobber each other.
    pub async fn transition(
        tx: &mut Tx<'_>,
        job: &JobId,
        from: &[JobState],
        to: JobState,
        change: Change<'_>,
    ) -> Result<bool, DbError> {
        let current: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?")
            .bind(job.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        let Some(current) = current else {
            return Ok(false);
        };
        let current: JobState = parse("jobs", &current)?;
        if !from.contains(&current) {
            return Ok(false);
        }
        let now = i(UnixMillis::now().0);
        sqlx::query(
            "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, \
             provider = COALESCE(?, provider), offer_id = COALESCE(?, offer_id), \
             price_per_hour = COALESCE(?, price_per_hour), attempts = attempts + ? WHERE id = ?",
        )
        .bind(to.as_str())
        .bind(change.reason)
        .bind(now)
        .bind(change.provider.map(|p| p.to_string()))
        .bind(change.offer_id.map(|o| o.to_string()))
        .bind(change.price_per_hour.map(|c| i(c.0)))
        .bind(i64::from(change.bump_attempts))
        .bind(job.to_string())
        .execute(&mut **tx)
        .await?;
        if let Some(res) = change.result {
            let receipt = res.receipt.to_bytes().map_err(|e| corrupt("jobs", e))?;
            let r = &res.receipt.payload;
            sqlx::query(
                "UPDATE jobs SET receipt = ?, receipt_json = ?, manifest_json = ?, output_cid = ?, stdout_cid = ?, \
                 stderr_cid = ?, exit_code = ?, cost = ? WHERE id = ?",
            )
            .bind(receipt)
            .bind(serde_json::to_string(r).map_err(|e| corrupt("jobs", e))?)
            .bind(serde_json::to_string(res.manifest).map_err(|e| corrupt("jobs", e))?)
            .bind(r.output_cid.to_string())
            .bind(r.stdout_cid.to_string())
            .bind(r.stderr_cid.to_string())
            .bind(r.exit_code)
            .bind(i(res.cost.0))
            .bind(job.to_string())
            .execute(&mut **tx)
            .await?;
        }
        Self::event(tx, job, to, change.reason).await?;
        Ok(true)
    }

    /// Updates only the reason of a job (e.g. a changed "why not placed"),
    /// without an event, since the state did not change.
    pub async fn set_reason(&self, job: &JobId, reason: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET reason = ? WHERE id = ? AND state = 'queued'")
            .bind(reason)
            .bind(job.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn job(&self, id: &JobId) -> Result<Option<JobRecord>, DbError> {
        let sql = "SELECT id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
                   max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at FROM jobs WHERE id = ?";
        debug_assert!(sql.contains(JOB_COLUMNS));
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub async fn jobs_of(&self, owner: &BuyerId, limit: u32) -> Result<Vec<JobRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
             max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at FROM jobs \
             WHERE owner = ? ORDER BY created_at DESC LIMIT ?",
        )
        .bind(owner.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The single-node jobs dispatched to or running on `provider` (gang
    /// members are in `gang_members`: see `gang::member_jobs`).
    pub async fn active_jobs_of(&self, provider: &ProviderId) -> Result<Vec<JobRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
             max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at FROM jobs \
             WHERE provider = ? AND state IN ('dispatched', 'running') ORDER BY created_at",
        )
        .bind(provider.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Jobs in any of `states`, oldest first.
    pub async fn jobs_in(
        &self,
        states: &[JobState],
        limit: u32,
    ) -> Result<Vec<JobRecord>, DbError> {
        let mut out = Vec::new();
        for s in states {
            let rows = sqlx::query(
                "SELECT id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
                 max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at FROM jobs \
                 WHERE state = ? ORDER BY created_at LIMIT ?",
            )
            .bind(s.as_str())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            for r in &rows {
                out.push(job_from_row(r)?);
            }
        }
        out.sort_by_key(|j| j.created_at);
        Ok(out)
    }

    pub async fn events(&self, job: &JobId) -> Result<Vec<JobEvent>, DbError> {
        let rows =
            sqlx::query("SELECT at, state, detail FROM job_events WHERE job_id = ? ORDER BY seq")
                .bind(job.to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    at: u(r.try_get("at")?),
                    state: r.try_get("state")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub async fn upsert_provider(&self, advert: &Signed<CapabilityAdvert>) -> Result<(), DbError> {
        let bytes = advert.to_bytes().map_err(|e| corrupt("providers", e))?;
        let js = serde_json::to_string(&advert.payload).map_err(|e| corrupt("providers", e))?;
        let now = i(UnixMillis::now().0);
        sqlx::query(
            "INSERT INTO providers (id, advert, advert_json, last_seen, registered_at) VALUES (?, ?, ?, ?, ?) \
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM providers WHERE id = ?")
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
            "SELECT id, advert, last_seen FROM providers WHERE last_seen >= ? ORDER BY id",
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
        let row = sqlx::query("SELECT id, advert, last_seen FROM providers WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => provider_row(&r)?,
            None => None,
        })
    }

    pub async fn record_blob(tx: &mut Tx<'_>, cid: &ContentId, size: u64) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO blobs (cid, size, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
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
            "INSERT INTO blob_owners (buyer, cid, size, name, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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

    /// Whether `buyer` may read `cid`.
    pub async fn blob_readable(&self, buyer: &BuyerId, cid: &ContentId) -> Result<bool, DbError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM blob_owners WHERE buyer = ? AND cid = ?")
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
            let marks = vec!["?"; batch.len()].join(", ");
            let sql = format!(
                "SELECT DISTINCT cid FROM blob_owners WHERE buyer = ? AND cid IN ({marks})"
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
            "SELECT cid, size, name, created_at FROM blob_owners WHERE buyer = ? ORDER BY created_at DESC, cid LIMIT ?",
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
        sqlx::query("INSERT INTO ledger_entries (seq, entry, at) VALUES (?, ?, ?)")
            .bind(i(seq))
            .bind(entry)
            .bind(i(at.0))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn set_balance(tx: &mut Tx<'_>, account: &str, balance: u64) -> Result<(), DbError> {
        sqlx::query("INSERT INTO balances (account, balance) VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET balance = excluded.balance")
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
            "SELECT seq, entry FROM ledger_entries WHERE seq >= ? ORDER BY seq LIMIT ?",
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
fn provider_row(r: &sqlx::sqlite::SqliteRow) -> Result<Option<ProviderRecord>, DbError> {
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
