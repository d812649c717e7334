//! `kiln-workload hostile ...` outside any container: the parts whose outcome
//! does not depend on the sandbox (argument handling, the list, `whoami`, the
//! final-line protocol, breach detection on planted data).

use std::path::Path;
use std::process::{Command, Output};

const EXE: &str = env!("CARGO_BIN_EXE_kiln-workload");

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(EXE);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn kiln-workload")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn last_line(o: &Output) -> String {
    stdout(o).lines().last().unwrap_or("").to_string()
}

#[test]
fn list_prints_every_case_name() {
    let o = run(&["hostile", "list"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let names: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    for n in [
        "net-tcp",
        "net-udp",
        "dns",
        "write-root",
        "proc-root",
        "symlink-input",
        "fork-bomb",
        "memory",
        "fill-out",
        "fill-tmp",
        "flood",
        "mount",
        "ptrace",
        "raw-socket",
        "chown",
        "setuid-binary",
        "sleep-forever",
        "read-other",
        "cpu-burn",
        "whoami",
    ] {
        assert!(names.iter().any(|l| l == n), "{n} not listed: {names:?}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["hostile"][..],
        &["hostile", "nope"],
        &["hostile", "memory"],
        &["hostile", "net-tcp", "example.com:80"],
    ] {
        let o = run(args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn whoami_prints_ids() {
    let o = run(&["hostile", "whoami"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let line = last_line(&o);
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 3, "{line}");
    for (f, key) in fields.iter().zip(["uid=", "euid=", "gid="]) {
        let v = f.strip_prefix(key).unwrap_or_else(|| panic!("{line}"));
        assert!(v.parse::<u32>().is_ok(), "{line}");
    }
}

#[test]
fn read_other_missing_path_is_contained() {
    let o = run(
        &["hostile", "read-other", "/nonexistent/kiln/other-job"],
        &[],
    );
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        last_line(&o),
        "HOSTILE read-other contained: read /nonexistent/kiln/other-job: ENOENT (No such file or directory)"
    );
}

#[test]
fn read_other_visible_path_is_a_breach() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(
        &["hostile", "read-other", &dir.path().to_string_lossy()],
        &[],
    );
    assert_eq!(o.status.code(), Some(99));
    assert!(last_line(&o).starts_with("HOSTILE read-other BREACHED: "));
}

#[test]
fn fill_out_reaching_its_target_is_done() {
    let out = tempfile::tempdir().expect("tempdir");
    let o = run(
        &["hostile", "fill-out", "2"],
        &[("KILN_OUTPUT_DIR", out.path())],
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("\nwrote 2097152 bytes\n"),
        "{}",
        stdout(&o)
    );
    assert!(last_line(&o).starts_with("HOSTILE fill-out done: wrote 2097152 bytes"));
    let len = std::fs::metadata(out.path().join("hostile-fill.bin"))
        .expect("fill file")
        .len();
    assert_eq!(len, 2 << 20);
}

#[test]
fn fill_tmp_reaching_its_target_is_a_breach() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = run(&["hostile", "fill-tmp", "1"], &[("TMPDIR", tmp.path())]);
    assert_eq!(o.status.code(), Some(99));
    assert!(stdout(&o).contains("\nwrote 1048576 bytes\n"));
    assert!(last_line(&o).starts_with("HOSTILE fill-tmp BREACHED: "));
}

#[test]
fn flood_writes_what_it_was_asked_to() {
    let o = run(&["hostile", "flood", "3"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.len() >= 3 << 20);
    assert!(last_line(&o).starts_with("HOSTILE flood done: wrote "));
}

#[test]
fn symlink_input_detects_host_data_staged_into_the_input() {
    let root = tempfile::tempdir().expect("tempdir");
    let (input, out) = (root.path().join("in"), root.path().join("out"));
    std::fs::create_dir_all(input.join("sub")).expect("mkdir");
    std::fs::write(input.join("clean.txt"), "hello\n").expect("write");
    // As if the node had resolved a job's symlink on the host while staging.
    std::fs::write(
        input.join("sub/staged"),
        "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
    )
    .expect("write");
    // A symlink leading out of the input to a host secret.
    let secret = root.path().join("host-secret");
    std::fs::write(&secret, "token-5c2e9a\n").expect("write");
    std::os::unix::fs::symlink(&secret, input.join("escape")).expect("symlink");

    let o = run(
        &[
            "hostile",
            "symlink-input",
            &input.to_string_lossy(),
            "token-5c2e9a",
        ],
        &[("KILN_OUTPUT_DIR", &out)],
    );
    assert_eq!(o.status.code(), Some(99), "{}", stdout(&o));
    let last = last_line(&o);
    assert!(
        last.starts_with("HOSTILE symlink-input BREACHED: "),
        "{last}"
    );
    assert!(
        last.contains("escape: read 13 bytes containing the secret"),
        "{last}"
    );
    assert!(last.contains("staged: holds host account data"), "{last}");
    assert!(!last.contains("clean.txt"), "{last}");
    // The links it plants in the output are left for the node to (not) follow.
    let link = std::fs::read_link(out.join("hostile-link-proc1-root")).expect("link");
    assert_eq!(link, Path::new("/proc/1/root"));
}
