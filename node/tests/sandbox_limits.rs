//! The sandbox's bounds on what a job can fill, against the real Docker
//! engine (issue 13, finding 6): a volume the image declares, `/dev/shm`,
//! the number of output entries, and the provider's cap on `pids`. Each
//! attack is performed for real and must stop at its bound with a clear
//! reason, while an honest job on the same setup still works.
//!
//! The runner is driven directly (as `kiln-node` does for every attempt);
//! the pids cap is checked through a running node's admission, with a
//! libp2p peer playing its coordinator.

mod common;

use std::path::Path;
use std::time::Duration;

use kiln_blobs::Store;
use kiln_docker::WorkloadImage;
use kiln_net::NetEvent;
use kiln_node::runner::{Launch, Limits, Policy, RunReport, Runner};
use kiln_protocol::{
    BuyerId, ByteSize, Credits, JobId, JobOffer, JobSpec, Keypair, MilliCpu, NetRequest,
    NetResponse, OfferId, Outcome, Seconds, Signed,
};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// A `FROM scratch` workload image that declares `VOLUME /vol`, with `/vol`
/// owned by the job's user: under Docker's defaults a job writes there
/// into an anonymous volume on the provider's disk, with no bound at all.
async fn volume_image(docker: &bollard::Docker) -> WorkloadImage {
    kiln_docker::build_workload_variant(
        docker,
        "COPY --chown=65534:65534 vol /vol\nVOLUME /vol\n",
        &["vol"],
    )
    .await
    .expect("the volume image builds offline")
}

fn runner(docker: &bollard::Docker, dir: &Path, limits: Limits) -> Runner {
    let store = Store::open_dir(&dir.join("blobs"), Default::default()).expect("a blob store");
    Runner::new(
        docker.clone(),
        dir.join("jobs"),
        // One label per runner: tests run side by side in this binary, and
        // a test that lists its runner's containers must see only its own.
        format!(
            "sandbox-limits-{}-{}",
            std::process::id(),
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        limits,
        Policy::default(),
        store,
    )
}

fn spec(image: &str, args: &[&str], env: &[(&str, &str)]) -> JobSpec {
    let mut spec = JobSpec::new(image, args.iter().map(|s| s.to_string()).collect());
    spec.resources.cpus = MilliCpu(500);
    spec.resources.memory = ByteSize(64 * MIB);
    spec.resources.timeout = Seconds(60);
    spec.resources.pids = 64;
    for (k, v) in env {
        spec.env.insert(k.to_string(), v.to_string());
    }
    spec
}

async fn run(runner: &Runner, spec: &JobSpec) -> RunReport {
    let (job, offer) = (JobId::random(), OfferId::random());
    let report = runner
        .run(Launch::plain(job, offer, spec), CancellationToken::new())
        .await;
    assert_eq!(
        runner.leftovers(&job).await.expect("the engine answers"),
        Vec::<String>::new(),
        "nothing of the job is left"
    );
    report
}

fn stdout(r: &RunReport) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn volumes() -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["volume", "ls", "-q"])
        .output()
        .expect("the docker CLI");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_volume_is_a_bounded_tmpfs_and_honest_writes_fit() {
    let docker = kiln_docker::connect().await.unwrap();
    let image = volume_image(&docker).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        volume_size_bytes: 8 * MIB,
        ..Limits::default()
    };
    let runner = runner(&docker, dir.path(), limits);

    // While a job of this image runs, /vol is a tmpfs, not a Docker volume.
    let before = volumes();
    // A job that runs until it is stopped: however slowly a loaded machine
    // lists containers, it is there to be seen; it is stopped once seen.
    let stop = CancellationToken::new();
    let sleeper = {
        let (runner, spec, stop) = (
            runner.clone(),
            spec(&image.id, &["sleep", "120"], &[]),
            stop.clone(),
        );
        tokio::spawn(async move {
            runner
                .run(
                    Launch::plain(JobId::random(), OfferId::random(), &spec),
                    stop,
                )
                .await
        })
    };
    let mut inspected = None;
    // Until the container shows up (image checks and mounts take a while on
    // a loaded machine), or the job is over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline && !sleeper.is_finished() {
        if let Some(id) = runner
            .containers()
            .await
            .unwrap()
            .into_iter()
            .find_map(|c| c.id)
        {
            // Listed as soon as it is created: inspected once it runs.
            let seen = docker
                .inspect_container(
                    &id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()
                .filter(|c| c.state.as_ref().and_then(|s| s.running) == Some(true));
            if seen.is_some() {
                inspected = seen;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The job ends (and is cleaned up) before anything is asserted.
    stop.cancel();
    let slept = sleeper.await.unwrap();
    assert_eq!(slept.outcome, Outcome::Cancelled, "{slept:#?}");
    let inspected = inspected.expect("the job's container shows up");
    let mounts = inspected.mounts.unwrap_or_default();
    assert!(
        mounts.iter().all(|m| m.typ.as_deref() != Some("volume")),
        "no Docker volume is mounted: {mounts:#?}"
    );
    let tmpfs = inspected
        .host_config
        .and_then(|h| h.tmpfs)
        .unwrap_or_default();
    let vol = tmpfs.get("/vol").map(String::as_str).unwrap_or_default();
    assert!(vol.contains(&format!("size={}", 8 * MIB)), "{tmpfs:?}");
    assert_eq!(volumes(), before, "no Docker volume was created");

    // The attack: 300 MiB into the volume stops with ENOSPC at 8 MiB.
    let attack = run(
        &runner,
        &spec(
            &image.id,
            &["hostile", "fill-tmp", "300"],
            &[("TMPDIR", "/vol")],
        ),
    )
    .await;
    let out = stdout(&attack);
    assert!(
        out.contains("HOSTILE fill-tmp contained")
            && out.contains(&format!("after {} bytes: ENOSPC", 8 * MIB)),
        "{attack:#?}\n{out}"
    );
    assert_eq!(attack.outcome, Outcome::Succeeded, "{attack:#?}");

    // An honest job writes what fits. (The probe calls a write that nothing
    // stopped a breach; here that is the point: 4 MiB fit in the volume.)
    let honest = run(
        &runner,
        &spec(
            &image.id,
            &["hostile", "fill-tmp", "4"],
            &[("TMPDIR", "/vol")],
        ),
    )
    .await;
    assert!(
        stdout(&honest).contains(&format!("wrote all {} bytes to /vol/", 4 * MIB)),
        "{honest:#?}"
    );
    let echo = run(&runner, &spec(&image.id, &["echo", "volume", "ok"], &[])).await;
    assert_eq!(echo.outcome, Outcome::Succeeded, "{echo:#?}");
    assert!(stdout(&echo).contains("volume ok"), "{echo:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_lending_no_volume_space_refuses_such_images_by_name() {
    let docker = kiln_docker::connect().await.unwrap();
    let image = volume_image(&docker).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        volume_size_bytes: 0,
        ..Limits::default()
    };
    let runner = runner(&docker, dir.path(), limits);
    let r = run(&runner, &spec(&image.id, &["echo", "hi"], &[])).await;
    assert_eq!(r.outcome, Outcome::Failed);
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("declares 1 volume (/vol)") && e.contains("--volume-size"),
        "{e}"
    );
    assert_eq!(r.wall_ms, 0, "nothing ran");
    // The plain workload image declares none and runs.
    let plain = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let ok = run(&runner, &spec(&plain.id, &["echo", "hi"], &[])).await;
    assert_eq!(ok.outcome, Outcome::Succeeded, "{ok:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_shm_stops_at_its_documented_size() {
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        shm_size_bytes: 16 * MIB,
        ..Limits::default()
    };
    let runner = runner(&docker, dir.path(), limits);
    let shm = [("TMPDIR", "/dev/shm")];
    let attack = run(
        &runner,
        &spec(&image.id, &["hostile", "fill-tmp", "200"], &shm),
    )
    .await;
    let out = stdout(&attack);
    assert!(
        out.contains("HOSTILE fill-tmp contained")
            && out.contains(&format!("after {} bytes: ENOSPC", 16 * MIB)),
        "{attack:#?}\n{out}"
    );
    let honest = run(
        &runner,
        &spec(&image.id, &["hostile", "fill-tmp", "8"], &shm),
    )
    .await;
    assert!(
        stdout(&honest).contains(&format!("wrote all {} bytes to /dev/shm/", 8 * MIB)),
        "{honest:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_output_entries_fail_the_job_naming_the_limit() {
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_output_files: 2,
        ..Limits::default()
    };
    let runner = runner(&docker, dir.path(), limits);
    // x, x/y and x/y/z: three entries.
    let over = run(&runner, &spec(&image.id, &["write", "x/y/z", "10"], &[])).await;
    assert_eq!(over.outcome, Outcome::Failed, "{over:#?}");
    assert_eq!(over.exit_code, Some(0), "the job itself succeeded");
    let e = over.error.unwrap_or_default();
    assert!(
        e.contains("more than 2 entries") && e.contains("/out") && e.contains("--max-output-files"),
        "{e}"
    );
    assert!(over.manifest.entries.is_empty(), "no manifest is offered");
    let ok = run(&runner, &spec(&image.id, &["write", "x/z", "10"], &[])).await;
    assert_eq!(ok.outcome, Outcome::Succeeded, "{ok:#?}");
    assert_eq!(ok.manifest.entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_over_the_provider_cap_are_refused_at_admission() {
    let cancel = CancellationToken::new();
    let common::ScriptedCoordinator {
        key,
        net,
        addr,
        mut events,
    } = common::scripted_coordinator(&cancel).await;
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let NetEvent::Request { reply, .. } = ev {
                let _ = reply.send(NetResponse::Accepted);
            }
        }
    });
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = kiln_node::NodeConfig::new(addr, state.path().to_path_buf());
    config.startup_benchmark = false;
    config.heartbeat = Duration::from_secs(1);
    config.limits.max_pids = 512;
    let node = kiln_node::start(config, cancel.child_token())
        .await
        .unwrap();
    let provider = node.provider;
    let addrs = node.listen_addrs.clone();
    let offer = |pids: u32| {
        let mut spec = spec(&image.id, &["echo", "hi"], &[]);
        spec.resources.pids = pids;
        JobOffer {
            offer_id: OfferId::random(),
            job_id: JobId::random(),
            provider,
            owner: BuyerId::new(Keypair::generate().public()),
            spec,
            price_per_hour: Credits(1),
            sources: Vec::new(),
        }
    };
    let send = |o: JobOffer| {
        let (net, addrs) = (net.clone(), addrs.clone());
        let signed = Signed::sign(&key, o, 30).unwrap();
        async move { common::request_new_node(&net, provider, addrs, NetRequest::Offer(signed)).await }
    };
    let answer = send(offer(513)).await;
    assert!(
        matches!(&answer, NetResponse::Rejected { reason }
            if reason.contains("513 processes") && reason.contains("cap of 512") && reason.contains("--max-pids")),
        "{answer:?}"
    );
    let answer = send(offer(512)).await;
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");
    node.shutdown().await;
    cancel.cancel();
}
