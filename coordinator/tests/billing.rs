//! Property test of the one job model's money rules, over random histories.
//!
//! A job of `k` members runs through random sequences of starts, usage
//! reports (claiming any wall time, honest or not), receipts, losses,
//! requeues, a cancel and deadlines, on a coordinator clock that only moves
//! forward. Each decision uses the coordinator's own pure rules
//! (`jobs::model` for transitions, `jobs::billing` for what a member has
//! earned, `jobs::keys` for idempotency) and every payment goes through the
//! real `kiln_contracts::Ledger`. After every step:
//!
//! * no member was paid more than its price × the time the coordinator
//!   observed it running (capped by the timeout), and never more than its
//!   share of the escrow;
//! * a provider's balance comes only from its own member's payments (no one
//!   is paid for another's attempt), and a member that never started earns
//!   nothing;
//! * the buyer never pays more than the sum of those bounds, and the ledger's
//!   invariants hold; once the job ends the escrow is closed and the buyer
//!   holds everything not paid out.

use std::sync::LazyLock;

use kiln_contracts::{AccountId, Ledger, Op};
use kiln_coordinator::jobs::billing::{self, Terms};
use kiln_coordinator::jobs::keys::{self, PayPoint};
use kiln_coordinator::jobs::model::{self, JobState, MemberState};
use kiln_protocol::spec::cost_for;
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, Nonce, OfferId, ProviderId, UnixMillis};
use proptest::prelude::*;

static PROVIDERS: LazyLock<Vec<ProviderId>> = LazyLock::new(|| {
    (0..24u8)
        .map(|i| ProviderId::from_public_key(&Keypair::from_secret_bytes([i + 1; 32]).public()))
        .collect()
});
static BUYER: LazyLock<BuyerId> =
    LazyLock::new(|| BuyerId::new(Keypair::from_secret_bytes([200; 32]).public()));

const FEE_BPS: u16 = 100;
const MAX_ATTEMPTS: u32 = 4;
const GRACE_MS: u64 = 2_000;

#[derive(Clone, Debug)]
enum Action {
    Start(u32),
    Report(u32, u64),
    Result(u32, u64),
    Lost(u32),
    Cancel,
}

fn action() -> impl Strategy<Value = Action> {
    let claim = prop_oneof![0u64..20_000, Just(u64::MAX), 0u64..10_000_000];
    prop_oneof![
        3 => (0u32..3).prop_map(Action::Start),
        4 => (0u32..3, claim.clone()).prop_map(|(r, c)| Action::Report(r, c)),
        3 => (0u32..3, claim).prop_map(|(r, c)| Action::Result(r, c)),
        1 => (0u32..3).prop_map(Action::Lost),
        1 => Just(Action::Cancel),
    ]
}

#[derive(Clone, Debug)]
struct Mem {
    offer: OfferId,
    provider: ProviderId,
    price: Credits,
    state: MemberState,
    started_at: Option<UnixMillis>,
    paid: Credits,
    reports: u64,
}

struct Sim {
    job: JobId,
    k: u32,
    timeout_ms: u64,
    cap: Credits,
    state: JobState,
    attempt: u32,
    members: Vec<Vec<Mem>>,
    ledger: Ledger,
    now: UnixMillis,
    next_provider: usize,
    prices: Vec<u64>,
}

impl Sim {
    fn move_job(&mut self, to: JobState) -> bool {
        if model::step(self.state, to).is_some() {
            self.state = to;
            true
        } else {
            false
        }
    }

    fn new_attempt(&mut self) {
        self.attempt += 1;
        let ms = (0..self.k)
            .map(|r| {
                let provider = PROVIDERS[self.next_provider % PROVIDERS.len()];
                self.next_provider += 1;
                Mem {
                    offer: OfferId::random(),
                    provider,
                    price: Credits(self.prices[r as usize]),
                    state: MemberState::Offered,
                    started_at: None,
                    paid: Credits(0),
                    reports: 0,
                }
            })
            .collect();
        self.members.push(ms);
        assert!(self.move_job(JobState::Dispatched));
    }

    fn ran(&self, rank: u32) -> bool {
        let a = self.attempt as usize - 1;
        self.members[a]
            .get(rank as usize)
            .is_some_and(|m| m.state.ran())
    }

    fn current(&mut self) -> &mut Vec<Mem> {
        let a = self.attempt as usize - 1;
        &mut self.members[a]
    }

    fn pay(&mut self, rank: usize, claimed: u64, at: PayPoint) {
        let (timeout_ms, cap, now, job) = (self.timeout_ms, self.cap, self.now, self.job);
        let m = self.current()[rank].clone();
        let Some(started) = m.started_at else { return };
        let terms = Terms {
            price_per_hour: m.price,
            cap,
            timeout_ms,
        };
        let earned = billing::earned(
            &terms,
            billing::billable_ms(claimed, started, now, timeout_ms),
        );
        let held = self
            .ledger
            .escrow(&job)
            .map(|e| e.held())
            .unwrap_or_default();
        let key = keys::pay(&m.offer, at);
        if self.ledger.applied(&key).is_some() {
            return;
        }
        let due = billing::due(earned, m.paid, held);
        if due.0 > 0 {
            self.ledger
                .apply(Op::SettleInterval {
                    key,
                    job,
                    provider: m.provider,
                    cost: due,
                    fee_bps: FEE_BPS,
                })
                .expect("a payment within the escrow applies");
            self.current()[rank].paid = Credits(m.paid.0 + due.0);
        }
    }

    fn close(&mut self) {
        if self.ledger.escrow(&self.job).is_some_and(|e| e.is_open()) {
            self.ledger
                .apply(Op::Refund {
                    key: keys::close(&self.job),
                    job: self.job,
                })
                .expect("refund");
        }
    }

    /// Decides the job from the current attempt's members (as `conclude`).
    fn conclude(&mut self) {
        let released_as = if self.state == JobState::Cancelling {
            JobState::Cancelled
        } else {
            JobState::Failed
        };
        let seen: Vec<model::Seen> = self
            .current()
            .iter()
            .map(|m| model::Seen {
                state: m.state,
                outcome: (m.state == MemberState::Delivered)
                    .then_some(kiln_protocol::Outcome::Succeeded),
                reason: None,
            })
            .collect();
        if let model::JobVerdict::Done { state, .. } = model::after_results(&seen, released_as) {
            assert!(self.move_job(state), "{:?} -> {state}", self.state);
            self.close();
        }
    }

    fn step(&mut self, dt: u64, action: &Action) {
        self.now = UnixMillis(self.now.0 + dt);
        // Deadlines first, as every scheduling round does.
        if self.state.is_active() {
            let (timeout_ms, now) = (self.timeout_ms, self.now);
            let mut passed = false;
            for m in self.current().iter_mut() {
                if m.state.ran()
                    && m.started_at
                        .is_some_and(|s| now > billing::deadline(s, timeout_ms, GRACE_MS))
                {
                    m.state = MemberState::Released;
                    passed = true;
                }
            }
            if passed {
                self.conclude();
            }
        }
        if !self.state.is_active() {
            return;
        }
        let size = self.k as usize;
        match *action {
            Action::Start(r) if (r as usize) < size => {
                let now = self.now;
                let m = &mut self.current()[r as usize];
                if m.state == MemberState::Offered
                    && model::member_step(m.state, MemberState::Started)
                {
                    m.state = MemberState::Started;
                    m.started_at = Some(now);
                }
                if self
                    .current()
                    .iter()
                    .all(|m| m.state == MemberState::Started)
                    && self.state == JobState::Dispatched
                {
                    assert!(self.move_job(JobState::Running));
                }
            }
            Action::Report(r, claimed) if self.ran(r) => {
                let n = {
                    let m = &mut self.current()[r as usize];
                    m.reports += 1;
                    m.reports
                };
                self.pay(r as usize, claimed, PayPoint::Interval(n));
            }
            Action::Result(r, claimed) if self.ran(r) => {
                self.pay(r as usize, claimed, PayPoint::Result);
                self.current()[r as usize].state = MemberState::Delivered;
                self.conclude();
            }
            Action::Lost(r) if (r as usize) < size => {
                let m = &mut self.current()[r as usize];
                if !m.state.pending() {
                    return;
                }
                let was_stopping = m.state == MemberState::Stopping;
                m.state = MemberState::Released;
                if self.state == JobState::Cancelling || was_stopping {
                    self.conclude();
                    return;
                }
                for m in self.current().iter_mut().filter(|m| m.state.pending()) {
                    m.state = if m.state.ran() {
                        MemberState::Stopping
                    } else {
                        MemberState::Released
                    };
                }
                if self.attempt >= MAX_ATTEMPTS {
                    assert!(self.move_job(JobState::Failed));
                    self.close();
                } else {
                    assert!(self.move_job(JobState::Queued));
                    self.new_attempt();
                }
            }
            Action::Cancel => {
                let started = self.current().iter().any(|m| m.state.ran());
                if !started && self.state == JobState::Dispatched {
                    assert!(self.move_job(JobState::Cancelled));
                    for m in self.current().iter_mut() {
                        m.state = MemberState::Released;
                    }
                    self.close();
                } else if self.move_job(JobState::Cancelling) {
                    for m in self.current().iter_mut().filter(|m| m.state.pending()) {
                        m.state = if m.state.ran() {
                            MemberState::Stopping
                        } else {
                            MemberState::Released
                        };
                    }
                    self.conclude();
                }
            }
            _ => {}
        }
    }

    fn check(&self, max_cost: Credits) {
        self.ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("ledger invariant broken: {e:?}"));
        let mut bound_total = 0u128;
        let mut paid_total = 0u64;
        for m in self.members.iter().flatten() {
            let observed = m
                .started_at
                .map(|s| (self.now.0 - s.0).min(self.timeout_ms))
                .unwrap_or(0);
            let bound = cost_for(m.price, observed)
                .unwrap_or(Credits(u64::MAX))
                .min(self.cap);
            assert!(
                m.paid <= bound,
                "member paid {} for {observed} ms observed at {} per hour (bound {bound})",
                m.paid,
                m.price
            );
            if m.started_at.is_none() {
                assert_eq!(m.paid, Credits(0), "a member that never started was paid");
            }
            // Each member has its own provider: its balance is its own
            // payments less the fee, never more.
            let bal = self.ledger.balance(&AccountId::Provider(m.provider));
            assert!(
                bal <= m.paid,
                "provider holds {bal}, its member was paid {}",
                m.paid
            );
            if m.paid.0 == 0 {
                assert_eq!(bal, Credits(0), "a provider was paid for another's attempt");
            }
            bound_total += u128::from(bound.0);
            paid_total += m.paid.0;
        }
        assert!(u128::from(paid_total) <= bound_total);
        assert!(Credits(paid_total) <= max_cost);
        let buyer = self.ledger.balance(&AccountId::Buyer(*BUYER));
        if self.state.is_terminal() {
            assert!(!self.ledger.escrow(&self.job).is_some_and(|e| e.is_open()));
            assert_eq!(
                buyer.0,
                max_cost.0 - paid_total,
                "the buyer gets back all but what was paid"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn nobody_is_paid_for_time_the_coordinator_did_not_see(
        k in 1u32..=3,
        max_price in 1_000u64..50_000_000,
        price_frac in proptest::collection::vec(1u64..=100, 3),
        timeout_ms in 1_000u64..120_000,
        steps in proptest::collection::vec((0u64..4_000, action()), 1..60),
    ) {
        let job = JobId::derive(&BUYER, &Nonce::random());
        let max_cost = cost_for(Credits(max_price * u64::from(k)), timeout_ms).unwrap();
        let mut ledger = Ledger::new();
        ledger.apply(Op::Deposit { key: keys::faucet(&AccountId::Buyer(*BUYER)), account: AccountId::Buyer(*BUYER), amount: max_cost }).unwrap();
        ledger.apply(Op::Lock { key: keys::lock(&job), job, buyer: *BUYER, amount: max_cost }).unwrap();
        let mut sim = Sim {
            job,
            k,
            timeout_ms,
            cap: Credits(max_cost.0 / u64::from(k)),
            state: JobState::Queued,
            attempt: 0,
            members: Vec::new(),
            ledger,
            now: UnixMillis(1_000_000),
            next_provider: 0,
            prices: price_frac.iter().map(|f| max_price * f / 100).collect(),
        };
        sim.new_attempt();
        for (dt, a) in &steps {
            sim.step(*dt, a);
            sim.check(max_cost);
        }
        // Time runs out: every member past its deadline is given up.
        sim.step(timeout_ms + GRACE_MS + 1, &Action::Start(99));
        sim.check(max_cost);
        if sim.state.is_active() {
            // Only members that never started can hold a job open now.
            prop_assert!(sim.members.last().unwrap().iter().all(|m| !m.state.ran()));
        }
    }
}
