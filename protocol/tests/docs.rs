//! `docs/protocol.md` names every signed message type, its signing
//! domain and every RPC variant, as the code defines them.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn read(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(rel)).unwrap()
}

/// `(type, domain)` of every `impl SignedMessage for T { const DOMAIN … }`.
fn signed_types(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in src.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("impl SignedMessage for ") {
            current = rest.split_whitespace().next().map(str::to_string);
        } else if let (Some(t), Some(i)) = (&current, l.find("DOMAIN: &'static str = \"")) {
            let d = &l[i + "DOMAIN: &'static str = \"".len()..];
            let d = d.split('"').next().unwrap().to_string();
            if !d.starts_with("test/") {
                out.push((t.clone(), d));
            }
            current = None;
        }
    }
    out
}

/// Variant names of `pub enum <name>` in `src`.
fn variants(src: &str, name: &str) -> Vec<String> {
    let start = src.find(&format!("pub enum {name} {{")).unwrap();
    let body = &src[start..];
    let body = &body[..body.find("\n}").unwrap()];
    body.lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| {
            !l.starts_with("//")
                && !l.is_empty()
                && l.chars().next().is_some_and(char::is_uppercase)
        })
        .map(|l| {
            l.split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn every_signed_type_domain_and_rpc_variant_is_documented() {
    let doc = read("docs/protocol.md");
    let mut signed = Vec::new();
    for f in [
        "protocol/src/messages.rs",
        "protocol/src/gang.rs",
        "protocol/src/request_auth.rs",
        "protocol/src/bench.rs",
        "contracts/src/chain.rs",
    ] {
        signed.extend(signed_types(&read(f)));
    }
    assert!(signed.len() >= 17, "{signed:?}");
    for (t, d) in &signed {
        assert!(
            doc.contains(&format!("| `{t}` | `{d}` |")),
            "docs/protocol.md lacks the row for `{t}` signed under `{d}`"
        );
    }
    let messages = read("protocol/src/messages.rs");
    for enum_name in ["NetRequest", "NetResponse"] {
        let vs = variants(&messages, enum_name);
        assert!(vs.len() >= 5, "{enum_name}: {vs:?}");
        for v in vs {
            assert!(
                doc.contains(&format!("`{v}`")),
                "docs/protocol.md does not name {enum_name}::{v}"
            );
        }
    }
    let net = read("net/src/lib.rs");
    for konst in [
        "RPC_PROTOCOL",
        "ADVERT_TOPIC",
        "BLOB_PROTOCOL",
        "BLOB_TOPIC",
    ] {
        let line = net
            .lines()
            .find(|l| l.contains(&format!("pub const {konst}")))
            .unwrap();
        let value = line.split('"').nth(1).unwrap();
        assert!(
            doc.contains(&format!("`{value}`")),
            "docs/protocol.md lacks {value}"
        );
    }
    let reexec = read("coordinator/src/lifecycle/reexec.rs");
    let record = reexec
        .lines()
        .find(|l| l.contains("pub const RECORD_DOMAIN"))
        .and_then(|l| l.split('"').nth(1))
        .unwrap();
    assert!(doc.contains(record), "docs/protocol.md lacks {record}");
}
