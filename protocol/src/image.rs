//! Container images as content-addressed data.
//!
//! `kiln image push` takes an image out of the buyer's Docker engine (its
//! `docker save` export) and stores the config and every layer as a raw
//! blob, named by its BLAKE3 CID like any file. The image itself is named
//! by an [`ImageManifest`]: the config and the layers in order, each with
//! its CID, its OCI digest (`sha256:…` of the same bytes, which is what the
//! engine checks) and its size, encoded as canonical DAG-CBOR like a
//! directory [`crate::Manifest`]. A job names it as `image = "kiln:<cid>"`.
//!
//! Two hashes per blob on purpose: the BLAKE3 CID is what the data plane
//! verifies per 16 KiB group as bytes arrive from untrusted peers; the
//! SHA-256 digest ties those bytes to what the OCI config and the engine
//! expect, so a manifest whose CIDs and digests disagree fails before
//! anything reaches the engine.
//!
//! [`DagNode`] tells the two kinds of DAG-CBOR blob apart: a directory and
//! an image both name other blobs ([`DagNode::children`]), which is what
//! access checks and fetches follow.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::content::{ContentId, DAG_CBOR_CODEC, Manifest, ManifestError, RAW_CODEC, cbor};
use crate::ids::IdParseError;

/// Most layers an image may have (Docker's own limit is 127 with overlay2).
pub const MAX_LAYERS: usize = 256;

/// Largest image config (real ones are a few KiB): providers read it into
/// memory to check it before anything reaches their engine.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Largest image manifest (256 layers take about 40 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// An OCI content digest, `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OciDigest(pub [u8; 32]);

impl OciDigest {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for OciDigest {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s
            .strip_prefix("sha256:")
            .ok_or_else(|| IdParseError::new("OCI digest", s, "expected `sha256:<64 hex>`"))?;
        if hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(IdParseError::new(
                "OCI digest",
                s,
                "hex digits must be lowercase",
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|e| {
            IdParseError::new("OCI digest", s, format!("expected 64 hex digits ({e})"))
        })?;
        Ok(Self(out))
    }
}

impl Serialize for OciDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OciDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The platform an image (or an index entry) is for, as OCI documents name it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciPlatform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

impl fmt::Display for OciPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

/// What Kiln reads of an OCI image config: its platform and its layers'
/// uncompressed digests (`rootfs.diff_ids`). Other keys are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct OciConfig {
    #[serde(flatten)]
    pub platform: OciPlatform,
    #[serde(default)]
    pub rootfs: OciRootFs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct OciRootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// One blob of an image: the config or a layer, as exported by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBlob {
    /// BLAKE3 CID (raw codec) of the bytes.
    pub cid: ContentId,
    /// SHA-256 of the same bytes.
    pub digest: OciDigest,
    pub size: u64,
}

/// An image: its config and its layers, bottom first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub config: ImageBlob,
    pub layers: Vec<ImageBlob>,
}

impl ImageManifest {
    /// Checks what the types do not: raw CIDs, a bounded layer count.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |what: String| ManifestError::Encoding(what);
        if self.config.size > MAX_CONFIG_BYTES {
            return Err(bad(format!(
                "a {}-byte config, over the {MAX_CONFIG_BYTES}-byte limit",
                self.config.size
            )));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(bad(format!(
                "{} layers, more than the {MAX_LAYERS} an image may have",
                self.layers.len()
            )));
        }
        for (what, b) in std::iter::once(("config".to_string(), &self.config)).chain(
            self.layers
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("layer {i}"), l)),
        ) {
            if b.cid.codec() != RAW_CODEC {
                return Err(bad(format!("{what} is not a raw blob CID ({})", b.cid)));
            }
        }
        Ok(())
    }

    /// Bytes of the config and every distinct layer (a layer named twice
    /// is stored and moved once).
    pub fn total_size(&self) -> u64 {
        self.blobs()
            .iter()
            .fold(0u64, |t, b| t.saturating_add(b.size))
    }

    /// The config, then each distinct layer in order.
    pub fn blobs(&self) -> Vec<ImageBlob> {
        let mut out = vec![self.config];
        for l in &self.layers {
            if !out.iter().any(|b| b.cid == l.cid) {
                out.push(*l);
            }
        }
        out
    }

    /// The image id an engine gives it: the config's digest.
    pub fn image_id(&self) -> String {
        self.config.digest.to_string()
    }

    /// Canonical DAG-CBOR: `{"kind": "oci-image", "config": blob, "layers":
    /// [blob], "version": 1}` with each blob `{"cid", "size", "digest"}`,
    /// keys in DAG-CBOR order (length first, then bytes), CIDs as tag 42.
    pub fn to_dag_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.layers.len() * 128);
        cbor::head(&mut out, cbor::MAP, 4);
        cbor::text(&mut out, "kind");
        cbor::text(&mut out, "oci-image");
        cbor::text(&mut out, "config");
        blob_cbor(&mut out, &self.config);
        cbor::text(&mut out, "layers");
        cbor::head(&mut out, cbor::ARRAY, self.layers.len() as u64);
        for l in &self.layers {
            blob_cbor(&mut out, l);
        }
        cbor::text(&mut out, "version");
        cbor::head(&mut out, cbor::UINT, 1);
        out
    }

    /// Decodes exactly the form [`Self::to_dag_cbor`] writes (one image,
    /// one CID), and validates it.
    pub fn from_dag_cbor(bytes: &[u8]) -> Result<Self, ManifestError> {
        let bad =
            |what: &str| ManifestError::Encoding(format!("not a Kiln image manifest: {what}"));
        let mut r = cbor::Reader { b: bytes, at: 0 };
        r.expect_head(cbor::MAP, 4)
            .ok_or_else(|| bad("expected a map of 4"))?;
        r.expect_text("kind")
            .ok_or_else(|| bad("expected `kind`"))?;
        r.expect_text("oci-image")
            .ok_or_else(|| bad("kind is not `oci-image`"))?;
        r.expect_text("config")
            .ok_or_else(|| bad("expected `config`"))?;
        let config = read_blob(&mut r).ok_or_else(|| bad("malformed config"))?;
        r.expect_text("layers")
            .ok_or_else(|| bad("expected `layers`"))?;
        let n = r
            .head(cbor::ARRAY)
            .ok_or_else(|| bad("expected a layers array"))?;
        if n > MAX_LAYERS as u64 {
            return Err(bad("too many layers"));
        }
        let mut layers = Vec::with_capacity(n as usize);
        for i in 0..n {
            layers.push(read_blob(&mut r).ok_or_else(|| bad(&format!("layer {i} is malformed")))?);
        }
        r.expect_text("version")
            .ok_or_else(|| bad("expected `version`"))?;
        if r.head(cbor::UINT) != Some(1) {
            return Err(bad("unsupported version"));
        }
        if r.at != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        let m = Self { config, layers };
        m.validate()?;
        if m.to_dag_cbor() != bytes {
            return Err(bad("not in canonical form"));
        }
        Ok(m)
    }

    /// The image's id in Kiln: BLAKE3 of the DAG-CBOR bytes, codec 0x71.
    pub fn cid(&self) -> ContentId {
        ContentId::from_blake3(DAG_CBOR_CODEC, blake3::hash(&self.to_dag_cbor()))
    }
}

fn blob_cbor(out: &mut Vec<u8>, b: &ImageBlob) {
    cbor::head(out, cbor::MAP, 3);
    cbor::text(out, "cid");
    cbor::cid(out, &b.cid.to_bytes());
    cbor::text(out, "size");
    cbor::head(out, cbor::UINT, b.size);
    cbor::text(out, "digest");
    cbor::text(out, &b.digest.to_string());
}

fn read_blob(r: &mut cbor::Reader<'_>) -> Option<ImageBlob> {
    r.expect_head(cbor::MAP, 3)?;
    r.expect_text("cid")?;
    let cid = r.cid()?;
    r.expect_text("size")?;
    let size = r.head(cbor::UINT)?;
    r.expect_text("digest")?;
    let digest = r.text()?.parse().ok()?;
    Some(ImageBlob { cid, digest, size })
}

/// A DAG-CBOR blob Kiln understands: a directory or an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DagNode {
    Directory(Manifest),
    Image(ImageManifest),
}

impl DagNode {
    /// Decodes either kind; the error says what neither accepted.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        match Manifest::from_dag_cbor(bytes) {
            Ok(m) => Ok(Self::Directory(m)),
            Err(dir) => match ImageManifest::from_dag_cbor(bytes) {
                Ok(i) => Ok(Self::Image(i)),
                Err(img) => Err(ManifestError::Encoding(format!(
                    "neither a directory manifest ({dir}) nor an image manifest ({img})"
                ))),
            },
        }
    }

    /// Every blob it names (a directory's files; an image's config and
    /// layers), each once.
    pub fn children(&self) -> Vec<ContentId> {
        match self {
            Self::Directory(m) => m.entries.iter().map(|e| e.cid).collect(),
            Self::Image(i) => i.blobs().iter().map(|b| b.cid).collect(),
        }
    }

    /// Bytes of everything it names.
    pub fn total_size(&self) -> u64 {
        match self {
            Self::Directory(m) => m.total_size(),
            Self::Image(i) => i.total_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8) -> ImageBlob {
        let bytes = vec![n; 10 + usize::from(n)];
        ImageBlob {
            cid: ContentId::of_bytes(&bytes),
            digest: OciDigest([n; 32]),
            size: bytes.len() as u64,
        }
    }

    fn image() -> ImageManifest {
        ImageManifest {
            config: blob(1),
            layers: vec![blob(2), blob(3), blob(2)],
        }
    }

    #[test]
    fn round_trips_canonically() {
        let m = image();
        let bytes = m.to_dag_cbor();
        assert_eq!(ImageManifest::from_dag_cbor(&bytes).unwrap(), m);
        assert_eq!(m.cid().codec(), DAG_CBOR_CODEC);
        assert_eq!(DagNode::decode(&bytes).unwrap(), DagNode::Image(m.clone()));
        // A layer named twice is one blob.
        assert_eq!(m.blobs().len(), 3);
        assert_eq!(m.total_size(), 11 + 12 + 13);
        assert_eq!(m.image_id(), format!("sha256:{}", "01".repeat(32)));
    }

    #[test]
    fn a_directory_is_not_an_image_and_back() {
        let dir = Manifest::new(vec![crate::ManifestEntry {
            path: "a".into(),
            cid: ContentId::of_bytes(b"a"),
            size: 1,
            executable: false,
        }])
        .unwrap();
        let bytes = dir.to_dag_cbor();
        assert!(ImageManifest::from_dag_cbor(&bytes).is_err());
        assert!(matches!(DagNode::decode(&bytes), Ok(DagNode::Directory(_))));
        assert!(Manifest::from_dag_cbor(&image().to_dag_cbor()).is_err());
        let e = DagNode::decode(b"\xa0").unwrap_err().to_string();
        assert!(e.contains("neither"), "{e}");
    }

    #[test]
    fn refuses_what_it_would_not_write() {
        let good = image().to_dag_cbor();
        // Every strict prefix and one trailing byte.
        for n in 0..good.len() {
            assert!(
                ImageManifest::from_dag_cbor(&good[..n]).is_err(),
                "prefix {n}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(ImageManifest::from_dag_cbor(&long).is_err());
        // An uppercase digest (same bytes, another string) is not canonical.
        let text = String::from_utf8_lossy(&good).into_owned();
        assert!(text.contains("sha256:0101"));
        let upper = good.windows(11).position(|w| w == b"sha256:0101").unwrap();
        let mut bad = good.clone();
        bad[upper + 7] = b'A';
        assert!(ImageManifest::from_dag_cbor(&bad).is_err());
        // A config too large to check in memory is refused.
        let mut m = image();
        m.config.size = MAX_CONFIG_BYTES + 1;
        assert!(ImageManifest::from_dag_cbor(&m.to_dag_cbor()).is_err());
        // A layer that is itself a manifest CID is refused.
        let mut m = image();
        m.layers[0].cid = m.cid();
        assert!(ImageManifest::from_dag_cbor(&m.to_dag_cbor()).is_err());
    }

    #[test]
    fn digests_parse_strictly() {
        let d: OciDigest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(d.to_string(), format!("sha256:{}", "ab".repeat(32)));
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha256:{}", "ab".repeat(31)),
        ] {
            assert!(bad.parse::<OciDigest>().is_err(), "{bad}");
        }
    }
}
