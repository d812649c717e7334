//! The one canonical binary encoding of Kiln.
//!
//! Everything that is signed, hashed or sent between peers is encoded here
//! and nowhere else, with bincode 2.0.1 (pinned: 3.0.0 is a tombstone) in its
//! `standard` configuration: little-endian, variable-length integers, fields in
//! declaration order. Encoding is deterministic for our types because they
//! contain no hash maps (only `BTreeMap`) and no floats in signed data.
//!
//! Decoding is bounded: a peer cannot make us allocate more than
//! [`MAX_MESSAGE_BYTES`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Upper bound on any single decoded message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
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
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|source| DecodeError::Malformed { what, source })?;
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
