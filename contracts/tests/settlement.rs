//! The `Settlement` trait drives a job's life generically, and every op,
//! effect and ledger round-trips through JSON and the canonical encoding.

use std::fmt::Debug;

use kiln_contracts::{
    AccountId, Applied, ContractError, Ledger, Op, OpKey, Settlement, SlashSplit,
};
use kiln_protocol::encoding;
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, ProviderId};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn buyer() -> BuyerId {
    BuyerId::new(Keypair::from_secret_bytes([1; 32]).public())
}
fn provider(i: u8) -> ProviderId {
    ProviderId::from_public_key(&Keypair::from_secret_bytes([100 + i; 32]).public())
}
fn job(i: u8) -> JobId {
    JobId::from_bytes([i; 16])
}
fn k(s: &str) -> OpKey {
    OpKey::new(s)
}

/// A long job against any implementation: stake, lock, three intervals, a
/// fourth the escrow cannot cover, final release; then a slash on another job.
fn long_job<S: Settlement>(s: &mut S) -> Vec<Result<Applied, S::Error>> {
    let (p, v) = (provider(0), provider(1));
    vec![
        s.stake(k("stake"), p, Credits(1_000)),
        s.lock(k("lock:1"), job(1), buyer(), Credits(1_000)),
        s.settle_interval(k("interval:1:1"), job(1), p, Credits(300), 250),
        s.settle_interval(k("interval:1:2"), job(1), p, Credits(300), 250),
        s.settle_interval(k("interval:1:3"), job(1), p, Credits(300), 250),
        s.settle_interval(k("interval:1:4"), job(1), p, Credits(300), 250),
        s.release(k("release:1"), job(1), p, Credits(1_100), 250),
        s.lock(k("lock:2"), job(2), buyer(), Credits(500)),
        s.slash(
            k("slash:2"),
            p,
            job(2),
            Credits(400),
            SlashSplit {
                buyer_share_bps: 5_000,
                verifier: Some(v),
                verifier_share_bps: 2_500,
            },
        ),
        s.refund(k("refund:2"), job(2)),
        s.unstake(k("unstake"), p, Credits(600)),
        // The slashed 400 is gone.
        s.unstake(k("unstake-2"), p, Credits(400)),
    ]
}

#[test]
fn the_reference_implementation_settles_a_long_job() {
    let mut l = Ledger::new();
    l.apply(Op::Deposit {
        key: k("d"),
        account: AccountId::Buyer(buyer()),
        amount: Credits(2_000),
    })
    .unwrap();
    l.apply(Op::Deposit {
        key: k("pd"),
        account: AccountId::Provider(provider(0)),
        amount: Credits(1_000),
    })
    .unwrap();
    assert!(!l.eligible(&provider(0), Credits(1_000)));
    let results = long_job(&mut l);
    let errors: Vec<(usize, &ContractError)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(matches!(
        errors[0],
        (
            5,
            ContractError::EscrowExhausted {
                remaining: Credits(100),
                ..
            }
        )
    ));
    assert!(matches!(
        errors[1],
        (
            11,
            ContractError::InsufficientStake {
                bonded: Credits(0),
                slashed: Credits(400),
                ..
            }
        )
    ));
    // The fee is cumulative over the escrow: intervals took 7 + 8 + 7 =
    // fee_for(900) = 22, the release takes fee_for(1000) - 22 = 3 (not
    // fee_for(100) = 2), so the job's fees total fee_for(1000) = 25.
    assert!(matches!(
        results[6],
        Ok(Applied::Released {
            cost: Credits(1_000),
            already_paid: Credits(900),
            paid: Credits(97),
            fee: Credits(3),
            refunded: Credits(0),
            ..
        })
    ));
    let interval_fees: Vec<u64> = results[2..5]
        .iter()
        .map(|r| match r {
            Ok(Applied::IntervalSettled { fee, .. }) => fee.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(interval_fees, [7, 8, 7]);
    assert_eq!(l.balance(&AccountId::Fee), Credits(25));
    let e = l.escrow(&job(1)).unwrap();
    assert_eq!(
        (e.gross_paid(), e.fee_taken, e.net_paid()),
        (Credits(1_000), Credits(25), Credits(975))
    );
    assert_eq!(l.bonded(&provider(0)), Credits(0));
    assert_eq!(l.escrow_remaining(&job(1)), Credits(0));
    assert_eq!(l.balance(&AccountId::Verifier(provider(1))), Credits(100));
    assert_eq!(l.total_burned(), Credits(100));
    assert_eq!(l.balance(&AccountId::Buyer(buyer())), Credits(1_200));
    l.check_invariants().unwrap();
    // Re-running the whole job changes nothing and repeats every effect
    // (the refused calls stay refused, though not always for the same reason:
    // the fourth interval now finds the escrow closed).
    let before = l.clone();
    let again = long_job(&mut l);
    assert_eq!(l, before);
    for (first, second) in results.iter().zip(&again) {
        match first {
            Ok(effect) => assert_eq!(second.as_ref(), Ok(effect)),
            Err(_) => assert!(second.is_err()),
        }
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let json = serde_json::to_string(value).expect("serializes to JSON");
    let back: T = serde_json::from_str(&json).expect("deserializes from JSON");
    assert_eq!(&back, value, "{json}");
    let bytes = encoding::encode(value).expect("encodes");
    let back: T = encoding::decode(&bytes).expect("decodes");
    assert_eq!(&back, value);
}

#[test]
fn ops_effects_and_ledgers_round_trip_through_both_encodings() {
    let mut l = Ledger::new();
    let ops = vec![
        Op::Deposit {
            key: k("d"),
            account: AccountId::Buyer(buyer()),
            amount: Credits(5_000),
        },
        Op::Deposit {
            key: k("pd"),
            account: AccountId::Provider(provider(0)),
            amount: Credits(5_000),
        },
        Op::Stake {
            key: k("s"),
            provider: provider(0),
            amount: Credits(2_000),
        },
        Op::Lock {
            key: k("l1"),
            job: job(1),
            buyer: buyer(),
            amount: Credits(1_000),
        },
        Op::SettleInterval {
            key: k("i1"),
            job: job(1),
            provider: provider(0),
            cost: Credits(100),
            fee_bps: 250,
        },
        Op::Release {
            key: k("r1"),
            job: job(1),
            provider: provider(0),
            cost: Credits(400),
            fee_bps: 250,
        },
        Op::Lock {
            key: k("l2"),
            job: job(2),
            buyer: buyer(),
            amount: Credits(1_000),
        },
        Op::Slash {
            key: k("x2"),
            provider: provider(0),
            job: job(2),
            amount: Credits(500),
            buyer_share_bps: 5_000,
            verifier: Some(provider(1)),
            verifier_share_bps: 1_000,
        },
        Op::Slash {
            key: k("x3"),
            provider: provider(0),
            job: job(2),
            amount: Credits(100),
            buyer_share_bps: 0,
            verifier: None,
            verifier_share_bps: 0,
        },
        Op::Refund {
            key: k("f2"),
            job: job(2),
        },
        Op::Unstake {
            key: k("u"),
            provider: provider(0),
            amount: Credits(1_000),
        },
        Op::Withdraw {
            key: k("w"),
            account: AccountId::Verifier(provider(1)),
            amount: Credits(50),
        },
    ];
    for op in ops {
        round_trip(&op);
        let effect = l.apply(op).unwrap();
        round_trip(&effect);
    }
    l.check_invariants().unwrap();
    round_trip(&l);
    // JSON keeps the readable names the coordinator already stores.
    let json = serde_json::to_value(l.applied(&k("x2")).unwrap()).unwrap();
    assert!(
        json["op"]["slash"]["verifier"]
            .as_str()
            .unwrap()
            .starts_with("12D3")
    );
    assert!(json["effect"]["slashed"]["burned"].is_u64());
    let balances = serde_json::to_value(l.balances()).unwrap();
    assert!(
        balances
            .get(AccountId::Verifier(provider(1)).to_string())
            .is_some()
    );
}
