//! The buyer-facing REST API.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `POST /v1/jobs` | signed body | submit a `Signed<JobSubmission>` (idempotent) |
//! | `GET /v1/jobs` | buyer | the caller's jobs |
//! | `GET /v1/jobs/{id}` | owner | status, reason, receipt, history |
//! | `POST /v1/jobs/{id}/cancel` | owner | cancel (refund if not started; else stop and pay for time used) |
//! | `GET /v1/jobs/{id}/logs[?rank=r]` | owner | stdout/stderr (of gang rank `r`) |
//! | `GET /v1/jobs/{id}/outputs` | owner | output manifest |
//! | `GET /v1/jobs/{id}/blobs/{cid}` | owner | bytes of one output or log |
//! | `/v1/blobs…` | buyer | data: upload, list, download (see [`crate::blob_api`]) |
//! | `GET /v1/account` | buyer | balance |
//! | `GET /v1/providers` | none | live providers, with reputation |
//! | `GET /v1/providers/{id}/audits` | none | capability-challenge history |
//! | `GET /v1/offers?q=…&sort=price&limit=N` | none | search providers (`gpu_name=H100 num_gpus>=2 price<=2.5`) |
//! | `GET /v1/info` | none | coordinator identity, public key and addresses |
//! | `GET /v1/ledger?from=N&limit=M` | none | signed hash-chained ledger entries (canonical bytes, hex) |
//! | `GET /v1/ledger/balances` | none | the stored balances the chain must reproduce |
//! | `GET /v1/accounts/{account}/statement` | none | an account's entries and balance |
//!
//! The ledger is public on purpose: anyone can replay it with
//! `kiln ledger verify` against the coordinator's published key.
//!
//! "buyer"/"owner" auth is `Authorization: Kiln <hex of a Signed<ApiAuth>>`
//! for this exact method and path. A job is visible only to its owner: to
//! anyone else it does not exist (404), so ids leak nothing.
//!
//! Every error is JSON `{"error": "...", "field": "..."}` with one status
//! mapping, in [`ApiError`].

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_contracts::AccountId;
use kiln_protocol::{ApiAuth, BuyerId, ContentId, JobId, JobSubmission, Signed, UnixMillis};
use serde_json::{Value, json};

use crate::AppState;
use crate::db::{DbError, JobRecord};
use crate::service::{self, SubmitError};

/// Largest request body (an uploaded input).
pub const MAX_BODY: usize = 64 << 20;
/// Longest validity accepted for a request signature.
const MAX_AUTH_TTL_MS: u64 = 5 * 60 * 1000;

/// Every API error, and its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{reason}")]
    BadRequest {
        field: Option<String>,
        reason: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    PaymentRequired(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{reason} (the blob has {size} bytes)")]
    RangeNotSatisfiable { size: u64, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, field) = match &self {
            Self::BadRequest { field, .. } => (StatusCode::BAD_REQUEST, field.clone()),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, None),
            Self::PaymentRequired(_) => (StatusCode::PAYMENT_REQUIRED, None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, None),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, None),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
            Self::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, None),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, Some("range".into()))
            }
            Self::Internal(e) => {
                tracing::error!("internal error serving a request: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, None)
            }
        };
        let mut body = json!({ "error": self.to_string() });
        if let Some(f) = field {
            body["field"] = json!(f);
        }
        (status, Json(body)).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Signature(s) => {
                Self::Unauthorized(format!("submission signature refused: {s}"))
            }
            SubmitError::Spec(s) => Self::BadRequest {
                field: Some(format!("spec.{}", s.field)),
                reason: format!("invalid job spec: {s}"),
            },
            e @ SubmitError::Funds { .. } => Self::PaymentRequired(e.to_string()),
            SubmitError::Db(e) => e.into(),
            SubmitError::Bank(e) => Self::Internal(e),
        }
    }
}

/// The authenticated buyer making the request.
pub struct Buyer(pub BuyerId);

impl FromRequestParts<AppState> for Buyer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::Unauthorized("missing `Authorization: Kiln <signed request>` header; use the kiln CLI, which signs requests with your buyer key".into()))?;
        let hex_part = header.strip_prefix("Kiln ").ok_or_else(|| {
            ApiError::Unauthorized("the Authorization scheme must be `Kiln`".into())
        })?;
        let bytes = hex::decode(hex_part.trim())
            .map_err(|_| ApiError::Unauthorized("the Authorization value is not hex".into()))?;
        let signed: Signed<ApiAuth> = Signed::from_bytes(&bytes)
            .map_err(|e| ApiError::Unauthorized(format!("unreadable request signature: {e}")))?;
        let now = UnixMillis::now();
        let auth = signed
            .verify(now)
            .map_err(|e| ApiError::Unauthorized(format!("request signature refused: {e}")))?;
        if signed.expires_at.0 > now.0 + MAX_AUTH_TTL_MS {
            return Err(ApiError::Unauthorized(
                "request signature is valid for too long (at most 5 minutes)".into(),
            ));
        }
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        if auth.method != parts.method.as_str() || auth.path != path {
            return Err(ApiError::Unauthorized(format!(
                "request signature is for {} {}, not {} {path}",
                auth.method, auth.path, parts.method
            )));
        }
        Ok(Buyer(BuyerId::new(signed.signer)))
    }
}

pub fn create_app(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/jobs/{id}/outputs", get(job_outputs))
        .route("/v1/jobs/{id}/blobs/{cid}", get(job_blob))
        .route("/v1/account", get(account))
        .route("/v1/providers", get(providers))
        .route("/v1/providers/{id}/audits", get(provider_audits))
        .route("/v1/offers", get(offers))
        .route("/v1/info", get(info))
        .route("/v1/ledger", get(ledger_entries))
        .route("/v1/ledger/balances", get(ledger_balances))
        .route("/v1/accounts/{account}/statement", get(statement))
        .merge(crate::blob_api::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn job_json(j: &JobRecord) -> Value {
    let r = j.receipt.as_ref().map(|r| &r.payload);
    json!({
        "job_id": j.id,
        "owner": j.owner,
        "label": j.label,
        "state": j.state,
        "reason": j.reason,
        "provider": j.provider,
        "attempts": j.attempts,
        "price_per_hour": j.price_per_hour,
        "max_cost": j.max_cost,
        "cost": j.cost,
        "exit_code": j.exit_code,
        "output_cid": r.map(|r| r.output_cid),
        "stdout_cid": r.map(|r| r.stdout_cid),
        "stderr_cid": r.map(|r| r.stderr_cid),
        "receipt_verified": j.receipt.is_some(),
        "logs_truncated": r.map(|r| r.usage.logs_truncated),
        "usage": r.map(|r| &r.usage),
        "receipt": j.receipt,
        "spec": j.spec,
        "created_at": j.created_at,
        "updated_at": j.updated_at,
    })
}

fn parse_id(id: &str) -> Result<JobId, ApiError> {
    id.parse()
        .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
            field: Some("id".into()),
            reason: e.to_string(),
        })
}

/// Loads a job the caller owns; anyone else gets the same 404 as for a missing job.
async fn owned_job(state: &AppState, buyer: &BuyerId, id: &str) -> Result<JobRecord, ApiError> {
    let id = parse_id(id)?;
    match state.db.job(&id).await? {
        Some(j) if j.owner == *buyer => Ok(j),
        _ => Err(ApiError::NotFound(format!(
            "no job {id} for buyer {}",
            buyer.short()
        ))),
    }
}

async fn submit_job(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let signed: Signed<JobSubmission> = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: (path != ".").then(|| path.trim_start_matches("payload.").to_string()),
            reason: format!("malformed submission at `{path}`: {}", e.inner()),
        }
    })?;
    let (job, created) = service::submit(&state, signed).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job_json(&job))).into_response())
}

async fn list_jobs(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
) -> Result<Json<Value>, ApiError> {
    let jobs = state.db.jobs_of(&buyer, 500).await?;
    Ok(Json(
        json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() }),
    ))
}

async fn get_job(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let mut v = job_json(&job);
    v["events"] = json!(state.db.events(&job.id).await?);
    if job.spec.resources.gang > 1 {
        v["gang"] = crate::gang::members_json(&state, &job.id).await?;
    }
    Ok(Json(v))
}

async fn cancel_job(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let outcome = match service::cancel(&state, &job).await.map_err(|e| match e {
        SubmitError::Bank(msg) => ApiError::Unavailable(msg),
        other => other.into(),
    })? {
        service::CancelOutcome::Cancelled => "cancelled".to_string(),
        service::CancelOutcome::Requested => "cancel_requested".to_string(),
        service::CancelOutcome::AlreadyEnded(s) => format!("already_{}", s.as_str()),
    };
    Ok(Json(json!({ "job_id": job.id, "outcome": outcome })))
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    /// A gang member's rank (its last attempt); default: the job's own
    /// receipt (rank 0 of a gang).
    rank: Option<u32>,
}

async fn job_logs(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Result<Json<Value>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let receipt = match q.rank {
        None => job.receipt.clone(),
        Some(rank) => {
            let gang = job.spec.resources.gang;
            if rank >= gang {
                return Err(ApiError::BadRequest {
                    field: Some("rank".into()),
                    reason: format!(
                        "job {} runs on {gang} node(s): its ranks are 0 to {}",
                        job.id,
                        gang.saturating_sub(1)
                    ),
                });
            }
            if gang <= 1 {
                job.receipt.clone()
            } else {
                crate::gang::members(&state, &job.id)
                    .await?
                    .into_iter()
                    .rev()
                    .find(|m| m.rank == rank && m.receipt.is_some())
                    .and_then(|m| m.receipt)
            }
        }
    };
    let Some(r) = receipt.as_ref().map(|r| &r.payload) else {
        return Err(ApiError::NotFound(format!(
            "job {}{} has no logs yet (state {})",
            job.id,
            q.rank.map(|r| format!(" rank {r}")).unwrap_or_default(),
            job.state.as_str()
        )));
    };
    // At most the last MAX_LOG_JSON bytes of each stream go into the JSON;
    // the whole log is a blob the owner can fetch by its CID.
    let read = |cid: &ContentId| -> Result<(String, bool), ApiError> {
        let Some(blob) = state
            .blobs
            .open(cid)
            .map_err(|e| ApiError::Internal(e.to_string()))?
        else {
            return Ok((String::new(), false));
        };
        let len = blob.size().min(MAX_LOG_JSON);
        let bytes = blob
            .read_range(blob.size() - len, len)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((
            String::from_utf8_lossy(&bytes).into_owned(),
            len < blob.size(),
        ))
    };
    let (stdout, stdout_clipped) = read(&r.stdout_cid)?;
    let (stderr, stderr_clipped) = read(&r.stderr_cid)?;
    Ok(Json(json!({
        "job_id": job.id,
        "rank": q.rank,
        "provider": r.provider,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_cid": r.stdout_cid,
        "stderr_cid": r.stderr_cid,
        "truncated": r.usage.logs_truncated,
        "clipped": stdout_clipped || stderr_clipped,
    })))
}

/// Most bytes of each log stream returned inline by the logs route (the
/// tail); the rest is fetched by CID (`kiln data get <stdout_cid>`).
const MAX_LOG_JSON: u64 = 1 << 20;

async fn job_outputs(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let (Some(r), Some(m)) = (job.receipt.as_ref(), job.manifest.as_ref()) else {
        return Err(ApiError::NotFound(format!(
            "job {} has no outputs yet (state {})",
            job.id,
            job.state.as_str()
        )));
    };
    Ok(Json(
        json!({ "job_id": job.id, "output_cid": r.payload.output_cid, "entries": m.entries }),
    ))
}

async fn job_blob(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path((id, cid)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let cid: ContentId =
        cid.parse()
            .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
                field: Some("cid".into()),
                reason: e.to_string(),
            })?;
    let belongs = job
        .receipt
        .as_ref()
        .is_some_and(|r| r.payload.stdout_cid == cid || r.payload.stderr_cid == cid)
        || job
            .manifest
            .as_ref()
            .is_some_and(|m| m.entries.iter().any(|e| e.cid == cid));
    if !belongs {
        return Err(ApiError::NotFound(format!(
            "{cid} is not an output or log of job {}",
            job.id
        )));
    }
    crate::blob_api::stream_blob(&state, &cid, &headers).await
}

async fn account(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
) -> Result<Json<Value>, ApiError> {
    let ledger = state.bank.snapshot().await;
    let escrowed: u64 = ledger
        .escrows()
        .values()
        .filter(|e| e.buyer == buyer)
        .map(|e| e.held().0)
        .sum();
    Ok(Json(json!({
        "account": AccountId::Buyer(buyer).to_string(),
        "balance": ledger.balance(&AccountId::Buyer(buyer)),
        "escrowed": escrowed,
    })))
}

async fn providers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let since = crate::live::lease_start(&state);
    let live = state.db.providers_seen_since(since).await?;
    let ledger = state.bank.snapshot().await;
    let mut list = Vec::new();
    for p in &live {
        let a = &p.advert.payload;
        list.push(json!({
            "provider": a.provider,
            "last_seen": p.last_seen,
            "cpu": a.cpu,
            "memory": a.memory,
            "gpus": a.gpus,
            "slots": a.slots,
            "price_per_cpu_hour": a.price_per_cpu_hour,
            "price_per_gpu_hour": a.price_per_gpu_hour,
            "benchmark": a.benchmark,
            "reputation": crate::audit::reputation(&state, &a.provider).await?,
            "earned": ledger.balance(&AccountId::Provider(a.provider)),
            "addrs": a.listen_addrs,
            "cached": a.cached,
        }));
    }
    Ok(Json(json!({ "providers": list })))
}

#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    from: u64,
    limit: Option<u32>,
}

async fn ledger_entries(
    State(state): State<AppState>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(1000).min(10_000);
    let rows = state.db.ledger_entries(page.from, limit).await?;
    let next = rows.last().map(|(seq, _)| seq + 1);
    let entries: Vec<Value> = rows
        .iter()
        .map(|(seq, bytes)| json!({ "seq": seq, "entry": hex::encode(bytes) }))
        .collect();
    Ok(Json(json!({ "entries": entries, "next": next })))
}

async fn ledger_balances(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let balances = state.db.balances().await?;
    Ok(Json(json!({ "balances": balances })))
}

async fn statement(
    State(state): State<AppState>,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account: AccountId =
        account
            .parse()
            .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
                field: Some("account".into()),
                reason: e.to_string(),
            })?;
    let mut lines = Vec::new();
    let mut from = 0;
    loop {
        let rows = state.db.ledger_entries(from, 5000).await?;
        let Some((last, _)) = rows.last() else { break };
        from = last + 1;
        for (seq, bytes) in &rows {
            let entry =
                kiln_protocol::Signed::<kiln_contracts::chain::LedgerEntry>::from_bytes(bytes)
                    .map_err(|e| {
                        ApiError::Internal(format!("ledger entry {seq} is unreadable: {e}"))
                    })?;
            if let Some(delta) = crate::bank::touches(&entry.payload.effect, &account) {
                lines.push(json!({
                    "seq": seq,
                    "at": entry.payload.at,
                    "op": entry.payload.op.name(),
                    "key": entry.payload.op.key().as_str(),
                    "delta": delta.to_string(),
                    "effect": entry.payload.effect,
                }));
            }
        }
    }
    let balance = state.bank.snapshot().await.balance(&account);
    Ok(Json(
        json!({ "account": account.to_string(), "balance": balance, "entries": lines }),
    ))
}

#[derive(serde::Deserialize)]
struct OfferQuery {
    #[serde(default)]
    q: String,
    sort: Option<String>,
    limit: Option<usize>,
}

async fn offers(
    State(state): State<AppState>,
    axum::extract::Query(oq): axum::extract::Query<OfferQuery>,
) -> Result<Json<Value>, ApiError> {
    let bad = |field: &str, e: crate::sched::QueryError| ApiError::BadRequest {
        field: Some(field.into()),
        reason: e.to_string(),
    };
    let query: crate::sched::Query = oq.q.parse().map_err(|e| bad("q", e))?;
    let sort: crate::sched::SortBy = oq
        .sort
        .as_deref()
        .unwrap_or("price")
        .parse()
        .map_err(|e| bad("sort", e))?;
    let fleet = crate::service::fleet(&state).await?;
    let rows = crate::sched::search(&fleet, &query, sort, oq.limit.unwrap_or(50).min(1000));
    Ok(Json(
        json!({ "query": oq.q, "sort": sort.to_string(), "offers": rows }),
    ))
}

async fn provider_audits(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: kiln_protocol::ProviderId =
        id.parse()
            .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
                field: Some("id".into()),
                reason: e.to_string(),
            })?;
    Ok(Json(json!({
        "provider": id,
        "reputation": crate::audit::reputation(&state, &id).await?,
        "audits": crate::audit::history(&state, &id, 100).await?,
    })))
}

async fn info(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "peer_id": state.peer,
        "public_key": state.key.public(),
        "p2p_addrs": state.net.listen_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "faucet": state.config.faucet,
    }))
}
