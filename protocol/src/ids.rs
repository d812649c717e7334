//! Identifiers. Every id is a newtype with `Display`/`FromStr` and a
//! `short()` form for logs, so an id can never be confused with another kind
//! of id or with free text.
//!
//! * [`JobId`] and [`OfferId`] are 128-bit values shown as 32 hex digits.
//! * [`ProviderId`] is the libp2p `PeerId` of the provider's ed25519 key: the
//!   same identity authenticates the transport and signs receipts.
//! * [`BuyerId`] is a buyer's ed25519 public key (`kb` + 64 hex digits).

use std::fmt;
use std::str::FromStr;

use libp2p_identity::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::PublicKey;

/// Why a string could not be read as an id.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("invalid {kind} `{input}`: {reason}")]
pub struct IdParseError {
    pub kind: &'static str,
    pub input: String,
    pub reason: String,
}

impl IdParseError {
    #[doc(hidden)]
    pub fn new(kind: &'static str, input: &str, reason: impl fmt::Display) -> Self {
        // At most 80 characters of what was given, cut on a character
        // (a byte index could fall inside one and panic: found by fuzzing).
        let input = input.chars().take(80).collect();
        Self {
            kind,
            input,
            reason: reason.to_string(),
        }
    }
}

/// Fills `buf` from the operating system's CSPRNG.
#[doc(hidden)]
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG failing is unrecoverable for a signing system; there is no
    // safe fallback, so abort loudly.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    buf
}

/// Fixed-size byte ids and digests: hex strings for humans (JSON, TOML),
/// raw bytes for the canonical encoding. Extra derives may be given first.
/// Exported, so every crate's ids and hashes are newtypes of one shape:
/// `kiln_protocol::hex_id!(ReceiptHash, 32, "receipt hash");`.
#[macro_export]
macro_rules! hex_id {
    ($(#[$meta:meta])* $name:ident, $len:expr, $kind:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            pub const LEN: usize = $len;
            /// A fresh random id.
            pub fn random() -> Self {
                Self($crate::ids::random_bytes::<$len>())
            }
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            /// First 8 hex digits, for log lines.
            pub fn short(&self) -> String {
                $crate::__private::hex::encode(&self.0[..4])
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(&$crate::__private::hex::encode(self.0))
            }
        }

        impl ::core::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl ::core::str::FromStr for $name {
            type Err = $crate::IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; $len];
                $crate::__private::hex::decode_to_slice(s, &mut out).map_err(|e| {
                    $crate::IdParseError::new($kind, s, format!("expected {} hex digits ({e})", $len * 2))
                })?;
                Ok(Self(out))
            }
        }

        impl $crate::__private::serde::Serialize for $name {
            fn serialize<S: $crate::__private::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    $crate::__private::serde::Serialize::serialize(&self.0, s)
                }
            }
        }

        impl<'de> $crate::__private::serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::__private::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <::std::string::String as $crate::__private::serde::Deserialize>::deserialize(d)?;
                    s.parse().map_err(<D::Error as $crate::__private::serde::de::Error>::custom)
                } else {
                    Ok(Self(<[u8; $len] as $crate::__private::serde::Deserialize>::deserialize(d)?))
                }
            }
        }
    };
}

hex_id!(JobId, 16, "job id");
hex_id!(OfferId, 16, "offer id");
hex_id!(Nonce, 16, "nonce");

impl JobId {
    /// A job's id is derived from who submitted it and the submission's nonce,
    /// so retrying the same signed submission is idempotent: it names the same
    /// job instead of creating a second one.
    pub fn derive(buyer: &BuyerId, nonce: &Nonce) -> Self {
        let mut h = blake3::Hasher::new_derive_key("kiln job id v1");
        h.update(buyer.as_bytes());
        h.update(nonce.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(out)
    }
}

/// A provider, named by the libp2p `PeerId` of its ed25519 identity key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProviderId(PeerId);

impl ProviderId {
    pub const fn from_peer_id(peer: PeerId) -> Self {
        Self(peer)
    }
    pub fn from_public_key(key: &PublicKey) -> Self {
        Self(key.to_peer_id())
    }
    pub const fn peer_id(&self) -> PeerId {
        self.0
    }
    /// The ed25519 key the id inlines (every Kiln identity's does).
    pub fn public_key(&self) -> Option<PublicKey> {
        PublicKey::from_peer_id(&self.0)
    }
    /// Last 8 characters of the base58 PeerId (the start is the same
    /// multihash prefix for every ed25519 key, so the tail is what differs).
    pub fn short(&self) -> String {
        let s = self.0.to_base58();
        s[s.len().saturating_sub(8)..].to_string()
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProviderId(..{})", self.short())
    }
}

impl FromStr for ProviderId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<PeerId>()
            .map(Self)
            .map_err(|e| IdParseError::new("provider id", s, e))
    }
}

impl From<PeerId> for ProviderId {
    fn from(p: PeerId) -> Self {
        Self(p)
    }
}

impl Serialize for ProviderId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.0.to_bytes())
        }
    }
}

impl<'de> Deserialize<'de> for ProviderId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <Vec<u8>>::deserialize(d)?;
            PeerId::from_bytes(&bytes)
                .map(Self)
                .map_err(serde::de::Error::custom)
        }
    }
}

/// A buyer, named by the ed25519 public key that signs its submissions.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuyerId(PublicKey);

impl BuyerId {
    pub const fn new(key: PublicKey) -> Self {
        Self(key)
    }
    pub const fn public_key(&self) -> &PublicKey {
        &self.0
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
    pub fn short(&self) -> String {
        format!("kb{}", hex::encode(&self.0.as_bytes()[..4]))
    }
}

impl fmt::Display for BuyerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kb{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for BuyerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuyerId({})", self.short())
    }
}

impl FromStr for BuyerId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s
            .strip_prefix("kb")
            .ok_or_else(|| IdParseError::new("buyer id", s, "must start with `kb`"))?;
        let key: PublicKey = hex_part
            .parse()
            .map_err(|e: IdParseError| IdParseError::new("buyer id", s, e.reason))?;
        Ok(Self(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    #[test]
    fn ids_round_trip_through_display() {
        let j = JobId::random();
        assert_eq!(j.to_string().parse::<JobId>().unwrap(), j);
        assert_eq!(j.to_string().len(), 32);
        let kp = Keypair::generate();
        let p = ProviderId::from_public_key(&kp.public());
        assert_eq!(p.to_string().parse::<ProviderId>().unwrap(), p);
        let b = BuyerId::new(kp.public());
        assert_eq!(b.to_string().parse::<BuyerId>().unwrap(), b);
    }

    #[test]
    fn bad_ids_name_what_is_wrong() {
        let e = "xyz".parse::<JobId>().unwrap_err();
        assert_eq!(e.kind, "job id");
        assert!(e.to_string().contains("32 hex digits"), "{e}");
        assert!("12abc".parse::<BuyerId>().is_err());
        assert!("not-a-peer".parse::<ProviderId>().is_err());
        // Long input is cut to 80 characters, never inside one (a byte
        // index inside a multi-byte character used to panic).
        for bad in [
            "€".repeat(40),
            format!("a{}", "€".repeat(40)),
            "x".repeat(200),
        ] {
            for e in [
                bad.parse::<JobId>().unwrap_err(),
                bad.parse::<BuyerId>().unwrap_err(),
                bad.parse::<ProviderId>().unwrap_err(),
            ] {
                assert!(e.input.chars().count() <= 80, "{e}");
                assert!(bad.starts_with(&e.input));
            }
        }
    }

    #[test]
    fn job_id_derivation_is_stable_and_input_sensitive() {
        let kp = Keypair::from_secret_bytes([7; 32]);
        let b = BuyerId::new(kp.public());
        let n = Nonce::from_bytes([1; 16]);
        assert_eq!(JobId::derive(&b, &n), JobId::derive(&b, &n));
        assert_ne!(
            JobId::derive(&b, &n),
            JobId::derive(&b, &Nonce::from_bytes([2; 16]))
        );
    }
}
