//! What a worker is given and whether it fits: the resources of a function
//! executor description with the agent's defaults filled in (a description
//! that leaves CPU or memory unset gets `--default-worker-cpus` and
//! `--default-worker-memory-bytes`), and admission: the workers admitted at
//! once never hold more than the host's allocatable CPU, memory, disk and
//! GPUs.

use serde::Serialize;
use steward_worker_driver::Limits;

use crate::pb;

/// Defaults and fixed limits for every worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerDefaults {
    pub cpu_ms_per_sec: u32,
    pub memory_bytes: u64,
    /// Processes and threads per worker (no description field sets it).
    pub pids_max: u64,
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        WorkerDefaults {
            cpu_ms_per_sec: 1000,
            memory_bytes: 128 << 20,
            pids_max: 4096,
        }
    }
}

/// The resources one worker holds while it lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub cpu_ms_per_sec: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub gpus: u64,
}

impl Claim {
    pub fn plus(self, o: Claim) -> Claim {
        Claim {
            cpu_ms_per_sec: self.cpu_ms_per_sec.saturating_add(o.cpu_ms_per_sec),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_add(o.disk_bytes),
            gpus: self.gpus.saturating_add(o.gpus),
        }
    }
}

/// A description's resources with the defaults applied, and which were defaulted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub claim: Claim,
    /// "cpu" and/or "memory" where the description left them unset (or 0).
    pub defaulted: Vec<&'static str>,
}

pub fn effective(d: &pb::FunctionExecutorDescription, defaults: &WorkerDefaults) -> Effective {
    let r = d.resources.as_ref();
    let mut defaulted = Vec::new();
    let cpu = match r.and_then(|r| r.cpu_ms_per_sec).filter(|c| *c > 0) {
        Some(c) => u64::from(c),
        None => {
            defaulted.push("cpu");
            u64::from(defaults.cpu_ms_per_sec)
        }
    };
    let memory = match r.and_then(|r| r.memory_bytes).filter(|m| *m > 0) {
        Some(m) => m,
        None => {
            defaulted.push("memory");
            defaults.memory_bytes
        }
    };
    Effective {
        claim: Claim {
            cpu_ms_per_sec: cpu,
            memory_bytes: memory,
            disk_bytes: r.and_then(|r| r.disk_bytes).unwrap_or(0),
            gpus: u64::from(
                r.and_then(|r| r.gpu.as_ref())
                    .and_then(|g| g.count)
                    .unwrap_or(0),
            ),
        },
        defaulted,
    }
}

/// The cgroup limits of a worker holding `claim`.
pub fn limits(claim: &Claim, defaults: &WorkerDefaults) -> Limits {
    Limits {
        cpu_ms_per_sec: u32::try_from(claim.cpu_ms_per_sec).unwrap_or(u32::MAX),
        memory_bytes: claim.memory_bytes,
        pids_max: defaults.pids_max,
    }
}

/// What workers may hold now: the host's resources less what the
/// operator reserved (changeable at runtime, in `settings`).
pub(crate) fn allocatable_in(
    config: &crate::config::AgentConfig,
    settings: &crate::settings::Settings,
) -> pb::HostResources {
    settings.allocatable(
        &config.total_resources,
        config.function_executor_resources.gpu,
    )
}

/// What workers may hold in all, from the host's allocatable resources.
pub fn allocatable(h: &pb::HostResources) -> Claim {
    Claim {
        cpu_ms_per_sec: u64::from(h.cpu_count.unwrap_or(0)) * 1000,
        memory_bytes: h.memory_bytes.unwrap_or(0),
        disk_bytes: h.disk_bytes.unwrap_or(0),
        gpus: u64::from(h.gpu.as_ref().and_then(|g| g.count).unwrap_or(0)),
    }
}

/// Why a worker does not fit, with the numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The first resource that does not fit: "cpu", "memory", "disk", "gpu".
    pub resource: &'static str,
    pub message: String,
}

/// Admits `want` next to the workers already holding `held`, or says why not.
pub fn admit(want: &Claim, held: &Claim, allocatable: &Claim) -> Result<(), Refusal> {
    let checks: [(&'static str, &str, u64, u64, u64); 4] = [
        (
            "cpu",
            "CPU ms/s",
            want.cpu_ms_per_sec,
            held.cpu_ms_per_sec,
            allocatable.cpu_ms_per_sec,
        ),
        (
            "memory",
            "bytes of memory",
            want.memory_bytes,
            held.memory_bytes,
            allocatable.memory_bytes,
        ),
        (
            "disk",
            "bytes of disk",
            want.disk_bytes,
            held.disk_bytes,
            allocatable.disk_bytes,
        ),
        ("gpu", "GPU(s)", want.gpus, held.gpus, allocatable.gpus),
    ];
    for (resource, unit, w, h, a) in checks {
        if w.saturating_add(h) > a {
            return Err(Refusal {
                resource,
                message: format!(
                    "does not fit on this host: asks for {w} {unit}; admitted workers hold {h} of {a} allocatable ({} free)",
                    a.saturating_sub(h)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(cpu: Option<u32>, mem: Option<u64>) -> pb::FunctionExecutorDescription {
        pb::FunctionExecutorDescription {
            resources: Some(pb::FunctionExecutorResources {
                cpu_ms_per_sec: cpu,
                memory_bytes: mem,
                disk_bytes: Some(1 << 30),
                gpu: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn unset_cpu_or_memory_get_the_defaults_and_say_so() {
        let d = WorkerDefaults::default();
        let e = effective(&desc(None, Some(1 << 30)), &d);
        assert_eq!(
            (e.claim.cpu_ms_per_sec, e.claim.memory_bytes),
            (1000, 1 << 30)
        );
        assert_eq!(e.defaulted, vec!["cpu"]);
        let e = effective(&desc(Some(250), Some(0)), &d);
        assert_eq!(
            (e.claim.cpu_ms_per_sec, e.claim.memory_bytes),
            (250, 128 << 20)
        );
        assert_eq!(e.defaulted, vec!["memory"]);
        let e = effective(&pb::FunctionExecutorDescription::default(), &d);
        assert_eq!(e.defaulted, vec!["cpu", "memory"]);
        assert_eq!(e.claim.disk_bytes, 0);
        assert_eq!(limits(&e.claim, &d).pids_max, 4096);
    }

    #[test]
    fn three_workers_of_forty_percent_memory_two_fit() {
        let host = Claim {
            cpu_ms_per_sec: 8000,
            memory_bytes: 10_000,
            disk_bytes: 1 << 40,
            gpus: 0,
        };
        let each = Claim {
            cpu_ms_per_sec: 1000,
            memory_bytes: 4_000,
            disk_bytes: 0,
            gpus: 0,
        };
        let mut held = Claim::default();
        for _ in 0..2 {
            admit(&each, &held, &host).expect("fits");
            held = held.plus(each);
        }
        let r = admit(&each, &held, &host).expect_err("third does not fit");
        assert_eq!(r.resource, "memory");
        assert_eq!(
            r.message,
            "does not fit on this host: asks for 4000 bytes of memory; admitted workers hold 8000 of 10000 allocatable (2000 free)"
        );
    }

    #[test]
    fn every_resource_is_counted() {
        let host = allocatable(&pb::HostResources {
            cpu_count: Some(2),
            memory_bytes: Some(100),
            disk_bytes: Some(100),
            gpu: Some(pb::GpuResources {
                count: Some(1),
                model: None,
            }),
        });
        assert_eq!(host.cpu_ms_per_sec, 2000);
        let fits = Claim {
            cpu_ms_per_sec: 2000,
            memory_bytes: 100,
            disk_bytes: 100,
            gpus: 1,
        };
        assert_eq!(admit(&fits, &Claim::default(), &host), Ok(()));
        for (resource, bump) in [
            (
                "cpu",
                Claim {
                    cpu_ms_per_sec: 1,
                    ..Claim::default()
                },
            ),
            (
                "memory",
                Claim {
                    memory_bytes: 1,
                    ..Claim::default()
                },
            ),
            (
                "disk",
                Claim {
                    disk_bytes: 1,
                    ..Claim::default()
                },
            ),
            (
                "gpu",
                Claim {
                    gpus: 1,
                    ..Claim::default()
                },
            ),
        ] {
            assert_eq!(
                admit(&bump, &fits, &host).map_err(|r| r.resource),
                Err(resource)
            );
        }
    }
}
