//! A read-only registry on loopback that hands the local engine a Kiln
//! image while its blobs are still arriving.
//!
//! Loading an image with `docker load` makes the engine copy the whole
//! archive to a temporary directory before it unpacks the first layer, so
//! a fetched image would be written three times and nothing would overlap.
//! Instead, the node describes the image as a registry manifest (the
//! config's and layers' OCI digests and sizes, uncompressed layers) and
//! asks the engine to pull it from this server by that manifest's digest:
//! the engine then fetches the layers as it would from any registry, a
//! few at a time, and unpacks each while later ones are still being
//! fetched from peers. A request for a blob not yet verified waits for it.
//!
//! The server binds 127.0.0.1 on a random port and serves only images
//! being loaded right now, each under a random name, streamed from the
//! node's verified cache (BLAKE3 per group, as fetched). The OCI digests
//! are the engine's to check, as it does for any registry: a layer whose
//! bytes do not match is refused there and never registered (the
//! `docker load` path, which has no such check for compressed layers,
//! hashes them itself). Engines reach loopback registries over plain
//! HTTP without configuration.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln_protocol::{ImageManifest, OciDigest};
use sha2::Digest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a blob of an image being served stands.
#[derive(Clone, Debug)]
pub(crate) enum Slot {
    /// Still being fetched.
    Pending,
    /// Verified in the cache at this path.
    Ready(PathBuf),
    /// Will never come: why.
    Failed(String),
}

struct Blob {
    size: u64,
    state: watch::Receiver<Slot>,
}

/// One image being loaded: its registry manifest and its blobs.
pub(crate) struct Served {
    manifest: Vec<u8>,
    manifest_digest: OciDigest,
    blobs: HashMap<OciDigest, Blob>,
    /// Set when a blob could not be read on the way out (ours, preferred
    /// over the engine's account of the same failure).
    pub(crate) failure: Mutex<Option<String>>,
}

/// The loopback registry.
pub(crate) struct LocalRegistry {
    addr: SocketAddr,
    images: Mutex<HashMap<String, Arc<Served>>>,
}

/// Registers an image for as long as it lives.
pub(crate) struct Serving {
    registry: Arc<LocalRegistry>,
    name: String,
    pub(crate) served: Arc<Served>,
}

impl Serving {
    /// What the engine pulls: `127.0.0.1:<port>/<name>@<manifest digest>`.
    pub(crate) fn reference(&self) -> String {
        format!(
            "{}/{}@{}",
            self.registry.addr, self.name, self.served.manifest_digest
        )
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.images.lock() {
            m.remove(&self.name);
        }
    }
}

/// The registry manifest (Docker schema 2) of `image`: uncompressed
/// layers, which engines unpack as they are.
pub(crate) fn registry_manifest(image: &ImageManifest) -> Vec<u8> {
    let layer = |l: &kiln_protocol::ImageBlob| {
        serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
            "size": l.size,
            "digest": l.digest.to_string(),
        })
    };
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": image.config.size,
            "digest": image.config.digest.to_string(),
        },
        "layers": image.layers.iter().map(layer).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&m).unwrap_or_default()
}

impl LocalRegistry {
    /// Binds 127.0.0.1 on a free port and serves until `cancel` fires.
    pub(crate) async fn start(cancel: CancellationToken) -> std::io::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let reg = Arc::new(Self {
            addr: listener.local_addr()?,
            images: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/v2/", axum::routing::any(api_version))
            .route("/v2/{*rest}", axum::routing::any(serve))
            .with_state(reg.clone());
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::warn!("the loopback image registry stopped: {e}");
            }
        });
        Ok(reg)
    }

    /// Serves `image` under a fresh random name; `slots` say where each
    /// blob (by digest) stands and are updated by whoever fetches them.
    pub(crate) fn serve(
        self: &Arc<Self>,
        image: &ImageManifest,
        slots: HashMap<OciDigest, watch::Receiver<Slot>>,
    ) -> Serving {
        let manifest = registry_manifest(image);
        let manifest_digest = OciDigest(sha2::Sha256::digest(&manifest).into());
        let blobs = image
            .blobs()
            .iter()
            .filter_map(|b| {
                slots.get(&b.digest).map(|rx| {
                    (
                        b.digest,
                        Blob {
                            size: b.size,
                            state: rx.clone(),
                        },
                    )
                })
            })
            .collect();
        let name = format!(
            "kiln/{}",
            hex::encode(kiln_protocol::Nonce::random().as_bytes())
        );
        let served = Arc::new(Served {
            manifest,
            manifest_digest,
            blobs,
            failure: Mutex::new(None),
        });
        if let Ok(mut m) = self.images.lock() {
            m.insert(name.clone(), served.clone());
        }
        Serving {
            registry: self.clone(),
            name,
            served,
        }
    }
}

async fn api_version() -> Response {
    (
        [(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        )],
        "{}",
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"errors":[{{"code":"NOT_FOUND","message":"{what}"}}]}}"#),
    )
        .into_response()
}

async fn serve(
    State(reg): State<Arc<LocalRegistry>>,
    method: Method,
    Path(rest): Path<String>,
) -> Response {
    let Some((name, kind, reference)) = ["/manifests/", "/blobs/"].iter().find_map(|k| {
        rest.rsplit_once(k)
            .map(|(n, r)| (n.to_string(), k.trim_matches('/'), r.to_string()))
    }) else {
        return not_found("no such route");
    };
    let Some(served) = reg.images.lock().ok().and_then(|m| m.get(&name).cloned()) else {
        return not_found("no such image");
    };
    let Ok(digest) = reference.parse::<OciDigest>() else {
        return not_found("images here are named by digest only");
    };
    let head = method == Method::HEAD;
    if kind == "manifests" {
        if digest != served.manifest_digest {
            return not_found("no such manifest");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
            h.insert("Docker-Content-Digest", v);
        }
        h.insert(header::CONTENT_LENGTH, served.manifest.len().into());
        let body = if head {
            Body::empty()
        } else {
            Body::from(served.manifest.clone())
        };
        return (h, body).into_response();
    }
    let Some(blob) = served.blobs.get(&digest) else {
        return not_found("no such blob");
    };
    // Wait until the blob is verified in the cache (or will never be).
    let mut rx = blob.state.clone();
    let path = loop {
        let now = rx.borrow_and_update().clone();
        match now {
            Slot::Ready(p) => break p,
            Slot::Failed(why) => {
                return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
            }
            Slot::Pending => {
                if rx.changed().await.is_err() {
                    return (StatusCode::SERVICE_UNAVAILABLE, "the fetch was abandoned")
                        .into_response();
                }
            }
        }
    };
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, blob.size.into());
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("Docker-Content-Digest", v);
    }
    if head {
        return (h, Body::empty()).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let size = blob.size;
    let served2 = served.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = stream_file(&tx, &path, size, digest) {
            if let Ok(mut f) = served2.failure.lock() {
                f.get_or_insert(e.clone());
            }
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    (h, Body::from_stream(body)).into_response()
}

/// Sends the file at `path` (`size` bytes) in 1 MiB chunks.
fn stream_file(
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    path: &std::path::Path,
    size: u64,
    digest: OciDigest,
) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read blob {digest}: {e}"))?;
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).unwrap_or(1 << 20);
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)
            .map_err(|e| format!("cannot read blob {digest}: {e}"))?;
        left -= n as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return Ok(()); // the engine hung up
        }
    }
    Ok(())
}
