//! # kiln-blobs
//!
//! Kiln's content-addressed data plane, shared by provider nodes and the
//! coordinator:
//!
//! * [`store::Store`]: an on-disk blob store. Every blob is stored under its
//!   CID (`data/<cid>`) with its BLAKE3/bao outboard beside it
//!   (`data/<cid>.obao4`, post-order hash pairs for 16 KiB chunk groups). A
//!   blob becomes visible only by a rename after every byte was verified;
//!   downloads in progress live in `partial/` and resume from what was
//!   verified. A size quota evicts least-recently-used blobs, never a pinned
//!   one ([`store::Store::pin`]).
//! * [`wire`]: the `/kiln/blobs/1` stream protocol: a request names a CID and
//!   chunk ranges, the answer is the bao encoding of those ranges, so the
//!   receiver verifies every 16 KiB group as it arrives ([`wire::serve`]).
//! * [`fetch::fetch`]: a multi-source download: 1 MiB work units spread over
//!   several peers, a peer dropped at its first bad group and its range
//!   fetched elsewhere, resumable after a dropped connection or a restart.
//! * [`http::fetch_url`]: an HTTP source verified while streaming.
//! * [`announce`]: which peers hold which blobs (gossiped announcements).
//! * [`bench`]: the data-plane benchmark (`kiln bench data`).

pub mod announce;
pub mod bench;
pub mod codec;
pub mod fetch;
pub mod http;
pub mod store;
pub mod wire;

pub use bao_tree;
pub use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
pub use fetch::{FetchError, FetchOptions, FetchReport, Source, fetch};
pub use store::{Blob, Eviction, PinGuard, Store, StoreConfig, StoreError};

/// 16 KiB chunk groups: the unit of verification and of the outboard.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);
/// Bytes in one chunk group.
pub const GROUP_BYTES: u64 = 16 * 1024;
/// Bytes in one BLAKE3 chunk.
pub const CHUNK_BYTES: u64 = 1024;

/// The bao tree of a blob of `size` bytes with Kiln's chunk groups.
pub fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BLOCK_SIZE)
}

/// Bytes of the outboard of a blob of `size` bytes.
pub fn outboard_size(size: u64) -> u64 {
    tree(size).outboard_size()
}

/// The bao root of a content id (its BLAKE3 digest).
pub fn root_of(cid: &kiln_protocol::ContentId) -> blake3::Hash {
    blake3::Hash::from(cid.digest())
}

/// All chunks of a blob of `size` bytes.
pub fn all_chunks(size: u64) -> ChunkRanges {
    ChunkRanges::from(ChunkNum(0)..ChunkNum::chunks(size))
}

/// The chunk ranges covering the byte range `start..end`, widened to whole
/// chunk groups (and clipped to the blob).
pub fn group_ranges(start: u64, end: u64, size: u64) -> ChunkRanges {
    let g = GROUP_BYTES;
    if start >= end.min(size) {
        return ChunkRanges::empty();
    }
    let s = start / g * g;
    let e = end.min(size).div_ceil(g) * g;
    if s >= e {
        return ChunkRanges::empty();
    }
    ChunkRanges::from(ChunkNum::full_chunks(s)..ChunkNum::chunks(e.min(size)))
}

/// Number of bytes covered by `ranges` in a blob of `size` bytes.
pub fn ranges_bytes(ranges: &ChunkRanges, size: u64) -> u64 {
    use range_collections::range_set::RangeSetRange;
    ranges
        .iter()
        .map(|r| {
            let (s, e) = match r {
                RangeSetRange::Range(r) => (r.start.to_bytes(), r.end.to_bytes()),
                RangeSetRange::RangeFrom(r) => (r.start.to_bytes(), size),
            };
            e.min(size).saturating_sub(s.min(size))
        })
        .sum()
}

/// The ranges as `(start, end)` chunk pairs (end exclusive; an open range
/// ends at the blob's last chunk).
pub fn range_pairs(ranges: &ChunkRanges, size: u64) -> Vec<(u64, u64)> {
    use range_collections::range_set::RangeSetRange;
    let end = ChunkNum::chunks(size).0;
    ranges
        .iter()
        .map(|r| match r {
            RangeSetRange::Range(r) => (r.start.0, r.end.0),
            RangeSetRange::RangeFrom(r) => (r.start.0, end.max(r.start.0)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ranges_round_out_to_groups_and_clip() {
        let size = 100_000; // 6 full groups + 1696 bytes
        assert_eq!(
            group_ranges(0, 1, size),
            ChunkRanges::from(ChunkNum(0)..ChunkNum(16))
        );
        assert_eq!(
            group_ranges(20_000, 200_000, size),
            ChunkRanges::from(ChunkNum(16)..ChunkNum::chunks(size))
        );
        assert_eq!(ranges_bytes(&all_chunks(size), size), size);
        assert!(group_ranges(size, size + 5, size).is_empty());
    }
}
