//! The only `unsafe` code of kiln-node: thin wrappers over cudarc's CUDA
//! driver and cuBLAS calls, and the `dlopen` that finds cuBLAS outside the
//! loader path. Everything above this module is safe code.
//!
//! cudarc loads `libcuda.so.1` and `libcublas.so.13` by name at first use
//! and *panics* if they are missing, so every entry point here first checks
//! that the library is present ([`driver_present`], [`cublas`]).
//!
//! Finding cuBLAS: cudarc `dlopen`s names (`libcublas.so`, …,
//! `libcublas.so.13`), which only searches the loader path. CUDA toolkits
//! install cuBLAS under `/usr/local/cuda/targets/x86_64-linux/lib`, which is
//! often not on it, and `LD_LIBRARY_PATH` cannot be changed for a running
//! process. So [`cublas`] first tries the name, then `dlopen`s
//! `libcublasLt.so.13` and `libcublas.so.13` by absolute path (with
//! `RTLD_GLOBAL`) from `KILN_CUBLAS_DIR`, `$CUDA_HOME`/`$CUDA_PATH` and the
//! usual toolkit directories. The dynamic loader then resolves cudarc's later
//! `dlopen("libcublas.so.13")` to the already loaded library by its soname.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PinnedHostSlice,
    result as drv, sys,
};
use kiln_protocol::Precision;

/// The PTX of the driver-only FP32 kernel (checked with `ptxas` for sm_70,
/// sm_80 and sm_90).
pub const SGEMM_PTX: &str = include_str!("sgemm.ptx");
const SGEMM_ENTRY: &str = "kiln_sgemm";

/// The cuBLAS major version the bindings were generated for (cudarc's
/// `cuda-13000` feature).
pub const CUBLAS_MAJOR: u32 = 13;

/// Whether `libcuda` can be loaded (the NVIDIA driver is installed).
pub fn driver_present() -> bool {
    // SAFETY: only dlopens candidate names and drops the handles; no CUDA
    // function is called.
    unsafe { sys::is_culib_present() }
}

/// The CUDA version the driver supports (`13000` for 13.0), if the driver
/// library is present and answers.
pub fn driver_version() -> Option<i32> {
    if !driver_present() {
        return None;
    }
    let mut v: c_int = 0;
    // SAFETY: the library is present (checked above, so cudarc's loader does
    // not panic); cuDriverGetVersion writes one int and needs no cuInit.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::cudaError_enum::CUDA_SUCCESS).then_some(v)
}

/// Number of CUDA devices, or why none can be used.
pub fn device_count() -> Result<usize, String> {
    if !driver_present() {
        return Err("the CUDA driver library (libcuda.so.1) is not installed".into());
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("the CUDA driver did not initialise: {e}"))
}

unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Loads a shared library for the rest of the process's life.
fn dlopen_global(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string; the handle is kept
    // (never dlclosed) so the library stays mapped while cudarc uses it.
    // Library initialisers of cuBLAS run here as they would under cudarc.
    !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
}

/// Directories searched for cuBLAS after the loader path.
pub fn cublas_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KILN_CUBLAS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("targets/x86_64-linux/lib"));
            dirs.push(root.join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/local/cuda/lib64".into());
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/local")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("cuda-{CUBLAS_MAJOR}")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort();
    versioned.reverse(); // newest minor first
    for root in versioned {
        dirs.push(root.join("targets/x86_64-linux/lib"));
        dirs.push(root.join("lib64"));
    }
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.push("/opt/cuda/lib64".into());
    dirs
}

/// Where cuBLAS was found.
#[derive(Clone, Debug)]
pub struct CublasLib {
    /// The file mapped into this process (from `/proc/self/maps`).
    pub path: String,
    /// How it was found.
    pub how: String,
}

static CUBLAS: OnceLock<Result<CublasLib, String>> = OnceLock::new();

fn mapped_path(needle: &str) -> Option<String> {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| {
                    Path::new(p)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(needle))
                })
                .map(str::to_string)
        })
}

fn cudarc_finds_cublas() -> bool {
    // SAFETY: only dlopens candidate names and drops the handles.
    unsafe { blas_sys::is_culib_present() }
}

fn locate_cublas() -> Result<CublasLib, String> {
    let soname = format!("libcublas.so.{CUBLAS_MAJOR}");
    let lt = format!("libcublasLt.so.{CUBLAS_MAJOR}");
    let explicit = std::env::var_os("KILN_CUBLAS_DIR").is_some();
    if !explicit && dlopen_global(&soname) && cudarc_finds_cublas() {
        return Ok(CublasLib {
            path: mapped_path("libcublas.so").unwrap_or(soname),
            how: "loader path".into(),
        });
    }
    let dirs = cublas_search_dirs();
    for dir in &dirs {
        let (lt_path, blas_path) = (dir.join(&lt), dir.join(&soname));
        if !blas_path.exists() {
            continue;
        }
        if lt_path.exists() {
            dlopen_global(&lt_path.to_string_lossy());
        }
        if dlopen_global(&blas_path.to_string_lossy()) && cudarc_finds_cublas() {
            return Ok(CublasLib {
                path: mapped_path("libcublas.so")
                    .unwrap_or_else(|| blas_path.display().to_string()),
                how: format!("preloaded from {}", dir.display()),
            });
        }
    }
    Err(format!(
        "cuBLAS {CUBLAS_MAJOR} ({soname}) is not on the loader path nor in {}; install it (`sudo apt install libcublas-13-0`, part of the CUDA 13 toolkit) or set KILN_CUBLAS_DIR to the directory holding {soname}",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// cuBLAS, found once per process (see the module docs).
pub fn cublas() -> Result<&'static CublasLib, &'static str> {
    CUBLAS
        .get_or_init(locate_cublas)
        .as_ref()
        .map_err(String::as_str)
}

/// One GPU opened for benchmarking: a context and one stream.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Gpu {
    /// Opens CUDA device `ordinal`. Check [`driver_present`] first.
    pub fn open(ordinal: usize) -> Result<Self, DriverError> {
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: the benchmark issues all work on this one stream, in
        // order, so cudarc's per-buffer events (which only order work across
        // streams) are not needed; turning them off keeps their recording out
        // of the timed loops.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream })
    }

    /// The device's UUID in NVML's form (`GPU-xxxxxxxx-xxxx-…`).
    pub fn uuid(&self) -> Option<String> {
        let u = self.ctx.uuid().ok()?;
        let b: Vec<u8> = u.bytes.iter().map(|&c| c as u8).collect();
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Some(format!(
            "GPU-{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }

    /// Page-locked host memory, zero-filled (which also faults every page
    /// in before anything is timed).
    pub fn pinned_zeroed(&self, len: usize) -> Result<PinnedHostSlice<u8>, DriverError> {
        // SAFETY: flags 0 (`cuMemHostAlloc` default, as PyTorch's
        // pin_memory); the memory is uninitialised only until the fill below,
        // and nothing reads it before.
        let mut p = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
        p.as_mut_slice()?.fill(0);
        Ok(p)
    }
}

/// A cuBLAS handle on a GPU's stream.
pub struct Blas {
    inner: CudaBlas,
    stream: Arc<CudaStream>,
}

fn square(n: usize, lens: [usize; 3]) -> Result<i32, String> {
    let nn = n.checked_mul(n).ok_or("matrix size overflows")?;
    if lens.iter().any(|&l| l < nn) {
        return Err(format!("buffers hold {lens:?} elements, {nn} needed"));
    }
    i32::try_from(n).map_err(|_| format!("n = {n} does not fit cuBLAS's int"))
}

impl Blas {
    /// Check [`cublas`] first: cudarc panics if the library is missing.
    pub fn new(gpu: &Gpu) -> Result<Self, String> {
        cublas().map_err(str::to_string)?;
        let inner = CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cublasCreate: {e}"))?;
        Ok(Self {
            inner,
            stream: gpu.stream.clone(),
        })
    }

    /// `C = A·B` for `n × n` row-major BF16 or FP16 matrices, FP32 compute
    /// (`cublasGemmEx`). Row-major `C = A·B` is column-major `Cᵀ = Bᵀ·Aᵀ`,
    /// so B is passed first.
    pub fn gemm_half(
        &self,
        precision: Precision,
        n: usize,
        a: &CudaSlice<u16>,
        b: &CudaSlice<u16>,
        c: &mut CudaSlice<u16>,
    ) -> Result<(), String> {
        let dt = match precision {
            Precision::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Precision::Fp16 => blas_sys::cudaDataType::CUDA_R_16F,
            other => return Err(format!("gemm_half does not do {other}")),
        };
        let ni = square(n, [a.len(), b.len(), c.len()])?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: the three device buffers hold at least n·n elements of the
        // declared type (checked by `square`) and live across the call; alpha
        // and beta are host f32s as the default pointer mode and the FP32
        // compute type require; the handle is bound to this stream.
        unsafe {
            blas::gemm_ex(
                *self.inner.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ni,
                ni,
                (&alpha as *const f32).cast(),
                pb as *const c_void,
                dt,
                ni,
                pa as *const c_void,
                dt,
                ni,
                (&beta as *const f32).cast(),
                pc as *mut c_void,
                dt,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cublasGemmEx ({precision}): {e}"))
    }

    /// `C = A·B` for `n × n` row-major FP32 matrices (`cublasSgemm`, default
    /// math mode: true FP32, no TF32).
    pub fn sgemm(
        &self,
        n: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        let ni = square(n, [a.len(), b.len(), c.len()])?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: as in `gemm_half`, with f32 buffers of at least n·n elements.
        unsafe {
            blas::sgemm(
                *self.inner.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ni,
                ni,
                &alpha,
                pb as *const f32,
                ni,
                pa as *const f32,
                ni,
                &beta,
                pc as *mut f32,
                ni,
            )
        }
        .map_err(|e| format!("cublasSgemm: {e}"))
    }
}

/// The driver-only FP32 kernel ([`SGEMM_PTX`]), JIT-compiled by the driver.
pub struct PtxGemm {
    module: sys::CUmodule,
    func: sys::CUfunction,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl PtxGemm {
    pub fn load(gpu: &Gpu) -> Result<Self, String> {
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))?;
        let src = CString::new(SGEMM_PTX).map_err(|e| format!("PTX has a NUL byte: {e}"))?;
        // SAFETY: `src` is a NUL-terminated PTX text, alive for the call; the
        // context is current on this thread.
        let module = unsafe { drv::module::load_data(src.as_ptr().cast()) }
            .map_err(|e| format!("cuModuleLoadData (PTX JIT): {e}"))?;
        let name = CString::new(SGEMM_ENTRY).map_err(|e| e.to_string())?;
        // SAFETY: `module` was just loaded and is not unloaded before Drop.
        let func = match unsafe { drv::module::get_function(module, name) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: `module` is valid and unused from here on.
                let _ = unsafe { drv::module::unload(module) };
                return Err(format!("cuModuleGetFunction({SGEMM_ENTRY}): {e}"));
            }
        };
        Ok(Self {
            module,
            func,
            ctx: gpu.ctx.clone(),
            stream: gpu.stream.clone(),
        })
    }

    /// `C = A·B`, `n × n` row-major FP32.
    pub fn launch(
        &self,
        n: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        let ni = square(n, [a.len(), b.len(), c.len()])?;
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        let (mut pa, mut pb, mut pc, mut nn) = (pa, pb, pc, ni as u32);
        let mut params: [*mut c_void; 4] = [
            (&mut pa as *mut u64).cast(),
            (&mut pb as *mut u64).cast(),
            (&mut pc as *mut u64).cast(),
            (&mut nn as *mut u32).cast(),
        ];
        let blocks = (ni as c_uint).div_ceil(16);
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))?;
        // SAFETY: the kernel's parameters are (u64 a, u64 b, u64 c, u32 n)
        // and `params` points at values of exactly those types, alive for the
        // call; the buffers hold n·n f32s (checked by `square`) and the grid
        // covers n × n threads, each bounds-checked in the kernel.
        unsafe {
            drv::launch_kernel(
                self.func,
                (blocks, blocks, 1),
                (16, 16, 1),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| format!("cuLaunchKernel: {e}"))
    }
}

impl Drop for PtxGemm {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the module was loaded in `load` and is unloaded once; no
        // launch is pending past the stream synchronisation callers do.
        let _ = unsafe { drv::module::unload(self.module) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_without_a_gpu_never_panics() {
        // On a machine without the driver these are "absent" answers; with
        // one, real answers. Either way nothing panics.
        let present = driver_present();
        assert_eq!(
            driver_version().is_some(),
            present && driver_version().is_some()
        );
        if !present {
            assert!(device_count().is_err());
        }
        match cublas() {
            Ok(lib) => assert!(lib.path.contains("cublas")),
            Err(e) => assert!(e.contains("KILN_CUBLAS_DIR"), "{e}"),
        }
    }

    #[test]
    fn search_covers_the_toolkit_directory() {
        let dirs = cublas_search_dirs();
        assert!(
            dirs.iter()
                .any(|d| d == Path::new("/usr/local/cuda/targets/x86_64-linux/lib"))
        );
    }

    #[test]
    fn ptx_is_one_entry_point_with_four_parameters() {
        assert!(SGEMM_PTX.contains(".visible .entry kiln_sgemm("));
        let params = SGEMM_PTX
            .lines()
            .filter(|l| l.trim_start().starts_with(".param "))
            .count();
        assert_eq!(params, 4);
        assert!(SGEMM_PTX.contains(".target sm_70"));
        assert!(!SGEMM_PTX.contains('\0'));
    }
}
