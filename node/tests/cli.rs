//! `kiln-node benchmark` and `kiln-node doctor`, run as the real binary on
//! this machine (no GPU needed: without NVML they report CPU figures and a
//! warning with its fix).

use std::process::Command;

use kiln_protocol::Nonce;
use kiln_protocol::bench::{Inputs, Precision, committed_positions, cpu_output_digest};

fn node() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-node"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn benchmark_json_reports_proven_cpu_figures() {
    let state = tempfile::tempdir().unwrap();
    let nonce = "0123456789abcdef0123456789abcdef";
    let out = node()
        .args([
            "benchmark",
            "--json",
            "--cpu-size",
            "96",
            "--size",
            "256",
            "--nonce",
            nonce,
        ])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"));
    let nvml = kiln_node::gpu::discover().nvml_present();
    if !nvml {
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
    let report = &v["report"];
    assert_eq!(report["version"], kiln_protocol::BENCHMARK_VERSION);
    assert_eq!(report["nonce"], nonce);
    let cpu = &report["cpu"];
    assert!(cpu["matmul_mflops"].as_u64().unwrap() > 0, "{cpu}");
    assert!(cpu["mem_bandwidth_mbps"].as_u64().unwrap() > 0, "{cpu}");
    assert!(cpu["threads"].as_u64().unwrap() >= 1);
    assert_eq!(cpu["matmul_n"], 96);
    // The checksum is the exact recomputation from the nonce.
    let n: Nonce = nonce.parse().unwrap();
    assert_eq!(
        cpu["checksum"].as_str().unwrap(),
        cpu_output_digest(&n, 96).to_string()
    );
    let samples = cpu["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 16);
    let inputs = Inputs::new(&n, Precision::Fp64, 96);
    let positions = committed_positions(&n, &cpu_output_digest(&n, 96), 96, 16);
    for (s, (r, c)) in samples.iter().zip(positions) {
        assert_eq!(
            (s["row"].as_u64(), s["col"].as_u64()),
            (Some(r.into()), Some(c.into()))
        );
        let value = f64::from_bits(s["value_bits"].as_u64().unwrap());
        assert_eq!(value, inputs.exact(r, c).value());
    }
    if !nvml {
        assert_eq!(report["gpus"].as_array().unwrap().len(), 0);
        let notes = v["notes"].to_string();
        assert!(notes.contains("NVML"), "{notes}");
    }
    // Cached for `kiln-node run`.
    let cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("benchmark.json")).unwrap())
            .unwrap();
    assert_eq!(cache["report"], *report);

    // The human form too.
    let out = node()
        .args(["benchmark", "--cpu-size", "32", "--no-gpu"])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FP64 matmul"));
}

#[test]
fn doctor_json_reports_checks_and_the_documented_exit_code() {
    let state = tempfile::tempdir().unwrap();
    let out = node()
        .args(["doctor", "--json"])
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("KILN_COORDINATOR_ADDR")
        .env_remove("KILN_COORDINATOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"));
    let checks = v["checks"].as_array().unwrap();
    let find = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {v}"))
    };
    for c in checks {
        let status = c["status"].as_str().unwrap();
        assert!(["ok", "warn", "fail", "skip"].contains(&status), "{c}");
        if status == "warn" || status == "fail" {
            assert!(!c["fix"].as_str().unwrap_or("").is_empty(), "no fix: {c}");
        }
    }
    // The documented exit code: 1 any fail, else 2 any warn, else 0.
    let any = |s: &str| checks.iter().any(|c| c["status"] == s);
    let want = if any("fail") {
        1
    } else if any("warn") {
        2
    } else {
        0
    };
    assert_eq!(out.status.code(), Some(want), "{v}");
    assert_eq!(v["exit_code"], want);

    // This machine: Docker runs, there is no NVIDIA driver.
    assert_eq!(find("docker")["status"], "ok", "{v}");
    if !kiln_node::gpu::discover().nvml_present() {
        let nvml = find("nvml");
        assert_eq!(nvml["status"], "warn", "{nvml}");
        assert!(
            nvml["fix"].as_str().unwrap().contains("libnvidia-ml.so.1"),
            "{nvml}"
        );
        assert_eq!(find("gpu-path")["status"], "skip");
        if !any("fail") {
            assert_eq!(out.status.code(), Some(2));
        }
    }
    assert_eq!(find("key-permissions")["status"], "skip", "no key yet");
    assert_eq!(find("coordinator")["status"], "skip");
}

/// `kiln-node run` refuses, before it advertises anything, disk beyond what
/// is free where its state lives and slots beyond the machine's cores,
/// naming the flag, the value asked, what the machine has and what to do.
#[test]
fn run_refuses_to_advertise_more_than_the_machine_has() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    const GIB: u64 = 1 << 30;
    // Only keeps a binary that did start from running forever.
    const GUARD: Duration = Duration::from_secs(120);
    let state = tempfile::tempdir().unwrap();
    let free = kiln_node::doctor::available_bytes(state.path()).unwrap();
    let cores = kiln_node::hw::logical_cores();
    let peer =
        kiln_protocol::ProviderId::from_public_key(&kiln_protocol::Keypair::generate().public());
    let coordinator = format!("/ip4/127.0.0.1/tcp/9/p2p/{peer}");
    let asked = kiln_protocol::ByteSize((free / GIB + 1) * 2 * GIB);
    let disk = asked.to_string();
    let slots = (cores + 1).to_string();
    let cases: [(&[&str], Vec<String>); 2] = [
        (
            &["--disk", &disk],
            vec![
                format!("--disk {asked} is more than the"),
                format!("{:.1} GiB free", free as f64 / GIB as f64),
                state.path().display().to_string(),
                "--state-dir".into(),
            ],
        ),
        (
            &["--slots", &slots],
            vec![
                format!("--slots {slots} is more than this machine's {cores} CPU cores"),
                format!("--slots {cores} or fewer"),
                "--overcommit-slots".into(),
            ],
        ),
    ];
    for (flags, says) in cases {
        let mut child = node()
            .args(["run", "--coordinator", &coordinator])
            .arg("--state-dir")
            .arg(state.path())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > GUARD {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{flags:?}: still running, so it was accepted: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        for s in &says {
            assert!(
                stderr.contains(s.as_str()),
                "{flags:?}: no `{s}` in {stderr}"
            );
        }
    }
}
