//! A bounded ring buffer of recent agent events (worker started, terminated
//! and why, allocation finished and how, server connection lost/restored).
//! Events that strangers can cause (a refused admin call) pass a rate
//! limit, so nobody can flush the ring; text that workers or the server
//! choose is shortened ([`shorten`]) before it becomes an event or a log.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_unix_ms: u64,
    pub kind: &'static str,
    pub subject: String,
    pub message: String,
}

impl Event {
    pub fn now(kind: &'static str, subject: &str, message: String) -> Self {
        Event {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind,
            subject: subject.to_string(),
            message,
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One step in a worker's or an allocation's history.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub at_unix_ms: u64,
    pub what: String,
}

impl TimelineEntry {
    pub fn now(what: impl Into<String>) -> Self {
        TimelineEntry {
            at_unix_ms: unix_ms(SystemTime::now()),
            what: what.into(),
        }
    }
}

/// Longest event subject kept, in bytes (longer ones are [`shorten`]ed).
pub const MAX_EVENT_SUBJECT: usize = 256;
/// Longest event message kept, in bytes.
pub const MAX_EVENT_MESSAGE: usize = 2048;
/// Events of one rate-limited class let into the ring per
/// [`RATE_LIMIT_WINDOW`]; the rest are counted and said in one summary.
pub const RATE_LIMITED_EVENTS: u32 = 10;
pub const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(60);

/// `text` cut to at most `max` bytes on a character boundary, with a
/// marker saying how much was cut; unchanged when it fits.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let end = text.floor_char_boundary(max);
    Cow::Owned(format!(
        "{}…[{} more bytes]",
        &text[..end],
        text.len() - end
    ))
}

/// One rate-limited class's current window.
struct Window {
    started: Instant,
    passed: u32,
    suppressed: u64,
}

/// Keeps the newest `capacity` events.
pub struct EventLog {
    capacity: usize,
    events: Mutex<VecDeque<Event>>,
    windows: Mutex<HashMap<&'static str, Window>>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            capacity,
            events: Mutex::new(VecDeque::with_capacity(capacity)),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Pushes `e` unless [`RATE_LIMITED_EVENTS`] of `class` were pushed
    /// in this [`RATE_LIMIT_WINDOW`]; `false` when it was suppressed. The
    /// first event of `class` after a window with suppressed ones comes
    /// after a summary event saying how many were suppressed.
    pub fn push_limited(&self, class: &'static str, e: Event) -> bool {
        let now = Instant::now();
        let summary = {
            let mut windows = self.windows.lock();
            let w = windows.entry(class).or_insert(Window {
                started: now,
                passed: 0,
                suppressed: 0,
            });
            let mut summary = None;
            if now.duration_since(w.started) >= RATE_LIMIT_WINDOW {
                if w.suppressed > 0 {
                    summary = Some(w.suppressed);
                }
                *w = Window {
                    started: now,
                    passed: 0,
                    suppressed: 0,
                };
            }
            if w.passed >= RATE_LIMITED_EVENTS {
                w.suppressed += 1;
                return false;
            }
            w.passed += 1;
            summary
        };
        if let Some(k) = summary {
            self.push(Event::now(
                e.kind,
                class,
                format!(
                    "suppressed {k} {class} events (at most {RATE_LIMITED_EVENTS} every {} s)",
                    RATE_LIMIT_WINDOW.as_secs()
                ),
            ));
        }
        self.push(e);
        true
    }

    /// How many `class` events the current window suppressed so far.
    pub fn suppressed(&self, class: &'static str) -> u64 {
        self.windows.lock().get(class).map_or(0, |w| w.suppressed)
    }

    pub fn push(&self, e: Event) {
        let mut ev = self.events.lock();
        if ev.len() == self.capacity {
            ev.pop_front();
        }
        ev.push_back(e);
    }

    /// Oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.events.lock().iter().cloned().collect()
    }

    /// Events `[offset, offset + limit)`, oldest first, and how many there are.
    pub fn page(&self, offset: usize, limit: usize) -> (Vec<Event>, usize) {
        let ev = self.events.lock();
        let page = ev.iter().skip(offset).take(limit).cloned().collect();
        (page, ev.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_keeps_newest() {
        let log = EventLog::new(2);
        for i in 0..3 {
            log.push(Event::now("test", "x", format!("{i}")));
        }
        let msgs: Vec<_> = log.recent().into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, vec!["1", "2"]);
    }

    #[test]
    fn a_rate_limited_class_cannot_flush_the_ring() {
        let log = EventLog::new(100);
        log.push(Event::now("started", "agent", "kept".into()));
        let passed = (0..1000)
            .filter(|i| log.push_limited("refused", Event::now("refused", "x", format!("{i}"))))
            .count();
        assert_eq!(passed, RATE_LIMITED_EVENTS as usize);
        assert_eq!(
            log.suppressed("refused"),
            1000 - u64::from(RATE_LIMITED_EVENTS)
        );
        let events = log.recent();
        assert_eq!(events[0].message, "kept");
        assert_eq!(events.len(), 1 + RATE_LIMITED_EVENTS as usize);
        // Other classes have windows of their own.
        assert!(log.push_limited("other", Event::now("other", "y", String::new())));
    }

    #[test]
    fn shortened_text_ends_on_a_character_and_says_what_was_cut() {
        assert_eq!(shorten("short", 10), "short");
        let long = "é".repeat(100); // 200 bytes
        let s = shorten(&long, 51);
        assert!(s.starts_with(&"é".repeat(25)), "{s}");
        assert!(s.ends_with("…[150 more bytes]"), "{s}");
    }
}
