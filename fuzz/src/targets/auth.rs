//! `rest_auth`: the coordinator's request authentication, the
//! `kiln_coordinator::auth::authenticate` middleware in front of an echo
//! route, with a fresh `AuthState` (this coordinator's peer id, the real
//! body limit) per execution. The `Authorization: Kiln2 <hex>` parser and
//! the checks behind it (`parse_header`, `check_signed`, `check_body`) are
//! crate-private; the middleware is their public entry point.
//!
//! Input: a mode byte, then
//!
//! * `0` **raw**: a method and path choice, a header value, the body. The
//!   fuzzer cannot sign, and every signed seed was made long before this
//!   coordinator started, so nothing may authenticate.
//! * `1` **fresh**: the fields of a request (coordinator, method, path,
//!   body binding, issue time relative to now, validity, nonce, tampering,
//!   what is actually sent, a declared Content-Length), signed now with the
//!   buyer key. The middleware must accept exactly when the rules say so
//!   (times are chosen away from the limits so the clock cannot flip an
//!   answer), hand the route the body unchanged, and refuse the same
//!   request sent again (replay).
//! * `2` **mutated**: a fresh valid header with bytes of it changed; it may
//!   authenticate only if it still decodes to the very request signed.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use kiln_coordinator::auth::{AuthState, authenticate};
use kiln_coordinator::throttle::{ApiLimits, Throttle};
use kiln_protocol::request_auth::{self, BodyBinding, BodyDigest, RequestAuth};
use kiln_protocol::{ContentId, Keypair, Nonce, Signed, UnixMillis};
use tower::ServiceExt;

use super::{Outcome, Target, Verdict, tagged};
use crate::rng::Input;
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "rest_auth",
    about: "kiln_coordinator::auth::authenticate (Authorization: Kiln2 header, body binding, time window, replay) through axum",
    max_len: 4 * 1024,
    seeds,
    dict: &[b"Kiln2 ", b"Kiln ", b"Bearer ", b"  ", b"\t"],
    run,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        #[allow(clippy::expect_used)]
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

fn app(state: AuthState) -> Router {
    Router::new()
        .fallback(|body: Bytes| async move { (StatusCode::OK, body) })
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// Sends one request; `(status, echoed body)`.
fn send(app: &Router, req: Request<Body>) -> Result<(StatusCode, Bytes), String> {
    runtime().block_on(async {
        let res = app
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| format!("router: {e}"))?;
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .map_err(|e| format!("response body: {e}"))?;
        Ok((status, body))
    })
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

fn paths() -> Vec<String> {
    vec![
        "/v1/jobs".into(),
        "/v1/jobs?limit=10".into(),
        request_auth::blob_upload_path(&s::cid(1)),
        "/v1/ledger?from=0&limit=5".into(),
        format!("/v1/jobs/{}/cancel", s::job_id()),
        "/v1/blobs/missing".into(),
    ]
}

/// Characters a fuzzed path suffix may use (a valid URI either way).
const PATH_CHARS: &[u8] = b"abcxyz0129/_-.=&?%";

fn path_from(inp: &mut Input<'_>) -> String {
    let ps = paths();
    let mut p = ps[inp.choose(ps.len())].clone();
    let n = inp.u8() as usize % 4;
    for _ in 0..n {
        p.push(PATH_CHARS[inp.choose(PATH_CHARS.len())] as char);
    }
    p
}

fn request(
    method: &str,
    path: &str,
    auth: Option<&[u8]>,
    body: &[u8],
    declared: Option<u64>,
) -> Option<Request<Body>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(v) = auth {
        b = b.header(
            header::AUTHORIZATION,
            header::HeaderValue::from_bytes(v).ok()?,
        );
    }
    if let Some(n) = declared {
        b = b.header(header::CONTENT_LENGTH, n);
    }
    b.body(Body::from(body.to_vec())).ok()
}

/// A coordinator that just started, without rate limits (the fuzzer
/// sends thousands of requests a second from one key).
fn state() -> AuthState {
    let throttle = Throttle::new(&ApiLimits::off());
    AuthState::new(
        s::coordinator(),
        kiln_coordinator::api::MAX_BODY,
        Arc::new(throttle),
    )
}

fn run(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    match mode % 3 {
        0 => raw(rest),
        1 => fresh(rest),
        _ => mutated(rest),
    }
}

fn raw(data: &[u8]) -> Outcome {
    let mut inp = Input::new(data);
    let method = METHODS[inp.choose(METHODS.len())];
    let path = path_from(&mut inp);
    let n = inp.u16() as usize % 2048;
    let value = inp.take(n).to_vec();
    let body = inp.rest();
    let Some(req) = request(method, &path, Some(&value), body, None) else {
        return Ok(Verdict::Rejected);
    };
    let app = app(state());
    let (status, _) = send(&app, req)?;
    if status == StatusCode::OK {
        return Err(format!(
            "an unsigned or stale Authorization header authenticated: {:?}",
            String::from_utf8_lossy(&value)
        ));
    }
    Ok(Verdict::Rejected)
}

/// Issue times relative to now (ms), each at least a second from a limit.
const ISSUED: [i64; 8] = [-120_000, -5_000, 0, 1_000, 10_000, 25_000, 35_000, 90_000];
/// Validities (ms): accepted within 1..=120_000.
const VALIDITY: [u64; 8] = [0, 1, 1_000, 60_000, 120_000, 120_001, 600_000, u64::MAX / 2];

/// The request a fresh-mode input describes, and whether the rules accept it.
struct Fresh {
    signed: Signed<RequestAuth>,
    method: String,
    path: String,
    body: Vec<u8>,
    declared: Option<u64>,
    expect_ok: bool,
    why: String,
}

fn describe(data: &[u8], now: u64) -> Result<Fresh, String> {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let ours = flags & 0x07 != 0;
    let coordinator = if ours {
        s::coordinator()
    } else {
        s::provider(1)
    };
    let signed_method = METHODS[inp.choose(METHODS.len())].to_string();
    let signed_path = path_from(&mut inp);
    let issued_off = ISSUED[inp.choose(ISSUED.len())];
    let validity = VALIDITY[inp.choose(VALIDITY.len())];
    let nonce: [u8; 16] = {
        let mut n = [0u8; 16];
        let b = inp.take(16);
        n[..b.len()].copy_from_slice(b);
        n
    };
    let sent_method = if flags & 0x08 != 0 {
        METHODS[inp.choose(METHODS.len())].to_string()
    } else {
        signed_method.clone()
    };
    let sent_path = if flags & 0x10 != 0 {
        path_from(&mut inp)
    } else {
        signed_path.clone()
    };
    let binding_kind = inp.choose(4);
    let declared_kind = inp.choose(8);
    let tampered = flags & 0x20 != 0 && flags & 0x40 != 0;
    let body = inp.rest().to_vec();
    let (binding, binding_ok) = match binding_kind {
        // The body's own hash (usual), another body's, or a CID.
        0 | 1 => (BodyBinding::Blake3(BodyDigest::of(&body)), true),
        2 => {
            let other = BodyDigest::of(b"another body");
            (BodyBinding::Blake3(other), other == BodyDigest::of(&body))
        }
        _ => {
            let cid = if flags & 0x80 != 0 {
                ContentId::of_bytes(&body)
            } else {
                s::cid(1)
            };
            let ok = signed_method == "PUT"
                && signed_path == request_auth::blob_upload_path(&cid)
                && sent_method == signed_method
                && sent_path == signed_path;
            (BodyBinding::Cid(cid), ok)
        }
    };
    let declared = match declared_kind {
        0 => Some(body.len() as u64),
        1 => Some(kiln_coordinator::api::MAX_BODY as u64 + 1),
        _ => None,
    };
    let too_large = declared.is_some_and(|n| n > kiln_coordinator::api::MAX_BODY as u64)
        && matches!(binding, BodyBinding::Blake3(_));
    let issued = now.saturating_add_signed(issued_off);
    let expires = issued.saturating_add(validity);
    let auth = RequestAuth {
        coordinator,
        method: signed_method.clone(),
        path: signed_path.clone(),
        body: binding,
        issued_at: UnixMillis(issued),
    };
    let mut signed = Signed::sign_with(
        &s::key(1),
        auth,
        Nonce::from_bytes(nonce),
        UnixMillis(expires),
    )
    .map_err(|e| e.to_string())?;
    if tampered {
        // Someone else's name on the buyer's signature.
        signed.signer = s::key(4).public();
    }
    let rules = [
        (ours, "signed for this coordinator"),
        (!tampered, "signed by the named key"),
        (sent_method == signed_method, "method as signed"),
        (sent_path == signed_path, "path as signed"),
        (binding_ok, "body binding holds"),
        (!too_large, "declared length within the limit"),
        (
            (0..=25_000).contains(&issued_off),
            "issued between start and now + skew",
        ),
        (
            (1..=120_000).contains(&validity),
            "validity within 1 ms..2 min",
        ),
    ];
    let failed: Vec<&str> = rules
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, w)| *w)
        .collect();
    Ok(Fresh {
        signed,
        method: sent_method,
        path: sent_path,
        body,
        declared,
        expect_ok: failed.is_empty(),
        why: if failed.is_empty() {
            "every rule holds".into()
        } else {
            format!("fails: {}", failed.join(", "))
        },
    })
}

fn header_of(signed: &Signed<RequestAuth>) -> Result<String, String> {
    request_auth::header_value(signed).map_err(|e| e.to_string())
}

fn fresh(data: &[u8]) -> Outcome {
    let st = state();
    let now = UnixMillis::now().0;
    let f = describe(data, now)?;
    let h = header_of(&f.signed)?;
    let app = app(st);
    let Some(req) = request(&f.method, &f.path, Some(h.as_bytes()), &f.body, f.declared) else {
        return Ok(Verdict::Rejected);
    };
    let (status, echoed) = send(&app, req)?;
    let ok = status == StatusCode::OK;
    if ok != f.expect_ok {
        return Err(format!(
            "{} {} answered {status}, but the request {} (signed {} {} issued {} ms from now, expires {} ms from now)",
            f.method,
            f.path,
            f.why,
            f.signed.payload.method,
            f.signed.payload.path,
            f.signed.payload.issued_at.0 as i128 - now as i128,
            f.signed.expires_at.0 as i128 - now as i128,
        ));
    }
    if !ok {
        return Ok(Verdict::Rejected);
    }
    if echoed[..] != f.body[..] {
        return Err(format!(
            "the route saw a different body ({} bytes) than was sent ({} bytes)",
            echoed.len(),
            f.body.len()
        ));
    }
    let Some(again) = request(&f.method, &f.path, Some(h.as_bytes()), &f.body, f.declared) else {
        return Err("the same request cannot be built twice".into());
    };
    let (status, _) = send(&app, again)?;
    if status == StatusCode::OK {
        return Err("a replayed signed request was accepted a second time".into());
    }
    Ok(Verdict::Accepted)
}

/// Decodes a header the way the coordinator documents it (for the
/// mutated mode's oracle).
fn decode_header(v: &[u8]) -> Option<Signed<RequestAuth>> {
    let v = std::str::from_utf8(v).ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    if scheme != request_auth::AUTH_SCHEME {
        return None;
    }
    Signed::from_bytes(&hex::decode(rest.trim()).ok()?).ok()
}

fn mutated(data: &[u8]) -> Outcome {
    let st = state();
    let now = UnixMillis::now().0;
    let key: &Keypair = &s::key(1);
    let auth = RequestAuth {
        coordinator: s::coordinator(),
        method: "POST".into(),
        path: "/v1/jobs".into(),
        body: BodyBinding::Blake3(BodyDigest::of(b"{}")),
        issued_at: UnixMillis(now),
    };
    let signed = Signed::sign_with(
        key,
        auth,
        Nonce::from_bytes([3; 16]),
        UnixMillis(now + 60_000),
    )
    .map_err(|e| e.to_string())?;
    let mut h = header_of(&signed)?.into_bytes();
    // Pairs of (position, xor mask), then bytes appended.
    let mut inp = Input::new(data);
    let edits = (inp.u8() % 8) as usize;
    for _ in 0..edits {
        let at = inp.u16() as usize % h.len().max(1);
        let x = inp.u8();
        if let Some(b) = h.get_mut(at) {
            *b ^= x;
        }
    }
    h.extend_from_slice(inp.rest());
    let Some(req) = request("POST", "/v1/jobs", Some(&h), b"{}", None) else {
        return Ok(Verdict::Rejected);
    };
    let (status, _) = send(&app(st), req)?;
    if status != StatusCode::OK {
        return Ok(Verdict::Rejected);
    }
    match decode_header(&h) {
        Some(d) if d == signed => {
            if h == header_of(&signed)?.into_bytes() {
                Ok(Verdict::Accepted)
            } else {
                Ok(Verdict::Note(
                    "a different Authorization header (hex case, spacing or a non-canonical encoding) authenticates the same signed request".into(),
                ))
            }
        }
        _ => Err(format!(
            "a mutated header authenticated as something other than the signed request: {:?}",
            String::from_utf8_lossy(&h)
        )),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Raw: a (stale) valid-looking header, other schemes, garbage.
    let stale = header_of(&s::sign(1, s::request_auth())).unwrap_or_default();
    for value in [stale.as_str(), "Kiln 00", "Bearer x", "Kiln2 zz", "Kiln2 "] {
        let mut v = vec![1u8, 0, 0];
        v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        v.extend_from_slice(value.as_bytes());
        v.extend_from_slice(b"{}");
        out.push(tagged(0, &v));
    }
    // Fresh: accepted ones (flags 0x01: ours, nothing altered) and each
    // rule broken once.
    let fresh =
        |flags: u8, method: u8, path: u8, issued: u8, validity: u8, binding: u8, declared: u8| {
            let mut v = vec![flags, method, path, 0, issued, validity];
            v.extend_from_slice(&[7u8; 16]);
            v.extend_from_slice(&[binding, declared]);
            v.extend_from_slice(b"{\"spec\":{}}");
            tagged(1, &v)
        };
    out.push(fresh(0x01, 1, 0, 2, 3, 0, 2));
    out.push(fresh(0x01, 0, 1, 3, 2, 0, 0));
    out.push(fresh(0x01, 2, 2, 4, 3, 3, 2)); // PUT /v1/blobs/{cid} bound by CID
    out.push(fresh(0x81, 2, 2, 4, 3, 3, 2)); // ... by another CID than the path's
    out.push(fresh(0x00, 1, 0, 2, 3, 0, 2)); // another coordinator
    out.push(fresh(0x61, 1, 0, 2, 3, 0, 2)); // tampered signer
    out.push(fresh(0x09, 1, 0, 2, 3, 0, 2)); // method changed
    out.push(fresh(0x01, 1, 0, 6, 3, 0, 2)); // issued in the future
    out.push(fresh(0x01, 1, 0, 1, 3, 0, 2)); // before start
    out.push(fresh(0x01, 1, 0, 2, 5, 0, 2)); // validity too long
    out.push(fresh(0x01, 1, 0, 2, 0, 0, 2)); // zero validity
    out.push(fresh(0x01, 1, 0, 2, 3, 2, 2)); // another body's hash
    out.push(fresh(0x01, 1, 0, 2, 3, 0, 1)); // declared too large
    // Mutated: no edit (accepted), a flipped hex digit, uppercase hex.
    out.push(tagged(2, &[0]));
    out.push(tagged(2, &[1, 20, 0, 1]));
    out.push(tagged(2, &[1, 10, 0, 0x20]));
    out
}
