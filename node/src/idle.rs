//! Idle detection and owner preemption.
//!
//! A provider lends its GPUs only while their owner is not using them. A
//! sampler (in `lib.rs`) looks every few seconds at each GPU's processes and
//! utilization through NVML, and optionally at interactive logins; the
//! decisions are the pure functions here:
//!
//! * [`owner_activity`]: does this sample show the owner using a GPU? A
//!   process that is not Kiln's (not the daemon, not inside one of its job
//!   containers) is; so is utilization above the threshold on a GPU no Kiln
//!   job holds.
//! * [`decide`]: from the last time owner activity was seen, take offers only
//!   after `idle_for` without any; when the owner is active now and jobs run
//!   on GPUs, preempt them under [`OwnerPolicy::Preempt`] (the coordinator
//!   requeues them: their `JobLost` reason starts with
//!   [`PREEMPTED_BY_OWNER`]), or let them finish under
//!   [`OwnerPolicy::Finish`].

use std::collections::HashSet;
use std::time::Duration;

use crate::gpu::GpuSample;

/// The reason an offer is refused while the owner uses the GPU.
pub const OWNER_BUSY: &str = "provider owner is using the GPU";
/// The prefix of a preempted job's `JobLost` reason.
pub const PREEMPTED_BY_OWNER: &str = "preempted_by_owner";

/// What to do with running GPU jobs when the owner comes back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OwnerPolicy {
    /// Let running jobs finish; take no new offers.
    #[default]
    Finish,
    /// Stop running GPU jobs at once and report them lost (requeued elsewhere).
    Preempt,
}

/// The provider's idle policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// How long the GPUs must have been free of the owner's work before
    /// offers are taken (0: as soon as a sample shows them free).
    pub idle_for: Duration,
    /// Also require that no interactive user is active.
    pub require_no_user: bool,
    pub on_owner_return: OwnerPolicy,
    /// GPU utilization (percent) above which a GPU no Kiln job holds counts
    /// as used by its owner.
    pub utilization_threshold: u32,
    /// How often the sampler looks.
    pub sample_every: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self {
            idle_for: Duration::ZERO,
            require_no_user: false,
            on_owner_return: OwnerPolicy::Finish,
            utilization_threshold: 10,
            sample_every: Duration::from_secs(3),
        }
    }
}

/// What the sampler saw, reduced to what [`decide`] needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Milliseconds on a monotonic clock.
    pub now_ms: u64,
    /// Why the latest sample shows the owner on a GPU, if it does.
    pub owner_active_now: Option<String>,
    /// The last time (same clock) owner activity was seen, if ever.
    pub last_owner_activity_ms: Option<u64>,
    /// An interactive user is active (only consulted with `require_no_user`).
    pub user_active: bool,
    /// Kiln jobs running on GPUs now.
    pub running_gpu_jobs: usize,
}

/// What the node should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub accept_offers: bool,
    pub preempt_running: bool,
    /// Why offers are refused (`None` while they are accepted).
    pub reason: Option<String>,
}

impl Decision {
    pub fn accept() -> Self {
        Self {
            accept_offers: true,
            preempt_running: false,
            reason: None,
        }
    }
}

/// The decision for one observation under one policy.
pub fn decide(policy: &IdlePolicy, obs: &Observation) -> Decision {
    let user_blocks = policy.require_no_user && obs.user_active;
    let owner_now = obs.owner_active_now.is_some() || user_blocks;
    let preempt_running =
        owner_now && obs.running_gpu_jobs > 0 && policy.on_owner_return == OwnerPolicy::Preempt;
    if let Some(why) = &obs.owner_active_now {
        return Decision {
            accept_offers: false,
            preempt_running,
            reason: Some(format!("{OWNER_BUSY} ({why})")),
        };
    }
    if user_blocks {
        return Decision {
            accept_offers: false,
            preempt_running,
            reason: Some("an interactive user is active on the provider's machine".into()),
        };
    }
    if let Some(last) = obs.last_owner_activity_ms {
        let idle = Duration::from_millis(obs.now_ms.saturating_sub(last));
        if idle < policy.idle_for {
            return Decision {
                accept_offers: false,
                preempt_running: false,
                reason: Some(format!(
                    "{OWNER_BUSY}: waiting until the GPUs have been idle for {}s (idle for {}s)",
                    policy.idle_for.as_secs(),
                    idle.as_secs()
                )),
            };
        }
    }
    Decision::accept()
}

/// Whether a sample shows the owner on a GPU, and why.
///
/// `kiln_pids`: the daemon and the processes of its job containers;
/// `kiln_gpus`: UUIDs of GPUs Kiln jobs hold now (their utilization is Kiln's).
pub fn owner_activity(
    samples: &[GpuSample],
    kiln_pids: &HashSet<u32>,
    kiln_gpus: &HashSet<String>,
    utilization_threshold: u32,
) -> Option<String> {
    for s in samples {
        if let Some(pid) = s.pids.iter().find(|p| !kiln_pids.contains(p)) {
            return Some(format!("process {pid} on {}", s.uuid));
        }
        if !kiln_gpus.contains(&s.uuid)
            && s.utilization_percent
                .is_some_and(|u| u > utilization_threshold)
        {
            return Some(format!(
                "{}% utilization on {}",
                s.utilization_percent.unwrap_or(0),
                s.uuid
            ));
        }
    }
    None
}

/// Whether `/proc/<pid>/cgroup` contents place a process in one of these
/// containers (cgroup v1 `/docker/<id>` and v2 `docker-<id>.scope` alike).
pub fn cgroup_in_containers(cgroup: &str, container_ids: &[String]) -> bool {
    container_ids
        .iter()
        .filter(|id| id.len() >= 12)
        .any(|id| cgroup.contains(id.as_str()))
}

/// One login record of `/var/run/utmp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    /// The terminal, e.g. `pts/0` or `tty1`.
    pub line: String,
    pub pid: i32,
}

const UTMP_RECORD: usize = 384;
const USER_PROCESS: i32 = 7;

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The interactive logins (`USER_PROCESS` records) of a glibc x86-64
/// `utmp` file: 384-byte records, `ut_type` at 0, `ut_pid` at 4, `ut_line`
/// at 8 (32 bytes), `ut_user` at 44 (32 bytes).
pub fn parse_utmp(bytes: &[u8]) -> Vec<Login> {
    bytes
        .chunks_exact(UTMP_RECORD)
        .filter_map(|r| {
            let ty = i32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            let pid = i32::from_le_bytes([r[4], r[5], r[6], r[7]]);
            (ty == USER_PROCESS).then(|| Login {
                line: cstr(&r[8..40]),
                user: cstr(&r[44..76]),
                pid,
            })
        })
        .collect()
}

/// Whether a user is active: someone is logged in on a terminal whose last
/// input (its device's access time) is within `window`.
pub fn user_active(window: Duration) -> bool {
    let Ok(bytes) = std::fs::read("/var/run/utmp") else {
        return false;
    };
    parse_utmp(&bytes).iter().any(|l| {
        std::fs::metadata(format!("/dev/{}", l.line))
            .and_then(|m| m.accessed())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|since| since < window)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(idle_secs: u64, require_no_user: bool, on: OwnerPolicy) -> IdlePolicy {
        IdlePolicy {
            idle_for: Duration::from_secs(idle_secs),
            require_no_user,
            on_owner_return: on,
            ..IdlePolicy::default()
        }
    }

    #[test]
    fn decisions_table() {
        use OwnerPolicy::{Finish, Preempt};
        let busy = Some("process 42 on GPU-0".to_string());
        // (policy, now, owner now, last seen, user active, gpu jobs) → (accept, preempt, reason contains)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            IdlePolicy,
            u64,
            Option<String>,
            Option<u64>,
            bool,
            usize,
            bool,
            bool,
            &str,
        )> = vec![
            // CPU-only machine, default policy: always accept.
            (
                IdlePolicy::default(),
                1_000,
                None,
                None,
                false,
                0,
                true,
                false,
                "",
            ),
            // Owner never seen, idle_for 60 s: accept at once.
            (
                policy(60, false, Finish),
                5_000,
                None,
                None,
                false,
                0,
                true,
                false,
                "",
            ),
            // Owner on the GPU now: refuse, finish policy keeps the job.
            (
                policy(0, false, Finish),
                5_000,
                busy.clone(),
                Some(5_000),
                false,
                1,
                false,
                false,
                OWNER_BUSY,
            ),
            // Owner on the GPU now, preempt policy, a GPU job runs: preempt.
            (
                policy(0, false, Preempt),
                5_000,
                busy.clone(),
                Some(5_000),
                false,
                1,
                false,
                true,
                OWNER_BUSY,
            ),
            // Preempt policy but nothing running: nothing to preempt.
            (
                policy(0, false, Preempt),
                5_000,
                busy.clone(),
                Some(5_000),
                false,
                0,
                false,
                false,
                OWNER_BUSY,
            ),
            // Owner left 30 s ago, idle_for 60 s: still waiting, no preemption.
            (
                policy(60, false, Preempt),
                100_000,
                None,
                Some(70_000),
                false,
                1,
                false,
                false,
                "idle for 30s",
            ),
            // Owner left 61 s ago: accept again.
            (
                policy(60, false, Preempt),
                131_000,
                None,
                Some(70_000),
                false,
                0,
                true,
                false,
                "",
            ),
            // Exactly idle_for: accept.
            (
                policy(60, false, Finish),
                130_000,
                None,
                Some(70_000),
                false,
                0,
                true,
                false,
                "",
            ),
            // A user is active and the policy cares: refuse; preempt GPU jobs.
            (
                policy(0, true, Preempt),
                5_000,
                None,
                None,
                true,
                2,
                false,
                true,
                "interactive user",
            ),
            // A user is active but the policy does not care: accept.
            (
                policy(0, false, Preempt),
                5_000,
                None,
                None,
                true,
                2,
                true,
                false,
                "",
            ),
            // Clock went backwards (last > now): treated as just seen.
            (
                policy(10, false, Finish),
                1_000,
                None,
                Some(2_000),
                false,
                0,
                false,
                false,
                "waiting",
            ),
        ];
        for (i, (p, now, owner, last, user, jobs, accept, preempt, reason)) in
            cases.into_iter().enumerate()
        {
            let d = decide(
                &p,
                &Observation {
                    now_ms: now,
                    owner_active_now: owner,
                    last_owner_activity_ms: last,
                    user_active: user,
                    running_gpu_jobs: jobs,
                },
            );
            assert_eq!(d.accept_offers, accept, "case {i}: {d:?}");
            assert_eq!(d.preempt_running, preempt, "case {i}: {d:?}");
            assert_eq!(d.reason.is_none(), accept, "case {i}: {d:?}");
            assert!(
                d.reason.as_deref().unwrap_or("").contains(reason),
                "case {i}: {d:?}"
            );
        }
    }

    #[test]
    fn owner_activity_table() {
        let s = |uuid: &str, util: Option<u32>, pids: &[u32]| GpuSample {
            uuid: uuid.into(),
            utilization_percent: util,
            pids: pids.to_vec(),
        };
        let kiln: HashSet<u32> = [100, 101].into();
        let held: HashSet<String> = ["GPU-A".to_string()].into();
        // (samples, owner active?)
        let cases: Vec<(Vec<GpuSample>, Option<&str>)> = vec![
            (vec![], None),
            (vec![s("GPU-A", Some(0), &[])], None),
            // Kiln's own processes and utilization on a GPU a job holds.
            (vec![s("GPU-A", Some(99), &[100, 101])], None),
            // Someone else's process, even at 0% utilization.
            (vec![s("GPU-A", Some(0), &[100, 555])], Some("process 555")),
            // Utilization on a GPU no job holds (e.g. a graphics context
            // NVML does not list).
            (vec![s("GPU-B", Some(50), &[])], Some("50% utilization")),
            // At the threshold: not activity.
            (vec![s("GPU-B", Some(10), &[])], None),
            // Unknown utilization, no process: idle.
            (vec![s("GPU-B", None, &[])], None),
            (
                vec![s("GPU-A", Some(0), &[]), s("GPU-B", Some(0), &[7])],
                Some("process 7 on GPU-B"),
            ),
        ];
        for (i, (samples, want)) in cases.into_iter().enumerate() {
            let got = owner_activity(&samples, &kiln, &held, 10);
            match want {
                None => assert_eq!(got, None, "case {i}"),
                Some(w) => assert!(
                    got.as_deref().unwrap_or("").contains(w),
                    "case {i}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn container_cgroups() {
        let id = "4f1c2a9b8e7d6c5b4a3928171615141312111009080706050403020100ffeedd".to_string();
        let v2 = format!("0::/system.slice/docker-{id}.scope\n");
        let v1 = format!("12:memory:/docker/{id}\n");
        assert!(cgroup_in_containers(&v2, std::slice::from_ref(&id)));
        assert!(cgroup_in_containers(&v1, std::slice::from_ref(&id)));
        assert!(!cgroup_in_containers(
            "0::/user.slice/session-3.scope\n",
            &[id]
        ));
        assert!(!cgroup_in_containers("0::/x\n", &["".into()]));
    }

    #[test]
    fn utmp_records() {
        let mut bytes = vec![0u8; UTMP_RECORD * 3];
        let mut put = |rec: usize, ty: i32, pid: i32, line: &str, user: &str| {
            let r = &mut bytes[rec * UTMP_RECORD..(rec + 1) * UTMP_RECORD];
            r[0..4].copy_from_slice(&ty.to_le_bytes());
            r[4..8].copy_from_slice(&pid.to_le_bytes());
            r[8..8 + line.len()].copy_from_slice(line.as_bytes());
            r[44..44 + user.len()].copy_from_slice(user.as_bytes());
        };
        put(0, 2, 0, "~", "reboot"); // BOOT_TIME
        put(1, USER_PROCESS, 1234, "pts/0", "alice");
        put(2, 8, 99, "pts/1", ""); // DEAD_PROCESS
        let logins = parse_utmp(&bytes);
        assert_eq!(
            logins,
            vec![Login {
                user: "alice".into(),
                line: "pts/0".into(),
                pid: 1234
            }]
        );
        assert!(parse_utmp(&bytes[..100]).is_empty());
        // Reading the real file never panics.
        let _ = user_active(Duration::from_secs(60));
    }
}
