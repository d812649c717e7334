//! A small, fully specified pseudo-random number generator.
//!
//! The workload must produce the *same bytes on every machine*, so it cannot
//! depend on an external crate whose algorithm might change between versions.
//! We use two well-known public-domain generators by Sebastiano Vigna:
//!
//! * [`SplitMix64`] expands a single `u64` seed into a full 256-bit state (this
//!   is the seeding procedure recommended by the xoshiro authors), and
//! * [`Xoshiro256StarStar`] generates the actual stream.
//!
//! Both are specified exactly by the code below, so the output is a pure
//! function of the seed.

/// SplitMix64: a tiny generator that is mainly used to seed [`Xoshiro256StarStar`].
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Starts the sequence at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Returns the next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// xoshiro256**: fast, high-quality, 256 bits of state.
#[derive(Debug, Clone)]
pub struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    /// Seeds the generator from a single `u64` through [`SplitMix64`].
    ///
    /// SplitMix64 never yields four zero words in a row, so the state can
    /// never be the all-zero state (which would be a fixed point).
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        Self {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    /// Returns the next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniformly distributed `f64` in `[-1, 1)`.
    ///
    /// Uses the top 53 bits so that every value is exactly representable;
    /// the arithmetic is exact, hence identical on every IEEE-754 machine.
    pub fn next_f64_signed(&mut self) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        unit * 2.0 - 1.0
    }

    /// Fills `buf` with pseudo-random bytes (little-endian words, so the
    /// stream of bytes does not depend on how `buf` is chunked by callers as
    /// long as every chunk but the last has a length divisible by 8).
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_vector() {
        // Reference values for seed 0 (from the published C implementation).
        let mut sm = SplitMix64::new(0);
        assert_eq!(sm.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(sm.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(sm.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn xoshiro_is_deterministic_per_seed() {
        let a: Vec<u64> = {
            let mut r = Xoshiro256StarStar::seed_from_u64(7);
            (0..100).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Xoshiro256StarStar::seed_from_u64(7);
            (0..100).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        let c: Vec<u64> = {
            let mut r = Xoshiro256StarStar::seed_from_u64(8);
            (0..100).map(|_| r.next_u64()).collect()
        };
        assert_ne!(a, c);
    }

    #[test]
    fn xoshiro_known_answer() {
        // Pinned output: if this changes, every published workload digest changes.
        let mut r = Xoshiro256StarStar::seed_from_u64(1);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, XOSHIRO_SEED1_FIRST3);
    }

    const XOSHIRO_SEED1_FIRST3: [u64; 3] = [
        12_966_619_160_104_079_557,
        9_600_361_134_598_540_522,
        10_590_380_919_521_690_900,
    ];

    #[test]
    fn fill_bytes_is_chunking_independent() {
        let mut whole = vec![0u8; 1003];
        Xoshiro256StarStar::seed_from_u64(3).fill_bytes(&mut whole);
        let mut pieces = vec![0u8; 1003];
        let mut r = Xoshiro256StarStar::seed_from_u64(3);
        let (a, b) = pieces.split_at_mut(512);
        r.fill_bytes(a);
        r.fill_bytes(b);
        assert_eq!(whole, pieces);
    }

    #[test]
    fn f64_in_range() {
        let mut r = Xoshiro256StarStar::seed_from_u64(99);
        for _ in 0..10_000 {
            let x = r.next_f64_signed();
            assert!((-1.0..1.0).contains(&x));
        }
    }
}
