//! Scheduler benchmark:
//!
//! ```sh
//! cargo run --release -p kiln-coordinator --example bench_scheduler -- \
//!     [--providers 10000] [--jobs 100000] [--seed 1] [--json]
//! ```

use kiln_coordinator::bench::bench_scheduler;

fn main() {
    let mut providers = 10_000usize;
    let mut jobs = 100_000usize;
    let mut seed = 1u64;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| {
                    eprintln!("{what} needs a number");
                    std::process::exit(2)
                })
        };
        match a.as_str() {
            "--providers" => providers = num("--providers") as usize,
            "--jobs" => jobs = num("--jobs") as usize,
            "--seed" => seed = num("--seed"),
            "--json" => json = true,
            _ => {
                eprintln!("usage: bench_scheduler [--providers N] [--jobs N] [--seed N] [--json]");
                std::process::exit(2);
            }
        }
    }
    let report = bench_scheduler(providers, jobs, seed);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("{report}");
    }
}
