//! What every HTTP route shares: the one [`ApiError`] → status (and
//! [`ErrorView`] body) mapping, and signed-request authentication.
//!
//! "buyer"/"owner" auth is `Authorization: Kiln2 <hex of a
//! Signed<RequestAuth>>` ([`kiln_protocol::request_auth`]). [`authenticate`]
//! runs before every route: a request carrying the header is verified
//! entirely — signature, this coordinator's peer id, method, path and query,
//! the body's BLAKE3 (read and compared before any handler sees it; a
//! streamed blob upload is bound by the CID in its path instead, which the
//! upload route checks the bytes against), the time window, and a nonce not
//! seen before ([`ReplayCache`]) — or refused; the [`Buyer`] extractor then
//! hands routes the verified identity. A request without the header passes
//! through, and routes that need a buyer refuse it.
//!
//! Limits ([`crate::throttle`]) are applied here too, before any handler:
//! a request without the header is counted against its source address and
//! takes a place in the unauthenticated budget while it is served; a
//! signed one is counted against its buyer key once its signature
//! verified, before its body is read; an address whose signatures keep
//! being refused has its signed requests refused unread for a while. A
//! job submission (`POST /v1/jobs`) carries its signature in its body: it
//! is not anonymous, so its route counts it against its signer once that
//! signature verified ([`AuthState::admit_signed_body`]).
//!
//! Time: a request is accepted from `issued_at - CLOCK_SKEW_MS` to
//! `expires_at + CLOCK_SKEW_MS` by this coordinator's clock, and its
//! validity (`expires_at - issued_at`) is at most `MAX_VALIDITY_MS`; its
//! nonce is remembered until `expires_at + CLOCK_SKEW_MS`, after which the
//! request is refused as expired anyway. So an entry lives at most
//! `MAX_VALIDITY_MS + 2 × CLOCK_SKEW_MS` (3 minutes). Requests signed
//! before this process started are refused, since a previous process may
//! have seen their nonces.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_protocol::request_auth::{
    self, AUTH_SCHEME, BodyBinding, BodyDigest, CLOCK_SKEW_MS, MAX_VALIDITY_MS, RequestAuth,
};
use kiln_protocol::views::ErrorView;
use kiln_protocol::{BuyerId, Nonce, ProviderId, PublicKey, Signed, UnixMillis, VerifyError};

use crate::AppState;
use crate::db::DbError;
use crate::lifecycle::submit::SubmitError;
use crate::throttle::{Throttle, Throttled};

/// Signed requests remembered at once, from everyone (each for at most 3
/// minutes, 90 s for the kiln client's): about 4,000 signed requests a
/// second sustained. Beyond it new signed requests get 503 until entries
/// expire. Some 30 MiB at most, and as much again for the per-buyer counts
/// when every entry is another key's.
pub const REPLAY_CAPACITY: usize = 400_000;

/// Signed requests remembered at once from one buyer key; beyond it that
/// buyer gets 429, so one key alone cannot fill the cache for everyone.
pub const REPLAY_PER_BUYER: usize = 1 << 16;

/// Expired entries are dropped at most this often (a pass over the cache).
const SWEEP_EVERY_MS: u64 = 1000;

/// What a stale client is told.
const UPGRADE: &str =
    "upgrade kiln (the client) to the coordinator's version (GET /v1/info shows it)";

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
    /// A valid signature by a key that may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// A per-identity limit is reached (e.g. queued jobs per buyer).
    #[error("{0}")]
    TooManyRequests(String),
    /// A request-rate or concurrency limit ([`crate::throttle`]): 429 with
    /// `Retry-After: retry_after` (seconds).
    #[error("{reason}")]
    Throttled { reason: String, retry_after: u64 },
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
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, None),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, None),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
            Self::TooManyRequests(_) | Self::Throttled { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, None)
            }
            Self::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, None),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, Some("range".into()))
            }
            Self::Internal(e) => {
                tracing::error!("internal error serving a request: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, None)
            }
        };
        let retry_after = match &self {
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let body = ErrorView {
            error: self.to_string(),
            field,
        };
        let mut r = (status, Json(body)).into_response();
        if let Some(s) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(s));
        }
        r
    }
}

impl From<Throttled> for ApiError {
    fn from(t: Throttled) -> Self {
        Self::Throttled {
            reason: t.reason,
            retry_after: t.retry_after,
        }
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
            e @ SubmitError::QueueFull { .. } => Self::TooManyRequests(e.to_string()),
            SubmitError::Db(e) => e.into(),
            SubmitError::Bank(e) => Self::Internal(e),
        }
    }
}

/// The authenticated buyer making the request (verified by [`authenticate`]).
pub struct Buyer(pub BuyerId);

/// Put in the request's extensions by [`authenticate`] once every check passed.
#[derive(Clone, Copy)]
struct Authenticated(BuyerId);

impl FromRequestParts<AppState> for Buyer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Authenticated>()
            .map(|a| Buyer(a.0))
            .ok_or_else(|| {
                ApiError::Unauthorized(format!(
                    "missing `Authorization: {AUTH_SCHEME} <signed request>` header; use the kiln CLI, which signs requests with your buyer key"
                ))
            })
    }
}

/// What [`authenticate`] checks against: who this coordinator is, the
/// nonces it has seen, and the request limits.
#[derive(Clone)]
pub struct AuthState {
    coordinator: ProviderId,
    replay: Arc<ReplayCache>,
    /// Requests signed before this are refused (see the module doc).
    started_at: UnixMillis,
    /// Largest body read to check its hash.
    max_body: usize,
    throttle: Arc<Throttle>,
}

impl AuthState {
    pub fn new(coordinator: ProviderId, max_body: usize, throttle: Arc<Throttle>) -> Self {
        Self {
            coordinator,
            replay: Arc::new(ReplayCache::new(REPLAY_CAPACITY, REPLAY_PER_BUYER)),
            started_at: UnixMillis::now(),
            max_body,
            throttle,
        }
    }

    /// Verifies a request that carries `Authorization`, returning it (its
    /// body restored) with the buyer recorded.
    async fn check(&self, req: Request) -> Result<Request, ApiError> {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return Ok(req);
        };
        let value = value
            .to_str()
            .map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII".into()))?;
        let signed = parse_header(value)?;
        let now = UnixMillis::now();
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let auth = check_signed(&signed, &self.coordinator, parts.method.as_str(), path, now)?;
        if auth.issued_at.0 < self.started_at.0 {
            return Err(ApiError::Unauthorized(format!(
                "request signed at {} ms, before this coordinator started ({} ms): send it again (kiln signs every request anew); if this repeats, your clock is behind",
                auth.issued_at.0, self.started_at.0
            )));
        }
        // Counted once the signature is known good, before the body is read.
        self.throttle.admit_buyer(&BuyerId::new(signed.signer))?;
        let body = match auth.body {
            BodyBinding::Blake3(digest) => {
                let bytes = read_body(body, &parts.headers, self.max_body).await?;
                check_body(&digest, &bytes)?;
                Body::from(bytes)
            }
            // `check_signed` allowed this only for `PUT /v1/blobs/{cid}`,
            // which refuses bytes that do not hash to the CID.
            BodyBinding::Cid(_) => body,
        };
        self.replay.admit(
            &signed.signer,
            &signed.nonce,
            signed.expires_at.0.saturating_add(CLOCK_SKEW_MS),
            now.0,
        )?;
        parts
            .extensions
            .insert(Authenticated(BuyerId::new(signed.signer)));
        Ok(Request::from_parts(parts, body))
    }
}

/// The middleware (`axum::middleware::from_fn_with_state`) that
/// authenticates every request carrying `Authorization` and applies the
/// request limits, before routing reaches a handler.
pub async fn authenticate(State(auth): State<AuthState>, req: Request, next: Next) -> Response {
    let source = source_of(&req);
    let signed_header = req.headers().contains_key(header::AUTHORIZATION);
    if (signed_header || signed_body(&req))
        && let Err(t) = auth.throttle.check_signer(source)
    {
        return auth.refuse(t).await;
    }
    if !signed_header {
        if signed_body(&req) {
            return next.run(req).await;
        }
        // Held until the response is built: the unauthenticated budget.
        let _permit = match auth.throttle.admit_public(source) {
            Ok(p) => p,
            Err(t) => return auth.refuse(t).await,
        };
        return next.run(req).await;
    }
    match auth.check(req).await {
        Ok(req) => next.run(req).await,
        Err(ApiError::Throttled {
            reason,
            retry_after,
        }) => {
            auth.refuse(Throttled {
                reason,
                retry_after,
            })
            .await
        }
        Err(e) => {
            if matches!(e, ApiError::Unauthorized(_)) {
                auth.throttle.note_refused_signature(source);
            }
            e.into_response()
        }
    }
}

/// Whether the request is signed in its body instead of a header: a job
/// submission.
fn signed_body(req: &Request) -> bool {
    req.method() == axum::http::Method::POST && req.uri().path() == "/v1/jobs"
}

impl AuthState {
    /// Counts a request signed in its body (a job submission) against its
    /// signer once `valid` (its signature verified), or its source address
    /// if not.
    pub fn admit_signed_body(
        &self,
        signer: &BuyerId,
        valid: bool,
        source: Option<IpAddr>,
    ) -> Result<(), Throttled> {
        if valid {
            self.throttle.admit_buyer(signer)?;
        } else {
            self.throttle.note_refused_signature(source);
        }
        Ok(())
    }

    /// The 429 for `t`, answered once it has been held (see
    /// [`Throttle::hold`]).
    pub async fn refuse(&self, t: Throttled) -> Response {
        self.throttle.hold(&t).await;
        ApiError::from(t).into_response()
    }
}

/// The source address of a request, for a route that counts it itself.
pub struct Source(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Source(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// The peer address of the connection (set by
/// `into_make_service_with_connect_info`; absent when the router is
/// driven without a listener).
fn source_of(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Reads `Kiln2 <hex>`; the old `Kiln` scheme gets a message to upgrade.
pub(crate) fn parse_header(value: &str) -> Result<Signed<RequestAuth>, ApiError> {
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme == "Kiln" {
        return Err(ApiError::Unauthorized(format!(
            "this request is signed with the old `Kiln` scheme, which this coordinator no longer accepts (requests are now bound to one coordinator and their body, and accepted once): {UPGRADE}"
        )));
    }
    if scheme != AUTH_SCHEME {
        return Err(ApiError::Unauthorized(format!(
            "the Authorization scheme must be `{AUTH_SCHEME}` (a request signed with your buyer key by the kiln CLI)"
        )));
    }
    let bytes = hex::decode(rest.trim())
        .map_err(|_| ApiError::Unauthorized("the Authorization value is not hex".into()))?;
    Signed::from_bytes(&bytes).map_err(|e| {
        ApiError::Unauthorized(format!("unreadable request signature ({e}); {UPGRADE}"))
    })
}

/// Everything about a signed request but its body and its nonce's novelty:
/// signature, coordinator, time window, method and path (with query), and
/// that a CID binding is used only for that blob's upload.
pub(crate) fn check_signed<'a>(
    signed: &'a Signed<RequestAuth>,
    coordinator: &ProviderId,
    method: &str,
    path: &str,
    now: UnixMillis,
) -> Result<&'a RequestAuth, ApiError> {
    let skew_s = CLOCK_SKEW_MS / 1000;
    // The expiry is checked against a clock set back by the skew.
    let auth = signed
        .verify(UnixMillis(now.0.saturating_sub(CLOCK_SKEW_MS)))
        .map_err(|e| match e {
            VerifyError::Expired { expires_at, .. } => ApiError::Unauthorized(format!(
                "request signature expired {} s ago by this coordinator's clock (tolerance {skew_s} s): kiln signs each request just before sending it, so check that your computer's clock is right (e.g. enable NTP) and retry",
                now.0.saturating_sub(expires_at) / 1000
            )),
            e => ApiError::Unauthorized(format!("request signature refused: {e}")),
        })?;
    if auth.coordinator != *coordinator {
        return Err(ApiError::Unauthorized(format!(
            "request signed for coordinator {}, but this is {coordinator}: a signed request is accepted only by the coordinator it names (kiln learns it from GET /v1/info); send it again",
            auth.coordinator
        )));
    }
    if auth.issued_at.0 > now.0.saturating_add(CLOCK_SKEW_MS) {
        return Err(ApiError::Unauthorized(format!(
            "request signed {} s in the future by this coordinator's clock (tolerance {skew_s} s): set your computer's clock right (e.g. enable NTP) and retry",
            (auth.issued_at.0 - now.0) / 1000
        )));
    }
    let validity = signed.expires_at.0.saturating_sub(auth.issued_at.0);
    if signed.expires_at.0 <= auth.issued_at.0 || validity > MAX_VALIDITY_MS {
        return Err(ApiError::Unauthorized(format!(
            "request signature is valid for {validity} ms after it was signed; between 1 ms and {} s is accepted: {UPGRADE}",
            MAX_VALIDITY_MS / 1000
        )));
    }
    if auth.method != method || auth.path != path {
        return Err(ApiError::Unauthorized(format!(
            "request signature is for {} {}, not {method} {path}",
            auth.method, auth.path
        )));
    }
    if let BodyBinding::Cid(cid) = &auth.body
        && (method != "PUT" || path != request_auth::blob_upload_path(cid))
    {
        return Err(ApiError::Unauthorized(format!(
            "a request may be signed over a CID instead of its body only to upload that blob (`PUT /v1/blobs/{cid}`); sign the BLAKE3 of the body: {UPGRADE}"
        )));
    }
    Ok(auth)
}

/// The body that arrived against the digest that was signed.
pub(crate) fn check_body(signed: &BodyDigest, body: &[u8]) -> Result<(), ApiError> {
    if BodyDigest::of(body) == *signed {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(format!(
            "the request body ({} bytes) is not the one that was signed (BLAKE3 differs); nothing was done: sign the exact bytes you send",
            body.len()
        )))
    }
}

/// The whole body, refusing one over `limit` before reading it when its
/// length is declared, else as soon as it passes the limit.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the request body is over {} MiB; stream large files with `kiln data add`",
            limit >> 20
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest {
            field: Some("body".into()),
            reason: format!("the request body could not be read: {e}"),
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The `(signer, nonce)` of every signed request accepted and not yet
/// expired, so each is accepted once. Bounded: expired entries are dropped
/// (a sweep at most every second), a full cache refuses new requests (503),
/// and one buyer may hold at most `per_buyer` entries (429).
pub struct ReplayCache {
    capacity: usize,
    per_buyer: usize,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Until when (ms) each `(signer's key bytes, nonce)` is kept.
    until: HashMap<([u8; 32], Nonce), u64>,
    per_buyer: HashMap<[u8; 32], usize>,
    next_sweep: u64,
}

impl Seen {
    fn sweep(&mut self, now: u64) {
        let per_buyer = &mut self.per_buyer;
        self.until.retain(|(signer, _), until| {
            let keep = *until > now;
            if !keep && let Some(n) = per_buyer.get_mut(signer) {
                *n = n.saturating_sub(1);
            }
            keep
        });
        per_buyer.retain(|_, n| *n > 0);
    }
}

impl ReplayCache {
    pub fn new(capacity: usize, per_buyer: usize) -> Self {
        Self {
            capacity,
            per_buyer,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Requests remembered now.
    pub fn len(&self) -> usize {
        self.lock().until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `(signer, nonce)` until `keep_until` (ms); refuses one seen
    /// before (401), a buyer over its share (429) and a full cache (503).
    pub fn admit(
        &self,
        signer: &PublicKey,
        nonce: &Nonce,
        keep_until: u64,
        now: u64,
    ) -> Result<(), ApiError> {
        let mut seen = self.lock();
        if now >= seen.next_sweep {
            seen.sweep(now);
            seen.next_sweep = now.saturating_add(SWEEP_EVERY_MS);
        }
        let key = (*signer.as_bytes(), *nonce);
        if seen.until.contains_key(&key) {
            return Err(ApiError::Unauthorized(format!(
                "this signed request was already used (nonce {nonce}): every request is accepted once, so a replayed Authorization header is refused; send it again with a fresh signature (kiln signs every request anew)"
            )));
        }
        if seen.per_buyer.get(&key.0).copied().unwrap_or(0) >= self.per_buyer {
            return Err(ApiError::TooManyRequests(format!(
                "too many signed requests from buyer {}: at most {} within {} s; slow down and retry in a few seconds",
                BuyerId::new(*signer).short(),
                self.per_buyer,
                (MAX_VALIDITY_MS + 2 * CLOCK_SKEW_MS) / 1000
            )));
        }
        if seen.until.len() >= self.capacity {
            return Err(ApiError::Unavailable(format!(
                "the coordinator is remembering as many signed requests as it can ({}); retry in a few seconds",
                self.capacity
            )));
        }
        seen.until.insert(key, keep_until);
        *seen.per_buyer.entry(key.0).or_default() += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn body(e: ApiError) -> (StatusCode, serde_json::Value) {
        let r = e.into_response();
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn errors_are_error_views_with_a_field_only_when_one_is_to_blame() {
        let (s, v) = body(ApiError::BadRequest {
            field: Some("spec.image".into()),
            reason: "invalid job spec: image: not pinned".into(),
        })
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            v,
            serde_json::json!({ "error": "invalid job spec: image: not pinned", "field": "spec.image" })
        );
        let (s, v) = body(ApiError::NotFound("no job".into())).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v, serde_json::json!({ "error": "no job" }));
        let (s, v) = body(ApiError::RangeNotSatisfiable {
            size: 3,
            reason: "bad".into(),
        })
        .await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            v,
            serde_json::json!({ "error": "bad (the blob has 3 bytes)", "field": "range" })
        );
    }

    #[tokio::test]
    async fn a_throttled_request_is_a_429_that_says_when_to_retry() {
        let e = ApiError::Throttled {
            reason: "too many unauthenticated requests; retry in 3 s".into(),
            retry_after: 3,
        };
        let r = e.into_response();
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "3");
        let (s, v) = body(ApiError::Throttled {
            reason: "too many unauthenticated requests; retry in 3 s".into(),
            retry_after: 3,
        })
        .await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            v,
            serde_json::json!({ "error": "too many unauthenticated requests; retry in 3 s" })
        );
        // Other errors carry no Retry-After.
        let r = ApiError::TooManyRequests("queue full".into()).into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    use kiln_protocol::Keypair;
    use kiln_protocol::request_auth::BodyBinding;

    fn coordinator() -> ProviderId {
        ProviderId::from_public_key(&Keypair::generate().public())
    }

    /// A request signed at `now`, valid for the client's usual minute.
    fn sign(key: &Keypair, auth: RequestAuth, now: UnixMillis) -> Signed<RequestAuth> {
        let auth = RequestAuth {
            issued_at: now,
            ..auth
        };
        Signed::sign_with(key, auth, Nonce::random(), now.plus_secs(60)).unwrap()
    }

    fn unauthorized(r: Result<impl Sized, ApiError>) -> String {
        match r {
            Err(ApiError::Unauthorized(m)) => m,
            Err(e) => panic!("expected 401, got {e:?}"),
            Ok(_) => panic!("expected 401, it was accepted"),
        }
    }

    #[test]
    fn a_signed_request_verifies_and_altering_any_signed_field_breaks_it() {
        let (key, c, now) = (Keypair::generate(), coordinator(), UnixMillis::now());
        let s = sign(&key, RequestAuth::new(c, "POST", "/v1/blobs", b"body"), now);
        let a = check_signed(&s, &c, "POST", "/v1/blobs", now).unwrap();
        let BodyBinding::Blake3(d) = a.body else {
            panic!("{a:?}")
        };
        check_body(&d, b"body").unwrap();

        type Alter = fn(&mut Signed<RequestAuth>);
        let alter: [(&str, Alter); 8] = [
            ("coordinator", |s| s.payload.coordinator = coordinator()),
            ("method", |s| s.payload.method = "GET".into()),
            ("path", |s| s.payload.path = "/v1/blobs?x=1".into()),
            ("body", |s| {
                s.payload.body = BodyBinding::Blake3(BodyDigest::of(b"other"));
            }),
            ("issued_at", |s| s.payload.issued_at.0 -= 1),
            ("nonce", |s| s.nonce = Nonce::random()),
            ("expires_at", |s| s.expires_at.0 += 1),
            ("signer", |s| s.signer = Keypair::generate().public()),
        ];
        for (field, f) in alter {
            let mut t = s.clone();
            f(&mut t);
            // Check against what the altered header now claims, so only
            // the signature can catch it.
            let (m, p) = (t.payload.method.clone(), t.payload.path.clone());
            let coordinator = t.payload.coordinator;
            let msg = unauthorized(check_signed(&t, &coordinator, &m, &p, now));
            assert!(msg.contains("bad signature"), "{field}: {msg}");
        }
    }

    #[test]
    fn a_header_is_refused_for_another_coordinator_route_query_or_body() {
        let (key, c, now) = (Keypair::generate(), coordinator(), UnixMillis::now());
        let s = sign(&key, RequestAuth::new(c, "GET", "/v1/jobs?x=1", b""), now);
        check_signed(&s, &c, "GET", "/v1/jobs?x=1", now).unwrap();
        let other = coordinator();
        let msg = unauthorized(check_signed(&s, &other, "GET", "/v1/jobs?x=1", now));
        assert!(
            msg.contains(&c.to_string()) && msg.contains(&other.to_string()),
            "{msg}"
        );
        for (m, p) in [
            ("POST", "/v1/jobs?x=1"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/jobs?x=2"),
        ] {
            let msg = unauthorized(check_signed(&s, &c, m, p, now));
            assert!(msg.contains("is for GET /v1/jobs?x=1"), "{msg}");
        }
        let d = BodyDigest::of(b"");
        let msg = unauthorized(check_body(&d, b"{}"));
        assert!(msg.contains("not the one that was signed"), "{msg}");
    }

    #[test]
    fn a_cid_binding_is_accepted_only_for_that_blobs_upload() {
        let (key, c, now) = (Keypair::generate(), coordinator(), UnixMillis::now());
        let cid = kiln_protocol::ContentId::of_bytes(b"blob");
        let path = request_auth::blob_upload_path(&cid);
        let s = sign(&key, RequestAuth::blob_upload(c, &cid), now);
        check_signed(&s, &c, "PUT", &path, now).unwrap();
        // The same binding on another route (the small upload, which would
        // then store any body) is refused even though it is signed.
        let mut t = RequestAuth::blob_upload(c, &cid);
        t.method = "POST".into();
        t.path = "/v1/blobs".into();
        let t = sign(&key, t, now);
        let msg = unauthorized(check_signed(&t, &c, "POST", "/v1/blobs", now));
        assert!(msg.contains("only to upload that blob"), "{msg}");
        let other = kiln_protocol::ContentId::of_bytes(b"other");
        let mut t = RequestAuth::blob_upload(c, &cid);
        t.path = request_auth::blob_upload_path(&other);
        let t = sign(&key, t, now);
        let msg = unauthorized(check_signed(&t, &c, "PUT", &t.payload.path, now));
        assert!(msg.contains("only to upload that blob"), "{msg}");
    }

    #[test]
    fn the_time_window_is_the_validity_plus_the_explicit_skew() {
        let (key, c) = (Keypair::generate(), coordinator());
        let t0 = UnixMillis(1_000_000_000);
        let s = sign(&key, RequestAuth::new(c, "GET", "/v1/jobs", b""), t0);
        let at = |ms: u64| check_signed(&s, &c, "GET", "/v1/jobs", UnixMillis(ms));
        // Valid from issued_at - skew to expires_at + skew, inclusive.
        at(t0.0 - CLOCK_SKEW_MS).unwrap();
        at(s.expires_at.0 + CLOCK_SKEW_MS).unwrap();
        let msg = unauthorized(at(s.expires_at.0 + CLOCK_SKEW_MS + 1));
        assert!(msg.contains("expired") && msg.contains("clock"), "{msg}");
        let msg = unauthorized(at(t0.0 - CLOCK_SKEW_MS - 1));
        assert!(
            msg.contains("in the future") && msg.contains("clock"),
            "{msg}"
        );
        // A validity longer than the longest accepted is refused.
        let long = Signed::sign_with(
            &key,
            RequestAuth {
                issued_at: t0,
                ..RequestAuth::new(c, "GET", "/v1/jobs", b"")
            },
            Nonce::random(),
            UnixMillis(t0.0 + MAX_VALIDITY_MS + 1),
        )
        .unwrap();
        let msg = unauthorized(check_signed(&long, &c, "GET", "/v1/jobs", t0));
        assert!(msg.contains("upgrade kiln"), "{msg}");
    }

    #[test]
    fn a_nonce_is_accepted_once_and_the_cache_stays_bounded() {
        let cache = ReplayCache::new(3, 2);
        let (a, b, d) = (
            Keypair::generate().public(),
            Keypair::generate().public(),
            Keypair::generate().public(),
        );
        let n = Nonce::random();
        cache.admit(&a, &n, 10_000, 1_000).unwrap();
        let msg = unauthorized(cache.admit(&a, &n, 10_000, 2_000));
        assert!(msg.contains("already used"), "{msg}");
        // Same nonce, another signer: a different request.
        cache.admit(&b, &n, 10_000, 2_000).unwrap();
        // One buyer's share.
        cache.admit(&a, &Nonce::random(), 10_000, 2_000).unwrap();
        assert!(matches!(
            cache.admit(&a, &Nonce::random(), 10_000, 2_000),
            Err(ApiError::TooManyRequests(_))
        ));
        // Everyone's.
        assert_eq!(cache.len(), 3);
        assert!(matches!(
            cache.admit(&d, &Nonce::random(), 10_000, 2_000),
            Err(ApiError::Unavailable(_))
        ));
        // Once expired, entries are dropped (the requests themselves are
        // refused as expired by then) and room comes back.
        cache.admit(&d, &Nonce::random(), 20_000, 10_001).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_stale_client_is_told_to_upgrade() {
        let msg = unauthorized(parse_header("Kiln 00ff"));
        assert!(msg.contains("upgrade kiln"), "{msg}");
        let msg = unauthorized(parse_header("Kiln2 00ff"));
        assert!(msg.contains("upgrade kiln"), "{msg}");
        let msg = unauthorized(parse_header("Bearer x"));
        assert!(msg.contains("Kiln2"), "{msg}");
        let key = Keypair::generate();
        let h = RequestAuth::new(coordinator(), "GET", "/v1/jobs", b"")
            .sign_header(&key, 60)
            .unwrap();
        parse_header(&h).unwrap();
    }
}
