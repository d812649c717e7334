//! How Kiln's daemons learn they should stop: Ctrl-C (SIGINT) from a
//! terminal, or SIGTERM from a service manager (`systemctl stop`, `docker
//! stop`, Kubernetes). Both lead to the same ordered shutdown: running jobs
//! are reported and results delivered before the network goes.

/// Waits for SIGINT or SIGTERM; returns which came.
pub async fn stop_requested() -> std::io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
        _ = term.recv() => Ok("SIGTERM"),
    }
}
