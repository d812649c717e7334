//! Kiln's GPU workload image (`kiln image gpu-workload`): `kiln-node gemm`
//! with the libraries it links, `FROM scratch`, built here with no registry.
//! On this machine (no GPU) it must start under the full job sandbox (the
//! loader and every library are in the image, it runs as nobody on a
//! read-only root with no network) and fail the way a buyer can act on:
//! exit code 2, naming `gpus = 1`. The GPU path itself runs on the lent
//! H100 (node/bench/docker-on-device).

use std::path::Path;

use kiln_blobs::Store;
use kiln_node::runner::{Launch, Limits, Policy, Runner};
use kiln_protocol::{ByteSize, JobId, JobSpec, MilliCpu, OfferId, Outcome, Seconds};
use tokio_util::sync::CancellationToken;

fn runner(docker: &bollard::Docker, dir: &Path) -> Runner {
    let store = Store::open_dir(&dir.join("blobs"), Default::default()).expect("a blob store");
    Runner::new(
        docker.clone(),
        dir.join("jobs"),
        format!("gpu-workload-{}", std::process::id()),
        Limits::default(),
        Policy::default(),
        store,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_image_runs_in_the_sandbox_and_without_a_gpu_says_what_to_ask_for() {
    let docker = kiln_docker::connect().await.expect("a Docker engine");
    let bin = Path::new(env!("CARGO_BIN_EXE_kiln-node"));
    let img = kiln_docker::build_gpu_workload_image(&docker, bin)
        .await
        .expect("the GPU image builds offline");
    assert!(img.tag.starts_with("kiln-gpu-workload:"), "{}", img.tag);
    // Built again from the same binary: the same image, reused.
    let again = kiln_docker::build_gpu_workload_image(&docker, bin)
        .await
        .unwrap();
    assert_eq!(again.id, img.id);

    let dir = tempfile::tempdir().unwrap();
    let runner = runner(&docker, dir.path());
    let mut spec = JobSpec::new(&img.id, vec!["64".into(), "1".into()]);
    spec.resources.cpus = MilliCpu(1000);
    spec.resources.memory = ByteSize(512 << 20);
    spec.resources.timeout = Seconds(60);
    let job = JobId::random();
    let report = runner
        .run(
            Launch::plain(job, OfferId::random(), &spec),
            CancellationToken::new(),
        )
        .await;
    let stderr = String::from_utf8_lossy(&report.stderr);
    assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
    assert_eq!(report.exit_code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no CUDA driver") && stderr.contains("gpus = 1"),
        "the job says what to ask for: {stderr}"
    );
    assert!(report.manifest.entries.iter().all(|e| e.path != "gemm.txt"));
    assert_eq!(runner.leftovers(&job).await.unwrap(), Vec::<String>::new());

    // A bad size is refused before anything touches a GPU.
    let mut spec = spec.clone();
    spec.command = vec!["8".into(), "1".into()];
    let report = runner
        .run(
            Launch::plain(JobId::random(), OfferId::random(), &spec),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(report.exit_code, Some(2));
    assert!(String::from_utf8_lossy(&report.stderr).contains("n must be between 16"));
}
