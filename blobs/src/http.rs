//! HTTP sources: a URL plus the CID its content must have.
//!
//! The body is streamed into the store's `tmp/`, hashed (with its outboard)
//! as it arrives; bytes that do not hash to the expected CID are refused with
//! both CIDs in the error and nothing becomes visible.
//!
//! A blob already in the store is not trusted on the URL's word: the URL
//! must prove it serves those bytes ([`prove_url`]), or a job naming someone
//! else's CID with any URL would be handed a cached copy.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_protocol::ContentId;
use tokio::sync::mpsc;

use crate::store::{Store, StoreError};

/// Why an HTTP source failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("downloading {url} failed: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error(
        "content of {url} does not match its CID: expected {expected}, got {actual}; \
         the input was rejected and nothing was stored"
    )]
    Mismatch {
        url: String,
        expected: ContentId,
        actual: ContentId,
    },
    #[error("{url} is larger than the {limit}-byte limit for this input")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {source}")]
    Store { url: String, source: StoreError },
    #[error(
        "{url} does not serve the content of {expected} (bytes {offset}..{end} differ); \
         the input was rejected"
    )]
    Unproven {
        url: String,
        expected: ContentId,
        offset: u64,
        end: u64,
    },
}

/// Limits of [`fetch_url_with`].
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Refuse bodies larger than this (checked against Content-Length
    /// first, then while streaming).
    pub max_bytes: Option<u64>,
}

/// What [`fetch_url`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReport {
    pub cid: ContentId,
    pub size: u64,
    /// Body bytes received (0 when the blob was already stored).
    pub bytes_transferred: u64,
    pub elapsed: Duration,
}

/// Downloads `url` into `store` if its content is `expected`.
pub async fn fetch_url(
    store: &Store,
    url: &str,
    expected: ContentId,
) -> Result<HttpReport, HttpError> {
    fetch_url_with(store, url, expected, &HttpOptions::default()).await
}

/// [`fetch_url`] with limits.
pub async fn fetch_url_with(
    store: &Store,
    url: &str,
    expected: ContentId,
    opts: &HttpOptions,
) -> Result<HttpReport, HttpError> {
    let started = Instant::now();
    if let Some(size) = store.size(&expected) {
        let proof = prove_url(store, url, expected, size).await?;
        return Ok(HttpReport {
            cid: expected,
            size,
            bytes_transferred: proof,
            elapsed: started.elapsed(),
        });
    }
    let request_err = |source| HttpError::Request {
        url: url.to_string(),
        source,
    };
    let response = reqwest::get(url).await.map_err(request_err)?;
    if !response.status().is_success() {
        return Err(HttpError::Status {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    let length = response.content_length();
    let limit = opts.max_bytes.unwrap_or(u64::MAX);
    let too_large = || HttpError::TooLarge {
        url: url.to_string(),
        limit,
    };
    if length.is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let store2 = store.clone();
    let (res, total) = consume_body(url, response, limit, move |reader| {
        store2.import_reader(reader, length, Some(expected))
    })
    .await?;
    match res {
        Ok(cid) => Ok(HttpReport {
            cid,
            size: store.size(&cid).unwrap_or(total),
            bytes_transferred: total,
            elapsed: started.elapsed(),
        }),
        Err(_) if total > limit => Err(too_large()),
        Err(StoreError::Mismatch { expected, actual }) => Err(HttpError::Mismatch {
            url: url.to_string(),
            expected,
            actual,
        }),
        Err(source) => Err(HttpError::Store {
            url: url.to_string(),
            source,
        }),
    }
}

/// `expected` (of `size` bytes) is already stored: checks that `url` serves
/// it by asking for one random 16 KiB group (`Range`) and comparing it with
/// the stored bytes; a server that ignores ranges has its whole body hashed.
/// Returns the bytes received. One random group is a proof of possession,
/// not of every byte: the job still reads the stored, verified copy.
pub async fn prove_url(
    store: &Store,
    url: &str,
    expected: ContentId,
    size: u64,
) -> Result<u64, HttpError> {
    let request_err = |source| HttpError::Request {
        url: url.to_string(),
        source,
    };
    if size == 0 {
        return Ok(0); // the empty blob: nothing to prove, nothing to leak
    }
    let group = crate::GROUP_BYTES;
    let groups = size.div_ceil(group).max(1);
    let offset = getrandom::u64().map_or(0, |r| r % groups) * group;
    let end = (offset + group).min(size);
    let unproven = || HttpError::Unproven {
        url: url.to_string(),
        expected,
        offset,
        end,
    };
    let response = reqwest::Client::new()
        .get(url)
        .header("range", format!("bytes={offset}-{}", end.saturating_sub(1)))
        .send()
        .await
        .map_err(request_err)?;
    let status = response.status().as_u16();
    if status == 206 {
        // At most the asked range is read: a server that sends more fails.
        let want = end - offset;
        let (body, _) = consume_body(url, response, want, move |reader| {
            let mut buf = Vec::with_capacity(want as usize);
            reader.read_to_end(&mut buf).map(|_| buf)
        })
        .await?;
        let body = body.map_err(|_| unproven())?;
        let blob = store.open(&expected).ok().flatten().ok_or_else(unproven)?;
        let ours = blob
            .read_range(offset, end - offset)
            .map_err(|e| HttpError::Store {
                url: url.to_string(),
                source: StoreError::Io {
                    path: blob.path().to_path_buf(),
                    source: e,
                },
            })?;
        return if body[..] == ours[..] {
            Ok(body.len() as u64)
        } else {
            Err(unproven())
        };
    }
    if !response.status().is_success() {
        return Err(HttpError::Status {
            url: url.to_string(),
            status,
        });
    }
    // No range support: hash the whole body (nothing is stored).
    let (cid, total) = consume_body(url, response, size, move |reader| {
        ContentId::of_reader(expected.codec(), reader).map(|(cid, _)| cid)
    })
    .await?;
    match cid {
        Ok(actual) if actual == expected => Ok(total),
        Ok(actual) => Err(HttpError::Mismatch {
            url: url.to_string(),
            expected,
            actual,
        }),
        Err(_) => Err(unproven()),
    }
}

/// Feeds `response`'s body (at most `limit` bytes) to `consume`, which
/// reads it on a blocking thread; returns what `consume` returned and the
/// body bytes it was given. The body stops flowing as soon as `consume`
/// stops reading.
async fn consume_body<T: Send + 'static>(
    url: &str,
    response: reqwest::Response,
    limit: u64,
    consume: impl FnOnce(&mut ChannelReader) -> T + Send + 'static,
) -> Result<(T, u64), HttpError> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let worker = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
            total: 0,
            limit,
        };
        let out = consume(&mut reader);
        (out, reader.total)
    });
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| io::Error::other(e.to_string()));
        let stop = piece.is_err();
        if tx.send(piece).await.is_err() || stop {
            break; // the consumer stopped (error) or the body failed
        }
    }
    drop(tx);
    worker.await.map_err(|e| HttpError::Store {
        url: url.to_string(),
        source: StoreError::Io {
            path: "<http body>".into(),
            source: io::Error::other(e.to_string()),
        },
    })
}

/// A blocking reader over pieces sent by an async task.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    total: u64,
    limit: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.total += b.len() as u64;
                    if self.total > self.limit {
                        return Err(io::Error::new(
                            io::ErrorKind::FileTooLarge,
                            "the body exceeds the size limit",
                        ));
                    }
                    self.current = b;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
