//! `job_spec`: TOML job specs as the CLI reads them (`kiln_cli::read_spec`
//! is `toml::from_str::<JobSpec>` then `JobSpec::validate` on a file's
//! text; it takes a path, so the target runs the same two steps on the
//! bytes).
//!
//! A spec that validates must survive every form it travels in: TOML again
//! (written by `toml::to_string`), JSON (the REST body), the canonical
//! encoding (what is signed), and the whole submission path: the CLI signs
//! a `JobSubmission` over the spec it parsed and POSTs it as JSON, and the
//! coordinator parses that JSON (with `serde_path_to_error`, as
//! `POST /v1/jobs` does) and verifies the signature over the values *it*
//! parsed. Any value that changes on the way (a float that does not
//! round-trip, CPUs as fractional cores) makes a valid submission fail.

use kiln_protocol::{JobSpec, JobSubmission, Signed};

use super::{Outcome, Target, Verdict, bincode_round_trip, json_round_trip};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "job_spec",
    about: "TOML job spec → JobSpec → validate (as kiln_cli::read_spec), then TOML/JSON/bincode and signed-submission round trips",
    max_len: 8 * 1024,
    seeds,
    dict: &[
        b"image = ",
        b"command = [",
        b"entrypoint = [",
        b"output_path = ",
        b"network = \"full\"",
        b"[resources]\n",
        b"[verify]\n",
        b"[[inputs]]\n",
        b"[env]\n",
        b"cpus = ",
        b"memory = ",
        b"gpus = ",
        b"timeout = ",
        b"pids = ",
        b"max_price_per_hour = ",
        b"disk = ",
        b"min_vram = ",
        b"gpu_models = [",
        b"min_compute_capability = ",
        b"min_tflops = ",
        b"region = ",
        b"min_reputation = ",
        b"priority = ",
        b"deadline = ",
        b"gang = ",
        b"compare = \"tolerance\"",
        b"rtol = ",
        b"atol = ",
        b"cid = \"bafkr4i",
        b"url = \"https://",
        b"path = \"/in/",
        b"size = ",
        b"MiB",
        b"GiB",
        b"TiB",
        b"1e-3",
        b"0.1",
        b"1.7976931348623157e308",
        b"5e-324",
        b"nan",
        b"inf",
        b"\"sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f\"",
    ],
    run,
};

fn run(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(Verdict::Rejected);
    };
    let Ok(spec) = toml::from_str::<JobSpec>(text) else {
        return Ok(Verdict::Rejected);
    };
    if spec.validate().is_err() {
        return Ok(Verdict::Rejected);
    }
    if spec.max_cost().is_none() {
        return Err("a valid spec has no max_cost".into());
    }
    // Canonical encoding (what is signed and stored).
    let bytes = kiln_protocol::encoding::encode(&spec).map_err(|e| e.to_string())?;
    if bincode_round_trip::<JobSpec>(&bytes)?.is_none() {
        return Err("the canonical encoding of a valid spec does not decode".into());
    }
    // JSON (the REST body).
    json_round_trip(&spec)?;
    // TOML again.
    let toml_text = toml::to_string(&spec)
        .map_err(|e| format!("a valid spec does not serialize to TOML: {e}"))?;
    let back: JobSpec = toml::from_str(&toml_text)
        .map_err(|e| format!("a valid spec's own TOML does not parse: {e}\n{toml_text}"))?;
    if back != spec {
        let (x, y) = (format!("{spec:?}"), format!("{back:?}"));
        return Err(format!(
            "TOML round trip changed a valid spec (at `{}`)\n x = {x}\n back = {y}\n toml = {toml_text}",
            super::first_difference(&x, &y)
        ));
    }
    back.validate()
        .map_err(|e| format!("a valid spec's own TOML does not validate: {e}"))?;
    // The submission path: signed by the CLI, parsed and verified by the
    // coordinator from JSON.
    let submission = JobSubmission { spec, label: None };
    let signed = Signed::sign_with(&s::key(1), submission, s::nonce(1), s::EXPIRES)
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(&signed).map_err(|e| e.to_string())?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let parsed: Signed<JobSubmission> = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("the coordinator cannot parse a CLI submission: {e}"))?;
    if parsed.verify(s::NOW).is_err() {
        return Err(format!(
            "a submission of a valid spec, signed by the CLI, fails verification at the coordinator after the JSON trip\n body = {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(Verdict::Accepted)
}

fn seeds() -> Vec<Vec<u8>> {
    let img = s::image();
    let cid1 = s::cid(1);
    let dir = s::manifest().cid();
    let mut out: Vec<Vec<u8>> = vec![
        format!("image = \"{img}\"\ncommand = [\"demo\", \"42\"]\n").into_bytes(),
        format!(
            "image = \"{img}\"\ncommand = [\"demo\", \"42\"]\nenv = {{ RUST_LOG = \"info\" }}\n\n\
             [[inputs]]\ncid = \"{cid1}\"\npath = \"/in/data.bin\"\n\n\
             [[inputs]]\ncid = \"{cid1}\"\nurl = \"https://example.com/weights.bin\"\npath = \"/in/weights.bin\"\nsize = \"7B\"\n\n\
             [[inputs]]\ncid = \"{dir}\"\npath = \"/in/dir\"\n\n\
             [resources]\ncpus = 1.5\nmemory = \"512MiB\"\ntimeout = \"10m\"\nmax_price_per_hour = 2000000\n"
        )
        .into_bytes(),
        format!(
            "image = \"repo/x:1@{img}\"\n\n[resources]\ngpus = 2\nmin_vram = \"80GiB\"\n\
             gpu_models = [\"H100\", \"A100 80GB\"]\nmin_compute_capability = \"9.0\"\nmin_tflops = 400\n\
             disk = \"200GiB\"\nregion = \"eu\"\nmin_reputation = 600\npriority = 10\ndeadline = \"2h\"\ngang = 4\n\n\
             [verify]\ncompare = \"tolerance\"\nrtol = 1e-3\natol = 1e-6\n"
        )
        .into_bytes(),
        format!(
            "image = \"{img}\"\nnetwork = \"full\"\noutput_path = \"/out/x\"\n\n[resources]\ncpus = 0.25\n\
             min_compute_capability = 8.6\ngpus = 1\ntimeout = 90\n\n[verify]\ncompare = \"stdout\"\n"
        )
        .into_bytes(),
    ];
    for spec in s::specs() {
        if let Ok(t) = toml::to_string(&spec) {
            out.push(t.into_bytes());
        }
    }
    out
}
