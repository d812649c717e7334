//! Byte-level mutations, libFuzzer/AFL style.
//!
//! Each new input is a corpus entry with a short random stack of these
//! applied. Besides the generic ones (flip a bit, set a byte, insert,
//! delete, duplicate or copy a range, splice with another entry) there are
//! a few that know what Kiln's formats look like: bincode's variable-length
//! integer markers (`251`..`254` announce a 2/4/8/16-byte integer), lengths
//! that are just past a bound, and the target's dictionary (keys of TOML and
//! JSON bodies, scheme names, CID prefixes).

use crate::rng::Rng;

/// Values that break arithmetic and bounds checks.
const INTERESTING_8: [u8; 12] = [0, 1, 2, 16, 32, 64, 0x7f, 0x80, 0xfa, 0xfb, 0xfc, 0xff];
const INTERESTING_16: [u16; 8] = [0, 0x80, 0xff, 0x100, 0x3fff, 0x7fff, 0x8000, 0xffff];
const INTERESTING_32: [u32; 9] = [
    0,
    0x8000,
    0xffff,
    0x1_0000,
    0x100_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fff0,
    0xffff_ffff,
];
const INTERESTING_64: [u64; 5] = [0, 1 << 32, 1 << 53, i64::MAX as u64, u64::MAX];

/// Mutates `data` in place: 1 to 8 stacked mutations, result at most
/// `max_len` bytes. `other` is another corpus entry (for splicing).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], max_len: usize) {
    let stack = 1usize << rng.below(4);
    for _ in 0..stack {
        one(rng, data, other, dict, max_len);
    }
    data.truncate(max_len);
}

fn one(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], max_len: usize) {
    if data.is_empty() {
        let n = rng.range(1, 8);
        data.extend((0..n).map(|_| rng.byte()));
        return;
    }
    let len = data.len();
    match rng.below(16) {
        0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(len);
            data[i] = rng.byte();
        }
        2 => {
            let i = rng.below(len);
            data[i] = INTERESTING_8[rng.below(INTERESTING_8.len())];
        }
        3 => {
            // An interesting integer, either byte order.
            let bytes: Vec<u8> = match rng.below(3) {
                0 => INTERESTING_16[rng.below(INTERESTING_16.len())]
                    .to_le_bytes()
                    .to_vec(),
                1 => INTERESTING_32[rng.below(INTERESTING_32.len())]
                    .to_le_bytes()
                    .to_vec(),
                _ => INTERESTING_64[rng.below(INTERESTING_64.len())]
                    .to_le_bytes()
                    .to_vec(),
            };
            let bytes: Vec<u8> = if rng.one_in(2) {
                bytes.into_iter().rev().collect()
            } else {
                bytes
            };
            overwrite(rng, data, &bytes);
        }
        4 => {
            // Small arithmetic on one byte (lengths, counts, tags).
            let i = rng.below(len);
            let d = rng.range(1, 16) as u8;
            data[i] = if rng.one_in(2) {
                data[i].wrapping_add(d)
            } else {
                data[i].wrapping_sub(d)
            };
        }
        5 => {
            // Insert random bytes.
            let n = rng.range(1, 16);
            let at = rng.below(len + 1);
            let fill: Vec<u8> = if rng.one_in(2) {
                (0..n).map(|_| rng.byte()).collect()
            } else {
                vec![rng.byte(); n]
            };
            data.splice(at..at, fill);
        }
        6 => {
            // Delete a range.
            let at = rng.below(len);
            let n = rng.range(1, (len - at).min(64));
            data.drain(at..at + n);
        }
        7 => {
            // Duplicate a range (repeated fields, longer sequences).
            let at = rng.below(len);
            let n = rng.range(1, (len - at).min(128));
            let chunk = data[at..at + n].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, chunk);
        }
        8 => {
            // Copy a range over another place.
            let at = rng.below(len);
            let n = rng.range(1, (len - at).min(64));
            let chunk = data[at..at + n].to_vec();
            overwrite(rng, data, &chunk);
        }
        9 if !other.is_empty() => {
            // Splice: a prefix of this entry, a suffix of the other.
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        10 if !other.is_empty() => {
            // Insert a piece of another entry.
            let from = rng.below(other.len());
            let n = rng.range(1, (other.len() - from).min(128));
            let at = rng.below(len + 1);
            data.splice(at..at, other[from..from + n].iter().copied());
        }
        11 if !dict.is_empty() => {
            let word = dict[rng.below(dict.len())];
            let at = rng.below(len + 1);
            if rng.one_in(2) {
                data.splice(at..at, word.iter().copied());
            } else {
                overwrite(rng, data, word);
            }
        }
        12 => {
            // A bincode varint in its long forms (canonical or not).
            let marker = [0xfbu8, 0xfc, 0xfd, 0xfe][rng.below(4)];
            let width = match marker {
                0xfb => 2,
                0xfc => 4,
                0xfd => 8,
                _ => 16,
            };
            let mut v = vec![marker];
            v.extend((0..width).map(|_| if rng.one_in(2) { 0 } else { rng.byte() }));
            let at = rng.below(len + 1);
            data.splice(at..at, v);
        }
        13 => {
            // Truncate (a message cut short).
            let n = rng.below(len);
            data.truncate(n);
        }
        14 => {
            // Swap two bytes.
            let (i, j) = (rng.below(len), rng.below(len));
            data.swap(i, j);
        }
        _ => {
            // ASCII digits and signs: numbers in text formats.
            let i = rng.below(len);
            data[i] = b"0123456789-+.eE"[rng.below(15)];
        }
    }
    if data.len() > max_len.saturating_mul(2) {
        data.truncate(max_len);
    }
}

fn overwrite(rng: &mut Rng, data: &mut [u8], bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let at = rng.below(data.len());
    let end = (at + bytes.len()).min(data.len());
    data[at..end].copy_from_slice(&bytes[..end - at]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_bounds() {
        let mut rng = Rng::new(1);
        let mut data = b"hello".to_vec();
        for _ in 0..100_000 {
            mutate(&mut rng, &mut data, b"other", &[b"key"], 64);
            assert!(data.len() <= 64);
        }
    }
}
