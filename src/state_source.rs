//! Wires the agent's handle to the monitoring server: probe verdicts,
//! metrics text and the `/state/*` documents.
//!
//! Every list document is paged (`?limit=&offset=`, [`Page`]); the state
//! lock is held only to copy a page, never to serialise it; the desired
//! state and the last report are paged or summarised past
//! [`MAX_DOCUMENT_BYTES`]; `/state/usage` reads a bounded part of the
//! ledger ([`steward_metering::summarize_bounded`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use steward_monitoring::{
    AdminAnswer, Document, Format, Page, ProbeResult, QueryError, StateSource,
};
use steward_reconciler::{AgentHandle, ModeCommand};

/// Largest part of a protobuf document (the desired state, the last
/// report) one answer carries, counted in encoded bytes: a page of the
/// desired state ends before it, and a larger report is summarised.
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;
/// Refused admin and read calls that reach the event ring, per minute:
/// the rest are counted (`steward_monitoring_auth_failures`) and summed
/// up in one event.
const REFUSED_EVENTS: &str = "refused_request";

pub struct AgentStateSource {
    /// When the agent started (the page's uptime).
    pub started: SystemTime,
    /// The host's load over time (`/state/load`).
    pub load: Option<std::sync::Arc<crate::load::LoadView>>,
    pub host: std::sync::Arc<crate::host::HostView>,
    pub handle: AgentHandle,
    pub report_grace: Duration,
    pub reconcile_watchdog: Duration,
    pub metering: Option<std::sync::Arc<steward_metering::Recorder>>,
    /// Digests of sealed ledger segments, kept between `/state/usage` requests.
    pub usage_cache: steward_metering::SummaryCache,
    /// Ledger bytes one `/state/usage` request reads at most.
    pub usage_scan_bytes: u64,
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
    pub(crate) fn usage(
        &self,
        query: &BTreeMap<String, String>,
    ) -> Result<serde_json::Value, String> {
        if let Some(k) = query.keys().find(|k| {
            !matches!(
                k.as_str(),
                "since" | "until" | "group_by" | "limit" | "offset"
            )
        }) {
            return Err(format!(
                "unknown parameter {k:?}: since, until, group_by, limit, offset"
            ));
        }
        let page = Page::from_query(query).map_err(|e| e.to_string())?;
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
        let (mut summary, coverage) = steward_metering::summarize_bounded(
            std::path::Path::new(&status.ledger_dir),
            since,
            until,
            group_by,
            &self.usage_cache,
            self.usage_scan_bytes,
        )
        .map_err(|e| e.to_string())?;
        let groups = std::mem::take(&mut summary.groups);
        let total = groups.len();
        let range = page.range(total);
        summary.groups = groups
            .into_iter()
            .skip(range.start)
            .take(range.len())
            .collect();
        Ok(serde_json::json!({
            "status": "ok",
            "group_by": query.get("group_by"),
            "price_card": m.price_card(),
            "summary": summary,
            "groups_page": page.info(total),
            "coverage": coverage,
            "ledger": status,
        }))
    }

    /// `/state/activity`: tasks and usage per UTC day, the last 366 days.
    pub(crate) fn activity(&self, page: Page) -> serde_json::Value {
        match &self.metering {
            Some(m) => {
                let days = m.activity();
                serde_json::json!({
                    "status": "ok",
                    "days_kept": steward_metering::ACTIVITY_DAYS,
                    "days": page.slice(&days),
                    "page": page.info(days.len()),
                })
            }
            None => {
                serde_json::json!({"status": "off", "message": "metering is off (--no-metering)"})
            }
        }
    }
}

impl AgentStateSource {
    /// `/state/reported`: the last report, or what it holds when it is
    /// larger than [`MAX_DOCUMENT_BYTES`].
    fn reported(&self, format: Format) -> Document {
        let Some((r, at)) = self.handle.last_report() else {
            return match format {
                Format::Text => Document::Text("No state reported so far\n".into()),
                Format::Json => Document::Json(timestamped::<()>(
                    "report",
                    None,
                    "no state reported so far",
                )),
            };
        };
        let bytes = r.encoded_len();
        if bytes <= MAX_DOCUMENT_BYTES {
            return match format {
                Format::Text => Document::Text(format!("{r:#?}\n")),
                Format::Json => Document::Json(timestamped("report", Some((r, at)), "")),
            };
        }
        let message = format!(
            "the last report is {bytes} bytes encoded, over the {MAX_DOCUMENT_BYTES} bytes \
             /state/reported shows: see /state/function-executors and /state/allocations"
        );
        let state = r.executor_state.as_ref();
        let doc = serde_json::json!({
            "status": "too large",
            "at_unix_ms": unix_ms(at),
            "message": message,
            "encoded_bytes": bytes,
            "function_executor_states": state.map_or(0, |s| s.function_executor_states.len()),
            "function_call_watches": state.map_or(0, |s| s.function_call_watches.len()),
            "allocation_results": r.executor_update.as_ref().map_or(0, |u| u.allocation_results.len()),
        });
        match format {
            Format::Text => Document::Text(format!("{message}\n")),
            Format::Json => Document::Json(doc),
        }
    }

    /// `/state/desired`: a page of each of the last desired state's lists
    /// (`?limit=&offset=`), ending before [`MAX_DOCUMENT_BYTES`] of them.
    fn desired(&self, format: Format, page: Page) -> Document {
        let Some((d, at)) = self.handle.last_desired() else {
            return match format {
                Format::Text => {
                    Document::Text("No desired state received from Server yet\n".into())
                }
                Format::Json => Document::Json(timestamped::<()>(
                    "desired_state",
                    None,
                    "no desired state received from the server yet",
                )),
            };
        };
        let mut budget = MAX_DOCUMENT_BYTES;
        let (function_executors, fes) = budgeted(&d.function_executors, page, &mut budget);
        let (allocations, allocs) = budgeted(&d.allocations, page, &mut budget);
        let (function_call_results, results) =
            budgeted(&d.function_call_results, page, &mut budget);
        let part = steward_reconciler::Desired {
            function_executors,
            allocations,
            clock: d.clock,
            function_call_results,
        };
        match format {
            Format::Text => Document::Text(format!("{part:#?}\n")),
            Format::Json => Document::Json(serde_json::json!({
                "status": "ok",
                "at_unix_ms": unix_ms(at),
                "desired_state": part,
                "pages": {
                    "function_executors": fes,
                    "allocations": allocs,
                    "function_call_results": results,
                },
            })),
        }
    }
}

/// `page` of `items`, ending before it would pass `budget` encoded bytes
/// (taken from it); an item larger than [`MAX_DOCUMENT_BYTES`] on its own
/// is left out and named. Also where the page sits ([`Page::info`]).
fn budgeted<T: Message>(
    items: &[Arc<T>],
    page: Page,
    budget: &mut usize,
) -> (Vec<Arc<T>>, serde_json::Value) {
    let range = page.range(items.len());
    let (mut out, mut omitted, mut end) = (Vec::new(), Vec::new(), range.start);
    for (i, item) in items[range.clone()].iter().enumerate() {
        let n = item.encoded_len();
        if n > MAX_DOCUMENT_BYTES {
            omitted.push(serde_json::json!({"index": range.start + i, "encoded_bytes": n}));
        } else if n > *budget {
            break;
        } else {
            *budget -= n;
            out.push(item.clone());
        }
        end = range.start + i + 1;
    }
    let mut info = page.info_until(items.len(), end);
    if !omitted.is_empty() {
        info["omitted_over_max_bytes"] = serde_json::Value::Array(omitted);
    }
    (out, info)
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
            "load",
        ]
    }

    fn document_with_query(
        &self,
        name: &str,
        format: Format,
        query: &BTreeMap<String, String>,
    ) -> Option<Result<Document, QueryError>> {
        let page = match Page::from_query(query) {
            Ok(p) => p,
            Err(e) if name != "host" && name != "reported" => return Some(Err(e)),
            Err(_) => Page::default(),
        };
        let json = |v| Some(Ok(Document::Json(v)));
        match name {
            "load" => {
                let load = self.load.as_ref()?;
                Some(
                    load.document(query.get("range").map(String::as_str))
                        .map(Document::Json)
                        .map_err(QueryError::Parameter),
                )
            }
            "usage" => Some(
                self.usage(query)
                    .map(Document::Json)
                    .map_err(QueryError::Parameter),
            ),
            "activity" => json(self.activity(page)),
            "reported" => Some(Ok(self.reported(format))),
            "desired" => Some(Ok(self.desired(format, page))),
            "function-executors" => {
                let (fes, total) = self.handle.function_executors_page(page.offset, page.limit);
                json(serde_json::json!({
                    "function_executors": fes,
                    "page": page.info(total),
                }))
            }
            "allocations" => {
                let (allocs, total, pending) =
                    self.handle.allocations_page(page.offset, page.limit);
                json(serde_json::json!({
                    "allocations": allocs,
                    "pending_results": pending,
                    "page": page.info(total),
                }))
            }
            "events" => {
                let (events, total) = self.handle.events_page(page.offset, page.limit);
                json(serde_json::json!({"events": events, "page": page.info(total)}))
            }
            _ => self.document(name, format).map(Ok),
        }
    }

    fn document(&self, name: &str, format: Format) -> Option<Document> {
        match (name, format) {
            (
                "reported" | "desired" | "function-executors" | "allocations" | "events" | "usage"
                | "activity",
                _,
            ) => self
                .document_with_query(name, format, &BTreeMap::new())
                .and_then(Result::ok),
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
            _ => None,
        }
    }

    fn page(&self, query: &BTreeMap<String, String>) -> Option<String> {
        Some(crate::page::render(self, query))
    }

    fn asset(&self, name: &str) -> Option<(&'static str, &'static [u8])> {
        match name {
            "page.js" => Some((
                "text/javascript; charset=utf-8",
                crate::page::SCRIPT.as_bytes(),
            )),
            "page.css" => Some(("text/css; charset=utf-8", crate::page::STYLE.as_bytes())),
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
        self.handle.event_limited(
            REFUSED_EVENTS,
            "admin_request",
            "admin",
            format!("{action}: refused with HTTP {status}"),
        );
    }

    fn read_refused(&self, path: &str, status: u16) {
        self.handle.event_limited(
            REFUSED_EVENTS,
            "state_request",
            "monitoring",
            format!("{path}: refused with HTTP {status}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_reconciler::pb;

    fn allocation(id: &str, bytes: usize) -> Arc<pb::Allocation> {
        Arc::new(pb::Allocation {
            allocation_id: Some(format!("{id}{}", "x".repeat(bytes))),
            ..Default::default()
        })
    }

    #[test]
    fn a_desired_page_ends_before_the_byte_cap_and_names_what_never_fits() {
        let mb = 1 << 20;
        let items = vec![
            allocation("a", 6 * mb),
            allocation("b", MAX_DOCUMENT_BYTES + 1),
            allocation("c", 6 * mb),
            allocation("d", 6 * mb),
            allocation("e", 1),
        ];
        let mut budget = MAX_DOCUMENT_BYTES;
        let (page, info) = budgeted(&items, Page::default(), &mut budget);
        let ids: Vec<char> = page
            .iter()
            .filter_map(|a| a.allocation_id.as_deref()?.chars().next())
            .collect();
        assert_eq!(ids, ['a', 'c'], "{info}");
        assert_eq!(info["next_offset"], 3, "{info}");
        assert_eq!(info["omitted_over_max_bytes"][0]["index"], 1, "{info}");
        // The next page goes on from there, within its own budget.
        let mut budget = MAX_DOCUMENT_BYTES;
        let next = Page {
            offset: 3,
            limit: 1000,
        };
        let (page, info) = budgeted(&items, next, &mut budget);
        assert_eq!(page.len(), 2, "{info}");
        assert_eq!(info["next_offset"], serde_json::Value::Null, "{info}");
        // `limit` bounds a page as well.
        let mut budget = MAX_DOCUMENT_BYTES;
        let one = Page {
            offset: 4,
            limit: 1,
        };
        assert_eq!(budgeted(&items, one, &mut budget).0.len(), 1);
    }
}
