//! `ledger`: the signed ledger as an auditor reads it (rows of
//! `GET /v1/ledger`, or the coordinator's own `ledger_entries` at
//! start-up): `Signed<LedgerEntry>` rows, then `verify_chain`, which
//! replays them from genesis against the coordinator's key.
//!
//! Input: a mode byte, then frames (`u16` little-endian length, bytes).
//!
//! * `0`: each frame is a signed row; the chain must verify only as a
//!   prefix of what the coordinator signed (the fuzzer cannot sign), and a
//!   verified chain's ledger satisfies its invariants.
//! * `1`: each frame is an `Op`; the harness applies them to a ledger and
//!   signs what applied under a new key as the coordinator would
//!   (`ChainBuilder`; a repeated key is an idempotent replay), so
//!   `verify_chain` replays arbitrary histories: it must accept them and
//!   reach the same balances, and no op may panic or break an invariant.

use kiln_contracts::chain::{ChainBuilder, LedgerEntry, verify_chain};
use kiln_contracts::{Ledger, Op, compare_balances};
use kiln_protocol::{Signed, UnixMillis, encoding};

use super::{Outcome, Target, Verdict, enc, tagged};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "ledger",
    about: "Signed<LedgerEntry> rows + kiln_contracts::verify_chain (the auditor's replay); arbitrary op histories re-signed",
    max_len: 8 * 1024,
    seeds,
    dict: &[],
    run,
};

fn frames(mut b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while b.len() >= 2 && out.len() < 64 {
        let n = u16::from_le_bytes([b[0], b[1]]) as usize;
        let end = (2 + n).min(b.len());
        out.push(&b[2..end]);
        b = &b[end..];
    }
    out
}

fn run(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let key = s::key_for_ledger();
    if mode % 2 == 0 {
        let mut rows = Vec::new();
        for f in frames(rest) {
            match Signed::<LedgerEntry>::from_bytes(f) {
                Ok(r) => rows.push(r),
                Err(_) => return Ok(Verdict::Rejected),
            }
        }
        let Ok(ledger) = verify_chain(&rows, &key.public()) else {
            return Ok(Verdict::Rejected);
        };
        let real = s::ledger_chain();
        if rows.len() > real.len() || rows.iter().zip(&real).any(|(a, b)| a.payload != b.payload) {
            return Err(format!(
                "a chain of {} rows that the coordinator never signed verifies",
                rows.len()
            ));
        }
        ledger
            .check_invariants()
            .map_err(|e| format!("a verified chain breaks an invariant: {e}"))?;
        return Ok(Verdict::Accepted);
    }
    let mut ledger = Ledger::new();
    let mut chain = ChainBuilder::genesis(key.clone());
    let mut rows = Vec::new();
    for (i, f) in frames(rest).into_iter().enumerate() {
        let Ok(op) = encoding::decode::<Op>(f) else {
            return Ok(Verdict::Rejected);
        };
        // As the coordinator does: a key already applied is an idempotent
        // replay (`apply` returns the recorded effect), never a new entry.
        if let Some(recorded) = ledger.applied(op.key()).map(|a| a.effect.clone()) {
            if let Ok(effect) = ledger.apply(op.clone())
                && effect != recorded
            {
                return Err(format!(
                    "replaying key `{}` returned another effect than the recorded one",
                    op.key().as_str()
                ));
            }
            continue;
        }
        let Ok(effect) = ledger.apply(op.clone()) else {
            continue;
        };
        let at = UnixMillis(s::NOW.0 + i as u64);
        rows.push(chain.append(op, effect, at).map_err(|e| e.to_string())?);
    }
    ledger
        .check_invariants()
        .map_err(|e| format!("applied ops break an invariant: {e}"))?;
    let replayed = verify_chain(&rows, &key.public())
        .map_err(|e| format!("a chain signed from applied ops does not verify: {e}"))?;
    compare_balances(&replayed, ledger.balances())
        .map_err(|e| format!("the replay disagrees with the ledger: {e}"))?;
    Ok(if rows.is_empty() {
        Verdict::Rejected
    } else {
        Verdict::Accepted
    })
}

fn framed(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn seeds() -> Vec<Vec<u8>> {
    let chain = s::ledger_chain();
    let rows: Vec<Vec<u8>> = chain.iter().map(enc).collect();
    let ops: Vec<Vec<u8>> = chain.iter().map(|e| enc(&e.payload.op)).collect();
    vec![
        tagged(0, &framed(&rows)),
        tagged(0, &framed(&rows[..2.min(rows.len())])),
        tagged(1, &framed(&ops)),
    ]
}
