//! HTTP sources: a URL plus the CID its content must have.
//!
//! The body is streamed into the store's `tmp/`, hashed (with its outboard)
//! as it arrives; bytes that do not hash to the expected CID are refused and
//! nothing becomes visible.
//!
//! A URL is fetched on a stranger's word from inside the provider's network,
//! so the fetcher is built not to be turned against its host:
//!
//! * **Only global addresses** ([`addr`]). Every address a host name
//!   resolves to is vetted inside the client's resolver and the connection
//!   goes to a vetted address, with no second lookup a DNS rebinding could
//!   answer differently; IP literals, in the URL and in every redirect, are
//!   vetted before connecting, and the address the response came from is
//!   checked again. Loopback, private, link-local (cloud metadata) and other
//!   non-global addresses are refused unless [`HttpOptions::allow_private`]
//!   (`kiln-node run --allow-private-urls`).
//! * **At most [`MAX_REDIRECTS`] redirects**, each hop vetted again. No
//!   proxy from the environment (a proxy would resolve names for us) and no
//!   content decoding (the CID is of the bytes sent).
//! * **Bounded time and size**: a connect timeout; after a grace period the
//!   transfer must keep an average of [`HttpOptions::min_rate`]; an optional
//!   hard deadline (a job's input: its timeout); never more than
//!   [`HttpOptions::max_bytes`] read. A trickling URL cannot hold a job slot.
//! * **Errors say what kind of problem it was**, never the provider's
//!   network details (resolved addresses, OS errors, response bodies): the
//!   message goes to the buyer, [`HttpError::detail`] to the provider's log.
//!
//! **A cached copy is handed out only after the full verified fetch.** When
//! the store already holds the CID, the URL must still serve every byte: the
//! body is hashed (not stored) and the job then reads the cached copy only
//! if it hashed to the CID. Any cheaper proof is a sample, and a sample can
//! be passed by a server that knows part of a file (a fine-tune shares most
//! 16 KiB groups with its public base model) while cached CIDs are public
//! (adverts, gossip); the full fetch costs the bandwidth of a cache miss but
//! no disk. The same holds when another job stores the CID while this
//! request is being answered.

mod addr;

pub use addr::{AddrClass, classify};

use std::error::Error as StdError;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_protocol::ContentId;
use tokio::sync::mpsc;

use crate::store::{Store, StoreError};

/// Redirects followed at most (each hop vetted like the first URL).
pub const MAX_REDIRECTS: usize = 5;

/// Why an HTTP source failed. The messages are meant for the buyer who gave
/// the URL: they name the URL and the kind of problem, not the provider's
/// addresses or OS errors ([`HttpError::detail`] has those, for the log).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("`{url}` cannot be fetched: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error(
        "`{url}` leads to {class} address, which this provider does not fetch from; \
         give a URL on a public host"
    )]
    Refused { url: String, class: AddrClass },
    #[error("`{url}` redirected more than {max} times; give the final URL instead")]
    TooManyRedirects { url: String, max: usize },
    #[error("`{url}` could not be fetched: {what}; check that it is reachable from the internet")]
    Unreachable {
        url: String,
        what: &'static str,
        /// The underlying error chain, for the provider's log only.
        detail: String,
    },
    #[error("`{url}` answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error(
        "`{url}` sent too slowly ({received} bytes in {secs} s; at least {min_rate} bytes/s \
         are needed after the first {grace} s); use a faster host"
    )]
    TooSlow {
        url: String,
        received: u64,
        secs: u64,
        min_rate: u64,
        grace: u64,
    },
    #[error(
        "`{url}` did not finish within the {secs} s allowed for it ({received} bytes received); \
         use a faster host or a longer job timeout"
    )]
    Deadline {
        url: String,
        secs: u64,
        received: u64,
    },
    #[error(
        "content of `{url}` does not match its CID {expected}; the input was rejected and \
         nothing was stored (check the URL, and the file's CID with `kiln data add`)"
    )]
    Mismatch {
        url: String,
        expected: ContentId,
        /// What the bytes hashed to, when they were all read (for the log).
        actual: Option<ContentId>,
    },
    #[error("`{url}` is larger than the {limit}-byte limit for this input")]
    TooLarge { url: String, limit: u64 },
    #[error("this provider could not store the content of `{url}`: {what}")]
    Store {
        url: String,
        what: &'static str,
        /// The store's error, for the provider's log only.
        detail: String,
    },
}

impl HttpError {
    /// What the provider's operator needs and the buyer must not see: the
    /// error chain behind a connection failure, the CID actually served,
    /// the store's error.
    pub fn detail(&self) -> Option<String> {
        match self {
            Self::Unreachable { detail, .. } | Self::Store { detail, .. } => Some(detail.clone()),
            Self::Mismatch {
                actual: Some(a), ..
            } => Some(format!("the body hashed to {a}")),
            _ => None,
        }
    }
}

/// Limits and policy of [`fetch_url_with`].
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Refuse bodies larger than this (checked against Content-Length
    /// first, then while streaming). A blob already stored is never read
    /// past its size.
    pub max_bytes: Option<u64>,
    /// Fetch from loopback, private, link-local and other non-global
    /// addresses too (a provider that serves datasets from its own LAN).
    pub allow_private: bool,
    /// Non-global addresses allowed even without `allow_private` (one
    /// known mirror, and tests).
    pub also_allow: Vec<IpAddr>,
    /// Most time to open a TCP connection (each address, each hop).
    pub connect_timeout: Duration,
    /// Time for the response to start before `min_rate` applies.
    pub grace: Duration,
    /// Least average rate, bytes/s since the start, once `grace` has
    /// passed (0: none). A stalled or trickling server is cut off.
    pub min_rate: u64,
    /// When the whole fetch must be done, whatever the rate.
    pub deadline: Option<Instant>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_bytes: None,
            allow_private: false,
            also_allow: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            min_rate: 64 * 1024,
            deadline: None,
        }
    }
}

/// What [`fetch_url`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReport {
    pub cid: ContentId,
    pub size: u64,
    /// Body bytes received (all of them, also when the blob was cached).
    pub bytes_transferred: u64,
    pub elapsed: Duration,
}

/// Downloads `url` into `store` if its content is `expected`, with the
/// default [`HttpOptions`] (global addresses only, no size limit).
pub async fn fetch_url(
    store: &Store,
    url: &str,
    expected: ContentId,
) -> Result<HttpReport, HttpError> {
    fetch_url_with(store, url, expected, &HttpOptions::default()).await
}

/// [`fetch_url`] with limits and an address policy.
pub async fn fetch_url_with(
    store: &Store,
    url: &str,
    expected: ContentId,
    opts: &HttpOptions,
) -> Result<HttpReport, HttpError> {
    let started = Instant::now();
    let pace = Pace {
        start: started,
        grace: opts.grace,
        min_rate: opts.min_rate,
        deadline: opts.deadline,
    };
    let cached = store.size(&expected);
    let max = opts.max_bytes.unwrap_or(u64::MAX);
    let limit = cached.map_or(max, |s| s.min(max));
    let response = get(url, opts, &pace).await?;
    let length = response.content_length();
    if let (Some(size), Some(l)) = (cached, length)
        && l != size
    {
        return Err(HttpError::Mismatch {
            url: url.to_string(),
            expected,
            actual: None,
        });
    }
    let too_large = || HttpError::TooLarge {
        url: url.to_string(),
        limit,
    };
    if length.is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let store2 = store.clone();
    let (res, total) = stream_body(url, response, limit, &pace, move |reader| {
        if !store2.has(&expected) {
            let got = store2.import_reader(&mut *reader, length, Some(expected));
            // `import_reader` answers a blob stored meanwhile (another job
            // fetched it while this request was answered) without reading:
            // the URL must still serve all of it, below.
            if !(got.is_ok() && reader.total == 0) {
                return got;
            }
        }
        hash_rest(reader, expected)
    })
    .await?;
    match res {
        Ok(cid) => Ok(HttpReport {
            cid,
            size: store.size(&cid).unwrap_or(total),
            bytes_transferred: total,
            elapsed: started.elapsed(),
        }),
        Err(StoreError::Mismatch { expected, actual }) => Err(HttpError::Mismatch {
            url: url.to_string(),
            expected,
            actual: Some(actual),
        }),
        Err(e @ (StoreError::Truncated { .. } | StoreError::TooLong { .. })) => {
            Err(HttpError::Unreachable {
                url: url.to_string(),
                what: "the body's length differs from its Content-Length",
                detail: e.to_string(),
            })
        }
        Err(e) => Err(HttpError::Store {
            url: url.to_string(),
            what: match e {
                StoreError::Quota { .. } => "its input cache is full; try again later",
                StoreError::DiskFull { .. } => "its disk is full; try another provider",
                _ => "a disk error; try another provider",
            },
            detail: e.to_string(),
        }),
    }
}

/// The full verified read of what is left of the body: it must hash to
/// `expected`. Nothing is stored.
fn hash_rest(reader: &mut ChannelReader, expected: ContentId) -> Result<ContentId, StoreError> {
    let (actual, _) =
        ContentId::of_reader(expected.codec(), &mut *reader).map_err(|e| StoreError::Io {
            path: "<http body>".into(),
            source: e,
        })?;
    if actual == expected {
        Ok(actual)
    } else {
        Err(StoreError::Mismatch { expected, actual })
    }
}

/// Sends the GET with the address policy, redirects vetted, within the
/// pace's first deadline; a success status only.
async fn get(url: &str, opts: &HttpOptions, pace: &Pace) -> Result<reqwest::Response, HttpError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| HttpError::BadUrl {
        url: url.to_string(),
        reason: "it is not a valid URL",
    })?;
    let policy = AddrPolicy::new(opts);
    policy.vet_url(&parsed).map_err(|r| refusal_error(url, r))?;
    let redirects = policy.clone();
    let client = reqwest::Client::builder()
        .no_proxy()
        // The CID is of the bytes sent, and a decoder would multiply them
        // past `max_bytes`' meaning; off even if a feature turns one on.
        .no_gzip()
        .no_brotli()
        .no_deflate()
        .no_zstd()
        .referer(false)
        .connect_timeout(opts.connect_timeout)
        .dns_resolver(VettedResolver(policy.clone()))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Refusal::TooManyRedirects);
            }
            match redirects.vet_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(r) => attempt.error(r),
            }
        }))
        .build()
        .map_err(|e| HttpError::Unreachable {
            url: url.to_string(),
            what: "this provider's HTTP client could not be set up",
            detail: chain(&e),
        })?;
    let send = client.get(parsed).send();
    let response = match pace.due(0) {
        Some((at, hard)) => match tokio::time::timeout_at(at.into(), send).await {
            Ok(r) => r,
            Err(_) => return Err(pace.expired(url, hard, 0)),
        },
        None => send.await,
    }
    .map_err(|e| request_error(url, &e))?;
    // The resolver only hands out vetted addresses; this is the check that
    // the connection really went to one.
    if let Some(remote) = response.remote_addr()
        && let Err(class) = policy.check(remote.ip())
    {
        return Err(HttpError::Refused {
            url: url.to_string(),
            class,
        });
    }
    if !response.status().is_success() {
        return Err(HttpError::Status {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    Ok(response)
}

/// Which addresses may be connected to.
#[derive(Clone, Debug)]
struct AddrPolicy {
    allow_private: bool,
    also_allow: Arc<[IpAddr]>,
}

impl AddrPolicy {
    fn new(opts: &HttpOptions) -> Self {
        Self {
            allow_private: opts.allow_private,
            also_allow: opts.also_allow.iter().copied().map(canonical).collect(),
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), AddrClass> {
        let ip = canonical(ip);
        match addr::classify(ip) {
            Some(class) if !self.allow_private && !self.also_allow.contains(&ip) => Err(class),
            _ => Ok(()),
        }
    }

    /// An http(s) URL whose host, if an IP literal, is allowed (host names
    /// are vetted when resolved).
    fn vet_url(&self, url: &reqwest::Url) -> Result<(), Refusal> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::Scheme);
        }
        let host = url.host_str().ok_or(Refusal::Scheme)?;
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) => self.check(ip).map_err(Refusal::Addr),
            Err(_) => Ok(()),
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so `also_allow` and the table see one form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why the policy stopped a request (carried through reqwest's error chain
/// and recognised in [`request_error`]).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("the address is {0} address")]
    Addr(AddrClass),
    #[error("not an http:// or https:// URL with a host")]
    Scheme,
    #[error("too many redirects")]
    TooManyRedirects,
    #[error("the host name does not resolve")]
    Unresolved(#[source] Option<io::Error>),
}

fn refusal_error(url: &str, r: Refusal) -> HttpError {
    let url = url.to_string();
    match r {
        Refusal::Addr(class) => HttpError::Refused { url, class },
        Refusal::Scheme => HttpError::BadUrl {
            url,
            reason: "only http:// and https:// URLs with a host are fetched (also after a redirect)",
        },
        Refusal::TooManyRedirects => HttpError::TooManyRedirects {
            url,
            max: MAX_REDIRECTS,
        },
        Refusal::Unresolved(source) => HttpError::Unreachable {
            url,
            what: "its host name does not resolve",
            detail: source.map_or_else(|| "no addresses".into(), |e| e.to_string()),
        },
    }
}

/// A reqwest error as the buyer may see it: the policy's refusal if one is
/// in the chain, otherwise only the kind of failure.
fn request_error(url: &str, e: &reqwest::Error) -> HttpError {
    let mut src: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            let r = match r {
                Refusal::Addr(c) => Refusal::Addr(*c),
                Refusal::Scheme => Refusal::Scheme,
                Refusal::TooManyRedirects => Refusal::TooManyRedirects,
                Refusal::Unresolved(_) => Refusal::Unresolved(Some(io::Error::other(chain(e)))),
            };
            return refusal_error(url, r);
        }
        src = s.source();
    }
    let what = if e.is_timeout() {
        "connecting to its host timed out"
    } else if e.is_connect() {
        "its host refused or dropped the connection"
    } else if e.is_redirect() {
        "a redirect could not be followed"
    } else {
        "the request failed"
    };
    HttpError::Unreachable {
        url: url.to_string(),
        what,
        detail: chain(e),
    }
}

/// An error and its sources, for the log.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// The client's resolver: the system lookup, keeping only the addresses
/// the policy allows. reqwest connects only to what this returns, so a
/// name cannot be vetted as one address and connected as another.
struct VettedResolver(AddrPolicy);

impl reqwest::dns::Resolve for VettedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Box::new(Refusal::Unresolved(Some(e))) as BoxError)?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(class) => {
                        refused.get_or_insert(class);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let r = refused.map_or(Refusal::Unresolved(None), Refusal::Addr);
                return Err(Box::new(r) as BoxError);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The time rule: the response must start within `grace`, and then `n`
/// bytes must have arrived by `grace + n / min_rate`, all before
/// `deadline`.
struct Pace {
    start: Instant,
    grace: Duration,
    min_rate: u64,
    deadline: Option<Instant>,
}

impl Pace {
    /// When more bytes must have arrived after `received`, and whether that
    /// is the hard deadline (`None`: no limit).
    fn due(&self, received: u64) -> Option<(Instant, bool)> {
        let rate = (self.min_rate > 0)
            .then(|| {
                let secs = (received as f64 / self.min_rate as f64).min(1e12);
                self.start
                    .checked_add(self.grace)?
                    .checked_add(Duration::from_secs_f64(secs))
            })
            .flatten();
        match (rate, self.deadline) {
            (Some(r), Some(d)) if d <= r => Some((d, true)),
            (Some(r), _) => Some((r, false)),
            (None, Some(d)) => Some((d, true)),
            (None, None) => None,
        }
    }

    fn expired(&self, url: &str, hard: bool, received: u64) -> HttpError {
        let secs = self.start.elapsed().as_secs();
        if hard {
            HttpError::Deadline {
                url: url.to_string(),
                secs,
                received,
            }
        } else {
            HttpError::TooSlow {
                url: url.to_string(),
                received,
                secs,
                min_rate: self.min_rate,
                grace: self.grace.as_secs(),
            }
        }
    }
}

/// Feeds `response`'s body (at most `limit` bytes, at the pace's rate) to
/// `consume`, which reads it on a blocking thread; returns what `consume`
/// returned and the body bytes received. The body stops flowing as soon as
/// `consume` stops reading; a body over the limit, too slow or broken is
/// an error whatever `consume` made of it.
async fn stream_body<T: Send + 'static>(
    url: &str,
    response: reqwest::Response,
    limit: u64,
    pace: &Pace,
    consume: impl FnOnce(&mut ChannelReader) -> T + Send + 'static,
) -> Result<(T, u64), HttpError> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let worker = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
            total: 0,
        };
        consume(&mut reader)
    });
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    let mut failed = None;
    loop {
        let next = match pace.due(received) {
            Some((at, hard)) => match tokio::time::timeout_at(at.into(), body.next()).await {
                Ok(next) => next,
                Err(_) => {
                    failed = Some(pace.expired(url, hard, received));
                    break;
                }
            },
            None => body.next().await,
        };
        match next {
            None => break,
            Some(Ok(piece)) => {
                received += piece.len() as u64;
                if received > limit {
                    failed = Some(HttpError::TooLarge {
                        url: url.to_string(),
                        limit,
                    });
                    break;
                }
                if tx.send(Ok(piece)).await.is_err() {
                    break; // the consumer is done (or failed)
                }
            }
            Some(Err(e)) => {
                failed = Some(HttpError::Unreachable {
                    url: url.to_string(),
                    what: "the transfer broke off",
                    detail: chain(&e),
                });
                break;
            }
        }
    }
    drop(body); // close the connection before waiting for the consumer
    if failed.is_some() {
        // An error, not an end of file: nothing half-read is taken as whole.
        let _ = tx.send(Err(io::Error::other("transfer aborted"))).await;
    }
    drop(tx);
    let out = worker.await.map_err(|e| HttpError::Store {
        url: url.to_string(),
        what: "an internal error",
        detail: e.to_string(),
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok((out, received)),
    }
}

/// A blocking reader over pieces sent by an async task.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// Bytes handed to the reader so far.
    total: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.total += b.len() as u64;
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
