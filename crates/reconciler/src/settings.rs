//! What an operator may change while the agent runs: the executor's labels
//! and the eviction thresholds. A change is validated as a whole (an
//! invalid one changes nothing and names the field) and reported to the
//! server at once (the labels are part of the state hash).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pb;

/// Labels the agent sets itself; an operator's may not override them.
const RESERVED_LABELS: [&str; 4] = [
    "os",
    "architecture",
    "python_major_version",
    "python_minor_version",
];
const MAX_LABELS: usize = 64;
const MAX_ALLOWED_FUNCTIONS: usize = 1000;

/// The runtime-changeable settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub labels: BTreeMap<String, String>,
    /// Functions this host runs, `namespace:application:function[:version]`
    /// (reported to the server, which places only these here); empty: any.
    pub allowed_functions: Vec<String>,
    /// What workers never get (GPUs are reserved by flag only: they are
    /// pinned by index at start).
    pub reserved: Reserved,
    /// Evict idle workers while available memory is below this (0: never).
    pub eviction_memory_available: u64,
    /// Evict idle workers while PSI memory `some avg10` is above this percentage.
    pub eviction_memory_pressure: Option<f64>,
}

/// CPU, memory and disk kept back from workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reserved {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// A change of [`Reserved`]; absent fields stay.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservedPatch {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// A change; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub labels: Option<BTreeMap<String, String>>,
    pub allowed_functions: Option<Vec<String>>,
    pub reserved: Option<ReservedPatch>,
    pub eviction_memory_available: Option<u64>,
    /// 0 turns the PSI signal off.
    pub eviction_memory_pressure: Option<f64>,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SettingsError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SettingsError> {
    if labels.len() > MAX_LABELS {
        return Err(bad("labels", format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let field = format!("labels.{k}");
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(bad(field, "a key is 1 to 63 characters of [A-Za-z0-9._/-]"));
        }
        if RESERVED_LABELS.contains(&k.as_str()) {
            return Err(bad(field, "set by the agent itself"));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(bad(
                field,
                "a value is at most 256 characters, none a control character",
            ));
        }
    }
    Ok(())
}

/// A text that is not `namespace:application:function[:version]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not namespace:application:function[:version]")]
pub struct NotAnAllowedFunction(pub String);

/// `namespace:application:function[:version]` as the server's message.
pub fn parse_allowed_function(f: &str) -> Result<pb::AllowedFunction, NotAnAllowedFunction> {
    let parts: Vec<&str> = f.split(':').collect();
    if f.len() > 512 || !(3..=4).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(NotAnAllowedFunction(f.to_string()));
    }
    Ok(pb::AllowedFunction {
        namespace: Some(parts[0].into()),
        application_name: Some(parts[1].into()),
        function_name: Some(parts[2].into()),
        application_version: parts.get(3).map(|v| v.to_string()),
    })
}

/// The operator's form of an allowed function.
pub fn allowed_function_text(f: &pb::AllowedFunction) -> String {
    let mut text = format!(
        "{}:{}:{}",
        f.namespace.as_deref().unwrap_or(""),
        f.application_name.as_deref().unwrap_or(""),
        f.function_name.as_deref().unwrap_or("")
    );
    if let Some(v) = &f.application_version {
        text.push(':');
        text.push_str(v);
    }
    text
}

impl Settings {
    /// The allowlist as the server's messages (checked when set).
    pub fn allowed_pb(&self) -> Vec<pb::AllowedFunction> {
        self.allowed_functions
            .iter()
            .filter_map(|f| parse_allowed_function(f).ok())
            .collect()
    }

    /// What workers may hold: `total` less what is reserved; the GPUs are
    /// `gpu` (fixed at start).
    pub fn allocatable(
        &self,
        total: &pb::HostResources,
        gpu: Option<pb::GpuResources>,
    ) -> pb::HostResources {
        pb::HostResources {
            cpu_count: Some(
                total
                    .cpu_count
                    .unwrap_or(0)
                    .saturating_sub(self.reserved.cpus),
            ),
            memory_bytes: Some(
                total
                    .memory_bytes
                    .unwrap_or(0)
                    .saturating_sub(self.reserved.memory_bytes),
            ),
            disk_bytes: Some(
                total
                    .disk_bytes
                    .unwrap_or(0)
                    .saturating_sub(self.reserved.disk_bytes),
            ),
            gpu,
        }
    }

    /// These settings with `patch` applied, or why not (nothing changes);
    /// `total` bounds what may be reserved.
    pub fn patched(
        &self,
        patch: &SettingsPatch,
        total: &pb::HostResources,
    ) -> Result<Settings, SettingsError> {
        let mut next = self.clone();
        if let Some(r) = &patch.reserved {
            let checks: [(&str, Option<u64>, u64); 3] = [
                (
                    "reserved.cpus",
                    r.cpus.map(u64::from),
                    u64::from(total.cpu_count.unwrap_or(0)),
                ),
                (
                    "reserved.memory_bytes",
                    r.memory_bytes,
                    total.memory_bytes.unwrap_or(0),
                ),
                (
                    "reserved.disk_bytes",
                    r.disk_bytes,
                    total.disk_bytes.unwrap_or(0),
                ),
            ];
            for (field, want, have) in checks {
                if want.is_some_and(|w| w > have) {
                    return Err(bad(field, format!("more than the host has ({have})")));
                }
            }
            next.reserved = Reserved {
                cpus: r.cpus.unwrap_or(self.reserved.cpus),
                memory_bytes: r.memory_bytes.unwrap_or(self.reserved.memory_bytes),
                disk_bytes: r.disk_bytes.unwrap_or(self.reserved.disk_bytes),
            };
        }
        if let Some(list) = &patch.allowed_functions {
            if list.len() > MAX_ALLOWED_FUNCTIONS {
                return Err(bad(
                    "allowed_functions",
                    format!("at most {MAX_ALLOWED_FUNCTIONS}"),
                ));
            }
            for (i, f) in list.iter().enumerate() {
                parse_allowed_function(f)
                    .map_err(|e| bad(format!("allowed_functions[{i}]"), e.to_string()))?;
            }
            next.allowed_functions = list.clone();
        }
        if let Some(labels) = &patch.labels {
            check_labels(labels)?;
            next.labels = labels.clone();
        }
        if let Some(bytes) = patch.eviction_memory_available {
            next.eviction_memory_available = bytes;
        }
        if let Some(p) = patch.eviction_memory_pressure {
            if !(p.is_finite() && (0.0..=100.0).contains(&p)) {
                return Err(bad(
                    "eviction_memory_pressure",
                    "a percentage from 0 to 100",
                ));
            }
            next.eviction_memory_pressure = (p > 0.0).then_some(p);
        }
        Ok(next)
    }

    /// The names of the fields that differ from `other`.
    pub fn changed_from(&self, other: &Settings) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.labels != other.labels {
            out.push("labels");
        }
        if self.allowed_functions != other.allowed_functions {
            out.push("allowed_functions");
        }
        if self.reserved != other.reserved {
            out.push("reserved");
        }
        if self.eviction_memory_available != other.eviction_memory_available {
            out.push("eviction_memory_available");
        }
        if self.eviction_memory_pressure != other.eviction_memory_pressure {
            out.push("eviction_memory_pressure");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total() -> pb::HostResources {
        pb::HostResources {
            cpu_count: Some(8),
            memory_bytes: Some(1000),
            disk_bytes: Some(1000),
            gpu: None,
        }
    }

    #[test]
    fn reserving_changes_allocatable_within_what_the_host_has() {
        let s = base();
        let p = SettingsPatch {
            reserved: Some(ReservedPatch {
                cpus: Some(2),
                memory_bytes: Some(100),
                disk_bytes: None,
            }),
            ..SettingsPatch::default()
        };
        let next = s.patched(&p, &total()).expect("valid");
        let a = next.allocatable(&total(), None);
        assert_eq!(
            (a.cpu_count, a.memory_bytes, a.disk_bytes),
            (Some(6), Some(900), Some(1000))
        );
        let too_much = SettingsPatch {
            reserved: Some(ReservedPatch {
                cpus: Some(9),
                ..ReservedPatch::default()
            }),
            ..SettingsPatch::default()
        };
        assert_eq!(
            s.patched(&too_much, &total()).map_err(|e| e.field),
            Err("reserved.cpus".to_string())
        );
    }

    fn base() -> Settings {
        Settings {
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            allowed_functions: Vec::new(),
            reserved: Reserved::default(),
            eviction_memory_available: 100,
            eviction_memory_pressure: Some(50.0),
        }
    }

    #[test]
    fn a_valid_patch_applies_and_an_invalid_one_changes_nothing() {
        let s = base();
        let p = SettingsPatch {
            labels: Some(BTreeMap::from([("zone".into(), "b".into())])),
            eviction_memory_pressure: Some(0.0),
            ..SettingsPatch::default()
        };
        let next = s.patched(&p, &total()).expect("valid");
        assert_eq!(next.labels["zone"], "b");
        assert_eq!(next.eviction_memory_pressure, None, "0 turns PSI off");
        assert_eq!(
            next.changed_from(&s),
            vec!["labels", "eviction_memory_pressure"]
        );
        for (patch, field) in [
            (
                SettingsPatch {
                    labels: Some(BTreeMap::from([("os".into(), "x".into())])),
                    eviction_memory_available: Some(1),
                    ..SettingsPatch::default()
                },
                "labels.os",
            ),
            (
                SettingsPatch {
                    labels: Some(BTreeMap::from([("bad key".into(), "x".into())])),
                    ..SettingsPatch::default()
                },
                "labels.bad key",
            ),
            (
                SettingsPatch {
                    eviction_memory_pressure: Some(150.0),
                    ..SettingsPatch::default()
                },
                "eviction_memory_pressure",
            ),
            (
                SettingsPatch {
                    allowed_functions: Some(vec!["ns:app:f".into(), "ns::f".into()]),
                    ..SettingsPatch::default()
                },
                "allowed_functions[1]",
            ),
        ] {
            assert_eq!(
                s.patched(&patch, &total()).map_err(|e| e.field),
                Err(field.to_string())
            );
        }
        let unknown: Result<SettingsPatch, _> = serde_json::from_str(r#"{"lables": {}}"#);
        assert!(unknown.is_err_and(|e| e.to_string().contains("lables")));
    }
}

#[test]
fn allowed_functions_round_trip() {
    let f = parse_allowed_function("ns:app:fn:3").expect("valid");
    assert_eq!(allowed_function_text(&f), "ns:app:fn:3");
    assert_eq!(
        parse_allowed_function("ns:app:fn").map(|f| f.application_version),
        Ok(None)
    );
    assert!(parse_allowed_function("ns:app").is_err());
}
