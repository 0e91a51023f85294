//! The host's memory headroom as the kernel reports it: `MemAvailable` from
//! `/proc/meminfo` and, where the kernel has PSI, `some avg10` from
//! `/proc/pressure/memory` (the share of the last 10 s in which some task
//! stalled waiting for memory).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryHeadroom {
    pub available_bytes: u64,
    pub psi_some_avg10: Option<f64>,
}

/// Reads the host's headroom now; `None` without a readable `/proc/meminfo`.
pub fn memory_headroom() -> Option<MemoryHeadroom> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let psi = std::fs::read_to_string("/proc/pressure/memory").ok();
    Some(MemoryHeadroom {
        available_bytes: parse_mem_available(&meminfo)?,
        psi_some_avg10: psi.as_deref().and_then(parse_psi_some_avg10),
    })
}

/// `MemAvailable:  123456 kB` in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `some avg10=1.23 avg60=… total=…` → 1.23.
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse::<f64>()
        .ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_files() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        16000000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(23_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        let psi = "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=99\n";
        assert_eq!(parse_psi_some_avg10(psi), Some(12.5));
        assert_eq!(parse_psi_some_avg10("some avg10=NaN\n"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=400\n"), None);
        assert!(memory_headroom().is_some_and(|h| h.available_bytes > 0));
    }
}
