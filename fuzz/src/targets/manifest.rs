//! `manifest`: directory manifests in DAG-CBOR (`Manifest::from_dag_cbor`),
//! read from peers, the coordinator's store and the CLI's downloads.
//!
//! The format promises one encoding per directory (so one CID), so an
//! accepted input must be byte for byte what `to_dag_cbor` writes for the
//! decoded manifest, and the manifest must pass `validate` (clean, sorted,
//! unique paths). It must also survive the JSON and bincode forms it takes
//! in REST views and results.

use kiln_protocol::Manifest;

use super::{Outcome, Target, Verdict, bincode_round_trip, json_round_trip};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "manifest",
    about: "kiln_protocol::Manifest::from_dag_cbor (canonical DAG-CBOR directory manifests)",
    max_len: 16 * 1024,
    seeds,
    dict: &[
        b"gentries",
        b"gversion",
        b"ccid",
        b"dpath",
        b"dsize",
        b"jexecutable",
        &[0xd8, 0x2a],
        &[0xf4],
        &[0xf5],
        &[0xa4],
        &[0x58, 0x25, 0x00, 0x01, 0x55, 0x1e, 0x20],
        b"../",
        b"//",
    ],
    run,
};

fn run(data: &[u8]) -> Outcome {
    let Ok(m) = Manifest::from_dag_cbor(data) else {
        return Ok(Verdict::Rejected);
    };
    if m.to_dag_cbor() != data {
        return Err(format!(
            "accepted a non-canonical manifest encoding ({} bytes; canonical is {})",
            data.len(),
            m.to_dag_cbor().len()
        ));
    }
    m.validate()
        .map_err(|e| format!("from_dag_cbor accepted a manifest that does not validate: {e}"))?;
    let rebuilt = Manifest::new(m.entries.clone())
        .map_err(|e| format!("Manifest::new refuses accepted entries: {e}"))?;
    if rebuilt != m {
        return Err("Manifest::new reorders accepted entries".into());
    }
    if Manifest::from_dag_cbor(&m.to_dag_cbor()).ok().as_ref() != Some(&m) {
        return Err("the canonical encoding does not decode to the same manifest".into());
    }
    let _ = m.cid();
    json_round_trip(&m)?;
    let bytes = kiln_protocol::encoding::encode(&m).map_err(|e| e.to_string())?;
    if bincode_round_trip::<Manifest>(&bytes)?.is_none() {
        return Err("the bincode form of an accepted manifest does not decode".into());
    }
    // `Manifest::total_size` sums with `+`: sizes are the sender's word, so
    // a sum past u64::MAX would panic (debug) or wrap (release) there.
    if m.entries
        .iter()
        .try_fold(0u64, |a, e| a.checked_add(e.size))
        .is_none()
    {
        return Ok(Verdict::Note(
            "an accepted manifest's sizes sum past u64::MAX: Manifest::total_size() overflows (panics in debug builds, wraps in release)".into(),
        ));
    }
    Ok(Verdict::Accepted)
}

fn seeds() -> Vec<Vec<u8>> {
    s::manifests().iter().map(Manifest::to_dag_cbor).collect()
}
