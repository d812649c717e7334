//! `bench_slice`: the Bao slices a provider sends to prove benchmark
//! samples in a challenge response (`kiln_protocol::bench::verify_slice`,
//! documented "never panics on any input").
//!
//! Input: a mode byte, then
//!
//! * even: an output index (one of a few real outputs around chunk and
//!   group boundaries), a chunk number (u64), the slice. An accepted slice
//!   must be exactly the output's bytes of that chunk.
//! * odd: an arbitrary root (32 bytes), length (u64), chunk (u64) and
//!   slice: nothing may panic (whatever the length claims).

use std::sync::OnceLock;

use kiln_protocol::bench::{Digest32, OutputTree, read_from, verify_slice};

use super::{Outcome, Target, Verdict, tagged};
use crate::rng::Input;

pub static TARGET: Target = Target {
    name: "bench_slice",
    about: "kiln_protocol::bench::verify_slice (Bao slices proving benchmark samples)",
    max_len: 4 * 1024,
    seeds,
    dict: &[],
    run,
};

const LENS: [usize; 8] = [0, 1, 1024, 1025, 5000, 16_384, 16_385, 70_000];

fn outputs() -> &'static [(Vec<u8>, OutputTree)] {
    static O: OnceLock<Vec<(Vec<u8>, OutputTree)>> = OnceLock::new();
    O.get_or_init(|| {
        LENS.iter()
            .map(|&n| {
                let data: Vec<u8> = (0..n).map(|i| (i * 13 % 251) as u8).collect();
                let tree = OutputTree::of_bytes(&data);
                (data, tree)
            })
            .collect()
    })
}

fn run(data: &[u8]) -> Outcome {
    let mut inp = Input::new(data);
    if inp.u8().is_multiple_of(2) {
        let (out, tree) = &outputs()[inp.u8() as usize % LENS.len()];
        let chunk = inp.u64() % 128;
        let slice = inp.rest();
        let Ok(bytes) = verify_slice(&tree.root(), out.len() as u64, chunk, slice) else {
            return Ok(Verdict::Rejected);
        };
        let start = chunk as usize * 1024;
        let real = out.get(start..(start + 1024).min(out.len()));
        if real != Some(bytes) {
            return Err(format!(
                "a slice for chunk {chunk} of a {}-byte output verified with bytes that are not the output's",
                out.len()
            ));
        }
        return Ok(Verdict::Accepted);
    }
    let mut root = [0u8; 32];
    let r = inp.take(32);
    root[..r.len()].copy_from_slice(r);
    let len = inp.u64();
    let chunk = inp.u64();
    let slice = inp.rest();
    // Only panic-freedom can be judged here (the root is arbitrary).
    Ok(
        match verify_slice(&Digest32::from_bytes(root), len, chunk, slice) {
            Ok(_) => Verdict::Accepted,
            Err(_) => Verdict::Rejected,
        },
    )
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (data, tree)) in outputs().iter().enumerate() {
        let read = read_from(data);
        for chunk in [0u64, 1, 4, 15, 16, 68] {
            if let Some(slice) = tree.slice(chunk, &read) {
                let mut v = vec![i as u8];
                v.extend_from_slice(&chunk.to_le_bytes());
                v.extend_from_slice(&slice);
                if v.len() <= 4 * 1024 {
                    out.push(tagged(0, &v));
                }
            }
        }
    }
    let mut v = vec![0u8; 32];
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    v.extend_from_slice(&(u64::MAX / 1024).to_le_bytes());
    v.extend_from_slice(&[0u8; 64]);
    out.push(tagged(1, &v));
    out
}
