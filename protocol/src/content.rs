//! Content addressing.
//!
//! A file is named by a CIDv1 with the `raw` codec (0x55) and a BLAKE3
//! multihash (0x1e): its digest is exactly what `b3sum` prints for the bytes.
//! A directory is named by a [`Manifest`]: the sorted list of its files
//! (path, CID, size, executable bit) encoded as canonical DAG-CBOR (codec
//! 0x71) and hashed with BLAKE3, so standard IPLD tooling can decode it.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use multihash::Multihash;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::IdParseError;

pub const RAW_CODEC: u64 = 0x55;
pub const DAG_CBOR_CODEC: u64 = 0x71;
pub const BLAKE3_MULTIHASH: u64 = 0x1e;

/// A CIDv1 with a BLAKE3-256 multihash and the raw or DAG-CBOR codec.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId(Cid);

impl ContentId {
    /// The id of a file's bytes.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::from_blake3(RAW_CODEC, blake3::hash(bytes))
    }

    /// The id (with `codec`) and length of everything `reader` yields,
    /// hashed as it streams (as `b3sum` would), in 1 MiB reads.
    pub fn of_reader(codec: u64, mut reader: impl std::io::Read) -> std::io::Result<(Self, u64)> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok((Self::from_blake3(codec, h.finalize()), n)),
                Ok(k) => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The id of bytes whose BLAKE3 hash is already known (streamed hashing).
    pub fn from_blake3(codec: u64, hash: blake3::Hash) -> Self {
        #[allow(clippy::expect_used)]
        let mh = Multihash::<64>::wrap(BLAKE3_MULTIHASH, hash.as_bytes())
            .expect("a 32-byte digest always fits a 64-byte multihash");
        Self(Cid::new_v1(codec, mh))
    }

    pub fn codec(&self) -> u64 {
        self.0.codec()
    }

    /// The BLAKE3 digest: equal to `b3sum` of the bytes for a raw CID.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.hash().digest());
        out
    }

    /// Whether `bytes` are the content this id names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes).as_bytes() == &self.digest()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// The last 8 characters of the string form, for logs.
    pub fn short(&self) -> String {
        let s = self.to_string();
        s[s.len().saturating_sub(8)..].to_string()
    }

    fn check(cid: Cid, input: &str) -> Result<Self, IdParseError> {
        if cid.version() != cid::Version::V1 {
            return Err(IdParseError::new(
                "content id",
                input,
                "only CIDv1 is accepted",
            ));
        }
        if cid.hash().code() != BLAKE3_MULTIHASH || cid.hash().size() != 32 {
            return Err(IdParseError::new(
                "content id",
                input,
                "the multihash must be blake3-256 (0x1e); compute it with `kiln data add` or b3sum",
            ));
        }
        if cid.codec() != RAW_CODEC && cid.codec() != DAG_CBOR_CODEC {
            return Err(IdParseError::new(
                "content id",
                input,
                format!(
                    "codec 0x{:x} is not raw (0x55) or dag-cbor (0x71)",
                    cid.codec()
                ),
            ));
        }
        Ok(Self(cid))
    }

    pub fn from_cid_bytes(bytes: &[u8]) -> Result<Self, IdParseError> {
        let cid = Cid::try_from(bytes)
            .map_err(|e| IdParseError::new("content id", &hex::encode(bytes), e))?;
        Self::check(cid, &hex::encode(bytes))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId(..{})", self.short())
    }
}

impl FromStr for ContentId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let cid = Cid::try_from(s).map_err(|e| IdParseError::new("content id", s, e))?;
        Self::check(cid, s)
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.0.to_bytes())
        }
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?
                .parse()
                .map_err(serde::de::Error::custom)
        } else {
            let b = <Vec<u8>>::deserialize(d)?;
            Self::from_cid_bytes(&b).map_err(serde::de::Error::custom)
        }
    }
}

/// One file of a directory manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative path with `/` separators, no `.`/`..` components.
    pub path: String,
    pub cid: ContentId,
    pub size: u64,
    pub executable: bool,
}

/// A directory: its files, sorted by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

/// Why a manifest is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error(
        "manifest path `{0}` is not a clean relative path (no leading `/`, no `.` or `..`, no empty components)"
    )]
    BadPath(String),
    #[error("manifest lists `{0}` twice")]
    Duplicate(String),
    #[error("not a Kiln directory manifest: {0}")]
    Encoding(String),
}

/// Checks one relative path for the manifest rules.
pub fn check_relative_path(path: &str) -> Result<(), ManifestError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.contains('\\')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(ManifestError::BadPath(path.to_string()))
    } else {
        Ok(())
    }
}

impl Manifest {
    /// Builds a manifest, sorting entries and rejecting unsafe or duplicate paths.
    pub fn new(mut entries: Vec<ManifestEntry>) -> Result<Self, ManifestError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for e in &entries {
            check_relative_path(&e.path)?;
        }
        if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(ManifestError::Duplicate(w[0].path.clone()));
        }
        Ok(Self { entries })
    }

    /// Re-checks an untrusted manifest (e.g. received over the network).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let sorted = Self::new(self.entries.clone())?;
        if sorted.entries != self.entries {
            return Err(ManifestError::BadPath(
                "<entries not sorted by path>".into(),
            ));
        }
        Ok(())
    }

    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Canonical DAG-CBOR: `{"entries": [{"cid", "path", "size", "executable"}], "version": 1}`
    /// with map keys in DAG-CBOR order (length first, then bytes) and CIDs as tag 42.
    pub fn to_dag_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 96);
        cbor::head(&mut out, cbor::MAP, 2);
        cbor::text(&mut out, "entries");
        cbor::head(&mut out, cbor::ARRAY, self.entries.len() as u64);
        for e in &self.entries {
            cbor::head(&mut out, cbor::MAP, 4);
            cbor::text(&mut out, "cid");
            cbor::cid(&mut out, &e.cid.to_bytes());
            cbor::text(&mut out, "path");
            cbor::text(&mut out, &e.path);
            cbor::text(&mut out, "size");
            cbor::head(&mut out, cbor::UINT, e.size);
            cbor::text(&mut out, "executable");
            out.push(if e.executable { 0xf5 } else { 0xf4 });
        }
        cbor::text(&mut out, "version");
        cbor::head(&mut out, cbor::UINT, 1);
        out
    }

    /// Decodes the canonical DAG-CBOR form written by [`Self::to_dag_cbor`]
    /// (and nothing else: any other encoding of the same data is refused, so
    /// one directory has exactly one CID). Paths are checked as in [`Self::new`].
    pub fn from_dag_cbor(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = cbor::Reader { b: bytes, at: 0 };
        let bad = |what: &str| ManifestError::Encoding(what.to_string());
        r.expect_head(cbor::MAP, 2)
            .ok_or_else(|| bad("expected a map of 2"))?;
        r.expect_text("entries")
            .ok_or_else(|| bad("expected `entries`"))?;
        let n = r
            .head(cbor::ARRAY)
            .ok_or_else(|| bad("expected an entries array"))?;
        // Each entry takes at least 30 bytes: a cheap bound before allocating.
        if n > (bytes.len() as u64) / 30 + 1 {
            return Err(bad("entry count larger than the bytes allow"));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for i in 0..n {
            let e = (|| {
                r.expect_head(cbor::MAP, 4)?;
                r.expect_text("cid")?;
                let cid = r.cid()?;
                r.expect_text("path")?;
                let path = r.text()?;
                r.expect_text("size")?;
                let size = r.head(cbor::UINT)?;
                r.expect_text("executable")?;
                let executable = match r.byte()? {
                    0xf5 => true,
                    0xf4 => false,
                    _ => return None,
                };
                Some(ManifestEntry {
                    path,
                    cid,
                    size,
                    executable,
                })
            })()
            .ok_or_else(|| ManifestError::Encoding(format!("entry {i} is malformed")))?;
            entries.push(e);
        }
        r.expect_text("version")
            .ok_or_else(|| bad("expected `version`"))?;
        if r.head(cbor::UINT) != Some(1) {
            return Err(bad("unsupported manifest version"));
        }
        if r.at != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        let m = Self { entries };
        m.validate()?;
        if m.to_dag_cbor() != bytes {
            return Err(bad("not in canonical form"));
        }
        Ok(m)
    }

    /// The directory's id: BLAKE3 of the DAG-CBOR bytes, codec 0x71.
    pub fn cid(&self) -> ContentId {
        ContentId::from_blake3(DAG_CBOR_CODEC, blake3::hash(&self.to_dag_cbor()))
    }
}

/// The few canonical CBOR primitives a manifest needs.
pub(crate) mod cbor {
    pub const UINT: u8 = 0;
    pub const BYTES: u8 = 2;
    pub const TEXT: u8 = 3;
    pub const ARRAY: u8 = 4;
    pub const MAP: u8 = 5;

    /// A major type with its argument in the shortest form (DAG-CBOR requires it).
    pub fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => out.push(m | n as u8),
            24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    pub fn text(out: &mut Vec<u8>, s: &str) {
        head(out, TEXT, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    /// A strict reader of the primitives above (shortest-form heads only).
    pub struct Reader<'a> {
        pub b: &'a [u8],
        pub at: usize,
    }

    impl Reader<'_> {
        pub fn byte(&mut self) -> Option<u8> {
            let v = *self.b.get(self.at)?;
            self.at += 1;
            Some(v)
        }

        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let end = self.at.checked_add(n)?;
            let s = self.b.get(self.at..end)?;
            self.at = end;
            Some(s)
        }

        /// The argument of a head of major type `major`.
        pub fn head(&mut self, major: u8) -> Option<u64> {
            let h = self.byte()?;
            if h >> 5 != major {
                return None;
            }
            let n = match h & 0x1f {
                n @ 0..=23 => u64::from(n),
                24 => u64::from(self.byte()?),
                25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
                26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
                27 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
                _ => return None,
            };
            Some(n)
        }

        pub fn expect_head(&mut self, major: u8, n: u64) -> Option<()> {
            (self.head(major)? == n).then_some(())
        }

        pub fn text(&mut self) -> Option<String> {
            let n = usize::try_from(self.head(TEXT)?).ok()?;
            String::from_utf8(self.take(n)?.to_vec()).ok()
        }

        pub fn expect_text(&mut self, want: &str) -> Option<()> {
            (self.text()? == want).then_some(())
        }

        pub fn cid(&mut self) -> Option<super::ContentId> {
            if self.take(2)? != [0xd8, 42] {
                return None;
            }
            let n = usize::try_from(self.head(BYTES)?).ok()?;
            let b = self.take(n)?;
            let (&prefix, cid) = b.split_first()?;
            if prefix != 0 {
                return None;
            }
            super::ContentId::from_cid_bytes(cid).ok()
        }
    }

    /// Tag 42 around a byte string of the multibase-identity prefix and the CID.
    pub fn cid(out: &mut Vec<u8>, cid: &[u8]) {
        out.extend_from_slice(&[0xd8, 42]);
        head(out, BYTES, cid.len() as u64 + 1);
        out.push(0);
        out.extend_from_slice(cid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_cid_digest_is_blake3_of_bytes() {
        let data = b"hello kiln\n";
        let c = ContentId::of_bytes(data);
        assert_eq!(c.digest(), *blake3::hash(data).as_bytes());
        assert_eq!(c.codec(), RAW_CODEC);
        // Pinned vectors, computed independently (Python `blake3` + RFC 4648
        // base32 of 0x01 0x55 0x1e 0x20 ‖ digest): `b3sum` prints the digest.
        assert_eq!(
            hex::encode(c.digest()),
            "b65fd6ec1ffadd33dd5af826361607f346199e0d75ef2ac8de151b976552d887"
        );
        assert_eq!(
            c.to_string(),
            "bafkr4ifwl7loyh723uz52wxyey3bmb7tiymz4dlv54vmrxqvdolwkuwyq4"
        );
        assert_eq!(c.to_string().parse::<ContentId>().unwrap(), c);
        assert!(c.matches(data));
        assert!(!c.matches(b"hello kiln"));
    }

    #[test]
    fn rejects_other_hashes_and_versions() {
        // CIDv0 (sha2-256) and a sha2-256 CIDv1.
        assert!(
            "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
                .parse::<ContentId>()
                .is_err()
        );
        let e = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
            .parse::<ContentId>()
            .unwrap_err();
        assert!(e.to_string().contains("blake3"), "{e}");
    }

    #[test]
    fn a_streamed_id_equals_the_id_of_the_bytes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (cid, n) = ContentId::of_reader(RAW_CODEC, &data[..]).unwrap();
        assert_eq!((cid, n), (ContentId::of_bytes(&data), data.len() as u64));
        let (cid, _) = ContentId::of_reader(DAG_CBOR_CODEC, &data[..]).unwrap();
        assert_eq!(cid.codec(), DAG_CBOR_CODEC);
        assert_eq!(cid.digest(), *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn manifest_decodes_only_its_canonical_safe_form() {
        let f = |p: &str, exe| ManifestEntry {
            path: p.into(),
            cid: ContentId::of_bytes(p.as_bytes()),
            size: 70_000 * p.len() as u64,
            executable: exe,
        };
        let m = Manifest::new(vec![f("b.txt", true), f("a/x.bin", false)]).unwrap();
        let bytes = m.to_dag_cbor();
        assert_eq!(Manifest::from_dag_cbor(&bytes).unwrap(), m);
        assert_eq!(
            Manifest::from_dag_cbor(&Manifest::default().to_dag_cbor()).unwrap(),
            Manifest::default()
        );
        // Unsafe paths and duplicates are refused even when well encoded.
        for (entries, want) in [
            (vec![f("../x", false)], "BadPath"),
            (vec![f("/etc/passwd", false)], "BadPath"),
            (vec![f("a", false), f("a", false)], "Duplicate"),
            (vec![f("b", false), f("a", false)], "BadPath"),
        ] {
            let raw = Manifest { entries }.to_dag_cbor();
            let e = Manifest::from_dag_cbor(&raw).unwrap_err();
            assert!(format!("{e:?}").starts_with(want), "{e:?}");
        }
        // Truncated, trailing and non-shortest encodings are refused.
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(Manifest::from_dag_cbor(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Manifest::from_dag_cbor(&trailing).is_err());
        let mut long = bytes.clone();
        let at = long.len() - 1; // `version: 1` as a one-byte argument
        long.splice(at.., [0x18, 0x01]);
        assert!(Manifest::from_dag_cbor(&long).is_err());
        assert!(Manifest::from_dag_cbor(b"hello").is_err());
    }

    #[test]
    fn manifest_is_sorted_checked_and_stable() {
        let f = |p: &str| ManifestEntry {
            path: p.into(),
            cid: ContentId::of_bytes(p.as_bytes()),
            size: p.len() as u64,
            executable: false,
        };
        let m = Manifest::new(vec![f("b.txt"), f("a/x.bin")]).unwrap();
        assert_eq!(m.entries[0].path, "a/x.bin");
        assert_eq!(m.cid().codec(), DAG_CBOR_CODEC);
        assert_eq!(
            m.cid(),
            Manifest::new(vec![f("a/x.bin"), f("b.txt")]).unwrap().cid()
        );
        for bad in ["../x", "/etc/passwd", "a/../b", "a//b", "./a", ""] {
            assert!(
                matches!(Manifest::new(vec![f(bad)]), Err(ManifestError::BadPath(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Manifest::new(vec![f("a"), f("a")]),
            Err(ManifestError::Duplicate(_))
        ));
        // Empty manifest: {"entries": [], "version": 1}
        assert_eq!(
            Manifest::default().to_dag_cbor(),
            [
                &[0xa2, 0x67][..],
                b"entries",
                &[0x80, 0x67],
                b"version",
                &[0x01]
            ]
            .concat()
        );
    }
}
