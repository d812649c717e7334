//! `GET /metrics`, `/healthz` and `/readyz` of a real coordinator: the
//! Prometheus text parses, every sample belongs to a declared series, and
//! the named series move when a job runs and is paid.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_protocol::JobState;
use kiln_tests::{buyer, devnet};

/// `name{labels}` → value, checking the text format as it goes: every
/// sample's family has a `# TYPE`, values are numbers, histogram buckets
/// are cumulative.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE for {family}: {line}");
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_move_when_a_job_runs() {
    let dn = devnet(1).await.unwrap();
    let http = reqwest::Client::new();
    let url = dn.url();
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), body);
    }
    let scrape = || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(format!("{url}/metrics")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
            parse(&r.text().await.unwrap())
        }
    };
    let before = scrape().await;
    assert_eq!(get(&before, "kiln_providers_online"), 1.0, "{before:#?}");

    let client = buyer(&dn);
    let id = client
        .submit(dn.workload_spec(&["echo", "measured"]), None)
        .await
        .unwrap()
        .job_id;
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed);

    let after = scrape().await;
    let completed = "kiln_jobs{state=\"completed\"}";
    assert_eq!(
        get(&after, completed),
        get(&before, completed) + 1.0,
        "{after:#?}"
    );
    assert_eq!(get(&after, "kiln_queue_depth"), 0.0);
    assert!(get(&after, "kiln_ledger_entries") > get(&before, "kiln_ledger_entries"));
    // (A job this small pays less than a micro-credit of fee.)
    for series in [
        "kiln_ledger_fees_microcredits",
        "kiln_ledger_burned_microcredits",
    ] {
        assert!(after.contains_key(series), "{series}: {after:#?}");
        assert!(get(&after, series) >= get(&before, series));
    }
    let submits = "kiln_http_request_duration_seconds_count{route=\"/v1/jobs\",method=\"POST\"}";
    assert_eq!(get(&after, submits), 1.0, "{after:#?}");
    let polls = "kiln_http_request_duration_seconds_count{route=\"/v1/jobs/{id}\",method=\"GET\"}";
    assert!(get(&after, polls) >= 1.0, "{after:#?}");
    let inf =
        "kiln_http_request_duration_seconds_bucket{route=\"/v1/jobs\",method=\"POST\",le=\"+Inf\"}";
    assert_eq!(get(&after, inf), 1.0);
    dn.shutdown().await;
}
