//! Verification by spot re-execution against the real binaries' code: a
//! devnet coordinator with verification on, real nodes running real
//! containers, and a provider built on the protocol crate that signs
//! made-up outputs for every job it takes.

use std::time::Duration;

use kiln_cli::devnet::DevnetOptions;
use kiln_protocol::views::{JobView, Role, VerificationStatus};
use kiln_protocol::{
    Compare, Credits, JobId, JobState, NetRequest, NetResponse, ProviderId, SetStake, Signed,
    Tolerance, Verify,
};
use kiln_tests::{RogueProvider, buyer, devnet_with, job_until};
use tokio_util::sync::CancellationToken;

const BOND: Credits = Credits(5_000_000);

fn opts(providers: usize) -> DevnetOptions {
    DevnetOptions {
        providers,
        verification: true,
        provider_stake: Some(BOND),
        ..Default::default()
    }
}

/// A rogue provider at `price` per CPU hour (at 1 µcr it is cheaper than
/// every node, so the scheduler prefers it), bonded with `BOND` and
/// heartbeating.
async fn rogue(
    dn: &kiln_cli::devnet::Devnet,
    cancel: &CancellationToken,
    price: Credits,
) -> RogueProvider {
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let r = RogueProvider::join_priced(&addr, cancel, price)
        .await
        .unwrap();
    let req = SetStake {
        provider: r.id,
        target: BOND,
    };
    let a = r
        .send(NetRequest::Stake(Signed::sign(&r.key, req, 300).unwrap()))
        .await
        .unwrap();
    assert!(matches!(a, NetResponse::Accepted), "{a:?}");
    r.keep_registered(price, Duration::from_secs(1), cancel);
    r
}

async fn ended(client: &kiln_cli::Client, id: &JobId) -> JobView {
    job_until(client, id, |j| j.state.is_terminal()).await
}

fn status(j: &JobView) -> VerificationStatus {
    j.verification
        .as_ref()
        .unwrap_or_else(|| panic!("no verification record: {j:#?}"))
        .status
}

/// The cheater's jobs are caught: each is re-executed on an honest node,
/// which disagrees; the other honest node breaks the tie; the cheater is
/// slashed, unpaid, its reputation falls below every honest provider's;
/// the buyer gets the honest output; nobody honest is slashed; the ledger
/// still replays, slashes included; and every stored audit decision
/// replays to the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_that_fabricates_outputs_is_caught_slashed_and_the_buyer_gets_the_right_output()
{
    let dn = devnet_with(opts(2)).await.unwrap();
    let cancel = CancellationToken::new();
    let cheater = rogue(&dn, &cancel, Credits(1)).await;
    let cheater_id = cheater.id;
    let work = cheater.cheat(
        Box::new(|_| vec![("answer.bin".into(), b"made up, never computed".to_vec())]),
        &cancel,
    );
    let client = buyer(&dn);
    let mut ids = Vec::new();
    for seed in 1..=3 {
        let spec = dn.workload_spec(&["write", "answer.bin", "4096", &seed.to_string()]);
        ids.push(client.submit(spec, None).await.unwrap().job_id);
    }
    let mut caught = 0;
    for id in &ids {
        let j = ended(&client, id).await;
        assert_eq!(j.state, JobState::Completed, "{j:#?}");
        let j = client.job(id).await.unwrap();
        let v = j.verification.clone().unwrap();
        assert!(kiln_cli::record_signed(&v), "{v:#?}");
        let runner = j
            .members
            .iter()
            .find(|m| m.role == Role::Run)
            .map(|m| m.provider)
            .unwrap();
        // Honest executions of the same job agree byte for byte: what
        // the buyer got is what every honest member produced.
        let honest: Vec<_> = j
            .members
            .iter()
            .filter(|m| m.provider != cheater_id && m.output_cid.is_some())
            .collect();
        assert!(!honest.is_empty(), "{j:#?}");
        for m in &honest {
            assert_eq!(j.output_cid, m.output_cid, "{j:#?}");
        }
        assert_ne!(
            j.provider,
            Some(cheater_id),
            "the buyer got the made-up output: {j:#?}"
        );
        if runner == cheater_id {
            caught += 1;
            assert_eq!(status(&j), VerificationStatus::FailedVerification, "{j:#?}");
            assert!(v.detail.contains("slashed"), "{}", v.detail);
            let m = j.members.iter().find(|m| m.provider == cheater_id).unwrap();
            assert_eq!(m.paid, Credits(0), "the cheater was paid: {m:#?}");
        } else {
            // An honest original, verified (possibly with the cheater as
            // its first verifier, outvoted and slashed).
            assert_eq!(status(&j), VerificationStatus::Verified, "{j:#?}");
        }
    }
    assert!(caught >= 1, "the cheaper cheater ran none of the jobs");
    cancel.cancel();
    let delivered = work.await.unwrap();
    assert!(!delivered.is_empty());

    // Slashed: its bond is gone; honest bonds are whole.
    let state = &dn.coordinator.state;
    assert_eq!(state.bank.bond(&cheater_id).await, Credits(0));
    for n in &dn.nodes {
        assert_eq!(
            state.bank.bond(&n.provider).await,
            BOND,
            "honest provider slashed"
        );
    }
    // Reputation: below every honest provider's.
    let providers = client.providers().await.unwrap().providers;
    let rep = |p: &ProviderId| {
        providers
            .iter()
            .find(|v| v.provider == *p)
            .map(|v| v.reputation)
    };
    let cheat_rep = rep(&cheater_id).unwrap();
    for n in &dn.nodes {
        let honest = rep(&n.provider).unwrap();
        assert!(cheat_rep < honest, "cheater {cheat_rep} vs honest {honest}");
    }
    // The ledger replays, slashes included.
    let audit = kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .unwrap();
    assert!(audit.ok);
    assert!(audit.total_burned.0 > 0, "a slash burns its remainder");
    // Every stored decision replays from its record; a tampered one does not.
    let rows = state.db.audits(1000).await.unwrap();
    assert_eq!(rows.len(), ids.len());
    for row in &rows {
        assert!(
            kiln_coordinator::lifecycle::reexec::replay(state, row),
            "{row:#?}"
        );
        let mut forged = row.clone();
        forged.decision.audited = !forged.decision.audited;
        assert!(!kiln_coordinator::lifecycle::reexec::replay(state, &forged));
        let mut other_epoch = row.clone();
        other_epoch.epoch += 1;
        assert!(!kiln_coordinator::lifecycle::reexec::replay(
            state,
            &other_epoch
        ));
    }
    dn.shutdown().await;
}

/// Honest results of a nondeterministic job agree within the buyer's
/// tolerance: verified though their bytes differ. Beyond it, the first
/// re-execution disagrees and a third decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tolerance_accepts_small_differences_and_a_third_execution_decides_a_large_one() {
    let dn = devnet_with(opts(2)).await.unwrap();
    let client = buyer(&dn);
    let tolerant = Verify {
        compare: Compare::Tolerance,
        rtol: Tolerance(1e-3),
        atol: Tolerance(0.0),
    };

    // Within: noise of 1e-7 relative, tolerance 1e-3.
    let mut spec = dn.workload_spec(&["noisy", "values.npy", "256", "1e-7"]);
    spec.verify = tolerant;
    let id = client.submit(spec, None).await.unwrap().job_id;
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    assert_eq!(status(&j), VerificationStatus::Verified, "{j:#?}");
    let outs: Vec<_> = j.members.iter().filter_map(|m| m.output_cid).collect();
    assert_eq!(outs.len(), 2, "{j:#?}");
    assert_ne!(
        outs[0], outs[1],
        "the two runs were meant to differ in their bytes"
    );

    // The same job compared exactly would not pass: bytes differ. A
    // cheater whose numbers are 10% off is beyond the tolerance: the
    // honest verifier disagrees, the other honest node decides.
    let cancel = CancellationToken::new();
    let cheater = rogue(&dn, &cancel, Credits(1)).await;
    let cheater_id = cheater.id;
    let work = cheater.cheat(
        Box::new(|_| {
            let v: Vec<f64> = (0..256).map(|i| f64::from(i + 1) * 1.1).collect();
            vec![("values.npy".into(), kiln_tests::cheat::npy_f64(&v))]
        }),
        &cancel,
    );
    let mut spec = dn.workload_spec(&["noisy", "values.npy", "256", "1e-7"]);
    spec.verify = tolerant;
    let id = client.submit(spec, None).await.unwrap().job_id;
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    let runs: Vec<_> = j
        .members
        .iter()
        .filter(|m| m.output_cid.is_some())
        .collect();
    assert_eq!(runs.len(), 3, "a dispute takes three executions: {j:#?}");
    let v = j.verification.clone().unwrap();
    assert!(
        v.detail.contains("third") || v.detail.contains("re-executions on providers"),
        "{}",
        v.detail
    );
    assert_ne!(j.provider, Some(cheater_id), "{j:#?}");
    let runner = j.members.iter().find(|m| m.role == Role::Run).unwrap();
    if runner.provider == cheater_id {
        assert_eq!(status(&j), VerificationStatus::FailedVerification, "{j:#?}");
    } else {
        assert_eq!(status(&j), VerificationStatus::Verified, "{j:#?}");
    }
    assert_eq!(
        dn.coordinator.state.bank.bond(&cheater_id).await,
        Credits(0)
    );
    cancel.cancel();
    let _ = work.await;
    dn.shutdown().await;
}

/// A sampled result holds its provider's bond until it is judged (the
/// unbonding delay that lets a slash land), and two executions that
/// agree are both paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bond_stays_while_a_verification_of_its_results_is_open() {
    let dn = devnet_with(opts(0)).await.unwrap();
    let cancel = CancellationToken::new();
    // 1 µcr per ms of observed time (the job asks for half a CPU), so a
    // short execution still earns something visible.
    let price = Credits(7_200_000_000);
    let mut original = rogue(&dn, &cancel, price).await;
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["echo", "checked"]);
    spec.resources.max_price_per_hour = price;
    let id = client.submit(spec, None).await.unwrap().job_id;
    let offer = original.next_offer().await.unwrap().payload;
    assert_eq!(offer.job_id, id);
    // Only now is there another provider to verify it.
    let mut verifier = rogue(&dn, &cancel, price).await;
    let unstake = |r: &RogueProvider| {
        let req = SetStake {
            provider: r.id,
            target: Credits(0),
        };
        NetRequest::Stake(Signed::sign(&r.key, req, 300).unwrap())
    };
    let result = RogueProvider::result_for(&offer, &original.key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = original.deliver(result).await.unwrap();
    assert!(matches!(a, NetResponse::Accepted), "{a:?}");
    let (again, reply) = verifier.hold_offer().await.unwrap();
    assert_eq!(again.payload.job_id, id, "the re-execution is the same job");
    assert_ne!(again.payload.offer_id, offer.offer_id);
    let j = client.job(&id).await.unwrap();
    assert_eq!(j.state, JobState::Verifying, "{j:#?}");
    assert_eq!(status(&j), VerificationStatus::Pending);
    let paid: Credits = j
        .members
        .iter()
        .map(|m| m.paid)
        .fold(Credits(0), |a, b| Credits(a.0 + b.0));
    assert_eq!(
        paid,
        Credits(0),
        "nothing is paid before the verdict: {j:#?}"
    );
    match original.send(unstake(&original)).await.unwrap() {
        NetResponse::Rejected { reason } => {
            assert!(reason.contains("verification"), "{reason}");
        }
        other => panic!("unstaked with a verification open: {other:?}"),
    }
    let _ = reply.send(NetResponse::Accepted);
    let result = RogueProvider::result_for(&again.payload, &verifier.key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = verifier.deliver(result).await.unwrap();
    assert!(matches!(a, NetResponse::Accepted), "{a:?}");
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    assert_eq!(status(&j), VerificationStatus::Verified, "{j:#?}");
    assert!(
        j.members.iter().all(|m| m.paid.0 > 0),
        "both executions are paid: {j:#?}"
    );
    let a = original.send(unstake(&original)).await.unwrap();
    assert!(matches!(a, NetResponse::Accepted), "{a:?}");
    cancel.cancel();
    dn.shutdown().await;
}

/// Gangs are verified as whole rounds, rank by rank. An honest gang is
/// re-executed by a second gang on other providers and both are paid. A
/// gang with a member that fabricates its rank's output is outvoted on
/// that rank by two re-executions: the buyer gets a round that is right on
/// every rank, the fabricating member is not paid (and, as a gang member
/// that may have been fed bad data by a peer, not slashed), its honest
/// peer is paid, and the decision replays from its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gangs_are_verified_rank_by_rank_and_a_fabricating_member_is_outvoted() {
    let dn = devnet_with(opts(5)).await.unwrap();
    let client = buyer(&dn);
    let gang_spec = |seed: &str| {
        let mut spec = dn.workload_spec(&["write", "answer.bin", "4096", seed]);
        spec.resources.gang = 2;
        spec
    };
    let run_members = |j: &JobView| -> Vec<ProviderId> {
        let mut ms: Vec<_> = j.members.iter().filter(|m| m.role == Role::Run).collect();
        ms.sort_by_key(|m| m.rank);
        ms.iter().map(|m| m.provider).collect()
    };

    // An honest gang: a new provider's results are always sampled, so a
    // second gang re-executes it, every rank agrees, all four are paid.
    let id = client.submit(gang_spec("1"), None).await.unwrap().job_id;
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    assert_eq!(status(&j), VerificationStatus::Verified, "{j:#?}");
    let delivered: Vec<_> = j
        .members
        .iter()
        .filter(|m| m.output_cid.is_some())
        .collect();
    assert_eq!(delivered.len(), 4, "two rounds of two ranks: {j:#?}");
    let providers: std::collections::BTreeSet<_> = delivered.iter().map(|m| m.provider).collect();
    assert_eq!(
        providers.len(),
        4,
        "the verifiers are other providers: {j:#?}"
    );
    assert!(delivered.iter().all(|m| m.paid.0 > 0), "all paid: {j:#?}");
    assert_eq!(run_members(&j).len(), 2);

    // A fabricating member, cheaper than every node, so a gang takes it.
    let cancel = CancellationToken::new();
    let cheater = rogue(&dn, &cancel, Credits(1)).await;
    let cheater_id = cheater.id;
    let work = cheater.cheat(
        Box::new(|_| vec![("answer.bin".into(), b"made up, never computed".to_vec())]),
        &cancel,
    );
    let id = client.submit(gang_spec("2"), None).await.unwrap().job_id;
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    let originals = run_members(&j);
    assert!(
        originals.contains(&cheater_id),
        "the cheaper cheater was not in the gang: {j:#?}"
    );
    assert_eq!(status(&j), VerificationStatus::FailedVerification, "{j:#?}");
    let v = j.verification.clone().unwrap();
    assert!(kiln_cli::record_signed(&v), "{v:#?}");
    assert!(v.detail.contains("rank"), "{}", v.detail);
    let delivered: Vec<_> = j
        .members
        .iter()
        .filter(|m| m.output_cid.is_some())
        .collect();
    assert_eq!(delivered.len(), 6, "three rounds of two ranks: {j:#?}");
    // The buyer's result is an honest execution, which every honest
    // execution of the same rank matches.
    assert_ne!(j.provider, Some(cheater_id), "{j:#?}");
    let cheat = j.members.iter().find(|m| m.provider == cheater_id).unwrap();
    assert_eq!(cheat.paid, Credits(0), "the cheater was paid: {cheat:#?}");
    let honest_answers: std::collections::BTreeSet<_> = delivered
        .iter()
        .filter(|m| m.provider != cheater_id)
        .map(|m| m.output_cid)
        .collect();
    assert_eq!(honest_answers.len(), 1, "honest ranks agree: {j:#?}");
    assert!(honest_answers.contains(&j.output_cid), "{j:#?}");
    assert_ne!(cheat.output_cid, j.output_cid);
    for m in delivered.iter().filter(|m| m.provider != cheater_id) {
        assert!(m.paid.0 > 0, "an honest execution was not paid: {m:#?}");
    }
    cancel.cancel();
    let _ = work.await;

    // Nobody is slashed in a gang; every bond is whole.
    let state = &dn.coordinator.state;
    assert_eq!(state.bank.bond(&cheater_id).await, BOND);
    for n in &dn.nodes {
        assert_eq!(state.bank.bond(&n.provider).await, BOND);
    }
    // Both decisions replay from their records; the ledger replays.
    let rows = state.db.audits(1000).await.unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert!(
            kiln_coordinator::lifecycle::reexec::replay(state, row),
            "{row:#?}"
        );
        assert!(row.decision.audited);
    }
    let audit = kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .unwrap();
    assert!(audit.ok);
    dn.shutdown().await;
}

/// With verification on, a gang's members are paid once all of them
/// delivered. A gang whose member fails is not sampled (there is no
/// result to verify): it fails, and each member is still paid for the
/// time it was observed running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_whose_member_fails_is_not_sampled_and_every_member_is_paid() {
    let dn = devnet_with(opts(2)).await.unwrap();
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["gang", "1"]);
    spec.resources.gang = 2;
    let id = client.submit(spec, None).await.unwrap().job_id;
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Failed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    assert!(j.verification.is_none(), "{j:#?}");
    assert_eq!(j.members.len(), 2, "{j:#?}");
    for m in &j.members {
        assert_eq!(m.role, Role::Run);
        assert!(m.paid.0 > 0, "a member was not paid: {m:#?}");
        assert_eq!(Some(m.paid), m.cost, "paid what it earned: {m:#?}");
    }
    let paid: u64 = j.members.iter().map(|m| m.paid.0).sum();
    assert_eq!(j.cost.map(|c| c.0), Some(paid), "{j:#?}");
    dn.shutdown().await;
}

/// Three different outputs of an `exact` job mean at least two executions
/// lied: a fourth execution decides, instead of calling the job
/// nondeterministic. Two cheaters fabricate different outputs (one runs
/// the job, the other is the only provider left to verify it); honest
/// nodes join one at a time, so each later round has exactly one provider
/// to go to. Both cheaters are slashed; the buyer gets the honest output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exact_job_with_three_different_outputs_gets_a_fourth_execution() {
    let mut dn = devnet_with(opts(0)).await.unwrap();
    let client = buyer(&dn);
    let cancel = CancellationToken::new();
    let mut cheaters = Vec::new();
    let mut work = Vec::new();
    for who in ["a", "b"] {
        let r = rogue(&dn, &cancel, Credits(1)).await;
        cheaters.push(r.id);
        let bytes = format!("made up by {who}").into_bytes();
        work.push(r.cheat(
            Box::new(move |_| vec![("answer.bin".into(), bytes.clone())]),
            &cancel,
        ));
    }
    let spec = dn.workload_spec(&["write", "answer.bin", "4096", "4"]);
    let id = client.submit(spec, None).await.unwrap().job_id;
    let delivered = |j: &JobView| j.members.iter().filter(|m| m.output_cid.is_some()).count();
    // The two cheaters disagree; nobody else can break the tie yet.
    let j = job_until(&client, &id, |j| {
        j.verification
            .as_ref()
            .is_some_and(|v| v.status == VerificationStatus::Disputed)
            || delivered(j) >= 2 && j.state == JobState::Verifying
    })
    .await;
    assert_eq!(j.state, JobState::Verifying, "{j:#?}");
    let c = kiln_tests::add_node(&mut dn).await.unwrap();
    // The third execution is honest and agrees with neither.
    let j = job_until(&client, &id, |j| delivered(j) >= 3 || j.state.is_terminal()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j2 = client.job(&id).await.unwrap();
    assert_eq!(
        j2.state,
        JobState::Verifying,
        "three different outputs of an exact job are not the end: {j:#?}"
    );
    let bond_before = dn.coordinator.state.bank.bond(&c).await;
    let d = kiln_tests::add_node(&mut dn).await.unwrap();
    let j = ended(&client, &id).await;
    assert_eq!(j.state, JobState::Completed, "{j:#?}");
    let j = client.job(&id).await.unwrap();
    assert_eq!(status(&j), VerificationStatus::FailedVerification, "{j:#?}");
    assert_eq!(delivered(&j), 4, "{j:#?}");
    let honest: Vec<_> = j
        .members
        .iter()
        .filter(|m| m.provider == c || m.provider == d)
        .collect();
    assert_eq!(honest.len(), 2, "{j:#?}");
    assert_eq!(honest[0].output_cid, honest[1].output_cid);
    assert_eq!(j.output_cid, honest[0].output_cid, "{j:#?}");
    assert!(honest.iter().all(|m| m.paid.0 > 0), "{j:#?}");
    let state = &dn.coordinator.state;
    for cheater in &cheaters {
        let m = j.members.iter().find(|m| m.provider == *cheater).unwrap();
        assert_eq!(m.paid, Credits(0), "a cheater was paid: {m:#?}");
        assert_eq!(state.bank.bond(cheater).await, Credits(0), "not slashed");
    }
    assert_eq!(
        state.bank.bond(&c).await,
        bond_before,
        "an honest node was slashed"
    );
    cancel.cancel();
    for w in work {
        let _ = w.await;
    }
    dn.shutdown().await;
}
