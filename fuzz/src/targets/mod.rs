//! One fuzz target per decoder of bytes that come from the network or disk.
//!
//! A target is a plain function from bytes to a [`Verdict`]: it feeds the
//! bytes to the real decoder (a public function of the crate that owns it,
//! called as the production code calls it) and, when the decoder accepts,
//! checks properties of what came out. `Err(why)` is a broken property (a
//! finding, like a panic); [`Verdict::Note`] is an observation that does
//! not fail a run (say, a non-canonical byte string that decodes to the same
//! value, which bincode allows for integers). Many targets read a selector
//! byte first (which message type, which mode): one target covers one
//! decoder across all the types it decodes.
//!
//! | target | decoder | properties |
//! |---|---|---|
//! | `encoding` | `kiln_protocol::encoding::decode` of every wire/stored type | decode∘encode = id; re-encoding decodes the same; the checks receivers run next (spec validation, gang shape…) never panic; non-canonical bytes noted |
//! | `signed` | `Signed<T>::from_bytes` + `verify` for every `SignedMessage` | a verifying envelope still verifies re-encoded; no byte string verifies under two domains |
//! | `rpc_frame` | `kiln_net::RpcCodec` (`/kiln/rpc/1` frames) | a decoded request/response re-frames to one that decodes the same |
//! | `blob_wire` | `kiln_blobs::wire::read_frame` (requests, responses), `ranges_from_wire`, gossip `Announcement` + `Providers::record` | frame round trip; ranges round trip exactly; the index stays within its bounds |
//! | `blob_bao` | `kiln_blobs::wire::decode_stream` (bao responses) | soundness: every verified leaf is the real data; completeness: a finished decode covered every requested byte |
//! | `manifest` | `Manifest::from_dag_cbor` | accepted bytes are exactly the canonical encoding; the manifest validates; JSON and bincode round trips |
//! | `job_spec` | TOML → `JobSpec` → `validate` (what `kiln_cli::read_spec` does) | valid specs survive TOML, JSON and bincode round trips; a submission signed from one verifies after the CLI → coordinator JSON trip |
//! | `rest_json` | `serde_json` of every `kiln_protocol::views` body and `Signed<JobSubmission>` (as `POST /v1/jobs` parses it) | JSON round trip; a verifying submission verifies in bincode form too |
//! | `rest_auth` | `kiln_coordinator::auth::authenticate` (the `Authorization: Kiln2 …` middleware) | raw headers never authenticate; fresh signed requests are accepted exactly when the rules say so, and only once |
//! | `ids` | `FromStr` of ids, CIDs, keys, sizes, durations, states, accounts | parse∘display = id |
//! | `ledger` | `Signed<LedgerEntry>` rows + `verify_chain` (the auditor) | an accepted chain replays to a ledger whose invariants hold |
//! | `bench_slice` | `kiln_protocol::bench::verify_slice` (challenge proofs) | never panics; an accepted slice is the real chunk |
//! | `verify_compare` | `kiln_coordinator::verification::compare` on `.npy`/`.json` outputs | deterministic; never panics |

use std::fmt::Debug;

use kiln_protocol::encoding;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod auth;
pub mod bao;
pub mod bench_slice;
pub mod blob_wire;
pub mod compare;
pub mod encoding_target;
pub mod ids;
pub mod json;
pub mod ledger;
pub mod manifest;
pub mod rpc;
pub mod signed;
pub mod spec;

/// What the decoder did with an input whose properties all held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Decoded, and every property checked.
    Accepted,
    /// Refused with an error (what garbage should get).
    Rejected,
    /// Decoded, with an observation worth reporting that is not a failure.
    Note(String),
}

/// `Err(why)`: a property failed.
pub type Outcome = Result<Verdict, String>;

/// A decoder under test.
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    /// Longest input the mutator makes.
    pub max_len: usize,
    /// Valid inputs built from real values (structure-aware seeds).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator inserts (keys, schemes, magic bytes).
    pub dict: &'static [&'static [u8]],
    pub run: fn(&[u8]) -> Outcome,
}

/// Every target, in the order `kiln-fuzz list` prints them.
pub fn all() -> Vec<&'static Target> {
    vec![
        &encoding_target::TARGET,
        &signed::TARGET,
        &rpc::TARGET,
        &blob_wire::TARGET,
        &bao::TARGET,
        &manifest::TARGET,
        &spec::TARGET,
        &json::TARGET,
        &auth::TARGET,
        &ids::TARGET,
        &ledger::TARGET,
        &bench_slice::TARGET,
        &compare::TARGET,
    ]
}

pub fn by_name(name: &str) -> Option<&'static Target> {
    all().into_iter().find(|t| t.name == name)
}

/// The type's name without module paths (`Signed<JobOffer>`), for messages.
pub fn short_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(word.rsplit("::").next().unwrap_or(word));
        word.clear();
    };
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Canonical bytes of a sample value (seeds).
pub fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    encoding::encode(v).unwrap_or_default()
}

/// A selector byte, then `body`.
pub fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(tag);
    v.extend_from_slice(body);
    v
}

/// Decodes `bytes` as `T` with the canonical encoding and checks the round
/// trip: the value re-encodes, the re-encoding decodes to an equal value,
/// and (a note, not a failure) whether the input was that canonical
/// encoding. Returns the value for further checks.
pub fn bincode_round_trip<T>(bytes: &[u8]) -> Result<Option<(T, Option<String>)>, String>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(v) = encoding::decode::<T>(bytes) else {
        return Ok(None);
    };
    let name = short_name::<T>();
    let again = encoding::encode(&v)
        .map_err(|e| format!("{name}: a decoded value does not re-encode: {e}"))?;
    let back = encoding::decode::<T>(&again)
        .map_err(|e| format!("{name}: the re-encoding of a decoded value does not decode: {e}"))?;
    if back != v {
        return Err(format!(
            "{name}: decode(encode(x)) != x\n x = {v:?}\n back = {back:?}"
        ));
    }
    Ok(Some((v, non_canonical(&name, bytes, &again))))
}

/// [`bincode_round_trip`] for types without `PartialEq`: the re-encodings
/// must agree instead.
pub fn bincode_round_trip_bytes<T>(bytes: &[u8]) -> Result<Option<(T, Option<String>)>, String>
where
    T: Serialize + DeserializeOwned,
{
    let Ok(v) = encoding::decode::<T>(bytes) else {
        return Ok(None);
    };
    let name = short_name::<T>();
    let again = encoding::encode(&v)
        .map_err(|e| format!("{name}: a decoded value does not re-encode: {e}"))?;
    let back = encoding::decode::<T>(&again)
        .map_err(|e| format!("{name}: the re-encoding of a decoded value does not decode: {e}"))?;
    let third = encoding::encode(&back).map_err(|e| format!("{name}: re-encode: {e}"))?;
    if third != again {
        return Err(format!(
            "{name}: encode(decode(encode(x))) != encode(x) ({} vs {} bytes)",
            third.len(),
            again.len()
        ));
    }
    Ok(Some((v, non_canonical(&name, bytes, &again))))
}

fn non_canonical(name: &str, given: &[u8], canonical: &[u8]) -> Option<String> {
    (given != canonical).then(|| {
        let at = given
            .iter()
            .zip(canonical)
            .position(|(a, b)| a != b)
            .unwrap_or(given.len().min(canonical.len()));
        format!(
            "{name}: a non-canonical encoding decodes (first difference at byte {at}: {} bytes given, canonical {})",
            given.len(),
            canonical.len()
        )
    })
}

/// Turns the optional note of a round trip into a verdict.
pub fn verdict(note: Option<String>) -> Verdict {
    note.map_or(Verdict::Accepted, Verdict::Note)
}

/// JSON round trip: the value serializes, and parses back equal.
pub fn json_round_trip<T>(v: &T) -> Result<(), String>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let name = short_name::<T>();
    let text =
        serde_json::to_string(v).map_err(|e| format!("{name}: does not serialize to JSON: {e}"))?;
    let back: T = serde_json::from_str(&text)
        .map_err(|e| format!("{name}: its own JSON does not parse: {e}\n json = {text}"))?;
    if &back != v {
        let (x, y) = (format!("{v:?}"), format!("{back:?}"));
        return Err(format!(
            "{name}: JSON round trip changed the value (at `{}`)\n x = {x}\n back = {y}\n json = {text}",
            first_difference(&x, &y)
        ));
    }
    Ok(())
}

/// The field name nearest before the first difference of two `Debug`
/// strings (`rtol` in `… rtol: Tolerance(6e23) …`), to name what changed.
pub fn first_difference(a: &str, b: &str) -> String {
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let before = a.get(..at).unwrap_or(a);
    let Some(colon) = before.rfind(": ") else {
        return "?".into();
    };
    before[..colon]
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("?")
        .to_string()
}
