//! The coordinator's blob store: files named by CID under one directory.
//!
//! Writes are atomic: bytes are verified against their CID, written to a
//! temporary file, synced, then renamed into place, so a partial or wrong
//! blob is never visible under a CID.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_protocol::ContentId;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("bytes hash to {got}, not {want}")]
    Mismatch { want: ContentId, got: ContentId },
    #[error("blob store I/O error at {path}: {source}; check free disk space and permissions")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        for d in [dir.to_path_buf(), dir.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(|source| BlobError::Io {
                path: d.display().to_string(),
                source,
            })?;
        }
        // Leftover temporaries from a crash are never valid blobs.
        if let Ok(entries) = std::fs::read_dir(dir.join("tmp")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, cid: &ContentId) -> PathBuf {
        self.dir.join(cid.to_string())
    }

    pub fn contains(&self, cid: &ContentId) -> bool {
        self.path(cid).is_file()
    }

    /// Stores `bytes` under `cid` after checking that they hash to it.
    pub fn put(&self, cid: &ContentId, bytes: &[u8]) -> Result<(), BlobError> {
        let got = ContentId::of_bytes(bytes);
        if got != *cid {
            return Err(BlobError::Mismatch { want: *cid, got });
        }
        let dest = self.path(cid);
        if dest.is_file() {
            return Ok(());
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{cid}.{}", kiln_protocol::Nonce::random()));
        let io = |source| BlobError::Io {
            path: tmp.display().to_string(),
            source,
        };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &dest).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            BlobError::Io {
                path: dest.display().to_string(),
                source,
            }
        })
    }

    /// Reads a blob and re-verifies it (disk corruption is caught, not served).
    pub fn get(&self, cid: &ContentId) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(cid);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let got = ContentId::of_bytes(&bytes);
                if got != *cid {
                    return Err(BlobError::Mismatch { want: *cid, got });
                }
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_verifies_and_get_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let cid = ContentId::of_bytes(b"abc");
        assert!(matches!(
            s.put(&cid, b"abd"),
            Err(BlobError::Mismatch { .. })
        ));
        assert!(!s.contains(&cid));
        s.put(&cid, b"abc").unwrap();
        assert_eq!(s.get(&cid).unwrap().unwrap(), b"abc");
        std::fs::write(d.path().join(cid.to_string()), b"xyz").unwrap();
        assert!(s.get(&cid).is_err(), "a corrupted blob on disk is refused");
    }
}
