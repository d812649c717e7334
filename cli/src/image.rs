//! `kiln image push`: a container image from the buyer's Docker engine to
//! content-addressed blobs on the coordinator.
//!
//! The engine's export (`docker save`, through its API) is read as it
//! streams: each file the archive's `manifest.json` names (the config and
//! the layers) is spooled to a temporary directory while its BLAKE3 CID and
//! SHA-256 digest are computed in the same pass. The image is then described
//! by a [`kiln_protocol::ImageManifest`] (config and layers in order, each
//! with CID, OCI digest and size), and only the blobs the coordinator lacks
//! for this buyer are uploaded, then the manifest itself. Its CID is the
//! image's name in jobs: `image = "kiln:<cid>"`.
//!
//! Both archive layouts engines write are read: the classic one
//! (`<id>/layer.tar`, where a layer repeated in the image is a symlink to
//! the first copy) and the OCI one (`blobs/sha256/<hex>`), through the
//! `manifest.json` that both carry.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use kiln_protocol::{ContentId, ImageBlob, ImageManifest, OciDigest};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::client::Client;
use crate::data::{Progress, upload_file};

/// What `kiln image push` did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The image manifest's CID.
    pub cid: ContentId,
    /// What a job names: `kiln:<cid>`.
    pub image: String,
    /// The engine's id of the image (its config digest).
    pub image_id: String,
    /// `os/architecture` from its config.
    pub platform: String,
    pub layers: usize,
    /// Bytes of the config and every distinct layer.
    pub size: u64,
    pub uploaded_bytes: u64,
    pub skipped_bytes: u64,
    pub elapsed_ms: u64,
}

/// One entry of the export's `manifest.json`.
#[derive(Deserialize)]
struct SavedImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A file of the export, spooled and hashed.
struct Spooled {
    path: PathBuf,
    blob: ImageBlob,
}

/// What reading the export found: files by archive path, symlinks, and the
/// index.
#[derive(Default)]
struct Export {
    files: HashMap<String, Spooled>,
    links: HashMap<String, String>,
    index: Option<Vec<u8>>,
}

/// Most bytes of `manifest.json` (an index of a few names per image).
const MAX_INDEX: u64 = 1 << 20;

/// Reads an engine export from `reader`, spooling every regular file into
/// `spool` while hashing it.
fn read_export(reader: impl Read, spool: &Path, progress: &Progress) -> anyhow::Result<Export> {
    let mut archive = tar::Archive::new(reader);
    let mut out = Export::default();
    let entries = archive
        .entries()
        .context("the engine's export is not a tar archive")?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.context("the engine's export is truncated or corrupt")?;
        let name = entry
            .path()
            .context("an export entry has an unreadable name")?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            if let Some(target) = entry.link_name().ok().flatten() {
                out.links
                    .insert(name, target.to_string_lossy().into_owned());
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        if name == "manifest.json" {
            let mut b = Vec::new();
            entry
                .by_ref()
                .take(MAX_INDEX)
                .read_to_end(&mut b)
                .context("reading the export's manifest.json")?;
            out.index = Some(b);
            continue;
        }
        let path = spool.join(n.to_string());
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write the spool file {}", path.display()))?;
        let mut b3 = blake3::Hasher::new();
        let mut sha = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let k = entry
                .read(&mut buf)
                .with_context(|| format!("reading {name} from the export"))?;
            if k == 0 {
                break;
            }
            b3.update(&buf[..k]);
            sha.update(&buf[..k]);
            f.write_all(&buf[..k])
                .with_context(|| format!("cannot write the spool file {}", path.display()))?;
            size += k as u64;
            progress.add(k as u64);
        }
        let blob = ImageBlob {
            cid: ContentId::from_blake3(kiln_protocol::content::RAW_CODEC, b3.finalize()),
            digest: OciDigest(sha.finalize().into()),
            size,
        };
        out.files.insert(name, Spooled { path, blob });
    }
    Ok(out)
}

/// The archive path `name` resolves to, following symlinks (relative to
/// the link's directory, as `docker save` writes them).
fn resolve<'a>(export: &'a Export, name: &str) -> Option<&'a Spooled> {
    let mut name = name.trim_start_matches("./").to_string();
    for _ in 0..8 {
        if let Some(f) = export.files.get(&name) {
            return Some(f);
        }
        let target = export.links.get(&name)?;
        let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
        name = normalize(&dir.join(target));
    }
    None
}

/// `a/../b/./c` → `b/c`.
fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

/// Describes the exported image: its config and layers, in order.
fn describe(export: &Export) -> anyhow::Result<(ImageManifest, Vec<&Spooled>)> {
    let index = export
        .index
        .as_ref()
        .context("the engine's export has no manifest.json; is this a Docker image?")?;
    let saved: Vec<SavedImage> =
        serde_json::from_slice(index).context("the export's manifest.json is not valid")?;
    let [image] = &saved[..] else {
        bail!(
            "the export holds {} images; push one at a time",
            saved.len()
        );
    };
    let find = |name: &str| {
        resolve(export, name)
            .with_context(|| format!("the export lacks {name}, which its manifest.json names"))
    };
    let config = find(&image.config)?;
    let mut files = vec![config];
    let mut layers = Vec::new();
    for l in &image.layers {
        let f = find(l)?;
        layers.push(f.blob);
        if !files.iter().any(|x| x.blob.cid == f.blob.cid) {
            files.push(f);
        }
    }
    let m = ImageManifest {
        config: config.blob,
        layers,
    };
    m.validate().context("the image cannot be described")?;
    Ok((m, files))
}

/// `os/architecture` of the image config at `path` (`?/?` if unreadable).
fn platform_of(path: &Path) -> String {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<kiln_protocol::OciConfig>(&b).ok())
        .map_or_else(|| "?/?".into(), |c| c.platform.to_string())
}

/// `kiln image push <image>`: exports `image` from the local engine and
/// uploads what the coordinator lacks.
pub async fn push(client: &Client, image: &str, show_progress: bool) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let docker = kiln_docker::connect().await?;
    let inspect = docker.inspect_image(image).await.with_context(|| {
        format!("image {image} is not in your Docker engine (`docker image ls` lists what is)")
    })?;
    let size_hint = inspect
        .size
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    let spool = tempfile::Builder::new()
        .prefix("kiln-image-")
        .tempdir()
        .context("cannot make a spool directory (set TMPDIR to a disk with room)")?;
    let reading = Progress::new(format!("reading {image}"), size_hint, show_progress);
    let stream = docker.export_image(image).map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let dir = spool.path().to_path_buf();
    let p = reading.clone();
    let export = tokio::task::spawn_blocking(move || read_export(reader, &dir, &p))
        .await
        .context("reading the export stopped")?
        .with_context(|| format!("exporting {image} from the engine"))?;
    reading.finish();
    let (manifest, files) = describe(&export)?;
    let platform = platform_of(&files[0].path);
    if platform != "linux/amd64" {
        eprintln!(
            "warning: {image} is for {platform}; providers run linux/amd64 and will refuse it \
             (build it with `docker build --platform linux/amd64`)"
        );
    }
    let cid = manifest.cid();
    let mut cids: Vec<ContentId> = files.iter().map(|f| f.blob.cid).collect();
    cids.push(cid);
    let missing: std::collections::HashSet<ContentId> =
        client.missing(&cids).await?.into_iter().collect();
    let to_send: Vec<&&Spooled> = files
        .iter()
        .filter(|f| missing.contains(&f.blob.cid))
        .collect();
    let upload_total: u64 = to_send.iter().map(|f| f.blob.size).sum();
    let progress = Progress::new(format!("uploading {image}"), upload_total, show_progress);
    for f in &to_send {
        upload_file(
            client,
            &f.path,
            &f.blob.cid,
            f.blob.size,
            &format!("{image} {}", f.blob.digest),
            &progress,
        )
        .await?;
    }
    if missing.contains(&cid) {
        let bytes = manifest.to_dag_cbor();
        client
            .put_blob(&cid, bytes.len() as u64, image, reqwest::Body::from(bytes))
            .await
            .context("uploading the image manifest")?;
    }
    progress.finish();
    let size = manifest.total_size();
    Ok(PushReport {
        cid,
        image: format!("{}{cid}", kiln_protocol::spec::KILN_IMAGE_PREFIX),
        image_id: manifest.image_id(),
        platform,
        layers: manifest.layers.len(),
        size,
        uploaded_bytes: upload_total,
        skipped_bytes: size.saturating_sub(upload_total),
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// The `kiln-node` binary beside the running `kiln` (as a release build or
/// a package installs them), else the first on `PATH`.
pub fn find_kiln_node() -> anyhow::Result<std::path::PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kiln-node")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kiln-node"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no kiln-node binary beside this kiln or on PATH: build it (`cargo build --release -p kiln-node`) or pass --kiln-node PATH"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        for (name, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn reads_a_classic_export_with_a_repeated_layer() {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let index = br#"[{"Config":"abc.json","RepoTags":["x:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
        let bytes = tar_of(
            &[
                ("abc.json", config),
                ("l1/layer.tar", b"layer one"),
                ("manifest.json", index),
            ],
            &[("l2/layer.tar", "../l1/layer.tar")],
        );
        let dir = tempfile::tempdir().unwrap();
        let export = read_export(&bytes[..], dir.path(), &Progress::new("", 0, false)).unwrap();
        let (m, files) = describe(&export).unwrap();
        assert_eq!(m.config.cid, ContentId::of_bytes(config));
        assert_eq!(
            m.config.digest,
            OciDigest(sha2::Sha256::digest(config).into())
        );
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[0], m.layers[1]);
        assert_eq!(m.layers[0].cid, ContentId::of_bytes(b"layer one"));
        // The repeated layer is one file to upload.
        assert_eq!(files.len(), 2);
        assert_eq!(platform_of(&files[0].path), "linux/amd64");
        assert_eq!(std::fs::read(&files[1].path).unwrap(), b"layer one");
    }

    #[test]
    fn a_broken_export_names_what_is_missing() {
        let index = br#"[{"Config":"abc.json","RepoTags":[],"Layers":["gone/layer.tar"]}]"#;
        let bytes = tar_of(&[("abc.json", b"{}"), ("manifest.json", index)], &[]);
        let dir = tempfile::tempdir().unwrap();
        let export = read_export(&bytes[..], dir.path(), &Progress::new("", 0, false)).unwrap();
        let e = describe(&export).err().unwrap().to_string();
        assert!(e.contains("gone/layer.tar"), "{e}");
        let none = read_export(
            &tar_of(&[], &[])[..],
            dir.path(),
            &Progress::new("", 0, false),
        )
        .unwrap();
        assert!(
            describe(&none)
                .err()
                .unwrap()
                .to_string()
                .contains("manifest.json")
        );
    }
}
