//! The price card and what a record costs, in integer minor units (no
//! floating point touches money).
//!
//! Prices are integers in units of 10^-`scale` of the currency (`scale` 6
//! with `USD`: micro-dollars), per task, per CPU core-second, per MB-second
//! of memory, per second of wall time and per GPU-second by model. Each
//! term of a cost is rounded half up once, in 128-bit arithmetic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{RecordKind, UsageRecord};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceCard {
    /// ISO 4217 code, e.g. "USD".
    pub currency: String,
    /// Prices and costs are integers of 10^-scale currency units.
    pub scale: u32,
    #[serde(default)]
    pub per_task: u64,
    #[serde(default)]
    pub per_cpu_core_second: u64,
    #[serde(default)]
    pub per_mb_second: u64,
    #[serde(default)]
    pub per_wall_second: u64,
    /// By GPU model name as reported (e.g. "GPU_MODEL_NVIDIA_H100_80GB").
    #[serde(default)]
    pub per_gpu_second: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("price card: {0}")]
pub struct PriceCardError(String);

impl PriceCardError {
    pub fn new(why: impl Into<String>) -> PriceCardError {
        PriceCardError(why.into())
    }
}

/// `rate × quantity / per`, rounded half up.
fn term(rate: u64, quantity: u64, per: u128) -> u128 {
    (u128::from(rate) * u128::from(quantity) + per / 2) / per
}

impl PriceCard {
    /// A card from TOML text, checked.
    pub fn from_toml(text: &str) -> Result<PriceCard, PriceCardError> {
        let card: PriceCard = toml::from_str(text).map_err(|e| PriceCardError(e.to_string()))?;
        card.check()?;
        Ok(card)
    }

    /// Checks what serde cannot: the currency code, the scale, GPU model names.
    pub fn check(&self) -> Result<(), PriceCardError> {
        if !(self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(PriceCardError(format!(
                "currency {:?} is not a three-letter ISO 4217 code",
                self.currency
            )));
        }
        if self.scale > 12 {
            return Err(PriceCardError(format!("scale {} is above 12", self.scale)));
        }
        if let Some(m) = self
            .per_gpu_second
            .keys()
            .find(|m| m.is_empty() || m.len() > 64)
        {
            return Err(PriceCardError(format!(
                "GPU model {m:?} is not a model name"
            )));
        }
        Ok(())
    }

    /// What `r` costs, in 10^-scale currency units (saturating).
    pub fn cost(&self, r: &UsageRecord) -> i64 {
        let mut total: u128 = 0;
        if r.kind == RecordKind::Allocation && r.ran {
            total += u128::from(self.per_task);
        }
        total += term(self.per_cpu_core_second, r.cpu_core_us, 1_000_000);
        total += term(self.per_mb_second, r.memory_mb_ms, 1_000);
        total += term(self.per_wall_second, r.wall_ms(), 1_000);
        for (model, ms) in &r.gpu_ms {
            if let Some(rate) = self.per_gpu_second.get(model) {
                total += term(*rate, *ms, 1_000);
            }
        }
        i64::try_from(total).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = r#"
currency = "USD"
scale = 6                       # micro-dollars
per_task = 100
per_cpu_core_second = 20
per_mb_second = 1
per_wall_second = 3

[per_gpu_second]
GPU_MODEL_NVIDIA_H100_80GB = 1000
"#;

    fn usage() -> UsageRecord {
        UsageRecord {
            kind: RecordKind::Allocation,
            id: "a".into(),
            function_executor_id: "fe".into(),
            namespace: "ns".into(),
            application: "app".into(),
            function: "f".into(),
            started_unix_ms: 10_000,
            ended_unix_ms: 12_500,  // 2.5 s
            cpu_core_us: 1_500_000, // 1.5 core-s
            memory_mb_ms: 256_000,  // 256 MB-s
            peak_memory_bytes: 0,
            gpu_ms: vec![
                ("GPU_MODEL_NVIDIA_H100_80GB".into(), 2_000),
                ("unpriced".into(), 9_000),
            ],
            cost_minor: None,
            outcome: "success".into(),
            ran: true,
            idle_ms: None,
            gpu_busy_ms: Vec::new(),
        }
    }

    #[test]
    fn the_cost_is_the_card_applied_in_integers() {
        let card = PriceCard::from_toml(CARD).expect("valid card");
        // 100 task + 20×1.5 cpu + 1×256 memory + 3×2.5 wall (7.5 → 8) + 1000×2 gpu
        assert_eq!(card.cost(&usage()), 100 + 30 + 256 + 8 + 2000);
        let idle = UsageRecord {
            kind: RecordKind::WorkerSegment,
            ..usage()
        };
        assert_eq!(
            card.cost(&idle),
            30 + 256 + 8 + 2000,
            "no task price for idle time"
        );
    }

    #[test]
    fn bad_cards_are_refused_with_the_reason() {
        for (text, why) in [
            ("currency = \"usd\"\nscale = 2\n", "ISO 4217"),
            ("currency = \"USD\"\nscale = 40\n", "above 12"),
            ("currency = \"USD\"\nscale = 2\nper_tsak = 1\n", "per_tsak"),
            ("currency = \"USD\"\nscale = 2\nper_task = -1\n", "per_task"),
        ] {
            let e = PriceCard::from_toml(text).expect_err(text);
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn huge_usage_saturates_instead_of_wrapping() {
        let card = PriceCard {
            currency: "USD".into(),
            scale: 0,
            per_task: 0,
            per_cpu_core_second: u64::MAX,
            per_mb_second: 0,
            per_wall_second: 0,
            per_gpu_second: BTreeMap::new(),
        };
        let r = UsageRecord {
            cpu_core_us: u64::MAX,
            ..usage()
        };
        assert_eq!(card.cost(&r), i64::MAX);
    }
}
