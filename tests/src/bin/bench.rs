//! The benchmark behind `BENCHMARKS.md`, run by `scripts/bench.sh`.
//!
//! Everything runs on this machine: moto (DynamoDB, SQS), the Storage Gateway
//! stand-in with in-memory 100,000-object buckets, and the real `aggregator` and
//! `refresher` binaries (`S3EA_BIN_DIR`, normally `target/release`) under the Lambda
//! Runtime API harness. Requests that reach moto are counted at a [`CountingProxy`]
//! in front of it, one proxy per function, so the counts are what really went out.
//!
//! Sections, one function each:
//!
//! 1. [`bursts`]: bursts of S3 events through one warm aggregator, with the refresher
//!    draining the action queue as Lambda's SQS poller would (window messages, the
//!    scheduler's wake-ups and the gateway's refresh-complete events, which an
//!    EventBridge rule in moto routes to the action queue) until every share's
//!    scheduling item is empty, compared with the 2018 protocol on the same events and
//!    with the physical limit of listing work.
//! 2. [`startup`]: cold start, warm handler time and peak RSS of the binaries.
//! 3. [`sizes`]: binary and package sizes.
//! 4. [`logs`]: log bytes per S3 event.
//! 5. [`sustained`]: steady writes for minutes; calls per share, throttles, staleness and
//!    listing work, against modelled replays of the 2018 design and of the previous
//!    per-window refresher.
//! 6. [`soak`]: minutes of writes while the function processes are killed, a gateway
//!    fails and completion events are lost or late; coverage and staleness against the
//!    bound of docs/protocol.md.
//!
//! `bench --help` lists the options.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::{json, Value};

use integration_tests::aws::{
    lambda_aws_env, lambda_sqs_event, sdk_config, unique_name, BoxError, Clients, ACCOUNT_ID,
    REGION,
};
use integration_tests::counting_proxy::CountingProxy;
use integration_tests::moto::Moto;
use integration_tests::runtime_api::{Invocation, LambdaProcess, LambdaSpawn};
use integration_tests::sgw_standin::{
    eventbridge_call, BucketModel, BucketSource, CompletionEvents, ListingWork, RefreshRecord,
    SgwStandIn, ShareKind, REFRESH_EVENT_SOURCE,
};
use integration_tests::stack::{binary, route_completion_events};

/// Objects in every benchmark bucket, spread over [`FOLDERS_PER_BUCKET`] folders.
const OBJECTS_PER_BUCKET: usize = 100_000;
const FOLDERS_PER_BUCKET: usize = 1_000;
/// Lambda's SQS event source mapping: at most 10,000 records and 6 MB per invocation.
const SQS_BATCH_RECORDS: usize = 10_000;
const LAMBDA_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
/// Messages per refresher invocation, as the event source mapping is configured.
const REFRESHER_BATCH: i32 = 10;
/// Targets.
const COLD_START_TARGET_MS: f64 = 50.0;
const RSS_TARGET_KIB: u64 = 20 * 1024;
const ZIP_TARGET_BYTES: u64 = 6_000_000;
const LISTING_TARGET_PERCENT: f64 = 1.0;
/// Listing work of a burst against its physical limit.
const PHYSICAL_LIMIT_TARGET: f64 = 1.5;
/// MIN_REFRESH_INTERVAL_SECONDS of the bursts unless `--min-interval` says otherwise.
const DEFAULT_BURST_MIN_INTERVAL: u32 = 2;
/// `FolderList` takes at most 50 folders.
const MAX_FOLDER_LIST: usize = 50;
/// Why a share can list a window's folders twice.
const CARRY_EXPLAINED: &str = "a window g+1 that opens before the refresher marked window \
g's refreshes as started (`RefreshedGeneration`, step 5, after the hand-off to the shares) \
carries g apart from its own folders (docs/protocol.md, aggregator step 3), and g's mark drops \
it; but when g+1 closes before that mark, or a delivery of g's message dies after its close, \
g's folders are handed to the share a second time and listed again. It is safe (the invariant \
only gains), but it costs listing work";

const USAGE: &str = "\
usage: bench [--out FILE] [--window SECONDS] [--min-interval SECONDS] [--runs N]
             [--only SECTION[,SECTION]] [--scenario ID[,ID]] [--execute-2018 N]
             [--sustained-seconds N] [--sustained-rate N] [--soak-seconds N] [--soak-rate N]

  --out FILE              write the report here (default: BENCHMARKS.md in the workspace)
  --window SECONDS        REFRESH_DELAY_SECONDS of the bursts (default 5)
  --min-interval SECONDS  the refresher's MIN_REFRESH_INTERVAL_SECONDS in the bursts, and the
                          stand-in's strict interval there (default 2)
  --runs N                runs per figure of the startup section (default 30, at least 20)
  --only SECTIONS         bursts, startup, sizes, logs, sustained, soak (default: all six); a
                          run of only soak into an existing report replaces just its section
  --scenario IDS          only these burst scenarios (ids as in the report, e.g. direct-10000x1x1)
  --execute-2018 N        execute the 2018 protocol's writes on moto for bursts of up to N events
                          (default 1000); larger bursts are counted only
  --sustained-seconds N   how long the sustained section writes (default 180)
  --sustained-rate N      objects written per second in the sustained section (default 20)
  --soak-seconds N        how long the soak section writes (default 300)
  --soak-rate N           objects written per second in the soak section (default 10)

Environment: S3EA_BIN_DIR (the Lambda binaries, e.g. target/release), MOTO_ENDPOINT
(a running moto server; one is spawned otherwise), BENCH_COMMAND (the command line to
quote in the report), BENCH_STARTED_MS (epoch ms when scripts/bench.sh started).";

#[path = "bench_logs/logs.rs"]
mod logs;
#[path = "bench_soak/soak.rs"]
mod soak;
#[path = "bench_sustained/sustained.rs"]
mod sustained;

#[tokio::main]
async fn main() {
    match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => {
            if let Err(e) = run(options).await {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
        Ok(None) => println!("{USAGE}"),
        Err(e) => {
            eprintln!("bench: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

// ------------------------------------------------------------------------------------
// Options
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Bursts,
    Startup,
    Sizes,
    Logs,
    Sustained,
    Soak,
}

#[derive(Debug, Clone)]
struct Options {
    out: PathBuf,
    window_seconds: u32,
    /// MIN_REFRESH_INTERVAL_SECONDS of the bursts (and the stand-in's strict interval).
    min_interval_seconds: u32,
    runs: usize,
    sections: BTreeSet<Section>,
    scenarios: Vec<String>,
    /// Execute the 2018 protocol's writes on moto for bursts of up to this many events.
    execute_2018: usize,
    /// The sustained section: how long it writes, and how many objects per second.
    sustained_seconds: u32,
    sustained_rate: u32,
    /// The soak section: how long it writes, and how many objects per second.
    soak_seconds: u32,
    soak_rate: u32,
    /// The driver's own arguments, for the report's commands.
    args: Vec<String>,
}

impl Options {
    /// `Ok(None)` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
        let args: Vec<String> = args.collect();
        let mut options = Options {
            out: workspace_root().join("BENCHMARKS.md"),
            window_seconds: 5,
            min_interval_seconds: DEFAULT_BURST_MIN_INTERVAL,
            runs: 30,
            sections: [
                Section::Bursts,
                Section::Startup,
                Section::Sizes,
                Section::Logs,
                Section::Sustained,
                Section::Soak,
            ]
            .into(),
            scenarios: Vec::new(),
            execute_2018: 1_000,
            sustained_seconds: sustained::DEFAULT_SECONDS,
            sustained_rate: sustained::DEFAULT_RATE,
            soak_seconds: soak::DEFAULT_SECONDS,
            soak_rate: soak::DEFAULT_RATE,
            args: args.clone(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--out" => options.out = PathBuf::from(value("--out")?),
                "--window" => {
                    let v = value("--window")?;
                    options.window_seconds = v
                        .parse()
                        .ok()
                        .filter(|w| (1..=900).contains(w))
                        .ok_or_else(|| format!("--window takes 1 to 900 seconds, not {v:?}"))?;
                }
                "--min-interval" => {
                    let v = value("--min-interval")?;
                    options.min_interval_seconds = v
                        .parse()
                        .ok()
                        .filter(|w| (1..=3600).contains(w))
                        .ok_or_else(|| {
                            format!("--min-interval takes 1 to 3600 seconds, not {v:?}")
                        })?;
                }
                "--sustained-seconds" => {
                    let v = value("--sustained-seconds")?;
                    options.sustained_seconds = v
                        .parse()
                        .ok()
                        .filter(|s| (10..=3600).contains(s))
                        .ok_or_else(|| {
                            format!("--sustained-seconds takes 10 to 3600 seconds, not {v:?}")
                        })?;
                }
                "--sustained-rate" => {
                    let v = value("--sustained-rate")?;
                    options.sustained_rate = v
                        .parse()
                        .ok()
                        .filter(|r| (1..=200).contains(r))
                        .ok_or_else(|| {
                            format!("--sustained-rate takes 1 to 200 objects per second, not {v:?}")
                        })?;
                }
                "--soak-seconds" => {
                    let v = value("--soak-seconds")?;
                    options.soak_seconds = v
                        .parse()
                        .ok()
                        .filter(|s| (30..=3600).contains(s))
                        .ok_or_else(|| {
                            format!("--soak-seconds takes 30 to 3600 seconds, not {v:?}")
                        })?;
                }
                "--soak-rate" => {
                    let v = value("--soak-rate")?;
                    options.soak_rate = v
                        .parse()
                        .ok()
                        .filter(|r| (1..=100).contains(r))
                        .ok_or_else(|| {
                            format!("--soak-rate takes 1 to 100 objects per second, not {v:?}")
                        })?;
                }
                "--runs" => {
                    let v = value("--runs")?;
                    options.runs = v.parse().ok().filter(|n| *n >= 20).ok_or_else(|| {
                        format!("--runs takes a number of at least 20, not {v:?}")
                    })?;
                }
                "--only" => {
                    options.sections = value("--only")?
                        .split(',')
                        .map(|s| match s.trim() {
                            "bursts" => Ok(Section::Bursts),
                            "startup" => Ok(Section::Startup),
                            "sizes" => Ok(Section::Sizes),
                            "logs" => Ok(Section::Logs),
                            "sustained" => Ok(Section::Sustained),
                            "soak" => Ok(Section::Soak),
                            other => Err(format!(
                                "unknown section {other:?} (bursts, startup, sizes, logs, sustained, soak)"
                            )),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--execute-2018" => {
                    let v = value("--execute-2018")?;
                    options.execute_2018 = v.parse().map_err(|_| {
                        format!("--execute-2018 takes a number of events, not {v:?}")
                    })?;
                }
                "--scenario" => options.scenarios.extend(
                    value("--scenario")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty()),
                ),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let known: Vec<String> = scenarios().iter().map(|s| s.id.clone()).collect();
        if let Some(bad) = options.scenarios.iter().find(|s| !known.contains(s)) {
            return Err(format!(
                "unknown scenario {bad:?}; known: {}",
                known.join(", ")
            ));
        }
        Ok(Some(options))
    }

    /// The command that reproduces the figures of one section (or of one scenario).
    fn command_for(&self, only: &str, scenario: Option<&str>) -> String {
        let mut cmd = format!(
            "bash scripts/bench.sh --out /tmp/bench-{}.md --only {only}",
            scenario.unwrap_or(only)
        );
        let mut driver = String::new();
        if only == "bursts" {
            if self.window_seconds != 5 {
                let _ = write!(driver, " --window {}", self.window_seconds);
            }
            if self.min_interval_seconds != DEFAULT_BURST_MIN_INTERVAL {
                let _ = write!(driver, " --min-interval {}", self.min_interval_seconds);
            }
            if self.execute_2018 != 1_000 {
                let _ = write!(driver, " --execute-2018 {}", self.execute_2018);
            }
        }
        if only == "startup" && self.runs != 30 {
            let _ = write!(driver, " --runs {}", self.runs);
        }
        if only == "sustained" {
            if self.sustained_seconds != sustained::DEFAULT_SECONDS {
                let _ = write!(driver, " --sustained-seconds {}", self.sustained_seconds);
            }
            if self.sustained_rate != sustained::DEFAULT_RATE {
                let _ = write!(driver, " --sustained-rate {}", self.sustained_rate);
            }
        }
        if only == "soak" {
            if self.soak_seconds != soak::DEFAULT_SECONDS {
                let _ = write!(driver, " --soak-seconds {}", self.soak_seconds);
            }
            if self.soak_rate != soak::DEFAULT_RATE {
                let _ = write!(driver, " --soak-rate {}", self.soak_rate);
            }
        }
        if let Some(id) = scenario {
            let _ = write!(driver, " --scenario {id}");
        }
        if !driver.is_empty() {
            let _ = write!(cmd, " --{driver}");
        }
        cmd
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------

/// What every section shares: moto, the stand-in, admin clients (not counted), the
/// binaries.
struct Bench {
    options: Options,
    moto: Moto,
    gateway: SgwStandIn,
    /// Talks to moto directly: set-up, the event source mapping, clean-up.
    admin: Clients,
    sgw: aws_sdk_storagegateway::Client,
    aggregator_bin: PathBuf,
    refresher_bin: PathBuf,
}

async fn run(options: Options) -> Result<(), BoxError> {
    let started = Instant::now();
    run_started_ms();
    let machine = Machine::read().await;
    let load_before = read_trimmed("/proc/loadavg");
    println!("==> bench: {} on {}", machine.commit, machine.cpu);
    let aggregator_bin = binary("aggregator")?;
    let refresher_bin = binary("refresher")?;
    println!(
        "==> binaries: {} and {}",
        aggregator_bin.display(),
        refresher_bin.display()
    );
    let moto = Moto::start()
        .await
        .map_err(|e| format!("starting moto: {e}"))?;
    let gateway = SgwStandIn::start()
        .await
        .map_err(|e| format!("starting the Storage Gateway stand-in: {e}"))?;
    let admin = Clients::new(&sdk_config(moto.endpoint()).await);
    let sgw = aws_sdk_storagegateway::Client::new(&sdk_config(&gateway.endpoint()).await);
    println!(
        "==> moto at {}, Storage Gateway stand-in at {}",
        moto.endpoint(),
        gateway.endpoint()
    );
    let bench = Bench {
        options,
        moto,
        gateway,
        admin,
        sgw,
        aggregator_bin,
        refresher_bin,
    };

    let mut report = Report::default();
    if bench.options.sections.contains(&Section::Bursts) {
        report.bursts = Some(bursts(&bench).await?);
    }
    if bench.options.sections.contains(&Section::Startup) {
        report.startup = Some(startup(&bench).await?);
    }
    if bench.options.sections.contains(&Section::Sizes) {
        report.sizes = Some(sizes(&bench)?);
    }
    if bench.options.sections.contains(&Section::Logs) {
        report.logs = Some(logs::measure().await?);
    }
    if bench.options.sections.contains(&Section::Sustained) {
        report.sustained = Some(sustained::measure(&bench).await?);
    }
    if bench.options.sections.contains(&Section::Soak) {
        report.soak = Some(soak::measure(&bench).await?);
    }
    let load_after = read_trimmed("/proc/loadavg");
    let mut markdown = report.render(
        &bench.options,
        &machine,
        &load_before,
        &load_after,
        started.elapsed(),
    );
    // Only the soak, into an existing report: replace its section and keep the rest.
    if let (Some(result), true) = (
        &report.soak,
        bench.options.sections == BTreeSet::from([Section::Soak]),
    ) {
        let existing = std::fs::read_to_string(&bench.options.out).unwrap_or_default();
        let mut section = String::new();
        soak::render(
            &mut section,
            &bench.options.command_for("soak", None),
            &machine,
            result,
        );
        if let Some(spliced) = soak::splice(&existing, &section, &soak::targets(result)) {
            println!(
                "==> replacing only the soak section (and its targets) of {}",
                bench.options.out.display()
            );
            markdown = spliced;
        }
    }
    std::fs::write(&bench.options.out, &markdown)
        .map_err(|e| format!("writing {}: {e}", bench.options.out.display()))?;
    println!("\n==> Targets");
    for target in report.targets(&bench.options) {
        println!(
            "  {}  {}: {}",
            if target.pass { "PASS" } else { "FAIL" },
            target.name,
            target.measured
        );
    }
    println!(
        "==> wrote {} (driver time {})",
        bench.options.out.display(),
        fmt_duration(started.elapsed())
    );
    Ok(())
}

// ------------------------------------------------------------------------------------
// Section 1: bursts
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// S3 → Lambda: one notification (one record) per invocation.
    Direct,
    /// S3 → SQS → Lambda: batches of up to 10,000 records and 6 MB.
    SqsBatched,
}

#[derive(Debug, Clone)]
struct Scenario {
    id: String,
    events: usize,
    buckets: usize,
    /// Folders per bucket that the events write into (the first ones of the bucket).
    folders: usize,
    delivery: Delivery,
    /// The bucket's 1,000 folders as 10 top-level folders of 100 each, rather than all
    /// at the root.
    nested: bool,
}

impl Scenario {
    fn new(delivery: Delivery, events: usize, buckets: usize, folders: usize) -> Scenario {
        let kind = match delivery {
            Delivery::Direct => "direct",
            Delivery::SqsBatched => "sqs",
        };
        Scenario {
            id: format!("{kind}-{events}x{buckets}x{folders}"),
            events,
            buckets,
            folders,
            delivery,
            nested: false,
        }
    }

    fn nested(mut self) -> Scenario {
        self.nested = true;
        self.id.push_str("-nested");
        self
    }

    /// The path of folder `f` in this scenario's bucket layout.
    fn folder_path(&self, f: usize) -> String {
        if self.nested {
            format!("top{:02}/{}", f / 100, BucketModel::folder_name(f))
        } else {
            BucketModel::folder_name(f)
        }
    }

    fn bucket_model(&self) -> BucketModel {
        if !self.nested {
            return BucketModel::with_objects(OBJECTS_PER_BUCKET, FOLDERS_PER_BUCKET);
        }
        let model = BucketModel::new();
        for i in 0..OBJECTS_PER_BUCKET {
            model.put(format!(
                "{}/obj{i:07}",
                self.folder_path(i % FOLDERS_PER_BUCKET)
            ));
        }
        model
    }

    /// Event `i` goes to bucket `i % buckets` and, within it, to folder
    /// `(i / buckets) % folders`: every bucket and folder gets its share all along.
    fn target_of(&self, i: usize) -> (usize, usize) {
        (i % self.buckets, (i / self.buckets) % self.folders)
    }
}

/// The burst scenarios, in report order.
fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    for events in [1_000, 10_000] {
        for buckets in [1, 10] {
            for folders in [1, 100] {
                all.push(Scenario::new(Delivery::Direct, events, buckets, folders));
            }
        }
    }
    // Target (c): a small burst into 3 folders of a 100,000-object bucket.
    all.push(Scenario::new(Delivery::Direct, 30, 1, 3));
    // The same in a nested layout, where the root lists 10 folders rather than 1,000.
    all.push(Scenario::new(Delivery::Direct, 30, 1, 3).nested());
    all.push(Scenario::new(Delivery::SqsBatched, 10_000, 1, 1));
    all.push(Scenario::new(Delivery::SqsBatched, 10_000, 10, 100));
    all
}

/// What one scenario measured.
#[derive(Debug, Clone)]
struct BurstResult {
    scenario: Scenario,
    /// First invocation handed in to last response.
    duration: Duration,
    invocations: usize,
    aggregator_errors: usize,
    /// Requests from the aggregator, counted at its proxy.
    update_items: u64,
    get_items: u64,
    send_messages: u64,
    /// Requests from the refresher, counted at its proxy.
    refresher_update_items: u64,
    refresher_get_items: u64,
    refresher_put_items: u64,
    refresher_send_messages: u64,
    /// What the event source mapping handed to the refresher.
    mapping: MappingStats,
    /// From the burst's end until the queue and the share items were drained.
    drain: Duration,
    /// Windows opened, per bucket (direct delivery: from the aggregator's reports).
    windows_per_bucket: Vec<usize>,
    /// Windows opened, per bucket, from the bucket items' `Generation`.
    windows_opened: Vec<u64>,
    /// Sum over windows of the distinct (bucket, folder) that the window's events
    /// touched (direct delivery only).
    distinct_folders_per_window: Option<usize>,
    /// Accepted RefreshCache calls per bucket (one share per bucket).
    refreshes_per_bucket: Vec<usize>,
    /// Bound (b) per bucket: the sum over its windows of ceil(listings/50).
    chunk_bound_per_bucket: Vec<usize>,
    /// Direct delivery: the sum over all windows of their listings (changed folders
    /// and ancestors), what listing each window's changes exactly once would name.
    window_listings: Option<usize>,
    recursive_refreshes: usize,
    /// Folders named in the refreshes' `FolderList`s, all together.
    folders_listed: usize,
    /// The least time between two accepted calls on one share.
    min_gap: Option<Duration>,
    /// Calls the stand-in rejected: two already in flight, and (strict limits) sooner
    /// than the interval after the previous accepted call.
    throttled: usize,
    interval_violations: usize,
    /// Listing work of those refreshes.
    work: ListingWork,
    /// The physical limit (see [`physical_limit`]) and the folders it lists.
    physical_limit: ListingWork,
    physical_folders: usize,
    /// One full recursive refresh ("/") of each bucket's share after the burst.
    full_share_work: Vec<ListingWork>,
    /// The 2018 protocol on the same events.
    y2018: Replay2018,
    /// The aggregator's VmHWM after the burst.
    aggregator_rss_kib: Option<u64>,
}

impl BurstResult {
    fn refreshes(&self) -> usize {
        self.refreshes_per_bucket.iter().sum()
    }

    /// Buckets whose calls exceed bound (b).
    fn over_chunk_bound(&self) -> Vec<usize> {
        self.refreshes_per_bucket
            .iter()
            .zip(&self.chunk_bound_per_bucket)
            .enumerate()
            .filter(|(_, (calls, bound))| calls > bound)
            .map(|(b, _)| b)
            .collect()
    }

    /// The largest bucket's calls and its bound, for the table.
    fn chunk_bound_of_busiest(&self) -> (usize, usize) {
        self.refreshes_per_bucket
            .iter()
            .zip(&self.chunk_bound_per_bucket)
            .map(|(c, b)| (*c, *b))
            .max_by_key(|(c, b)| (c > b, *c, usize::MAX - *b))
            .unwrap_or((0, 0))
    }

    /// Direct delivery, when the calls named more folders than listing each window's
    /// own changes once: (folders named, per window).
    fn carried(&self) -> Option<(usize, usize)> {
        self.window_listings
            .filter(|per_window| self.folders_listed > *per_window)
            .map(|per_window| (self.folders_listed, per_window))
    }

    /// Objects + prefixes listed ÷ the physical limit's.
    fn limit_ratio(&self) -> f64 {
        let limit = self.physical_limit.objects_listed + self.physical_limit.prefixes_listed;
        let work = self.work.objects_listed + self.work.prefixes_listed;
        if limit == 0 {
            f64::INFINITY
        } else {
            work as f64 / limit as f64
        }
    }

    /// 2018: one recursive refresh of the share per window.
    fn work_2018(&self) -> ListingWork {
        let mut total = ListingWork::default();
        for (full, windows) in self.full_share_work.iter().zip(&self.y2018.windows) {
            for _ in 0..*windows {
                total += *full;
            }
        }
        total
    }
}

/// The 2018 protocol: one conditional `UpdateItem` per event (`SET LastRefresh = :t`
/// if `LastRefresh <= :t - W`), with the events' own times. A write that succeeds
/// opens a window, which in 2018 sent one SQS message (counted here, not sent) that
/// made one recursive refresh of each share.
#[derive(Debug, Clone, Default)]
struct Replay2018 {
    /// `UpdateItem` requests: one per event (counted at the proxy when executed).
    writes: u64,
    /// Successful conditional writes per bucket: the windows.
    windows: Vec<usize>,
    /// Executed against moto (and agreeing with the count), not only counted.
    executed: bool,
}

impl Replay2018 {
    fn sends(&self) -> usize {
        self.windows.iter().sum()
    }
}

/// One planned event.
#[derive(Debug, Clone)]
struct PlannedEvent {
    bucket: usize,
    folder: usize,
    key: String,
}

/// What delivering the events did.
#[derive(Debug, Default)]
struct Delivered {
    duration: Duration,
    invocations: usize,
    errors: Vec<String>,
    /// Per event, in order: (bucket, event time in epoch ms).
    event_times: Vec<(usize, i64)>,
    windows_per_bucket: Vec<usize>,
    distinct_folders_per_window: Option<usize>,
    /// Direct delivery: the folders of each (bucket, window).
    window_folders: Option<std::collections::BTreeMap<(usize, usize), BTreeSet<usize>>>,
}

/// The functions of one scenario, each behind its own counting proxy.
struct Deployment {
    table: String,
    queue_url: String,
    queue_arn: String,
    /// The EventBridge bus and rule (same name) that route the stand-in's
    /// refresh-complete events to the action queue.
    completion_rule: String,
    aggregator_proxy: CountingProxy,
    refresher_proxy: CountingProxy,
    aggregator: LambdaProcess,
    refresher: LambdaProcess,
}

impl Bench {
    /// A table, an action queue, an EventBridge rule that sends the stand-in's
    /// refresh-complete events to that queue (as `scripts/create-stack.sh` creates on
    /// AWS), and both functions pointed at their proxies. `min_interval_seconds` is the
    /// refresher's MIN_REFRESH_INTERVAL_SECONDS.
    async fn deploy(
        &self,
        window_seconds: u32,
        min_interval_seconds: u32,
        log_level: &str,
    ) -> Result<Deployment, BoxError> {
        let table = unique_name("BenchTable");
        let queue = unique_name("BenchActionQueue");
        self.admin
            .create_table(&table)
            .await
            .map_err(|e| format!("creating table {table} on moto: {e}"))?;
        let queue_url = self
            .admin
            .create_queue(&queue)
            .await
            .map_err(|e| format!("creating queue {queue} on moto: {e}"))?;
        let queue_arn = self.admin.queue_arn(&queue_url).await?;
        let completion_rule = unique_name("BenchRefreshCompleted");
        route_completion_events(self.moto.endpoint(), &completion_rule, &queue_arn).await?;
        self.gateway.set_completion_events(Some(
            CompletionEvents::to(self.moto.endpoint()).on_bus(&completion_rule),
        ));
        let aggregator_proxy = CountingProxy::start(self.moto.endpoint())
            .await
            .map_err(|e| format!("starting the aggregator's counting proxy: {e}"))?;
        let refresher_proxy = CountingProxy::start(self.moto.endpoint())
            .await
            .map_err(|e| format!("starting the refresher's counting proxy: {e}"))?;

        let mut spec = LambdaSpawn::new(&self.aggregator_bin, "S3EventAggregator");
        spec.env = self.function_env(&aggregator_proxy, &table, log_level);
        spec.env.push(("QUEUE_URL".into(), queue_url.clone()));
        spec.env
            .push(("REFRESH_DELAY_SECONDS".into(), window_seconds.to_string()));
        let aggregator = LambdaProcess::spawn(spec)
            .await
            .map_err(|e| format!("starting the aggregator: {e}"))?;
        let mut spec = LambdaSpawn::new(&self.refresher_bin, "S3StorageGatewayRefresh");
        spec.env = self.function_env(&refresher_proxy, &table, log_level);
        spec.env.push((
            "MIN_REFRESH_INTERVAL_SECONDS".into(),
            min_interval_seconds.to_string(),
        ));
        // The bursts shorten the interval, which the function takes only with the
        // acknowledgement.
        spec.env
            .push(("ALLOW_SHORT_REFRESH_INTERVAL".into(), "true".into()));
        let refresher = LambdaProcess::spawn(spec)
            .await
            .map_err(|e| format!("starting the refresher: {e}"))?;
        Ok(Deployment {
            table,
            queue_url,
            queue_arn,
            completion_rule,
            aggregator_proxy,
            refresher_proxy,
            aggregator,
            refresher,
        })
    }

    /// DynamoDB and SQS through `proxy`; Storage Gateway at the stand-in.
    fn function_env(
        &self,
        proxy: &CountingProxy,
        table: &str,
        log_level: &str,
    ) -> Vec<(String, String)> {
        let mut env = lambda_aws_env(self.moto.endpoint(), &self.gateway.endpoint());
        env.push(("AWS_ENDPOINT_URL_DYNAMODB".into(), proxy.endpoint()));
        env.push(("AWS_ENDPOINT_URL_SQS".into(), proxy.endpoint()));
        env.push(("TABLE_NAME".into(), table.to_string()));
        env.push(("LOG_LEVEL".into(), log_level.to_string()));
        env
    }

    /// Stops the functions, stops the completion events and deletes the table, the
    /// queue and the EventBridge rule and bus.
    async fn undeploy(&self, d: Deployment) -> Result<(), BoxError> {
        let _ = d.aggregator.shutdown().await;
        let _ = d.refresher.shutdown().await;
        self.gateway.set_completion_events(None);
        unroute_completion_events(self.moto.endpoint(), &d.completion_rule).await;
        self.admin
            .dynamodb
            .delete_table()
            .table_name(&d.table)
            .send()
            .await
            .map_err(|e| format!("deleting table {}: {e}", d.table))?;
        self.admin
            .sqs
            .delete_queue()
            .queue_url(&d.queue_url)
            .send()
            .await
            .map_err(|e| format!("deleting queue {}: {e}", d.queue_url))?;
        Ok(())
    }
}

/// Removes what [`route_completion_events`] made; best effort.
async fn unroute_completion_events(moto_endpoint: &str, rule: &str) {
    let call = |operation: &'static str, input: Value| async move {
        let _ = eventbridge_call(moto_endpoint, REGION, ACCOUNT_ID, operation, &input).await;
    };
    call(
        "RemoveTargets",
        json!({ "Rule": rule, "EventBusName": rule, "Ids": ["ActionQueue"] }),
    )
    .await;
    call("DeleteRule", json!({ "Name": rule, "EventBusName": rule })).await;
    call("DeleteEventBus", json!({ "Name": rule })).await;
}

async fn bursts(bench: &Bench) -> Result<Vec<BurstResult>, BoxError> {
    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| bench.options.scenarios.is_empty() || bench.options.scenarios.contains(&s.id))
        .collect();
    println!(
        "\n==> Section 1: {} burst scenario(s), window W = {} s, MIN_REFRESH_INTERVAL_SECONDS = {} s, buckets of {OBJECTS_PER_BUCKET} objects in {FOLDERS_PER_BUCKET} folders",
        selected.len(),
        bench.options.window_seconds,
        bench.options.min_interval_seconds
    );
    let mut results = Vec::new();
    for (n, scenario) in selected.iter().enumerate() {
        let result = run_burst(bench, scenario, n)
            .await
            .map_err(|e| format!("scenario {}: {e}", scenario.id))?;
        let (calls, bound) = result.chunk_bound_of_busiest();
        println!(
            "    {}: T {:.2} s, drained {:.1} s later, UpdateItem {}, GetItem {}, SendMessage {}, RefreshCache {} (busiest bucket {calls}, bound {bound}), throttled {} + {} too soon, listed {} objects + {} prefixes = {:.2}x the physical limit ({} objects + {} prefixes); 2018: {} writes, {} windows",
            scenario.id,
            result.duration.as_secs_f64(),
            result.drain.as_secs_f64(),
            result.update_items,
            result.get_items,
            result.send_messages,
            result.refreshes(),
            result.throttled,
            result.interval_violations,
            result.work.objects_listed,
            result.work.prefixes_listed,
            result.limit_ratio(),
            result.physical_limit.objects_listed,
            result.physical_limit.prefixes_listed,
            result.y2018.writes,
            result.y2018.sends(),
        );
        results.push(result);
    }
    Ok(results)
}

/// One scenario: fresh buckets, shares, table, queue and functions; the burst with the
/// refresher draining the queue alongside; then the 2018 replay and a full refresh.
async fn run_burst(bench: &Bench, scenario: &Scenario, n: usize) -> Result<BurstResult, BoxError> {
    let w = bench.options.window_seconds;
    let interval = bench.options.min_interval_seconds;
    println!("  -> {}: setting up", scenario.id);
    let buckets: Vec<String> = (0..scenario.buckets)
        .map(|b| format!("bench-{}-s{n}-b{b}", std::process::id()))
        .collect();
    let gateway_arn = bench.gateway.add_gateway("bench-gateway");
    let mut models = Vec::new();
    let mut shares = Vec::new();
    for bucket in &buckets {
        let model = scenario.bucket_model();
        bench
            .gateway
            .set_bucket_source(bucket, BucketSource::Model(model.clone()));
        // The share's cache starts as a snapshot of the bucket.
        let share = bench.gateway.add_share(
            &gateway_arn,
            ShareKind::Nfs,
            &format!("arn:aws:s3:::{bucket}"),
        );
        models.push(model);
        shares.push(share);
    }
    let plan: Vec<PlannedEvent> = (0..scenario.events)
        .map(|i| {
            let (bucket, folder) = scenario.target_of(i);
            PlannedEvent {
                bucket,
                folder,
                key: format!("{}/burst-s{n}-{i:07}.dat", scenario.folder_path(folder)),
            }
        })
        .collect();

    let d = bench.deploy(w, interval, "INFO").await?;
    warm_up(bench, &d).await?;
    d.aggregator_proxy.reset();
    d.refresher_proxy.reset();
    let refreshes_before = bench.gateway.refreshes().len();
    // The gateway's rules, enforced: two in flight per share (always) and, strictly,
    // the refresher's own interval between calls on a share.
    bench
        .gateway
        .set_strict_limits(Some(Duration::from_secs(u64::from(interval))));
    let rejected_before = bench.gateway.rejected_refreshes();
    let violations_before = bench.gateway.interval_violations();

    println!(
        "  -> {}: {} events into {} bucket(s) x {} folder(s), {:?}",
        scenario.id, scenario.events, scenario.buckets, scenario.folders, scenario.delivery
    );
    let burst_done = AtomicBool::new(false);
    let burst_ended = std::sync::Mutex::new(None::<Instant>);
    let burst = async {
        let delivered = match scenario.delivery {
            Delivery::Direct => deliver_direct(&d, &plan, &buckets, &models).await,
            Delivery::SqsBatched => deliver_sqs_batches(&d, &plan, &buckets, &models).await,
        };
        *burst_ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        burst_done.store(true, Ordering::SeqCst);
        let delivered = delivered?;
        let aggregator_counts = (
            d.aggregator_proxy.count("UpdateItem"),
            d.aggregator_proxy.count("GetItem"),
            d.aggregator_proxy.count("SendMessage"),
        );
        let rss = d.aggregator.pid().and_then(vm_hwm_kib);
        // The 2018 protocol on the same event times, while the refresher drains.
        let y2018 = replay_2018(bench, &delivered.event_times, scenario.buckets).await?;
        Ok::<_, BoxError>((delivered, aggregator_counts, rss, y2018))
    };
    let drain_limit = Duration::from_secs(u64::from(w) * 3 + u64::from(interval) * 20 + 120);
    let watch = DrainWatch {
        buckets: &buckets,
        shares: &shares,
    };
    let (burst, mapping) = tokio::join!(
        burst,
        event_source_mapping(bench, &d, &burst_done, &watch, drain_limit)
    );
    let drained_at = Instant::now();
    let (delivered, (update_items, get_items, send_messages), aggregator_rss_kib, y2018) = burst?;
    let mapping = mapping?;
    let drain = burst_ended
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map_or(Duration::ZERO, |t| drained_at.saturating_duration_since(t));
    if !delivered.errors.is_empty() {
        eprintln!(
            "    warning: {} aggregator invocation(s) failed, first: {}",
            delivered.errors.len(),
            delivered.errors[0]
        );
    }
    let throttled = bench.gateway.rejected_refreshes() - rejected_before;
    let interval_violations = bench.gateway.interval_violations() - violations_before;
    bench.gateway.set_strict_limits(None);

    // The product's refreshes, before the full-refresh measurement adds its own.
    let records: Vec<RefreshRecord> = bench.gateway.refreshes()[refreshes_before..]
        .iter()
        .filter(|r| shares.contains(&r.share_arn))
        .cloned()
        .collect();
    let refreshes_per_bucket: Vec<usize> = shares
        .iter()
        .map(|s| records.iter().filter(|r| &r.share_arn == s).count())
        .collect();
    let mut work = ListingWork::default();
    for r in &records {
        work += r.work;
    }
    let recursive_refreshes = records.iter().filter(|r| r.recursive).count();
    let folders_listed = records.iter().map(|r| r.folder_list.len()).sum();
    let min_gap = shares
        .iter()
        .filter_map(|share| {
            let mut starts: Vec<SystemTime> = records
                .iter()
                .filter(|r| &r.share_arn == share)
                .map(|r| r.started_at)
                .collect();
            starts.sort();
            starts
                .windows(2)
                .filter_map(|p| p[1].duration_since(p[0]).ok())
                .min()
        })
        .min();
    let windows_opened = windows_in_table(bench, &d.table, &buckets).await?;
    let chunk_bound_per_bucket =
        chunk_bounds(scenario, &plan, &delivered, &windows_opened, buckets.len());
    let window_listings = delivered.window_folders.as_ref().map(|per_window| {
        per_window
            .values()
            .map(|folders| {
                let paths: Vec<String> = folders
                    .iter()
                    .map(|f| format!("{}/", scenario.folder_path(*f)))
                    .collect();
                listings_of(paths.iter().map(String::as_str)).len()
            })
            .sum()
    });
    let (physical_limit, physical_folders) = physical_limit(scenario, &plan, &models);
    // Completion events of the full refreshes below must not reach this queue.
    bench.gateway.set_completion_events(None);
    let full_share_work = full_share_refreshes(bench, &shares).await?;

    let result = BurstResult {
        scenario: scenario.clone(),
        duration: delivered.duration,
        invocations: delivered.invocations,
        aggregator_errors: delivered.errors.len(),
        update_items,
        get_items,
        send_messages,
        refresher_update_items: d.refresher_proxy.count("UpdateItem"),
        refresher_get_items: d.refresher_proxy.count("GetItem"),
        refresher_put_items: d.refresher_proxy.count("PutItem"),
        refresher_send_messages: d.refresher_proxy.count("SendMessage"),
        mapping,
        drain,
        windows_per_bucket: delivered.windows_per_bucket,
        windows_opened,
        distinct_folders_per_window: delivered.distinct_folders_per_window,
        refreshes_per_bucket,
        chunk_bound_per_bucket,
        window_listings,
        recursive_refreshes,
        folders_listed,
        min_gap,
        throttled,
        interval_violations,
        work,
        physical_limit,
        physical_folders,
        full_share_work,
        y2018,
        aggregator_rss_kib,
    };
    bench.undeploy(d).await?;
    for (bucket, share) in buckets.iter().zip(&shares) {
        bench.gateway.remove_share(share);
        bench.gateway.clear_bucket_source(bucket);
    }
    Ok(result)
}

/// Windows opened per bucket, from the bucket items' `Generation`.
async fn windows_in_table(
    bench: &Bench,
    table: &str,
    buckets: &[String],
) -> Result<Vec<u64>, BoxError> {
    let mut windows = Vec::new();
    for bucket in buckets {
        let item = get_item(bench, table, bucket).await?;
        windows.push(
            item.as_ref()
                .and_then(|i| i.get("Generation"))
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        );
    }
    Ok(windows)
}

/// The listings that make changes in `folders` visible on a share at the bucket's
/// root: each folder and its ancestors up to the root, as key prefixes ("" is the
/// root, else `a/b/`).
fn listings_of<'a>(folders: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
    let mut listed = BTreeSet::new();
    for folder in folders {
        let mut prefix = folder.to_string();
        loop {
            listed.insert(prefix.clone());
            if prefix.is_empty() {
                break;
            }
            let trimmed = &prefix[..prefix.len() - 1];
            prefix = match trimmed.rfind('/') {
                Some(i) => trimmed[..=i].to_string(),
                None => String::new(),
            };
        }
    }
    listed
}

/// The folder (key prefix, `a/b/`, or "" for the root) that `key` is in.
fn folder_of(key: &str) -> &str {
    key.rfind('/').map_or("", |i| &key[..=i])
}

/// Bound (b), per bucket: a window's changes on a share are L listings (its changed
/// folders and their ancestors), and a call takes at most 50, so the window needs
/// ceil(L/50) calls; the scheduler merges what waits, which can only save calls. So a
/// share gets at most the sum over its windows of ceil(L_w/50). Direct delivery knows
/// each window's folders from the aggregator's reports; for SQS batches (no window per
/// event) each window counts with all of the bucket's folders.
fn chunk_bounds(
    scenario: &Scenario,
    plan: &[PlannedEvent],
    delivered: &Delivered,
    windows_opened: &[u64],
    buckets: usize,
) -> Vec<usize> {
    let mut bounds = vec![0; buckets];
    if let Some(per_window) = &delivered.window_folders {
        for ((bucket, _), folders) in per_window {
            let paths: Vec<String> = folders
                .iter()
                .map(|f| format!("{}/", scenario.folder_path(*f)))
                .collect();
            let listings = listings_of(paths.iter().map(String::as_str)).len();
            bounds[*bucket] += listings.div_ceil(MAX_FOLDER_LIST);
        }
        return bounds;
    }
    for (bucket, bound) in bounds.iter_mut().enumerate() {
        let listings = listings_of(
            plan.iter()
                .filter(|e| e.bucket == bucket)
                .map(|e| folder_of(&e.key)),
        )
        .len();
        *bound = windows_opened.get(bucket).copied().unwrap_or(1).max(1) as usize
            * listings.div_ceil(MAX_FOLDER_LIST);
    }
    bounds
}

/// The physical limit of the burst's listing work: what refreshing exactly the changed
/// folders (and the ancestors needed to show new folders) would list, once, after the
/// burst. Computed from the bucket models, not from the refreshes: for each bucket, the
/// folders of the burst's keys plus their ancestors up to the share root (the bucket's
/// root), each listed non-recursively (`ListObjectsV2` with the delimiter `/`), as the
/// stand-in counts its `ListingWork`. Also returns how many folders that is.
fn physical_limit(
    scenario: &Scenario,
    plan: &[PlannedEvent],
    models: &[BucketModel],
) -> (ListingWork, usize) {
    let mut total = ListingWork::default();
    let mut folders = 0;
    for (bucket, model) in models.iter().enumerate().take(scenario.buckets) {
        let listed = listings_of(
            plan.iter()
                .filter(|e| e.bucket == bucket)
                .map(|e| folder_of(&e.key)),
        );
        folders += listed.len();
        for prefix in &listed {
            let listing = model.list(prefix, true);
            total += ListingWork {
                objects_listed: listing.objects.len() as u64,
                prefixes_listed: listing.prefixes.len() as u64,
                list_requests: listing.requests,
            };
        }
    }
    (total, folders)
}

/// One event for a bucket of no scenario and one empty SQS batch, so that both
/// processes have handled an invocation (and the aggregator has its connections)
/// before the burst. The warm-up window's message is purged from the queue.
async fn warm_up(bench: &Bench, d: &Deployment) -> Result<(), BoxError> {
    let bucket = format!("bench-warm-up-{}", std::process::id());
    let event = notification(&s3_record(&bucket, "warm-up/object", now_ms(), 0));
    expect_response(&d.aggregator, event, "aggregator warm-up").await?;
    let empty = lambda_sqs_event(&[], &d.queue_arn);
    expect_response(&d.refresher, empty, "refresher warm-up").await?;
    bench
        .admin
        .sqs
        .purge_queue()
        .queue_url(&d.queue_url)
        .send()
        .await
        .map_err(|e| format!("purging the warm-up message: {e}"))?;
    Ok(())
}

async fn expect_response(
    process: &LambdaProcess,
    event: Value,
    what: &str,
) -> Result<Value, BoxError> {
    match process
        .invoke(event)
        .await
        .map_err(|e| format!("{what}: {e}"))?
    {
        Invocation::Response(v) => Ok(v),
        Invocation::Error {
            error_type,
            error_message,
        } => Err(format!("{what} failed: {error_type}: {error_message}").into()),
    }
}

/// S3 → Lambda: one notification per invocation, as fast as the harness goes.
async fn deliver_direct(
    d: &Deployment,
    plan: &[PlannedEvent],
    buckets: &[String],
    models: &[BucketModel],
) -> Result<Delivered, BoxError> {
    let mut delivered = Delivered {
        windows_per_bucket: vec![0; buckets.len()],
        ..Default::default()
    };
    let mut window_of = vec![0usize; buckets.len()];
    let mut touched: BTreeSet<(usize, usize, usize)> = BTreeSet::new();
    let started = Instant::now();
    for (i, event) in plan.iter().enumerate() {
        // The object is written before S3 notifies.
        models[event.bucket].put(event.key.clone());
        let at = now_ms();
        let payload = notification(&s3_record(&buckets[event.bucket], &event.key, at, i));
        delivered.invocations += 1;
        delivered.event_times.push((event.bucket, at));
        match d
            .aggregator
            .invoke(payload)
            .await
            .map_err(|e| format!("aggregator invocation {i}: {e}"))?
        {
            Invocation::Response(report) => {
                if report["windowsOpened"].as_u64().unwrap_or(0) > 0 {
                    window_of[event.bucket] += 1;
                    delivered.windows_per_bucket[event.bucket] += 1;
                }
            }
            Invocation::Error {
                error_type,
                error_message,
            } => delivered
                .errors
                .push(format!("event {i}: {error_type}: {error_message}")),
        }
        touched.insert((event.bucket, window_of[event.bucket], event.folder));
    }
    delivered.duration = started.elapsed();
    delivered.distinct_folders_per_window = Some(touched.len());
    let mut window_folders: std::collections::BTreeMap<(usize, usize), BTreeSet<usize>> =
        Default::default();
    for (bucket, window, folder) in touched {
        window_folders
            .entry((bucket, window))
            .or_default()
            .insert(folder);
    }
    delivered.window_folders = Some(window_folders);
    Ok(delivered)
}

/// S3 → SQS → Lambda: the same notifications, as SQS records in batches of up to
/// 10,000 records and 6 MB. The batches are built (and their objects written) first,
/// so that T is the delivery alone.
async fn deliver_sqs_batches(
    d: &Deployment,
    plan: &[PlannedEvent],
    buckets: &[String],
    models: &[BucketModel],
) -> Result<Delivered, BoxError> {
    let events_queue_arn = format!("arn:aws:sqs:{REGION}:{ACCOUNT_ID}:bench-s3-events");
    let mut delivered = Delivered {
        windows_per_bucket: vec![0; buckets.len()],
        ..Default::default()
    };
    let at = now_ms();
    let mut batches: Vec<Vec<Value>> = Vec::new();
    let mut records = Vec::new();
    // `{"Records":[...]}`: 13 bytes, plus a comma per record.
    let mut bytes = 13;
    for (i, event) in plan.iter().enumerate() {
        let body = notification(&s3_record(&buckets[event.bucket], &event.key, at, i));
        let record = sqs_record(&body.to_string(), i, &events_queue_arn, at);
        let size = record.to_string().len() + 1;
        if records.len() == SQS_BATCH_RECORDS
            || (!records.is_empty() && bytes + size > LAMBDA_PAYLOAD_BYTES)
        {
            batches.push(std::mem::take(&mut records));
            bytes = 13;
        }
        bytes += size;
        models[event.bucket].put(event.key.clone());
        delivered.event_times.push((event.bucket, at));
        records.push(record);
    }
    if !records.is_empty() {
        batches.push(records);
    }
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    println!("     SQS batches of {sizes:?} records");
    let started = Instant::now();
    for records in batches {
        let batch = records.len();
        delivered.invocations += 1;
        match d
            .aggregator
            .invoke(json!({ "Records": records }))
            .await
            .map_err(|e| format!("aggregator batch of {batch}: {e}"))?
        {
            Invocation::Response(response) => {
                let failures = response["batchItemFailures"].as_array().map_or(0, Vec::len);
                if failures > 0 {
                    delivered.errors.push(format!(
                        "{failures} of {batch} records reported in batchItemFailures"
                    ));
                }
            }
            Invocation::Error {
                error_type,
                error_message,
            } => delivered
                .errors
                .push(format!("batch of {batch}: {error_type}: {error_message}")),
        }
    }
    delivered.duration = started.elapsed();
    Ok(delivered)
}

#[derive(Debug, Default, Clone)]
struct MappingStats {
    /// Messages handed to the refresher, all kinds.
    messages: usize,
    /// Of them: window messages (ours, or a 2018-style one), the scheduler's wake-ups,
    /// the gateway's refresh-complete events.
    window_messages: usize,
    wake_ups: usize,
    completion_events: usize,
    invocations: usize,
    failures: usize,
}

/// What is on the action queue: a window message, a scheduler wake-up, or a
/// refresh-complete event that EventBridge delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionMessage {
    Window,
    WakeUp,
    CompletionEvent,
}

fn action_message(body: &str) -> ActionMessage {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if parsed.get("kind").and_then(Value::as_str) == Some("wake") {
        ActionMessage::WakeUp
    } else if parsed.get("source").and_then(Value::as_str) == Some(REFRESH_EVENT_SOURCE) {
        ActionMessage::CompletionEvent
    } else {
        ActionMessage::Window
    }
}

/// When the event source mapping may stop: once the events are all in, every bucket's
/// latest window is refreshed (handed to its shares), every share's scheduling item
/// (`share#<arn>`) has nothing `Pending` and no `Slots` (refreshes in flight), and no
/// message is visible or in flight. Wake-ups still delayed on the queue then have
/// nothing left to do.
struct DrainWatch<'a> {
    buckets: &'a [String],
    shares: &'a [String],
}

impl DrainWatch<'_> {
    async fn settled(&self, bench: &Bench, d: &Deployment) -> Result<bool, BoxError> {
        if queue_busy(bench, &d.queue_url).await? {
            return Ok(false);
        }
        for bucket in self.buckets {
            let item = get_item(bench, &d.table, bucket).await?;
            let number = |name: &str| {
                item.as_ref()
                    .and_then(|i| i.get(name))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if number("Generation").unwrap_or(0) > number("RefreshedGeneration").unwrap_or(0) {
                return Ok(false);
            }
        }
        for share in self.shares {
            let Some(item) = get_item(bench, &d.table, &format!("share#{share}")).await? else {
                continue;
            };
            let pending = item
                .get("Pending")
                .and_then(|v| v.as_ss().ok())
                .is_some_and(|p| !p.is_empty());
            let slots = item
                .get("Slots")
                .and_then(|v| v.as_l().ok())
                .is_some_and(|l| !l.is_empty());
            if pending || slots {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One item of the table, read consistently through the admin client (not counted).
async fn get_item(
    bench: &Bench,
    table: &str,
    key: &str,
) -> Result<Option<std::collections::HashMap<String, AttributeValue>>, BoxError> {
    let out = bench
        .admin
        .dynamodb
        .get_item()
        .table_name(table)
        .key("BucketName", AttributeValue::S(key.to_string()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| format!("reading item {key}: {e}"))?;
    Ok(out.item().cloned())
}

/// Lambda's SQS event source mapping for the refresher: polls the action queue
/// (messages show once their delay has passed), invokes the refresher with up to 10,
/// deletes what it did not report as failed. Runs while the events come in and stops
/// once they are all in and [`DrainWatch::settled`] says that nothing is left to do.
async fn event_source_mapping(
    bench: &Bench,
    d: &Deployment,
    events_done: &AtomicBool,
    watch: &DrainWatch<'_>,
    limit_after_events: Duration,
) -> Result<MappingStats, BoxError> {
    let mut stats = MappingStats::default();
    let mut deadline: Option<Instant> = None;
    loop {
        let done = events_done.load(Ordering::SeqCst);
        if done && deadline.is_none() {
            deadline = Some(Instant::now() + limit_after_events);
        }
        let messages = bench
            .admin
            .receive(&d.queue_url, REFRESHER_BATCH, 1)
            .await
            .map_err(|e| format!("receiving from the action queue: {e}"))?;
        if messages.is_empty() {
            if done && watch.settled(bench, d).await? {
                return Ok(stats);
            }
            if deadline.is_some_and(|t| Instant::now() > t) {
                return Err(format!(
                    "the action queue and the share items were not drained within {limit_after_events:?} after the last event"
                )
                .into());
            }
            continue;
        }
        stats.messages += messages.len();
        for m in &messages {
            match action_message(m.body().unwrap_or_default()) {
                ActionMessage::Window => stats.window_messages += 1,
                ActionMessage::WakeUp => stats.wake_ups += 1,
                ActionMessage::CompletionEvent => stats.completion_events += 1,
            }
        }
        stats.invocations += 1;
        let event = lambda_sqs_event(&messages, &d.queue_arn);
        let failed: Vec<String> = match d
            .refresher
            .invoke(event)
            .await
            .map_err(|e| format!("refresher invocation: {e}"))?
        {
            Invocation::Response(value) => value["batchItemFailures"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(|i| i["itemIdentifier"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            Invocation::Error {
                error_type,
                error_message,
            } => {
                eprintln!("    warning: refresher failed: {error_type}: {error_message}");
                messages
                    .iter()
                    .filter_map(|m| m.message_id().map(str::to_string))
                    .collect()
            }
        };
        stats.failures += failed.len();
        for m in &messages {
            if m.message_id()
                .is_some_and(|id| failed.iter().any(|f| f == id))
            {
                continue;
            }
            if let Some(handle) = m.receipt_handle() {
                bench
                    .admin
                    .sqs
                    .delete_message()
                    .queue_url(&d.queue_url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| format!("deleting a refresh message: {e}"))?;
            }
        }
    }
}

/// Messages visible or in flight (received, not deleted: a failed one waits for its
/// visibility timeout); delayed messages do not count.
async fn queue_busy(bench: &Bench, url: &str) -> Result<bool, BoxError> {
    let out = bench
        .admin
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| format!("reading the action queue's depth: {e}"))?;
    let total: u64 = out
        .attributes()
        .map(|a| a.values().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(total > 0)
}

/// The 2018 protocol's write for every event: decided in memory (the condition on
/// the bucket's `LastRefresh`), and for bursts of up to `--execute-2018` events also
/// executed against moto through its own counting proxy, which must agree.
async fn replay_2018(
    bench: &Bench,
    event_times: &[(usize, i64)],
    buckets: usize,
) -> Result<Replay2018, BoxError> {
    let window_ms = i64::from(bench.options.window_seconds) * 1000;
    let mut last_refresh: Vec<Option<i64>> = vec![None; buckets];
    let mut replay = Replay2018 {
        writes: event_times.len() as u64,
        windows: vec![0; buckets],
        executed: false,
    };
    for (bucket, at) in event_times {
        if last_refresh[*bucket].is_none_or(|last| last <= at - window_ms) {
            last_refresh[*bucket] = Some(*at);
            replay.windows[*bucket] += 1;
        }
    }
    if event_times.len() > bench.options.execute_2018 {
        return Ok(replay);
    }
    let started = Instant::now();
    let proxy = CountingProxy::start(bench.moto.endpoint())
        .await
        .map_err(|e| format!("starting the 2018 replay's proxy: {e}"))?;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk_config(&proxy.endpoint()).await);
    let table = unique_name("Bench2018");
    bench
        .admin
        .create_table(&table)
        .await
        .map_err(|e| format!("creating table {table}: {e}"))?;
    let mut windows = vec![0; buckets];
    for (bucket, at) in event_times {
        let outcome = dynamodb
            .update_item()
            .table_name(&table)
            .key("BucketName", AttributeValue::S(format!("bucket-{bucket}")))
            .update_expression("SET LastRefresh = :t")
            .condition_expression("attribute_not_exists(LastRefresh) OR LastRefresh <= :start")
            .expression_attribute_values(":t", AttributeValue::N(at.to_string()))
            .expression_attribute_values(":start", AttributeValue::N((at - window_ms).to_string()))
            .send()
            .await;
        match outcome {
            Ok(_) => windows[*bucket] += 1,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) => {}
            Err(e) => return Err(format!("2018 replay UpdateItem: {e:?}").into()),
        }
    }
    let writes = proxy.count("UpdateItem");
    bench
        .admin
        .dynamodb
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .map_err(|e| format!("deleting table {table}: {e}"))?;
    if writes != replay.writes || windows != replay.windows {
        return Err(format!(
            "the 2018 replay on moto disagrees with the count: {writes} writes and windows {windows:?} vs {} and {:?}",
            replay.writes, replay.windows
        )
        .into());
    }
    println!(
        "     2018 protocol executed on moto: {writes} conditional UpdateItem in {:.1} s, windows {windows:?}",
        started.elapsed().as_secs_f64()
    );
    replay.executed = true;
    Ok(replay)
}

/// One `RefreshCache` of "/" with `Recursive` on each share, through the SDK, and the
/// listing work the stand-in counted for it: what the 2018 design did per window.
async fn full_share_refreshes(
    bench: &Bench,
    shares: &[String],
) -> Result<Vec<ListingWork>, BoxError> {
    bench.gateway.complete_refreshes();
    let mut works = Vec::new();
    for share in shares {
        let before = bench.gateway.listing_work(share);
        bench
            .sgw
            .refresh_cache()
            .file_share_arn(share)
            .folder_list("/")
            .recursive(true)
            .send()
            .await
            .map_err(|e| format!("full RefreshCache of {share}: {e:?}"))?;
        let after = bench.gateway.listing_work(share);
        works.push(ListingWork {
            objects_listed: after.objects_listed - before.objects_listed,
            prefixes_listed: after.prefixes_listed - before.prefixes_listed,
            list_requests: after.list_requests - before.list_requests,
        });
        bench.gateway.complete_refreshes();
    }
    Ok(works)
}

// ------------------------------------------------------------------------------------
// Section 2: cold start, warm handler time, peak RSS
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StartupResult {
    runs: usize,
    cold_aggregator: Stats,
    cold_refresher: Stats,
    /// Handler times: (label, stats).
    handlers: Vec<(String, Stats)>,
    /// VmHWM after the runs: (process, KiB).
    rss: Vec<(String, u64)>,
}

async fn startup(bench: &Bench) -> Result<StartupResult, BoxError> {
    let runs = bench.options.runs;
    println!("\n==> Section 2: cold start, warm handler time and peak RSS, {runs} runs each");
    let cold_aggregator = cold_starts(bench, &bench.aggregator_bin, runs).await?;
    println!(
        "    aggregator cold start: {}",
        cold_aggregator.describe_ms()
    );
    let cold_refresher = cold_starts(bench, &bench.refresher_bin, runs).await?;
    println!("    refresher cold start: {}", cold_refresher.describe_ms());

    let mut handlers = Vec::new();
    let mut rss = Vec::new();

    // Aggregator in a long window: events into its folder are coalesced (no call),
    // events into a new folder each join the window (one UpdateItem).
    let d = bench.deploy(600, 60, "INFO").await?;
    let bucket = format!("bench-handler-{}", std::process::id());
    let event = |key: String, i: usize| notification(&s3_record(&bucket, &key, now_ms(), i));
    expect_response(
        &d.aggregator,
        event("dir00000/open".into(), 0),
        "opening event",
    )
    .await?;
    for i in 0..3 {
        let key = format!("dir00000/warm-{i}");
        expect_response(&d.aggregator, event(key, i), "warm-up event").await?;
    }
    d.aggregator.clear_handler_times();
    for i in 0..runs {
        let key = format!("dir00000/coalesced-{i}");
        let report = expect_response(&d.aggregator, event(key, i), "coalesced event").await?;
        if report["coalescedInContainer"].as_u64() != Some(1) {
            return Err(format!("expected a coalesced event, got the report {report}").into());
        }
    }
    let coalesced = Stats::of(&d.aggregator.handler_times());
    d.aggregator.clear_handler_times();
    let updates_before = d.aggregator_proxy.count("UpdateItem");
    for i in 0..runs {
        let key = format!("{}/joined-{i}", BucketModel::folder_name(i + 1));
        let report = expect_response(&d.aggregator, event(key, i), "joining event").await?;
        if report["windowWrites"].as_u64() != Some(1) {
            return Err(format!("expected one window write, got the report {report}").into());
        }
    }
    let joined = Stats::of(&d.aggregator.handler_times());
    let updates = d.aggregator_proxy.count("UpdateItem") - updates_before;
    println!(
        "    aggregator, coalesced event: {}",
        coalesced.describe_ms()
    );
    println!(
        "    aggregator, event that writes: {} ({updates} UpdateItem for {runs} events)",
        joined.describe_ms()
    );
    handlers.push((
        "aggregator: event coalesced in the container (no AWS call)".to_string(),
        coalesced,
    ));
    handlers.push((
        format!("aggregator: event into a new folder ({updates} UpdateItem for {runs} events)"),
        joined,
    ));
    if let Some(kib) = d.aggregator.pid().and_then(vm_hwm_kib) {
        rss.push((
            format!(
                "aggregator, {} invocations (coalesced and joining events)",
                2 * runs + 4
            ),
            kib,
        ));
    }
    bench.undeploy(d).await?;

    // Window 0 s: every event opens a window (GetItem, SendMessage, UpdateItem) whose
    // message is visible at once; the refresher closes it, hands it to the one share,
    // calls RefreshCache (interval 0: at once) and records the refresh. Then the
    // refresh's completion event (through EventBridge) frees the share's slot, in an
    // invocation of its own that is not measured, before the next round.
    let d = bench.deploy(0, 0, "INFO").await?;
    bench.gateway.set_refresh_duration(Duration::ZERO);
    let bucket = format!("bench-refresher-{}", std::process::id());
    let gateway_arn = bench.gateway.add_gateway("bench-handler-gateway");
    let share = bench.gateway.add_share(
        &gateway_arn,
        ShareKind::Nfs,
        &format!("arn:aws:s3:::{bucket}"),
    );
    let refreshes_before = bench.gateway.refreshes().len();
    let mut open_times = Vec::new();
    let mut refresh_times = Vec::new();
    let mut refresher_invocations = 0;
    let operations = ["UpdateItem", "GetItem", "PutItem", "SendMessage"];
    let mut refresher_requests = [0u64; 4];
    let buckets = [bucket.clone()];
    let shares = [share.clone()];
    let watch = DrainWatch {
        buckets: &buckets,
        shares: &shares,
    };
    // The first round warms both processes (and the refresher's share map).
    for i in 0..=runs {
        d.aggregator.clear_handler_times();
        let key = format!("dir00000/refresh-{i}");
        let report = expect_response(
            &d.aggregator,
            notification(&s3_record(&bucket, &key, now_ms(), i)),
            "opening event",
        )
        .await?;
        if report["windowsOpened"].as_u64() != Some(1) {
            return Err(format!("expected the event to open a window, got {report}").into());
        }
        // The window's message, measured.
        loop {
            let messages = receive_one(bench, &d.queue_url).await?;
            let window = messages
                .iter()
                .all(|m| action_message(m.body().unwrap_or_default()) == ActionMessage::Window);
            d.refresher.clear_handler_times();
            let before = operations.map(|op| d.refresher_proxy.count(op));
            refresher_invocations += 1;
            invoke_and_delete(bench, &d, &messages).await?;
            if window {
                if i > 0 {
                    refresh_times.extend(d.refresher.handler_times());
                    for (n, op) in operations.iter().enumerate() {
                        refresher_requests[n] += d.refresher_proxy.count(op) - before[n];
                    }
                }
                break;
            }
        }
        // Its completion event, not measured.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !watch.settled(bench, &d).await? {
            if Instant::now() > deadline {
                return Err(
                    "the refresh's completion event did not free the share within 30 s".into(),
                );
            }
            let messages = bench
                .admin
                .receive(&d.queue_url, REFRESHER_BATCH, 1)
                .await
                .map_err(|e| format!("receiving from the action queue: {e}"))?;
            if !messages.is_empty() {
                refresher_invocations += 1;
                invoke_and_delete(bench, &d, &messages).await?;
            }
        }
        if i == 0 {
            // Count the aggregator's requests of the measured rounds only.
            d.aggregator_proxy.reset();
        } else {
            open_times.extend(d.aggregator.handler_times());
        }
    }
    let aggregator_calls = format!(
        "{} GetItem, {} SendMessage, {} UpdateItem for {runs} events",
        d.aggregator_proxy.count("GetItem"),
        d.aggregator_proxy.count("SendMessage"),
        d.aggregator_proxy.count("UpdateItem")
    );
    let refresher_calls = format!(
        "{} UpdateItem, {} GetItem, {} PutItem, {} SendMessage for {runs} messages",
        refresher_requests[0], refresher_requests[1], refresher_requests[2], refresher_requests[3]
    );
    let refreshed = bench.gateway.refreshes()[refreshes_before..]
        .iter()
        .filter(|r| r.share_arn == share)
        .count();
    if refreshed != runs + 1 {
        return Err(format!(
            "expected {} RefreshCache calls on the share, the stand-in saw {refreshed}",
            runs + 1
        )
        .into());
    }
    let opened = Stats::of(&open_times);
    let refreshed = Stats::of(&refresh_times);
    println!(
        "    aggregator, event that opens a window: {}",
        opened.describe_ms()
    );
    println!(
        "    refresher, one message, one RefreshCache: {}",
        refreshed.describe_ms()
    );
    handlers.push((
        format!("aggregator: event that opens a window ({aggregator_calls})"),
        opened,
    ));
    handlers.push((
        format!(
            "refresher: one window message, one RefreshCache, warm share map ({refresher_calls})"
        ),
        refreshed,
    ));
    if let Some(kib) = d.aggregator.pid().and_then(vm_hwm_kib) {
        rss.push((
            format!(
                "aggregator, {} invocations (window-opening events)",
                runs + 1
            ),
            kib,
        ));
    }
    if let Some(kib) = d.refresher.pid().and_then(vm_hwm_kib) {
        rss.push((
            format!(
                "refresher, {refresher_invocations} invocations (window messages and completion events)"
            ),
            kib,
        ));
    }
    bench.gateway.remove_share(&share);
    bench
        .gateway
        .set_refresh_duration(integration_tests::sgw_standin::DEFAULT_REFRESH_DURATION);
    bench.undeploy(d).await?;
    for (what, kib) in &rss {
        println!("    peak RSS, {what}: {}", fmt_kib(*kib));
    }
    Ok(StartupResult {
        runs,
        cold_aggregator,
        cold_refresher,
        handlers,
        rss,
    })
}

/// Spawns the binary `runs` times; each time, the time from spawn to its first
/// `GET /runtime/invocation/next`.
async fn cold_starts(bench: &Bench, bin: &Path, runs: usize) -> Result<Stats, BoxError> {
    let mut times = Vec::new();
    for run in 0..runs {
        let mut spec = LambdaSpawn::new(bin, "BenchColdStart");
        spec.env = lambda_aws_env(bench.moto.endpoint(), &bench.gateway.endpoint());
        spec.env.push((
            "QUEUE_URL".into(),
            format!("{}/{ACCOUNT_ID}/BenchColdStartQueue", bench.moto.endpoint()),
        ));
        spec.env.push(("LOG_LEVEL".into(), "INFO".into()));
        let process = LambdaProcess::spawn(spec)
            .await
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let latency = loop {
            if let Some(latency) = process.first_poll_latency() {
                break latency;
            }
            if process.has_exited() || Instant::now() > deadline {
                return Err(format!(
                    "{} (run {run}) did not poll /invocation/next; output: {:?}",
                    bin.display(),
                    process.output_lines()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        times.push(latency);
        process
            .shutdown()
            .await
            .map_err(|e| format!("stopping {}: {e}", bin.display()))?;
    }
    Ok(Stats::of(&times))
}

/// Hands `messages` to the refresher as one SQS batch and deletes them; fails on a
/// batch item failure.
async fn invoke_and_delete(
    bench: &Bench,
    d: &Deployment,
    messages: &[aws_sdk_sqs::types::Message],
) -> Result<(), BoxError> {
    let event = lambda_sqs_event(messages, &d.queue_arn);
    let response = expect_response(&d.refresher, event, "refresher").await?;
    if response["batchItemFailures"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
    {
        return Err(format!("the refresher reported failures: {response}").into());
    }
    for m in messages {
        if let Some(handle) = m.receipt_handle() {
            bench
                .admin
                .sqs
                .delete_message()
                .queue_url(&d.queue_url)
                .receipt_handle(handle)
                .send()
                .await
                .map_err(|e| format!("deleting a refresh message: {e}"))?;
        }
    }
    Ok(())
}

/// Waits (up to 30 s) for one message on the queue.
async fn receive_one(
    bench: &Bench,
    url: &str,
) -> Result<Vec<aws_sdk_sqs::types::Message>, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let messages = bench
            .admin
            .receive(url, 1, 1)
            .await
            .map_err(|e| format!("receiving a refresh message: {e}"))?;
        if !messages.is_empty() {
            return Ok(messages);
        }
        if Instant::now() > deadline {
            return Err("no refresh message arrived within 30 s".into());
        }
    }
}

// ------------------------------------------------------------------------------------
// Section 3: sizes
// ------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SizeRow {
    path: String,
    bytes: u64,
    modified: String,
    /// Written after `scripts/bench.sh` (or the driver) started.
    this_run: bool,
    /// A deployment package, checked against the 6 MB target.
    package: bool,
}

fn sizes(bench: &Bench) -> Result<Vec<SizeRow>, BoxError> {
    println!("\n==> Section 3: sizes");
    let root = workspace_root();
    let bin_dir = bench
        .aggregator_bin
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target/release"));
    let mut candidates: Vec<(PathBuf, bool)> = Vec::new();
    for name in ["aggregator", "refresher"] {
        candidates.push((bin_dir.join(name), false));
    }
    for name in ["aggregator", "refresher"] {
        candidates.push((root.join(format!("target/lambda/{name}/bootstrap")), false));
        candidates.push((
            root.join(format!("target/lambda/{name}/bootstrap.zip")),
            true,
        ));
    }
    for name in ["aggregator", "refresher"] {
        candidates.push((
            root.join(format!("target/bench/host-zip/{name}/bootstrap.zip")),
            true,
        ));
    }
    let mut rows = Vec::new();
    for (path, package) in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let shown = path
            .strip_prefix(&root)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| path.display().to_string());
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64);
        let modified = modified_ms.map_or_else(|| "?".to_string(), iso8601);
        let this_run = modified_ms.is_some_and(|t| t >= run_started_ms());
        println!("    {shown}: {} bytes", meta.len());
        rows.push(SizeRow {
            path: shown,
            bytes: meta.len(),
            modified,
            this_run,
            package,
        });
    }
    if rows.is_empty() {
        return Err(format!("no binaries found under {}", bin_dir.display()).into());
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------
// The report
// ------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Report {
    bursts: Option<Vec<BurstResult>>,
    startup: Option<StartupResult>,
    sizes: Option<Vec<SizeRow>>,
    logs: Option<Vec<logs::LogRow>>,
    sustained: Option<sustained::SustainedResult>,
    soak: Option<soak::SoakResult>,
}

struct Target {
    name: String,
    measured: String,
    pass: bool,
}

impl Report {
    fn targets(&self, options: &Options) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(bursts) = &self.bursts {
            for r in bursts.iter().filter(|r| {
                r.scenario.events == 10_000
                    && r.scenario.buckets == 1
                    && r.scenario.delivery == Delivery::Direct
            }) {
                let bound = r.distinct_folders_per_window.unwrap_or(0);
                targets.push(Target {
                    name: format!(
                        "(a) DynamoDB writes, `{}` (10,000 events, 1 bucket, {} folder(s), one warm container) <= distinct (bucket, folder) per window",
                        r.scenario.id, r.scenario.folders
                    ),
                    measured: format!("{} UpdateItem <= {bound}", r.update_items),
                    pass: r.update_items <= bound as u64,
                });
            }
            if !bursts.is_empty() {
                let failing: Vec<String> = bursts
                    .iter()
                    .filter(|r| !r.over_chunk_bound().is_empty())
                    .map(|r| {
                        let (calls, bound) = r
                            .over_chunk_bound()
                            .iter()
                            .map(|b| (r.refreshes_per_bucket[*b], r.chunk_bound_per_bucket[*b]))
                            .max()
                            .unwrap_or((0, 0));
                        format!("{} {calls} > {bound}", r.scenario.id)
                    })
                    .collect();
                let measured = bursts
                    .iter()
                    .map(|r| {
                        let (calls, bound) = r.chunk_bound_of_busiest();
                        format!("{} {calls} <= {bound}", r.scenario.id)
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                targets.push(Target {
                    name: "(b) RefreshCache calls per bucket <= the sum over its windows of ceil(listings/50), every burst"
                        .to_string(),
                    measured: if failing.is_empty() {
                        measured
                    } else {
                        format!(
                            "over the bound: {} (windows that carry their predecessor's folders; see section 1, \"Targets of this section\")",
                            failing.join(", ")
                        )
                    },
                    pass: failing.is_empty(),
                });
                let rejected: usize = bursts
                    .iter()
                    .map(|r| r.throttled + r.interval_violations)
                    .sum();
                let min_gap = bursts.iter().filter_map(|r| r.min_gap).min();
                targets.push(Target {
                    name: format!(
                        "(b) pacing: calls on a share at least MIN_REFRESH_INTERVAL_SECONDS = {} s apart and at most 2 in flight (the stand-in's strict limits reject anything else), every burst",
                        options.min_interval_seconds
                    ),
                    measured: format!(
                        "{rejected} rejected; closest calls on a share {}",
                        min_gap.map_or_else(
                            || "– (no share was called twice)".to_string(),
                            |g| format!("{:.2} s apart", g.as_secs_f64())
                        )
                    ),
                    pass: rejected == 0,
                });
                let misses: Vec<String> = bursts
                    .iter()
                    .filter(|r| r.limit_ratio() > PHYSICAL_LIMIT_TARGET)
                    .map(|r| format!("{} {:.2}×", r.scenario.id, r.limit_ratio()))
                    .collect();
                targets.push(Target {
                    name: "(d) listing work <= 1.5× the physical limit (refreshing exactly the changed folders and their ancestors once), every burst".to_string(),
                    measured: if misses.is_empty() {
                        let worst = bursts
                            .iter()
                            .map(|r| r.limit_ratio())
                            .fold(0.0, f64::max);
                        format!("at most {worst:.2}×")
                    } else {
                        format!(
                            "{} of {} scenarios over: {} (see section 1, \"Listing work against the physical limit\")",
                            misses.len(),
                            bursts.len(),
                            misses.join(", ")
                        )
                    },
                    pass: misses.is_empty(),
                });
            }
            for r in bursts.iter().filter(|r| r.scenario.folders == 3) {
                let (percent, per_refresh, full) = r.listing_percent();
                let layout = if r.scenario.nested {
                    "10 top-level folders of 100"
                } else {
                    "1,000 folders at the root"
                };
                targets.push(Target {
                    name: format!("(c) listing work per refresh, 3 folders of a 100,000-object bucket ({layout}; objects + prefixes listed) <= 1% of a full-share refresh"),
                    measured: format!(
                        "{per_refresh:.0} objects+prefixes per refresh vs {full} = {percent:.2}%"
                    ),
                    pass: percent <= LISTING_TARGET_PERCENT,
                });
                let (calls_percent, calls, full_calls) = r.gateway_calls_percent();
                targets.push(Target {
                    name: format!("(c) the same as the gateway's S3 requests ({layout}; a HEAD per object listed plus the LIST pages) <= 1%"),
                    measured: format!(
                        "{calls:.0} requests per refresh vs {full_calls} = {calls_percent:.2}%"
                    ),
                    pass: calls_percent <= LISTING_TARGET_PERCENT,
                });
            }
        }
        if let Some(s) = &self.startup {
            for (name, stats) in [
                ("aggregator", &s.cold_aggregator),
                ("refresher", &s.cold_refresher),
            ] {
                targets.push(Target {
                    name: format!("cold start, {name}, median <= 50 ms"),
                    measured: format!("{:.1} ms", stats.median_ms()),
                    pass: stats.median_ms() <= COLD_START_TARGET_MS,
                });
            }
            for (what, kib) in &s.rss {
                targets.push(Target {
                    name: format!("peak RSS, {what} <= 20 MiB"),
                    measured: fmt_kib(*kib),
                    pass: *kib <= RSS_TARGET_KIB,
                });
            }
        }
        if let Some(sizes) = &self.sizes {
            for row in sizes.iter().filter(|r| r.package) {
                targets.push(Target {
                    name: format!(
                        "`{}`{} <= 6 MB",
                        row.path,
                        if row.this_run {
                            ""
                        } else {
                            " (built before this run)"
                        }
                    ),
                    measured: format!("{} bytes", group(row.bytes)),
                    pass: row.bytes <= ZIP_TARGET_BYTES,
                });
            }
        }
        if let Some(result) = &self.sustained {
            targets.extend(sustained::targets(result));
        }
        if let Some(result) = &self.soak {
            targets.extend(soak::targets(result));
        }
        targets
    }

    fn render(
        &self,
        options: &Options,
        machine: &Machine,
        load_before: &str,
        load_after: &str,
        driver_time: Duration,
    ) -> String {
        let mut md = String::new();
        let command = std::env::var("BENCH_COMMAND")
            .unwrap_or_else(|_| format!("target/debug/bench {}", options.args.join(" ")));
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Measured on this machine against moto and the Storage Gateway stand-in, with the real \
             release binaries under the Lambda Runtime API harness. Everything below comes from one run of:\n"
        );
        let _ = writeln!(md, "```sh\n{command}\n```\n");
        let _ = writeln!(md, "| run | |\n|---|---|");
        let _ = writeln!(md, "| date (UTC) | {} |", machine.date);
        let _ = writeln!(md, "| git commit | {} |", machine.commit);
        let _ = writeln!(
            md,
            "| machine | {} CPUs (`nproc`); CPU model (`model name` in /proc/cpuinfo): {}; {} RAM |",
            machine.nproc, machine.cpu, machine.memory
        );
        let _ = writeln!(
            md,
            "| system | Linux {}; {}; moto {} |",
            machine.kernel, machine.rustc, machine.moto
        );
        let stale = machine.binaries_built.get(..19) < machine.product_commit.get(..19);
        let _ = writeln!(
            md,
            "| binaries | `{}` (`S3EA_BIN_DIR`); the refresher built {}; the newest commit to the sources of the binaries (`*/src`, the manifests, `Cargo.lock`): {}{} |",
            machine.bin_dir,
            machine.binaries_built,
            machine.product_commit,
            if stale {
                " (**the binary is older than that commit**)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "| load average | before: {load_before}; after: {load_after} |"
        );
        let total = std::env::var("BENCH_STARTED_MS")
            .is_ok()
            .then(|| Duration::from_millis((now_ms() - run_started_ms()).max(0) as u64));
        match total {
            Some(total) => {
                let _ = writeln!(
                    md,
                    "| run time | {} for `scripts/bench.sh` in all (builds included), of which {} measuring |",
                    fmt_duration(total),
                    fmt_duration(driver_time)
                );
            }
            None => {
                let _ = writeln!(md, "| run time | {} measuring |", fmt_duration(driver_time));
            }
        }
        let _ = writeln!(md);

        let targets = self.targets(options);
        if !targets.is_empty() {
            let _ = writeln!(md, "## Targets\n");
            let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
            for t in &targets {
                let _ = writeln!(
                    md,
                    "| {} | {} | **{}** |",
                    t.name,
                    t.measured,
                    if t.pass { "PASS" } else { "FAIL" }
                );
            }
            let _ = writeln!(md);
        }
        if let Some(bursts) = &self.bursts {
            render_bursts(&mut md, options, bursts);
        }
        if let Some(startup) = &self.startup {
            render_startup(&mut md, options, startup);
        }
        if let Some(sizes) = &self.sizes {
            render_sizes(&mut md, options, sizes);
        }
        if let Some(rows) = &self.logs {
            logs::render(&mut md, &options.command_for("logs", None), rows);
        }
        if let Some(result) = &self.sustained {
            sustained::render(&mut md, &options.command_for("sustained", None), result);
        }
        if let Some(result) = &self.soak {
            soak::render(&mut md, &options.command_for("soak", None), machine, result);
        }
        md
    }
}

impl BurstResult {
    /// (percent, objects+prefixes per refresh, objects+prefixes of a full refresh).
    /// Per refresh, the S3 requests the work stands for: a HEAD per object listed and
    /// the LIST pages; against one full recursive refresh.
    fn gateway_calls_percent(&self) -> (f64, f64, u64) {
        let refreshes = self.refreshes().max(1) as f64;
        let per_refresh = (self.work.objects_listed + self.work.list_requests) as f64 / refreshes;
        let full = self
            .full_share_work
            .first()
            .map(|w| w.objects_listed + w.list_requests)
            .unwrap_or(0);
        let percent = if full == 0 {
            f64::INFINITY
        } else {
            100.0 * per_refresh / full as f64
        };
        (percent, per_refresh, full)
    }

    fn listing_percent(&self) -> (f64, f64, u64) {
        let refreshes = self.refreshes().max(1) as f64;
        let per_refresh = (self.work.objects_listed + self.work.prefixes_listed) as f64 / refreshes;
        let full = self
            .full_share_work
            .first()
            .map(|w| w.objects_listed + w.prefixes_listed)
            .unwrap_or(0);
        let percent = if full == 0 {
            f64::INFINITY
        } else {
            100.0 * per_refresh / full as f64
        };
        (percent, per_refresh, full)
    }
}

fn render_bursts(md: &mut String, options: &Options, bursts: &[BurstResult]) {
    let w = options.window_seconds;
    let interval = options.min_interval_seconds;
    let _ = writeln!(md, "## 1. Bursts\n");
    let _ = writeln!(
        md,
        "Reproduce: `{}` (one scenario: add `--scenario ID`, e.g. `{}`).\n",
        options.command_for("bursts", None),
        options.command_for("bursts", Some("direct-10000x1x1"))
    );
    let _ = writeln!(
        md,
        "Each bucket is a `BucketModel::with_objects({OBJECTS_PER_BUCKET}, {FOLDERS_PER_BUCKET})` \
         ({} objects in {} folders) that the stand-in lists, with one NFS share on its root whose \
         cache starts as a snapshot. The events are S3 event notifications (AWS shape, \
         `ObjectCreated:Put`) for new keys in the first *folders* folders of each bucket, \
         round-robin over buckets and folders (event i goes to bucket i mod *buckets*, folder \
         (i div *buckets*) mod *folders*: the order that spreads a window's events over the most \
         folders, so the worst case for coalescing). The `-nested` scenario lays the same 1,000 \
         folders out as 10 top-level folders of 100 each (`top00/dir00000/...`); each key is also put into the bucket's model before \
         its event is delivered, so refreshes list it. `direct` delivers one notification per \
         invocation, as S3 → Lambda does, through one warm aggregator process (the release binary \
         under the Runtime API harness), back to back. `sqs` delivers the same kind of events as \
         S3 → SQS → Lambda batches (up to 10,000 records and 6 MB per invocation). \
         REFRESH_DELAY_SECONDS = W = {w} s and the refresher's MIN_REFRESH_INTERVAL_SECONDS = \
         {interval} s (shortened from the default 60 s so that a burst's chunks and windows are \
         called within seconds; the interval is the refresher's least time between two calls on a \
         share, plus its 1-s clock margin). The stand-in enforces the gateway's two refreshes in \
         flight per share and, with strict limits, the same {interval}-s interval: a call that \
         breaks either is rejected and counted. A refresh stays in flight for the stand-in's \
         default 50 ms; its refresh-complete event goes through an EventBridge rule in moto (its \
         own bus, source `aws.storagegateway`, detail-type \"Storage Gateway Refresh Cache \
         Event\") to the action queue, as `scripts/create-stack.sh` sets up on AWS. While the \
         burst runs, and after it, an event source mapping feeds the queue's messages (visible once \
         their delay has passed: window messages, the scheduler's wake-ups and the completion \
         events) to the real refresher, 10 per invocation, as Lambda's SQS poller does, until \
         every bucket's latest window is handed to its share and every share's scheduling item \
         (`share#<arn>`) has nothing `Pending` and no `Slots` in flight. T is the burst's duration \
         (first event handed in to the last response). Each scenario is one run on fresh buckets, \
         table, queue and processes (each process handled one warm-up invocation first, not \
         counted; the warm-up's message is purged).\n",
        group(OBJECTS_PER_BUCKET as u64),
        group(FOLDERS_PER_BUCKET as u64)
    );
    let _ = writeln!(
        md,
        "Counted: DynamoDB `UpdateItem` (writes) and `GetItem` (reads) and SQS `SendMessage` from \
         the aggregator at a counting proxy in front of moto; `RefreshCache` calls accepted by the \
         stand-in and their listing work (objects and common prefixes returned by `ListObjectsV2`, \
         and requests at 1,000 entries a page); the refresher's own DynamoDB and SQS requests at \
         its own proxy. Windows per bucket are the bucket items' `Generation` after the burst.\n"
    );
    let _ = writeln!(
        md,
        "**Bound (b)**, restated for the per-share scheduler: a window's changes on a share are L \
         listings (its changed folders and their ancestors up to the share root), a call takes at \
         most 50 and a share is called at most once per interval, so a window costs ceil(L/50) \
         calls, spread over ceil(L/50) intervals; what waits is merged with later windows, which \
         can only save calls. The bound per bucket (one share each) is the sum over its windows of \
         ceil(L_w/50), with each window's folders from the aggregator's reports (`direct`), or, \
         for `sqs`, every window counted with all of the bucket's folders. Calls per bucket can \
         therefore exceed 1 per window (`direct-1000x1x100`: 100 folders and the root are 101 \
         listings, 3 calls). Pacing is checked by the stand-in: no call on a share sooner than \
         {interval} s after the previous one, never a third in flight.\n"
    );
    let _ = writeln!(
        md,
        "**Physical limit**: what refreshing exactly the changed folders (and the ancestors \
         needed to show new folders) would list: computed from the bucket models after the burst, \
         not from the refreshes. For each bucket, the folders that the burst's keys are in plus \
         their ancestors up to the share root (here the bucket's root), each listed once, \
         non-recursively, and their objects and common prefixes summed as the stand-in's \
         `ListingWork` counts them. It is one refresh after the whole burst; a burst that spans \
         several windows needs a refresh after each (every event needs a refresh that starts \
         after it), so it lists its folders again.\n"
    );
    let _ = writeln!(md, "### This product\n");
    let _ = writeln!(
        md,
        "| scenario | events | buckets | folders/bucket | T (s) | windows/bucket | UpdateItem | GetItem | SendMessage | RefreshCache (busiest bucket ≤ bound b) | rejected (in flight + interval) | objects listed | prefixes listed | List requests | physical limit (objects + prefixes) | listing ÷ limit |"
    );
    let _ = writeln!(
        md,
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in bursts {
        let max = r.windows_opened.iter().copied().max().unwrap_or(0);
        let min = r.windows_opened.iter().copied().min().unwrap_or(0);
        let windows = if min == max {
            format!("{max}")
        } else {
            format!("{min}–{max}")
        };
        let (calls, bound) = r.chunk_bound_of_busiest();
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {:.2} | {} | {} | {} | {} | {} ({}{}) | {} + {} | {} | {} | {} | {} + {} | {:.2}× |",
            r.scenario.id,
            group(r.scenario.events as u64),
            r.scenario.buckets,
            r.scenario.folders,
            r.duration.as_secs_f64(),
            windows,
            group(r.update_items),
            group(r.get_items),
            group(r.send_messages),
            r.refreshes(),
            if calls > bound {
                format!("{calls} > {bound}, **over the bound**")
            } else {
                format!("{calls} ≤ {bound}")
            },
            if r.recursive_refreshes > 0 {
                format!(", {} recursive", r.recursive_refreshes)
            } else {
                String::new()
            },
            r.throttled,
            r.interval_violations,
            group(r.work.objects_listed),
            group(r.work.prefixes_listed),
            group(r.work.list_requests),
            group(r.physical_limit.objects_listed),
            group(r.physical_limit.prefixes_listed),
            r.limit_ratio(),
        );
    }
    let _ = writeln!(md);
    render_limit_check(md, bursts, w);
    let _ = writeln!(
        md,
        "The processes: aggregator invocations and its peak RSS (`VmHWM`) after the burst; what \
         the event source mapping handed to the refresher (window messages, wake-ups, completion \
         events) and in how many invocations; the refresher's own DynamoDB and SQS requests \
         (closing and recording windows with `UpdateItem`, the share items with `GetItem` and \
         conditional `PutItem`, wake-ups and messages sent back with `SendMessage`); and how long \
         after the burst's end the queue and the share items were drained.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | aggregator invocations | aggregator peak RSS | refresher messages: windows / wake-ups / completions | refresher invocations | refresher UpdateItem / GetItem / PutItem / SendMessage | drained after the burst |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|");
    for r in bursts {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} / {} / {} | {} | {} / {} / {} / {} | {:.1} s |",
            r.scenario.id,
            group(r.invocations as u64),
            r.aggregator_rss_kib
                .map_or_else(|| "–".to_string(), fmt_kib),
            r.mapping.window_messages,
            r.mapping.wake_ups,
            r.mapping.completion_events,
            r.mapping.invocations,
            group(r.refresher_update_items),
            group(r.refresher_get_items),
            group(r.refresher_put_items),
            group(r.refresher_send_messages),
            r.drain.as_secs_f64(),
        );
    }
    let _ = writeln!(md);
    let problems: Vec<String> = bursts
        .iter()
        .filter(|r| r.aggregator_errors > 0 || r.mapping.failures > 0)
        .map(|r| {
            format!(
                "`{}`: {} failed aggregator invocation(s), {} refresher batch item failure(s)",
                r.scenario.id, r.aggregator_errors, r.mapping.failures
            )
        })
        .collect();
    if problems.is_empty() {
        let _ = writeln!(
            md,
            "No invocation failed and no refresh message failed in any scenario.\n"
        );
    } else {
        let _ = writeln!(md, "Failures: {}.\n", problems.join("; "));
    }

    let _ = writeln!(md, "### The 2018 protocol on the same events\n");
    let _ = writeln!(
        md,
        "The 2018 design makes one conditional DynamoDB write per event (`SET LastRefresh = :t` \
         if `attribute_not_exists(LastRefresh) OR LastRefresh <= :t - W`), with each event's own \
         time, here the times and order of the burst above. For bursts of up to {} events the \
         writes are *executed* against moto through their own counting proxy (and the proxy's \
         count and the successful writes must equal the in-memory count, or the run fails); larger \
         bursts are *counted* in memory with the same condition. Each write that succeeds opens a \
         window, which in 2018 sent one SQS message (counted, not sent) that made one \
         `RefreshCache` of each share with FolderList `[\"/\"]`, recursive. Listing work is one full \
         recursive refresh of each bucket's share, measured through the stand-in after the burst \
         (with the burst's new objects), times that bucket's windows.\n",
        group(options.execute_2018 as u64)
    );
    let _ = writeln!(
        md,
        "| scenario | UpdateItem (conditional) | windows = SendMessage | RefreshCache (recursive \"/\") | objects listed | List requests | one full-share refresh (objects) |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|");
    for r in bursts {
        let work = r.work_2018();
        let full = r
            .full_share_work
            .first()
            .map(|w| group(w.objects_listed))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| `{}` | {} ({}) | {} | {} | {} | {} | {} |",
            r.scenario.id,
            group(r.y2018.writes),
            if r.y2018.executed {
                "executed"
            } else {
                "counted"
            },
            r.y2018.sends(),
            r.y2018.sends(),
            group(work.objects_listed),
            group(work.list_requests),
            full
        );
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "### Ratios (2018 ÷ this product)\n");
    let _ = writeln!(
        md,
        "| scenario | DynamoDB writes | SQS sends | RefreshCache | objects + prefixes listed | List requests |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|");
    for r in bursts {
        let w2018 = r.work_2018();
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} |",
            r.scenario.id,
            ratio(r.y2018.writes, r.update_items),
            ratio(r.y2018.sends() as u64, r.send_messages),
            ratio(r.y2018.sends() as u64, r.refreshes() as u64),
            ratio(
                w2018.objects_listed + w2018.prefixes_listed,
                r.work.objects_listed + r.work.prefixes_listed
            ),
            ratio(w2018.list_requests, r.work.list_requests),
        );
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "### Targets of this section\n");
    for r in bursts.iter().filter(|r| {
        r.scenario.events == 10_000
            && r.scenario.buckets == 1
            && r.scenario.delivery == Delivery::Direct
    }) {
        let _ = writeln!(
            md,
            "- (a) `{}`: {} `UpdateItem` for {} events; the distinct (bucket, folder) of each window \
             add up to {} over {} window(s) (each event counts in the window that its bucket had \
             open when it was handled, from the aggregator's reports). Besides: {} `GetItem`.",
            r.scenario.id,
            r.update_items,
            group(r.scenario.events as u64),
            r.distinct_folders_per_window.unwrap_or(0),
            r.windows_per_bucket.iter().sum::<usize>(),
            group(r.get_items)
        );
    }
    let _ = writeln!(
        md,
        "- (b) every scenario's busiest bucket's RefreshCache count and its bound (the sum over \
         its windows of ceil(listings/50)) are in the first table; the stand-in rejected {} \
         call(s) in all for two in flight and {} for the interval.",
        bursts.iter().map(|r| r.throttled).sum::<usize>(),
        bursts.iter().map(|r| r.interval_violations).sum::<usize>()
    );
    for r in bursts.iter().filter(|r| !r.over_chunk_bound().is_empty()) {
        let over: Vec<String> = r
            .over_chunk_bound()
            .iter()
            .map(|b| {
                format!(
                    "bucket {b}: {} calls, bound {}",
                    r.refreshes_per_bucket[*b], r.chunk_bound_per_bucket[*b]
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "- (b) **over the bound**: `{}` ({}{}). The bound counts each window's own folders; {}.",
            r.scenario.id,
            over.join("; "),
            r.carried().map_or_else(String::new, |(named, per_window)| format!(
                "; the calls named {} folders, listing each window's own changes once would name {}",
                group(named as u64),
                group(per_window as u64)
            )),
            CARRY_EXPLAINED
        );
    }
    for r in bursts.iter().filter(|r| r.scenario.folders == 3) {
        let (percent, per_refresh, _) = r.listing_percent();
        let full = r.full_share_work.first().copied().unwrap_or_default();
        let refreshes = r.refreshes().max(1) as f64;
        let full_entries = (full.objects_listed + full.prefixes_listed) as f64;
        // The folders directly under the root: all of them, or the 10 top-level ones.
        let top_level = if r.scenario.nested {
            FOLDERS_PER_BUCKET.div_ceil(100)
        } else {
            FOLDERS_PER_BUCKET
        };
        let _ = writeln!(
            md,
            "- (c) `{}`: {} refresh(es) listed {} objects + {} prefixes in {} requests, {:.0} \
             entries per refresh; one full recursive refresh of the share lists {} objects + {} \
             prefixes in {} requests. Per refresh that is **{:.2}%** of the full refresh's entries \
             (the target's measure), {:.2}% of its objects (each object stands for a HEAD by the \
             gateway) and {:.2}% of its requests. The root's listing alone, which makes a new \
             folder show, returns the bucket's {} top-level folders: {:.2}% of the full refresh.",
            r.scenario.id,
            r.refreshes(),
            group(r.work.objects_listed),
            group(r.work.prefixes_listed),
            r.work.list_requests,
            per_refresh,
            group(full.objects_listed),
            group(full.prefixes_listed),
            full.list_requests,
            percent,
            percent_of(
                r.work.objects_listed as f64 / refreshes,
                full.objects_listed as f64
            ),
            percent_of(
                r.work.list_requests as f64 / refreshes,
                full.list_requests as f64
            ),
            group(top_level as u64),
            percent_of(top_level as f64, full_entries),
        );
    }
    let _ = writeln!(md);
    render_burst_findings(md, bursts);
}

/// The summary check of listing work against the physical limit, with the reasons
/// for each miss.
fn render_limit_check(md: &mut String, bursts: &[BurstResult], window_seconds: u32) {
    let _ = writeln!(md, "### Listing work against the physical limit\n");
    let _ = writeln!(
        md,
        "Folders named: the `FolderList` entries of all calls together. The limit's folders: \
         each changed folder and its ancestors, once per bucket. Per window: the same, counted \
         once for every window (what listing each window's changes exactly once would name; \
         `direct` only).\n"
    );
    let _ = writeln!(
        md,
        "| scenario | windows/bucket | RefreshCache | folders named | the limit's folders | per window | listing work (objects + prefixes) | physical limit | listing ÷ limit | ≤ 1.5× |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in bursts {
        let max = r.windows_opened.iter().copied().max().unwrap_or(0);
        let min = r.windows_opened.iter().copied().min().unwrap_or(0);
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {:.2}× | {} |",
            r.scenario.id,
            if min == max {
                format!("{max}")
            } else {
                format!("{min}–{max}")
            },
            r.refreshes(),
            group(r.folders_listed as u64),
            group(r.physical_folders as u64),
            r.window_listings
                .map_or_else(|| "–".to_string(), |n| group(n as u64)),
            group(r.work.objects_listed + r.work.prefixes_listed),
            group(r.physical_limit.objects_listed + r.physical_limit.prefixes_listed),
            r.limit_ratio(),
            if r.limit_ratio() <= PHYSICAL_LIMIT_TARGET {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    let _ = writeln!(md);
    let misses: Vec<&BurstResult> = bursts
        .iter()
        .filter(|r| r.limit_ratio() > PHYSICAL_LIMIT_TARGET)
        .collect();
    if misses.is_empty() {
        let _ = writeln!(
            md,
            "**Summary check: listing work ≤ 1.5× the limit in every bursts scenario: PASS** \
             (at most {:.2}×).\n",
            bursts.iter().map(|r| r.limit_ratio()).fold(0.0, f64::max)
        );
        return;
    }
    let _ = writeln!(
        md,
        "**Summary check: listing work ≤ 1.5× the limit in every bursts scenario: FAIL**, {} of \
         {} scenarios miss:\n",
        misses.len(),
        bursts.len()
    );
    for r in misses {
        let windows = r.windows_opened.iter().copied().max().unwrap_or(0);
        let mut why = Vec::new();
        if windows > 1 {
            why.push(format!(
                "the burst took T = {:.1} s at W = {} s, so it spans {} windows per bucket; every \
                 event needs a refresh that starts after it, so each window's folders are listed \
                 again after that window: the calls named {} folders for the limit's {} ({:.1} \
                 listings per folder{}), and a folder listed early lists the objects written \
                 until then, the last listing the rest",
                r.duration.as_secs_f64(),
                window_seconds,
                windows,
                group(r.folders_listed as u64),
                group(r.physical_folders as u64),
                r.folders_listed as f64 / r.physical_folders.max(1) as f64,
                r.window_listings.map_or_else(String::new, |n| format!(
                    "; listing each window's changes exactly once would name {}",
                    group(n as u64)
                ))
            ));
        }
        if let Some((named, per_window)) = r.carried() {
            why.push(format!(
                "and beyond that, the calls named {} folders where listing each window's own \
                 changes once would name {}: {CARRY_EXPLAINED}",
                group(named as u64),
                group(per_window as u64)
            ));
        }
        if r.recursive_refreshes > 0 {
            why.push(format!(
                "{} of its {} calls were recursive (a backlog of more than 200 listings collapses \
                 into parents, and a window of more than 200 folders is the whole bucket), and a \
                 recursive call lists whole subtrees, not just the changed folders",
                r.recursive_refreshes,
                r.refreshes()
            ));
        }
        if why.is_empty() {
            why.push(format!(
                "its {} calls named {} folders for the limit's {}",
                r.refreshes(),
                group(r.folders_listed as u64),
                group(r.physical_folders as u64)
            ));
        }
        let _ = writeln!(
            md,
            "- `{}`: **{:.2}×** the limit ({} objects + prefixes listed for {}), {:.0}% over the \
             1.5× goal. Why: {}.",
            r.scenario.id,
            r.limit_ratio(),
            group(r.work.objects_listed + r.work.prefixes_listed),
            group(r.physical_limit.objects_listed + r.physical_limit.prefixes_listed),
            100.0 * (r.limit_ratio() / PHYSICAL_LIMIT_TARGET - 1.0),
            why.join("; ")
        );
    }
    let _ = writeln!(md);
}

/// What the tables show, with the numbers of this run.
fn render_burst_findings(md: &mut String, bursts: &[BurstResult]) {
    let _ = writeln!(
        md,
        "### What the numbers show
"
    );
    let direct: Vec<&BurstResult> = bursts
        .iter()
        .filter(|r| r.scenario.delivery == Delivery::Direct)
        .collect();
    if !direct.is_empty() {
        let reads: u64 = direct.iter().map(|r| r.get_items).sum();
        let events: usize = direct.iter().map(|r| r.scenario.events).sum();
        let writes: u64 = direct.iter().map(|r| r.update_items).sum();
        let _ = writeln!(
            md,
            "- **Writes.** Over the {} direct bursts ({} events), the aggregator made {} \
             `UpdateItem` in all: one when a window opens and one when an event brings a folder that \
             the window does not record yet (and, rarely, a second try when a join raced the \
             refresher's close); every other event is answered from the window that the warm \
             container remembers, with no call at all.",
            direct.len(),
            group(events as u64),
            group(writes)
        );
        let _ = writeln!(
            md,
            "- **Reads.** The same bursts made {} `GetItem` (consistent reads). A warm container \
             trusts its remembered window only until 1 s (its clock margin) before the window's \
             end; from then until the refresher has closed the window, each event reads the item \
             once, and writes nothing when the window already records its folder. The count \
             therefore grows with the event rate in that last second and with how soon the \
             refresher closes the window, not with the burst's size.",
            group(reads)
        );
    }
    for r in direct
        .iter()
        .filter(|r| r.scenario.events >= 1_000 && r.update_items * 2 >= r.scenario.events as u64)
    {
        let pairs = r.scenario.buckets * r.scenario.folders;
        let _ = writeln!(
            md,
            "- **Every event a new folder: `{}`.** Round-robin over {} buckets × {} folders, a \
             (bucket, folder) comes back only every {} events, so a window rarely sees one twice: \
             nearly every event brings a folder that its window does not record, and costs one \
             `UpdateItem` ({} for {} events; the 2018 design: {}). Each of those writes waits for \
             moto ({:.1} ms per event on average here), which stretches T to {:.0} s and so makes \
             {} windows per bucket. The saving in this pattern is in listing work, not in writes.",
            r.scenario.id,
            r.scenario.buckets,
            r.scenario.folders,
            group(pairs as u64),
            group(r.update_items),
            group(r.scenario.events as u64),
            group(r.y2018.writes),
            r.duration.as_secs_f64() * 1000.0 / r.scenario.events.max(1) as f64,
            r.duration.as_secs_f64(),
            r.windows_per_bucket.iter().copied().max().unwrap_or(0),
        );
    }
    let chunked: Vec<String> = bursts
        .iter()
        .filter(|r| {
            r.chunk_bound_per_bucket
                .iter()
                .zip(&r.windows_opened)
                .any(|(bound, windows)| *bound as u64 > *windows)
        })
        .map(|r| {
            format!(
                "`{}` {} calls for {} window(s) per bucket, {:.2}× the physical limit",
                r.scenario.id,
                r.refreshes(),
                r.windows_opened.iter().copied().max().unwrap_or(0),
                r.limit_ratio()
            )
        })
        .collect();
    if !chunked.is_empty() {
        let _ = writeln!(
            md,
            "- **Many folders in one window.** When a window's changed folders and their \
             ancestors are more than `FolderList`'s 50, the scheduler no longer collapses them \
             into a recursive refresh of their parents (before it, `direct-1000x1x100` was one \
             recursive refresh of the root that listed 101,000 objects): they become several \
             non-recursive calls of at most 50, one per interval, which list only the changed \
             folders and their ancestors. Chunked: {}. Recursive calls: {} in all (a backlog of \
             more than 200 listings, or a window of more than 200 folders, still collapses).",
            chunked.join("; "),
            bursts.iter().map(|r| r.recursive_refreshes).sum::<usize>()
        );
    }
    let batched: Vec<&BurstResult> = bursts
        .iter()
        .filter(|r| r.scenario.delivery == Delivery::SqsBatched)
        .collect();
    if !batched.is_empty() {
        let writes: Vec<String> = batched
            .iter()
            .map(|r| {
                format!(
                    "`{}`: {} `UpdateItem` for {} bucket(s) in {} invocations",
                    r.scenario.id, r.update_items, r.scenario.buckets, r.invocations
                )
            })
            .collect();
        let rss = batched
            .iter()
            .filter_map(|r| r.aggregator_rss_kib)
            .max()
            .map_or_else(|| "–".to_string(), fmt_kib);
        let _ = writeln!(
            md,
            "- **SQS batches.** Through SQS, 10,000 events arrive in a few invocations of up to \
             10,000 records and 6 MB, and the aggregator writes at most once per bucket and batch \
             ({}). Parsing a 6 MB batch raises the aggregator's peak RSS to {} (process table), \
             against about 10 MiB for one-event invocations.",
            writes.join("; "),
            rss
        );
    }
    let _ = writeln!(
        md,
        "- **Limits of the set-up.** moto is a Python server on this machine: a DynamoDB write \
         takes it from a few to a few tens of milliseconds (section 2), and bursts that write \
         often run at moto's pace. T, and with it the number of windows, reflects this machine, \
         not AWS; the counts depend on speed only through the number of windows.\n"
    );
}

fn render_startup(md: &mut String, options: &Options, s: &StartupResult) {
    let _ = writeln!(md, "## 2. Cold start, warm handler time, peak RSS\n");
    let _ = writeln!(
        md,
        "Reproduce: `{}`.\n",
        options.command_for("startup", None)
    );
    let _ = writeln!(
        md,
        "Release binaries, {} runs per figure; median (min–max). **Cold start**: from spawning the \
         process to its first `GET /2018-06-01/runtime/invocation/next` at the harness (config, \
         logging and the AWS SDK clients are set up in between; no network call), a new process \
         each run. **Warm handler time**: from the harness handing the event out on `/next` to \
         receiving its `/response`, which includes the handler and two loopback HTTP exchanges; \
         after warm-up invocations that are not counted; LOG_LEVEL=INFO, so each invocation also \
         writes its log and metric lines. Handler times that include a DynamoDB or SQS call mostly \
         measure moto (a Python server on this machine), not the function. **Peak RSS**: `VmHWM` \
         from `/proc/<pid>/status` after the runs (the aggregator's after each burst is in section \
         1's process table).\n",
        s.runs
    );
    let _ = writeln!(
        md,
        "| what | median | min | max | runs |\n|---|--:|--:|--:|--:|"
    );
    for (what, stats) in [
        ("aggregator cold start", &s.cold_aggregator),
        ("refresher cold start", &s.cold_refresher),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            stats.median_ms(),
            stats.min_ms(),
            stats.max_ms(),
            stats.n
        );
    }
    for (what, stats) in &s.handlers {
        let _ = writeln!(
            md,
            "| warm handler, {what} | {:.3} ms | {:.3} ms | {:.3} ms | {} |",
            stats.median_ms(),
            stats.min_ms(),
            stats.max_ms(),
            stats.n
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "| process | peak RSS (VmHWM) |\n|---|--:|");
    for (what, kib) in &s.rss {
        let _ = writeln!(md, "| {what} | {} |", fmt_kib(*kib));
    }
    let _ = writeln!(md);
}

fn render_sizes(md: &mut String, options: &Options, rows: &[SizeRow]) {
    let _ = writeln!(md, "## 3. Sizes\n");
    let _ = writeln!(
        md,
        "Reproduce: `{}` (add `--with-lambda-build` before `--out` to build the arm64 packages \
         first, as `scripts/create-stack.sh` does: `cargo lambda build --release --arm64 \
         --output-format zip -p aggregator -p refresher`). \
         `target/bench/host-zip/*/bootstrap.zip` is the host (x86_64) release binary named \
         `bootstrap`, zipped by `scripts/bench.sh` with `zip -9`. A `no` for `target/release/*` \
         means that the run's `cargo build --release` found the binaries up to date.\n",
        options.command_for("sizes", None)
    );
    let _ = writeln!(
        md,
        "| file | bytes | MiB | modified (UTC) | written during this run |\n|---|--:|--:|---|---|"
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| `{}` | {} | {:.2} | {} | {} |",
            row.path,
            group(row.bytes),
            row.bytes as f64 / (1024.0 * 1024.0),
            row.modified,
            if row.this_run { "yes" } else { "no" }
        );
    }
    let _ = writeln!(md);
}

// ------------------------------------------------------------------------------------
// The machine
// ------------------------------------------------------------------------------------

struct Machine {
    date: String,
    commit: String,
    nproc: usize,
    cpu: String,
    memory: String,
    kernel: String,
    rustc: String,
    moto: String,
    bin_dir: String,
    /// When the refresher binary was built, and the newest commit to the product's
    /// crates (so a stale binary shows).
    binaries_built: String,
    product_commit: String,
}

impl Machine {
    async fn read() -> Machine {
        let root = workspace_root();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let head = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
        let dirty: Vec<String> = git(&["status", "--porcelain", "--untracked-files=no"])
            .map(|s| {
                s.lines()
                    .map(|l| l.get(3..).unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        let product_dirty = dirty.iter().any(|f| {
            [
                "aggregator/",
                "refresher/",
                "shared/",
                "Cargo.toml",
                "Cargo.lock",
            ]
            .iter()
            .any(|p| f.starts_with(p))
        });
        let commit = if dirty.is_empty() {
            format!("`{head}`")
        } else {
            format!(
                "`{head}` plus uncommitted changes to {} tracked file(s), {}",
                dirty.len(),
                if product_dirty {
                    "some of them in the product's crates (aggregator/, refresher/, shared/ or the workspace manifest)"
                } else {
                    "none in the product's crates (aggregator/, refresher/, shared/) or the workspace manifest"
                }
            )
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".to_string());
        let command = |program: &str, args: &[&str]| {
            std::process::Command::new(program)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".to_string())
        };
        let bin_dir = std::env::var("S3EA_BIN_DIR").unwrap_or_else(|_| "target/debug".into());
        let binaries_built = std::fs::metadata(root.join(&bin_dir).join("refresher"))
            .or_else(|_| std::fs::metadata(Path::new(&bin_dir).join("refresher")))
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or_else(|| "?".to_string(), |d| iso8601(d.as_millis() as i64));
        let product_commit = git(&[
            "log",
            "-1",
            "--format=%cd (%h)",
            "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
            "--",
            "aggregator/src",
            "aggregator/Cargo.toml",
            "refresher/src",
            "refresher/Cargo.toml",
            "shared/src",
            "shared/Cargo.toml",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .unwrap_or_else(|| "unknown".to_string());
        Machine {
            date: iso8601(now_ms()),
            commit,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            rustc: command("rustc", &["--version"]),
            moto: command("python3", &["-c", "import moto; print(moto.__version__)"]),
            bin_dir,
            binaries_built,
            product_commit,
        }
    }
}

// ------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------

/// Median, min and max of some durations.
#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn of(samples: &[Duration]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let n = sorted.len();
        let median = match n {
            0 => Duration::ZERO,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
        };
        Stats {
            n,
            median,
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }

    fn median_ms(&self) -> f64 {
        self.median.as_secs_f64() * 1000.0
    }

    fn min_ms(&self) -> f64 {
        self.min.as_secs_f64() * 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.max.as_secs_f64() * 1000.0
    }

    fn describe_ms(&self) -> String {
        format!(
            "median {:.3} ms (min {:.3}, max {:.3}, n = {})",
            self.median_ms(),
            self.min_ms(),
            self.max_ms(),
            self.n
        )
    }
}

/// `{"Records":[record]}`.
fn notification(record: &Value) -> Value {
    json!({ "Records": [record] })
}

/// One S3 event notification record, as AWS sends it for a new object.
fn s3_record(bucket: &str, key: &str, event_ms: i64, sequence: usize) -> Value {
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": iso8601(event_ms),
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
    })
}

/// One record of a Lambda SQS event whose body is an S3 notification.
fn sqs_record(body: &str, sequence: usize, queue_arn: &str, sent_ms: i64) -> Value {
    json!({
        "messageId": format!("00000000-0000-4000-8000-{sequence:012}"),
        "receiptHandle": format!("bench-receipt-{sequence}"),
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": sent_ms.to_string(),
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": sent_ms.to_string()
        },
        "messageAttributes": {},
        "md5OfBody": "00000000000000000000000000000000",
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION
    })
}

/// When `scripts/bench.sh` started (`BENCH_STARTED_MS`), or else this process.
fn run_started_ms() -> i64 {
    static STARTED: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        std::env::var("BENCH_STARTED_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(now_ms)
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2026-01-01T00:00:00.000Z`.
fn iso8601(epoch_ms: i64) -> String {
    let secs = epoch_ms.div_euclid(1000);
    let millis = epoch_ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let day_secs = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `VmHWM` of a running process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB ({} KiB)", kib as f64 / 1024.0, group(kib))
}

fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// 12345678 → "12,345,678".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "1,234×", or "∞" / "–" when the divisor is zero.
fn ratio(numerator: u64, denominator: u64) -> String {
    match (numerator, denominator) {
        (0, 0) => "–".to_string(),
        (_, 0) => "∞".to_string(),
        (n, d) => {
            let r = n as f64 / d as f64;
            if r >= 100.0 {
                format!("{}×", group(r.round() as u64))
            } else {
                format!("{r:.1}×")
            }
        }
    }
}

fn percent_of(part: f64, whole: f64) -> f64 {
    if whole == 0.0 {
        f64::INFINITY
    } else {
        100.0 * part / whole
    }
}
