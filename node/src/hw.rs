//! What this machine has: GPUs through NVML (loaded at run time, so the
//! binary runs where no NVIDIA library exists), CPU and memory from `/proc`,
//! and a quick measured CPU figure.

use std::time::{Duration, Instant};

use kiln_protocol::{ByteSize, CpuInfo, GpuInfo};

/// The GPU units this machine offers (whole GPUs, or the MIG instances of
/// a GPU in MIG mode: [`crate::mig::units_of`]), or why there are none.
pub fn discover_gpus() -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| {
        format!("NVML is not available ({e}); running CPU-only. Install the NVIDIA driver (libnvidia-ml.so.1) to offer GPUs")
    })?;
    let d = crate::gpu::discover_with(&nvml);
    if let Some(e) = d.error.filter(|_| d.gpus.is_empty()) {
        return Err(e);
    }
    Ok(crate::mig::units_of(&d.gpus))
}

/// Compute processes NVML sees on each GPU (by UUID). Used between jobs to
/// check that nothing of the previous job is left on a GPU.
pub fn gpu_processes(uuids: &[String]) -> Result<Vec<(String, usize)>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML is not available: {e}"))?;
    uuids
        .iter()
        .map(|u| {
            let d = nvml
                .device_by_uuid(u.as_str())
                .map_err(|e| format!("NVML cannot open GPU {u}: {e}"))?;
            let n = d
                .running_compute_processes()
                .map(|p| p.len())
                .map_err(|e| format!("NVML cannot list processes on {u}: {e}"))?;
            Ok((u.clone(), n))
        })
        .collect()
}

/// GPUs that may be given to a new job: not busy with a job, and not dirty
/// (a previous job's process was still on it at the last check).
pub fn assignable_gpus<'a>(
    all: &'a [kiln_protocol::GpuInfo],
    busy: &std::collections::HashSet<u32>,
    dirty: &std::collections::HashSet<u32>,
) -> Vec<&'a kiln_protocol::GpuInfo> {
    all.iter()
        .filter(|g| !busy.contains(&g.index) && !dirty.contains(&g.index))
        .collect()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Total memory from `/proc/meminfo`.
pub fn total_memory() -> ByteSize {
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    ByteSize(kib * 1024)
}

/// Measured f64 matrix-multiply throughput of one core, in MFLOP/s. Inputs are
/// pseudo-random (a zero matrix would be unrepresentative), and the loop
/// runs for at least `budget`.
pub fn cpu_matmul_mflops(budget: Duration) -> u64 {
    const N: usize = 96;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let a: Vec<f64> = (0..N * N).map(|_| next()).collect();
    let b: Vec<f64> = (0..N * N).map(|_| next()).collect();
    let mut c = vec![0.0f64; N * N];
    let start = Instant::now();
    let mut reps = 0u64;
    while reps == 0 || start.elapsed() < budget {
        for i in 0..N {
            for k in 0..N {
                let aik = a[i * N + k];
                for j in 0..N {
                    c[i * N + j] += aik * b[k * N + j];
                }
            }
        }
        reps += 1;
    }
    std::hint::black_box(&c);
    let flops = 2.0 * (N * N * N) as f64 * reps as f64;
    (flops / start.elapsed().as_secs_f64() / 1e6) as u64
}

/// The CPU cores this process may use (its affinity and cgroup quota
/// included): what the advert states as `logical_cores`.
pub fn logical_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

pub fn cpu_info(bench: Duration) -> CpuInfo {
    CpuInfo {
        model: cpu_model(),
        logical_cores: logical_cores(),
        matmul_mflops: cpu_matmul_mflops(bench),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_facts_are_measured() {
        let c = cpu_info(Duration::from_millis(20));
        assert!(c.logical_cores >= 1);
        assert!(c.matmul_mflops > 0);
        assert!(total_memory().0 > 0);
    }

    #[test]
    fn assignable_gpus_table() {
        use std::collections::HashSet;
        let gpu = |index| GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            memory_total: ByteSize(80 << 30),
            compute_capability: (9, 0),
            driver_version: "580".into(),
            mig: None,
        };
        let all: Vec<GpuInfo> = (0..4).map(gpu).collect();
        let set = |v: &[u32]| v.iter().copied().collect::<HashSet<u32>>();
        // (busy, dirty, assignable)
        let cases: [(&[u32], &[u32], &[u32]); 4] = [
            (&[], &[], &[0, 1, 2, 3]),
            (&[0, 1], &[], &[2, 3]),
            (&[0], &[3], &[1, 2]),
            (&[0, 1], &[2, 3], &[]),
        ];
        for (busy, dirty, want) in cases {
            let got: Vec<u32> = assignable_gpus(&all, &set(busy), &set(dirty))
                .iter()
                .map(|g| g.index)
                .collect();
            assert_eq!(got, want, "busy {busy:?} dirty {dirty:?}");
        }
    }

    #[test]
    fn gpu_discovery_never_panics_without_nvml() {
        // On a machine without the NVIDIA driver this is an error with a fix;
        // with one, a list. Either way, no panic.
        match discover_gpus() {
            Ok(gpus) => assert!(gpus.iter().all(|g| !g.uuid.is_empty())),
            Err(e) => assert!(e.contains("NVML"), "{e}"),
        }
    }
}
