//! Function-call watches: which results the allocations on this host wait
//! for, and routing of the server's `FunctionCallResult`s to them.
//!
//! The server is told the deduplicated set of watches (ref-counted by
//! content, part of the state hash). Results are routed on
//! (namespace, request id, function call id), as the reference does, to
//! every waiting watcher exactly once. A result that arrives while nobody
//! waits is kept (bounded) so a watcher registered later still gets it.
//!
//! The reported watches are part of every report, so together they are
//! held to a budget, a share of the server message limit
//! ([`WATCH_BUDGET_DIVISOR`]): a watch that would exceed it is refused, and
//! the allocation asking for it fails, not every report. Each allocation
//! may take only a share of that budget ([`ALLOCATION_WATCH_SHARE_DIVISOR`]),
//! so one allocation filling its share fails alone while the watches of
//! every other allocation still register.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::pb;

/// How many results with no watcher yet are kept, oldest dropped first.
pub(crate) const EARLY_RESULTS_LIMIT: usize = 1024;

/// The reported watches together take at most 1/this of the server message
/// limit (`--max-server-message-bytes`), so the rest of the state and the
/// results always fit beside them.
pub(crate) const WATCH_BUDGET_DIVISOR: usize = 4;

/// One allocation's watches take at most 1/this of the host's watch
/// budget (4 MiB at the default 256 MiB server message limit: 10,000
/// watches of about 400 bytes each), so it takes this many allocations
/// at their share to fill the host's budget.
pub(crate) const ALLOCATION_WATCH_SHARE_DIVISOR: usize = 16;

/// Bytes the reported watches may take in a report: the host's and one
/// allocation's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WatchBudget {
    pub host: usize,
    pub allocation: usize,
}

impl WatchBudget {
    /// No limit (tests).
    #[cfg(test)]
    pub const UNLIMITED: WatchBudget = WatchBudget {
        host: usize::MAX,
        allocation: usize::MAX,
    };
}

/// The watch budget for a server message limit of `max_server_message_bytes`.
pub(crate) fn budget(max_server_message_bytes: usize) -> WatchBudget {
    let host = max_server_message_bytes / WATCH_BUDGET_DIVISOR;
    WatchBudget {
        host,
        allocation: host / ALLOCATION_WATCH_SHARE_DIVISOR,
    }
}

/// What a result is routed on (the application is not part of it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RouteKey {
    pub namespace: String,
    pub request_id: String,
    pub function_call_id: String,
}

impl RouteKey {
    pub fn of_watch(w: &pb::FunctionCallWatch) -> RouteKey {
        RouteKey {
            namespace: w.namespace.clone().unwrap_or_default(),
            request_id: w.request_id.clone().unwrap_or_default(),
            function_call_id: w.function_call_id.clone().unwrap_or_default(),
        }
    }

    fn of_result(r: &pb::FunctionCallResult) -> RouteKey {
        RouteKey {
            namespace: r.namespace.clone().unwrap_or_default(),
            request_id: r.request_id.clone().unwrap_or_default(),
            function_call_id: r.function_call_id.clone().unwrap_or_default(),
        }
    }
}

/// A watch as reported, ordered so the report (and its hash) is stable.
type WatchTuple = (String, String, String, String);

fn tuple(w: &pb::FunctionCallWatch) -> WatchTuple {
    (
        w.namespace.clone().unwrap_or_default(),
        w.application.clone().unwrap_or_default(),
        w.request_id.clone().unwrap_or_default(),
        w.function_call_id.clone().unwrap_or_default(),
    )
}

/// Bytes one reported watch takes in `ExecutorState.function_call_watches`
/// (field 15: a one-byte key, the length, four string fields).
fn reported_len(t: &WatchTuple) -> usize {
    use prost::encoding::encoded_len_varint;
    let field = |s: &String| 1 + encoded_len_varint(s.len() as u64) + s.len();
    let body = field(&t.0) + field(&t.1) + field(&t.2) + field(&t.3);
    1 + encoded_len_varint(body as u64) + body
}

/// A result on its way to one watcher of one allocation.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub watcher_id: String,
    /// Shared by every watcher it goes to: however many wait on one call,
    /// its result is held once.
    pub result: Arc<pb::FunctionCallResult>,
}

/// Where an allocation receives its deliveries, and under which watcher.
pub(crate) struct Waiter {
    pub allocation_id: String,
    pub watcher_id: String,
    pub tx: mpsc::UnboundedSender<Delivery>,
}

/// What [`WatchRegistry::route`] did with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Sent to this many watchers.
    Delivered(usize),
    /// Nobody waits for it now; kept for a watcher that comes later.
    Kept,
    /// Not terminal yet (UNKNOWN, or SUCCESS before a tail chain resolved).
    NotFinal,
}

/// Why a watch was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error(
        "the allocation's watches would take {bytes} bytes, over its share of {share} bytes of the host's watch budget (1/{ALLOCATION_WATCH_SHARE_DIVISOR} of a quarter of --max-server-message-bytes; ALLOCATION_WATCH_SHARE_DIVISOR)"
    )]
    Allocation { bytes: usize, share: usize },
    #[error(
        "the host's reported watches would take {bytes} bytes, over the watch budget of {budget} bytes (a quarter of --max-server-message-bytes; WATCH_BUDGET_DIVISOR)"
    )]
    Host { bytes: usize, budget: usize },
}

#[derive(Default)]
pub(crate) struct WatchRegistry {
    reported: BTreeMap<WatchTuple, usize>,
    /// What `reported` takes in a report.
    reported_bytes: usize,
    /// What each allocation's registrations take, counted per registration
    /// (a watch two allocations share is charged to both).
    by_allocation: HashMap<String, usize>,
    waiters: HashMap<RouteKey, Vec<Waiter>>,
    /// Results nobody waited for yet, and their arrival order (oldest
    /// first) for eviction. Every desired state repeats watched results,
    /// so a known key costs one lookup.
    early: HashMap<RouteKey, Arc<pb::FunctionCallResult>>,
    early_order: VecDeque<RouteKey>,
}

/// Only a terminal result is routed: FAILURE, or SUCCESS with its value.
pub(crate) fn is_final(r: &pb::FunctionCallResult) -> bool {
    match r.outcome_code() {
        pb::AllocationOutcomeCode::Failure => true,
        pb::AllocationOutcomeCode::Success => r.return_value.is_some(),
        pb::AllocationOutcomeCode::Unknown => false,
    }
}

impl WatchRegistry {
    /// Registers `waiter` on `watch`. Returns whether the reported set
    /// changed, and a result already kept for it (then the waiter is not
    /// registered: the caller delivers that result itself). A new watch
    /// that would take the reported set over `budget` bytes is refused
    /// (nothing registered), with the reason; so is one that would take
    /// the waiter's allocation over its share, `budget.allocation`.
    pub fn add(
        &mut self,
        watch: &pb::FunctionCallWatch,
        waiter: Waiter,
        budget: WatchBudget,
    ) -> Result<(bool, Option<Arc<pb::FunctionCallResult>>), OverBudget> {
        let t = tuple(watch);
        let bytes = reported_len(&t);
        let mine = self
            .by_allocation
            .get(&waiter.allocation_id)
            .copied()
            .unwrap_or(0);
        if mine + bytes > budget.allocation {
            return Err(OverBudget::Allocation {
                bytes: mine + bytes,
                share: budget.allocation,
            });
        }
        if !self.reported.contains_key(&t) {
            if self.reported_bytes + bytes > budget.host {
                return Err(OverBudget::Host {
                    bytes: self.reported_bytes + bytes,
                    budget: budget.host,
                });
            }
            self.reported_bytes += bytes;
        }
        *self
            .by_allocation
            .entry(waiter.allocation_id.clone())
            .or_insert(0) += bytes;
        let count = self.reported.entry(t).or_insert(0);
        *count += 1;
        let changed = *count == 1;
        let key = RouteKey::of_watch(watch);
        if let Some(r) = self.early.get(&key) {
            return Ok((changed, Some(r.clone())));
        }
        self.waiters.entry(key).or_default().push(waiter);
        Ok((changed, None))
    }

    /// Drops one registration of `watch` by (allocation, watcher). Returns
    /// whether the reported set changed.
    pub fn remove(
        &mut self,
        watch: &pb::FunctionCallWatch,
        allocation_id: &str,
        watcher_id: &str,
    ) -> bool {
        let key = RouteKey::of_watch(watch);
        if let Some(list) = self.waiters.get_mut(&key) {
            list.retain(|w| !(w.allocation_id == allocation_id && w.watcher_id == watcher_id));
            if list.is_empty() {
                self.waiters.remove(&key);
            }
        }
        let t = tuple(watch);
        if self.reported.contains_key(&t)
            && let Some(mine) = self.by_allocation.get_mut(allocation_id)
        {
            *mine = mine.saturating_sub(reported_len(&t));
            if *mine == 0 {
                self.by_allocation.remove(allocation_id);
            }
        }
        match self.reported.get_mut(&t) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.reported.remove(&t);
                self.reported_bytes = self.reported_bytes.saturating_sub(reported_len(&t));
                true
            }
            None => false,
        }
    }

    /// Sends a final result to every watcher waiting on it (each only once:
    /// a served waiter is unregistered), or keeps it for later.
    pub fn route(&mut self, result: &pb::FunctionCallResult) -> Routed {
        if !is_final(result) {
            return Routed::NotFinal;
        }
        let key = RouteKey::of_result(result);
        let mut sent = 0;
        if let Some(waiters) = self.waiters.remove(&key) {
            let shared = Arc::new(result.clone());
            for w in waiters {
                let d = Delivery {
                    watcher_id: w.watcher_id,
                    result: shared.clone(),
                };
                // A closed receiver is an allocation that already ended.
                if w.tx.send(d).is_ok() {
                    sent += 1;
                }
            }
        }
        if sent > 0 {
            return Routed::Delivered(sent);
        }
        if self.early.contains_key(&key) {
            return Routed::Kept;
        }
        if self.early_order.len() >= EARLY_RESULTS_LIMIT
            && let Some(oldest) = self.early_order.pop_front()
        {
            self.early.remove(&oldest);
        }
        self.early_order.push_back(key.clone());
        self.early.insert(key, Arc::new(result.clone()));
        Routed::Kept
    }

    /// The deduplicated watches to report, in a stable order.
    pub fn reported(&self) -> Vec<pb::FunctionCallWatch> {
        self.reported
            .keys()
            .map(|(ns, app, req, fc)| pb::FunctionCallWatch {
                namespace: Some(ns.clone()),
                application: Some(app.clone()),
                request_id: Some(req.clone()),
                function_call_id: Some(fc.clone()),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.reported.len()
    }

    /// Bytes the reported watches take in a report.
    #[cfg(test)]
    pub fn reported_bytes(&self) -> usize {
        self.reported_bytes
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn watch(fc: &str) -> pb::FunctionCallWatch {
        pb::FunctionCallWatch {
            namespace: Some("ns".into()),
            application: Some("app".into()),
            request_id: Some("r1".into()),
            function_call_id: Some(fc.into()),
        }
    }

    fn success(fc: &str) -> pb::FunctionCallResult {
        pb::FunctionCallResult {
            namespace: Some("ns".into()),
            request_id: Some("r1".into()),
            function_call_id: Some(fc.into()),
            outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
            failure_reason: None,
            return_value: Some(pb::DataPayload {
                uri: Some("file:///x".into()),
                ..Default::default()
            }),
            request_error: None,
        }
    }

    /// Registers a watch on call `fc` within an ample budget.
    fn add(
        reg: &mut WatchRegistry,
        fc: &str,
        w: Waiter,
    ) -> (bool, Option<Arc<pb::FunctionCallResult>>) {
        reg.add(&watch(fc), w, WatchBudget::UNLIMITED)
            .expect("within the budget")
    }

    fn waiter(alloc: &str, watcher: &str) -> (Waiter, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Waiter {
                allocation_id: alloc.into(),
                watcher_id: watcher.into(),
                tx,
            },
            rx,
        )
    }

    #[test]
    fn watches_are_deduplicated_and_ref_counted() {
        let mut reg = WatchRegistry::default();
        let (w1, _r1) = waiter("a1", "w1");
        let (w2, _r2) = waiter("a2", "w2");
        assert!(add(&mut reg, "d", w1).0);
        assert!(!add(&mut reg, "d", w2).0, "same content twice");
        assert_eq!(reg.reported().len(), 1);
        assert!(!reg.remove(&watch("d"), "a1", "w1"), "still watched by a2");
        assert!(reg.remove(&watch("d"), "a2", "w2"), "last one gone");
        assert!(reg.reported().is_empty());
        assert!(
            !reg.remove(&watch("d"), "a2", "w2"),
            "unknown removal is harmless"
        );
    }

    #[test]
    fn a_result_fans_out_to_every_waiter_once() {
        let mut reg = WatchRegistry::default();
        let (w1, mut r1) = waiter("a1", "w1");
        let (w2, mut r2) = waiter("a2", "w2");
        add(&mut reg, "d", w1);
        add(&mut reg, "d", w2);
        assert_eq!(reg.route(&success("d")), Routed::Delivered(2));
        assert_eq!(
            r1.try_recv().map(|d| d.watcher_id).ok().as_deref(),
            Some("w1")
        );
        assert_eq!(
            r2.try_recv().map(|d| d.watcher_id).ok().as_deref(),
            Some("w2")
        );
        // The same result again (every desired state repeats it): not twice.
        assert_eq!(reg.route(&success("d")), Routed::Kept);
        assert!(r1.try_recv().is_err() && r2.try_recv().is_err());
    }

    #[test]
    fn one_result_is_held_once_for_all_its_watchers() {
        let mut reg = WatchRegistry::default();
        let mut rxs = Vec::new();
        for i in 0..3 {
            let (w, rx) = waiter(&format!("a{i}"), "w");
            add(&mut reg, "d", w);
            rxs.push(rx);
        }
        assert_eq!(reg.route(&success("d")), Routed::Delivered(3));
        let got: Vec<Delivery> = rxs.iter_mut().filter_map(|rx| rx.try_recv().ok()).collect();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|d| Arc::ptr_eq(&d.result, &got[0].result)));
    }

    #[test]
    fn a_result_before_its_watcher_is_kept_and_handed_over() {
        let mut reg = WatchRegistry::default();
        assert_eq!(reg.route(&success("d")), Routed::Kept);
        let (w, mut rx) = waiter("a1", "w1");
        let (changed, early) = add(&mut reg, "d", w);
        assert!(changed);
        assert_eq!(
            early.and_then(|r| r.function_call_id.clone()).as_deref(),
            Some("d")
        );
        assert!(rx.try_recv().is_err(), "handed back, not sent");
    }

    #[test]
    fn unfinished_results_are_not_routed() {
        let mut reg = WatchRegistry::default();
        let (w, mut rx) = waiter("a1", "w1");
        add(&mut reg, "d", w);
        let mut r = success("d");
        r.return_value = None; // Tail chain not resolved yet.
        assert_eq!(reg.route(&r), Routed::NotFinal);
        r.outcome_code = Some(pb::AllocationOutcomeCode::Unknown as i32);
        assert_eq!(reg.route(&r), Routed::NotFinal);
        assert!(rx.try_recv().is_err());
        let mut f = success("d");
        f.return_value = None;
        f.outcome_code = Some(pb::AllocationOutcomeCode::Failure as i32);
        assert_eq!(reg.route(&f), Routed::Delivered(1));
    }

    #[test]
    fn the_reported_watches_stay_within_their_budget() {
        let mut reg = WatchRegistry::default();
        let one = reported_len(&tuple(&watch("d0")));
        let budget = WatchBudget {
            host: 3 * one,
            allocation: usize::MAX,
        };
        let mut rx = Vec::new();
        for i in 0..3 {
            let (w, r) = waiter("a", &format!("w{i}"));
            rx.push(r);
            assert!(reg.add(&watch(&format!("d{i}")), w, budget).is_ok());
        }
        assert_eq!(reg.reported_bytes(), budget.host);
        let (w, _r) = waiter("a", "w3");
        let e = reg
            .add(&watch("d3"), w, budget)
            .expect_err("over the budget");
        assert!(e.to_string().contains("watch budget"), "{e}");
        assert_eq!(reg.reported().len(), 3, "nothing registered");
        // A watch already reported costs nothing more.
        let (w, _r) = waiter("b", "w0");
        assert!(reg.add(&watch("d0"), w, budget).is_ok());
        // What the registry counts is what a report carries.
        let state = pb::ExecutorState {
            function_call_watches: reg.reported(),
            ..Default::default()
        };
        assert_eq!(state.encoded_len(), reg.reported_bytes());
        assert!(!reg.remove(&watch("d0"), "b", "w0"), "still watched by a");
        assert!(reg.remove(&watch("d1"), "a", "w1"));
        assert_eq!(reg.reported_bytes(), 2 * one);
        let (w, _r) = waiter("a", "w3");
        assert!(reg.add(&watch("d3"), w, budget).is_ok(), "room again");
    }

    #[test]
    fn one_allocation_over_its_share_leaves_the_others_room() {
        let mut reg = WatchRegistry::default();
        let one = reported_len(&tuple(&watch("d00")));
        let budget = WatchBudget {
            host: 20 * one,
            allocation: 4 * one,
        };
        let mut rx = Vec::new();
        // A hostile allocation asks for as many watches as the host holds.
        let mut refused = None;
        for i in 0..20 {
            let (w, r) = waiter("hostile", &format!("w{i}"));
            rx.push(r);
            if let Err(e) = reg.add(&watch(&format!("d{i:02}")), w, budget) {
                refused = Some((i, e));
                break;
            }
        }
        let (at, e) = refused.expect("the hostile allocation is refused");
        assert_eq!(at, 4, "after its share of four watches");
        assert!(
            e.to_string().contains("ALLOCATION_WATCH_SHARE_DIVISOR"),
            "{e}"
        );
        // Another allocation's watch still registers.
        let (w, _r) = waiter("innocent", "w0");
        assert!(reg.add(&watch("e00"), w, budget).is_ok());
        // A share freed is room again.
        assert!(reg.remove(&watch("d00"), "hostile", "w0"));
        let (w, _r) = waiter("hostile", "w4");
        assert!(reg.add(&watch("d04"), w, budget).is_ok(), "room again");
    }

    #[test]
    fn kept_results_are_bounded() {
        let mut reg = WatchRegistry::default();
        for i in 0..EARLY_RESULTS_LIMIT + 10 {
            reg.route(&success(&format!("d{i}")));
        }
        assert_eq!(reg.early.len(), EARLY_RESULTS_LIMIT);
        let (w, _rx) = waiter("a", "w");
        assert!(add(&mut reg, "d0", w).1.is_none(), "oldest dropped");
    }
}
