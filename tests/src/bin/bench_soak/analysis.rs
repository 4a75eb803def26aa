//! What a soak run means, computed from what it recorded: which write each
//! `RefreshCache` covers, the staleness bound of docs/protocol.md for the run's
//! settings, and the fault terms of the bound's table that each write may use.
//!
//! Pure functions over plain records (times in microseconds since the epoch), so that
//! they are unit-tested here and shared by the benchmark's section and the CI test.

use std::collections::{BTreeMap, BTreeSet};

/// Microseconds since the Unix epoch (or a duration in microseconds).
pub type Micros = i64;

pub const SECOND: Micros = 1_000_000;

/// `FolderList` takes at most 50 folders: a backlog of N pending listings needs
/// `ceil(N / 50)` calls.
pub const FOLDER_LIST_MAX: usize = 50;
/// Past 4 calls the backlog collapses (docs/protocol.md, "Listing at the limit").
pub const MAX_BACKLOG_CALLS: u32 = 4;
/// The refresher's clock margin (`m`).
pub const CLOCK_MARGIN: Micros = SECOND;
/// The scheduler's back-off: 10 s doubled per failure in a row, capped at 15 minutes.
pub const BACKOFF_BASE: Micros = 10 * SECOND;
pub const BACKOFF_CAP: Micros = 15 * 60 * SECOND;

/// The back-off after `failures` failed calls in a row.
pub fn backoff_step(failures: u32) -> Micros {
    if failures == 0 {
        return 0;
    }
    let doubled = BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(20));
    doubled.min(BACKOFF_CAP)
}

/// One object written: its bucket and key, when it was written (after the object was
/// in the bucket model), and when the aggregator invocation that processed it
/// started (the bound's `t`; later than `at` when a killed invocation was retried).
#[derive(Debug, Clone)]
pub struct Write {
    pub bucket: usize,
    pub key: String,
    pub at: Micros,
    pub processed: Option<Micros>,
}

/// A share: its bucket (every share maps its bucket's root here) and its class
/// (0: the healthy gateway's shares, 1: the shares of the gateway that fails for a
/// while).
#[derive(Debug, Clone)]
pub struct Share {
    pub bucket: usize,
    pub class: usize,
    pub arn: String,
    pub label: String,
}

/// An accepted `RefreshCache`, as the stand-in recorded it.
#[derive(Debug, Clone)]
pub struct Call {
    pub share: usize,
    pub start: Micros,
    /// When it completed (the stand-in's completion time), if it did.
    pub end: Option<Micros>,
    pub folders: Vec<String>,
    pub recursive: bool,
}

impl Call {
    /// Whether this call lists `folder` (`/` or `/a/b`): a non-recursive call lists
    /// exactly its folders, a recursive one their subtrees.
    pub fn lists(&self, folder: &str) -> bool {
        self.folders.iter().any(|listed| {
            listed == folder
                || (self.recursive
                    && (listed == "/"
                        || (folder.len() > listed.len()
                            && folder.starts_with(listed.as_str())
                            && folder.as_bytes()[listed.len()] == b'/')))
        })
    }
}

/// The folder of `key` and every ancestor up to the root, in `FolderList` form:
/// `a/b/c.dat` → `/`, `/a`, `/a/b`.
pub fn folder_chain(key: &str) -> Vec<String> {
    let mut chain = vec!["/".to_string()];
    let parts: Vec<&str> = key.split('/').collect();
    for depth in 1..parts.len() {
        chain.push(format!("/{}", parts[..depth].join("/")));
    }
    chain
}

/// The covering time of a write on a share: the latest, over its folder and each
/// ancestor, of the start of the first call on the share that started after the write
/// and lists that folder. `None`: some folder was never listed after the write (not
/// covered). `calls` must be the share's calls sorted by start.
pub fn covering(calls: &[&Call], key: &str, at: Micros) -> Option<Micros> {
    let first = calls.partition_point(|c| c.start <= at);
    let mut latest = Micros::MIN;
    for folder in folder_chain(key) {
        let call = calls[first..].iter().find(|c| c.lists(&folder))?;
        latest = latest.max(call.start);
    }
    Some(latest)
}

/// What a fault adds to the bound (docs/protocol.md, "What each fault adds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// Nothing (the write's own `t` moves instead, or the table says 0).
    Zero,
    /// A crash of the refresher during an invocation: the visibility timeout of its
    /// messages plus S.
    VisibilityPlusS,
    /// A fixed time: a gateway failing for T plus one back-off step; a completion
    /// event delivered that much late.
    Fixed(Micros),
}

/// Which shares (or which write) a fault can delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Shares(BTreeSet<usize>),
    Write(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// The aggregator SIGKILLed while an invocation was in flight; Lambda retries the
    /// event.
    AggregatorKilledMidInvocation,
    /// SIGKILL aimed at a random point of an invocation that had already answered.
    AggregatorKilledAfterResponse,
    /// SIGKILL between invocations.
    AggregatorKilledIdle,
    /// The refresher SIGKILLed while an invocation was in flight; its batch comes back
    /// after the visibility timeout.
    RefresherKilledMidInvocation,
    RefresherKilledAfterResponse,
    RefresherKilledIdle,
    /// Every `RefreshCache` on the gateway's shares answers 500 for a while.
    GatewayFailing,
    /// A refresh-complete event that never reaches the refresher.
    CompletionDropped,
    /// A refresh-complete event that reaches the refresher late.
    CompletionDelayed,
    /// A refresh-complete event put on the bus twice.
    CompletionDuplicated,
}

impl FaultKind {
    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::AggregatorKilledMidInvocation => {
                "aggregator killed mid-invocation (the event retried)"
            }
            FaultKind::AggregatorKilledAfterResponse => {
                "aggregator killed at a point after its response (between invocations)"
            }
            FaultKind::AggregatorKilledIdle => "aggregator killed between invocations",
            FaultKind::RefresherKilledMidInvocation => {
                "refresher killed mid-invocation (its batch redelivered)"
            }
            FaultKind::RefresherKilledAfterResponse => {
                "refresher killed at a point after its response (between invocations)"
            }
            FaultKind::RefresherKilledIdle => "refresher killed between invocations",
            FaultKind::GatewayFailing => "gateway failing every RefreshCache (500)",
            FaultKind::CompletionDropped => "completion event dropped",
            FaultKind::CompletionDelayed => "completion event delayed",
            FaultKind::CompletionDuplicated => "completion event duplicated",
        }
    }
}

/// One injected fault: from `at` to `until` (the same instant for a kill), what it
/// adds, and where.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub at: Micros,
    pub until: Micros,
    pub term: Term,
    pub scope: Scope,
}

impl Fault {
    /// The fault's term for this run.
    pub fn term_us(&self, visibility: Micros, sqs: Micros) -> Micros {
        match self.term {
            Term::Zero => 0,
            Term::VisibilityPlusS => visibility + sqs,
            Term::Fixed(t) => t,
        }
    }

    /// Whether the fault may delay the covering call of write `w` on share `s`: it
    /// concerns them, it happened before the covering call (or the write is not
    /// covered), and its effect (up to `until` plus its term) was not over before the
    /// write was processed.
    pub fn concerns(
        &self,
        w: usize,
        s: usize,
        t: Micros,
        covering: Option<Micros>,
        term: Micros,
    ) -> bool {
        let in_scope = match &self.scope {
            Scope::Shares(shares) => shares.contains(&s),
            Scope::Write(write) => *write == w,
        };
        in_scope && covering.is_none_or(|c| self.at <= c) && t <= self.until.saturating_add(term)
    }
}

/// The terms of `B = W + m + H·S + k·(max(P, D) + S)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub window: Micros,
    pub margin: Micros,
    pub hops: u32,
    pub sqs: Micros,
    pub pace: Micros,
    /// D: 0 when both slots of a share were never in flight at once.
    pub both_slots: Micros,
    pub calls: u32,
}

impl Bound {
    pub fn total(&self) -> Micros {
        self.window
            + self.margin
            + self.sqs * Micros::from(self.hops)
            + (self.pace.max(self.both_slots) + self.sqs) * Micros::from(self.calls)
    }
}

/// D for a set of shares: the longest of their refreshes, when two of them were ever
/// in flight at once on one share; else 0.
pub fn both_slots_time(calls: &[Call], shares: &BTreeSet<usize>) -> Micros {
    let mut both = false;
    let mut longest = 0;
    for s in shares {
        let mut mine: Vec<&Call> = calls.iter().filter(|c| c.share == *s).collect();
        mine.sort_by_key(|c| c.start);
        for (i, c) in mine.iter().enumerate() {
            if let Some(end) = c.end {
                longest = longest.max(end - c.start);
            }
            if mine[i + 1..]
                .iter()
                .take_while(|d| d.start < c.end.unwrap_or(Micros::MAX))
                .next()
                .is_some()
            {
                both = true;
            }
        }
    }
    if both {
        longest
    } else {
        0
    }
}

/// k: the calls the largest backlog needed, from the largest pending set seen.
pub fn backlog_calls(max_pending: usize) -> u32 {
    (max_pending.div_ceil(FOLDER_LIST_MAX).max(1) as u32).min(MAX_BACKLOG_CALLS)
}

/// Nearest-rank percentile `p` (0 to 100).
pub fn percentile(samples: &[Micros], p: f64) -> Option<Micros> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// One write on one share that maps it.
#[derive(Debug, Clone)]
pub struct Covered {
    pub write: usize,
    pub share: usize,
    /// The covering call's start; `None`: not covered.
    pub covering: Option<Micros>,
    /// covering − the write's time.
    pub staleness: Option<Micros>,
    /// covering − the time the aggregator processed it (`t`).
    pub since_processed: Option<Micros>,
    /// The bound of the share's class plus the terms of the faults that concern it.
    pub allowed: Micros,
    /// Those faults (indices into the run's faults).
    pub faults: Vec<usize>,
}

impl Covered {
    pub fn within_bound(&self) -> bool {
        self.since_processed.is_some_and(|s| s <= self.allowed)
    }
}

/// Every write on every share of its bucket: its covering call, its staleness and
/// what the bound allows it.
pub fn coverage(
    writes: &[Write],
    shares: &[Share],
    calls: &[Call],
    faults: &[Fault],
    bounds: &[Bound],
    visibility: Micros,
) -> Vec<Covered> {
    let mut by_share: BTreeMap<usize, Vec<&Call>> = BTreeMap::new();
    for c in calls {
        by_share.entry(c.share).or_default().push(c);
    }
    for list in by_share.values_mut() {
        list.sort_by_key(|c| c.start);
    }
    let empty = Vec::new();
    let mut out = Vec::new();
    for (w, write) in writes.iter().enumerate() {
        for (s, share) in shares.iter().enumerate() {
            if share.bucket != write.bucket {
                continue;
            }
            let bound = bounds[share.class];
            let calls = by_share.get(&s).unwrap_or(&empty);
            let covering = covering(calls, &write.key, write.at);
            let t = write.processed.unwrap_or(write.at);
            let mut allowed = bound.total();
            let mut concerned = Vec::new();
            for (i, f) in faults.iter().enumerate() {
                let term = f.term_us(visibility, bound.sqs);
                if f.concerns(w, s, t, covering, term) {
                    allowed += term;
                    concerned.push(i);
                }
            }
            out.push(Covered {
                write: w,
                share: s,
                covering,
                staleness: covering.map(|c| c - write.at),
                since_processed: covering.map(|c| c - t),
                allowed,
                faults: concerned,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(share: usize, start: Micros, folders: &[&str], recursive: bool) -> Call {
        Call {
            share,
            start,
            end: Some(start + 5 * SECOND),
            folders: folders.iter().map(|f| f.to_string()).collect(),
            recursive,
        }
    }

    #[test]
    fn chains_and_listings() {
        assert_eq!(folder_chain("a.dat"), vec!["/"]);
        assert_eq!(folder_chain("a/b/c.dat"), vec!["/", "/a", "/a/b"]);
        let flat = call(0, 0, &["/a", "/a/b"], false);
        assert!(flat.lists("/a/b") && flat.lists("/a"));
        assert!(!flat.lists("/a/b/c") && !flat.lists("/"));
        let deep = call(0, 0, &["/a"], true);
        assert!(deep.lists("/a") && deep.lists("/a/b/c"));
        assert!(!deep.lists("/ab") && !deep.lists("/"));
        assert!(call(0, 0, &["/"], true).lists("/x/y"));
    }

    #[test]
    fn a_write_is_covered_by_the_latest_first_listing_after_it() {
        let calls = [
            call(0, 10, &["/", "/a", "/a/b"], false),
            call(0, 30, &["/a/b"], false),
            call(0, 40, &["/", "/a"], false),
            call(0, 50, &["/a/b"], false),
        ];
        let refs: Vec<&Call> = calls.iter().collect();
        // Before the first call: all three folders at 10.
        assert_eq!(covering(&refs, "a/b/x", 5), Some(10));
        // At 10 exactly: that call does not count (it must start after the write).
        assert_eq!(covering(&refs, "a/b/x", 10), Some(40));
        assert_eq!(covering(&refs, "a/b/x", 45), None);
        let recursive = [call(0, 20, &["/"], true)];
        let refs: Vec<&Call> = recursive.iter().collect();
        assert_eq!(covering(&refs, "a/b/x", 5), Some(20));
    }

    #[test]
    fn the_bound_and_its_terms() {
        let b = Bound {
            window: 30 * SECOND,
            margin: SECOND,
            hops: 1,
            sqs: 60 * SECOND,
            pace: 61 * SECOND,
            both_slots: 0,
            calls: 1,
        };
        assert_eq!(
            b.total(),
            212 * SECOND,
            "docs/protocol.md: 212 s at the defaults"
        );
        assert_eq!(Bound { calls: 4, ..b }.total(), 575 * SECOND);
        assert_eq!(backoff_step(0), 0);
        assert_eq!(backoff_step(1), 10 * SECOND);
        assert_eq!(backoff_step(4), 80 * SECOND);
        assert_eq!(backoff_step(30), 15 * 60 * SECOND);
        assert_eq!(backlog_calls(0), 1);
        assert_eq!(backlog_calls(50), 1);
        assert_eq!(backlog_calls(51), 2);
        assert_eq!(backlog_calls(1000), 4);
    }

    #[test]
    fn both_slots_only_when_two_overlap_on_one_share() {
        let apart = [
            call(0, 0, &["/"], false),
            call(0, 6 * SECOND, &["/"], false),
        ];
        let shares: BTreeSet<usize> = [0].into();
        assert_eq!(both_slots_time(&apart, &shares), 0);
        let overlapping = [
            call(0, 0, &["/"], false),
            call(0, 4 * SECOND, &["/"], false),
        ];
        assert_eq!(both_slots_time(&overlapping, &shares), 5 * SECOND);
        let other_shares = [call(0, 0, &["/"], false), call(1, SECOND, &["/"], false)];
        assert_eq!(both_slots_time(&other_shares, &[0, 1].into()), 0);
    }

    #[test]
    fn faults_add_their_terms_where_and_when_they_concern_a_write() {
        let writes = vec![
            Write {
                bucket: 0,
                key: "a/x".into(),
                at: 0,
                processed: Some(0),
            },
            Write {
                bucket: 0,
                key: "a/y".into(),
                at: 100 * SECOND,
                processed: Some(100 * SECOND),
            },
        ];
        let shares = vec![
            Share {
                bucket: 0,
                class: 0,
                arn: "s0".into(),
                label: "healthy".into(),
            },
            Share {
                bucket: 0,
                class: 0,
                arn: "s1".into(),
                label: "other".into(),
            },
        ];
        let calls = vec![
            call(0, 20 * SECOND, &["/", "/a"], false),
            call(1, 5 * SECOND, &["/", "/a"], false),
            call(0, 110 * SECOND, &["/", "/a"], false),
        ];
        let bound = Bound {
            window: 2 * SECOND,
            margin: SECOND,
            hops: 1,
            sqs: SECOND,
            pace: 6 * SECOND,
            both_slots: 0,
            calls: 1,
        };
        let kill = Fault {
            kind: FaultKind::RefresherKilledMidInvocation,
            at: 3 * SECOND,
            until: 3 * SECOND,
            term: Term::VisibilityPlusS,
            scope: Scope::Shares([0].into()),
        };
        let out = coverage(&writes, &shares, &calls, &[kill], &[bound], 10 * SECOND);
        assert_eq!(out.len(), 4);
        // Write 0 on share 0: covered at 20 s, the kill at 3 s concerns it.
        assert_eq!(out[0].covering, Some(20 * SECOND));
        assert_eq!(out[0].faults, vec![0]);
        assert_eq!(out[0].allowed, bound.total() + 11 * SECOND);
        assert!(out[0].within_bound());
        // On share 1 the kill does not concern it.
        assert!(out[1].faults.is_empty());
        // Write 1 (at 100 s) is long after the kill's effect.
        assert!(out[2].faults.is_empty());
        assert_eq!(out[2].staleness, Some(10 * SECOND));
        // Write 1 on share 1: never listed after it.
        assert_eq!(out[3].covering, None);
        assert!(!out[3].within_bound());
    }
}
