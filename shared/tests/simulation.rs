//! Deterministic simulation of the whole protocol under failures.
//!
//! The real `Aggregator` and `Refresher` from `shared` run against in-memory models
//! of DynamoDB (the window rules of `shared::window`, with throttling and timeouts
//! that hit after the write), SQS (delays, visibility timeout, redelivery, duplicate
//! delivery, a DLQ after `maxReceiveCount`), Storage Gateway (two refreshes in flight
//! per share, asynchronous completion, throttling, 5xx, shares deleted and recreated)
//! and S3 event delivery (duplicates, reordering, late arrival), with Lambda's async
//! retries and an on-failure DLQ. Invocations of several containers interleave at
//! every port call, and a container can crash at any of them. Everything is driven by
//! one seeded RNG and a virtual clock: no sleeps, no threads racing, the same seed
//! replays the same run.
//!
//! The shares of a bucket sit on one to three gateways (ARNs
//! `arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-XXXXXXXX`): some buckets
//! have all their shares on one gateway, others on several; shares map the whole bucket
//! or a prefix. A share that is deleted and recreated gets a new ARN and either stays
//! on its gateway or moves to another one. The events are of every kind that changes a
//! listing: writes and deletes by an application, writes through a share of one of the
//! bucket's gateways (principal `AWS:AROAEXAMPLE:StorageGateway-sgw-…`, the id in
//! varied case), through a gateway whose id the principal does not carry
//! (`AWS:AROAEXAMPLE:StorageGateway`), through a gateway that has no share of the
//! bucket, and S3 Lifecycle expirations (`LifecycleExpiration:Delete` and
//! `:DeleteMarkerCreated`, by `s3.amazonaws.com`, without size or eTag), all with the
//! record shape S3 sends. Some runs have a bucket whose only writer is its only
//! gateway, and some a burst through one gateway into hundreds of folders, which
//! crosses the window's entry limit (`MAX_WINDOW_FOLDERS`): the gateway's folders
//! become "anywhere for that gateway", then the window becomes the whole bucket.
//!
//! The refresher's per-share scheduler (`shared::scheduler`, driven by
//! `shared::dispatcher`) runs against the same models: its share items sit in the
//! modelled table (compare-and-set on `version`, faults before and after each write,
//! crash points at every read and write), its wake-ups go on the action queue with
//! their delay and come back as SQS records, and the gateway holds each refresh in
//! flight for a time that grows with its folders (in some runs 1 to 4 hours), throttles
//! a third call, and sends its refresh-complete event through EventBridge to the action
//! queue, where it is lost, duplicated, minutes late or overtaken as the run's knobs
//! say; some events come from refreshes that no refresher of ours started. The
//! refreshers run with a `MIN_REFRESH_INTERVAL_SECONDS` of 0, 1, 5 or 60 and the skew
//! bound as their clock margin.
//!
//! After a storm of faults, the operator redrives the DLQs and the run goes on until
//! nothing is left to do: nothing queued (a share that waits has a wake-up on the
//! queue, chained every 900 s up to a 6-hour lease) and no refresh still listing. Then the checker asserts the invariant of SPEC.md: every
//! object event E is followed by a RefreshCache that covers its key and started after
//! E, on every share that maps the key and existed before E, except a share that no
//! longer exists and the shares on the gateway that wrote E (for a writer the principal
//! does not name: only when all the bucket's shares were on one gateway; see
//! `unnamed_writer_is_known`). It also asserts what gateway writes cost: a bucket whose
//! shares were all on one gateway and whose every change was written through it got no
//! RefreshCache call at all. And it asserts the gateway's limits: no call while two
//! refreshes that the product knew of were in flight on the share (`check_in_flight`),
//! no two accepted calls on a share closer than the interval in true time
//! (`check_pace`), and no share left with pending listings at the end
//! (`check_drained`).
//!
//! - `SIM_SEEDS=n` sets how many seeds `simulation_holds_the_invariant` runs (CI runs
//!   100,000 with the optimised `sim` profile).
//! - `SEED=n` replays one seed and prints its trace (`SIM_FAULT=Name` with one of the
//!   switches below).
//!
//! The faults of the 2018 design are rebuilt in the model as switches; each must make
//! the checker fail, which shows that it can catch them.

use serde_json::{json, Value};
use shared::aggregator::Aggregator;
use shared::clock::Clock;
use shared::error::{GatewayError, QueueError, Retry, StoreError};
use shared::metrics::NullSink;
use shared::ports::{
    DescribedShare, FileGateway, RefreshQueue, Requeue, SharePage, ShareStore, ShareSummary,
    WindowStore,
};
use shared::refresh_message::{RefreshMessage, WakeMessage, ATTR_BUCKET, ATTR_TIMESTAMP};
use shared::refresher::Refresher;
use shared::s3_event::format_event_time;
use shared::scheduler::{ShareState, COMPLETION_CLOCK_MARGIN_MS, MIN_SLOT_LEASE_MS};
use shared::shares::{RefreshPlan, ShareKind};
use shared::window::{self, ChangeSet, CloseOutcome, OpenExpectation, RefreshLog, WindowItem};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

// ---------------------------------------------------------------------------------
// Randomness and switches
// ---------------------------------------------------------------------------------

/// SplitMix64: small, fast, and the same sequence on every machine.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Faults of the 2018 design, rebuilt in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault2018 {
    /// The window is armed before its message is sent: when the send fails, the
    /// window stays open without a message, and later events join it and skip.
    NoUnsentRepair,
    /// RefreshCache errors are logged and the message is deleted anyway.
    DeleteOnRefreshError,
    /// Windows are judged by time alone: the refresher never closes them, so an
    /// aggregator whose clock runs behind joins a window whose refresh already began.
    TimeOnlyWindow,
    /// Not a 2018 fault but ours without its guard: the warm-container skip trusts a
    /// recorded window up to its very end, with no margin for clocks that differ.
    CoalesceWithoutClockMargin,
    /// Every record whose principal contains `StorageGateway` is skipped, as 2018 did:
    /// a write through one gateway never reaches the other gateways' shares. Rebuilt in
    /// the event delivery, since the product no longer has it.
    SkipGatewayWrites,
    /// Not a 2018 fault but ours without its guard: the scheduler trusts a refresh in
    /// flight to cover a later change of a folder it lists
    /// (`Refresher::trusting_in_flight_refreshes`), though that refresh started before
    /// the change. Its runs have gateways that take hours, so folders change again
    /// while their refreshes are still listing.
    TrustInFlight,
    /// Not a 2018 fault but ours without its guard: the refreshers pace their calls with
    /// no clock margin, so a container whose clock runs ahead calls a share less than
    /// `MIN_REFRESH_INTERVAL_SECONDS` after another container's call.
    PaceWithoutClockMargin,
}

const ALL_FAULTS: [Fault2018; 7] = [
    Fault2018::NoUnsentRepair,
    Fault2018::DeleteOnRefreshError,
    Fault2018::TimeOnlyWindow,
    Fault2018::CoalesceWithoutClockMargin,
    Fault2018::SkipGatewayWrites,
    Fault2018::TrustInFlight,
    Fault2018::PaceWithoutClockMargin,
];

// ---------------------------------------------------------------------------------
// The world: every service's state, one lock
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Service {
    Dynamo,
    Sqs,
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Fails before it takes effect (throttling, 5xx).
    Before,
    /// Takes effect, then the caller sees an error (a timeout on the response).
    After,
}

#[derive(Debug, Clone)]
struct QueuedMessage {
    id: String,
    body: String,
    /// The `bucket-name` attribute; `None` for an EventBridge event, which carries no
    /// message attributes.
    bucket: Option<String>,
    timestamp_ms: i64,
    visible_at: i64,
    receive_count: u32,
}

#[derive(Debug, Clone)]
struct SimShare {
    arn: String,
    kind: ShareKind,
    /// The gateway's id as its ARN spells it (`sgw-1A2B3C4D`).
    gateway: String,
    bucket: String,
    prefix: String,
    created_at: i64,
    deleted_at: Option<i64>,
}

#[derive(Debug, Clone)]
struct AcceptedRefresh {
    share_arn: String,
    /// When the refresh started (the call reached the gateway), in true time.
    at: i64,
    folders: Vec<String>,
    recursive: bool,
    notification_id: String,
    /// When the gateway finishes listing: until then the refresh holds one of the
    /// share's two slots.
    completes_at: i64,
    /// The true time at which the product decided the call: its claim's `claimed_at`,
    /// less the claiming container's clock error.
    decided_at: i64,
    /// The caller saw the call succeed. `false`: the call started, but its response was
    /// lost (a timeout), so the product believes that it did not start.
    answered: bool,
}

/// A `RefreshCache` call that found two refreshes in flight on its share, and the
/// refreshes (indices into `World::refreshes`) that held the slots.
#[derive(Debug, Clone)]
struct ThrottledAttempt {
    share_arn: String,
    at: i64,
    in_flight: Vec<usize>,
}

/// What happens to the gateway's refresh-complete events on their way through
/// EventBridge to the action queue, per run.
#[derive(Debug, Clone, Copy, Default)]
struct CompletionFaults {
    lost: f64,
    duplicated: f64,
    /// The chance of an extra delay of minutes.
    delayed: f64,
    /// Up to this much jitter per event, so that events overtake each other.
    reorder_ms: i64,
}

/// Who changed an object, as the checker knows it (the product reads only the record).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// An application, straight to S3: a write or a delete.
    Direct,
    /// An S3 Lifecycle rule expired the object.
    Lifecycle,
    /// A file share of this gateway (its id as the ARN spells it); the principal
    /// names it, in whatever case.
    Gateway(String),
    /// A file share of one of the bucket's gateways; the principal names none.
    UnnamedGateway,
}

#[derive(Debug, Clone)]
struct SimEvent {
    bucket: String,
    key: String,
    written_at: i64,
    origin: Origin,
    /// The record as S3 sends it.
    record: Value,
}

/// What the runs went through, for the summary line.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    events: u64,
    direct: u64,
    lifecycle: u64,
    named_gateway: u64,
    /// Named, through a gateway that has no share of the bucket.
    foreign_gateway: u64,
    unnamed_gateway: u64,
    /// Windows that kept only "anywhere" for some gateway's writes.
    windows_gateway_anywhere: u64,
    /// Windows that became the whole bucket.
    windows_whole_bucket: u64,
    /// Buckets held to the cost promise (only writes through their only gateway).
    single_writer_buckets: u64,
    shares_moved: u64,
    /// Accepted `RefreshCache` calls.
    refreshes: u64,
    /// Wake-ups sent, and refresh-complete events queued, lost, duplicated, and sent
    /// for refreshes that no refresher of ours started.
    wakes: u64,
    completions: u64,
    completions_lost: u64,
    completions_duplicated: u64,
    stray_completions: u64,
    /// Calls that found two refreshes in flight (each excused, or the run fails), and
    /// the most of them in one run, with its seed.
    throttled_in_flight: u64,
    most_throttled: (u64, u64),
    /// Runs whose gateway takes hours per refresh.
    slow_runs: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.direct += o.direct;
        self.lifecycle += o.lifecycle;
        self.named_gateway += o.named_gateway;
        self.foreign_gateway += o.foreign_gateway;
        self.unnamed_gateway += o.unnamed_gateway;
        self.windows_gateway_anywhere += o.windows_gateway_anywhere;
        self.windows_whole_bucket += o.windows_whole_bucket;
        self.single_writer_buckets += o.single_writer_buckets;
        self.shares_moved += o.shares_moved;
        self.refreshes += o.refreshes;
        self.wakes += o.wakes;
        self.completions += o.completions;
        self.completions_lost += o.completions_lost;
        self.completions_duplicated += o.completions_duplicated;
        self.stray_completions += o.stray_completions;
        self.throttled_in_flight += o.throttled_in_flight;
        self.most_throttled = self.most_throttled.max(o.most_throttled);
        self.slow_runs += o.slow_runs;
    }
}

struct World {
    now: i64,
    rng: Rng,
    faults_on: bool,
    p_fault: [f64; 3],
    items: HashMap<String, Option<WindowItem>>,
    queue: Vec<QueuedMessage>,
    dlq: Vec<QueuedMessage>,
    next_message: u64,
    shares: Vec<SimShare>,
    next_share: u64,
    list_page_size: usize,
    /// The share items of the scheduler (the same table as the windows).
    share_items: HashMap<String, ShareState>,
    /// Every refresh the gateway started, in call order.
    refreshes: Vec<AcceptedRefresh>,
    /// Calls that found two refreshes in flight on their share.
    throttled: Vec<ThrottledAttempt>,
    /// Refreshes take 1 to 4 hours (else seconds to minutes, growing with the folders).
    slow_gateway: bool,
    completion_faults: CompletionFaults,
    /// The refreshers' `MIN_REFRESH_INTERVAL_SECONDS`, in ms.
    min_interval_ms: i64,
    /// The most two containers' clocks differ by (twice the skew bound).
    clock_spread_ms: i64,
    /// What the model saw the product do against a service's contract.
    violations: Vec<String>,
    wakes: u64,
    completions: u64,
    completions_lost: u64,
    completions_duplicated: u64,
    /// Every `RefreshCache` call, accepted or not, per share.
    refresh_calls: HashMap<String, u32>,
    /// Every completion event put on the action queue: (share, its folders sorted,
    /// notification id, started, visible at).
    emitted_completions: Vec<(String, Vec<String>, String, i64, i64)>,
    /// Buckets whose window ever held "anywhere" for a gateway, or the whole bucket.
    gateway_anywhere: std::collections::BTreeSet<String>,
    whole_bucket: std::collections::BTreeSet<String>,
    /// Buckets whose item was missing when the refresher closed a window of theirs.
    item_missing: std::collections::BTreeSet<String>,
    fault_2018: Option<Fault2018>,
    trace: Option<Vec<String>>,
}

impl World {
    fn roll(&mut self, service: Service) -> Fault {
        if !self.faults_on {
            return Fault::None;
        }
        let p = self.p_fault[service as usize];
        if self.rng.chance(p) {
            if self.rng.chance(0.5) {
                Fault::Before
            } else {
                Fault::After
            }
        } else {
            Fault::None
        }
    }

    /// Every call takes a little virtual time.
    fn tick(&mut self) {
        self.now += self.rng.range(1, 25);
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            let now = self.now;
            trace.push(format!("{now:>9} {}", line()));
        }
    }

    fn live_shares(&self) -> impl Iterator<Item = &SimShare> {
        self.shares.iter().filter(|s| s.deleted_at.is_none())
    }

    /// The refreshes still listing on `share_arn` (indices into `refreshes`).
    fn in_flight(&self, share_arn: &str) -> Vec<usize> {
        let now = self.now;
        self.refreshes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.share_arn == share_arn && r.completes_at > now)
            .map(|(i, _)| i)
            .collect()
    }

    fn next_message_id(&mut self) -> String {
        self.next_message += 1;
        format!("m{}", self.next_message)
    }

    /// The gateway's refresh-complete event for refresh `index`, as EventBridge puts it
    /// on the action queue: lost, duplicated, late or overtaken as this run's knobs say.
    fn emit_completion(&mut self, index: usize) {
        let r = self.refreshes[index].clone();
        let k = self.completion_faults;
        if self.rng.chance(k.lost) {
            self.completions_lost += 1;
            self.log(|| format!("eventbridge: completion of {} lost", r.notification_id));
            return;
        }
        let copies = if self.rng.chance(k.duplicated) {
            self.completions_duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut latency = self.rng.range(100, 2_000) + self.rng.range(0, k.reorder_ms);
            if self.rng.chance(k.delayed) {
                latency += self.rng.range(60_000, 900_000);
            }
            let body = completion_event(
                &r.share_arn,
                &r.notification_id,
                r.at,
                r.completes_at,
                &r.folders,
                &mut self.rng,
            );
            self.note_completion(
                &r.share_arn,
                &r.folders,
                &r.notification_id,
                r.at,
                r.completes_at + latency,
            );
            self.push_event(body, r.completes_at + latency);
            self.completions += 1;
        }
    }

    /// Keeps what the checker needs of a completion event that goes on the queue.
    fn note_completion(
        &mut self,
        share: &str,
        folders: &[String],
        id: &str,
        started: i64,
        visible_at: i64,
    ) {
        let mut sorted = folders.to_vec();
        sorted.sort();
        self.emitted_completions.push((
            share.to_string(),
            sorted,
            id.to_string(),
            started,
            visible_at,
        ));
    }

    /// An EventBridge event on the action queue, visible at `visible_at`.
    fn push_event(&mut self, body: String, visible_at: i64) {
        let id = self.next_message_id();
        self.log(|| format!("eventbridge: {id} visible at {visible_at}: {body}"));
        self.queue.push(QueuedMessage {
            id,
            body,
            bucket: None,
            timestamp_ms: 0,
            visible_at,
            receive_count: 0,
        });
    }
}

/// A "Storage Gateway Refresh Cache Event" as EventBridge delivers it. Spelled out
/// here rather than taken from the product's constants, so that the product's decoder
/// is checked against the event's real shape.
fn completion_event(
    share_arn: &str,
    notification_id: &str,
    started: i64,
    completed: i64,
    folders: &[String],
    rng: &mut Rng,
) -> String {
    json!({
        "version": "0",
        "id": new_notification_id(rng),
        "detail-type": "Storage Gateway Refresh Cache Event",
        "source": "aws.storagegateway",
        "account": "123456789012",
        "time": format_event_time(completed).unwrap_or_default(),
        "region": "us-east-1",
        "resources": [share_arn],
        "detail": {
            "event-type": "refresh-complete",
            "notification-id": notification_id,
            "started": format_event_time(started).unwrap_or_default(),
            "completed": format_event_time(completed).unwrap_or_default(),
            "folderList": folders,
        }
    })
    .to_string()
}

/// A notification id as the gateway makes them (and an EventBridge event id).
fn new_notification_id(rng: &mut Rng) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        rng.next() as u32,
        rng.below(1 << 16),
        rng.below(1 << 16),
        rng.below(1 << 16),
        rng.below(1 << 48)
    )
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------
// Ports over the world, per container: each call is a yield point and a crash point
// ---------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct InvocationState {
    calls: u32,
    crash_at: Option<u32>,
    crashed: bool,
}

#[derive(Clone)]
struct Port {
    world: Arc<Mutex<World>>,
    invocation: Arc<Mutex<InvocationState>>,
    /// This container's clock error, in ms.
    skew_ms: i64,
    /// Per share, the true time of this container's latest claim that the table took
    /// (its `claimed_at` less the clock error): the decision behind its next call.
    claims: Arc<Mutex<HashMap<String, i64>>>,
}

/// Pending once, so the scheduler can run another container in between.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

impl Port {
    /// The start of every AWS call: yield, then die here if this is the crash point.
    async fn call(&self) {
        YieldOnce(false).await;
        let crash = {
            let mut inv = self.invocation.lock().unwrap_or_else(|p| p.into_inner());
            inv.calls += 1;
            if inv.crash_at == Some(inv.calls) {
                inv.crashed = true;
            }
            inv.crashed
        };
        if crash {
            std::future::pending::<()>().await;
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }
}

fn store_fault() -> StoreError {
    StoreError {
        retry: Retry::Later,
        message: "simulated throttling or timeout".into(),
    }
}

struct SimStore(Port);

impl SimStore {
    async fn apply<R>(
        &self,
        what: &str,
        bucket: &str,
        f: impl FnOnce(&mut Option<WindowItem>, &mut World) -> R,
    ) -> Result<R, StoreError>
    where
        R: std::fmt::Debug,
    {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let fault = w.roll(Service::Dynamo);
        if fault == Fault::Before {
            w.log(|| format!("dynamo {what} {bucket}: fails"));
            return Err(store_fault());
        }
        let mut item = w.items.remove(bucket).flatten();
        let result = f(&mut item, &mut w);
        if let Some(changes) = item.as_ref().map(|i| &i.changes) {
            if changes.whole_bucket {
                w.whole_bucket.insert(bucket.to_string());
            }
            if changes.gateway_writes.iter().any(|c| c.folder.is_none()) {
                w.gateway_anywhere.insert(bucket.to_string());
            }
        }
        w.items.insert(bucket.to_string(), item);
        w.log(|| {
            format!(
                "dynamo {what} {bucket}: {result:?}{}",
                if fault == Fault::After {
                    " (caller sees a timeout)"
                } else {
                    ""
                }
            )
        });
        if fault == Fault::After {
            return Err(store_fault());
        }
        Ok(result)
    }
}

impl WindowStore for SimStore {
    async fn read(&self, bucket: &str) -> Result<Option<WindowItem>, StoreError> {
        self.apply("read", bucket, |item, _| item.clone()).await
    }

    async fn join(
        &self,
        bucket: &str,
        generation: u64,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        self.apply("join", bucket, |item, _| {
            window::join(item, generation, changes, now_ms).map(|i| i.generation)
        })
        .await
        .map(|joined| joined.and_then(|_| self.peek(bucket)))
    }

    async fn open(
        &self,
        bucket: &str,
        expected: OpenExpectation,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        self.apply("open", bucket, |item, _| {
            window::open(item, bucket, expected, changes, now_ms, window_ms).map(|i| i.generation)
        })
        .await
        .map(|opened| opened.and_then(|_| self.peek(bucket)))
    }

    async fn close(
        &self,
        bucket: &str,
        generation: u64,
        now_ms: i64,
    ) -> Result<CloseOutcome, StoreError> {
        self.apply("close", bucket, |item, w| {
            if item.is_none() {
                w.item_missing.insert(bucket.to_string());
            }
            if w.fault_2018 == Some(Fault2018::TimeOnlyWindow) {
                // Read the window without closing it.
                let mut copy = item.clone();
                return window::close(&mut copy, generation, now_ms);
            }
            window::close(item, generation, now_ms)
        })
        .await
    }

    async fn record_refresh(&self, bucket: &str, log: &RefreshLog) -> Result<(), StoreError> {
        self.apply("record_refresh", bucket, |item, _| {
            window::record_refresh(item, bucket, log)
        })
        .await
    }
}

/// A share item in one trace line.
fn share_line(s: &ShareState) -> String {
    let slots: Vec<String> = s
        .slots
        .iter()
        .map(|slot| {
            format!(
                "{}@{}{}{}:{}",
                slot.claim_id,
                slot.claimed_at_ms,
                slot.notification_id
                    .as_deref()
                    .map(|n| format!("={}", &n[..8.min(n.len())]))
                    .unwrap_or_default(),
                if slot.returned { "(returned)" } else { "" },
                slot.listings
                    .iter()
                    .map(|l| l.encode())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    format!(
        "v{} pending [{}] slots [{}] last_call {:?} wake {:?}",
        s.version,
        s.pending
            .iter()
            .map(|l| l.encode())
            .collect::<Vec<_>>()
            .join(","),
        slots.join(" "),
        s.last_call_at_ms,
        s.wake_at_ms
    )
}

impl ShareStore for SimStore {
    async fn read_share(&self, share_arn: &str) -> Result<Option<ShareState>, StoreError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let fault = w.roll(Service::Dynamo);
        if fault == Fault::Before {
            w.log(|| format!("dynamo read_share {share_arn}: fails"));
            return Err(store_fault());
        }
        let state = w.share_items.get(share_arn).cloned();
        if fault == Fault::After {
            w.log(|| format!("dynamo read_share {share_arn}: times out"));
            return Err(store_fault());
        }
        Ok(state)
    }

    /// Compare-and-set on `version`, as `MemoryWindowStore` and the DynamoDB condition.
    async fn write_share(&self, state: &ShareState) -> Result<bool, StoreError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let fault = w.roll(Service::Dynamo);
        let arn = &state.share_arn;
        if fault == Fault::Before {
            w.log(|| format!("dynamo write_share {arn}: fails"));
            return Err(store_fault());
        }
        let stored = w.share_items.get(arn);
        let written = stored.map_or(0, |s| s.version) == state.version;
        if written {
            let mut claims = self.0.claims.lock().unwrap_or_else(|p| p.into_inner());
            for slot in &state.slots {
                let new_claim =
                    stored.is_none_or(|old| !old.slots.iter().any(|s| s.claim_id == slot.claim_id));
                if new_claim {
                    claims.insert(arn.clone(), slot.claimed_at_ms - self.0.skew_ms);
                }
            }
            drop(claims);
            let mut next = state.clone();
            next.version = state.version + 1;
            w.log(|| format!("dynamo write_share {arn}: {}", share_line(&next)));
            w.share_items.insert(arn.clone(), next);
        } else {
            w.log(|| {
                format!(
                    "dynamo write_share {arn} v{}: version changed",
                    state.version
                )
            });
        }
        if fault == Fault::After {
            w.log(|| format!("dynamo write_share {arn}: (caller sees a timeout)"));
            return Err(store_fault());
        }
        Ok(written)
    }
}

impl SimStore {
    /// The item as the write left it (the write's ReturnValues=ALL_NEW), not a call.
    fn peek(&self, bucket: &str) -> Option<WindowItem> {
        self.0.world().items.get(bucket).cloned().flatten()
    }
}

struct SimQueue(Port, u32);

impl RefreshQueue for SimQueue {
    async fn send(
        &self,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let fault = w.roll(Service::Sqs);
        let err = || QueueError {
            retry: Retry::Later,
            message: "simulated SQS failure".into(),
        };
        if fault == Fault::Before {
            w.log(|| format!("sqs send {}: fails", message.bucket));
            if w.fault_2018 == Some(Fault2018::NoUnsentRepair) {
                // The 2018 order: the window was written before this send.
                let mut item = w.items.remove(&message.bucket).flatten();
                let expected = OpenExpectation::from_item(item.as_ref());
                let window_ms = message.window_ends_at_ms - message.window_opened_at_ms;
                window::open(
                    &mut item,
                    &message.bucket,
                    expected,
                    &ChangeSet::default(),
                    message.window_opened_at_ms,
                    window_ms,
                );
                w.items.insert(message.bucket.clone(), item);
            }
            return Err(err());
        }
        let id = w.next_message_id();
        let visible_at = w.now + i64::from(delay_seconds.min(self.1)) * 1000;
        let queued = QueuedMessage {
            id: id.clone(),
            body: message.body(),
            bucket: Some(message.bucket.clone()),
            timestamp_ms: message.timestamp_ms,
            visible_at,
            receive_count: 0,
        };
        w.queue.push(queued);
        w.log(|| {
            format!(
                "sqs send {} gen {} as {id}, visible at {visible_at}",
                message.bucket, message.generation
            )
        });
        if fault == Fault::After {
            return Err(err());
        }
        Ok(id)
    }
}

/// The action queue's ARN, as the event source mapping names it in every record.
const ACTION_QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:s3-event-aggregator";

impl SimQueue {
    /// The refresher's SQS adapter is not told its queue: it sends back to the queue
    /// that the record came from, so a send without that ARN cannot be made.
    fn check_source(&self, what: &str, source_arn: Option<&str>) -> Result<(), QueueError> {
        if source_arn == Some(ACTION_QUEUE_ARN) {
            return Ok(());
        }
        let message =
            format!("{what} to queue {source_arn:?}, not the record's {ACTION_QUEUE_ARN}");
        self.0.world().violations.push(message.clone());
        Err(QueueError {
            retry: Retry::Never,
            message,
        })
    }
}

impl Requeue for SimQueue {
    async fn requeue(
        &self,
        source_arn: Option<&str>,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        self.check_source("requeue", source_arn)?;
        self.send(message, delay_seconds).await
    }

    /// A wake-up goes on the action queue with its delay, like a message sent back, and
    /// comes back as an SQS record like any other.
    async fn wake(
        &self,
        source_arn: Option<&str>,
        message: &WakeMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        self.check_source("wake-up", source_arn)?;
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let fault = w.roll(Service::Sqs);
        let err = || QueueError {
            retry: Retry::Later,
            message: "simulated SQS failure".into(),
        };
        if fault == Fault::Before {
            w.log(|| format!("sqs wake {}: fails", message.share_arn));
            return Err(err());
        }
        let id = w.next_message_id();
        let visible_at = w.now + i64::from(delay_seconds.min(self.1)) * 1000;
        w.queue.push(QueuedMessage {
            id: id.clone(),
            body: message.body(),
            bucket: Some(message.bucket.clone()),
            timestamp_ms: message.visible_at_ms,
            visible_at,
            receive_count: 0,
        });
        w.wakes += 1;
        w.log(|| {
            format!(
                "sqs wake {} as {id}, visible at {visible_at} (due {})",
                message.share_arn, message.due_at_ms
            )
        });
        if fault == Fault::After {
            return Err(err());
        }
        Ok(id)
    }
}

struct SimGateway(Port);

impl SimGateway {
    fn fault(&self, w: &mut World) -> Option<GatewayError> {
        match w.roll(Service::Gateway) {
            Fault::None => None,
            // A gateway call has no effect worth modelling when it fails.
            _ if w.rng.chance(0.5) => Some(GatewayError::Busy {
                message: "simulated throttle".into(),
            }),
            _ => Some(GatewayError::Other {
                retry: Retry::Later,
                message: "simulated 5xx / unreachable".into(),
            }),
        }
    }
}

impl FileGateway for SimGateway {
    async fn list_file_shares(&self, marker: Option<&str>) -> Result<SharePage, GatewayError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        if let Some(e) = self.fault(&mut w) {
            return Err(e);
        }
        let start: usize = marker.and_then(|m| m.parse().ok()).unwrap_or(0);
        let live: Vec<ShareSummary> = w
            .live_shares()
            .map(|s| ShareSummary {
                arn: s.arn.clone(),
                kind: s.kind,
            })
            .collect();
        let end = (start + w.list_page_size).min(live.len());
        Ok(SharePage {
            shares: live.get(start..end).unwrap_or_default().to_vec(),
            next_marker: (end < live.len()).then(|| end.to_string()),
        })
    }

    async fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> Result<Vec<DescribedShare>, GatewayError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        if let Some(e) = self.fault(&mut w) {
            return Err(e);
        }
        assert!(
            !arns.is_empty() && arns.len() <= 10,
            "describe takes 1 to 10 ARNs, got {}",
            arns.len()
        );
        arns.iter()
            .map(|arn| {
                w.live_shares()
                    .find(|s| &s.arn == arn && s.kind == kind)
                    .map(|s| DescribedShare {
                        arn: s.arn.clone(),
                        kind,
                        gateway_arn: gateway_arn(&s.gateway),
                        location_arn: if s.prefix.is_empty() {
                            format!("arn:aws:s3:::{}", s.bucket)
                        } else {
                            format!("arn:aws:s3:::{}/{}", s.bucket, s.prefix)
                        },
                    })
                    .ok_or_else(|| GatewayError::ShareNotFound {
                        share_arn: arn.clone(),
                        message: "The specified file share was not found.".into(),
                    })
            })
            .collect()
    }

    async fn refresh_cache(&self, plan: &RefreshPlan) -> Result<String, GatewayError> {
        self.0.call().await;
        let mut w = self.0.world();
        w.tick();
        let arn = &plan.share_arn;
        *w.refresh_calls.entry(arn.clone()).or_default() += 1;
        if !w.live_shares().any(|s| &s.arn == arn) {
            w.log(|| format!("gateway refresh {arn}: share not found"));
            return Err(GatewayError::ShareNotFound {
                share_arn: arn.clone(),
                message: "The specified file share was not found.".into(),
            });
        }
        // The gateway's own limit comes first: a third call while two refreshes list
        // is refused whatever else happens to it, and the checker judges the attempt.
        let now = w.now;
        let in_flight = w.in_flight(arn);
        if in_flight.len() >= 2 {
            w.log(|| format!("gateway refresh {arn}: two already in flight {in_flight:?}"));
            w.throttled.push(ThrottledAttempt {
                share_arn: arn.clone(),
                at: now,
                in_flight,
            });
            return Err(GatewayError::Busy {
                message: "The specified gateway is busy: too many refreshes in flight.".into(),
            });
        }
        let fault = w.roll(Service::Gateway);
        if fault == Fault::Before {
            let e = if w.rng.chance(0.5) {
                GatewayError::Busy {
                    message: "simulated throttle".into(),
                }
            } else {
                GatewayError::Other {
                    retry: Retry::Later,
                    message: "simulated 5xx / unreachable".into(),
                }
            };
            w.log(|| format!("gateway refresh {arn}: {e}"));
            return Err(e);
        }
        assert!(
            (1..=50).contains(&plan.folders.len()),
            "FolderList takes 1 to 50 folders"
        );
        // A refresh lists every folder it names (a recursive one, their subtrees, with
        // a HEAD per object): its time grows with the work; some gateways take hours.
        let duration = if w.slow_gateway {
            w.rng.range(3_600_000, 4 * 3_600_000)
        } else {
            let per_folder = w.rng.range(200, 3_000) * if plan.recursive { 8 } else { 1 };
            w.rng.range(500, 5_000) + per_folder * plan.folders.len() as i64
        };
        let decided_at = self
            .0
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(arn)
            .copied()
            .unwrap_or(now);
        let notification_id = new_notification_id(&mut w.rng);
        let answered = fault == Fault::None;
        w.refreshes.push(AcceptedRefresh {
            share_arn: arn.clone(),
            at: now,
            folders: plan.folders.clone(),
            recursive: plan.recursive,
            notification_id: notification_id.clone(),
            completes_at: now + duration,
            decided_at,
            answered,
        });
        w.log(|| {
            format!(
                "gateway refresh {arn} {:?} recursive={} accepted as {notification_id}, until {}{}",
                plan.folders,
                plan.recursive,
                now + duration,
                if answered {
                    ""
                } else {
                    " (caller sees a timeout)"
                }
            )
        });
        let index = w.refreshes.len() - 1;
        w.emit_completion(index);
        if !answered {
            return Err(GatewayError::Other {
                retry: Retry::Later,
                message: "simulated timeout after the refresh started".into(),
            });
        }
        Ok(notification_id)
    }
}

struct SimClock(Port);

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        self.0.world().now + self.0.skew_ms
    }
}

// ---------------------------------------------------------------------------------
// Lambda: containers, invocations, the event source mapping
// ---------------------------------------------------------------------------------

type AggregatorService = Aggregator<SimStore, SimQueue, SimClock>;
type RefresherService = Refresher<SimStore, SimGateway, SimQueue, SimClock>;

enum Outcome {
    Aggregated(bool),
    /// An SQS-delivered batch: the messages to redeliver, or a failed invocation.
    AggregatedBatch(Result<Vec<String>, ()>),
    Refreshed(Result<Vec<String>, ()>),
}

/// S3 → SQS → aggregator: the ingest queue of an SQS-buffered deployment.
#[derive(Default)]
struct IngestQueue {
    messages: Vec<IngestMessage>,
    dlq: Vec<Arc<Value>>,
    next_id: u64,
}

struct IngestMessage {
    id: String,
    notification: Arc<Value>,
    visible_at: i64,
    receive_count: u32,
}

type Task = Pin<Box<dyn Future<Output = Outcome> + Send>>;

enum Work {
    /// One S3 notification, and how many times Lambda already tried it.
    Notification { event: Arc<Value>, attempt: u32 },
    /// Messages received from the action queue.
    Batch { ids: Vec<String> },
    /// Messages received from the ingest queue.
    IngestBatch { ids: Vec<String> },
}

struct Running {
    container: usize,
    is_refresher: bool,
    invocation: Arc<Mutex<InvocationState>>,
    work: Work,
    task: Task,
}

struct Container {
    busy: bool,
    port: Port,
    aggregator: Option<Arc<AggregatorService>>,
    refresher: Option<Arc<RefresherService>>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Agenda {
    Deliver {
        seq: u64,
    },
    /// The event source mapping's poll of the action queue; only the latest scheduled
    /// one (`Sim::poll_seq`) counts.
    Poll {
        seq: u64,
    },
    IngestPoll,
    /// Delete the share and create it again under a new ARN, on `gateway` (its own, or
    /// another one: the share moved).
    RecreateShare {
        index: usize,
        gateway: String,
    },
    StormEnds,
}

struct Sim {
    world: Arc<Mutex<World>>,
    rng: Rng,
    delay_seconds: u32,
    max_aggregators: usize,
    max_refreshers: usize,
    skew_ms: i64,
    crash_probability: f64,
    storm_ends_at: i64,
    storm_over: bool,
    aggregators: Vec<Container>,
    refreshers: Vec<Container>,
    running: Vec<Running>,
    agenda: BinaryHeap<std::cmp::Reverse<(i64, u64, Agenda)>>,
    agenda_seq: u64,
    /// S3 notifications on their way; shared, since they are handed on many times.
    deliveries: HashMap<u64, (Arc<Value>, u32)>,
    aggregator_dlq: Vec<Arc<Value>>,
    events: Vec<SimEvent>,
    visibility_ms: i64,
    max_receive_count: u32,
    redrives: u32,
    /// Some: events reach the aggregator through an SQS ingest queue, in batches.
    ingest: Option<IngestQueue>,
    ingest_poll_scheduled: bool,
    /// The latest scheduled poll of the action queue, and when it is due.
    poll_seq: u64,
    poll_at: Option<i64>,
    /// Names containers, so that claim ids never repeat within a run.
    next_container: u64,
    /// The refreshers' `MIN_REFRESH_INTERVAL_SECONDS`.
    min_interval_seconds: u32,
}

impl Sim {
    fn schedule(&mut self, at: i64, item: Agenda) {
        self.agenda_seq += 1;
        self.agenda
            .push(std::cmp::Reverse((at, self.agenda_seq, item)));
    }

    /// Polls the ingest queue within its batching window (up to a few seconds).
    fn schedule_ingest_poll(&mut self) {
        if self.ingest.is_none() || self.ingest_poll_scheduled {
            return;
        }
        self.ingest_poll_scheduled = true;
        let next = self.now() + 500 + (self.agenda_seq as i64 % 3) * 1_000;
        self.schedule(next, Agenda::IngestPoll);
    }

    fn deliver(&mut self, at: i64, event: Arc<Value>, attempt: u32) {
        self.agenda_seq += 1;
        let seq = self.agenda_seq;
        self.deliveries.insert(seq, (event, attempt));
        self.schedule(at, Agenda::Deliver { seq });
    }

    fn now(&self) -> i64 {
        lock(&self.world).now
    }

    /// Polls the action queue at `at`, instead of any poll scheduled before.
    fn schedule_poll(&mut self, at: i64) {
        self.poll_seq += 1;
        self.poll_at = Some(at);
        let seq = self.poll_seq;
        self.schedule(at, Agenda::Poll { seq });
    }

    /// Makes sure that the action queue is polled by `at`.
    fn poll_by(&mut self, at: i64) {
        if self.poll_at.is_none_or(|t| t > at) {
            self.schedule_poll(at);
        }
    }

    /// When to poll next: every second while anything runs. With nothing running
    /// nothing can reach the queue before the next agenda item, so the poll goes
    /// straight to the first message that becomes visible, the next agenda item, or
    /// the end of a refresh still listing, whichever comes first (a wake-up waits up to
    /// 900 s, a lease 6 hours).
    fn next_poll_at(&self) -> i64 {
        let now = self.now();
        let soon = now + 1_000;
        if !self.running.is_empty() {
            return soon;
        }
        let w = lock(&self.world);
        let next = w
            .queue
            .iter()
            .map(|m| m.visible_at)
            .chain(
                w.refreshes
                    .iter()
                    .map(|r| r.completes_at)
                    .filter(|t| *t > now),
            )
            .chain(
                self.agenda
                    .iter()
                    .filter(|std::cmp::Reverse((_, _, a))| !matches!(a, Agenda::Poll { .. }))
                    .map(|std::cmp::Reverse((t, _, _))| *t),
            )
            .min();
        next.map_or(soon, |t| t.max(soon))
    }

    fn new_port(&mut self) -> Port {
        let skew = self.rng.range(-self.skew_ms, self.skew_ms);
        Port {
            world: self.world.clone(),
            invocation: Arc::new(Mutex::new(InvocationState::default())),
            skew_ms: skew,
            claims: Arc::default(),
        }
    }

    fn new_aggregator(&mut self) -> Container {
        let port = self.new_port();
        // Two containers' clocks differ by at most twice the skew bound.
        let margin = if lock(&self.world).fault_2018 == Some(Fault2018::CoalesceWithoutClockMargin)
        {
            0
        } else {
            2 * self.skew_ms + 1
        };
        let service = Aggregator::new(
            SimStore(port.clone()),
            SimQueue(port.clone(), 900),
            SimClock(port.clone()),
            self.delay_seconds,
        )
        .with_clock_margin_ms(margin)
        .with_metrics_sink(Arc::new(NullSink));
        Container {
            busy: false,
            port,
            aggregator: Some(Arc::new(service)),
            refresher: None,
        }
    }

    fn new_refresher(&mut self) -> Container {
        let port = self.new_port();
        self.next_container += 1;
        // Like the aggregator's margin: two containers' clocks differ by at most twice
        // the skew bound, so calls from two containers stay the interval apart in true
        // time.
        let fault = lock(&self.world).fault_2018;
        let clock_margin_ms = if fault == Some(Fault2018::PaceWithoutClockMargin) {
            0
        } else {
            2 * self.skew_ms + 1
        };
        let service = Refresher::new(
            SimStore(port.clone()),
            SimGateway(port.clone()),
            SimQueue(port.clone(), 900),
            SimClock(port.clone()),
        )
        .with_pace(self.min_interval_seconds, clock_margin_ms)
        .with_claim_prefix(format!("c{}", self.next_container))
        .with_metrics_sink(Arc::new(NullSink));
        let service = if fault == Some(Fault2018::TrustInFlight) {
            service.trusting_in_flight_refreshes()
        } else {
            service
        };
        Container {
            busy: false,
            port,
            aggregator: None,
            refresher: Some(Arc::new(service)),
        }
    }

    /// The call at which the next invocation dies, if it does: any of its first
    /// `calls` port calls (a refresher makes many: share reads and writes, the call,
    /// the wake-up).
    fn crash_point(&mut self, calls: i64) -> Option<u32> {
        (!self.storm_over && self.rng.chance(self.crash_probability))
            .then(|| self.rng.range(1, calls) as u32)
    }

    fn start_aggregator(&mut self, event: Arc<Value>, attempt: u32) -> bool {
        let payload = event.clone();
        self.start_aggregator_with(payload, Work::Notification { event, attempt })
    }

    /// The ingest queue's event source mapping: up to 10 visible messages per batch.
    fn poll_ingest(&mut self) {
        let now = self.now();
        let visibility = self.visibility_ms;
        let max_receive = self.max_receive_count;
        let Some(ingest) = self.ingest.as_mut() else {
            return;
        };
        let mut records = Vec::new();
        let mut ids = Vec::new();
        let mut dead = Vec::new();
        let batch_size = 1 + (now as usize / 1000) % 10;
        for m in ingest.messages.iter_mut().filter(|m| m.visible_at <= now) {
            if records.len() == batch_size {
                break;
            }
            m.receive_count += 1;
            if m.receive_count > max_receive {
                dead.push(m.id.clone());
                continue;
            }
            m.visible_at = now + visibility;
            records.push(json!({"messageId": m.id, "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ingest",
                "body": m.notification.to_string()}));
            ids.push(m.id.clone());
        }
        for id in dead {
            if let Some(pos) = ingest.messages.iter().position(|m| m.id == id) {
                let m = ingest.messages.remove(pos);
                ingest.dlq.push(m.notification);
            }
        }
        if records.is_empty() {
            return;
        }
        // When every container is busy, the messages come back after the visibility
        // timeout, as they would from SQS.
        let _ = self.start_aggregator_with(
            Arc::new(json!({ "Records": records })),
            Work::IngestBatch { ids },
        );
    }

    fn start_aggregator_with(&mut self, payload: Arc<Value>, work: Work) -> bool {
        let index = match self.aggregators.iter().position(|c| !c.busy) {
            Some(i) => i,
            None if self.aggregators.len() < self.max_aggregators => {
                let c = self.new_aggregator();
                self.aggregators.push(c);
                self.aggregators.len() - 1
            }
            None => return false,
        };
        let crash_at = self.crash_point(8);
        let container = &mut self.aggregators[index];
        container.busy = true;
        *container
            .port
            .invocation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = InvocationState {
            crash_at,
            ..Default::default()
        };
        let service = container.aggregator.clone().expect("aggregator container");
        let batched = matches!(work, Work::IngestBatch { .. });
        let task: Task = Box::pin(async move {
            let result = service.handle(payload.as_ref()).await;
            if batched {
                Outcome::AggregatedBatch(result.map(|r| r.batch_item_failures).map_err(|_| ()))
            } else {
                Outcome::Aggregated(result.is_ok())
            }
        });
        self.running.push(Running {
            container: index,
            is_refresher: false,
            invocation: container.port.invocation.clone(),
            work,
            task,
        });
        true
    }

    /// The event source mapping's poll: receive up to 10 visible messages.
    fn poll_queue(&mut self) {
        let now = self.now();
        let index = match self.refreshers.iter().position(|c| !c.busy) {
            Some(i) => i,
            None if self.refreshers.len() < self.max_refreshers => {
                let c = self.new_refresher();
                self.refreshers.push(c);
                self.refreshers.len() - 1
            }
            None => return,
        };
        let mut records = Vec::new();
        let mut ids = Vec::new();
        {
            let mut w = lock(&self.world);
            let max_receive = self.max_receive_count;
            let mut dead = Vec::new();
            for m in w.queue.iter_mut().filter(|m| m.visible_at <= now) {
                if records.len() == 10 {
                    break;
                }
                m.receive_count += 1;
                if m.receive_count > max_receive {
                    dead.push(m.id.clone());
                    continue;
                }
                m.visible_at = now + self.visibility_ms;
                let attributes = match &m.bucket {
                    Some(bucket) => json!({
                        ATTR_BUCKET: {"stringValue": bucket, "dataType": "String"},
                        ATTR_TIMESTAMP: {"stringValue": m.timestamp_ms.to_string(), "dataType": "Number"},
                    }),
                    None => json!({}),
                };
                records.push(json!({
                    "messageId": m.id,
                    "receiptHandle": format!("{}-{}", m.id, m.receive_count),
                    "body": m.body,
                    "attributes": {"ApproximateReceiveCount": m.receive_count.to_string()},
                    "messageAttributes": attributes,
                    "eventSource": "aws:sqs",
                    "eventSourceARN": ACTION_QUEUE_ARN,
                    "awsRegion": "us-east-1",
                }));
                ids.push(m.id.clone());
            }
            for id in dead {
                if let Some(pos) = w.queue.iter().position(|m| m.id == id) {
                    let m = w.queue.remove(pos);
                    w.log(|| format!("sqs {} exceeded maxReceiveCount: to the DLQ", m.id));
                    w.dlq.push(m);
                }
            }
            // At-least-once: now and then a received message is also handed out again.
            if !ids.is_empty() && self.rng.chance(0.03) {
                let dup = self.rng.pick(&ids).clone();
                if let Some(m) = w.queue.iter_mut().find(|m| m.id == dup) {
                    m.visible_at = now;
                }
            }
        }
        if records.is_empty() {
            return;
        }
        let crash_at = self.crash_point(30);
        let container = &mut self.refreshers[index];
        container.busy = true;
        *container
            .port
            .invocation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = InvocationState {
            crash_at,
            ..Default::default()
        };
        let service = container.refresher.clone().expect("refresher container");
        let payload = json!({ "Records": records });
        let task: Task = Box::pin(async move {
            Outcome::Refreshed(match service.handle(&payload).await {
                Ok(response) => Ok(response
                    .batch_item_failures
                    .into_iter()
                    .map(|f| f.item_identifier)
                    .collect()),
                Err(_) => Err(()),
            })
        });
        self.running.push(Running {
            container: index,
            is_refresher: true,
            invocation: container.port.invocation.clone(),
            work: Work::Batch { ids },
            task,
        });
    }

    fn finish(&mut self, run: Running, outcome: Option<Outcome>) {
        let now = self.now();
        // What the invocation sent may be visible soon.
        self.poll_by(now + 1_000);
        let crashed = outcome.is_none();
        if run.is_refresher {
            if crashed {
                // A new container, with a cold share map, takes the next batch.
                self.refreshers[run.container] = self.new_refresher();
            }
            self.refreshers[run.container].busy = false;
        } else {
            if crashed {
                self.aggregators[run.container] = self.new_aggregator();
            }
            self.aggregators[run.container].busy = false;
        }
        match (run.work, outcome) {
            (Work::Notification { .. }, Some(Outcome::Aggregated(true))) => {}
            (Work::Notification { event, attempt }, _) => {
                // Lambda's async invocation: two retries, one and two minutes apart,
                // then the on-failure destination.
                if attempt < 2 {
                    self.deliver(now + 60_000 * i64::from(attempt + 1), event, attempt + 1);
                } else {
                    lock(&self.world).log(|| {
                        "aggregator: retries exhausted, event to the on-failure DLQ".into()
                    });
                    self.aggregator_dlq.push(event);
                }
            }
            (Work::Batch { ids }, Some(Outcome::Refreshed(result))) => {
                let mut w = lock(&self.world);
                let failed = match result {
                    Ok(failed) => failed,
                    Err(()) => ids.clone(),
                };
                let delete_all = w.fault_2018 == Some(Fault2018::DeleteOnRefreshError);
                for id in &ids {
                    if !delete_all && failed.contains(id) {
                        continue;
                    }
                    // DeleteMessage can fail too; the message then comes back.
                    if w.roll(Service::Sqs) != Fault::None {
                        continue;
                    }
                    w.queue.retain(|m| &m.id != id);
                }
            }
            (Work::Batch { .. }, _) => {}
            (Work::IngestBatch { ids }, Some(Outcome::AggregatedBatch(Ok(failed)))) => {
                // Lambda deletes the messages that the response does not name.
                if let Some(ingest) = self.ingest.as_mut() {
                    ingest
                        .messages
                        .retain(|m| !ids.contains(&m.id) || failed.contains(&m.id));
                }
            }
            // A failed or crashed invocation: every message comes back.
            (Work::IngestBatch { .. }, _) => {}
        }
    }

    /// Nothing left to do: nothing running or queued (a share that still waits has a
    /// wake-up on the queue), and no refresh still listing.
    fn quiet(&self) -> bool {
        let w = lock(&self.world);
        let now = w.now;
        self.running.is_empty()
            && w.queue.is_empty()
            && w.refreshes.iter().all(|r| r.completes_at <= now)
            && self.ingest.as_ref().is_none_or(|i| i.messages.is_empty())
            && !self.agenda.iter().any(|std::cmp::Reverse((_, _, a))| {
                !matches!(a, Agenda::Poll { .. } | Agenda::IngestPoll)
            })
    }

    fn run(&mut self) -> Result<(), String> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut steps: u64 = 0;
        loop {
            steps += 1;
            if steps > 5_000_000 {
                return Err("simulation did not settle".into());
            }
            let now = self.now();
            let next_due = self.agenda.peek().map(|std::cmp::Reverse((t, _, _))| *t);
            let poll_a_task = !self.running.is_empty()
                && (next_due.is_none_or(|t| t > now) || self.rng.chance(0.7));
            if poll_a_task {
                let i = self.rng.below(self.running.len() as u64) as usize;
                let polled = self.running[i].task.as_mut().poll(&mut cx);
                match polled {
                    Poll::Ready(outcome) => {
                        let run = self.running.swap_remove(i);
                        // A crash after the last call loses the result: Lambda retries.
                        let crashed_at_end = run
                            .invocation
                            .lock()
                            .map(|s| s.crash_at.is_some_and(|c| c > s.calls))
                            .unwrap_or(false)
                            && self.rng.chance(0.3)
                            && !self.storm_over;
                        self.finish(run, if crashed_at_end { None } else { Some(outcome) });
                    }
                    Poll::Pending => {
                        let crashed = self.running[i]
                            .invocation
                            .lock()
                            .map(|s| s.crashed)
                            .unwrap_or(false);
                        if crashed {
                            let run = self.running.swap_remove(i);
                            lock(&self.world).log(|| {
                                format!(
                                    "container crashed ({})",
                                    if run.is_refresher {
                                        "refresher"
                                    } else {
                                        "aggregator"
                                    }
                                )
                            });
                            self.finish(run, None);
                        }
                    }
                }
                continue;
            }
            let Some(std::cmp::Reverse((at, _, item))) = self.agenda.pop() else {
                if self.running.is_empty() {
                    break;
                }
                continue;
            };
            {
                let mut w = lock(&self.world);
                w.now = w.now.max(at);
            }
            match item {
                Agenda::Deliver { seq } => {
                    let Some((event, attempt)) = self.deliveries.remove(&seq) else {
                        continue;
                    };
                    let mut w = lock(&self.world);
                    if w.fault_2018 == Some(Fault2018::SkipGatewayWrites)
                        && event["Records"].as_array().is_some_and(|records| {
                            records.iter().any(|r| {
                                r["userIdentity"]["principalId"]
                                    .as_str()
                                    .is_some_and(|p| p.contains("StorageGateway"))
                            })
                        })
                    {
                        // 2018: "Skipping gateway write"; the event never counts.
                        w.log(|| "2018: gateway write skipped".into());
                        continue;
                    }
                    drop(w);
                    if let Some(ingest) = self.ingest.as_mut() {
                        // S3 sends the notification to the ingest queue.
                        ingest.next_id += 1;
                        let id = format!("in{}", ingest.next_id);
                        ingest.messages.push(IngestMessage {
                            id,
                            notification: event,
                            visible_at: at,
                            receive_count: 0,
                        });
                        self.schedule_ingest_poll();
                        continue;
                    }
                    {
                        if !self.start_aggregator(event.clone(), attempt) {
                            // Every container is busy: Lambda queues the event.
                            self.deliver(at + 50, event, attempt);
                        }
                    }
                }
                Agenda::IngestPoll => {
                    self.ingest_poll_scheduled = false;
                    self.poll_ingest();
                    // Only a delivery (or the redrive) brings messages to an empty
                    // ingest queue, and it schedules the next poll.
                    if self.ingest.as_ref().is_some_and(|i| !i.messages.is_empty()) {
                        self.schedule_ingest_poll();
                    }
                }
                Agenda::Poll { seq } => {
                    if seq != self.poll_seq {
                        continue;
                    }
                    self.poll_at = None;
                    self.poll_queue();
                    if !self.quiet()
                        || !self.aggregator_dlq.is_empty()
                        || !lock(&self.world).dlq.is_empty()
                    {
                        let next = self.next_poll_at();
                        self.schedule_poll(next);
                    }
                }
                Agenda::RecreateShare { index, gateway } => {
                    let mut w = lock(&self.world);
                    let now = w.now;
                    if let Some(old) = w.shares.get_mut(index).filter(|s| s.deleted_at.is_none()) {
                        old.deleted_at = Some(now);
                        let mut new = old.clone();
                        w.next_share += 1;
                        new.arn = format!("share-{}", w.next_share);
                        new.gateway = gateway;
                        new.created_at = now;
                        new.deleted_at = None;
                        w.log(|| {
                            format!("share {index} recreated as {} on {}", new.arn, new.gateway)
                        });
                        w.shares.push(new);
                    }
                }
                Agenda::StormEnds => {
                    self.storm_over = true;
                    lock(&self.world).faults_on = false;
                }
            }
            // The operator redrives the DLQs once the storm is over and all is quiet.
            if self.storm_over && self.quiet() {
                let mut events = std::mem::take(&mut self.aggregator_dlq);
                if let Some(ingest) = self.ingest.as_mut() {
                    events.extend(std::mem::take(&mut ingest.dlq));
                }
                let messages = std::mem::take(&mut lock(&self.world).dlq);
                if events.is_empty() && messages.is_empty() {
                    if self.running.is_empty()
                        && self.agenda.iter().all(|std::cmp::Reverse((_, _, a))| {
                            matches!(a, Agenda::Poll { .. } | Agenda::IngestPoll)
                        })
                    {
                        break;
                    }
                    continue;
                }
                self.redrives += 1;
                if self.redrives > 20 {
                    return Err("DLQs keep filling after 20 redrives".into());
                }
                let now = self.now();
                for event in events {
                    self.deliver(now, event, 0);
                }
                let mut w = lock(&self.world);
                for mut m in messages {
                    m.receive_count = 0;
                    m.visible_at = now;
                    w.queue.push(m);
                }
                drop(w);
                self.poll_by(now + 1_000);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// A scenario per seed, and the checker
// ---------------------------------------------------------------------------------

/// The ARN of gateway `id` in the simulated account.
fn gateway_arn(id: &str) -> String {
    format!("arn:aws:storagegateway:us-east-1:123456789012:gateway/{id}")
}

/// The principal of a write through a share of gateway `id`, in one of the cases that
/// a principal can carry it in (the product reads it case-insensitively).
fn gateway_principal(id: &str, variant: u64) -> String {
    let digits = &id[4..];
    let spelled = match variant % 4 {
        0 => id.to_string(),
        1 => id.to_ascii_lowercase(),
        2 => format!("SGW-{}", digits.to_ascii_uppercase()),
        _ => format!(
            "sgw-{}",
            digits
                .chars()
                .enumerate()
                .map(|(i, c)| if i % 2 == 0 {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                })
                .collect::<String>()
        ),
    };
    format!("AWS:AROAEXAMPLE:StorageGateway-{spelled}")
}

/// One S3 event record, in the shape S3 sends it: a write or a delete by `origin`, or
/// a Lifecycle expiration (by S3 itself, without size or eTag).
fn s3_record(bucket: &str, key: &str, written_at: i64, origin: &Origin, rng: &mut Rng) -> Value {
    let sequencer = format!(
        "{:016X}",
        written_at.max(0) as u64 * 1_000 + rng.below(1_000)
    );
    let request_id = format!("{:016X}", rng.next());
    let delete = rng.chance(0.25);
    let (event_name, principal, source_ip) = match origin {
        Origin::Lifecycle => (
            if rng.chance(0.5) {
                "LifecycleExpiration:Delete"
            } else {
                "LifecycleExpiration:DeleteMarkerCreated"
            },
            "s3.amazonaws.com".to_string(),
            "s3.amazonaws.com",
        ),
        Origin::Direct => (
            if delete {
                "ObjectRemoved:Delete"
            } else {
                "ObjectCreated:Put"
            },
            "AWS:AIDAEXAMPLE".to_string(),
            "198.51.100.7",
        ),
        Origin::Gateway(id) => (
            if delete {
                "ObjectRemoved:Delete"
            } else {
                "ObjectCreated:Put"
            },
            gateway_principal(id, rng.next()),
            "10.0.0.5",
        ),
        Origin::UnnamedGateway => (
            if delete {
                "ObjectRemoved:Delete"
            } else {
                "ObjectCreated:Put"
            },
            "AWS:AROAEXAMPLE:StorageGateway".to_string(),
            "10.0.0.5",
        ),
    };
    let object = match event_name {
        "ObjectCreated:Put" => json!({"key": key, "size": 1 + rng.below(1 << 20),
            "eTag": format!("{:032x}", u128::from(rng.next())), "sequencer": sequencer}),
        "LifecycleExpiration:DeleteMarkerCreated" => json!({"key": key,
            "versionId": format!("{:032x}", u128::from(rng.next())), "sequencer": sequencer}),
        _ => json!({"key": key, "sequencer": sequencer}),
    };
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": format_event_time(written_at).unwrap_or_default(),
        "eventName": event_name,
        "userIdentity": {"principalId": principal},
        "requestParameters": {"sourceIPAddress": source_ip},
        "responseElements": {"x-amz-request-id": request_id, "x-amz-id-2": "EXAMPLE"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "s3-event-aggregator",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": format!("arn:aws:s3:::{bucket}")},
            "object": object
        }
    })
}

/// Whether an accepted refresh lists `folder` (relative to the share's root, with a
/// trailing slash; "" is the root): it names the folder, or recursively an ancestor.
fn lists(refresh: &AcceptedRefresh, folder: &str) -> bool {
    refresh.folders.iter().any(|path| {
        let named = match path.strip_prefix('/') {
            Some("") => String::new(),
            Some(rest) => format!("{rest}/"),
            None => return false,
        };
        if refresh.recursive {
            folder.starts_with(&named)
        } else {
            folder == named
        }
    })
}

/// The folders whose listings must be refreshed for a change to `relative_key` to
/// show: its folder and every ancestor up to the share root (a new folder shows only
/// in its parent's listing).
fn folder_chain(relative_key: &str) -> Vec<&str> {
    let mut chain = vec![""];
    chain.extend(
        relative_key
            .match_indices('/')
            .map(|(i, _)| &relative_key[..=i]),
    );
    chain
}

/// The gateway that wrote `event` through a share without the principal naming it,
/// as the product may take it: all the bucket's shares on one gateway, which then is
/// taken to be the writer.
///
/// SPEC.md: "when no gateway id can be read, skip only if all the bucket's shares are
/// on one gateway". The product judges that when it refreshes, on a share map loaded
/// after the window's close. So the checker accepts either moment it can name: the
/// shares of the bucket when the event was written (those deleted since included),
/// or the shares at the end of the run (every move done). This is a known limit of
/// the rule, not of the product: if two gateways served the bucket when the event was
/// written and one of them left before the refresh, the write may have come through
/// the one that left, and the other's shares are then not refreshed. Real gateway
/// principals name their gateway (`...:StorageGateway-sgw-12A3456B`), so only a
/// principal that hides it meets this.
fn unnamed_writer_is_known<'w>(world: &'w World, event: &SimEvent) -> Option<&'w str> {
    let one_gateway = |mut gateways: Box<dyn Iterator<Item = &'w str> + 'w>| {
        let first = gateways.next()?;
        gateways
            .all(|g| g.eq_ignore_ascii_case(first))
            .then_some(first)
    };
    let written_at = event.written_at;
    let bucket = event.bucket.clone();
    let at_write = one_gateway(Box::new(
        world
            .shares
            .iter()
            .filter(move |s| {
                s.bucket == bucket
                    && s.created_at < written_at
                    && s.deleted_at.is_none_or(|d| d >= written_at)
            })
            .map(|s| s.gateway.as_str()),
    ));
    let bucket = event.bucket.clone();
    at_write.or_else(|| {
        one_gateway(Box::new(
            world
                .live_shares()
                .filter(move |s| s.bucket == bucket)
                .map(|s| s.gateway.as_str()),
        ))
    })
}

/// The gateway whose shares already show `event`: the one that wrote it, if known.
fn writer_gateway<'a>(world: &'a World, event: &'a SimEvent) -> Option<&'a str> {
    match &event.origin {
        Origin::Gateway(id) => Some(id.as_str()),
        Origin::UnnamedGateway => unnamed_writer_is_known(world, event),
        Origin::Direct | Origin::Lifecycle => None,
    }
}

fn check_invariant(world: &World, events: &[SimEvent]) -> Result<(), String> {
    if let Some(v) = world.violations.first() {
        return Err(format!("the product broke a service's contract: {v}"));
    }
    let live: Vec<&SimShare> = world.live_shares().collect();
    for event in events {
        let writer = writer_gateway(world, event);
        for share in live.iter().filter(|s| {
            s.bucket == event.bucket
                && event.key.starts_with(&s.prefix)
                && s.created_at < event.written_at
                && !writer.is_some_and(|g| g.eq_ignore_ascii_case(&s.gateway))
        }) {
            let relative = &event.key[share.prefix.len()..];
            let covered = folder_chain(relative).iter().all(|folder| {
                world.refreshes.iter().any(|r| {
                    r.share_arn == share.arn && r.at > event.written_at && lists(r, folder)
                })
            });
            if !covered {
                return Err(format!(
                    "object {}/{} ({:?}, {}) written at {} was never refreshed on share {} (prefix {:?}, gateway {})",
                    event.bucket,
                    event.key,
                    event.origin,
                    event.record["eventName"].as_str().unwrap_or_default(),
                    event.written_at,
                    share.arn,
                    share.prefix,
                    share.gateway
                ));
            }
        }
    }
    check_in_flight(world)?;
    check_pace(world)?;
    check_drained(world)?;
    check_cost(world, events)
}

/// At most two refreshes in flight per share, as the gateway sees it.
///
/// The gateway model refuses a third call itself (`GatewayError::Busy`), so what the
/// checker judges is the attempt: a call that finds two refreshes still listing on
/// its share is a violation, since the share's item must have shown both slots taken,
/// unless the product had no way to know of one of the two:
/// - that refresh's call started but its caller saw an error (a timeout on the
///   response), so the product put the slot back as for a call that did not start;
/// - that refresh's slot may have reached its lease (at least `MIN_SLOT_LEASE_MS` after its claim,
///   on the clock of any container, so less the clock spread): the product frees a
///   slot whose completion event never came, and a refresh may outlast it.
///
/// A claim's timeout (`CLAIM_TIMEOUT_MS`) gives the claim's listings back but keeps its
/// slot until the lease, so it excuses nothing. Neither do lost, late, duplicated or
/// reordered completion events: a slot is freed only by the event of its own
/// notification id. A throttle that the gateway sends for other reasons (the fault
/// knob) is not an attempt on two in flight and is not judged.
fn check_in_flight(world: &World) -> Result<(), String> {
    check_in_flight_attempts(world)
}

/// Whether another refresh's completion event, of the same share and folders and
/// started after `r` was decided, reached the queue before `at`: the product frees a
/// claim whose notification id it never recorded by such an event, and cannot tell
/// it from the claim's own.
fn freed_by_a_lookalike(world: &World, r: &AcceptedRefresh, at: i64) -> bool {
    let mut folders = r.folders.clone();
    folders.sort();
    world
        .emitted_completions
        .iter()
        .any(|(share, f, id, started, visible_at)| {
            *share == r.share_arn
                && *f == folders
                && *id != r.notification_id
                && started + COMPLETION_CLOCK_MARGIN_MS + world.clock_spread_ms >= r.decided_at
                && *visible_at <= at
        })
}

fn check_in_flight_attempts(world: &World) -> Result<(), String> {
    for attempt in &world.throttled {
        let excused = attempt.in_flight.iter().any(|&i| {
            let r = &world.refreshes[i];
            !r.answered
                || attempt.at >= r.decided_at + MIN_SLOT_LEASE_MS - world.clock_spread_ms - 1
                || freed_by_a_lookalike(world, r, attempt.at)
        });
        if !excused {
            let holding: Vec<String> = attempt
                .in_flight
                .iter()
                .map(|&i| {
                    let r = &world.refreshes[i];
                    format!(
                        "{} started at {} (decided at {}), until {}",
                        r.notification_id, r.at, r.decided_at, r.completes_at
                    )
                })
                .collect();
            return Err(format!(
                "a third RefreshCache on share {} at {} while two refreshes were in flight that the product knew of: {}",
                attempt.share_arn,
                attempt.at,
                holding.join("; ")
            ));
        }
    }
    Ok(())
}

/// No two accepted calls on one share closer than `MIN_REFRESH_INTERVAL_SECONDS`, in
/// true time.
///
/// The product paces its decisions: a claim is taken only once the interval plus the
/// clock margin has passed, on the claiming container's clock, since the claim recorded
/// in the share's item. The margin is the most two clocks differ by, so in true time
/// each claim comes at least the interval after the previous one. A call follows its
/// claim by the claim's write (a few ms of model time), so the rule for the calls the
/// gateway accepted: each starts at least the interval after the decision behind the
/// call accepted before it on the share. Without the margin, skewed clocks break it.
fn check_pace(world: &World) -> Result<(), String> {
    let interval = world.min_interval_ms;
    if interval == 0 {
        return Ok(());
    }
    let mut by_share: HashMap<&str, Vec<&AcceptedRefresh>> = HashMap::new();
    for r in &world.refreshes {
        by_share.entry(r.share_arn.as_str()).or_default().push(r);
    }
    for (share, calls) in by_share {
        for pair in calls.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            if after.at - before.decided_at < interval {
                return Err(format!(
                    "RefreshCache on share {share} at {} (decided at {}) only {} ms after the call at {} (decided at {}); the interval is {interval} ms",
                    after.at,
                    after.decided_at,
                    after.at - before.decided_at,
                    before.at,
                    before.decided_at
                ));
            }
        }
    }
    Ok(())
}

/// At the end nothing is queued, so the item of a live share that still holds pending
/// listings has no wake-up left to bring them to a call: they would wait forever. (A
/// share that is gone may keep its item: nobody calls it, and the invariant excuses
/// it.)
fn check_drained(world: &World) -> Result<(), String> {
    let mut stuck: Vec<(&String, &ShareState)> = world
        .share_items
        .iter()
        .filter(|(arn, s)| !s.pending.is_empty() && world.live_shares().any(|l| &l.arn == *arn))
        .collect();
    stuck.sort_by_key(|(arn, _)| arn.as_str());
    if let Some((arn, state)) = stuck.first() {
        return Err(format!(
            "share {arn} ends with pending listings and no wake-up to call it: {}",
            share_line(state)
        ));
    }
    Ok(())
}

/// A bucket whose shares were all on one gateway, and whose every change was written
/// through that gateway (named or not), needs no refresh: its shares already show it
/// all. None of them may have been called at all.
///
/// One excuse: a message that finds no item for its bucket (every open of its window
/// failed, for longer than an opener can live) cannot know what changed, and refreshes
/// the whole bucket, as it must. A bucket whose item a refresher ever found missing is
/// not held to the promise.
fn check_cost(world: &World, events: &[SimEvent]) -> Result<(), String> {
    for (bucket, gateway) in single_writer_buckets(world, events) {
        if world.item_missing.contains(bucket) {
            continue;
        }
        for share in world.shares.iter().filter(|s| s.bucket == bucket) {
            let calls = world.refresh_calls.get(&share.arn).copied().unwrap_or(0);
            if calls > 0 {
                return Err(format!(
                    "bucket {bucket} was written only through {gateway}, which holds all its shares, yet RefreshCache was called {calls} times on share {}",
                    share.arn
                ));
            }
        }
    }
    Ok(())
}

/// The buckets held to the cost promise, with their gateway.
fn single_writer_buckets<'w>(world: &'w World, events: &[SimEvent]) -> Vec<(&'w str, &'w str)> {
    let mut found: Vec<(&str, &str)> = Vec::new();
    for share in &world.shares {
        if found.iter().any(|(b, _)| *b == share.bucket) {
            continue;
        }
        let bucket = share.bucket.as_str();
        let gateway = share.gateway.as_str();
        let one_gateway = world
            .shares
            .iter()
            .filter(|s| s.bucket == bucket)
            .all(|s| s.gateway.eq_ignore_ascii_case(gateway));
        let mut written = events.iter().filter(|e| e.bucket == bucket).peekable();
        let only_through_it = written.peek().is_some()
            && written.all(|e| match &e.origin {
                Origin::Gateway(id) => id.eq_ignore_ascii_case(gateway),
                Origin::UnnamedGateway => true,
                Origin::Direct | Origin::Lifecycle => false,
            });
        if one_gateway && only_through_it {
            found.push((bucket, gateway));
        }
    }
    found
}

struct SeedResult {
    outcome: Result<(), String>,
    trace: Vec<String>,
    stats: Stats,
}

/// A bucket of the scenario, and the gateways its shares sit on.
struct BucketPlan {
    name: String,
    gateways: Vec<String>,
    /// Its only writer is its only gateway: held to the cost promise.
    single_writer: bool,
}

fn run_seed(seed: u64, fault_2018: Option<Fault2018>, trace: bool) -> SeedResult {
    let mut rng = Rng(seed ^ 0x005E_ED0F_5EED);
    // Four gateways that serve buckets, and one that serves none of them. The ids
    // carry letters, so that their case can vary.
    let pool: Vec<String> = (0..5u64)
        .map(|i| format!("sgw-{:02X}{:06X}", 0x1A + i, rng.below(1 << 24)))
        .collect();
    let bucket_count = rng.range(1, 3) as usize;
    let mut buckets = Vec::new();
    for b in 0..bucket_count {
        // The last of several buckets may have one gateway that writes all its changes
        // (not in the dense runs of the clock-margin fault, whose changes must coalesce).
        let single_writer = b > 0
            && b + 1 == bucket_count
            && rng.chance(0.5)
            && fault_2018 != Some(Fault2018::CoalesceWithoutClockMargin);
        let gateway_count = if single_writer || rng.chance(0.4) {
            1
        } else {
            rng.range(2, 3) as usize
        };
        let mut gateways: Vec<String> = pool[..4].to_vec();
        while gateways.len() > gateway_count {
            gateways.remove(rng.below(gateways.len() as u64) as usize);
        }
        buckets.push(BucketPlan {
            name: format!("bucket-{b}"),
            gateways,
            single_writer,
        });
    }
    let folders = ["", "p/", "p/a/", "q/", "q/deep/er/"];
    let mut shares = Vec::new();
    for (b, bucket) in buckets.iter().enumerate() {
        // Every gateway of the bucket has a share of it; some have two.
        let count = bucket.gateways.len() + rng.below(2) as usize;
        for s in 0..count {
            let prefix = if s == 0 && rng.chance(0.6) {
                ""
            } else {
                *rng.pick(&["p/", "q/", "p/a/"])
            };
            let gateway = match bucket.gateways.get(s) {
                Some(g) => g.clone(),
                None => rng.pick(&bucket.gateways).clone(),
            };
            shares.push(SimShare {
                arn: format!("share-{b}-{s}"),
                kind: if rng.chance(0.5) {
                    ShareKind::Nfs
                } else {
                    ShareKind::Smb
                },
                gateway,
                bucket: bucket.name.clone(),
                prefix: prefix.to_string(),
                created_at: -1,
                deleted_at: None,
            });
        }
    }
    for i in 0..rng.range(0, 4) {
        shares.push(SimShare {
            arn: format!("share-other-{i}"),
            kind: ShareKind::Nfs,
            gateway: rng.pick(&pool).clone(),
            bucket: "unrelated".into(),
            prefix: String::new(),
            created_at: -1,
            deleted_at: None,
        });
    }
    let faults_on = rng.chance(0.9);
    let p = |rng: &mut Rng| rng.below(20) as f64 / 100.0;
    let mut world = World {
        now: 0,
        rng: Rng(rng.next()),
        faults_on,
        p_fault: [p(&mut rng), p(&mut rng), p(&mut rng)],
        items: HashMap::new(),
        queue: Vec::new(),
        dlq: Vec::new(),
        next_message: 0,
        next_share: 100,
        list_page_size: rng.range(1, 4) as usize,
        shares,
        share_items: HashMap::new(),
        refreshes: Vec::new(),
        throttled: Vec::new(),
        slow_gateway: false,
        completion_faults: CompletionFaults::default(),
        min_interval_ms: 0,
        clock_spread_ms: 0,
        violations: Vec::new(),
        wakes: 0,
        completions: 0,
        completions_lost: 0,
        completions_duplicated: 0,
        emitted_completions: Vec::new(),
        refresh_calls: HashMap::new(),
        gateway_anywhere: Default::default(),
        whole_bucket: Default::default(),
        item_missing: Default::default(),
        fault_2018,
        trace: trace.then(Vec::new),
    };
    if let Some(trace) = world.trace.as_mut() {
        for s in &world.shares {
            trace.push(format!(
                "{:>9} share {} on {}: {}/{}",
                "", s.arn, s.gateway, s.bucket, s.prefix
            ));
        }
    }
    // Up to 40 minutes: windows longer than SQS's 900-second delay come back.
    let dense = fault_2018 == Some(Fault2018::CoalesceWithoutClockMargin);
    // Trusting an in-flight refresh shows when a folder changes again while its refresh
    // lists: short windows, one after another, on a gateway that takes hours.
    let trust = fault_2018 == Some(Fault2018::TrustInFlight);
    let delay_seconds = if dense {
        *rng.pick(&[1u32, 5, 10])
    } else if trust {
        *rng.pick(&[1u32, 5, 10, 30])
    } else {
        *rng.pick(&[0u32, 1, 5, 30, 120, 900, 2_400])
    };
    // Pacing without a margin shows between two refreshers whose clocks differ.
    let pace_fault = fault_2018 == Some(Fault2018::PaceWithoutClockMargin);
    let skew_ms = if fault_2018 == Some(Fault2018::TimeOnlyWindow) || dense || pace_fault {
        3_000
    } else {
        rng.range(0, 2_000)
    };
    let mut sim = Sim {
        world: Arc::new(Mutex::new(world)),
        rng: Rng(rng.next()),
        delay_seconds,
        max_aggregators: rng.range(1, 3) as usize,
        max_refreshers: (rng.range(1, 2) as usize).max(if pace_fault { 2 } else { 1 }),
        skew_ms,
        crash_probability: if faults_on {
            rng.below(15) as f64 / 100.0
        } else {
            0.0
        },
        storm_ends_at: 900_000,
        storm_over: false,
        aggregators: Vec::new(),
        refreshers: Vec::new(),
        running: Vec::new(),
        agenda: BinaryHeap::new(),
        agenda_seq: 0,
        deliveries: HashMap::new(),
        aggregator_dlq: Vec::new(),
        events: Vec::new(),
        visibility_ms: 60_000,
        max_receive_count: 5,
        redrives: 0,
        // A third of the runs deliver through an SQS ingest queue, in batches.
        ingest: rng.chance(0.33).then(IngestQueue::default),
        ingest_poll_scheduled: false,
        poll_seq: 0,
        poll_at: None,
        next_container: 0,
        min_interval_seconds: 0,
    };
    let mut stats = Stats::default();
    // The gateway's pace and its completion events. The interval varies per run; the
    // refreshers' clock margin is the modelled skew (see `Sim::new_refresher`).
    sim.min_interval_seconds = *rng.pick(&[0u32, 1, 5, 60]);
    if pace_fault && sim.min_interval_seconds == 0 {
        sim.min_interval_seconds = 5;
    }
    let slow_gateway = rng.chance(0.15) || trust;
    let completion_faults = CompletionFaults {
        lost: *rng.pick(&[0.0, 0.0, 0.05, 0.3]),
        duplicated: *rng.pick(&[0.0, 0.1, 0.5]),
        delayed: *rng.pick(&[0.0, 0.0, 0.2]),
        reorder_ms: *rng.pick(&[0, 5_000, 120_000]),
    };
    {
        let mut w = lock(&sim.world);
        w.slow_gateway = slow_gateway;
        w.completion_faults = completion_faults;
        w.min_interval_ms = i64::from(sim.min_interval_seconds) * 1000;
        w.clock_spread_ms = 2 * skew_ms;
        let interval = sim.min_interval_seconds;
        w.log(|| {
            format!(
                "run: window {delay_seconds} s, interval {interval} s, skew up to {skew_ms} ms, slow gateway {slow_gateway}, completions {completion_faults:?}"
            )
        });
        // Refresh-complete events for refreshes that no refresher of ours started (an
        // operator's, another tool's), on our shares and others: they must be harmless.
        let arns: Vec<String> = w.shares.iter().map(|s| s.arn.clone()).collect();
        for _ in 0..rng.range(0, 3) {
            let arn = rng.pick(&arns).clone();
            let id = new_notification_id(&mut rng);
            let visible_at = rng.range(0, 1_500_000);
            let started = visible_at - rng.range(1_000, 600_000);
            let completed = visible_at - rng.range(0, 1_000);
            let body = completion_event(&arn, &id, started, completed, &["/".into()], &mut rng);
            w.note_completion(&arn, &["/".into()], &id, started, visible_at);
            w.push_event(body, visible_at);
            stats.stray_completions += 1;
        }
    }
    stats.slow_runs += u64::from(slow_gateway);
    // The clock-margin fault needs events near window ends: a short, dense burst.
    let (burst_ms, event_count) = if dense {
        (rng.range(1_000, 30_000), rng.range(30, 80))
    } else {
        (rng.range(1_000, 600_000), rng.range(5, 30))
    };
    let mut writes: Vec<(String, String, i64, Origin)> = Vec::new();
    for i in 0..event_count {
        let bucket = rng.pick(&buckets);
        // The first five events are one of each kind; then they come mixed (in the
        // dense runs mostly direct, whose changes coalesce across writers).
        let kind = if i < 5 {
            i as u64
        } else if dense && rng.chance(0.95) {
            0
        } else {
            rng.below(100)
        };
        let origin = if bucket.single_writer {
            if rng.chance(0.85) {
                Origin::Gateway(bucket.gateways[0].clone())
            } else {
                Origin::UnnamedGateway
            }
        } else {
            match kind {
                0 | 5..=34 => Origin::Direct,
                1 | 35..=49 => Origin::Lifecycle,
                2 | 50..=84 => Origin::Gateway(rng.pick(&bucket.gateways).clone()),
                3 | 85..=94 => Origin::UnnamedGateway,
                // A gateway without a share of this bucket.
                _ => Origin::Gateway(
                    rng.pick(
                        &pool
                            .iter()
                            .filter(|g| !bucket.gateways.contains(g))
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                    .clone(),
                ),
            }
        };
        writes.push((
            bucket.name.clone(),
            format!("{}obj-{i}", rng.pick(&folders)),
            rng.range(0, burst_ms),
            origin,
        ));
    }
    // Now and then, where a window lasts long enough to hold one, a burst through one
    // gateway into a couple of hundred folders (sometimes with plain writes in between):
    // the window's entry limit is crossed.
    if !dense && delay_seconds >= 30 && rng.chance(0.05) {
        let bucket = rng.pick(&buckets);
        let gateway = rng.pick(&bucket.gateways).clone();
        let mixed = !bucket.single_writer && rng.chance(0.3);
        let mut at = rng.range(0, burst_ms);
        for j in 0..rng.range(195, 240) {
            at += rng.range(1, 40);
            let (key, origin) = if mixed && rng.chance(0.25) {
                (format!("plain/f{j}/obj"), Origin::Direct)
            } else if bucket.single_writer && rng.chance(0.1) {
                (format!("burst/f{j}/obj"), Origin::UnnamedGateway)
            } else {
                (format!("burst/f{j}/obj"), Origin::Gateway(gateway.clone()))
            };
            writes.push((bucket.name.clone(), key, at, origin));
        }
    }
    for (bucket, key, written_at, origin) in writes {
        let record = s3_record(&bucket, &key, written_at, &origin, &mut rng);
        let notification = Arc::new(json!({ "Records": [record.clone()] }));
        // Delivery: mostly prompt, sometimes a minute or more late, sometimes twice.
        let copies = if rng.chance(0.08) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if rng.chance(0.1) {
                rng.range(60_000, 400_000)
            } else {
                rng.range(5, 3_000)
            };
            sim.deliver(written_at + delay, notification.clone(), 0);
        }
        stats.events += 1;
        match &origin {
            Origin::Direct => stats.direct += 1,
            Origin::Lifecycle => stats.lifecycle += 1,
            Origin::UnnamedGateway => stats.unnamed_gateway += 1,
            Origin::Gateway(g) => {
                let served = buckets
                    .iter()
                    .any(|b| b.name == bucket && b.gateways.contains(g));
                if served {
                    stats.named_gateway += 1;
                } else {
                    stats.foreign_gateway += 1;
                }
            }
        }
        sim.events.push(SimEvent {
            bucket,
            key,
            written_at,
            origin,
            record,
        });
    }
    let share_gateways = lock(&sim.world)
        .shares
        .iter()
        .map(|s| s.gateway.clone())
        .collect::<Vec<_>>();
    if rng.chance(0.2) {
        let index = rng.below(share_gateways.len() as u64) as usize;
        // Recreated on its own gateway, or moved to another one.
        let gateway = if rng.chance(0.5) {
            share_gateways[index].clone()
        } else {
            stats.shares_moved += 1;
            rng.pick(
                &pool
                    .iter()
                    .filter(|g| **g != share_gateways[index])
                    .cloned()
                    .collect::<Vec<_>>(),
            )
            .clone()
        };
        sim.schedule(
            rng.range(0, burst_ms + 120_000),
            Agenda::RecreateShare { index, gateway },
        );
    }
    let storm_ends = sim.storm_ends_at;
    sim.schedule(storm_ends, Agenda::StormEnds);
    sim.schedule_poll(1_000);

    let outcome = sim.run().and_then(|()| {
        let w = lock(&sim.world);
        check_invariant(&w, &sim.events)
    });
    let mut w = lock(&sim.world);
    stats.refreshes = w.refreshes.len() as u64;
    stats.wakes = w.wakes;
    stats.completions = w.completions;
    stats.completions_lost = w.completions_lost;
    stats.completions_duplicated = w.completions_duplicated;
    stats.throttled_in_flight = w.throttled.len() as u64;
    stats.most_throttled = (stats.throttled_in_flight, seed);
    stats.windows_gateway_anywhere = w.gateway_anywhere.len() as u64;
    stats.windows_whole_bucket = w.whole_bucket.len() as u64;
    stats.single_writer_buckets = single_writer_buckets(&w, &sim.events).len() as u64;
    let trace = w.trace.take().unwrap_or_default();
    SeedResult {
        outcome,
        trace,
        stats,
    }
}

/// Runs `seeds` seeds on every core; returns the failing seeds with their errors, and
/// what the runs went through.
fn run_seeds(seeds: u64) -> (Vec<(u64, String)>, Stats) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let failures = Mutex::new(BTreeMap::new());
    let totals = Mutex::new(Stats::default());
    std::thread::scope(|scope| {
        for t in 0..threads {
            let failures = &failures;
            let totals = &totals;
            scope.spawn(move || {
                let mut seed = t;
                let mut stats = Stats::default();
                while seed < seeds {
                    let result = run_seed(seed, None, false);
                    stats.add(&result.stats);
                    if let Err(e) = result.outcome {
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(seed, e);
                    }
                    seed += threads;
                }
                totals.lock().unwrap_or_else(|p| p.into_inner()).add(&stats);
            });
        }
    });
    let failures = failures
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .collect();
    (
        failures,
        totals.into_inner().unwrap_or_else(|p| p.into_inner()),
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
}

#[test]
fn simulation_holds_the_invariant() {
    if let Some(seed) = env_u64("SEED") {
        // `SIM_FAULT=TrustInFlight` (a switch's name) replays the seed with that switch.
        let fault = std::env::var("SIM_FAULT").ok().map(|name| {
            ALL_FAULTS
                .into_iter()
                .find(|f| format!("{f:?}") == name.trim())
                .unwrap_or_else(|| panic!("SIM_FAULT={name}: not one of {ALL_FAULTS:?}"))
        });
        let result = run_seed(seed, fault, true);
        for line in &result.trace {
            println!("{line}");
        }
        if let Err(e) = result.outcome {
            panic!("seed {seed} fails: {e}");
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(2_000);
    let started = std::time::Instant::now();
    let (failures, stats) = run_seeds(seeds);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "simulation: {seeds} seeds in {elapsed:.1} s ({:.0} seeds/s), {} failed",
        seeds as f64 / elapsed.max(1e-9),
        failures.len()
    );
    println!(
        "simulation: {} events: {} direct, {} lifecycle, {} through a gateway of the bucket, {} through another gateway, {} through an unnamed gateway; windows with a gateway's writes anywhere: {}, whole-bucket windows: {}; buckets held to the cost promise: {}; shares moved: {}",
        stats.events,
        stats.direct,
        stats.lifecycle,
        stats.named_gateway,
        stats.foreign_gateway,
        stats.unnamed_gateway,
        stats.windows_gateway_anywhere,
        stats.windows_whole_bucket,
        stats.single_writer_buckets,
        stats.shares_moved
    );
    println!(
        "simulation: {} refreshes, {} wake-ups; completion events: {} queued, {} lost, {} duplicated, {} not ours; {} calls on two in flight (excused; at most {} in one run, seed {}); {} runs with hour-long refreshes",
        stats.refreshes,
        stats.wakes,
        stats.completions,
        stats.completions_lost,
        stats.completions_duplicated,
        stats.stray_completions,
        stats.throttled_in_flight,
        stats.most_throttled.0,
        stats.most_throttled.1,
        stats.slow_runs
    );
    for (seed, error) in failures.iter().take(20) {
        println!("seed {seed}: {error}");
    }
    if let Some((seed, error)) = failures.first() {
        panic!(
            "{} of {seeds} seeds break the invariant; first: seed {seed}: {error}\nreplay with: SEED={seed} cargo test --profile sim -p shared --no-default-features --test simulation -- --nocapture",
            failures.len()
        );
    }
    // The model must exercise what the checker is there for.
    assert!(
        seeds < 1_000
            || [
                stats.direct,
                stats.lifecycle,
                stats.named_gateway,
                stats.foreign_gateway,
                stats.unnamed_gateway,
                stats.windows_gateway_anywhere,
                stats.windows_whole_bucket,
                stats.single_writer_buckets,
                stats.shares_moved,
                stats.wakes,
                stats.completions,
                stats.completions_lost,
                stats.completions_duplicated,
                stats.stray_completions,
                stats.slow_runs,
            ]
            .iter()
            .all(|n| *n > 0),
        "the scenarios no longer cover every case: {stats:?}"
    );
}

/// Each 2018 fault must be caught within this many seeds.
const FAULT_SEEDS: u64 = 3_000;

impl Fault2018 {
    /// What the checker must report for this fault: a lost refresh, or a call inside
    /// the interval. A failure of another kind is not this fault being caught.
    fn caught_as(self) -> &'static str {
        match self {
            Fault2018::PaceWithoutClockMargin => "the interval is",
            _ => "was never refreshed",
        }
    }
}

/// The first seed (of a batch run on every core) that breaks the invariant with the
/// fault, in the way that the fault breaks it, and holds it without: the fault, and
/// nothing else, is what the checker saw.
fn assert_fault_is_caught(fault: Fault2018) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let mut from = 0;
    while from < FAULT_SEEDS {
        let batch: Vec<u64> = (from..(from + 8 * threads).min(FAULT_SEEDS)).collect();
        from += batch.len() as u64;
        let caught: Vec<(u64, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(8)
                .map(|seeds| {
                    scope.spawn(move || {
                        seeds
                            .iter()
                            .filter_map(|&seed| {
                                let error = run_seed(seed, Some(fault), false)
                                    .outcome
                                    .err()
                                    .filter(|e| e.contains(fault.caught_as()))?;
                                run_seed(seed, None, false)
                                    .outcome
                                    .is_ok()
                                    .then_some((seed, error))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        if let Some((seed, error)) = caught.iter().min_by_key(|(seed, _)| *seed) {
            println!("{fault:?} caught by seed {seed} (the seed holds without it): {error}");
            return;
        }
    }
    panic!("the checker missed the fault {fault:?} in {FAULT_SEEDS} seeds");
}

#[test]
fn checker_catches_a_window_left_armed_after_a_failed_send() {
    assert_fault_is_caught(Fault2018::NoUnsentRepair);
}

#[test]
fn checker_catches_refresh_errors_that_delete_the_message() {
    assert_fault_is_caught(Fault2018::DeleteOnRefreshError);
}

#[test]
fn checker_catches_windows_judged_by_time_alone() {
    assert_fault_is_caught(Fault2018::TimeOnlyWindow);
}

#[test]
fn checker_catches_coalescing_without_a_clock_margin() {
    assert_fault_is_caught(Fault2018::CoalesceWithoutClockMargin);
}

#[test]
fn checker_catches_skipping_every_gateway_write() {
    assert_fault_is_caught(Fault2018::SkipGatewayWrites);
}

#[test]
fn checker_catches_trusting_an_in_flight_refresh() {
    assert_fault_is_caught(Fault2018::TrustInFlight);
}

#[test]
fn checker_catches_pacing_without_a_clock_margin() {
    assert_fault_is_caught(Fault2018::PaceWithoutClockMargin);
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = run_seed(7, None, true);
    let b = run_seed(7, None, true);
    assert!(!a.trace.is_empty());
    assert_eq!(a.trace, b.trace);
}

#[test]
fn coverage_rules() {
    let r = |folders: &[&str], recursive| AcceptedRefresh {
        share_arn: "s".into(),
        at: 0,
        folders: folders.iter().map(|f| f.to_string()).collect(),
        recursive,
        notification_id: "n".into(),
        completes_at: 1,
        decided_at: 0,
        answered: true,
    };
    assert!(lists(&r(&["/"], true), "a/b/"));
    assert!(lists(&r(&["/"], false), ""));
    assert!(!lists(&r(&["/"], false), "a/"));
    assert!(lists(&r(&["/a/b"], false), "a/b/"));
    assert!(!lists(&r(&["/a/b"], false), "a/b/c/"));
    assert!(lists(&r(&["/a/b"], true), "a/b/c/"));
    assert!(!lists(&r(&["/a/b"], true), "a/bc/"));
    assert_eq!(folder_chain("a/b/c"), ["", "a/", "a/b/"]);
    assert_eq!(folder_chain("c"), [""]);
}
