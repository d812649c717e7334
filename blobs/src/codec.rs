//! Bao range encoding and verified decoding, the fast paths.
//!
//! These walk the same pre-order item sequence as bao-tree's own encoder and
//! decoder (`bao_tree::iter::ResponseIterRef` over the truncated ranges: a
//! 64-byte parent pair per tree node on the way, then each 16 KiB group) and
//! check each item the same way (BLAKE3 `hazmat` chaining values against a
//! stack of expected hashes that starts at the root), but they work on
//! reusable buffers: the encoder reads groups straight from the blob file
//! into the outgoing buffer, the decoder verifies groups in place in the
//! incoming buffer and writes them to the partial file from there. Their
//! output and verdicts are tested against bao-tree's (see the tests).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{Outboard, truncate_ranges};
use bao_tree::iter::{BaoChunk, ResponseIter, ResponseIterRef};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges, TreeNode};

/// The chaining value of a subtree (a group, or the whole blob when it is
/// one group: then `is_root`).
pub fn hash_subtree(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        blake3::hash(data)
    } else {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start_chunk * crate::CHUNK_BYTES);
        h.update(data);
        blake3::Hash::from(h.finalize_non_root())
    }
}

/// The chaining value of a parent node from its children's.
pub fn parent_cv(l: &blake3::Hash, r: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    if is_root {
        merge_subtrees_root(l.as_bytes(), r.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            l.as_bytes(),
            r.as_bytes(),
            Mode::Hash,
        ))
    }
}

fn pair_from(b: &[u8]) -> (blake3::Hash, blake3::Hash) {
    let mut l = [0u8; 32];
    let mut r = [0u8; 32];
    l.copy_from_slice(&b[..32]);
    r.copy_from_slice(&b[32..64]);
    (blake3::Hash::from(l), blake3::Hash::from(r))
}

/// Why encoding stopped.
#[derive(Debug, thiserror::Error)]
pub enum EncodeFail {
    #[error("reading the stored blob failed: {0}")]
    Io(#[from] io::Error),
    /// The stored bytes or outboard do not match the root (bit rot).
    #[error("stored data failed verification at {0}")]
    Corrupt(String),
    /// A range that splits a 16 KiB group needs hashes the outboard does
    /// not keep: use bao-tree's encoder for it.
    #[error("unaligned range")]
    Unaligned,
}

/// Encodes a response into reusable buffers, piece by piece.
pub struct Encoder {
    data: File,
    outboard: PostOrderOutboard<File>,
    iter: ResponseIter,
    stack: Vec<blake3::Hash>,
    validate: bool,
}

impl Encoder {
    /// `validate`: re-check every stored group and parent against the root
    /// while reading (a rotted blob fails instead of being sent).
    pub fn new(
        data: File,
        outboard: PostOrderOutboard<File>,
        ranges: &ChunkRanges,
        validate: bool,
    ) -> Self {
        let tree = outboard.tree();
        let ranges = truncated(ranges, tree.size());
        let stack = vec![outboard.root()];
        Self {
            data,
            outboard,
            iter: ResponseIter::new(tree, ranges),
            stack,
            validate,
        }
    }

    /// Whether every range starts and ends on a group boundary (or at the
    /// end of the blob): only then can [`Encoder`] serve it.
    pub fn aligned(tree: BaoTree, ranges: &ChunkRanges) -> bool {
        let g = 1u64 << tree.block_size().chunk_log();
        let end = tree.chunks().0;
        // A range starting at or past the end selects the last chunk alone
        // (bao's size proof): not aligned.
        truncate_ranges(ranges, tree.size())
            .boundaries()
            .iter()
            .enumerate()
            .all(|(i, c)| {
                if i % 2 == 0 {
                    c.0 < end && c.0 % g == 0
                } else {
                    c.0 == end || (c.0 < end && c.0 % g == 0)
                }
            })
    }

    /// Appends items to `buf[*pos..]` until fewer than one group of room is
    /// left or the response is complete (returns `true` then). `buf` must be
    /// at least 16 KiB + 64 bytes long.
    pub fn fill(&mut self, buf: &mut [u8], pos: &mut usize) -> Result<bool, EncodeFail> {
        let room = crate::GROUP_BYTES as usize + 64;
        while buf.len() - *pos >= room {
            let Some(item) = self.iter.next() else {
                return Ok(true);
            };
            match item {
                BaoChunk::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    ..
                } => {
                    let Some((l, r)) = self.outboard.load(node)? else {
                        return Err(EncodeFail::Unaligned);
                    };
                    if self.validate {
                        let expected = self.stack.pop();
                        if expected != Some(parent_cv(&l, &r, is_root)) {
                            return Err(EncodeFail::Corrupt(format!(
                                "tree node over chunks {:?}",
                                node.chunk_range()
                            )));
                        }
                        if right {
                            self.stack.push(r);
                        }
                        if left {
                            self.stack.push(l);
                        }
                    }
                    buf[*pos..*pos + 32].copy_from_slice(l.as_bytes());
                    buf[*pos + 32..*pos + 64].copy_from_slice(r.as_bytes());
                    *pos += 64;
                }
                BaoChunk::Leaf {
                    start_chunk,
                    size,
                    is_root,
                    ..
                } => {
                    if size > crate::GROUP_BYTES as usize {
                        return Err(EncodeFail::Unaligned);
                    }
                    let out = &mut buf[*pos..*pos + size];
                    self.data.read_exact_at(out, start_chunk.to_bytes())?;
                    if self.validate {
                        let expected = self.stack.pop();
                        if expected != Some(hash_subtree(start_chunk.0, out, is_root)) {
                            return Err(EncodeFail::Corrupt(format!(
                                "the group at byte {}",
                                start_chunk.to_bytes()
                            )));
                        }
                    }
                    *pos += size;
                }
            }
        }
        Ok(false)
    }
}

/// A verified item the decoder hands out.
pub enum Verified<'a> {
    Parent(TreeNode, (blake3::Hash, blake3::Hash)),
    Leaf(u64, &'a [u8]),
}

/// Why decoding stopped.
#[derive(Debug)]
pub enum DecodeFail {
    /// A leaf at this byte offset did not hash to the expected value.
    Leaf(u64),
    /// A parent pair over these chunks did not hash to the expected value.
    Parent(std::ops::Range<ChunkNum>),
}

/// A push decoder: feed it bytes, it verifies complete items in place.
pub struct Decoder<'a> {
    iter: ResponseIterRef<'a>,
    stack: Vec<blake3::Hash>,
    /// The item whose bytes are awaited.
    next: Option<BaoChunk>,
    done: bool,
}

impl<'a> Decoder<'a> {
    /// Decodes the response to a request for `ranges` (which must outlive
    /// the decoder) of the blob with this root and tree.
    pub fn new(root: blake3::Hash, tree: BaoTree, ranges: &'a bao_tree::ChunkRangesRef) -> Self {
        let mut iter = ResponseIterRef::new(tree, truncate_ranges(ranges, tree.size()));
        let next = iter.next();
        Self {
            iter,
            stack: vec![root],
            done: next.is_none(),
            next,
        }
    }

    /// Whether every item was received and verified.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes the next item needs.
    pub fn need(&self) -> usize {
        match self.next {
            Some(BaoChunk::Parent { .. }) => 64,
            Some(BaoChunk::Leaf { size, .. }) => size,
            None => 0,
        }
    }

    /// Verifies the complete items at the start of `input`, calling `sink`
    /// for each; returns the bytes consumed. Stops at the first failure.
    pub fn feed<E>(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(Verified<'_>) -> Result<(), E>,
    ) -> Result<Result<usize, DecodeFail>, E> {
        let mut at = 0;
        while let Some(item) = self.next {
            let need = self.need();
            if input.len() - at < need {
                break;
            }
            let bytes = &input[at..at + need];
            match item {
                BaoChunk::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    ..
                } => {
                    let (l, r) = pair_from(bytes);
                    if self.stack.pop() != Some(parent_cv(&l, &r, is_root)) {
                        self.done = true;
                        self.next = None;
                        return Ok(Err(DecodeFail::Parent(node.chunk_range())));
                    }
                    if right {
                        self.stack.push(r);
                    }
                    if left {
                        self.stack.push(l);
                    }
                    sink(Verified::Parent(node, (l, r)))?;
                }
                BaoChunk::Leaf {
                    start_chunk,
                    is_root,
                    ..
                } => {
                    if self.stack.pop() != Some(hash_subtree(start_chunk.0, bytes, is_root)) {
                        self.done = true;
                        self.next = None;
                        return Ok(Err(DecodeFail::Leaf(start_chunk.to_bytes())));
                    }
                    sink(Verified::Leaf(start_chunk.to_bytes(), bytes))?;
                }
            }
            at += need;
            self.next = self.iter.next();
            if self.next.is_none() {
                self.done = true;
            }
        }
        Ok(Ok(at))
    }
}

/// `ranges` truncated to a blob of `size` bytes (as both ends see them).
pub fn truncated(ranges: &ChunkRanges, size: u64) -> ChunkRanges {
    let b = truncate_ranges(ranges, size).boundaries();
    let mut out = ChunkRanges::empty();
    for pair in b.chunks(2) {
        out |= match *pair {
            [s, e] => ChunkRanges::from(s..e),
            [s] => ChunkRanges::from(s..),
            _ => ChunkRanges::empty(),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BLOCK_SIZE;
    use bao_tree::io::outboard::PostOrderMemOutboard;
    use bao_tree::io::sync::encode_ranges_validated;

    fn data(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new()
            .update(&(n as u64).to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        v
    }

    fn files(d: &std::path::Path, bytes: &[u8]) -> (File, PostOrderOutboard<File>) {
        let ob = PostOrderMemOutboard::create(bytes, BLOCK_SIZE);
        std::fs::write(d.join("data"), bytes).unwrap();
        std::fs::write(d.join("ob"), &ob.data).unwrap();
        (
            File::open(d.join("data")).unwrap(),
            PostOrderOutboard {
                root: ob.root,
                tree: ob.tree,
                data: File::open(d.join("ob")).unwrap(),
            },
        )
    }

    fn encode_ours(d: &std::path::Path, bytes: &[u8], ranges: &ChunkRanges) -> Vec<u8> {
        let (f, ob) = files(d, bytes);
        let mut enc = Encoder::new(f, ob, ranges, true);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 40_000];
        loop {
            let mut pos = 0;
            let done = enc.fill(&mut buf, &mut pos).unwrap();
            out.extend_from_slice(&buf[..pos]);
            if done {
                return out;
            }
        }
    }

    fn cases(size: u64) -> Vec<ChunkRanges> {
        let c = |a: u64, b: u64| ChunkRanges::from(ChunkNum(a)..ChunkNum(b));
        vec![
            crate::all_chunks(size),
            c(0, 16),
            c(16, 48) | c(96, 128),
            ChunkRanges::from(ChunkNum(32)..),
            crate::group_ranges(size.saturating_sub(1), size, size),
        ]
    }

    #[test]
    fn encoder_matches_bao_tree_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        for size in [1u64, 1024, 16384, 16385, 100_000, 1 << 20, (1 << 20) + 5000] {
            let bytes = data(size as usize);
            let ob = PostOrderMemOutboard::create(&bytes, BLOCK_SIZE);
            for ranges in cases(size) {
                let mut theirs = Vec::new();
                encode_ranges_validated(&bytes[..], &ob, &ranges, &mut theirs).unwrap();
                let starts_past_end = ranges
                    .boundaries()
                    .first()
                    .is_some_and(|c| *c >= ChunkNum::chunks(size));
                assert_eq!(
                    Encoder::aligned(ob.tree, &ranges),
                    !starts_past_end,
                    "{size} {ranges:?}"
                );
                if Encoder::aligned(ob.tree, &ranges) {
                    assert_eq!(
                        encode_ours(d.path(), &bytes, &ranges),
                        theirs,
                        "{size} {ranges:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn encoder_refuses_rotted_data_and_unaligned_ranges() {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = data(200_000);
        let (_, ob) = files(d.path(), &bytes);
        bytes[50_000] ^= 1;
        std::fs::write(d.path().join("data"), &bytes).unwrap();
        let f = File::open(d.path().join("data")).unwrap();
        let mut enc = Encoder::new(f, ob, &crate::all_chunks(200_000), true);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        assert!(matches!(
            enc.fill(&mut buf, &mut pos),
            Err(EncodeFail::Corrupt(_))
        ));
        let tree = crate::tree(200_000);
        assert!(!Encoder::aligned(
            tree,
            &ChunkRanges::from(ChunkNum(3)..ChunkNum(20))
        ));
        assert!(!Encoder::aligned(tree, &crate::wire::last_chunk()));
    }

    fn decode_ours(
        bytes_len: u64,
        root: blake3::Hash,
        ranges: &ChunkRanges,
        enc: &[u8],
        piece: usize,
    ) -> (Vec<u8>, Result<(), DecodeFail>) {
        let tree = crate::tree(bytes_len);
        let ranges = truncated(ranges, bytes_len);
        let mut dec = Decoder::new(root, tree, &ranges);
        let mut out = vec![0u8; bytes_len as usize];
        let mut buf: Vec<u8> = Vec::new();
        let mut input = enc;
        while !dec.is_done() {
            let take = piece.min(input.len());
            if take == 0 {
                break;
            }
            buf.extend_from_slice(&input[..take]);
            input = &input[take..];
            let r = dec
                .feed(&buf, |v| {
                    if let Verified::Leaf(off, d) = v {
                        out[off as usize..off as usize + d.len()].copy_from_slice(d);
                    }
                    Ok::<(), ()>(())
                })
                .unwrap();
            match r {
                Ok(n) => {
                    buf.drain(..n);
                }
                Err(e) => return (out, Err(e)),
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn decoder_accepts_bao_tree_encodings_and_catches_every_flip() {
        for size in [1u64, 16384, 100_000, (1 << 20) + 5000] {
            let bytes = data(size as usize);
            let ob = PostOrderMemOutboard::create(&bytes, BLOCK_SIZE);
            let mut ranges_list = cases(size);
            ranges_list.push(crate::wire::last_chunk());
            ranges_list.push(ChunkRanges::from(ChunkNum(3)..ChunkNum(20)));
            for ranges in ranges_list {
                let mut enc = Vec::new();
                encode_ranges_validated(&bytes[..], &ob, &ranges, &mut enc).unwrap();
                for piece in [7, 4096, 1 << 20] {
                    let (out, r) = decode_ours(size, ob.root, &ranges, &enc, piece);
                    assert!(r.is_ok(), "{size} {ranges:?}");
                    for (off, len) in crate::range_pairs(&truncated(&ranges, size), size) {
                        let s = (off.saturating_mul(1024).min(size)) as usize;
                        let e = (len.saturating_mul(1024).min(size)) as usize;
                        assert_eq!(out[s..e], bytes[s..e]);
                    }
                }
                // Flip bytes at a spread of positions: always caught, and
                // nothing at or after the bad item is handed out.
                for i in (0..enc.len()).step_by((enc.len() / 13).max(1)) {
                    let mut bad = enc.clone();
                    bad[i] ^= 0x10;
                    let (_, r) = decode_ours(size, ob.root, &ranges, &bad, 5000);
                    assert!(r.is_err(), "flip at {i} of {} not caught", enc.len());
                }
            }
        }
    }
}
