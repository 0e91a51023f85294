//! `steward usage export`: the usage ledger in the data directory as CSV
//! or JSON lines, between two times. It only reads: safe while an agent
//! appends to the same ledger.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use steward_metering::UsageRecord;

#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(subcommand)]
    pub command: UsageCommand,
}

#[derive(Subcommand, Debug)]
pub enum UsageCommand {
    /// Write the records finished in [since, until) to standard output.
    Export(ExportArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The agent's data directory (its `--executor-cache-path`).
    #[arg(long, default_value = "~/.indexify/executor_cache")]
    pub executor_cache_path: String,
    /// From this time: unix milliseconds or a UTC date `YYYY-MM-DD`.
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time (exclusive): unix milliseconds or `YYYY-MM-DD`.
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
}

/// Unix milliseconds of `text`: a number, or a UTC date.
pub fn parse_time(text: &str) -> Result<u64> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let parts: Vec<&str> = text.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        bail!("{text:?} is neither unix milliseconds nor YYYY-MM-DD");
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().context("year")?,
        m.parse().context("month")?,
        d.parse().context("day")?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        bail!("{text:?} is not a date from 1970 on");
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(u64::try_from(days * 86_400_000).unwrap_or(0))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

const CSV_HEADER: &str = "kind,id,function_executor_id,namespace,application,function,started_unix_ms,ended_unix_ms,wall_ms,cpu_core_us,memory_mb_ms,peak_memory_bytes,gpu_ms,cost_minor,gpu_busy_ms";

fn csv_line(r: &UsageRecord) -> String {
    let kind = match r.kind {
        steward_metering::RecordKind::Allocation => "allocation",
        steward_metering::RecordKind::WorkerSegment => "worker_segment",
    };
    let pairs = |v: &[(String, u64)]| -> String {
        let items: Vec<String> = v.iter().map(|(m, ms)| format!("{m}={ms}")).collect();
        items.join(";")
    };
    [
        kind.to_string(),
        csv_field(&r.id),
        csv_field(&r.function_executor_id),
        csv_field(&r.namespace),
        csv_field(&r.application),
        csv_field(&r.function),
        r.started_unix_ms.to_string(),
        r.ended_unix_ms.to_string(),
        r.wall_ms().to_string(),
        r.cpu_core_us.to_string(),
        r.memory_mb_ms.to_string(),
        r.peak_memory_bytes.to_string(),
        csv_field(&pairs(&r.gpu_ms)),
        r.cost_minor.map(|c| c.to_string()).unwrap_or_default(),
        csv_field(&pairs(&r.gpu_busy_ms)),
    ]
    .join(",")
}

/// Writes the records of `dir` ending in [since, until) to `out`.
pub fn export(
    dir: &std::path::Path,
    since: Option<u64>,
    until: Option<u64>,
    format: Format,
    out: &mut impl Write,
) -> Result<usize> {
    let records = steward_metering::read_records(dir)?;
    let chosen = records.iter().filter(|r| {
        since.is_none_or(|s| r.ended_unix_ms >= s) && until.is_none_or(|u| r.ended_unix_ms < u)
    });
    let mut n = 0;
    if format == Format::Csv {
        writeln!(out, "{CSV_HEADER}")?;
    }
    for r in chosen {
        match format {
            Format::Csv => writeln!(out, "{}", csv_line(r))?,
            Format::Jsonl => writeln!(out, "{}", serde_json::to_string(r)?)?,
        }
        n += 1;
    }
    Ok(n)
}

pub fn run(args: UsageArgs) -> Result<()> {
    match args.command {
        UsageCommand::Export(a) => {
            let dir: PathBuf = crate::expand_home(&a.executor_cache_path).join("usage");
            let since = a.since.as_deref().map(parse_time).transpose()?;
            let until = a.until.as_deref().map(parse_time).transpose()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            export(&dir, since, until, a.format, &mut out)?;
            out.flush()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_metering::{Ledger, LedgerConfig, RecordKind};

    fn record(i: u64) -> UsageRecord {
        UsageRecord {
            kind: RecordKind::Allocation,
            id: format!("a{i}"),
            function_executor_id: "fe".into(),
            namespace: "default".into(),
            application: "app, with comma".into(),
            function: "f".into(),
            started_unix_ms: i * 1_000,
            ended_unix_ms: i * 1_000 + 500,
            cpu_core_us: 100 * i,
            memory_mb_ms: 10 * i,
            peak_memory_bytes: 1,
            gpu_ms: vec![("H100".into(), i)],
            cost_minor: Some(i as i64),
            outcome: "success".into(),
            ran: true,
            idle_ms: None,
            gpu_busy_ms: Vec::new(),
        }
    }

    #[test]
    fn dates_and_milliseconds() {
        assert_eq!(parse_time("1970-01-01").expect("date"), 0);
        assert_eq!(parse_time("2026-11-25").expect("date"), 1_795_564_800_000);
        assert_eq!(parse_time("12345").expect("ms"), 12_345);
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn csv_and_jsonl_exports_have_the_same_totals() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (mut l, _) = Ledger::open(LedgerConfig::new(tmp.path().to_path_buf())).expect("open");
        for i in 0..10 {
            l.append(&record(i)).expect("append");
        }
        let (mut csv, mut jsonl) = (Vec::new(), Vec::new());
        // Records ending in [2 s, 8 s): a2..a7.
        let n = export(tmp.path(), Some(2_000), Some(8_000), Format::Csv, &mut csv).expect("csv");
        let m = export(
            tmp.path(),
            Some(2_000),
            Some(8_000),
            Format::Jsonl,
            &mut jsonl,
        )
        .expect("jsonl");
        assert_eq!((n, m), (6, 6));
        let csv = String::from_utf8(csv).expect("utf8");
        let cpu_csv: u64 = csv
            .lines()
            .skip(1)
            .map(|l| {
                // The quoted application holds a comma: count fields from the end.
                let f: Vec<&str> = l.rsplitn(7, ',').collect();
                f[5].parse::<u64>().expect("cpu")
            })
            .sum();
        let cpu_jsonl: u64 = String::from_utf8(jsonl)
            .expect("utf8")
            .lines()
            .map(|l| {
                serde_json::from_str::<UsageRecord>(l)
                    .expect("record")
                    .cpu_core_us
            })
            .sum();
        assert_eq!(cpu_csv, (2..8).map(|i| 100 * i).sum::<u64>());
        assert_eq!(cpu_csv, cpu_jsonl);
        assert!(csv.contains("\"app, with comma\""), "{csv}");
    }
}
