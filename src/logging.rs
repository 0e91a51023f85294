//! Steward's log: written to stderr, human-readable text on a terminal
//! and JSON lines otherwise (`--log-format auto|text|json`), under a
//! filter that `/admin/config` can change at runtime.
//!
//! A JSON line is one flat object: `timestamp`, `level`, `target`,
//! `executor_id` (on every line once the id is known, which is before the
//! agent logs anything), `message`, then the fields of the spans the line
//! was logged in (the reconciler's `fe_id` and `allocation_id`) and its
//! own fields. A line that the filter drops is never formatted.
//!
//! Must not know about: the agent (it is told the executor id).

use std::io::IsTerminal;
use std::sync::OnceLock;

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, JsonFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text when stderr (where the log goes) is a terminal, else JSON.
    Auto,
    Text,
    Json,
}

impl LogFormat {
    /// Whether lines are JSON, `auto` decided by whether stderr is a terminal.
    fn json(self, stderr_is_terminal: bool) -> bool {
        match self {
            LogFormat::Auto => !stderr_is_terminal,
            LogFormat::Text => false,
            LogFormat::Json => true,
        }
    }
}

/// The log filter, changeable at runtime (`/admin/config` `log_level`).
static LOG_FILTER: OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = OnceLock::new();

/// The executor id every JSON line carries, once known.
static EXECUTOR_ID: OnceLock<Box<str>> = OnceLock::new();

/// Installs the log: `verbose` sets the default level (`RUST_LOG` wins).
pub fn init(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},h2=warn,hyper=warn,tower=warn"))
    });
    let terminal = std::io::stderr().is_terminal();
    let json = format.json(terminal);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = LOG_FILTER.set(handle);
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(terminal)
            .with_writer(std::io::stderr)
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
}

/// Sets the executor id every JSON line carries from now on (once).
pub fn set_executor_id(id: &str) {
    let _ = EXECUTOR_ID.set(id.into());
}

/// Parses a log filter (`info`, `debug,h2=warn`, …) without applying it.
pub fn parse_log_level(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if level.len() > 1024 {
        return Err("a log filter is at most 1024 characters".into());
    }
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())
}

/// Applies a parsed log filter.
pub fn set_log_filter(filter: tracing_subscriber::EnvFilter) -> Result<(), String> {
    LOG_FILTER
        .get()
        .ok_or_else(|| "logging is not reloadable".to_string())?
        .reload(filter)
        .map_err(|e| e.to_string())
}

/// The JSON line format: one flat object per line (see the module doc).
struct FlatJson;

/// Keys every line has, which no span or event field may repeat.
const FIXED: [&str; 5] = ["timestamp", "level", "target", "executor_id", "message"];

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields::default();
        // Spans from the root in, then the event: the innermost value wins.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(stored) = ext.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(map)) =
                    serde_json::from_str::<serde_json::Value>(stored)
                {
                    fields.map.extend(map);
                }
            }
        }
        event.record(&mut fields);
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let target = fields.log_target.take();
        let message = fields.map.remove("message");
        let executor_id = EXECUTOR_ID.get();
        if executor_id.is_some() {
            fields.map.remove("executor_id");
        }
        let line = (|| {
            let mut out = Vec::with_capacity(256);
            let mut ser = serde_json::Serializer::new(&mut out);
            let mut map = ser.serialize_map(None)?;
            map.serialize_entry("timestamp", &timestamp)?;
            map.serialize_entry("level", meta.level().as_str())?;
            map.serialize_entry("target", target.as_deref().unwrap_or(meta.target()))?;
            if let Some(id) = executor_id {
                map.serialize_entry("executor_id", &**id)?;
            }
            if let Some(m) = &message {
                map.serialize_entry("message", m)?;
            }
            for (k, v) in &fields.map {
                if !FIXED.contains(&k.as_str()) {
                    map.serialize_entry(k, v)?;
                }
            }
            map.end()?;
            Ok::<_, serde_json::Error>(out)
        })()
        .map_err(|_| std::fmt::Error)?;
        writer.write_str(std::str::from_utf8(&line).map_err(|_| std::fmt::Error)?)?;
        writer.write_char('\n')
    }
}

/// An event's fields as JSON values.
#[derive(Default)]
struct Fields {
    map: serde_json::Map<String, serde_json::Value>,
    /// The target of a line from the `log` crate (its `log.target`).
    log_target: Option<String>,
}

impl Fields {
    fn insert(&mut self, field: &Field, value: serde_json::Value) {
        let name = field.name();
        if let Some(log_field) = name.strip_prefix("log.") {
            // A `log` record's metadata: only its target is worth keeping.
            if log_field == "target"
                && let serde_json::Value::String(t) = value
            {
                self.log_target = Some(t);
            }
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.map.insert(name.to_string(), value);
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Lines written to a buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        assert!(!LogFormat::Auto.json(true));
        assert!(LogFormat::Auto.json(false));
        assert!(!LogFormat::Text.json(false));
        assert!(LogFormat::Json.json(true));
    }

    #[test]
    fn a_json_line_is_flat_with_the_span_ids_and_its_own_fields() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let worker = tracing::error_span!("function_executor", fe_id = "fe-1");
            let _w = worker.enter();
            let alloc = tracing::error_span!("allocation", allocation_id = "a-\"1\"");
            let _a = alloc.enter();
            tracing::warn!(kind = "k", n = 3u64, ok = true, "said \"this\"\nand that");
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object");
        assert_eq!(v["fe_id"], "fe-1", "{v}");
        assert_eq!(v["allocation_id"], "a-\"1\"", "{v}");
        assert_eq!(v["message"], "said \"this\"\nand that", "{v}");
        assert_eq!(v["level"], "WARN", "{v}");
        assert_eq!(v["n"], 3, "{v}");
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["kind"], "k", "{v}");
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{v}"
        );
        assert!(v["target"].as_str().is_some(), "{v}");
    }
}
