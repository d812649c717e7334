//! Reading an image's size from its registry before the engine pulls it.
//!
//! The engine downloads layers as soon as it is asked to pull, so the
//! provider's size limit has to be checked first, from the registry's own
//! manifest: fetched by the digest the job names (whose bytes must hash to
//! it, so the registry cannot understate), an index resolved to this
//! machine's platform, then config and layer sizes summed. Anonymous
//! bearer tokens are fetched as registries ask (`WWW-Authenticate`), as
//! `docker pull` does for public images. Loopback registries are spoken to
//! over plain HTTP, as the engine does; every other over HTTPS.

use std::time::Duration;

use kiln_protocol::{ImageRef, OciDigest};
use serde::Deserialize;
use sha2::Digest;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest read (real ones are a few KiB).
const MAX_MANIFEST: usize = 4 << 20;

#[derive(Deserialize)]
struct Described {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<kiln_protocol::OciPlatform>,
}

#[derive(Deserialize)]
struct ManifestOrIndex {
    #[serde(default)]
    config: Option<Described>,
    #[serde(default)]
    layers: Vec<Described>,
    #[serde(default)]
    manifests: Option<Vec<Described>>,
}

/// Whether `host` is this machine (spoken to over HTTP).
pub(crate) fn is_loopback(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    name == "localhost"
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn base_url(host: &str) -> String {
    match host {
        "docker.io" => "https://registry-1.docker.io".to_string(),
        h if is_loopback(h) => format!("http://{h}"),
        h => format!("https://{h}"),
    }
}

/// Total bytes of the image `image` (`name@sha256:…`) for this platform:
/// config plus layers, as its registry's manifest states them.
pub(crate) async fn image_size(image: &ImageRef, timeout: Duration) -> Result<u64, String> {
    let host = image
        .registry_host()
        .ok_or_else(|| format!("image {image} does not name a registry"))?;
    let repo = image
        .repository()
        .ok_or_else(|| format!("image {image} does not name a repository"))?;
    let digest: OciDigest = image
        .digest()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| format!("image {image} is not pinned by a sha256 digest"))?;
    let http = reqwest::Client::builder()
        .timeout(timeout.min(Duration::from_secs(60)))
        .build()
        .map_err(|e| format!("cannot start an HTTP client: {e}"))?;
    let reg = Registry {
        http,
        base: base_url(host),
        host,
        repo,
        token: None,
    };
    let mut reg = reg;
    let top = reg.manifest(&digest).await?;
    let doc: ManifestOrIndex = serde_json::from_slice(&top).map_err(|e| {
        format!("registry {host} sent a manifest for {image} that is not JSON: {e}")
    })?;
    let doc = match doc.manifests {
        Some(list) => {
            let arch = super::images::engine_arch();
            let pick = list
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or_else(|| format!("image {image} has no linux/{arch} variant"))?;
            let d: OciDigest = pick.digest.parse().map_err(|e| {
                format!("registry {host} lists a malformed digest for {image}: {e}")
            })?;
            let bytes = reg.manifest(&d).await?;
            serde_json::from_slice::<ManifestOrIndex>(&bytes).map_err(|e| {
                format!("registry {host} sent a manifest for {image} that is not JSON: {e}")
            })?
        }
        None => doc,
    };
    let config = doc
        .config
        .ok_or_else(|| format!("registry {host}: the manifest of {image} names no config"))?;
    // Declared by whoever pushed it: summed without wrapping.
    Ok(doc
        .layers
        .iter()
        .fold(config.size, |t, l| t.saturating_add(l.size)))
}

/// The body of `resp`, refused past `max` bytes however it is sent
/// (chunked bodies have no length up front).
async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("{what} is larger than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("{what} broke off: {e}"))?
    {
        if out.len() + chunk.len() > max {
            return Err(format!("{what} is larger than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

struct Registry<'a> {
    http: reqwest::Client,
    base: String,
    host: &'a str,
    repo: String,
    token: Option<String>,
}

impl Registry<'_> {
    /// The manifest `digest`, its bytes checked against it.
    async fn manifest(&mut self, digest: &OciDigest) -> Result<Vec<u8>, String> {
        let url = format!("{}/v2/{}/manifests/{digest}", self.base, self.repo);
        let mut resp = self.get(&url).await?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            self.token = Some(self.anonymous_token(&challenge).await?);
            resp = self.get(&url).await?;
        }
        let host = self.host;
        match resp.status() {
            s if s.is_success() => {}
            reqwest::StatusCode::NOT_FOUND => {
                return Err(format!(
                    "registry {host} has no manifest {digest} in {}: check the image reference",
                    self.repo
                ));
            }
            s => {
                return Err(format!(
                    "registry {host} answered {s} for {} {digest}",
                    self.repo
                ));
            }
        }
        let bytes = read_capped(
            resp,
            MAX_MANIFEST,
            &format!("registry {host}'s manifest {digest}"),
        )
        .await?;
        let got = OciDigest(sha2::Sha256::digest(&bytes).into());
        if got != *digest {
            return Err(format!(
                "registry {host} served a manifest hashing to {got} when asked for {digest}: refusing it"
            ));
        }
        Ok(bytes)
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, String> {
        let mut req = self.http.get(url).header(reqwest::header::ACCEPT, ACCEPT);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("registry {} did not answer in time: {e}", self.host)
            } else {
                format!("registry {} is unreachable: {e}", self.host)
            }
        })
    }

    /// A token from the realm a `Bearer` challenge names.
    async fn anonymous_token(&self, challenge: &str) -> Result<String, String> {
        let params = parse_challenge(challenge).ok_or_else(|| {
            format!(
                "registry {} asks for credentials ({challenge}); only public images can be pulled",
                self.host
            )
        })?;
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("registry {}: its challenge names no realm", self.host))?;
        // The token service must be HTTPS (or this machine, for a loopback
        // registry): a registry cannot point the node at plain-HTTP or
        // internal addresses of its choosing.
        let realm_url = reqwest::Url::parse(&realm).map_err(|e| {
            format!(
                "registry {}: its token realm {realm} is not a URL: {e}",
                self.host
            )
        })?;
        let local = realm_url.host_str().is_some_and(is_loopback) && is_loopback(self.host);
        if realm_url.scheme() != "https" && !local {
            return Err(format!(
                "registry {} names a token service that is not HTTPS ({realm}); refusing it",
                self.host
            ));
        }
        let query: Vec<(String, String)> =
            params.into_iter().filter(|(k, _)| k != "realm").collect();
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let url = reqwest::Url::parse_with_params(&realm, &query).map_err(|e| {
            format!(
                "registry {}: its token realm {realm} is not a URL: {e}",
                self.host
            )
        })?;
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("registry {}: cannot get a pull token: {e}", self.host))?;
        let body = read_capped(
            resp,
            64 << 10,
            &format!("registry {}'s token answer", self.host),
        )
        .await?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| format!("registry {}: its token answer is not JSON: {e}", self.host))?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| format!("registry {}: its token answer holds no token", self.host))
    }
}

/// Whether `host` speaks the registry API (`GET /v2/` answers 200 or
/// 401, as the distribution spec says).
pub(crate) async fn probe(host: &str) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("cannot start an HTTP client: {e}"))?;
    let url = format!("{}/v2/", base_url(host));
    match http.get(&url).send().await {
        Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::UNAUTHORIZED => {
            Ok(())
        }
        Ok(r) => Err(format!("registry {host} answered {} at {url}", r.status())),
        Err(e) => Err(format!("registry {host} is unreachable at {url}: {e}")),
    }
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters.
fn parse_challenge(h: &str) -> Option<Vec<(String, String)>> {
    let rest = h.trim().strip_prefix("Bearer ")?;
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let (v, tail) = after.split_once('"')?;
        out.push((
            k.trim().trim_start_matches(',').trim().to_string(),
            v.to_string(),
        ));
        s = tail.trim_start_matches(',').trim();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_and_urls() {
        for (host, url) in [
            ("127.0.0.1:5000", "http://127.0.0.1:5000"),
            ("localhost:5000", "http://localhost:5000"),
            ("localhost", "http://localhost"),
            ("ghcr.io", "https://ghcr.io"),
            ("docker.io", "https://registry-1.docker.io"),
            ("127.example.com", "https://127.example.com"),
        ] {
            assert_eq!(base_url(host), url, "{host}");
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.docker.io/token".into())
        );
        assert_eq!(
            p[2],
            ("scope".into(), "repository:library/busybox:pull".into())
        );
        assert!(parse_challenge("Basic realm=\"x\"").is_none());
    }
}
