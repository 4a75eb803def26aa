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
//! After a storm of faults, the operator redrives the DLQs and the run goes on until
//! nothing is left to do. Then the checker asserts the invariant of SPEC.md: every
//! object event not written by the gateway is followed by a RefreshCache that covers
//! its key, on every share that maps the key and existed before the event.
//!
//! - `SIM_SEEDS=n` sets how many seeds `simulation_holds_the_invariant` runs (CI runs
//!   100,000 with the optimised `sim` profile).
//! - `SEED=n` replays one seed and prints its trace.
//!
//! The faults of the 2018 design are rebuilt in the model as switches; each must make
//! the checker fail, which shows that it can catch them.

use serde_json::{json, Value};
use shared::aggregator::Aggregator;
use shared::clock::Clock;
use shared::error::{GatewayError, QueueError, Retry, StoreError};
use shared::metrics::NullSink;
use shared::ports::{
    DescribedShare, FileGateway, RefreshQueue, Requeue, SharePage, ShareSummary, WindowStore,
};
use shared::refresh_message::{RefreshMessage, ATTR_BUCKET, ATTR_TIMESTAMP};
use shared::refresher::Refresher;
use shared::s3_event::format_event_time;
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
}

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
    bucket: String,
    timestamp_ms: i64,
    visible_at: i64,
    receive_count: u32,
}

#[derive(Debug, Clone)]
struct SimShare {
    arn: String,
    kind: ShareKind,
    bucket: String,
    prefix: String,
    created_at: i64,
    deleted_at: Option<i64>,
}

#[derive(Debug, Clone)]
struct AcceptedRefresh {
    share_arn: String,
    at: i64,
    folders: Vec<String>,
    recursive: bool,
}

#[derive(Debug, Clone)]
struct SimEvent {
    bucket: String,
    key: String,
    written_at: i64,
    by_gateway: bool,
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
    /// Completion times of the refreshes in flight, per share.
    in_flight: HashMap<String, Vec<i64>>,
    refreshes: Vec<AcceptedRefresh>,
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
        w.next_message += 1;
        let id = format!("m{}", w.next_message);
        let visible_at = w.now + i64::from(delay_seconds.min(self.1)) * 1000;
        let queued = QueuedMessage {
            id: id.clone(),
            body: message.body(),
            bucket: message.bucket.clone(),
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

impl Requeue for SimQueue {
    async fn requeue(
        &self,
        _source_arn: Option<&str>,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        self.send(message, delay_seconds).await
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
                        gateway_arn: "gw".into(),
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
        if !w.live_shares().any(|s| s.arn == plan.share_arn) {
            w.log(|| format!("gateway refresh {}: share not found", plan.share_arn));
            return Err(GatewayError::ShareNotFound {
                share_arn: plan.share_arn.clone(),
                message: "The specified file share was not found.".into(),
            });
        }
        if let Some(e) = self.fault(&mut w) {
            w.log(|| format!("gateway refresh {}: {e}", plan.share_arn));
            return Err(e);
        }
        assert!(
            (1..=50).contains(&plan.folders.len()),
            "FolderList takes 1 to 50 folders"
        );
        let now = w.now;
        let in_flight = w.in_flight.entry(plan.share_arn.clone()).or_default();
        in_flight.retain(|done| *done > now);
        if in_flight.len() >= 2 {
            w.log(|| format!("gateway refresh {}: two already in flight", plan.share_arn));
            return Err(GatewayError::Busy {
                message: "too many requests".into(),
            });
        }
        let duration = w.rng.range(500, 90_000);
        w.in_flight
            .entry(plan.share_arn.clone())
            .or_default()
            .push(now + duration);
        w.refreshes.push(AcceptedRefresh {
            share_arn: plan.share_arn.clone(),
            at: now,
            folders: plan.folders.clone(),
            recursive: plan.recursive,
        });
        w.log(|| {
            format!(
                "gateway refresh {} {:?} recursive={} accepted",
                plan.share_arn, plan.folders, plan.recursive
            )
        });
        Ok(format!("n{}", w.refreshes.len()))
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
    dlq: Vec<Value>,
    next_id: u64,
}

struct IngestMessage {
    id: String,
    notification: Value,
    visible_at: i64,
    receive_count: u32,
}

type Task = Pin<Box<dyn Future<Output = Outcome> + Send>>;

enum Work {
    /// One S3 notification, and how many times Lambda already tried it.
    Notification { event: Value, attempt: u32 },
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
    Deliver { seq: u64 },
    Poll,
    IngestPoll,
    RecreateShare { index: usize },
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
    deliveries: HashMap<u64, (Value, u32)>,
    aggregator_dlq: Vec<Value>,
    events: Vec<SimEvent>,
    visibility_ms: i64,
    max_receive_count: u32,
    redrives: u32,
    /// Some: events reach the aggregator through an SQS ingest queue, in batches.
    ingest: Option<IngestQueue>,
}

impl Sim {
    fn schedule(&mut self, at: i64, item: Agenda) {
        self.agenda_seq += 1;
        self.agenda
            .push(std::cmp::Reverse((at, self.agenda_seq, item)));
    }

    fn deliver(&mut self, at: i64, event: Value, attempt: u32) {
        self.agenda_seq += 1;
        let seq = self.agenda_seq;
        self.deliveries.insert(seq, (event, attempt));
        self.schedule(at, Agenda::Deliver { seq });
    }

    fn now(&self) -> i64 {
        lock(&self.world).now
    }

    fn new_port(&mut self) -> Port {
        let skew = self.rng.range(-self.skew_ms, self.skew_ms);
        Port {
            world: self.world.clone(),
            invocation: Arc::new(Mutex::new(InvocationState::default())),
            skew_ms: skew,
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
        let service = Refresher::new(
            SimStore(port.clone()),
            SimGateway(port.clone()),
            SimQueue(port.clone(), 900),
            SimClock(port.clone()),
        )
        .with_metrics_sink(Arc::new(NullSink));
        Container {
            busy: false,
            port,
            aggregator: None,
            refresher: Some(Arc::new(service)),
        }
    }

    fn crash_point(&mut self) -> Option<u32> {
        (!self.storm_over && self.rng.chance(self.crash_probability))
            .then(|| self.rng.range(1, 8) as u32)
    }

    fn start_aggregator(&mut self, event: Value, attempt: u32) -> bool {
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
        let _ =
            self.start_aggregator_with(json!({ "Records": records }), Work::IngestBatch { ids });
    }

    fn start_aggregator_with(&mut self, payload: Value, work: Work) -> bool {
        let index = match self.aggregators.iter().position(|c| !c.busy) {
            Some(i) => i,
            None if self.aggregators.len() < self.max_aggregators => {
                let c = self.new_aggregator();
                self.aggregators.push(c);
                self.aggregators.len() - 1
            }
            None => return false,
        };
        let crash_at = self.crash_point();
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
            let result = service.handle(&payload).await;
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
                records.push(json!({
                    "messageId": m.id,
                    "receiptHandle": format!("{}-{}", m.id, m.receive_count),
                    "body": m.body,
                    "attributes": {"ApproximateReceiveCount": m.receive_count.to_string()},
                    "messageAttributes": {
                        ATTR_BUCKET: {"stringValue": m.bucket, "dataType": "String"},
                        ATTR_TIMESTAMP: {"stringValue": m.timestamp_ms.to_string(), "dataType": "Number"},
                    },
                    "eventSource": "aws:sqs",
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
        let crash_at = self.crash_point();
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

    fn quiet(&self) -> bool {
        let w = lock(&self.world);
        self.running.is_empty()
            && w.queue.is_empty()
            && self.ingest.as_ref().is_none_or(|i| i.messages.is_empty())
            && !self
                .agenda
                .iter()
                .any(|std::cmp::Reverse((_, _, a))| !matches!(a, Agenda::Poll | Agenda::IngestPoll))
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
                    self.poll_ingest();
                    let busy = self.ingest.as_ref().is_some_and(|i| !i.messages.is_empty());
                    if busy
                        || !self.quiet()
                        || self.ingest.as_ref().is_some_and(|i| !i.dlq.is_empty())
                    {
                        // The batching window: up to a few seconds.
                        let next = self.now() + 500 + (self.agenda_seq as i64 % 3) * 1_000;
                        self.schedule(next, Agenda::IngestPoll);
                    }
                }
                Agenda::Poll => {
                    self.poll_queue();
                    if !self.quiet()
                        || !self.aggregator_dlq.is_empty()
                        || !lock(&self.world).dlq.is_empty()
                    {
                        self.schedule(self.now() + 1_000, Agenda::Poll);
                    }
                }
                Agenda::RecreateShare { index } => {
                    let mut w = lock(&self.world);
                    let now = w.now;
                    if let Some(old) = w.shares.get_mut(index).filter(|s| s.deleted_at.is_none()) {
                        old.deleted_at = Some(now);
                        let mut new = old.clone();
                        w.next_share += 1;
                        new.arn = format!("share-{}", w.next_share);
                        new.created_at = now;
                        new.deleted_at = None;
                        w.log(|| format!("share {index} recreated as {}", new.arn));
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
                            matches!(a, Agenda::Poll | Agenda::IngestPoll)
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
                if self.ingest.is_some() {
                    self.schedule(now + 500, Agenda::IngestPoll);
                }
                let mut w = lock(&self.world);
                for mut m in messages {
                    m.receive_count = 0;
                    m.visible_at = now;
                    w.queue.push(m);
                }
                drop(w);
                self.schedule(now + 1_000, Agenda::Poll);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// A scenario per seed, and the checker
// ---------------------------------------------------------------------------------

fn s3_notification(event: &SimEvent) -> Value {
    let principal = if event.by_gateway {
        "AWS:AROAEXAMPLE:StorageGateway-sgw-12345678"
    } else {
        "AWS:AIDAEXAMPLE"
    };
    json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": format_event_time(event.written_at).unwrap_or_default(),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": principal},
        "s3": {"bucket": {"name": event.bucket}, "object": {"key": event.key}}
    }]})
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

fn check_invariant(world: &World, events: &[SimEvent]) -> Result<(), String> {
    let live: Vec<&SimShare> = world.live_shares().collect();
    for event in events.iter().filter(|e| !e.by_gateway) {
        for share in live.iter().filter(|s| {
            s.bucket == event.bucket
                && event.key.starts_with(&s.prefix)
                && s.created_at < event.written_at
        }) {
            let relative = &event.key[share.prefix.len()..];
            let covered = folder_chain(relative).iter().all(|folder| {
                world.refreshes.iter().any(|r| {
                    r.share_arn == share.arn && r.at > event.written_at && lists(r, folder)
                })
            });
            if !covered {
                return Err(format!(
                    "object {}/{} written at {} was never refreshed on share {} (prefix {:?})",
                    event.bucket, event.key, event.written_at, share.arn, share.prefix
                ));
            }
        }
    }
    Ok(())
}

struct SeedResult {
    outcome: Result<(), String>,
    trace: Vec<String>,
}

fn run_seed(seed: u64, fault_2018: Option<Fault2018>, trace: bool) -> SeedResult {
    let mut rng = Rng(seed ^ 0x005E_ED0F_5EED);
    let buckets: Vec<String> = (0..rng.range(1, 3))
        .map(|i| format!("bucket-{i}"))
        .collect();
    let folders = ["", "p/", "p/a/", "q/", "q/deep/er/"];
    let mut shares = Vec::new();
    for (b, bucket) in buckets.iter().enumerate() {
        for s in 0..rng.range(1, 2) {
            let prefix = if s == 0 && rng.chance(0.6) {
                ""
            } else {
                *rng.pick(&["p/", "q/", "p/a/"])
            };
            shares.push(SimShare {
                arn: format!("share-{b}-{s}"),
                kind: if rng.chance(0.5) {
                    ShareKind::Nfs
                } else {
                    ShareKind::Smb
                },
                bucket: bucket.clone(),
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
            bucket: "unrelated".into(),
            prefix: String::new(),
            created_at: -1,
            deleted_at: None,
        });
    }
    let faults_on = rng.chance(0.9);
    let p = |rng: &mut Rng| rng.below(20) as f64 / 100.0;
    let world = World {
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
        in_flight: HashMap::new(),
        refreshes: Vec::new(),
        fault_2018,
        trace: trace.then(Vec::new),
    };
    // Up to 40 minutes: windows longer than SQS's 900-second delay come back.
    let dense = fault_2018 == Some(Fault2018::CoalesceWithoutClockMargin);
    let delay_seconds = if dense {
        *rng.pick(&[1u32, 5, 10])
    } else {
        *rng.pick(&[0u32, 1, 5, 30, 120, 900, 2_400])
    };
    let skew_ms = if fault_2018 == Some(Fault2018::TimeOnlyWindow) || dense {
        3_000
    } else {
        rng.range(0, 2_000)
    };
    let mut sim = Sim {
        world: Arc::new(Mutex::new(world)),
        rng: Rng(rng.next()),
        delay_seconds,
        max_aggregators: rng.range(1, 3) as usize,
        max_refreshers: rng.range(1, 2) as usize,
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
    };
    // The clock-margin fault needs events near window ends: a short, dense burst.
    let (burst_ms, event_count) = if dense {
        (rng.range(1_000, 30_000), rng.range(30, 80))
    } else {
        (rng.range(1_000, 600_000), rng.range(1, 30))
    };
    for i in 0..event_count {
        let event = SimEvent {
            bucket: rng.pick(&buckets).clone(),
            key: format!("{}obj-{i}", rng.pick(&folders)),
            written_at: rng.range(0, burst_ms),
            by_gateway: rng.chance(0.1),
        };
        let notification = s3_notification(&event);
        // Delivery: mostly prompt, sometimes a minute or more late, sometimes twice.
        let copies = if rng.chance(0.08) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if rng.chance(0.1) {
                rng.range(60_000, 400_000)
            } else {
                rng.range(5, 3_000)
            };
            sim.deliver(event.written_at + delay, notification.clone(), 0);
        }
        sim.events.push(event);
    }
    let share_count = lock(&sim.world).shares.len();
    if rng.chance(0.2) {
        let index = rng.below(share_count as u64) as usize;
        sim.schedule(
            rng.range(0, burst_ms + 120_000),
            Agenda::RecreateShare { index },
        );
    }
    let storm_ends = sim.storm_ends_at;
    sim.schedule(storm_ends, Agenda::StormEnds);
    sim.schedule(1_000, Agenda::Poll);
    if sim.ingest.is_some() {
        sim.schedule(500, Agenda::IngestPoll);
    }

    let outcome = sim.run().and_then(|()| {
        let w = lock(&sim.world);
        check_invariant(&w, &sim.events)
    });
    let trace = lock(&sim.world).trace.take().unwrap_or_default();
    SeedResult { outcome, trace }
}

/// Runs `seeds` seeds on every core; returns the failing seeds with their errors.
fn run_seeds(seeds: u64, fault_2018: Option<Fault2018>, stop_at_first: bool) -> Vec<(u64, String)> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let failures = Mutex::new(BTreeMap::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let failures = &failures;
            let stop = &stop;
            scope.spawn(move || {
                let mut seed = t;
                while seed < seeds && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = run_seed(seed, fault_2018, false).outcome {
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(seed, e);
                        if stop_at_first {
                            stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    seed += threads;
                }
            });
        }
    });
    failures
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
}

#[test]
fn simulation_holds_the_invariant() {
    if let Some(seed) = env_u64("SEED") {
        let result = run_seed(seed, None, true);
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
    let failures = run_seeds(seeds, None, false);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "simulation: {seeds} seeds in {elapsed:.1} s ({:.0} seeds/s), {} failed",
        seeds as f64 / elapsed.max(1e-9),
        failures.len()
    );
    if let Some((seed, error)) = failures.first() {
        panic!(
            "{} of {seeds} seeds break the invariant; first: seed {seed}: {error}\nreplay with: SEED={seed} cargo test -p shared --test simulation -- --nocapture",
            failures.len()
        );
    }
}

/// Each 2018 fault must be caught within this many seeds.
const FAULT_SEEDS: u64 = 3_000;

fn assert_fault_is_caught(fault: Fault2018) {
    let failures = run_seeds(FAULT_SEEDS, Some(fault), true);
    assert!(
        !failures.is_empty(),
        "the checker missed the 2018 fault {fault:?} in {FAULT_SEEDS} seeds"
    );
    let (seed, error) = &failures[0];
    println!("{fault:?} caught by seed {seed}: {error}");
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
