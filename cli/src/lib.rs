//! # kiln-cli — the `kiln` command
//!
//! Buyers submit jobs, watch them, and fetch verified results; `kiln devnet`
//! runs a whole marketplace (a coordinator and N provider nodes) on loopback.
//! Everything here is a library so the integration tests drive exactly what
//! users run.

pub mod bench;
pub mod bench_api;
pub mod bench_coordinator;
pub mod bench_image;
pub mod client;
pub mod data;
pub mod devnet;
pub mod image;
pub mod ledger;
pub mod registry;
pub mod show;
pub mod sim;
pub mod table;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_protocol::keys::keyfile;
use kiln_protocol::views::{JobState, JobView, MemberView};
use kiln_protocol::{
    ContentId, JobId, JobSpec, Keypair, Manifest, OfferId, ProviderId, ResultReceipt, Signed,
    UnixMillis,
};

pub use client::{Account, Balances, Client, ClientError, Statement};

/// Terminal-safe text. Much of what `kiln` prints was written by someone
/// else: a provider (logs, failure reasons, offers), the coordinator (error
/// messages, verification details) or whoever named an upload. Printed raw,
/// escape sequences in it could rewrite the screen, retitle the window,
/// hide text or (in some terminals) answer back into the shell. So text
/// output neutralizes them: each control character, C1 control and bidi
/// override becomes a visible escape (`\x1b`, `\r`, `\u{202e}`).
/// `--json` output is JSON, for programs; `kiln job logs --raw` writes the
/// logs as served, for a pipe or a file that needs the exact text (the
/// exact bytes are also a verified blob: `kiln data get <stdout_cid>`).
pub mod term {
    use std::borrow::Cow;
    use std::fmt::Write;
    use std::io::Write as _;

    /// Writes `s` and a newline to stdout. A reader that went away (`kiln
    /// job list | head -3`) ends the program quietly with status 0, as
    /// `cat` or `ls` do, instead of a panic; other write errors are
    /// reported once on stderr (exit 1).
    pub fn out(s: &str) {
        write_out(s.as_bytes(), true);
    }

    /// [`out`] without the newline.
    pub fn out_raw(s: &str) {
        write_out(s.as_bytes(), false);
    }

    fn write_out(bytes: &[u8], newline: bool) {
        let mut o = std::io::stdout().lock();
        let r = o
            .write_all(bytes)
            .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) })
            .and_then(|()| o.flush());
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: writing to stdout failed: {e}");
                std::process::exit(1);
            }
        }
    }

    /// One line: newlines and tabs are escaped too, so a field cannot fake
    /// lines of output.
    pub fn line(s: &str) -> Cow<'_, str> {
        neutralize(s, false)
    }

    /// Many lines (logs, whole outputs): `\n` and `\t` are kept, `\r\n`
    /// is a newline; every other control is escaped.
    pub fn text(s: &str) -> Cow<'_, str> {
        neutralize(s, true)
    }

    fn unsafe_char(c: char, keep_lines: bool) -> bool {
        if keep_lines && (c == '\n' || c == '\t') {
            return false;
        }
        // `is_control`: C0, DEL and C1 (U+009B is a one-character CSI).
        c.is_control()
            || matches!(
                c,
                '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            )
    }

    fn neutralize(s: &str, keep_lines: bool) -> Cow<'_, str> {
        if !s.chars().any(|c| unsafe_char(c, keep_lines)) {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len() + 16);
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if keep_lines && c == '\r' && chars.peek() == Some(&'\n') {
                continue;
            }
            if !unsafe_char(c, keep_lines) {
                out.push(c);
                continue;
            }
            let _ = match c {
                '\n' => write!(out, "\\n"),
                '\r' => write!(out, "\\r"),
                '\t' => write!(out, "\\t"),
                c if u32::from(c) < 0x80 => write!(out, "\\x{:02x}", u32::from(c)),
                c => write!(out, "\\u{{{:x}}}", u32::from(c)),
            };
        }
        Cow::Owned(out)
    }
}

/// A job in one line (two with its verification), as `kiln job status`,
/// `list` and `submit --wait` print it; every free-text field neutralized
/// ([`term::line`]).
pub fn job_line(v: &JobView) -> String {
    let reason = v
        .reason
        .as_deref()
        .map(|r| format!(" ({})", term::line(r)))
        .unwrap_or_default();
    let mut line = format!("{}  {}{}", v.job_id, v.state, reason);
    if let Some(ver) = &v.verification {
        line.push_str("\n  verification: ");
        line.push_str(&verification_line(ver));
    }
    line
}

/// `kiln job logs` as text: stdout then stderr, neutralized
/// ([`term::text`]); `--raw` prints [`LogsView`]'s strings unchanged instead.
pub fn logs_text(v: &kiln_protocol::views::LogsView) -> String {
    format!("{}{}", term::text(&v.stdout), term::text(&v.stderr))
}

/// Default buyer key location: `$KILN_HOME/buyer.key`, else the user's config dir.
pub fn default_key_path() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME") {
        return PathBuf::from(home).join("buyer.key");
    }
    dirs::config_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln")
        .join("buyer.key")
}

/// Follows job `id`'s logs (gang member `rank`) until it ends: what its
/// node has so far, every `every`, then the rest from the stored logs.
/// `out`/`err` receive text as it comes (already terminal-safe if `safe`).
pub async fn follow_logs(
    client: &Client,
    id: &JobId,
    rank: u32,
    every: Duration,
    mut out: impl FnMut(&str),
    mut err: impl FnMut(&str),
) -> anyhow::Result<JobView> {
    let (mut o, mut e) = (0u64, 0u64);
    loop {
        let v = client.live_logs(id, rank, o, e).await?;
        if !v.stdout.is_empty() {
            out(&v.stdout);
        }
        if !v.stderr.is_empty() {
            err(&v.stderr);
        }
        (o, e) = (v.stdout_next, v.stderr_next);
        if v.state.is_terminal() {
            break;
        }
        tokio::time::sleep(every).await;
    }
    let job = client.job(id).await?;
    // The rest, from what the coordinator stored: the same bytes, so the
    // offsets carry over (unless the stored answer is only a tail).
    let stored = if job.spec.resources.gang > 1 {
        client.rank_logs(id, rank).await
    } else {
        client.logs(id).await
    };
    if let Ok(l) = stored {
        let rest = |s: &str, from: u64| {
            let from = usize::try_from(from).unwrap_or(usize::MAX);
            s.get(from..).unwrap_or("").to_string()
        };
        if l.clipped {
            err(&format!(
                "\n(the log is longer than what is shown inline: `kiln data get {}` has all of stdout)\n",
                l.stdout_cid
            ));
        } else {
            out(&rest(&l.stdout, o));
            err(&rest(&l.stderr, e));
        }
    }
    Ok(job)
}

/// Shortest job id prefix accepted (`kiln job logs 550c`).
pub const MIN_PREFIX: usize = 4;

/// The job a user means: its whole id, or a prefix of the id of exactly
/// one of their jobs (as `kiln job list` shows them).
pub async fn resolve_job(client: &Client, typed: &str) -> anyhow::Result<JobId> {
    let s = typed.trim().to_ascii_lowercase();
    if let Ok(id) = s.parse() {
        return Ok(id);
    }
    if s.len() < MIN_PREFIX || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "`{}` is not a job id or the start of one (at least {MIN_PREFIX} hex digits, as `kiln job list` shows them)",
            term::line(typed)
        );
    }
    let jobs = client.jobs().await?;
    let matches: Vec<JobId> = jobs
        .jobs
        .iter()
        .map(|j| j.job_id)
        .filter(|id| id.to_string().starts_with(&s))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => bail!("none of your jobs has an id starting with {s} (`kiln job list` shows them)"),
        many => bail!(
            "{s} is the start of {} of your jobs' ids ({}); type more of it",
            many.len(),
            many.iter()
                .take(4)
                .map(|id| id.to_string()[..show::ID_PREFIX].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Loads the buyer key, creating it (mode 0600) on first use.
pub fn buyer_key(path: &Path) -> anyhow::Result<Keypair> {
    keyfile::load_or_create(path)
        .with_context(|| format!("loading the buyer key at {}", path.display()))
}

/// Reads a TOML job spec; errors name the field.
pub fn read_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading job spec {}", path.display()))?;
    let spec: JobSpec = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid job spec {}: {e}", path.display()))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid job spec {}: {e}", path.display()))?;
    Ok(spec)
}

/// Polls a job until it ends or `timeout` passes; calls `on_change` on each new state or reason.
pub async fn wait_for(
    client: &Client,
    id: &JobId,
    timeout: Duration,
    mut on_change: impl FnMut(&JobView),
) -> anyhow::Result<JobView> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<(JobState, Option<String>)> = None;
    loop {
        let v = client.job(id).await?;
        let now = (v.state, v.reason.clone());
        if last.as_ref() != Some(&now) {
            on_change(&v);
            last = Some(now);
        }
        if v.state.is_terminal() {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} still {} after {}s", v.state, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks a result receipt on the client side: its signature (as of when it
/// was made: it may be past its delivery expiry by now), that `provider`
/// signed it and is the one it names, that it is for job `id`, and, when
/// given, for `offer`.
pub fn check_receipt(
    receipt: Option<&Signed<ResultReceipt>>,
    id: &JobId,
    provider: &ProviderId,
    offer: Option<&OfferId>,
) -> anyhow::Result<Signed<ResultReceipt>> {
    let receipt = receipt.cloned().context("the job has no receipt")?;
    receipt
        .verify(UnixMillis(
            receipt.payload.finished_at.0.min(receipt.expires_at.0),
        ))
        .context("receipt signature")?;
    let signer = ProviderId::from_public_key(&receipt.signer);
    if signer != *provider || receipt.payload.provider != *provider {
        bail!("receipt signed by {signer}, but the job ran on {provider}");
    }
    if receipt.payload.job_id != *id {
        bail!("receipt is for job {}, not {id}", receipt.payload.job_id);
    }
    if let Some(offer) = offer
        && receipt.payload.offer_id != *offer
    {
        bail!(
            "receipt is for offer {}, not {offer}",
            receipt.payload.offer_id
        );
    }
    Ok(receipt)
}

/// Verifies a job's receipt on the client side: [`check_receipt`] against
/// the job's provider, and that its output CID matches `manifest` when given.
pub fn verify_receipt(
    job: &JobView,
    manifest: Option<&Manifest>,
) -> anyhow::Result<Signed<ResultReceipt>> {
    let provider = job.provider.context("job has no provider")?;
    let receipt = check_receipt(job.receipt.as_ref(), &job.job_id, &provider, None)?;
    if let Some(m) = manifest
        && m.cid() != receipt.payload.output_cid
    {
        bail!(
            "output manifest hashes to {}, receipt says {}",
            m.cid(),
            receipt.payload.output_cid
        );
    }
    Ok(receipt)
}

/// One node's outputs as [`fetch_outputs_verified`] wrote them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeOutputs {
    /// The gang rank; `None` for a single-node job.
    pub rank: Option<u32>,
    pub provider: ProviderId,
    /// The manifest CID its signed receipt names.
    pub output_cid: ContentId,
    pub dir: PathBuf,
    #[serde(flatten)]
    pub report: data::GetReport,
}

/// Fetches a job's outputs into `dir` by CID, trusting only signed
/// receipts: each receipt is checked ([`check_receipt`]), then the manifest
/// it names and every file in it are verified group by group as they
/// arrive (resumable through `cache`). A gang job's members each get
/// `dir/rank-<r>`; members of its last attempt without a receipt (stopped
/// before finishing) are skipped, and a job with no receipt at all is an error.
pub async fn fetch_outputs_verified(
    client: &Client,
    cache: &kiln_blobs::Store,
    id: &JobId,
    dir: &Path,
    show_progress: bool,
) -> anyhow::Result<Vec<NodeOutputs>> {
    let job = client.job(id).await?;
    if !job.state.is_terminal() {
        bail!(
            "job {id} is {}: its outputs can be fetched once it has ended (`kiln job status {id}` shows where it is)",
            job.state
        );
    }
    if job.receipt.is_none() && job.gang_members().iter().all(|m| m.receipt.is_none()) {
        bail!(
            "job {id} ended {} without a result, so it has no outputs{}",
            job.state,
            job.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    let members = job.gang_members();
    let wanted: Vec<(Option<u32>, ProviderId, Signed<ResultReceipt>, PathBuf)> = if members
        .is_empty()
    {
        let receipt = verify_receipt(&job, None)?;
        vec![(None, receipt.payload.provider, receipt, dir.to_path_buf())]
    } else {
        let mut wanted = Vec::new();
        for m in members.iter().filter(|m| m.receipt.is_some()) {
            let (rank, provider) = (m.rank, m.provider);
            let receipt = check_receipt(m.receipt.as_ref(), id, &provider, Some(&m.offer_id))
                .with_context(|| format!("gang member rank {rank}"))?;
            wanted.push((
                Some(rank),
                provider,
                receipt,
                dir.join(format!("rank-{rank}")),
            ));
        }
        if wanted.is_empty() {
            bail!(
                "job {id} is {} and no gang member has delivered a receipt yet; nothing to fetch",
                job.state
            );
        }
        wanted
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut fetched = Vec::with_capacity(wanted.len());
    for (rank, provider, receipt, dir) in wanted {
        let output_cid = receipt.payload.output_cid;
        let report = data::get(client, cache, output_cid, &dir, show_progress, &cancel)
            .await
            .with_context(|| match rank {
                Some(r) => format!("fetching the outputs of gang rank {r}"),
                None => format!("fetching the outputs of job {id}"),
            })?;
        fetched.push(NodeOutputs {
            rank,
            provider,
            output_cid,
            dir,
            report,
        });
    }
    Ok(fetched)
}

/// What `kiln job status` says about a job's verification: where it
/// stands (`not sampled`, `verified by re-execution on …`, `disputed`,
/// `failed verification`), the audit probability, and whether the
/// coordinator's signature over the record holds.
pub fn verification_line(v: &kiln_protocol::VerificationView) -> String {
    let p = f64::from(v.p_ppm) / 10_000.0;
    let sealed = if record_signed(v) {
        "record signed by the coordinator"
    } else {
        "RECORD SIGNATURE DOES NOT VERIFY"
    };
    format!(
        "{} [{}; audit p = {p:.4}%; {sealed}]",
        term::line(&v.detail),
        v.status
    )
}

/// Whether `v.signature` is the coordinator's (`v.signer`) signature over
/// its record.
pub fn record_signed(v: &kiln_protocol::VerificationView) -> bool {
    let Ok(sig) = hex::decode(&v.signature) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(sig.as_slice()) else {
        return false;
    };
    v.signer
        .public_key()
        .is_some_and(|k| k.verify_record("kiln/verification-record/v1", v.record.as_bytes(), &sig))
}

/// The members of a gang job's last attempt, by rank (empty for a
/// single-node job).
pub fn gang_members(job: &JobView) -> Vec<MemberView> {
    job.gang_members().into_iter().cloned().collect()
}

/// The content id of stdout/stderr bytes, for display.
pub fn cid_of(bytes: &[u8]) -> ContentId {
    ContentId::of_bytes(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Whether a terminal would act on anything in `s` but line breaks and tabs.
    fn acts_on_terminal(s: &str) -> bool {
        s.chars().any(|c| {
            !matches!(c, '\n' | '\t') && (c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c))
        })
    }

    #[test]
    fn control_characters_and_escape_sequences_become_visible_escapes() {
        let evil = "a\x1b[2Jb\nc\u{9b}31md\u{202e}e\x07\r\n\tf\rg\x7f";
        assert_eq!(
            term::line(evil),
            "a\\x1b[2Jb\\nc\\u{9b}31md\\u{202e}e\\x07\\r\\n\\tf\\rg\\x7f"
        );
        // Text keeps its lines and tabs; CRLF is a newline, a lone CR (which
        // would let later text overwrite earlier) is escaped.
        assert_eq!(
            term::text(evil),
            "a\\x1b[2Jb\nc\\u{9b}31md\\u{202e}e\\x07\n\tf\\rg\\x7f"
        );
        assert!(!acts_on_terminal(&term::text(evil)));
        // Plain text, non-ASCII included, is untouched (and not copied).
        let plain = "héllo wörld ✓ 42\n";
        assert!(matches!(term::text(plain), std::borrow::Cow::Borrowed(p) if p == plain));
        // Neutralized text is neutral: a second pass changes nothing.
        assert_eq!(term::text(&term::text(evil)), term::text(evil));
    }

    #[test]
    fn a_jobs_reason_verification_and_logs_print_neutralized() {
        let owner = kiln_protocol::BuyerId::new(Keypair::generate().public());
        let signer = ProviderId::from_public_key(&Keypair::generate().public());
        let job: JobView = serde_json::from_value(serde_json::json!({
            "job_id": JobId::from_bytes([7; 16]),
            "owner": owner,
            "label": "\x1b]0;title\x07",
            "state": "failed",
            "reason": "provider said: \x1b]0;pwned\x07\x1b[2J\nJOB 00 completed",
            "attempts": 1,
            "max_cost": 1,
            "receipt_verified": false,
            "spec": { "image": format!("sha256:{}", "a".repeat(64)) },
            "created_at": 0,
            "updated_at": 0,
            "verification": {
                "status": "unverified",
                "p_ppm": 0,
                "detail": "re-run by \x1b[8mhidden",
                "verifiers": [],
                "record": "",
                "signature": "",
                "signer": signer,
            },
        }))
        .unwrap();
        let line = job_line(&job);
        assert!(!acts_on_terminal(&line), "{line:?}");
        assert!(
            line.contains("provider said: \\x1b]0;pwned\\x07\\x1b[2J\\nJOB 00 completed"),
            "{line}"
        );
        assert!(line.contains("re-run by \\x1b[8mhidden"), "{line}");
        // The reason cannot fake a line: the only line break is the one
        // before the verification.
        assert_eq!(line.lines().count(), 2, "{line}");

        let logs = kiln_protocol::views::LogsView {
            job_id: job.job_id,
            rank: None,
            provider: signer,
            stdout: "step 1\r\n\x1b[1A\x1b[2Kall good\n".into(),
            stderr: "\u{9b}6n".into(),
            stdout_cid: cid_of(b""),
            stderr_cid: cid_of(b""),
            truncated: false,
            clipped: false,
        };
        let text = logs_text(&logs);
        assert_eq!(text, "step 1\n\\x1b[1A\\x1b[2Kall good\n\\u{9b}6n");
        assert!(!acts_on_terminal(&text));
    }
}
