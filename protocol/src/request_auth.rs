//! What a buyer signs for one REST call: [`RequestAuth`], sent as
//! `Authorization: Kiln2 <hex of the canonical Signed<RequestAuth>>`.
//!
//! The signature (domain `kiln/request-auth/v2`, see [`crate::signed`])
//! covers the coordinator's identity, the method, the path with its query,
//! the body (by hash), when it was made, an expiry and a random nonce. So a
//! captured header is worth nothing elsewhere: not at another coordinator,
//! not for another route or body, not after it expires, and — because the
//! coordinator remembers `(signer, nonce)` until the expiry — not twice.
//!
//! The coordinator's side (checks, replay cache) is
//! `kiln_coordinator::auth`; this module is what both ends must agree on.

use serde::{Deserialize, Serialize};

use crate::content::ContentId;
use crate::encoding::EncodeError;
use crate::ids::{Nonce, ProviderId};
use crate::keys::Keypair;
use crate::signed::{Signed, SignedMessage};
use crate::units::UnixMillis;

/// The `Authorization` scheme. The previous `Kiln` scheme (method and path
/// only, reusable) is refused with a message to upgrade.
pub const AUTH_SCHEME: &str = "Kiln2";

/// How long the `kiln` client's signatures are valid. Short, because the
/// coordinator remembers every nonce for this long (plus the skew).
pub const CLIENT_TTL_SECS: u64 = 60;

/// The longest validity (`expires_at - issued_at`) a coordinator accepts.
pub const MAX_VALIDITY_MS: u64 = 2 * 60 * 1000;

/// How far a buyer's clock may be from the coordinator's, either way: a
/// request issued up to this far in the future, or expired up to this long
/// ago, is still accepted.
pub const CLOCK_SKEW_MS: u64 = 30 * 1000;

crate::hex_id!(
    /// BLAKE3 of a request body's exact bytes.
    BodyDigest,
    32,
    "body digest"
);

impl BodyDigest {
    pub fn of(body: &[u8]) -> Self {
        Self::from_bytes(*blake3::hash(body).as_bytes())
    }
}

/// How the signature binds the request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyBinding {
    /// The BLAKE3 of the exact bytes sent (an empty body: of no bytes). The
    /// coordinator reads the body and compares before anything sees it.
    Blake3(BodyDigest),
    /// A streamed upload (`PUT /v1/blobs/{cid}` only, with this CID in the
    /// path): the CID is the hash of the body, and the upload route refuses
    /// bytes that do not hash to it, so nothing is buffered to check it.
    Cid(ContentId),
}

/// One REST call, as the buyer means it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAuth {
    /// The coordinator it is for: its peer id, as `GET /v1/info` gives it.
    pub coordinator: ProviderId,
    pub method: String,
    /// The path and query exactly as sent (`/v1/blobs/x/bao?ranges=0,16`).
    pub path: String,
    pub body: BodyBinding,
    /// When it was signed (by the buyer's clock).
    pub issued_at: UnixMillis,
}

impl SignedMessage for RequestAuth {
    const DOMAIN: &'static str = "kiln/request-auth/v2";
}

impl RequestAuth {
    /// A request whose body is `body` (empty for none).
    pub fn new(coordinator: ProviderId, method: &str, path: &str, body: &[u8]) -> Self {
        Self::with_binding(
            coordinator,
            method,
            path,
            BodyBinding::Blake3(BodyDigest::of(body)),
        )
    }

    /// `PUT /v1/blobs/{cid}`: the body is streamed, bound by its CID.
    pub fn blob_upload(coordinator: ProviderId, cid: &ContentId) -> Self {
        Self::with_binding(
            coordinator,
            "PUT",
            &blob_upload_path(cid),
            BodyBinding::Cid(*cid),
        )
    }

    fn with_binding(coordinator: ProviderId, method: &str, path: &str, body: BodyBinding) -> Self {
        Self {
            coordinator,
            method: method.to_string(),
            path: path.to_string(),
            body,
            issued_at: UnixMillis::now(),
        }
    }

    /// Signs it (fresh nonce, valid `ttl_secs` from `issued_at`) and
    /// returns the `Authorization` header value.
    pub fn sign_header(self, key: &Keypair, ttl_secs: u64) -> Result<String, EncodeError> {
        let expires = self.issued_at.plus_secs(ttl_secs);
        let signed = Signed::sign_with(key, self, Nonce::random(), expires)?;
        header_value(&signed)
    }
}

/// The path a blob upload of `cid` goes to; the only route that accepts a
/// [`BodyBinding::Cid`].
pub fn blob_upload_path(cid: &ContentId) -> String {
    format!("/v1/blobs/{cid}")
}

/// `Kiln2 <hex>` for an already signed request.
pub fn header_value(signed: &Signed<RequestAuth>) -> Result<String, EncodeError> {
    Ok(format!("{AUTH_SCHEME} {}", hex::encode(signed.to_bytes()?)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn header_round_trips_and_verifies() {
        let k = Keypair::generate();
        let coordinator = ProviderId::from_public_key(&Keypair::generate().public());
        let h = RequestAuth::new(coordinator, "POST", "/v1/blobs", b"abc")
            .sign_header(&k, CLIENT_TTL_SECS)
            .unwrap();
        let hex_part = h.strip_prefix("Kiln2 ").unwrap();
        let s = Signed::<RequestAuth>::from_bytes(&hex::decode(hex_part).unwrap()).unwrap();
        let a = s.verify(UnixMillis::now()).unwrap();
        assert_eq!(a.body, BodyBinding::Blake3(BodyDigest::of(b"abc")));
        assert_ne!(a.body, BodyBinding::Blake3(BodyDigest::of(b"abd")));
        assert_eq!(a.coordinator, coordinator);
        assert_eq!(
            s.expires_at.0 - a.issued_at.0,
            CLIENT_TTL_SECS * 1000,
            "the validity is counted from issued_at"
        );
        const { assert!(CLIENT_TTL_SECS * 1000 <= MAX_VALIDITY_MS) };
    }
}
