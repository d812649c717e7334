//! What every HTTP route shares: the one [`ApiError`] → status (and
//! [`ErrorView`] body) mapping, and the [`Buyer`] extractor that authenticates a signed request.
//!
//! "buyer"/"owner" auth is `Authorization: Kiln <hex of a Signed<ApiAuth>>`
//! for this exact method and path, valid for at most five minutes.

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_protocol::views::ErrorView;
use kiln_protocol::{ApiAuth, BuyerId, Signed, UnixMillis};

use crate::AppState;
use crate::db::DbError;
use crate::lifecycle::submit::SubmitError;

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
    /// A per-identity limit is reached (e.g. queued jobs per buyer).
    #[error("{0}")]
    TooManyRequests(String),
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
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, None),
            Self::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, None),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, Some("range".into()))
            }
            Self::Internal(e) => {
                tracing::error!("internal error serving a request: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, None)
            }
        };
        let body = ErrorView {
            error: self.to_string(),
            field,
        };
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
            e @ SubmitError::QueueFull { .. } => Self::TooManyRequests(e.to_string()),
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
}
