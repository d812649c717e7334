//! How a job's GPUs get into its container.
//!
//! Three ways, chosen from what the host has (`kiln-node doctor` says
//! which, and why):
//!
//! 1. **The NVIDIA Container Toolkit**: the engine knows the `nvidia`
//!    runtime hook, and a `DeviceRequest` with driver `nvidia` and the
//!    GPUs' UUIDs makes it set the devices and driver libraries up.
//! 2. **CDI**: the engine resolves Container Device Interface names
//!    (`nvidia.com/gpu=<uuid>`) from specs under `/etc/cdi` or `/var/run/cdi`
//!    (`nvidia-ctk cdi generate`), through a `DeviceRequest` with driver
//!    `cdi` (Docker 25 and later).
//! 3. **Built-in injection**, for hosts with the driver and neither of the
//!    above (as `nvidia-container-cli` does it): the control and unified
//!    memory device nodes plus `/dev/nvidia<minor>` of each assigned GPU as
//!    devices, and the driver's user-space libraries (found in the loader
//!    cache, `ldconfig -p`) bind-mounted read-only under
//!    `/usr/local/nvidia/lib64`, the directory CUDA images already put on
//!    `LD_LIBRARY_PATH`.
//!
//! Whichever way, only the job's assigned GPUs are visible, and the rest of
//! the sandbox (user, capabilities, read-only root, seccomp, network) is
//! unchanged: this module only adds devices, read-only binds and an
//! environment variable. [`probe`] gathers the facts (I/O); [`choose`]
//! and [`plan`] are pure and table-tested with a recorded host.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bollard::models::{DeviceMapping, DeviceRequest};
use serde::Serialize;

/// Where injected driver libraries appear inside the container.
pub const LIB_DIR: &str = "/usr/local/nvidia/lib64";

/// The driver's user-space libraries a compute job needs (compute and
/// utility, as the toolkit's default capabilities give).
pub const DRIVER_LIBRARIES: [&str; 6] = [
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
    "libcudadebugger.so.1",
    "libnvidia-cfg.so.1",
];

/// Of [`DRIVER_LIBRARIES`], those without which CUDA cannot run at all.
const REQUIRED_LIBRARIES: [&str; 2] = ["libcuda.so.1", "libnvidia-ml.so.1"];

/// The way GPUs get into containers on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuPath {
    Toolkit,
    Cdi,
    Injected,
}

impl std::fmt::Display for GpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Toolkit => "the NVIDIA Container Toolkit (nvidia runtime)",
            Self::Cdi => "CDI device names (nvidia.com/gpu)",
            Self::Injected => "built-in injection (device nodes and driver libraries)",
        })
    }
}

/// What the host offers for GPUs in containers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The engine lists the `nvidia` runtime.
    pub nvidia_runtime: bool,
    /// The engine resolves CDI device requests (Docker 25+).
    pub engine_cdi: bool,
    /// CDI names of NVIDIA devices in the engine's spec directories.
    pub cdi_devices: Vec<String>,
    /// Names of the NVIDIA device nodes under `/dev` (`nvidiactl`, `nvidia0`, …).
    pub dev_nodes: Vec<String>,
    /// Driver libraries in the loader cache: name → path.
    pub libraries: BTreeMap<String, PathBuf>,
    /// Device minor number (`/dev/nvidia<minor>`) by GPU UUID, from NVML.
    pub minors: BTreeMap<String, u32>,
    /// Device nodes of each MIG instance by its UUID (`MIG-…`), from NVML
    /// and the driver's capability files ([`crate::mig`]).
    pub mig: BTreeMap<String, crate::mig::MigNodes>,
}

/// How one job's GPUs get into its container.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuPlan {
    pub device_requests: Vec<DeviceRequest>,
    pub devices: Vec<DeviceMapping>,
    /// `host:container:ro` binds.
    pub binds: Vec<String>,
    pub env: Vec<String>,
}

/// What built-in injection lacks on this host, if anything.
fn injection_gap(f: &HostFacts) -> Option<String> {
    let mut missing: Vec<String> = ["nvidiactl", "nvidia-uvm"]
        .iter()
        .filter(|n| !f.dev_nodes.iter().any(|d| d == *n))
        .map(|n| format!("/dev/{n}"))
        .collect();
    missing.extend(
        REQUIRED_LIBRARIES
            .iter()
            .filter(|l| !f.libraries.contains_key(**l))
            .map(|l| (*l).to_string()),
    );
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The way to use: the toolkit if the engine has it, else CDI if the
/// engine and a spec allow it, else built-in injection if the device
/// nodes and driver libraries are there; else why none works.
pub fn choose(f: &HostFacts) -> Result<GpuPath, String> {
    if f.nvidia_runtime {
        return Ok(GpuPath::Toolkit);
    }
    // CDI only if every GPU is named there by UUID, the way jobs ask.
    let by_uuid = |u: &String| f.cdi_devices.contains(&format!("nvidia.com/gpu={u}"));
    if f.engine_cdi && !f.minors.is_empty() && f.minors.keys().chain(f.mig.keys()).all(by_uuid) {
        return Ok(GpuPath::Cdi);
    }
    match injection_gap(f) {
        None => Ok(GpuPath::Injected),
        Some(missing) => Err(format!(
            "no way to give GPUs to containers: the engine has no nvidia runtime, no NVIDIA CDI spec, \
             and built-in injection lacks {missing} (is the NVIDIA driver installed and loaded? \
             `nvidia-smi` should work; `sudo modprobe nvidia-uvm` creates /dev/nvidia-uvm)"
        )),
    }
}

/// The plan for a job given the GPUs `uuids`, on a host with `f`, the
/// image's own `LD_LIBRARY_PATH` (if any) kept.
pub fn plan(
    path: GpuPath,
    f: &HostFacts,
    uuids: &[String],
    image_ld_path: Option<&str>,
) -> Result<GpuPlan, String> {
    if uuids.is_empty() {
        return Ok(GpuPlan::default());
    }
    let request = |driver: &str, ids: Vec<String>| DeviceRequest {
        driver: Some(driver.into()),
        device_ids: Some(ids),
        capabilities: Some(vec![vec!["gpu".into()]]),
        ..Default::default()
    };
    match path {
        GpuPath::Toolkit => Ok(GpuPlan {
            device_requests: vec![request("nvidia", uuids.to_vec())],
            ..GpuPlan::default()
        }),
        GpuPath::Cdi => Ok(GpuPlan {
            device_requests: vec![request(
                "cdi",
                uuids
                    .iter()
                    .map(|u| format!("nvidia.com/gpu={u}"))
                    .collect(),
            )],
            ..GpuPlan::default()
        }),
        GpuPath::Injected => {
            if let Some(missing) = injection_gap(f) {
                return Err(format!("cannot inject GPUs: this host lacks {missing}"));
            }
            let node = |name: &str| DeviceMapping {
                path_on_host: Some(format!("/dev/{name}")),
                path_in_container: Some(format!("/dev/{name}")),
                cgroup_permissions: Some("rwm".into()),
            };
            let mut devices: Vec<DeviceMapping> = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
                .iter()
                .filter(|n| f.dev_nodes.iter().any(|d| d == *n))
                .map(|n| node(n))
                .collect();
            let mut env = Vec::new();
            for u in uuids {
                // A MIG instance: its parent's node and the two capability
                // nodes that grant exactly this instance.
                let names = if let Some(m) = f.mig.get(u) {
                    vec![
                        format!("nvidia{}", m.parent_minor),
                        format!("nvidia-caps/nvidia-cap{}", m.gi_cap),
                        format!("nvidia-caps/nvidia-cap{}", m.ci_cap),
                    ]
                } else if u.starts_with("MIG-") {
                    return Err(format!(
                        "cannot inject MIG instance {u}: its capability device nodes are unknown \
                         (NVML gave no instance ids, or /proc/driver/nvidia/capabilities lacks them)"
                    ));
                } else {
                    let minor = f.minors.get(u).ok_or_else(|| {
                        format!("cannot inject GPU {u}: NVML gave no device minor number for it")
                    })?;
                    vec![format!("nvidia{minor}")]
                };
                for name in names {
                    if !f.dev_nodes.contains(&name) {
                        return Err(format!("cannot inject GPU {u}: /dev/{name} does not exist"));
                    }
                    if !devices
                        .iter()
                        .any(|d| d.path_on_host.as_deref() == Some(&format!("/dev/{name}")))
                    {
                        devices.push(node(&name));
                    }
                }
            }
            // With MIG, CUDA enumerates the instances the capabilities
            // grant; naming them keeps the order the job was given.
            if uuids.iter().any(|u| f.mig.contains_key(u)) {
                env.push(format!("CUDA_VISIBLE_DEVICES={}", uuids.join(",")));
            }
            let mut binds: Vec<String> = DRIVER_LIBRARIES
                .iter()
                .filter_map(|l| f.libraries.get(*l).map(|p| (l, p)))
                .map(|(l, p)| format!("{}:{LIB_DIR}/{l}:ro", p.display()))
                .collect();
            // The unversioned name too: programs that link with -lcuda at
            // run time (Triton's kernels) look for libcuda.so.
            if let Some(p) = f.libraries.get("libcuda.so.1") {
                binds.push(format!("{}:{LIB_DIR}/libcuda.so:ro", p.display()));
            }
            let on_path = image_ld_path.is_some_and(|p| p.split(':').any(|d| d == LIB_DIR));
            if !on_path {
                env.push(match image_ld_path.filter(|p| !p.is_empty()) {
                    Some(p) => format!("LD_LIBRARY_PATH={LIB_DIR}:{p}"),
                    None => format!("LD_LIBRARY_PATH={LIB_DIR}"),
                });
            }
            Ok(GpuPlan {
                device_requests: Vec::new(),
                devices,
                binds,
                env,
            })
        }
    }
}

/// `ldconfig -p` output → the 64-bit driver libraries it lists.
pub fn parse_ldconfig(out: &str) -> BTreeMap<String, PathBuf> {
    let mut libs = BTreeMap::new();
    for line in out.lines() {
        let Some((left, path)) = line.trim().split_once(" => ") else {
            continue;
        };
        let Some((name, tags)) = left.split_once(' ') else {
            continue;
        };
        if !DRIVER_LIBRARIES.contains(&name)
            || !tags.contains("x86-64") && !tags.contains("AArch64")
        {
            continue;
        }
        libs.entry(name.to_string())
            .or_insert_with(|| PathBuf::from(path.trim()));
    }
    libs
}

/// The NVIDIA CDI device names in spec files under `dirs` (`kind` plus
/// each device's `name`, read from the YAML or JSON text).
pub fn cdi_devices(dirs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            out.extend(parse_cdi(&text));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `kind: nvidia.com/gpu` and `- name: <n>` lines (YAML) or `"kind"`/`"name"`
/// keys (JSON) → qualified names.
fn parse_cdi(text: &str) -> Vec<String> {
    let value = |line: &str, key: &str| {
        let l = line.trim().trim_start_matches("- ").trim_start_matches('"');
        let rest = l.strip_prefix(key)?;
        let rest = rest
            .trim_start_matches('"')
            .trim_start()
            .strip_prefix(':')?;
        Some(
            rest.trim()
                .trim_matches(|c| c == '"' || c == ',')
                .to_string(),
        )
    };
    let Some(kind) = text.lines().find_map(|l| value(l, "kind")) else {
        return Vec::new();
    };
    if !kind.starts_with("nvidia.com/") {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| value(l, "name"))
        .map(|n| format!("{kind}={n}"))
        .collect()
}

/// Gathers the facts: the engine's runtimes and CDI support (from `docker
/// info` and its version), `/dev`, the loader cache and NVML's minors.
pub fn probe(
    runtimes: &[String],
    engine_version: &str,
    cdi_dirs: &[String],
    minors: BTreeMap<String, u32>,
) -> HostFacts {
    let major: u32 = engine_version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let list = |dir: &str, prefix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("nvidia"))
                    .map(|n| format!("{prefix}{n}"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut dev_nodes = list("/dev", "");
    dev_nodes.extend(list("/dev/nvidia-caps", "nvidia-caps/"));
    let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
        .iter()
        .find_map(|c| std::process::Command::new(c).arg("-p").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    HostFacts {
        nvidia_runtime: runtimes.iter().any(|r| r == "nvidia"),
        engine_cdi: major >= 25,
        cdi_devices: cdi_devices(cdi_dirs),
        dev_nodes,
        libraries: parse_ldconfig(&ldconfig),
        minors,
        mig: crate::mig::host_mig_nodes(),
    }
}

/// NVML's device minor numbers by UUID (empty without NVML).
pub fn nvml_minors() -> BTreeMap<String, u32> {
    let Ok(nvml) = nvml_wrapper::Nvml::init() else {
        return BTreeMap::new();
    };
    let n = nvml.device_count().unwrap_or(0);
    (0..n)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            Some((d.uuid().ok()?, d.minor_number().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ldconfig -p` on an H100 host with driver 580 (recorded; trimmed).
    const LDCONFIG: &str = "\
1234 libs found in cache `/etc/ld.so.cache'
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
\tlibnvidia-nvvm.so.4 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-nvvm.so.4
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-cfg.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-cfg.so.1
\tlibcudadebugger.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcudadebugger.so.1
\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so
\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
";

    const A: &str = "GPU-5c8a1f0e-0000-0000-0000-000000000000";
    const B: &str = "GPU-9d2b7c11-0000-0000-0000-000000000001";

    fn h100_host() -> HostFacts {
        HostFacts {
            nvidia_runtime: false,
            engine_cdi: false,
            cdi_devices: vec![],
            dev_nodes: [
                "nvidia0",
                "nvidia1",
                "nvidiactl",
                "nvidia-uvm",
                "nvidia-uvm-tools",
                "nvidia-modeset",
            ]
            .map(String::from)
            .to_vec(),
            libraries: parse_ldconfig(LDCONFIG),
            minors: [(A.to_string(), 0), (B.to_string(), 1)]
                .into_iter()
                .collect(),
            mig: BTreeMap::new(),
        }
    }

    const M: &str = "MIG-7a6b5c4d-3e2f-5a1b-8c9d-0e1f2a3b4c5d";

    /// GPU 0 (minor 0) in MIG mode with instance `M` (GPU instance 9,
    /// compute instance 0: capability minors 84 and 85), GPU 1 whole.
    fn mig_host() -> HostFacts {
        let mut h = h100_host();
        h.dev_nodes.extend(
            [
                "nvidia-caps/nvidia-cap1",
                "nvidia-caps/nvidia-cap2",
                "nvidia-caps/nvidia-cap84",
                "nvidia-caps/nvidia-cap85",
            ]
            .map(String::from),
        );
        h.mig.insert(
            M.to_string(),
            crate::mig::MigNodes {
                parent_minor: 0,
                gi_cap: 84,
                ci_cap: 85,
            },
        );
        h
    }

    #[test]
    fn a_mig_instance_gets_its_parent_and_its_two_capabilities_only() {
        let host = mig_host();
        let p = plan(GpuPath::Injected, &host, &[M.to_string()], None).unwrap();
        let nodes: Vec<&str> = p
            .devices
            .iter()
            .filter_map(|d| d.path_on_host.as_deref())
            .collect();
        assert_eq!(
            nodes,
            [
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/nvidia-caps/nvidia-cap84",
                "/dev/nvidia-caps/nvidia-cap85"
            ]
        );
        assert!(
            p.env.contains(&format!("CUDA_VISIBLE_DEVICES={M}")),
            "{:?}",
            p.env
        );
        assert!(p.env.iter().any(|e| e.starts_with("LD_LIBRARY_PATH=")));
        // The whole GPU beside it is unaffected: no capability nodes, no
        // CUDA_VISIBLE_DEVICES.
        let whole = plan(GpuPath::Injected, &host, &[B.to_string()], None).unwrap();
        assert!(
            whole
                .devices
                .iter()
                .all(|d| !d.path_on_host.as_deref().unwrap_or("").contains("caps"))
        );
        assert!(
            whole
                .env
                .iter()
                .all(|e| !e.starts_with("CUDA_VISIBLE_DEVICES"))
        );
        // The toolkit and CDI name the instance by its UUID.
        let t = plan(GpuPath::Toolkit, &host, &[M.to_string()], None).unwrap();
        assert_eq!(
            t.device_requests[0].device_ids.as_deref(),
            Some(&[M.to_string()][..])
        );
        let c = plan(GpuPath::Cdi, &host, &[M.to_string()], None).unwrap();
        assert_eq!(
            c.device_requests[0].device_ids.as_deref(),
            Some(&[format!("nvidia.com/gpu={M}")][..])
        );
        // An instance whose capabilities are unknown, or whose node is
        // missing, is refused with the reason.
        let e = plan(GpuPath::Injected, &h100_host(), &[M.to_string()], None).unwrap_err();
        assert!(e.contains("capability device nodes are unknown"), "{e}");
        let mut gone = mig_host();
        gone.dev_nodes.retain(|n| n != "nvidia-caps/nvidia-cap85");
        let e = plan(GpuPath::Injected, &gone, &[M.to_string()], None).unwrap_err();
        assert!(
            e.contains("/dev/nvidia-caps/nvidia-cap85 does not exist"),
            "{e}"
        );
        // CDI is chosen only if the spec names the instance too.
        let cdi = |names: Vec<String>| HostFacts {
            engine_cdi: true,
            cdi_devices: names,
            ..mig_host()
        };
        let gpus = vec![format!("nvidia.com/gpu={A}"), format!("nvidia.com/gpu={B}")];
        assert_eq!(choose(&cdi(gpus.clone())), Ok(GpuPath::Injected));
        let mut all = gpus;
        all.push(format!("nvidia.com/gpu={M}"));
        assert_eq!(choose(&cdi(all)), Ok(GpuPath::Cdi));
    }

    #[test]
    fn the_loader_cache_gives_the_64_bit_driver_libraries() {
        let libs = parse_ldconfig(LDCONFIG);
        assert_eq!(libs.len(), 6, "{libs:?}");
        assert_eq!(
            libs["libnvidia-ml.so.1"],
            PathBuf::from("/lib/x86_64-linux-gnu/libnvidia-ml.so.1")
        );
        assert!(
            !libs.contains_key("libcuda.so"),
            "only the versioned soname"
        );
        assert!(!libs.contains_key("libc.so.6"));
    }

    #[test]
    fn the_path_is_toolkit_then_cdi_then_injection() {
        let host = h100_host();
        let cases: [(&str, HostFacts, Result<GpuPath, &str>); 6] = [
            ("driver only", host.clone(), Ok(GpuPath::Injected)),
            (
                "toolkit",
                HostFacts {
                    nvidia_runtime: true,
                    ..host.clone()
                },
                Ok(GpuPath::Toolkit),
            ),
            (
                "cdi spec and engine",
                HostFacts {
                    engine_cdi: true,
                    cdi_devices: vec![format!("nvidia.com/gpu={A}"), format!("nvidia.com/gpu={B}")],
                    ..host.clone()
                },
                Ok(GpuPath::Cdi),
            ),
            (
                "cdi spec naming GPUs by index only",
                HostFacts {
                    engine_cdi: true,
                    cdi_devices: vec!["nvidia.com/gpu=0".into(), "nvidia.com/gpu=1".into()],
                    ..host.clone()
                },
                Ok(GpuPath::Injected),
            ),
            (
                "cdi spec, engine too old",
                HostFacts {
                    cdi_devices: vec!["nvidia.com/gpu=0".into()],
                    ..host.clone()
                },
                Ok(GpuPath::Injected),
            ),
            (
                "no uvm node, no libcuda",
                HostFacts {
                    dev_nodes: vec!["nvidia0".into(), "nvidiactl".into()],
                    libraries: BTreeMap::new(),
                    ..host
                },
                Err("/dev/nvidia-uvm, libcuda.so.1, libnvidia-ml.so.1"),
            ),
        ];
        for (name, facts, want) in cases {
            match (choose(&facts), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, w, "{name}"),
                (Err(e), Err(w)) => {
                    assert!(e.contains(w) && e.contains("nvidia-smi"), "{name}: {e}")
                }
                (got, w) => panic!("{name}: {got:?} vs {w:?}"),
            }
        }
    }

    #[test]
    fn injection_gives_only_the_assigned_gpu_and_read_only_libraries() {
        let host = h100_host();
        let p = plan(GpuPath::Injected, &host, &[B.into()], None).unwrap();
        let devs: Vec<&str> = p
            .devices
            .iter()
            .map(|d| d.path_on_host.as_deref().unwrap())
            .collect();
        assert_eq!(
            devs,
            [
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia1"
            ]
        );
        assert!(!devs.contains(&"/dev/nvidia0"), "the other GPU stays out");
        assert!(
            p.devices
                .iter()
                .all(|d| d.cgroup_permissions.as_deref() == Some("rwm"))
        );
        assert!(p.device_requests.is_empty());
        assert_eq!(p.binds.len(), 7);
        assert!(p.binds.contains(
            &"/lib/x86_64-linux-gnu/libcuda.so.1:/usr/local/nvidia/lib64/libcuda.so:ro".to_string()
        ));
        assert!(
            p.binds.contains(
                &"/lib/x86_64-linux-gnu/libcuda.so.1:/usr/local/nvidia/lib64/libcuda.so.1:ro"
                    .to_string()
            )
        );
        assert!(p.binds.iter().all(|b| b.ends_with(":ro")));
        assert_eq!(p.env, ["LD_LIBRARY_PATH=/usr/local/nvidia/lib64"]);
        // An image that already looks there (CUDA images do) keeps its own.
        let cuda = plan(
            GpuPath::Injected,
            &host,
            &[A.into()],
            Some("/usr/local/nvidia/lib:/usr/local/nvidia/lib64"),
        )
        .unwrap();
        assert!(cuda.env.is_empty());
        let other = plan(GpuPath::Injected, &host, &[A.into()], Some("/opt/lib")).unwrap();
        assert_eq!(
            other.env,
            ["LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/opt/lib"]
        );
        // A GPU NVML does not know, or whose node is missing, is an error.
        let e = plan(GpuPath::Injected, &host, &["GPU-x".into()], None).unwrap_err();
        assert!(e.contains("GPU-x"), "{e}");
        let mut gone = host.clone();
        gone.dev_nodes.retain(|n| n != "nvidia1");
        let e = plan(GpuPath::Injected, &gone, &[B.into()], None).unwrap_err();
        assert!(e.contains("/dev/nvidia1"), "{e}");
    }

    #[test]
    fn toolkit_and_cdi_requests_name_only_the_assigned_gpus() {
        let host = h100_host();
        let t = plan(GpuPath::Toolkit, &host, &[A.into()], None).unwrap();
        assert_eq!(t.device_requests.len(), 1);
        assert_eq!(t.device_requests[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(t.device_requests[0].device_ids, Some(vec![A.to_string()]));
        assert!(t.devices.is_empty() && t.binds.is_empty() && t.env.is_empty());
        let c = plan(GpuPath::Cdi, &host, &[A.into(), B.into()], None).unwrap();
        assert_eq!(c.device_requests[0].driver.as_deref(), Some("cdi"));
        assert_eq!(
            c.device_requests[0].device_ids,
            Some(vec![
                format!("nvidia.com/gpu={A}"),
                format!("nvidia.com/gpu={B}")
            ])
        );
        // No GPUs asked: nothing added.
        assert_eq!(
            plan(GpuPath::Injected, &host, &[], None).unwrap(),
            GpuPlan::default()
        );
    }

    #[test]
    fn cdi_specs_name_their_devices() {
        let yaml = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"0\"\n  containerEdits: {}\n- name: GPU-5c8a\n- name: all\n";
        assert_eq!(
            parse_cdi(yaml),
            [
                "nvidia.com/gpu=0",
                "nvidia.com/gpu=GPU-5c8a",
                "nvidia.com/gpu=all"
            ]
        );
        let json = r#"{"cdiVersion":"0.5.0","kind":"vendor.com/fpga","devices":[{"name":"x"}]}"#;
        assert!(parse_cdi(json).is_empty());
    }
}
