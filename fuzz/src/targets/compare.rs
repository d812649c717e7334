//! `verify_compare`: the verification comparator reading providers'
//! output files (`kiln_coordinator::verification::compare::compare` under
//! `compare = "tolerance"`), which parses `.npy` headers and JSON documents
//! that a lying provider wrote.
//!
//! Input: a mode byte (bit 0: `.npy` or `.json`; bits 1-2: the
//! tolerances), a split point (u16), then the two executions' files. Each
//! execution's output is a one-file manifest; the content store is the two
//! files. Properties: the same answer twice (deterministic), and with
//! `rtol = 0` (a symmetric closeness) the same answer with the executions
//! swapped.

use kiln_coordinator::verification::compare::{Agreement, Execution, compare};
use kiln_protocol::{
    Compare, ContentId, Manifest, ManifestEntry, Outcome as JobOutcome, Tolerance, Verify,
};

use super::{Outcome, Target, Verdict, tagged};
use crate::rng::Input;

pub static TARGET: Target = Target {
    name: "verify_compare",
    about: "kiln_coordinator::verification::compare (tolerance mode) on hostile .npy and .json outputs",
    max_len: 8 * 1024,
    seeds,
    dict: &[
        b"\x93NUMPY",
        b"'descr': '<f8'",
        b"'descr': '>f4'",
        b"'descr': '<f2'",
        b"'descr': '|u1'",
        b"'descr': '<i8'",
        b"'fortran_order': True",
        b"'shape': (",
        b"), }",
        b"NaN",
        b"Infinity",
        b"1e308",
        b"-0.0",
        b"[[[[",
        b"{\"a\":",
    ],
    run,
};

const TOLERANCES: [(f64, f64); 4] = [(0.0, 0.0), (0.0, 1e-6), (1e-3, 1e-6), (0.5, 0.0)];

fn run(data: &[u8]) -> Outcome {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let split = inp.u16() as usize;
    let rest = inp.rest();
    let (a, b) = rest.split_at(split.min(rest.len()));
    let path = if mode & 1 == 0 {
        "out/r.npy"
    } else {
        "out/r.json"
    };
    let (rtol, atol) = TOLERANCES[(mode as usize >> 1) % TOLERANCES.len()];
    let verify = Verify {
        compare: Compare::Tolerance,
        rtol: Tolerance(rtol),
        atol: Tolerance(atol),
    };
    let first = decide(&verify, path, a, b)?;
    if decide(&verify, path, a, b)? != first {
        return Err("compare gave two different answers for the same executions".into());
    }
    if rtol == 0.0 {
        let swapped = decide(&verify, path, b, a)?;
        if matches!(swapped, Agreement::Same) != matches!(first, Agreement::Same) {
            return Err(format!(
                "with rtol = 0 (symmetric), compare(a, b) = {first:?} but compare(b, a) = {swapped:?}"
            ));
        }
    }
    Ok(match first {
        Agreement::Same => Verdict::Accepted,
        Agreement::Differ(_) => Verdict::Rejected,
    })
}

fn manifest(path: &str, bytes: &[u8]) -> Manifest {
    Manifest {
        entries: vec![ManifestEntry {
            path: path.into(),
            cid: ContentId::of_bytes(bytes),
            size: bytes.len() as u64,
            executable: false,
        }],
    }
}

fn decide(verify: &Verify, path: &str, a: &[u8], b: &[u8]) -> Result<Agreement, String> {
    let (ma, mb) = (manifest(path, a), manifest(path, b));
    let (ca, cb) = (ContentId::of_bytes(a), ContentId::of_bytes(b));
    let mut read = |cid: &ContentId| -> Result<Vec<u8>, String> {
        if *cid == ca {
            Ok(a.to_vec())
        } else if *cid == cb {
            Ok(b.to_vec())
        } else {
            Err("not in the store".into())
        }
    };
    compare(verify, &exec(&ma), &exec(&mb), &mut read)
        .map_err(|e| format!("the comparator failed on a store holding every file: {e}"))
}

fn exec(m: &Manifest) -> Execution<'_> {
    Execution {
        outcome: JobOutcome::Succeeded,
        exit_code: Some(0),
        output_cid: m.cid(),
        manifest: m,
        stdout_cid: ContentId::of_bytes(b""),
    }
}

/// A `.npy` 1.0 file.
fn npy(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn pair(mode: u8, a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = (a.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    tagged(mode, &v)
}

fn seeds() -> Vec<Vec<u8>> {
    let f8 = |xs: &[f64]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f4 = |xs: &[f32]| xs.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
    let a = npy("<f8", "(3,)", false, &f8(&[1.0, 2.5, f64::NAN]));
    let b = npy("<f8", "(3,)", false, &f8(&[1.0, 2.5000001, f64::NAN]));
    let c = npy(
        "<f8",
        "(2, 2)",
        true,
        &f8(&[0.0, -0.0, f64::INFINITY, 1e-300]),
    );
    let d = npy("<f8", "(2, 2)", true, &f8(&[0.0, 0.0, f64::INFINITY, 0.0]));
    let e = npy(">f4", "(2,)", false, &f4(&[1.31, -7.0]));
    let f = npy(">f4", "(2,)", false, &f4(&[1.3100001, -7.0]));
    let g = npy("<i8", "()", false, &5i64.to_le_bytes());
    let h = npy("|u1", "(4,)", false, &[1, 2, 3, 4]);
    let j1 = br#"{"loss": 0.125, "acc": [0.9, 0.91, null], "name": "run", "ok": true}"#;
    let j2 = br#"{"loss": 0.1250001, "acc": [0.9, 0.91, null], "name": "run", "ok": true}"#;
    let j3 = br#"[1, 2.0, -3e-5, {"x": [[]]}, 18446744073709551615, -9223372036854775808]"#;
    let j4 = br#"[1.0, 2, -3e-5, {"x": [[]]}, 18446744073709551615, -9223372036854775808]"#;
    vec![
        pair(0, &a, &b),
        pair(4, &a, &b),
        pair(0, &c, &d),
        pair(2, &e, &f),
        pair(0, &g, &h),
        pair(1, j1, j2),
        pair(5, j1, j2),
        pair(1, j3, j4),
    ]
}
