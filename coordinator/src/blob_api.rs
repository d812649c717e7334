//! The buyer's REST side of the data plane (routes merged by
//! [`crate::api::create_app`]).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/blobs/missing` | which of these CIDs the caller still has to upload |
//! | `PUT /v1/blobs/{cid}` | stream one blob up; refused unless it hashes to `cid` |
//! | `POST /v1/blobs` | upload a small blob (≤ 64 MiB), returns its CID |
//! | `GET /v1/blobs` | the blobs the caller may read (uploads, job outputs) |
//! | `GET /v1/blobs/{cid}` | the bytes (`Range: bytes=a-b` honoured, for resuming) |
//! | `GET /v1/blobs/{cid}/bao?ranges=…` | the bao encoding of chunk ranges: the client verifies every 16 KiB group as it arrives |
//! | `DELETE /v1/blobs/{cid}` | give up the caller's claim; the bytes go when nobody needs them |
//!
//! Reading needs a `blob_owners` row for the caller: holding a blob for one
//! buyer never makes it readable by another who merely knows the CID. An
//! upload of a blob the store already holds (for someone else) still has to
//! send the bytes, which are hashed and compared, so the grant proves
//! possession; nothing is stored twice.
//!
//! **Quotas.** The store never evicts (it holds buyers' only copies), so
//! space is shared out up front: each buyer holds at most
//! [`crate::CoordinatorConfig::blob_quota_per_buyer`] bytes (its uploads
//! and its jobs' outputs, each counted once), checked before an upload's
//! bytes are read (from its declared length) and again when it is granted.
//! Outputs of its jobs always land (their work is paid for), so usage may
//! exceed the quota; uploads are then refused until the buyer deletes
//! something. The store's own quota bounds everything together.

use std::io;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::TryStreamExt;
use kiln_blobs::StoreError;
use kiln_protocol::views::{
    BlobDeletedView, BlobListView, MissingRequest, MissingView, UploadView,
};
use kiln_protocol::{BuyerId, ContentId};
use serde::Deserialize;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::AppState;
use crate::auth::{ApiError, Buyer};
use crate::db::{Db, DbError};

/// Header carrying a blob's size on `/bao` responses.
pub const SIZE_HEADER: &str = "x-kiln-size";
/// Optional header naming an upload (shown by `kiln data ls`).
pub const NAME_HEADER: &str = "x-kiln-name";
/// Most CIDs per `missing` query.
const MAX_QUERY: usize = 10_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/blobs", post(upload_small).get(list))
        .route("/v1/blobs/missing", post(missing))
        .route(
            "/v1/blobs/{cid}",
            put(upload)
                .layer(DefaultBodyLimit::disable())
                .get(download)
                .merge(delete(remove)),
        )
        .route("/v1/blobs/{cid}/bao", get(bao))
}

fn parse_cid(s: &str) -> Result<ContentId, ApiError> {
    s.parse()
        .map_err(|e: kiln_protocol::IdParseError| ApiError::BadRequest {
            field: Some("cid".into()),
            reason: e.to_string(),
        })
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Mismatch { expected, actual } => ApiError::BadRequest {
            field: Some("body".into()),
            reason: format!(
                "uploaded bytes hash to {actual}, not {expected}; nothing was stored (was the file changed while uploading?)"
            ),
        },
        StoreError::Truncated { got, declared } => ApiError::BadRequest {
            field: Some("body".into()),
            reason: format!(
                "the upload ended after {got} of {declared} bytes; nothing was stored, upload it again"
            ),
        },
        e @ (StoreError::Quota { .. } | StoreError::Full { .. } | StoreError::DiskFull { .. }) => {
            ApiError::InsufficientStorage(e.to_string())
        }
        e @ StoreError::TooLong { .. } => ApiError::BadRequest {
            field: Some("body".into()),
            reason: format!("{e}; nothing was stored"),
        },
        e => ApiError::Internal(e.to_string()),
    }
}

async fn readable(state: &AppState, buyer: &BuyerId, cid: &ContentId) -> Result<(), ApiError> {
    if state.db.blob_readable(buyer, cid).await? && state.blobs.has(cid) {
        Ok(())
    } else {
        // The same answer whether it is absent or someone else's.
        Err(ApiError::NotFound(format!(
            "blob {cid} is not one of your uploads or job outputs; upload it with `kiln data add`"
        )))
    }
}

/// Records that `buyer` uploaded `cid`, within its quota. When the quota
/// refuses it and nobody else holds the blob, the bytes just stored go.
async fn grant(
    state: &AppState,
    buyer: &BuyerId,
    cid: &ContentId,
    size: u64,
    name: &str,
) -> Result<(), ApiError> {
    let new_claim = !state.db.blob_readable(buyer, cid).await?;
    let mut tx = state.db.begin().await?;
    if let Some(quota) = state.config.blob_quota_per_buyer
        && new_claim
    {
        let used = Db::blob_usage_in(&mut tx, buyer).await?;
        if used.saturating_add(size) > quota {
            let erased = Db::forget_blob_if_unheld(&mut tx, cid).await?;
            tx.commit().await.map_err(DbError::from)?;
            if erased {
                erase(state, cid).await;
            }
            return Err(over_quota(used, size, quota));
        }
    }
    Db::grant_blob(&mut tx, buyer, cid, size, name).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

fn over_quota(used: u64, size: u64, quota: u64) -> ApiError {
    ApiError::InsufficientStorage(format!(
        "your blob quota is {quota} bytes and you hold {used}; this upload of {size} bytes would \
         pass it: nothing was kept. Free space with `kiln data rm <cid>` (see `kiln data ls`)"
    ))
}

/// Refuses an upload whose declared size cannot fit the buyer's quota,
/// before any of its bytes are read.
async fn check_quota(state: &AppState, buyer: &BuyerId, size: Option<u64>) -> Result<(), ApiError> {
    let (Some(quota), Some(size)) = (state.config.blob_quota_per_buyer, size) else {
        return Ok(());
    };
    let used = state.db.blob_usage(buyer).await?;
    if used.saturating_add(size) > quota {
        return Err(over_quota(used, size, quota));
    }
    Ok(())
}

/// Removes `cid`'s bytes unless a job that has not ended still needs them
/// (a result a verification compares: its bytes may be claimed by nobody).
async fn erase(state: &AppState, cid: &ContentId) {
    match in_flight(state, cid).await {
        Ok(false) => {
            if let Err(e) = state.blobs.remove(cid) {
                tracing::warn!(%cid, "cannot remove an unclaimed blob: {e}");
            }
        }
        Ok(true) => {}
        Err(e) => tracing::warn!(%cid, "cannot tell whether a blob is in use, kept: {e}"),
    }
}

/// Whether a delivered result of a job that has not ended names `cid`.
async fn in_flight(state: &AppState, cid: &ContentId) -> Result<bool, DbError> {
    Ok(state.db.results_in_flight().await?.iter().any(|m| {
        m.receipt.as_ref().is_some_and(|r| {
            let r = &r.payload;
            [r.output_cid, r.stdout_cid, r.stderr_cid].contains(cid)
        }) || m
            .manifest
            .as_ref()
            .is_some_and(|man| man.entries.iter().any(|e| e.cid == *cid))
    }))
}

/// `DELETE /v1/blobs/{cid}`: the caller gives up its claim. Refused while
/// one of its own jobs that has not ended uses the blob (an input, or a
/// result still being verified).
async fn remove(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(cid): Path<String>,
) -> Result<Json<BlobDeletedView>, ApiError> {
    let cid = parse_cid(&cid)?;
    for job in state.db.live_jobs_of(&buyer).await? {
        let output = job.receipt.as_ref().is_some_and(|r| {
            let r = &r.payload;
            [r.output_cid, r.stdout_cid, r.stderr_cid].contains(&cid)
        }) || job
            .manifest
            .as_ref()
            .is_some_and(|m| m.entries.iter().any(|e| e.cid == cid));
        let input = job.spec.inputs.iter().any(|i| i.cid == cid);
        if input || output {
            return Err(ApiError::BadRequest {
                field: Some("cid".into()),
                reason: format!(
                    "{cid} is {} of your job {} ({}); cancel it (`kiln job cancel`) or wait \
                     until it ends, then delete",
                    if input { "an input" } else { "a result" },
                    job.id,
                    job.state.as_str()
                ),
            });
        }
    }
    let mut tx = state.db.begin().await?;
    let Some(size) = Db::revoke_blob(&mut tx, &buyer, &cid).await? else {
        return Err(ApiError::NotFound(format!(
            "blob {cid} is not one of your uploads or job outputs (`kiln data ls` lists them)"
        )));
    };
    let unheld = Db::forget_blob_if_unheld(&mut tx, &cid).await?;
    let used = Db::blob_usage_in(&mut tx, &buyer).await?;
    tx.commit().await.map_err(DbError::from)?;
    if unheld {
        erase(&state, &cid).await;
    }
    Ok(Json(BlobDeletedView {
        cid,
        size,
        erased: unheld && !state.blobs.has(&cid),
        used,
    }))
}

fn name_of(headers: &HeaderMap) -> String {
    headers
        .get(NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().filter(|c| !c.is_control()).take(256).collect())
        .unwrap_or_else(|| "upload".into())
}

async fn missing(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Json(q): Json<MissingRequest>,
) -> Result<Json<MissingView>, ApiError> {
    if q.cids.len() > MAX_QUERY {
        return Err(ApiError::BadRequest {
            field: Some("cids".into()),
            reason: format!("at most {MAX_QUERY} CIDs per query; ask in batches"),
        });
    }
    let mut missing = Vec::new();
    for cid in q.cids {
        if !(state.blobs.has(&cid) && state.db.blob_readable(&buyer, &cid).await?) {
            missing.push(cid);
        }
    }
    Ok(Json(MissingView { missing }))
}

async fn upload_small(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<UploadView>, ApiError> {
    let len = body.len() as u64;
    check_quota(&state, &buyer, Some(len)).await?;
    let store = state.blobs.clone();
    let cid = tokio::task::spawn_blocking(move || store.import_reader(&body[..], Some(len), None))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(store_error)?;
    grant(&state, &buyer, &cid, len, &name_of(&headers)).await?;
    Ok(Json(UploadView {
        cid,
        size: len,
        stored: None,
    }))
}

/// Streams the body into the store (or, when the store already holds the
/// blob, just hashes it to prove possession).
async fn upload(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(cid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<UploadView>), ApiError> {
    let cid = parse_cid(&cid)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !state.db.blob_readable(&buyer, &cid).await? {
        check_quota(&state, &buyer, declared).await?;
    }
    let stream = body.into_data_stream().map_err(io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let store = state.blobs.clone();
    let held = store.has(&cid);
    let size = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
        if held {
            let (actual, n) =
                ContentId::of_reader(cid.codec(), reader).map_err(|e| StoreError::Io {
                    path: "<upload>".into(),
                    source: e,
                })?;
            if actual != cid {
                return Err(StoreError::Mismatch {
                    expected: cid,
                    actual,
                });
            }
            Ok(n)
        } else {
            // The request's signature binds the body only through `cid`,
            // so what is granted must rest on bytes that hash to it. The
            // store checks them as it imports, but returns at once without
            // reading if another upload of `cid` finished meanwhile: hash
            // everything that arrives here too, to the end.
            let mut hashed = Hashing {
                inner: reader,
                hasher: blake3::Hasher::new(),
                read: 0,
            };
            store.import_reader(&mut hashed, declared, Some(cid))?;
            let io = |e| StoreError::Io {
                path: "<upload>".into(),
                source: e,
            };
            io::copy(&mut hashed, &mut io::sink()).map_err(io)?;
            let actual = ContentId::from_blake3(cid.codec(), hashed.hasher.finalize());
            if actual != cid {
                return Err(StoreError::Mismatch {
                    expected: cid,
                    actual,
                });
            }
            Ok(hashed.read)
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(store_error)?;
    grant(&state, &buyer, &cid, size, &name_of(&headers)).await?;
    let status = if held {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(UploadView {
            cid,
            size,
            stored: Some(!held),
        }),
    ))
}

/// A reader that hashes (BLAKE3) and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    read: u64,
}

impl<R: io::Read> io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Largest manifest `GET /v1/blobs` reads to show a directory's size.
const MAX_LISTED_MANIFEST: u64 = 1 << 20;

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
}

async fn list(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Query(q): Query<ListQuery>,
) -> Result<Json<BlobListView>, ApiError> {
    let rows = state
        .db
        .blobs_of(&buyer, q.limit.unwrap_or(1000).min(10_000))
        .await?;
    let blobs = rows
        .into_iter()
        .map(|b| {
            let held = state.blobs.has(&b.cid);
            // A directory is shown with its files' bytes, read from its
            // manifest (bounded: a manifest past this is listed as is).
            let manifest = (held
                && kiln_protocol::views::BlobKind::of(&b.cid)
                    == kiln_protocol::views::BlobKind::Directory
                && b.size <= MAX_LISTED_MANIFEST)
                .then(|| state.blobs.get(&b.cid).ok().flatten())
                .flatten()
                .and_then(|bytes| kiln_protocol::DagNode::decode(&bytes).ok());
            crate::views::blob(b, held, manifest.as_ref())
        })
        .collect();
    Ok(Json(BlobListView {
        blobs,
        used: state.db.blob_usage(&buyer).await?,
        quota: state.config.blob_quota_per_buyer,
    }))
}

/// Parses `Range: bytes=a-b` / `bytes=a-` (one range).
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || ApiError::RangeNotSatisfiable {
        size,
        reason: "use one range, `bytes=START-` or `bytes=START-END`".into(),
    };
    let v = v.to_str().map_err(|_| bad())?;
    let spec = v.strip_prefix("bytes=").ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end = if b.trim().is_empty() {
        size
    } else {
        b.trim()
            .parse::<u64>()
            .map_err(|_| bad())?
            .saturating_add(1)
    };
    if start >= size || end <= start {
        return Err(ApiError::RangeNotSatisfiable {
            size,
            reason: format!("range {start}-{end} is outside the blob"),
        });
    }
    Ok(Some((start, end.min(size))))
}

async fn download(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(cid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&cid)?;
    readable(&state, &buyer, &cid).await?;
    stream_blob(&state, &cid, &headers).await
}

/// The bytes of a stored blob (honouring one `Range`), streamed from disk:
/// never read whole into memory, whatever its size. The caller has checked
/// that the asker may read it.
pub(crate) async fn stream_blob(
    state: &AppState,
    cid: &ContentId,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let blob =
        state.blobs.open(cid).map_err(store_error)?.ok_or_else(|| {
            ApiError::NotFound(format!("blob {cid} is not stored here (evicted?)"))
        })?;
    let size = blob.size();
    let range = parse_range(headers, size)?;
    let (start, end) = range.unwrap_or((0, size));
    let (file, _) = blob.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    file.seek(io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(end - start), 1 << 20));
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{cid}\""));
    if range.is_some() {
        resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    resp.body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[derive(Deserialize)]
struct BaoQuery {
    /// Chunk-range boundaries, comma-separated (`0,16,32,48`: chunks 0..16
    /// and 32..48); absent: the whole blob.
    ranges: Option<String>,
}

/// The bao encoding of the asked ranges, streamed as it is produced.
async fn bao(
    State(state): State<AppState>,
    Buyer(buyer): Buyer,
    Path(cid): Path<String>,
    Query(q): Query<BaoQuery>,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&cid)?;
    readable(&state, &buyer, &cid).await?;
    let blob = state
        .blobs
        .open(&cid)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("blob {cid} was just evicted; try again")))?;
    let size = blob.size();
    let ranges = match q.ranges.as_deref() {
        None | Some("") => kiln_blobs::all_chunks(size),
        Some(s) => {
            let bounds: Result<Vec<u64>, _> = s.split(',').map(|p| p.trim().parse()).collect();
            bounds
                .ok()
                .and_then(|b| kiln_blobs::wire::ranges_from_wire(&b))
                .ok_or_else(|| ApiError::BadRequest {
                    field: Some("ranges".into()),
                    reason: "ranges must be strictly increasing chunk boundaries, comma-separated"
                        .into(),
                })?
        }
    };
    let (tx, rx) = tokio::io::duplex(1 << 20);
    tokio::task::spawn_blocking(move || {
        let mut w = SyncIoBridge::new(tx);
        if let Err(e) = blob.encode_ranges(&ranges, &mut w) {
            // The client sees a short body and fails verification; log why.
            tracing::warn!(%cid, "bao encoding stopped: {e}");
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(SIZE_HEADER, size)
        .body(Body::from_stream(ReaderStream::with_capacity(rx, 1 << 20)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
