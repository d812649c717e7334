//! Which cached blobs this node serves to peers other than the coordinator.
//!
//! The coordinator may fetch anything from a node (outputs, logs); other
//! providers only the blobs this node fetched as job *inputs*, and only when
//! the coordinator says a job entitles them (`handlers/may_fetch.rs`).
//! Those inputs are also what the node advertises as `cached` for
//! data-locality scoring.
//!
//! The set lives in `<state>/shared-cids`, one CID per line, rewritten
//! atomically (temp file, rename) whenever it grows, so a restarted node
//! keeps serving and advertising what it holds. Entries whose blob the cache
//! evicted are dropped at the next rewrite.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_blobs::Store;
use kiln_protocol::ContentId;

/// The set of shareable CIDs and the file that keeps it.
pub struct SharedSet {
    path: PathBuf,
    cids: Mutex<HashSet<ContentId>>,
}

impl SharedSet {
    /// Loads the set from `path` (a missing file is an empty set; a line
    /// that is not a CID is skipped with a warning, never fatal).
    pub fn open(path: &Path) -> Self {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the shared-blob list, starting empty: {e}");
                String::new()
            }
        };
        let mut cids = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match line.parse::<ContentId>() {
                Ok(c) => {
                    cids.insert(c);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n + 1, "skipping a malformed CID: {e}")
                }
            }
        }
        Self {
            path: path.to_path_buf(),
            cids: Mutex::new(cids),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<ContentId>> {
        // Every update leaves the set whole: a poisoned lock is taken over.
        self.cids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether peers may fetch `cid` from here.
    pub fn contains(&self, cid: &ContentId) -> bool {
        self.lock().contains(cid)
    }

    /// Adds `cids` (fetched as inputs), forgets those `store` no longer
    /// holds, and saves the set if it changed. A failed save is logged: the
    /// set in memory still holds, only a restart would forget it.
    pub fn extend(&self, cids: impl IntoIterator<Item = ContentId>, store: &Store) {
        let snapshot = {
            let mut set = self.lock();
            let before = set.len();
            let mut grew = false;
            for c in cids {
                grew |= set.insert(c);
            }
            set.retain(|c| store.has(c));
            if !grew && set.len() == before {
                return;
            }
            let mut v: Vec<ContentId> = set.iter().copied().collect();
            v.sort();
            v
        };
        if let Err(e) = self.save(&snapshot) {
            tracing::warn!(path = %self.path.display(), "could not save the shared-blob list: {e}");
        }
    }

    fn save(&self, cids: &[ContentId]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for c in cids {
            writeln!(f, "{c}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Up to `max` shareable CIDs that `store` holds, sorted (the advert's
    /// `cached` list).
    pub fn held(&self, store: &Store, max: usize) -> Vec<ContentId> {
        let mut v: Vec<ContentId> = self
            .lock()
            .iter()
            .filter(|c| store.has(c))
            .copied()
            .collect();
        v.sort();
        v.truncate(max);
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn survives_a_reopen_skips_bad_lines_and_forgets_evicted_blobs() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&d.path().join("blobs"), Default::default()).unwrap();
        let a = store.import_bytes(b"input a").unwrap();
        let b = store.import_bytes(b"input b").unwrap();
        let path = d.path().join("shared-cids");

        let set = SharedSet::open(&path);
        assert!(!set.contains(&a));
        set.extend([a, b], &store);
        assert!(set.contains(&a) && set.contains(&b));

        // A restart: the same set comes back; a corrupt line is skipped.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not-a-cid\n");
        std::fs::write(&path, text).unwrap();
        let set = SharedSet::open(&path);
        assert!(set.contains(&a) && set.contains(&b));
        assert_eq!(set.held(&store, 10).len(), 2);
        assert_eq!(set.held(&store, 1).len(), 1);

        // b is evicted: it is no longer advertised, and the next save drops it.
        assert!(store.remove(&b).unwrap());
        assert_eq!(set.held(&store, 10), vec![a]);
        let c = store.import_bytes(b"input c").unwrap();
        set.extend([c], &store);
        let set = SharedSet::open(&path);
        assert!(set.contains(&a) && set.contains(&c) && !set.contains(&b));
    }
}
