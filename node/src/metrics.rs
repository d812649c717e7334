//! What a provider's monitoring reads: `GET /metrics` in Prometheus' text
//! format, `/healthz` and `/readyz`, on `kiln-node run --metrics ADDR`
//! (off unless given; bind it to loopback or a monitoring network).
//!
//! GPUs are reported under the names and labels NVIDIA's DCGM exporter
//! uses, so existing dashboards and alerts work unchanged; they are read
//! from NVML when scraped. Job, cache and transfer figures are Kiln's own.
//!
//! | series | type | what |
//! |---|---|---|
//! | `DCGM_FI_DEV_GPU_UTIL{gpu,UUID,device,modelName,Hostname}` | gauge | GPU utilization, % |
//! | `DCGM_FI_DEV_MEM_COPY_UTIL{…}` | gauge | memory bandwidth utilization, % |
//! | `DCGM_FI_DEV_FB_USED{…}`, `DCGM_FI_DEV_FB_FREE{…}` | gauge | framebuffer memory, MiB |
//! | `DCGM_FI_DEV_GPU_TEMP{…}` | gauge | temperature, °C |
//! | `DCGM_FI_DEV_POWER_USAGE{…}` | gauge | power draw, W |
//! | `kiln_node_slots`, `kiln_node_jobs_running` | gauge | job slots, and attempts held now |
//! | `kiln_node_jobs_finished_total{outcome}` | counter | attempts run to an outcome |
//! | `kiln_node_blob_cache_bytes`, `kiln_node_blob_cache_blobs` | gauge | the blob cache (inputs, outputs, image layers) |
//! | `kiln_node_image_cache_bytes`, `kiln_node_image_cache_images` | gauge | images this node loaded or pulled |
//! | `kiln_node_fetched_bytes_total` | counter | verified bytes fetched (inputs and images) |

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// Counters the node keeps (gauges are read when scraped).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Attempts finished, by outcome: succeeded, failed, timed out, cancelled.
    pub(crate) finished: [AtomicU64; 4],
    pub(crate) fetched_bytes: AtomicU64,
}

const OUTCOMES: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

impl Counters {
    pub(crate) fn finished(&self, outcome: kiln_protocol::Outcome) {
        use kiln_protocol::Outcome;
        let i = match outcome {
            Outcome::Succeeded => 0,
            Outcome::Failed => 1,
            Outcome::TimedOut => 2,
            Outcome::Cancelled => 3,
        };
        self.finished[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One GPU as NVML reports it now.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub util_percent: u32,
    pub mem_copy_util_percent: u32,
    pub fb_used_mib: u64,
    pub fb_free_mib: u64,
    pub temp_c: u32,
    pub power_w: f64,
}

/// Samples every GPU (none without NVML: a CPU-only provider).
pub fn sample_gpus() -> Vec<GpuSample> {
    let Ok(nvml) = nvml_wrapper::Nvml::init() else {
        return Vec::new();
    };
    let n = nvml.device_count().unwrap_or(0);
    (0..n)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let util = d.utilization_rates().ok();
            let mem = d.memory_info().ok();
            Some(GpuSample {
                index: i,
                uuid: d.uuid().unwrap_or_default(),
                name: d.name().unwrap_or_default(),
                util_percent: util.as_ref().map_or(0, |u| u.gpu),
                mem_copy_util_percent: util.as_ref().map_or(0, |u| u.memory),
                fb_used_mib: mem.as_ref().map_or(0, |m| m.used >> 20),
                fb_free_mib: mem.as_ref().map_or(0, |m| m.free >> 20),
                temp_c: d
                    .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                    .unwrap_or(0),
                power_w: d.power_usage().map_or(0.0, |mw| f64::from(mw) / 1000.0),
            })
        })
        .collect()
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The DCGM-named GPU families for `gpus` on `host` (pure: tested with
/// recorded samples).
pub fn render_gpus(out: &mut String, gpus: &[GpuSample], host: &str) {
    type Field = fn(&GpuSample) -> String;
    let fields: [(&str, &str, Field); 6] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| {
            g.util_percent.to_string()
        }),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            |g| g.mem_copy_util_percent.to_string(),
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            |g| g.fb_used_mib.to_string(),
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            |g| g.fb_free_mib.to_string(),
        ),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| {
            g.temp_c.to_string()
        }),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| {
            format!("{:.3}", g.power_w)
        }),
    ];
    for (name, help, value) in fields {
        family(out, name, "gauge", help);
        for g in gpus {
            let _ = writeln!(
                out,
                "{name}{{gpu=\"{}\",UUID=\"{}\",device=\"nvidia{}\",modelName=\"{}\",Hostname=\"{}\"}} {}",
                g.index,
                esc(&g.uuid),
                g.index,
                esc(&g.name),
                esc(host),
                value(g)
            );
        }
    }
}

fn render(state: &State, gpus: &[GpuSample]) -> String {
    let mut out = String::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    render_gpus(&mut out, gpus, &host);
    let running = state.jobs.lock().map_or(0, |j| j.attempts.len());
    let c = &state.counters;
    family(
        &mut out,
        "kiln_node_slots",
        "gauge",
        "Jobs this node runs at once.",
    );
    let _ = writeln!(out, "kiln_node_slots {}", state.config.slots);
    family(
        &mut out,
        "kiln_node_jobs_running",
        "gauge",
        "Attempts held now (running, or delivering their results).",
    );
    let _ = writeln!(out, "kiln_node_jobs_running {running}");
    family(
        &mut out,
        "kiln_node_jobs_finished_total",
        "counter",
        "Attempts run to an outcome since the node started.",
    );
    for (i, o) in OUTCOMES.iter().enumerate() {
        let _ = writeln!(
            out,
            "kiln_node_jobs_finished_total{{outcome=\"{o}\"}} {}",
            c.finished[i].load(Ordering::Relaxed)
        );
    }
    let usage = state.store.usage();
    family(
        &mut out,
        "kiln_node_blob_cache_bytes",
        "gauge",
        "Bytes of the blob cache on disk (inputs, outputs, image layers).",
    );
    let _ = writeln!(out, "kiln_node_blob_cache_bytes {}", usage.blobs);
    family(
        &mut out,
        "kiln_node_blob_cache_blobs",
        "gauge",
        "Blobs in the cache.",
    );
    let _ = writeln!(out, "kiln_node_blob_cache_blobs {}", usage.count);
    let images = state.images.summary();
    family(
        &mut out,
        "kiln_node_image_cache_bytes",
        "gauge",
        "Bytes of the images this node loaded or pulled.",
    );
    let _ = writeln!(out, "kiln_node_image_cache_bytes {}", images.bytes);
    family(
        &mut out,
        "kiln_node_image_cache_images",
        "gauge",
        "Images this node loaded or pulled.",
    );
    let _ = writeln!(out, "kiln_node_image_cache_images {}", images.count);
    family(
        &mut out,
        "kiln_node_fetched_bytes_total",
        "counter",
        "Verified bytes fetched from the coordinator and peers (inputs and images).",
    );
    let _ = writeln!(
        out,
        "kiln_node_fetched_bytes_total {}",
        c.fetched_bytes.load(Ordering::Relaxed)
    );
    out
}

async fn metrics(AxState(state): AxState<Arc<State>>) -> impl IntoResponse {
    let gpus = tokio::task::spawn_blocking(sample_gpus)
        .await
        .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&state, &gpus),
    )
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `cancel`;
/// returns the bound address.
pub(crate) async fn serve(
    state: Arc<State>,
    addr: SocketAddr,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(|AxState(s): AxState<Arc<State>>| async move {
                let draining = s.jobs.lock().map_or(true, |j| j.draining);
                if draining {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else {
                    (axum::http::StatusCode::OK, "ready\n")
                }
            }),
        )
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_carry_dcgm_names_and_labels() {
        let g = GpuSample {
            index: 0,
            uuid: "GPU-4a3f".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            util_percent: 97,
            mem_copy_util_percent: 41,
            fb_used_mib: 70_000,
            fb_free_mib: 11_559,
            temp_c: 63,
            power_w: 612.25,
        };
        let mut out = String::new();
        render_gpus(&mut out, &[g], "h\"1");
        assert!(out.contains(
            "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-4a3f\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h\\\"1\"} 97\n"
        ), "{out}");
        assert!(out.contains("DCGM_FI_DEV_FB_USED{gpu=\"0\""), "{out}");
        assert!(out.contains("} 612.250\n"), "{out}");
        assert!(out.contains("# TYPE DCGM_FI_DEV_GPU_TEMP gauge"), "{out}");
        // No GPUs: the families are declared, with no samples.
        let mut none = String::new();
        render_gpus(&mut none, &[], "h");
        assert_eq!(none.lines().filter(|l| !l.starts_with('#')).count(), 0);
    }
}
