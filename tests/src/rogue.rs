//! What a provider acting in bad faith does about money: advertise a price,
//! keep heartbeating, and sign receipts and usage reports claiming any
//! wall time it likes (see `tests/it/billing.rs`); and about hardware:
//! advertise a GPU with any speed and answer its benchmark challenges,
//! computing them in full on this CPU, or only the sampled elements, which
//! now fails (see `tests/it/audit.rs`).

use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_net::Addr;
use kiln_protocol::bench::{
    Digest32, GemmEngine, Inputs, MatmulProof, OutputTree, Precision, ProvenReport, Sample,
    SampleSlices, Slice, committed_positions, element_offset, f32_to_bf16_exact, f32_to_f16_exact,
    output_len, prove_samples, read_from, slice_len,
};
use kiln_protocol::{
    BENCHMARK_VERSION, BenchmarkReport, ByteSize, CapabilityAdvert, Challenge, ChallengeResponse,
    ChallengeSizes, CpuBench, Credits, GpuBench, GpuInfo, JobOffer, JobResult, Keypair, NetRequest,
    NetResponse, Nonce, ProviderId, Signed, UnixMillis, UsageReport,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::RogueProvider;

/// The GPU a rogue provider advertises: its claimed dense matmul figures,
/// GFLOP/s in BF16, FP16 and FP32 order (0: not claimed), and the matrix
/// size it says it measured them at.
#[derive(Clone, Copy, Debug)]
struct GpuClaim {
    gflops: [u64; 3],
    matmul_n: u32,
}

impl GpuClaim {
    const CPU_MATMUL_N: u32 = 16;
    const CPU_MFLOPS: u64 = 1_000;

    fn claimed(&self) -> impl Iterator<Item = Precision> + '_ {
        Precision::GPU
            .into_iter()
            .zip(self.gflops)
            .filter(|(_, g)| *g > 0)
            .map(|(p, _)| p)
    }
}

/// How a rogue answers a benchmark challenge. Either way every sampled
/// element is right and every figure it reports is its claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChallengeAnswer {
    /// Computes each product in full, on this CPU, and commits to it:
    /// honest, and as slow as a CPU is.
    Computed,
    /// Computes only the sampled elements: quick whatever the size, and
    /// what passed as a fast GPU while samples were drawn from the nonce
    /// alone. Now the positions follow the checksum of the whole output,
    /// so it makes one up, samples where that says, and makes up the
    /// inclusion proofs too (it has no output they could be slices of).
    SampledOnly,
}

/// One output element as the GPU format would hold it: rounded to `f32`,
/// then truncated to the precision's width (within the verifier's
/// tolerance), as little-endian bytes.
fn output(p: Precision, exact: f64) -> Vec<u8> {
    let v = exact as f32;
    match p {
        Precision::Bf16 => {
            let t = f32::from_bits(v.to_bits() & 0xFFFF_0000);
            f32_to_bf16_exact(t).unwrap_or(0).to_le_bytes().to_vec()
        }
        // Outside FP16's normal range (tiny values): zero, within tolerance.
        Precision::Fp16 => f32_to_f16_exact(f32::from_bits(v.to_bits() & 0xFFFF_E000))
            .unwrap_or(0)
            .to_le_bytes()
            .to_vec(),
        Precision::Fp32 => v.to_le_bytes().to_vec(),
        Precision::Fp64 => exact.to_le_bytes().to_vec(),
    }
}

/// The value an element's bytes hold.
fn value_of(p: Precision, bytes: &[u8]) -> f64 {
    kiln_protocol::bench::element_value(p, bytes).unwrap_or(f64::NAN)
}

/// The whole `n × n` product of `p` for `nonce`, computed exactly in
/// integers, in its output format: what an honest answer commits to.
fn computed_output(nonce: &Nonce, p: Precision, n: u32) -> Vec<u8> {
    let inputs = Inputs::new(nonce, p, n);
    let scale = 2f64.powi(-2 * p.frac_bits() as i32);
    let nn = n as usize;
    let a: Vec<i64> = (0..(nn * nn) as u64)
        .map(|i| i64::from(inputs.element(false, i)))
        .collect();
    let b: Vec<i64> = (0..(nn * nn) as u64)
        .map(|i| i64::from(inputs.element(true, i)))
        .collect();
    let mut c = vec![0i64; nn * nn];
    for i in 0..nn {
        let row = &mut c[i * nn..(i + 1) * nn];
        for k in 0..nn {
            let aik = a[i * nn + k];
            for (x, bkj) in row.iter_mut().zip(&b[k * nn..(k + 1) * nn]) {
                *x += aik * bkj;
            }
        }
    }
    c.iter()
        .flat_map(|x| output(p, *x as f64 * scale))
        .collect()
}

/// The proof of one product at `n`, and its slices, computed as `how` says.
fn prove(
    nonce: &Nonce,
    p: Precision,
    n: u32,
    samples: u32,
    how: ChallengeAnswer,
) -> (MatmulProof, Vec<Slice>) {
    let (checksum, samples, slices) = match how {
        ChallengeAnswer::Computed => {
            let out = computed_output(nonce, p, n);
            let read = read_from(&out);
            let tree = OutputTree::build(out.len() as u64, 2, &read);
            let (samples, slices) = prove_samples(nonce, p, n, samples, &tree, &read);
            (tree.root(), samples, slices)
        }
        ChallengeAnswer::SampledOnly => {
            let checksum = Digest32::of_bytes(b"not computed");
            let inputs = Inputs::new(nonce, p, n);
            let len = output_len(p, n);
            let (samples, slices) = committed_positions(nonce, &checksum, n, samples)
                .into_iter()
                .map(|(r, c)| {
                    // The right element in its chunk of an otherwise zero
                    // output, under zero hashes: the best it can do.
                    let bytes = output(p, inputs.exact(r, c).value());
                    let at = element_offset(p, n, r, c);
                    let chunk = at / 1024;
                    let mut slice = vec![0u8; slice_len(len, chunk).unwrap_or(0)];
                    let chunk_len = (len - chunk * 1024).min(1024) as usize;
                    let within = slice.len() - chunk_len + (at % 1024) as usize;
                    slice[within..within + bytes.len()].copy_from_slice(&bytes);
                    (Sample::new(r, c, value_of(p, &bytes)), Slice(slice))
                })
                .unzip();
            (checksum, samples, slices)
        }
    };
    let proof = MatmulProof {
        precision: p,
        iterations: 1,
        checksum,
        samples,
    };
    (proof, slices)
}

/// The CPU part of a report and its slices (exact: its digest is checked
/// in full, so even a rogue computes it).
fn cpu_bench(nonce: &Nonce, n: u32, samples: u32) -> (CpuBench, Vec<Slice>) {
    let (proof, slices) = prove(
        nonce,
        Precision::Fp64,
        n,
        samples,
        ChallengeAnswer::Computed,
    );
    let bench = CpuBench {
        model: "test".into(),
        threads: 4,
        matmul_n: n,
        matmul_mflops: GpuClaim::CPU_MFLOPS,
        mem_bandwidth_mbps: 1_000,
        checksum: proof.checksum,
        samples: proof.samples,
    };
    (bench, slices)
}

/// A report for `nonce` at `sizes` claiming `claim`, with proofs computed
/// as `how` says, and their slices.
fn report(
    nonce: Nonce,
    uuid: &str,
    claim: &GpuClaim,
    sizes: &ChallengeSizes,
    how: ChallengeAnswer,
) -> ProvenReport {
    let n = sizes.gpu_matmul_n;
    let (cpu, cpu_slices) = cpu_bench(&nonce, sizes.cpu_matmul_n, sizes.samples);
    let (proofs, slices): (Vec<MatmulProof>, Vec<Vec<Slice>>) = claim
        .claimed()
        .map(|p| prove(&nonce, p, n, sizes.samples, how))
        .unzip();
    ProvenReport {
        report: BenchmarkReport {
            version: BENCHMARK_VERSION,
            nonce,
            samples: sizes.samples,
            cpu,
            gpus: vec![GpuBench {
                index: 0,
                uuid: uuid.into(),
                name: RogueProvider::GPU_NAME.into(),
                engine: GemmEngine::Cublas,
                matmul_n: n,
                bf16_gflops: claim.gflops[0],
                fp16_gflops: claim.gflops[1],
                fp32_gflops: claim.gflops[2],
                copy_bytes: sizes.copy_bytes,
                d2d_mbps: 0,
                h2d_pinned_mbps: 0,
                d2h_pinned_mbps: 0,
                proofs,
            }],
            measured_at: UnixMillis::now(),
        },
        slices: SampleSlices {
            cpu: cpu_slices,
            gpus: vec![slices],
        },
    }
}

/// A cloneable way to send requests as a rogue provider, from another task.
#[derive(Clone)]
pub struct RogueSender {
    net: kiln_net::Client,
    coordinator: kiln_net::Peer,
    addr: Addr,
}

impl RogueSender {
    pub async fn send(&self, req: NetRequest) -> anyhow::Result<NetResponse> {
        Ok(self
            .net
            .request(self.coordinator, vec![self.addr.clone()], req)
            .await?)
    }
}

impl RogueProvider {
    /// [`RogueProvider::join`], then re-registers advertising
    /// `price_per_cpu_hour` (and the same per GPU).
    pub async fn join_priced(
        addr: &Addr,
        cancel: &CancellationToken,
        price_per_cpu_hour: Credits,
    ) -> anyhow::Result<Self> {
        let me = Self::join(addr, cancel).await?;
        match me
            .send(NetRequest::Register(me.priced_advert(price_per_cpu_hour)?))
            .await?
        {
            NetResponse::Accepted => Ok(me),
            other => anyhow::bail!("registration refused: {other:?}"),
        }
    }

    /// A freshly signed advert at `price` per CPU (and GPU) hour.
    pub fn priced_advert(&self, price: Credits) -> anyhow::Result<Signed<CapabilityAdvert>> {
        let mut a = self.advert()?.payload;
        a.price_per_cpu_hour = price;
        a.price_per_gpu_hour = price;
        Ok(Signed::sign(&self.key, a, 3600)?)
    }

    /// A sender for requests from other tasks.
    pub fn sender(&self) -> RogueSender {
        RogueSender {
            net: self.net.clone(),
            coordinator: self.coordinator,
            addr: self.coordinator_addr.clone(),
        }
    }

    /// Re-registers every `every` until `cancel`, as a live node's
    /// heartbeat would: to the coordinator it is alive and well.
    pub fn keep_registered(
        &self,
        price: Credits,
        every: Duration,
        cancel: &CancellationToken,
    ) -> JoinHandle<()> {
        let sender = self.sender();
        let advert = self.priced_advert(price).map(|a| a.payload);
        let key = self.key.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(mut advert) = advert else { return };
            loop {
                advert.issued_at = kiln_protocol::UnixMillis::now();
                if let Ok(s) = Signed::sign(&key, advert.clone(), 3600) {
                    let _ = sender.send(NetRequest::Register(s)).await;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }

    /// Sends a result the way a node does: again while the coordinator
    /// answers `Retry` (e.g. it has not yet recorded the start the offer's
    /// acceptance told it about), for up to 30 s. Returns the last answer.
    pub async fn deliver(&self, result: JobResult) -> anyhow::Result<NetResponse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .send(NetRequest::Result(Box::new(result.clone())))
                .await?;
            if !matches!(r, NetResponse::Retry { .. }) || tokio::time::Instant::now() > deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`RogueProvider::result_for`], its receipt claiming `wall_ms` of run time.
    pub fn result_claiming(
        offer: &JobOffer,
        signer: &Keypair,
        wall_ms: u64,
    ) -> anyhow::Result<JobResult> {
        let mut r = Self::result_for(offer, signer)?;
        let mut receipt = r.receipt.payload.clone();
        receipt.usage.wall_ms = wall_ms;
        r.receipt = Signed::sign(signer, receipt, 600)?;
        Ok(r)
    }

    /// A signed usage report for `offer` claiming `wall_ms` so far.
    pub fn usage_report(
        offer: &JobOffer,
        signer: &Keypair,
        provider: ProviderId,
        interval: u64,
        wall_ms: u64,
    ) -> anyhow::Result<Signed<UsageReport>> {
        Ok(Signed::sign(
            signer,
            UsageReport {
                job_id: offer.job_id,
                offer_id: offer.offer_id,
                provider,
                interval,
                wall_ms,
            },
            600,
        )?)
    }
}

impl RogueProvider {
    /// The model name of the GPU a rogue advertises.
    pub const GPU_NAME: &'static str = "Kiln Test GPU";

    /// The UUID of the GPU this rogue advertises.
    pub fn gpu_uuid(&self) -> String {
        format!("GPU-rogue-{}", self.id)
    }

    /// An advert with one 80 GiB GPU claiming `gflops` (dense matmul,
    /// GFLOP/s in BF16, FP16, FP32 order; 0: not claimed), measured at
    /// `matmul_n`, at `price` per GPU (and CPU) hour.
    pub fn gpu_advert(
        &self,
        gflops: [u64; 3],
        matmul_n: u32,
        price: Credits,
    ) -> anyhow::Result<Signed<CapabilityAdvert>> {
        let claim = GpuClaim { gflops, matmul_n };
        let mut a = self.priced_advert(price)?.payload;
        a.gpus = vec![GpuInfo {
            index: 0,
            uuid: self.gpu_uuid(),
            name: Self::GPU_NAME.into(),
            memory_total: ByteSize(80 << 30),
            compute_capability: (9, 0),
            driver_version: "rogue".into(),
            mig: None,
        }];
        let sizes = ChallengeSizes {
            gpu_matmul_n: claim.matmul_n,
            cpu_matmul_n: GpuClaim::CPU_MATMUL_N,
            samples: 4,
            copy_bytes: 1 << 20,
        };
        // An advert's figures are its word: nothing in them is checked.
        a.benchmark = Some(
            report(
                Nonce::random(),
                &self.gpu_uuid(),
                &claim,
                &sizes,
                ChallengeAnswer::SampledOnly,
            )
            .report,
        );
        a.issued_at = UnixMillis::now();
        Ok(Signed::sign(&self.key, a, 3600)?)
    }

    /// [`RogueProvider::join`], then registers [`Self::gpu_advert`].
    pub async fn join_gpu(
        addr: &Addr,
        cancel: &CancellationToken,
        gflops: [u64; 3],
        matmul_n: u32,
        price: Credits,
    ) -> anyhow::Result<Self> {
        let me = Self::join(addr, cancel).await?;
        match me
            .send(NetRequest::Register(
                me.gpu_advert(gflops, matmul_n, price)?,
            ))
            .await?
        {
            NetResponse::Accepted => Ok(me),
            other => anyhow::bail!("registration refused: {other:?}"),
        }
    }

    /// Re-registers `advert` (freshly dated and signed) every `every`
    /// until `cancel`, as a live node's heartbeat would.
    pub fn keep_advert_registered(
        &self,
        advert: CapabilityAdvert,
        every: Duration,
        cancel: &CancellationToken,
    ) -> JoinHandle<()> {
        let sender = self.sender();
        let key = self.key.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut advert = advert;
            loop {
                advert.issued_at = UnixMillis::now();
                if let Ok(s) = Signed::sign(&key, advert.clone(), 3600) {
                    let _ = sender.send(NetRequest::Register(s)).await;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }

    /// Waits for the next benchmark challenge and answers it with every
    /// sampled element right and `gflops` (its claim) as its figures,
    /// whatever it did: with `in_full` it computes each product in full on
    /// this CPU and commits to it (honest, and as slow as a CPU is);
    /// without, only the sampled elements, under a made-up checksum and
    /// made-up inclusion proofs (quick at any size, and rejected).
    /// Returns the challenge and how long computing the answer took here.
    pub async fn answer_challenge(
        &mut self,
        gflops: [u64; 3],
        in_full: bool,
    ) -> anyhow::Result<(Challenge, Duration)> {
        let how = if in_full {
            ChallengeAnswer::Computed
        } else {
            ChallengeAnswer::SampledOnly
        };
        let (signed, reply) = self
            .next_request("challenge", |req| match req {
                NetRequest::Challenge(c) => Ok(c),
                other => Err(other),
            })
            .await?;
        let ch = signed.payload.clone();
        let claim = GpuClaim {
            gflops,
            matmul_n: ch.sizes.gpu_matmul_n,
        };
        let (uuid, c) = (self.gpu_uuid(), ch.clone());
        let started = Instant::now();
        let report =
            tokio::task::spawn_blocking(move || report(c.nonce, &uuid, &claim, &c.sizes, how))
                .await
                .context("computing the answer")?;
        let took = started.elapsed();
        let response = ChallengeResponse {
            challenge_id: ch.challenge_id,
            provider: self.id,
            report,
            finished_at: UnixMillis::now(),
        };
        let _ = reply.send(NetResponse::ChallengeResponse(Signed::sign(
            &self.key, response, 600,
        )?));
        Ok((ch, took))
    }
}
