//! The one canonical binary encoding of Kiln.
//!
//! Everything that is signed, hashed or sent between peers is encoded here
//! and nowhere else, with bincode 2.0.1 (pinned: 3.0.0 is a tombstone) in its
//! `standard` configuration: little-endian, variable-length integers, fields in
//! declaration order. Encoding is deterministic for our types because they
//! contain no hash maps (only `BTreeMap`) and no floats in signed data.
//!
//! Decoding is bounded: a peer cannot make us allocate more than
//! [`MAX_MESSAGE_BYTES`], nor much more than it sent. bincode checks every
//! length a message declares against its configured limit *before* it
//! allocates, and counts every value it decodes against it (8 bytes for a
//! `u64` however short its varint, a string's declared length before its
//! bytes arrive). So the limit is chosen per input: the smallest of
//! [`LIMITS`] at least [`CLAIMS_PER_BYTE`] times its length. A 272-byte
//! input declaring a 150 MB byte string is refused instead of allocated
//! (the fuzzer found that amplification).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Upper bound on any single decoded message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// What bincode may count against its limit per byte of input, at most,
/// for a well-formed message: 16 for a `u128` in a one-byte varint, and a
/// margin.
pub const CLAIMS_PER_BYTE: usize = 32;

/// The decoding limits to choose from (bincode's limit is a constant).
pub const LIMITS: [usize; 5] = [64 << 10, 1 << 20, 16 << 20, 64 << 20, MAX_MESSAGE_BYTES];

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

fn decode_limited<T: DeserializeOwned, const N: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<N>())
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed {what}: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("malformed {what}: {extra} trailing bytes after the message")]
    TrailingBytes { what: &'static str, extra: usize },
}

/// Why a message could not be encoded (only possible for types that are not
/// representable, which would be a bug in this crate).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {what}: {source}")]
pub struct EncodeError {
    what: &'static str,
    #[source]
    source: bincode::error::EncodeError,
}

/// Canonical bytes of `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|source| EncodeError {
        what: std::any::type_name::<T>(),
        source,
    })
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error so that
/// two different byte strings never decode to the same signed message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let what = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("message");
    let budget = bytes.len().saturating_mul(CLAIMS_PER_BYTE);
    let decoded = if budget <= LIMITS[0] {
        decode_limited::<T, { LIMITS[0] }>(bytes)
    } else if budget <= LIMITS[1] {
        decode_limited::<T, { LIMITS[1] }>(bytes)
    } else if budget <= LIMITS[2] {
        decode_limited::<T, { LIMITS[2] }>(bytes)
    } else if budget <= LIMITS[3] {
        decode_limited::<T, { LIMITS[3] }>(bytes)
    } else {
        decode_limited::<T, { LIMITS[4] }>(bytes)
    };
    let (value, read) = decoded.map_err(|source| DecodeError::Malformed { what, source })?;
    if read != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: bytes.len() - read,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short input cannot declare a long string or byte buffer into
    /// existence: refused before anything is allocated. Legitimate messages
    /// whose claims run ahead of their length (varints of wide integers)
    /// still decode, at every size.
    #[test]
    fn claims_are_bounded_by_what_was_sent() {
        // A byte string declared 150 MB long, in a few bytes.
        let mut short = encode(&150_000_000u64).unwrap();
        short.extend_from_slice(&[0; 16]);
        // (A `Vec<u8>` is a serde sequence: serde itself caps what it
        // reserves ahead of the elements, so it only runs out of input.)
        assert!(decode::<Vec<u8>>(&short).is_err());
        let e = decode::<String>(&short).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("limit"), "{e}");
        // Zeros of the widest integers: one byte each, 16 counted each.
        for n in [1usize, 1000, 100_000, 3_000_000] {
            let wide = vec![0u128; n];
            assert_eq!(decode::<Vec<u128>>(&encode(&wide).unwrap()).unwrap(), wide);
            let bytes = vec![7u8; n];
            assert_eq!(decode::<Vec<u8>>(&encode(&bytes).unwrap()).unwrap(), bytes);
        }
    }

    #[test]
    fn round_trip_and_reject_trailing() {
        let v = (1u32, "x".to_string(), vec![1u8, 2]);
        let b = encode(&v).unwrap();
        assert_eq!(decode::<(u32, String, Vec<u8>)>(&b).unwrap(), v);
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            decode::<(u32, String, Vec<u8>)>(&longer),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
        assert!(decode::<(u32, String, Vec<u8>)>(&b[..b.len() - 1]).is_err());
    }
}
