//! What this host has and who may use it: logical CPUs, memory and disk
//! capacity (honouring the cgroup limits of Steward's own container), GPUs
//! discovered through NVML or `nvidia-smi`, and the allocator that pins
//! whole GPUs to workers.
//!
//! Entry points: [`probe_capacity`], [`detect_gpus`], [`GpuAllocator`],
//! [`UsageSampler`], [`descendants`] (the process tree), [`memory_headroom`]
//! (available memory and PSI, for pressure eviction).
//! Must not know about: gRPC, protobuf, HTTP, workers or allocations.

mod capacity;
mod gpu;
mod memory;
mod procs;
mod usage;

pub use capacity::{Capacity, CapacityError, Reserved, probe_capacity};
pub use gpu::{
    GpuAllocation, GpuAllocator, GpuAllocatorError, GpuInfo, GpuModel, GpuProbe, GpuProbeError,
    NvidiaSmiProbe, NvmlAnswers, NvmlProbe, detect_gpus, detect_gpus_with_source, gpu_from_nvml,
    parse_nvidia_smi_csv,
};
pub use memory::{MemoryHeadroom, memory_headroom, parse_mem_available, parse_psi_some_avg10};
pub use procs::descendants;
pub use usage::{GpuUsage, HostUsage, UsageSampler};
