//! Command-line arguments of `kiln-node run`, turned into a [`NodeConfig`].

use std::path::PathBuf;

use kiln_protocol::Credits;

use crate::NodeConfig;
use crate::runner::Policy;

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
    /// The coordinator's multiaddr, ending in /p2p/<peer id>.
    #[arg(long, env = "KILN_COORDINATOR_ADDR")]
    pub coordinator: kiln_net::Addr,
    /// Where the identity key and job directories live.
    #[arg(long, env = "KILN_NODE_STATE", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    pub listen: kiln_net::Addr,
    /// Jobs to run at once.
    #[arg(long, default_value_t = 2)]
    pub slots: u32,
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
    /// Size of each job's output area, e.g. 1GiB.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub max_output: u64,
    /// Log bytes kept per stream per job, e.g. 4MiB.
    #[arg(long, value_parser = parse_size, default_value = "4MiB")]
    pub log_cap: u64,
}

impl RunArgs {
    pub fn into_config(self) -> NodeConfig {
        let mut c = NodeConfig::new(self.coordinator, self.state_dir);
        c.listen = self.listen;
        c.slots = self.slots;
        c.price_per_cpu_hour = Credits(self.price_per_cpu_hour);
        c.price_per_gpu_hour = Credits(self.price_per_gpu_hour);
        c.policy = Policy {
            allow_network: self.allow_network,
            runtime: self.runtime,
            image_allow: self.image_allow,
            image_deny: self.image_deny,
            max_image_bytes: self.max_image_size.unwrap_or(0),
        };
        c.limits.max_output_bytes = self.max_output;
        c.limits.log_cap_bytes = self.log_cap;
        c
    }
}
