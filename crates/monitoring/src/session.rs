//! Browser sessions for the read token: a browser cannot send a bearer
//! token, so `/login` takes the token once (a form) and answers with a
//! cookie naming a session: 32 random bytes, kept in memory only, for
//! [`SESSION_TTL`] at most, [`MAX_SESSIONS`] at once (a new one pushes the
//! oldest out). The cookie is `HttpOnly` and `SameSite=Strict`; it grants
//! reading, whichever token opened it. A restart of the agent ends every
//! session. Browsers do not keep cookies apart by port: a service on
//! another port of the same host name is sent the cookie too, so the page
//! is best reached under a name of its own (and, off a trusted network,
//! through a TLS proxy).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a session lasts from its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 64;
/// The cookie's name.
pub const COOKIE: &str = "steward_session";

/// The open sessions: id (hex) → when it ends.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// Opens a session; its id for the cookie.
    pub fn open(&self) -> String {
        let id: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = Instant::now();
        let mut open = self.open.lock();
        open.retain(|_, ends| *ends > now);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, ends)| **ends)
                .map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        open.insert(id.clone(), now + SESSION_TTL);
        id
    }

    /// Whether the `Cookie` header names a live session (any of the
    /// cookies of that name: a stale or planted one sent first does not
    /// hide a good one).
    pub fn admits(&self, cookie_header: Option<&str>) -> bool {
        let Some(header) = cookie_header else {
            return false;
        };
        let now = Instant::now();
        let mut open = self.open.lock();
        let mut admitted = false;
        for id in session_ids(header) {
            match open.get(id) {
                Some(ends) if *ends > now => admitted = true,
                Some(_) => {
                    open.remove(id);
                }
                None => {}
            }
        }
        admitted
    }

    /// Ends the sessions the `Cookie` header names, if any.
    pub fn close(&self, cookie_header: Option<&str>) {
        if let Some(header) = cookie_header {
            let mut open = self.open.lock();
            for id in session_ids(header) {
                open.remove(id);
            }
        }
    }
}

/// The session ids in a `Cookie` header (`a=b; steward_session=…`), at
/// most a few: a header is bounded, and so is the work on it.
fn session_ids(header: &str) -> impl Iterator<Item = &str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .take(8)
}

/// The `Set-Cookie` value for session `id` (empty `id`: ends it).
pub fn set_cookie(id: &str) -> String {
    let age = if id.is_empty() {
        0
    } else {
        SESSION_TTL.as_secs()
    };
    format!("{COOKIE}={id}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_admits_its_cookie_only_until_closed() {
        let s = Sessions::default();
        let id = s.open();
        assert_eq!(id.len(), 64);
        let header = format!("theme=dark; {COOKIE}={id}");
        assert!(s.admits(Some(&header)));
        assert!(!s.admits(Some(&format!("{COOKIE}={}", "0".repeat(64)))));
        assert!(!s.admits(Some(&format!("{COOKIE}=short"))));
        assert!(!s.admits(None));
        // A stale or planted cookie of the same name sent first does not
        // hide the live one.
        let both = format!("{COOKIE}={}; {COOKIE}={id}", "a".repeat(64));
        assert!(s.admits(Some(&both)));
        s.close(Some(&header));
        assert!(!s.admits(Some(&header)));
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let s = Sessions::default();
        let first = s.open();
        // The oldest by its end, whatever the clock's resolution.
        if let Some(ends) = s.open.lock().get_mut(&first) {
            *ends -= Duration::from_secs(1);
        }
        for _ in 0..MAX_SESSIONS {
            s.open();
        }
        assert_eq!(s.open.lock().len(), MAX_SESSIONS);
        assert!(!s.admits(Some(&format!("{COOKIE}={first}"))));
    }

    #[test]
    fn an_expired_session_is_refused() {
        let s = Sessions::default();
        let id = s.open();
        if let Some(ends) = s.open.lock().get_mut(&id) {
            *ends = Instant::now() - Duration::from_secs(1);
        }
        assert!(!s.admits(Some(&format!("{COOKIE}={id}"))));
    }
}
