//! `signed`: the `Signed<T>` envelope, decoded and verified, for every
//! signed message type.
//!
//! Input: a selector byte (the type the receiver expects), then the
//! envelope's canonical bytes. The fuzzer cannot forge a signature, so
//! what verifies is a seed or a transformation of one that the signature
//! does not cover; the properties are about those:
//!
//! * a verifying envelope still verifies after a canonical re-encoding (the
//!   signature covers values, not bytes), and the note says when the bytes
//!   given were not the canonical ones (an envelope with several byte forms
//!   that all verify, which matters to anything that hashes received bytes);
//! * the same bytes never verify as two message types (domain separation):
//!   every other type is tried too (a `CancelJob` envelope offered where a
//!   `JobLost` is expected decodes, as the two are structural twins, but
//!   must verify only as what it was signed as).

use kiln_contracts::chain::LedgerEntry;
use kiln_protocol::bench::{Challenge, ChallengeResponse};
use kiln_protocol::gang::{GangOffer, GangRelease, GangStart};
use kiln_protocol::request_auth::RequestAuth;
use kiln_protocol::{
    ApiAuth, CancelJob, CapabilityAdvert, JobLost, JobOffer, JobSubmission, ResultReceipt,
    SetStake, Signed, SignedMessage, UsageReport,
};

use super::{Outcome, Target, Verdict, bincode_round_trip, enc, short_name, tagged, verdict};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "signed",
    about: "Signed<T>::from_bytes + verify for every SignedMessage type (selector byte, then the envelope)",
    max_len: 16 * 1024,
    seeds,
    dict: &[&[0xfb], &[0xfc], &[0xfd]],
    run,
};

/// What one type made of the bytes.
enum Seen {
    Refused,
    Decoded,
    Verified,
}

/// Decodes as `Signed<T>` and verifies at the samples' time.
fn check<T>(b: &[u8]) -> Result<(Seen, Option<String>), String>
where
    T: SignedMessage + PartialEq + std::fmt::Debug,
{
    let Some((signed, note)) = bincode_round_trip::<Signed<T>>(b)? else {
        return Ok((Seen::Refused, None));
    };
    if signed.verify(s::NOW).is_err() {
        return Ok((Seen::Decoded, note));
    }
    // The canonical form of what verified verifies too.
    let canonical = signed
        .to_bytes()
        .map_err(|e| format!("{}: {e}", short_name::<T>()))?;
    let again = Signed::<T>::from_bytes(&canonical)
        .map_err(|e| format!("{}: canonical form does not decode: {e}", short_name::<T>()))?;
    if again.verify(s::NOW).is_err() {
        return Err(format!(
            "Signed<{}> verifies as given but not re-encoded",
            short_name::<T>()
        ));
    }
    let note = note.map(|n| format!("{n} (and its signature verifies)"));
    Ok((Seen::Verified, note))
}

type Check = fn(&[u8]) -> Result<(Seen, Option<String>), String>;

const TYPES: &[(&str, Check)] = &[
    ("JobSubmission", check::<JobSubmission>),
    ("ApiAuth", check::<ApiAuth>),
    ("RequestAuth", check::<RequestAuth>),
    ("CapabilityAdvert", check::<CapabilityAdvert>),
    ("JobOffer", check::<JobOffer>),
    ("CancelJob", check::<CancelJob>),
    ("JobLost", check::<JobLost>),
    ("UsageReport", check::<UsageReport>),
    ("SetStake", check::<SetStake>),
    ("ResultReceipt", check::<ResultReceipt>),
    ("Challenge", check::<Challenge>),
    ("ChallengeResponse", check::<ChallengeResponse>),
    ("GangOffer", check::<GangOffer>),
    ("GangStart", check::<GangStart>),
    ("GangRelease", check::<GangRelease>),
    ("LedgerEntry", check::<LedgerEntry>),
    ("TailLogs", check::<kiln_protocol::TailLogs>),
];

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let want = sel as usize % TYPES.len();
    let (name, check) = TYPES[want];
    let (seen, note) = check(body)?;
    // Domain separation: at most one type verifies any byte string. (Only
    // worth the time when the expected type at least decoded: a structural
    // twin, like CancelJob and JobLost, decodes as both.)
    if !matches!(seen, Seen::Refused) {
        let mut verified: Vec<&str> = Vec::new();
        if matches!(seen, Seen::Verified) {
            verified.push(name);
        }
        for (i, (other, check_other)) in TYPES.iter().enumerate() {
            if i != want && matches!(check_other(body), Ok((Seen::Verified, _))) {
                verified.push(other);
            }
        }
        if verified.len() > 1 {
            return Err(format!(
                "the same bytes verify as {}",
                verified
                    .iter()
                    .map(|n| format!("Signed<{n}>"))
                    .collect::<Vec<_>>()
                    .join(" and as ")
            ));
        }
    }
    Ok(match seen {
        Seen::Refused | Seen::Decoded => Verdict::Rejected,
        Seen::Verified => verdict(note),
    })
}

fn index(name: &str) -> u8 {
    TYPES.iter().position(|(n, _)| *n == name).unwrap_or(0) as u8
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut add = |name: &str, body: Vec<u8>| out.push(tagged(index(name), &body));
    add("JobSubmission", enc(&s::sign(1, s::submission())));
    add("ApiAuth", enc(&s::sign(1, s::api_auth())));
    add("RequestAuth", enc(&s::sign(1, s::request_auth())));
    add("CapabilityAdvert", enc(&s::sign(3, s::advert(1))));
    add("JobOffer", enc(&s::sign(2, s::offer(1))));
    add("CancelJob", enc(&s::sign(2, s::cancel())));
    add("JobLost", enc(&s::sign(3, s::lost())));
    add("UsageReport", enc(&s::sign(3, s::usage())));
    add("SetStake", enc(&s::sign(3, s::stake())));
    add("ResultReceipt", enc(&s::sign(3, s::receipt(1))));
    add("Challenge", enc(&s::sign(2, s::challenge())));
    add(
        "ChallengeResponse",
        enc(&s::sign(3, s::challenge_response())),
    );
    add("GangOffer", enc(&s::sign(2, s::gang_offer())));
    add("GangStart", enc(&s::sign(2, s::gang_start())));
    add("GangRelease", enc(&s::sign(2, s::gang_release())));
    add("TailLogs", enc(&s::sign(2, s::tail_logs())));
    for e in s::ledger_chain().into_iter().take(2) {
        add("LedgerEntry", enc(&e));
    }
    // A twin: a CancelJob envelope offered where a JobLost is expected.
    add("JobLost", enc(&s::sign(2, s::cancel())));
    out
}
