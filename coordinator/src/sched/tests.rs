#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use kiln_protocol::spec::ComputeCapability;
use kiln_protocol::{
    ByteSize, CapabilityAdvert, ContentId, CpuInfo, Credits, GpuInfo, JobSpec, Keypair, MilliCpu,
    NetworkMode, ProviderId, Seconds, UnixMillis,
};

use kiln_protocol::spec::InputSpec;

use super::*;

const GIB: u64 = 1 << 30;
const H100: (&str, u64, (u32, u32)) = ("NVIDIA H100 80GB HBM3", 80, (9, 0));
const A100_40: (&str, u64, (u32, u32)) = ("NVIDIA A100-SXM4-40GB", 40, (8, 0));
const RTX4090: (&str, u64, (u32, u32)) = ("NVIDIA GeForce RTX 4090", 24, (8, 9));
const A10: (&str, u64, (u32, u32)) = ("NVIDIA A10", 24, (8, 6));

fn id(n: u8) -> ProviderId {
    ProviderId::from_public_key(&Keypair::from_secret_bytes([n; 32]).public())
}

/// A provider with 8 cores, 32 GiB, 4 slots, 1 cr per CPU-hour, no GPUs.
fn prov(n: u8) -> ProviderView {
    let id = id(n);
    ProviderView::new(CapabilityAdvert {
        provider: id,
        protocol_version: 1,
        node_version: "test".into(),
        listen_addrs: vec![],
        cpu: CpuInfo {
            model: "t".into(),
            logical_cores: 8,
            matmul_mflops: 1,
        },
        memory: ByteSize(32 * GIB),
        gpus: vec![],
        slots: 4,
        price_per_cpu_hour: Credits(1_000_000),
        price_per_gpu_hour: Credits(2_000_000),
        runtime: "runc".into(),
        allows_network: false,
        issued_at: UnixMillis(0),
        benchmark: None,
        region: None,
        disk: ByteSize(100 * GIB),
        cached: vec![],
        registries: Vec::new(),
    })
}

fn gpus(p: &mut ProviderView, n: u32, (name, vram, cc): (&str, u64, (u32, u32))) {
    let base = p.advert.gpus.len() as u32;
    for i in 0..n {
        p.advert.gpus.push(GpuInfo {
            index: base + i,
            uuid: format!("GPU-{}", base + i),
            name: name.into(),
            memory_total: ByteSize(vram * GIB),
            compute_capability: cc,
            driver_version: "580".into(),
            mig: None,
        });
    }
}

fn with(mut p: ProviderView, f: impl FnOnce(&mut ProviderView)) -> ProviderView {
    f(&mut p);
    p
}

/// 1 CPU, 1 GiB, no GPUs, up to 100 cr/h.
fn job() -> JobSpec {
    let mut s = JobSpec::new(format!("sha256:{}", "0".repeat(64)), vec![]);
    s.resources.cpus = MilliCpu(1000);
    s.resources.memory = ByteSize(GIB);
    s.resources.max_price_per_hour = Credits(100_000_000);
    s
}

fn job_with(f: impl FnOnce(&mut JobSpec)) -> JobSpec {
    let mut s = job();
    f(&mut s);
    s
}

fn gpu_job(n: u32) -> JobSpec {
    job_with(|s| s.resources.gpus = n)
}

fn cid(n: u8) -> ContentId {
    ContentId::of_bytes(&[n])
}

type Case = (
    &'static str,
    Vec<ProviderView>,
    // jobs already booked: (provider index, spec)
    Vec<(usize, JobSpec)>,
    JobSpec,
    // Ok(provider index) or Err(why-not line)
    Result<usize, &'static str>,
);

fn run_cases(cases: Vec<Case>) {
    for (name, views, booked, spec, want) in cases {
        let mut fleet = Fleet::from_views(views);
        for (i, b) in &booked {
            let id = fleet.view(*i).id;
            fleet.book(&id, b).unwrap();
        }
        let before = fleet.reservations();
        match (place(&spec, &mut fleet), want) {
            (Ok(p), Ok(i)) => {
                assert_eq!(p.index, i, "{name}");
                assert_eq!(fleet.reservations(), before + 1, "{name}: reserved");
            }
            (Err(np), Err(line)) => {
                assert_eq!(np.to_string(), line, "{name}");
                assert_eq!(fleet.reservations(), before, "{name}: nothing reserved");
                let total: usize = np.excluded().map(|(_, n)| n).sum::<usize>() + np.fit;
                assert_eq!(total, np.online, "{name}: every provider counted once");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_hard_constraint() {
    let h100 = |n| with(prov(n), |p| gpus(p, 2, H100));
    let cases: Vec<Case> = vec![
        (
            "empty fleet",
            vec![],
            vec![],
            job(),
            Err("waiting: no provider online"),
        ),
        ("fits", vec![prov(1)], vec![], job(), Ok(0)),
        (
            "network",
            vec![prov(1), with(prov(2), |p| p.advert.allows_network = true)],
            vec![],
            job_with(|s| s.network = NetworkMode::Full),
            Ok(1),
        ),
        (
            "network excludes",
            vec![prov(1)],
            vec![],
            job_with(|s| s.network = NetworkMode::Full),
            Err("waiting: 1 online; 1 excluded by network=full"),
        ),
        (
            "registry",
            vec![
                with(prov(1), |p| p.advert.registries = vec!["ghcr.io".into()]),
                with(prov(2), |p| {
                    p.advert.registries = vec!["127.0.0.1:5000".into()]
                }),
            ],
            vec![],
            job_with(|s| {
                s.image =
                    kiln_protocol::ImageRef(format!("127.0.0.1:5000/app@sha256:{}", "a".repeat(64)))
            }),
            Ok(1),
        ),
        (
            "registry excludes",
            vec![
                prov(1),
                with(prov(2), |p| p.advert.registries = vec!["ghcr.io".into()]),
            ],
            vec![],
            job_with(|s| {
                s.image = kiln_protocol::ImageRef(format!("busybox@sha256:{}", "a".repeat(64)))
            }),
            Err("waiting: 2 online; 2 excluded by registry=docker.io"),
        ),
        (
            "region is hierarchical",
            vec![
                with(prov(1), |p| p.advert.region = Some("us-east-1".into())),
                prov(2),
                with(prov(3), |p| p.advert.region = Some("europe".into())),
                with(prov(4), |p| p.advert.region = Some("EU-west-2".into())),
            ],
            vec![],
            job_with(|s| s.resources.region = Some("eu".into())),
            Ok(3),
        ),
        (
            "region excludes",
            vec![
                with(prov(1), |p| p.advert.region = Some("us-east-1".into())),
                prov(2),
                with(prov(3), |p| p.advert.region = Some("europe".into())),
            ],
            vec![],
            job_with(|s| s.resources.region = Some("eu".into())),
            Err("waiting: 3 online; 3 excluded by region=eu"),
        ),
        (
            "reputation",
            vec![with(prov(1), |p| p.reputation = 499), prov(2)],
            vec![],
            job_with(|s| s.resources.min_reputation = 500),
            Ok(1),
        ),
        (
            "reputation excludes",
            vec![with(prov(1), |p| p.reputation = 499)],
            vec![],
            job_with(|s| s.resources.min_reputation = 500),
            Err("waiting: 1 online; 1 excluded by min_reputation=500"),
        ),
        (
            "gpu count",
            vec![prov(1), with(prov(2), |p| gpus(p, 1, H100)), h100(3)],
            vec![],
            gpu_job(2),
            Ok(2),
        ),
        (
            "gpu count excludes",
            vec![prov(1), with(prov(2), |p| gpus(p, 1, H100))],
            vec![],
            gpu_job(2),
            Err("waiting: 2 online; 2 excluded by gpus=2"),
        ),
        (
            "gpu model by words: A10 is not A100",
            vec![
                with(prov(1), |p| gpus(p, 1, A100_40)),
                with(prov(2), |p| gpus(p, 1, A10)),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.gpu_models = vec!["a10".into()];
            }),
            Ok(1),
        ),
        (
            "gpu model with underscores",
            vec![
                with(prov(1), |p| gpus(p, 1, A100_40)),
                with(prov(2), |p| gpus(p, 1, RTX4090)),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.gpu_models = vec!["H100".into(), "RTX_4090".into()];
            }),
            Ok(1),
        ),
        (
            "gpu model excludes",
            vec![with(prov(1), |p| gpus(p, 1, A100_40)), prov(2)],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.gpu_models = vec!["A10".into(), "L4".into()];
            }),
            Err("waiting: 2 online; 1 excluded by gpus=1; 1 by gpu_models=A10,L4"),
        ),
        (
            "compute capability excludes",
            vec![with(prov(1), |p| gpus(p, 1, A100_40))],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_compute_capability = Some(ComputeCapability::new(8, 6));
            }),
            Err("waiting: 1 online; 1 excluded by min_compute_capability=8.6"),
        ),
        (
            "compute capability",
            vec![
                with(prov(1), |p| gpus(p, 1, A100_40)),
                with(prov(2), |p| gpus(p, 1, A10)),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_compute_capability = Some(ComputeCapability::new(8, 6));
            }),
            Ok(1),
        ),
        (
            "vram excludes",
            vec![with(prov(1), |p| gpus(p, 1, A100_40))],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_vram = ByteSize(80 * GIB);
            }),
            Err("waiting: 1 online; 1 excluded by min_vram=80GiB"),
        ),
        (
            "tflops: unmeasured and slow excluded",
            vec![
                h100(1),
                with(h100(2), |p| p.tflops = Some(399)),
                with(h100(3), |p| p.tflops = Some(400)),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 400;
            }),
            Ok(2),
        ),
        (
            "tflops excludes, saying what was verified",
            vec![h100(1), with(h100(2), |p| p.tflops = Some(399))],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 400;
            }),
            Err(
                "waiting: 2 online; 2 excluded by min_tflops=400 (verified figures: best 399, 1 none yet)",
            ),
        ),
        (
            "tflops: nothing verified yet",
            vec![h100(1), h100(2)],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 400;
            }),
            Err("waiting: 2 online; 2 excluded by min_tflops=400 (verified figures: none yet)"),
        ),
        (
            "tflops: verified below 1",
            vec![with(h100(1), |p| p.tflops = Some(0))],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 1;
            }),
            Err("waiting: 1 online; 1 excluded by min_tflops=1 (verified figures: best <1)"),
        ),
        (
            // Counted against the first constraint failed: the fast one is
            // too dear, and the figures quoted are those of the slow ones.
            "tflops and price",
            vec![
                with(h100(1), |p| p.tflops = Some(120)),
                with(h100(2), |p| {
                    p.tflops = Some(800);
                    p.advert.price_per_gpu_hour = Credits(900_000_000);
                }),
                with(h100(3), |p| p.tflops = Some(90)),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 400;
            }),
            Err(
                "waiting: 3 online; 2 excluded by min_tflops=400 (verified figures: best 120); 1 by max_price_per_hour=100.000000 cr",
            ),
        ),
        (
            "tflops: the figure that meets it wins though dearer",
            vec![
                with(h100(1), |p| p.tflops = Some(120)),
                with(h100(2), |p| {
                    p.tflops = Some(800);
                    p.advert.price_per_gpu_hour = Credits(9_000_000);
                }),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.resources.min_tflops = 400;
            }),
            Ok(1),
        ),
        (
            "price: 2 CPUs at 1 cr + 1 GPU at 2 cr",
            vec![h100(1)],
            vec![],
            job_with(|s| {
                s.resources.cpus = MilliCpu(2000);
                s.resources.gpus = 1;
                s.resources.max_price_per_hour = Credits(3_999_999);
            }),
            Err("waiting: 1 online; 1 excluded by max_price_per_hour=3.999999 cr"),
        ),
        (
            "cpus in all",
            vec![prov(1)],
            vec![],
            job_with(|s| s.resources.cpus = MilliCpu(8500)),
            Err("waiting: 1 online; 1 excluded by cpus=8.500"),
        ),
        (
            "memory in all",
            vec![prov(1)],
            vec![],
            job_with(|s| s.resources.memory = ByteSize(33 * GIB)),
            Err("waiting: 1 online; 1 excluded by memory=33GiB"),
        ),
        (
            "disk in all (none stated)",
            vec![with(prov(1), |p| p.advert.disk = ByteSize(0))],
            vec![],
            job_with(|s| s.resources.disk = ByteSize(10 * GIB)),
            Err("waiting: 1 online; 1 excluded by disk=10GiB"),
        ),
        (
            "slots: a draining provider advertises none",
            vec![with(prov(1), |p| p.advert.slots = 0)],
            vec![],
            job(),
            Err("waiting: 1 online; 1 excluded by slots"),
        ),
        (
            "slots all in use",
            vec![with(prov(1), |p| p.advert.slots = 1)],
            vec![(0, job())],
            job(),
            Err("waiting: 1 online; 1 excluded by slots"),
        ),
        (
            "free gpus",
            vec![h100(1)],
            vec![(0, gpu_job(1))],
            gpu_job(2),
            Err("waiting: 1 online; 1 excluded by free_gpus=2"),
        ),
        (
            "free cpus",
            vec![prov(1)],
            vec![(0, job_with(|s| s.resources.cpus = MilliCpu(7000)))],
            job_with(|s| s.resources.cpus = MilliCpu(2000)),
            Err("waiting: 1 online; 1 excluded by free_cpus=2"),
        ),
        (
            "free memory",
            vec![prov(1)],
            vec![(0, job_with(|s| s.resources.memory = ByteSize(31 * GIB)))],
            job_with(|s| s.resources.memory = ByteSize(2 * GIB)),
            Err("waiting: 1 online; 1 excluded by free_memory=2GiB"),
        ),
        (
            "free disk",
            vec![prov(1)],
            vec![(0, job_with(|s| s.resources.disk = ByteSize(95 * GIB)))],
            job_with(|s| s.resources.disk = ByteSize(10 * GIB)),
            Err("waiting: 1 online; 1 excluded by free_disk=10GiB"),
        ),
        (
            "a provider counts once against its first failed constraint, and under each it fails",
            vec![with(prov(1), |p| {
                p.advert.slots = 0;
                p.advert.memory = ByteSize(GIB);
                p.reputation = 0;
            })],
            vec![],
            job_with(|s| {
                s.resources.memory = ByteSize(2 * GIB);
                s.resources.min_reputation = 1;
            }),
            Err(
                "waiting: 1 online; 1 excluded by min_reputation=1; each constraint: min_reputation=1 fails 1, memory=2GiB fails 1, slots fails 1",
            ),
        ),
        (
            // Issue 15: cpus=64, a low price and a region were reported as
            // the region alone.
            "every constraint a provider fails is named",
            vec![
                prov(1),
                prov(2),
                with(prov(3), |p| p.advert.region = Some("eu-west-1".into())),
            ],
            vec![],
            job_with(|s| {
                s.resources.cpus = MilliCpu(64_000);
                s.resources.max_price_per_hour = Credits(10);
                s.resources.region = Some("eu".into());
            }),
            Err(
                "waiting: 3 online; 2 excluded by region=eu; 1 by max_price_per_hour=0.000010 cr; each constraint: region=eu fails 2, max_price_per_hour=0.000010 cr fails 3, cpus=64 fails 3",
            ),
        ),
    ];
    run_cases(cases);
}

#[test]
fn why_not_line_from_the_issue() {
    // 12 online; 9 have 40 GB GPUs; 3 have 80 GB but charge too much.
    let mut fleet: Vec<ProviderView> = (0..9)
        .map(|n| with(prov(n), |p| gpus(p, 2, A100_40)))
        .collect();
    fleet.extend((9..12).map(|n| {
        with(prov(n), |p| {
            gpus(p, 2, H100);
            p.advert.price_per_gpu_hour = Credits(9_000_000);
        })
    }));
    let spec = job_with(|s| {
        s.resources.gpus = 1;
        s.resources.min_vram = ByteSize(80 * GIB);
        s.resources.max_price_per_hour = Credits(5_000_000);
    });
    let np = place(&spec, &mut Fleet::from_views(fleet)).unwrap_err();
    assert_eq!(
        np.to_string(),
        "waiting: 12 online; 9 excluded by min_vram=80GiB; 3 by max_price_per_hour=5.000000 cr"
    );
    assert_eq!(np.count(Constraint::MinVram), 9);
    assert_eq!(
        CONSTRAINTS[Constraint::MaxPrice as usize],
        "max_price_per_hour"
    );
    for c in Constraint::ALL {
        assert_eq!(Constraint::ALL[c as usize], c);
    }
}

#[test]
fn unbonded_providers_are_counted_first() {
    let min_stake = Credits(5_000_000);
    // None online and none unbonded: the plain line.
    let np = place(&job(), &mut Fleet::from_views(vec![])).unwrap_err();
    assert_eq!(
        np.clone().with_unbonded(0, min_stake).to_string(),
        "waiting: no provider online"
    );
    // Only unbonded providers: they are online, and excluded by the stake.
    assert_eq!(
        np.with_unbonded(2, min_stake).to_string(),
        "waiting: 2 online; 2 excluded by min_stake=5.000000 cr"
    );
    // Mixed with a job constraint: stake first, then the constraints in order.
    let np = place(
        &job_with(|s| s.network = NetworkMode::Full),
        &mut Fleet::from_views(vec![prov(1)]),
    )
    .unwrap_err();
    assert_eq!(
        np.with_unbonded(1, min_stake).to_string(),
        "waiting: 2 online; 1 excluded by min_stake=5.000000 cr; 1 by network=full"
    );
}

#[test]
fn scoring_order() {
    let h100 = |n, tflops, rep| {
        with(prov(n), |p| {
            gpus(p, 1, H100);
            p.tflops = tflops;
            p.reputation = rep;
        })
    };
    let cheap = |p: ProviderView| with(p, |p| p.advert.price_per_cpu_hour = Credits(500_000));
    let (a, b) = (id(1), id(2));
    let smaller_id_index = usize::from(b < a);
    let inputs = |s: &mut JobSpec| {
        s.inputs = (0..3)
            .map(|i| InputSpec::new(cid(i), format!("/in/{i}")))
            .collect()
    };
    let cases: Vec<Case> = vec![
        (
            "lower price beats more TFLOP/s per price and reputation",
            vec![h100(1, Some(900), 900), cheap(h100(2, Some(100), 100))],
            vec![],
            gpu_job(1),
            Ok(1),
        ),
        (
            "equal price: more TFLOP/s per price",
            vec![h100(1, Some(500), 900), h100(2, Some(600), 100)],
            vec![],
            gpu_job(1),
            Ok(1),
        ),
        (
            "unmeasured throughput scores zero",
            vec![h100(1, None, 900), h100(2, Some(1), 100)],
            vec![],
            gpu_job(1),
            Ok(1),
        ),
        (
            "equal price and throughput: higher reputation",
            vec![h100(1, Some(500), 600), h100(2, Some(500), 700)],
            vec![],
            gpu_job(1),
            Ok(1),
        ),
        (
            "then more cached inputs (locality)",
            vec![
                with(h100(1, None, 500), |p| p.advert.cached = vec![cid(0)]),
                with(h100(2, None, 500), |p| {
                    p.advert.cached = vec![cid(2), cid(1), cid(9)]
                }),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                inputs(s);
            }),
            Ok(1),
        ),
        (
            "a provider holding the job's Kiln image counts it as cached",
            vec![
                h100(1, None, 500),
                with(h100(2, None, 500), |p| p.advert.cached = vec![image_cid()]),
                h100(3, None, 500),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                s.image = kiln_protocol::ImageRef(format!("kiln:{}", image_cid()));
            }),
            Ok(1),
        ),
        (
            "locality does not beat reputation",
            vec![
                with(h100(1, None, 501), |p| p.advert.cached = vec![]),
                with(h100(2, None, 500), |p| {
                    p.advert.cached = vec![cid(0), cid(1), cid(2)]
                }),
            ],
            vec![],
            job_with(|s| {
                s.resources.gpus = 1;
                inputs(s);
            }),
            Ok(0),
        ),
        (
            "then lower load (spread)",
            vec![prov(1), prov(2)],
            vec![(0, job())],
            job(),
            Ok(1),
        ),
        (
            "then the smaller provider id",
            vec![prov(1), prov(2)],
            vec![],
            job(),
            Ok(smaller_id_index),
        ),
    ];
    run_cases(cases);
}

#[test]
fn price_and_gpus_of_a_placement() {
    let mut fleet = Fleet::from_views([with(prov(1), |p| {
        gpus(p, 2, A100_40);
        gpus(p, 2, H100);
    })]);
    let spec = job_with(|s| {
        s.resources.cpus = MilliCpu(2000);
        s.resources.gpus = 2;
        s.resources.min_vram = ByteSize(80 * GIB);
    });
    let p = place(&spec, &mut fleet).unwrap();
    // Only the two H100s (advert indices 2 and 3) qualify.
    assert_eq!(p.gpus, vec![2, 3]);
    assert_eq!(p.price_per_hour, Credits(2 * 1_000_000 + 2 * 2_000_000));
    assert_eq!(fleet.free(0).gpus, 2);
    // The A100s are still free for a job that accepts them.
    let q = place(&gpu_job(2), &mut fleet).unwrap();
    assert_eq!(q.gpus, vec![0, 1]);
    assert_eq!(
        place(&gpu_job(1), &mut fleet).unwrap_err().to_string(),
        "waiting: 1 online; 1 excluded by free_gpus=1"
    );
}

#[test]
fn reservations_are_released_once() {
    let mut fleet = Fleet::from_views([with(prov(1), |p| {
        p.advert.slots = 1;
        gpus(p, 1, H100);
    })]);
    let p = place(&gpu_job(1), &mut fleet).unwrap();
    assert!(place(&gpu_job(1), &mut fleet).is_err());
    assert!(fleet.release(&p));
    assert!(!fleet.release(&p), "a second release is a no-op");
    assert_eq!(fleet.free(0).gpus, 1);
    let q = place(&gpu_job(1), &mut fleet).unwrap();
    // Releasing the stale first placement again must not free q's GPU.
    assert!(!fleet.release(&p));
    assert_eq!(fleet.free(0).gpus, 0);
    assert_eq!(fleet.free(0).slots, 0);
    assert!(fleet.release(&q));
    assert_eq!(
        fleet.free(0),
        Free {
            slots: 1,
            gpus: 1,
            millicpu: 8000,
            memory: 32 * GIB,
            disk: 100 * GIB
        }
    );
}

#[test]
fn gangs_are_all_or_nothing_on_distinct_nodes() {
    let node = |n: u8, price| {
        with(prov(n), |p| {
            gpus(p, 8, H100);
            p.advert.price_per_gpu_hour = Credits(price);
        })
    };
    let gang = |n| {
        job_with(|s| {
            s.resources.gpus = 8;
            s.resources.gang = n;
        })
    };
    let mut fleet = Fleet::from_views([
        node(1, 3_000_000),
        node(2, 1_000_000),
        node(3, 2_000_000),
        prov(4),
    ]);
    // `place` refuses a gang rather than running it on one node.
    let np = place(&gang(2), &mut fleet).unwrap_err();
    assert!(np.gang_unsupported);
    assert!(np.to_string().contains("gang=2"), "{np}");

    let ps = place_gang(&gang(2), &mut fleet).unwrap();
    assert_eq!(
        ps.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![1, 2],
        "cheapest two"
    );
    assert!(ps.iter().all(|p| p.gpus.len() == 8));
    assert_eq!(fleet.reservations(), 2);

    // Two more nodes are needed and only one is free: nothing is reserved.
    let np = place_gang(&gang(2), &mut fleet).unwrap_err();
    assert_eq!(fleet.reservations(), 2);
    assert_eq!(
        np.to_string(),
        "waiting: 4 online; 1 fit but gang=2 needs 2 nodes; 1 excluded by gpus=8; 2 by free_gpus=8"
    );
    for p in &ps {
        assert!(fleet.release(p));
    }
    let three = place_gang(&gang(3), &mut fleet).unwrap();
    let distinct: HashSet<usize> = three.iter().map(|p| p.index).collect();
    assert_eq!(distinct.len(), 3);
    // gang = 1 through place_gang is an ordinary placement.
    for p in &three {
        fleet.release(p);
    }
    assert_eq!(place_gang(&gang(1), &mut fleet).unwrap().len(), 1);
}

#[test]
fn heartbeats_keep_the_cache_and_changes_rebuild_it() {
    let mut fleet = Fleet::from_views([prov(1), prov(2)]);
    let cheap_first = place(&job(), &mut fleet).unwrap();
    assert_eq!(fleet.shapes_built(), 1);
    // A heartbeat: same advert, newer timestamp, more memory.
    let beat = with(prov(1), |p| {
        p.advert.issued_at = UnixMillis(99);
        p.advert.memory = ByteSize(64 * GIB);
    });
    fleet.upsert(beat);
    place(&job(), &mut fleet).unwrap();
    assert_eq!(fleet.shapes_built(), 1, "no rebuild on a heartbeat");
    assert_eq!(
        fleet.free(0).memory + GIB * u64::from(fleet.running(0)),
        64 * GIB
    );
    // A price change does rebuild, and changes the choice.
    let other = 1 - cheap_first.index;
    let cheaper = with(fleet.view(other).clone(), |p| {
        p.advert.price_per_cpu_hour = Credits(1)
    });
    fleet.upsert(cheaper);
    assert_eq!(place(&job(), &mut fleet).unwrap().index, other);
    assert_eq!(fleet.shapes_built(), 2);
    // A provider that leaves is not used, and its reservations can still be released.
    let gone = fleet.view(other).id;
    assert!(fleet.remove(&gone));
    assert_eq!(fleet.online(), 1);
    assert!(place(&job(), &mut fleet).is_ok_and(|p| p.index != other));
    assert!(fleet.release(&cheap_first));
    // It comes back at the same index with its bookings.
    let back = fleet.upsert(fleet.view(other).clone());
    assert_eq!(back, other);
    assert_eq!(fleet.online(), 2);
}

#[test]
fn booking_existing_work_never_fails() {
    let mut fleet = Fleet::from_views([with(prov(1), |p| {
        p.advert.slots = 1;
        gpus(p, 1, H100);
    })]);
    let id = fleet.view(0).id;
    fleet.book(&id, &gpu_job(1)).unwrap();
    // Over capacity (the advert shrank, or the node took two): recorded, nothing free.
    let b = fleet.book(&id, &gpu_job(1)).unwrap();
    assert!(b.gpus.is_empty());
    assert_eq!(fleet.free(0).slots, 0);
    assert!(fleet.book(&self::id(9), &job()).is_none());
}

// ---------------------------------------------------------------------------
// Queue.

fn queued(spec: JobSpec, at: u64) -> (JobSpec, UnixMillis) {
    (spec, UnixMillis(at))
}

#[test]
fn order_is_priority_then_submission() {
    let pri = |p| job_with(|s| s.resources.priority = p);
    let mut q = vec![
        queued(pri(0), 3),
        queued(pri(5), 9),
        queued(pri(0), 1),
        queued(pri(-1), 0),
        queued(pri(5), 2),
    ];
    order(&mut q);
    let got: Vec<(i32, u64)> = q.iter().map(|(s, t)| (s.resources.priority, t.0)).collect();
    assert_eq!(got, vec![(5, 2), (5, 9), (0, 1), (0, 3), (-1, 0)]);
}

#[test]
fn a_large_job_does_not_block_small_ones() {
    let mut fleet = Fleet::from_views([with(prov(1), |p| gpus(p, 2, H100))]);
    let q = vec![
        queued(gpu_job(4), 0),
        queued(gpu_job(1), 1),
        queued(gpu_job(1), 2),
    ];
    let d = run_round(&q, &mut fleet, UnixMillis(10), &RoundPolicy::default());
    assert!(matches!(&d[0], Decision::Waiting(np) if np.to_string().contains("gpus=4")));
    assert!(matches!(&d[1], Decision::Placed(p) if p.len() == 1));
    assert!(matches!(&d[2], Decision::Placed(p) if p.len() == 1));
}

#[test]
fn jobs_past_their_deadline_expire_unplaced() {
    let mut fleet = Fleet::from_views([prov(1)]);
    let late = job_with(|s| s.resources.deadline = Some(Seconds(60)));
    let q = vec![queued(late.clone(), 0), queued(late, 1)];
    // At 60 s the first is due (60 s since 0 ms), the second not yet.
    let d = run_round(&q, &mut fleet, UnixMillis(60_000), &RoundPolicy::default());
    assert_eq!(d[0], Decision::Expired);
    assert!(matches!(d[1], Decision::Placed(_)));
    assert_eq!(fleet.reservations(), 1);
}

/// A stream of 1-GPU jobs keeps an 8-GPU node busy; an 8-GPU job submitted
/// first never fits unless it may hold the node.
fn starvation(policy: &RoundPolicy) -> Option<u64> {
    let mut fleet = Fleet::from_views([with(prov(1), |p| {
        gpus(p, 8, H100);
        p.advert.slots = 8;
    })]);
    let big = queued(gpu_job(8), 0);
    let mut running: Vec<Placement> = Vec::new();
    let mut next_small = 1;
    // Fill the node.
    for _ in 0..8 {
        running.push(place(&gpu_job(1), &mut fleet).unwrap());
    }
    for round in 1..=60u64 {
        let now = round * 60_000; // a round a minute
        // One small job finishes each round…
        if !running.is_empty() {
            fleet.release(&running.remove(0));
        }
        // …and two new ones are always waiting behind the big one.
        let q = vec![
            big.clone(),
            queued(gpu_job(1), next_small),
            queued(gpu_job(1), next_small + 1),
        ];
        let d = run_round(&q, &mut fleet, UnixMillis(now), policy);
        match &d[0] {
            Decision::Placed(_) => return Some(round),
            Decision::Waiting(np) => {
                let held = np.holding > 0;
                assert_eq!(
                    held,
                    now >= 300_000 && policy.max_holding_jobs > 0,
                    "round {round}: {np}"
                );
                if held {
                    assert!(
                        np.to_string().ends_with("holding 1 provider for it"),
                        "{np}"
                    );
                }
            }
            Decision::Expired => unreachable!(),
        }
        for x in &d[1..] {
            match x {
                Decision::Placed(p) => {
                    next_small += 1;
                    running.extend(p.iter().cloned());
                }
                Decision::Waiting(np) if now >= 300_000 && policy.max_holding_jobs > 0 => {
                    // Kept off the held node, and told why.
                    assert!(np.count(Constraint::Held) + np.count(Constraint::FreeGpus) == 1);
                }
                _ => {}
            }
        }
    }
    None
}

#[test]
fn a_starving_job_holds_a_node_until_it_fits() {
    let never = RoundPolicy {
        max_holding_jobs: 0,
        ..RoundPolicy::default()
    };
    assert_eq!(
        starvation(&never),
        None,
        "without holds the big job starves"
    );
    // Default: starving after 5 minutes (round 5), then the node drains one
    // job a round: placed by round 5 + 8.
    let placed = starvation(&RoundPolicy::default()).unwrap();
    assert!((5..=13).contains(&placed), "{placed}");
}

#[test]
fn holds_are_limited_and_lapse_after_the_round() {
    let mut fleet = Fleet::from_views((1..=4).map(|n| with(prov(n), |p| gpus(p, 1, H100))));
    for _ in 0..4 {
        place(&gpu_job(1), &mut fleet).unwrap();
    }
    let policy = RoundPolicy {
        starve_after: Duration::from_secs(1),
        max_holding_jobs: 2,
    };
    let q: Vec<_> = (0..3).map(|i| queued(gpu_job(1), i)).collect();
    let d = run_round(&q, &mut fleet, UnixMillis(10_000), &policy);
    let holding: Vec<u32> = d
        .iter()
        .map(|d| match d {
            Decision::Waiting(np) => np.holding,
            _ => 99,
        })
        .collect();
    assert_eq!(holding, vec![1, 1, 0]);
    // Outside a round nothing is held.
    for i in 0..4 {
        let l = &fleet.load[i];
        assert!(l.held_round != fleet.round);
    }
}

// ---------------------------------------------------------------------------
// Search.

#[test]
fn search_filters_and_sorts() {
    let views = vec![
        with(prov(1), |p| {
            gpus(p, 8, H100);
            p.advert.region = Some("eu-west-1".into());
            p.advert.price_per_gpu_hour = Credits(2_500_000);
            p.tflops = Some(700);
            p.reputation = 900;
        }),
        with(prov(2), |p| {
            gpus(p, 2, H100);
            p.advert.region = Some("eu-central".into());
            p.advert.price_per_gpu_hour = Credits(2_000_000);
            p.tflops = Some(400);
            p.reputation = 600;
        }),
        with(prov(3), |p| {
            gpus(p, 4, RTX4090);
            p.advert.region = Some("us-east".into());
            p.advert.price_per_gpu_hour = Credits(400_000);
            p.tflops = Some(160);
        }),
        prov(4),
    ];
    let fleet = Fleet::from_views(views);
    let ids = |rows: Vec<kiln_protocol::views::OfferView>| -> Vec<ProviderId> {
        rows.into_iter().map(|r| r.provider).collect()
    };
    let q: Query = "gpu_name=H100 num_gpus>=2 vram>=80GiB price<=2.5 region=eu"
        .parse()
        .unwrap();
    assert_eq!(
        ids(search(&fleet, &q, SortBy::Price, 10)),
        vec![id(2), id(1)]
    );
    assert_eq!(
        ids(search(&fleet, &q, SortBy::Reputation, 10)),
        vec![id(1), id(2)]
    );
    assert_eq!(ids(search(&fleet, &q, SortBy::Price, 1)), vec![id(2)]);
    let all = Query::default();
    // 4090: 160/0.4 = 400 per credit; 8×H100: 280; 2×H100: 200; CPU-only: 0.
    assert_eq!(
        ids(search(&fleet, &all, SortBy::TflopsPerPrice, 10)),
        vec![id(3), id(1), id(2), id(4)]
    );
    let q: Query = "gpu=rtx_4090 cc>=8.9 region!=eu".parse().unwrap();
    assert_eq!(ids(search(&fleet, &q, SortBy::Price, 10)), vec![id(3)]);
    let q: Query = "num_gpus=0 cpus>=8 memory>=32GiB network=false"
        .parse()
        .unwrap();
    assert_eq!(ids(search(&fleet, &q, SortBy::Price, 10)), vec![id(4)]);
    let row = &search(&fleet, &"num_gpus=8".parse().unwrap(), SortBy::Price, 10)[0];
    assert_eq!(
        (row.free_gpus, row.vram, row.compute_capability.as_deref()),
        (8, ByteSize(80 * GIB), Some("9.0"))
    );
    let js = serde_json::to_value(row).unwrap();
    assert_eq!(js["gpu_name"], "NVIDIA H100 80GB HBM3");
    // `price` is what a node charges for what it sells: a CPU-only node
    // (prov's default: 1 cr per CPU-hour, 2 cr per GPU-hour it has no GPU
    // for) is judged on its CPU price, not on the GPU price it never uses.
    let price = |q: &str| ids(search(&fleet, &q.parse().unwrap(), SortBy::Price, 10));
    assert_eq!(price("num_gpus=0 price<=1cr"), vec![id(4)]);
    assert_eq!(price("num_gpus=0 price<1"), Vec::<ProviderId>::new());
    assert_eq!(price("num_gpus=0 gpu_price<=1"), Vec::<ProviderId>::new());
    assert_eq!(price("num_gpus=0 cpu_price<=1000000µcr"), vec![id(4)]);
}

#[test]
fn search_errors_name_the_term() {
    let table = [
        (
            "num_gpus>=2 vram>=80XB",
            "`vram>=80XB`",
            "unknown size unit",
        ),
        ("gpu_name~H100", "`gpu_name~H100`", "expected field"),
        ("colour=red", "`colour=red`", "unknown field `colour`"),
        ("price<=2.1234567", "`price<=2.1234567`", "credits"),
        ("region>=eu", "`region>=eu`", "= or != only"),
        ("num_gpus>=", "`num_gpus>=`", "missing value"),
        ("cc>=nine", "`cc>=nine`", "compute capability"),
        ("num_gpus=>2", "`num_gpus=>2`", "whole number"),
    ];
    for (q, token, reason) in table {
        let e = q.parse::<Query>().unwrap_err().to_string();
        assert!(e.starts_with(token) && e.contains(reason), "{q}: {e}");
    }
    assert!("fastest".parse::<SortBy>().is_err());
    assert_eq!(
        "tflops_per_price".parse::<SortBy>().unwrap(),
        SortBy::TflopsPerPrice
    );
}

#[test]
fn names_and_regions_match_by_words() {
    assert!(gpu_model_matches("h100", "NVIDIA H100 80GB HBM3"));
    assert!(gpu_model_matches("H100_80GB", "NVIDIA H100 80GB HBM3"));
    assert!(gpu_model_matches("a100 sxm4", "NVIDIA A100-SXM4-40GB"));
    assert!(!gpu_model_matches("A10", "NVIDIA A100-SXM4-40GB"));
    assert!(!gpu_model_matches("80GB H100", "NVIDIA H100 80GB HBM3"));
    assert!(!gpu_model_matches("", "NVIDIA A10"));
    assert!(region_matches("eu", "eu"));
    assert!(region_matches("EU", "eu-west-1"));
    assert!(region_matches("eu-west", "eu-west-1"));
    assert!(!region_matches("eu-west-1", "eu-west"));
    assert!(!region_matches("eu", "europe"));
}

// ---------------------------------------------------------------------------
// Properties.

mod props {
    use super::*;
    use proptest::prelude::*;

    const MODELS: [(&str, u64, (u32, u32)); 4] = [H100, A100_40, RTX4090, A10];

    prop_compose! {
        fn arb_provider(n: u8)(
            cores in 1u32..16,
            mem in 1u64..64,
            disk in prop::sample::select(vec![0u64, 10, 100, 500]),
            gpu_models in prop::collection::vec(0usize..4, 0..=8),
            slots in prop::sample::select(vec![0u32, 1, 2, 3, 4, 6]),
            cpu_price in prop::sample::select(vec![0u64, 100_000, 200_000, 1_000_000]),
            gpu_price in prop::sample::select(vec![0u64, 1_000_000, 2_000_000, 3_000_000]),
            region in prop::sample::select(vec![None, Some("us-east"), Some("eu-west"), Some("EU-central-1"), Some("europe")]),
            reputation in (0u32..=10).prop_map(|r| r * 100),
            tflops in prop::sample::select(vec![None, Some(100u32), Some(300), Some(700)]),
            network in any::<bool>(),
            cached in prop::collection::vec(0u8..6, 0..3),
        ) -> ProviderView {
            with(prov(n), |p| {
                p.advert.cpu.logical_cores = cores;
                p.advert.memory = ByteSize(mem * GIB);
                p.advert.disk = ByteSize(disk * GIB);
                for m in gpu_models {
                    gpus(p, 1, MODELS[m]);
                }
                p.advert.slots = slots;
                p.advert.price_per_cpu_hour = Credits(cpu_price);
                p.advert.price_per_gpu_hour = Credits(gpu_price);
                p.advert.region = region.map(String::from);
                p.reputation = reputation;
                p.tflops = tflops;
                p.advert.allows_network = network;
                p.advert.cached = cached.into_iter().map(cid).collect();
            })
        }
    }

    fn arb_fleet() -> impl Strategy<Value = Vec<ProviderView>> {
        (1u8..12).prop_flat_map(|n| (0..n).map(arb_provider).collect::<Vec<_>>())
    }

    prop_compose! {
        fn arb_job()(
            cpus in prop::sample::select(vec![500u32, 1000, 2000, 4000, 8000]),
            mem in prop::sample::select(vec![1u64, 2, 8, 32]),
            gpus in prop::sample::select(vec![0u32, 0, 0, 1, 1, 2, 4]),
            models in prop::sample::select(vec![vec![], vec!["H100"], vec!["A100", "RTX_4090"], vec!["a10"]]),
            cc in prop::sample::select(vec![None, Some((8u32, 0u32)), Some((8, 9)), Some((9, 0))]),
            vram in prop::sample::select(vec![0u64, 24, 40, 80]),
            tflops in prop::sample::select(vec![0u32, 200, 500]),
            disk in prop::sample::select(vec![0u64, 10, 100]),
            region in prop::sample::select(vec![None, None, None, Some("eu"), Some("us-east"), Some("Eu-West")]),
            min_rep in prop::sample::select(vec![0u32, 0, 0, 300, 700]),
            max_price in prop::sample::select(vec![500_000u64, 2_000_000, 5_000_000, 20_000_000, 50_000_000]),
            network in prop::bool::weighted(0.2),
            gang in prop::sample::select(vec![1u32, 1, 1, 2, 3]),
            inputs in prop::collection::vec(0u8..6, 0..3),
        ) -> JobSpec {
            job_with(|s| {
                let r = &mut s.resources;
                r.cpus = MilliCpu(cpus);
                r.memory = ByteSize(mem * GIB);
                r.gpus = gpus;
                if gpus > 0 {
                    r.gpu_models = models.into_iter().map(String::from).collect();
                    r.min_compute_capability = cc.map(ComputeCapability::from);
                    r.min_vram = ByteSize(vram * GIB);
                    r.min_tflops = tflops;
                }
                r.disk = ByteSize(disk * GIB);
                r.region = region.map(String::from);
                r.min_reputation = min_rep;
                r.max_price_per_hour = Credits(max_price);
                r.gang = gang;
                if network {
                    s.network = NetworkMode::Full;
                }
                s.inputs = inputs.into_iter().enumerate().map(|(i, c)| InputSpec::new(cid(c), format!("/in/{i}"))).collect();
            })
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Place(JobSpec),
        Release(usize),
        Reprice(usize, u64, u32),
        Remove(usize),
        Readd(usize),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => arb_job().prop_map(Op::Place),
            3 => any::<usize>().prop_map(Op::Release),
            1 => (any::<usize>(), 0u64..3_000_000, 0u32..=1000).prop_map(|(i, p, r)| Op::Reprice(i, p, r)),
            1 => any::<usize>().prop_map(Op::Remove),
            1 => any::<usize>().prop_map(Op::Readd),
        ]
    }

    /// The GPUs of `v` that qualify for `spec`, by an independent reading of the rules.
    fn qualifying(v: &ProviderView, spec: &JobSpec) -> Vec<u32> {
        let r = &spec.resources;
        let norm = |s: &str| -> Vec<String> {
            s.to_lowercase()
                .replace(['_', '-'], " ")
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        v.advert
            .gpus
            .iter()
            .filter(|g| {
                let name = norm(&g.name);
                (r.gpu_models.is_empty()
                    || r.gpu_models.iter().any(|m| {
                        let m = norm(m);
                        (0..name.len()).any(|i| name[i..].starts_with(&m))
                    }))
                    && r.min_compute_capability.is_none_or(|cc| {
                        (g.compute_capability.0, g.compute_capability.1) >= (cc.major, cc.minor)
                    })
                    && g.memory_total >= r.min_vram
            })
            .map(|g| g.index)
            .collect()
    }

    /// Whether `v` satisfies every static hard constraint of `spec`.
    fn statically_ok(v: &ProviderView, spec: &JobSpec) -> bool {
        let r = &spec.resources;
        let a = &v.advert;
        (spec.network == NetworkMode::Isolated || a.allows_network)
            && r.region.as_ref().is_none_or(|want| {
                let have = a.region.clone().unwrap_or_default().to_lowercase();
                let want = want.to_lowercase();
                have == want || have.starts_with(&format!("{want}-"))
            })
            && v.reputation >= r.min_reputation
            && qualifying(v, spec).len() >= r.gpus as usize
            && (r.min_tflops == 0 || v.tflops.unwrap_or(0) >= r.min_tflops)
            && a.price_per_hour(spec)
                .is_some_and(|p| p <= r.max_price_per_hour)
            && a.millicpus() >= r.cpus.0
            && a.memory >= r.memory
            && a.disk >= r.disk
    }

    #[derive(Default)]
    struct Model {
        /// reservation → (provider, spec, GPU indices)
        live: Vec<(Placement, JobSpec)>,
    }

    impl Model {
        fn on(&self, p: ProviderId) -> impl Iterator<Item = &(Placement, JobSpec)> {
            self.live.iter().filter(move |(pl, _)| pl.provider == p)
        }
        /// Whether one node of `spec` fits on `v` now, by the model's books.
        fn fits(&self, v: &ProviderView, spec: &JobSpec) -> bool {
            let r = &spec.resources;
            let used: HashSet<u32> = self.on(v.id).flat_map(|(p, _)| p.gpus.clone()).collect();
            let free_q = qualifying(v, spec)
                .into_iter()
                .filter(|g| !used.contains(g))
                .count();
            let n = self.on(v.id).count() as u32;
            let mcpu: u32 = self.on(v.id).map(|(_, s)| s.resources.cpus.0).sum();
            let mem: u64 = self.on(v.id).map(|(_, s)| s.resources.memory.0).sum();
            let disk: u64 = self.on(v.id).map(|(_, s)| s.resources.disk.0).sum();
            statically_ok(v, spec)
                && n < v.advert.slots
                && free_q >= r.gpus as usize
                && v.advert.millicpus() - mcpu >= r.cpus.0
                && v.advert.memory.0 - mem >= r.memory.0
                && v.advert.disk.0 - disk >= r.disk.0
        }
        /// No GPU or slot (or CPU, memory, disk) is booked twice.
        fn check_books(&self, fleet: &Fleet) {
            for (i, v) in fleet.nodes.iter().enumerate() {
                let v = &v.view;
                let on: Vec<_> = self.on(v.id).collect();
                assert!(on.len() as u32 <= v.advert.slots, "slots double-booked");
                let mut seen = HashSet::new();
                for (p, s) in &on {
                    assert_eq!(p.gpus.len() as u32, s.resources.gpus);
                    for g in &p.gpus {
                        assert!(
                            v.advert.gpus.iter().any(|x| x.index == *g),
                            "GPU {g} does not exist"
                        );
                        assert!(seen.insert(*g), "GPU {g} double-booked on {}", v.id);
                    }
                }
                let mcpu: u32 = on.iter().map(|(_, s)| s.resources.cpus.0).sum();
                let mem: u64 = on.iter().map(|(_, s)| s.resources.memory.0).sum();
                let disk: u64 = on.iter().map(|(_, s)| s.resources.disk.0).sum();
                assert!(
                    mcpu <= v.advert.millicpus()
                        && mem <= v.advert.memory.0
                        && disk <= v.advert.disk.0
                );
                // The fleet's books agree with the model's.
                let f = fleet.free(i);
                assert_eq!(
                    (f.slots, f.gpus, f.millicpu, f.memory, f.disk),
                    (
                        v.advert.slots - on.len() as u32,
                        v.advert.gpus.len() as u32 - seen.len() as u32,
                        v.advert.millicpus() - mcpu,
                        v.advert.memory.0 - mem,
                        v.advert.disk.0 - disk
                    )
                );
            }
            assert_eq!(fleet.reservations(), self.live.len());
        }
    }

    /// Checks one successful placement of one node against the rules.
    fn check_placement(fleet: &Fleet, model: &Model, p: &Placement, spec: &JobSpec) {
        let v = fleet.view(p.index);
        assert_eq!(v.id, p.provider);
        assert!(
            fleet.index_of(&p.provider).is_some(),
            "placed on a provider that left"
        );
        assert!(
            statically_ok(v, spec),
            "hard constraint violated on {}",
            v.id
        );
        let q = qualifying(v, spec);
        assert!(
            p.gpus.iter().all(|g| q.contains(g)),
            "non-qualifying GPU assigned"
        );
        assert_eq!(Some(p.price_per_hour), v.advert.price_per_hour(spec));
        assert!(model.fits(v, spec), "placed where it does not fit");
    }

    fn apply(fleet: &mut Fleet, model: &mut Model, views: &[ProviderView], op: Op) {
        match op {
            Op::Place(spec) => {
                let k = spec.resources.gang.max(1) as usize;
                let before = fleet.reservations();
                let result = place_gang(&spec, fleet);
                let online: Vec<&ProviderView> = fleet.iter().map(|(_, v)| v).collect();
                let fitting: Vec<&&ProviderView> =
                    online.iter().filter(|v| model.fits(v, &spec)).collect();
                match result {
                    Ok(ps) => {
                        assert_eq!(ps.len(), k);
                        let distinct: HashSet<_> = ps.iter().map(|p| p.provider).collect();
                        assert_eq!(distinct.len(), k, "gang nodes must be distinct");
                        for p in &ps {
                            check_placement(fleet, model, p, &spec);
                        }
                        // The cheapest fitting provider was chosen first.
                        let best = fitting
                            .iter()
                            .filter_map(|v| v.advert.price_per_hour(&spec))
                            .min()
                            .unwrap();
                        assert_eq!(ps[0].price_per_hour, best);
                        for p in ps {
                            model.live.push((p, spec.clone()));
                        }
                    }
                    Err(np) => {
                        assert_eq!(
                            fleet.reservations(),
                            before,
                            "a failed gang reserves nothing"
                        );
                        assert!(
                            fitting.len() < k,
                            "{} fit, {k} needed, yet: {np}",
                            fitting.len()
                        );
                        assert_eq!(np.fit, fitting.len());
                        let total: usize = np.excluded().map(|(_, n)| n).sum::<usize>() + np.fit;
                        assert_eq!(total, np.online);
                        assert_eq!(np.online, online.len());
                    }
                }
            }
            Op::Release(i) => {
                if !model.live.is_empty() {
                    let (p, _) = model.live.swap_remove(i % model.live.len());
                    assert!(fleet.release(&p));
                    assert!(!fleet.release(&p));
                }
            }
            Op::Reprice(i, price, rep) => {
                let i = i % views.len();
                if fleet.index_of(&views[i].id).is_some() {
                    let v = with(fleet.view(i).clone(), |v| {
                        v.advert.price_per_gpu_hour = Credits(price);
                        v.reputation = rep;
                    });
                    fleet.upsert(v);
                }
            }
            Op::Remove(i) => {
                fleet.remove(&views[i % views.len()].id);
            }
            Op::Readd(i) => {
                let i = i % views.len();
                if fleet.index_of(&views[i].id).is_none() {
                    fleet.upsert(views[i].clone());
                }
            }
        }
        model.check_books(fleet);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Random fleets and job streams (with gangs, releases, price and
        /// reputation changes, providers leaving and coming back): no GPU,
        /// slot, CPU, memory or disk is ever double-booked; no placement
        /// violates a hard constraint; a job waits only when fewer providers
        /// fit than it needs; the cheapest fitting provider is chosen.
        #[test]
        fn never_double_books_nor_violates_constraints(
            views in arb_fleet(),
            ops in prop::collection::vec(arb_op(), 1..120),
        ) {
            let mut fleet = Fleet::from_views(views.clone());
            let mut model = Model::default();
            for op in ops {
                apply(&mut fleet, &mut model, &views, op);
            }
        }

        /// The same through scheduling rounds with holds and deadlines.
        #[test]
        fn rounds_never_double_book(
            views in arb_fleet(),
            rounds in prop::collection::vec(
                (prop::collection::vec((arb_job(), 0u64..600, prop::option::of(1u64..300)), 0..12), 0usize..6),
                1..12,
            ),
        ) {
            let mut fleet = Fleet::from_views(views);
            let mut model = Model::default();
            let policy = RoundPolicy { starve_after: Duration::from_secs(120), max_holding_jobs: 3 };
            let mut queue: Vec<(JobSpec, UnixMillis)> = Vec::new();
            for (r, (arrivals, finishes)) in rounds.into_iter().enumerate() {
                let now = UnixMillis(600_000 + r as u64 * 60_000);
                for (mut spec, ago, deadline) in arrivals {
                    spec.resources.deadline = deadline.map(Seconds);
                    queue.push((spec, UnixMillis(now.0 - ago * 1000)));
                }
                for _ in 0..finishes.min(model.live.len()) {
                    let (p, _) = model.live.remove(0);
                    fleet.release(&p);
                }
                order(&mut queue);
                let decisions = run_round(&queue, &mut fleet, now, &policy);
                prop_assert_eq!(decisions.len(), queue.len());
                let mut still = Vec::new();
                for (job, d) in queue.drain(..).zip(decisions) {
                    match d {
                        Decision::Placed(ps) => {
                            prop_assert!(!queue::deadline_passed(&job.0, job.1, now));
                            prop_assert_eq!(ps.len() as u32, job.0.resources.gang);
                            for p in ps {
                                let v = fleet.view(p.index);
                                prop_assert!(statically_ok(v, &job.0));
                                model.live.push((p, job.0.clone()));
                            }
                        }
                        Decision::Waiting(_) => still.push(job),
                        Decision::Expired => {
                            prop_assert!(queue::deadline_passed(&job.0, job.1, now));
                        }
                    }
                }
                queue = still;
                model.check_books(&fleet);
            }
        }
    }
}

/// A verifier of exact GPU work runs on the original's GPU model; a
/// tolerance comparison takes any model the job accepts; the original and
/// earlier verifiers are never eligible.
#[test]
fn verifiers_of_exact_gpu_work_have_the_originals_model() {
    let mut fleet = Fleet::from_views([
        with(prov(1), |p| gpus(p, 1, H100)),
        with(prov(2), |p| gpus(p, 1, H100)),
        with(prov(3), |p| gpus(p, 1, A10)),
        with(prov(4), |p| gpus(p, 1, H100)),
        prov(5),
    ]);
    let original = id(1);
    let exact = gpu_job(1);
    let tolerant = job_with(|s| {
        s.resources.gpus = 1;
        s.verify.compare = kiln_protocol::Compare::Tolerance;
    });
    let model = Some(H100.0);
    // (spec, excluded, eligible)
    let cases = [
        (
            verifier_spec(&exact, model),
            vec![original],
            vec![id(2), id(4)],
        ),
        (
            verifier_spec(&exact, model),
            vec![original, id(2)],
            vec![id(4)],
        ),
        (
            verifier_spec(&tolerant, model),
            vec![original],
            vec![id(2), id(3), id(4)],
        ),
        // CPU work: any provider that fits, GPUs or not.
        (
            verifier_spec(&job(), model),
            vec![original],
            vec![id(2), id(3), id(4), id(5)],
        ),
    ];
    for (i, (spec, exclude, want)) in cases.into_iter().enumerate() {
        let got: HashSet<ProviderId> = fleet.eligible(&spec, &exclude).into_iter().collect();
        assert_eq!(got, want.into_iter().collect(), "case {i}");
    }
    // The buyer's own list of models is narrowed to the original's.
    let listed = job_with(|s| {
        s.resources.gpus = 1;
        s.resources.gpu_models = vec!["A10".into(), "H100".into()];
    });
    assert_eq!(
        verifier_spec(&listed, Some("NVIDIA A10"))
            .resources
            .gpu_models,
        vec!["NVIDIA A10".to_string()]
    );
    // No known model (the original left): the job's own constraints.
    assert_eq!(verifier_spec(&exact, None), exact);
}

/// A Kiln image manifest's CID (DAG-CBOR, as `kiln:<cid>` requires).
fn image_cid() -> ContentId {
    kiln_protocol::ImageManifest {
        config: kiln_protocol::ImageBlob {
            cid: ContentId::of_bytes(b"config"),
            digest: kiln_protocol::OciDigest([1; 32]),
            size: 6,
        },
        layers: vec![],
    }
    .cid()
}

/// `n` MIG instances of `profile` (`vram` GiB each) of an H100.
fn mig_units(p: &mut ProviderView, n: u32, profile: &str, vram: u64) {
    let base = p.advert.gpus.len() as u32;
    for i in 0..n {
        p.advert.gpus.push(GpuInfo {
            index: kiln_protocol::MIG_UNIT_BASE + base + i,
            uuid: format!("MIG-{}", base + i),
            name: H100.0.into(),
            memory_total: ByteSize(vram * GIB),
            compute_capability: H100.2,
            driver_version: "580".into(),
            mig: Some(profile.into()),
        });
    }
}

fn mig_job(n: u32, profile: &str) -> JobSpec {
    job_with(|s| {
        s.resources.gpus = n;
        s.resources.mig = Some(profile.into());
    })
}

#[test]
fn mig_instances_are_units_only_jobs_asking_for_their_profile_get() {
    let seven = |n| with(prov(n), |p| mig_units(p, 7, "1g.10gb", 10));
    let whole = |n| with(prov(n), |p| gpus(p, 1, H100));
    let mixed = |n| {
        with(prov(n), |p| {
            gpus(p, 1, H100);
            mig_units(p, 2, "1g.10gb", 10);
        })
    };
    run_cases(vec![
        (
            "a whole-GPU job skips a node of instances",
            vec![seven(1), whole(2)],
            vec![],
            gpu_job(1),
            Ok(1),
        ),
        (
            "a whole-GPU job is never given an instance",
            vec![seven(1)],
            vec![],
            gpu_job(1),
            Err("waiting: 1 online; 1 excluded by mig=none (whole GPUs)"),
        ),
        (
            "a MIG job gets an instance of its profile",
            vec![whole(1), seven(2)],
            vec![],
            mig_job(1, "1g.10gb"),
            Ok(1),
        ),
        (
            "a MIG job is never given a whole GPU",
            vec![whole(1), seven(2)],
            vec![],
            mig_job(1, "3g.40gb"),
            Err("waiting: 2 online; 2 excluded by mig=3g.40gb"),
        ),
        (
            "a MIG job needs enough instances of its profile on one node",
            vec![mixed(1)],
            vec![],
            mig_job(3, "1g.10gb"),
            Err("waiting: 1 online; 1 excluded by mig=1g.10gb"),
        ),
        (
            "instances and whole GPUs of one node are booked apart",
            vec![mixed(1)],
            vec![(0, gpu_job(1))],
            mig_job(2, "1g.10gb"),
            Ok(0),
        ),
        (
            "the whole GPU booked, its instances do not count for a whole-GPU job",
            vec![mixed(1)],
            vec![(0, gpu_job(1))],
            gpu_job(1),
            Err("waiting: 1 online; 1 excluded by free_gpus=1"),
        ),
        (
            "a CPU job runs on a node of instances",
            vec![seven(1)],
            vec![],
            job(),
            Ok(0),
        ),
    ]);

    // The placement names instances for a MIG job and the whole GPU for
    // the other, on the same node.
    let mut fleet = Fleet::from_views(vec![mixed(1)]);
    let m = place(&mig_job(2, "1g.10gb"), &mut fleet).unwrap();
    assert!(
        m.gpus.iter().all(|&g| g >= kiln_protocol::MIG_UNIT_BASE),
        "{m:?}"
    );
    let w = place(&gpu_job(1), &mut fleet).unwrap();
    assert_eq!(w.gpus, vec![0]);
    // The node applies the same rule when it picks units (GpuInfo::fits).
    let view = mixed(1);
    let fits = |spec: &JobSpec| -> Vec<u32> {
        view.advert
            .gpus
            .iter()
            .filter(|g| g.fits(&spec.resources))
            .map(|g| g.index)
            .collect()
    };
    assert_eq!(fits(&gpu_job(1)), vec![0]);
    assert_eq!(fits(&mig_job(1, "1g.10gb")).len(), 2);
    assert!(fits(&mig_job(1, "2g.20gb")).is_empty());
}
