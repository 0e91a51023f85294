//! Pressure eviction, kubelet style: when the host's available memory falls
//! below a threshold (or, where the kernel has PSI, memory pressure rises
//! above one), idle workers (no allocation queued or running) are stopped,
//! least recently used first, one at a time, each reported terminated with
//! the reason and an event that names what was freed.

use std::sync::Arc;
use std::time::Duration;

/// The host's memory at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemorySample {
    pub available_bytes: u64,
    /// PSI `some avg10` of `/proc/pressure/memory` (percent), where the kernel has it.
    pub psi_some_avg10: Option<f64>,
}

/// Where memory samples come from (the host, or a fake in tests).
pub trait MemorySource: Send + Sync + 'static {
    fn sample(&self) -> Option<MemorySample>;
}

/// When to evict.
#[derive(Clone)]
pub struct Eviction {
    /// `None`: no eviction.
    pub source: Option<Arc<dyn MemorySource>>,
    /// Evict while available memory is below this.
    pub memory_available_bytes: u64,
    /// Evict while PSI memory `some avg10` is above this percentage.
    pub psi_some_avg10: Option<f64>,
    pub interval: Duration,
}

impl Default for Eviction {
    fn default() -> Self {
        Eviction {
            source: None,
            memory_available_bytes: 100 << 20,
            psi_some_avg10: Some(50.0),
            interval: Duration::from_secs(1),
        }
    }
}

impl Eviction {
    /// Why `s` is memory pressure, or `None` if it is not.
    pub fn pressure(&self, s: &MemorySample) -> Option<String> {
        if s.available_bytes < self.memory_available_bytes {
            return Some(format!(
                "host memory available {} bytes is below the eviction threshold of {} bytes",
                s.available_bytes, self.memory_available_bytes
            ));
        }
        match (s.psi_some_avg10, self.psi_some_avg10) {
            (Some(p), Some(limit)) if p > limit => Some(format!(
                "memory pressure (PSI some avg10) {p:.1}% is above the eviction threshold of {limit:.1}%"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let e = Eviction::default();
        let calm = MemorySample {
            available_bytes: 1 << 30,
            psi_some_avg10: Some(0.5),
        };
        assert_eq!(e.pressure(&calm), None);
        let low = MemorySample {
            available_bytes: 50 << 20,
            ..calm
        };
        assert!(
            e.pressure(&low)
                .is_some_and(|w| w.contains("52428800 bytes"))
        );
        let stalled = MemorySample {
            psi_some_avg10: Some(71.25),
            ..calm
        };
        assert!(e.pressure(&stalled).is_some_and(|w| w.contains("71.2%")));
        let no_psi = Eviction {
            psi_some_avg10: None,
            ..Eviction::default()
        };
        assert_eq!(no_psi.pressure(&stalled), None);
    }
}
