//! `ids`: the string forms of ids, keys, CIDs, units, states and accounts,
//! as they arrive in REST paths and queries (`/v1/jobs/{id}`,
//! `/v1/blobs/{cid}`, `/v1/accounts/{account}/statement`), TOML specs,
//! flags and adverts (multiaddrs a node dials).
//!
//! Input: a selector byte (which type), then the text. What parses must
//! display as a string that parses back to the same value; a value whose
//! display differs from the input (a non-canonical spelling accepted, e.g.
//! upper-case hex or trailing bytes in a CID) is noted.

use std::fmt::Display;
use std::str::FromStr;

use kiln_contracts::AccountId;
use kiln_protocol::bench::{ChallengeId, Digest32};
use kiln_protocol::request_auth::BodyDigest;
use kiln_protocol::spec::ComputeCapability;
use kiln_protocol::views::{
    AuditOutcome, BlobKind, CancelOutcome, JobState, MemberState, OfferSort, Role,
    VerificationStatus,
};
use kiln_protocol::{
    BuyerId, ByteSize, ContentId, ImageRef, JobId, Nonce, OfferId, ProviderId, PublicKey, Seconds,
};

use super::{Outcome, Target, Verdict, short_name, tagged};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "ids",
    about: "FromStr of ids, CIDs, keys, sizes, durations, compute capabilities, states, accounts, multiaddrs; image digests; manifest paths",
    max_len: 512,
    seeds,
    dict: &[
        b"bafkr4i",
        b"bafyr4i",
        b"12D3KooW",
        b"kb",
        b"buyer:",
        b"provider:",
        b"sha256:",
        b"MiB",
        b"/ip4/",
        b"/tcp/",
        b"/p2p/",
        // Multi-byte characters: error paths that cut or index strings.
        "é".as_bytes(),
        "€".as_bytes(),
        "😀".as_bytes(),
    ],
    run,
};

type Check = fn(&str) -> Outcome;

fn rt<T>(text: &str) -> Outcome
where
    T: FromStr + Display + PartialEq + std::fmt::Debug,
{
    let Ok(v) = text.parse::<T>() else {
        return Ok(Verdict::Rejected);
    };
    let name = short_name::<T>();
    let shown = v.to_string();
    let back = shown.parse::<T>().map_err(|_| {
        format!("{name}: parses, but its display does not\n input = {text:?}\n display = {shown:?}")
    })?;
    if back != v {
        return Err(format!(
            "{name}: display and parse disagree\n input = {text:?}\n value = {v:?}\n back = {back:?}"
        ));
    }
    if shown != text {
        return Ok(Verdict::Note(format!(
            "{name}: a non-canonical spelling parses\n input = {text:?}\n canonical = {shown:?}"
        )));
    }
    Ok(Verdict::Accepted)
}

/// Units display in their own canonical form (`2GiB` for "2048MiB"), so
/// only the value must survive.
fn unit<T>(text: &str) -> Outcome
where
    T: FromStr + Display + PartialEq + std::fmt::Debug,
{
    let Ok(v) = text.parse::<T>() else {
        return Ok(Verdict::Rejected);
    };
    let shown = v.to_string();
    match shown.parse::<T>() {
        Ok(back) if back == v => Ok(Verdict::Accepted),
        _ => Err(format!(
            "{}: display does not parse back\n input = {text:?}\n display = {shown:?}",
            short_name::<T>()
        )),
    }
}

fn image(text: &str) -> Outcome {
    let r = ImageRef(text.to_string());
    let Some(d) = r.digest() else {
        return Ok(Verdict::Rejected);
    };
    if d.len() != 71 || !d.starts_with("sha256:") {
        return Err(format!("image digest {d:?} is not sha256:<64 hex>"));
    }
    let _ = r.is_image_id();
    Ok(Verdict::Accepted)
}

fn manifest_path(text: &str) -> Outcome {
    if kiln_protocol::content::check_relative_path(text).is_err() {
        return Ok(Verdict::Rejected);
    }
    let bad = text.starts_with('/')
        || text
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || text.contains('\0');
    if bad {
        return Err(format!("an unsafe manifest path is accepted: {text:?}"));
    }
    Ok(Verdict::Accepted)
}

const TYPES: &[(&str, Check)] = &[
    ("JobId", rt::<JobId>),
    ("OfferId", rt::<OfferId>),
    ("Nonce", rt::<Nonce>),
    ("ChallengeId", rt::<ChallengeId>),
    ("Digest32", rt::<Digest32>),
    ("BodyDigest", rt::<BodyDigest>),
    ("BuyerId", rt::<BuyerId>),
    ("ProviderId", rt::<ProviderId>),
    ("PublicKey", rt::<PublicKey>),
    ("ContentId", rt::<ContentId>),
    ("ByteSize", unit::<ByteSize>),
    ("Seconds", unit::<Seconds>),
    ("ComputeCapability", unit::<ComputeCapability>),
    ("JobState", rt::<JobState>),
    ("MemberState", rt::<MemberState>),
    ("Role", rt::<Role>),
    ("VerificationStatus", rt::<VerificationStatus>),
    ("OfferSort", rt::<OfferSort>),
    ("BlobKind", rt::<BlobKind>),
    ("AuditOutcome", rt::<AuditOutcome>),
    ("CancelOutcome", rt::<CancelOutcome>),
    ("AccountId", rt::<AccountId>),
    ("Multiaddr", rt::<kiln_net::Addr>),
    ("ImageRef", image),
    ("ManifestPath", manifest_path),
];

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(Verdict::Rejected);
    };
    let (_, check) = TYPES[sel as usize % TYPES.len()];
    check(text)
}

fn index(name: &str) -> u8 {
    TYPES.iter().position(|(n, _)| *n == name).unwrap_or(0) as u8
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut add = |name: &str, text: String| out.push(tagged(index(name), text.as_bytes()));
    add("JobId", s::job_id().to_string());
    add("OfferId", s::offer_id(1).to_string());
    add("Nonce", s::nonce(1).to_string());
    add("ChallengeId", s::challenge().challenge_id.to_string());
    add("Digest32", Digest32::of_bytes(b"x").to_string());
    add("BodyDigest", BodyDigest::of(b"{}").to_string());
    add("BuyerId", s::buyer().to_string());
    add("ProviderId", s::provider(1).to_string());
    add("PublicKey", s::key(1).public().to_string());
    add("ContentId", s::cid(1).to_string());
    add("ContentId", s::manifest().cid().to_string());
    for t in ["512MiB", "2GiB", "1000", "7B", "3 TB", "1KB"] {
        add("ByteSize", t.into());
    }
    for t in ["90s", "10m", "2h", "1d", "600"] {
        add("Seconds", t.into());
    }
    for t in ["9.0", "8.6", "12"] {
        add("ComputeCapability", t.into());
    }
    for st in JobState::ALL {
        add("JobState", st.to_string());
    }
    add("MemberState", MemberState::Started.to_string());
    add("Role", Role::Verify.to_string());
    add(
        "VerificationStatus",
        VerificationStatus::FailedVerification.to_string(),
    );
    add("OfferSort", OfferSort::TflopsPerPrice.to_string());
    add("BlobKind", BlobKind::Directory.to_string());
    add("AuditOutcome", AuditOutcome::Flagged.to_string());
    add(
        "CancelOutcome",
        CancelOutcome::AlreadyEnded(JobState::Completed).to_string(),
    );
    add("AccountId", AccountId::Buyer(s::buyer()).to_string());
    add("AccountId", AccountId::Provider(s::provider(1)).to_string());
    add("AccountId", AccountId::Fee.to_string());
    add("Multiaddr", "/ip4/10.0.0.7/udp/4001/quic-v1".into());
    add(
        "Multiaddr",
        format!("/dns4/node.example/tcp/4001/p2p/{}", s::provider(1)),
    );
    add("ImageRef", s::image());
    add("ImageRef", format!("repo/x:1@{}", s::image()));
    add("ManifestPath", "a/b/c.txt".into());
    out
}
