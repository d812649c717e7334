//! `encoding`: Kiln's one canonical binary encoding (bincode 2, standard
//! configuration, 256 MiB limit, trailing bytes refused), for every type
//! that is sent between peers or stored.
//!
//! Input: one selector byte (which type, modulo the table), then the bytes.
//! Besides the round trip, each decoded value goes through the checks its
//! receiver runs next (a spec's `validate`, a gang offer's `check_shape`, a
//! manifest's `validate`, challenge size bounds), which must not panic on
//! any value the decoder lets through.

use kiln_blobs::announce::Announcement;
use kiln_blobs::wire;
use kiln_contracts::chain::LedgerEntry;
use kiln_protocol::bench::{BenchmarkReport, Challenge, ChallengeResponse, ProvenReport};
use kiln_protocol::gang::{GangOffer, GangRelease, GangStart};
use kiln_protocol::request_auth::RequestAuth;
use kiln_protocol::{
    ApiAuth, CancelJob, CapabilityAdvert, JobLost, JobOffer, JobResult, JobSpec, JobSubmission,
    Manifest, NetRequest, NetResponse, ResultReceipt, SetStake, UsageReport,
};

use super::{
    Outcome, Target, Verdict, bincode_round_trip, bincode_round_trip_bytes, enc, tagged, verdict,
};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "encoding",
    about: "kiln_protocol::encoding::decode of every wire and stored type (selector byte, then bincode)",
    max_len: 16 * 1024,
    seeds,
    dict: &[
        &[0xfb],
        &[0xfc],
        &[0xfd],
        &[0x01, 0x55, 0x1e, 0x20],
        &[0x01, 0x71, 0x1e, 0x20],
    ],
    run,
};

type Check = fn(&[u8]) -> Outcome;

/// Plain round trip of one type.
fn rt<T>(b: &[u8]) -> Outcome
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    Ok(match bincode_round_trip::<T>(b)? {
        None => Verdict::Rejected,
        Some((_, note)) => verdict(note),
    })
}

fn job_spec(b: &[u8]) -> Outcome {
    let Some((spec, note)) = bincode_round_trip::<JobSpec>(b)? else {
        return Ok(Verdict::Rejected);
    };
    // What the coordinator does with a spec it received.
    if spec.validate().is_ok() && spec.max_cost().is_none() {
        return Err("a spec that validates has no max_cost".into());
    }
    let _ = spec.image.digest();
    Ok(verdict(note))
}

fn submission(b: &[u8]) -> Outcome {
    let Some((sub, note)) = bincode_round_trip::<JobSubmission>(b)? else {
        return Ok(Verdict::Rejected);
    };
    let _ = sub.spec.validate();
    Ok(verdict(note))
}

fn advert(b: &[u8]) -> Outcome {
    let Some((a, note)) = bincode_round_trip::<CapabilityAdvert>(b)? else {
        return Ok(Verdict::Rejected);
    };
    let _ = a.millicpus();
    let _ = a.price_per_hour(&s::spec());
    if let Some(bench) = &a.benchmark {
        for g in &bench.gpus {
            let _ = g.proof(kiln_protocol::Precision::Bf16);
        }
    }
    Ok(verdict(note))
}

fn offer(b: &[u8]) -> Outcome {
    let Some((o, note)) = bincode_round_trip::<JobOffer>(b)? else {
        return Ok(Verdict::Rejected);
    };
    let _ = o.spec.validate();
    Ok(verdict(note))
}

fn manifest(b: &[u8]) -> Outcome {
    let Some((m, note)) = bincode_round_trip::<Manifest>(b)? else {
        return Ok(Verdict::Rejected);
    };
    // A manifest received in a JobResult is re-checked, then hashed.
    if m.validate().is_ok() {
        let _ = m.cid();
        // Not `total_size()`: it sums unchecked (see the `manifest` target).
        let _ = m
            .entries
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(e.size));
    }
    Ok(verdict(note))
}

fn job_result(b: &[u8]) -> Outcome {
    let Some((r, note)) = bincode_round_trip::<JobResult>(b)? else {
        return Ok(Verdict::Rejected);
    };
    let _ = r.manifest.validate();
    for blob in &r.blobs {
        let _ = blob.cid.matches(&blob.bytes);
    }
    Ok(verdict(note))
}

fn net_request(b: &[u8]) -> Outcome {
    Ok(match bincode_round_trip_bytes::<NetRequest>(b)? {
        None => Verdict::Rejected,
        Some((_, note)) => verdict(note),
    })
}

fn net_response(b: &[u8]) -> Outcome {
    Ok(match bincode_round_trip_bytes::<NetResponse>(b)? {
        None => Verdict::Rejected,
        Some((_, note)) => verdict(note),
    })
}

fn challenge(b: &[u8]) -> Outcome {
    let Some((c, note)) = bincode_round_trip::<Challenge>(b)? else {
        return Ok(Verdict::Rejected);
    };
    let _ = c.sizes.validate();
    Ok(verdict(note))
}

fn gang_offer(b: &[u8]) -> Outcome {
    let Some((g, note)) = bincode_round_trip::<GangOffer>(b)? else {
        return Ok(Verdict::Rejected);
    };
    if g.check_shape().is_ok() {
        let _ = g.env();
    }
    Ok(verdict(note))
}

fn wire_request(b: &[u8]) -> Outcome {
    let Some((r, note)) = bincode_round_trip::<wire::Request>(b)? else {
        return Ok(Verdict::Rejected);
    };
    if let wire::Request::Get { ranges, .. } = &r
        && let Some(set) = wire::ranges_from_wire(ranges)
        && wire::ranges_to_wire(&set) != *ranges
    {
        return Err(format!(
            "ranges {ranges:?} do not round-trip through a range set"
        ));
    }
    Ok(verdict(note))
}

/// The table: one entry per type (the selector byte picks one, modulo).
const TYPES: &[(&str, Check)] = &[
    ("JobSpec", job_spec),
    ("JobSubmission", submission),
    ("CapabilityAdvert", advert),
    ("JobOffer", offer),
    ("ResultReceipt", rt::<ResultReceipt>),
    ("CancelJob", rt::<CancelJob>),
    ("JobLost", rt::<JobLost>),
    ("UsageReport", rt::<UsageReport>),
    ("SetStake", rt::<SetStake>),
    ("JobResult", job_result),
    ("NetRequest", net_request),
    ("NetResponse", net_response),
    ("Manifest", manifest),
    ("Challenge", challenge),
    ("ChallengeResponse", rt::<ChallengeResponse>),
    ("BenchmarkReport", rt::<BenchmarkReport>),
    ("ProvenReport", rt::<ProvenReport>),
    ("GangOffer", gang_offer),
    ("GangStart", rt::<GangStart>),
    ("GangRelease", rt::<GangRelease>),
    ("RequestAuth", rt::<RequestAuth>),
    ("ApiAuth", rt::<ApiAuth>),
    ("LedgerEntry", rt::<LedgerEntry>),
    ("Announcement", rt::<Announcement>),
    ("wire::Request", wire_request),
    ("wire::Response", rt::<wire::Response>),
];

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let (_, check) = TYPES[sel as usize % TYPES.len()];
    check(body)
}

fn index(name: &str) -> u8 {
    TYPES.iter().position(|(n, _)| *n == name).unwrap_or(0) as u8
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut add = |name: &str, body: Vec<u8>| out.push(tagged(index(name), &body));
    for spec in s::specs() {
        add("JobSpec", enc(&spec));
    }
    add("JobSubmission", enc(&s::submission()));
    add("CapabilityAdvert", enc(&s::advert(1)));
    add("CapabilityAdvert", enc(&s::advert(2)));
    add("JobOffer", enc(&s::offer(1)));
    add("ResultReceipt", enc(&s::receipt(1)));
    add("CancelJob", enc(&s::cancel()));
    add("JobLost", enc(&s::lost()));
    add("UsageReport", enc(&s::usage()));
    add("SetStake", enc(&s::stake()));
    add("JobResult", enc(&s::job_result(1)));
    for r in s::net_requests() {
        add("NetRequest", enc(&r));
    }
    for r in s::net_responses() {
        add("NetResponse", enc(&r));
    }
    for m in s::manifests() {
        add("Manifest", enc(&m));
    }
    add("Challenge", enc(&s::challenge()));
    add("ChallengeResponse", enc(&s::challenge_response()));
    add("BenchmarkReport", enc(&s::benchmark()));
    add("ProvenReport", enc(&s::challenge_response().report));
    add("GangOffer", enc(&s::gang_offer()));
    add("GangStart", enc(&s::gang_start()));
    add("GangRelease", enc(&s::gang_release()));
    add("RequestAuth", enc(&s::request_auth()));
    add("ApiAuth", enc(&s::api_auth()));
    for e in s::ledger_chain() {
        add("LedgerEntry", enc(&e.payload));
    }
    add(
        "Announcement",
        enc(&Announcement {
            have: vec![(s::cid(1), 7), (s::cid(2), 1 << 20)],
            dropped: vec![s::cid(3)],
        }),
    );
    add(
        "wire::Request",
        enc(&wire::Request::Get {
            cid: s::cid(1),
            ranges: vec![0, 16, 32],
        }),
    );
    add(
        "wire::Request",
        enc(&wire::Request::Has {
            cids: vec![s::cid(1), s::cid(2)],
        }),
    );
    for r in [
        wire::Response::Found { size: 300_000 },
        wire::Response::NotFound,
        wire::Response::Has {
            sizes: vec![Some(7), None],
        },
        wire::Response::Error {
            reason: "no".into(),
        },
    ] {
        add("wire::Response", enc(&r));
    }
    out
}
