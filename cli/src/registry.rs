//! A real container registry on loopback, for the image tests and
//! `kiln bench image`: Debian's `docker-registry` (the CNCF distribution
//! server), started on a free port with its storage in a temporary
//! directory. The Docker engine pushes to and pulls from loopback
//! registries over plain HTTP without configuration.

use anyhow::Context;

/// A real registry (Debian's `docker-registry`, the CNCF distribution
/// server) on a free loopback port, with its storage in a temporary
/// directory; stopped when dropped.
pub struct LoopbackRegistry {
    child: std::process::Child,
    /// `127.0.0.1:<port>`, as image references and `--registry-allow` name it.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl LoopbackRegistry {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
                dir.path().join("data").display()
            ),
        )?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context(
                "cannot start `docker-registry` (install Debian's docker-registry package; .ci/run does)",
            )?;
        let reg = Self {
            child,
            host,
            _dir: dir,
        };
        let url = format!("http://{}/v2/", reg.host);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the loopback registry at {url} never answered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Ok(reg)
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
