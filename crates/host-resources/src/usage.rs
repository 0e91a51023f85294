//! Cheap periodic sampling of live usage: host CPU and memory (sysinfo) and
//! per-GPU utilisation and memory (through the same probe that found them).

use std::time::SystemTime;

use serde::Serialize;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::gpu::GpuProbe;

/// One GPU's live usage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuUsage {
    pub index: u32,
    pub uuid: String,
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// The host's live usage at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostUsage {
    pub sampled_at_unix_ms: u64,
    /// Busy share of all logical CPUs since the previous sample, 0-100.
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub gpus: Vec<GpuUsage>,
}

/// Keeps the state sysinfo needs between samples (CPU usage is a delta).
pub struct UsageSampler {
    system: System,
    gpu_probe: Option<Box<dyn GpuProbe>>,
}

impl UsageSampler {
    /// `gpu_probe` is the probe that discovered the GPUs, or `None` on a host without any.
    pub fn new(gpu_probe: Option<Box<dyn GpuProbe>>) -> Option<UsageSampler> {
        let kind = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(kind).ok()?;
        Some(UsageSampler { system, gpu_probe })
    }

    /// Takes a sample. Blocking (it may run `nvidia-smi`): call it off the async runtime.
    pub fn sample(&mut self) -> HostUsage {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let gpus = match &self.gpu_probe {
            Some(p) => match p.probe() {
                Ok(gpus) => gpus
                    .into_iter()
                    .map(|g| GpuUsage {
                        index: g.index,
                        uuid: g.uuid,
                        utilization_percent: g.utilization_percent,
                        memory_used_bytes: g.memory_used_bytes,
                        memory_total_bytes: g.memory_bytes,
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "sampling GPU usage failed");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        HostUsage {
            sampled_at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            cpu_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            gpus,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInfo, GpuModel, GpuProbeError};

    struct TwoGpus;
    impl GpuProbe for TwoGpus {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn probe(&self) -> Result<Vec<GpuInfo>, GpuProbeError> {
            Ok((0..2)
                .map(|i| GpuInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    product_name: "Tesla T4".into(),
                    memory_bytes: Some(16 << 30),
                    model: GpuModel::TeslaT4,
                    utilization_percent: Some(10 * (i + 1)),
                    memory_used_bytes: Some(1 << 30),
                })
                .collect())
        }
    }

    #[test]
    fn samples_host_and_gpus() {
        let mut s = UsageSampler::new(Some(Box::new(TwoGpus))).expect("sampler");
        let u = s.sample();
        assert!(u.memory_total_bytes > 0 && u.memory_used_bytes <= u.memory_total_bytes);
        assert!((0.0..=100.0).contains(&u.cpu_percent));
        assert_eq!(u.gpus.len(), 2);
        assert_eq!(u.gpus[1].utilization_percent, Some(20));
    }
}
