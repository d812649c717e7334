//! What the blob integration tests share: incompressible test data and a
//! store that skips fsync.

use std::path::Path;

use kiln_blobs::{Store, StoreConfig};

pub const MIB: u64 = 1 << 20;

/// `n` xorshift bytes: incompressible, distinct per seed.
pub fn data(n: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A store in `dir` without a quota, not syncing (tests only).
pub fn store(dir: &Path) -> Store {
    Store::open_dir(
        dir,
        StoreConfig {
            quota: None,
            no_sync: true,
            evict: Default::default(),
        },
    )
    .unwrap()
}
