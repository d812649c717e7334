//! Connects to the local Docker engine and makes sure the workload image
//! exists, building it offline if needed:
//!
//! ```text
//! cargo run -p kiln-docker --example workload_image
//! ```

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = async {
        let docker = kiln_docker::connect().await?;
        println!(
            "engine: {} (API {})",
            kiln_docker::docker_host(),
            docker.client_version()
        );
        println!(
            "workload: {} bytes, blake3 {}",
            kiln_docker::WORKLOAD_ELF.len(),
            kiln_docker::workload_digest()
        );
        let image = kiln_docker::ensure_workload_image(&docker).await?;
        println!("image: {} {}", image.tag, image.id);
        Ok::<_, kiln_docker::DockerError>(())
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
