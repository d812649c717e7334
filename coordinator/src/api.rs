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
//! "buyer"/"owner" auth is `Authorization: Kiln2 <hex of a
//! Signed<RequestAuth>>`: bound to this coordinator, the method, path and
//! query, and the body, accepted once ([`crate::auth`] checks it before any
//! handler runs). A job is visible only to its owner: to anyone else it does
//! not exist (404), so ids leak nothing.
//!
//! Every body is a typed view from [`kiln_protocol::views`], the same types
//! the `kiln` client reads (built from the coordinator's records by
//! [`crate::views`]). Every error is JSON `{"error": "...", "field": "..."}`
//! ([`kiln_protocol::views::ErrorView`]) with one status mapping, in
//! [`ApiError`].

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_contracts::{AccountId, Applied};
use kiln_protocol::views::{
    AccountView, BalancesView, CancelView, InfoView, JobListView, LedgerPageView, LedgerRowView,
    LogsView, OffersView, OutputsView, ProviderAuditsView, ProvidersView, StatementLineView,
    StatementView,
};
use kiln_protocol::{BuyerId, ContentId, Credits, JobId, JobSubmission, Signed, UnixMillis};

use crate::AppState;
pub use crate::auth::{ApiError, Buyer};
use crate::jobs::JobRecord;
use crate::lifecycle::{cancel, submit};
use crate::views::{self, JobDetail};

/// Largest request body (an uploaded input).
pub const MAX_BODY: usize = 64 << 20;

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
        .layer(axum::middleware::from_fn_with_state(
            crate::auth::AuthState::new(state.peer, MAX_BODY),
            crate::auth::authenticate,
        ))
        .with_state(state)
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
    let (job, created) = submit::submit(&state, signed).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(views::job(&job))).into_response())
}

async fn list_jobs(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
) -> Result<Json<JobListView>, ApiError> {
    let jobs = state.db.jobs_of(&buyer, 500).await?;
    Ok(Json(JobListView {
        jobs: jobs.iter().map(views::job).collect(),
    }))
}

async fn get_job(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let events = state
        .db
        .events(&job.id)
        .await?
        .iter()
        .map(views::event)
        .collect::<Result<_, _>>()?;
    let now = UnixMillis::now();
    let members = state
        .db
        .members(&job.id)
        .await?
        .iter()
        .map(|m| views::member(m, now))
        .collect::<Vec<_>>();
    let verification = state.db.audit(&job.id).await?.map(|a| {
        let verifiers = members
            .iter()
            .filter(|m| m.role == kiln_protocol::views::Role::Verify && m.attempt == a.attempt)
            .map(|m| m.provider)
            .collect();
        views::verification(&a, verifiers, state.peer)
    });
    Ok(Json(
        JobDetail::new(&job, events, members).with_verification(verification),
    ))
}

async fn cancel_job(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<CancelView>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let outcome = cancel::cancel(&state, &job).await?.into();
    Ok(Json(CancelView {
        job_id: job.id,
        outcome,
    }))
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
) -> Result<Json<LogsView>, ApiError> {
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
            // The rank's latest delivered receipt (a job of one falls back
            // to the job's own).
            state
                .db
                .members(&job.id)
                .await?
                .into_iter()
                .rev()
                .find(|m| m.rank == rank && m.receipt.is_some())
                .and_then(|m| m.receipt)
                .or_else(|| job.receipt.clone().filter(|_| gang <= 1))
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
    Ok(Json(LogsView {
        job_id: job.id,
        rank: q.rank,
        provider: r.provider,
        stdout,
        stderr,
        stdout_cid: r.stdout_cid,
        stderr_cid: r.stderr_cid,
        truncated: r.usage.logs_truncated,
        clipped: stdout_clipped || stderr_clipped,
    }))
}

/// Most bytes of each log stream returned inline by the logs route (the
/// tail); the rest is fetched by CID (`kiln data get <stdout_cid>`).
const MAX_LOG_JSON: u64 = 1 << 20;

async fn job_outputs(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
) -> Result<Json<OutputsView>, ApiError> {
    let job = owned_job(&state, &buyer, &id).await?;
    let (Some(r), Some(m)) = (job.receipt.as_ref(), job.manifest.as_ref()) else {
        return Err(ApiError::NotFound(format!(
            "job {} has no outputs yet (state {})",
            job.id,
            job.state.as_str()
        )));
    };
    Ok(Json(OutputsView {
        job_id: job.id,
        output_cid: r.payload.output_cid,
        entries: m.entries.clone(),
    }))
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
) -> Result<Json<AccountView<AccountId>>, ApiError> {
    let ledger = state.bank.snapshot().await;
    let escrowed: u64 = ledger
        .escrows()
        .values()
        .filter(|e| e.buyer == buyer)
        .map(|e| e.held().0)
        .sum();
    let account = AccountId::Buyer(buyer);
    Ok(Json(AccountView {
        balance: ledger.balance(&account),
        account,
        escrowed: Credits(escrowed),
    }))
}

async fn providers(State(state): State<AppState>) -> Result<Json<ProvidersView>, ApiError> {
    let since = crate::live::lease_start(&state);
    let live = state.db.providers_seen_since(since).await?;
    let ledger = state.bank.snapshot().await;
    let mut providers = Vec::with_capacity(live.len());
    for p in &live {
        let id = p.advert.payload.provider;
        providers.push(views::provider(
            p,
            crate::audit::reputation(&state, &id).await?,
            ledger.balance(&AccountId::Provider(id)),
        ));
    }
    Ok(Json(ProvidersView { providers }))
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
) -> Result<Json<LedgerPageView>, ApiError> {
    let limit = page.limit.unwrap_or(1000).min(10_000);
    let rows = state.db.ledger_entries(page.from, limit).await?;
    let next = rows.last().map(|(seq, _)| seq + 1);
    let entries = rows
        .iter()
        .map(|(seq, bytes)| LedgerRowView {
            seq: *seq,
            entry: hex::encode(bytes),
        })
        .collect();
    Ok(Json(LedgerPageView { entries, next }))
}

async fn ledger_balances(
    State(state): State<AppState>,
) -> Result<Json<BalancesView<AccountId>>, ApiError> {
    Ok(Json(BalancesView {
        balances: state.db.balances().await?,
    }))
}

async fn statement(
    State(state): State<AppState>,
    Path(account): Path<String>,
) -> Result<Json<StatementView<AccountId, Applied>>, ApiError> {
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
                let e = entry.payload;
                lines.push(StatementLineView {
                    seq: *seq,
                    at: e.at,
                    op: e.op.name().to_string(),
                    key: e.op.key().as_str().to_string(),
                    delta,
                    effect: e.effect,
                });
            }
        }
    }
    let balance = state.bank.snapshot().await.balance(&account);
    Ok(Json(StatementView {
        account,
        balance,
        entries: lines,
    }))
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
) -> Result<Json<OffersView>, ApiError> {
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
    let fleet = crate::schedule::fleet(&state).await?;
    let rows = crate::sched::search(&fleet, &query, sort, oq.limit.unwrap_or(50).min(1000));
    Ok(Json(OffersView {
        query: oq.q,
        sort: views::offer_sort(sort),
        offers: rows,
    }))
}

async fn provider_audits(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ProviderAuditsView>, ApiError> {
    let id: kiln_protocol::ProviderId =
        id.parse()
            .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
                field: Some("id".into()),
                reason: e.to_string(),
            })?;
    Ok(Json(ProviderAuditsView {
        provider: id,
        reputation: crate::audit::reputation(&state, &id).await?,
        audits: crate::audit::history(&state, &id, 100).await?,
    }))
}

async fn info(State(state): State<AppState>) -> Json<InfoView> {
    Json(InfoView {
        peer_id: state.peer,
        public_key: state.key.public(),
        p2p_addrs: state
            .net
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        faucet: state.config.faucet,
    })
}
