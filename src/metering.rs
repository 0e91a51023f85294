//! Metering wired to the agent: the reconciler's [`Metering`] seam over the
//! `steward-metering` recorder, and the price card as a setting.

use std::sync::Arc;
use std::time::Duration;

use steward_metering::{
    FinishedAllocation, PriceCard, Probe, Reading, Recorder, Sample, WorkerInfo,
};
use steward_reconciler::{MeteredAllocation, MeteredWorker, Metering};
use steward_worker_driver::WorkerMonitor;

/// The reconciler's metering seam, served by the recorder.
pub struct RecorderMetering(pub Arc<Recorder>);

/// A worker's cgroup (or `/proc`) as metering reads it.
struct MonitorProbe(Arc<dyn WorkerMonitor>);

impl Probe for MonitorProbe {
    fn read(&self) -> Option<Reading> {
        self.0.reading().map(|r| Reading {
            cpu_usec: r.cpu_usec,
            memory_bytes: r.memory_bytes,
        })
    }
}

fn info_of(w: MeteredWorker) -> WorkerInfo {
    WorkerInfo {
        fe_id: w.fe_id,
        namespace: w.namespace,
        application: w.application,
        function: w.function,
        gpu_models: w.gpu_models,
        gpu_uuids: w.gpu_uuids,
    }
}

/// (unix ms, CPU µs, memory bytes) as the meter's sample.
fn sample((at_ms, cpu_usec, memory_bytes): (u64, u64, u64)) -> Sample {
    Sample {
        at_ms,
        cpu_usec,
        memory_bytes,
    }
}

impl Metering for RecorderMetering {
    fn worker_started(&self, w: MeteredWorker) {
        let probe: Arc<dyn Probe> = Arc::new(MonitorProbe(w.monitor.clone()));
        self.0.worker_started(info_of(w), probe);
    }

    fn worker_stopped(&self, fe_id: &str) {
        self.0.worker_stopped(fe_id);
    }

    fn worker_adopted(&self, w: MeteredWorker, since: Option<(u64, u64, u64)>) {
        let probe: Arc<dyn Probe> = Arc::new(MonitorProbe(w.monitor.clone()));
        self.0.worker_adopted(info_of(w), probe, since.map(sample));
    }

    fn allocation_resumed(&self, fe_id: &str, alloc_id: &str, at: Option<(u64, u64, u64)>) {
        self.0.allocation_resumed(fe_id, alloc_id, at.map(sample));
    }

    fn allocation_started(&self, fe_id: &str, alloc_id: &str) {
        self.0.allocation_started(fe_id, alloc_id);
    }

    fn allocation_finished(&self, a: MeteredAllocation) -> u64 {
        self.0.allocation_finished(FinishedAllocation {
            alloc_id: a.alloc_id,
            fe_id: a.fe_id,
            namespace: a.namespace,
            application: a.application,
            function: a.function,
            outcome: a.outcome,
            ran: a.ran,
        })
    }

    fn durable(&self) -> u64 {
        self.0.durable()
    }

    fn on_durable(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.0.on_durable(wake);
    }

    fn flush(&self, timeout: Duration) {
        if !self.0.flush(timeout) {
            tracing::warn!(
                ?timeout,
                "metering did not catch up before the final report"
            );
        }
    }
}

/// A price card given as a setting: TOML text, or the card as an object;
/// `null` removes it.
pub fn parse_price_card(v: &serde_json::Value) -> Result<Option<PriceCard>, String> {
    let card = match v {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(toml) => PriceCard::from_toml(toml),
        other => serde_json::from_value::<PriceCard>(other.clone())
            .map_err(|e| e.to_string())
            .and_then(|c| c.check().map(|()| c).map_err(|e| e.to_string()))
            .map_err(steward_metering::PriceCardError::new),
    };
    card.map(Some).map_err(|e| format!("price_card: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_as_toml_or_object_and_null_removes_it() {
        let toml = serde_json::json!("currency = \"USD\"\nscale = 6\nper_task = 5\n");
        assert_eq!(
            parse_price_card(&toml)
                .expect("toml")
                .expect("card")
                .per_task,
            5
        );
        let obj = serde_json::json!({"currency": "EUR", "scale": 2, "per_cpu_core_second": 3});
        assert_eq!(
            parse_price_card(&obj)
                .expect("object")
                .expect("card")
                .currency,
            "EUR"
        );
        assert!(
            parse_price_card(&serde_json::Value::Null)
                .expect("null")
                .is_none()
        );
        let e =
            parse_price_card(&serde_json::json!({"currency": "eur", "scale": 2})).expect_err("bad");
        assert!(e.contains("ISO 4217"), "{e}");
        let e = parse_price_card(&serde_json::json!("scale = [")).expect_err("bad toml");
        assert!(e.starts_with("price_card:"), "{e}");
    }
}
