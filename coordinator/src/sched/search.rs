//! Offer search for people: `kiln offers search 'gpu_name=H100 num_gpus>=2 vram>=80GiB price<=2.5 region=eu'`.
//!
//! A query is whitespace-separated terms `field op value`, all of which must
//! hold (an empty query lists everything); `op` is one of `=`, `!=`, `>=`,
//! `<=`, `>`, `<`. Fields:
//!
//! | field | value | meaning |
//! |---|---|---|
//! | `gpu_name` (`gpu`) | model words, `_` for spaces (`RTX_4090`) | some GPU matches ([`gpu_model_matches`]); `=`/`!=` only |
//! | `num_gpus` | integer | GPUs on the node |
//! | `free_gpus` | integer | GPUs not reserved now |
//! | `vram` | size (`80GiB`, `80GB`) | memory of the node's smallest GPU |
//! | `compute_capability` (`cc`) | `8.6` | lowest of its GPUs |
//! | `tflops` | integer | verified TFLOP/s per GPU (unmeasured: 0) |
//! | `price` | credits (`2.5`, `2.5cr`) | what it charges: per GPU-hour on a GPU node, per CPU-hour on a CPU-only one |
//! | `gpu_price` | credits | per GPU-hour, as advertised (unused on a CPU-only node) |
//! | `cpu_price` | credits | per CPU-hour |
//! | `cpus`, `free_cpus` | CPUs (`8`, `0.5`) | |
//! | `memory`, `free_memory`, `disk`, `free_disk` | size | |
//! | `slots`, `free_slots` | integer | |
//! | `reputation` | 0..=1000 | |
//! | `region` | `eu`, `eu-west` | hierarchical ([`region_matches`]); `=`/`!=` only |
//! | `network` | `true`/`false` | the provider allows `network = "full"`; `=`/`!=` only |
//! | `cached` | a CID | the provider holds it; `=`/`!=` only |
//!
//! Errors name the offending term. Sorts: `price` (lowest first),
//! `tflops_per_price` (highest first), `reputation` (highest first); each
//! then by price and provider id.

use kiln_protocol::views::OfferView;
use std::cmp::Reverse;
use std::fmt;
use std::str::FromStr;

use kiln_protocol::spec::ComputeCapability;
use kiln_protocol::units::parse_byte_size;
use kiln_protocol::{ByteSize, ContentId, MilliCpu};
use serde::Serialize;

use super::fleet::Fleet;
use super::names::{gpu_model_matches, region_matches};

/// A query that could not be parsed: the term and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{token}`: {reason}")]
pub struct QueryError {
    pub token: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
}

impl Op {
    fn holds<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Self::Eq => a == b,
            Self::Ne => a != b,
            Self::Ge => a >= b,
            Self::Le => a <= b,
            Self::Gt => a > b,
            Self::Lt => a < b,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumField {
    NumGpus,
    FreeGpus,
    Vram,
    Tflops,
    /// What the node charges for what it sells: per GPU-hour on a GPU
    /// node, per CPU-hour on a CPU-only one.
    Price,
    GpuPrice,
    CpuPrice,
    Cpus,
    FreeCpus,
    Memory,
    FreeMemory,
    Disk,
    FreeDisk,
    Slots,
    FreeSlots,
    Reputation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Num(NumField, Op, u64),
    Cc(Op, ComputeCapability),
    GpuName(bool, String),
    Region(bool, String),
    Network(bool),
    Cached(bool, ContentId),
}

/// A parsed offer query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    terms: Vec<Term>,
}

const FIELDS: &str = "gpu_name, num_gpus, free_gpus, vram, compute_capability, tflops, price, gpu_price, cpu_price, \
     cpus, free_cpus, memory, free_memory, disk, free_disk, slots, free_slots, reputation, region, network, cached";

/// Credits as everywhere (`2.5`, `2.5cr`, `2500000µcr`) as micro-credits.
fn parse_credits(s: &str) -> Result<u64, String> {
    s.parse::<kiln_protocol::Credits>().map(|c| c.0)
}

fn parse_int(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a whole number"))
}

fn parse_cpus(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of CPUs"))?;
    if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
        return Err(format!("`{s}` is not a number of CPUs"));
    }
    Ok((v * 1000.0).round() as u64)
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "full" => Ok(true),
        "false" | "no" | "0" | "none" => Ok(false),
        _ => Err(format!("`{s}` is not true or false")),
    }
}

fn parse_term(token: &str) -> Result<Term, String> {
    let at = token
        .find(['=', '!', '<', '>'])
        .ok_or_else(|| "expected field, operator and value, e.g. num_gpus>=2".to_string())?;
    let (field, rest) = token.split_at(at);
    let (op, value) = [
        ("!=", Op::Ne),
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("=", Op::Eq),
        (">", Op::Gt),
        ("<", Op::Lt),
    ]
    .into_iter()
    .find_map(|(s, op)| rest.strip_prefix(s).map(|v| (op, v)))
    .ok_or_else(|| "unknown operator; use =, !=, >=, <=, > or <".to_string())?;
    if field.is_empty() {
        return Err("missing field name".into());
    }
    if value.is_empty() {
        return Err("missing value".into());
    }
    let equality = |what: &str| -> Result<bool, String> {
        match op {
            Op::Eq => Ok(true),
            Op::Ne => Ok(false),
            _ => Err(format!("{what} takes = or != only")),
        }
    };
    use NumField as F;
    let num = |f: NumField, parse: fn(&str) -> Result<u64, String>| {
        parse(value).map(|v| Term::Num(f, op, v))
    };
    match field.to_ascii_lowercase().as_str() {
        "gpu_name" | "gpu" | "gpu_model" => Ok(Term::GpuName(equality(field)?, value.to_string())),
        "region" => Ok(Term::Region(equality(field)?, value.to_string())),
        "network" => {
            let eq = equality(field)?;
            Ok(Term::Network(parse_bool(value)? == eq))
        }
        "cached" => Ok(Term::Cached(
            equality(field)?,
            value
                .parse()
                .map_err(|e| format!("`{value}` is not a CID: {e}"))?,
        )),
        "compute_capability" | "cc" => Ok(Term::Cc(op, value.parse()?)),
        "num_gpus" | "gpus" => num(F::NumGpus, parse_int),
        "free_gpus" => num(F::FreeGpus, parse_int),
        "vram" | "gpu_ram" => num(F::Vram, parse_byte_size),
        "tflops" => num(F::Tflops, parse_int),
        "price" => num(F::Price, parse_credits),
        "gpu_price" | "dph" => num(F::GpuPrice, parse_credits),
        "cpu_price" => num(F::CpuPrice, parse_credits),
        "cpus" => num(F::Cpus, parse_cpus),
        "free_cpus" => num(F::FreeCpus, parse_cpus),
        "memory" | "ram" => num(F::Memory, parse_byte_size),
        "free_memory" => num(F::FreeMemory, parse_byte_size),
        "disk" => num(F::Disk, parse_byte_size),
        "free_disk" => num(F::FreeDisk, parse_byte_size),
        "slots" => num(F::Slots, parse_int),
        "free_slots" => num(F::FreeSlots, parse_int),
        "reputation" => num(F::Reputation, parse_int),
        other => Err(format!("unknown field `{other}`; known: {FIELDS}")),
    }
}

impl FromStr for Query {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self, QueryError> {
        let terms = s
            .split_whitespace()
            .map(|t| {
                parse_term(t).map_err(|reason| QueryError {
                    token: t.to_string(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { terms })
    }
}

/// How to sort offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// Lowest price per GPU-hour (per CPU-hour for CPU-only nodes) first.
    #[default]
    Price,
    /// Most verified TFLOP/s per credit per GPU-hour first.
    TflopsPerPrice,
    /// Highest reputation first.
    Reputation,
}

impl FromStr for SortBy {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self, QueryError> {
        match s {
            "price" => Ok(Self::Price),
            "tflops_per_price" => Ok(Self::TflopsPerPrice),
            "reputation" => Ok(Self::Reputation),
            _ => Err(QueryError {
                token: s.to_string(),
                reason: "unknown sort; use price, tflops_per_price or reputation".into(),
            }),
        }
    }
}

impl fmt::Display for SortBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Price => "price",
            Self::TflopsPerPrice => "tflops_per_price",
            Self::Reputation => "reputation",
        })
    }
}

/// Online providers matching `query`, sorted by `sort`, at most `limit`.
pub fn search(fleet: &Fleet, query: &Query, sort: SortBy, limit: usize) -> Vec<OfferView> {
    let mut rows: Vec<(u64, OfferView)> = Vec::new();
    for (i, v) in fleet.iter() {
        let node = &fleet.nodes[i];
        let a = &v.advert;
        let gpus = node.gpus();
        let free = fleet.free(i);
        let vram = gpus.iter().map(|g| g.memory_total.0).min().unwrap_or(0);
        let cc = gpus
            .iter()
            .map(|g| ComputeCapability::from(g.compute_capability))
            .min();
        let num = |f: NumField| -> u64 {
            match f {
                NumField::NumGpus => gpus.len() as u64,
                NumField::FreeGpus => u64::from(free.gpus),
                NumField::Vram => vram,
                NumField::Tflops => u64::from(v.tflops.unwrap_or(0)),
                NumField::Price if gpus.is_empty() => a.price_per_cpu_hour.0,
                NumField::Price | NumField::GpuPrice => a.price_per_gpu_hour.0,
                NumField::CpuPrice => a.price_per_cpu_hour.0,
                NumField::Cpus => u64::from(a.millicpus()),
                NumField::FreeCpus => u64::from(free.millicpu),
                NumField::Memory => a.memory.0,
                NumField::FreeMemory => free.memory,
                NumField::Disk => a.disk.0,
                NumField::FreeDisk => free.disk,
                NumField::Slots => u64::from(a.slots),
                NumField::FreeSlots => u64::from(free.slots),
                NumField::Reputation => u64::from(v.reputation),
            }
        };
        let ok = query.terms.iter().all(|t| match t {
            Term::Num(f, op, x) => op.holds(num(*f), *x),
            Term::Cc(op, x) => cc.is_some_and(|cc| op.holds(cc, *x)),
            Term::GpuName(eq, m) => gpus.iter().any(|g| gpu_model_matches(m, &g.name)) == *eq,
            Term::Region(eq, r) => {
                a.region
                    .as_deref()
                    .is_some_and(|have| region_matches(r, have))
                    == *eq
            }
            Term::Network(want) => a.allows_network == *want,
            Term::Cached(eq, cid) => node.cached.binary_search(cid).is_ok() == *eq,
        });
        if !ok {
            continue;
        }
        let tpp = match (v.tflops, a.price_per_gpu_hour.0) {
            (None, _) | (Some(0), _) => 0.0,
            (Some(t), 0) => f64::from(t) * 1e6,
            (Some(t), p) => f64::from(t) * 1e6 / p as f64,
        };
        let price_key = if gpus.is_empty() {
            a.price_per_cpu_hour.0
        } else {
            a.price_per_gpu_hour.0
        };
        rows.push((
            price_key,
            OfferView {
                provider: v.id,
                region: a.region.clone(),
                gpu_name: gpus.first().map(|g| g.name.clone()),
                num_gpus: gpus.len() as u32,
                free_gpus: free.gpus,
                vram: ByteSize(vram),
                compute_capability: cc.map(|c| c.to_string()),
                tflops: v.tflops,
                price_per_gpu_hour: a.price_per_gpu_hour,
                price_per_cpu_hour: a.price_per_cpu_hour,
                tflops_per_price: tpp,
                cpus: MilliCpu(a.millicpus()),
                free_cpus: MilliCpu(free.millicpu),
                memory: a.memory,
                free_memory: ByteSize(free.memory),
                disk: a.disk,
                free_disk: ByteSize(free.disk),
                slots: a.slots,
                free_slots: free.slots,
                reputation: v.reputation,
                allows_network: a.allows_network,
                cached: node.cached.len(),
            },
        ));
    }
    let by_price = |a: &(u64, OfferView), b: &(u64, OfferView)| {
        (a.0, a.1.price_per_cpu_hour, a.1.provider).cmp(&(
            b.0,
            b.1.price_per_cpu_hour,
            b.1.provider,
        ))
    };
    match sort {
        SortBy::Price => rows.sort_by(by_price),
        SortBy::TflopsPerPrice => rows.sort_by(|a, b| {
            b.1.tflops_per_price
                .total_cmp(&a.1.tflops_per_price)
                .then_with(|| by_price(a, b))
        }),
        SortBy::Reputation => rows.sort_by(|a, b| {
            Reverse(a.1.reputation)
                .cmp(&Reverse(b.1.reputation))
                .then_with(|| by_price(a, b))
        }),
    }
    rows.into_iter().take(limit).map(|(_, r)| r).collect()
}
