//! Property tests: random operation sequences (with colliding keys, unknown
//! jobs, huge amounts and bad fee rates) never break the settlement rules.

use std::collections::BTreeMap;

use kiln_contracts::{AccountId, Applied, ContractError, Ledger, Op, OpKey};
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, ProviderId};
use proptest::prelude::*;

fn buyer(i: u8) -> BuyerId {
    BuyerId::new(Keypair::from_secret_bytes([i + 1; 32]).public())
}
fn provider(i: u8) -> ProviderId {
    ProviderId::from_public_key(&Keypair::from_secret_bytes([i + 100; 32]).public())
}

fn amount(typical: u64) -> impl Strategy<Value = Credits> {
    prop_oneof![8 => 0..typical, 1 => Just(0u64), 1 => (u64::MAX - 3)..=u64::MAX].prop_map(Credits)
}
fn account() -> impl Strategy<Value = AccountId> {
    prop_oneof![
        2 => (0u8..2).prop_map(|i| AccountId::Buyer(buyer(i))),
        1 => (0u8..2).prop_map(|i| AccountId::Provider(provider(i))),
        1 => Just(AccountId::Fee),
    ]
}
fn op() -> impl Strategy<Value = Op> {
    // A small pool of keys and jobs so collisions and re-settlements happen.
    let key = (0u8..100).prop_map(|i| OpKey::new(format!("k{i}")));
    let job = (0u8..4).prop_map(|i| JobId::from_bytes([i; 16]));
    prop_oneof![
        3 => (key.clone(), account(), amount(2_000)).prop_map(|(key, account, amount)| Op::Deposit { key, account, amount }),
        2 => (key.clone(), account(), amount(1_000)).prop_map(|(key, account, amount)| Op::Withdraw { key, account, amount }),
        3 => (key.clone(), job.clone(), 0u8..2, amount(500)).prop_map(|(key, job, b, amount)| Op::Lock { key, job, buyer: buyer(b), amount }),
        3 => (key.clone(), job.clone(), 0u8..2, amount(800), 0u16..=11_000).prop_map(|(key, job, p, cost, fee_bps)| Op::Release { key, job, provider: provider(p), cost, fee_bps }),
        1 => (key, job).prop_map(|(key, job)| Op::Refund { key, job }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_rule(ops in proptest::collection::vec(op(), 1..80)) {
        let mut l = Ledger::new();
        let mut done: Vec<(Op, Applied)> = Vec::new();
        let mut settled = BTreeMap::new();
        for op in ops {
            let before = l.clone();
            let fresh = l.applied(op.key()).is_none();
            match l.apply(op.clone()) {
                Err(e) => {
                    // Balances are unsigned, so "never negative" means: a refused op changes nothing.
                    prop_assert_eq!(&l, &before, "refused {:?} ({}) changed the ledger", op, e);
                    if let ContractError::InsufficientFunds { account, needed, available } = e {
                        prop_assert!(available < needed);
                        prop_assert_eq!(before.balance(&account), available);
                    }
                }
                Ok(effect) => {
                    if !fresh {
                        prop_assert_eq!(&l, &before, "replaying {:?} changed the ledger", op);
                    }
                    if let Applied::Released { job, .. } | Applied::Refunded { job, .. } = &effect
                        && fresh
                    {
                        prop_assert!(settled.insert(*job, l.escrow(job).cloned()).is_none(), "job {} settled twice", job);
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
            // A settled escrow never changes again.
            for (job, escrow) in &settled {
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
