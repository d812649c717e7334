//! The data-plane benchmark (`kiln bench data`), all on this machine:
//!
//! * (a) verification: streaming bao verification of a blob (what a
//!   receiver does to every byte) against plain `blake3` hashing of the same
//!   bytes, both on one thread; plus outboard creation (what an import does);
//! * (b) one-peer fetch over loopback (TCP + Noise + yamux) into a store,
//!   against a plain libp2p stream of the same swarm setup sending the same
//!   bytes unverified (one stream, and four in parallel as the fetcher uses);
//! * (c) the same fetch from three peers;
//! * (d) if `nginx` and `curl` are installed: `curl` downloading the same
//!   file from a loopback nginx, and Kiln's own HTTP source from it.
//!
//! Every peer runs in this process, so sender and receiver share the cores.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kiln_net::{Client, NetConfig, Peer as PeerId};
use kiln_protocol::ContentId;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::fetch::{FetchOptions, Source, fetch};
use crate::store::{Store, StoreConfig};
use crate::{BLOCK_SIZE, wire};

/// The raw baseline's stream protocol.
pub const RAW_PROTOCOL: &str = "/kiln/bench/raw/1";
/// The file-to-file baseline's stream protocol.
pub const RAW_FILE_PROTOCOL: &str = "/kiln/bench/rawfile/1";

const MIB: f64 = 1024.0 * 1024.0;

/// Everything the benchmark measured. Throughputs in MiB/s (best of `runs`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub size_bytes: u64,
    pub cpus: usize,
    pub runs: usize,
    pub blake3_mib_s: f64,
    /// Kiln's receiver path (`codec::Decoder`) over the whole encoding.
    pub bao_verify_mib_s: f64,
    /// bao_verify / blake3 (goal ≥ 0.8).
    pub verify_ratio: f64,
    /// bao-tree's own `DecodeResponseIter`, for reference.
    pub bao_tree_decode_mib_s: f64,
    pub outboard_mib_s: f64,
    pub raw_stream_mib_s: f64,
    pub raw_4_streams_mib_s: f64,
    /// One raw stream whose sender reads the blob's file and whose receiver
    /// writes a file (the disk I/O a fetch also does, no verification).
    pub raw_file_to_file_mib_s: f64,
    /// fetch_1_peer / raw_file_to_file.
    pub fetch_1_ratio_vs_file_to_file: f64,
    /// Providers re-verify each group they serve (the default).
    pub fetch_1_peer_mib_s: f64,
    /// fetch_1_peer / raw_stream, best against best (goal ≥ 0.9).
    pub fetch_1_ratio: f64,
    /// Median over runs of fetch / raw measured back to back.
    pub fetch_1_ratio_median: f64,
    /// Providers trust their store (`ServeConfig { validate: false }`).
    pub fetch_1_peer_trusting_mib_s: f64,
    pub fetch_1_trusting_ratio: f64,
    pub fetch_1_trusting_ratio_median: f64,
    pub fetch_1_ratio_vs_4_streams: f64,
    /// Network bytes per blob byte − 1 (proofs and headers), in percent.
    pub fetch_wire_overhead_pct: f64,
    pub fetch_3_peers_mib_s: f64,
    pub fetch_3_ratio: f64,
    /// Share of the bytes each of the three peers served.
    pub fetch_3_shares: Vec<f64>,
    pub curl_nginx_mib_s: Option<f64>,
    pub kiln_http_nginx_mib_s: Option<f64>,
    pub notes: Vec<String>,
}

/// Settings of [`run`].
#[derive(Clone, Debug)]
pub struct Options {
    pub runs: usize,
    /// fsync the fetched blob before it becomes visible (as a real store
    /// does); off measures the protocol without the disk's sync speed.
    pub sync: bool,
    /// The fetcher's settings.
    pub fetch: FetchOptions,
    /// Run only the one-peer Kiln fetch (for profiling).
    pub only_fetch: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            sync: false,
            fetch: FetchOptions::default(),
            only_fetch: false,
        }
    }
}

/// Runs the benchmark with a blob of `size` bytes, using `out_dir` for the
/// stores and the nginx files; writes `data.json` and `data.md` there.
pub async fn run(size: u64, out_dir: &Path) -> Result<Report, BenchError> {
    run_with(size, out_dir, &Options::default()).await
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("data benchmark failed: {0}")]
pub struct BenchError(pub String);

type Error = BenchError;

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64().max(1e-9)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// See [`run`].
pub async fn run_with(size: u64, out_dir: &Path, opts: &Options) -> Result<Report, BenchError> {
    let runs = opts.runs.max(1);
    std::fs::create_dir_all(out_dir).map_err(err)?;
    // nginx wants absolute paths.
    let out_dir = &std::fs::canonicalize(out_dir).map_err(err)?;
    let work = out_dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(err)?;
    let mut r = Report {
        size_bytes: size,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        runs,
        ..Report::default()
    };

    // Pseudo-random, incompressible bytes.
    let data = {
        let mut v = vec![0u8; size as usize];
        blake3::Hasher::new()
            .update(b"kiln bench data")
            .finalize_xof()
            .fill(&mut v);
        Arc::new(v)
    };
    let cid = ContentId::of_bytes(&data);

    // (a) Verification against raw hashing, one thread each.
    let (a, ob_speed) = if opts.only_fetch {
        ((1.0, 1.0, 1.0), 1.0)
    } else {
        let data = data.clone();
        tokio::task::spawn_blocking(move || verify_figures(&data, runs))
            .await
            .map_err(err)??
    };
    r.blake3_mib_s = a.0;
    r.bao_verify_mib_s = a.1;
    r.verify_ratio = a.1 / a.0;
    r.bao_tree_decode_mib_s = a.2;
    r.outboard_mib_s = ob_speed;

    // Providers: one store imported, two more by hard links.
    let provider_dirs: Vec<PathBuf> = (0..3).map(|i| work.join(format!("provider{i}"))).collect();
    let no_sync = StoreConfig {
        quota: None,
        no_sync: true,
        evict: Default::default(),
    };
    let first = Store::open_dir(&provider_dirs[0], no_sync.clone()).map_err(err)?;
    {
        let (first, data) = (first.clone(), data.clone());
        tokio::task::spawn_blocking(move || first.import_bytes(&data))
            .await
            .map_err(err)?
            .map_err(err)?;
    }
    let mut stores = vec![first];
    for dir in &provider_dirs[1..] {
        std::fs::create_dir_all(dir.join("data")).map_err(err)?;
        for name in [cid.to_string(), format!("{cid}.obao4")] {
            std::fs::hard_link(
                provider_dirs[0].join("data").join(&name),
                dir.join("data").join(&name),
            )
            .map_err(err)?;
        }
        stores.push(Store::open_dir(dir, no_sync.clone()).map_err(err)?);
    }
    let cancel = CancellationToken::new();
    let _stop = StopOnDrop(cancel.clone());
    let mut providers = Vec::new();
    for s in &stores {
        let c = spawn_peer(&cancel).await?;
        tokio::spawn(wire::serve(s.clone(), c.clone(), cancel.clone()));
        providers.push(c);
    }
    tokio::spawn(raw_serve(
        providers[0].clone(),
        data.clone(),
        cancel.clone(),
    ));
    tokio::spawn(raw_file_serve(
        providers[0].clone(),
        stores[0].path(&cid).ok_or_else(|| err("blob missing"))?,
        cancel.clone(),
    ));
    // The same blob from a provider that does not re-verify what it serves.
    let trusting = spawn_peer(&cancel).await?;
    tokio::spawn(wire::serve_with(
        stores[0].clone(),
        trusting.clone(),
        cancel.clone(),
        wire::ServeConfig {
            validate: false,
            authorize: None,
        },
    ));
    let me = spawn_peer(&cancel).await?;
    let recv = Store::open_dir(
        &work.join("receiver"),
        StoreConfig {
            quota: None,
            no_sync: !opts.sync,
            evict: Default::default(),
        },
    )
    .map_err(err)?;
    let source = |c: &Client| Source {
        peer: c.local_peer_id(),
        addrs: c.listen_addrs().to_vec(),
    };
    for p in [&providers[0], &trusting] {
        me.dial(p.listen_addrs()[0].clone()).await.map_err(err)?;
    }

    // (b) One peer: raw stream(s) and Kiln, interleaved.
    let (mut raw1, mut raw4, mut kiln1) = (Vec::new(), Vec::new(), Vec::new());
    let mut rawf = Vec::new();
    let (mut trust1, mut ratios, mut trust_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut overhead = 0.0;
    for _ in 0..runs {
        if !opts.only_fetch {
            let cpu = cpu_secs();
            raw1.push(raw_fetch(&me, providers[0].local_peer_id(), 1, size).await?);
            tracing::info!(
                mib_s = raw1[raw1.len() - 1],
                cpu = cpu_secs() - cpu,
                "raw, 1 stream"
            );
            raw4.push(raw_fetch(&me, providers[0].local_peer_id(), 4, size).await?);
            let dest = work.join("raw-received");
            rawf.push(raw_file_fetch(&me, providers[0].local_peer_id(), size, &dest).await?);
            let _ = std::fs::remove_file(&dest);
        }
        let t = Instant::now();
        let cpu = cpu_secs();
        let rep = fetch(
            &recv,
            &me,
            cid,
            Some(size),
            vec![source(&providers[0])],
            &opts.fetch,
        )
        .await
        .map_err(err)?;
        kiln1.push(mib_s(size, t.elapsed()));
        tracing::info!(
            wall = t.elapsed().as_secs_f64(),
            cpu = cpu_secs() - cpu,
            "kiln fetch, 1 peer"
        );
        overhead = (rep.bytes_transferred as f64 / size as f64 - 1.0) * 100.0;
        recv.remove(&cid).map_err(err)?;
        let t = Instant::now();
        fetch(
            &recv,
            &me,
            cid,
            Some(size),
            vec![source(&trusting)],
            &opts.fetch,
        )
        .await
        .map_err(err)?;
        trust1.push(mib_s(size, t.elapsed()));
        recv.remove(&cid).map_err(err)?;
        if let Some(raw) = raw1.last() {
            ratios.push(kiln1[kiln1.len() - 1] / raw);
            trust_ratios.push(trust1[trust1.len() - 1] / raw);
        }
    }
    r.raw_stream_mib_s = best(&raw1);
    r.raw_4_streams_mib_s = best(&raw4);
    r.fetch_1_peer_mib_s = best(&kiln1);
    r.fetch_1_ratio = r.fetch_1_peer_mib_s / r.raw_stream_mib_s;
    r.fetch_1_ratio_vs_4_streams = r.fetch_1_peer_mib_s / r.raw_4_streams_mib_s;
    r.raw_file_to_file_mib_s = best(&rawf);
    r.fetch_1_ratio_vs_file_to_file = r.fetch_1_peer_mib_s / r.raw_file_to_file_mib_s;
    r.fetch_1_ratio_median = median(&mut ratios);
    r.fetch_1_peer_trusting_mib_s = best(&trust1);
    r.fetch_1_trusting_ratio = r.fetch_1_peer_trusting_mib_s / r.raw_stream_mib_s;
    r.fetch_1_trusting_ratio_median = median(&mut trust_ratios);
    r.fetch_wire_overhead_pct = overhead;

    // (c) Three peers.
    let mut kiln3 = Vec::new();
    for _ in 0..if opts.only_fetch { 0 } else { runs } {
        let t = Instant::now();
        let rep = fetch(
            &recv,
            &me,
            cid,
            Some(size),
            providers.iter().map(source).collect(),
            &opts.fetch,
        )
        .await
        .map_err(err)?;
        kiln3.push(mib_s(size, t.elapsed()));
        r.fetch_3_shares = providers
            .iter()
            .map(|p| {
                rep.per_peer
                    .get(&p.local_peer_id())
                    .map_or(0.0, |s| s.data_bytes as f64 / size as f64)
            })
            .collect();
        recv.remove(&cid).map_err(err)?;
    }
    r.fetch_3_peers_mib_s = best(&kiln3);
    r.fetch_3_ratio = r.fetch_3_peers_mib_s / r.raw_stream_mib_s;

    // (d) nginx + curl, and Kiln's HTTP source from the same server.
    if opts.only_fetch {
        return Ok(r);
    }
    match nginx_figures(&work, &stores[0], &cid, &recv, size, runs).await {
        Ok((curl, kiln_http)) => {
            r.curl_nginx_mib_s = Some(curl);
            r.kiln_http_nginx_mib_s = Some(kiln_http);
        }
        Err(e) => r.notes.push(format!("nginx/curl comparison skipped: {e}")),
    }
    r.notes.push(format!(
        "{} CPUs; all peers in one process (sender and receiver share the cores); \
         receiver store fsync {}",
        r.cpus,
        if opts.sync { "on" } else { "off" },
    ));
    cancel.cancel();
    let _ = std::fs::remove_dir_all(&work);
    std::fs::write(
        out_dir.join("data.json"),
        serde_json::to_string_pretty(&r).map_err(err)?,
    )
    .map_err(err)?;
    std::fs::write(out_dir.join("data.md"), markdown(&r)).map_err(err)?;
    Ok(r)
}

struct StopOnDrop(CancellationToken);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// ((blake3 MiB/s, bao verify MiB/s), outboard MiB/s), best of `runs`.
/// ((blake3, Kiln decoder, bao-tree decoder), outboard), MiB/s, best of `runs`.
#[allow(clippy::type_complexity)]
fn verify_figures(data: &[u8], runs: usize) -> Result<((f64, f64, f64), f64), BenchError> {
    use bao_tree::io::outboard::PostOrderMemOutboard;
    use bao_tree::io::sync::{DecodeResponseIter, encode_ranges_validated};
    let size = data.len() as u64;
    let mut ob_runs = Vec::new();
    let mut ob = None;
    for _ in 0..runs {
        let t = Instant::now();
        ob = Some(PostOrderMemOutboard::create(data, BLOCK_SIZE));
        ob_runs.push(mib_s(size, t.elapsed()));
    }
    let ob = ob.ok_or_else(|| err("no runs"))?;
    let mut enc = Vec::with_capacity(size as usize + ob.data.len() + 64);
    let all = crate::all_chunks(size);
    encode_ranges_validated(data, &ob, &all, &mut enc).map_err(err)?;
    let root = ob.root;
    let (mut raw, mut ver, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let h = blake3::hash(data);
        raw.push(mib_s(size, t.elapsed()));
        if h != root {
            return Err(err("outboard root differs from blake3"));
        }
        // What a receiver does: check every parent pair and every 16 KiB
        // group of the encoding against the root, in order, as the fetcher
        // does (256 KiB at a time).
        let t = Instant::now();
        let mut n = 0u64;
        let mut dec = crate::codec::Decoder::new(root, crate::tree(size), &all);
        let mut at = 0;
        while !dec.is_done() {
            let end = (at + 256 * 1024).max(at + dec.need()).min(enc.len());
            let used = dec
                .feed(&enc[at..end], |v| {
                    if let crate::codec::Verified::Leaf(_, d) = v {
                        n += d.len() as u64;
                    }
                    Ok::<(), ()>(())
                })
                .map_err(|()| err("sink"))?
                .map_err(|e| err(format!("{e:?}")))?;
            at += used;
        }
        ver.push(mib_s(size, t.elapsed()));
        if n != size {
            return Err(err("verification did not cover the blob"));
        }
        let t = Instant::now();
        let mut n = 0u64;
        for item in DecodeResponseIter::new(root, crate::tree(size), &enc[..], &all) {
            if let bao_tree::io::BaoContentItem::Leaf(l) = item.map_err(err)? {
                n += l.data.len() as u64;
            }
        }
        reference.push(mib_s(size, t.elapsed()));
        if n != size {
            return Err(err("verification did not cover the blob"));
        }
    }
    Ok(((best(&raw), best(&ver), best(&reference)), best(&ob_runs)))
}

async fn spawn_peer(cancel: &CancellationToken) -> Result<Client, BenchError> {
    let key = kiln_protocol::Keypair::generate().to_libp2p();
    let (client, mut events, ev) = kiln_net::spawn(key, NetConfig::default(), cancel.child_token())
        .await
        .map_err(err)?;
    tokio::spawn(ev.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Ok(client)
}

/// The baseline: a plain libp2p stream of the same swarm setup, the same
/// bytes from memory, no framing, no verification. A request is one u64:
/// the byte offset; the length is one `1/n`-th of the blob.
async fn raw_serve(client: Client, data: Arc<Vec<u8>>, cancel: CancellationToken) {
    let Ok(mut incoming) = client.accept_streams(RAW_PROTOCOL) else {
        return;
    };
    loop {
        let (_, mut s) = tokio::select! {
            () = cancel.cancelled() => return,
            Some(x) = incoming.next() => x,
        };
        let data = data.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 16];
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            let start = u64::from_be_bytes(req[..8].try_into().unwrap_or_default()) as usize;
            let len = u64::from_be_bytes(req[8..].try_into().unwrap_or_default()) as usize;
            let end = start.saturating_add(len).min(data.len());
            for piece in data[start.min(end)..end].chunks(1 << 20) {
                if s.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = s.close().await;
        });
    }
}

/// The file baseline: the same plain stream, the bytes read from the blob's
/// file as they are sent.
async fn raw_file_serve(client: Client, path: PathBuf, cancel: CancellationToken) {
    let Ok(mut incoming) = client.accept_streams(RAW_FILE_PROTOCOL) else {
        return;
    };
    loop {
        let (_, mut s) = tokio::select! {
            () = cancel.cancelled() => return,
            Some(x) = incoming.next() => x,
        };
        let path = path.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1];
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            let Ok(f) = std::fs::File::open(&path) else {
                return;
            };
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            loop {
                let n = match std::os::unix::fs::FileExt::read_at(&f, &mut buf, at) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                at += n as u64;
            }
            let _ = s.close().await;
        });
    }
}

/// Receives the file baseline into `dest`; MiB/s.
async fn raw_file_fetch(
    me: &Client,
    peer: PeerId,
    size: u64,
    dest: &Path,
) -> Result<f64, BenchError> {
    let t = Instant::now();
    let mut attempt = 0;
    let got = loop {
        attempt += 1;
        let res = async {
            let mut s = me
                .open_stream(peer, Vec::new(), RAW_FILE_PROTOCOL)
                .await
                .map_err(|e| (0, err(e)))?;
            s.write_all(&[1]).await.map_err(|e| (0, err(e)))?;
            s.flush().await.map_err(|e| (0, err(e)))?;
            let f = std::fs::File::create(dest).map_err(|e| (0, err(e)))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                let k = s.read(&mut buf).await.map_err(|e| (got, err(e)))?;
                if k == 0 {
                    break;
                }
                std::os::unix::fs::FileExt::write_all_at(&f, &buf[..k], got)
                    .map_err(|e| (got, err(e)))?;
                got += k as u64;
            }
            Ok::<u64, (u64, Error)>(got)
        }
        .await;
        match res {
            Ok(got) => break got,
            Err((0, _)) if attempt < 5 => tokio::time::sleep(Duration::from_millis(10)).await,
            Err((_, e)) => return Err(e),
        }
    };
    if got != size {
        return Err(err(format!("file stream delivered {got} of {size} bytes")));
    }
    Ok(mib_s(size, t.elapsed()))
}

/// CPU seconds used by this process so far (Linux; 0 elsewhere).
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let k: f64 = f.get(12)?.parse().ok()?;
            Some((u + k) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Receives the blob over `n` parallel raw streams; MiB/s.
async fn raw_fetch(me: &Client, peer: PeerId, n: u64, size: u64) -> Result<f64, BenchError> {
    let t = Instant::now();
    let part = size.div_ceil(n);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let me = me.clone();
        tasks.spawn(async move {
            // libp2p-stream drops inbound streams that arrive faster than
            // the acceptor takes them: retry a stream that got no byte.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match raw_part(&me, peer, i * part, part).await {
                    Ok(got) => return Ok::<u64, Error>(got),
                    Err((0, _)) if attempt < 5 => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((_, e)) => return Err(e),
                }
            }
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.map_err(err)??;
    }
    if total != size {
        return Err(err(format!("raw stream delivered {total} of {size} bytes")));
    }
    Ok(mib_s(size, t.elapsed()))
}

async fn raw_part(me: &Client, peer: PeerId, start: u64, len: u64) -> Result<u64, (u64, Error)> {
    let mut s = me
        .open_stream(peer, Vec::new(), RAW_PROTOCOL)
        .await
        .map_err(|e| (0, err(e)))?;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&start.to_be_bytes());
    req[8..].copy_from_slice(&len.to_be_bytes());
    s.write_all(&req).await.map_err(|e| (0, err(e)))?;
    s.flush().await.map_err(|e| (0, err(e)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let k = s.read(&mut buf).await.map_err(|e| (got, err(e)))?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    Ok(got)
}

/// Serves the blob's file with nginx on loopback; (curl MiB/s, Kiln HTTP
/// source MiB/s), best of `runs`.
async fn nginx_figures(
    work: &Path,
    provider: &Store,
    cid: &ContentId,
    recv: &Store,
    size: u64,
    runs: usize,
) -> Result<(f64, f64), BenchError> {
    let nginx = which("nginx").ok_or_else(|| err("nginx is not installed"))?;
    let curl = which("curl").ok_or_else(|| err("curl is not installed"))?;
    let www = work.join("www");
    std::fs::create_dir_all(&www).map_err(err)?;
    let src = provider.path(cid).ok_or_else(|| err("blob missing"))?;
    std::fs::hard_link(&src, www.join("blob.bin")).map_err(err)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
        l.local_addr().map_err(err)?.port()
    };
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "{user}worker_processes 1;\ndaemon off;\npid {w}/nginx.pid;\nerror_log {w}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
               client_body_temp_path {w}/body;\n  proxy_temp_path {w}/proxy;\n\
               fastcgi_temp_path {w}/fcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
               server {{ listen 127.0.0.1:{port}; root {www}; }}\n}}\n",
            user = if root_user { "user root root;\n" } else { "" },
            w = work.display(),
            www = www.display(),
        ),
    )
    .map_err(err)?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err)?;
    /// Stops nginx as its docs say (SIGTERM to the master, which stops its
    /// workers), then reaps it.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let stopped = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                let _ = self.0.kill();
            }
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let url = format!("http://127.0.0.1:{port}/blob.bin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(err("nginx did not start (see work/error.log)"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut c, mut k) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let out = Command::new(&curl)
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{time_total}",
            ])
            .arg(&url)
            .output()
            .map_err(err)?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = text.split_whitespace();
        let got: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        if got != size || secs <= 0.0 {
            return Err(err(format!("curl got {got} of {size} bytes: {text}")));
        }
        c.push(size as f64 / MIB / secs);
        let t = Instant::now();
        // The benchmark's nginx is on loopback, which nodes refuse by default.
        let opts = crate::http::HttpOptions {
            allow_private: true,
            ..Default::default()
        };
        crate::http::fetch_url_with(recv, &url, *cid, &opts)
            .await
            .map_err(err)?;
        k.push(mib_s(size, t.elapsed()));
        recv.remove(cid).map_err(err)?;
    }
    drop(child);
    Ok((best(&c), best(&k)))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The report as a Markdown table.
pub fn markdown(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
    let mut s = format!(
        "# kiln bench data — {:.0} MiB blob, best of {} runs, {} CPUs\n\n\
         | measurement | MiB/s | ratio | goal |\n|---|---:|---:|---:|\n\
         | blake3 hash (1 thread) | {:.0} | | |\n\
         | bao verification of the stream (1 thread, Kiln's decoder) | {:.0} | {:.2} vs blake3 | ≥ 0.8 |\n\
         | bao verification (bao-tree's DecodeResponseIter, reference) | {:.0} | {:.2} vs blake3 | |\n\
         | outboard creation (import) | {:.0} | | |\n\
         | raw libp2p stream, 1 stream | {:.0} | | |\n\
         | raw libp2p streams, 4 in parallel | {:.0} | | |\n\
         | raw libp2p stream, file → file (no verification) | {:.0} | | |\n\
         | Kiln fetch, 1 peer (provider re-verifies, default) | {:.0} | {:.2} vs 1 stream (median {:.2}), {:.2} vs 4, {:.2} vs file → file | ≥ 0.9 |\n\
         | Kiln fetch, 1 peer (provider trusts its store) | {:.0} | {:.2} vs 1 stream (median {:.2}) | ≥ 0.9 |\n\
         | Kiln fetch, 3 peers | {:.0} | {:.2} vs 1 stream | |\n\
         | curl from nginx (loopback) | {} | | |\n\
         | Kiln HTTP source from nginx (verified) | {} | | |\n\n\
         Proof and header overhead on the wire: {:.2}%. 3-peer shares: {}.\n\n",
        r.size_bytes as f64 / MIB,
        r.runs,
        r.cpus,
        r.blake3_mib_s,
        r.bao_verify_mib_s,
        r.verify_ratio,
        r.bao_tree_decode_mib_s,
        r.bao_tree_decode_mib_s / r.blake3_mib_s,
        r.outboard_mib_s,
        r.raw_stream_mib_s,
        r.raw_4_streams_mib_s,
        r.raw_file_to_file_mib_s,
        r.fetch_1_peer_mib_s,
        r.fetch_1_ratio,
        r.fetch_1_ratio_median,
        r.fetch_1_ratio_vs_4_streams,
        r.fetch_1_ratio_vs_file_to_file,
        r.fetch_1_peer_trusting_mib_s,
        r.fetch_1_trusting_ratio,
        r.fetch_1_trusting_ratio_median,
        r.fetch_3_peers_mib_s,
        r.fetch_3_ratio,
        opt(r.curl_nginx_mib_s),
        opt(r.kiln_http_nginx_mib_s),
        r.fetch_wire_overhead_pct,
        r.fetch_3_shares
            .iter()
            .map(|x| format!("{:.0}%", x * 100.0))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    for n in &r.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s
}
