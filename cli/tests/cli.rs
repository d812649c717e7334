//! The `kiln` binary as users run it.

use std::process::Command;

fn kiln(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_HOME", home)
        .env_remove("KILN_COORDINATOR")
        .env_remove("KILN_KEY");
    c
}

#[test]
fn a_malformed_spec_is_reported_with_its_field_and_a_non_zero_exit() {
    let home = tempfile::tempdir().unwrap();
    let spec = home.path().join("bad.toml");
    let cases = [
        ("image = \"alpine:latest\"\ncommand = [\"x\"]\n", "image"),
        (
            &*format!(
                "image = \"sha256:{}\"\n[resources]\nmemory = \"2 parsecs\"\n",
                "a".repeat(64)
            ),
            "memory",
        ),
        (
            &*format!(
                "image = \"sha256:{}\"\n[resources]\ntimeout = 0\n",
                "a".repeat(64)
            ),
            "resources.timeout",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&spec, text).unwrap();
        let out = kiln(home.path())
            .args(["job", "submit"])
            .arg(&spec)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "expected `{field}` in: {err}");
    }
    // The buyer key was created on first use, readable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join("buyer.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn an_unreachable_coordinator_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args(["--coordinator", "http://127.0.0.1:9", "job", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn devnet_runs_the_demo_and_prints_one_json_object() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args([
            "devnet",
            "--providers",
            "2",
            "--exit-after-demo",
            "--json",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout).expect("stdout is exactly one JSON object");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["receipt_verified"], true);
    assert!(v["job_id"].as_str().unwrap().len() == 32);
    assert!(v["output_cid"].as_str().unwrap().starts_with("bafy"));
    let provider = v["provider"].as_str().unwrap();
    assert!(
        v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == provider)
    );
}
