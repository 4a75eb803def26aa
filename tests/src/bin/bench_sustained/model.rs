//! The sustained section's arithmetic, with no I/O: what each folder of a bucket held
//! at any time ([`Census`]), the gateway's rules and the stand-in's duration formula
//! ([`GatewayModel`]), the two designs that are not our binaries any more, replayed
//! deterministically over the measured write times ([`replay_2018`],
//! [`replay_per_window`]), and the measures that all three designs share: staleness
//! ([`staleness`]), the physical limit ([`physical_limit`]) and calls sooner than the
//! interval.
//!
//! Times are microseconds since the epoch. Folders are key prefixes: "" for a bucket's
//! (or a share's) root, otherwise `a/b/`. `FolderList` paths are `/` or `/a/b`.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// Microseconds since the epoch.
pub type Micros = i64;

/// `FolderList` takes at most 50 folders.
pub const MAX_FOLDER_LIST: usize = 50;
/// The previous aggregator's window held at most 200 folders; more made the window the
/// whole bucket (one recursive refresh of each share's root).
pub const MAX_WINDOW_FOLDERS: usize = 200;
/// The gateway's limit of refreshes in flight per share.
pub const MAX_IN_FLIGHT: usize = 2;

/// A share of the run: the bucket it maps (an index) and its prefix there.
#[derive(Clone, Debug)]
pub struct ShareSpec {
    pub bucket: usize,
    /// "" or `top00/`.
    pub prefix: String,
    pub arn: String,
}

impl ShareSpec {
    /// `folder` (of the bucket) relative to this share, if the share shows it.
    pub fn relative<'a>(&self, folder: &'a str) -> Option<&'a str> {
        folder.strip_prefix(self.prefix.as_str())
    }
}

/// One new object, written at `at` (just after it was put).
#[derive(Clone, Debug)]
pub struct Write {
    pub bucket: usize,
    pub key: String,
    pub at: Micros,
}

/// A refresh that a share accepted, and when it completed.
#[derive(Clone, Debug)]
pub struct Refresh {
    pub share: usize,
    pub start: Micros,
    /// `Micros::MAX`: never completed.
    pub end: Micros,
    /// `FolderList`, relative to the share root.
    pub folders: Vec<String>,
    pub recursive: bool,
    /// Listing work: objects and common prefixes listed.
    pub objects: u64,
    pub prefixes: u64,
}

/// The folder (key prefix) that `key` is in.
pub fn folder_of(key: &str) -> &str {
    key.rfind('/').map_or("", |i| &key[..=i])
}

/// The parent of a folder; `None` for the root.
pub fn parent_of(folder: &str) -> Option<&str> {
    if folder.is_empty() {
        return None;
    }
    let trimmed = &folder[..folder.len() - 1];
    Some(trimmed.rfind('/').map_or("", |i| &folder[..=i]))
}

/// `folder` and its ancestors up to the root, deepest first.
pub fn chain(folder: &str) -> Vec<&str> {
    let mut out = vec![folder];
    let mut at = folder;
    while let Some(parent) = parent_of(at) {
        out.push(parent);
        at = parent;
    }
    out
}

/// "" → "/"; "a/b/" → "/a/b".
pub fn path_of(folder: &str) -> String {
    format!("/{}", folder.trim_end_matches('/'))
}

/// "/" → ""; "/a/b" → "a/b/".
pub fn folder_of_path(path: &str) -> String {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// What a folder held before the run.
#[derive(Debug, Default)]
struct FolderInit {
    /// Objects directly in it.
    objects: u64,
    /// Names of its direct subfolders.
    subfolders: usize,
    /// Objects anywhere below it.
    subtree_objects: u64,
}

/// One bucket's folders over time: the initial keys plus the run's writes, so that a
/// listing at any instant can be sized without the bucket itself. Writes must be
/// recorded in time order, then [`Census::finish`].
#[derive(Debug, Default)]
pub struct Census {
    init: HashMap<String, FolderInit>,
    /// Times of the new objects directly in a folder.
    direct: HashMap<String, Vec<Micros>>,
    /// Times of the new objects anywhere below a folder.
    subtree: HashMap<String, Vec<Micros>>,
    /// Times at which a folder got a new direct subfolder.
    new_subfolders: HashMap<String, Vec<Micros>>,
    /// Folders that did not exist before the run: their first write.
    appeared: HashMap<String, Micros>,
}

impl Census {
    pub fn new<'a>(keys: impl Iterator<Item = &'a str>) -> Census {
        let mut census = Census::default();
        for key in keys {
            let folders = chain(folder_of(key));
            census
                .init
                .entry(folders[0].to_string())
                .or_default()
                .objects += 1;
            for folder in &folders {
                census
                    .init
                    .entry((*folder).to_string())
                    .or_default()
                    .subtree_objects += 1;
            }
        }
        // Subfolders: every known folder is a subfolder of its parent.
        let folders: Vec<String> = census.init.keys().cloned().collect();
        for folder in folders {
            if let Some(parent) = parent_of(&folder) {
                census
                    .init
                    .entry(parent.to_string())
                    .or_default()
                    .subfolders += 1;
            }
        }
        census
    }

    /// A new object `key`, written at `at` (in time order).
    pub fn record(&mut self, key: &str, at: Micros) {
        let folders = chain(folder_of(key));
        self.direct
            .entry(folders[0].to_string())
            .or_default()
            .push(at);
        for folder in &folders {
            self.subtree
                .entry((*folder).to_string())
                .or_default()
                .push(at);
        }
        for pair in folders.windows(2) {
            let (child, parent) = (pair[0], pair[1]);
            if !self.init.contains_key(child) && !self.appeared.contains_key(child) {
                self.appeared.insert(child.to_string(), at);
                self.new_subfolders
                    .entry(parent.to_string())
                    .or_default()
                    .push(at);
            }
        }
    }

    /// Sorts the recorded times (in case two writes shared a timestamp out of order).
    pub fn finish(&mut self) {
        for times in self
            .direct
            .values_mut()
            .chain(self.subtree.values_mut())
            .chain(self.new_subfolders.values_mut())
        {
            times.sort_unstable();
        }
    }

    fn count_until(times: Option<&Vec<Micros>>, at: Micros) -> u64 {
        times.map_or(0, |t| t.partition_point(|x| *x <= at) as u64)
    }

    /// A non-recursive listing of `folder` at `at`: (objects, common prefixes).
    pub fn listing(&self, folder: &str, at: Micros) -> (u64, u64) {
        let init = self.init.get(folder);
        (
            init.map_or(0, |i| i.objects) + Census::count_until(self.direct.get(folder), at),
            init.map_or(0, |i| i.subfolders as u64)
                + Census::count_until(self.new_subfolders.get(folder), at),
        )
    }

    /// The objects a recursive listing of `folder` returns at `at`.
    pub fn subtree_objects(&self, folder: &str, at: Micros) -> u64 {
        self.init.get(folder).map_or(0, |i| i.subtree_objects)
            + Census::count_until(self.subtree.get(folder), at)
    }

    /// Whether the write of an object into `folder` at `at` made the folder appear.
    pub fn is_new_at(&self, folder: &str, at: Micros) -> bool {
        !self.init.contains_key(folder) && self.appeared.get(folder).is_none_or(|t| *t >= at)
    }
}

/// The stand-in's duration formula: a refresh stays in flight `base + per_object ×
/// objects listed`.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub base: Micros,
    pub per_object: Micros,
}

/// The gateway as the stand-in behaves: at most two refreshes in flight per share (a
/// third call is throttled), a refresh lists the bucket when it is accepted and
/// completes `base + per_object × objects` later. The interval is not enforced (the
/// real service does not), only counted.
pub struct GatewayModel<'a> {
    shares: &'a [ShareSpec],
    census: &'a [Census],
    timing: Timing,
    interval: Micros,
    pub accepted: Vec<Refresh>,
    pub throttled: Vec<usize>,
    /// Calls (accepted or not) sooner than `interval` after the previous accepted call
    /// on the share: what the stand-in's strict limits would reject.
    pub too_soon: Vec<usize>,
    last_accepted: Vec<Option<Micros>>,
}

impl<'a> GatewayModel<'a> {
    pub fn new(
        shares: &'a [ShareSpec],
        census: &'a [Census],
        timing: Timing,
        interval: Micros,
    ) -> Self {
        GatewayModel {
            shares,
            census,
            timing,
            interval,
            accepted: Vec::new(),
            throttled: vec![0; shares.len()],
            too_soon: vec![0; shares.len()],
            last_accepted: vec![None; shares.len()],
        }
    }

    /// `RefreshCache(share, folders, recursive)` at `at`; `false` when throttled.
    pub fn call(&mut self, share: usize, at: Micros, folders: &[String], recursive: bool) -> bool {
        if self.last_accepted[share].is_some_and(|last| at - last < self.interval) {
            self.too_soon[share] += 1;
        }
        let in_flight = self
            .accepted
            .iter()
            .filter(|r| r.share == share && r.start <= at && r.end > at)
            .count();
        if in_flight >= MAX_IN_FLIGHT {
            self.throttled[share] += 1;
            return false;
        }
        let spec = &self.shares[share];
        let census = &self.census[spec.bucket];
        let (mut objects, mut prefixes) = (0, 0);
        for path in folders {
            let folder = format!("{}{}", spec.prefix, folder_of_path(path));
            if recursive {
                objects += census.subtree_objects(&folder, at);
            } else {
                let (o, p) = census.listing(&folder, at);
                objects += o;
                prefixes += p;
            }
        }
        let end = at + self.timing.base + self.timing.per_object * objects as Micros;
        self.accepted.push(Refresh {
            share,
            start: at,
            end,
            folders: folders.to_vec(),
            recursive,
            objects,
            prefixes,
        });
        self.last_accepted[share] = Some(at);
        true
    }
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ModelRun {
    pub refreshes: Vec<Refresh>,
    pub throttled: Vec<usize>,
    pub too_soon: Vec<usize>,
    /// Messages (windows) sent, attempts to process them, attempts that failed and came
    /// back after the visibility timeout, messages dropped because a newer window
    /// carried their folders, and messages still failing when the replay gave up.
    pub messages: usize,
    pub attempts: usize,
    pub retries: usize,
    pub dropped: usize,
    pub given_up: usize,
}

/// How long a replay follows retries after the last write before it gives up.
const REPLAY_HORIZON: Micros = 24 * 3600 * 1_000_000;

/// The 2018 design over `writes`: per bucket, an event opens a window when the last
/// one opened at least `window` earlier (its conditional write on `LastRefresh`), and
/// the window's message (`DelaySeconds` = the window) makes, when it arrives, one
/// recursive refresh of `/` on each share of the bucket, in order. A throttled call
/// fails the invocation (boto3 raises), so the shares after it are not called and the
/// message comes back after the queue's visibility timeout, when every share is called
/// again.
pub fn replay_2018(
    writes: &[Write],
    shares: &[ShareSpec],
    census: &[Census],
    timing: Timing,
    window: Micros,
    visibility: Micros,
    interval: Micros,
) -> ModelRun {
    let mut gateway = GatewayModel::new(shares, census, timing, interval);
    let mut run = ModelRun::default();
    // (delivery time, message number, bucket)
    let mut queue: BinaryHeap<Reverse<(Micros, usize, usize)>> = BinaryHeap::new();
    let buckets = census.len();
    let mut last_write = 0;
    for bucket in 0..buckets {
        let mut last: Option<Micros> = None;
        for w in writes.iter().filter(|w| w.bucket == bucket) {
            last_write = last_write.max(w.at);
            if last.is_none_or(|l| l <= w.at - window) {
                last = Some(w.at);
                queue.push(Reverse((w.at + window, run.messages, bucket)));
                run.messages += 1;
            }
        }
    }
    while let Some(Reverse((at, message, bucket))) = queue.pop() {
        if at > last_write + REPLAY_HORIZON {
            run.given_up += 1 + queue.len();
            break;
        }
        run.attempts += 1;
        let root = ["/".to_string()];
        let ok = (0..shares.len())
            .filter(|s| shares[*s].bucket == bucket)
            .all(|s| gateway.call(s, at, &root, true));
        if !ok {
            run.retries += 1;
            queue.push(Reverse((at + visibility, message, bucket)));
        }
    }
    run.refreshes = gateway.accepted;
    run.throttled = gateway.throttled;
    run.too_soon = gateway.too_soon;
    run
}

/// The previous refresher (one call per closed window, right away) with the window
/// protocol of docs/protocol.md: per bucket, the first write after the previous
/// window's close opens a window, the writes until its close (`window` later, when its
/// message arrives) join it, and the message calls each share of the bucket with the
/// previous plan ([`previous_plan`]: the changed folders and their ancestors,
/// non-recursive, or collapsed into at most two calls), regardless of what is in flight
/// or of the interval. A throttled call fails the message (the shares and calls after it
/// are not made); the next window, opened while this one is not refreshed, carries its
/// folders, and the message itself comes back after the visibility timeout, where it
/// is dropped if a newer window exists, or else made again in full.
pub fn replay_per_window(
    writes: &[Write],
    shares: &[ShareSpec],
    census: &[Census],
    timing: Timing,
    window: Micros,
    visibility: Micros,
    interval: Micros,
) -> ModelRun {
    let mut gateway = GatewayModel::new(shares, census, timing, interval);
    let mut run = ModelRun::default();
    for bucket in 0..census.len() {
        // The windows: (open, close, own folders).
        let mut windows: Vec<(Micros, Micros, BTreeSet<String>)> = Vec::new();
        for w in writes.iter().filter(|w| w.bucket == bucket) {
            let folder = folder_of(&w.key).to_string();
            match windows.last_mut() {
                Some((_, close, folders)) if w.at <= *close => {
                    folders.insert(folder);
                }
                _ => windows.push((w.at, w.at + window, BTreeSet::from([folder]))),
            }
        }
        run.messages += windows.len();
        let mut total: Vec<BTreeSet<String>> = windows.iter().map(|w| w.2.clone()).collect();
        let mut refreshed = vec![false; windows.len()];
        let mut latest_opened: Option<usize> = None;
        // (time, 0 = a message arrives / 1 = a window opens, window)
        let mut events: BinaryHeap<Reverse<(Micros, u8, usize)>> = BinaryHeap::new();
        for (g, (open, close, _)) in windows.iter().enumerate() {
            events.push(Reverse((*open, 1, g)));
            events.push(Reverse((*close, 0, g)));
        }
        let horizon = windows.last().map_or(0, |w| w.1) + REPLAY_HORIZON;
        while let Some(Reverse((at, kind, g))) = events.pop() {
            if at > horizon {
                run.given_up += 1 + events.iter().filter(|e| e.0 .1 == 0).count();
                break;
            }
            if kind == 1 {
                if g > 0 && !refreshed[g - 1] {
                    let carried = total[g - 1].clone();
                    total[g].extend(carried);
                }
                latest_opened = Some(g);
                continue;
            }
            if latest_opened.is_some_and(|latest| latest > g) {
                run.dropped += 1;
                continue;
            }
            run.attempts += 1;
            let whole = total[g].len() > MAX_WINDOW_FOLDERS;
            let mut ok = true;
            'shares: for s in (0..shares.len()).filter(|s| shares[*s].bucket == bucket) {
                let calls = if whole {
                    vec![(vec!["/".to_string()], true)]
                } else {
                    let relative: BTreeSet<String> = total[g]
                        .iter()
                        .filter_map(|f| shares[s].relative(f))
                        .map(str::to_string)
                        .collect();
                    if relative.is_empty() {
                        continue;
                    }
                    previous_plan(&relative)
                };
                for (folders, recursive) in calls {
                    if !gateway.call(s, at, &folders, recursive) {
                        ok = false;
                        break 'shares;
                    }
                }
            }
            if ok {
                refreshed[g] = true;
            } else {
                run.retries += 1;
                events.push(Reverse((at + visibility, 0, g)));
            }
        }
    }
    run.refreshes = gateway.accepted;
    run.throttled = gateway.throttled;
    run.too_soon = gateway.too_soon;
    run
}

/// The previous refresher's plan for one share's changed folders (relative to the
/// share): every changed folder and all its ancestors, non-recursive, when that is at
/// most 50; otherwise the changed folders collapsed into common ancestors, deepest
/// first, until at most 50 remain with at most 50 ancestors above them: those
/// recursively, and the ancestors in a second, non-recursive call. A copy of what
/// `shared::shares::plan_folders` did for each window before the per-share scheduler.
pub fn previous_plan(changed: &BTreeSet<String>) -> Vec<(Vec<String>, bool)> {
    let mut listed: BTreeSet<&str> = BTreeSet::new();
    for folder in changed {
        listed.extend(chain(folder));
    }
    if listed.len() <= MAX_FOLDER_LIST {
        return vec![(listed.into_iter().map(path_of).collect(), false)];
    }
    let outermost = |set: BTreeSet<String>| -> BTreeSet<String> {
        set.iter()
            .filter(|f| chain(f).iter().skip(1).all(|a| !set.contains(*a)))
            .cloned()
            .collect()
    };
    let mut subtrees = outermost(changed.clone());
    loop {
        let above: BTreeSet<String> = subtrees
            .iter()
            .flat_map(|f| chain(f).into_iter().skip(1))
            .filter(|a| !subtrees.contains(*a))
            .map(str::to_string)
            .collect();
        if subtrees.len() <= MAX_FOLDER_LIST && above.len() <= MAX_FOLDER_LIST {
            let recursive = (subtrees.iter().map(|f| path_of(f)).collect(), true);
            if above.is_empty() {
                return vec![recursive];
            }
            return vec![
                (above.iter().map(|f| path_of(f)).collect(), false),
                recursive,
            ];
        }
        let Some(deepest) = subtrees
            .iter()
            .max_by_key(|f| (f.matches('/').count(), (*f).clone()))
            .cloned()
        else {
            return vec![(vec!["/".to_string()], true)];
        };
        subtrees.remove(&deepest);
        subtrees.insert(parent_of(&deepest).unwrap_or("").to_string());
        subtrees = outermost(subtrees);
    }
}

/// Staleness of every (write, share that shows it): from the write to the completion of
/// the first refresh that started after it and lists its folder on that share; for a
/// write that made its folder appear, also each of the folder's ancestors up to the
/// share root (a listing covers a folder when it names it, or, recursive, names it or an
/// ancestor). When the listings come from several refreshes, the last of them to
/// complete counts. Per share; and the pairs that no refresh covered.
pub fn staleness(
    writes: &[Write],
    shares: &[ShareSpec],
    census: &[Census],
    refreshes: &[Refresh],
) -> (Vec<Vec<Micros>>, usize) {
    // (share, path, recursive) → (start, end) by start, with the least end from there on.
    type Key = (usize, String, bool);
    let mut index: HashMap<Key, Vec<(Micros, Micros)>> = HashMap::new();
    for r in refreshes {
        for path in &r.folders {
            index
                .entry((r.share, path.clone(), r.recursive))
                .or_default()
                .push((r.start, r.end));
        }
    }
    let index: HashMap<Key, (Vec<Micros>, Vec<Micros>)> = index
        .into_iter()
        .map(|(key, mut calls)| {
            calls.sort_unstable();
            let starts: Vec<Micros> = calls.iter().map(|c| c.0).collect();
            let mut least = vec![Micros::MAX; calls.len() + 1];
            for i in (0..calls.len()).rev() {
                least[i] = least[i + 1].min(calls[i].1);
            }
            (key, (starts, least))
        })
        .collect();
    let first_end_after = |share: usize, path: String, recursive: bool, at: Micros| {
        index
            .get(&(share, path, recursive))
            .map_or(Micros::MAX, |(starts, least)| {
                least[starts.partition_point(|s| *s <= at)]
            })
    };
    let mut samples = vec![Vec::new(); shares.len()];
    let mut uncovered = 0;
    for w in writes {
        let folder = folder_of(&w.key);
        let new = census[w.bucket].is_new_at(folder, w.at);
        for (s, spec) in shares.iter().enumerate() {
            if spec.bucket != w.bucket {
                continue;
            }
            let Some(relative) = spec.relative(folder) else {
                continue;
            };
            let needed = if new { chain(relative) } else { vec![relative] };
            let mut visible = Micros::MIN;
            for listing in needed {
                let mut best = first_end_after(s, path_of(listing), false, w.at);
                for covering in chain(listing) {
                    best = best.min(first_end_after(s, path_of(covering), true, w.at));
                }
                visible = visible.max(best);
            }
            if visible == Micros::MAX {
                uncovered += 1;
            } else {
                samples[s].push(visible - w.at);
            }
        }
    }
    (samples, uncovered)
}

/// The physical limit of a share's listing work under steady load: the run cut into
/// slots of `slot` (the least time between two calls on a share) from `start`; for each
/// slot, the folders that its writes are in (relative to the share) and their
/// ancestors up to the share root, each listed once, non-recursively, at the slot's
/// end. What calling the share once per allowed interval with exactly the changed
/// folders would list. (objects, prefixes) per share.
pub fn physical_limit(
    writes: &[Write],
    shares: &[ShareSpec],
    census: &[Census],
    start: Micros,
    slot: Micros,
) -> Vec<(u64, u64)> {
    shares
        .iter()
        .map(|spec| {
            let mut slots: std::collections::BTreeMap<i64, BTreeSet<String>> = Default::default();
            for w in writes.iter().filter(|w| w.bucket == spec.bucket) {
                let Some(relative) = spec.relative(folder_of(&w.key)) else {
                    continue;
                };
                let k = (w.at - start).max(0) / slot;
                let listed = slots.entry(k).or_default();
                for folder in chain(relative) {
                    listed.insert(folder.to_string());
                }
            }
            let census = &census[spec.bucket];
            let mut total = (0, 0);
            for (k, folders) in slots {
                let at = start + (k + 1) * slot;
                for folder in folders {
                    let (o, p) = census.listing(&format!("{}{folder}", spec.prefix), at);
                    total.0 += o;
                    total.1 += p;
                }
            }
            total
        })
        .collect()
}

/// Nearest-rank percentile `p` (0 to 100) of `samples`.
pub fn percentile(samples: &[Micros], p: f64) -> Option<Micros> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_chains() {
        assert_eq!(folder_of("a/b/c.txt"), "a/b/");
        assert_eq!(folder_of("c.txt"), "");
        assert_eq!(chain("a/b/"), vec!["a/b/", "a/", ""]);
        assert_eq!(path_of(""), "/");
        assert_eq!(path_of("a/b/"), "/a/b");
        assert_eq!(folder_of_path("/"), "");
        assert_eq!(folder_of_path("/a/b"), "a/b/");
    }

    #[test]
    fn census_sizes_listings_over_time() {
        let keys = ["a/x", "a/y", "a/b/z", "c/w"];
        let mut census = Census::new(keys.iter().copied());
        census.record("a/new/k", 10);
        census.record("a/k2", 20);
        census.finish();
        assert_eq!(census.listing("", 0), (0, 2));
        assert_eq!(census.listing("a/", 5), (2, 1));
        assert_eq!(census.listing("a/", 10), (2, 2));
        assert_eq!(census.listing("a/", 20), (3, 2));
        assert_eq!(census.subtree_objects("", 20), 6);
        assert!(census.is_new_at("a/new/", 10));
        assert!(!census.is_new_at("a/new/", 11));
        assert!(!census.is_new_at("a/", 10));
    }

    #[test]
    fn previous_plan_lists_ancestors_or_collapses() {
        let small: BTreeSet<String> = ["a/b/".to_string()].into();
        assert_eq!(
            previous_plan(&small),
            vec![(vec!["/".into(), "/a".into(), "/a/b".into()], false)]
        );
        let many: BTreeSet<String> = (0..60).map(|i| format!("d{i:02}/")).collect();
        assert_eq!(previous_plan(&many), vec![(vec!["/".to_string()], true)]);
    }

    #[test]
    fn the_gateway_takes_two_in_flight() {
        let shares = vec![ShareSpec {
            bucket: 0,
            prefix: String::new(),
            arn: "s".into(),
        }];
        let census = vec![Census::new(["a/x"].iter().copied())];
        let timing = Timing {
            base: 100,
            per_object: 10,
        };
        let mut gw = GatewayModel::new(&shares, &census, timing, 1_000);
        let root = ["/".to_string()];
        assert!(gw.call(0, 0, &root, true));
        assert!(gw.call(0, 50, &root, true));
        assert!(!gw.call(0, 60, &root, true), "a third in flight");
        assert!(gw.call(0, 110, &root, true), "the first completed at 110");
        assert_eq!(gw.throttled, vec![1]);
        assert_eq!(gw.too_soon, vec![3]);
        assert_eq!(gw.accepted[0].end, 110);
    }

    #[test]
    fn staleness_waits_for_a_refresh_that_starts_after_the_write() {
        let shares = vec![ShareSpec {
            bucket: 0,
            prefix: String::new(),
            arn: "s".into(),
        }];
        let mut census = Census::new(["a/x"].iter().copied());
        let writes = vec![
            Write {
                bucket: 0,
                key: "a/y".into(),
                at: 100,
            },
            Write {
                bucket: 0,
                key: "n/z".into(),
                at: 100,
            },
        ];
        for w in &writes {
            census.record(&w.key, w.at);
        }
        census.finish();
        let census = vec![census];
        let refresh = |start, end, folders: &[&str], recursive| Refresh {
            share: 0,
            start,
            end,
            folders: folders.iter().map(|f| f.to_string()).collect(),
            recursive,
            objects: 0,
            prefixes: 0,
        };
        let refreshes = vec![
            refresh(50, 500, &["/a", "/n", "/"], false),
            refresh(150, 300, &["/a", "/n"], false),
            refresh(160, 400, &["/"], false),
        ];
        let (samples, uncovered) = staleness(&writes, &shares, &census, &refreshes);
        assert_eq!(uncovered, 0);
        // a/y: /a at 300. n/z is a new folder: /n at 300 and / at 400.
        assert_eq!(samples[0], vec![200, 300]);
        let (_, uncovered) = staleness(&writes, &shares, &census, &refreshes[..2]);
        assert_eq!(
            uncovered, 1,
            "the new folder's parent was never listed after it"
        );
        let recursive = vec![refresh(101, 900, &["/"], true)];
        let (samples, _) = staleness(&writes, &shares, &census, &recursive);
        assert_eq!(samples[0], vec![800, 800]);
    }

    #[test]
    fn a_throttled_window_is_carried_by_the_next() {
        let shares = vec![ShareSpec {
            bucket: 0,
            prefix: String::new(),
            arn: "s".into(),
        }];
        let mut census = Census::new(["a/x", "b/x"].iter().copied());
        let writes: Vec<Write> = [(0, "a/1"), (20, "a/2"), (40, "a/3"), (60, "b/4")]
            .iter()
            .map(|(at, key)| Write {
                bucket: 0,
                key: key.to_string(),
                at: *at,
            })
            .collect();
        for w in &writes {
            census.record(&w.key, w.at);
        }
        census.finish();
        let census = vec![census];
        // Refreshes take 100: windows of 10 close at 10, 30, 50 and 70.
        let timing = Timing {
            base: 100,
            per_object: 0,
        };
        let run = replay_per_window(&writes, &shares, &census, timing, 10, 1_000, 0);
        assert_eq!(run.messages, 4);
        assert_eq!(run.throttled, vec![2], "the third and fourth windows");
        assert_eq!(
            run.dropped, 1,
            "the third window's retry: the fourth carried it"
        );
        // The fourth window's retry (no newer window) lists a/ and b/.
        let last = run.refreshes.last().unwrap();
        assert_eq!(last.start, 1_070);
        assert_eq!(last.folders, vec!["/", "/a", "/b"]);
        let run = replay_2018(&writes, &shares, &census, timing, 10, 1_000, 0);
        // 2018: windows at 0 (message at 10), 20 (30), 40 (50), 60 (70).
        assert_eq!(run.messages, 4);
        assert_eq!(run.throttled, vec![2]);
        assert_eq!(run.refreshes.len(), 4);
    }
}
