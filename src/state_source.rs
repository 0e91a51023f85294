//! Wires the agent's handle to the monitoring server: probe verdicts,
//! metrics text and the `/state/*` documents.

use std::time::{Duration, SystemTime};

use steward_monitoring::{AdminAnswer, Document, Format, ProbeResult, StateSource};
use steward_reconciler::{AgentHandle, ModeCommand};

pub struct AgentStateSource {
    pub host: std::sync::Arc<crate::host::HostView>,
    pub handle: AgentHandle,
    pub report_grace: Duration,
    pub reconcile_watchdog: Duration,
    pub metering: Option<std::sync::Arc<steward_metering::Recorder>>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn timestamped<T: serde::Serialize>(
    what: &str,
    v: Option<(T, SystemTime)>,
    none: &str,
) -> serde_json::Value {
    match v {
        Some((doc, at)) => {
            serde_json::json!({"status": "ok", "at_unix_ms": unix_ms(at), what: doc})
        }
        None => serde_json::json!({"status": "none yet", "message": none}),
    }
}

impl AgentStateSource {
    /// `/state/usage?since=&until=&group_by=`: ledger totals over a time
    /// range (by when records ended, as `steward usage export` filters).
    fn usage(
        &self,
        query: &std::collections::BTreeMap<String, String>,
    ) -> Result<serde_json::Value, String> {
        if let Some(k) = query
            .keys()
            .find(|k| !matches!(k.as_str(), "since" | "until" | "group_by"))
        {
            return Err(format!("unknown parameter {k:?}: since, until, group_by"));
        }
        let time = |k: &str| {
            query
                .get(k)
                .map(|v| crate::usage::parse_time(v).map_err(|e| format!("{k}: {e:#}")))
                .transpose()
        };
        let (since, until) = (time("since")?, time("until")?);
        let group_by = match query.get("group_by") {
            None => None,
            Some(g) => Some(steward_metering::GroupBy::parse(g).ok_or_else(|| {
                format!("group_by {g:?}: function, application, namespace or day")
            })?),
        };
        let Some(m) = &self.metering else {
            return Ok(
                serde_json::json!({"status": "off", "message": "metering is off (--no-metering)"}),
            );
        };
        let status = m.status();
        let summary = steward_metering::summarize(
            std::path::Path::new(&status.ledger_dir),
            since,
            until,
            group_by,
        )
        .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "status": "ok",
            "group_by": query.get("group_by"),
            "price_card": m.price_card(),
            "summary": summary,
            "ledger": status,
        }))
    }

    /// `/state/activity`: tasks and usage per UTC day, the last 366 days.
    fn activity(&self) -> serde_json::Value {
        match &self.metering {
            Some(m) => serde_json::json!({
                "status": "ok",
                "days_kept": steward_metering::ACTIVITY_DAYS,
                "days": m.activity(),
            }),
            None => {
                serde_json::json!({"status": "off", "message": "metering is off (--no-metering)"})
            }
        }
    }
}

impl StateSource for AgentStateSource {
    fn startup(&self) -> ProbeResult {
        let (ok, message) = self.handle.startup();
        ProbeResult { ok, message }
    }

    fn health(&self) -> ProbeResult {
        let (ok, message) = self
            .handle
            .health(self.report_grace, self.reconcile_watchdog);
        self.handle.metrics().healthy.set(i64::from(ok));
        ProbeResult { ok, message }
    }

    /// The usage ledger's trouble (writes failing, a disk that hangs) is
    /// degraded, never unhealthy: a 503 would have the kubelet restart the
    /// agent, which brings no disk space back and loses the usage records
    /// waiting in memory, while results keep flowing meanwhile.
    fn degraded(&self) -> Vec<String> {
        self.metering
            .as_ref()
            .and_then(|m| m.ledger_trouble())
            .into_iter()
            .collect()
    }

    fn metrics(&self) -> String {
        // Keep the `healthy` gauge current on every scrape.
        let _ = self.health();
        self.handle.refresh_worker_metrics();
        self.handle.metrics().encode()
    }

    fn document_names(&self) -> Vec<&'static str> {
        vec![
            "reported",
            "desired",
            "function-executors",
            "allocations",
            "events",
            "usage",
            "activity",
        ]
    }

    fn document_with_query(
        &self,
        name: &str,
        format: Format,
        query: &std::collections::BTreeMap<String, String>,
    ) -> Option<Result<Document, String>> {
        match name {
            "usage" => Some(self.usage(query).map(Document::Json)),
            "activity" => Some(Ok(Document::Json(self.activity()))),
            _ => self.document(name, format).map(Ok),
        }
    }

    fn document(&self, name: &str, format: Format) -> Option<Document> {
        match (name, format) {
            ("reported", Format::Text) => Some(Document::Text(match self.handle.last_report() {
                Some((r, _)) => format!("{r:#?}\n"),
                None => "No state reported so far\n".into(),
            })),
            ("desired", Format::Text) => Some(Document::Text(match self.handle.last_desired() {
                Some((d, _)) => format!("{d:#?}\n"),
                None => "No desired state received from Server yet\n".into(),
            })),
            ("reported", _) => Some(Document::Json(timestamped(
                "report",
                self.handle.last_report(),
                "no state reported so far",
            ))),
            ("desired", _) => Some(Document::Json(timestamped(
                "desired_state",
                self.handle.last_desired(),
                "no desired state received from the server yet",
            ))),
            ("function-executors", _) => {
                let s = self.handle.snapshot();
                Some(Document::Json(
                    serde_json::json!({"function_executors": s.function_executors}),
                ))
            }
            ("allocations", _) => {
                let s = self.handle.snapshot();
                Some(Document::Json(serde_json::json!({
                    "allocations": s.allocations,
                    "pending_results": s.pending_results,
                })))
            }
            ("host", _) => {
                let mut doc = self.host.document();
                if let Some(o) = doc.as_object_mut() {
                    let workers = self.handle.workers_document();
                    // Reserved CPU, memory and disk can change at runtime.
                    let r = self.handle.settings().reserved;
                    if let Some(res) = o.get_mut("reserved").and_then(|v| v.as_object_mut()) {
                        res.insert("cpu_count".into(), r.cpus.into());
                        res.insert("memory_bytes".into(), r.memory_bytes.into());
                        res.insert("disk_bytes".into(), r.disk_bytes.into());
                    }
                    if let Some(a) = o.get_mut("allocatable").and_then(|v| v.as_object_mut()) {
                        let now = &workers["allocatable"];
                        a.insert(
                            "cpu_count".into(),
                            (now["cpu_ms_per_sec"].as_u64().unwrap_or(0) / 1000).into(),
                        );
                        a.insert("memory_bytes".into(), now["memory_bytes"].clone());
                        a.insert("disk_bytes".into(), now["disk_bytes"].clone());
                    }
                    o.insert("workers".into(), workers);
                    o.insert("mode".into(), serde_json::json!(self.handle.mode()));
                }
                Some(Document::Json(doc))
            }
            ("events", _) => Some(Document::Json(
                serde_json::json!({"events": self.handle.events()}),
            )),
            _ => None,
        }
    }

    fn admin(&self, action: &str, method: &str, body: &[u8]) -> Option<AdminAnswer> {
        let subject = "admin";
        let ok = |body| Some(AdminAnswer { code: 200, body });
        match (action, method) {
            ("mode", _) => return ok(serde_json::json!({"mode": self.handle.mode()})),
            ("config", "GET") => {
                return ok(crate::config_file::settings_document(
                    &self.handle,
                    self.metering.as_deref(),
                ));
            }
            ("config", "PATCH") => {
                let change = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"));
                let outcome = change.and_then(|c| {
                    crate::config_file::apply_settings(
                        &self.handle,
                        self.metering.as_deref(),
                        c,
                        "admin API",
                    )
                });
                let (code, body, said) = match outcome {
                    Ok(doc) => (200, doc, "ok".to_string()),
                    Err(e) => (
                        400,
                        serde_json::json!({"error": e}),
                        format!("refused: {e}"),
                    ),
                };
                self.handle
                    .event("admin_request", subject, format!("config: {said}"));
                return Some(AdminAnswer { code, body });
            }
            ("config", _) => {
                return Some(AdminAnswer {
                    code: 405,
                    body: serde_json::json!({"error": "GET or PATCH /admin/config"}),
                });
            }
            (_, "POST") => {}
            _ => {
                return Some(AdminAnswer {
                    code: 405,
                    body: serde_json::json!({"error": format!("POST /admin/{action}")}),
                });
            }
        }
        let Some(cmd) = ModeCommand::parse(action) else {
            self.handle.event(
                "admin_request",
                subject,
                format!("{action}: unknown action (404)"),
            );
            return None;
        };
        let (from, to) = self.handle.command(cmd);
        self.handle.event(
            "admin_request",
            subject,
            format!("{action}: ok, {} → {}", from.as_str(), to.as_str()),
        );
        ok(serde_json::json!({"action": action, "from": from, "mode": to}))
    }

    fn admin_refused(&self, action: &str, status: u16) {
        self.handle.event(
            "admin_request",
            "admin",
            format!("{action}: refused with HTTP {status}"),
        );
    }
}
