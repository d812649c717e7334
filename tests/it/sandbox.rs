//! Hostile jobs through the real node and Docker engine: each is contained,
//! the containment is the specific one expected, and afterwards the node is
//! healthy, nothing is left behind, and an ordinary job still completes.

use std::time::Duration;

use kiln_cli::devnet::DevnetOptions;
use kiln_protocol::views::{JobState, LogsView};
use kiln_protocol::{ByteSize, Seconds};
use kiln_tests::{buyer, devnet_with, leftovers, run_job};

fn stdout_of(logs: &LogsView) -> &str {
    &logs.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_jobs_are_contained_and_the_provider_keeps_serving() {
    let dn = devnet_with(DevnetOptions {
        providers: 1,
        slots: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let coordinator_port = format!("127.0.0.1:{}", dn.coordinator.http_addr.port());
    let secret = client
        .upload(b"job-x-private-input\n".to_vec())
        .await
        .unwrap();

    // A long-running job with an input, whose host-side path another job will try to read.
    let mut victim = dn.workload_spec(&["sleep", "30"]);
    victim
        .inputs
        .push(kiln_protocol::spec::InputSpec::new(secret, "/in/secret"));
    let v = client.submit(victim, None).await.unwrap();
    let victim_id = v.job_id;
    // Job directories are per attempt: `jobs/<job id>-<offer id>`.
    let jobs_dir = dn.state_dir.join("node0/jobs");
    let attempt_input = || {
        std::fs::read_dir(&jobs_dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{victim_id}-"))
            })
            .map(|e| e.path().join("in/0"))
    };
    let found = kiln_tests::eventually(
        || async { attempt_input().filter(|p| p.exists()) },
        |p| p.is_some(),
    )
    .await;
    let there = found.is_some();
    let victim_input = found.unwrap_or_else(|| jobs_dir.join(format!("{victim_id}-?/in/0")));
    assert!(
        there,
        "the victim's input is on the host at {}",
        victim_input.display()
    );
    let victim_path = victim_input.display().to_string();

    // (case, args, memory MiB, timeout s, expected state, expected text: in stdout, or in the reason)
    type Case<'a> = (&'a str, Vec<&'a str>, u64, u64, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "net-tcp",
            vec!["net-tcp", &coordinator_port],
            64,
            30,
            "completed",
            "HOSTILE net-tcp contained",
        ),
        (
            "net-udp",
            vec!["net-udp"],
            64,
            30,
            "completed",
            "HOSTILE net-udp contained",
        ),
        (
            "dns",
            vec!["dns"],
            64,
            30,
            "completed",
            "HOSTILE dns contained",
        ),
        (
            "write-root",
            vec!["write-root"],
            64,
            30,
            "completed",
            "HOSTILE write-root contained",
        ),
        (
            "proc-root",
            vec!["proc-root"],
            64,
            30,
            "completed",
            "HOSTILE proc-root contained",
        ),
        (
            "symlink-input",
            vec!["symlink-input", "/in/secret"],
            64,
            30,
            "completed",
            "HOSTILE symlink-input contained",
        ),
        (
            "read-other",
            vec!["read-other", &victim_path],
            64,
            30,
            "completed",
            "HOSTILE read-other contained",
        ),
        (
            "fork-bomb",
            vec!["fork-bomb"],
            64,
            30,
            "completed",
            "HOSTILE fork-bomb contained",
        ),
        (
            "mount",
            vec!["mount"],
            64,
            30,
            "completed",
            "HOSTILE mount contained",
        ),
        (
            "ptrace",
            vec!["ptrace"],
            64,
            30,
            "completed",
            "HOSTILE ptrace contained",
        ),
        (
            "raw-socket",
            vec!["raw-socket"],
            64,
            30,
            "completed",
            "HOSTILE raw-socket contained",
        ),
        (
            "chown",
            vec!["chown"],
            64,
            30,
            "completed",
            "HOSTILE chown contained",
        ),
        (
            "setuid-binary",
            vec!["setuid-binary"],
            64,
            30,
            "completed",
            "HOSTILE setuid-binary contained",
        ),
        (
            "fill-out",
            vec!["fill-out", "200"],
            64,
            60,
            "completed",
            "HOSTILE fill-out contained",
        ),
        (
            "fill-tmp",
            vec!["fill-tmp", "200"],
            64,
            60,
            "completed",
            "HOSTILE fill-tmp contained",
        ),
        (
            "memory",
            vec!["memory", "1024"],
            64,
            60,
            "failed",
            "out of memory",
        ),
        (
            "sleep-forever",
            vec!["sleep-forever"],
            64,
            2,
            "timed_out",
            "wall-clock limit",
        ),
    ];
    let mut ids = Vec::new();
    for (name, args, mem, timeout, _, _) in &cases {
        let mut spec = dn.workload_spec(&[&["hostile"][..], &args[..]].concat());
        spec.resources.memory = ByteSize(mem << 20);
        spec.resources.timeout = Seconds(*timeout);
        spec.resources.pids = 64;
        if *name == "symlink-input" {
            spec.inputs
                .push(kiln_protocol::spec::InputSpec::new(secret, "/in/secret"));
        }
        let v = client
            .submit(spec, Some(format!("hostile {name}")))
            .await
            .unwrap();
        ids.push(v.job_id);
    }
    // The log flood: kept at the cap, the rest counted and reported.
    let flood = client
        .submit(dn.workload_spec(&["hostile", "flood", "16"]), None)
        .await
        .unwrap();
    let flood_id = flood.job_id;

    for ((name, _, _, _, state, text), id) in cases.iter().zip(&ids) {
        let done = kiln_cli::wait_for(&client, id, Duration::from_secs(120), |_| {})
            .await
            .unwrap();
        assert_eq!(done.state.as_str(), *state, "{name}: {done:#?}");
        let logs = client.logs(id).await.unwrap();
        let reason = done.reason.as_deref().unwrap_or("");
        assert!(
            stdout_of(&logs).contains(text) || reason.contains(text),
            "{name}: expected `{text}`; reason `{reason}`; stdout:\n{}",
            stdout_of(&logs)
        );
        assert!(
            !stdout_of(&logs).contains("BREACHED"),
            "{name} breached the sandbox:\n{}",
            stdout_of(&logs)
        );
    }
    let done = kiln_cli::wait_for(&client, &flood_id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.logs_truncated, Some(true));
    let usage = done.usage.as_ref().unwrap();
    // Every byte is counted: the 16 MiB flood plus the workload's closing verdict line.
    let emitted = usage.stdout_bytes;
    assert!(
        (16 << 20..(16 << 20) + 4096).contains(&emitted),
        "{usage:#?}"
    );
    let kept = client.logs(&flood_id).await.unwrap().stdout.len() as u64;
    assert!(
        kept <= usage.log_cap_bytes,
        "kept {kept} bytes, over the cap"
    );

    client.cancel(&victim_id).await.unwrap();
    let v = kiln_cli::wait_for(&client, &victim_id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(v.state, JobState::Cancelled, "{v:#?}");

    // The provider is healthy, clean, and still serves ordinary work.
    assert_eq!(leftovers(&dn).await.unwrap(), Vec::<String>::new());
    let ok = run_job(&client, dn.workload_spec(&["echo", "still", "serving"]))
        .await
        .unwrap();
    assert_eq!(ok.state, JobState::Completed, "{ok:#?}");
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_mixed_jobs_leave_nothing_behind() {
    let dn = devnet_with(DevnetOptions {
        providers: 2,
        slots: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let volumes_before = docker_volumes();
    let mut jobs = Vec::new();
    for i in 0..100 {
        let (args, expect): (Vec<&str>, &str) = match i % 5 {
            0 | 1 => (vec!["echo", "ok"], "completed"),
            2 => (vec!["exit", "1", "nope"], "failed"),
            3 if i % 2 == 1 => (vec!["sleep", "30"], "timed_out"),
            _ => (vec!["sleep", "30"], "cancelled"),
        };
        let mut spec = dn.workload_spec(&args);
        if expect == "timed_out" {
            spec.resources.timeout = Seconds(1);
        }
        let v = client.submit(spec, None).await.unwrap();
        jobs.push((v.job_id, expect));
    }
    // Cancel the ones meant to be cancelled: some are still queued, some running.
    for (id, expect) in &jobs {
        if *expect == "cancelled" {
            client.cancel(id).await.unwrap();
        }
    }
    for (id, expect) in &jobs {
        let done = kiln_cli::wait_for(&client, id, Duration::from_secs(300), |_| {})
            .await
            .unwrap();
        assert_eq!(done.state.as_str(), *expect, "{done:#?}");
    }
    assert_eq!(leftovers(&dn).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        docker_volumes(),
        volumes_before,
        "no Docker volume is left behind"
    );
    let acct = client.account().await.unwrap();
    assert_eq!(acct.escrowed.0, 0, "every escrow was settled: {acct:#?}");
    dn.shutdown().await;
}

/// Issue 13, finding 6: an image that declares `VOLUME /vol` (with `/vol`
/// owned by the job's user, so Docker's anonymous volume there would take
/// any amount of the provider's disk) writes into a 64 MiB tmpfs instead
/// and gets ENOSPC at that bound; `/dev/shm` stops at its 64 MiB too. Both
/// sizes are counted in the job's memory, the provider creates no Docker
/// volume, and an honest job of the same image completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_declaring_a_volume_cannot_write_past_a_bound() {
    let dn = devnet_with(DevnetOptions {
        providers: 1,
        slots: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::build_workload_variant(
        &docker,
        "COPY --chown=65534:65534 vol /vol\nVOLUME /vol\n",
        &["vol"],
    )
    .await
    .unwrap();
    let volumes_before = docker_volumes();
    let job = |args: &[&str], tmpdir: &str| {
        let mut spec = dn.workload_spec(args);
        spec.image = kiln_protocol::ImageRef(image.id.clone());
        spec.env.insert("TMPDIR".into(), tmpdir.into());
        spec
    };
    let bound = dn_default_mib(64);
    for dir in ["/vol", "/dev/shm"] {
        let done = run_job(&client, job(&["hostile", "fill-tmp", "300"], dir))
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Completed, "{dir}: {done:#?}");
        let logs = client.logs(&done.job_id).await.unwrap();
        let out = stdout_of(&logs);
        assert!(
            out.contains("HOSTILE fill-tmp contained")
                && out.contains(&format!("after {bound} bytes: ENOSPC")),
            "{dir}: 300 MiB must stop at {bound} bytes with ENOSPC:\n{out}"
        );
    }
    let ok = run_job(&client, job(&["echo", "still", "serving"], "/vol"))
        .await
        .unwrap();
    assert_eq!(ok.state, JobState::Completed, "{ok:#?}");
    assert!(stdout_of(&client.logs(&ok.job_id).await.unwrap()).contains("still serving"));
    assert_eq!(
        docker_volumes(),
        volumes_before,
        "no Docker volume was created"
    );
    assert_eq!(leftovers(&dn).await.unwrap(), Vec::<String>::new());
    dn.shutdown().await;
}

/// `n` MiB in bytes (the node's default volume and `/dev/shm` size).
fn dn_default_mib(n: u64) -> u64 {
    let d = kiln_node::runner::Limits::default();
    assert_eq!((d.volume_size_bytes, d.shm_size_bytes), (n << 20, n << 20));
    n << 20
}

fn docker_volumes() -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["volume", "ls", "-q"])
        .output()
        .expect("docker CLI");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}
