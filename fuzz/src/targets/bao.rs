//! `blob_bao`: the body of a `/kiln/blobs/1` `Get` response, decoded and
//! verified as it arrives (`kiln_blobs::wire::decode_stream`, what
//! `fetch` and `decode_into` run on bytes from a peer).
//!
//! The blob is real (one of a few sizes around group and chunk
//! boundaries); its root is what the requester knows (the CID). Input:
//!
//! ```text
//! size index (u8) ‖ k (u8: low 4 bits = boundary count ≤ 8, bit 7 = add the
//! open last-chunk range of a size probe) ‖ boundaries (u16 each) ‖ body
//! ```
//!
//! Properties: **soundness**, every leaf the decoder hands out as verified
//! is the blob's real bytes at that offset (a peer cannot make us write
//! anything else); **completeness**, a decode that finishes has handed
//! out every requested byte.

use std::sync::OnceLock;

use futures::executor::block_on;
use futures::io::Cursor;
use kiln_blobs::bao_tree::ChunkRanges;
use kiln_blobs::bao_tree::io::outboard::PostOrderMemOutboard;
use kiln_blobs::codec::{Verified, truncated};
use kiln_blobs::wire::{self, DecodeError, StreamBuf};

use super::{Outcome, Target, Verdict};
use crate::rng::Input;

pub static TARGET: Target = Target {
    name: "blob_bao",
    about: "kiln_blobs::wire::decode_stream of bao-encoded ranges against the blob's root (soundness and completeness)",
    max_len: 48 * 1024,
    seeds,
    dict: &[],
    run,
};

const SIZES: [u64; 9] = [0, 1, 1024, 1025, 16_384, 16_385, 40_000, 100_000, 300_000];

/// The blobs, made once: (bytes, BLAKE3 root).
fn blobs() -> &'static [(Vec<u8>, blake3::Hash)] {
    static B: OnceLock<Vec<(Vec<u8>, blake3::Hash)>> = OnceLock::new();
    B.get_or_init(|| {
        SIZES
            .iter()
            .map(|&n| {
                let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
                let root = blake3::hash(&data);
                (data, root)
            })
            .collect()
    })
}

/// Parses the header: blob index, ranges (None: boundaries refused).
fn header(inp: &mut Input<'_>) -> (usize, Option<ChunkRanges>) {
    let which = inp.u8() as usize % SIZES.len();
    let k = inp.u8();
    let n = (k & 0x0f).min(8) as usize;
    let mut bounds: Vec<u64> = (0..n).map(|_| u64::from(inp.u16())).collect();
    if k & 0x80 != 0 {
        // The size probe's open range `[u64::MAX - 1, ..)`.
        if bounds.len() % 2 == 1 {
            bounds.pop();
        }
        bounds.push(u64::MAX - 1);
    }
    (which, wire::ranges_from_wire(&bounds))
}

fn run(data: &[u8]) -> Outcome {
    let mut inp = Input::new(data);
    let (which, ranges) = header(&mut inp);
    let Some(ranges) = ranges else {
        return Ok(Verdict::Rejected);
    };
    let body = inp.rest();
    let (blob, root) = &blobs()[which];
    let size = blob.len() as u64;
    let mut leaves: Vec<(u64, u64)> = Vec::new();
    let mut lie: Option<String> = None;
    let mut sb = StreamBuf::new(Cursor::new(body));
    let r = block_on(wire::decode_stream(
        &mut sb,
        *root,
        kiln_blobs::tree(size),
        &ranges,
        |item| {
            if let Verified::Leaf(offset, bytes) = item {
                let end = offset.saturating_add(bytes.len() as u64);
                let real = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(end).ok())
                    .and_then(|(s, e)| blob.get(s..e));
                if real != Some(bytes) && lie.is_none() {
                    lie = Some(format!(
                        "a leaf at byte {offset} ({} bytes) verified but is not the blob's data (blob of {size} bytes)",
                        bytes.len()
                    ));
                }
                leaves.push((offset, end));
            }
            Ok::<(), ()>(())
        },
    ));
    if let Some(why) = lie {
        return Err(why);
    }
    match r {
        Ok(()) => {}
        Err(DecodeError::Corrupt(_) | DecodeError::Transport(_)) => return Ok(Verdict::Rejected),
        Err(DecodeError::Sink(())) => return Err("the sink never fails".into()),
    }
    // Completeness: every requested byte came in a verified leaf.
    leaves.sort_unstable();
    let want = truncated(&ranges, size);
    for (s, e) in kiln_blobs::range_pairs(&want, size) {
        let (mut from, to) = (
            s.saturating_mul(1024).min(size),
            e.saturating_mul(1024).min(size),
        );
        for &(ls, le) in &leaves {
            if ls <= from && le > from {
                from = le;
            }
        }
        if from < to {
            return Err(format!(
                "the decode finished without bytes {from}..{to} of requested chunks {s}..{e} (blob of {size} bytes)"
            ));
        }
    }
    Ok(Verdict::Accepted)
}

fn seeds() -> Vec<Vec<u8>> {
    // (blob index, boundaries, probe)
    let cases: &[(usize, &[u16], bool)] = &[
        (0, &[0, 1], false),
        (1, &[0, 1], false),
        (2, &[0, 1], false),
        (3, &[0, 2], false),
        (3, &[], true),
        (4, &[0, 16], false),
        (5, &[16, 17], false),
        (5, &[], true),
        (6, &[32, 40], false),
        (6, &[1, 2, 33, 34], false),
        (7, &[], true),
        (8, &[], true),
        (8, &[64, 65], false),
    ];
    let mut out = Vec::new();
    for &(which, bounds, probe) in cases {
        let mut input = vec![
            which as u8,
            bounds.len() as u8 | if probe { 0x80 } else { 0 },
        ];
        for b in bounds {
            input.extend_from_slice(&b.to_le_bytes());
        }
        let mut inp = Input::new(&input);
        let (_, Some(ranges)) = header(&mut inp) else {
            continue;
        };
        let (blob, _) = &blobs()[which];
        let ob = PostOrderMemOutboard::create(&blob[..], kiln_blobs::BLOCK_SIZE);
        let mut body = Vec::new();
        if kiln_blobs::bao_tree::io::sync::encode_ranges_validated(
            &blob[..],
            &ob,
            &ranges,
            &mut body,
        )
        .is_ok()
        {
            input.extend_from_slice(&body);
            out.push(input);
        }
    }
    out
}
