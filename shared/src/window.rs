//! Aggregation windows: the per-bucket state and the rules that move it.
//!
//! One item per bucket holds a numbered window (its *generation*). The aggregator joins
//! the open window or opens the next one; the refresher closes a window before it
//! refreshes, so every event that joined a window happened before the refresh that
//! covers it. These functions are the rules; [`crate::adapters::memory`] applies them
//! directly and [`crate::adapters::sdk`] states the same conditions as DynamoDB
//! expressions.

use std::collections::BTreeSet;

/// What a batch of events changed in one bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Folders holding changed keys, with a trailing slash; "" is the bucket root.
    pub folders: BTreeSet<String>,
    /// A key could not be decoded: refresh everything.
    pub whole_bucket: bool,
}

impl ChangeSet {
    pub fn add_folder(&mut self, folder: &str) {
        if !self.folders.contains(folder) {
            self.folders.insert(folder.to_string());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.folders.is_empty() && !self.whole_bucket
    }
}

/// Which part of a bucket a refresh must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshScope {
    WholeBucket,
    Folders(BTreeSet<String>),
}

/// The bucket's item, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowItem {
    pub bucket: String,
    /// The latest window's number; 0 means no window was ever opened.
    pub generation: u64,
    pub opened_at_ms: i64,
    /// Events are joined until this time (opened + REFRESH_DELAY_SECONDS).
    pub ends_at_ms: i64,
    /// The latest generation whose refresh message is known to be on the queue.
    pub sent_generation: u64,
    /// The latest generation the refresher closed.
    pub closed_generation: u64,
    /// The latest generation whose refreshes all started.
    pub refreshed_generation: u64,
    pub folders: BTreeSet<String>,
    pub whole_bucket: bool,
    pub last_event_at_ms: i64,
    /// The latest refresh the refresher recorded, for operators.
    pub last_refresh: Option<RefreshLog>,
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
    /// Joinable: opened, not yet closed by the refresher, and within its time.
    pub fn is_open(&self, now_ms: i64) -> bool {
        self.generation > 0 && self.closed_generation < self.generation && now_ms < self.ends_at_ms
    }

    /// Whether the current window's refresh message is known to be on the queue.
    pub fn message_sent(&self) -> bool {
        self.sent_generation >= self.generation
    }

    pub fn scope(&self) -> RefreshScope {
        if self.whole_bucket {
            RefreshScope::WholeBucket
        } else {
            RefreshScope::Folders(self.folders.clone())
        }
    }

    fn absorb(&mut self, changes: &ChangeSet, now_ms: i64) {
        self.folders.extend(changes.folders.iter().cloned());
        self.whole_bucket |= changes.whole_bucket;
        self.last_event_at_ms = now_ms;
    }
}

/// The window an aggregator write ended up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowView {
    pub generation: u64,
    pub opened_at_ms: i64,
    pub ends_at_ms: i64,
    pub message_sent: bool,
}

impl From<&WindowItem> for WindowView {
    fn from(item: &WindowItem) -> Self {
        WindowView {
            generation: item.generation,
            opened_at_ms: item.opened_at_ms,
            ends_at_ms: item.ends_at_ms,
            message_sent: item.message_sent(),
        }
    }
}

/// Join: add the changes to the open window. `None` if no window is open.
pub fn join(item: &mut Option<WindowItem>, changes: &ChangeSet, now_ms: i64) -> Option<WindowView> {
    let current = item.as_mut().filter(|i| i.is_open(now_ms))?;
    current.absorb(changes, now_ms);
    Some(WindowView::from(&*current))
}

/// Open the next window with these changes. `None` if a window is still open.
pub fn open(
    item: &mut Option<WindowItem>,
    bucket: &str,
    changes: &ChangeSet,
    now_ms: i64,
    window_ms: i64,
) -> Option<WindowView> {
    if item.as_ref().is_some_and(|i| i.is_open(now_ms)) {
        return None;
    }
    let current = item.get_or_insert_with(|| WindowItem {
        bucket: bucket.to_string(),
        ..Default::default()
    });
    current.generation += 1;
    current.opened_at_ms = now_ms;
    current.ends_at_ms = now_ms.saturating_add(window_ms);
    current.folders.clear();
    current.whole_bucket = false;
    current.absorb(changes, now_ms);
    Some(WindowView::from(&*current))
}

/// Record that the message for `generation` is on the queue. Never moves backwards.
pub fn mark_sent(item: &mut Option<WindowItem>, generation: u64) {
    if let Some(current) = item.as_mut() {
        current.sent_generation = current.sent_generation.max(generation);
    }
}

/// The refresher's close of `generation`, before it refreshes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Closed now (or already closed by an earlier delivery of the same message, which
    /// then did not finish): refresh this scope.
    Refresh(RefreshScope),
    /// This generation's refreshes already all started: a duplicate delivery.
    AlreadyRefreshed,
    /// A newer window replaced this one, or the item is gone: the folders of this
    /// generation are unknown, so refresh the whole bucket.
    Superseded,
}

/// Close `generation` if it is the bucket's current window.
pub fn close(item: &mut Option<WindowItem>, generation: u64) -> CloseOutcome {
    match item.as_mut() {
        Some(current) if current.generation == generation => {
            if current.refreshed_generation >= generation {
                return CloseOutcome::AlreadyRefreshed;
            }
            current.closed_generation = current.closed_generation.max(generation);
            CloseOutcome::Refresh(current.scope())
        }
        _ => CloseOutcome::Superseded,
    }
}

/// Record the refreshes of a message: the log always, and for a window, that every
/// refresh of it started (never moving backwards). A log for a window that a
/// duplicate already recorded is dropped.
pub fn record_refresh(item: &mut Option<WindowItem>, bucket: &str, log: &RefreshLog) {
    match log.generation {
        Some(generation) => {
            if let Some(current) = item.as_mut() {
                if current.generation >= generation && current.refreshed_generation < generation {
                    current.refreshed_generation = generation;
                    current.last_refresh = Some(log.clone());
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

    #[test]
    fn first_event_opens_later_events_join() {
        let mut item = None;
        assert_eq!(join(&mut item, &folders(&["a/"]), 1_000), None);
        let opened = open(&mut item, "b", &folders(&["a/"]), 1_000, 30_000).unwrap();
        assert_eq!(opened.generation, 1);
        assert_eq!(opened.ends_at_ms, 31_000);
        assert!(!opened.message_sent);
        mark_sent(&mut item, 1);
        let joined = join(&mut item, &folders(&["b/"]), 30_999).unwrap();
        assert!(joined.message_sent);
        assert_eq!(
            open(&mut item, "b", &folders(&["c/"]), 30_999, 30_000),
            None
        );
        let scope = item.as_ref().unwrap().scope();
        assert_eq!(
            scope,
            RefreshScope::Folders(["a/".into(), "b/".into()].into())
        );
    }

    #[test]
    fn window_ends_by_time_or_by_close() {
        let mut item = None;
        open(&mut item, "b", &folders(&[""]), 0, 10);
        assert!(
            join(&mut item, &folders(&[""]), 10).is_none(),
            "ends_at is exclusive"
        );
        let second = open(&mut item, "b", &folders(&["x/"]), 10, 10).unwrap();
        assert_eq!(second.generation, 2);
        // A new window forgets the previous window's folders.
        assert_eq!(
            item.as_ref().unwrap().scope(),
            RefreshScope::Folders(["x/".into()].into())
        );
        assert_eq!(
            close(&mut item, 2),
            CloseOutcome::Refresh(RefreshScope::Folders(["x/".into()].into()))
        );
        assert!(
            join(&mut item, &folders(&[""]), 11).is_none(),
            "closed windows take no joins"
        );
        assert_eq!(
            open(&mut item, "b", &folders(&[""]), 11, 10)
                .unwrap()
                .generation,
            3
        );
    }

    #[test]
    fn close_outcomes() {
        let mut item = None;
        assert_eq!(close(&mut item, 1), CloseOutcome::Superseded);
        open(&mut item, "b", &folders(&["a/"]), 0, 10);
        assert!(matches!(close(&mut item, 1), CloseOutcome::Refresh(_)));
        // Redelivery before the refresh finished: refresh again.
        assert!(matches!(close(&mut item, 1), CloseOutcome::Refresh(_)));
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(close(&mut item, 1), CloseOutcome::AlreadyRefreshed);
        open(&mut item, "b", &folders(&["z/"]), 20, 10);
        assert_eq!(close(&mut item, 1), CloseOutcome::Superseded);
    }

    #[test]
    fn whole_bucket_sticks_for_the_window() {
        let mut item = None;
        let mut c = folders(&["a/"]);
        c.whole_bucket = true;
        open(&mut item, "b", &c, 0, 10);
        join(&mut item, &folders(&["b/"]), 1);
        assert_eq!(item.as_ref().unwrap().scope(), RefreshScope::WholeBucket);
    }

    #[test]
    fn markers_never_move_backwards() {
        let mut item = None;
        open(&mut item, "b", &folders(&[""]), 0, 10);
        open(&mut item, "b", &folders(&[""]), 10, 10);
        mark_sent(&mut item, 2);
        mark_sent(&mut item, 1);
        assert_eq!(item.as_ref().unwrap().sent_generation, 2);
        record_refresh(&mut item, "b", &log(2));
        record_refresh(&mut item, "b", &log(1));
        assert_eq!(item.as_ref().unwrap().refreshed_generation, 2);
        assert_eq!(item.as_ref().unwrap().last_refresh, Some(log(2)));
        // A message without a window still leaves its log.
        let mut fresh = None;
        record_refresh(&mut fresh, "b", &RefreshLog::default());
        assert_eq!(fresh.unwrap().last_refresh, Some(RefreshLog::default()));
    }
}
