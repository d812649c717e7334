//! The signed, hash-chained ledger: a 50-entry chain verifies, and every
//! kind of tampering (or coordinator bug) is reported at exactly the first
//! bad entry.

use std::collections::BTreeMap;

use kiln_contracts::{
    AccountId, Applied, ChainBuilder, ChainError, ChainFault, ContractError, GENESIS_PREV, Ledger,
    LedgerEntry, Mismatch, Op, OpKey, compare_balances, entry_hash, verify_chain,
};
use kiln_protocol::encoding;
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, Nonce, ProviderId, Signed, UnixMillis};

type Entry = Signed<LedgerEntry>;

fn coordinator() -> Keypair {
    Keypair::from_secret_bytes([42; 32])
}
fn buyer(i: u8) -> BuyerId {
    BuyerId::new(Keypair::from_secret_bytes([i + 1; 32]).public())
}
fn provider(i: u8) -> ProviderId {
    ProviderId::from_public_key(&Keypair::from_secret_bytes([i + 100; 32]).public())
}
fn job(i: u8) -> JobId {
    JobId::from_bytes([i; 16])
}
fn k(s: impl Into<String>) -> OpKey {
    OpKey::new(s)
}
fn at(seq: usize) -> UnixMillis {
    UnixMillis(1_700_000_000_000 + 1_000 * seq as u64)
}

/// 50 ops, every kind, all of which apply.
fn fifty_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    for (i, account, n) in [
        (0, AccountId::Buyer(buyer(0)), 100_000),
        (1, AccountId::Buyer(buyer(1)), 50_000),
        (2, AccountId::Provider(provider(0)), 20_000),
        (3, AccountId::Provider(provider(1)), 20_000),
    ] {
        ops.push(Op::Deposit {
            key: k(format!("deposit:{i}")),
            account,
            amount: Credits(n),
        });
    }
    for (p, n) in [(0, 10_000), (1, 8_000)] {
        ops.push(Op::Stake {
            key: k(format!("stake:{p}")),
            provider: provider(p),
            amount: Credits(n),
        });
    }
    for j in 0..8 {
        ops.push(Op::Lock {
            key: k(format!("lock:{j}")),
            job: job(j),
            buyer: buyer(j % 2),
            amount: Credits(5_000),
        });
    }
    for (n, cost) in [(1, 1_000), (2, 1_500)] {
        for j in 0..8 {
            ops.push(Op::SettleInterval {
                key: k(format!("interval:{j}:{n}")),
                job: job(j),
                provider: provider(j % 2),
                cost: Credits(cost),
                fee_bps: 250,
            });
        }
    }
    for j in 0..4 {
        ops.push(Op::Release {
            key: k(format!("release:{j}")),
            job: job(j),
            provider: provider(j % 2),
            cost: Credits(4_000),
            fee_bps: 250,
        });
    }
    for j in 4..6 {
        ops.push(Op::Refund {
            key: k(format!("refund:{j}")),
            job: job(j),
        });
    }
    for (j, p, n) in [(6, 0, 2_000), (7, 1, 1_000)] {
        ops.push(Op::Slash {
            key: k(format!("slash:{j}")),
            provider: provider(p),
            job: job(j),
            amount: Credits(n),
            buyer_share_bps: 5_000,
            verifier: Some(provider(2)),
            verifier_share_bps: 2_000,
        });
    }
    for (p, n) in [(0, 1_000), (1, 500)] {
        ops.push(Op::Unstake {
            key: k(format!("unstake:{p}")),
            provider: provider(p),
            amount: Credits(n),
        });
    }
    for (i, account, n) in [
        (0, AccountId::Provider(provider(0)), 1_000),
        (1, AccountId::Buyer(buyer(0)), 10_000),
        (2, AccountId::Verifier(provider(2)), 500),
        (3, AccountId::Fee, 100),
    ] {
        ops.push(Op::Withdraw {
            key: k(format!("withdraw:{i}")),
            account,
            amount: Credits(n),
        });
    }
    for j in 6..8 {
        ops.push(Op::Release {
            key: k(format!("release:{j}")),
            job: job(j),
            provider: provider(j % 2),
            cost: Credits(2_500),
            fee_bps: 250,
        });
    }
    for i in 4..8 {
        ops.push(Op::Deposit {
            key: k(format!("deposit:{i}")),
            account: AccountId::Buyer(buyer(i % 2)),
            amount: Credits(1_000 * u64::from(i)),
        });
    }
    assert_eq!(ops.len(), 50);
    ops
}

/// Applies `ops` and records each in a chain signed by `key`.
fn build(key: &Keypair, ops: Vec<Op>) -> (Ledger, Vec<Entry>) {
    let mut ledger = Ledger::new();
    let mut chain = ChainBuilder::genesis(key.clone());
    let mut entries = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        let effect = ledger.apply(op.clone()).expect("the script applies");
        entries.push(chain.append(op, effect, at(i)).expect("entries encode"));
    }
    (ledger, entries)
}

fn fifty() -> (Ledger, Vec<Entry>) {
    build(&coordinator(), fifty_ops())
}

fn verify(entries: &[Entry]) -> Result<Ledger, ChainError> {
    verify_chain(entries, &coordinator().public())
}

fn bad_at(entries: &[Entry]) -> (u64, ChainFault) {
    let e = verify(entries).expect_err("a tampered chain verified");
    (e.seq, e.fault)
}

/// Changes the first amount in an op.
fn bump_amount(op: &mut Op) {
    match op {
        Op::Deposit { amount, .. }
        | Op::Withdraw { amount, .. }
        | Op::Lock { amount, .. }
        | Op::Stake { amount, .. }
        | Op::Unstake { amount, .. }
        | Op::Slash { amount, .. } => amount.0 += 1,
        Op::Release { cost, .. } | Op::SettleInterval { cost, .. } => cost.0 += 1,
        Op::Refund { job, .. } => *job = JobId::from_bytes([99; 16]),
    }
}

#[test]
fn a_fifty_entry_chain_verifies_and_matches_the_state() {
    let (ledger, entries) = fifty();
    assert_eq!(entries.len(), 50);
    assert_eq!(entries[0].payload.prev, GENESIS_PREV);
    for (i, pair) in entries.windows(2).enumerate() {
        assert_eq!(pair[0].payload.seq, i as u64);
        assert_eq!(pair[1].payload.prev, entry_hash(&pair[0]));
    }
    let replayed = verify(&entries).unwrap();
    assert_eq!(replayed, ledger);
    compare_balances(&replayed, ledger.balances()).unwrap();
    replayed.check_invariants().unwrap();
    // Every kind of op is in there, and money was burned.
    assert!(ledger.total_burned() > Credits(0));
    assert!(ledger.balance(&AccountId::Verifier(provider(2))) > Credits(0));
    // Entries are deterministic: the same history signs to the same bytes.
    let (_, again) = fifty();
    assert_eq!(again, entries);
    // A builder resumed after entry 29 continues the same chain.
    let mut resumed = ChainBuilder::after(coordinator(), &entries[29]);
    assert_eq!(resumed.next_seq(), 30);
    assert_eq!(resumed.last_hash(), entry_hash(&entries[29]));
    let e = &entries[30].payload;
    assert_eq!(
        resumed
            .append(e.op.clone(), e.effect.clone(), e.at)
            .unwrap(),
        entries[30]
    );
    // The empty chain is the empty ledger.
    assert_eq!(verify(&[]).unwrap(), Ledger::new());
}

#[test]
fn entries_round_trip_through_json_and_the_canonical_encoding() {
    let (_, entries) = fifty();
    let mut from_json = Vec::new();
    let mut from_bytes = Vec::new();
    for e in &entries {
        let json = serde_json::to_string(e).unwrap();
        let back: Entry = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, e, "{json}");
        assert_eq!(entry_hash(&back), entry_hash(e));
        from_json.push(back);
        let bytes = encoding::encode(e).unwrap();
        let back: Entry = encoding::decode(&bytes).unwrap();
        assert_eq!(&back, e);
        from_bytes.push(back);
    }
    let v: serde_json::Value = serde_json::to_value(&entries[3]).unwrap();
    assert_eq!(
        v["payload"]["prev"].as_str().unwrap().len(),
        64,
        "prev is hex in JSON"
    );
    assert_eq!(v["payload"]["seq"], 3);
    verify(&from_json).unwrap();
    verify(&from_bytes).unwrap();
}

#[test]
fn changing_an_entry_names_exactly_that_entry() {
    let (_, entries) = fifty();
    for seq in [0usize, 17, 49] {
        let mut amount = entries.clone();
        bump_amount(&mut amount[seq].payload.op);
        let mut effect = entries.clone();
        effect[seq].payload.effect = entries[(seq + 1) % 50].payload.effect.clone();
        let mut time = entries.clone();
        time[seq].payload.at = UnixMillis(time[seq].payload.at.0 + 1);
        let mut expiry = entries.clone();
        expiry[seq].expires_at = UnixMillis(1);
        for (what, chain) in [
            ("amount", amount),
            ("effect", effect),
            ("time", time),
            ("expiry", expiry),
        ] {
            let (bad, fault) = bad_at(&chain);
            assert_eq!(bad, seq as u64, "{what} changed at {seq}: {fault}");
            assert!(
                matches!(fault, ChainFault::BadSignature { .. }),
                "{what}: {fault}"
            );
        }
    }
    let mut chain = entries.clone();
    bump_amount(&mut chain[7].payload.op);
    let msg = verify(&chain).unwrap_err().to_string();
    assert!(msg.starts_with("ledger entry 7 is bad"), "{msg}");
}

#[test]
fn flipping_any_byte_of_an_entry_names_exactly_that_entry() {
    let (_, entries) = fifty();
    // Every byte of an early entry, a sample of the last one (signature
    // checks are slow in an unoptimised build, and each flip re-verifies
    // the entries before it).
    for (seq, step, min) in [(1usize, 1usize, 100), (49, 41, 4)] {
        let bytes = encoding::encode(&entries[seq]).unwrap();
        let mut decoded = 0;
        for i in (0..bytes.len()).step_by(step) {
            for bit in [0x01u8] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let Ok(tampered) = encoding::decode::<Entry>(&b) else {
                    continue; // unreadable: refused before verification
                };
                if tampered == entries[seq] {
                    continue;
                }
                decoded += 1;
                let mut chain = entries.clone();
                chain[seq] = tampered;
                let (bad, fault) = bad_at(&chain);
                assert_eq!(bad, seq as u64, "flip {bit:#x} at byte {i}: {fault}");
            }
        }
        assert!(decoded >= min, "only {decoded} flips decoded");
    }
}

#[test]
fn removing_or_reordering_entries_names_the_first_one_out_of_place() {
    let (ledger, entries) = fifty();
    for seq in [0usize, 1, 25, 48] {
        let mut chain = entries.clone();
        chain.remove(seq);
        assert_eq!(
            bad_at(&chain),
            (
                seq as u64,
                ChainFault::Missing {
                    found: seq as u64 + 1
                }
            ),
            "removed {seq}"
        );
        let mut chain = entries.clone();
        chain.swap(seq, seq + 1);
        assert_eq!(
            bad_at(&chain),
            (
                seq as u64,
                ChainFault::Missing {
                    found: seq as u64 + 1
                }
            ),
            "swapped {seq}"
        );
        let mut chain = entries.clone();
        chain.insert(seq + 1, entries[seq].clone());
        assert_eq!(
            bad_at(&chain),
            (seq as u64 + 1, ChainFault::Misplaced { found: seq as u64 }),
            "duplicated {seq}"
        );
    }
    let mut reversed = entries.clone();
    reversed.reverse();
    assert_eq!(bad_at(&reversed), (0, ChainFault::Missing { found: 49 }));
    // A truncated chain is a valid prefix; comparing with the published
    // state is what catches it.
    let prefix = verify(&entries[..49]).unwrap();
    let e = compare_balances(&prefix, ledger.balances()).unwrap_err();
    assert_eq!(*e.account, AccountId::Buyer(buyer(1)));
    let msg = e.to_string();
    assert!(msg.contains("published state"), "{msg}");
}

#[test]
fn entries_signed_by_another_key_are_rejected() {
    let (_, entries) = fifty();
    let other = Keypair::from_secret_bytes([7; 32]);
    let e = verify_chain(&entries, &other.public()).unwrap_err();
    assert_eq!(e.seq, 0);
    assert!(matches!(e.fault, ChainFault::WrongSigner { .. }));
    // Re-signing one entry with another key, link intact.
    let mut chain = entries.clone();
    let p = chain[12].payload.clone();
    let mut forger = ChainBuilder::resume(other.clone(), p.seq, p.prev);
    chain[12] = forger.append(p.op, p.effect, p.at).unwrap();
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, 12);
    assert!(matches!(fault, ChainFault::WrongSigner { .. }), "{fault}");
    // Claiming the coordinator as signer does not help.
    chain[12].signer = coordinator().public();
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, 12);
    assert!(matches!(fault, ChainFault::BadSignature { .. }), "{fault}");
}

/// Signs `ops[..n]` correctly, then entry `n` through `make`, then the rest
/// of the ops that still apply, correctly, after it.
fn chain_with(n: usize, make: impl FnOnce(&mut ChainBuilder, &mut Ledger) -> Entry) -> Vec<Entry> {
    let ops = fifty_ops();
    let mut ledger = Ledger::new();
    let mut chain = ChainBuilder::genesis(coordinator());
    let mut entries = Vec::new();
    for (i, op) in ops.iter().take(n).enumerate() {
        let effect = ledger.apply(op.clone()).expect("the script applies");
        entries.push(
            chain
                .append(op.clone(), effect, at(i))
                .expect("entries encode"),
        );
    }
    let bad = make(&mut chain, &mut ledger);
    let mut chain = ChainBuilder::after(coordinator(), &bad);
    entries.push(bad);
    for (i, op) in ops.iter().enumerate().skip(n) {
        if let Ok(effect) = ledger.apply(op.clone()) {
            entries.push(
                chain
                    .append(op.clone(), effect, at(i))
                    .expect("entries encode"),
            );
        }
    }
    entries
}

#[test]
fn a_coordinator_signing_a_wrong_history_is_caught_at_the_first_wrong_entry() {
    let n = 20; // ops[20] is interval:6:1, ops[21] interval:7:1
    let ops = fifty_ops();
    // A wrong effect, properly signed.
    let chain = chain_with(n, |c, l| {
        let op = ops[n].clone();
        let mut effect = l.apply(op.clone()).unwrap();
        if let Applied::IntervalSettled { paid, .. } = &mut effect {
            paid.0 += 1;
        }
        c.append(op, effect, at(n)).unwrap()
    });
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, n as u64);
    assert!(
        matches!(fault, ChainFault::EffectMismatch { .. }),
        "{fault}"
    );
    // An op that does not apply.
    let chain = chain_with(n, |c, _| {
        let op = Op::Withdraw {
            key: OpKey::new("theft"),
            account: AccountId::Fee,
            amount: Credits(1_000_000),
        };
        let effect = Applied::Withdrawn {
            account: AccountId::Fee,
            amount: Credits(1_000_000),
            balance: Credits(0),
        };
        c.append(op, effect, at(n)).unwrap()
    });
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, n as u64);
    assert!(
        matches!(
            fault,
            ChainFault::OpFailed(ContractError::InsufficientFunds { .. })
        ),
        "{fault}"
    );
    // An op recorded twice.
    let chain = chain_with(n, |c, l| {
        let op = ops[n - 1].clone();
        let effect = l.apply(op.clone()).unwrap();
        c.append(op, effect, at(n)).unwrap()
    });
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, n as u64);
    assert_eq!(
        fault,
        ChainFault::Replayed {
            key: ops[n - 1].key().clone()
        }
    );
    // A wrong link, properly signed.
    let chain = chain_with(n, |c, l| {
        let op = ops[n].clone();
        let effect = l.apply(op.clone()).unwrap();
        let mut liar = ChainBuilder::resume(coordinator(), c.next_seq(), [7; 32]);
        liar.append(op, effect, at(n)).unwrap()
    });
    let (bad, fault) = bad_at(&chain);
    assert_eq!(bad, n as u64);
    assert!(matches!(fault, ChainFault::BrokenLink { found, .. } if found == [7; 32]));
    // A skipped seq, properly signed.
    let chain = chain_with(n, |c, l| {
        let op = ops[n].clone();
        let effect = l.apply(op.clone()).unwrap();
        let mut skipper = ChainBuilder::resume(coordinator(), c.next_seq() + 1, c.last_hash());
        skipper.append(op, effect, at(n)).unwrap()
    });
    assert_eq!(
        bad_at(&chain),
        (
            n as u64,
            ChainFault::Missing {
                found: n as u64 + 1
            }
        )
    );
}

#[test]
fn signatures_are_checked_as_of_each_entrys_own_time() {
    let key = coordinator();
    let op = Op::Deposit {
        key: k("d"),
        account: AccountId::Fee,
        amount: Credits(5),
    };
    let effect = Applied::Deposited {
        account: AccountId::Fee,
        amount: Credits(5),
        balance: Credits(5),
    };
    let entry = |expires_at| {
        Signed::sign_with(
            &key,
            LedgerEntry {
                seq: 0,
                prev: GENESIS_PREV,
                op: op.clone(),
                effect: effect.clone(),
                at: UnixMillis(1_000),
            },
            Nonce::from_bytes([1; 16]),
            UnixMillis(expires_at),
        )
        .unwrap()
    };
    // Expired long ago by the wall clock, but valid when it was written.
    verify(&[entry(1_000)]).unwrap();
    verify(&[entry(2_000)]).unwrap();
    let (bad, fault) = bad_at(&[entry(999)]);
    assert_eq!(bad, 0);
    assert!(
        matches!(&fault, ChainFault::BadSignature { reason } if reason.contains("expired")),
        "{fault}"
    );
}

#[test]
fn compare_balances_names_the_first_differing_account() {
    let (ledger, _) = fifty();
    let mut claimed = ledger.balances().clone();
    compare_balances(&ledger, &claimed).unwrap();
    // An explicit zero for an unknown account is no difference.
    claimed.insert(AccountId::Provider(provider(9)), Credits(0));
    compare_balances(&ledger, &claimed).unwrap();
    let mut inflated = claimed.clone();
    *inflated.get_mut(&AccountId::Fee).unwrap() = Credits(1_000_000);
    assert_eq!(
        compare_balances(&ledger, &inflated),
        Err(Mismatch {
            account: Box::new(AccountId::Fee),
            recomputed: ledger.balance(&AccountId::Fee),
            claimed: Credits(1_000_000),
        })
    );
    let mut missing = BTreeMap::new();
    missing.insert(AccountId::Verifier(provider(8)), Credits(3));
    let e = compare_balances(&ledger, &missing).unwrap_err();
    // Accounts are compared in order; buyers sort first.
    assert!(matches!(*e.account, AccountId::Buyer(_)), "{e}");
}
