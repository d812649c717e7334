//! The auditable ledger: every applied [`Op`] as an append-only entry,
//! hash-chained and signed by the coordinator, and the replay that checks it.
//!
//! ## Entries
//!
//! Entry `n` is a [`LedgerEntry`] `{ seq: n, prev, op, effect, at }` in a
//! [`Signed`] envelope (domain `kiln/ledger-entry/v1`) signed by the
//! coordinator's key. `prev` is [`entry_hash`] of entry `n − 1` — blake3 over
//! the canonical encoding ([`kiln_protocol::encoding`]) of the whole signed
//! envelope, signature included — and [`GENESIS_PREV`] (all zeros) for entry
//! 0. Changing, removing, inserting or reordering any entry therefore breaks
//! either its signature or the next entry's link.
//!
//! ## Writing ([`ChainBuilder`])
//!
//! The coordinator keeps one `ChainBuilder` next to its [`Ledger`]. For each
//! op: note whether its key is new (`ledger.applied(op.key()).is_none()`),
//! `ledger.apply(op)`, and only when the key was new and the op succeeded
//! call [`ChainBuilder::append`] and store the entry — in the same database
//! transaction as the op. A replayed key or a refused op gets no entry:
//! [`verify_chain`] rejects an entry whose key was already applied. The
//! builder is `Clone`: stage a clone with the pending ledger and keep it only
//! if the transaction commits, exactly like the ledger itself.
//!
//! Entries are deterministic: the nonce is derived from `seq` and `prev`,
//! ed25519 signatures are deterministic, and every entry is signed with the
//! expiry [`NEVER_EXPIRES`], so signing the same op, effect and time again
//! after a crash yields the same bytes.
//!
//! ## Expiry rule
//!
//! Ledger entries are permanent records, so verification does not use the
//! verifier's clock: [`verify_chain`] checks each envelope (signature, then
//! expiry) *as of the entry's own `at`*. Entries from [`ChainBuilder`] never
//! expire; an entry whose envelope claims to have expired before its own
//! timestamp is rejected. `at` is informational otherwise: it need not
//! increase (a coordinator's clock may step back).
//!
//! ## Verifying ([`verify_chain`], [`compare_balances`])
//!
//! Anyone holding the entries and the coordinator's published public key
//! replays the chain from genesis: for each entry in order it checks the
//! signer and signature, the sequence number, the link, that the op's key was
//! not applied before, and that re-applying the op to a fresh [`Ledger`]
//! succeeds with exactly the recorded effect; at the end it checks the
//! ledger's invariants. The first failure is reported as a [`ChainError`]
//! naming that entry's `seq` (a position: for a missing entry, the `seq` that
//! should have been there). The returned ledger is then compared with the
//! state the coordinator publishes ([`compare_balances`]), which also catches
//! a chain served truncated.
//!
//! ```
//! use kiln_contracts::{AccountId, ChainBuilder, Credits, Ledger, Op, OpKey, verify_chain, compare_balances};
//! use kiln_protocol::{Keypair, UnixMillis};
//! let coordinator = Keypair::from_secret_bytes([9; 32]);
//! let mut ledger = Ledger::new();
//! let mut chain = ChainBuilder::genesis(coordinator.clone());
//! let mut entries = Vec::new();
//! for (n, key) in [(5, "deposit:a"), (7, "deposit:b"), (5, "deposit:a")] {
//!     let op = Op::Deposit { key: OpKey::new(key), account: AccountId::Fee, amount: Credits(n) };
//!     let fresh = ledger.applied(op.key()).is_none();
//!     let effect = ledger.apply(op.clone())?;
//!     if fresh {
//!         // Stored in the same database transaction as the op.
//!         entries.push(chain.append(op, effect, UnixMillis(1_700_000_000_000))?);
//!     }
//! }
//! assert_eq!(entries.len(), 2); // the retry got no entry
//! // An auditor, with the entries and the coordinator's published key:
//! let replayed = verify_chain(&entries, &coordinator.public())?;
//! compare_balances(&replayed, ledger.balances())?;
//! entries[1].payload.op = Op::Deposit { key: OpKey::new("deposit:b"), account: AccountId::Fee, amount: Credits(70) };
//! assert_eq!(verify_chain(&entries, &coordinator.public()).unwrap_err().seq, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;

use kiln_protocol::encoding::{self, EncodeError};
use kiln_protocol::{Credits, Keypair, Nonce, PublicKey, Signed, SignedMessage, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::account::{AccountId, OpKey};
use crate::ledger::{Applied, ContractError, InvariantViolation, Ledger, Op};

/// The `prev` of entry 0.
pub const GENESIS_PREV: [u8; 32] = [0; 32];

/// The expiry [`ChainBuilder`] signs every entry with.
pub const NEVER_EXPIRES: UnixMillis = UnixMillis(u64::MAX);

/// One applied op in the ledger's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// [`entry_hash`] of entry `seq − 1`; [`GENESIS_PREV`] for entry 0.
    /// Hex in JSON, 32 raw bytes in the canonical encoding.
    #[serde(with = "hash_serde")]
    pub prev: [u8; 32],
    pub op: Op,
    /// What `op` did when the coordinator applied it.
    pub effect: Applied,
    /// When the coordinator applied it.
    pub at: UnixMillis,
}

impl SignedMessage for LedgerEntry {
    const DOMAIN: &'static str = "kiln/ledger-entry/v1";
}

/// blake3 of the canonical encoding of the whole signed entry: what the next
/// entry's `prev` must be.
pub fn entry_hash(entry: &Signed<LedgerEntry>) -> [u8; 32] {
    match encoding::encode(entry) {
        Ok(bytes) => *blake3::hash(&bytes).as_bytes(),
        // Unreachable: a `Signed<LedgerEntry>` has no maps, no unsized
        // sequences and no fallible `Serialize` impls. Rather than panic,
        // hash the error text under a distinct key. An entry that cannot be
        // encoded can neither be signed (`ChainBuilder::append` fails) nor
        // verified (`verify_chain` reports a bad signature first), so this
        // value never links a chain that verifies.
        Err(e) => *blake3::Hasher::new_derive_key("kiln ledger entry unencodable v1")
            .update(e.to_string().as_bytes())
            .finalize()
            .as_bytes(),
    }
}

/// Produces the coordinator's next signed entry. See the module docs for
/// how to use it alongside [`Ledger::apply`].
#[derive(Clone, Debug)]
pub struct ChainBuilder {
    key: Keypair,
    next_seq: u64,
    last_hash: [u8; 32],
}

impl ChainBuilder {
    /// A builder for an empty chain: its first entry is seq 0.
    pub fn genesis(key: Keypair) -> Self {
        Self::resume(key, 0, GENESIS_PREV)
    }
    /// A builder continuing a chain whose next entry is `next_seq` and whose
    /// last entry hashes to `last_hash` (ignored, and should be
    /// [`GENESIS_PREV`], when `next_seq` is 0).
    pub fn resume(key: Keypair, next_seq: u64, last_hash: [u8; 32]) -> Self {
        Self {
            key,
            next_seq,
            last_hash,
        }
    }
    /// A builder continuing after `last`, the chain's current last entry.
    pub fn after(key: Keypair, last: &Signed<LedgerEntry>) -> Self {
        Self::resume(key, last.payload.seq.saturating_add(1), entry_hash(last))
    }
    /// The seq the next entry will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// The hash the next entry will link to.
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }
    /// The key entries are signed with.
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// Signs the next entry recording that `op` had `effect` at `at`, and
    /// advances past it. Call it only for an op that applied under a new key.
    pub fn append(
        &mut self,
        op: Op,
        effect: Applied,
        at: UnixMillis,
    ) -> Result<Signed<LedgerEntry>, EncodeError> {
        let entry = LedgerEntry {
            seq: self.next_seq,
            prev: self.last_hash,
            op,
            effect,
            at,
        };
        let nonce = entry_nonce(entry.seq, &entry.prev);
        let signed = Signed::sign_with(&self.key, entry, nonce, NEVER_EXPIRES)?;
        self.last_hash = entry_hash(&signed);
        self.next_seq = self.next_seq.saturating_add(1);
        Ok(signed)
    }
}

/// A nonce unique per position, so entries are reproducible.
fn entry_nonce(seq: u64, prev: &[u8; 32]) -> Nonce {
    let mut h = blake3::Hasher::new_derive_key("kiln ledger entry nonce v1");
    h.update(&seq.to_le_bytes());
    h.update(prev);
    let mut out = [0u8; Nonce::LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..Nonce::LEN]);
    Nonce::from_bytes(out)
}

/// The first bad entry of a chain, by position, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger entry {seq} is bad: {fault}")]
pub struct ChainError {
    /// The seq of the first bad entry: the entry at position `seq` (for a
    /// missing entry, the seq that should have been there).
    pub seq: u64,
    pub fault: ChainFault,
}

/// What is wrong with an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    #[error(
        "it is signed by {signer}, not the coordinator; check that you have the coordinator's \
         published key, or the entry was forged"
    )]
    WrongSigner { signer: Box<PublicKey> },
    #[error("its signature does not verify ({reason}): the entry was altered after signing")]
    BadSignature { reason: String },
    #[error(
        "it is missing: entry {found} is in its place (entries before {found} were removed, \
         or the chain was reordered)"
    )]
    Missing { found: u64 },
    #[error("entry {found} is in its place: that entry appears twice, or the chain was reordered")]
    Misplaced { found: u64 },
    #[error(
        "its prev is {} but the entry before it hashes to {}: an earlier entry was changed, \
         removed or reordered",
        hex::encode(.found),
        hex::encode(.expected)
    )]
    BrokenLink { expected: [u8; 32], found: [u8; 32] },
    #[error("its op key `{key}` was already applied by an earlier entry; a key is recorded once")]
    Replayed { key: OpKey },
    #[error("its op is refused when replayed: {0}")]
    OpFailed(ContractError),
    #[error("replaying its op gives {recomputed:?} but the entry records {recorded:?}")]
    EffectMismatch {
        recorded: Box<Applied>,
        recomputed: Box<Applied>,
    },
    #[error("after replaying up to it, a ledger invariant is broken: {0}")]
    Invariant(InvariantViolation),
}

/// Replays `entries` from genesis and returns the ledger they produce, or
/// the first bad entry. `coordinator` is the coordinator's published key;
/// every entry must be signed by it. See the module docs for the checks and
/// the expiry rule.
pub fn verify_chain(
    entries: &[Signed<LedgerEntry>],
    coordinator: &PublicKey,
) -> Result<Ledger, ChainError> {
    let mut ledger = Ledger::new();
    let mut prev = GENESIS_PREV;
    let mut seq: u64 = 0;
    for signed in entries {
        let fail = |fault| ChainError { seq, fault };
        let entry = &signed.payload;
        if signed.signer != *coordinator {
            return Err(fail(ChainFault::WrongSigner {
                signer: Box::new(signed.signer),
            }));
        }
        if let Err(e) = signed.verify(entry.at) {
            return Err(fail(ChainFault::BadSignature {
                reason: e.to_string(),
            }));
        }
        if entry.seq > seq {
            return Err(fail(ChainFault::Missing { found: entry.seq }));
        }
        if entry.seq < seq {
            return Err(fail(ChainFault::Misplaced { found: entry.seq }));
        }
        if entry.prev != prev {
            return Err(fail(ChainFault::BrokenLink {
                expected: prev,
                found: entry.prev,
            }));
        }
        if ledger.applied(entry.op.key()).is_some() {
            return Err(fail(ChainFault::Replayed {
                key: entry.op.key().clone(),
            }));
        }
        match ledger.apply(entry.op.clone()) {
            Err(e) => return Err(fail(ChainFault::OpFailed(e))),
            Ok(effect) if effect != entry.effect => {
                return Err(fail(ChainFault::EffectMismatch {
                    recorded: Box::new(entry.effect.clone()),
                    recomputed: Box::new(effect),
                }));
            }
            Ok(_) => {}
        }
        prev = entry_hash(signed);
        seq += 1;
    }
    // Unreachable if `apply` is correct; checked once, at the end, because it
    // walks the whole history.
    ledger.check_invariants().map_err(|e| ChainError {
        seq: seq.saturating_sub(1),
        fault: ChainFault::Invariant(e),
    })?;
    Ok(ledger)
}

/// A balance the published state disagrees with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the balance of {account} is {claimed} in the published state but {recomputed} when the \
     chain is replayed; the state or the chain was tampered with (or the chain is incomplete)"
)]
pub struct Mismatch {
    pub account: Box<AccountId>,
    pub recomputed: Credits,
    pub claimed: Credits,
}

/// Compares the balances `ledger` recomputed with `claimed` (the state the
/// coordinator publishes), account by account in order; an account absent
/// from either side counts as 0. Returns the first difference.
pub fn compare_balances(
    ledger: &Ledger,
    claimed: &BTreeMap<AccountId, Credits>,
) -> Result<(), Mismatch> {
    let mut accounts: Vec<&AccountId> = ledger.balances().keys().chain(claimed.keys()).collect();
    accounts.sort();
    accounts.dedup();
    for account in accounts {
        let recomputed = ledger.balance(account);
        let claimed = claimed.get(account).copied().unwrap_or_default();
        if recomputed != claimed {
            return Err(Mismatch {
                account: Box::new(*account),
                recomputed,
                claimed,
            });
        }
    }
    Ok(())
}

/// `[u8; 32]` as 64 hex digits for humans, 32 raw bytes in the canonical encoding.
mod hash_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(h))
        } else {
            h.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(&s, &mut out).map_err(|e| {
                serde::de::Error::custom(format!("expected 64 hex digits for a hash ({e})"))
            })?;
            Ok(out)
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}
