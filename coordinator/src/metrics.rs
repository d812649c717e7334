//! What an operator's monitoring reads: `GET /metrics` in Prometheus'
//! text format, `GET /healthz` (the process answers) and `GET /readyz`
//! (it can serve: the database answers).
//!
//! Gauges are read when scraped, from what the coordinator already keeps
//! (job and verification counts through their indexes, the live fleet,
//! the ledger's head and totals), so nothing is counted twice and a
//! restart loses nothing. The HTTP latency histogram is the only state of
//! its own: per route template (never per raw path, so its size is fixed
//! by the router) and method, filled by [`record`] around every request.
//!
//! | series | type | what |
//! |---|---|---|
//! | `kiln_jobs{state}` | gauge | jobs in each state |
//! | `kiln_queue_depth` | gauge | jobs waiting to be placed |
//! | `kiln_providers_online` | gauge | providers in the live fleet |
//! | `kiln_verifications{status}` | gauge | audit records by status (`pending`, `disputed`, `verified`, …) |
//! | `kiln_capability_audits{outcome}` | gauge | capability challenges by outcome |
//! | `kiln_ledger_entries` | gauge | entries in the signed ledger |
//! | `kiln_ledger_fees_microcredits`, `kiln_ledger_burned_microcredits` | gauge | the marketplace's fee account, and slashed stake burned |
//! | `kiln_http_request_duration_seconds{route,method}` | histogram | API latency |

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_contracts::AccountId;

use crate::AppState;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// One latency histogram.
#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Counts per bucket (not cumulative), then the overflow.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
    }
}

/// The HTTP latency histograms, by (route template, method).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    by_route: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl HttpMetrics {
    fn observe(&self, route: String, method: String, d: Duration) {
        let mut m = self
            .by_route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry((route, method)).or_default().observe(d);
    }

    fn snapshot(&self) -> BTreeMap<(String, String), Histogram> {
        self.by_route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Middleware: times every request under its route template.
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    state.http_metrics.observe(route, method, t0.elapsed());
    resp
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the database answers (503 with the reason if not).
pub async fn readyz(State(state): State<AppState>) -> Response {
    match sqlx::query_scalar::<_, i64>("SELECT 1")
        .fetch_one(&state.db.pool)
        .await
    {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the database does not answer: {e}\n"),
        )
            .into_response(),
    }
}

/// Counts of `column` in `table`, by value.
async fn counts_by(
    state: &AppState,
    table: &str,
    column: &str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {column}, COUNT(*) FROM {table} GROUP BY {column} ORDER BY {column}"
    )))
    .fetch_all(&state.db.pool)
    .await
}

/// A label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match render(&state).await {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("metrics unavailable: {e}\n"),
        )
            .into_response(),
    }
}

async fn render(state: &AppState) -> Result<String, sqlx::Error> {
    let mut out = String::new();
    let jobs = counts_by(state, "jobs", "state").await?;
    let queued = jobs
        .iter()
        .find(|(s, _)| s == "queued")
        .map_or(0, |(_, n)| *n);
    family(&mut out, "kiln_jobs", "gauge", "Jobs in each state.");
    for (s, n) in &jobs {
        let _ = writeln!(out, "kiln_jobs{{state=\"{}\"}} {n}", label(s));
    }
    family(
        &mut out,
        "kiln_queue_depth",
        "gauge",
        "Jobs waiting to be placed.",
    );
    let _ = writeln!(out, "kiln_queue_depth {queued}");
    let online = crate::live::lock(state).fleet.online();
    family(
        &mut out,
        "kiln_providers_online",
        "gauge",
        "Providers in the live fleet.",
    );
    let _ = writeln!(out, "kiln_providers_online {online}");
    family(
        &mut out,
        "kiln_verifications",
        "gauge",
        "Audit records (spot re-execution) by status.",
    );
    for (s, n) in counts_by(state, "verifications", "status").await? {
        let _ = writeln!(out, "kiln_verifications{{status=\"{}\"}} {n}", label(&s));
    }
    family(
        &mut out,
        "kiln_capability_audits",
        "gauge",
        "Capability challenges by outcome.",
    );
    for (s, n) in counts_by(state, "provider_audits", "outcome").await? {
        let _ = writeln!(
            out,
            "kiln_capability_audits{{outcome=\"{}\"}} {n}",
            label(&s)
        );
    }
    let entries: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM ledger_entries")
        .fetch_one(&state.db.pool)
        .await?;
    let (fees, burned) = state
        .bank
        .read(|l| (l.balance(&AccountId::Fee).0, l.total_burned().0))
        .await;
    family(
        &mut out,
        "kiln_ledger_entries",
        "gauge",
        "Entries in the signed ledger.",
    );
    let _ = writeln!(out, "kiln_ledger_entries {entries}");
    family(
        &mut out,
        "kiln_ledger_fees_microcredits",
        "gauge",
        "The marketplace's fee account.",
    );
    let _ = writeln!(out, "kiln_ledger_fees_microcredits {fees}");
    family(
        &mut out,
        "kiln_ledger_burned_microcredits",
        "gauge",
        "Slashed stake burned.",
    );
    let _ = writeln!(out, "kiln_ledger_burned_microcredits {burned}");
    family(
        &mut out,
        "kiln_http_request_duration_seconds",
        "histogram",
        "API request latency by route template.",
    );
    for ((route, method), h) in state.http_metrics.snapshot() {
        let labels = format!("route=\"{}\",method=\"{}\"", label(&route), label(&method));
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&h.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "kiln_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += h.counts[BUCKETS.len()];
        let _ = writeln!(
            out,
            "kiln_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "kiln_http_request_duration_seconds_sum{{{labels}}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "kiln_http_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_buckets() {
        let mut h = Histogram::default();
        for ms in [0, 1, 3, 2000, 9000] {
            h.observe(Duration::from_millis(ms));
        }
        // 0 ms → ≤0.5 ms; 1 ms → ≤1 ms; 3 ms → ≤5 ms; 2 s → ≤5 s; 9 s → +Inf.
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[3], 1);
        assert_eq!(h.counts[BUCKETS.len() - 1], 1);
        assert_eq!(h.counts[BUCKETS.len()], 1);
        assert!((h.sum - 11.004).abs() < 1e-9);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
