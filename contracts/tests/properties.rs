//! Property tests: random operation sequences (with colliding keys, unknown
//! jobs, huge amounts, bad fee rates and slash splits) never break the
//! settlement rules, the marketplace fee is cumulative per escrow (with one
//! fee rate the fee account holds exactly the sum over escrows of
//! `fee_for(gross paid)`, however payments were split), and the signed chain
//! of what applied replays to the same ledger.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use kiln_contracts::{
    AccountId, Applied, ChainBuilder, ContractError, Ledger, Op, OpKey, compare_balances, fee_for,
    verify_chain,
};
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, ProviderId, UnixMillis};
use proptest::prelude::*;

// Deriving keys is slow; the strategies pick from these.
static BUYERS: LazyLock<Vec<BuyerId>> = LazyLock::new(|| {
    (0..2u8)
        .map(|i| BuyerId::new(Keypair::from_secret_bytes([i + 1; 32]).public()))
        .collect()
});
static PROVIDERS: LazyLock<Vec<ProviderId>> = LazyLock::new(|| {
    (0..3u8)
        .map(|i| ProviderId::from_public_key(&Keypair::from_secret_bytes([i + 100; 32]).public()))
        .collect()
});
fn buyer(i: u8) -> BuyerId {
    BUYERS[usize::from(i)]
}
fn provider(i: u8) -> ProviderId {
    PROVIDERS[usize::from(i)]
}

fn amount(typical: u64) -> impl Strategy<Value = Credits> {
    prop_oneof![8 => 0..typical, 1 => Just(0u64), 1 => (u64::MAX - 3)..=u64::MAX].prop_map(Credits)
}
fn bps() -> impl Strategy<Value = u16> {
    prop_oneof![6 => 0u16..=5_000, 2 => Just(0u16), 1 => Just(10_000u16), 1 => 5_000u16..=11_000]
}
/// A slash's verifier and its share: mostly coherent, sometimes not.
fn verifier_share() -> impl Strategy<Value = (Option<ProviderId>, u16)> {
    prop_oneof![
        3 => Just((None, 0u16)),
        5 => ((0u8..3).prop_map(provider), 0u16..=4_000).prop_map(|(v, bps)| (Some(v), bps)),
        1 => (proptest::option::of((0u8..3).prop_map(provider)), bps()),
    ]
}
fn account() -> impl Strategy<Value = AccountId> {
    prop_oneof![
        2 => (0u8..2).prop_map(|i| AccountId::Buyer(buyer(i))),
        2 => (0u8..3).prop_map(|i| AccountId::Provider(provider(i))),
        1 => (0u8..3).prop_map(|i| AccountId::Verifier(provider(i))),
        1 => Just(AccountId::Fee),
    ]
}
fn op() -> impl Strategy<Value = Op> {
    // A small pool of keys, jobs and providers so collisions, re-settlements
    // and slashes of the same bond happen.
    let key = (0u8..120).prop_map(|i| OpKey::new(format!("k{i}")));
    let job = (0u8..4).prop_map(|i| JobId::from_bytes([i; 16]));
    let prov = (0u8..3).prop_map(provider);
    prop_oneof![
        3 => (key.clone(), account(), amount(2_000)).prop_map(|(key, account, amount)| Op::Deposit { key, account, amount }),
        2 => (key.clone(), account(), amount(1_000)).prop_map(|(key, account, amount)| Op::Withdraw { key, account, amount }),
        4 => (key.clone(), job.clone(), 0u8..2, amount(800)).prop_map(|(key, job, b, amount)| Op::Lock { key, job, buyer: buyer(b), amount }),
        2 => (key.clone(), job.clone(), prov.clone(), amount(800), 0u16..=11_000).prop_map(|(key, job, provider, cost, fee_bps)| Op::Release { key, job, provider, cost, fee_bps }),
        1 => (key.clone(), job.clone()).prop_map(|(key, job)| Op::Refund { key, job }),
        3 => (key.clone(), prov.clone(), amount(600)).prop_map(|(key, provider, amount)| Op::Stake { key, provider, amount }),
        2 => (key.clone(), prov.clone(), amount(400)).prop_map(|(key, provider, amount)| Op::Unstake { key, provider, amount }),
        3 => (key.clone(), prov.clone(), job.clone(), amount(600), bps(), verifier_share())
            .prop_map(|(key, provider, job, amount, buyer_share_bps, (verifier, verifier_share_bps))| Op::Slash {
                key, provider, job, amount, buyer_share_bps, verifier, verifier_share_bps,
            }),
        4 => (key, job, prov, amount(250), 0u16..=11_000).prop_map(|(key, job, provider, cost, fee_bps)| Op::SettleInterval { key, job, provider, cost, fee_bps }),
    ]
}

/// A few funded accounts and bonds first, so that locks, stakes and
/// slashes later in the sequence often succeed; then anything.
fn history() -> impl Strategy<Value = Vec<Op>> {
    let key = (0u8..120).prop_map(|i| OpKey::new(format!("k{i}")));
    let funded = prop_oneof![
        (0u8..2).prop_map(|i| AccountId::Buyer(buyer(i))),
        (0u8..3).prop_map(|i| AccountId::Provider(provider(i))),
    ];
    let setup = prop_oneof![
        3 => (key.clone(), funded, 500u64..5_000).prop_map(|(key, account, n)| Op::Deposit { key, account, amount: Credits(n) }),
        1 => (key, 0u8..3, 100u64..1_000).prop_map(|(key, p, n)| Op::Stake { key, provider: provider(p), amount: Credits(n) }),
    ];
    (
        proptest::collection::vec(setup, 0..10),
        proptest::collection::vec(op(), 1..100),
    )
        .prop_map(|(mut setup, ops)| {
            setup.extend(ops);
            setup
        })
}

fn wide(c: Credits) -> i128 {
    i128::from(c.0)
}

/// Everything the model tracks, from effects alone, to check the ledger
/// against without trusting `check_invariants`.
#[derive(Default)]
struct Model {
    /// deposits − withdrawals − burns.
    net: i128,
    bonds: BTreeMap<ProviderId, i128>,
    /// Per job: locked, paid out so far (any way), closed.
    escrows: BTreeMap<JobId, (i128, i128, bool)>,
    /// Per job: paid to providers gross, and the fees of those payments.
    gross: BTreeMap<JobId, (i128, i128)>,
}

impl Model {
    fn record(&mut self, effect: &Applied) -> Result<(), TestCaseError> {
        match *effect {
            Applied::Deposited { amount, .. } => self.net += wide(amount),
            Applied::Withdrawn { amount, .. } => self.net -= wide(amount),
            Applied::Locked { job, amount, .. } => {
                prop_assert!(self.escrows.insert(job, (wide(amount), 0, false)).is_none());
            }
            Applied::IntervalSettled {
                job,
                cost,
                paid,
                fee,
                remaining,
                ..
            } => {
                prop_assert_eq!(cost.0, paid.0 + fee.0);
                let e = self
                    .escrows
                    .get_mut(&job)
                    .ok_or_else(|| TestCaseError::fail("no escrow"))?;
                prop_assert!(!e.2, "an interval paid from a closed escrow");
                e.1 += wide(cost);
                prop_assert!(e.1 <= e.0, "escrow {} paid {} of {}", job, e.1, e.0);
                prop_assert_eq!(e.0 - e.1, wide(remaining));
                let g = self.gross.entry(job).or_default();
                g.0 += wide(cost);
                g.1 += wide(fee);
            }
            Applied::Released {
                job,
                cost,
                paid,
                fee,
                refunded,
                already_paid,
                ..
            } => {
                let e = self
                    .escrows
                    .get_mut(&job)
                    .ok_or_else(|| TestCaseError::fail("no escrow"))?;
                prop_assert!(!e.2, "escrow {} closed twice", job);
                prop_assert_eq!(e.1, wide(already_paid));
                prop_assert_eq!(wide(cost), wide(already_paid) + wide(paid) + wide(fee));
                e.1 += wide(paid) + wide(fee) + wide(refunded);
                prop_assert_eq!(e.1, e.0, "released escrow {} does not add up", job);
                e.2 = true;
                let g = self.gross.entry(job).or_default();
                g.0 += wide(paid) + wide(fee);
                g.1 += wide(fee);
            }
            Applied::Refunded {
                job,
                refunded,
                already_paid,
                ..
            } => {
                let e = self
                    .escrows
                    .get_mut(&job)
                    .ok_or_else(|| TestCaseError::fail("no escrow"))?;
                prop_assert!(!e.2, "escrow {} closed twice", job);
                prop_assert_eq!(e.1, wide(already_paid));
                e.1 += wide(refunded);
                prop_assert_eq!(e.1, e.0, "refunded escrow {} does not add up", job);
                e.2 = true;
            }
            Applied::Staked {
                provider,
                amount,
                bond,
                ..
            } => {
                let b = self.bonds.entry(provider).or_default();
                *b += wide(amount);
                prop_assert_eq!(*b, wide(bond));
            }
            Applied::Unstaked {
                provider,
                amount,
                bond,
                ..
            } => {
                let b = self.bonds.entry(provider).or_default();
                // Only what is still bonded (never slashed stake) comes out.
                prop_assert!(
                    wide(amount) <= *b,
                    "unstaked {} of a bond of {}",
                    amount.0,
                    b
                );
                *b -= wide(amount);
                prop_assert_eq!(*b, wide(bond));
            }
            Applied::Slashed {
                provider,
                taken,
                to_buyer,
                to_verifier,
                burned,
                bond,
                ..
            } => {
                prop_assert_eq!(taken.0, to_buyer.0 + to_verifier.0 + burned.0);
                let b = self.bonds.entry(provider).or_default();
                prop_assert!(taken.0 > 0 && wide(taken) <= *b);
                *b -= wide(taken);
                prop_assert_eq!(*b, wide(bond));
                self.net -= wide(burned);
            }
        }
        Ok(())
    }

    fn check(&self, l: &Ledger) -> Result<(), TestCaseError> {
        // Conservation, computed independently of check_invariants.
        let held: i128 = l.balances().values().map(|c| wide(*c)).sum::<i128>()
            + l.escrows().values().map(|e| wide(e.held())).sum::<i128>()
            + l.bonds().values().map(|b| wide(b.held)).sum::<i128>();
        prop_assert_eq!(held, self.net, "credits not conserved");
        for (p, b) in &self.bonds {
            prop_assert_eq!(wide(l.bond(p)), *b);
        }
        for (job, (locked, paid, closed)) in &self.escrows {
            let e = l
                .escrow(job)
                .ok_or_else(|| TestCaseError::fail("escrow vanished"))?;
            prop_assert_eq!(wide(e.locked), *locked);
            prop_assert_eq!(e.is_open(), !closed);
            if !closed {
                prop_assert_eq!(wide(e.held()), locked - paid);
            }
            // What the escrow records as paid and as fee is what its effects say.
            let (gross, fees) = self.gross.get(job).copied().unwrap_or_default();
            prop_assert_eq!(wide(e.gross_paid()), gross);
            prop_assert_eq!(wide(e.fee_taken), fees);
            prop_assert!(fees <= gross);
            prop_assert_eq!(wide(e.net_paid()), gross - fees);
        }
        Ok(())
    }
}

/// The fee a successful fresh interval or release took, checked against
/// the cumulative rule: the step of `fee_for` over the escrow's gross.
fn check_op_fee(op: &Op, effect: &Applied, before: &Ledger) -> Result<(), TestCaseError> {
    let (job, fee_bps, due, fee) = match (op, effect) {
        (Op::SettleInterval { job, fee_bps, .. }, Applied::IntervalSettled { cost, fee, .. }) => {
            (job, *fee_bps, *cost, *fee)
        }
        (
            Op::Release { job, fee_bps, .. },
            Applied::Released {
                cost,
                already_paid,
                fee,
                ..
            },
        ) => (job, *fee_bps, Credits(cost.0 - already_paid.0), *fee),
        _ => return Ok(()),
    };
    let e = before
        .escrow(job)
        .ok_or_else(|| TestCaseError::fail("no escrow"))?;
    let gross = e.gross_paid();
    prop_assert_eq!(e.next_fee(due, fee_bps), fee);
    prop_assert_eq!(
        wide(fee),
        wide(fee_for(Credits(gross.0 + due.0), fee_bps)) - wide(fee_for(gross, fee_bps))
    );
    prop_assert!(fee <= due);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_rule(ops in history()) {
        let mut l = Ledger::new();
        let mut model = Model::default();
        let mut done: Vec<(Op, Applied)> = Vec::new();
        let mut closed = BTreeMap::new();
        for op in ops {
            let before = l.clone();
            let fresh = l.applied(op.key()).is_none();
            match l.apply(op.clone()) {
                Err(e) => {
                    // Balances are unsigned, so "never negative" means: a refused op changes nothing.
                    prop_assert_eq!(&l, &before, "refused {:?} ({}) changed the ledger", op, e);
                    match e {
                        ContractError::InsufficientFunds { account, needed, available } => {
                            prop_assert!(available < needed);
                            prop_assert_eq!(before.balance(&account), available);
                        }
                        ContractError::InsufficientStake { provider, needed, bonded, .. } => {
                            prop_assert!(bonded < needed);
                            prop_assert_eq!(before.bond(&provider), bonded);
                        }
                        ContractError::EscrowExhausted { job, needed, remaining } => {
                            prop_assert!(remaining < needed);
                            prop_assert_eq!(before.escrow(&job).map(|e| e.held()), Some(remaining));
                        }
                        _ => {}
                    }
                }
                Ok(effect) => {
                    if !fresh {
                        prop_assert_eq!(&l, &before, "replaying {:?} changed the ledger", op);
                    } else {
                        check_op_fee(&op, &effect, &before)?;
                        model.record(&effect)?;
                        // Statement lines add up: each delta is exactly the balance change.
                        let mut touched: BTreeMap<AccountId, i128> = BTreeMap::new();
                        for (a, d) in effect.balance_deltas() {
                            *touched.entry(a).or_default() += d;
                        }
                        for a in l.balances().keys().chain(before.balances().keys()) {
                            let change = i128::from(l.balance(a).0) - i128::from(before.balance(a).0);
                            prop_assert_eq!(touched.get(a).copied().unwrap_or(0), change, "delta of {} for {:?}", a, effect);
                        }
                        if let Applied::Released { job, .. } | Applied::Refunded { job, .. } = &effect {
                            prop_assert!(closed.insert(*job, l.escrow(job).cloned()).is_none(), "job {} closed twice", job);
                        }
                        // A slashed stake cannot be withdrawn: unstaking the
                        // pre-slash bond is refused afterwards.
                        if let Applied::Slashed { provider, .. } = &effect {
                            let pre = before.bond(provider);
                            let mut probe = l.clone();
                            let attempt = probe.apply(Op::Unstake { key: OpKey::new("probe"), provider: *provider, amount: pre });
                            prop_assert!(
                                matches!(attempt, Err(ContractError::InsufficientStake { .. })),
                                "unstaking the pre-slash bond gave {:?}", attempt
                            );
                        }
                    }
                    // Replaying at once is a no-op with the same effect.
                    let after = l.clone();
                    prop_assert_eq!(l.apply(op.clone()), Ok(effect.clone()));
                    prop_assert_eq!(&l, &after);
                    done.push((op, effect));
                }
            }
            if let Err(e) = l.check_invariants() {
                prop_assert!(false, "{}", e);
            }
            model.check(&l)?;
            // A closed escrow never changes again.
            for (job, escrow) in &closed {
                prop_assert_eq!(l.escrow(job), escrow.as_ref());
            }
        }
        // Replaying the whole history, in any order, changes nothing.
        let end = l.clone();
        for (op, effect) in done.into_iter().rev() {
            prop_assert_eq!(l.apply(op), Ok(effect));
        }
        prop_assert_eq!(l, end);
    }
}

/// A job's life with one fee rate: locks, many (often tiny) intervals paid
/// to several providers, releases and refunds, over a few jobs at once.
fn escrow_op(fee_bps: u16) -> impl Strategy<Value = Op> {
    let key = (0u16..400).prop_map(|i| OpKey::new(format!("e{i}")));
    let job = (0u8..4).prop_map(|i| JobId::from_bytes([i; 16]));
    let prov = (0u8..3).prop_map(provider);
    // Mostly tiny intervals, where per-interval rounding would lose the fee.
    let interval = prop_oneof![6 => 0u64..5, 3 => 0u64..300, 1 => 0u64..5_000].prop_map(Credits);
    prop_oneof![
        1 => (key.clone(), 0u8..2, 1u64..5_000).prop_map(|(key, b, n)| Op::Deposit { key, account: AccountId::Buyer(buyer(b)), amount: Credits(n) }),
        2 => (key.clone(), job.clone(), 0u8..2, 1u64..5_000).prop_map(|(key, job, b, n)| Op::Lock { key, job, buyer: buyer(b), amount: Credits(n) }),
        12 => (key.clone(), job.clone(), prov.clone(), interval).prop_map(move |(key, job, provider, cost)| Op::SettleInterval { key, job, provider, cost, fee_bps }),
        1 => (key.clone(), job.clone(), prov, 0u64..6_000).prop_map(move |(key, job, provider, cost)| Op::Release { key, job, provider, cost: Credits(cost), fee_bps }),
        1 => (key, job).prop_map(|(key, job)| Op::Refund { key, job }),
    ]
}

fn escrow_history() -> impl Strategy<Value = (u16, Vec<Op>)> {
    prop_oneof![4 => 1u16..=1_000, 1 => Just(0u16), 1 => 1_000u16..=10_000]
        .prop_flat_map(|fee_bps| {
            let funding = (0u8..2).prop_map(|b| Op::Deposit {
                key: OpKey::new(format!("fund{b}")),
                account: AccountId::Buyer(buyer(b)),
                amount: Credits(20_000),
            });
            (
                Just(fee_bps),
                proptest::collection::vec(funding, 1..3),
                proptest::collection::vec(escrow_op(fee_bps), 1..300),
            )
        })
        .prop_map(|(fee_bps, mut ops, more)| {
            ops.extend(more);
            (fee_bps, ops)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// With one fee rate, after every op the fee account holds exactly
    /// `sum over escrows of fee_for(gross paid out of it)`, each escrow's
    /// `fee_taken` is `fee_for` of its gross, and money is conserved.
    #[test]
    fn fees_are_the_cumulative_fee_of_each_escrow((fee_bps, ops) in escrow_history()) {
        let mut l = Ledger::new();
        let mut deposited: u128 = 0;
        // Per job: gross paid to providers, from the effects alone.
        let mut gross: BTreeMap<JobId, u128> = BTreeMap::new();
        for op in ops {
            let before = l.clone();
            let fresh = l.applied(op.key()).is_none();
            match l.apply(op.clone()) {
                Err(_) => prop_assert_eq!(&l, &before),
                Ok(_) if !fresh => prop_assert_eq!(&l, &before),
                Ok(effect) => {
                    check_op_fee(&op, &effect, &before)?;
                    match effect {
                        Applied::Deposited { amount, .. } => deposited += u128::from(amount.0),
                        Applied::IntervalSettled { job, cost, .. } => {
                            *gross.entry(job).or_default() += u128::from(cost.0);
                        }
                        Applied::Released { job, paid, fee, .. } => {
                            *gross.entry(job).or_default() += u128::from(paid.0 + fee.0);
                        }
                        _ => {}
                    }
                }
            }
            let fee_of = |g: u128| g * u128::from(fee_bps) / 10_000;
            let expected: u128 = gross.values().map(|g| fee_of(*g)).sum();
            prop_assert_eq!(u128::from(l.balance(&AccountId::Fee).0), expected, "fee account at {} bps", fee_bps);
            for (job, g) in &gross {
                let e = l.escrow(job).ok_or_else(|| TestCaseError::fail("escrow vanished"))?;
                prop_assert_eq!(u128::from(e.gross_paid().0), *g);
                prop_assert_eq!(u128::from(e.fee_taken.0), fee_of(*g));
                prop_assert_eq!(e.fee_taken, fee_for(e.gross_paid(), fee_bps));
            }
            // Conservation: nothing was withdrawn or burned here.
            let held: u128 = l.balances().values().map(|c| u128::from(c.0)).sum::<u128>()
                + l.escrows().values().map(|e| u128::from(e.held().0)).sum::<u128>();
            prop_assert_eq!(held, deposited, "credits not conserved");
            // Providers got exactly the gross less the fee.
            let providers: u128 = l
                .balances()
                .iter()
                .filter(|(a, _)| matches!(a, AccountId::Provider(_)))
                .map(|(_, c)| u128::from(c.0))
                .sum();
            prop_assert_eq!(providers, gross.values().sum::<u128>() - expected);
            if let Err(e) = l.check_invariants() {
                prop_assert!(false, "{}", e);
            }
        }
    }

    /// However a total is split into intervals (and an optional final
    /// release), the escrow's fee is the fee on the total.
    #[test]
    fn splitting_a_payment_never_changes_its_fee(
        parts in proptest::collection::vec(1u64..50, 1..200),
        release_extra in proptest::option::of(0u64..500),
        fee_bps in 0u16..=10_000,
    ) {
        let job = JobId::from_bytes([9; 16]);
        let mut l = Ledger::new();
        l.apply(Op::Deposit { key: OpKey::new("d"), account: AccountId::Buyer(buyer(0)), amount: Credits(1_000_000) }).unwrap();
        l.apply(Op::Lock { key: OpKey::new("l"), job, buyer: buyer(0), amount: Credits(1_000_000) }).unwrap();
        for (i, cost) in parts.iter().enumerate() {
            l.apply(Op::SettleInterval { key: OpKey::new(format!("i{i}")), job, provider: provider(i as u8 % 3), cost: Credits(*cost), fee_bps }).unwrap();
        }
        let mut total: u64 = parts.iter().sum();
        if let Some(extra) = release_extra {
            total += extra;
            l.apply(Op::Release { key: OpKey::new("r"), job, provider: provider(0), cost: Credits(total), fee_bps }).unwrap();
        }
        let fee = fee_for(Credits(total), fee_bps);
        prop_assert_eq!(l.balance(&AccountId::Fee), fee);
        let e = l.escrow(&job).unwrap();
        prop_assert_eq!((e.gross_paid(), e.fee_taken), (Credits(total), fee));
        // The same total in one payment takes the same fee.
        let mut one = Ledger::new();
        one.apply(Op::Deposit { key: OpKey::new("d"), account: AccountId::Buyer(buyer(0)), amount: Credits(1_000_000) }).unwrap();
        one.apply(Op::Lock { key: OpKey::new("l"), job, buyer: buyer(0), amount: Credits(1_000_000) }).unwrap();
        one.apply(Op::Release { key: OpKey::new("r"), job, provider: provider(0), cost: Credits(total), fee_bps }).unwrap();
        prop_assert_eq!(one.balance(&AccountId::Fee), fee);
        l.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

proptest! {
    // Signing and verifying are slow in an unoptimised build: fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The signed chain of the ops that applied (under new keys) replays to
    /// exactly the ledger that applied them.
    #[test]
    fn the_signed_chain_replays_to_the_same_ledger(ops in history()) {
        let key = Keypair::from_secret_bytes([42; 32]);
        let mut chain = ChainBuilder::genesis(key.clone());
        let mut entries = Vec::new();
        let mut l = Ledger::new();
        for (t, op) in (0u64..).zip(ops) {
            let fresh = l.applied(op.key()).is_none();
            if let Ok(effect) = l.apply(op.clone())
                && fresh
            {
                entries.push(chain.append(op, effect, UnixMillis(1_700_000_000_000 + t)).unwrap());
            }
        }
        let replayed = verify_chain(&entries, &key.public()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&replayed, &l);
        prop_assert!(compare_balances(&replayed, l.balances()).is_ok());
    }
}
