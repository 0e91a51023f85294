//! CPU, memory and disk capacity of the host, and the reserved/allocatable
//! split (kubelet's model: allocatable = capacity - reserved).

use std::path::Path;

use serde::Serialize;
use sysinfo::{Disks, MemoryRefreshKind, RefreshKind, System};

/// Host capacity in wire units: whole logical CPUs and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// What the operator keeps back for the system; workers never get it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reserved {
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub gpu_count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("reading host memory: {0}")]
    Memory(String),
    #[error("no mounted disk holds {0}")]
    NoDisk(String),
}

impl Capacity {
    /// Capacity minus `reserved`, never below zero.
    pub fn allocatable(&self, reserved: &Reserved) -> Capacity {
        Capacity {
            cpu_count: self.cpu_count.saturating_sub(reserved.cpu_count),
            memory_bytes: self.memory_bytes.saturating_sub(reserved.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_sub(reserved.disk_bytes),
        }
    }
}

/// Probes logical CPUs, memory and the size of the volume holding `data_dir`.
///
/// Inside a container with a cgroup CPU quota or memory limit, the smaller
/// of the limit and the host value is reported, so a pod never claims the
/// whole node.
pub fn probe_capacity(data_dir: &Path) -> Result<Capacity, CapacityError> {
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .map_err(|e| CapacityError::Memory(e.to_string()))?;
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cpu_count = match cgroup_cpu_limit(Path::new("/sys/fs/cgroup")) {
        Some(limit) => host_cpus.min(limit.max(1)),
        None => host_cpus,
    };
    let mut memory_bytes = sys.total_memory();
    if let Some(limits) = sys.cgroup_limits()
        && limits.total_memory > 0
    {
        memory_bytes = memory_bytes.min(limits.total_memory);
    }
    let disk_bytes = disk_size_of(data_dir)?;
    Ok(Capacity {
        cpu_count,
        memory_bytes,
        disk_bytes,
    })
}

/// Total size of the mounted volume with the longest mount point that is a
/// prefix of `path` (the volume that holds it).
fn disk_size_of(path: &Path) -> Result<u64, CapacityError> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let disks = Disks::new_with_refreshed_list()
        .map_err(|e| CapacityError::NoDisk(format!("{}: {e}", path.display())))?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.total_space())
        .ok_or_else(|| CapacityError::NoDisk(path.display().to_string()))
}

/// Whole CPUs allowed by a cgroup v2 `cpu.max` or v1 CFS quota, rounded up.
fn cgroup_cpu_limit(root: &Path) -> Option<u32> {
    if let Ok(text) = std::fs::read_to_string(root.join("cpu.max")) {
        return parse_cpu_max(&text);
    }
    let quota = std::fs::read_to_string(root.join("cpu/cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(root.join("cpu/cpu.cfs_period_us")).ok()?;
    quota_to_cpus(quota.trim().parse().ok()?, period.trim().parse().ok()?)
}

fn parse_cpu_max(text: &str) -> Option<u32> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: i64 = parts.next()?.parse().ok()?;
    if quota == "max" {
        return None;
    }
    quota_to_cpus(quota.parse().ok()?, period)
}

fn quota_to_cpus(quota: i64, period: i64) -> Option<u32> {
    if quota <= 0 || period <= 0 {
        return None;
    }
    Some(((quota + period - 1) / period) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_cpu_max() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn cgroup_v1_quota() {
        assert_eq!(quota_to_cpus(-1, 100000), None);
        assert_eq!(quota_to_cpus(50000, 100000), Some(1));
        assert_eq!(quota_to_cpus(400000, 100000), Some(4));
    }

    #[test]
    fn cgroup_limit_from_fixture_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cpu.max"), "300000 100000\n").expect("write");
        assert_eq!(cgroup_cpu_limit(dir.path()), Some(3));
    }

    #[test]
    fn allocatable_subtracts_reserved_and_saturates() {
        let cap = Capacity {
            cpu_count: 8,
            memory_bytes: 16 << 30,
            disk_bytes: 100 << 30,
        };
        let reserved = Reserved {
            cpu_count: 1,
            memory_bytes: 2 << 30,
            disk_bytes: 200 << 30,
            gpu_count: 0,
        };
        let a = cap.allocatable(&reserved);
        assert_eq!(
            a,
            Capacity {
                cpu_count: 7,
                memory_bytes: 14 << 30,
                disk_bytes: 0
            }
        );
    }

    #[test]
    fn probes_this_host() {
        let cap = probe_capacity(Path::new(".")).expect("probe");
        assert!(cap.cpu_count >= 1);
        assert!(cap.memory_bytes > 0);
        assert!(cap.disk_bytes > 0);
    }
}
