//! Issue 13, finding 5 (the API): unauthenticated routes cost no more than
//! their answer, and a flood of them is refused per address (HTTP 429 that
//! says what limit and when to retry) while signed buyers are served; a
//! buyer key has its own rate; statements are read through their index,
//! in pages; and the ledger still replays whole.
//!
//! Real coordinator, real HTTP on loopback; no timing is asserted (the
//! figures are `kiln bench api`'s).

use std::time::Instant;

use futures::StreamExt;
use kiln_cli::{Client, ClientError, Statement};
use kiln_coordinator::throttle::{ApiLimits, Rate};
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_protocol::views::{ErrorView, JobState};
use kiln_protocol::{BuyerId, ByteSize, Credits, JobId, JobSpec, Keypair, MilliCpu, Seconds};
use tokio_util::sync::CancellationToken;

/// A coordinator on loopback with a faucet, no providers, and `limits`.
struct Running {
    coordinator: Coordinator,
    config: CoordinatorConfig,
    _dir: tempfile::TempDir,
}

async fn config(dir: &tempfile::TempDir, limits: ApiLimits) -> CoordinatorConfig {
    let mut cc = CoordinatorConfig::new(dir.path().join("coordinator"));
    cc.database = kiln_tests::database().await.unwrap();
    cc.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cc.faucet = Some(Credits(1_000_000_000));
    cc.min_job_escrow = Credits(1);
    cc.audit.mean_interval = None;
    cc.verification.enabled = false;
    cc.api_limits = limits;
    cc
}

async fn start(limits: ApiLimits) -> Running {
    kiln_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir, limits).await;
    let coordinator = kiln_coordinator::start(config.clone(), CancellationToken::new())
        .await
        .unwrap();
    Running {
        coordinator,
        config,
        _dir: dir,
    }
}

impl Running {
    fn url(&self) -> String {
        self.coordinator.url()
    }

    /// Stops it and starts it again on the same state (the ledger is
    /// verified from genesis on the way up).
    async fn restart(self) -> Self {
        self.coordinator.shutdown().await;
        let mut config = self.config.clone();
        config.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let coordinator = kiln_coordinator::start(config.clone(), CancellationToken::new())
            .await
            .unwrap();
        Self {
            coordinator,
            config,
            _dir: self._dir,
        }
    }
}

/// A job nothing here can run: it stays queued (its escrow locked).
fn spec(label: u32) -> JobSpec {
    let mut s = JobSpec::new(
        format!("sha256:{}", "ab".repeat(32)),
        vec!["echo".into(), label.to_string()],
    );
    s.resources.cpus = MilliCpu(500);
    s.resources.memory = ByteSize(64 << 20);
    s.resources.timeout = Seconds(60);
    s
}

/// One unauthenticated GET: its status, `Retry-After` and error body.
async fn get(http: reqwest::Client, url: String) -> (u16, Option<u64>, Option<ErrorView>) {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = if status == 200 {
        None
    } else {
        r.json::<ErrorView>().await.ok()
    };
    (status, retry, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unauthenticated_requests_is_refused_while_signed_buyers_are_served() {
    // The default burst, refilled slowly so that the bucket stays empty
    // for the rest of the test once the flood emptied it.
    let burst = ApiLimits::default()
        .public_rate
        .map_or(40, |r| r.burst as usize);
    let rate = Rate {
        per_second: 1,
        burst: burst as u32,
    };
    let limits = ApiLimits {
        public_rate: Some(rate),
        ..ApiLimits::default()
    };
    let in_flight = limits.public_in_flight.unwrap_or_default();
    let c = start(limits).await;
    let buyer = Client::new(&c.url(), Keypair::generate());
    let job = buyer.submit(spec(0), None).await.unwrap().job_id;
    // Signs for the coordinator it asks about once (a public request).
    buyer.job(&job).await.unwrap();
    let account = format!("buyer:{}", BuyerId::new(buyer.key().public()));
    let routes = [
        "/v1/offers?q=num_gpus>=1".to_string(),
        "/v1/providers".to_string(),
        "/v1/ledger?from=0&limit=1000".to_string(),
        format!("/v1/accounts/{account}/statement"),
        "/v1/info".to_string(),
        "/v1/ledger/balances".to_string(),
    ];
    let http = reqwest::Client::new();
    let flood = |n: usize| {
        let (http, base, routes) = (http.clone(), c.url(), routes.clone());
        futures::stream::iter(0..n)
            .map(move |i| get(http.clone(), format!("{base}{}", routes[i % routes.len()])))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
    };
    let served = |buyer: &Client| {
        let buyer = buyer.clone();
        async move {
            for _ in 0..burst {
                let j = buyer.job(&job).await.unwrap();
                assert_eq!(j.state, JobState::Queued);
            }
        }
    };

    // Twice the burst at once, while the buyer asks for its job as often:
    // every signed request is served. Then, with the bucket empty, again.
    let t0 = Instant::now();
    let (first, ()) = tokio::join!(flood(2 * burst), served(&buyer));
    let (second, ()) = tokio::join!(flood(burst), served(&buyer));
    let took = t0.elapsed().as_secs_f64();

    let count = |rs: &[(u16, Option<u64>, Option<ErrorView>)], status: u16| {
        rs.iter().filter(|(s, _, _)| *s == status).count()
    };
    assert!(count(&first, 200) >= 1, "the first are served: {first:?}");
    assert!(count(&first, 429) >= 1, "{first:?}");
    assert!(count(&second, 429) >= 1, "{second:?}");
    // Served: no more than the burst and what refilled meanwhile (a
    // refusal is held for its Retry-After, so tokens come back during
    // the flood; the buyer's first lookup took one).
    let ok = count(&first, 200) + count(&second, 200);
    let refill = (took * f64::from(rate.per_second)).ceil() as usize + 1;
    assert!(ok <= burst + refill, "{ok} served in {took:.1} s");
    let refused: Vec<_> = first
        .iter()
        .chain(&second)
        .filter(|(s, _, _)| *s == 429)
        .collect();
    assert_eq!(
        ok + refused.len(),
        first.len() + second.len(),
        "nothing but 200 or 429: {first:?} {second:?}"
    );
    for (_, retry, body) in refused {
        let e = body.as_ref().expect("a JSON error body");
        // Either limit: the address's rate, or everyone's budget.
        let by_rate = e.error.contains("too many unauthenticated requests")
            && e.error.contains(&format!("at most {}/s", rate.per_second));
        let by_budget = e.error.contains(&format!(
            "as many unauthenticated requests as it allows at once ({})",
            in_flight
        ));
        assert!(
            (by_rate || by_budget) && e.error.contains("retry in"),
            "{e:?}"
        );
        assert_eq!(e.field, None);
        assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {retry:?}");
    }

    // A new buyer from the same address submits and is served: signed
    // requests are counted by key, not by address.
    let other =
        Client::new(&c.url(), Keypair::generate()).with_coordinator_id(c.coordinator.state.peer);
    let id = other.submit(spec(1), None).await.unwrap().job_id;
    assert_eq!(other.job(&id).await.unwrap().state, JobState::Queued);
    c.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buyer_key_has_its_own_rate_for_signed_requests_and_submissions() {
    let rate = Rate {
        per_second: 1,
        burst: 8,
    };
    let limits = ApiLimits {
        buyer_rate: Some(rate),
        ..ApiLimits::default()
    };
    let c = start(limits).await;
    let greedy = Client::new(&c.url(), Keypair::generate());
    let n = 2 * rate.burst as usize;
    // Submissions are signed in their body: counted against their signer.
    let outcomes: Vec<Result<JobId, ClientError>> = futures::stream::iter(0..n)
        .map(|i| {
            let g = greedy.clone();
            async move { g.submit(spec(i as u32), None).await.map(|v| v.job_id) }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut refused = 0;
    for o in &outcomes {
        match o {
            Ok(_) => {}
            Err(ClientError::Api {
                status: 429,
                message,
                ..
            }) => {
                assert!(
                    message.contains("too many requests from buyer")
                        && message.contains(&format!("at most {}/s", rate.per_second))
                        && message.contains("retry in"),
                    "{message}"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(refused >= 1, "{outcomes:?}");
    // Signed GETs share the same budget: more than a burst at once is
    // refused too.
    let first = outcomes
        .iter()
        .find_map(|o| o.as_ref().ok())
        .copied()
        .unwrap();
    let gets: Vec<Result<_, ClientError>> = futures::stream::iter(0..n)
        .map(|_| {
            let g = greedy.clone();
            async move { g.job(&first).await }
        })
        .buffer_unordered(n)
        .collect()
        .await;
    assert!(
        gets.iter()
            .any(|r| matches!(r, Err(ClientError::Api { status: 429, .. }))),
        "{gets:?}"
    );
    // Another key is served at once.
    let other = Client::new(&c.url(), Keypair::generate());
    let id = other.submit(spec(0), None).await.unwrap().job_id;
    assert_eq!(other.job(&id).await.unwrap().state, JobState::Queued);
    c.coordinator.shutdown().await;
}

/// `GET /v1/accounts/{account}/statement?from=N&limit=M`, raw.
async fn statement_page(base: &str, account: &str, from: u64, limit: u32) -> Statement {
    reqwest::get(format!(
        "{base}/v1/accounts/{account}/statement?from={from}&limit={limit}"
    ))
    .await
    .unwrap()
    .error_for_status()
    .unwrap()
    .json()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statements_are_paged_through_their_index_and_the_ledger_still_replays() {
    let c = start(ApiLimits::default()).await;
    let (alice, bob) = (
        Client::new(&c.url(), Keypair::generate()),
        Client::new(&c.url(), Keypair::generate()),
    );
    // Interleaved: each job locks escrow, each cancel refunds it.
    let jobs = 5u32;
    for i in 0..jobs {
        for who in [&alice, &bob] {
            let id = who.submit(spec(i), None).await.unwrap().job_id;
            who.cancel(&id).await.unwrap();
        }
    }
    let account = format!("buyer:{}", BuyerId::new(alice.key().public()));
    let whole = alice.statement(&account).await.unwrap();
    // The faucet's deposit, then a lock and a refund per job.
    assert_eq!(whole.entries.len(), 1 + 2 * jobs as usize, "{whole:#?}");
    assert_eq!(whole.next, None);
    assert!(
        whole.entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "in ledger order"
    );
    // Only Alice's: each line names her key, none Bob's.
    let (a, b) = (
        hex::encode(alice.key().public().as_bytes()),
        hex::encode(bob.key().public().as_bytes()),
    );
    for e in &whole.entries {
        let effect = serde_json::to_string(&e.effect).unwrap();
        assert!(effect.contains(&a) && !effect.contains(&b), "{e:?}");
    }
    assert_eq!(whole.balance, alice.account().await.unwrap().balance);

    // Page by page, from each page's `next`: the same lines.
    let limit = 2;
    let (mut from, mut paged) = (0, Vec::new());
    loop {
        let page = statement_page(&c.url(), &account, from, limit).await;
        assert!(page.entries.len() <= limit as usize);
        assert_eq!(page.balance, whole.balance);
        paged.extend(page.entries);
        match page.next {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!(paged, whole.entries);
    // Past the end: an empty last page.
    let last = whole.entries.last().unwrap().seq;
    let past = statement_page(&c.url(), &account, last + 1, limit).await;
    assert!(past.entries.is_empty() && past.next.is_none(), "{past:?}");

    // Anyone can still replay the whole chain; the coordinator does at
    // start-up, and the index survives it.
    let audit = kiln_cli::ledger::verify(&alice, None)
        .await
        .unwrap()
        .unwrap();
    assert!(audit.ok);
    let c = c.restart().await;
    let alice = Client::new(&c.url(), alice.key().clone());
    assert_eq!(alice.statement(&account).await.unwrap(), whole);

    // A database from before the index is indexed when it is opened.
    let db = c.coordinator.state.db.clone();
    sqlx::query("DELETE FROM ledger_accounts")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(alice.statement(&account).await.unwrap().entries.is_empty());
    let c = c.restart().await;
    let alice = Client::new(&c.url(), alice.key().clone());
    assert_eq!(alice.statement(&account).await.unwrap(), whole);
    c.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_and_providers_are_served_from_memory_and_stay_current() {
    let c = start(ApiLimits::default()).await;
    let cancel = CancellationToken::new();
    let addr = c.coordinator.p2p_addrs[0].clone();
    let rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let client = Client::new(&c.url(), Keypair::generate());
    let offers = client.offers("", "price", 10).await.unwrap().offers;
    assert_eq!(offers.len(), 1, "{offers:#?}");
    assert_eq!(offers[0].provider, rogue.id);
    let listed = client.providers().await.unwrap().providers;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0].provider, rogue.id);
    // Its earnings are the ledger's now, however recently it was listed:
    // the registration's faucet grant is there.
    let account = kiln_contracts::AccountId::Provider(rogue.id);
    assert_eq!(
        listed[0].earned,
        c.coordinator.state.bank.balance(&account).await
    );
    cancel.cancel();
    c.coordinator.shutdown().await;
}

/// The `kiln` client waits out a 429 (its `Retry-After`) and sends a GET
/// again, so a rate limit slows a buyer's reads instead of failing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_waits_out_a_rate_limit_on_reads() {
    let c = start(ApiLimits {
        public_rate: Some(Rate {
            per_second: 1,
            burst: 1,
        }),
        ..ApiLimits::default()
    })
    .await;
    // A raw client sees the limit…
    let http = reqwest::Client::new();
    let url = format!("{}/v1/providers", c.url());
    let mut refused = 0;
    for _ in 0..3 {
        let (status, retry_after, _) = get(http.clone(), url.clone()).await;
        if status == 429 {
            refused += 1;
            assert!(retry_after.is_some());
        }
    }
    assert!(refused > 0, "three reads at once past a rate of 1/s");
    // …`kiln`'s reads all succeed, later.
    let client = Client::new(&c.url(), Keypair::generate());
    for _ in 0..3 {
        client.providers().await.unwrap();
    }
    c.coordinator.shutdown().await;
}
