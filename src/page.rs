//! The host's own page (`/` and `/dashboard`), rendered here as HTML from
//! the same documents `/state/*` serves, so that its numbers are theirs and
//! it reads whole without JavaScript: the status header (mode in the words
//! operators of compute servers use, server connection, price card), LOAD
//! (charts drawn here as SVG from the load history), NODES (what the host
//! has, keeps back, can distribute, has admitted and has free, and what a
//! new worker could still get), the workers and the recent allocations.
//! Its one script (`/assets/page.js`) swaps in a fresh body every two
//! seconds while the page is visible; with no page open nothing is done.
//! Nothing is loaded from elsewhere (the server's policy forbids it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use steward_load_history::{FIELDS, Range, Series};
use steward_monitoring::{Format, StateSource};

use crate::state_source::AgentStateSource;

pub const SCRIPT: &str = include_str!("page/page.js");
pub const STYLE: &str = include_str!("page/page.css");

/// The whole page, or (`fragment=1`) only its live part.
pub fn render(src: &AgentStateSource, query: &BTreeMap<String, String>) -> String {
    let range = query
        .get("range")
        .and_then(|r| Range::parse(r))
        .unwrap_or(Range::Hour);
    let body = live(src, range, query);
    if query.get("fragment").is_some_and(|f| f == "1") {
        return body;
    }
    let id = esc(src.handle.executor_id());
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Steward · {id}</title><link rel=\"stylesheet\" href=\"/assets/page.css\"></head>\
         <body><main id=\"live\" data-range=\"{}\">{body}</main>\
         <script src=\"/assets/page.js\"></script></body></html>\n",
        range_name(range)
    )
}

fn range_name(r: Range) -> &'static str {
    match r {
        Range::Hour => "hour",
        Range::Day => "day",
        Range::Month => "month",
    }
}

/// The part of the page that changes.
fn live(src: &AgentStateSource, range: Range, query: &BTreeMap<String, String>) -> String {
    let host = match src.document("host", Format::Json) {
        Some(steward_monitoring::Document::Json(v)) => v,
        _ => Value::Null,
    };
    let mut out = String::new();
    let logout = query
        .get(steward_monitoring::PAGE_LOGOUT)
        .is_some_and(|v| v == "1");
    header(src, logout, &mut out);
    let has_gpus = host["gpus"].as_array().is_some_and(|g| !g.is_empty());
    load(src, range, has_gpus, &mut out);
    nodes(&host, &mut out);
    workers(src, &mut out);
    money(src, query, &mut out);
    activity(src, &mut out);
    allocations(src, &mut out);
    events(src, &mut out);
    out
}

/// HTML-escaped text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The mode as operators of compute servers name it.
fn mode_words(mode: &str) -> &'static str {
    match mode {
        "active" => "Active",
        "paused" => "Suspended",
        "draining" => "Draining",
        "disabled" => "Disabled",
        _ => "Unknown",
    }
}

fn header(src: &AgentStateSource, logout: bool, out: &mut String) {
    let h = &src.handle;
    let mode = serde_json::to_value(h.mode())
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let labels: Vec<String> = h
        .settings()
        .labels
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect();
    let health = src.health();
    let report = h
        .last_report()
        .map(|(_, at)| ago(at))
        .unwrap_or_else(|| "none yet".into());
    let uptime = src.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let _ = write!(
        out,
        "<header><h1>{}</h1><p class=\"mode mode-{}\" id=\"mode\">{}</p>\
         <dl><dt>version</dt><dd>{}</dd><dt>labels</dt><dd>{}</dd>\
         <dt>server</dt><dd class=\"{}\">{}</dd><dt>last good report</dt><dd>{report}</dd>\
         <dt>uptime</dt><dd>{}</dd></dl>{}</header>",
        esc(h.executor_id()),
        esc(&mode),
        mode_words(&mode),
        esc(env!("CARGO_PKG_VERSION")),
        labels.join(", "),
        if health.ok { "ok" } else { "failing" },
        esc(&health.message),
        duration(uptime),
        if logout {
            "<form method=\"post\" action=\"/logout\" id=\"logout\"><button>log out</button></form>"
        } else {
            ""
        }
    );
    prices(src, out);
}

/// "12 s ago".
fn ago(t: std::time::SystemTime) -> String {
    let s = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    format!("{} ago", duration(s))
}

fn duration(s: u64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn prices(src: &AgentStateSource, out: &mut String) {
    let Some(card) = src.metering.as_ref().and_then(|m| m.price_card()) else {
        out.push_str("<section id=\"prices\"><h2>Prices</h2><p>No price card.</p></section>");
        return;
    };
    let unit = |v: u64| {
        minor(
            i64::try_from(v).unwrap_or(i64::MAX),
            card.scale,
            &card.currency,
        )
    };
    let _ = write!(
        out,
        "<section id=\"prices\"><h2>Prices</h2><table><tr><th>per task</th><td>{}</td></tr>\
         <tr><th>per CPU core-second</th><td>{}</td></tr><tr><th>per MB-second</th><td>{}</td></tr>\
         <tr><th>per wall second</th><td>{}</td></tr>",
        unit(card.per_task),
        unit(card.per_cpu_core_second),
        unit(card.per_mb_second),
        unit(card.per_wall_second)
    );
    for (model, price) in &card.per_gpu_second {
        let _ = write!(
            out,
            "<tr><th>per GPU-second, {}</th><td>{}</td></tr>",
            esc(model),
            unit(*price)
        );
    }
    out.push_str("</table></section>");
}

/// The LOAD charts of `range`.
fn load(src: &AgentStateSource, range: Range, has_gpus: bool, out: &mut String) {
    out.push_str("<section id=\"load\"><h2>LOAD</h2><nav>");
    for r in ["hour", "day", "month"] {
        let _ = write!(out, "<a href=\"?range={r}\">last {r}</a> ");
    }
    out.push_str("</nav>");
    let Some(view) = &src.load else {
        out.push_str("<p>No load history.</p></section>");
        return;
    };
    let s = view.series(range);
    chart(&s, "Allocations", &["running", "finished", "failed"], out);
    chart(&s, "CPU", &["host_cpu", "workers_cpu"], out);
    chart(&s, "Memory", &["host_memory", "workers_memory"], out);
    chart(&s, "GPUs", &["gpus_held", "gpu_busy"], out);
    if has_gpus {
        chart(&s, "GPU memory", &["gpu_memory"], out);
    }
    out.push_str("</section>");
}

const W: f64 = 640.0;
const H: f64 = 120.0;

/// What each line is called on the page.
fn legend(field: &str) -> &'static str {
    match field {
        "running" => "running",
        "finished" => "finished",
        "failed" => "failed",
        "host_cpu" => "host",
        "workers_cpu" => "workers",
        "host_memory" => "host",
        "workers_memory" => "workers",
        "gpus_held" => "held by workers",
        "gpu_busy" => "busy",
        "gpu_memory" => "used",
        _ => "",
    }
}

/// A chart's value for people, in its field's unit.
fn value(unit: &str, v: f64) -> String {
    match unit {
        "bytes" => human("bytes", v),
        "cores" | "gpus" => format!("{v:.2} {unit}"),
        _ => format!("{v:.0}"),
    }
}

/// "2026-12-06 21:05 UTC".
fn clock(at_unix_s: u64) -> String {
    let day = (at_unix_s / 86_400) as u32;
    let s = at_unix_s % 86_400;
    format!(
        "{} {:02}:{:02} UTC",
        steward_metering::date_of(day),
        s / 3600,
        s % 3600 / 60
    )
}

/// "2026-12-06 21:05:07 UTC" (the hour's charts, a point a second).
fn clock_s(at_unix_s: u64) -> String {
    let c = clock(at_unix_s);
    let (minute, _) = c.split_at(c.len() - 4);
    format!("{minute}:{:02} UTC", at_unix_s % 60)
}

/// One SVG chart of `fields`: a polyline each, placed by time and scaled
/// to the largest value, a legend with each line's last value, and the
/// range's ends and top. The figure carries what the page's script needs
/// to show the values under the pointer (`data-t0`, `data-t1`, `data-top`,
/// `data-unit`), and each line's title its last, mean and largest value.
fn chart(s: &Series, title: &str, fields: &[&str], out: &mut String) {
    let idx: Vec<usize> = fields
        .iter()
        .filter_map(|f| FIELDS.iter().position(|x| x.name == *f))
        .collect();
    let unit = idx.first().map(|i| FIELDS[*i].unit).unwrap_or("");
    let per = (s.points.len() as f64 / LINE_POINTS).ceil().max(1.0) as usize;
    let lines: Vec<Vec<(u64, f64)>> = idx.iter().map(|i| buckets(s, *i, per)).collect();
    let top = lines
        .iter()
        .flatten()
        .map(|(_, v)| *v)
        .fold(0f64, f64::max)
        .max(1e-9);
    let t0 = s.points.first().map(|p| p.at_unix_s).unwrap_or(0);
    let t1 = s.points.last().map(|p| p.at_unix_s).unwrap_or(0);
    let _ = write!(
        out,
        "<figure class=\"chart\" data-points=\"{}\" data-t0=\"{t0}\" data-t1=\"{t1}\" data-top=\"{top}\" data-unit=\"{unit}\" data-bucket=\"{}\">\
         <figcaption><b>{}</b>",
        s.points.len(),
        per as u64 * s.step_s,
        esc(title),
    );
    for (k, i) in idx.iter().enumerate() {
        let last = s
            .points
            .last()
            .map(|p| f64::from(p.value[*i]))
            .unwrap_or(0.0);
        let _ = write!(
            out,
            " <span class=\"key s{k}\" data-field=\"{}\">{} {}</span>",
            FIELDS[*i].name,
            legend(FIELDS[*i].name),
            value(unit, last)
        );
    }
    let _ = write!(
        out,
        "<span class=\"top\">top {}</span></figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{}\">",
        value(unit, top),
        esc(title)
    );
    for (k, (i, pts)) in idx.iter().zip(&lines).enumerate() {
        line(s, k, *i, pts, top, (t0, t1), out);
    }
    let at = if s.step_s < 60 { clock_s } else { clock };
    let ends = if s.points.is_empty() {
        String::new()
    } else {
        format!("<span>{}</span><span>{}</span>", at(t0), at(t1))
    };
    let _ = write!(out, "</svg><div class=\"ends\">{ends}</div></figure>");
}

/// Points a line has at most: one per two units of width (an hour of
/// seconds is 3,600 points; the page stays small).
const LINE_POINTS: f64 = W / 2.0;

/// Field `i` in buckets of `per` points: each bucket's first time, and its
/// mean for a gauge or its total for a count (an allocation that finished
/// in a bucket of 12 seconds counts 1, not a twelfth).
fn buckets(s: &Series, i: usize, per: usize) -> Vec<(u64, f64)> {
    s.points
        .chunks(per.max(1))
        .map(|bucket| {
            let sum = bucket.iter().map(|p| f64::from(p.value[i])).sum::<f64>();
            let v = if FIELDS[i].count {
                sum
            } else {
                sum / bucket.len() as f64
            };
            (bucket[0].at_unix_s, v)
        })
        .collect()
}

/// One field's polyline from its buckets, each placed by its first time;
/// its title gives the field's last, mean and largest value.
fn line(
    s: &Series,
    k: usize,
    i: usize,
    buckets: &[(u64, f64)],
    top: f64,
    (t0, t1): (u64, u64),
    out: &mut String,
) {
    let span = t1.saturating_sub(t0).max(1) as f64;
    let pts: Vec<String> = buckets
        .iter()
        .map(|(at, v)| {
            let x = at.saturating_sub(t0) as f64 / span * W;
            let y = H - v / top * (H - 4.0);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let vals: Vec<f64> = s.points.iter().map(|p| f64::from(p.value[i])).collect();
    let last = vals.last().copied().unwrap_or(0.0);
    let mean = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
    let max = vals.iter().copied().fold(0.0, f64::max);
    let name = FIELDS[i].name;
    let _ = write!(
        out,
        "<polyline class=\"s{k}\" data-field=\"{name}\" data-legend=\"{}\" points=\"{}\"><title>{name}: last {last:.3}, mean {mean:.3}, largest {max:.3}</title></polyline>",
        legend(name),
        pts.join(" "),
    );
}

/// NODES: the host's resources and what a new worker could still get.
fn nodes(host: &Value, out: &mut String) {
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    let cap = &host["capacity"];
    let res = &host["reserved"];
    let alloc = &host["allocatable"];
    let adm = &host["workers"]["admitted"];
    let gpus_total = host["gpus"].as_array().map_or(0, Vec::len) as f64;
    let rows = [
        (
            "CPU, cores",
            n(&cap["cpu_count"]),
            n(&res["cpu_count"]),
            n(&alloc["cpu_count"]),
            n(&adm["cpu_ms_per_sec"]) / 1000.0,
        ),
        (
            "memory, bytes",
            n(&cap["memory_bytes"]),
            n(&res["memory_bytes"]),
            n(&alloc["memory_bytes"]),
            n(&adm["memory_bytes"]),
        ),
        (
            "disk, bytes",
            n(&cap["disk_bytes"]),
            n(&res["disk_bytes"]),
            n(&alloc["disk_bytes"]),
            n(&adm["disk_bytes"]),
        ),
        (
            "GPUs",
            gpus_total,
            n(&res["gpu_count"]),
            (gpus_total - n(&res["gpu_count"])).max(0.0),
            n(&adm["gpus"]),
        ),
    ];
    out.push_str(
        "<section id=\"nodes\"><h2>NODES</h2><h3>Node Resources</h3><table id=\"node-resources\">\
         <tr><th></th><th>total</th><th>reserved</th><th>distributable</th><th>admitted</th><th>free</th></tr>",
    );
    for (name, total, reserved, distributable, admitted) in rows {
        let free = (distributable - admitted).max(0.0);
        let _ = write!(out, "<tr data-resource=\"{name}\"><th>{name}</th>");
        for v in [total, reserved, distributable, admitted, free] {
            let _ = write!(out, "<td data-v=\"{v}\">{}</td>", human(name, v));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    gpus(host, out);
    distributable(&rows, out);
    out.push_str("</section>");
}

/// Each GPU: model, memory, and the worker holding it.
fn gpus(host: &Value, out: &mut String) {
    let Some(gpus) = host["gpus"].as_array().filter(|g| !g.is_empty()) else {
        return;
    };
    out.push_str(
        "<table id=\"gpus\"><tr><th>GPU</th><th>model</th><th>memory</th><th>held by</th></tr>",
    );
    for g in gpus {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            g["index"],
            esc(g["product_name"].as_str().unwrap_or("")),
            human("bytes", g["memory_bytes"].as_f64().unwrap_or(0.0)),
            esc(g["function_executor"].as_str().unwrap_or("free"))
        );
    }
    out.push_str("</table>");
}

/// What a new worker could still get: every resource's free part (the
/// largest worker that fits takes all of it).
fn distributable(rows: &[(&str, f64, f64, f64, f64)], out: &mut String) {
    out.push_str(
        "<h3>Distributable Resources</h3><table id=\"distributable\"><tr><th></th><th>a new worker could get</th></tr>",
    );
    for (name, _, _, distributable, admitted) in rows {
        let free = (distributable - admitted).max(0.0);
        let _ = write!(
            out,
            "<tr data-resource=\"{name}\"><th>{name}</th><td data-v=\"{free}\">{}</td></tr>",
            human(name, free)
        );
    }
    out.push_str("</table>");
}

/// `v` for people: bytes in GiB, the rest as numbers.
fn human(what: &str, v: f64) -> String {
    if what.contains("bytes") {
        format!("{:.2} GiB", v / f64::from(1u32 << 30))
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn workers(src: &AgentStateSource, out: &mut String) {
    let (fes, total) = src.handle.function_executors_page(0, 200);
    let costs = src
        .metering
        .as_ref()
        .map(|m| m.worker_costs())
        .unwrap_or_default();
    let card = src.metering.as_ref().and_then(|m| m.price_card());
    let counts = src.handle.allocation_counts();
    let _ = write!(
        out,
        "<section id=\"workers\"><h2>Workers ({total})</h2><table><tr><th>id</th><th>function</th>\
         <th>status</th><th>up</th><th title=\"running / queued\">allocations</th><th>GPUs</th><th>pid</th><th>CPU limit</th><th>memory limit</th><th>CPU used</th>\
         <th>memory used</th><th title=\"its usage records so far, since it started or was adopted\">cost so far</th></tr>"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for f in fes {
        let usage = f.usage.unwrap_or_default();
        // Since its first step (accepted, or adopted from an earlier run).
        let up = f
            .timeline
            .first()
            .map(|t| duration(now_ms.saturating_sub(t.at_unix_ms) / 1000))
            .unwrap_or_default();
        let (running, queued) = counts.get(&f.id).copied().unwrap_or_default();
        let gpus = if f.gpus.is_empty() {
            "<td>0</td>".to_string()
        } else {
            format!(
                "<td title=\"{}\">{}</td>",
                esc(&f.gpus.join(", ")),
                f.gpus.len()
            )
        };
        let cost = match (costs.get(&f.id), &card) {
            (Some(c), Some(card)) => format!(
                "<td data-cost-minor=\"{c}\">{}</td>",
                minor(*c, card.scale, &card.currency)
            ),
            _ => "<td></td>".to_string(),
        };
        let _ = write!(
            out,
            "<tr{} data-fe=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{up}</td>\
             <td data-running=\"{running}\" data-queued=\"{queued}\">{running} / {queued}</td>{gpus}<td>{}</td><td>{}</td><td>{}</td><td>{:.1} s</td><td>{}</td>{cost}</tr>",
            if f.termination_reason.is_some() {
                " class=\"failed\""
            } else {
                ""
            },
            esc(&f.id),
            esc(&f.id),
            esc(&f.function),
            esc(&f.status),
            f.pid.map(|p| p.to_string()).unwrap_or_default(),
            f.limits
                .map(|l| format!("{:.2} cores", f64::from(l.cpu_ms_per_sec) / 1000.0))
                .unwrap_or_default(),
            f.limits
                .map(|l| human("bytes", l.memory_bytes as f64))
                .unwrap_or_default(),
            usage.cpu_usec as f64 / 1e6,
            human("bytes", usage.memory_current_bytes as f64)
        );
    }
    out.push_str("</table></section>");
}

/// An amount in minor units, in the card's currency: "0.012345 USD".
fn minor(v: i64, scale: u32, currency: &str) -> String {
    let scale = 10f64.powi(i32::try_from(scale.min(18)).unwrap_or(0));
    format!("{:.6} {}", v as f64 / scale, esc(currency))
}

/// Unix ms now, at the start of today (UTC) and of this month.
fn day_and_month_starts(now_ms: u64) -> (u64, u64) {
    const DAY: u64 = 86_400_000;
    let today = now_ms - now_ms % DAY;
    // The day of the month, from the civil date of `today` (Howard
    // Hinnant's days-to-civil, for days since 1970-01-01).
    let z = (today / DAY) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day_of_month = (doy - (153 * mp + 2) / 5 + 1) as u64;
    (today, today - (day_of_month - 1) * DAY)
}

/// Usage and cost by function, today and this month (UTC), from the same
/// summary as `/state/usage` (so the same numbers as `steward usage export`).
fn money(src: &AgentStateSource, page_query: &BTreeMap<String, String>, out: &mut String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (today, month) = day_and_month_starts(now);
    out.push_str("<section id=\"money\"><h2>Usage and cost</h2>");
    for (title, id, since) in [
        ("Today", "usage-today", today),
        ("This month", "usage-month", month),
    ] {
        let query = BTreeMap::from([("since".to_string(), since.to_string())]);
        usage_section(src, title, id, "function", query, out);
    }
    let query = BTreeMap::from([("since".to_string(), month.to_string())]);
    usage_section(
        src,
        "This month, by application",
        "usage-month-apps",
        "application",
        query,
        out,
    );
    // A range of the reader's choosing (dates or unix ms, as the export takes).
    let chosen: BTreeMap<String, String> = page_query
        .iter()
        .filter(|(k, v)| (*k == "since" || *k == "until") && !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let value = |k: &str| esc(chosen.get(k).map(String::as_str).unwrap_or(""));
    let _ = write!(
        out,
        "<form method=\"get\" action=\"/dashboard\"><label>from <input name=\"since\" placeholder=\"YYYY-MM-DD\" value=\"{}\"></label> \
         <label>to <input name=\"until\" placeholder=\"YYYY-MM-DD\" value=\"{}\"></label> <button>show</button></form>",
        value("since"),
        value("until")
    );
    if !chosen.is_empty() {
        usage_section(src, "Chosen range", "usage-range", "function", chosen, out);
    }
    out.push_str("</section>");
}

/// One usage table, grouped `by` function or application, for `query`'s range.
fn usage_section(
    src: &AgentStateSource,
    title: &str,
    id: &str,
    by: &'static str,
    mut query: BTreeMap<String, String>,
    out: &mut String,
) {
    query.insert("group_by".into(), by.into());
    match src.usage(&query) {
        Ok(doc) => usage_table(title, id, by, &doc, out),
        Err(e) => {
            let _ = write!(out, "<h3>{title}</h3><p class=\"failing\">{}</p>", esc(&e));
        }
    }
}

/// Groups a usage table shows: the costliest (then busiest) first; the
/// rest are counted in a line and in the total.
const USAGE_ROWS: usize = 20;

fn usage_table(title: &str, id: &str, by: &str, doc: &Value, out: &mut String) {
    let card = &doc["price_card"];
    let scale = 10f64.powi(card["scale"].as_i64().unwrap_or(0).clamp(0, 18) as i32);
    let currency = esc(card["currency"].as_str().unwrap_or(""));
    let _ = write!(
        out,
        "<h3>{title}</h3><table id=\"{id}\"><tr><th>{by}</th><th>tasks</th><th>failed</th>\
         <th>CPU, core-s</th><th>memory, MB-s</th><th>wall, s</th><th>cost</th></tr>"
    );
    let empty = serde_json::Map::new();
    let groups = doc["summary"]["groups"].as_object().unwrap_or(&empty);
    let mut rows: Vec<(&String, &Value)> = groups.iter().collect();
    let num = |t: &Value, k: &str| t[k].as_f64().unwrap_or(0.0);
    rows.sort_by(|a, b| {
        num(b.1, "cost_minor")
            .total_cmp(&num(a.1, "cost_minor"))
            .then(num(b.1, "tasks").total_cmp(&num(a.1, "tasks")))
            .then(a.0.cmp(b.0))
    });
    let row = |out: &mut String, attr: &str, name: &str, t: &Value| {
        let n = |k: &str| num(t, k);
        let cost = t["cost_minor"].as_i64().unwrap_or(0);
        let _ = write!(
            out,
            "<tr {attr}><th>{name}</th><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td>\
             <td>{:.3}</td><td>{:.1}</td><td>{:.3}</td><td data-cost-minor=\"{cost}\">{:.6} {currency}</td></tr>",
            n("tasks"),
            n("tasks"),
            n("failed"),
            n("failed"),
            n("cpu_core_us") / 1e6,
            n("memory_mb_ms") / 1e3,
            n("wall_ms") / 1e3,
            cost as f64 / scale,
        );
    };
    for (key, t) in rows.iter().take(USAGE_ROWS) {
        let f = esc(key);
        row(out, &format!("data-{by}=\"{f}\""), &f, t);
    }
    if rows.len() > USAGE_ROWS {
        let _ = write!(
            out,
            "<tr class=\"more\"><th colspan=\"7\">… {} more (<code>/state/usage</code>, <code>steward usage export</code>)</th></tr>",
            rows.len() - USAGE_ROWS
        );
    }
    if rows.len() > 1 {
        row(out, "class=\"total\"", "all", &doc["summary"]["totals"]);
    }
    out.push_str("</table>");
}

/// The year of activity as a heat map: a square per day, darker with
/// more allocations; each square's title says the date and the counts.
fn activity(src: &AgentStateSource, out: &mut String) {
    let doc = src.activity(steward_monitoring::Page {
        offset: 0,
        limit: 366,
    });
    let days = doc["days"].as_array().cloned().unwrap_or_default();
    let top = days
        .iter()
        .filter_map(|d| d["tasks"].as_u64())
        .max()
        .unwrap_or(0)
        .max(1);
    let _ = write!(
        out,
        "<section id=\"activity\"><h2>Activity, a year</h2>\
         <svg class=\"heat\" viewBox=\"0 0 {} 84\" role=\"img\" aria-label=\"allocations per day\">",
        53 * 12
    );
    // Today is bottom right; columns are weeks, the grid a year long.
    for back in 0..(53 * 7) {
        let _ = write!(
            out,
            "<rect class=\"h0\" x=\"{}\" y=\"{}\" width=\"10\" height=\"10\"/>",
            (52 - back / 7) * 12,
            (6 - back % 7) * 12
        );
    }
    let today = unix_days(std::time::SystemTime::now());
    for d in &days {
        let date = d["date"].as_str().unwrap_or("");
        let Some(back) = civil_days(date).and_then(|day| today.checked_sub(day)) else {
            continue;
        };
        if back >= 53 * 7 {
            continue;
        }
        let tasks = d["tasks"].as_u64().unwrap_or(0);
        let level = if tasks == 0 {
            0
        } else {
            1 + (tasks * 3 / top).min(3)
        };
        let _ = write!(
            out,
            "<rect class=\"h{level}\" data-date=\"{}\" x=\"{}\" y=\"{}\" width=\"10\" height=\"10\"><title>{}: {tasks} allocations, {} failed</title></rect>",
            esc(date),
            (52 - back / 7) * 12,
            (6 - back % 7) * 12,
            esc(date),
            d["failed"].as_u64().unwrap_or(0)
        );
    }
    out.push_str("</svg></section>");
}

/// Days since 1970-01-01 of `t` (UTC).
fn unix_days(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (Howard Hinnant's
/// days-from-civil); `None` for anything else.
fn civil_days(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

/// The latest events.
fn events(src: &AgentStateSource, out: &mut String) {
    let (_, total) = src.handle.events_page(0, 1);
    let (events, _) = src.handle.events_page(total.saturating_sub(30), 30);
    out.push_str("<section id=\"events\"><h2>Events</h2><table><tr><th>kind</th><th>subject</th><th>message</th></tr>");
    for e in events.iter().rev() {
        let e = serde_json::to_value(e).unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(e["kind"].as_str().unwrap_or("")),
            esc(e["subject"].as_str().unwrap_or("")),
            esc(e["message"].as_str().unwrap_or(""))
        );
    }
    out.push_str("</table></section>");
}

/// The 30 allocations with the latest steps, held or dropped, newest
/// first, each with its timeline (when it began, then each step after it),
/// failures marked.
fn allocations(src: &AgentStateSource, out: &mut String) {
    let allocs = src.handle.latest_allocations(30);
    let _ = write!(
        out,
        "<section id=\"allocations\"><h2>Recent allocations</h2><table><tr><th>id</th><th>function</th>\
         <th>worker</th><th>phase</th><th>began</th><th>timeline</th></tr>"
    );
    for a in &allocs {
        let last = a.timeline.last().map(|t| t.what.as_str()).unwrap_or("");
        let failed = last.contains("failure");
        let phase = serde_json::to_value(a.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let began = a.timeline.first().map_or(0, |t| t.at_unix_ms);
        let _ = write!(
            out,
            "<tr{} data-allocation=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><ol class=\"steps\">",
            if failed { " class=\"failed\"" } else { "" },
            esc(&a.id),
            esc(&a.id),
            esc(&a.function),
            esc(&a.function_executor_id),
            esc(&phase),
            if began > 0 {
                clock(began / 1000)
            } else {
                String::new()
            },
        );
        const STEPS: usize = 8;
        for t in a.timeline.iter().take(STEPS) {
            let _ = write!(
                out,
                "<li>{} <small>+{} ms</small></li>",
                esc(&t.what),
                t.at_unix_ms.saturating_sub(began)
            );
        }
        if a.timeline.len() > STEPS {
            let _ = write!(out, "<li>… {} more</li>", a.timeline.len() - STEPS);
        }
        out.push_str("</ol></td></tr>");
    }
    out.push_str("</table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_load_history::{History, N, Sample};

    /// A full hour of seconds draws at most one point per unit of width:
    /// the four charts stay small, and every line has its points.
    #[test]
    fn a_full_hour_of_charts_stays_small() {
        let mut h = History::new();
        for s in 0..3600u64 {
            h.record(Sample {
                at_unix_s: 1_000_000 + s,
                values: [(s % 97) as f32; N],
            });
        }
        let series = h.series(Range::Hour);
        let mut out = String::new();
        chart(
            &series,
            "Allocations",
            &["running", "finished", "failed"],
            &mut out,
        );
        chart(&series, "CPU", &["host_cpu", "workers_cpu"], &mut out);
        chart(
            &series,
            "Memory",
            &["host_memory", "workers_memory"],
            &mut out,
        );
        chart(&series, "GPUs", &["gpus_held", "gpu_busy"], &mut out);
        chart(&series, "GPU memory", &["gpu_memory"], &mut out);
        println!("a full hour of charts: {} bytes", out.len());
        assert!(out.len() < 40 << 10, "{} bytes", out.len());
        let lines = out.matches("<polyline").count();
        assert_eq!(lines, 10);
        let first = out
            .split(" points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("");
        let points = first.split(' ').count();
        assert!(
            (300..=LINE_POINTS as usize).contains(&points),
            "{points} points"
        );
    }

    #[test]
    fn today_and_this_month_start_at_utc_midnights() {
        assert_eq!(
            day_and_month_starts(1_796_560_496_000),
            (1_796_515_200_000, 1_796_083_200_000),
            "2026-12-06 12:34:56"
        );
        assert_eq!(
            day_and_month_starts(1_709_251_199_000),
            (1_709_164_800_000, 1_706_745_600_000),
            "2024-02-29 23:59:59"
        );
    }

    /// A usage table shows the costliest groups first, says how many more
    /// there are, and totals them all.
    #[test]
    fn usage_tables_show_the_costliest_groups_and_the_total() {
        let groups: serde_json::Map<String, Value> = (0..USAGE_ROWS + 5)
            .map(|i| {
                (
                    format!("ns/app/f{i:02}"),
                    serde_json::json!({"tasks": 1, "cost_minor": i}),
                )
            })
            .collect();
        let total = (0..USAGE_ROWS + 5).sum::<usize>();
        let doc = serde_json::json!({
            "price_card": {"scale": 2, "currency": "EUR"},
            "summary": {"groups": groups, "totals": {"tasks": USAGE_ROWS + 5, "cost_minor": total}},
        });
        let mut out = String::new();
        usage_table("t", "u", "function", &doc, &mut out);
        let shown: Vec<&str> = out
            .split("data-function=\"")
            .skip(1)
            .filter_map(|r| r.split('"').next())
            .collect();
        assert_eq!(shown.len(), USAGE_ROWS);
        assert_eq!(shown[0], format!("ns/app/f{:02}", USAGE_ROWS + 4));
        assert_eq!(shown[USAGE_ROWS - 1], "ns/app/f05");
        assert!(out.contains("… 5 more"), "{out}");
        assert!(
            out.contains(&format!(
                "class=\"total\"><th>all</th><td data-v=\"{}\"",
                USAGE_ROWS + 5
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("data-cost-minor=\"{total}\"")),
            "{out}"
        );
    }

    /// Over a full hour a drawn point is a bucket of seconds: a count is
    /// its bucket's total (one allocation finished is 1, not a twelfth),
    /// and the figure says how long a bucket is, for the tip.
    #[test]
    fn a_drawn_point_of_a_count_is_its_buckets_total() {
        let mut h = History::new();
        for s in 0..3600u64 {
            let mut values = [0.0; N];
            values[1] = f32::from(s == 1801);
            values[0] = 2.0;
            h.record(Sample {
                at_unix_s: 1_000_000 + s,
                values,
            });
        }
        let mut out = String::new();
        chart(
            &h.series(Range::Hour),
            "Allocations",
            &["running", "finished", "failed"],
            &mut out,
        );
        assert!(out.contains("data-top=\"2\""), "{}", &out[..300]);
        assert!(out.contains("data-bucket=\"12\""), "{}", &out[..300]);
        let finished = out
            .split("data-field=\"finished\" data-legend=\"finished\" points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap_or_default();
        let ys: Vec<f64> = finished
            .split(' ')
            .filter_map(|p| p.split(',').nth(1)?.parse().ok())
            .collect();
        // One point at half the height (1 of a top of 2), the rest at 0.
        let half = H - 0.5 * (H - 4.0);
        assert_eq!(
            ys.iter().filter(|y| (**y - half).abs() < 0.05).count(),
            1,
            "{ys:?}"
        );
        assert_eq!(
            ys.iter().filter(|y| (**y - H).abs() < 0.05).count(),
            ys.len() - 1
        );
    }

    #[test]
    fn clocks_say_utc_to_the_minute_or_second() {
        assert_eq!(clock(86_400 + 3_723), "1970-01-02 01:02 UTC");
        assert_eq!(clock_s(86_400 + 3_723), "1970-01-02 01:02:03 UTC");
    }

    #[test]
    fn dates_count_days_from_1970() {
        assert_eq!(civil_days("1970-01-01"), Some(0));
        assert_eq!(civil_days("2026-12-06"), Some(1_796_515_200 / 86_400));
        assert_eq!(civil_days("2024-02-29"), Some(1_709_164_800 / 86_400));
        assert_eq!(civil_days("2024-13-01"), None);
        assert_eq!(civil_days("garbage"), None);
    }

    #[test]
    fn text_from_workers_and_the_server_is_escaped() {
        assert_eq!(esc("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
