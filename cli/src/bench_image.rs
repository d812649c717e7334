//! `kiln bench image`: how fast a job starts from an image it has to
//! fetch, against `docker pull` + `docker run` of the same image, in one
//! run on one machine (issue 14's benchmark).
//!
//! The image is the workload binary plus `layers` layers of random bytes
//! (`size` in all: incompressible, so neither side gains from
//! compression). It is pushed twice: with `kiln image push` to a devnet's
//! coordinator, and to a real registry on loopback (Debian's
//! `docker-registry`). Three seed providers run a job with it (so they
//! hold its blobs); then every copy is removed from the engine, and:
//!
//! * **Kiln cold**: a fresh provider runs a job naming `kiln:<cid>`,
//!   fetching the blobs from the coordinator and the three seeds at once,
//!   verifying them, and loading the image into the engine.
//! * **Docker cold**: the engine pulls `name@sha256:…` from the loopback
//!   registry, then runs the same command in a container.
//! * **Warm**: the same job again (image cached), against `docker run` of
//!   the present image.
//!
//! Kiln's figure is the provider's: from the coordinator dispatching the
//! job to its verified result (the job's `dispatched` → `completed`
//! events, both on the coordinator's clock), so it includes the offer, the
//! fetch, the load, the sandboxed run, the receipt and the result upload.
//! The end-to-end figure (submission to completion, with the scheduler's
//! tick and this client's polling) is reported beside it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use kiln_protocol::views::{JobState, JobView};
use kiln_protocol::{ImageRef, JobSpec, Seconds};
use serde::Serialize;

use crate::devnet::{Devnet, DevnetOptions};
use crate::registry::LoopbackRegistry;

/// The report (`image-bench.json` and `.md` in the output directory).
#[derive(Clone, Debug, Serialize)]
pub struct ImageBenchReport {
    pub cpus: usize,
    pub image_bytes: u64,
    pub layers: usize,
    pub seed_peers: usize,
    /// `kiln image push` of the whole image to the coordinator.
    pub push_s: f64,
    /// Dispatch → completed on a fresh provider (the image fetched from
    /// the coordinator and the peers, verified, loaded, run).
    pub kiln_cold_s: f64,
    /// Submission → completed, as the buyer sees it.
    pub kiln_cold_end_to_end_s: f64,
    /// `docker pull name@sha256:…` from the loopback registry.
    pub docker_pull_s: f64,
    /// `docker run` after the pull.
    pub docker_run_after_pull_s: f64,
    /// Pull + run.
    pub docker_cold_s: f64,
    /// kiln_cold_s / docker_cold_s (goal ≤ 1.0).
    pub cold_ratio: f64,
    /// Kiln cold again on the same provider once the engine forgot the
    /// image but the blobs are in the provider's cache: the engine's
    /// unpacking alone, without the network fetch.
    pub kiln_cold_blobs_cached_s: f64,
    /// The same job again on the same provider (image cached).
    pub kiln_warm_s: f64,
    pub kiln_warm_end_to_end_s: f64,
    /// `docker run` of the present image.
    pub docker_run_s: f64,
    /// kiln_warm_s / docker_run_s (goal ≤ 1.1).
    pub warm_ratio: f64,
}

/// `size` seeded pseudo-random bytes (xorshift): incompressible, so no
/// transfer gains from compression; for benchmarks and tests.
pub fn pseudo_random(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = vec![0u8; size];
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    data
}

fn random_layer(path: &str, size: usize, seed: u64) -> anyhow::Result<Vec<u8>> {
    Ok(kiln_docker::layer_tar(&[(
        path,
        0o444,
        &pseudo_random(size, seed),
    )])?)
}

/// Seconds from the first event entering `from` to the one entering `to`.
fn between(job: &JobView, from: JobState, to: JobState) -> anyhow::Result<f64> {
    let at = |s: JobState| {
        job.events
            .iter()
            .find(|e| e.state == s)
            .map(|e| e.at.0)
            .with_context(|| format!("job {} has no {s} event", job.job_id))
    };
    Ok((at(to)?.saturating_sub(at(from)?)) as f64 / 1000.0)
}

async fn run_kiln(client: &crate::Client, spec: JobSpec) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let v = client.submit(spec, None).await?;
    let done = crate::wait_for(client, &v.job_id, Duration::from_secs(900), |_| {}).await?;
    let e2e = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        done.state == JobState::Completed,
        "the benchmark job {} ended {}: {}",
        done.job_id,
        done.state,
        done.reason.unwrap_or_default()
    );
    Ok((
        between(&done, JobState::Dispatched, JobState::Completed)?,
        e2e,
    ))
}

/// `docker run --rm <image> echo hi`, timed.
async fn docker_run(docker: &bollard::Docker, image: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let body = bollard::models::ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["echo".into(), "hi".into()]),
        ..Default::default()
    };
    let c = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .context("docker create")?;
    docker
        .start_container(
            &c.id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .context("docker start")?;
    let code = kiln_docker::wait_exit_code(docker, &c.id).await?;
    let secs = t.elapsed().as_secs_f64();
    let opts = bollard::query_parameters::RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    let _ = docker.remove_container(&c.id, Some(opts)).await;
    anyhow::ensure!(code == 0, "the baseline container exited {code}");
    Ok(secs)
}

async fn remove_image(docker: &bollard::Docker, reference: &str) {
    let opts = bollard::query_parameters::RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    let _ = docker.remove_image(reference, Some(opts), None).await;
}

/// Removes every tag the devnet's nodes put on images, so the engine
/// forgets the image (the nodes' blob caches keep its bytes).
async fn forget_everywhere(docker: &bollard::Docker, image_id: &str) -> anyhow::Result<()> {
    let images = docker
        .list_images(None::<bollard::query_parameters::ListImagesOptions>)
        .await?;
    for i in images.into_iter().filter(|i| i.id == image_id) {
        for t in i.repo_tags.iter().chain(&i.repo_digests) {
            remove_image(docker, t).await;
        }
    }
    remove_image(docker, image_id).await;
    anyhow::ensure!(
        kiln_docker::image_exists(docker, image_id).await?.is_none(),
        "image {image_id} is still in the engine; is a container using it?"
    );
    Ok(())
}

/// Runs the benchmark with an image of `size` bytes in `layers` layers.
pub async fn run(size: u64, layers: usize, out: &Path) -> anyhow::Result<ImageBenchReport> {
    let layers = layers.max(1);
    let registry = LoopbackRegistry::start().await?;
    let mut dn = Devnet::start(DevnetOptions {
        providers: 0,
        http_port: 0,
        heartbeat: Duration::from_secs(1),
        ..DevnetOptions::default()
    })
    .await?;
    let r = bench(&mut dn, &registry, size, layers).await;
    dn.shutdown().await;
    let r = r?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("image-bench.json"), serde_json::to_vec_pretty(&r)?)?;
    std::fs::write(out.join("image-bench.md"), markdown(&r))?;
    Ok(r)
}

async fn bench(
    dn: &mut Devnet,
    registry: &LoopbackRegistry,
    size: u64,
    layers: usize,
) -> anyhow::Result<ImageBenchReport> {
    let docker = kiln_docker::connect().await?;
    let nonce = u64::from_le_bytes(
        kiln_protocol::Keypair::generate().public().as_bytes()[..8]
            .try_into()
            .unwrap_or([7; 8]),
    );
    // The image, built on "the buyer's side".
    let each = usize::try_from(size / layers as u64).context("layer size")?;
    let mut parts = vec![kiln_docker::workload_layer()?];
    for i in 0..layers {
        parts.push(random_layer(&format!("data{i}"), each, nonce ^ i as u64)?);
    }
    let tag = format!("kiln-bench-image:{nonce:016x}");
    let image_id = kiln_docker::load_layers(&docker, &tag, &parts, &tag).await?;
    let image_bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
    drop(parts);

    // Kiln's copy.
    let client = crate::Client::new(&dn.url(), kiln_protocol::Keypair::generate());
    let t = Instant::now();
    let pushed = crate::image::push(&client, &tag, false).await?;
    let push_s = t.elapsed().as_secs_f64();
    // The registry's copy.
    let repo = format!("{}/kiln-bench-image", registry.host);
    let rtag = format!("{nonce:016x}");
    docker
        .tag_image(
            &tag,
            Some(bollard::query_parameters::TagImageOptions {
                repo: Some(repo.clone()),
                tag: Some(rtag.clone()),
            }),
        )
        .await?;
    let mut push = docker.push_image(
        &repo,
        Some(bollard::query_parameters::PushImageOptions {
            tag: Some(rtag.clone()),
            ..Default::default()
        }),
        None,
    );
    while let Some(r) = push.next().await {
        if let Some(e) = r?.error_detail.and_then(|d| d.message) {
            anyhow::bail!("pushing to the loopback registry: {e}");
        }
    }
    let digest = docker
        .inspect_image(&format!("{repo}:{rtag}"))
        .await?
        .repo_digests
        .unwrap_or_default()
        .into_iter()
        .find_map(|d| d.strip_prefix(&format!("{repo}@")).map(str::to_string))
        .context("the registry push left no digest")?;
    let by_digest = format!("{repo}@{digest}");

    // Three seeds hold the blobs.
    let mut spec = dn.workload_spec(&["echo", "hi"]);
    spec.image = ImageRef(pushed.image.clone());
    spec.resources.timeout = Seconds(600);
    let seeds = 3;
    for i in 0..seeds {
        let region = format!("seed-{i}");
        let r = region.clone();
        dn.add_node(move |c| c.region = Some(r)).await?;
        dn.wait_for_providers(dn.nodes.len(), Duration::from_secs(30))
            .await?;
        let mut s = spec.clone();
        s.resources.region = Some(region);
        run_kiln(&client, s).await?;
    }
    forget_everywhere(&docker, &image_id).await?;

    // Kiln cold, on a fresh provider.
    dn.add_node(|c| c.region = Some("fresh".into())).await?;
    dn.wait_for_providers(dn.nodes.len(), Duration::from_secs(30))
        .await?;
    // Its advert must have reached the scheduler with the seeds' caches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fresh = spec.clone();
    fresh.resources.region = Some("fresh".into());
    let (kiln_cold_s, kiln_cold_end_to_end_s) = run_kiln(&client, fresh.clone()).await?;
    let (kiln_warm_s, kiln_warm_end_to_end_s) = run_kiln(&client, fresh.clone()).await?;
    forget_everywhere(&docker, &image_id).await?;
    let (kiln_cold_blobs_cached_s, _) = run_kiln(&client, fresh).await?;

    // Docker cold: pull by digest, then run.
    forget_everywhere(&docker, &image_id).await?;
    let t = Instant::now();
    let mut pull = docker.create_image(
        Some(bollard::query_parameters::CreateImageOptions {
            from_image: Some(by_digest.clone()),
            ..Default::default()
        }),
        None,
        None,
    );
    while let Some(r) = pull.next().await {
        if let Some(e) = r?.error_detail.and_then(|d| d.message) {
            anyhow::bail!("docker pull {by_digest}: {e}");
        }
    }
    let docker_pull_s = t.elapsed().as_secs_f64();
    let docker_run_after_pull_s = docker_run(&docker, &by_digest).await?;
    let docker_run_s = docker_run(&docker, &by_digest).await?;
    forget_everywhere(&docker, &image_id).await?;

    let docker_cold_s = docker_pull_s + docker_run_after_pull_s;
    Ok(ImageBenchReport {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        image_bytes,
        layers: layers + 1,
        seed_peers: seeds,
        push_s,
        kiln_cold_s,
        kiln_cold_end_to_end_s,
        docker_pull_s,
        docker_run_after_pull_s,
        docker_cold_s,
        cold_ratio: kiln_cold_s / docker_cold_s,
        kiln_cold_blobs_cached_s,
        kiln_warm_s,
        kiln_warm_end_to_end_s,
        docker_run_s,
        warm_ratio: kiln_warm_s / docker_run_s,
    })
}

/// The report as a markdown table.
pub fn markdown(r: &ImageBenchReport) -> String {
    format!(
        "# Image start benchmark\n\n\
         {} MiB image in {} layers, {} seed peers, {} CPUs.\n\n\
         | | Kiln | Docker | ratio |\n|---|---|---|---|\n\
         | cold start | {:.2} s (fetch from coordinator + peers, verify, load, run) | {:.2} s (pull {:.2} s + run {:.2} s) | {:.2}x (goal <= 1.0) |\n\
         | warm start | {:.2} s | {:.2} s (`docker run`) | {:.2}x (goal <= 1.1) |\n\n\
         Kiln figures are dispatch -> completed on the coordinator's clock; \
         end to end (submission -> completed as the buyer polls): cold {:.2} s, warm {:.2} s. \
         Cold with the blobs already in the provider's cache (the engine's unpacking alone): {:.2} s. \
         `kiln image push` took {:.2} s.\n",
        r.image_bytes >> 20,
        r.layers,
        r.seed_peers,
        r.cpus,
        r.kiln_cold_s,
        r.docker_cold_s,
        r.docker_pull_s,
        r.docker_run_after_pull_s,
        r.cold_ratio,
        r.kiln_warm_s,
        r.docker_run_s,
        r.warm_ratio,
        r.kiln_cold_end_to_end_s,
        r.kiln_warm_end_to_end_s,
        r.kiln_cold_blobs_cached_s,
        r.push_s,
    )
}
