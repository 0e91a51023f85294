//! The ids a log line about a worker or an allocation carries as fields,
//! `fe_id` and `allocation_id`: every worker's controller runs in a
//! [`worker_span`], every allocation task in an [`allocation_span`] inside
//! it, so whatever they (and what they call) log has the ids; an event
//! about a worker or an allocation logged from elsewhere says which ids
//! its subject is with [`About`] (`Shared::event_about`).
//!
//! The spans are at ERROR level so that no filter that lets a line through
//! leaves its ids out (an INFO span would be disabled under `warn`, and the
//! warnings would lose their ids). A span costs one small allocation (its
//! fields, formatted once) per worker and per allocation; a line that is
//! filtered out costs nothing.
//!
//! Must not know about: how lines are written (text or JSON, and the
//! executor id every line carries, are the binary's).

use std::borrow::Cow;

use crate::events::{MAX_EVENT_SUBJECT, shorten};

/// The span of the controller of worker `fe_id`: a root, whoever starts it.
pub(crate) fn worker_span(fe_id: &str) -> tracing::Span {
    tracing::error_span!(parent: None, "function_executor", fe_id)
}

/// The span of allocation `allocation_id`'s task, inside its worker's span
/// (the current one where the task is started).
pub(crate) fn allocation_span(allocation_id: &str) -> tracing::Span {
    tracing::error_span!("allocation", allocation_id)
}

/// What an event is about, when it is logged outside the worker's or the
/// allocation's span: the ids its line carries as fields.
#[derive(Debug, Clone, Copy)]
pub(crate) enum About<'a> {
    Worker(&'a str),
    Allocation {
        /// The allocation's worker, where it is known.
        fe_id: Option<&'a str>,
        allocation_id: &'a str,
    },
}

impl<'a> About<'a> {
    /// The event's subject: the most specific id.
    pub fn subject(self) -> &'a str {
        match self {
            About::Worker(id) => id,
            About::Allocation { allocation_id, .. } => allocation_id,
        }
    }

    /// Logs an event's line with the ids as fields (shortened as subjects
    /// are: an id the server sent may be anything until validated).
    pub fn log(self, kind: &'static str, subject: &str, message: &str) {
        let short = |id: &'a str| -> Cow<'a, str> { shorten(id, MAX_EVENT_SUBJECT) };
        match self {
            About::Worker(fe_id) => {
                let fe_id = short(fe_id);
                tracing::info!(kind, subject, fe_id = &*fe_id, "{message}");
            }
            About::Allocation {
                fe_id,
                allocation_id,
            } => {
                let fe_id = fe_id.map(short);
                let allocation_id = short(allocation_id);
                tracing::info!(
                    kind,
                    subject,
                    fe_id = fe_id.as_deref(),
                    allocation_id = &*allocation_id,
                    "{message}"
                );
            }
        }
    }
}
