//! Everything NVML says about this machine's GPUs, for `doctor`, `benchmark`
//! and idle detection.
//!
//! NVML (`libnvidia-ml.so.1`) is loaded at run time by `Nvml::init`, so the
//! binary runs where no NVIDIA library exists: [`discover`] then reports why
//! there are no GPUs instead of failing. Each fact a GPU does not support
//! (MIG on a consumer card, ECC counters with ECC off, …) is `None`, never an
//! error.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use serde::{Deserialize, Serialize};

/// The fix printed wherever NVML is missing.
pub const NVML_FIX: &str = "install the NVIDIA driver (it provides libnvidia-ml.so.1 and libcuda.so.1), e.g. `sudo apt install nvidia-driver-580` or `sudo ubuntu-drivers install`, then reboot; a machine without an NVIDIA GPU runs CPU-only and needs nothing";

/// One process NVML sees on a GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// `compute` or `graphics`.
    pub kind: String,
    pub used_memory_bytes: Option<u64>,
    /// The process name, when NVML can read it.
    pub name: Option<String>,
}

/// A MIG instance of a GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    pub index: u32,
    pub uuid: Option<String>,
    pub memory_total_bytes: Option<u64>,
    /// The profile (`1g.10gb`), from the instance's NVML name.
    #[serde(default)]
    pub profile: Option<String>,
    /// NVML's GPU instance and compute instance ids (see [`crate::mig`]).
    #[serde(default)]
    pub gpu_instance_id: Option<u32>,
    #[serde(default)]
    pub compute_instance_id: Option<u32>,
}

/// What NVML reports about one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFacts {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: Option<u64>,
    pub driver_version: String,
    /// CUDA version the driver supports, e.g. `13.0`.
    pub cuda_driver_version: Option<String>,
    /// e.g. `9.0` for Hopper.
    pub compute_capability: Option<String>,
    pub pcie_link_gen_current: Option<u32>,
    pub pcie_link_width_current: Option<u32>,
    pub pcie_link_gen_max: Option<u32>,
    pub pcie_link_width_max: Option<u32>,
    pub pci_bus_id: Option<String>,
    /// The software power limit, milliwatts (what `nvidia-smi` calls `power.limit`).
    pub power_limit_mw: Option<u32>,
    pub power_limit_enforced_mw: Option<u32>,
    /// `Some(true)` when MIG mode is on; `None` where MIG is not supported.
    pub mig_mode_current: Option<bool>,
    pub mig_mode_pending: Option<bool>,
    pub mig_instances: Vec<MigInstance>,
    pub ecc_enabled: Option<bool>,
    pub ecc_errors_corrected_volatile: Option<u64>,
    pub ecc_errors_uncorrected_volatile: Option<u64>,
    pub temperature_c: Option<u32>,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub processes: Vec<GpuProcess>,
}

/// The whole NVML view: its version and the GPUs, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// `None` when NVML could not be loaded; see `error`.
    pub nvml_version: Option<String>,
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    pub gpus: Vec<GpuFacts>,
    /// Why NVML is unusable (with what to do), if it is.
    pub error: Option<String>,
}

impl Discovery {
    pub fn nvml_present(&self) -> bool {
        self.nvml_version.is_some()
    }
}

/// `13000` → `13.0`.
pub fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Loads NVML, or says why it cannot and what fixes it.
pub fn init_nvml() -> Result<Nvml, String> {
    Nvml::init().map_err(|e| format!("NVML (libnvidia-ml.so.1) is not available ({e})"))
}

/// Processes on one device (compute and graphics, deduplicated by pid).
pub fn device_processes(nvml: &Nvml, d: &nvml_wrapper::Device<'_>) -> Vec<GpuProcess> {
    let mut out: Vec<GpuProcess> = Vec::new();
    let lists = [
        ("compute", d.running_compute_processes()),
        ("graphics", d.running_graphics_processes()),
    ];
    for (kind, list) in lists {
        for p in list.unwrap_or_default() {
            if out.iter().any(|q| q.pid == p.pid) {
                continue;
            }
            out.push(GpuProcess {
                pid: p.pid,
                kind: kind.into(),
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                name: nvml.sys_process_name(p.pid, 64).ok(),
            });
        }
    }
    out
}

fn facts_of(nvml: &Nvml, index: u32, driver: &str, cuda: Option<&str>) -> Result<GpuFacts, String> {
    let d = nvml
        .device_by_index(index)
        .map_err(|e| format!("NVML could not open GPU {index}: {e}"))?;
    let mem = d.memory_info().ok();
    let mig = d.mig_mode().ok();
    let mig_instances = if mig.as_ref().is_some_and(|m| m.current == 1) {
        let count = d.mig_device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| d.mig_device_by_index(i).ok().map(|m| (i, m)))
            .map(|(i, m)| {
                let ids = crate::mig::instance_ids(nvml, &m);
                MigInstance {
                    index: i,
                    uuid: m.uuid().ok(),
                    memory_total_bytes: m.memory_info().ok().map(|x| x.total),
                    profile: m.name().ok().as_deref().and_then(crate::mig::profile_of),
                    gpu_instance_id: ids.map(|(g, _)| g),
                    compute_instance_id: ids.map(|(_, c)| c),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let util = d.utilization_rates().ok();
    Ok(GpuFacts {
        index,
        name: d.name().unwrap_or_default(),
        uuid: d.uuid().unwrap_or_default(),
        memory_total_bytes: mem.as_ref().map(|m| m.total).unwrap_or(0),
        memory_free_bytes: mem.as_ref().map(|m| m.free),
        driver_version: driver.to_string(),
        cuda_driver_version: cuda.map(str::to_string),
        compute_capability: d
            .cuda_compute_capability()
            .ok()
            .map(|c| format!("{}.{}", c.major, c.minor)),
        pcie_link_gen_current: d.current_pcie_link_gen().ok(),
        pcie_link_width_current: d.current_pcie_link_width().ok(),
        pcie_link_gen_max: d.max_pcie_link_gen().ok(),
        pcie_link_width_max: d.max_pcie_link_width().ok(),
        pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
        power_limit_mw: d.power_management_limit().ok(),
        power_limit_enforced_mw: d.enforced_power_limit().ok(),
        mig_mode_current: mig.as_ref().map(|m| m.current == 1),
        mig_mode_pending: mig.as_ref().map(|m| m.pending == 1),
        mig_instances,
        ecc_enabled: d.is_ecc_enabled().ok().map(|e| e.currently_enabled),
        ecc_errors_corrected_volatile: d
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .ok(),
        ecc_errors_uncorrected_volatile: d
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .ok(),
        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
        utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
        utilization_memory_percent: util.as_ref().map(|u| u.memory),
        processes: device_processes(nvml, &d),
    })
}

/// Everything NVML knows; never panics, never fails: a machine without NVML
/// is a [`Discovery`] with no GPUs and an `error` saying why.
pub fn discover() -> Discovery {
    let nvml = match init_nvml() {
        Ok(n) => n,
        Err(e) => {
            return Discovery {
                nvml_version: None,
                driver_version: None,
                cuda_driver_version: None,
                gpus: Vec::new(),
                error: Some(e),
            };
        }
    };
    discover_with(&nvml)
}

/// [`discover`] with an already loaded NVML.
pub fn discover_with(nvml: &Nvml) -> Discovery {
    let driver = nvml.sys_driver_version().ok();
    let cuda = nvml.sys_cuda_driver_version().ok().map(cuda_version_string);
    let mut error = None;
    let mut gpus = Vec::new();
    match nvml.device_count() {
        Ok(count) => {
            for i in 0..count {
                match facts_of(nvml, i, driver.as_deref().unwrap_or(""), cuda.as_deref()) {
                    Ok(f) => gpus.push(f),
                    Err(e) => error = Some(e),
                }
            }
        }
        Err(e) => error = Some(format!("NVML could not count devices: {e}")),
    }
    Discovery {
        nvml_version: Some(nvml.sys_nvml_version().unwrap_or_else(|_| "unknown".into())),
        driver_version: driver,
        cuda_driver_version: cuda,
        gpus,
        error,
    }
}

/// One GPU's state at one instant, for idle detection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuSample {
    pub uuid: String,
    pub utilization_percent: Option<u32>,
    pub pids: Vec<u32>,
}

/// Samples every GPU's utilization and processes.
pub fn sample(nvml: &Nvml) -> Vec<GpuSample> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .map(|d| {
            let mut pids: Vec<u32> = d
                .running_compute_processes()
                .unwrap_or_default()
                .iter()
                .chain(d.running_graphics_processes().unwrap_or_default().iter())
                .map(|p| p.pid)
                .collect();
            pids.sort_unstable();
            pids.dedup();
            GpuSample {
                uuid: d.uuid().unwrap_or_default(),
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                pids,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_never_panics_and_explains_absence() {
        let d = discover();
        if d.nvml_present() {
            assert!(d.gpus.iter().all(|g| !g.uuid.is_empty()));
        } else {
            let e = d.error.unwrap_or_default();
            assert!(e.contains("NVML") && e.contains("libnvidia-ml.so.1"), "{e}");
            assert!(d.gpus.is_empty());
        }
        let json = serde_json::to_string(&discover()).unwrap();
        assert!(json.contains("\"gpus\""));
    }

    #[test]
    fn cuda_versions_print_like_nvidia_smi() {
        assert_eq!(cuda_version_string(13000), "13.0");
        assert_eq!(cuda_version_string(12080), "12.8");
        assert_eq!(cuda_version_string(11040), "11.4");
    }
}
