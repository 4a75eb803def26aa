//! Aggregation windows: the per-bucket state and the rules that move it.
//!
//! One item per bucket holds a numbered window (its *generation*). The aggregator sends
//! a window's refresh message *before* the write that opens the window, so every window
//! in the table already has its message on the queue. It then joins the open window
//! until the refresher closes it. The refresher closes a window only once its end time
//! has passed (an early message is sent back with the remaining delay), and before it
//! refreshes, so every event that joined a window happened before the refresh that
//! covers it. A window whose refresh is not known to have started is carried beside the
//! next window (its own set, apart from the new window's folders) until its refreshes
//! are marked started: then it is dropped, so a burst does not list a window's folders
//! twice, and a redelivered message of the older window hands the carried folders off
//! itself without waiting for the next window's end. See `docs/protocol.md`.
//!
//! These functions are the rules; [`crate::adapters::memory`] applies them directly and
//! [`crate::adapters::sdk`] states the same conditions as DynamoDB expressions.

use std::collections::BTreeSet;
use std::fmt;

/// The most entries (folders, and folders written through a gateway) a window records.
/// Past this it first forgets which folders each gateway wrote (keeping only that it
/// wrote), then refreshes its shares whole. A folder is at most 1,024 bytes (S3's key
/// limit), so 200 keep the item far below DynamoDB's 400 KB item limit, next to the
/// refresh log (bounded in the SDK adapter).
pub const MAX_WINDOW_FOLDERS: usize = 200;

/// How long after its end an unclosed window still takes joins. Its message normally
/// arrives within seconds of the end; a window whose message is stuck (a long gateway
/// outage, retries, the DLQ) stops taking joins after this, and the next window opens
/// and carries its folders.
pub const STALE_WINDOW_GRACE_MS: i64 = 15 * 60 * 1000;

/// The gateway that wrote a change through one of its file shares, as the event's
/// principal names it. That gateway's own shares already show the change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Writer {
    /// The gateway id, lowercase (`sgw-12a3456b`).
    Gateway(String),
    /// The principal says `StorageGateway` but names no gateway id.
    UnknownGateway,
}

impl Writer {
    /// The writer named by an event's `userIdentity.principalId`, if a gateway wrote it:
    /// `...:StorageGateway-sgw-12A3456B`, read case-insensitively and leniently (the
    /// first `sgw-` followed by letters and digits after `StorageGateway`).
    pub fn from_principal(principal_id: &str) -> Option<Writer> {
        let lower = principal_id.to_ascii_lowercase();
        let after = &lower[lower.find("storagegateway")? + "storagegateway".len()..];
        let id = after.find("sgw-").map(|i| {
            let tail = &after[i + 4..];
            let end = tail
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(tail.len());
            &tail[..end]
        });
        Some(match id {
            Some(id) if !id.is_empty() => Writer::Gateway(format!("sgw-{id}")),
            _ => Writer::UnknownGateway,
        })
    }

    /// Whether a share on the gateway `gateway_id` already shows this writer's changes.
    /// `all_on_one_gateway`: every share of the bucket is on one gateway, which then
    /// must be the one that wrote.
    pub fn wrote_through(&self, gateway_id: &str, all_on_one_gateway: bool) -> bool {
        match self {
            Writer::Gateway(id) => id.eq_ignore_ascii_case(gateway_id),
            Writer::UnknownGateway => all_on_one_gateway,
        }
    }

    /// How the writer is stored ahead of a folder: the id, or `StorageGateway`.
    pub fn tag(&self) -> &str {
        match self {
            Writer::Gateway(id) => id,
            Writer::UnknownGateway => UNKNOWN_GATEWAY_TAG,
        }
    }

    fn from_tag(tag: &str) -> Option<Writer> {
        if tag == UNKNOWN_GATEWAY_TAG {
            Some(Writer::UnknownGateway)
        } else if tag.starts_with("sgw-") && tag.len() > 4 {
            Some(Writer::Gateway(tag.to_ascii_lowercase()))
        } else {
            None
        }
    }
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Writer::Gateway(id) => f.write_str(id),
            Writer::UnknownGateway => f.write_str("an unnamed gateway"),
        }
    }
}

const UNKNOWN_GATEWAY_TAG: &str = "StorageGateway";
/// A gateway's entry for "somewhere in the bucket": `*` is never a folder, which is
/// empty or ends with `/`.
const ANYWHERE: &str = "*";

/// A change written through a gateway: the folder, or `None` when the window stopped
/// keeping that gateway's folders (too many) and its changes may be anywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayChange {
    pub writer: Writer,
    pub folder: Option<String>,
}

impl GatewayChange {
    /// The stored form: `sgw-12a3456b:/a/b/`, or `sgw-12a3456b:*` for anywhere. Plain
    /// folders are stored as `/a/b/`, so the two never collide (a gateway id holds no
    /// `/` and no `:`).
    pub fn encode(&self) -> String {
        match &self.folder {
            Some(folder) => format!("{}:/{folder}", self.writer.tag()),
            None => format!("{}:{ANYWHERE}", self.writer.tag()),
        }
    }

    /// The inverse of [`GatewayChange::encode`]; `None` for anything else.
    pub fn decode(stored: &str) -> Option<GatewayChange> {
        let (tag, rest) = stored.split_once(':')?;
        let writer = Writer::from_tag(tag)?;
        let folder = match rest {
            ANYWHERE => None,
            _ => Some(rest.strip_prefix('/')?.to_string()),
        };
        Some(GatewayChange { writer, folder })
    }
}

/// What changed in one bucket: by a batch of events, or in a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Folders holding changed keys, with a trailing slash; "" is the bucket root.
    pub folders: BTreeSet<String>,
    /// Changes written through a gateway: every share but that gateway's needs them.
    pub gateway_writes: BTreeSet<GatewayChange>,
    /// A key could not be decoded, or too many folders changed: refresh everything.
    pub whole_bucket: bool,
}

impl ChangeSet {
    /// Everything changed (the bucket's item is gone, or the message names no window).
    pub fn whole() -> Self {
        ChangeSet {
            whole_bucket: true,
            ..Default::default()
        }
    }

    pub fn add_folder(&mut self, folder: &str) {
        if self.whole_bucket {
            return;
        }
        if !self.folders.contains(folder) {
            self.folders.insert(folder.to_string());
        }
        self.fit();
    }

    /// A change in `folder` (`None`: a key that could not be decoded) written through
    /// `writer`'s share.
    pub fn add_gateway_write(&mut self, writer: &Writer, folder: Option<&str>) {
        let change = GatewayChange {
            writer: writer.clone(),
            folder: folder.map(str::to_string),
        };
        if self.covers_gateway_change(&change) {
            return;
        }
        self.gateway_writes.insert(change);
        self.fit();
    }

    /// Everything changed: the folder list no longer matters.
    pub fn set_whole_bucket(&mut self) {
        self.whole_bucket = true;
        self.folders.clear();
        self.gateway_writes.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.folders.is_empty() && self.gateway_writes.is_empty() && !self.whole_bucket
    }

    /// The entries this takes in a window (the size of the stored `Folders` set).
    pub fn entries(&self) -> usize {
        self.folders.len() + self.gateway_writes.len()
    }

    /// Whether adding this to a window must check the window's room. A gateway's
    /// "anywhere" entries do not: there is at most one per gateway, each a few bytes,
    /// and turning them into the whole bucket would refresh that gateway's own shares.
    pub fn needs_room(&self) -> bool {
        !self.folders.is_empty() || self.gateway_writes.iter().any(|c| c.folder.is_some())
    }

    /// Whether this (a window's changes) already records `change`: a plain change of
    /// the folder covers a gateway's change of it, on every share.
    fn covers_gateway_change(&self, change: &GatewayChange) -> bool {
        if self.whole_bucket {
            return true;
        }
        let anywhere = GatewayChange {
            writer: change.writer.clone(),
            folder: None,
        };
        self.gateway_writes.contains(&anywhere)
            || change.folder.as_ref().is_some_and(|folder| {
                self.folders.contains(folder) || self.gateway_writes.contains(change)
            })
    }

    /// Whether a window that recorded `window` already covers this.
    pub fn is_covered_by(&self, window: &ChangeSet) -> bool {
        window.whole_bucket
            || (!self.whole_bucket
                && self.folders.is_subset(&window.folders)
                && self
                    .gateway_writes
                    .iter()
                    .all(|c| window.covers_gateway_change(c)))
    }

    /// The part of this change set that a window holding `window` does not record yet,
    /// made to fit the window's entry limit.
    pub fn not_covered_by(&self, window: &ChangeSet) -> ChangeSet {
        self.not_covered_beside(window, window.entries())
    }

    /// As [`ChangeSet::not_covered_by`], made to fit beside `used` entries (the
    /// window's own and those of a window it carries).
    fn not_covered_beside(&self, window: &ChangeSet, used: usize) -> ChangeSet {
        if window.whole_bucket {
            return ChangeSet::default();
        }
        let mut rest = ChangeSet {
            folders: self.folders.difference(&window.folders).cloned().collect(),
            gateway_writes: self
                .gateway_writes
                .iter()
                .filter(|c| !window.covers_gateway_change(c))
                .cloned()
                .collect(),
            whole_bucket: self.whole_bucket,
        };
        if rest.whole_bucket {
            rest.set_whole_bucket();
        } else {
            rest.fit_beside(used);
        }
        rest
    }

    /// Adds `other` (as a window absorbs a join).
    pub fn absorb(&mut self, other: &ChangeSet) {
        self.folders.extend(other.folders.iter().cloned());
        self.gateway_writes
            .extend(other.gateway_writes.iter().cloned());
        self.whole_bucket |= other.whole_bucket;
        if self.whole_bucket {
            self.set_whole_bucket();
        }
    }

    /// Both change sets in one (what a window and the window it carries refresh).
    pub fn union(&self, other: &ChangeSet) -> ChangeSet {
        let mut both = self.clone();
        both.absorb(other);
        both
    }

    /// This change set, made to fit beside `used` entries of a window.
    pub fn fitted_beside(&self, used: usize) -> ChangeSet {
        let mut fitted = self.clone();
        fitted.fit_beside(used);
        fitted
    }

    fn fit(&mut self) {
        self.fit_beside(0);
    }

    /// Makes this fit beside `used` entries, by the rule of `WindowItem::has_room_for`:
    /// first each gateway's folders become "anywhere" for that gateway (its own shares
    /// still need nothing), then the whole bucket.
    fn fit_beside(&mut self, used: usize) {
        let fits = |c: &ChangeSet| !c.needs_room() || used + c.entries() <= MAX_WINDOW_FOLDERS;
        if fits(self) {
            return;
        }
        self.gateway_writes = self
            .gateway_writes
            .iter()
            .map(|c| GatewayChange {
                writer: c.writer.clone(),
                folder: None,
            })
            .collect();
        if !fits(self) {
            self.set_whole_bucket();
        }
    }
}

/// The bucket's item, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowItem {
    pub bucket: String,
    /// The latest window's number; 0 means no window was ever opened.
    pub generation: u64,
    pub opened_at_ms: i64,
    /// The refresher closes the window at this time at the earliest (opened +
    /// REFRESH_DELAY_SECONDS).
    pub ends_at_ms: i64,
    /// The latest generation whose refresh message was sent (before its window opened).
    pub sent_generation: u64,
    /// The latest generation the refresher closed.
    pub closed_generation: u64,
    /// The latest generation whose refreshes all started.
    pub refreshed_generation: u64,
    /// What changed in this window.
    pub changes: ChangeSet,
    /// An earlier window whose refreshes are not known to have started, kept beside
    /// this one until they are.
    pub carried: Option<CarriedWindow>,
    pub last_event_at_ms: i64,
    /// The latest refresh the refresher recorded, for operators.
    pub last_refresh: Option<RefreshLog>,
}

/// The folders of closed (or stale) windows that the window after them keeps, until
/// a refresh mark of `generation` or later says they were handed to the shares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarriedWindow {
    /// The latest window whose changes these are (with those it carried itself).
    pub generation: u64,
    pub changes: ChangeSet,
}

/// What one refresher run started, kept on the bucket's item so an operator can match
/// it with the gateway's "Storage Gateway Refresh Cache Event" in EventBridge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshLog {
    /// The window refreshed, if the message named one.
    pub generation: Option<u64>,
    pub started_at_ms: i64,
    pub refreshes: Vec<StartedRefresh>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedRefresh {
    pub share_arn: String,
    pub notification_id: String,
    pub folders: Vec<String>,
    pub recursive: bool,
}

impl WindowItem {
    /// Takes joins: opened, not yet closed by the refresher, and not stale.
    pub fn is_joinable(&self, now_ms: i64) -> bool {
        self.generation > 0
            && self.closed_generation < self.generation
            && now_ms < self.ends_at_ms.saturating_add(STALE_WINDOW_GRACE_MS)
    }

    /// Whether the next window must carry this window's folders: its refreshes are
    /// not known to have started.
    pub fn must_carry(&self) -> bool {
        self.generation > 0 && self.refreshed_generation < self.generation
    }

    /// Whether this window already records `changes`. A carried window does not
    /// count: it may be dropped before this window closes.
    pub fn covers(&self, changes: &ChangeSet) -> bool {
        changes.is_covered_by(&self.changes)
    }

    /// The part of `changes` this window does not record yet, made to fit beside it
    /// and the window it carries.
    pub fn uncovered(&self, changes: &ChangeSet) -> ChangeSet {
        changes.not_covered_beside(&self.changes, self.entries_used())
    }

    /// The entries this window and the window it carries hold: together at most
    /// [`MAX_WINDOW_FOLDERS`], so the item stays far below DynamoDB's 400 KB.
    pub fn entries_used(&self) -> usize {
        self.changes.entries() + self.carried_entries()
    }

    /// The entries of the window this one carries.
    pub fn carried_entries(&self) -> usize {
        self.carried.as_ref().map_or(0, |c| c.changes.entries())
    }

    /// What closing this window hands to the shares: its own changes and those it
    /// carries.
    pub fn changes_to_refresh(&self) -> ChangeSet {
        match &self.carried {
            Some(carried) => self.changes.union(&carried.changes),
            None => self.changes.clone(),
        }
    }

    /// Whether `changes` fit under the entry limit (DynamoDB: `size(Folders) <= :room`,
    /// checked only when the changes [`ChangeSet::needs_room`]).
    fn has_room_for(&self, changes: &ChangeSet) -> bool {
        !changes.needs_room() || self.entries_used() + changes.entries() <= MAX_WINDOW_FOLDERS
    }

    fn absorb(&mut self, changes: &ChangeSet, now_ms: i64) {
        self.changes.absorb(changes);
        self.last_event_at_ms = now_ms;
    }
}

/// Join: add the changes to window `generation` if it is the bucket's current window
/// and still takes joins, and they fit. `None` otherwise.
pub fn join(
    item: &mut Option<WindowItem>,
    generation: u64,
    changes: &ChangeSet,
    now_ms: i64,
) -> Option<WindowItem> {
    let current = item.as_mut().filter(|i| {
        i.generation == generation && i.is_joinable(now_ms) && i.has_room_for(changes)
    })?;
    current.absorb(changes, now_ms);
    Some(current.clone())
}

/// What an opener saw before it sent the next window's message. The open succeeds
/// only if the item is still in that state, so the message names the right window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenExpectation {
    /// The current generation (0: no window yet); the new window is the next one.
    pub generation: u64,
    /// The current window (with what it carries), kept beside the new one: its
    /// refreshes are not known to have started. `None`: the new window starts clean.
    pub carry: Option<CarriedWindow>,
    /// The current window's own entries and whole-bucket flag as the opener read them:
    /// a carrying open pins them, so that nothing joined since.
    pub seen_entries: usize,
    pub seen_whole: bool,
}

impl OpenExpectation {
    pub fn from_item(item: Option<&WindowItem>) -> Self {
        OpenExpectation {
            generation: item.map_or(0, |i| i.generation),
            carry: item.filter(|i| i.must_carry()).map(|i| CarriedWindow {
                generation: i.generation,
                changes: i.changes_to_refresh(),
            }),
            seen_entries: item.map_or(0, |i| i.changes.entries()),
            seen_whole: item.is_some_and(|i| i.changes.whole_bucket),
        }
    }

    /// The opener's changes, made to fit beside the window it carries.
    pub fn fit(&self, changes: &ChangeSet) -> ChangeSet {
        match &self.carry {
            Some(carried) => changes.fitted_beside(carried.changes.entries()),
            None => changes.clone(),
        }
    }

    pub fn next_generation(&self) -> u64 {
        self.generation + 1
    }
}

/// Open the next window with these changes; its message is already on the queue.
/// `None` if the item moved on since the opener looked, a window still takes joins,
/// (without carrying) the current window's refreshes are not known to have started,
/// or (carrying) the changes do not fit beside the carried window.
pub fn open(
    item: &mut Option<WindowItem>,
    bucket: &str,
    expected: &OpenExpectation,
    changes: &ChangeSet,
    now_ms: i64,
    window_ms: i64,
) -> Option<WindowItem> {
    if let Some(current) = item.as_ref() {
        let carried_entries = expected.carry.as_ref().map_or(0, |c| c.changes.entries());
        if current.generation != expected.generation
            || current.is_joinable(now_ms)
            || (expected.carry.is_none() && current.refreshed_generation < expected.generation)
            // The carried window is what the opener saw: nothing joined since.
            || expected.carry.as_ref().is_some_and(|c| {
                c.changes != current.changes_to_refresh() || c.generation != current.generation
            })
            || (changes.needs_room() && carried_entries + changes.entries() > MAX_WINDOW_FOLDERS)
        {
            return None;
        }
    } else if expected.generation != 0 {
        return None;
    }
    let current = item.get_or_insert_with(|| WindowItem {
        bucket: bucket.to_string(),
        ..Default::default()
    });
    current.generation += 1;
    current.sent_generation = current.generation;
    current.opened_at_ms = now_ms;
    current.ends_at_ms = now_ms.saturating_add(window_ms);
    current.changes = ChangeSet::default();
    current.carried = expected.carry.clone();
    current.absorb(changes, now_ms);
    Some(current.clone())
}

/// The refresher's close of `generation`, before it refreshes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Closed now (or already closed by an earlier delivery of the same message, which
    /// then did not finish): refresh this scope (with what the window carries).
    Refresh(ChangeSet),
    /// A newer window carries this one's changes, and no refresh mark says they were
    /// handed off (this message's first delivery died): refresh them now rather than
    /// at the newer window's end.
    RefreshCarried(ChangeSet),
    /// This generation's refreshes already all started: a duplicate delivery.
    AlreadyRefreshed,
    /// The window ends later (the delay was capped at SQS's 900 s, or clocks differ):
    /// send the message again for the rest of the time.
    TooEarly { ends_at_ms: i64 },
    /// A newer window exists and carries this one's folders (or this one was
    /// refreshed): that window's refresh covers this message.
    CarriedForward { current_generation: u64 },
    /// No such window was ever opened: its opener failed after sending. The events of
    /// that invocation are retried by Lambda, which sends a message of its own.
    NeverOpened { current_generation: u64 },
    /// The bucket's item is gone: what changed is unknown, so refresh everything.
    ItemMissing,
}

/// Close `generation` if it is the bucket's current window and its time has come.
pub fn close(item: &mut Option<WindowItem>, generation: u64, now_ms: i64) -> CloseOutcome {
    let Some(current) = item.as_mut() else {
        return CloseOutcome::ItemMissing;
    };
    if generation > current.generation {
        return CloseOutcome::NeverOpened {
            current_generation: current.generation,
        };
    }
    if generation < current.generation {
        if let Some(carried) = current
            .carried
            .as_ref()
            .filter(|c| c.generation >= generation && current.refreshed_generation < generation)
        {
            return CloseOutcome::RefreshCarried(carried.changes.clone());
        }
        return CloseOutcome::CarriedForward {
            current_generation: current.generation,
        };
    }
    if current.refreshed_generation >= generation {
        return CloseOutcome::AlreadyRefreshed;
    }
    if now_ms < current.ends_at_ms {
        return CloseOutcome::TooEarly {
            ends_at_ms: current.ends_at_ms,
        };
    }
    current.closed_generation = current.closed_generation.max(generation);
    CloseOutcome::Refresh(current.changes_to_refresh())
}

/// Record the refreshes of a message: the log always, and for a closed window, that
/// every refresh of it started (never moving backwards), which drops a carried
/// window that it covers. A log for a window that a duplicate already recorded, or
/// that was never closed, is dropped.
pub fn record_refresh(item: &mut Option<WindowItem>, bucket: &str, log: &RefreshLog) {
    match log.generation {
        Some(generation) => {
            // Only a refresh that followed this window's close (or its replacement by
            // a newer window, which takes no more joins for it) refreshed the window.
            if let Some(current) = item.as_mut() {
                if (current.closed_generation >= generation || current.generation > generation)
                    && current.refreshed_generation < generation
                {
                    current.refreshed_generation = generation;
                    current.last_refresh = Some(log.clone());
                    if current
                        .carried
                        .as_ref()
                        .is_some_and(|c| c.generation <= generation)
                    {
                        current.carried = None;
                    }
                }
            }
        }
        None => {
            let current = item.get_or_insert_with(|| WindowItem {
                bucket: bucket.to_string(),
                ..Default::default()
            });
            current.last_refresh = Some(log.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(generation: u64) -> RefreshLog {
        RefreshLog {
            generation: Some(generation),
            started_at_ms: generation as i64,
            refreshes: vec![],
        }
    }

    fn folders(list: &[&str]) -> ChangeSet {
        let mut c = ChangeSet::default();
        for f in list {
            c.add_folder(f);
        }
        c
    }

    fn open_next(
        item: &mut Option<WindowItem>,
        changes: &ChangeSet,
        now: i64,
        window: i64,
    ) -> Option<WindowItem> {
        let expected = OpenExpectation::from_item(item.as_ref());
        open(item, "b", &expected, changes, now, window)
    }

    #[test]
    fn first_event_opens_later_events_join_until_closed() {
        let mut item = None;
        assert_eq!(join(&mut item, 1, &folders(&["a/"]), 1_000), None);
        let opened = open_next(&mut item, &folders(&["a/"]), 1_000, 30_000).unwrap();
        assert_eq!(
            (opened.generation, opened.sent_generation, opened.ends_at_ms),
            (1, 1, 31_000)
        );
        join(&mut item, 1, &folders(&["b/"]), 30_999).unwrap();
        // Past its end, an unclosed window still takes joins: its refresh has not begun.
        join(&mut item, 1, &folders(&["c/"]), 40_000).unwrap();
        assert_eq!(
            open_next(&mut item, &folders(&["d/"]), 40_000, 30_000),
            None
        );
        assert_eq!(
            join(&mut item, 2, &folders(&["c/"]), 40_000),
            None,
            "wrong generation"
        );
        assert_eq!(
            item.as_ref().unwrap().changes.folders,
            BTreeSet::from(["a/".into(), "b/".into(), "c/".into()])
        );
        assert!(matches!(
            close(&mut item, 1, 40_000),
            CloseOutcome::Refresh(_)
        ));
        assert_eq!(
            join(&mut item, 1, &folders(&["c/"]), 40_001),
            None,
            "closed windows take no joins"
        );
    }

    #[test]
    fn the_refresher_waits_for_the_window_end() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 3_600_000).unwrap();
        assert_eq!(
            close(&mut item, 1, 900_000),
            CloseOutcome::TooEarly {
                ends_at_ms: 3_600_000
            }
        );
        assert!(join(&mut item, 1, &folders(&["b/"]), 900_001).is_some());
        assert!(matches!(
            close(&mut item, 1, 3_600_000),
            CloseOutcome::Refresh(_)
        ));
    }

    #[test]
    fn unrefreshed_windows_are_carried_beside_the_next_until_their_mark() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        // Closed; its refresh mark is not written yet (in flight, or the refresher died).
        assert!(matches!(close(&mut item, 1, 10), CloseOutcome::Refresh(_)));
        let expected = OpenExpectation::from_item(item.as_ref());
        assert_eq!(expected.carry.as_ref().map(|c| c.generation), Some(1));
        // Opening without carrying is refused: the folders would be lost.
        let clean = OpenExpectation {
            carry: None,
            ..expected.clone()
        };
        assert_eq!(
            open(&mut item, "b", &clean, &folders(&["x/"]), 11, 10),
            None
        );
        open(&mut item, "b", &expected, &folders(&["x/"]), 11, 10).unwrap();
        let opened = item.clone().unwrap();
        assert_eq!(opened.changes.folders, BTreeSet::from(["x/".into()]));
        assert_eq!(
            opened.changes_to_refresh().folders,
            BTreeSet::from(["a/".into(), "x/".into()])
        );
        assert!(
            !opened.covers(&folders(&["a/"])),
            "a carried window may be dropped"
        );
        // The redelivered message of window 1 hands off the carried folders itself.
        assert_eq!(
            close(&mut item, 1, 12),
            CloseOutcome::RefreshCarried(folders(&["a/"]))
        );
        // Its mark drops the carried window: window 2 refreshes only its own folders.
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(item.as_ref().unwrap().carried, None);
        assert_eq!(
            close(&mut item, 1, 13),
            CloseOutcome::CarriedForward {
                current_generation: 2
            }
        );
        assert_eq!(
            close(&mut item, 2, 100),
            CloseOutcome::Refresh(folders(&["x/"]))
        );
        record_refresh(&mut item, "b", &log(2));
        assert_eq!(OpenExpectation::from_item(item.as_ref()).carry, None);
        open_next(&mut item, &folders(&["z/"]), 101, 10).unwrap();
        assert_eq!(
            item.as_ref().unwrap().changes.folders,
            BTreeSet::from(["z/".into()])
        );
    }

    #[test]
    fn a_carried_window_without_its_mark_is_refreshed_by_the_next_close() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        close(&mut item, 1, 10);
        open_next(&mut item, &folders(&["x/"]), 11, 10).unwrap();
        // Window 2 closes before 1's mark: it refreshes both, and its mark covers both.
        assert_eq!(
            close(&mut item, 2, 21),
            CloseOutcome::Refresh(folders(&["a/", "x/"]))
        );
        // Window 3 opens before 2's mark: it carries both windows in one set.
        open_next(&mut item, &folders(&["y/"]), 22, 10).unwrap();
        let carried = item.as_ref().unwrap().carried.clone().unwrap();
        assert_eq!(
            (carried.generation, carried.changes),
            (2, folders(&["a/", "x/"]))
        );
        // A late mark of window 1 does not drop the folders of window 2.
        record_refresh(&mut item, "b", &log(1));
        assert!(item.as_ref().unwrap().carried.is_some());
        record_refresh(&mut item, "b", &log(2));
        assert_eq!(item.as_ref().unwrap().carried, None);
    }

    #[test]
    fn a_carrying_open_fails_if_the_carried_window_changed_since_it_looked() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        let stale = 10 + STALE_WINDOW_GRACE_MS;
        let seen = OpenExpectation::from_item(item.as_ref());
        // A joiner whose clock lags still joins the stale window.
        join(&mut item, 1, &folders(&["late/"]), stale - 1).unwrap();
        assert_eq!(
            open(&mut item, "b", &seen, &folders(&["b/"]), stale, 10),
            None
        );
    }

    #[test]
    fn carried_and_own_entries_share_the_limit() {
        let mut item = None;
        let mut first = ChangeSet::default();
        for i in 0..MAX_WINDOW_FOLDERS - 1 {
            first.add_folder(&format!("f{i}/"));
        }
        open_next(&mut item, &first, 0, 10).unwrap();
        close(&mut item, 1, 10);
        let expected = OpenExpectation::from_item(item.as_ref());
        let batch = folders(&["g/", "h/"]);
        assert_eq!(
            open(&mut item, "b", &expected, &batch, 11, 10),
            None,
            "two more do not fit beside 199"
        );
        let fitted = expected.fit(&batch);
        assert!(fitted.whole_bucket);
        open(&mut item, "b", &expected, &fitted, 11, 10).unwrap();
        assert_eq!(
            join(&mut item, 2, &folders(&["i/"]), 12).map(|_| ()),
            Some(()),
            "whole takes anything"
        );
    }

    #[test]
    fn a_stale_window_is_superseded_with_its_folders() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        let stale = 10 + STALE_WINDOW_GRACE_MS;
        assert!(join(&mut item, 1, &folders(&["b/"]), stale).is_none());
        open_next(&mut item, &folders(&["b/"]), stale, 10).unwrap();
        assert_eq!(
            item.as_ref().unwrap().changes_to_refresh().folders,
            BTreeSet::from(["a/".into(), "b/".into()])
        );
        // The stale window's message, arriving at last, refreshes what it carried, and
        // its mark counts: a newer window took its place.
        assert_eq!(
            close(&mut item, 1, stale + 1),
            CloseOutcome::RefreshCarried(folders(&["a/"]))
        );
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(item.as_ref().unwrap().carried, None);
    }

    #[test]
    fn an_open_for_a_state_that_moved_on_fails() {
        let mut item = None;
        let seen = OpenExpectation::from_item(None);
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        close(&mut item, 1, 10);
        record_refresh(&mut item, "b", &log(1));
        // Another opener that looked before window 1 existed: its message named window 1.
        assert_eq!(open(&mut item, "b", &seen, &folders(&["q/"]), 20, 10), None);
        assert_eq!(
            close(&mut item, 5, 30),
            CloseOutcome::NeverOpened {
                current_generation: 1
            }
        );
        assert_eq!(close(&mut None, 1, 30), CloseOutcome::ItemMissing);
    }

    #[test]
    fn close_outcomes_for_duplicates() {
        let mut item = None;
        open_next(&mut item, &folders(&["a/"]), 0, 10).unwrap();
        assert!(matches!(close(&mut item, 1, 10), CloseOutcome::Refresh(_)));
        // Redelivery before the refresh finished: refresh again.
        assert!(matches!(close(&mut item, 1, 11), CloseOutcome::Refresh(_)));
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(close(&mut item, 1, 12), CloseOutcome::AlreadyRefreshed);
    }

    #[test]
    fn folder_limit_turns_into_whole_bucket() {
        let mut many = ChangeSet::default();
        for i in 0..=MAX_WINDOW_FOLDERS {
            many.add_folder(&format!("f{i}/"));
        }
        assert!(many.whole_bucket && many.folders.is_empty());
        let mut item = None;
        let mut first = ChangeSet::default();
        for i in 0..MAX_WINDOW_FOLDERS {
            first.add_folder(&format!("f{i}/"));
        }
        open_next(&mut item, &first, 0, 10).unwrap();
        let extra = folders(&["g/"]);
        assert_eq!(
            join(&mut item, 1, &extra, 1),
            None,
            "no room for another folder"
        );
        let current = item.clone().unwrap();
        let rest = current.uncovered(&extra);
        assert!(rest.whole_bucket && rest.folders.is_empty());
        join(&mut item, 1, &rest, 1).unwrap();
        assert!(item.as_ref().unwrap().changes.whole_bucket);
        assert!(folders(&["zzz/"]).is_covered_by(&ChangeSet::whole()));
        assert!(current.covers(&folders(&["f1/"])));
        assert!(!current.covers(&folders(&["g/"])));
    }

    #[test]
    fn markers_never_move_backwards() {
        let mut item = None;
        open_next(&mut item, &folders(&[""]), 0, 10);
        close(&mut item, 1, 10);
        open_next(&mut item, &folders(&[""]), 10, 10);
        // A window that was never closed was not refreshed by this log.
        record_refresh(&mut item, "b", &log(2));
        assert_eq!(item.as_ref().unwrap().refreshed_generation, 0);
        close(&mut item, 2, 20);
        record_refresh(&mut item, "b", &log(2));
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(item.as_ref().unwrap().refreshed_generation, 2);
        assert_eq!(item.as_ref().unwrap().last_refresh, Some(log(2)));
        // A message without a window still leaves its log.
        let mut fresh = None;
        record_refresh(&mut fresh, "b", &RefreshLog::default());
        assert_eq!(fresh.unwrap().last_refresh, Some(RefreshLog::default()));
    }

    fn gw(id: &str) -> Writer {
        Writer::Gateway(id.to_string())
    }

    #[test]
    fn writers_from_principals() {
        for (principal, writer) in [
            (
                "AWS:AROAEXAMPLE:StorageGateway-sgw-12A3456B",
                Some(gw("sgw-12a3456b")),
            ),
            (
                "AROAEXAMPLE:storagegateway-SGW-ABCDEF01",
                Some(gw("sgw-abcdef01")),
            ),
            ("x:StorageGateway-sgw-1", Some(gw("sgw-1"))),
            (
                "AWS:AROAEXAMPLE:StorageGateway",
                Some(Writer::UnknownGateway),
            ),
            ("StorageGateway-sgw-", Some(Writer::UnknownGateway)),
            ("AWS:AIDAEXAMPLE", None),
            ("s3.amazonaws.com", None),
            // An id before the word is not the gateway's.
            ("sgw-12A3456B:someone", None),
        ] {
            assert_eq!(Writer::from_principal(principal), writer, "{principal}");
        }
        assert!(gw("sgw-12a3456b").wrote_through("sgw-12A3456B", false));
        assert!(!gw("sgw-12a3456b").wrote_through("sgw-00000000", true));
        assert!(Writer::UnknownGateway.wrote_through("sgw-00000000", true));
        assert!(!Writer::UnknownGateway.wrote_through("sgw-00000000", false));
    }

    #[test]
    fn gateway_changes_round_trip_their_stored_form() {
        for change in [
            GatewayChange {
                writer: gw("sgw-12a3456b"),
                folder: Some("a/b/".into()),
            },
            GatewayChange {
                writer: gw("sgw-12a3456b"),
                folder: Some(String::new()),
            },
            GatewayChange {
                writer: gw("sgw-1"),
                folder: None,
            },
            GatewayChange {
                writer: Writer::UnknownGateway,
                folder: Some("x:y/".into()),
            },
            GatewayChange {
                writer: Writer::UnknownGateway,
                folder: None,
            },
        ] {
            let stored = change.encode();
            assert!(
                !stored.starts_with('/'),
                "{stored} must not look like a folder"
            );
            assert_eq!(GatewayChange::decode(&stored), Some(change), "{stored}");
        }
        for foreign in ["/a/", "a/", "nobody:/a/", "sgw-:/a/", "sgw-1:a/", "sgw-1"] {
            assert_eq!(GatewayChange::decode(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn gateway_writes_are_covered_by_plain_changes_and_coalesce() {
        let mut window = folders(&["a/"]);
        window.add_gateway_write(&gw("sgw-1"), Some("b/"));
        let mut batch = ChangeSet::default();
        batch.add_gateway_write(&gw("sgw-1"), Some("a/"));
        batch.add_gateway_write(&gw("sgw-1"), Some("b/"));
        assert!(
            batch.is_covered_by(&window),
            "a plain change covers every share"
        );
        let mut other = ChangeSet::default();
        other.add_gateway_write(&gw("sgw-2"), Some("b/"));
        assert!(
            !other.is_covered_by(&window),
            "another gateway's write is not covered"
        );
        assert_eq!(other.not_covered_by(&window), other);
        // A plain change is not covered by a gateway's write of the same folder.
        assert!(!folders(&["b/"]).is_covered_by(&window));
        // Once a gateway's entries are "anywhere", all its writes are covered.
        let mut anywhere = ChangeSet::default();
        anywhere.add_gateway_write(&gw("sgw-2"), None);
        assert!(other.is_covered_by(&anywhere));
        assert!(!folders(&["b/"]).is_covered_by(&anywhere));
    }

    #[test]
    fn too_many_gateway_folders_become_anywhere_for_that_gateway_first() {
        let mut changes = folders(&["plain/"]);
        for i in 0..MAX_WINDOW_FOLDERS {
            let writer = gw(if i % 2 == 0 { "sgw-1" } else { "sgw-2" });
            changes.add_gateway_write(&writer, Some(&format!("f{i}/")));
        }
        assert!(
            !changes.whole_bucket,
            "the gateways' own shares still need nothing"
        );
        assert_eq!(changes.folders, BTreeSet::from(["plain/".to_string()]));
        assert_eq!(
            changes.gateway_writes,
            BTreeSet::from([
                GatewayChange {
                    writer: gw("sgw-1"),
                    folder: None
                },
                GatewayChange {
                    writer: gw("sgw-2"),
                    folder: None
                },
            ])
        );
        // Plain folders past the limit still mean the whole bucket.
        for i in 0..MAX_WINDOW_FOLDERS {
            changes.add_folder(&format!("p{i}/"));
        }
        assert!(changes.whole_bucket && changes.entries() == 0);
        // A join that does not fit beside a full window: gateway entries shrink first.
        let mut full = ChangeSet::default();
        for i in 0..MAX_WINDOW_FOLDERS - 1 {
            full.add_folder(&format!("p{i}/"));
        }
        let mut batch = ChangeSet::default();
        batch.add_gateway_write(&gw("sgw-1"), Some("x/"));
        batch.add_gateway_write(&gw("sgw-1"), Some("y/"));
        let rest = batch.not_covered_by(&full);
        assert!(!rest.whole_bucket);
        assert_eq!(rest.entries(), 1);
        // Beside a window that is full to the limit, a gateway's new folder still does
        // not become the whole bucket: "anywhere" entries need no room.
        full.add_folder("last/");
        assert_eq!(full.entries(), MAX_WINDOW_FOLDERS);
        let rest = batch.not_covered_by(&full);
        assert!(!rest.whole_bucket && !rest.needs_room(), "{rest:?}");
        let mut item = None;
        open(
            &mut item,
            "b",
            &OpenExpectation::from_item(None),
            &full,
            0,
            10,
        )
        .unwrap();
        assert!(
            join(&mut item, 1, &rest, 1).is_some(),
            "anywhere entries always join"
        );
        assert_eq!(item.unwrap().changes.entries(), MAX_WINDOW_FOLDERS + 1);
    }
}
