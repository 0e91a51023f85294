//! The host's load over time, in bounded memory, as the host's page charts
//! it: one [`Sample`] a second (allocations running, finished and failed;
//! CPU and memory of the host and of its workers; GPUs held, busy, and
//! their memory used), kept in three
//! rings after Netdata's tiers: every second for the last hour, every
//! minute for the last day, every hour for the last 30 days. A coarser
//! point holds the mean and the largest of each gauge over its interval
//! and the total of each count. The two coarser tiers are saved to a file
//! (replaced by rename) and read back at start, so a restart does not
//! blank the day's and the month's charts.
//!
//! Must not know about: where samples come from (the agent, `/proc`,
//! cgroups), HTTP, how the page draws them.

use std::path::Path;

use serde::Serialize;

/// What each sample measures, in this order.
pub const FIELDS: [Field; N] = [
    Field::gauge("running", "allocations"),
    Field::count("finished", "allocations"),
    Field::count("failed", "allocations"),
    Field::gauge("host_cpu", "cores"),
    Field::gauge("workers_cpu", "cores"),
    Field::gauge("host_memory", "bytes"),
    Field::gauge("workers_memory", "bytes"),
    Field::gauge("gpus_held", "gpus"),
    Field::gauge("gpu_busy", "gpus"),
    Field::gauge("gpu_memory", "bytes"),
];

/// How many values a sample has. Fields are only ever appended: a file
/// saved with fewer is read with the newer ones zero.
pub const N: usize = 10;
/// The fields of the first saved format (a file with fewer is not ours).
const FIRST_N: usize = 8;

/// One measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Field {
    pub name: &'static str,
    pub unit: &'static str,
    /// A count per interval (summed into coarser points), or a level
    /// (averaged, with its largest value kept).
    pub count: bool,
}

impl Field {
    const fn gauge(name: &'static str, unit: &'static str) -> Field {
        Field {
            name,
            unit,
            count: false,
        }
    }
    const fn count(name: &'static str, unit: &'static str) -> Field {
        Field {
            name,
            unit,
            count: true,
        }
    }
}

/// One second's reading (counts: what happened during that second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_unix_s: u64,
    pub values: [f32; N],
}

/// One point of a tier: the interval starting at `at_unix_s`, the mean of
/// each gauge (the total of each count) and the largest value seen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub at_unix_s: u64,
    pub value: [f32; N],
    pub max: [f32; N],
}

/// The three tiers' steps and lengths.
pub const TIERS: [(u64, usize); 3] = [(1, 3600), (60, 1440), (3600, 720)];

/// A ring of points of one step.
#[derive(Debug, Clone)]
struct Tier {
    step_s: u64,
    points: std::collections::VecDeque<Point>,
    capacity: usize,
}

impl Tier {
    fn new((step_s, capacity): (u64, usize)) -> Tier {
        Tier {
            step_s,
            points: std::collections::VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends `p`; a point not after the last (the clock went back) is
    /// refused, so the series stays in time order.
    fn push(&mut self, p: Point) -> bool {
        if self
            .points
            .back()
            .is_some_and(|last| last.at_unix_s >= p.at_unix_s)
        {
            return false;
        }
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(p);
        true
    }
}

/// Samples of the interval under way, folded into a coarser point when it ends.
#[derive(Debug, Clone, Default)]
struct Folding {
    start: Option<u64>,
    sum: [f64; N],
    max: [f32; N],
    samples: u32,
}

impl Folding {
    fn add(&mut self, start: u64, p: &Point, weight: u32) {
        self.start.get_or_insert(start);
        for (i, field) in FIELDS.iter().enumerate() {
            // A coarser point's value of a gauge is the mean of what it
            // folds, weighted by how many samples each held.
            let v = f64::from(p.value[i]);
            self.sum[i] += if field.count {
                v
            } else {
                v * f64::from(weight)
            };
            self.max[i] = self.max[i].max(p.max[i]);
        }
        self.samples += weight;
    }

    fn close(&mut self) -> Option<(Point, u32)> {
        let at = self.start.take()?;
        let samples = std::mem::take(&mut self.samples).max(1);
        let mut value = [0f32; N];
        for (i, v) in value.iter_mut().enumerate() {
            let s = self.sum[i];
            *v = if FIELDS[i].count {
                s
            } else {
                s / f64::from(samples)
            } as f32;
        }
        let p = Point {
            at_unix_s: at,
            value,
            max: std::mem::take(&mut self.max),
        };
        self.sum = [0.0; N];
        Some((p, samples))
    }
}

/// Which tier a chart reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The last hour, a point a second.
    Hour,
    /// The last day, a point a minute.
    Day,
    /// The last 30 days, a point an hour.
    Month,
}

impl Range {
    pub fn parse(s: &str) -> Option<Range> {
        match s {
            "hour" => Some(Range::Hour),
            "day" => Some(Range::Day),
            "month" => Some(Range::Month),
            _ => None,
        }
    }

    fn tier(self) -> usize {
        match self {
            Range::Hour => 0,
            Range::Day => 1,
            Range::Month => 2,
        }
    }
}

/// A chart's data.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub step_s: u64,
    pub fields: [Field; N],
    pub points: Vec<Point>,
}

/// The three tiers and what is being folded into the coarser two.
#[derive(Debug, Clone)]
pub struct History {
    tiers: [Tier; 3],
    /// Folding into tier 1 (from seconds) and tier 2 (from minutes).
    folding: [Folding; 2],
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            tiers: TIERS.map(Tier::new),
            folding: [Folding::default(), Folding::default()],
        }
    }

    /// Adds one second's sample; a minute (an hour) that ended is folded
    /// into its tier.
    pub fn record(&mut self, s: Sample) {
        let p = Point {
            at_unix_s: s.at_unix_s,
            value: s.values,
            max: s.values,
        };
        if self.tiers[0].push(p) {
            self.fold(0, p, 1);
        }
    }

    /// Folds point `p` of tier `from` (holding `weight` samples) into the
    /// next tier's interval, closing the interval it ends.
    fn fold(&mut self, from: usize, p: Point, weight: u32) {
        let Some(to) = self.tiers.get(from + 1).map(|t| t.step_s) else {
            return;
        };
        let start = p.at_unix_s - p.at_unix_s % to;
        let f = &mut self.folding[from];
        if f.start.is_some_and(|s| s != start)
            && let Some((closed, samples)) = f.close()
            && self.tiers[from + 1].push(closed)
        {
            self.fold(from + 1, closed, samples);
        }
        self.folding[from].add(start, &p, weight);
    }

    /// The points of `range`, oldest first.
    pub fn series(&self, range: Range) -> Series {
        let t = &self.tiers[range.tier()];
        Series {
            step_s: t.step_s,
            fields: FIELDS,
            points: t.points.iter().copied().collect(),
        }
    }

    /// Bytes the rings take at most (their points; the page's budget).
    pub fn capacity_bytes() -> usize {
        TIERS.iter().map(|(_, n)| n).sum::<usize>() * std::mem::size_of::<Point>()
    }

    /// The coarser two tiers, to be saved.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = encode(&self.tiers[1..], N);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    /// Restores the coarser two tiers saved at `path` (the second tier
    /// starts empty: an hour of seconds is not kept). A missing file is a
    /// fresh start; a file that is not one of ours is an error, and
    /// nothing of it is used.
    pub fn load(path: &Path) -> Result<History, LoadError> {
        let mut h = History::new();
        let bytes = match read_bounded(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(h),
            Err(e) => return Err(LoadError::Io(e)),
        };
        let [day, month] = decode(&bytes)?;
        h.tiers[1].points = day.into();
        h.tiers[2].points = month.into();
        Ok(h)
    }
}

/// Why a saved history is not used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("not a saved load history ({0})")]
    Format(&'static str),
}

/// The file's first bytes: the format and the number of fields.
const MAGIC: &[u8; 8] = b"STWLOAD1";
/// A saved history is never larger than its two tiers.
const MAX_FILE_BYTES: u64 = 1 << 20;

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other("larger than a saved load history"));
    }
    Ok(bytes)
}

/// MAGIC, the number of fields (u32), then per tier its step (u64), its
/// length (u32) and its points (u64 start, that many f32 values, as many
/// f32 maxima), little-endian. (`fields` below N writes an older format.)
fn encode(tiers: &[Tier], fields: usize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(fields as u32).to_le_bytes());
    for t in tiers {
        out.extend_from_slice(&t.step_s.to_le_bytes());
        out.extend_from_slice(&(t.points.len() as u32).to_le_bytes());
        for p in &t.points {
            out.extend_from_slice(&p.at_unix_s.to_le_bytes());
            for v in p.value[..fields].iter().chain(p.max[..fields].iter()) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// Reads what [`encode`] wrote, checking every length against the tiers'.
fn decode(bytes: &[u8]) -> Result<[Vec<Point>; 2], LoadError> {
    let mut r = Reader(bytes);
    if r.take(8)? != MAGIC {
        return Err(LoadError::Format("no magic"));
    }
    let fields = r.u32()? as usize;
    if !(FIRST_N..=N).contains(&fields) {
        return Err(LoadError::Format("another set of fields"));
    }
    let mut tiers = [Vec::new(), Vec::new()];
    for (i, tier) in tiers.iter_mut().enumerate() {
        let (step, capacity) = TIERS[i + 1];
        if r.u64()? != step {
            return Err(LoadError::Format("another step"));
        }
        let len = r.u32()? as usize;
        if len > capacity {
            return Err(LoadError::Format("more points than the tier holds"));
        }
        for _ in 0..len {
            let at_unix_s = r.u64()?;
            let mut value = [0f32; N];
            let mut max = [0f32; N];
            for v in value[..fields].iter_mut().chain(max[..fields].iter_mut()) {
                *v = f32::from_le_bytes(r.array()?);
            }
            if tier
                .last()
                .is_some_and(|p: &Point| p.at_unix_s >= at_unix_s)
            {
                return Err(LoadError::Format("points out of order"));
            }
            tier.push(Point {
                at_unix_s,
                value,
                max,
            });
        }
    }
    if !r.0.is_empty() {
        return Err(LoadError::Format("trailing bytes"));
    }
    Ok(tiers)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        if self.0.len() < n {
            return Err(LoadError::Format("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const K: usize>(&mut self) -> Result<[u8; K], LoadError> {
        let mut a = [0u8; K];
        a.copy_from_slice(self.take(K)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, running: f32, finished: f32) -> Sample {
        let mut values = [0f32; N];
        values[0] = running;
        values[1] = finished;
        values[3] = 0.5;
        Sample {
            at_unix_s: at,
            values,
        }
    }

    #[test]
    fn seconds_fold_into_minutes_and_minutes_into_hours() {
        let mut h = History::new();
        // Two hours, a minute and a second, from the top of an hour: the
        // running gauge is the minute's second count, one allocation
        // finishes a second. (A minute closes when the next one's first
        // sample comes, an hour when the next one's first minute closes.)
        let t0 = 500_000 * 3600;
        for s in 0..=7260 {
            h.record(sample(t0 + s, (s % 60) as f32, 1.0));
        }
        let hour = h.series(Range::Hour);
        assert_eq!(hour.points.len(), 3600, "an hour of seconds");
        assert_eq!(hour.points.last().map(|p| p.at_unix_s), Some(t0 + 7260));
        let day = h.series(Range::Day);
        assert_eq!(day.points.len(), 121, "minutes closed so far");
        let m = day.points[0];
        assert_eq!(m.at_unix_s, t0);
        assert_eq!(m.value[0], 29.5, "a gauge: the mean");
        assert_eq!(m.max[0], 59.0, "and its largest");
        assert_eq!(m.value[1], 60.0, "a count: the total");
        assert_eq!(m.value[3], 0.5);
        let month = h.series(Range::Month);
        assert_eq!(month.points.len(), 2, "two hours closed");
        assert_eq!(month.points[0].value[1], 3600.0);
        assert_eq!(month.points[0].value[0], 29.5);
        assert_eq!(month.points[1].at_unix_s, t0 + 3600);
    }

    #[test]
    fn rings_keep_their_length_and_their_order() {
        let mut h = History::new();
        for s in 0..5000 {
            h.record(sample(10_000 + s, 1.0, 0.0));
        }
        // Out of order (a clock set back) is refused.
        h.record(sample(10_000, 9.0, 0.0));
        let hour = h.series(Range::Hour);
        assert_eq!(hour.points.len(), 3600);
        assert!(
            hour.points
                .windows(2)
                .all(|w| w[0].at_unix_s < w[1].at_unix_s)
        );
        assert_eq!(hour.points.last().map(|p| p.value[0]), Some(1.0));
        assert!(
            History::capacity_bytes() < 4 << 20,
            "{}",
            History::capacity_bytes()
        );
    }

    #[test]
    fn the_coarser_tiers_survive_a_restart_and_a_foreign_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("load");
        let mut h = History::new();
        for s in 0..(3 * 3600 + 1) {
            h.record(sample(3600 * 1000 + s, 2.0, 1.0));
        }
        h.save(&path).expect("save");
        let back = History::load(&path).expect("load");
        assert!(
            back.series(Range::Hour).points.is_empty(),
            "seconds are not kept"
        );
        assert_eq!(back.series(Range::Day).points, h.series(Range::Day).points);
        assert_eq!(
            back.series(Range::Month).points,
            h.series(Range::Month).points
        );
        // Missing: a fresh start.
        let fresh = History::load(&tmp.path().join("none")).expect("fresh");
        assert!(fresh.series(Range::Day).points.is_empty());
        // Cut short, or not ours: refused, nothing used.
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("write");
        assert!(History::load(&path).is_err());
        std::fs::write(&path, b"garbage").expect("write");
        let e = History::load(&path).expect_err("foreign");
        assert!(e.to_string().contains("not a saved load history"), "{e}");
    }

    /// A file saved before the GPU fields were appended is read, with
    /// them zero; one with fields this build does not know is refused.
    #[test]
    fn a_file_of_the_first_format_is_read_with_the_new_fields_zero() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("load");
        let mut h = History::new();
        for s in 0..(2 * 3600) {
            let mut x = sample(3600 * 1000 + s, 2.0, 1.0);
            x.values[N - 1] = 7.0;
            h.record(x);
        }
        std::fs::write(&path, encode(&h.tiers[1..], FIRST_N)).expect("write");
        let back = History::load(&path).expect("first format");
        let day = back.series(Range::Day).points;
        assert_eq!(day.len(), h.series(Range::Day).points.len());
        for (a, b) in day.iter().zip(h.series(Range::Day).points) {
            assert_eq!(a.value[..FIRST_N], b.value[..FIRST_N]);
            assert_eq!(a.value[FIRST_N..], [0.0; N - FIRST_N]);
        }
        let mut newer = encode(&h.tiers[1..], N);
        newer[8..12].copy_from_slice(&((N + 1) as u32).to_le_bytes());
        std::fs::write(&path, newer).expect("write");
        assert!(History::load(&path).is_err(), "more fields than known");
    }
}
