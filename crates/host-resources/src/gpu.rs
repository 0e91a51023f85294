//! GPU discovery (NVML first, then `nvidia-smi`, then none), classification
//! of product names into the models the control plane knows, and whole-GPU
//! allocation to workers by UUID.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use parking_lot::Mutex;
use serde::Serialize;

/// GPU models with a value on the wire; everything else is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum GpuModel {
    Unknown,
    A100_40GB,
    A100_80GB,
    H100_80GB,
    TeslaT4,
    A6000,
    A10,
}

impl GpuModel {
    /// Classifies a product name, using total memory where the name alone is
    /// ambiguous ("NVIDIA A100-SXM4" exists in 40 and 80 GB).
    ///
    /// The match is on whole name tokens, so "A100" never matches "A10" and
    /// "NVIDIA A100 80GB PCIe" is an A100 80GB.
    pub fn classify(product_name: &str, memory_bytes: Option<u64>) -> GpuModel {
        let upper = product_name.to_ascii_uppercase();
        let tokens: Vec<&str> = upper
            .split([' ', '-', '_'])
            .filter(|t| !t.is_empty())
            .collect();
        let has = |t: &str| tokens.contains(&t);
        let mem_gib = memory_bytes.map(|b| b as f64 / (1u64 << 30) as f64);
        if has("A100") {
            if upper.contains("80GB") {
                return GpuModel::A100_80GB;
            }
            if upper.contains("40GB") {
                return GpuModel::A100_40GB;
            }
            return match mem_gib {
                Some(m) if m > 60.0 => GpuModel::A100_80GB,
                Some(_) => GpuModel::A100_40GB,
                None => GpuModel::Unknown,
            };
        }
        if has("H100") {
            // SXM, PCIe and NVL are all H100-class parts with at least 80 GB.
            return GpuModel::H100_80GB;
        }
        if has("T4") {
            return GpuModel::TeslaT4;
        }
        if has("A6000") {
            return GpuModel::A6000;
        }
        if has("A10") || has("A10G") {
            return GpuModel::A10;
        }
        GpuModel::Unknown
    }
}

/// One GPU as discovered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub product_name: String,
    pub memory_bytes: Option<u64>,
    pub model: GpuModel,
    /// Utilisation percent at discovery time, when the source gives it.
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuProbeError {
    #[error("NVML unavailable: {0}")]
    NvmlUnavailable(String),
    #[error("nvidia-smi not runnable: {0}")]
    NotInstalled(String),
    #[error("nvidia-smi failed: {0}")]
    CommandFailed(String),
    #[error("unparseable nvidia-smi line {line:?}: {reason}")]
    Parse { line: String, reason: String },
}

/// A source of GPU facts; real ones are [`NvmlProbe`] and [`NvidiaSmiProbe`].
pub trait GpuProbe: Send + Sync {
    fn name(&self) -> &'static str;
    fn probe(&self) -> Result<Vec<GpuInfo>, GpuProbeError>;
}

/// Reads GPUs through NVML (`libnvidia-ml.so.1`, loaded at run time).
#[derive(Debug, Default)]
pub struct NvmlProbe;

impl GpuProbe for NvmlProbe {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn probe(&self) -> Result<Vec<GpuInfo>, GpuProbeError> {
        let err = |e: nvml_wrapper::error::NvmlError| GpuProbeError::NvmlUnavailable(e.to_string());
        let nvml = nvml_wrapper::Nvml::init().map_err(err)?;
        let count = nvml.device_count().map_err(err)?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = nvml.device_by_index(index).map_err(err)?;
            let memory = device.memory_info().ok();
            gpus.push(gpu_from_nvml(
                index,
                NvmlAnswers {
                    name: device.name().map_err(err)?,
                    uuid: device.uuid().map_err(err)?,
                    memory_total_bytes: memory.as_ref().map(|m| m.total),
                    memory_used_bytes: memory.map(|m| m.used),
                    utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                },
            ));
        }
        Ok(gpus)
    }
}

/// What NVML says about one device; the seam where tests put fake answers.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmlAnswers {
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub utilization_percent: Option<u32>,
}

/// Turns NVML's answers for device `index` into a [`GpuInfo`].
pub fn gpu_from_nvml(index: u32, a: NvmlAnswers) -> GpuInfo {
    GpuInfo {
        index,
        model: GpuModel::classify(&a.name, a.memory_total_bytes),
        uuid: a.uuid,
        product_name: a.name,
        memory_bytes: a.memory_total_bytes,
        utilization_percent: a.utilization_percent,
        memory_used_bytes: a.memory_used_bytes,
    }
}

/// Runs `nvidia-smi --query-gpu=... --format=csv,noheader,nounits`.
#[derive(Debug, Clone)]
pub struct NvidiaSmiProbe {
    pub binary: PathBuf,
}

impl Default for NvidiaSmiProbe {
    fn default() -> Self {
        NvidiaSmiProbe {
            binary: PathBuf::from("nvidia-smi"),
        }
    }
}

/// The columns asked of `nvidia-smi`, in order.
pub const NVIDIA_SMI_QUERY: &str = "index,uuid,name,memory.total,memory.used,utilization.gpu";

impl GpuProbe for NvidiaSmiProbe {
    fn name(&self) -> &'static str {
        "nvidia-smi"
    }

    fn probe(&self) -> Result<Vec<GpuInfo>, GpuProbeError> {
        let output = Command::new(&self.binary)
            .arg(format!("--query-gpu={NVIDIA_SMI_QUERY}"))
            .arg("--format=csv,noheader,nounits")
            .output()
            .map_err(|e| GpuProbeError::NotInstalled(format!("{}: {e}", self.binary.display())))?;
        if !output.status.success() {
            return Err(GpuProbeError::CommandFailed(format!(
                "{} exited with {}: {}",
                self.binary.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        parse_nvidia_smi_csv(&String::from_utf8_lossy(&output.stdout))
    }
}

/// Parses `nvidia-smi --query-gpu=` [`NVIDIA_SMI_QUERY`] CSV (no header, no
/// units). `[N/A]` and `[Not Supported]` become `None`.
pub fn parse_nvidia_smi_csv(text: &str) -> Result<Vec<GpuInfo>, GpuProbeError> {
    let mut gpus = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let parse_err = |reason: &str| GpuProbeError::Parse {
            line: line.to_string(),
            reason: reason.to_string(),
        };
        if fields.len() < 3 {
            return Err(parse_err("expected at least index, uuid, name"));
        }
        let optional = |i: usize| -> Option<u64> {
            fields
                .get(i)
                .and_then(|f| f.trim_end_matches(" MiB").parse::<u64>().ok())
        };
        let index: u32 = fields[0]
            .parse()
            .map_err(|_| parse_err("index is not a number"))?;
        let memory_bytes = optional(3).map(|mib| mib << 20);
        let product_name = fields[2].to_string();
        gpus.push(GpuInfo {
            index,
            uuid: fields[1].to_string(),
            model: GpuModel::classify(&product_name, memory_bytes),
            product_name,
            memory_bytes,
            memory_used_bytes: optional(4).map(|mib| mib << 20),
            utilization_percent: optional(5).map(|p| p as u32),
        });
    }
    Ok(gpus)
}

/// Discovers GPUs with the first probe that works. A host where none works
/// has no GPUs; the reasons are logged once, at debug level for a plain
/// "not installed" and as a warning for a probe that exists but fails.
pub fn detect_gpus(probes: &[&dyn GpuProbe]) -> Vec<GpuInfo> {
    detect_gpus_with_source(probes).0
}

/// Like [`detect_gpus`], also saying which probe found them (by position).
pub fn detect_gpus_with_source(probes: &[&dyn GpuProbe]) -> (Vec<GpuInfo>, Option<usize>) {
    let mut reasons = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        match probe.probe() {
            Ok(gpus) => {
                for g in gpus.iter().filter(|g| g.model == GpuModel::Unknown) {
                    tracing::warn!(
                        gpu = g.index, product = %g.product_name,
                        "GPU model has no value on the wire; reported as unknown"
                    );
                }
                tracing::info!(source = probe.name(), count = gpus.len(), "GPUs discovered");
                return (gpus, Some(i));
            }
            Err(e @ GpuProbeError::CommandFailed(_)) | Err(e @ GpuProbeError::Parse { .. }) => {
                tracing::warn!(source = probe.name(), error = %e, "GPU probe failed");
                reasons.push(e.to_string());
            }
            Err(e) => reasons.push(e.to_string()),
        }
    }
    tracing::info!(reasons = %reasons.join("; "), "no GPUs");
    (Vec::new(), None)
}

/// GPUs handed to one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuAllocation {
    pub uuids: Vec<String>,
    pub indices: Vec<u32>,
}

impl GpuAllocation {
    /// Value for `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES`.
    pub fn visible_devices(&self) -> String {
        self.uuids.join(",")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuAllocatorError {
    #[error("worker {owner} asks for {wanted} GPU(s) but only {free} of {total} are free")]
    NotEnough {
        owner: String,
        wanted: u32,
        free: u32,
        total: u32,
    },
    #[error("worker {0} already holds GPUs")]
    AlreadyHolds(String),
    #[error("GPU {uuid} is not on this host (or is reserved for the system)")]
    Unknown { uuid: String },
    #[error("GPU {uuid} is held by worker {holder}")]
    Held { uuid: String, holder: String },
}

/// Hands out whole GPUs; a GPU belongs to at most one worker at a time.
#[derive(Debug)]
pub struct GpuAllocator {
    gpus: Vec<GpuInfo>,
    inner: Mutex<AllocatorState>,
}

#[derive(Debug, Default)]
struct AllocatorState {
    free: BTreeSet<u32>,
    owners: BTreeMap<String, Vec<u32>>,
}

impl GpuAllocator {
    /// Manages `gpus`, keeping the first `reserved` (by index) for the system.
    pub fn new(gpus: Vec<GpuInfo>, reserved: u32) -> Self {
        let free = gpus
            .iter()
            .map(|g| g.index)
            .skip(reserved as usize)
            .collect();
        GpuAllocator {
            gpus,
            inner: Mutex::new(AllocatorState {
                free,
                owners: BTreeMap::new(),
            }),
        }
    }

    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// GPUs workers may use (all minus reserved).
    pub fn allocatable_count(&self) -> u32 {
        let inner = self.inner.lock();
        (inner.free.len() + inner.owners.values().map(Vec::len).sum::<usize>()) as u32
    }

    /// Which worker holds which GPU indices.
    pub fn owners(&self) -> BTreeMap<String, Vec<u32>> {
        self.inner.lock().owners.clone()
    }

    pub fn free_count(&self) -> u32 {
        self.inner.lock().free.len() as u32
    }

    /// Takes `count` free GPUs (lowest indices first) for `owner`.
    pub fn allocate(&self, owner: &str, count: u32) -> Result<GpuAllocation, GpuAllocatorError> {
        let mut inner = self.inner.lock();
        if inner.owners.contains_key(owner) {
            return Err(GpuAllocatorError::AlreadyHolds(owner.to_string()));
        }
        let free = inner.free.len() as u32;
        if count > free {
            let total = free + inner.owners.values().map(Vec::len).sum::<usize>() as u32;
            return Err(GpuAllocatorError::NotEnough {
                owner: owner.to_string(),
                wanted: count,
                free,
                total,
            });
        }
        let taken: Vec<u32> = inner.free.iter().copied().take(count as usize).collect();
        for i in &taken {
            inner.free.remove(i);
        }
        inner.owners.insert(owner.to_string(), taken.clone());
        let uuids = taken
            .iter()
            .filter_map(|i| self.gpus.iter().find(|g| g.index == *i))
            .map(|g| g.uuid.clone())
            .collect();
        Ok(GpuAllocation {
            uuids,
            indices: taken,
        })
    }

    /// Takes exactly the GPUs `uuids` for `owner` (a worker adopted from an
    /// earlier run, which still uses them): refused, taking none, unless
    /// every one is here and free.
    pub fn reserve(
        &self,
        owner: &str,
        uuids: &[String],
    ) -> Result<GpuAllocation, GpuAllocatorError> {
        let mut inner = self.inner.lock();
        if inner.owners.contains_key(owner) {
            return Err(GpuAllocatorError::AlreadyHolds(owner.to_string()));
        }
        let mut taken = Vec::with_capacity(uuids.len());
        for uuid in uuids {
            let Some(g) = self.gpus.iter().find(|g| g.uuid == *uuid) else {
                return Err(GpuAllocatorError::Unknown { uuid: uuid.clone() });
            };
            if !inner.free.contains(&g.index) {
                let holder = inner
                    .owners
                    .iter()
                    .find(|(_, held)| held.contains(&g.index))
                    .map(|(o, _)| o.clone());
                return Err(match holder {
                    Some(holder) => GpuAllocatorError::Held {
                        uuid: uuid.clone(),
                        holder,
                    },
                    None => GpuAllocatorError::Unknown { uuid: uuid.clone() },
                });
            }
            taken.push(g.index);
        }
        for i in &taken {
            inner.free.remove(i);
        }
        inner.owners.insert(owner.to_string(), taken.clone());
        Ok(GpuAllocation {
            uuids: uuids.to_vec(),
            indices: taken,
        })
    }

    /// Returns `owner`'s GPUs to the pool; releasing twice is harmless.
    pub fn release(&self, owner: &str) {
        let mut inner = self.inner.lock();
        if let Some(indices) = inner.owners.remove(owner) {
            inner.free.extend(indices);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn classifies_every_known_product_name() {
        let cases: &[(&str, Option<u64>, GpuModel)] = &[
            ("NVIDIA A100-SXM4-40GB", Some(40 * GIB), GpuModel::A100_40GB),
            ("NVIDIA A100-PCIE-40GB", Some(40 * GIB), GpuModel::A100_40GB),
            ("NVIDIA A100-SXM4-80GB", Some(80 * GIB), GpuModel::A100_80GB),
            ("NVIDIA A100 80GB PCIe", Some(80 * GIB), GpuModel::A100_80GB),
            ("NVIDIA A100-SXM4", Some(80 * GIB), GpuModel::A100_80GB),
            ("NVIDIA A100-SXM4", Some(40 * GIB), GpuModel::A100_40GB),
            ("NVIDIA A100-SXM4", None, GpuModel::Unknown),
            ("NVIDIA H100 80GB HBM3", Some(80 * GIB), GpuModel::H100_80GB),
            ("NVIDIA H100 PCIe", Some(80 * GIB), GpuModel::H100_80GB),
            ("NVIDIA H100 NVL", Some(94 * GIB), GpuModel::H100_80GB),
            ("NVIDIA H200", Some(141 * GIB), GpuModel::Unknown),
            ("Tesla T4", Some(16 * GIB), GpuModel::TeslaT4),
            ("NVIDIA RTX A6000", Some(48 * GIB), GpuModel::A6000),
            ("NVIDIA A10", Some(24 * GIB), GpuModel::A10),
            ("NVIDIA A10G", Some(24 * GIB), GpuModel::A10),
            ("NVIDIA L4", Some(24 * GIB), GpuModel::Unknown),
            ("NVIDIA L40S", Some(48 * GIB), GpuModel::Unknown),
            ("NVIDIA GeForce RTX 4090", Some(24 * GIB), GpuModel::Unknown),
        ];
        for (name, mem, want) in cases {
            assert_eq!(GpuModel::classify(name, *mem), *want, "{name} with {mem:?}");
        }
    }

    #[test]
    fn fake_nvml_answers_map_to_wire_models() {
        // (NVML name, total memory) as real devices answer; expected model.
        let cases: &[(&str, u64, GpuModel)] = &[
            ("NVIDIA A100-SXM4-40GB", 40 * GIB, GpuModel::A100_40GB),
            ("NVIDIA A100-PCIE-40GB", 40 * GIB, GpuModel::A100_40GB),
            ("NVIDIA A100-SXM4-80GB", 80 * GIB, GpuModel::A100_80GB),
            ("NVIDIA A100 80GB PCIe", 80 * GIB, GpuModel::A100_80GB),
            ("NVIDIA H100 80GB HBM3", 80 * GIB, GpuModel::H100_80GB),
            ("NVIDIA H100 PCIe", 80 * GIB, GpuModel::H100_80GB),
            ("NVIDIA H100 NVL", 94 * GIB, GpuModel::H100_80GB),
            ("NVIDIA H200", 141 * GIB, GpuModel::Unknown),
            ("Tesla T4", 15 * GIB, GpuModel::TeslaT4),
            ("NVIDIA A10", 24 * GIB, GpuModel::A10),
            ("NVIDIA RTX A6000", 48 * GIB, GpuModel::A6000),
            ("NVIDIA L4", 23 * GIB, GpuModel::Unknown),
            ("NVIDIA L40S", 46 * GIB, GpuModel::Unknown),
        ];
        for (i, (name, mem, want)) in cases.iter().enumerate() {
            let g = gpu_from_nvml(
                i as u32,
                NvmlAnswers {
                    name: name.to_string(),
                    uuid: format!("GPU-{i}"),
                    memory_total_bytes: Some(*mem),
                    memory_used_bytes: Some(0),
                    utilization_percent: Some(5),
                },
            );
            assert_eq!(g.model, *want, "{name}");
            assert_eq!((g.index, g.memory_bytes), (i as u32, Some(*mem)));
        }
    }

    #[test]
    fn mixed_host_keeps_each_gpu_model() {
        let csv = "0, GPU-a, NVIDIA A100-SXM4-40GB, 40960, 0, 0\n1, GPU-b, NVIDIA A100 80GB PCIe, 81920, 0, 0\n2, GPU-c, NVIDIA L4, 23034, 0, 0\n";
        let models: Vec<GpuModel> = parse_nvidia_smi_csv(csv)
            .expect("parse")
            .into_iter()
            .map(|g| g.model)
            .collect();
        assert_eq!(
            models,
            vec![GpuModel::A100_40GB, GpuModel::A100_80GB, GpuModel::Unknown]
        );
    }

    #[test]
    fn parses_captured_nvidia_smi_output() {
        let csv = "0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA A100 80GB PCIe, 81920, 3, 0\n\
                   1, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, NVIDIA H100 80GB HBM3, 81559, [N/A], [Not Supported]\n";
        let gpus = parse_nvidia_smi_csv(csv).expect("parse");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].model, GpuModel::A100_80GB);
        assert_eq!(gpus[0].memory_bytes, Some(81920 << 20));
        assert_eq!(gpus[0].utilization_percent, Some(0));
        assert_eq!(gpus[1].model, GpuModel::H100_80GB);
        assert_eq!(gpus[1].memory_used_bytes, None);
        assert_eq!(gpus[1].utilization_percent, None);
        assert!(parse_nvidia_smi_csv("x, y").is_err());
        assert!(parse_nvidia_smi_csv("").expect("empty").is_empty());
    }

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            product_name: "Tesla T4".into(),
            memory_bytes: Some(16 * GIB),
            model: GpuModel::TeslaT4,
            utilization_percent: None,
            memory_used_bytes: None,
        }
    }

    #[test]
    fn allocator_never_shares_and_refuses_when_full() {
        let alloc = GpuAllocator::new(vec![gpu(0), gpu(1)], 0);
        let a = alloc.allocate("fe-a", 1).expect("a");
        let b = alloc.allocate("fe-b", 1).expect("b");
        assert_ne!(a.uuids, b.uuids);
        let err = alloc.allocate("fe-c", 1).expect_err("full");
        assert_eq!(
            err.to_string(),
            "worker fe-c asks for 1 GPU(s) but only 0 of 2 are free"
        );
        alloc.release("fe-a");
        assert_eq!(
            alloc.allocate("fe-c", 1).expect("after release").uuids,
            a.uuids
        );
    }

    /// An adopted worker takes back exactly its GPUs; the next worker gets
    /// another one, and none is taken twice or from the system's.
    #[test]
    fn an_adopted_worker_reserves_exactly_its_gpus() {
        let alloc = GpuAllocator::new(vec![gpu(0), gpu(1), gpu(2), gpu(3)], 1);
        let kept = alloc
            .reserve("fe-old", &["GPU-3".into()])
            .expect("reserved");
        assert_eq!(kept.indices, vec![3]);
        assert_eq!(
            alloc.allocate("fe-new", 1).expect("another").uuids,
            ["GPU-1"]
        );
        let held = alloc
            .reserve("fe-x", &["GPU-2".into(), "GPU-1".into()])
            .expect_err("held");
        assert_eq!(held.to_string(), "GPU GPU-1 is held by worker fe-new");
        assert_eq!(alloc.free_count(), 1, "a refusal takes nothing");
        let system = alloc
            .reserve("fe-y", &["GPU-0".into()])
            .expect_err("reserved");
        assert!(
            system.to_string().contains("reserved for the system"),
            "{system}"
        );
        let gone = alloc
            .reserve("fe-z", &["GPU-9".into()])
            .expect_err("unknown");
        assert!(gone.to_string().contains("not on this host"), "{gone}");
    }

    #[test]
    fn reserved_gpus_are_never_handed_out() {
        let alloc = GpuAllocator::new(vec![gpu(0), gpu(1), gpu(2)], 1);
        assert_eq!(alloc.allocatable_count(), 2);
        let a = alloc.allocate("fe", 2).expect("two");
        assert_eq!(a.indices, vec![1, 2]);
    }

    struct Fixed(Result<Vec<GpuInfo>, fn() -> GpuProbeError>);
    impl GpuProbe for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn probe(&self) -> Result<Vec<GpuInfo>, GpuProbeError> {
            self.0.clone().map_err(|f| f())
        }
    }

    #[test]
    fn detect_falls_back_in_order_and_to_none() {
        let missing = Fixed(Err(|| GpuProbeError::NvmlUnavailable("no lib".into())));
        let two = Fixed(Ok(vec![gpu(0), gpu(1)]));
        assert_eq!(detect_gpus(&[&missing, &two]).len(), 2);
        assert!(detect_gpus(&[&missing]).is_empty());
    }
}
