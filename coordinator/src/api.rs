//! The buyer-facing REST API.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `POST /v1/jobs` | signed body | submit a `Signed<JobSubmission>` (idempotent) |
//! | `GET /v1/jobs` | buyer | the caller's jobs |
//! | `GET /v1/jobs/{id}` | owner | status, reason, receipt, history |
//! | `POST /v1/jobs/{id}/cancel` | owner | cancel (refund if not started; else stop and pay for time used) |
//! | `GET /v1/jobs/{id}/logs[?rank=r]` | owner | stdout/stderr (of gang rank `r`) |
//! | `GET /v1/jobs/{id}/logs/live?rank=r&stdout_from=a&stderr_from=b` | owner | what a running member has written so far, asked of its node |
//! | `GET /v1/jobs/{id}/outputs` | owner | output manifest |
//! | `GET /v1/jobs/{id}/blobs/{cid}` | owner | bytes of one output or log |
//! | `/v1/blobs…` | buyer | data: upload, list, download (see [`crate::blob_api`]) |
//! | `GET /v1/account` | buyer | balance |
//! | `GET /v1/providers` | none | live providers, with reputation (a snapshot at most 1 s old, see [`crate::listing`]) |
//! | `GET /v1/providers/{id}/audits` | none | capability-challenge history |
//! | `GET /v1/offers?q=…&sort=price&limit=N` | none | search providers (`gpu_name=H100 num_gpus>=2 price<=2.5`), over the scheduler's fleet in memory |
//! | `GET /v1/info` | none | coordinator identity, public key and addresses |
//! | `GET /v1/ledger?from=N&limit=M` | none | signed hash-chained ledger entries (canonical bytes, hex) |
//! | `GET /v1/ledger/balances` | none | the stored balances the chain must reproduce |
//! | `GET /v1/accounts/{account}/statement?from=N&limit=M` | none | an account's entries (a page, through its index) and balance |
//! | `POST /v1/operator/transfers` | operator key | record a buyer's deposit or a provider's payout (see [`crate::operator`]) |
//! | `GET /metrics`, `/healthz`, `/readyz` | none | Prometheus text, liveness, readiness (see [`crate::metrics`]) |
//!
//! The ledger is public on purpose: anyone can replay it with
//! `kiln ledger verify` against the coordinator's published key.
//!
//! No unauthenticated route costs more than its answer: none reads the
//! whole fleet, ledger or provider table per request. Unauthenticated
//! requests are limited per source address and share a budget of their
//! own; signed ones are limited per buyer key ([`crate::throttle`]).
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

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_contracts::{AccountId, Applied};
use kiln_protocol::views::{
    AccountView, BalancesView, CancelView, InfoView, JobListView, LedgerPageView, LedgerRowView,
    LogsView, OffersView, OutputsView, ProviderAuditsView, StatementView,
};
use kiln_protocol::{BuyerId, ContentId, JobId, JobSubmission, Signed, UnixMillis};

use crate::AppState;
pub use crate::auth::{ApiError, Buyer};
use crate::jobs::JobRecord;
use crate::lifecycle::{cancel, submit};
use crate::views::{self, JobDetail};

/// Largest request body (an uploaded input).
pub const MAX_BODY: usize = 64 << 20;

/// Statement lines per page when the request names no `limit`.
pub const STATEMENT_PAGE: u32 = 1000;
/// Most statement lines per page.
pub const MAX_STATEMENT_PAGE: u32 = 10_000;

pub fn create_app(state: AppState) -> Router {
    let auth = crate::auth::AuthState::new(
        state.peer,
        MAX_BODY,
        Arc::new(crate::throttle::Throttle::new(&state.config.api_limits)),
    );
    Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/jobs/{id}/logs/live", get(job_logs_live))
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
        .route("/v1/operator/transfers", post(crate::operator::transfer))
        .merge(crate::blob_api::routes())
        .route("/metrics", get(crate::metrics::metrics))
        .route("/healthz", get(crate::metrics::healthz))
        .route("/readyz", get(crate::metrics::readyz))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::record,
        ))
        .layer(Extension(Arc::new(crate::listing::Listing::new())))
        .layer(Extension(auth.clone()))
        .layer(Extension(InfoBody::of(&state)))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            auth,
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

async fn submit_job(
    State(state): State<AppState>,
    Extension(auth): Extension<crate::auth::AuthState>,
    crate::auth::Source(source): crate::auth::Source,
    body: Bytes,
) -> Result<Response, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let signed: Signed<JobSubmission> = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: (path != ".").then(|| path.trim_start_matches("payload.").to_string()),
            reason: format!("malformed submission at `{path}`: {}", e.inner()),
        }
    })?;
    // Counted against its signer, as a signed request is (`submit` checks
    // the signature again and gives the refusal its wording).
    let valid = signed.verify(UnixMillis::now()).is_ok();
    if let Err(t) = auth.admit_signed_body(&BuyerId::new(signed.signer), valid, source) {
        return Ok(auth.refuse(t).await);
    }
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

/// A gang rank the job has; its gang size.
fn check_rank(job: &JobRecord, rank: u32) -> Result<u32, ApiError> {
    let gang = job.spec.resources.gang.max(1);
    if rank >= gang {
        return Err(ApiError::BadRequest {
            field: Some("rank".into()),
            reason: format!(
                "job {} runs on {gang} node(s): its ranks are 0 to {}",
                job.id,
                gang - 1
            ),
        });
    }
    Ok(gang)
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
            let gang = check_rank(&job, rank)?;
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

#[derive(serde::Deserialize)]
struct LiveQuery {
    rank: Option<u32>,
    #[serde(default)]
    stdout_from: u64,
    #[serde(default)]
    stderr_from: u64,
}

/// The longest prefix of `b` made of whole UTF-8 characters, unless the
/// bytes are not UTF-8 at all (then everything, shown lossily): a
/// character split across two reads is sent whole with the next one.
fn whole_chars(b: &[u8]) -> (String, u64) {
    let n = match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => b.len(),
    };
    (String::from_utf8_lossy(&b[..n]).into_owned(), n as u64)
}

/// What a running job's member has written so far, asked of its node (for
/// `kiln job logs --follow`). Not running (queued, or ended: its logs are
/// stored) answers `live: false` with nothing new.
async fn job_logs_live(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LiveQuery>,
) -> Result<Json<kiln_protocol::views::LiveLogsView>, ApiError> {
    use kiln_protocol::views::{LiveLogsView, MemberState, Role};
    use kiln_protocol::{NetRequest, NetResponse, TailLogs};
    let job = owned_job(&state, &buyer, &id).await?;
    let rank = q.rank.unwrap_or(0);
    check_rank(&job, rank)?;
    let mut view = LiveLogsView {
        job_id: job.id,
        rank,
        state: job.state,
        stdout: String::new(),
        stderr: String::new(),
        stdout_next: q.stdout_from,
        stderr_next: q.stderr_from,
        live: false,
    };
    let member = state
        .db
        .attempt_members(&job.id, job.attempts)
        .await?
        .into_iter()
        .find(|m| {
            m.rank == rank
                && m.role == Role::Run
                && matches!(m.state, MemberState::Started | MemberState::Stopping)
        });
    let Some(m) = member else {
        return Ok(Json(view));
    };
    let ask = TailLogs {
        job_id: job.id,
        offer_id: m.offer_id,
        provider: m.provider,
        stdout_from: q.stdout_from,
        stderr_from: q.stderr_from,
    };
    let Some(signed) = crate::lifecycle::sign(&state, ask) else {
        return Err(ApiError::Internal("cannot sign the log request".into()));
    };
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        state.net.request(
            m.provider.peer_id(),
            crate::lifecycle::addrs_of(&m),
            NetRequest::TailLogs(signed),
        ),
    )
    .await;
    let unavailable = |why: String| {
        ApiError::Unavailable(format!(
            "provider {} did not give job {}'s live logs: {why}; try again, or read them once it ends",
            m.provider.short(),
            job.id
        ))
    };
    match asked {
        Ok(Ok(NetResponse::Logs(chunk))) => {
            let (stdout, n_out) = whole_chars(&chunk.stdout);
            let (stderr, n_err) = whole_chars(&chunk.stderr);
            view.stdout = stdout;
            view.stderr = stderr;
            view.stdout_next = q.stdout_from.saturating_add(n_out);
            view.stderr_next = q.stderr_from.saturating_add(n_err);
            view.live = true;
            Ok(Json(view))
        }
        Ok(Ok(NetResponse::Rejected { reason })) => Err(unavailable(reason)),
        Ok(Ok(other)) => Err(unavailable(format!("unexpected answer {other:?}"))),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable("no answer within 10 s".into())),
    }
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
    let account = AccountId::Buyer(buyer);
    Ok(Json(AccountView {
        balance: state.bank.balance(&account).await,
        account,
        escrowed: state.bank.escrowed(&buyer).await,
    }))
}

/// A [`kiln_protocol::views::ProvidersView`], from the listing's snapshot.
async fn providers(
    State(state): State<AppState>,
    Extension(listing): Extension<Arc<crate::listing::Listing>>,
) -> Result<Response, ApiError> {
    let body = listing.providers(&state).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Json<StatementView<AccountId, Applied>>, ApiError> {
    let account: AccountId =
        account
            .parse()
            .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
                field: Some("account".into()),
                reason: e.to_string(),
            })?;
    let limit = page
        .limit
        .unwrap_or(STATEMENT_PAGE)
        .clamp(1, MAX_STATEMENT_PAGE);
    // The balance first: a page may show an entry committed after it was
    // read, never lack one it includes.
    let balance = state.bank.balance(&account).await;
    let rows = state
        .db
        .statement_page(&account.to_string(), page.from, limit)
        .await?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|(seq, _)| seq + 1))
        .flatten();
    let entries = rows
        .iter()
        .map(|(seq, bytes)| views::statement_line(*seq, bytes, &account))
        .collect::<Result<_, _>>()?;
    Ok(Json(StatementView {
        account,
        balance,
        entries,
        next,
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
    let limit = oq.limit.unwrap_or(50).min(1000);
    // The scheduler's own fleet, in memory (what a job would be placed
    // on): providers past their lease are taken out first, as a round does.
    let rows = {
        let mut live = crate::live::lock(&state);
        live.expire(crate::live::lease_start(&state));
        crate::sched::search(&live.fleet, &query, sort, limit)
    };
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

/// `GET /v1/info`'s body, which does not change while the coordinator
/// runs: every client asks for it, so it is encoded once.
#[derive(Clone)]
struct InfoBody(Bytes);

impl InfoBody {
    fn of(state: &AppState) -> Self {
        // An `InfoView` (ids, strings, numbers) always encodes.
        Self(Bytes::from(
            serde_json::to_vec(&info_view(state)).unwrap_or_default(),
        ))
    }
}

async fn info(Extension(body): Extension<InfoBody>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.0).into_response()
}

fn info_view(state: &AppState) -> InfoView {
    InfoView {
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
    }
}
