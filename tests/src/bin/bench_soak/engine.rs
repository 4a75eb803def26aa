//! The soak (issue 16): minutes of writes through the real binaries on moto and the
//! Storage Gateway stand-in, while the function processes are SIGKILLed at random
//! points, one gateway fails every `RefreshCache` for a while, and refresh-complete
//! events are dropped, delayed and duplicated. Every write is then checked on every
//! share that maps it: covered or not, its staleness, and whether its covering call
//! started within docs/protocol.md's bound plus the terms of the faults that concern
//! it ([`analysis`]).
//!
//! Self-contained (only the `integration_tests` library), so that the benchmark's
//! `soak` section and the short CI test (`tests/tests/soak.rs`, which includes this
//! file with `#[path]`) run the same soak at different lengths.
//!
//! How Lambda is played:
//!
//! * **S3 → aggregator** is an asynchronous invocation per object (one S3
//!   notification each), in write order, through one warm process. A kill during an
//!   invocation leaves it without a result, so Lambda retries the event: here after
//!   [`SoakConfig::async_retry_delay`] (Lambda waits about a minute), on a fresh process.
//! * **action queue → refresher** is the SQS event source mapping: up to 10 visible
//!   messages per invocation, one invocation at a time, deleting what the response
//!   does not list in `batchItemFailures`. A kill during an invocation leaves its
//!   messages in flight, and SQS delivers them again after the queue's visibility
//!   timeout.
//! * **A kill** is SIGKILL ([`RespawningLambda`]); the next invocation goes to a fresh
//!   process started from the same spec (a cold start). A kill "mid-invocation" is
//!   aimed at a random point within the function's usual handler time, so some land
//!   after the response; those count as kills between invocations.
//! * **Completion events** go from the stand-in through moto's EventBridge (a rule on
//!   the soak's own bus) to the action queue. The event source mapping drops some of
//!   them (deletes the message unseen, as if EventBridge had lost it; at most one per
//!   share, since a lost event holds its slot for the 20-minute lease) and hides others
//!   for a while (`ChangeMessageVisibility`: delivered late); the stand-in duplicates
//!   some (`duplicate_next_completion_events`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use serde_json::{json, Value};

use integration_tests::aws::{
    lambda_aws_env, lambda_sqs_event, unique_name, BoxError, Clients, ACCOUNT_ID, REGION,
};
use integration_tests::runtime_api::{HarnessError, Invocation, LambdaSpawn, RespawningLambda};
use integration_tests::sgw_standin::{
    eventbridge_call, rfc3339_millis, BucketModel, BucketSource, CompletionEvents, InjectedFailure,
    SgwStandIn, ShareKind, DEFAULT_REFRESH_DURATION, DEFAULT_REFRESH_TIME_PER_OBJECT,
    REFRESH_EVENT_SOURCE,
};
use integration_tests::stack::route_completion_events;

#[path = "analysis.rs"]
pub mod analysis;
use analysis::{
    backlog_calls, backoff_step, both_slots_time, coverage, Bound, Call, Covered, Fault, FaultKind,
    Micros, Scope, Share, Term, Write, CLOCK_MARGIN, SECOND,
};

/// Messages per refresher invocation, as the event source mapping is configured.
const REFRESHER_BATCH: i32 = 10;

/// Mean time between faults of each kind (gaps uniform in 0.5 to 1.5 times it); `None`: never.
#[derive(Debug, Clone)]
pub struct KillPlan {
    pub aggregator_mid: Option<Duration>,
    pub aggregator_idle: Option<Duration>,
    pub refresher_mid: Option<Duration>,
    pub refresher_idle: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct CompletionPlan {
    /// Events dropped in all, at most one per share, each only while the share's other
    /// slot is free (a lost event holds its slot for the 20-minute lease; with the other
    /// slot held too, by a lost event or a killed claim, the share would wait for the
    /// lease), and only from `drops_from` into the writes on. A share that lost an event
    /// gets no mid-invocation kill of a batch that concerns it afterwards (a killed claim
    /// would hold its other slot).
    pub drops: usize,
    pub drops_from: Duration,
    /// Chance that a completion event (first delivery) is dropped, while drops are
    /// left, or else delayed.
    pub drop_probability: f64,
    pub delay_probability: f64,
    /// A delayed event comes back after a time in this range (whole seconds).
    pub delay: (Duration, Duration),
    /// Mean time between completions whose event the stand-in puts twice.
    pub duplicate_every: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Names the run's resources.
    pub name: &'static str,
    /// How long objects are written, and how many per second.
    pub seconds: u32,
    pub rate: u32,
    /// Buckets, each with one share on gateway A and one on gateway B (both on the
    /// bucket's root).
    pub buckets: usize,
    /// The layout of each bucket: `topNN/dirNNNNN/objNNNNN`.
    pub top_folders: usize,
    pub sub_folders: usize,
    pub objects_per_folder: usize,
    /// Each bucket's writes go to this many "hot" folders at a time, which move every
    /// `hot_phase`; every `new_folder_every`-th write of a bucket creates a subfolder.
    pub hot_folders: usize,
    pub hot_phase: Duration,
    pub new_folder_every: usize,
    /// REFRESH_DELAY_SECONDS and MIN_REFRESH_INTERVAL_SECONDS (the stand-in's strict
    /// interval too).
    pub window_seconds: u32,
    pub min_interval_seconds: u32,
    /// A refresh stays in flight this long, plus this per object it lists.
    pub refresh_base: Duration,
    pub refresh_per_object: Duration,
    /// The functions' timeouts (the invocation deadline each one sees).
    pub aggregator_timeout: Duration,
    pub refresher_timeout: Duration,
    /// The action queue's visibility timeout.
    pub visibility_timeout_seconds: u32,
    /// When Lambda retries an asynchronous event whose invocation died.
    pub async_retry_delay: Duration,
    /// Gateway B fails every `RefreshCache` (500) from this offset into the writes,
    /// for this long.
    pub failure: Option<(Duration, Duration)>,
    pub kills: KillPlan,
    pub completions: CompletionPlan,
    pub seed: u64,
    /// How long after the last write the queue and the share items may take to drain.
    pub drain_limit: Duration,
    pub log_level: &'static str,
}

impl SoakConfig {
    /// The benchmark's soak: `seconds` of writes at `rate` per second.
    pub fn bench(seconds: u32, rate: u32) -> SoakConfig {
        let length = Duration::from_secs(u64::from(seconds));
        let failure_length =
            (length * 3 / 10).clamp(Duration::from_secs(20), Duration::from_secs(120));
        SoakConfig {
            name: "soak",
            seconds,
            rate,
            buckets: 2,
            top_folders: 10,
            sub_folders: 20,
            objects_per_folder: 50,
            hot_folders: 6,
            hot_phase: Duration::from_secs(15),
            new_folder_every: 20,
            window_seconds: 3,
            min_interval_seconds: 5,
            refresh_base: Duration::from_secs(2),
            refresh_per_object: Duration::from_millis(10),
            aggregator_timeout: Duration::from_secs(10),
            refresher_timeout: Duration::from_secs(15),
            visibility_timeout_seconds: 30,
            async_retry_delay: Duration::from_secs(5),
            failure: Some((length / 5, failure_length)),
            kills: KillPlan {
                aggregator_mid: Some(Duration::from_secs(12)),
                aggregator_idle: Some(Duration::from_secs(20)),
                // Each leaves its batch's windows waiting V: leave stretches without.
                refresher_mid: Some(Duration::from_secs(40)),
                refresher_idle: Some(Duration::from_secs(25)),
            },
            completions: CompletionPlan {
                drops: 2,
                drops_from: length * 3 / 5,
                drop_probability: 0.3,
                delay_probability: 0.1,
                delay: (Duration::from_secs(5), Duration::from_secs(20)),
                duplicate_every: Some(Duration::from_secs(30)),
            },
            seed: 0x50AC_2026,
            drain_limit: Duration::from_secs(600),
            log_level: "INFO",
        }
    }

    /// The short soak of CI: about a minute of writes, every fault kind.
    #[allow(dead_code)] // tests/tests/soak.rs's
    pub fn ci() -> SoakConfig {
        SoakConfig {
            name: "ci-soak",
            seconds: 60,
            rate: 5,
            failure: Some((Duration::from_secs(12), Duration::from_secs(20))),
            kills: KillPlan {
                aggregator_mid: Some(Duration::from_secs(8)),
                aggregator_idle: Some(Duration::from_secs(12)),
                refresher_mid: Some(Duration::from_secs(12)),
                refresher_idle: Some(Duration::from_secs(15)),
            },
            completions: CompletionPlan {
                drops: 1,
                drops_from: Duration::from_secs(30),
                drop_probability: 0.3,
                delay_probability: 0.15,
                delay: (Duration::from_secs(3), Duration::from_secs(10)),
                duplicate_every: Some(Duration::from_secs(15)),
            },
            drain_limit: Duration::from_secs(150),
            ..SoakConfig::bench(60, 5)
        }
    }

    fn folders(&self) -> usize {
        self.top_folders * self.sub_folders
    }

    /// `top03/dir00061`: folder `f` of the layout.
    fn folder_path(&self, f: usize) -> String {
        format!("top{:02}/dir{f:05}", f / self.sub_folders)
    }

    fn bucket_model(&self) -> BucketModel {
        let model = BucketModel::new();
        for f in 0..self.folders() {
            for o in 0..self.objects_per_folder {
                model.put(format!("{}/obj{o:05}", self.folder_path(f)));
            }
        }
        model
    }

    /// Write `i`: its bucket and key.
    fn planned_write(&self, i: usize) -> (usize, String) {
        let bucket = i % self.buckets;
        let j = i / self.buckets;
        let phase = (i as f64 / f64::from(self.rate) / self.hot_phase.as_secs_f64()) as usize;
        let k = (splitmix(self.seed ^ i as u64) % self.hot_folders as u64) as usize;
        let f = (phase * 37 + k * 13 + bucket * 101) % self.folders();
        let key = if j % self.new_folder_every == self.new_folder_every - 1 {
            format!("{}/new-{j:05}/obj-{i:06}.dat", self.folder_path(f))
        } else {
            format!("{}/soak-{i:06}.dat", self.folder_path(f))
        };
        (bucket, key)
    }

    fn writes(&self) -> usize {
        (self.seconds * self.rate) as usize
    }

    /// The action queue's visibility timeout, in microseconds.
    pub fn visibility(&self) -> Micros {
        Micros::from(self.visibility_timeout_seconds) * SECOND
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A small seeded generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        low + (high.saturating_sub(low)).mul_f64(self.unit())
    }

    /// A gap of mean `mean`: uniform between half and one and a half times it.
    fn gap(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(0.5 + self.unit())
    }
}

fn now_us() -> Micros {
    micros(SystemTime::now())
}

fn micros(t: SystemTime) -> Micros {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Micros)
}

/// Where the soak runs: moto, the stand-in, clients for moto that are not counted,
/// and the binaries.
pub struct SoakEnv<'a> {
    pub moto_endpoint: &'a str,
    pub gateway: &'a SgwStandIn,
    pub admin: &'a Clients,
    pub aggregator_bin: &'a Path,
    pub refresher_bin: &'a Path,
}

/// The end state of one share item.
#[derive(Debug, Clone, Default)]
pub struct ShareEnd {
    pub pending: usize,
    /// Slots left, each with why it is still there (or `None`: unexplained).
    pub slots: Vec<(String, Option<&'static str>)>,
}

/// What the action queue's messages were and how late they were handled.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub invocations: usize,
    pub messages: usize,
    pub windows: usize,
    pub wake_ups: usize,
    pub completion_events: usize,
    /// Deliveries after the first (a killed invocation's batch, a delayed event).
    pub redelivered: usize,
    /// Messages the refresher reported in `batchItemFailures`.
    pub batch_item_failures: usize,
    /// From a message becoming due (visible; for a completion event, the refresh's
    /// completion) to the end of the invocation that handled it, first deliveries in
    /// invocations that finished: windows, wake-ups, completion events.
    pub lateness: [Vec<Micros>; 3],
}

/// The invocations of the aggregator.
#[derive(Debug, Clone, Default)]
pub struct AggregatorStats {
    pub invocations: usize,
    pub retries: usize,
    /// Events that needed more than one retry (Lambda retries twice, then the DLQ).
    pub retried_twice: usize,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SoakOutcome {
    pub config: SoakConfig,
    /// When the writes started.
    pub t0: Micros,
    pub shares: Vec<Share>,
    pub writes: Vec<Write>,
    pub new_folder_writes: usize,
    pub distinct_folders: usize,
    pub write_span: Duration,
    pub max_lag: Duration,
    pub faults: Vec<Fault>,
    /// Accepted calls, as the stand-in recorded them.
    pub calls: Vec<Call>,
    /// Per share: calls that got the injected 500 of the failing gateway.
    pub failed_calls: Vec<usize>,
    /// Calls the stand-in's strict limits rejected: (share, at, error).
    pub rejected: Vec<(usize, Micros, String)>,
    pub rejected_in_flight: usize,
    pub rejected_too_soon: usize,
    /// The failing gateway's stretch, and per share the failed calls in a row it saw.
    pub failure_window: Option<(Micros, Micros)>,
    pub failure_streak: Vec<u32>,
    pub completions: usize,
    /// Dropped events that were one copy of a duplicated event (the other copy came).
    pub dropped_copies: usize,
    pub queue: QueueStats,
    pub aggregator: AggregatorStats,
    pub aggregator_spawns: u64,
    pub refresher_spawns: u64,
    /// Harness-side surprises: an invocation that failed without a kill, and such.
    pub unexpected: Vec<String>,
    /// Per share: the largest `Pending` set seen (sampled every second).
    pub max_pending: Vec<usize>,
    /// Per class (0 healthy, 1 the failing gateway's shares).
    pub bounds: Vec<Bound>,
    pub coverage: Vec<Covered>,
    pub share_end: Vec<ShareEnd>,
    /// Buckets whose latest window was not handed to the shares.
    pub buckets_not_handed_off: Vec<String>,
    /// From the last write until everything drained; the reason when it did not.
    pub drained_after: Option<Duration>,
    pub drain_error: Option<String>,
}

impl SoakOutcome {
    pub fn kills(&self, kind: FaultKind) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }

    pub fn not_covered(&self) -> Vec<&Covered> {
        self.coverage
            .iter()
            .filter(|c| c.covering.is_none())
            .collect()
    }

    /// Covered writes whose covering call started later than the bound allows them.
    pub fn outside_bound(&self) -> Vec<&Covered> {
        self.coverage
            .iter()
            .filter(|c| c.covering.is_some() && !c.within_bound())
            .collect()
    }

    /// The coverage of one class of shares.
    pub fn of_class(&self, class: usize) -> Vec<&Covered> {
        self.coverage
            .iter()
            .filter(|c| self.shares[c.share].class == class)
            .collect()
    }

    /// S as measured: the latest any due message was handled.
    pub fn sqs_margin(&self) -> Micros {
        self.queue
            .lateness
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// The extra term the failing gateway's shares may use: T + one back-off step.
    pub fn failure_term(&self) -> Option<Micros> {
        let (from, to) = self.failure_window?;
        let streak = self.failure_streak.iter().copied().max().unwrap_or(0);
        Some(to - from + backoff_step(streak))
    }

    /// Remaining slots that nothing explains, and items with pending listings.
    pub fn end_state_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (s, end) in self.share_end.iter().enumerate() {
            if end.pending > 0 {
                problems.push(format!(
                    "{}: {} listing(s) still pending",
                    self.shares[s].label, end.pending
                ));
            }
            for (slot, why) in &end.slots {
                if why.is_none() {
                    problems.push(format!(
                        "{}: slot {slot} still taken, unexplained",
                        self.shares[s].label
                    ));
                }
            }
        }
        for bucket in &self.buckets_not_handed_off {
            problems.push(format!("bucket {bucket}: latest window not handed off"));
        }
        problems
    }
}

/// What the loops record while they run.
#[derive(Default)]
struct Journal {
    faults: Vec<Fault>,
    /// Completion events dropped by the event source mapping: their notification ids,
    /// and the shares that had one.
    dropped_ids: HashSet<String>,
    dropped_shares: HashSet<usize>,
    /// Messages hidden for a delay (by message id).
    delayed: HashSet<String>,
    queue: QueueStats,
    /// (notification id, end of the invocation that handled its event), for the
    /// completion events' lateness once their completion times are known.
    completion_handled: Vec<(String, Micros)>,
    max_pending: Vec<usize>,
    unexpected: Vec<String>,
    failure_window: Option<(Micros, Micros)>,
}

fn lock(j: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    j.lock().unwrap_or_else(|e| e.into_inner())
}

/// The deployment of one soak.
struct Ctx<'a> {
    env: &'a SoakEnv<'a>,
    config: &'a SoakConfig,
    table: String,
    queue_url: String,
    queue_arn: String,
    buckets: Vec<String>,
    models: Vec<BucketModel>,
    shares: Vec<Share>,
    share_index: HashMap<String, usize>,
    aggregator: RespawningLambda,
    refresher: RespawningLambda,
}

/// Runs the soak and measures it. The stand-in's settings are restored, the shares
/// and buckets removed from it and the table, queue and rule deleted afterwards,
/// whatever happened.
pub async fn run(env: &SoakEnv<'_>, config: &SoakConfig) -> Result<SoakOutcome, BoxError> {
    let table = unique_name("SoakTable");
    let queue = unique_name("SoakActionQueue");
    let rule = unique_name("SoakRefreshCompleted");
    let gateway = env.gateway;
    let gateways = [
        gateway.add_gateway(&format!("{}-a", config.name)),
        gateway.add_gateway(&format!("{}-b", config.name)),
    ];
    let mut buckets = Vec::new();
    let mut models = Vec::new();
    let mut shares = Vec::new();
    for b in 0..config.buckets {
        let bucket = format!("{}-{}-b{b}", config.name, std::process::id());
        let model = config.bucket_model();
        gateway.set_bucket_source(&bucket, BucketSource::Model(model.clone()));
        for (class, gw) in gateways.iter().enumerate() {
            let arn = gateway.add_share(gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
            shares.push(Share {
                bucket: b,
                class,
                arn,
                label: format!("bucket {b}, gateway {}", ["A", "B"][class]),
            });
        }
        buckets.push(bucket);
        models.push(model);
    }
    let result = deploy_and_run(
        env,
        config,
        &table,
        &queue,
        &rule,
        buckets.clone(),
        models,
        shares.clone(),
    )
    .await;
    // Clean up, whatever happened.
    gateway.set_strict_limits(None);
    gateway.set_refresh_duration(DEFAULT_REFRESH_DURATION);
    gateway.set_refresh_time_per_object(DEFAULT_REFRESH_TIME_PER_OBJECT);
    gateway.set_completion_events(None);
    for share in &shares {
        gateway.clear_refresh_failures_of(&share.arn);
        gateway.remove_share(&share.arn);
    }
    for bucket in &buckets {
        gateway.clear_bucket_source(bucket);
    }
    unroute(env.moto_endpoint, &rule).await;
    let _ = env
        .admin
        .dynamodb
        .delete_table()
        .table_name(&table)
        .send()
        .await;
    if let Ok(url) = env
        .admin
        .sqs
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await
    {
        if let Some(url) = url.queue_url() {
            let _ = env.admin.sqs.delete_queue().queue_url(url).send().await;
        }
    }
    result
}

async fn unroute(moto_endpoint: &str, rule: &str) {
    for (operation, input) in [
        (
            "RemoveTargets",
            json!({ "Rule": rule, "EventBusName": rule, "Ids": ["ActionQueue"] }),
        ),
        ("DeleteRule", json!({ "Name": rule, "EventBusName": rule })),
        ("DeleteEventBus", json!({ "Name": rule })),
    ] {
        let _ = eventbridge_call(moto_endpoint, REGION, ACCOUNT_ID, operation, &input).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn deploy_and_run(
    env: &SoakEnv<'_>,
    config: &SoakConfig,
    table: &str,
    queue: &str,
    rule: &str,
    buckets: Vec<String>,
    models: Vec<BucketModel>,
    shares: Vec<Share>,
) -> Result<SoakOutcome, BoxError> {
    let admin = env.admin;
    admin
        .create_table(table)
        .await
        .map_err(|e| format!("creating table {table}: {e}"))?;
    let queue_url = admin
        .sqs
        .create_queue()
        .queue_name(queue)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            config.visibility_timeout_seconds.to_string(),
        )
        .send()
        .await
        .map_err(|e| format!("creating queue {queue}: {e}"))?
        .queue_url()
        .map(str::to_string)
        .ok_or("create_queue returned no URL")?;
    let queue_arn = admin.queue_arn(&queue_url).await?;
    route_completion_events(env.moto_endpoint, rule, &queue_arn).await?;
    let gateway = env.gateway;
    gateway.set_completion_events(Some(CompletionEvents::to(env.moto_endpoint).on_bus(rule)));
    gateway.set_refresh_duration(config.refresh_base);
    gateway.set_refresh_time_per_object(config.refresh_per_object);
    gateway.set_strict_limits(Some(Duration::from_secs(u64::from(
        config.min_interval_seconds,
    ))));

    let mut env_vars = lambda_aws_env(env.moto_endpoint, &env.gateway.endpoint());
    env_vars.push(("TABLE_NAME".into(), table.to_string()));
    env_vars.push(("LOG_LEVEL".into(), config.log_level.to_string()));
    let mut spec = LambdaSpawn::new(env.aggregator_bin, "S3EventAggregator")
        .timeout(config.aggregator_timeout);
    spec.env = env_vars.clone();
    spec.env.push(("QUEUE_URL".into(), queue_url.clone()));
    spec.env.push((
        "REFRESH_DELAY_SECONDS".into(),
        config.window_seconds.to_string(),
    ));
    let aggregator = RespawningLambda::spawn(spec)
        .await
        .map_err(|e| format!("starting the aggregator: {e}"))?;
    let mut spec = LambdaSpawn::new(env.refresher_bin, "S3StorageGatewayRefresh")
        .timeout(config.refresher_timeout);
    spec.env = env_vars;
    spec.env.push((
        "MIN_REFRESH_INTERVAL_SECONDS".into(),
        config.min_interval_seconds.to_string(),
    ));
    // The soak shortens the interval, which the function takes only with the
    // acknowledgement.
    spec.env
        .push(("ALLOW_SHORT_REFRESH_INTERVAL".into(), "true".into()));
    let refresher = RespawningLambda::spawn(spec)
        .await
        .map_err(|e| format!("starting the refresher: {e}"))?;

    let share_index = shares
        .iter()
        .enumerate()
        .map(|(i, s)| (s.arn.clone(), i))
        .collect();
    let ctx = Ctx {
        env,
        config,
        table: table.to_string(),
        queue_url,
        queue_arn,
        buckets,
        models,
        shares,
        share_index,
        aggregator,
        refresher,
    };
    let outcome = soak(&ctx).await;
    let Ctx {
        aggregator,
        refresher,
        ..
    } = ctx;
    let _ = aggregator.shutdown().await;
    let _ = refresher.shutdown().await;
    outcome
}

/// The writes, the event source mapping, the faults and the sampler, together; then
/// the analysis.
async fn soak(ctx: &Ctx<'_>) -> Result<SoakOutcome, BoxError> {
    let config = ctx.config;
    let gateway = ctx.env.gateway;
    let calls_before = gateway.calls().len();
    let refreshes_before = gateway.refreshes().len();
    let completions_before = gateway.completion_events().len();
    let rejected_before = gateway.rejected_refreshes();
    let violations_before = gateway.interval_violations();
    let journal = Mutex::new(Journal {
        max_pending: vec![0; ctx.shares.len()],
        ..Default::default()
    });
    let writes_done = AtomicBool::new(false);
    let faults_done = AtomicBool::new(false);
    let drained = AtomicBool::new(false);
    let started = Instant::now();
    let t0 = now_us();
    println!(
        "    soak: {} writes at {}/s into {} buckets (a share on gateway A and one on B each), W = {} s, MIN_REFRESH_INTERVAL_SECONDS = {} s",
        config.writes(),
        config.rate,
        config.buckets,
        config.window_seconds,
        config.min_interval_seconds
    );
    let (written, mapping, (), ()) = tokio::join!(
        async {
            let r = write_loop(ctx, &journal, started).await;
            writes_done.store(true, Ordering::SeqCst);
            r
        },
        async {
            let r = event_source_mapping(ctx, &journal, &writes_done, &faults_done).await;
            drained.store(true, Ordering::SeqCst);
            r
        },
        async {
            fault_controller(ctx, &journal, started, &writes_done).await;
            faults_done.store(true, Ordering::SeqCst);
        },
        sampler(ctx, &journal, &drained),
    );
    let written = written?;
    let mapping = mapping?;
    let drained_after = mapping
        .drained_at
        .map(|at| at.saturating_duration_since(written.ended));

    // What reached the stand-in.
    let records: Vec<_> = gateway.refreshes()[refreshes_before..].to_vec();
    let completions: Vec<_> = gateway.completion_events()[completions_before..].to_vec();
    let completed: HashMap<String, Micros> = completions
        .iter()
        .map(|c| (c.notification_id.clone(), micros(c.completed)))
        .collect();
    let calls: Vec<Call> = records
        .iter()
        .filter_map(|r| {
            Some(Call {
                share: *ctx.share_index.get(&r.share_arn)?,
                start: micros(r.started_at),
                end: completed.get(&r.notification_id).copied(),
                folders: r.folder_list.clone(),
                recursive: r.recursive,
            })
        })
        .collect();
    let mut failed_calls = vec![0; ctx.shares.len()];
    let mut rejected = Vec::new();
    let mut failed_at: Vec<Vec<Micros>> = vec![Vec::new(); ctx.shares.len()];
    for call in &gateway.calls()[calls_before..] {
        if call.operation != "RefreshCache" {
            continue;
        }
        let Some(&s) = call
            .body
            .get("FileShareARN")
            .and_then(Value::as_str)
            .and_then(|arn| ctx.share_index.get(arn))
        else {
            continue;
        };
        match (&call.error_type, call.injected) {
            (None, _) => {}
            (Some(_), true) => {
                failed_calls[s] += 1;
                failed_at[s].push(micros(call.at));
            }
            (Some(error), false) => rejected.push((s, micros(call.at), error.clone())),
        }
    }
    let mut j = lock(&journal).clone_out();
    // The failing gateway: its stretch, and the failed calls in a row each share saw.
    let failure_streak: Vec<u32> = failed_at.iter().map(|f| f.len() as u32).collect();
    if let Some((from, to)) = j.failure_window {
        let failing: BTreeSet<usize> = (0..ctx.shares.len())
            .filter(|s| ctx.shares[*s].class == 1)
            .collect();
        let streak = failure_streak.iter().copied().max().unwrap_or(0);
        j.faults.push(Fault {
            kind: FaultKind::GatewayFailing,
            at: from,
            until: to,
            term: Term::Fixed(to - from + backoff_step(streak)),
            scope: Scope::Shares(failing),
        });
    }
    // Duplicated events, as the stand-in put them.
    for c in completions.iter().filter(|c| c.copies > 1) {
        if let Some(&s) = ctx.share_index.get(&c.share_arn) {
            j.faults.push(Fault {
                kind: FaultKind::CompletionDuplicated,
                at: micros(c.completed),
                until: micros(c.completed),
                term: Term::Zero,
                scope: Scope::Shares([s].into()),
            });
        }
    }
    j.faults.sort_by_key(|f| f.at);
    let dropped_copies = completions
        .iter()
        .filter(|c| c.copies > 1 && j.dropped_ids.contains(&c.notification_id))
        .count();
    // The completion events' lateness, from each refresh's completion.
    for (id, handled) in &j.completion_handled {
        if let Some(done) = completed.get(id) {
            j.queue.lateness[2].push((handled - done).max(0));
        }
    }

    // The bound per class, with S measured and k from the largest backlog seen.
    let sqs = j
        .queue
        .lateness
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(0);
    let bounds: Vec<Bound> = (0..2)
        .map(|class| {
            let members: BTreeSet<usize> = (0..ctx.shares.len())
                .filter(|s| ctx.shares[*s].class == class)
                .collect();
            let max_pending = members.iter().map(|s| j.max_pending[*s]).max().unwrap_or(0);
            Bound {
                window: Micros::from(config.window_seconds) * SECOND,
                margin: CLOCK_MARGIN,
                hops: config.window_seconds.div_ceil(900).max(1),
                sqs,
                pace: Micros::from(config.min_interval_seconds) * SECOND + CLOCK_MARGIN,
                both_slots: both_slots_time(&calls, &members),
                calls: backlog_calls(max_pending),
            }
        })
        .collect();
    let coverage = coverage(
        &written.writes,
        &ctx.shares,
        &calls,
        &j.faults,
        &bounds,
        config.visibility(),
    );

    // The end state of the share and bucket items.
    let mut share_end = Vec::new();
    for share in &ctx.shares {
        share_end.push(share_end_state(ctx, share, &j.dropped_ids, &calls).await?);
    }
    let mut buckets_not_handed_off = Vec::new();
    for bucket in &ctx.buckets {
        if !bucket_handed_off(ctx, bucket).await? {
            buckets_not_handed_off.push(bucket.clone());
        }
    }
    let new_folder_writes = written
        .writes
        .iter()
        .filter(|w| w.key.contains("/new-"))
        .count();
    let distinct_folders = written
        .writes
        .iter()
        .map(|w| {
            (
                w.bucket,
                w.key.rsplit_once('/').map_or("", |(f, _)| f).to_string(),
            )
        })
        .collect::<BTreeSet<_>>()
        .len();
    // The timeline, for the log.
    for f in &j.faults {
        eprintln!(
            "soak: fault +{:.3} s..+{:.3} s {:?} {:?}",
            (f.at - t0) as f64 / 1e6,
            (f.until - t0) as f64 / 1e6,
            f.kind,
            f.scope
        );
    }
    for c in &calls {
        eprintln!(
            "soak: call +{:.3} s done +{} on {} ({} folder(s){}): {:?}",
            (c.start - t0) as f64 / 1e6,
            c.end.map_or_else(
                || "never".to_string(),
                |e| format!("{:.3} s", (e - t0) as f64 / 1e6)
            ),
            ctx.shares[c.share].label,
            c.folders.len(),
            if c.recursive { ", recursive" } else { "" },
            c.folders
        );
    }
    for (s, at) in failed_at.iter().enumerate() {
        for t in at {
            eprintln!(
                "soak: failed call +{:.3} s on {}",
                (t - t0) as f64 / 1e6,
                ctx.shares[s].label
            );
        }
    }
    for (kind, samples) in ["windows", "wake-ups", "completion events"]
        .iter()
        .zip(&j.queue.lateness)
    {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        eprintln!(
            "soak: lateness of {kind}: n {} p50 {:?} p99 {:?} max {:?} (ms)",
            sorted.len(),
            analysis::percentile(&sorted, 50.0).map(|v| v / 1000),
            analysis::percentile(&sorted, 99.0).map(|v| v / 1000),
            sorted.last().map(|v| v / 1000)
        );
    }
    let first = written.writes.first().map_or(t0, |w| w.at);
    let last = written.writes.last().map_or(t0, |w| w.at);
    Ok(SoakOutcome {
        config: config.clone(),
        t0,
        shares: ctx.shares.clone(),
        new_folder_writes,
        distinct_folders,
        write_span: Duration::from_micros((last - first).max(0) as u64),
        max_lag: written.max_lag,
        writes: written.writes,
        faults: j.faults,
        calls,
        failed_calls,
        rejected,
        rejected_in_flight: gateway.rejected_refreshes() - rejected_before,
        rejected_too_soon: gateway.interval_violations() - violations_before,
        failure_window: j.failure_window,
        failure_streak,
        completions: completions.len(),
        dropped_copies,
        queue: j.queue,
        aggregator: written.stats,
        aggregator_spawns: ctx.aggregator.spawns(),
        refresher_spawns: ctx.refresher.spawns(),
        unexpected: j.unexpected,
        max_pending: j.max_pending,
        bounds,
        coverage,
        share_end,
        buckets_not_handed_off,
        drained_after,
        drain_error: mapping.error,
    })
}

impl Journal {
    fn clone_out(&mut self) -> Journal {
        std::mem::take(self)
    }
}

// ------------------------------------------------------------------------------------
// S3 → aggregator
// ------------------------------------------------------------------------------------

struct Written {
    writes: Vec<Write>,
    stats: AggregatorStats,
    max_lag: Duration,
    ended: Instant,
}

/// An event whose invocation died, for Lambda's asynchronous retry.
struct Retry {
    due: Instant,
    write: usize,
    payload: Value,
    attempt: u32,
}

/// A rolling median of recent handler times: where a "random point" of an
/// invocation lies.
#[derive(Default)]
struct HandlerTimes(VecDeque<Duration>, bool);

impl HandlerTimes {
    fn push(&mut self, d: Duration) {
        if self.0.len() == 50 {
            self.0.pop_front();
        }
        self.0.push_back(d);
    }

    /// A random point up to 1.2 times the median handler time (or `default`); up to
    /// half of it when the previous kill came after the response.
    fn kill_point(&self, rng: &mut Rng, default: Duration) -> Duration {
        let mut sorted: Vec<Duration> = self.0.iter().copied().collect();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(default);
        median.mul_f64(if self.1 { 0.5 } else { 1.2 } * rng.unit())
    }

    /// Whether the last kill came after the response.
    fn missed(&mut self, missed: bool) {
        self.1 = missed;
    }
}

/// One S3 notification for a new object, as S3 sends it to Lambda.
fn notification(bucket: &str, key: &str, at: Micros, sequence: usize) -> Value {
    json!({ "Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": rfc3339_millis(UNIX_EPOCH + Duration::from_micros(at.max(0) as u64)),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": format!("{sequence:016X}"),
            "x-amz-id-2": "EXAMPLE123/5678abcdefghijklambdaisawesome/mnopqrstuvwxyzABCDEFGH"
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "s3-event-aggregator",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": format!("arn:aws:s3:::{bucket}")
            },
            "object": {
                "key": key,
                "size": 1024,
                "eTag": "0123456789abcdef0123456789abcdef",
                "sequencer": format!("{sequence:016X}")
            }
        }
    }]})
}

/// Writes the objects on schedule, each put into its bucket's model and then handed
/// to the aggregator as one S3 notification, with kills between and during
/// invocations and Lambda's retries of the events whose invocation died.
async fn write_loop(
    ctx: &Ctx<'_>,
    journal: &Mutex<Journal>,
    start: Instant,
) -> Result<Written, BoxError> {
    let config = ctx.config;
    let count = config.writes();
    let mut rng = Rng(config.seed ^ 0xA66);
    let mut next_mid = config.kills.aggregator_mid.map(|m| start + rng.gap(m));
    let mut next_idle = config.kills.aggregator_idle.map(|m| start + rng.gap(m));
    let mut out = Written {
        writes: Vec::with_capacity(count),
        stats: AggregatorStats::default(),
        max_lag: Duration::ZERO,
        ended: start,
    };
    let mut retries: VecDeque<Retry> = VecDeque::new();
    let mut times = HandlerTimes::default();
    for i in 0..=count {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(config.rate));
        // Lambda's retries that are due first.
        while retries.front().is_some_and(|r| r.due <= due || i == count) {
            let Some(retry) = retries.pop_front() else {
                break;
            };
            tokio::time::sleep_until(tokio::time::Instant::from_std(retry.due)).await;
            out.stats.retries += 1;
            if retry.attempt >= 2 {
                out.stats.retried_twice += 1;
            }
            invoke_aggregator(
                ctx,
                journal,
                &mut out,
                &mut retries,
                &mut times,
                &mut rng,
                retry.write,
                retry.payload,
                retry.attempt + 1,
                false,
            )
            .await?;
        }
        if i == count {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        out.max_lag = out
            .max_lag
            .max(Instant::now().saturating_duration_since(due));
        if next_idle.is_some_and(|t| Instant::now() >= t) {
            let at = now_us();
            ctx.aggregator
                .kill_and_respawn()
                .await
                .map_err(|e| format!("killing the aggregator between invocations: {e}"))?;
            lock(journal).faults.push(Fault {
                kind: FaultKind::AggregatorKilledIdle,
                at,
                until: at,
                term: Term::Zero,
                scope: Scope::Shares(BTreeSet::new()),
            });
            next_idle = config
                .kills
                .aggregator_idle
                .map(|m| Instant::now() + rng.gap(m));
        }
        let (bucket, key) = config.planned_write(i);
        ctx.models[bucket].put(key.clone());
        // After the put: a refresh that starts later lists the object.
        let at = now_us();
        let payload = notification(&ctx.buckets[bucket], &key, at, i);
        out.writes.push(Write {
            bucket,
            key,
            at,
            processed: None,
        });
        let arm = next_mid.is_some_and(|t| Instant::now() >= t);
        if arm {
            next_mid = config
                .kills
                .aggregator_mid
                .map(|m| Instant::now() + rng.gap(m));
        }
        invoke_aggregator(
            ctx,
            journal,
            &mut out,
            &mut retries,
            &mut times,
            &mut rng,
            i,
            payload,
            0,
            arm,
        )
        .await?;
    }
    out.ended = Instant::now();
    Ok(out)
}

/// One invocation of the aggregator for write `w` (attempt 0, or a retry); with
/// `kill`, the process is SIGKILLed at a random point of it.
#[allow(clippy::too_many_arguments)]
async fn invoke_aggregator(
    ctx: &Ctx<'_>,
    journal: &Mutex<Journal>,
    out: &mut Written,
    retries: &mut VecDeque<Retry>,
    times: &mut HandlerTimes,
    rng: &mut Rng,
    w: usize,
    payload: Value,
    attempt: u32,
    kill: bool,
) -> Result<(), BoxError> {
    out.stats.invocations += 1;
    let started_us = now_us();
    let started = Instant::now();
    let result = if kill {
        let after = times.kill_point(rng, Duration::from_millis(10));
        let killed = ctx
            .aggregator
            .invoke_and_kill(payload.clone(), after)
            .await
            .map_err(|e| format!("aggregator invocation for write {w} (killed): {e}"))?;
        times.missed(!killed.mid_invocation);
        let at = started_us + killed.killed_after.as_micros() as Micros;
        lock(journal).faults.push(Fault {
            kind: if killed.mid_invocation {
                FaultKind::AggregatorKilledMidInvocation
            } else {
                FaultKind::AggregatorKilledAfterResponse
            },
            at,
            until: at,
            term: Term::Zero,
            scope: Scope::Write(w),
        });
        killed.result
    } else {
        ctx.aggregator.invoke(payload.clone()).await
    };
    match result {
        Ok(Invocation::Response(_)) => {
            times.push(started.elapsed());
            out.writes[w].processed = Some(started_us);
            return Ok(());
        }
        Ok(Invocation::Error {
            error_type,
            error_message,
        }) => {
            out.stats
                .errors
                .push(format!("write {w}: {error_type}: {error_message}"));
        }
        Err(HarnessError::ProcessExited { .. }) if kill => {}
        Err(e) => {
            // Not ours: the process died or hung on its own. Lambda would retry it too.
            lock(journal)
                .unexpected
                .push(format!("aggregator invocation for write {w}: {e}"));
            if ctx.aggregator.current().has_exited() {
                ctx.aggregator.kill_and_respawn().await?;
            }
        }
    }
    retries.push_back(Retry {
        due: Instant::now() + ctx.config.async_retry_delay,
        write: w,
        payload,
        attempt,
    });
    Ok(())
}

// ------------------------------------------------------------------------------------
// Action queue → refresher
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Window,
    WakeUp,
    Completion,
}

/// One received message, read.
struct Incoming {
    message: Message,
    kind: Kind,
    receive_count: u32,
    /// When it was due, in ms (windows and wake-ups).
    due_ms: Option<i64>,
    /// The shares it may make the refresher act on.
    shares: BTreeSet<usize>,
    /// Completion events: the share and the refresh's notification id.
    completion: Option<(usize, String)>,
}

fn read_message(ctx: &Ctx<'_>, message: Message) -> Incoming {
    let body: Value =
        serde_json::from_str(message.body().unwrap_or_default()).unwrap_or(Value::Null);
    let attribute = |name: MessageSystemAttributeName| -> Option<i64> {
        message
            .attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse().ok())
    };
    let receive_count =
        attribute(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1) as u32;
    let sent_ms = attribute(MessageSystemAttributeName::SentTimestamp).unwrap_or(0);
    let bucket_shares = |bucket: &str| -> BTreeSet<usize> {
        ctx.buckets
            .iter()
            .position(|b| b == bucket)
            .map(|b| {
                (0..ctx.shares.len())
                    .filter(|s| ctx.shares[*s].bucket == b)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut incoming = Incoming {
        message,
        kind: Kind::Window,
        receive_count,
        due_ms: None,
        shares: BTreeSet::new(),
        completion: None,
    };
    if body.get("kind").and_then(Value::as_str) == Some("wake") {
        incoming.kind = Kind::WakeUp;
        incoming.due_ms = body.get("visibleAtMs").and_then(Value::as_i64);
        if let Some(&s) = body
            .get("shareArn")
            .and_then(Value::as_str)
            .and_then(|arn| ctx.share_index.get(arn))
        {
            incoming.shares.insert(s);
        }
    } else if body.get("source").and_then(Value::as_str) == Some(REFRESH_EVENT_SOURCE) {
        incoming.kind = Kind::Completion;
        let share = body
            .get("resources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|arn| ctx.share_index.get(arn).copied());
        let detail = match body.get("detail") {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::Null),
            Some(v) => v.clone(),
            None => Value::Null,
        };
        let id = detail
            .get("notification-id")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let (Some(s), Some(id)) = (share, id) {
            incoming.shares.insert(s);
            incoming.completion = Some((s, id));
        }
    } else {
        let bucket = body
            .get("bucket")
            .and_then(Value::as_str)
            .unwrap_or_default();
        incoming.shares = bucket_shares(bucket);
        // The window's own message (sent just before the window opened, delayed by
        // W); a message sent back later has another delay and is not timed.
        let opened = body.get("windowOpenedAtMs").and_then(Value::as_i64);
        if opened.is_some_and(|o| sent_ms <= o + 500) {
            incoming.due_ms = Some(sent_ms + i64::from(ctx.config.window_seconds) * 1000);
        }
    }
    incoming
}

struct Mapping {
    drained_at: Option<Instant>,
    error: Option<String>,
}

/// Lambda's SQS event source mapping for the refresher, with the kills and the
/// completion events' faults; runs until the writes and the faults are over and
/// everything drained (or the drain limit passed).
async fn event_source_mapping(
    ctx: &Ctx<'_>,
    journal: &Mutex<Journal>,
    writes_done: &AtomicBool,
    faults_done: &AtomicBool,
) -> Result<Mapping, BoxError> {
    let config = ctx.config;
    let admin = ctx.env.admin;
    let mut rng = Rng(config.seed ^ 0x5E5);
    let start = Instant::now();
    let mut next_mid = config.kills.refresher_mid.map(|m| start + rng.gap(m));
    let mut next_idle = config.kills.refresher_idle.map(|m| start + rng.gap(m));
    let mut times = HandlerTimes::default();
    let mut drain_deadline: Option<Instant> = None;
    let mut last_reason = String::new();
    loop {
        let writing = !writes_done.load(Ordering::SeqCst);
        if !writing && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + config.drain_limit);
        }
        if writing && next_idle.is_some_and(|t| Instant::now() >= t) {
            let at = now_us();
            ctx.refresher
                .kill_and_respawn()
                .await
                .map_err(|e| format!("killing the refresher between invocations: {e}"))?;
            lock(journal).faults.push(Fault {
                kind: FaultKind::RefresherKilledIdle,
                at,
                until: at,
                term: Term::Zero,
                scope: Scope::Shares(BTreeSet::new()),
            });
            next_idle = config
                .kills
                .refresher_idle
                .map(|m| Instant::now() + rng.gap(m));
        }
        let received = admin
            .sqs
            .receive_message()
            .queue_url(&ctx.queue_url)
            .max_number_of_messages(REFRESHER_BATCH)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| format!("receiving from the action queue: {e}"))?
            .messages()
            .to_vec();
        if received.is_empty() {
            if !writing && faults_done.load(Ordering::SeqCst) {
                match drain_state(ctx, journal).await? {
                    None => {
                        return Ok(Mapping {
                            drained_at: Some(Instant::now()),
                            error: None,
                        })
                    }
                    Some(reason) => {
                        if reason != last_reason {
                            eprintln!(
                                "soak: +{:.1} s after the writes, not drained yet: {reason}",
                                start.elapsed().as_secs_f64() - f64::from(config.seconds)
                            );
                        }
                        last_reason = reason;
                    }
                }
            }
            if drain_deadline.is_some_and(|t| Instant::now() > t) {
                return Ok(Mapping {
                    drained_at: None,
                    error: Some(format!(
                        "not drained {:?} after the last write: {last_reason}",
                        config.drain_limit
                    )),
                });
            }
            continue;
        }
        let mut batch = Vec::new();
        for message in received {
            let incoming = read_message(ctx, message);
            // The completion events' faults, on their first delivery.
            if let (Some((share, id)), 1) = (&incoming.completion, incoming.receive_count) {
                let message_id = incoming
                    .message
                    .message_id()
                    .unwrap_or_default()
                    .to_string();
                let receipt = incoming
                    .message
                    .receipt_handle()
                    .unwrap_or_default()
                    .to_string();
                let at = now_us();
                let may_drop = writing && start.elapsed() >= config.completions.drops_from && {
                    let j = lock(journal);
                    j.dropped_ids.len() < config.completions.drops
                        && !j.dropped_shares.contains(share)
                };
                let may_drop = may_drop && only_slot(ctx, *share, id).await?;
                // `Some(None)`: drop it; `Some(Some(seconds))`: delay it.
                let fault = {
                    let mut j = lock(journal);
                    if may_drop && rng.unit() < config.completions.drop_probability {
                        j.dropped_ids.insert(id.clone());
                        j.dropped_shares.insert(*share);
                        j.faults.push(Fault {
                            kind: FaultKind::CompletionDropped,
                            at,
                            until: at,
                            term: Term::Zero,
                            scope: Scope::Shares([*share].into()),
                        });
                        Some(None)
                    } else if !j.delayed.contains(&message_id)
                        && rng.unit() < config.completions.delay_probability
                    {
                        let (low, high) = config.completions.delay;
                        let delay = rng.between(low, high).as_secs().max(1);
                        j.delayed.insert(message_id);
                        j.faults.push(Fault {
                            kind: FaultKind::CompletionDelayed,
                            at,
                            until: at + delay as Micros * SECOND,
                            term: Term::Fixed(delay as Micros * SECOND),
                            scope: Scope::Shares([*share].into()),
                        });
                        Some(Some(delay))
                    } else {
                        None
                    }
                };
                match fault {
                    Some(None) => {
                        admin
                            .sqs
                            .delete_message()
                            .queue_url(&ctx.queue_url)
                            .receipt_handle(receipt)
                            .send()
                            .await
                            .map_err(|e| format!("dropping a completion event: {e}"))?;
                        continue;
                    }
                    Some(Some(delay)) => {
                        admin
                            .sqs
                            .change_message_visibility()
                            .queue_url(&ctx.queue_url)
                            .receipt_handle(receipt)
                            .visibility_timeout(delay as i32)
                            .send()
                            .await
                            .map_err(|e| format!("delaying a completion event: {e}"))?;
                        continue;
                    }
                    None => {}
                }
            }
            batch.push(incoming);
        }
        if batch.is_empty() {
            continue;
        }
        let messages: Vec<Message> = batch.iter().map(|m| m.message.clone()).collect();
        {
            let mut j = lock(journal);
            let q = &mut j.queue;
            q.invocations += 1;
            q.messages += batch.len();
            for m in &batch {
                match m.kind {
                    Kind::Window => q.windows += 1,
                    Kind::WakeUp => q.wake_ups += 1,
                    Kind::Completion => q.completion_events += 1,
                }
                if m.receive_count > 1 {
                    q.redelivered += 1;
                }
            }
        }
        let event = lambda_sqs_event(&messages, &ctx.queue_arn);
        // No kill aimed at a batch that concerns a share that lost an event.
        let protected = {
            let j = lock(journal);
            batch
                .iter()
                .any(|m| m.shares.iter().any(|s| j.dropped_shares.contains(s)))
        };
        let arm = writing && !protected && next_mid.is_some_and(|t| Instant::now() >= t);
        if arm {
            next_mid = config
                .kills
                .refresher_mid
                .map(|m| Instant::now() + rng.gap(m));
        }
        let started_us = now_us();
        let started = Instant::now();
        let (result, killed) = if arm {
            let after = times.kill_point(&mut rng, Duration::from_millis(200));
            let killed = ctx
                .refresher
                .invoke_and_kill(event, after)
                .await
                .map_err(|e| format!("refresher invocation (killed): {e}"))?;
            times.missed(!killed.mid_invocation);
            let at = started_us + killed.killed_after.as_micros() as Micros;
            let touched: BTreeSet<usize> = batch
                .iter()
                .flat_map(|m| m.shares.iter().copied())
                .collect();
            lock(journal).faults.push(if killed.mid_invocation {
                Fault {
                    kind: FaultKind::RefresherKilledMidInvocation,
                    at,
                    until: at,
                    term: Term::VisibilityPlusS,
                    scope: Scope::Shares(touched),
                }
            } else {
                Fault {
                    kind: FaultKind::RefresherKilledAfterResponse,
                    at,
                    until: at,
                    term: Term::Zero,
                    scope: Scope::Shares(BTreeSet::new()),
                }
            });
            (killed.result, killed.mid_invocation)
        } else {
            (ctx.refresher.invoke(event).await, false)
        };
        let ended = now_us();
        let failed: Vec<String> = match result {
            Ok(Invocation::Response(value)) => {
                times.push(started.elapsed());
                value["batchItemFailures"]
                    .as_array()
                    .map(|f| {
                        f.iter()
                            .filter_map(|i| i["itemIdentifier"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            Ok(Invocation::Error {
                error_type,
                error_message,
            }) => {
                lock(journal)
                    .unexpected
                    .push(format!("refresher failed: {error_type}: {error_message}"));
                messages
                    .iter()
                    .filter_map(|m| m.message_id().map(str::to_string))
                    .collect()
            }
            Err(_) if killed => continue,
            Err(e) => {
                lock(journal)
                    .unexpected
                    .push(format!("refresher invocation: {e}"));
                if ctx.refresher.current().has_exited() {
                    ctx.refresher.kill_and_respawn().await?;
                }
                continue;
            }
        };
        {
            let mut j = lock(journal);
            j.queue.batch_item_failures += failed.len();
            for m in batch.iter().filter(|m| m.receive_count == 1) {
                match (m.kind, m.due_ms, &m.completion) {
                    (Kind::Window, Some(due), _) => {
                        j.queue.lateness[0].push((ended - due * 1000).max(0))
                    }
                    (Kind::WakeUp, Some(due), _) => {
                        j.queue.lateness[1].push((ended - due * 1000).max(0))
                    }
                    (Kind::Completion, _, Some((_, id))) => {
                        j.completion_handled.push((id.clone(), ended));
                    }
                    _ => {}
                }
            }
        }
        for m in &messages {
            if m.message_id()
                .is_some_and(|id| failed.iter().any(|f| f == id))
            {
                continue;
            }
            if let Some(handle) = m.receipt_handle() {
                admin
                    .sqs
                    .delete_message()
                    .queue_url(&ctx.queue_url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| format!("deleting a message: {e}"))?;
            }
        }
    }
}

/// `None` when everything drained: no message visible or in flight, every bucket's
/// latest window handed off, no share with pending listings, and every slot left
/// explained (its completion event was dropped, or its claim's invocation was killed
/// and its listings went back); else why not.
async fn drain_state(ctx: &Ctx<'_>, journal: &Mutex<Journal>) -> Result<Option<String>, BoxError> {
    let out = ctx
        .env
        .admin
        .sqs
        .get_queue_attributes()
        .queue_url(&ctx.queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| format!("reading the action queue's depth: {e}"))?;
    let busy: u64 = out
        .attributes()
        .map(|a| a.values().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    if busy > 0 {
        return Ok(Some(format!("{busy} message(s) visible or in flight")));
    }
    for bucket in &ctx.buckets {
        if !bucket_handed_off(ctx, bucket).await? {
            return Ok(Some(format!(
                "bucket {bucket}'s latest window not handed off"
            )));
        }
    }
    let dropped = lock(journal).dropped_ids.clone();
    for share in &ctx.shares {
        let end = share_end_state(ctx, share, &dropped, &[]).await?;
        if end.pending > 0 {
            return Ok(Some(format!("{}: {} pending", share.label, end.pending)));
        }
        if let Some((slot, _)) = end.slots.iter().find(|(_, why)| why.is_none()) {
            return Ok(Some(format!("{}: slot {slot} in flight", share.label)));
        }
    }
    Ok(None)
}

type Item = HashMap<String, AttributeValue>;

/// Whether the share's item holds no slot but the one of the refresh `id` (its other
/// slot is free).
async fn only_slot(ctx: &Ctx<'_>, share: usize, id: &str) -> Result<bool, BoxError> {
    let Some(item) = get_item(ctx, &format!("share#{}", ctx.shares[share].arn)).await? else {
        return Ok(false);
    };
    Ok(item
        .get("Slots")
        .and_then(|v| v.as_l().ok())
        .into_iter()
        .flatten()
        .filter_map(|slot| slot.as_m().ok())
        .all(|slot| {
            slot.get("NotificationId")
                .and_then(|v| v.as_s().ok())
                .map(String::as_str)
                == Some(id)
        }))
}

async fn get_item(ctx: &Ctx<'_>, key: &str) -> Result<Option<Item>, BoxError> {
    Ok(ctx
        .env
        .admin
        .bucket_item(&ctx.table, key)
        .await
        .map_err(|e| format!("reading item {key}: {e}"))?)
}

fn number(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

async fn bucket_handed_off(ctx: &Ctx<'_>, bucket: &str) -> Result<bool, BoxError> {
    let item = get_item(ctx, bucket).await?.unwrap_or_default();
    Ok(number(&item, "Generation").unwrap_or(0)
        <= number(&item, "RefreshedGeneration").unwrap_or(0))
}

/// A share item's pending listings and slots, each slot with why it is still there:
/// its completion event was dropped (the 20-minute lease frees it), or its claim has
/// no call recorded and its listings went back to pending (the claiming invocation was
/// killed; the lease frees it). `calls` (when given) tells whether a call with the
/// claim's folders reached the gateway after the claim.
async fn share_end_state(
    ctx: &Ctx<'_>,
    share: &Share,
    dropped: &HashSet<String>,
    calls: &[Call],
) -> Result<ShareEnd, BoxError> {
    let Some(item) = get_item(ctx, &format!("share#{}", share.arn)).await? else {
        return Ok(ShareEnd::default());
    };
    let pending = item
        .get("Pending")
        .and_then(|v| v.as_ss().ok())
        .map_or(0, Vec::len);
    let mut slots = Vec::new();
    for slot in item
        .get("Slots")
        .and_then(|v| v.as_l().ok())
        .into_iter()
        .flatten()
    {
        let Ok(slot) = slot.as_m() else {
            continue;
        };
        let id = slot
            .get("NotificationId")
            .and_then(|v| v.as_s().ok())
            .cloned();
        let returned = slot
            .get("Returned")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false);
        let claimed = number(slot, "ClaimedAt").unwrap_or(0);
        let folders: Vec<String> = slot
            .get("FolderList")
            .and_then(|v| v.as_l().ok())
            .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
            .unwrap_or_default();
        let s = ctx.share_index.get(&share.arn).copied();
        let called = calls.iter().any(|c| {
            Some(c.share) == s && c.start >= claimed * 1000 - 5 * SECOND && {
                let (mut a, mut b) = (c.folders.clone(), folders.clone());
                a.sort();
                b.sort();
                a == b
            }
        });
        let why = match &id {
            Some(id) if dropped.contains(id) => Some("its completion event was dropped; the lease frees it"),
            None if returned && !called => Some(
                "claimed by an invocation that was killed before its call; its listings went back to pending, the lease frees it",
            ),
            None if returned => Some(
                "claimed by an invocation that was killed after its call reached the gateway; its listings went back to pending, the lease frees it",
            ),
            _ => None,
        };
        slots.push((
            id.unwrap_or_else(|| {
                format!("claim at {claimed} ms without a call id, folders {folders:?}")
            }),
            why,
        ));
    }
    Ok(ShareEnd { pending, slots })
}

// ------------------------------------------------------------------------------------
// The gateway's faults, and the backlog sampler
// ------------------------------------------------------------------------------------

/// Gateway B fails every `RefreshCache` for its stretch; the stand-in duplicates the
/// event of a completion now and then while the writes go on.
async fn fault_controller(
    ctx: &Ctx<'_>,
    journal: &Mutex<Journal>,
    start: Instant,
    writes_done: &AtomicBool,
) {
    let config = ctx.config;
    let gateway = ctx.env.gateway;
    let failing = async {
        let Some((offset, length)) = config.failure else {
            return;
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + offset)).await;
        let from = now_us();
        for share in ctx.shares.iter().filter(|s| s.class == 1) {
            gateway.fail_refreshes_of(&share.arn, InjectedFailure::InternalError);
        }
        println!(
            "    soak: gateway B fails every RefreshCache from +{:.0} s",
            offset.as_secs_f64()
        );
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + offset + length)).await;
        for share in ctx.shares.iter().filter(|s| s.class == 1) {
            gateway.clear_refresh_failures_of(&share.arn);
        }
        let to = now_us();
        lock(journal).failure_window = Some((from, to));
        println!(
            "    soak: gateway B answers again from +{:.0} s",
            (offset + length).as_secs_f64()
        );
    };
    let duplicating = async {
        let Some(mean) = config.completions.duplicate_every else {
            return;
        };
        let mut rng = Rng(config.seed ^ 0xD0B);
        loop {
            let next = Instant::now() + rng.gap(mean);
            while Instant::now() < next {
                if writes_done.load(Ordering::SeqCst) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            gateway.duplicate_next_completion_events(1);
        }
    };
    tokio::join!(failing, duplicating);
}

/// Samples every share item's `Pending` set once a second, for k.
async fn sampler(ctx: &Ctx<'_>, journal: &Mutex<Journal>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        for (s, share) in ctx.shares.iter().enumerate() {
            if let Ok(Some(item)) = get_item(ctx, &format!("share#{}", share.arn)).await {
                let pending = item
                    .get("Pending")
                    .and_then(|v| v.as_ss().ok())
                    .map_or(0, Vec::len);
                let mut j = lock(journal);
                j.max_pending[s] = j.max_pending[s].max(pending);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
