//! Command-line arguments of `kiln-node run` (turned into a [`NodeConfig`]),
//! `kiln-node benchmark` and `kiln-node doctor`.

use std::path::PathBuf;
use std::time::Duration;

use kiln_protocol::{Credits, Nonce};

use crate::bench::{self, BenchOptions, EngineChoice};
use crate::config::NodeConfig;
use crate::doctor::DoctorOptions;
use crate::idle::{IdlePolicy, OwnerPolicy};
use crate::runner::Policy;
use crate::{gpu, hw};

fn parse_size(s: &str) -> Result<u64, String> {
    kiln_protocol::units::parse_byte_size(s)
}

fn default_state_dir() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln-node")
}

/// Join a coordinator and run buyers' jobs until Ctrl-C.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A TOML file of these settings (keys are the flags' names; flags
    /// given here win). `kiln-node config init` writes one with every
    /// default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The coordinator's multiaddr, ending in /p2p/<peer id>.
    #[arg(long, env = "KILN_COORDINATOR_ADDR")]
    pub coordinator: kiln_net::Addr,
    /// Where the identity key and job directories live.
    #[arg(long, env = "KILN_NODE_STATE", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    pub listen: kiln_net::Addr,
    /// Jobs to run at once [default: 2, or 1 on a one-core machine]; at
    /// most the number of CPU cores unless --overcommit-slots.
    #[arg(long)]
    pub slots: Option<u32>,
    /// Allow --slots above the number of CPU cores (jobs asking for less
    /// than a core may then share one; no more CPUs than cores are booked).
    #[arg(long)]
    pub overcommit_slots: bool,
    /// Price per CPU-hour in micro-credits.
    #[arg(long, default_value_t = 100_000)]
    pub price_per_cpu_hour: u64,
    /// Price per GPU-hour in micro-credits.
    #[arg(long, default_value_t = 2_000_000)]
    pub price_per_gpu_hour: u64,
    /// Let jobs that ask for `network = "full"` use the network.
    #[arg(long)]
    pub allow_network: bool,
    /// OCI runtime for jobs, e.g. `runsc` (gVisor); the engine's default if unset.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Only run images matching these ids or repository prefixes (repeatable).
    #[arg(long = "image-allow")]
    pub image_allow: Vec<String>,
    /// Never run images matching these ids or repository prefixes (repeatable).
    #[arg(long = "image-deny")]
    pub image_deny: Vec<String>,
    /// Largest image accepted, e.g. 10GiB (no limit if unset).
    #[arg(long, value_parser = parse_size)]
    pub max_image_size: Option<u64>,
    /// A registry host jobs' images may be pulled from by digest
    /// (`ghcr.io`, `127.0.0.1:5000`; repeatable). None by default: jobs
    /// then bring images as kiln:<cid> (`kiln image push`).
    #[arg(long = "registry-allow")]
    pub registry_allow: Vec<String>,
    /// Longest a registry pull may take, in seconds.
    #[arg(long, default_value_t = 600)]
    pub pull_timeout: u64,
    /// Most bytes the images this node loads or pulls may take in the
    /// engine, e.g. 20GiB; least recently used ones not in use are removed.
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    pub image_cache: u64,
    /// Load Kiln images as `docker load` archives once fetched, instead of
    /// the engine pulling them from this node's loopback registry as their
    /// layers arrive (used anyway when DOCKER_HOST is not a local socket).
    #[arg(long)]
    pub image_load_archive: bool,
    /// Serve Prometheus `/metrics` (GPUs under DCGM's names), `/healthz`
    /// and `/readyz` on this address, e.g. 127.0.0.1:9101.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Size of each job's output area, e.g. 1GiB.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub max_output: u64,
    /// Most entries (files, directories, links) a job may leave in its
    /// output area; a job over it fails when its outputs are collected.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_output_files: u64,
    /// tmpfs lent to the volumes a job's image declares (`VOLUME`), shared
    /// evenly among them and counted in the job's memory, e.g. 256MiB (0:
    /// images that declare a volume are refused).
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub volume_size: u64,
    /// Size of each job's /dev/shm, counted in its memory, e.g. 1GiB (0: no
    /// /dev/shm).
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub shm_size: u64,
    /// Most processes and threads a job may ask for (`resources.pids`);
    /// offers asking for more are refused.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(8..=65_536))]
    pub max_pids: u32,
    /// Stake bond to hold with the coordinator, in micro-credits.
    #[arg(long)]
    pub stake: Option<u64>,
    /// Log bytes kept per stream per job, e.g. 4MiB.
    #[arg(long, value_parser = parse_size, default_value = "4MiB")]
    pub log_cap: u64,
    /// Disk for the blob cache (inputs and outputs, verified, LRU-evicted;
    /// never a blob a running job uses), e.g. 200GiB.
    #[arg(long, value_parser = parse_size, default_value = "50GiB")]
    pub cache_size: u64,
    /// Also fetch URL inputs from loopback, private (10/8, 172.16/12,
    /// 192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata
    /// service, fe80::/10) and other non-global addresses. Off by default:
    /// a buyer's URL must not reach this machine's own services or its LAN.
    #[arg(long)]
    pub allow_private_urls: bool,
    /// Take offers only after the GPUs have been free of their owner's work
    /// (non-Kiln processes, utilization) for this many seconds (0: as soon as
    /// they are free; a CPU-only machine always is).
    #[arg(long, default_value_t = 0)]
    pub idle_for: u64,
    /// When the owner starts using a GPU: let running jobs finish, or stop
    /// them at once (the coordinator requeues them as `preempted_by_owner`).
    #[arg(long, value_enum, default_value_t = OwnerPolicy::Finish)]
    pub owner_policy: OwnerPolicy,
    /// Also take no offers while an interactive user is active (a terminal
    /// login with input within --idle-for, or the last minute).
    #[arg(long)]
    pub require_no_user: bool,
    /// Where this machine is, e.g. `eu-west-1`: a job asking for region `eu`
    /// or `eu-west` may run here. Unset: jobs that ask for a region are not
    /// placed here.
    #[arg(long, value_parser = parse_region)]
    pub region: Option<String>,
    /// Disk lent to jobs in all, e.g. 100GiB, at most what is free on the
    /// filesystem of --state-dir (0: jobs asking for disk are not placed
    /// here).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub disk: u64,
}

/// A region name: lower-case ASCII letters, digits and `-`, not starting or
/// ending with `-`, at most 64 characters (`eu-west-1`).
pub fn parse_region(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a region name: use lower-case letters, digits and `-`, like `eu-west-1`"
        ))
    }
}

impl RunArgs {
    pub fn into_config(self) -> NodeConfig {
        let mut c = NodeConfig::new(self.coordinator, self.state_dir);
        c.listen = self.listen;
        if let Some(slots) = self.slots {
            c.slots = slots;
        }
        c.overcommit_slots = self.overcommit_slots;
        c.price_per_cpu_hour = Credits(self.price_per_cpu_hour);
        c.price_per_gpu_hour = Credits(self.price_per_gpu_hour);
        c.policy = Policy {
            allow_network: self.allow_network,
            runtime: self.runtime,
            image_allow: self.image_allow,
            image_deny: self.image_deny,
            max_image_bytes: self.max_image_size.unwrap_or(0),
            registries: self.registry_allow,
            pull_timeout: Duration::from_secs(self.pull_timeout),
        };
        c.image_cache = self.image_cache;
        c.image_load_archive = self.image_load_archive;
        c.metrics_listen = self.metrics;
        c.limits.max_output_bytes = self.max_output;
        c.limits.max_output_files = self.max_output_files;
        c.limits.volume_size_bytes = self.volume_size;
        c.limits.shm_size_bytes = self.shm_size;
        c.limits.max_pids = self.max_pids;
        c.limits.log_cap_bytes = self.log_cap;
        c.cache_quota = Some(self.cache_size);
        c.allow_private_urls = self.allow_private_urls;
        c.stake = self.stake.map(Credits);
        c.region = self.region;
        c.disk = kiln_protocol::ByteSize(self.disk);
        c.idle = IdlePolicy {
            idle_for: Duration::from_secs(self.idle_for),
            require_no_user: self.require_no_user,
            on_owner_return: self.owner_policy,
            ..IdlePolicy::default()
        };
        c
    }
}

fn parse_nonce(s: &str) -> Result<Nonce, String> {
    s.parse::<Nonce>().map_err(|e| e.to_string())
}

/// Run Kiln's GPU job: multiply two seeded n x n FP32 matrices on CUDA
/// device 0 with Kiln's PTX kernel, check sampled entries on the CPU, write
/// the product's BLAKE3 to `<out>/gemm.txt` (deterministic: the same on
/// every GPU) and print the timing as one JSON line. This is the workload of
/// Kiln's GPU image; run on bare metal, the same binary gives the figure a
/// job's container is compared with. Exit code: 0; 1 a wrong product or a
/// CUDA failure; 2 no GPU driver or a bad size.
#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Matrix size (n x n), at most 262144.
    #[arg(default_value_t = 4096)]
    pub n: u32,
    /// Seed of the inputs.
    #[arg(default_value_t = 42)]
    pub seed: u64,
    /// Timed multiplications (the fastest is reported).
    #[arg(long, default_value_t = 10)]
    pub repeats: u32,
    /// Where `gemm.txt` goes (default: $KILN_OUTPUT_DIR, else /out in a
    /// job's container, else the current directory).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// `kiln-node gemm`: the exit code.
pub fn gemm(args: GemmArgs) -> i32 {
    let out = args.out.unwrap_or_else(|| {
        std::env::var_os("KILN_OUTPUT_DIR")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let job_out = std::path::Path::new("/out");
                if job_out.is_dir() {
                    job_out.to_path_buf()
                } else {
                    std::path::PathBuf::from(".")
                }
            })
    });
    match bench::gemm_job::run(args.n, args.seed, args.repeats, &out) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                0
            }
            Err(e) => {
                eprintln!("kiln-node gemm: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("kiln-node gemm: {e}");
            e.exit_code()
        }
    }
}

/// Measure this machine's CPU and GPUs (the figures a provider advertises).
///
/// CPU: FP64 matmul and memory copy bandwidth. Each GPU: BF16, FP16 and FP32
/// matmul throughput (cuBLAS, or Kiln's driver-only kernel), device copy and
/// pinned host<->device bandwidth. Inputs are random, seeded by a nonce;
/// every matmul result carries a checksum and sampled values anyone can
/// verify. Exit code: 0, or 1 when GPUs exist but none could be measured.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print the full report as JSON on stdout (logs go to stderr).
    #[arg(long)]
    pub json: bool,
    /// GPU matrix size (n x n x n matmuls).
    #[arg(long, default_value_t = bench::DEFAULT_GPU_N)]
    pub size: u32,
    /// CPU matrix size.
    #[arg(long, default_value_t = bench::DEFAULT_CPU_N)]
    pub cpu_size: u32,
    /// GPU matmul engine: cuBLAS if present (auto), cuBLAS only, or Kiln's
    /// driver-only PTX kernel (FP32).
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Input seed, 32 hex digits (random if unset).
    #[arg(long, value_parser = parse_nonce)]
    pub nonce: Option<Nonce>,
    /// Bytes per copy in the GPU bandwidth tests, in MiB.
    #[arg(long, default_value_t = bench::DEFAULT_COPY_BYTES >> 20)]
    pub copy_mib: u64,
    /// Sampled output elements per matmul proof.
    #[arg(long, default_value_t = bench::DEFAULT_SAMPLES)]
    pub samples: u32,
    /// Skip the GPU benchmarks.
    #[arg(long)]
    pub no_gpu: bool,
    /// Where the result is cached (benchmark.json) for `kiln-node run`.
    #[arg(long, env = "KILN_NODE_STATE", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
}

/// Runs `kiln-node benchmark`; returns the process exit code (0, or 1 when
/// GPUs exist but none could be measured).
pub fn benchmark(args: BenchArgs) -> i32 {
    let discovery = gpu::discover();
    let cpu_model = hw::cpu_model();
    let nonce = args.nonce.unwrap_or_else(Nonce::random);
    let mut opts = BenchOptions::full(nonce, !args.no_gpu);
    opts.cpu.matmul_n = args
        .cpu_size
        .clamp(16, kiln_protocol::bench::MAX_CPU_MATMUL_N);
    opts.cpu.samples = args.samples;
    if let Some(g) = opts.gpu.as_mut() {
        g.matmul_n = args.size.clamp(16, kiln_protocol::bench::MAX_GPU_MATMUL_N);
        g.engine = args.engine;
        g.copy_bytes = args.copy_mib.max(1) << 20;
        g.samples = args.samples;
    }
    let out = bench::run(&opts, &discovery, &cpu_model);
    if let Err(e) = bench::save_cache(&args.state_dir, &out.hardware, &out.report) {
        tracing::warn!(
            "could not cache the benchmark in {}: {e}",
            args.state_dir.display()
        );
    }
    if args.json {
        match serde_json::to_string_pretty(&out) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("cannot encode the report: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", bench::render(&out));
    }
    let gpus_failed = !args.no_gpu && !discovery.gpus.is_empty() && out.report.gpus.is_empty();
    i32::from(gpus_failed)
}

/// Check that this machine is ready to be a provider.
///
/// Exit code: 0 every check passed (or was skipped), 1 at least one check
/// failed, 2 no failure but at least one warning (e.g. no NVIDIA driver:
/// CPU-only). Every warning and failure names its fix.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print the checks as JSON on stdout: {"checks": [{"name", "status":
    /// "ok"|"warn"|"fail"|"skip", "detail", "fix"}], "exit_code"}.
    #[arg(long)]
    pub json: bool,
    /// The coordinator's multiaddr (…/p2p/<peer id>), to check it is reachable.
    #[arg(long, env = "KILN_COORDINATOR_ADDR")]
    pub coordinator: Option<kiln_net::Addr>,
    /// The coordinator's HTTP URL, to measure clock skew from its Date header.
    #[arg(long, env = "KILN_COORDINATOR")]
    pub coordinator_http: Option<String>,
    /// The address `kiln-node run --listen` will use, to check the port is free.
    #[arg(long)]
    pub listen: Option<kiln_net::Addr>,
    /// The node's state directory (identity key, job files, benchmark cache).
    #[arg(long, env = "KILN_NODE_STATE", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// The registries `kiln-node run --registry-allow` will allow, to
    /// report the policy and check each answers.
    #[arg(long = "registry-allow")]
    pub registry_allow: Vec<String>,
    /// The image cache size `kiln-node run --image-cache` will use.
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    pub image_cache: u64,
}

/// Runs `kiln-node doctor`; returns the exit code (0 ok, 1 fail, 2 warnings).
pub async fn doctor(args: DoctorArgs) -> i32 {
    let report = crate::doctor::run(&DoctorOptions {
        state_dir: args.state_dir,
        coordinator: args.coordinator,
        coordinator_http: args.coordinator_http,
        listen: args.listen,
        registries: args.registry_allow,
        image_cache: args.image_cache,
    })
    .await;
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("cannot encode the report: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", crate::doctor::render(&report));
    }
    report.exit_code
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(extra: &[&str]) -> Result<NodeConfig, clap::Error> {
        let peer = kiln_protocol::ProviderId::from_public_key(
            &kiln_protocol::Keypair::generate().public(),
        );
        let addr = format!("/ip4/127.0.0.1/tcp/4730/p2p/{peer}");
        let mut args = vec!["kiln-node", "--coordinator", addr.as_str()];
        args.extend_from_slice(extra);
        Cmd::try_parse_from(args).map(|c| c.run.into_config())
    }

    #[test]
    fn private_urls_are_refused_unless_the_flag_allows_them() {
        assert!(!parse(&[]).unwrap().allow_private_urls);
        assert!(parse(&["--allow-private-urls"]).unwrap().allow_private_urls);
    }

    #[test]
    fn region_and_disk_flags_reach_the_config() {
        let c = parse(&["--region", "eu-west-1", "--disk", "100GiB"]).unwrap();
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.disk, kiln_protocol::ByteSize(100 << 30));
        let c = parse(&[]).unwrap();
        assert_eq!((c.region, c.disk), (None, kiln_protocol::ByteSize(0)));
        for bad in ["EU", "eu west", "-eu", "eu-", ""] {
            let arg = format!("--region={bad}");
            let e = parse(&[&arg]).unwrap_err().to_string();
            assert!(e.contains("not a region name"), "{bad}: {e}");
        }
        assert!(parse(&["--disk", "lots"]).is_err());
    }

    #[test]
    fn slots_default_to_what_the_machine_has_and_overcommit_is_explicit() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.slots, hw::logical_cores().clamp(1, 2));
        assert!(!c.overcommit_slots);
        let c = parse(&["--slots", "64", "--overcommit-slots"]).unwrap();
        assert_eq!((c.slots, c.overcommit_slots), (64, true));
    }

    #[test]
    fn sandbox_limit_flags_reach_the_config_with_their_defaults() {
        let d = parse(&[]).unwrap().limits;
        assert_eq!(
            (
                d.max_output_files,
                d.volume_size_bytes,
                d.shm_size_bytes,
                d.max_pids
            ),
            (10_000, 64 << 20, 64 << 20, 4096)
        );
        let c = parse(&[
            "--max-output-files",
            "500",
            "--volume-size",
            "1GiB",
            "--shm-size",
            "0",
            "--max-pids",
            "512",
        ])
        .unwrap()
        .limits;
        assert_eq!(
            (
                c.max_output_files,
                c.volume_size_bytes,
                c.shm_size_bytes,
                c.max_pids
            ),
            (500, 1 << 30, 0, 512)
        );
        assert!(parse(&["--max-pids", "100000"]).is_err());
        assert!(parse(&["--max-output-files", "0"]).is_err());
    }
}
