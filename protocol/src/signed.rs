//! The signed envelope.
//!
//! A signature in Kiln covers more than the payload: it covers
//!
//! ```text
//! encode(("kiln-signed-v1", T::DOMAIN, signer, nonce, expires_at, payload))
//! ```
//!
//! * the **domain tag** (one per message type, versioned) means a signature
//!   made for a `ResultReceipt` can never verify as a `JobOffer`, even if the
//!   bytes of the two payloads happened to coincide;
//! * the **expiry** bounds how long a captured message is useful;
//! * the **nonce** makes every signed message unique, so receivers can keep a
//!   replay cache keyed by `(signer, nonce)`.
//!
//! Binding to a particular job is the payload's business: every job-scoped
//! message carries its `JobId` (and receipts their `OfferId`), and the
//! receiver checks those against what it expects.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::encoding::{self, EncodeError};
use crate::ids::Nonce;
use crate::keys::{Keypair, PublicKey, SignatureBytes};
use crate::units::UnixMillis;

/// A message type that can be signed. `DOMAIN` must be unique per type.
pub trait SignedMessage: Serialize + DeserializeOwned {
    const DOMAIN: &'static str;
}

/// `payload`, signed by `signer`, valid until `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    pub signer: PublicKey,
    pub nonce: Nonce,
    pub expires_at: UnixMillis,
    pub payload: T,
    pub signature: SignatureBytes,
}

/// Why a signed message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "bad signature on {domain} from {signer}: the message was altered or signed by another key"
    )]
    BadSignature {
        domain: &'static str,
        signer: String,
    },
    #[error("{domain} expired at {expires_at} ms (now {now} ms); ask the sender for a fresh one")]
    Expired {
        domain: &'static str,
        expires_at: u64,
        now: u64,
    },
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

#[derive(Serialize)]
struct ToSign<'a, T> {
    version: &'static str,
    domain: &'static str,
    signer: &'a PublicKey,
    nonce: &'a Nonce,
    expires_at: UnixMillis,
    payload: &'a T,
}

fn signing_bytes<T: SignedMessage>(
    signer: &PublicKey,
    nonce: &Nonce,
    expires_at: UnixMillis,
    payload: &T,
) -> Result<Vec<u8>, EncodeError> {
    encoding::encode(&ToSign {
        version: "kiln-signed-v1",
        domain: T::DOMAIN,
        signer,
        nonce,
        expires_at,
        payload,
    })
}

impl<T: SignedMessage> Signed<T> {
    /// Signs `payload` with a fresh random nonce, valid for `ttl_secs`.
    pub fn sign(key: &Keypair, payload: T, ttl_secs: u64) -> Result<Self, EncodeError> {
        Self::sign_with(
            key,
            payload,
            Nonce::random(),
            UnixMillis::now().plus_secs(ttl_secs),
        )
    }

    /// Signs with an explicit nonce and expiry (tests, deterministic vectors).
    pub fn sign_with(
        key: &Keypair,
        payload: T,
        nonce: Nonce,
        expires_at: UnixMillis,
    ) -> Result<Self, EncodeError> {
        let signer = key.public();
        let bytes = signing_bytes(&signer, &nonce, expires_at, &payload)?;
        Ok(Self {
            signer,
            nonce,
            expires_at,
            signature: SignatureBytes(key.sign_raw(&bytes)),
            payload,
        })
    }

    /// Checks the signature and the expiry against `now`, and returns the
    /// payload. Who the signer *should* be is the caller's check.
    pub fn verify(&self, now: UnixMillis) -> Result<&T, VerifyError> {
        let bytes = signing_bytes(&self.signer, &self.nonce, self.expires_at, &self.payload)?;
        if !self.signer.verify_raw(&bytes, &self.signature.0) {
            return Err(VerifyError::BadSignature {
                domain: T::DOMAIN,
                signer: self.signer.to_string(),
            });
        }
        if now > self.expires_at {
            return Err(VerifyError::Expired {
                domain: T::DOMAIN,
                expires_at: self.expires_at.0,
                now: now.0,
            });
        }
        Ok(&self.payload)
    }

    /// Canonical bytes of the whole envelope (for storage and transport).
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        encoding::encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, encoding::DecodeError> {
        encoding::decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct A(u64);
    impl SignedMessage for A {
        const DOMAIN: &'static str = "test/a/v1";
    }
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct B(u64);
    impl SignedMessage for B {
        const DOMAIN: &'static str = "test/b/v1";
    }

    #[test]
    fn verifies_and_rejects_tampering() {
        let k = Keypair::generate();
        let s = Signed::sign(&k, A(7), 60).unwrap();
        assert_eq!(s.verify(UnixMillis::now()).unwrap(), &A(7));

        let mut bad = s.clone();
        bad.payload = A(8);
        assert!(matches!(
            bad.verify(UnixMillis::now()),
            Err(VerifyError::BadSignature { .. })
        ));

        let mut other_signer = s.clone();
        other_signer.signer = Keypair::generate().public();
        assert!(other_signer.verify(UnixMillis::now()).is_err());

        let mut extended = s.clone();
        extended.expires_at = UnixMillis(s.expires_at.0 + 1);
        assert!(extended.verify(UnixMillis::now()).is_err());
    }

    #[test]
    fn a_signature_never_verifies_under_another_domain() {
        let k = Keypair::generate();
        let a = Signed::sign(&k, A(7), 60).unwrap();
        // Same payload bytes, same nonce/expiry, different message type.
        let b = Signed {
            signer: a.signer,
            nonce: a.nonce,
            expires_at: a.expires_at,
            payload: B(7),
            signature: a.signature,
        };
        assert_eq!(
            encoding::encode(&A(7)).unwrap(),
            encoding::encode(&B(7)).unwrap()
        );
        assert!(matches!(
            b.verify(UnixMillis::now()),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn expiry_is_enforced() {
        let k = Keypair::generate();
        let s = Signed::sign_with(&k, A(1), Nonce::random(), UnixMillis(1000)).unwrap();
        assert!(s.verify(UnixMillis(1000)).is_ok());
        assert!(matches!(
            s.verify(UnixMillis(1001)),
            Err(VerifyError::Expired { .. })
        ));
    }

    #[test]
    fn json_and_binary_forms_verify_identically() {
        let k = Keypair::generate();
        let s = Signed::sign(&k, A(3), 60).unwrap();
        let via_json: Signed<A> =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        via_json.verify(UnixMillis::now()).unwrap();
        let via_bin = Signed::<A>::from_bytes(&s.to_bytes().unwrap()).unwrap();
        via_bin.verify(UnixMillis::now()).unwrap();
        // One flipped byte anywhere in the encoded envelope breaks it.
        let bytes = s.to_bytes().unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(t) = Signed::<A>::from_bytes(&b) {
                assert!(
                    t.verify(UnixMillis::now()).is_err() || t == s,
                    "flip at {i} verified"
                );
            }
        }
    }
}
