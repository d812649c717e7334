//! Kiln's GPU workload image: `kiln-node gemm` (a deterministic FP32 matrix
//! product on the GPU, see `kiln_node::bench::gemm_job`) in an image built
//! here with no registry: `FROM scratch` plus the `kiln-node` binary and the
//! shared libraries it links (the dynamic loader, glibc), copied from this
//! machine. The CUDA driver is *not* in the image: the provider maps its own
//! driver libraries and the job's GPU device nodes in (`kiln_node::
//! gpu_access`), exactly as for any buyer's CUDA image.
//!
//! The tag is content-addressed: `kiln-gpu-workload:<16 hex of the BLAKE3
//! of every file>`, so a rebuilt binary makes a new image and an unchanged
//! one is reused.

use std::path::{Path, PathBuf};

use bollard::Docker;

use crate::{DockerError, WORKLOAD_USER, WorkloadImage, image_exists, tar};

/// Repository of the GPU workload image's tags.
pub const GPU_WORKLOAD_REPO: &str = "kiln-gpu-workload";

/// Where the binary sits in the image.
pub const GPU_WORKLOAD_PATH: &str = "/usr/local/bin/kiln-node";

fn unexpected(op: impl Into<String>, message: impl ToString) -> DockerError {
    DockerError::Unexpected {
        op: op.into(),
        message: message.to_string(),
    }
}

/// The shared objects `binary` needs, as `ldd` resolves them on this
/// machine: `(path in the image, file on this machine)`, the dynamic loader
/// first. Each is stored under the name the binary or loader asks for, with
/// the bytes of the file it resolves to (symlinks followed).
pub fn shared_objects(binary: &Path) -> Result<Vec<(String, PathBuf)>, DockerError> {
    let op = || format!("list the libraries of {} (ldd)", binary.display());
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| unexpected(op(), format!("{e}: install libc-bin (it provides ldd)")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Err(unexpected(
            op(),
            format!(
                "{}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    parse_ldd(&text).map_err(|m| unexpected(op(), m))
}

/// Parses `ldd` output (see [`shared_objects`]).
pub fn parse_ldd(text: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut loader = None;
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("linux-vdso") {
            continue;
        }
        if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split(" (").next().unwrap_or("").trim();
            if path == "not found" || path.is_empty() {
                return Err(format!("{name} is not found on this machine"));
            }
            libs.push((path.to_string(), PathBuf::from(path)));
        } else if let Some(path) = line.split(" (").next().filter(|p| p.starts_with('/')) {
            loader = Some((path.to_string(), PathBuf::from(path)));
        } else {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    let loader = loader.ok_or("no dynamic loader (a static binary needs no image of this kind)")?;
    Ok(std::iter::once(loader).chain(libs).collect())
}

/// Builds (or reuses) the GPU workload image from the `kiln-node` binary
/// at `node_binary`.
pub async fn build_gpu_workload_image(
    docker: &Docker,
    node_binary: &Path,
) -> Result<WorkloadImage, DockerError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| unexpected(format!("read {}", p.display()), e));
    let mut files: Vec<(String, Vec<u8>)> = vec![(GPU_WORKLOAD_PATH.into(), read(node_binary)?)];
    for (in_image, on_host) in shared_objects(node_binary)? {
        files.push((in_image, read(&on_host)?));
    }
    let mut h = blake3::Hasher::new();
    for (path, bytes) in &files {
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let digest = h.finalize().to_hex();
    let tag = format!("{GPU_WORKLOAD_REPO}:{}", &digest[..16]);
    if let Some(id) = image_exists(docker, &tag).await? {
        return Ok(WorkloadImage { id, tag });
    }
    let bad = |e: tar::TarError| unexpected(format!("make the build context of {tag}"), e);
    let dockerfile = format!(
        "FROM scratch\n\
         LABEL io.kiln.gpu-workload.blake3=\"{digest}\"\n\
         COPY rootfs/ /\n\
         USER {WORKLOAD_USER}\n\
         ENTRYPOINT [\"{GPU_WORKLOAD_PATH}\", \"gemm\"]\n\
         CMD [\"4096\", \"42\"]\n"
    );
    let mut t = tar::TarBuilder::new();
    t.add_file("Dockerfile", 0o644, dockerfile.as_bytes())
        .map_err(bad)?;
    for (path, bytes) in &files {
        t.add_file(&format!("rootfs{path}"), 0o755, bytes)
            .map_err(bad)?;
    }
    tracing::info!(%tag, files = files.len(), "building the GPU workload image");
    let id = crate::build_from_context(docker, &tag, t.finish()).await?;
    Ok(WorkloadImage { id, tag })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_becomes_the_loader_then_each_library() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        let got = parse_ldd(text).unwrap();
        let names: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
        let missing = "\tlibcuda.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        assert!(parse_ldd(missing).unwrap_err().contains("libcuda.so.1"));
        assert!(parse_ldd("\tstatically linked\n").is_err());
    }
}
