//! A bounded ring buffer of recent agent events (worker started, terminated
//! and why, allocation finished and how, server connection lost/restored).

use std::collections::VecDeque;
use std::time::SystemTime;

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
            at_unix_ms: crate::state::unix_ms(SystemTime::now()),
            kind,
            subject: subject.to_string(),
            message,
        }
    }
}

/// Keeps the newest `capacity` events.
pub struct EventLog {
    capacity: usize,
    events: Mutex<VecDeque<Event>>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            capacity,
            events: Mutex::new(VecDeque::with_capacity(capacity)),
        }
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
}
