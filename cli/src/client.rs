//! A typed client for the coordinator's REST API. Every request that needs
//! identity carries `Authorization: Kiln2 <signed RequestAuth>` made with
//! the buyer's key ([`kiln_protocol::request_auth`]): for this coordinator
//! (its peer id, asked once from `GET /v1/info`), this method, path and
//! query, and the BLAKE3 of the exact body (a streamed blob upload: its
//! CID), with a fresh nonce, valid for one minute. The coordinator accepts
//! each signature once, so every request is signed anew. Public routes are
//! sent unsigned.
//!
//! GETs that the coordinator refuses for now (HTTP 429: a rate limit) are
//! sent again after its `Retry-After`, a few times (a signed one signed
//! anew: the refused signature was spent); other requests report the 429.
//!
//! A coordinator that lied about its own peer id on `/v1/info` could get
//! requests signed for another one; [`Client::with_coordinator_id`] pins
//! the id instead of asking.

use std::sync::Arc;

use kiln_contracts::Applied;

/// GETs answered 429 are sent again at most this many times.
pub const RETRIES_ON_429: u32 = 5;
/// Longest `Retry-After` waited, in seconds.
pub const MAX_RETRY_AFTER: u64 = 30;

/// How long to wait before sending a GET again: `Some` for a 429 while
/// tries are left (its `Retry-After`, 1 to [`MAX_RETRY_AFTER`] s).
fn retry_wait(resp: &reqwest::Response, attempt: &mut u32) -> Option<std::time::Duration> {
    if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || *attempt >= RETRIES_ON_429 {
        return None;
    }
    *attempt += 1;
    let secs = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, MAX_RETRY_AFTER);
    Some(std::time::Duration::from_secs(secs))
}
use kiln_protocol::request_auth::{CLIENT_TTL_SECS, RequestAuth};
use kiln_protocol::views::{
    AccountView, BalancesView, BlobDeletedView, BlobListView, CancelView, ErrorView, InfoView,
    JobListView, JobView, LedgerPageView, LiveLogsView, LogsView, MissingRequest, MissingView,
    OffersView, OutputsView, ProviderAuditsView, ProvidersView, StatementView, TransferRequest,
    TransferView, UploadView,
};
use kiln_protocol::{ContentId, JobId, JobSpec, JobSubmission, Keypair, ProviderId, Signed};
use serde::de::DeserializeOwned;

// Account ids stay strings here (`buyer:kb…`, `provider:12D3…`, `fee`), as
// the routes take them; `kiln_contracts::AccountId` parses them.

/// `GET /v1/account`.
pub type Account = AccountView;
/// `GET /v1/ledger/balances`.
pub type Balances = BalancesView;
/// `GET /v1/accounts/{account}/statement`, with the contracts crate's effects.
pub type Statement = StatementView<String, Applied>;

/// An error from the coordinator or from reaching it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the coordinator at {url}: {reason}; is it running? (set --coordinator or KILN_COORDINATOR)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        field: Option<String>,
    },
    #[error("unexpected response from the coordinator: {0}")]
    Protocol(String),
    #[error("`{url}` is not a coordinator URL: {why} (set --coordinator or KILN_COORDINATOR)")]
    BadUrl { url: String, why: String },
}

/// Checks a coordinator URL before anything is sent, so a typo gets a
/// hint instead of a transport error.
pub fn check_url(url: &str) -> Result<(), ClientError> {
    let bad = |why: String| ClientError::BadUrl {
        url: url.to_string(),
        why,
    };
    if url.starts_with('/') {
        return Err(bad(
            "that is a libp2p multiaddr (what `kiln-node run --coordinator` takes); the CLI talks HTTP to the coordinator's API, e.g. http://127.0.0.1:8730".into(),
        ));
    }
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(u) if u.host().is_none() && !url.contains("://") => {
            Err(bad(format!("no scheme: did you mean http://{url}?")))
        }
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            Err(bad(format!("scheme `{}` is not http or https", u.scheme())))
        }
        Ok(_) => Err(bad("it names no host".into())),
        Err(_) if !url.contains("://") => {
            Err(bad(format!("no scheme: did you mean http://{url}?")))
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Keypair,
    http: reqwest::Client,
    /// The coordinator's peer id, which every signed request names: asked
    /// once from `GET /v1/info`, or pinned.
    coordinator: Arc<tokio::sync::OnceCell<ProviderId>>,
}

impl Client {
    pub fn new(base: &str, key: Keypair) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            http: reqwest::Client::new(),
            coordinator: Arc::default(),
        }
    }

    /// Signs requests for the coordinator `id` instead of asking the
    /// server who it is; one with another id refuses them.
    pub fn with_coordinator_id(mut self, id: ProviderId) -> Self {
        self.coordinator = Arc::new(tokio::sync::OnceCell::new_with(Some(id)));
        self
    }

    /// The peer id requests are signed for (asked once, then kept).
    pub async fn coordinator_id(&self) -> Result<ProviderId, ClientError> {
        self.coordinator
            .get_or_try_init(|| async { Ok(self.info().await?.peer_id) })
            .await
            .copied()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The `Authorization` value for one request with exactly `body` (the
    /// path with its query, as sent); each call signs anew (fresh nonce).
    pub async fn authorization(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, ClientError> {
        let auth = RequestAuth::new(self.coordinator_id().await?, method, path, body);
        self.sign(auth)
    }

    fn sign(&self, auth: RequestAuth) -> Result<String, ClientError> {
        auth.sign_header(&self.key, CLIENT_TTL_SECS)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = self.send_raw(req).await?;
        self.check(resp).await
    }

    /// A success as it is; anything else as the coordinator's error.
    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let url = resp.url().clone();
        let body: Option<ErrorView> = resp.json().await.ok();
        Err(ClientError::Api {
            status: status.as_u16(),
            message: body.as_ref().map_or_else(
                || {
                    format!(
                        "{url} answered HTTP {status} without a Kiln error: is {} a Kiln coordinator? (set --coordinator or KILN_COORDINATOR)",
                        self.base
                    )
                },
                |b| b.error.clone(),
            ),
            field: body.and_then(|b| b.field),
        })
    }

    /// [`Self::send`], then the JSON body as `T`.
    async fn send_json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(req).await?;
        let url = resp.url().clone();
        resp.json().await.map_err(|e| self.not_ours(&url, &e))
    }

    /// A signed GET, signed anew for each try.
    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let mut attempt = 0;
        loop {
            let req = self
                .http
                .get(format!("{}{path}", self.base))
                .header("authorization", self.authorization("GET", path, b"").await?);
            let resp = self.send_raw(req).await?;
            if let Some(wait) = retry_wait(&resp, &mut attempt) {
                tokio::time::sleep(wait).await;
                continue;
            }
            return self.json_of(resp).await;
        }
    }

    /// A GET of a public route: unsigned, so it spends no nonce.
    async fn get_public<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let mut attempt = 0;
        loop {
            let resp = self
                .send_raw(self.http.get(format!("{}{path}", self.base)))
                .await?;
            if let Some(wait) = retry_wait(&resp, &mut attempt) {
                tokio::time::sleep(wait).await;
                continue;
            }
            return self.json_of(resp).await;
        }
    }

    async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })
    }

    async fn json_of<T: DeserializeOwned>(
        &self,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let resp = self.check(resp).await?;
        let url = resp.url().clone();
        resp.json().await.map_err(|e| self.not_ours(&url, &e))
    }

    /// A success whose body is not what a coordinator sends.
    fn not_ours(&self, url: &reqwest::Url, e: &reqwest::Error) -> ClientError {
        ClientError::Protocol(format!(
            "{url} answered with a body that is not the expected JSON ({e}): is {} a Kiln coordinator of this version? (set --coordinator or KILN_COORDINATOR)",
            self.base
        ))
    }

    /// A signed POST of `body` (JSON when `json`).
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        json: bool,
    ) -> Result<T, ClientError> {
        let mut req = self.http.post(format!("{}{path}", self.base)).header(
            "authorization",
            self.authorization("POST", path, &body).await?,
        );
        if json {
            req = req.header("content-type", "application/json");
        }
        self.send_json(req.body(body)).await
    }

    /// Submits a job signed by this buyer; returns the job as the coordinator sees it.
    pub async fn submit(
        &self,
        spec: JobSpec,
        label: Option<String>,
    ) -> Result<JobView, ClientError> {
        let signed = Signed::sign(&self.key, JobSubmission { spec, label }, 300)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.submit_signed(&signed).await
    }

    pub async fn submit_signed(
        &self,
        signed: &Signed<JobSubmission>,
    ) -> Result<JobView, ClientError> {
        let req = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .json(signed);
        self.send_json(req).await
    }

    pub async fn job(&self, id: &JobId) -> Result<JobView, ClientError> {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    pub async fn jobs(&self) -> Result<JobListView, ClientError> {
        self.get_json("/v1/jobs").await
    }

    /// Cancels a job: refunded if it had not started, otherwise stopped and paid for the time used.
    pub async fn cancel(&self, id: &JobId) -> Result<CancelView, ClientError> {
        self.post(&format!("/v1/jobs/{id}/cancel"), Vec::new(), false)
            .await
    }

    /// A job's stdout and stderr (a gang's rank 0).
    pub async fn logs(&self, id: &JobId) -> Result<LogsView, ClientError> {
        self.get_json(&format!("/v1/jobs/{id}/logs")).await
    }

    /// What a running job's member `rank` has written from these offsets.
    pub async fn live_logs(
        &self,
        id: &JobId,
        rank: u32,
        stdout_from: u64,
        stderr_from: u64,
    ) -> Result<LiveLogsView, ClientError> {
        self.get_json(&format!(
            "/v1/jobs/{id}/logs/live?rank={rank}&stdout_from={stdout_from}&stderr_from={stderr_from}"
        ))
        .await
    }

    /// The stdout and stderr of gang member `rank` (its last attempt).
    pub async fn rank_logs(&self, id: &JobId, rank: u32) -> Result<LogsView, ClientError> {
        self.get_json(&format!("/v1/jobs/{id}/logs?rank={rank}"))
            .await
    }

    pub async fn outputs(&self, id: &JobId) -> Result<OutputsView, ClientError> {
        self.get_json(&format!("/v1/jobs/{id}/outputs")).await
    }

    /// Records a deposit or a payout (signed by this client's key, which
    /// must be one of the coordinator's operator keys).
    pub async fn transfer(&self, req: &TransferRequest) -> Result<TransferView, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.post("/v1/operator/transfers", body, true).await
    }

    pub async fn account(&self) -> Result<Account, ClientError> {
        self.get_json("/v1/account").await
    }

    pub async fn providers(&self) -> Result<ProvidersView, ClientError> {
        self.get_public("/v1/providers").await
    }

    /// A provider's capability-challenge history, newest first.
    pub async fn provider_audits(
        &self,
        provider: &ProviderId,
    ) -> Result<ProviderAuditsView, ClientError> {
        self.get_public(&format!("/v1/providers/{provider}/audits"))
            .await
    }

    /// Providers matching a search query, e.g. `gpu_name=H100 num_gpus>=2`.
    pub async fn offers(
        &self,
        query: &str,
        sort: &str,
        limit: usize,
    ) -> Result<OffersView, ClientError> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/offers", self.base))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        url.query_pairs_mut()
            .append_pair("q", query)
            .append_pair("sort", sort)
            .append_pair("limit", &limit.to_string());
        let req = self.http.get(url);
        self.send_json(req).await
    }

    /// One page of the public ledger.
    pub async fn ledger_page(&self, from: u64, limit: u32) -> Result<LedgerPageView, ClientError> {
        self.get_public(&format!("/v1/ledger?from={from}&limit={limit}"))
            .await
    }

    pub async fn ledger_balances(&self) -> Result<Balances, ClientError> {
        self.get_public("/v1/ledger/balances").await
    }

    /// An account's whole statement, page after page.
    pub async fn statement(&self, account: &str) -> Result<Statement, ClientError> {
        let base = format!("/v1/accounts/{account}/statement");
        let mut all: Statement = self.get_public(&base).await?;
        while let Some(from) = all.next.take() {
            let page: Statement = self.get_public(&format!("{base}?from={from}")).await?;
            all.balance = page.balance;
            all.entries.extend(page.entries);
            all.next = page.next;
        }
        Ok(all)
    }

    pub async fn info(&self) -> Result<InfoView, ClientError> {
        self.get_public("/v1/info").await
    }

    /// Uploads an input; returns its CID (computed locally and checked against the answer).
    pub async fn upload(&self, bytes: Vec<u8>) -> Result<ContentId, ClientError> {
        let cid = ContentId::of_bytes(&bytes);
        let v: UploadView = self.post("/v1/blobs", bytes, false).await?;
        if v.cid != cid {
            return Err(ClientError::Protocol(format!(
                "coordinator stored the upload as {}, expected {cid}",
                v.cid
            )));
        }
        Ok(cid)
    }

    /// Which of `cids` this buyer still has to upload.
    pub async fn missing(&self, cids: &[ContentId]) -> Result<Vec<ContentId>, ClientError> {
        let path = "/v1/blobs/missing";
        let mut out = Vec::new();
        for batch in cids.chunks(5000) {
            let body = serde_json::to_vec(&MissingRequest {
                cids: batch.to_vec(),
            })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let v: MissingView = self.post(path, body, true).await?;
            out.extend(v.missing);
        }
        Ok(out)
    }

    /// Streams one blob up under its CID; the coordinator refuses bytes that
    /// hash to anything else. The signature binds the body by that CID.
    pub async fn put_blob(
        &self,
        cid: &ContentId,
        size: u64,
        name: &str,
        body: reqwest::Body,
    ) -> Result<UploadView, ClientError> {
        let auth = RequestAuth::blob_upload(self.coordinator_id().await?, cid);
        let path = auth.path.clone();
        let req = self
            .http
            .put(format!("{}{path}", self.base))
            .header("authorization", self.sign(auth)?)
            .header("content-length", size)
            .header(
                "x-kiln-name",
                name.replace(|c: char| !c.is_ascii() || c.is_ascii_control(), "_"),
            )
            .body(body);
        self.send_json(req).await
    }

    /// Bytes `start..` of one output or log of a job (`GET
    /// /v1/jobs/{id}/blobs/{cid}`, unverified: `kiln job get` verifies).
    pub async fn job_blob(
        &self,
        id: &JobId,
        cid: &ContentId,
        start: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/jobs/{id}/blobs/{cid}");
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .header(
                "authorization",
                self.authorization("GET", &path, b"").await?,
            )
            .header("range", format!("bytes={start}-"));
        let bytes = self
            .send(req)
            .await?
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(bytes.to_vec())
    }

    /// The blobs this buyer may read.
    pub async fn blobs(&self) -> Result<BlobListView, ClientError> {
        self.get_json("/v1/blobs").await
    }

    /// Gives up this buyer's claim on a blob (its bytes go when nobody
    /// else holds them).
    pub async fn delete_blob(&self, cid: &ContentId) -> Result<BlobDeletedView, ClientError> {
        let path = format!("/v1/blobs/{cid}");
        let req = self.http.delete(format!("{}{path}", self.base)).header(
            "authorization",
            self.authorization("DELETE", &path, b"").await?,
        );
        self.send_json(req).await
    }

    /// The bao encoding of `ranges` of a blob (`None`: all of it), and the
    /// blob's size as the coordinator claims it (proven by the decode).
    pub async fn bao(
        &self,
        cid: &ContentId,
        ranges: Option<&[u64]>,
    ) -> Result<(u64, reqwest::Response), ClientError> {
        let mut path = format!("/v1/blobs/{cid}/bao");
        if let Some(r) = ranges {
            let list: Vec<String> = r.iter().map(u64::to_string).collect();
            path.push_str(&format!("?ranges={}", list.join(",")));
        }
        let req = self.http.get(format!("{}{path}", self.base)).header(
            "authorization",
            self.authorization("GET", &path, b"").await?,
        );
        let resp = self.send(req).await?;
        let size = resp
            .headers()
            .get("x-kiln-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ClientError::Protocol("the answer lacks x-kiln-size".into()))?;
        Ok((size, resp))
    }
}
