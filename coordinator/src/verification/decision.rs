//! The audit decision for one accepted result: `p = clamp(max(p_econ,
//! p_trust), p_min, 1)` and a keyed draw (see the [module
//! docs](super) for the math). Pure and deterministic: the same inputs,
//! policy and secret always give the same [`Decision`].

use std::fmt;

use kiln_protocol::encoding::EncodeError;
use kiln_protocol::{Credits, ResultReceipt, Signed};
use serde::{Deserialize, Serialize};

use super::trust::TrustState;

/// Domain tag of the draw (versioned: a stored record replays only under
/// the tag it was drawn with).
pub const DRAW_DOMAIN: &[u8] = b"kiln/audit-draw/v1";
const RECEIPT_HASH_CONTEXT: &str = "kiln receipt hash v1";
const GANG_HASH_CONTEXT: &str = "kiln gang receipts hash v1";
const SECRET_ID_CONTEXT: &str = "kiln audit secret id v1";
const SECRET_DERIVE_CONTEXT: &str = "kiln audit secret v1";

/// A probability in integer parts per million (0 ..= 1,000,000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Ppm(u32);

impl Ppm {
    pub const SCALE: u32 = 1_000_000;
    pub const ZERO: Self = Self(0);
    pub const ONE: Self = Self(Self::SCALE);

    /// `parts` per million, if at most one million.
    pub const fn new(parts: u32) -> Option<Self> {
        if parts <= Self::SCALE {
            Some(Self(parts))
        } else {
            None
        }
    }

    pub const fn parts(self) -> u32 {
        self.0
    }

    /// `num / den`, rounded *up* to the next part per million and capped
    /// at one (a floor stays a floor). `0/0` is zero, `x/0` one.
    pub fn ratio_ceil(num: u128, den: u128) -> Self {
        if num == 0 {
            return Self::ZERO;
        }
        if num >= den {
            return Self::ONE;
        }
        let (mut num, mut den) = (num, den);
        // Keep num × 10⁶ in range: scale both down, rounding num up and den
        // down, which can only raise the ratio.
        while num > u128::MAX / u128::from(Self::SCALE) {
            num = (num >> 32) + 1;
            den >>= 32;
        }
        if den == 0 || num >= den {
            return Self::ONE;
        }
        let parts = (num * u128::from(Self::SCALE)).div_ceil(den);
        Self(u32::try_from(parts).map_or(Self::SCALE, |p| p.min(Self::SCALE)))
    }

    /// Whether a uniform 64-bit `draw` falls below `p × 2⁶⁴` (exact, in
    /// 128-bit integers): one never misses, zero never hits.
    pub const fn admits(self, draw: u64) -> bool {
        (draw as u128) * (Self::SCALE as u128) < (self.0 as u128) << 64
    }

    /// For reports only; nothing recorded is a float.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::SCALE)
    }
}

impl TryFrom<u32> for Ppm {
    type Error = String;
    fn try_from(parts: u32) -> Result<Self, String> {
        Self::new(parts).ok_or_else(|| format!("{parts} ppm is more than 1 (1000000 ppm)"))
    }
}

impl From<Ppm> for u32 {
    fn from(p: Ppm) -> u32 {
        p.0
    }
}

impl fmt::Display for Ppm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:04}%", self.0 / 10_000, self.0 % 10_000)
    }
}

kiln_protocol::hex_id!(
    /// The blake3 (derive-key mode, context `"kiln receipt hash v1"`) of a
    /// signed receipt's canonical bytes: it binds the job, the offer, the
    /// outputs, the nonce and the signature.
    ReceiptHash, 32, "receipt hash"
);

kiln_protocol::hex_id!(
    /// The public commitment to an [`AuditSecret`]: publishing it before
    /// the secret is used (and the secret after its epoch) lets anyone
    /// replay every draw made with it.
    SecretId, 32, "audit secret id"
);

impl ReceiptHash {
    /// The hash of a signed receipt.
    pub fn of(receipt: &Signed<ResultReceipt>) -> Result<Self, EncodeError> {
        Ok(Self::of_signed_bytes(&receipt.to_bytes()?))
    }

    /// What a gang's audit draw is keyed on: its members' receipt hashes
    /// in rank order, hashed under their own context (a gang of one is its
    /// member's receipt hash).
    pub fn of_gang(members: &[Self]) -> Self {
        if let [one] = members {
            return *one;
        }
        let mut h = blake3::Hasher::new_derive_key(GANG_HASH_CONTEXT);
        for m in members {
            h.update(&m.0);
        }
        Self(*h.finalize().as_bytes())
    }

    /// The hash of a signed envelope's canonical bytes
    /// (`Signed::to_bytes`).
    pub fn of_signed_bytes(bytes: &[u8]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(RECEIPT_HASH_CONTEXT);
        h.update(bytes);
        Self(*h.finalize().as_bytes())
    }
}

/// The coordinator's key for audit draws. Never serialized, never logged
/// (its `Debug` shows only its [`SecretId`]).
#[derive(Clone, PartialEq, Eq)]
pub struct AuditSecret {
    key: [u8; 32],
    id: SecretId,
}

impl AuditSecret {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let id = SecretId(blake3::derive_key(SECRET_ID_CONTEXT, &key));
        Self { key, id }
    }

    /// The secret of `epoch`, derived one-way from the coordinator's key
    /// material: revealing one epoch's secret reveals neither the key nor
    /// any other epoch's secret.
    pub fn derive(key_material: &[u8], epoch: u64) -> Self {
        let mut h = blake3::Hasher::new_derive_key(SECRET_DERIVE_CONTEXT);
        h.update(&epoch.to_le_bytes());
        h.update(key_material);
        Self::from_bytes(*h.finalize().as_bytes())
    }

    pub const fn id(&self) -> SecretId {
        self.id
    }

    /// The key itself, to reveal it once its epoch's audits are closed.
    pub const fn reveal(&self) -> [u8; 32] {
        self.key
    }
}

impl fmt::Debug for AuditSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditSecret(id {:?})", self.id)
    }
}

/// How audit probabilities are set. Recorded with every decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditPolicy {
    /// What a cheater saves, as a fraction of the payment (`C = R ×
    /// cost_fraction`). Default 1: skipping the work saves all it costs.
    pub cost_fraction: Ppm,
    /// `N`: results audited with certainty until this many consecutive
    /// verified ones. Default 10 (BOINC's).
    pub trust_threshold: u32,
    /// The least any result is audited with. Default 0.5%.
    pub p_min: Ppm,
    /// The most one slash takes from the bond (`None`: all of it), which
    /// caps the stake at risk `S`.
    pub max_slash: Option<Credits>,
}

impl AuditPolicy {
    pub const DEFAULT: Self = Self {
        cost_fraction: Ppm::ONE,
        trust_threshold: 10,
        p_min: Ppm(5_000),
        max_slash: None,
    };
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a decision is taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditInputs {
    /// The accepted result's receipt.
    pub receipt_hash: ReceiptHash,
    /// `R`: what the member is paid for this result.
    pub payment: Credits,
    /// The provider's bond when the result was accepted.
    pub bond: Credits,
    /// The provider's verified record when the result was accepted.
    pub trust: TrustState,
}

/// The probabilities and the economic quantities behind them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Probabilities {
    /// `C`: what skipping the work would have saved.
    pub cost_saved: Credits,
    /// `S`: what one slash would take.
    pub stake_at_risk: Credits,
    /// `C / (R + S)`, rounded up.
    pub p_econ: Ppm,
    /// 1 until `CV ≥ N`, then `1/CV`.
    pub p_trust: Ppm,
    /// `clamp(max(p_econ, p_trust), p_min, 1)`.
    pub p: Ppm,
}

/// The audit probability of a result paying `payment` from a provider
/// with `bond` and `trust`.
pub fn probabilities(
    payment: Credits,
    bond: Credits,
    trust: TrustState,
    policy: &AuditPolicy,
) -> Probabilities {
    let r = u128::from(payment.0);
    let cost = (r * u128::from(policy.cost_fraction.parts())).div_ceil(u128::from(Ppm::SCALE));
    // C ≤ R because the fraction is at most one.
    let cost_saved = Credits(u64::try_from(cost).unwrap_or(payment.0));
    let stake_at_risk = policy
        .max_slash
        .map_or(bond, |cap| Credits(bond.0.min(cap.0)));
    let p_econ = Ppm::ratio_ceil(cost, r + u128::from(stake_at_risk.0));
    let p_trust = trust.p_trust(policy);
    let p = p_econ.max(p_trust).max(policy.p_min).min(Ppm::ONE);
    Probabilities {
        cost_saved,
        stake_at_risk,
        p_econ,
        p_trust,
        p,
    }
}

/// The draw for a receipt: the first 8 bytes (little-endian) of
/// `blake3_keyed(secret, DRAW_DOMAIN ‖ receipt_hash)`, uniform on `u64`
/// to anyone without the secret.
pub fn draw(secret: &AuditSecret, receipt_hash: &ReceiptHash) -> u64 {
    let mut h = blake3::Hasher::new_keyed(&secret.key);
    h.update(DRAW_DOMAIN);
    h.update(&receipt_hash.0);
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// One audit decision, as recorded: everything it was taken from, what it
/// computed, and what it decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub inputs: AuditInputs,
    pub policy: AuditPolicy,
    /// Which secret drew it.
    pub secret_id: SecretId,
    pub probabilities: Probabilities,
    pub draw: u64,
    /// Whether the result is re-executed.
    pub audited: bool,
}

/// Decides whether the result described by `inputs` is audited.
pub fn decide(inputs: &AuditInputs, policy: &AuditPolicy, secret: &AuditSecret) -> Decision {
    let probabilities = probabilities(inputs.payment, inputs.bond, inputs.trust, policy);
    let draw = draw(secret, &inputs.receipt_hash);
    Decision {
        inputs: *inputs,
        policy: *policy,
        secret_id: secret.id,
        probabilities,
        draw,
        audited: probabilities.p.admits(draw),
    }
}

impl Decision {
    /// The probability it was taken with.
    pub const fn p(&self) -> Ppm {
        self.probabilities.p
    }

    /// What anyone can check without the secret: the probabilities follow
    /// from the recorded inputs and policy, and the outcome from the draw.
    pub fn check(&self) -> bool {
        probabilities(
            self.inputs.payment,
            self.inputs.bond,
            self.inputs.trust,
            &self.policy,
        ) == self.probabilities
            && self.audited == self.probabilities.p.admits(self.draw)
    }

    /// Re-derives the whole decision with `secret`: true iff it is the
    /// secret the record names and it gives exactly this record.
    pub fn replay(&self, secret: &AuditSecret) -> bool {
        secret.id == self.secret_id && decide(&self.inputs, &self.policy, secret) == *self
    }
}

#[cfg(test)]
mod tests {
    use kiln_protocol::{
        ContentId, JobId, Keypair, OfferId, Outcome, ProviderId, ResourceUsage, UnixMillis,
    };

    use super::*;

    const CR: u64 = 1_000_000;

    fn secret(b: u8) -> AuditSecret {
        AuditSecret::from_bytes([b; 32])
    }

    fn hash(i: u64) -> ReceiptHash {
        ReceiptHash::of_signed_bytes(&i.to_le_bytes())
    }

    fn inputs(payment: u64, bond: u64, cv: u32) -> AuditInputs {
        AuditInputs {
            receipt_hash: hash(7),
            payment: Credits(payment),
            bond: Credits(bond),
            trust: TrustState::new(cv),
        }
    }

    #[test]
    fn a_gangs_hash_binds_every_receipt_in_rank_order() {
        let (a, b) = (hash(1), hash(2));
        assert_eq!(ReceiptHash::of_gang(&[a]), a);
        let ab = ReceiptHash::of_gang(&[a, b]);
        assert_ne!(ab, ReceiptHash::of_gang(&[b, a]));
        assert_ne!(ab, ReceiptHash::of_gang(&[a, a]));
        assert_ne!(ab, a);
        assert_eq!(ab, ReceiptHash::of_gang(&[a, b]));
    }

    #[test]
    fn ratio_rounds_up_and_caps() {
        let table: [(u128, u128, u32); 12] = [
            (0, 0, 0),
            (0, 5, 0),
            (1, 0, 1_000_000),
            (5, 5, 1_000_000),
            (6, 5, 1_000_000),
            (1, 2, 500_000),
            (1, 3, 333_334),
            (1, 20, 50_000),
            (1, 1_000_000, 1),
            (1, 1_000_001, 1),
            (1, u128::MAX, 1),
            (u128::MAX / 2, u128::MAX, 500_001),
        ];
        for (n, d, want) in table {
            assert_eq!(Ppm::ratio_ceil(n, d).parts(), want, "{n}/{d}");
        }
    }

    #[test]
    fn admits_is_exact_at_the_edges() {
        assert!(Ppm::ONE.admits(u64::MAX));
        assert!(!Ppm::ZERO.admits(0));
        // 1 ppm of 2⁶⁴ is 18446744073709.551616.
        let one = Ppm::new(1).expect("1 ppm");
        assert!(one.admits(18_446_744_073_709));
        assert!(!one.admits(18_446_744_073_710));
        let half = Ppm::new(500_000).expect("half");
        assert!(half.admits((1 << 63) - 1));
        assert!(!half.admits(1 << 63));
        assert_eq!(Ppm::new(1_000_001), None);
        assert_eq!(half.to_string(), "50.0000%");
        assert_eq!(Ppm::new(1).expect("1 ppm").to_string(), "0.0001%");
    }

    #[test]
    fn economic_floor_table() {
        let base = AuditPolicy {
            p_min: Ppm::ZERO,
            ..AuditPolicy::default()
        };
        let trusted = 1_000_000; // CV so large p_trust is 1 ppm
        // (payment, bond, cost fraction ppm, max slash, p_econ ppm, C, S)
        type Row = (u64, u64, u32, Option<u64>, u32, u64, u64);
        let table: [Row; 10] = [
            // No stake: only the payment is at risk, C = R, audit everything.
            (CR, 0, 1_000_000, None, 1_000_000, CR, 0),
            // R/(R+S) with S = 19R: 5%.
            (CR, 19 * CR, 1_000_000, None, 50_000, CR, 19 * CR),
            (CR, 9 * CR, 1_000_000, None, 100_000, CR, 9 * CR),
            // 1/3 rounds up.
            (CR, 2 * CR, 1_000_000, None, 333_334, CR, 2 * CR),
            // Half the payment saved halves the floor.
            (CR, 19 * CR, 500_000, None, 25_000, CR / 2, 19 * CR),
            // Nothing saved, nothing to deter.
            (CR, 19 * CR, 0, None, 0, 0, 19 * CR),
            // A slash takes at most max_slash: S is capped.
            (CR, 100 * CR, 1_000_000, Some(19 * CR), 50_000, CR, 19 * CR),
            (CR, 9 * CR, 1_000_000, Some(19 * CR), 100_000, CR, 9 * CR),
            // A free job gains a cheater nothing.
            (0, 0, 1_000_000, None, 0, 0, 0),
            // C rounds up to the micro-credit: 1 µcr × 0.5 → 1 µcr.
            (1, 0, 500_000, None, 1_000_000, 1, 0),
        ];
        for (payment, bond, frac, cap, want, c, s) in table {
            let policy = AuditPolicy {
                cost_fraction: Ppm::new(frac).expect("fraction"),
                max_slash: cap.map(Credits),
                ..base
            };
            let p = probabilities(
                Credits(payment),
                Credits(bond),
                TrustState::new(trusted),
                &policy,
            );
            assert_eq!(
                p.p_econ.parts(),
                want,
                "R={payment} bond={bond} f={frac} cap={cap:?}"
            );
            assert_eq!((p.cost_saved.0, p.stake_at_risk.0), (c, s));
            assert_eq!(p.p, p.p_econ.max(p.p_trust), "{p:?}");
        }
    }

    #[test]
    fn p_is_the_larger_of_the_two_within_p_min_and_one() {
        let policy = AuditPolicy::default(); // N = 10, p_min = 0.5%
        // (payment, bond, CV, p_econ, p_trust, p)
        let table: [(u64, u64, u32, u32, u32, u32); 7] = [
            // A new provider is always audited, however big its bond.
            (CR, 1_000 * CR, 0, 1_000, 1_000_000, 1_000_000),
            (CR, 1_000 * CR, 9, 1_000, 1_000_000, 1_000_000),
            // Trusted: 1/CV when it is above the floor…
            (CR, 19 * CR, 10, 50_000, 100_000, 100_000),
            // …the floor when 1/CV has fallen below it.
            (CR, 19 * CR, 40, 50_000, 25_000, 50_000),
            // p_min when both are below it.
            (CR, 1_000 * CR, 1_000, 1_000, 1_000, 5_000),
            // No bond: the floor is 1 whatever the trust.
            (CR, 0, 1_000, 1_000_000, 1_000, 1_000_000),
            // No payment: trust alone.
            (0, 19 * CR, 20, 0, 50_000, 50_000),
        ];
        for (payment, bond, cv, econ, trust, p) in table {
            let got = probabilities(
                Credits(payment),
                Credits(bond),
                TrustState::new(cv),
                &policy,
            );
            assert_eq!(
                (got.p_econ.parts(), got.p_trust.parts(), got.p.parts()),
                (econ, trust, p),
                "R={payment} bond={bond} CV={cv}"
            );
        }
    }

    #[test]
    fn certain_and_impossible_audits_ignore_the_draw() {
        let s = secret(1);
        let policy = AuditPolicy {
            p_min: Ppm::ZERO,
            ..AuditPolicy::default()
        };
        for i in 0..200 {
            let mut new = inputs(CR, 19 * CR, 0);
            new.receipt_hash = hash(i);
            assert!(decide(&new, &policy, &s).audited, "a new provider");
            let mut free = inputs(0, 19 * CR, u32::MAX);
            free.receipt_hash = hash(i);
            // p_trust at CV = u32::MAX is 1 ppm, not zero.
            let d = decide(&free, &policy, &s);
            assert_eq!(d.p().parts(), 1);
        }
        let never = AuditPolicy {
            cost_fraction: Ppm::ZERO,
            ..policy
        };
        let d = decide(&inputs(CR, 19 * CR, 10), &never, &s);
        assert_eq!(d.probabilities.p_econ, Ppm::ZERO);
    }

    #[test]
    fn draw_is_pinned() {
        // Stored decisions replay only if the draw never changes: this is
        // blake3_keyed([7; 32], "kiln/audit-draw/v1" ‖ [1; 32])[..8], LE.
        let d = draw(&secret(7), &ReceiptHash::from_bytes([1; 32]));
        let mut msg = DRAW_DOMAIN.to_vec();
        msg.extend_from_slice(&[1; 32]);
        let full = blake3::keyed_hash(&[7; 32], &msg);
        let mut first = [0u8; 8];
        first.copy_from_slice(&full.as_bytes()[..8]);
        assert_eq!(d, u64::from_le_bytes(first));
        assert_eq!(d, PINNED_DRAW);
    }

    const PINNED_DRAW: u64 = 4_421_288_237_832_268_311;

    #[test]
    fn replay_gives_the_same_answer_and_tampering_shows() {
        let s = secret(3);
        let policy = AuditPolicy::default();
        let mut audited = 0;
        for i in 0..2_000u64 {
            let mut inp = inputs(CR + i, 19 * CR, 10 + (i % 50) as u32);
            inp.receipt_hash = hash(i);
            let d = decide(&inp, &policy, &s);
            assert!(d.check(), "{d:?}");
            assert!(d.replay(&s), "{d:?}");
            assert!(d.replay(&AuditSecret::from_bytes(s.reveal())));
            assert!(!d.replay(&secret(4)), "another secret replays nothing");
            audited += usize::from(d.audited);

            let mut flipped = d;
            flipped.audited = !d.audited;
            assert!(!flipped.check() && !flipped.replay(&s));
            let mut other_draw = d;
            other_draw.draw ^= 1;
            assert!(!other_draw.replay(&s));
            let mut lower = d;
            lower.probabilities.p = Ppm::ZERO;
            assert!(!lower.check());
            let mut cheaper = d;
            cheaper.inputs.bond = Credits(1_000 * CR);
            assert!(!cheaper.check(), "p no longer follows from the inputs");
            let mut relaxed = d;
            relaxed.policy.trust_threshold = 0;
            relaxed.policy.p_min = Ppm::ZERO;
            relaxed.policy.cost_fraction = Ppm::ZERO;
            assert!(!relaxed.check());
        }
        // p is between 5% and 10% here; the draw is uniform.
        assert!((100..=200).contains(&audited), "{audited} of 2000 audited");
    }

    #[test]
    fn a_different_secret_gives_an_unrelated_draw() {
        let (a, b) = (secret(1), secret(2));
        assert_ne!(a.id(), b.id());
        let (mut differing_bits, mut equal, mut below_a, mut below_b) = (0u32, 0, 0, 0);
        let n = 4_096u64;
        let half = Ppm::new(500_000).expect("half");
        for i in 0..n {
            let h = hash(i);
            let (da, db) = (draw(&a, &h), draw(&b, &h));
            differing_bits += (da ^ db).count_ones();
            equal += usize::from(da == db);
            below_a += usize::from(half.admits(da));
            below_b += usize::from(half.admits(db));
        }
        assert_eq!(equal, 0);
        // Independent uniform draws differ in half their bits.
        let frac = f64::from(differing_bits) / (64.0 * n as f64);
        assert!((0.49..0.51).contains(&frac), "{frac}");
        for below in [below_a, below_b] {
            assert!((1_948..=2_148).contains(&below), "{below} of {n} below 1/2");
        }
    }

    #[test]
    fn secrets_derive_per_epoch_and_never_print() {
        let k = b"coordinator key material";
        assert_eq!(AuditSecret::derive(k, 1), AuditSecret::derive(k, 1));
        assert_ne!(
            AuditSecret::derive(k, 1).id(),
            AuditSecret::derive(k, 2).id()
        );
        let s = AuditSecret::derive(k, 1);
        let shown = format!("{s:?}");
        assert!(!shown.contains(&hex::encode(s.reveal())), "{shown}");
    }

    fn receipt(key: &Keypair, exit_code: i64, nonce: u8) -> Signed<ResultReceipt> {
        let payload = ResultReceipt {
            job_id: JobId::from_bytes([1; 16]),
            offer_id: OfferId::from_bytes([2; 16]),
            provider: ProviderId::from_public_key(&key.public()),
            outcome: Outcome::Succeeded,
            exit_code: Some(exit_code),
            error: None,
            image_digest: "sha256:00".into(),
            input_cids: vec![],
            output_cid: ContentId::of_bytes(b"out"),
            stdout_cid: ContentId::of_bytes(b""),
            stderr_cid: ContentId::of_bytes(b""),
            started_at: UnixMillis(1),
            finished_at: UnixMillis(2),
            usage: ResourceUsage::default(),
        };
        Signed::sign_with(
            key,
            payload,
            kiln_protocol::Nonce::from_bytes([nonce; 16]),
            UnixMillis(10),
        )
        .expect("sign")
    }

    #[test]
    fn the_receipt_hash_covers_the_signed_envelope() {
        let key = Keypair::generate();
        let a = ReceiptHash::of(&receipt(&key, 0, 1)).expect("hash");
        assert_eq!(a, ReceiptHash::of(&receipt(&key, 0, 1)).expect("hash"));
        assert_ne!(a, ReceiptHash::of(&receipt(&key, 1, 1)).expect("hash"));
        assert_ne!(a, ReceiptHash::of(&receipt(&key, 0, 2)).expect("hash"));
        let other = Keypair::generate();
        assert_ne!(a, ReceiptHash::of(&receipt(&other, 0, 1)).expect("hash"));
    }

    #[test]
    fn the_record_round_trips_through_json_and_the_canonical_encoding() {
        let s = secret(9);
        let d = decide(&inputs(3 * CR, 40 * CR, 17), &AuditPolicy::default(), &s);
        let json = serde_json::to_string(&d).expect("json");
        let back: Decision = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, d);
        assert!(back.replay(&s));
        assert!(json.contains(&d.inputs.receipt_hash.to_string()), "{json}");
        let bytes = kiln_protocol::encoding::encode(&d).expect("encode");
        let back: Decision = kiln_protocol::encoding::decode(&bytes).expect("decode");
        assert_eq!(back, d);
        // A probability above one does not parse.
        let bad = json.replacen(
            &format!("\"p_min\":{}", d.policy.p_min.parts()),
            "\"p_min\":1000001",
            1,
        );
        assert_ne!(bad, json);
        assert!(serde_json::from_str::<Decision>(&bad).is_err());
    }
}
