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

/// A provider's `/metrics` (`kiln-node run --metrics`): the text parses,
/// GPUs are declared under DCGM's names, and the job, cache and transfer
/// series move when a job with an input runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_metrics_parse_and_move_when_a_job_runs() {
    let mut dn = devnet(0).await.unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    kiln_tests::add_node_with(&mut dn, |c| c.metrics_listen = Some(any))
        .await
        .unwrap();
    dn.wait_for_providers(1, Duration::from_secs(30))
        .await
        .unwrap();
    let addr = dn.nodes[0].metrics_addr.unwrap();
    let http = reqwest::Client::new();
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let r = http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), body);
    }
    let scrape = || {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            for family in [
                "DCGM_FI_DEV_GPU_UTIL",
                "DCGM_FI_DEV_FB_USED",
                "DCGM_FI_DEV_POWER_USAGE",
            ] {
                assert!(text.contains(&format!("# TYPE {family} gauge")), "{text}");
            }
            parse(&text)
        }
    };
    let before = scrape().await;
    assert_eq!(get(&before, "kiln_node_jobs_running"), 0.0, "{before:#?}");
    assert!(get(&before, "kiln_node_slots") >= 1.0);

    let client = buyer(&dn);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.bin");
    std::fs::write(&path, vec![7u8; 300_000]).unwrap();
    let cid = kiln_cli::data::add(&client, &path, false)
        .await
        .unwrap()
        .cid;
    let mut spec = dn.workload_spec(&["hash", "/in/x"]);
    spec.inputs
        .push(kiln_protocol::spec::InputSpec::new(cid, "/in/x"));
    let done = kiln_tests::run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");

    let ok = "kiln_node_jobs_finished_total{outcome=\"succeeded\"}";
    let after = kiln_tests::eventually(scrape, |m| get(m, ok) >= 1.0).await;
    assert_eq!(get(&after, ok), get(&before, ok) + 1.0, "{after:#?}");
    assert_eq!(
        get(&after, "kiln_node_fetched_bytes_total")
            - get(&before, "kiln_node_fetched_bytes_total"),
        300_000.0,
        "{after:#?}"
    );
    assert!(
        get(&after, "kiln_node_blob_cache_bytes") > get(&before, "kiln_node_blob_cache_bytes"),
        "{after:#?}"
    );
    dn.shutdown().await;
}
