//! MIG (Multi-Instance GPU): a GPU in MIG mode is split by its owner into
//! instances (`nvidia-smi mig -cgi 1g.10gb -C`), each with its own memory
//! and compute slice. Kiln advertises each instance as one GPU unit (a
//! [`GpuInfo`] with `mig = Some(profile)`) and never the parent whole; a job
//! asking for `mig = "1g.10gb"` gets only instances of that profile, and a
//! job asking for whole GPUs never gets an instance.
//!
//! In a container, an instance is the parent's device node plus two
//! capability device nodes (`/dev/nvidia-caps/nvidia-cap<N>`): one granting
//! its GPU instance, one its compute instance. Their minor numbers are in
//! `/proc/driver/nvidia/capabilities/gpu<parent minor>/mig/gi<G>/access`
//! and `…/gi<G>/ci<C>/access`, where `G` and `C` are the instance's ids
//! from NVML. That is what [`nodes`] reads, and what
//! `nvidia-container-cli` does for the toolkit.
//!
//! Kiln never changes MIG settings: a provider partitions its GPUs itself.

#![allow(unsafe_code)] // two NVML calls nvml-wrapper does not wrap (see `instance_ids`)

use std::path::Path;

use kiln_protocol::{ByteSize, GpuInfo, MIG_UNIT_BASE};

use crate::gpu::GpuFacts;

/// The profile in a MIG device's NVML name: "NVIDIA H100 80GB HBM3 MIG
/// 1g.10gb" → `1g.10gb`.
pub fn profile_of(name: &str) -> Option<String> {
    let (_, p) = name.rsplit_once(" MIG ")?;
    let p = p.trim();
    kiln_protocol::spec::is_mig_profile(p).then(|| p.to_string())
}

/// The unit number of instance `instance` of GPU `parent` (see
/// [`GpuInfo::index`]).
pub fn unit_index(parent: u32, instance: u32) -> u32 {
    MIG_UNIT_BASE + parent * 256 + instance
}

/// The units this machine offers: each whole GPU, except that a GPU in MIG
/// mode is offered as its instances (those whose profile is known). A GPU
/// in MIG mode with no instance offers nothing, with a warning: its owner
/// has to create instances first.
pub fn units_of(gpus: &[GpuFacts]) -> Vec<GpuInfo> {
    let mut out = Vec::new();
    for g in gpus {
        let cc = g
            .compute_capability
            .as_deref()
            .and_then(|c| c.split_once('.'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .unwrap_or((0, 0));
        if g.mig_mode_current != Some(true) {
            out.push(GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total: ByteSize(g.memory_total_bytes),
                compute_capability: cc,
                driver_version: g.driver_version.clone(),
                mig: None,
            });
            continue;
        }
        let before = out.len();
        for m in &g.mig_instances {
            let (Some(uuid), Some(profile)) = (&m.uuid, &m.profile) else {
                tracing::warn!(gpu = %g.uuid, instance = m.index, "a MIG instance without a UUID or a known profile is not offered");
                continue;
            };
            out.push(GpuInfo {
                index: unit_index(g.index, m.index),
                uuid: uuid.clone(),
                name: g.name.clone(),
                memory_total: ByteSize(m.memory_total_bytes.unwrap_or(0)),
                compute_capability: cc,
                driver_version: g.driver_version.clone(),
                mig: Some(profile.clone()),
            });
        }
        if out.len() == before {
            tracing::warn!(gpu = %g.uuid, "GPU {} is in MIG mode with no instance: it is not offered (create instances with `nvidia-smi mig -cgi <profiles> -C`)", g.index);
        }
    }
    out
}

/// What a container needs for one MIG instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigNodes {
    /// The parent GPU's `/dev/nvidia<minor>`.
    pub parent_minor: u32,
    /// `/dev/nvidia-caps/nvidia-cap<minor>` of its GPU instance.
    pub gi_cap: u32,
    /// … and of its compute instance.
    pub ci_cap: u32,
}

/// `DeviceFileMinor: N` in a capability's `access` file.
pub fn cap_minor(access: &str) -> Option<u32> {
    access
        .lines()
        .find_map(|l| l.trim().strip_prefix("DeviceFileMinor:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The device nodes of GPU instance `gi`, compute instance `ci` on the GPU
/// with minor `parent_minor`, from the driver's capability files under
/// `proc_root` (`/proc` on a real host).
pub fn nodes(proc_root: &Path, parent_minor: u32, gi: u32, ci: u32) -> Result<MigNodes, String> {
    let gi_dir = proc_root.join(format!(
        "driver/nvidia/capabilities/gpu{parent_minor}/mig/gi{gi}"
    ));
    let read = |p: &Path| {
        let text = std::fs::read_to_string(p).map_err(|e| {
            format!(
                "cannot read {}: {e} (is the driver's MIG support loaded?)",
                p.display()
            )
        })?;
        cap_minor(&text).ok_or_else(|| format!("{} names no DeviceFileMinor", p.display()))
    };
    Ok(MigNodes {
        parent_minor,
        gi_cap: read(&gi_dir.join("access"))?,
        ci_cap: read(&gi_dir.join(format!("ci{ci}")).join("access"))?,
    })
}

/// The (GPU instance, compute instance) ids of a MIG device handle.
/// nvml-wrapper 0.13 has no wrapper for these two NVML calls; a driver
/// without them (older than MIG) gives `None`.
pub fn instance_ids(
    nvml: &nvml_wrapper::Nvml,
    mig: &nvml_wrapper::Device<'_>,
) -> Option<(u32, u32)> {
    let lib = nvml.lib();
    if lib.nvmlDeviceGetGpuInstanceId.is_err() || lib.nvmlDeviceGetComputeInstanceId.is_err() {
        return None;
    }
    let (mut gi, mut ci) = (0u32, 0u32);
    // SAFETY: both symbols are loaded (checked above, so the bindings do not
    // panic); `mig.handle()` is a live handle of this NVML instance, and the
    // out-pointers are valid u32s for the duration of each call.
    let ok = unsafe {
        let h = mig.handle();
        lib.nvmlDeviceGetGpuInstanceId(h, &mut gi) == 0
            && lib.nvmlDeviceGetComputeInstanceId(h, &mut ci) == 0
    };
    ok.then_some((gi, ci))
}

/// Every MIG instance's device nodes by UUID, from NVML and `/proc` (empty
/// without NVML or MIG).
pub fn host_mig_nodes() -> std::collections::BTreeMap<String, MigNodes> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(nvml) = nvml_wrapper::Nvml::init() else {
        return out;
    };
    for i in 0..nvml.device_count().unwrap_or(0) {
        let Ok(d) = nvml.device_by_index(i) else {
            continue;
        };
        if !d.mig_mode().is_ok_and(|m| m.current == 1) {
            continue;
        }
        let Ok(minor) = d.minor_number() else {
            continue;
        };
        for m in 0..d.mig_device_count().unwrap_or(0) {
            let Ok(md) = d.mig_device_by_index(m) else {
                continue;
            };
            let (Ok(uuid), Some((gi, ci))) = (md.uuid(), instance_ids(&nvml, &md)) else {
                continue;
            };
            match nodes(Path::new("/proc"), minor, gi, ci) {
                Ok(n) => {
                    out.insert(uuid, n);
                }
                Err(e) => tracing::warn!(%uuid, "MIG instance not injectable: {e}"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::MigInstance;

    /// An H100 in MIG mode as NVML reports it (recorded `kiln-node doctor
    /// --json` facts, trimmed), split 3g.40gb + 2 × 1g.10gb, beside a
    /// whole H100.
    const FACTS: &str = r#"[
      {"index":0,"name":"NVIDIA H100 80GB HBM3","uuid":"GPU-5c6b2a8e-3f7d-4e1a-9b2c-0d1e2f3a4b5c",
       "memory_total_bytes":85520809984,"memory_free_bytes":null,"driver_version":"580.159.04",
       "cuda_driver_version":"13.0","compute_capability":"9.0","pcie_link_gen_current":null,
       "pcie_link_width_current":null,"pcie_link_gen_max":null,"pcie_link_width_max":null,
       "pci_bus_id":"00000000:19:00.0","power_limit_mw":null,"power_limit_enforced_mw":null,
       "mig_mode_current":true,"mig_mode_pending":true,
       "mig_instances":[
         {"index":0,"uuid":"MIG-2f1e0d9c-8b7a-5f6e-a4d3-c2b1a0f9e8d7","memory_total_bytes":42949672960,
          "profile":"3g.40gb","gpu_instance_id":2,"compute_instance_id":0},
         {"index":1,"uuid":"MIG-7a6b5c4d-3e2f-5a1b-8c9d-0e1f2a3b4c5d","memory_total_bytes":10468982784,
          "profile":"1g.10gb","gpu_instance_id":9,"compute_instance_id":0},
         {"index":2,"uuid":"MIG-0b1c2d3e-4f5a-5b6c-9d8e-7f6a5b4c3d2e","memory_total_bytes":10468982784,
          "profile":"1g.10gb","gpu_instance_id":10,"compute_instance_id":0}],
       "ecc_enabled":true,"ecc_errors_corrected_volatile":0,"ecc_errors_uncorrected_volatile":0,
       "temperature_c":31,"utilization_gpu_percent":null,"utilization_memory_percent":null,"processes":[]},
      {"index":1,"name":"NVIDIA H100 80GB HBM3","uuid":"GPU-9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a",
       "memory_total_bytes":85520809984,"memory_free_bytes":null,"driver_version":"580.159.04",
       "cuda_driver_version":"13.0","compute_capability":"9.0","pcie_link_gen_current":null,
       "pcie_link_width_current":null,"pcie_link_gen_max":null,"pcie_link_width_max":null,
       "pci_bus_id":"00000000:3B:00.0","power_limit_mw":null,"power_limit_enforced_mw":null,
       "mig_mode_current":false,"mig_mode_pending":false,"mig_instances":[],
       "ecc_enabled":true,"ecc_errors_corrected_volatile":0,"ecc_errors_uncorrected_volatile":0,
       "temperature_c":30,"utilization_gpu_percent":0,"utilization_memory_percent":0,"processes":[]}
    ]"#;

    #[test]
    fn a_gpu_in_mig_mode_is_offered_as_its_instances_only() {
        let facts: Vec<GpuFacts> = serde_json::from_str(FACTS).unwrap();
        let units = units_of(&facts);
        let got: Vec<(u32, &str, Option<&str>, u64)> = units
            .iter()
            .map(|u| {
                (
                    u.index,
                    &u.uuid[..4],
                    u.mig.as_deref(),
                    u.memory_total.0 >> 30,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (MIG_UNIT_BASE, "MIG-", Some("3g.40gb"), 40),
                (MIG_UNIT_BASE + 1, "MIG-", Some("1g.10gb"), 9),
                (MIG_UNIT_BASE + 2, "MIG-", Some("1g.10gb"), 9),
                (1, "GPU-", None, 79),
            ]
        );
        assert!(
            units
                .iter()
                .all(|u| u.compute_capability == (9, 0) && u.name == "NVIDIA H100 80GB HBM3")
        );
        // Unit numbers never collide with whole GPUs' NVML indexes.
        let mut idx: Vec<u32> = units.iter().map(|u| u.index).collect();
        idx.dedup();
        assert_eq!(idx.len(), units.len());

        // MIG on but no instance created: nothing offered from that GPU.
        let mut empty = facts.clone();
        empty[0].mig_instances.clear();
        assert_eq!(units_of(&empty).len(), 1);
        // An instance whose profile NVML did not name is not offered.
        let mut unnamed = facts;
        unnamed[0].mig_instances[1] = MigInstance {
            profile: None,
            ..unnamed[0].mig_instances[1].clone()
        };
        assert_eq!(units_of(&unnamed).len(), 3);
    }

    #[test]
    fn profiles_come_from_nvml_names() {
        assert_eq!(
            profile_of("NVIDIA H100 80GB HBM3 MIG 1g.10gb").as_deref(),
            Some("1g.10gb")
        );
        assert_eq!(
            profile_of("NVIDIA A100-SXM4-40GB MIG 3g.20gb").as_deref(),
            Some("3g.20gb")
        );
        assert_eq!(
            profile_of("NVIDIA H100 80GB HBM3 MIG 1g.20gb+me").as_deref(),
            Some("1g.20gb+me")
        );
        assert_eq!(profile_of("NVIDIA H100 80GB HBM3"), None);
        assert_eq!(profile_of("NVIDIA H100 MIG nonsense"), None);
    }

    /// The driver's capability files for GPU minor 0 with GPU instance 9,
    /// compute instance 0 (recorded layout of
    /// `/proc/driver/nvidia/capabilities`).
    #[test]
    fn capability_minors_come_from_the_drivers_proc_files() {
        let root = tempfile::tempdir().unwrap();
        let gi = root.path().join("driver/nvidia/capabilities/gpu0/mig/gi9");
        std::fs::create_dir_all(gi.join("ci0")).unwrap();
        std::fs::write(
            gi.join("access"),
            "DeviceFileMinor: 84\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
        )
        .unwrap();
        std::fs::write(
            gi.join("ci0/access"),
            "DeviceFileMinor: 85\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
        )
        .unwrap();
        assert_eq!(
            nodes(root.path(), 0, 9, 0).unwrap(),
            MigNodes {
                parent_minor: 0,
                gi_cap: 84,
                ci_cap: 85
            }
        );
        let e = nodes(root.path(), 0, 10, 0).unwrap_err();
        assert!(e.contains("gi10/access"), "{e}");
        assert_eq!(cap_minor("DeviceFileMode: 292\n"), None);
    }
}
