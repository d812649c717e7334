//! All SQL for jobs and their members, in one place.
//!
//! Every state change is a compare-and-set: it names the states (and, for
//! a job, the attempt) it expects to find and changes nothing otherwise, and
//! it is refused outright when [`super::model`]'s table does not allow it.
//! So two paths racing over one job (a result and a cancel, a late result
//! and a requeue) can never both apply, and a member of a superseded
//! attempt can never move its job.

use kiln_protocol::{
    BuyerId, Credits, JobId, JobSpec, Manifest, OfferId, Outcome, ProviderId, ResultReceipt,
    Signed, UnixMillis,
};
use serde::Serialize;
use sqlx::Row;

use super::model::{self, JobState, MemberState, Role};
use crate::db::{Db, DbError, Tx};

pub(super) fn corrupt(table: &'static str, reason: impl ToString) -> DbError {
    DbError::Corrupt {
        table,
        reason: reason.to_string(),
    }
}
/// A count or instant as SQLite's signed integer (saturating).
pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
/// Back from SQLite (a negative value reads as 0).
pub(super) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A job as stored. `provider`, `offer_id`, `receipt` and `manifest` are
/// the lead member's (rank 0 of the deciding attempt), so a client can
/// verify the job's receipt without knowing about members.
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

impl JobRecord {
    /// Members per attempt.
    pub fn size(&self) -> u32 {
        self.spec.resources.gang.max(1)
    }
    /// Most one member may earn: the escrow split evenly over the members.
    pub fn member_cap(&self) -> Credits {
        Credits(self.max_cost.0 / u64::from(self.size()))
    }
    pub fn timeout_ms(&self) -> u64 {
        self.spec.resources.timeout.0.saturating_mul(1000)
    }
    /// What member `m` of this job is paid against.
    pub fn terms(&self, m: &Member) -> super::billing::Terms {
        super::billing::Terms {
            price_per_hour: m.price_per_hour,
            cap: self.member_cap(),
            timeout_ms: self.timeout_ms(),
        }
    }
}

/// A recorded state change.
#[derive(Clone, Debug, Serialize)]
pub struct JobEvent {
    pub at: u64,
    pub state: String,
    pub detail: Option<String>,
}

/// One member execution as stored.
#[derive(Clone, Debug)]
pub struct Member {
    pub offer_id: OfferId,
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub provider: ProviderId,
    pub listen_addrs: Vec<String>,
    pub price_per_hour: Credits,
    pub state: MemberState,
    pub reason: Option<String>,
    pub outcome: Option<Outcome>,
    /// Gross credits paid to it so far (intervals and final).
    pub paid: Credits,
    pub cost: Option<Credits>,
    pub receipt: Option<Signed<ResultReceipt>>,
    pub manifest: Option<Manifest>,
    /// When the coordinator saw it start.
    pub started_at: Option<UnixMillis>,
    /// When its verified receipt first arrived.
    pub result_at: Option<UnixMillis>,
    /// When it was last paid.
    pub paid_at: Option<UnixMillis>,
    /// Runs the job, or re-executes it to verify a result.
    pub role: Role,
}

impl Member {
    /// A new member of `job`'s `attempt`, just offered to the provider a
    /// placement chose (a fresh offer id; nothing run, paid or delivered).
    pub fn offered(
        job_id: JobId,
        attempt: u32,
        rank: u32,
        placement: &crate::sched::Placement,
        listen_addrs: Vec<String>,
        role: Role,
    ) -> Self {
        Self {
            offer_id: OfferId::random(),
            job_id,
            attempt,
            rank,
            provider: placement.provider,
            listen_addrs,
            price_per_hour: placement.price_per_hour,
            state: MemberState::Offered,
            reason: None,
            outcome: None,
            paid: Credits(0),
            cost: None,
            receipt: None,
            manifest: None,
            started_at: None,
            result_at: None,
            paid_at: None,
            role,
        }
    }
}

/// Which job state(s) a change expects, and which attempt.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub states: &'a [JobState],
    /// `None`: any attempt (buyer actions on a queued job).
    pub attempt: Option<u32>,
}

impl<'a> Expect<'a> {
    pub fn any(states: &'a [JobState]) -> Self {
        Self {
            states,
            attempt: None,
        }
    }
    pub fn attempt(states: &'a [JobState], attempt: u32) -> Self {
        Self {
            states,
            attempt: Some(attempt),
        }
    }
}

/// What a job state change carries besides the state itself.
#[derive(Default)]
pub struct Change<'a> {
    pub reason: Option<&'a str>,
    pub provider: Option<ProviderId>,
    pub offer_id: Option<OfferId>,
    pub price_per_hour: Option<Credits>,
    pub bump_attempts: bool,
    pub result: Option<ResultColumns<'a>>,
    /// What the buyer paid in all (set when the job ends).
    pub cost: Option<Credits>,
}

/// The lead member's verified result, copied to the job row.
pub struct ResultColumns<'a> {
    pub receipt: &'a Signed<ResultReceipt>,
    pub manifest: &'a Manifest,
}

const JOB_COLUMNS: &str = "SELECT id, owner, spec_json, label, state, reason, provider, offer_id, attempts, price_per_hour, \
     max_cost, cost, exit_code, receipt, manifest_json, created_at, updated_at FROM jobs ";

fn job_from_row(r: &sqlx::any::AnyRow) -> Result<JobRecord, DbError> {
    const T: &str = "jobs";
    let s = |c: &str| -> Result<Option<String>, DbError> { Ok(r.try_get::<Option<String>, _>(c)?) };
    let p = |v: String| v.parse::<JobState>().map_err(|e| corrupt(T, e));
    Ok(JobRecord {
        id: r
            .try_get::<String, _>("id")?
            .parse()
            .map_err(|e| corrupt(T, e))?,
        owner: r
            .try_get::<String, _>("owner")?
            .parse()
            .map_err(|e| corrupt(T, e))?,
        spec: serde_json::from_str(&r.try_get::<String, _>("spec_json")?)
            .map_err(|e| corrupt(T, e))?,
        label: s("label")?,
        state: p(r.try_get::<String, _>("state")?)?,
        reason: s("reason")?,
        provider: s("provider")?
            .map(|v| v.parse().map_err(|e| corrupt(T, e)))
            .transpose()?,
        offer_id: s("offer_id")?
            .map(|v| v.parse().map_err(|e| corrupt(T, e)))
            .transpose()?,
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
        manifest: s("manifest_json")?
            .map(|m| serde_json::from_str(&m).map_err(|e| corrupt(T, e)))
            .transpose()?,
        created_at: UnixMillis(u(r.try_get("created_at")?)),
        updated_at: UnixMillis(u(r.try_get("updated_at")?)),
    })
}

/// The states a job never leaves, as SQL.
const TERMINAL: &str = "'completed', 'failed', 'timed_out', 'cancelled'";

const MEMBER_COLUMNS: &str = "SELECT offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, reason, \
     outcome, paid, cost, receipt, manifest_json, started_at, result_at, paid_at, role FROM members ";

fn member_from_row(r: &sqlx::any::AnyRow) -> Result<Member, DbError> {
    const T: &str = "members";
    let s = |c: &str| -> Result<String, DbError> { Ok(r.try_get::<String, _>(c)?) };
    let n = |c: &str| -> Result<u64, DbError> { Ok(u(r.try_get::<i64, _>(c)?)) };
    let at = |c: &str| -> Result<Option<UnixMillis>, DbError> {
        Ok(r.try_get::<Option<i64>, _>(c)?.map(|v| UnixMillis(u(v))))
    };
    Ok(Member {
        offer_id: s("offer_id")?.parse().map_err(|e| corrupt(T, e))?,
        job_id: s("job_id")?.parse().map_err(|e| corrupt(T, e))?,
        attempt: u32::try_from(n("attempt")?).unwrap_or(0),
        rank: u32::try_from(n("rank")?).unwrap_or(0),
        provider: s("provider")?.parse().map_err(|e| corrupt(T, e))?,
        listen_addrs: serde_json::from_str(&s("listen_addrs")?).map_err(|e| corrupt(T, e))?,
        price_per_hour: Credits(n("price_per_hour")?),
        state: s("state")?
            .parse::<MemberState>()
            .map_err(|e| corrupt(T, e))?,
        reason: r.try_get("reason")?,
        outcome: r
            .try_get::<Option<String>, _>("outcome")?
            .and_then(|o| model::outcome_from(&o)),
        paid: Credits(n("paid")?),
        cost: r.try_get::<Option<i64>, _>("cost")?.map(|c| Credits(u(c))),
        receipt: r
            .try_get::<Option<Vec<u8>>, _>("receipt")?
            .map(|b| Signed::from_bytes(&b).map_err(|e| corrupt(T, e)))
            .transpose()?,
        manifest: r
            .try_get::<Option<String>, _>("manifest_json")?
            .map(|m| serde_json::from_str(&m).map_err(|e| corrupt(T, e)))
            .transpose()?,
        started_at: at("started_at")?,
        result_at: at("result_at")?,
        paid_at: at("paid_at")?,
        role: s("role")?.parse::<Role>().map_err(|e| corrupt(T, e))?,
    })
}

/// Jobs: reads.
impl Db {
    pub async fn job(&self, id: &JobId) -> Result<Option<JobRecord>, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{JOB_COLUMNS} WHERE id = $1")))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub async fn jobs_of(&self, owner: &BuyerId, limit: u32) -> Result<Vec<JobRecord>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{JOB_COLUMNS} WHERE owner = $1 ORDER BY created_at DESC LIMIT $2"
        )))
        .bind(owner.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// `owner`'s jobs that have not ended, oldest first (at most the
    /// queued-per-buyer limit plus those placed).
    pub async fn live_jobs_of(&self, owner: &BuyerId) -> Result<Vec<JobRecord>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{JOB_COLUMNS} WHERE owner = $1 AND state NOT IN ({TERMINAL}) ORDER BY created_at"
        )))
        .bind(owner.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Members that delivered a result in jobs that have not ended: the
    /// results a verification may still compare.
    pub async fn results_in_flight(&self) -> Result<Vec<Member>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE receipt IS NOT NULL AND job_id IN \
             (SELECT id FROM jobs WHERE state NOT IN ({TERMINAL}))"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    /// Jobs in any of `states`, oldest first.
    pub async fn jobs_in(
        &self,
        states: &[JobState],
        limit: u32,
    ) -> Result<Vec<JobRecord>, DbError> {
        let mut out = Vec::new();
        for s in states {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "{JOB_COLUMNS} WHERE state = $1 ORDER BY created_at LIMIT $2"
            )))
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

    /// Jobs in which `provider` holds a member that may still execute
    /// (its inputs may be fetched by it; it may not unstake).
    pub async fn jobs_held_by(&self, provider: &ProviderId) -> Result<Vec<JobRecord>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{JOB_COLUMNS} WHERE state IN ('dispatched', 'running', 'cancelling', 'verifying') AND id IN \
             (SELECT m.job_id FROM members m WHERE m.provider = $1 \
              AND m.state IN ('offered', 'reserved', 'started', 'stopping') \
              AND m.attempt = jobs.attempts) ORDER BY created_at"
        )))
        .bind(provider.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn events(&self, job: &JobId) -> Result<Vec<JobEvent>, DbError> {
        let rows =
            sqlx::query("SELECT at, state, detail FROM job_events WHERE job_id = $1 ORDER BY seq")
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

    /// Updates only the reason of a queued job (a changed "why not
    /// placed"), without an event: the state did not change.
    pub async fn set_reason(&self, job: &JobId, reason: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET reason = $1 WHERE id = $2 AND state = 'queued'")
            .bind(reason)
            .bind(job.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Jobs: what the scheduler keeps of the queue, and what a submission may add to it.
impl Db {
    /// The sequence number of the latest job state change (0: none yet).
    /// Every state change writes one `job_events` row in its transaction,
    /// so changes after this number are everything that happened since.
    pub async fn last_job_change(&self) -> Result<i64, DbError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM job_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    /// Job state changes after `seq`, oldest first, at most `limit`: the
    /// change's sequence number, the job and the state it entered.
    pub async fn job_changes_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, JobId, JobState)>, DbError> {
        const T: &str = "job_events";
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, job_id, state FROM job_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, job, state)| {
                Ok((
                    seq,
                    job.parse().map_err(|e| corrupt(T, e))?,
                    state.parse().map_err(|e| corrupt(T, e))?,
                ))
            })
            .collect()
    }

    /// Queued jobs in submission order, after `after` (its `created_at` and
    /// id) when given, at most `limit`: the whole queue a page at a time.
    pub async fn queued_page(
        &self,
        after: Option<(UnixMillis, JobId)>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, DbError> {
        let (at, id) = after.map_or((-1, String::new()), |(at, id)| (i(at.0), id.to_string()));
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{JOB_COLUMNS} WHERE state = 'queued' AND (created_at > $1 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        )))
        .bind(at)
        .bind(at)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Those of `ids` that are queued now.
    pub async fn queued_among(&self, ids: &[JobId]) -> Result<Vec<JobRecord>, DbError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let marks = crate::db::marks(1, chunk.len());
            let sql = format!("{JOB_COLUMNS} WHERE state = 'queued' AND id IN ({marks})");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for r in &q.fetch_all(&self.pool).await? {
                out.push(job_from_row(r)?);
            }
        }
        Ok(out)
    }

    /// How many jobs `owner` has queued (not yet placed), read inside the
    /// submission's write transaction so two submissions cannot both take
    /// the last place.
    pub async fn queued_of(tx: &mut Tx<'_>, owner: &BuyerId) -> Result<u64, DbError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE owner = $1 AND state = 'queued'")
                .bind(owner.to_string())
                .fetch_one(&mut **tx)
                .await?;
        Ok(u(n))
    }

    /// [`Db::set_reason`] for many jobs, a few hundred per transaction (a
    /// round may rewrite the line of every queued job when the fleet changes).
    pub async fn set_reasons(&self, reasons: &[(JobId, String)]) -> Result<(), DbError> {
        for chunk in reasons.chunks(500) {
            let mut tx = self.begin().await?;
            for (job, reason) in chunk {
                sqlx::query("UPDATE jobs SET reason = $1 WHERE id = $2 AND state = 'queued'")
                    .bind(reason)
                    .bind(job.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Jobs: writes (inside the caller's transaction).
impl Db {
    pub async fn insert_job(
        tx: &mut Tx<'_>,
        job: &JobRecord,
        submission: &[u8],
    ) -> Result<(), DbError> {
        let spec_json = serde_json::to_string(&job.spec).map_err(|e| corrupt("jobs", e))?;
        sqlx::query(
            "INSERT INTO jobs (id, owner, submission, spec_json, label, state, reason, attempts, max_cost, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10)",
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
        event(tx, &job.id, job.state, job.reason.as_deref()).await
    }

    /// A job's state and attempt, read inside a write transaction.
    pub async fn job_state_in(
        tx: &mut Tx<'_>,
        job: &JobId,
    ) -> Result<Option<(JobState, u32)>, DbError> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT state, attempts FROM jobs WHERE id = $1")
                .bind(job.to_string())
                .fetch_optional(&mut **tx)
                .await?;
        row.map(|(s, a)| {
            Ok((
                s.parse::<JobState>().map_err(|e| corrupt("jobs", e))?,
                u32::try_from(a).unwrap_or(0),
            ))
        })
        .transpose()
    }

    /// Moves a job to `to` if it is in one of `expect.states` (and at
    /// `expect.attempt`) and the transition table allows it; `false`
    /// (changing nothing) otherwise.
    pub async fn transition(
        tx: &mut Tx<'_>,
        job: &JobId,
        expect: Expect<'_>,
        to: JobState,
        change: Change<'_>,
    ) -> Result<bool, DbError> {
        let Some((current, attempt)) = Self::job_state_in(tx, job).await? else {
            return Ok(false);
        };
        if !expect.states.contains(&current) || expect.attempt.is_some_and(|a| a != attempt) {
            return Ok(false);
        }
        if model::step(current, to).is_none() {
            tracing::error!(job = %job.short(), "refused a job transition the table does not allow: {current} -> {to}");
            return Ok(false);
        }
        sqlx::query(
            "UPDATE jobs SET state = $1, reason = $2, updated_at = $3, \
             provider = COALESCE($4, provider), offer_id = COALESCE($5, offer_id), \
             price_per_hour = COALESCE($6, price_per_hour), cost = COALESCE($7, cost), \
             attempts = attempts + $8 WHERE id = $9",
        )
        .bind(to.as_str())
        .bind(change.reason)
        .bind(i(UnixMillis::now().0))
        .bind(change.provider.map(|p| p.to_string()))
        .bind(change.offer_id.map(|o| o.to_string()))
        .bind(change.price_per_hour.map(|c| i(c.0)))
        .bind(change.cost.map(|c| i(c.0)))
        .bind(i64::from(change.bump_attempts))
        .bind(job.to_string())
        .execute(&mut **tx)
        .await?;
        if let Some(res) = change.result {
            let receipt = res.receipt.to_bytes().map_err(|e| corrupt("jobs", e))?;
            let r = &res.receipt.payload;
            sqlx::query(
                "UPDATE jobs SET receipt = $1, receipt_json = $2, manifest_json = $3, output_cid = $4, stdout_cid = $5, \
                 stderr_cid = $6, exit_code = $7 WHERE id = $8",
            )
            .bind(receipt)
            .bind(serde_json::to_string(r).map_err(|e| corrupt("jobs", e))?)
            .bind(serde_json::to_string(res.manifest).map_err(|e| corrupt("jobs", e))?)
            .bind(r.output_cid.to_string())
            .bind(r.stdout_cid.to_string())
            .bind(r.stderr_cid.to_string())
            .bind(r.exit_code)
            .bind(job.to_string())
            .execute(&mut **tx)
            .await?;
        }
        event(tx, job, to, change.reason).await?;
        Ok(true)
    }
}

async fn event(
    tx: &mut Tx<'_>,
    job: &JobId,
    state: JobState,
    detail: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query("INSERT INTO job_events (job_id, at, state, detail) VALUES ($1, $2, $3, $4)")
        .bind(job.to_string())
        .bind(i(UnixMillis::now().0))
        .bind(state.as_str())
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What a member state change carries.
#[derive(Default)]
pub struct MemberChange<'a> {
    pub reason: Option<&'a str>,
    /// Set when it starts: the clock its pay runs on.
    pub started_at: Option<UnixMillis>,
}

/// A verified result recorded on its member.
pub struct Delivery<'a> {
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
    pub cost: Credits,
    pub receipt: &'a Signed<ResultReceipt>,
    pub manifest: &'a Manifest,
}

/// Members: reads.
impl Db {
    pub async fn member(&self, offer: &OfferId) -> Result<Option<Member>, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE offer_id = $1"
        )))
        .bind(offer.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(member_from_row).transpose()
    }

    /// Every member of `job`, all attempts, by attempt then rank.
    pub async fn members(&self, job: &JobId) -> Result<Vec<Member>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE job_id = $1 ORDER BY attempt, rank"
        )))
        .bind(job.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    /// The members of one attempt, by rank.
    pub async fn attempt_members(&self, job: &JobId, attempt: u32) -> Result<Vec<Member>, DbError> {
        Ok(self
            .members(job)
            .await?
            .into_iter()
            .filter(|m| m.attempt == attempt)
            .collect())
    }

    /// Members that may still be executing, of any job (for rebuilding
    /// the scheduler's fleet, and for deadlines and leases).
    pub async fn pending_members(&self) -> Result<Vec<Member>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE state IN ('offered', 'reserved', 'started', 'stopping')"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    /// One member, read inside a write transaction.
    pub async fn member_in(tx: &mut Tx<'_>, offer: &OfferId) -> Result<Option<Member>, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE offer_id = $1"
        )))
        .bind(offer.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(member_from_row).transpose()
    }

    /// One attempt's members, read inside a write transaction.
    pub async fn attempt_members_in(
        tx: &mut Tx<'_>,
        job: &JobId,
        attempt: u32,
    ) -> Result<Vec<Member>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{MEMBER_COLUMNS} WHERE job_id = $1 AND attempt = $2 ORDER BY rank"
        )))
        .bind(job.to_string())
        .bind(i64::from(attempt))
        .fetch_all(&mut **tx)
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    /// What a job's members were paid in all attempts (what the buyer paid).
    pub async fn paid_in(tx: &mut Tx<'_>, job: &JobId) -> Result<Credits, DbError> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT CAST(SUM(paid) AS BIGINT) FROM members WHERE job_id = $1")
                .bind(job.to_string())
                .fetch_one(&mut **tx)
                .await?;
        Ok(Credits(n.map(u).unwrap_or(0)))
    }
}

/// Members: writes.
impl Db {
    pub async fn insert_member(tx: &mut Tx<'_>, m: &Member) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO members (offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, updated_at, role) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(m.offer_id.to_string())
        .bind(m.job_id.to_string())
        .bind(i64::from(m.attempt))
        .bind(i64::from(m.rank))
        .bind(m.provider.to_string())
        .bind(serde_json::to_string(&m.listen_addrs).map_err(|e| corrupt("members", e))?)
        .bind(i(m.price_per_hour.0))
        .bind(m.state.as_str())
        .bind(i(UnixMillis::now().0))
        .bind(m.role.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Moves a member from one of `from` to `to` (if the member table
    /// allows it); `false` if it was elsewhere.
    pub async fn set_member(
        tx: &mut Tx<'_>,
        offer: &OfferId,
        from: &[MemberState],
        to: MemberState,
        change: MemberChange<'_>,
    ) -> Result<bool, DbError> {
        let Some(m) = Self::member_in(tx, offer).await? else {
            return Ok(false);
        };
        if !from.contains(&m.state) || !model::member_step(m.state, to) {
            return Ok(false);
        }
        let r = sqlx::query(
            "UPDATE members SET state = $1, reason = COALESCE($2, reason), started_at = COALESCE($3, started_at), \
             updated_at = $4 WHERE offer_id = $5 AND state = $6",
        )
        .bind(to.as_str())
        .bind(change.reason)
        .bind(change.started_at.map(|t| i(t.0)))
        .bind(i(UnixMillis::now().0))
        .bind(offer.to_string())
        .bind(m.state.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a member's verified result; `false` if it is no longer
    /// running or stopping.
    pub async fn deliver_member(
        tx: &mut Tx<'_>,
        offer: &OfferId,
        d: Delivery<'_>,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE members SET state = 'delivered', outcome = $1, reason = COALESCE($2, reason), cost = $3, \
             receipt = $4, manifest_json = $5, updated_at = $6 WHERE offer_id = $7 AND state IN ('started', 'stopping')",
        )
        .bind(model::outcome_str(d.outcome))
        .bind(d.reason)
        .bind(i(d.cost.0))
        .bind(d.receipt.to_bytes().map_err(|e| corrupt("members", e))?)
        .bind(serde_json::to_string(d.manifest).map_err(|e| corrupt("members", e))?)
        .bind(i(UnixMillis::now().0))
        .bind(offer.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds to what a member was paid.
    pub async fn add_paid(
        tx: &mut Tx<'_>,
        offer: &OfferId,
        amount: Credits,
        at: UnixMillis,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE members SET paid = paid + $1, paid_at = $2 WHERE offer_id = $3")
            .bind(i(amount.0))
            .bind(i(at.0))
            .bind(offer.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Remembers when a member's verified receipt first arrived (the end
    /// of the time it is paid for, however long its outputs take to move).
    pub async fn result_arrived(
        &self,
        offer: &OfferId,
        at: UnixMillis,
    ) -> Result<UnixMillis, DbError> {
        sqlx::query("UPDATE members SET result_at = $1 WHERE offer_id = $2 AND result_at IS NULL")
            .bind(i(at.0))
            .bind(offer.to_string())
            .execute(&self.pool)
            .await?;
        let v: Option<i64> =
            sqlx::query_scalar("SELECT result_at FROM members WHERE offer_id = $1")
                .bind(offer.to_string())
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        Ok(v.map(|v| UnixMillis(u(v))).unwrap_or(at))
    }

    /// Forgets a receipt's arrival when the result is refused for good: the
    /// member's deadline applies again.
    pub async fn result_refused(&self, offer: &OfferId) -> Result<(), DbError> {
        sqlx::query("UPDATE members SET result_at = NULL WHERE offer_id = $1 AND state IN ('started', 'stopping')")
            .bind(offer.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
