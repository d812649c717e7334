//! The CLI's text output: tables with headers for every list, and a job's
//! whole story for `kiln job status`. Money is shown one way everywhere:
//! credits with six decimals (`1.250000 cr`; 1 cr = 1,000,000 µcr, the
//! unit JSON output and specs' integers use). `--json` prints the typed
//! views instead.

use kiln_protocol::views::{JobListView, JobView, OffersView, ProvidersView};
use kiln_protocol::{Credits, UnixMillis};

use crate::table::{Align, Table, age};
use crate::term;

/// Hex digits of a job id shown in lists (any unique prefix of at least
/// [`crate::MIN_PREFIX`] is accepted back).
pub const ID_PREFIX: usize = 12;

/// Money as shown everywhere in text.
pub fn money(c: Credits) -> String {
    c.to_string()
}

/// A signed amount of micro-credits as credits (`-0.250000 cr`).
pub fn delta(micro: i128) -> String {
    let sign = if micro < 0 { "-" } else { "+" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06} cr", m / 1_000_000, m % 1_000_000)
}

/// `kiln job list`.
pub fn jobs_table(v: &JobListView, now: UnixMillis) -> String {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("LABEL", Align::Left),
        ("STATE", Align::Left),
        ("PROVIDER", Align::Left),
        ("AGE", Align::Right),
        ("COST", Align::Right),
    ]);
    for j in &v.jobs {
        let id = j.job_id.to_string();
        t.row(vec![
            id[..ID_PREFIX.min(id.len())].to_string(),
            j.label.clone().unwrap_or_else(|| "-".into()),
            j.state.to_string(),
            j.provider.map_or_else(|| "-".into(), |p| p.short()),
            age(now.0.saturating_sub(j.created_at.0)),
            j.cost.map_or_else(|| "-".into(), money),
        ]);
    }
    t.render_or("no jobs yet: submit one with `kiln job submit <spec.toml>`")
}

/// `kiln job status`: what was asked, where it stands and why, what it
/// cost, its outputs and its history.
pub fn job_text(v: &JobView) -> String {
    let s = &v.spec;
    let r = &s.resources;
    let mut out = vec![format!(
        "job       {}{}",
        v.job_id,
        v.label
            .as_deref()
            .map(|l| format!("  ({})", term::line(l)))
            .unwrap_or_default()
    )];
    out.push(format!(
        "state     {}{}",
        v.state,
        v.reason
            .as_deref()
            .map(|x| format!(": {}", term::line(x)))
            .unwrap_or_default()
    ));
    let command = s
        .entrypoint
        .iter()
        .flatten()
        .chain(&s.command)
        .map(|a| term::line(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    out.push(format!("image     {}", term::line(&s.image.0)));
    out.push(format!("command   {command}"));
    let mut asks = vec![
        format!("{} CPU", f64::from(r.cpus.0) / 1000.0),
        format!("{} memory", r.memory),
    ];
    if r.gpus > 0 {
        asks.push(format!("{} GPU", r.gpus));
    }
    if r.gang > 1 {
        asks.push(format!("{} nodes", r.gang));
    }
    asks.push(format!("timeout {}s", r.timeout.0));
    asks.push(format!(
        "at most {}/h per node",
        money(r.max_price_per_hour)
    ));
    out.push(format!("asks      {}", asks.join(", ")));
    if !s.inputs.is_empty() {
        for i in &s.inputs {
            out.push(format!("input     {} at {}", i.cid, term::line(&i.path)));
        }
    }
    if let Some(p) = v.provider {
        out.push(format!(
            "provider  {p}{}",
            v.price_per_hour
                .map(|c| format!(" at {}/h", money(c)))
                .unwrap_or_default()
        ));
    }
    out.push(format!(
        "cost      {} (escrowed {})",
        v.cost.map_or_else(|| "-".into(), money),
        money(v.max_cost)
    ));
    if let Some(c) = v.exit_code {
        out.push(format!("exit code {c}"));
    }
    if let Some(o) = v.output_cid {
        out.push(format!(
            "outputs   {o} (`kiln job get {} -o DIR`; logs: `kiln job logs {}`)",
            &v.job_id.to_string()[..ID_PREFIX],
            &v.job_id.to_string()[..ID_PREFIX]
        ));
    }
    if let Some(ver) = &v.verification {
        out.push(format!("verified  {}", crate::verification_line(ver)));
    }
    let gang = v.gang_members();
    if gang.len() > 1 {
        for m in gang {
            out.push(format!(
                "rank {:<4} {} {}{}",
                m.rank,
                m.provider.short(),
                m.state,
                m.reason
                    .as_deref()
                    .map(|x| format!(": {}", term::line(x)))
                    .unwrap_or_default()
            ));
        }
    }
    if !v.events.is_empty() {
        out.push("events".into());
        for e in &v.events {
            let at = e.at.0.saturating_sub(v.created_at.0);
            out.push(format!(
                "  +{:>4}.{}s  {}{}",
                at / 1000,
                (at % 1000) / 100,
                e.state,
                e.detail
                    .as_deref()
                    .map(|d| format!(": {}", term::line(d)))
                    .unwrap_or_default()
            ));
        }
    }
    out.join("\n")
}

/// The price a node asks, for a table: per GPU-hour if it has GPUs.
fn price(gpus: usize, gpu: Credits, cpu: Credits) -> String {
    if gpus > 0 {
        format!("{}/GPU-h", money(gpu))
    } else {
        format!("{}/CPU-h", money(cpu))
    }
}

/// `kiln providers`.
pub fn providers_table(v: &ProvidersView, now: UnixMillis) -> String {
    let mut t = Table::new(&[
        ("PROVIDER", Align::Left),
        ("GPU", Align::Left),
        ("VRAM", Align::Right),
        ("TFLOP/S", Align::Right),
        ("CPUS", Align::Right),
        ("MEMORY", Align::Right),
        ("SLOTS", Align::Right),
        ("PRICE", Align::Right),
        ("REPUTATION", Align::Right),
        ("CACHED", Align::Right),
        ("SEEN", Align::Right),
    ]);
    for p in &v.providers {
        let gpu = p
            .gpus
            .first()
            .map_or_else(|| "-".into(), |g| format!("{}× {}", p.gpus.len(), g.name));
        let vram = p
            .gpus
            .iter()
            .map(|g| g.memory_total)
            .min()
            .map_or_else(|| "-".into(), |m| m.to_string());
        t.row(vec![
            p.provider.to_string(),
            gpu,
            vram,
            p.verified_tflops
                .map_or_else(|| "-".into(), |t| t.to_string()),
            p.cpu.logical_cores.to_string(),
            p.memory.to_string(),
            p.slots.to_string(),
            price(p.gpus.len(), p.price_per_gpu_hour, p.price_per_cpu_hour),
            p.reputation.to_string(),
            p.cached.len().to_string(),
            format!("{} ago", age(now.0.saturating_sub(p.last_seen.0))),
        ]);
    }
    t.render_or("no providers online")
}

/// `kiln offers search`.
pub fn offers_table(v: &OffersView) -> String {
    let mut t = Table::new(&[
        ("PROVIDER", Align::Left),
        ("REGION", Align::Left),
        ("GPU", Align::Left),
        ("VRAM", Align::Right),
        ("TFLOP/S", Align::Right),
        ("PRICE", Align::Right),
        ("FREE", Align::Right),
        ("REPUTATION", Align::Right),
        ("CACHED", Align::Right),
    ]);
    for o in &v.offers {
        let gpu = o
            .gpu_name
            .as_deref()
            .map_or_else(|| "-".into(), |g| format!("{}× {g}", o.num_gpus));
        t.row(vec![
            o.provider.to_string(),
            o.region.clone().unwrap_or_else(|| "-".into()),
            gpu,
            if o.num_gpus > 0 {
                o.vram.to_string()
            } else {
                "-".into()
            },
            o.tflops
                .filter(|t| *t > 0)
                .map_or_else(|| "-".into(), |t| t.to_string()),
            price(
                o.num_gpus as usize,
                o.price_per_gpu_hour,
                o.price_per_cpu_hour,
            ),
            format!("{}/{} slots", o.free_slots, o.slots),
            o.reputation.to_string(),
            o.cached.to_string(),
        ]);
    }
    let query = if v.query.is_empty() {
        String::new()
    } else {
        format!(" match `{}`", term::line(&v.query))
    };
    t.render_or(&format!("no providers{query}"))
}

/// What a ledger entry did, in words, for a statement line: a job's
/// settlement says what it cost and what came back, so nothing is worked
/// out by subtraction.
pub fn effect(e: &kiln_contracts::Applied) -> String {
    use kiln_contracts::Applied as A;
    let job = |j: &kiln_protocol::JobId| j.to_string()[..ID_PREFIX].to_string();
    match e {
        A::Deposited { .. } => "money in (recorded by the operator)".into(),
        A::Withdrawn { .. } => "money out (paid out by the operator)".into(),
        A::Locked { job: j, amount, .. } => {
            format!("job {}: {} held in escrow", job(j), money(*amount))
        }
        A::Released {
            job: j,
            cost,
            fee,
            refunded,
            ..
        } => format!(
            "job {} settled: cost {} (fee {}), {} back",
            job(j),
            money(*cost),
            money(*fee),
            money(*refunded)
        ),
        A::Refunded {
            job: j,
            refunded,
            already_paid,
            ..
        } => format!(
            "job {} settled: cost {}, {} back",
            job(j),
            money(*already_paid),
            money(*refunded)
        ),
        A::Staked { bond, .. } => format!("bonded; bond now {}", money(*bond)),
        A::Unstaked { bond, .. } => format!("unbonded; bond now {}", money(*bond)),
        A::Slashed {
            job: j,
            provider,
            taken,
            to_buyer,
            to_verifier,
            burned,
            ..
        } => format!(
            "job {}: provider {} slashed {} ({} to the buyer, {} to the verifier, {} burned)",
            job(j),
            provider.short(),
            money(*taken),
            money(*to_buyer),
            money(*to_verifier),
            money(*burned)
        ),
        A::IntervalSettled {
            job: j,
            interval,
            paid,
            fee,
            ..
        } => format!(
            "job {}: payment #{interval}, {} (fee {})",
            job(j),
            money(*paid),
            money(*fee)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_one_way() {
        assert_eq!(money(Credits(1_250_000)), "1.250000 cr");
        assert_eq!(delta(-250_000), "-0.250000 cr");
        assert_eq!(delta(3_000_001), "+3.000001 cr");
        assert_eq!(delta(0), "+0.000000 cr");
    }
}
