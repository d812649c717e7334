//! Keys. One ed25519 key type serves providers, buyers and the coordinator.
//! A provider's key is also its libp2p identity, so the peer a coordinator
//! talks to over an authenticated connection is the one whose signature a
//! receipt must carry.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{IdParseError, random_bytes};

/// An ed25519 signing key.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(SigningKey::from_bytes(&random_bytes::<32>()))
    }
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }
    /// The 32-byte secret seed, for writing the key file.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
    pub(crate) fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
    /// Signs a stored record (not a wire message): `domain ‖ 0 ‖ record`,
    /// so a record signature can never pass for a message of another kind.
    pub fn sign_record(&self, domain: &str, record: &[u8]) -> [u8; 64] {
        self.sign_raw(&record_bytes(domain, record))
    }
    /// The same key as a libp2p identity (same public key, so the PeerId
    /// derived here equals [`PublicKey::to_peer_id`]).
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut secret = self.0.to_bytes();
        #[allow(clippy::expect_used)]
        libp2p_identity::Keypair::ed25519_from_bytes(&mut secret)
            .expect("a 32-byte ed25519 seed is always a valid libp2p key")
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public())
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdParseError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|e| IdParseError::new("public key", &hex::encode(bytes), e))
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
    pub fn to_peer_id(&self) -> PeerId {
        #[allow(clippy::expect_used)]
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(self.0.as_bytes())
            .expect("a valid ed25519 verifying key is a valid libp2p ed25519 key");
        PeerId::from_public_key(&libp2p_identity::PublicKey::from(key))
    }
    /// Recovers the ed25519 key embedded in a `PeerId` (ed25519 peer ids
    /// inline the public key), so a transport-authenticated peer can be
    /// matched against a signer.
    pub fn from_peer_id(peer: &PeerId) -> Option<Self> {
        let mh = peer.as_ref();
        if mh.code() != 0 {
            return None; // not an identity multihash: the key is not inlined
        }
        let pk = libp2p_identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
        let ed = pk.try_into_ed25519().ok()?;
        Self::from_bytes(&ed.to_bytes()).ok()
    }
    pub(crate) fn verify_raw(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.0.verify(msg, &Signature::from_bytes(sig)).is_ok()
    }
    /// Checks a [`Keypair::sign_record`] signature.
    pub fn verify_record(&self, domain: &str, record: &[u8], sig: &[u8; 64]) -> bool {
        self.verify_raw(&record_bytes(domain, record), sig)
    }
}

fn record_bytes(domain: &str, record: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + record.len());
    m.extend_from_slice(domain.as_bytes());
    m.push(0);
    m.extend_from_slice(record);
    m
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &hex::encode(&self.as_bytes()[..4]))
    }
}

impl FromStr for PublicKey {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|e| {
            IdParseError::new("public key", s, format!("expected 64 hex digits ({e})"))
        })?;
        Self::from_bytes(&b)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.as_bytes().serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?
                .parse()
                .map_err(serde::de::Error::custom)
        } else {
            let b = <[u8; 32]>::deserialize(d)?;
            Self::from_bytes(&b).map_err(serde::de::Error::custom)
        }
    }
}

/// A detached ed25519 signature (hex for humans, raw bytes on the wire).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureBytes(pub [u8; 64]);

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..4]))
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = if d.is_human_readable() {
            hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)?
        } else {
            <Vec<u8>>::deserialize(d)?
        };
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a signature is exactly 64 bytes"))?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libp2p_identity_matches_our_key() {
        let kp = Keypair::generate();
        let peer = kp.to_libp2p().public().to_peer_id();
        assert_eq!(peer, kp.public().to_peer_id());
        assert_eq!(PublicKey::from_peer_id(&peer), Some(kp.public()));
    }
}

/// Key files: 32 secret bytes, hex-encoded, in a file only the owner can read.
pub mod keyfile {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    use super::Keypair;

    /// Why a key file could not be used.
    #[derive(Debug, thiserror::Error)]
    pub enum KeyFileError {
        #[error("cannot read key file {path}: {source}")]
        Read {
            path: String,
            source: std::io::Error,
        },
        #[error("cannot create key file {path}: {source}; check that its directory is writable")]
        Write {
            path: String,
            source: std::io::Error,
        },
        #[error(
            "key file {path} is malformed (expected 64 hex digits); move it aside to create a new identity"
        )]
        Malformed { path: String },
        #[error(
            "key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
        )]
        Permissions { path: String, mode: u32 },
    }

    /// Loads the key at `path`, or creates one (mode 0600, parent 0700) if
    /// the file does not exist. Refuses a key file others can read.
    pub fn load_or_create(path: &Path) -> Result<Keypair, KeyFileError> {
        let p = path.display().to_string();
        match fs::read_to_string(path) {
            Ok(text) => {
                let mode = fs::metadata(path)
                    .map_err(|source| KeyFileError::Read {
                        path: p.clone(),
                        source,
                    })?
                    .permissions()
                    .mode()
                    & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyFileError::Permissions { path: p, mode });
                }
                let mut secret = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut secret)
                    .map_err(|_| KeyFileError::Malformed { path: p })?;
                Ok(Keypair::from_secret_bytes(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let write_err = |source| KeyFileError::Write {
                    path: p.clone(),
                    source,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir).map_err(write_err)?;
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                        .map_err(write_err)?;
                }
                let key = Keypair::generate();
                // create_new: never overwrite a key another process just made.
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(write_err)?;
                f.write_all(hex::encode(key.secret_bytes()).as_bytes())
                    .map_err(write_err)?;
                f.sync_all().map_err(write_err)?;
                Ok(key)
            }
            Err(source) => Err(KeyFileError::Read { path: p, source }),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn creates_0600_and_reloads_same_key() {
            let dir =
                std::env::temp_dir().join(format!("kiln-key-test-{}", crate::ids::JobId::random()));
            let path = dir.join("sub/id.key");
            let k1 = load_or_create(&path).unwrap();
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let k2 = load_or_create(&path).unwrap();
            assert_eq!(k1.public(), k2.public());
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                load_or_create(&path),
                Err(KeyFileError::Permissions { .. })
            ));
            fs::remove_dir_all(dir).unwrap();
        }
    }
}
