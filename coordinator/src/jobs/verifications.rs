//! SQL for audit records (one per job whose result was accepted) and each
//! provider's verified track record ([`TrustState`]).

use kiln_protocol::views::VerificationStatus;
use kiln_protocol::{JobId, OfferId, ProviderId, UnixMillis};
use sqlx::Row;

use crate::db::{Db, DbError, Tx};
use crate::verification::{Decision, TrustState};

use super::store::{i, u};

fn corrupt(reason: impl ToString) -> DbError {
    super::store::corrupt("verifications", reason)
}

/// One job's audit record as stored.
#[derive(Clone, Debug)]
pub struct AuditRow {
    pub job_id: JobId,
    pub attempt: u32,
    /// The member whose result was decided on.
    pub offer_id: OfferId,
    pub provider: ProviderId,
    /// The audit secret's epoch (see [`crate::lifecycle::reexec::secret`]).
    pub epoch: u64,
    pub decision: Decision,
    pub status: VerificationStatus,
    pub detail: String,
    /// The signed record (JSON) and the coordinator's signature over it.
    pub record_json: String,
    pub signature: String,
    pub opened_at: UnixMillis,
    pub closes_at: UnixMillis,
    pub decided_at: Option<UnixMillis>,
}

const COLUMNS: &str = "SELECT job_id, attempt, offer_id, provider, epoch, decision_json, status, detail, \
     record_json, signature, opened_at, closes_at, decided_at FROM verifications ";

fn row(r: &sqlx::any::AnyRow) -> Result<AuditRow, DbError> {
    let s = |c: &str| -> Result<String, DbError> { Ok(r.try_get::<String, _>(c)?) };
    Ok(AuditRow {
        job_id: s("job_id")?.parse().map_err(corrupt)?,
        attempt: u32::try_from(r.try_get::<i64, _>("attempt")?).unwrap_or(0),
        offer_id: s("offer_id")?.parse().map_err(corrupt)?,
        provider: s("provider")?.parse().map_err(corrupt)?,
        epoch: u(r.try_get("epoch")?),
        decision: serde_json::from_str(&s("decision_json")?).map_err(corrupt)?,
        status: s("status")?.parse().map_err(corrupt)?,
        detail: s("detail")?,
        record_json: s("record_json")?,
        signature: s("signature")?,
        opened_at: UnixMillis(u(r.try_get("opened_at")?)),
        closes_at: UnixMillis(u(r.try_get("closes_at")?)),
        decided_at: r
            .try_get::<Option<i64>, _>("decided_at")?
            .map(|v| UnixMillis(u(v))),
    })
}

impl Db {
    pub async fn insert_audit(tx: &mut Tx<'_>, a: &AuditRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO verifications (job_id, attempt, offer_id, provider, epoch, decision_json, audited, \
             status, detail, record_json, signature, opened_at, closes_at, decided_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(a.job_id.to_string())
        .bind(i64::from(a.attempt))
        .bind(a.offer_id.to_string())
        .bind(a.provider.to_string())
        .bind(i(a.epoch))
        .bind(serde_json::to_string(&a.decision).map_err(corrupt)?)
        .bind(a.decision.audited)
        .bind(a.status.as_str())
        .bind(&a.detail)
        .bind(&a.record_json)
        .bind(&a.signature)
        .bind(i(a.opened_at.0))
        .bind(i(a.closes_at.0))
        .bind(a.decided_at.map(|t| i(t.0)))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Moves a record on from `from` (compare-and-set); `false` if it was
    /// no longer there.
    pub async fn update_audit(
        tx: &mut Tx<'_>,
        a: &AuditRow,
        from: VerificationStatus,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE verifications SET status = $1, detail = $2, record_json = $3, signature = $4, decided_at = $5 \
             WHERE job_id = $6 AND status = $7",
        )
        .bind(a.status.as_str())
        .bind(&a.detail)
        .bind(&a.record_json)
        .bind(&a.signature)
        .bind(a.decided_at.map(|t| i(t.0)))
        .bind(a.job_id.to_string())
        .bind(from.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn audit(&self, job: &JobId) -> Result<Option<AuditRow>, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE job_id = $1")))
            .bind(job.to_string())
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(row).transpose()
    }

    pub async fn audit_in(tx: &mut Tx<'_>, job: &JobId) -> Result<Option<AuditRow>, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE job_id = $1")))
            .bind(job.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        r.as_ref().map(row).transpose()
    }

    /// Records still waiting for executions (pending or disputed).
    pub async fn open_audits(&self) -> Result<Vec<AuditRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{COLUMNS} WHERE status IN ('pending', 'disputed') ORDER BY opened_at"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// Every record, oldest first (for replaying decisions).
    pub async fn audits(&self, limit: u32) -> Result<Vec<AuditRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{COLUMNS} ORDER BY opened_at LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// How many open verifications involve `provider`, as the provider
    /// checked or as a verifier: while any is open its bond stays put.
    pub async fn open_audits_of(&self, provider: &ProviderId) -> Result<u64, DbError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM verifications v WHERE v.status IN ('pending', 'disputed') AND \
             (v.provider = $1 OR EXISTS (SELECT 1 FROM members m WHERE m.job_id = v.job_id \
              AND m.attempt = v.attempt AND m.provider = $1))",
        )
        .bind(provider.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(u(n))
    }

    pub async fn trust_in(tx: &mut Tx<'_>, provider: &ProviderId) -> Result<TrustState, DbError> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT consecutive_verified FROM trust WHERE provider = $1")
                .bind(provider.to_string())
                .fetch_optional(&mut **tx)
                .await?;
        Ok(TrustState::new(
            n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        ))
    }

    pub async fn set_trust(
        tx: &mut Tx<'_>,
        provider: &ProviderId,
        trust: TrustState,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO trust (provider, consecutive_verified) VALUES ($1, $2) \
             ON CONFLICT (provider) DO UPDATE SET consecutive_verified = excluded.consecutive_verified",
        )
        .bind(provider.to_string())
        .bind(i64::from(trust.consecutive_verified))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
