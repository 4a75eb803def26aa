//! The per-share refresh scheduler: what each share still needs listed, what is in
//! flight on it, and when it may be called next.
//!
//! Storage Gateway takes at most two refreshes in flight per share, and asks callers
//! to wait at least 60 seconds between calls and to use the refresh-complete event
//! before issuing more. So the refresher does not call a share per window. Closing a
//! window moves the window's listings into the *pending* set of each share they
//! concern ([`ShareState::add_pending`]); a share is called only when fewer than two
//! refreshes are in flight on it and the interval since its last call has passed
//! ([`ShareState::dispatch`]). What cannot be sent yet waits, merged with what comes
//! after it, and a wake-up message on the action queue brings it back at the earliest
//! allowed time. A completion event frees its slot ([`ShareState::complete`]).
//!
//! The invariant: a refresh covers an event only if it starts after the event. A claim
//! takes the listings that are pending at that moment; everything added later stays
//! pending for a later call, however much an in-flight refresh already lists.
//!
//! These functions are the rules; [`crate::adapters::memory`] applies them directly and
//! the DynamoDB adapter stores the state as one item per share, written only if its
//! `Version` is unchanged. See `docs/protocol.md`, "Per-share scheduling".

use crate::window::ChangeSet;
use std::collections::BTreeSet;
use std::fmt;

/// `FolderList` takes 1 to 50 folders.
pub const MAX_FOLDER_LIST: usize = 50;

/// The gateway's limit of refreshes in flight on one share.
pub const MAX_IN_FLIGHT: usize = 2;

/// An invocation that claimed a slot and did not record the call's notification id
/// by its deadline is gone: whether its call started is unknown, so the slot's
/// listings go back to pending. The slot itself still counts as in flight until its
/// lease ends, in case the call did start. The claim carries its invocation's deadline
/// ([`ShareState::dispatch_until`]); this is the claim's life when no deadline is known
/// (the longest Lambda invocation).
pub const CLAIM_TIMEOUT_MS: i64 = 15 * 60 * 1000;

/// The shortest lease of a slot whose completion event never comes (lost, or the
/// refresh died with its gateway). A lease that ends puts the slot's listings back.
pub const MIN_SLOT_LEASE_MS: i64 = 20 * 60 * 1000;

/// The longest lease: refreshes of large shares legitimately take hours (the gateway
/// sends a HEAD per object it lists).
pub const MAX_SLOT_LEASE_MS: i64 = 6 * 60 * 60 * 1000;

/// The lease of a call on a share whose refreshes took `refresh_ms` lately: twice
/// that, within [`MIN_SLOT_LEASE_MS`] and [`MAX_SLOT_LEASE_MS`]. A lease that is too
/// short costs a call that the gateway refuses (it still runs two refreshes) and
/// backs off from, or a listing made twice; one that is too long costs a lost
/// completion event that much staleness. So it follows what this share's refreshes
/// take, not the worst any share could take.
pub fn slot_lease_ms(refresh_ms: Option<i64>) -> i64 {
    refresh_ms
        .unwrap_or(0)
        .saturating_mul(2)
        .clamp(MIN_SLOT_LEASE_MS, MAX_SLOT_LEASE_MS)
}

/// The gateway's and Lambda's clocks may differ by this much when a completion event
/// is matched to a claim by its start time.
pub const COMPLETION_CLOCK_MARGIN_MS: i64 = 5_000;

/// The longest backlog, in calls, that waits chunk by chunk. With one call per interval
/// (60 s by default), the last of 4 chunks starts about 3 intervals after the first;
/// past that, waiting for the next chunk costs more freshness than a wider call, so the
/// backlog collapses into common ancestors (see [`ShareState::dispatch`]).
pub const MAX_BACKLOG_CALLS: usize = 4;

/// After the gateway refused or failed a call (busy, two refreshes in flight that this
/// state does not know of, a 5xx, a timeout, access denied), the share is not called
/// again for at least this long, whatever the interval: a failure is never retried in
/// a loop. Each further failure in a row doubles it, up to [`MAX_BACKOFF_MS`].
pub const BUSY_BACKOFF_MS: i64 = 10_000;

/// The back-off's cap: one SQS delay, so one wake-up reaches it; a share whose gateway
/// keeps failing is called about four times an hour.
pub const MAX_BACKOFF_MS: i64 = 15 * 60 * 1000;

/// The back-off after `failures` failed calls in a row (at least 1).
pub fn backoff_ms(failures: u32) -> i64 {
    let doublings = failures.saturating_sub(1).min(20);
    BUSY_BACKOFF_MS
        .saturating_mul(1i64 << doublings)
        .min(MAX_BACKOFF_MS)
}

/// The longest folder name a listing can have: an S3 key is at most 1,024 bytes, and
/// a folder is shorter than its key, plus the leading `/`.
pub const MAX_FOLDER_BYTES: usize = 1_025;

/// The most bytes of listings that a share item keeps pending: past it, the pending
/// set collapses like a long backlog. A call closes only when the next name does not
/// fit, so it carries more than `MAX_CALL_BYTES - MAX_FOLDER_BYTES`: a full pending
/// set of one kind goes in at most [`MAX_BACKLOG_CALLS`] calls. With two calls of
/// [`MAX_CALL_BYTES`] in the slots, a share item stays far under DynamoDB's 400 KB.
pub const MAX_PENDING_BYTES: usize = MAX_BACKLOG_CALLS * (MAX_CALL_BYTES - MAX_FOLDER_BYTES);

/// The most bytes of folders in one call (`FolderList`), besides its 50 folders.
pub const MAX_CALL_BYTES: usize = 16 * 1024;

/// Completion events whose notification id is not (yet) recorded in a slot are kept
/// this many at a time: an event can overtake the write that records the id.
pub const MAX_EARLY_COMPLETIONS: usize = 16;

/// A wake-up's delay is whole seconds, rounded up: one that becomes visible this much
/// after the time it was sent for still serves that time.
pub const WAKE_ROUNDING_MS: i64 = 1_000;

/// The key of a share's item in the table: bucket names hold no `#`, so share items
/// never collide with bucket items.
pub const SHARE_KEY_PREFIX: &str = "share#";

/// The table key of `share_arn`'s item.
pub fn share_key(share_arn: &str) -> String {
    format!("{SHARE_KEY_PREFIX}{share_arn}")
}

/// One folder to list: `FolderList` form (`/` is the share root, else `/a/b`), and
/// whether the listing goes down the whole subtree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listing {
    pub path: String,
    pub recursive: bool,
}

const RECURSIVE_TAG: &str = "R:";

impl Listing {
    pub fn folder(path: impl Into<String>) -> Self {
        Listing {
            path: path.into(),
            recursive: false,
        }
    }

    pub fn subtree(path: impl Into<String>) -> Self {
        Listing {
            path: path.into(),
            recursive: true,
        }
    }

    /// Stored as `/a/b`, or `R:/a/b` for a recursive listing.
    pub fn encode(&self) -> String {
        if self.recursive {
            format!("{RECURSIVE_TAG}{}", self.path)
        } else {
            self.path.clone()
        }
    }

    pub fn decode(stored: &str) -> Option<Listing> {
        let (path, recursive) = match stored.strip_prefix(RECURSIVE_TAG) {
            Some(path) => (path, true),
            None => (stored, false),
        };
        path.starts_with('/').then(|| Listing {
            path: path.to_string(),
            recursive,
        })
    }

    /// Whether listing `self` also lists everything `other` lists.
    pub fn covers(&self, other: &Listing) -> bool {
        if self == other || (self.path == other.path && self.recursive) {
            return true;
        }
        self.recursive && !other.path.is_empty() && is_below(&other.path, &self.path)
    }

    fn depth(&self) -> usize {
        self.path.matches('/').count() - usize::from(self.path == "/")
    }

    fn parent(&self) -> Option<String> {
        if self.path == "/" {
            return None;
        }
        Some(match self.path.rfind('/') {
            Some(0) | None => "/".to_string(),
            Some(i) => self.path[..i].to_string(),
        })
    }
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// `path` lies strictly below `ancestor` (both in `FolderList` form).
fn is_below(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path != "/";
    }
    path.len() > ancestor.len()
        && path.starts_with(ancestor)
        && path.as_bytes()[ancestor.len()] == b'/'
}

/// A refresh that a dispatcher claimed: before the call (no notification id yet), or
/// in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub claim_id: String,
    pub claimed_at_ms: i64,
    /// The call's `NotificationId`, once it started.
    pub notification_id: Option<String>,
    /// The call's `FolderList`, all with the same `recursive`.
    pub listings: Vec<Listing>,
    /// The oldest event among what the call covers (for `StalenessMs`).
    pub oldest_event_ms: i64,
    /// The claim timed out and its listings went back to pending.
    pub returned: bool,
    /// When the claiming invocation can no longer record the call (its deadline).
    pub claim_expires_at_ms: i64,
    /// When the slot is freed, and its listings put back, if no completion came.
    pub lease_ends_at_ms: i64,
}

impl Slot {
    pub fn recursive(&self) -> bool {
        self.listings.first().is_some_and(|l| l.recursive)
    }

    pub fn folders(&self) -> Vec<String> {
        self.listings.iter().map(|l| l.path.clone()).collect()
    }

    fn lease_ends_at(&self) -> i64 {
        self.lease_ends_at_ms
    }

    fn claim_times_out_at(&self) -> Option<i64> {
        (self.notification_id.is_none() && !self.returned).then_some(self.claim_expires_at_ms)
    }

    /// Whether a completion of a refresh of `folders` (in any order) that started at
    /// `started_at_ms` may be this claim's call, whose notification id was never
    /// recorded.
    fn may_have_started(&self, folders: &[String], started_at_ms: Option<i64>) -> bool {
        if self.notification_id.is_some() || folders.is_empty() {
            return false;
        }
        let mut mine = self.folders();
        let mut theirs = folders.to_vec();
        mine.sort();
        theirs.sort();
        mine == theirs
            && started_at_ms
                .is_none_or(|t| t.saturating_add(COMPLETION_CLOCK_MARGIN_MS) >= self.claimed_at_ms)
    }
}

/// A refresh-complete event, as the scheduler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRefresh {
    pub notification_id: String,
    /// `folderList` of the event (empty: unknown).
    pub folders: Vec<String>,
    pub started_at_ms: Option<i64>,
    pub completed_at_ms: i64,
}

/// A completion event seen before its notification id was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyCompletion {
    pub notification_id: String,
    pub completed_at_ms: i64,
}

/// One share's scheduling state (one table item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareState {
    pub share_arn: String,
    /// The bucket the share maps (for the wake-up message and the metrics), and the
    /// share's prefix in it ("" or ending in `/`).
    pub bucket: String,
    pub prefix: String,
    /// The stored version; 0: not stored yet. A write succeeds only if the stored
    /// version is still this one, and stores `version + 1`.
    pub version: u64,
    /// What still needs listing: changes that no call started after yet.
    pub pending: BTreeSet<Listing>,
    /// The pending listings that came after the last call was claimed. A call takes
    /// the others first, so a listing waits behind at most what was pending when the
    /// next call was claimed, never behind later changes that sort before it.
    pub arrived: BTreeSet<Listing>,
    /// The oldest event among the pending listings (an upper bound of their age).
    pub pending_since_ms: Option<i64>,
    pub slots: Vec<Slot>,
    pub last_call_at_ms: Option<i64>,
    /// No call before this time: the gateway refused the last one.
    pub busy_until_ms: Option<i64>,
    /// When the latest wake-up message that was sent becomes visible.
    pub wake_at_ms: Option<i64>,
    pub early_completions: Vec<EarlyCompletion>,
    /// The latest completion that freed a slot, and its staleness: from the oldest event
    /// the refresh covered to its completion (for operators).
    pub last_completed_at_ms: Option<i64>,
    pub last_staleness_ms: Option<i64>,
    /// Failed or refused calls in a row (the back-off's exponent); 0 after a call
    /// started.
    pub failures: u32,
    /// How long this share's refreshes took lately: the longest recent one, halved at
    /// each completion that took less (sets the lease).
    pub refresh_ms: Option<i64>,
}

/// The timing rules of dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// `MIN_REFRESH_INTERVAL_SECONDS`, in ms.
    pub min_interval_ms: i64,
    /// The most two refresher clocks may differ by: added to the interval, so calls from
    /// two containers are still the interval apart in real time.
    pub clock_margin_ms: i64,
}

impl Pace {
    pub fn from_seconds(min_interval_seconds: u32, clock_margin_ms: i64) -> Self {
        Pace {
            min_interval_ms: i64::from(min_interval_seconds) * 1000,
            clock_margin_ms,
        }
    }

    fn gap_ms(&self) -> i64 {
        if self.min_interval_ms == 0 {
            0
        } else {
            self.min_interval_ms.saturating_add(self.clock_margin_ms)
        }
    }
}

/// What [`ShareState::dispatch`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatch {
    /// Call `RefreshCache` with this slot's listings now; the slot is claimed.
    Call(Slot),
    /// Something is pending but the share may not be called before this time.
    WaitUntil(i64),
    /// Nothing pending.
    Idle,
}

/// What a completion event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// It freed this slot.
    Freed(Slot),
    /// No slot holds that notification id (yet): a duplicate, a late event after the
    /// lease, a refresh that someone else started, or one whose id is recorded later.
    Unknown,
}

impl ShareState {
    pub fn new(share_arn: impl Into<String>, bucket: impl Into<String>) -> Self {
        ShareState {
            share_arn: share_arn.into(),
            bucket: bucket.into(),
            prefix: String::new(),
            version: 0,
            pending: BTreeSet::new(),
            arrived: BTreeSet::new(),
            pending_since_ms: None,
            slots: Vec::new(),
            last_call_at_ms: None,
            busy_until_ms: None,
            wake_at_ms: None,
            early_completions: Vec::new(),
            last_completed_at_ms: None,
            last_staleness_ms: None,
            failures: 0,
            refresh_ms: None,
        }
    }

    /// Adds the listings of a closed window (whose oldest event was at
    /// `oldest_event_ms`). They wait for a call that starts after now, behind what
    /// was already pending.
    pub fn add_pending(
        &mut self,
        listings: impl IntoIterator<Item = Listing>,
        oldest_event_ms: i64,
    ) {
        self.merge_pending(listings, oldest_event_ms, true);
    }

    /// Puts back listings that a call already held: they keep their place.
    fn put_back_listings(&mut self, listings: Vec<Listing>, oldest_event_ms: i64) {
        self.merge_pending(listings, oldest_event_ms, false);
    }

    fn merge_pending(
        &mut self,
        listings: impl IntoIterator<Item = Listing>,
        oldest_event_ms: i64,
        arrived: bool,
    ) {
        let before = self.pending.len();
        let mut added = false;
        for listing in listings {
            if self.pending.insert(listing.clone()) {
                added = true;
                if arrived {
                    self.arrived.insert(listing);
                }
            }
        }
        if added || self.pending.len() != before {
            self.pending_since_ms = Some(
                self.pending_since_ms
                    .map_or(oldest_event_ms, |t| t.min(oldest_event_ms)),
            );
        }
        self.pending = without_covered(std::mem::take(&mut self.pending));
        if listing_bytes(&self.pending) > MAX_PENDING_BYTES {
            self.pending = collapse_to_bytes(std::mem::take(&mut self.pending), MAX_PENDING_BYTES);
        }
        self.forget_absorbed_arrivals();
    }

    /// A listing absorbed by a wider one (or collapsed) is gone from `arrived` too; the
    /// wider one keeps its own place.
    fn forget_absorbed_arrivals(&mut self) {
        let pending = &self.pending;
        self.arrived.retain(|l| pending.contains(l));
    }

    /// Slots in flight (or claimed), as far as this state knows.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Frees the slots whose lease ended, putting back their listings (a refresh that
    /// never completed may never have listed them), and gives back the listings of
    /// claims whose invocation is gone. Returns how many leases ended.
    pub fn housekeep(&mut self, now_ms: i64) -> usize {
        let (ended, live): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|s| now_ms >= s.lease_ends_at());
        self.slots = live;
        let leases_ended = ended.len();
        for slot in ended {
            if !slot.returned {
                self.put_back_listings(slot.listings, slot.oldest_event_ms);
            }
        }
        let mut returned = Vec::new();
        for slot in &mut self.slots {
            if slot.claim_times_out_at().is_some_and(|t| now_ms >= t) {
                slot.returned = true;
                returned.push((slot.listings.clone(), slot.oldest_event_ms));
            }
        }
        for (listings, oldest) in returned {
            self.put_back_listings(listings, oldest);
        }
        self.early_completions
            .retain(|c| now_ms.saturating_sub(c.completed_at_ms) < MAX_SLOT_LEASE_MS);
        leases_ended
    }

    /// The earliest time at which [`ShareState::dispatch`] could call, ignoring
    /// completion events that may come before; `None` when nothing is pending and no
    /// claim will give listings back.
    pub fn next_call_at(&self, now_ms: i64, pace: Pace) -> Option<i64> {
        if self.pending.is_empty() {
            // A claim whose call is not known to have started gives its listings back
            // at its timeout, and a slot whose lease ends puts its listings back: a
            // wake-up must come then, or they would wait forever. (The completion event
            // normally frees the slot first; the wake-up then finds nothing to do.)
            return self
                .slots
                .iter()
                .filter_map(|s| {
                    s.claim_times_out_at()
                        .or((!s.returned).then_some(s.lease_ends_at()))
                })
                .min();
        }
        let after_interval = self
            .last_call_at_ms
            .map_or(now_ms, |t| t.saturating_add(pace.gap_ms()))
            .max(self.busy_until_ms.unwrap_or(now_ms))
            .max(now_ms);
        if self.slots.len() < MAX_IN_FLIGHT {
            return Some(after_interval);
        }
        // Both slots are taken: the first lease or claim timeout frees one (a
        // completion event normally comes long before).
        let freed = self
            .slots
            .iter()
            .map(|s| {
                s.claim_times_out_at()
                    .unwrap_or(s.lease_ends_at())
                    .min(s.lease_ends_at())
            })
            .min()
            .unwrap_or(now_ms);
        Some(after_interval.max(freed))
    }

    /// Claims the next call if the rules allow it now.
    ///
    /// The chunk: recursive listings first (each covers a subtree), else up to 50
    /// folders. A backlog that would take more than [`MAX_BACKLOG_CALLS`] calls first
    /// collapses, deepest folders into their parents, recursively, until it fits: then
    /// the wider calls list more, but nothing waits more than a few intervals.
    pub fn dispatch(&mut self, now_ms: i64, pace: Pace, claim_id: &str) -> Dispatch {
        self.dispatch_until(
            now_ms,
            pace,
            claim_id,
            now_ms.saturating_add(CLAIM_TIMEOUT_MS),
        )
    }

    /// [`ShareState::dispatch`] for an invocation that can record its call until
    /// `claim_expires_at_ms` (its deadline): a claim not recorded by then gives its
    /// listings back.
    pub fn dispatch_until(
        &mut self,
        now_ms: i64,
        pace: Pace,
        claim_id: &str,
        claim_expires_at_ms: i64,
    ) -> Dispatch {
        self.housekeep(now_ms);
        let Some(at) = self.next_call_at(now_ms, pace) else {
            return Dispatch::Idle;
        };
        if at > now_ms {
            return Dispatch::WaitUntil(at);
        }
        if self.pending.len() > MAX_BACKLOG_CALLS * MAX_FOLDER_LIST {
            self.pending = collapse(
                std::mem::take(&mut self.pending),
                MAX_BACKLOG_CALLS * MAX_FOLDER_LIST,
            );
            self.forget_absorbed_arrivals();
        }
        // What waited through an earlier claim goes first, then what arrived since;
        // recursive listings first within each.
        let arrived = &self.arrived;
        let (waited, new): (Vec<&Listing>, Vec<&Listing>) =
            self.pending.iter().partition(|l| !arrived.contains(*l));
        let first = if waited.is_empty() { &new } else { &waited };
        let recursive = first.iter().any(|l| l.recursive);
        let mut chunk: Vec<Listing> = Vec::new();
        let mut chunk_bytes = 0;
        for listing in waited
            .iter()
            .chain(new.iter())
            .filter(|l| l.recursive == recursive)
        {
            if chunk.len() == MAX_FOLDER_LIST
                || (!chunk.is_empty() && chunk_bytes + listing.path.len() > MAX_CALL_BYTES)
            {
                break;
            }
            chunk_bytes += listing.path.len();
            chunk.push((*listing).clone());
        }
        for listing in &chunk {
            self.pending.remove(listing);
        }
        // Everything left has now waited through a claim.
        self.arrived.clear();
        // Whatever stays pending keeps the bound of its age: conservative.
        let oldest_event_ms = self.pending_since_ms.unwrap_or(now_ms);
        if self.pending.is_empty() {
            self.pending_since_ms = None;
        }
        let slot = Slot {
            claim_id: claim_id.to_string(),
            claimed_at_ms: now_ms,
            notification_id: None,
            listings: chunk,
            oldest_event_ms,
            returned: false,
            claim_expires_at_ms: claim_expires_at_ms.max(now_ms),
            lease_ends_at_ms: now_ms.saturating_add(slot_lease_ms(self.refresh_ms)),
        };
        self.slots.push(slot.clone());
        self.last_call_at_ms = Some(now_ms);
        Dispatch::Call(slot)
    }

    /// The claimed call started with `notification_id`. A completion that already came
    /// frees the slot at once. `false` when the slot is no longer there.
    pub fn started(&mut self, claim_id: &str, notification_id: &str) -> bool {
        let Some(index) = self.slots.iter().position(|s| s.claim_id == claim_id) else {
            return false;
        };
        if let Some(early) = self
            .early_completions
            .iter()
            .position(|c| c.notification_id == notification_id)
        {
            self.early_completions.remove(early);
            self.slots.remove(index);
        } else {
            self.slots[index].notification_id = Some(notification_id.to_string());
        }
        self.failures = 0;
        true
    }

    /// The gateway refused or failed the claimed call: as [`ShareState::put_back`], and
    /// no call before the back-off ([`backoff_ms`]) from now.
    pub fn refused(&mut self, claim_id: &str, now_ms: i64) {
        self.put_back(claim_id);
        self.failures = self.failures.saturating_add(1);
        self.busy_until_ms = Some(now_ms.saturating_add(backoff_ms(self.failures)));
    }

    /// The claimed call did not start (throttled, failed): its listings are pending
    /// again and the slot is free.
    pub fn put_back(&mut self, claim_id: &str) {
        let Some(index) = self.slots.iter().position(|s| s.claim_id == claim_id) else {
            return;
        };
        let slot = self.slots.remove(index);
        if !slot.returned {
            self.put_back_listings(slot.listings, slot.oldest_event_ms);
        }
    }

    /// A completion event for `notification_id`, of which nothing else is known.
    pub fn complete(&mut self, notification_id: &str, completed_at_ms: i64) -> Completion {
        self.complete_refresh(&CompletedRefresh {
            notification_id: notification_id.to_string(),
            folders: Vec::new(),
            started_at_ms: None,
            completed_at_ms,
        })
    }

    /// A completion event: frees the slot with its notification id or, when no slot
    /// has it, the oldest claim without a recorded id whose folders are the event's
    /// and which was claimed before the refresh started (the write of its id was lost,
    /// or has not happened yet).
    pub fn complete_refresh(&mut self, event: &CompletedRefresh) -> Completion {
        let notification_id = event.notification_id.as_str();
        let completed_at_ms = event.completed_at_ms;
        let by_id = self
            .slots
            .iter()
            .position(|s| s.notification_id.as_deref() == Some(notification_id));
        let by_listing = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.may_have_started(&event.folders, event.started_at_ms))
                .min_by_key(|(_, s)| s.claimed_at_ms)
                .map(|(i, _)| i)
        };
        if let Some(index) = by_id.or_else(by_listing) {
            let slot = self.slots.remove(index);
            self.last_completed_at_ms = Some(completed_at_ms);
            self.last_staleness_ms =
                Some(completed_at_ms.saturating_sub(slot.oldest_event_ms).max(0));
            let took = completed_at_ms
                .saturating_sub(event.started_at_ms.unwrap_or(slot.claimed_at_ms))
                .max(0);
            self.refresh_ms = Some(self.refresh_ms.map_or(took, |r| took.max(r / 2)));
            return Completion::Freed(slot);
        }
        // A completion that frees nothing still tells how long the share takes to list:
        // its slot's lease ended first (the refresh outlasted it), or it was someone
        // else's refresh of the share. Without this, a share whose refreshes outlast
        // the shortest lease would be listed again at every lease, its lease never
        // growing. It only raises the estimate: the decay is left to our own refreshes.
        if let Some(started) = event.started_at_ms {
            let took = completed_at_ms.saturating_sub(started);
            if took > 0 {
                self.refresh_ms = Some(self.refresh_ms.map_or(took, |r| r.max(took)));
            }
        }
        let claimed_without_id = self.slots.iter().any(|s| s.notification_id.is_none());
        let known = self
            .early_completions
            .iter()
            .any(|c| c.notification_id == notification_id);
        // Only a call that is still being recorded can be the owner; otherwise it is a
        // duplicate or someone else's refresh and is not kept.
        if claimed_without_id && !known {
            if self.early_completions.len() >= MAX_EARLY_COMPLETIONS {
                self.early_completions.remove(0);
            }
            self.early_completions.push(EarlyCompletion {
                notification_id: notification_id.to_string(),
                completed_at_ms,
            });
        }
        Completion::Unknown
    }

    /// Whether a wake-up must be sent for `at`: no wake-up sent earlier becomes
    /// visible after now and no later than `at` (within the second that SQS's whole
    /// `DelaySeconds` round it up by). `consumed`: the wake-up message being processed,
    /// which no longer counts.
    pub fn needs_wake(&self, at_ms: i64, now_ms: i64, consumed: Option<i64>) -> bool {
        !matches!(self.wake_at_ms, Some(w)
            if Some(w) != consumed && w > now_ms && w <= at_ms.saturating_add(WAKE_ROUNDING_MS))
    }

    /// A wake-up message that becomes visible at `visible_at_ms` was sent.
    pub fn woke_at(&mut self, visible_at_ms: i64, now_ms: i64) {
        self.wake_at_ms = match self.wake_at_ms {
            Some(w) if w > now_ms && w <= visible_at_ms => Some(w),
            _ => Some(visible_at_ms),
        };
    }

    /// The share is gone: no slot of it will complete. Returns what it still owed (the
    /// pending listings, and claims not known to have started) as changes of its
    /// bucket, for the bucket's other shares: a share recreated under a new ARN must
    /// still see them.
    pub fn forget(&mut self) -> Owed {
        self.arrived.clear();
        let mut owed: Vec<Listing> = std::mem::take(&mut self.pending).into_iter().collect();
        for slot in self.slots.drain(..) {
            if slot.notification_id.is_none() && !slot.returned {
                owed.extend(slot.listings);
            }
        }
        let mut changes = ChangeSet::default();
        for listing in &owed {
            if listing.recursive {
                // A subtree of unknown changes: the other shares look everywhere.
                changes.set_whole_bucket();
            } else if listing.path == "/" {
                changes.add_folder(&self.prefix);
            } else {
                changes.add_folder(&format!(
                    "{}{}/",
                    self.prefix,
                    listing.path.trim_start_matches('/')
                ));
            }
        }
        let oldest_event_ms = self.pending_since_ms.take().unwrap_or(0);
        self.early_completions.clear();
        Owed {
            bucket: self.bucket.clone(),
            changes,
            oldest_event_ms,
        }
    }
}

/// What a share that is gone still owed, as changes of its bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub bucket: String,
    pub changes: ChangeSet,
    pub oldest_event_ms: i64,
}

impl Owed {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// `set` without the listings that a recursive listing of the set already lists.
fn without_covered(set: BTreeSet<Listing>) -> BTreeSet<Listing> {
    let subtrees: Vec<Listing> = set.iter().filter(|l| l.recursive).cloned().collect();
    if subtrees.is_empty() {
        return set;
    }
    set.into_iter()
        .filter(|l| !subtrees.iter().any(|s| s != l && s.covers(l)))
        .collect()
}

/// Collapses `set` into at most `limit` listings that list everything it lists: the
/// deepest folder (and the siblings pending with it) become a recursive listing of
/// their parent, until the set fits. The parent is itself listed by the recursive
/// listing, and its ancestors are pending already (every change brings them).
pub fn collapse(set: BTreeSet<Listing>, limit: usize) -> BTreeSet<Listing> {
    let limit = limit.max(1);
    collapse_while(set, |s| s.len() > limit)
}

/// The bytes of the paths of `set`, as a share item stores them (about).
pub fn listing_bytes(set: &BTreeSet<Listing>) -> usize {
    set.iter().map(|l| l.path.len() + 2).sum()
}

/// Collapses `set` like [`collapse`] until its paths take at most `budget` bytes.
pub fn collapse_to_bytes(set: BTreeSet<Listing>, budget: usize) -> BTreeSet<Listing> {
    collapse_while(set, |s| s.len() > 1 && listing_bytes(s) > budget)
}

fn collapse_while(
    mut set: BTreeSet<Listing>,
    too_big: impl Fn(&BTreeSet<Listing>) -> bool,
) -> BTreeSet<Listing> {
    while too_big(&set) {
        let Some(deepest) = set
            .iter()
            .max_by_key(|l| (l.depth(), l.path.clone()))
            .cloned()
        else {
            break;
        };
        let Some(parent) = deepest.parent() else {
            // The deepest is the root: the set is at most the root twice.
            return BTreeSet::from([Listing::subtree("/")]);
        };
        set.insert(Listing::subtree(parent));
        set = without_covered(set);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PACE: Pace = Pace {
        min_interval_ms: 60_000,
        clock_margin_ms: 1_000,
    };

    fn folders(paths: &[&str]) -> Vec<Listing> {
        paths.iter().map(|p| Listing::folder(*p)).collect()
    }

    fn state() -> ShareState {
        ShareState::new("arn:share/share-1", "b")
    }

    fn claimed(d: Dispatch) -> Slot {
        match d {
            Dispatch::Call(slot) => slot,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    #[test]
    fn listing_round_trips_and_covers() {
        for l in [
            Listing::folder("/"),
            Listing::subtree("/a/b"),
            Listing::folder("/a"),
        ] {
            assert_eq!(Listing::decode(&l.encode()), Some(l.clone()));
        }
        assert_eq!(Listing::decode("sgw:x"), None);
        let a = Listing::subtree("/a");
        assert!(a.covers(&Listing::folder("/a")));
        assert!(a.covers(&Listing::folder("/a/b")));
        assert!(a.covers(&Listing::subtree("/a/b/c")));
        assert!(!a.covers(&Listing::folder("/ab")));
        assert!(!a.covers(&Listing::folder("/")));
        assert!(Listing::subtree("/").covers(&Listing::folder("/x")));
        assert!(!Listing::folder("/a").covers(&Listing::folder("/a/b")));
    }

    #[test]
    fn first_call_goes_at_once_then_the_interval_holds() {
        let mut s = state();
        s.add_pending(folders(&["/", "/a"]), 100);
        let slot = claimed(s.dispatch(1_000, PACE, "c1"));
        assert_eq!(slot.folders(), vec!["/", "/a"]);
        assert!(!slot.recursive());
        assert_eq!(slot.oldest_event_ms, 100);
        assert!(s.pending.is_empty());
        assert!(s.started("c1", "n1"));
        // A later change waits for the interval (plus the clock margin).
        s.add_pending(folders(&["/b"]), 2_000);
        assert_eq!(s.dispatch(2_000, PACE, "c2"), Dispatch::WaitUntil(62_000));
        assert_eq!(s.pending.len(), 1);
        let slot = claimed(s.dispatch(62_000, PACE, "c2"));
        assert_eq!(slot.folders(), vec!["/b"]);
        assert_eq!(s.in_flight(), 2);
    }

    #[test]
    fn a_third_refresh_waits_for_a_completion() {
        let mut s = state();
        let pace = Pace::from_seconds(0, 0);
        for (i, f) in ["/a", "/b"].iter().enumerate() {
            s.add_pending(folders(&[f]), 0);
            let slot = claimed(s.dispatch(10, pace, &format!("c{i}")));
            assert!(s.started(&slot.claim_id, &format!("n{i}")));
        }
        s.add_pending(folders(&["/c"]), 0);
        // Both in flight: wait for the first lease (a completion normally comes first).
        assert_eq!(
            s.dispatch(20, pace, "c2"),
            Dispatch::WaitUntil(10 + MIN_SLOT_LEASE_MS)
        );
        match s.complete("n0", 30) {
            Completion::Freed(slot) => assert_eq!(slot.folders(), vec!["/a"]),
            other => panic!("{other:?}"),
        }
        // A duplicate of that event frees nothing more.
        assert_eq!(s.complete("n0", 31), Completion::Unknown);
        assert_eq!(s.in_flight(), 1);
        assert_eq!(claimed(s.dispatch(40, pace, "c2")).folders(), vec!["/c"]);
    }

    #[test]
    fn a_change_after_a_claim_is_not_covered_by_it() {
        let mut s = state();
        s.add_pending(folders(&["/a"]), 0);
        let slot = claimed(s.dispatch(0, PACE, "c1"));
        // The same folder changes again while the refresh is in flight.
        s.add_pending(folders(&["/a"]), 5);
        assert!(
            s.pending.contains(&Listing::folder("/a")),
            "in flight does not cover later changes"
        );
        s.started(&slot.claim_id, "n1");
        assert_eq!(
            s.complete("n1", 10),
            Completion::Freed(Slot {
                notification_id: Some("n1".into()),
                ..slot
            })
        );
        assert!(matches!(s.dispatch(61_000, PACE, "c2"), Dispatch::Call(_)));
    }

    #[test]
    fn a_refused_call_backs_off_even_without_an_interval() {
        let mut s = state();
        let pace = Pace::from_seconds(0, 0);
        s.add_pending(folders(&["/a"]), 0);
        let slot = claimed(s.dispatch(100, pace, "c1"));
        s.refused(&slot.claim_id, 100);
        assert_eq!(
            s.dispatch(100, pace, "c2"),
            Dispatch::WaitUntil(100 + BUSY_BACKOFF_MS)
        );
        assert!(matches!(
            s.dispatch(100 + BUSY_BACKOFF_MS, pace, "c2"),
            Dispatch::Call(_)
        ));
    }

    #[test]
    fn throttled_calls_are_put_back() {
        let mut s = state();
        s.add_pending(folders(&["/a", "/b"]), 7);
        let slot = claimed(s.dispatch(0, PACE, "c1"));
        s.put_back(&slot.claim_id);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.pending.len(), 2);
        assert_eq!(s.pending_since_ms, Some(7));
        // The failed call still counts for the interval.
        assert_eq!(s.dispatch(1, PACE, "c2"), Dispatch::WaitUntil(61_000));
    }

    #[test]
    fn a_claim_that_never_recorded_its_call_gives_its_listings_back() {
        let mut s = state();
        s.add_pending(folders(&["/a"]), 0);
        claimed(s.dispatch(0, PACE, "c1"));
        // Nothing pending, but the slot has no id yet: wait for its claim timeout.
        assert_eq!(
            s.dispatch(10, PACE, "x"),
            Dispatch::WaitUntil(CLAIM_TIMEOUT_MS)
        );
        s.housekeep(CLAIM_TIMEOUT_MS);
        assert!(s.pending.contains(&Listing::folder("/a")));
        assert!(s.slots[0].returned);
        // The slot still counts until its lease, in case the call did start.
        assert_eq!(s.in_flight(), 1);
        let again = claimed(s.dispatch(CLAIM_TIMEOUT_MS, PACE, "c2"));
        assert_eq!(again.folders(), vec!["/a"]);
        s.housekeep(MIN_SLOT_LEASE_MS);
        assert_eq!(s.in_flight(), 1, "only the first slot's lease ended");
        // Putting back a returned claim does not duplicate its listings.
        let mut t = state();
        t.add_pending(folders(&["/a"]), 0);
        let c = claimed(t.dispatch(0, PACE, "c1"));
        t.housekeep(CLAIM_TIMEOUT_MS);
        t.pending.clear();
        t.put_back(&c.claim_id);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_completion_before_the_id_is_recorded_frees_the_slot_when_it_is() {
        let mut s = state();
        s.add_pending(folders(&["/a"]), 0);
        let slot = claimed(s.dispatch(0, PACE, "c1"));
        assert_eq!(s.complete("n1", 5), Completion::Unknown);
        assert!(s.started(&slot.claim_id, "n1"));
        assert_eq!(s.in_flight(), 0);
        assert!(s.early_completions.is_empty());
        // An event for a share we never called is not kept.
        let mut idle = state();
        assert_eq!(idle.complete("other", 1), Completion::Unknown);
        assert!(idle.early_completions.is_empty());
    }

    #[test]
    fn a_completion_after_its_lease_still_teaches_the_listing_time() {
        let mut s = state();
        assert_eq!(s.refresh_ms, None);
        let late = CompletedRefresh {
            notification_id: "gone".into(),
            folders: Vec::new(),
            started_at_ms: Some(1_000),
            completed_at_ms: 3_601_000,
        };
        assert_eq!(s.complete_refresh(&late), Completion::Unknown);
        assert_eq!(s.refresh_ms, Some(3_600_000));
        // The next lease outlasts such a refresh.
        assert!(slot_lease_ms(s.refresh_ms) >= 2 * 3_600_000);
        // A shorter stray refresh does not lower it; an event without a start is no measure.
        let short = CompletedRefresh {
            started_at_ms: Some(3_000_000),
            ..late.clone()
        };
        assert_eq!(s.complete_refresh(&short), Completion::Unknown);
        assert_eq!(s.refresh_ms, Some(3_600_000));
        let mut t = state();
        assert_eq!(t.complete("x", 5_000), Completion::Unknown);
        assert_eq!(t.refresh_ms, None);
    }

    #[test]
    fn what_waited_through_a_claim_goes_before_what_arrived_since() {
        let mut s = state();
        // 60 folders that sort late: the first call takes 50 of them.
        let late: Vec<String> = (0..60).map(|i| format!("/z{i:02}")).collect();
        s.add_pending(late.iter().map(Listing::folder), 0);
        let first = claimed(s.dispatch(0, PACE, "c1"));
        assert_eq!(first.listings.len(), MAX_FOLDER_LIST);
        assert!(s.arrived.is_empty());
        // 60 folders that sort first arrive: the 10 that waited still go next.
        let early: Vec<String> = (0..60).map(|i| format!("/a{i:02}")).collect();
        s.add_pending(early.iter().map(Listing::folder), 1);
        assert_eq!(s.arrived.len(), 60);
        let t = 1 + PACE.gap_ms();
        assert!(s.started(&first.claim_id, "n1"));
        assert!(matches!(s.complete("n1", t), Completion::Freed(_)));
        let second = claimed(s.dispatch(t, PACE, "c2"));
        let waited: Vec<&str> = second
            .listings
            .iter()
            .map(|l| l.path.as_str())
            .filter(|p| p.starts_with("/z"))
            .collect();
        assert_eq!(waited.len(), 10, "{:?}", second.listings);
        // The chunk is filled up with what arrived, and the rest has now waited.
        assert_eq!(second.listings.len(), MAX_FOLDER_LIST);
        assert!(s.arrived.is_empty());
        assert_eq!(s.pending.len(), 20);
    }

    #[test]
    fn a_full_pending_set_of_long_names_goes_in_the_backlog_calls() {
        let mut s = state();
        let name = |i: usize| format!("/{i:04}{}", "n".repeat(MAX_FOLDER_BYTES - 5));
        s.add_pending((0..200).map(|i| Listing::folder(name(i))), 0);
        assert!(listing_bytes(&s.pending) <= MAX_PENDING_BYTES);
        let mut calls = 0;
        let mut now = 0;
        while !s.pending.is_empty() {
            let slot = claimed(s.dispatch(now, PACE, &format!("c{calls}")));
            assert!(s.started(&slot.claim_id, &format!("n{calls}")));
            assert!(matches!(
                s.complete(&format!("n{calls}"), now),
                Completion::Freed(_)
            ));
            calls += 1;
            now += PACE.gap_ms();
        }
        assert!(calls <= MAX_BACKLOG_CALLS, "{calls} calls");
    }

    #[test]
    fn more_than_50_folders_go_in_chunks_without_collapse() {
        let mut s = state();
        let many: Vec<String> = (0..120).map(|i| format!("/d{i:03}")).collect();
        s.add_pending(many.iter().map(Listing::folder), 0);
        s.add_pending(folders(&["/"]), 0);
        let pace = Pace::from_seconds(0, 0);
        let mut listed = BTreeSet::new();
        let mut calls = 0;
        while let Dispatch::Call(slot) = s.dispatch(0, pace, &format!("c{calls}")) {
            calls += 1;
            assert!(slot.listings.len() <= MAX_FOLDER_LIST);
            assert!(!slot.recursive());
            listed.extend(slot.listings.clone());
            s.started(&slot.claim_id, &format!("n{calls}"));
            s.complete(&format!("n{calls}"), 0);
        }
        assert_eq!(calls, 3);
        assert_eq!(listed.len(), 121);
    }

    #[test]
    fn a_backlog_past_four_calls_collapses() {
        let mut s = state();
        let mut all = vec!["/".to_string()];
        for p in 0..5 {
            all.push(format!("/p{p}"));
            for c in 0..50 {
                all.push(format!("/p{p}/c{c:02}"));
            }
        }
        s.add_pending(all.iter().map(Listing::folder), 0);
        assert!(s.pending.len() > MAX_BACKLOG_CALLS * MAX_FOLDER_LIST);
        let slot = claimed(s.dispatch(0, PACE, "c1"));
        // The deepest siblings became recursive listings of their parents.
        assert!(slot.recursive());
        assert!(slot.listings.iter().all(|l| l.path.starts_with("/p")));
        let mut all_after: BTreeSet<Listing> = s.pending.clone();
        all_after.extend(slot.listings);
        for f in &all {
            assert!(
                all_after
                    .iter()
                    .any(|l| l.covers(&Listing::folder(f.as_str()))),
                "{f} lost"
            );
        }
    }

    #[test]
    fn whole_share_refresh_absorbs_folders() {
        let mut s = state();
        s.add_pending(folders(&["/a", "/a/b"]), 3);
        s.add_pending([Listing::subtree("/")], 1);
        assert_eq!(s.pending, BTreeSet::from([Listing::subtree("/")]));
        assert_eq!(s.pending_since_ms, Some(1));
    }

    #[test]
    fn wake_ups_are_not_repeated() {
        let mut s = state();
        assert!(s.needs_wake(10_000, 0, None));
        s.woke_at(10_000, 0);
        assert!(!s.needs_wake(10_000, 10, None));
        assert!(!s.needs_wake(50_000, 10, None));
        // One sent for a time that its whole-second delay rounded up still serves it.
        assert!(!s.needs_wake(9_500, 10, None));
        // An earlier time needs its own wake-up.
        assert!(s.needs_wake(5_000, 10, None));
        // The wake-up being processed does not count, even if this clock runs behind.
        assert!(s.needs_wake(20_000, 9_900, Some(10_000)));
        // Past its time it no longer counts.
        assert!(s.needs_wake(20_000, 10_000, None));
    }

    #[test]
    fn a_gone_share_hands_back_what_it_owed_as_bucket_folders() {
        let mut s = state();
        s.prefix = "p/".to_string();
        s.add_pending(folders(&["/", "/a", "/a/b"]), 4);
        let started = claimed(s.dispatch(0, PACE, "c1"));
        s.started(&started.claim_id, "n1");
        s.add_pending(folders(&["/c"]), 9);
        let owed = s.forget();
        assert_eq!(owed.bucket, "b");
        // The started call's folders are not owed; the pending one is.
        assert_eq!(owed.changes.folders, BTreeSet::from(["p/c/".to_string()]));
        assert!(!owed.changes.whole_bucket);
        assert_eq!(owed.oldest_event_ms, 9);
        assert_eq!(s.dispatch(1, PACE, "d"), Dispatch::Idle);
        assert_eq!(s.in_flight(), 0);
        let mut t = state();
        t.add_pending([Listing::subtree("/")], 1);
        assert!(t.forget().changes.whole_bucket);
    }

    #[test]
    fn a_lease_that_ends_puts_its_listings_back_and_grows_with_the_refreshes() {
        let mut s = state();
        let pace = Pace::from_seconds(0, 0);
        s.add_pending(folders(&["/a"]), 7);
        let slot = claimed(s.dispatch(0, pace, "c1"));
        assert_eq!(slot.lease_ends_at_ms, MIN_SLOT_LEASE_MS);
        s.started("c1", "n1");
        // The completion never comes (the gateway restarted mid-refresh).
        assert_eq!(s.housekeep(MIN_SLOT_LEASE_MS - 1), 0);
        assert!(s.pending.is_empty());
        assert_eq!(s.housekeep(MIN_SLOT_LEASE_MS), 1);
        assert_eq!(s.in_flight(), 0);
        assert!(s.pending.contains(&Listing::folder("/a")));
        assert_eq!(s.pending_since_ms, Some(7), "its age is kept");
        // A share whose refreshes take an hour gets leases of two hours.
        let mut long = state();
        long.add_pending(folders(&["/b"]), 0);
        claimed(long.dispatch(0, pace, "c1"));
        long.started("c1", "n1");
        let done = CompletedRefresh {
            notification_id: "n1".into(),
            folders: vec!["/b".into()],
            started_at_ms: Some(1_000),
            completed_at_ms: 1_000 + 3_600_000,
        };
        assert!(matches!(long.complete_refresh(&done), Completion::Freed(_)));
        assert_eq!(long.refresh_ms, Some(3_600_000));
        long.add_pending(folders(&["/c"]), 0);
        let next = claimed(long.dispatch(4_000_000, pace, "c2"));
        assert_eq!(next.lease_ends_at_ms, 4_000_000 + 7_200_000);
        assert_eq!(slot_lease_ms(Some(10 * 3_600_000)), MAX_SLOT_LEASE_MS);
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap_and_a_start_resets_them() {
        assert_eq!(backoff_ms(1), BUSY_BACKOFF_MS);
        assert_eq!(backoff_ms(2), 2 * BUSY_BACKOFF_MS);
        assert_eq!(backoff_ms(4), 8 * BUSY_BACKOFF_MS);
        assert_eq!(backoff_ms(40), MAX_BACKOFF_MS);
        let mut s = state();
        let pace = Pace::from_seconds(0, 0);
        s.add_pending(folders(&["/a"]), 0);
        let mut now = 0;
        for failures in 1..=8u32 {
            let slot = claimed(s.dispatch(now, pace, &format!("c{failures}")));
            s.refused(&slot.claim_id, now);
            assert_eq!(s.failures, failures);
            let due = now + backoff_ms(failures);
            // Nothing brings a call before the step ends.
            assert_eq!(s.dispatch(due - 1, pace, "early"), Dispatch::WaitUntil(due));
            now = due;
        }
        let slot = claimed(s.dispatch(now, pace, "ok"));
        assert!(s.started(&slot.claim_id, "n"));
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn a_completion_without_a_recorded_id_frees_the_claim_with_its_folders() {
        let mut s = state();
        let pace = Pace::from_seconds(0, 0);
        s.add_pending(folders(&["/a", "/b"]), 0);
        claimed(s.dispatch(1_000, pace, "c1"));
        // The write of the notification id was lost. Another refresh's event (other
        // folders, or started before the claim) frees nothing.
        let event = |folders: &[&str], started: i64| CompletedRefresh {
            notification_id: "n-lost".into(),
            folders: folders.iter().map(|f| f.to_string()).collect(),
            started_at_ms: Some(started),
            completed_at_ms: started + 10,
        };
        assert_eq!(
            s.complete_refresh(&event(&["/a"], 2_000)),
            Completion::Unknown
        );
        assert_eq!(
            s.complete_refresh(&event(
                &["/b", "/a"],
                1_000 - COMPLETION_CLOCK_MARGIN_MS - 1
            )),
            Completion::Unknown
        );
        assert_eq!(s.in_flight(), 1);
        assert!(matches!(
            s.complete_refresh(&event(&["/b", "/a"], 2_000)),
            Completion::Freed(_)
        ));
        assert_eq!(s.in_flight(), 0);
        assert!(
            s.pending.is_empty(),
            "the call did start: nothing to list again"
        );
    }

    #[test]
    fn a_claim_expires_at_its_invocations_deadline() {
        let mut s = state();
        s.add_pending(folders(&["/a"]), 0);
        claimed(s.dispatch_until(0, PACE, "c1", 30_000));
        assert_eq!(s.dispatch(10, PACE, "x"), Dispatch::WaitUntil(30_000));
        s.housekeep(30_000);
        assert!(s.pending.contains(&Listing::folder("/a")));
    }

    #[test]
    fn long_names_stay_within_the_byte_budgets() {
        let mut s = state();
        let long = "x".repeat(1_000);
        let paths: Vec<String> = (0..300).map(|i| format!("/{long}{i:03}/{long}")).collect();
        let mut listed: Vec<Listing> = Vec::new();
        for p in &paths {
            let (parent, _) = p.rsplit_once('/').unwrap_or(("/", ""));
            listed.push(Listing::folder(p.as_str()));
            listed.push(Listing::folder(parent));
        }
        s.add_pending(listed.clone(), 0);
        assert!(listing_bytes(&s.pending) <= MAX_PENDING_BYTES);
        for l in &listed {
            assert!(s.pending.iter().any(|p| p.covers(l)), "{} lost", l.path);
        }
        let slot = claimed(s.dispatch(0, PACE, "c1"));
        let bytes: usize = slot.listings.iter().map(|l| l.path.len()).sum();
        assert!(bytes <= MAX_CALL_BYTES, "{bytes}");
        // One listing longer than the call budget still goes, alone.
        let mut t = state();
        t.add_pending(
            [Listing::folder(format!("/{}", "y".repeat(MAX_CALL_BYTES)))],
            0,
        );
        assert_eq!(claimed(t.dispatch(0, PACE, "c1")).listings.len(), 1);
    }

    fn arb_path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..4).prop_map(|parts| {
            if parts.is_empty() {
                "/".to_string()
            } else {
                format!("/{}", parts.join("/"))
            }
        })
    }

    proptest! {
        /// Collapsing never loses a listing and always fits.
        #[test]
        fn collapse_covers_everything(paths in prop::collection::btree_set(arb_path(), 1..40), limit in 1usize..10) {
            let set: BTreeSet<Listing> = paths.iter().map(|p| Listing::folder(p.as_str())).collect();
            let collapsed = collapse(set.clone(), limit);
            prop_assert!(collapsed.len() <= limit);
            for l in &set {
                prop_assert!(collapsed.iter().any(|c| c.covers(l)), "{} lost in {:?}", l, collapsed);
            }
        }

        /// Whatever the order of changes, claims, completions and put-backs, every
        /// listing added is either still pending or in a slot claimed after it was added.
        #[test]
        fn nothing_added_is_lost(ops in prop::collection::vec((0u8..5, arb_path()), 1..60)) {
            let mut s = state();
            let pace = Pace::from_seconds(1, 0);
            let mut now = 0i64;
            // (listing, added at) not yet claimed after being added.
            let mut owed: Vec<(Listing, i64)> = Vec::new();
            let mut n = 0;
            for (op, path) in ops {
                now += 400;
                match op {
                    0 | 1 => {
                        let l = Listing::folder(path);
                        s.add_pending([l.clone()], now);
                        owed.push((l, now));
                    }
                    2 => {
                        n += 1;
                        if let Dispatch::Call(slot) = s.dispatch(now, pace, &format!("c{n}")) {
                            owed.retain(|(l, _)| !slot.listings.iter().any(|c| c.covers(l)));
                            s.started(&slot.claim_id, &format!("n{n}"));
                        }
                    }
                    3 => {
                        n += 1;
                        if let Dispatch::Call(slot) = s.dispatch(now, pace, &format!("c{n}")) {
                            s.put_back(&slot.claim_id);
                        }
                    }
                    _ => {
                        if let Some(id) = s.slots.first().and_then(|x| x.notification_id.clone()) {
                            s.complete(&id, now);
                        }
                    }
                }
                prop_assert!(s.in_flight() <= MAX_IN_FLIGHT);
                for (l, _) in &owed {
                    prop_assert!(s.pending.iter().any(|p| p.covers(l)), "{} neither pending nor claimed", l);
                }
            }
        }
    }
}
