//! Section 5: sustained load. Steady writes for minutes through the real binaries, with
//! the stand-in enforcing the gateway's limits strictly, compared with two designs that
//! are not our binaries any more and are therefore modelled: the 2018 design and the
//! previous per-window refresher, replayed deterministically ([`model`]) over the same
//! write times, with the stand-in's duration formula and the same bucket model.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::aws::BoxError;
use integration_tests::runtime_api::Invocation;
use integration_tests::sgw_standin::{
    BucketModel, BucketSource, ShareKind, DEFAULT_REFRESH_DURATION, DEFAULT_REFRESH_TIME_PER_OBJECT,
};

use super::{
    event_source_mapping, group, notification, s3_record, warm_up, Bench, Deployment, DrainWatch,
    MappingStats, Target, PHYSICAL_LIMIT_TARGET,
};

#[path = "model.rs"]
mod model;
use model::{Census, Micros, ModelRun, Refresh, ShareSpec, Timing, Write};

/// How long the section writes, and how fast, unless the options say otherwise.
pub const DEFAULT_SECONDS: u32 = 180;
pub const DEFAULT_RATE: u32 = 20;
/// Shortened for the run (the defaults are 30 s and 60 s).
const WINDOW_SECONDS: u32 = 2;
const MIN_INTERVAL_SECONDS: u32 = 10;
/// How long a refresh stays in flight on the stand-in: base + per object listed.
const REFRESH_BASE: Duration = Duration::from_secs(3);
const REFRESH_PER_OBJECT: Duration = Duration::from_millis(1);
/// The action queue's visibility timeout (`scripts/create-stack.sh`): a failed message
/// comes back after it.
const VISIBILITY_TIMEOUT_SECONDS: i64 = 360;
/// Two buckets of 100,000 objects in 10 top-level folders of 100 folders each.
const BUCKETS: usize = 2;
const OBJECTS: usize = 100_000;
const FOLDERS: usize = 1_000;
/// Each bucket's writes go to 16 "hot" folders at a time, which move every 20 s; every
/// 25th write of a bucket goes into a new subfolder of a hot folder.
const HOT_FOLDERS: usize = 16;
const HOT_PHASE_SECONDS: f64 = 20.0;
const NEW_FOLDER_EVERY: usize = 25;
/// Besides a share on each bucket's root, one on this prefix.
const PREFIX_SHARE: &str = "top00/";

/// `top03/dir00305`: folder `f` of the layout.
fn folder_path(f: usize) -> String {
    format!("top{:02}/{}", f / 100, BucketModel::folder_name(f))
}

fn bucket_model() -> BucketModel {
    let model = BucketModel::new();
    for i in 0..OBJECTS {
        model.put(format!("{}/obj{i:07}", folder_path(i % FOLDERS)));
    }
    model
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Write `i` of the run: its bucket and key. Writes alternate between the buckets; a
/// bucket's hot folders are spread over its top-level folders (61 is prime to 1,000).
fn planned_write(i: usize, rate: u32) -> (usize, String) {
    let bucket = i % BUCKETS;
    let j = i / BUCKETS;
    let phase = (i as f64 / f64::from(rate) / HOT_PHASE_SECONDS) as usize;
    let k = (splitmix(i as u64) % HOT_FOLDERS as u64) as usize;
    let f = (phase * 131 + k * 61 + bucket * 500) % FOLDERS;
    let key = if j % NEW_FOLDER_EVERY == NEW_FOLDER_EVERY - 1 {
        format!("{}/new-{j:05}/obj-{i:06}.dat", folder_path(f))
    } else {
        format!("{}/sustained-{i:06}.dat", folder_path(f))
    };
    (bucket, key)
}

fn micros(t: SystemTime) -> Micros {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Micros)
}

fn secs(us: Micros) -> f64 {
    us as f64 / 1e6
}

/// One design's figures.
#[derive(Debug, Clone)]
pub struct Design {
    pub name: &'static str,
    /// For the per-share table and the findings.
    pub short: &'static str,
    /// "measured" or "modelled".
    pub how: &'static str,
    /// Accepted calls, rejected calls (ours: by the stand-in, in flight or interval;
    /// models: two in flight), and calls sooner than the interval after the previous
    /// accepted call, per share.
    pub calls: Vec<usize>,
    pub throttled: Vec<usize>,
    pub too_soon: Vec<usize>,
    pub recursive: usize,
    pub objects: u64,
    pub prefixes: u64,
    /// Per share, per write it shows.
    pub staleness: Vec<Vec<Micros>>,
    pub uncovered: usize,
    /// The replay's message counts (models only).
    pub replay: Option<ModelRun>,
}

impl Design {
    fn all_staleness(&self) -> Vec<Micros> {
        self.staleness.iter().flatten().copied().collect()
    }

    fn stale(&self, p: f64) -> Option<Micros> {
        model::percentile(&self.all_staleness(), p)
    }

    fn listed(&self) -> u64 {
        self.objects + self.prefixes
    }

    fn modelled(
        name: &'static str,
        short: &'static str,
        run: ModelRun,
        writes: &[Write],
        shares: &[ShareSpec],
        census: &[Census],
    ) -> Design {
        let (staleness, uncovered) = model::staleness(writes, shares, census, &run.refreshes);
        Design {
            name,
            short,
            how: "modelled",
            calls: (0..shares.len())
                .map(|s| run.refreshes.iter().filter(|r| r.share == s).count())
                .collect(),
            throttled: run.throttled.clone(),
            too_soon: run.too_soon.clone(),
            recursive: run.refreshes.iter().filter(|r| r.recursive).count(),
            objects: run.refreshes.iter().map(|r| r.objects).sum(),
            prefixes: run.refreshes.iter().map(|r| r.prefixes).sum(),
            staleness,
            uncovered,
            replay: Some(run),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SustainedResult {
    pub seconds: u32,
    pub rate: u32,
    pub writes: usize,
    pub new_folder_writes: usize,
    pub distinct_folders: usize,
    /// First to last write, the worst lag behind the schedule, failed invocations.
    pub write_span: Duration,
    pub max_lag: Duration,
    pub aggregator_errors: usize,
    /// "bucket 0, root", and the writes each share shows.
    pub share_labels: Vec<String>,
    pub share_writes: Vec<usize>,
    /// Physical limit per share: (objects, prefixes).
    pub limit: Vec<(u64, u64)>,
    /// Ours, the previous per-window refresher, the 2018 design.
    pub designs: Vec<Design>,
    pub mapping: MappingStats,
    /// From the last write until the queue and the share items were drained.
    pub drain: Duration,
    /// The stand-in's rejections of our calls: two in flight, too soon.
    pub rejected_in_flight: usize,
    pub rejected_too_soon: usize,
    /// Requests of the functions: aggregator UpdateItem / GetItem / SendMessage;
    /// refresher UpdateItem / GetItem / PutItem / SendMessage.
    pub aggregator_requests: [u64; 3],
    pub refresher_requests: [u64; 4],
    /// Completion events that were not recorded back (should be 0).
    pub missing_completions: usize,
}

impl SustainedResult {
    fn limit_total(&self) -> u64 {
        self.limit.iter().map(|(o, p)| o + p).sum()
    }

    fn ratio(&self, design: &Design) -> f64 {
        let limit = self.limit_total();
        if limit == 0 {
            f64::INFINITY
        } else {
            design.listed() as f64 / limit as f64
        }
    }
}

/// What writing did.
struct WriteRun {
    writes: Vec<Write>,
    errors: Vec<String>,
    max_lag: Duration,
    ended: Instant,
}

/// Writes `count` objects at `rate` per second, each put into its bucket's model and
/// then handed to the aggregator as one S3 notification (S3 → Lambda).
async fn write_steadily(
    d: &Deployment,
    buckets: &[String],
    models: &[BucketModel],
    count: usize,
    rate: u32,
) -> Result<WriteRun, BoxError> {
    let mut run = WriteRun {
        writes: Vec::with_capacity(count),
        errors: Vec::new(),
        max_lag: Duration::ZERO,
        ended: Instant::now(),
    };
    let start = Instant::now();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        run.max_lag = run
            .max_lag
            .max(Instant::now().saturating_duration_since(due));
        let (bucket, key) = planned_write(i, rate);
        models[bucket].put(key.clone());
        // After the put: a refresh that starts later lists the object.
        let at = micros(SystemTime::now());
        let payload = notification(&s3_record(&buckets[bucket], &key, at / 1000, i));
        run.writes.push(Write { bucket, key, at });
        match d
            .aggregator
            .invoke(payload)
            .await
            .map_err(|e| format!("aggregator invocation {i}: {e}"))?
        {
            Invocation::Response(_) => {}
            Invocation::Error {
                error_type,
                error_message,
            } => run
                .errors
                .push(format!("write {i}: {error_type}: {error_message}")),
        }
    }
    run.ended = Instant::now();
    Ok(run)
}

pub async fn measure(bench: &Bench) -> Result<SustainedResult, BoxError> {
    let seconds = bench.options.sustained_seconds;
    let rate = bench.options.sustained_rate;
    let count = (seconds * rate) as usize;
    println!(
        "\n==> Section 5: sustained load, {count} writes at {rate}/s for {seconds} s into {BUCKETS} buckets (2 shares each), W = {WINDOW_SECONDS} s, MIN_REFRESH_INTERVAL_SECONDS = {MIN_INTERVAL_SECONDS} s"
    );
    let gateway_arn = bench.gateway.add_gateway("bench-sustained");
    let mut buckets = Vec::new();
    let mut models = Vec::new();
    let mut census = Vec::new();
    let mut shares: Vec<ShareSpec> = Vec::new();
    let mut share_labels = Vec::new();
    for b in 0..BUCKETS {
        let bucket = format!("bench-{}-sustained-b{b}", std::process::id());
        let model = bucket_model();
        census.push(Census::new(model.snapshot().iter().map(String::as_str)));
        bench
            .gateway
            .set_bucket_source(&bucket, BucketSource::Model(model.clone()));
        for prefix in ["", PREFIX_SHARE] {
            let location = if prefix.is_empty() {
                format!("arn:aws:s3:::{bucket}")
            } else {
                format!("arn:aws:s3:::{bucket}/{prefix}")
            };
            let arn = bench
                .gateway
                .add_share(&gateway_arn, ShareKind::Nfs, &location);
            shares.push(ShareSpec {
                bucket: b,
                prefix: prefix.to_string(),
                arn,
            });
            share_labels.push(if prefix.is_empty() {
                format!("bucket {b}, root")
            } else {
                format!("bucket {b}, `{prefix}`")
            });
        }
        buckets.push(bucket);
        models.push(model);
    }
    let share_arns: Vec<String> = shares.iter().map(|s| s.arn.clone()).collect();

    let d = bench
        .deploy(WINDOW_SECONDS, MIN_INTERVAL_SECONDS, "INFO")
        .await?;
    warm_up(bench, &d).await?;
    d.aggregator_proxy.reset();
    d.refresher_proxy.reset();
    bench.gateway.set_refresh_duration(REFRESH_BASE);
    bench
        .gateway
        .set_refresh_time_per_object(REFRESH_PER_OBJECT);
    bench
        .gateway
        .set_strict_limits(Some(Duration::from_secs(u64::from(MIN_INTERVAL_SECONDS))));
    let refreshes_before = bench.gateway.refreshes().len();
    let calls_before = bench.gateway.calls().len();
    let rejected_before = bench.gateway.rejected_refreshes();
    let violations_before = bench.gateway.interval_violations();

    let writes_done = AtomicBool::new(false);
    let writing = async {
        let run = write_steadily(&d, &buckets, &models, count, rate).await;
        writes_done.store(true, Ordering::SeqCst);
        run
    };
    let watch = DrainWatch {
        buckets: &buckets,
        shares: &share_arns,
    };
    let drain_limit = Duration::from_secs(600);
    let (written, mapping) = tokio::join!(
        writing,
        event_source_mapping(bench, &d, &writes_done, &watch, drain_limit)
    );
    let drained_at = Instant::now();
    let written = written?;
    let mapping = mapping?;
    let drain = drained_at.saturating_duration_since(written.ended);
    let rejected_in_flight = bench.gateway.rejected_refreshes() - rejected_before;
    let rejected_too_soon = bench.gateway.interval_violations() - violations_before;
    let records: Vec<_> = bench.gateway.refreshes()[refreshes_before..]
        .iter()
        .filter(|r| share_arns.contains(&r.share_arn))
        .cloned()
        .collect();
    let rejected_calls: Vec<_> = bench.gateway.calls()[calls_before..]
        .iter()
        .filter(|c| c.operation == "RefreshCache" && c.error_type.is_some())
        .cloned()
        .collect();
    let completed: HashMap<String, SystemTime> = bench
        .gateway
        .completion_events()
        .into_iter()
        .map(|c| (c.notification_id, c.completed))
        .collect();
    let aggregator_requests =
        ["UpdateItem", "GetItem", "SendMessage"].map(|op| d.aggregator_proxy.count(op));
    let refresher_requests =
        ["UpdateItem", "GetItem", "PutItem", "SendMessage"].map(|op| d.refresher_proxy.count(op));
    bench.gateway.set_strict_limits(None);
    bench.gateway.set_refresh_duration(DEFAULT_REFRESH_DURATION);
    bench
        .gateway
        .set_refresh_time_per_object(DEFAULT_REFRESH_TIME_PER_OBJECT);
    bench.undeploy(d).await?;
    for share in &share_arns {
        bench.gateway.remove_share(share);
    }
    for bucket in &buckets {
        bench.gateway.clear_bucket_source(bucket);
    }

    let writes = written.writes;
    for w in &writes {
        census[w.bucket].record(&w.key, w.at);
    }
    for c in &mut census {
        c.finish();
    }
    let new_folder_writes = writes
        .iter()
        .filter(|w| census[w.bucket].is_new_at(model::folder_of(&w.key), w.at))
        .count();
    let distinct_folders = writes
        .iter()
        .map(|w| (w.bucket, model::folder_of(&w.key).to_string()))
        .collect::<BTreeSet<_>>()
        .len();
    let share_writes: Vec<usize> = shares
        .iter()
        .map(|s| {
            writes
                .iter()
                .filter(|w| w.bucket == s.bucket && w.key.starts_with(&s.prefix))
                .count()
        })
        .collect();
    let first_write = writes.first().map_or(0, |w| w.at);
    let last_write = writes.last().map_or(0, |w| w.at);
    let interval_us = i64::from(MIN_INTERVAL_SECONDS) * 1_000_000;
    let limit = model::physical_limit(&writes, &shares, &census, first_write, interval_us);

    // Ours, measured.
    let index_of = |arn: &str| shares.iter().position(|s| s.arn == arn);
    let mut missing_completions = 0;
    let ours_refreshes: Vec<Refresh> = records
        .iter()
        .filter_map(|r| {
            let share = index_of(&r.share_arn)?;
            let end = match completed.get(&r.notification_id) {
                Some(t) => micros(*t),
                None => {
                    missing_completions += 1;
                    Micros::MAX
                }
            };
            Some(Refresh {
                share,
                start: micros(r.started_at),
                end,
                folders: r.folder_list.clone(),
                recursive: r.recursive,
                objects: r.work.objects_listed,
                prefixes: r.work.prefixes_listed,
            })
        })
        .collect();
    for r in &ours_refreshes {
        eprintln!(
            "sustained: share {} call at +{:.1} s, done +{:.1} s, {} folder(s){}, {} objects + {} prefixes: {:?}",
            r.share,
            secs(r.start - first_write),
            secs(r.end.min(Micros::MAX / 2) - first_write),
            r.folders.len(),
            if r.recursive { " recursive" } else { "" },
            r.objects,
            r.prefixes,
            r.folders
        );
    }
    let (staleness, uncovered) = model::staleness(&writes, &shares, &census, &ours_refreshes);
    let mut too_soon = vec![0; shares.len()];
    for (s, slot) in too_soon.iter_mut().enumerate() {
        let mut starts: Vec<Micros> = ours_refreshes
            .iter()
            .filter(|r| r.share == s)
            .map(|r| r.start)
            .collect();
        starts.sort_unstable();
        *slot = starts
            .windows(2)
            .filter(|p| p[1] - p[0] < interval_us)
            .count();
    }
    let ours = Design {
        name: "this product (per-share scheduler)",
        short: "this product",
        how: "measured",
        calls: (0..shares.len())
            .map(|s| ours_refreshes.iter().filter(|r| r.share == s).count())
            .collect(),
        throttled: shares
            .iter()
            .map(|s| {
                rejected_calls
                    .iter()
                    .filter(|c| c.body["FileShareARN"].as_str() == Some(s.arn.as_str()))
                    .count()
            })
            .collect(),
        too_soon,
        recursive: ours_refreshes.iter().filter(|r| r.recursive).count(),
        objects: ours_refreshes.iter().map(|r| r.objects).sum(),
        prefixes: ours_refreshes.iter().map(|r| r.prefixes).sum(),
        staleness,
        uncovered,
        replay: None,
    };

    // The two designs that are not our binaries any more, modelled.
    let timing = Timing {
        base: REFRESH_BASE.as_micros() as Micros,
        per_object: REFRESH_PER_OBJECT.as_micros() as Micros,
    };
    let window_us = i64::from(WINDOW_SECONDS) * 1_000_000;
    let visibility_us = VISIBILITY_TIMEOUT_SECONDS * 1_000_000;
    let per_window = Design::modelled(
        "previous refresher (one call per closed window)",
        "previous refresher",
        model::replay_per_window(
            &writes,
            &shares,
            &census,
            timing,
            window_us,
            visibility_us,
            interval_us,
        ),
        &writes,
        &shares,
        &census,
    );
    let y2018 = Design::modelled(
        "2018 design (recursive `/` per window)",
        "2018 design",
        model::replay_2018(
            &writes,
            &shares,
            &census,
            timing,
            window_us,
            visibility_us,
            interval_us,
        ),
        &writes,
        &shares,
        &census,
    );
    let result = SustainedResult {
        seconds,
        rate,
        writes: writes.len(),
        new_folder_writes,
        distinct_folders,
        write_span: Duration::from_micros((last_write - first_write).max(0) as u64),
        max_lag: written.max_lag,
        aggregator_errors: written.errors.len(),
        share_labels,
        share_writes,
        limit,
        designs: vec![ours, per_window, y2018],
        mapping,
        drain,
        rejected_in_flight,
        rejected_too_soon,
        aggregator_requests,
        refresher_requests,
        missing_completions,
    };
    for design in &result.designs {
        println!(
            "    {} ({}): {} calls, {} rejected, {} sooner than the interval, listed {} = {:.2}x the physical limit, staleness p50 {} p95 {} max {} ({} not covered)",
            design.name,
            design.how,
            design.calls.iter().sum::<usize>(),
            design.throttled.iter().sum::<usize>(),
            design.too_soon.iter().sum::<usize>(),
            design.listed(),
            result.ratio(design),
            fmt_stale(design.stale(50.0)),
            fmt_stale(design.stale(95.0)),
            fmt_stale(design.stale(100.0)),
            design.uncovered
        );
    }
    if !written.errors.is_empty() {
        eprintln!(
            "    warning: {} aggregator invocation(s) failed, first: {}",
            written.errors.len(),
            written.errors[0]
        );
    }
    Ok(result)
}

fn fmt_stale(us: Option<Micros>) -> String {
    us.map_or_else(|| "–".to_string(), |us| format!("{:.1} s", secs(us)))
}

pub fn targets(r: &SustainedResult) -> Vec<Target> {
    let ours = &r.designs[0];
    let rejected: usize = ours.throttled.iter().sum();
    vec![
        Target {
            name: format!(
                "(sustained) RefreshCache calls rejected by the stand-in's strict limits (two in flight, or sooner than {MIN_INTERVAL_SECONDS} s after the previous call on the share) = 0, {} writes in {} s",
                group(r.writes as u64),
                r.seconds
            ),
            measured: format!(
                "{rejected} ({} in flight, {} too soon) in {} calls",
                r.rejected_in_flight,
                r.rejected_too_soon,
                ours.calls.iter().sum::<usize>()
            ),
            pass: rejected == 0,
        },
        Target {
            name: "(sustained) every write visible on every share that shows it (a refresh started after it listed its folder, and its ancestors for a new folder)".to_string(),
            measured: format!("{} of {} not covered", ours.uncovered, ours.staleness.iter().map(Vec::len).sum::<usize>() + ours.uncovered),
            pass: ours.uncovered == 0,
        },
        Target {
            name: format!(
                "(sustained) listing work <= 1.5× the physical limit (the changed folders and their ancestors once per {MIN_INTERVAL_SECONDS}-s interval)"
            ),
            measured: format!(
                "{} vs {} objects + prefixes = {:.2}×",
                group(ours.listed()),
                group(r.limit_total()),
                r.ratio(ours)
            ),
            pass: r.ratio(ours) <= PHYSICAL_LIMIT_TARGET,
        },
    ]
}

pub fn render(md: &mut String, command: &str, r: &SustainedResult) {
    let _ = writeln!(md, "## 5. Sustained load\n");
    let _ = writeln!(md, "Reproduce: `{command}`.\n");
    let _ = writeln!(
        md,
        "{} buckets, each a `BucketModel` of {} objects in 10 top-level folders of 100 folders \
         (`top03/dir00305/obj0000305`), with two NFS shares each: one on the bucket's root and \
         one on the prefix `{PREFIX_SHARE}`. For {} s, {} objects per second are written ({} in \
         all, alternating between the buckets, one S3 notification per write to the warm \
         aggregator, S3 → Lambda): each write goes to one of {HOT_FOLDERS} \"hot\" folders of its \
         bucket, which move every {HOT_PHASE_SECONDS:.0} s and are spread over the top-level \
         folders ({} distinct folders over the run), and every {NEW_FOLDER_EVERY}th write of a \
         bucket creates a new subfolder of a hot folder ({} writes into a new folder). The key is \
         put into the bucket's model just before its event is handed in; the write time is taken \
         after the put. The writes kept to their schedule within {:.0} ms and took {:.1} s \
         from first to last.\n",
        BUCKETS,
        group(OBJECTS as u64),
        r.seconds,
        r.rate,
        group(r.writes as u64),
        group(r.distinct_folders as u64),
        group(r.new_folder_writes as u64),
        r.max_lag.as_secs_f64() * 1000.0,
        r.write_span.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "**Shortened for the run**: REFRESH_DELAY_SECONDS = {WINDOW_SECONDS} s (default 30) and \
         the refresher's MIN_REFRESH_INTERVAL_SECONDS = {MIN_INTERVAL_SECONDS} s (default 60), \
         so that a few minutes hold many windows and intervals. The stand-in's strict limits are \
         on with the same {MIN_INTERVAL_SECONDS} s, besides its two refreshes in flight per \
         share, and a refresh stays in flight {:.0} s + {:.0} ms per object it lists (the \
         stand-in's `set_refresh_duration` and `set_refresh_time_per_object`), so that a \
         targeted refresh takes several seconds and a recursive refresh of a 100,000-object share \
         about {:.0} s. Completion events go through EventBridge (moto) to the action queue, \
         and the event source mapping drains the queue until every share item is empty.\n",
        REFRESH_BASE.as_secs_f64(),
        REFRESH_PER_OBJECT.as_secs_f64() * 1000.0,
        REFRESH_BASE.as_secs_f64() + REFRESH_PER_OBJECT.as_secs_f64() * OBJECTS as f64
    );
    let _ = writeln!(
        md,
        "**Measured and modelled.** *This product* is measured: the release binaries on moto and \
         the stand-in, its `RefreshCache` calls and their completions as the stand-in recorded \
         them. The other two are **modelled**, because they are not our binaries any more: small \
         deterministic replays over the same write times, with the stand-in's duration formula \
         (base + per object × objects listed) and the same bucket model, and the gateway's limit \
         of two refreshes in flight per share (a third call is throttled; the interval is not \
         enforced, as the real service does not, only counted). *The 2018 design*: an event opens \
         a window when the last one opened at least W earlier (its conditional write), and the \
         window's message, W later, makes one recursive refresh of `/` on each share of the \
         bucket; a throttled call fails the message, which comes back after the queue's {}-s \
         visibility timeout and calls every share again. *The previous refresher* (today's \
         per-window refresh before the scheduler): the window protocol of docs/protocol.md, one \
         call per share per closed window right away, regardless of what is in flight or of the \
         interval, with the folders planned as it did (changed folders and ancestors, \
         non-recursive, or collapsed into two calls past 50); a throttled call fails the message, \
         the next window carries its folders, and the message itself comes back after {} s, \
         when it is dropped if a newer window exists and made again otherwise. Both replays \
         start their calls at the instant a message becomes visible (no polling delay).\n",
        VISIBILITY_TIMEOUT_SECONDS, VISIBILITY_TIMEOUT_SECONDS
    );
    let _ = writeln!(
        md,
        "**Staleness** of a write on a share that shows it: from the write to the completion of \
         the first refresh that started after the write and lists its folder on that share (and, \
         for a write that created its folder, each ancestor up to the share root; a recursive \
         listing covers its subtree); when those listings come from several refreshes, the last \
         to complete. Computed the same way for all three from their refreshes' start and \
         completion times and folder lists. **Physical limit**: for each share, the run cut \
         into {MIN_INTERVAL_SECONDS}-s intervals (the most often a share may be called), and \
         in each interval the folders its writes are in plus their ancestors up to the share \
         root, listed once, non-recursively, at the interval's end: objects + common prefixes, \
         from the bucket model. It is what calling each share once per allowed interval with \
         exactly the changed folders would list.\n"
    );
    let _ = writeln!(
        md,
        "| design | how | RefreshCache accepted | rejected / throttled | sooner than {MIN_INTERVAL_SECONDS} s after the previous call | recursive | objects + prefixes listed | ÷ physical limit | staleness p50 | p95 | max | writes not covered |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for design in &r.designs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2}× | {} | {} | {} | {} |",
            design.name,
            design.how,
            group(design.calls.iter().sum::<usize>() as u64),
            group(design.throttled.iter().sum::<usize>() as u64),
            group(design.too_soon.iter().sum::<usize>() as u64),
            design.recursive,
            group(design.listed()),
            r.ratio(design),
            fmt_stale(design.stale(50.0)),
            fmt_stale(design.stale(95.0)),
            fmt_stale(design.stale(100.0)),
            design.uncovered
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Per share: the writes it shows, its physical limit, and per design the accepted calls, \
         the rejected (ours) or throttled (models) ones, and staleness p50 / max.\n"
    );
    let mut header = "| share | writes shown | physical limit (objects + prefixes) |".to_string();
    let mut rule = "|---|--:|--:|".to_string();
    for design in &r.designs {
        let refused = if design.replay.is_some() {
            "throttled"
        } else {
            "rejected"
        };
        let _ = write!(header, " {}: calls / {refused} | p50 / max |", design.short);
        rule.push_str("--:|--:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for (s, label) in r.share_labels.iter().enumerate() {
        let (o, p) = r.limit[s];
        let mut row = format!(
            "| {label} | {} | {} + {} |",
            group(r.share_writes[s] as u64),
            group(o),
            group(p)
        );
        for design in &r.designs {
            let samples = &design.staleness[s];
            let _ = write!(
                row,
                " {} / {} | {} / {} |",
                design.calls[s],
                design.throttled[s],
                fmt_stale(model::percentile(samples, 50.0)),
                fmt_stale(model::percentile(samples, 100.0))
            );
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);

    let ours = &r.designs[0];
    let per_window = &r.designs[1];
    let y2018 = &r.designs[2];
    let _ = writeln!(md, "### What the numbers show\n");
    let _ = writeln!(
        md,
        "- **Calls and throttles.** This product made {} calls over {} shares ({} per share), \
         none closer than {MIN_INTERVAL_SECONDS} s on a share, and the stand-in rejected {} \
         ({} for two in flight, {} for the interval). The previous refresher would have made {} \
         accepted calls and {} throttled ones, {} of them sooner than {MIN_INTERVAL_SECONDS} s \
         after the previous call (which the API reference asks callers not to do); the 2018 \
         design {} accepted and {} throttled.",
        ours.calls.iter().sum::<usize>(),
        ours.calls.len(),
        ours.calls
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        ours.throttled.iter().sum::<usize>(),
        r.rejected_in_flight,
        r.rejected_too_soon,
        group(per_window.calls.iter().sum::<usize>() as u64),
        group(per_window.throttled.iter().sum::<usize>() as u64),
        group(per_window.too_soon.iter().sum::<usize>() as u64),
        group(y2018.calls.iter().sum::<usize>() as u64),
        group(y2018.throttled.iter().sum::<usize>() as u64),
    );
    // "N× fresher" or "M× staler", at p50 / p95 / max.
    let compare = |other: &Design| -> String {
        [50.0, 95.0, 100.0]
            .iter()
            .map(|p| match (ours.stale(*p), other.stale(*p)) {
                (Some(a), Some(b)) if a > 0 && b > 0 => {
                    if b >= a {
                        format!("{:.1}× fresher", b as f64 / a as f64)
                    } else {
                        format!("{:.1}× staler", a as f64 / b as f64)
                    }
                }
                _ => "–".to_string(),
            })
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(
        md,
        "- **Staleness** (p50 / p95 / max). This product: {} / {} / {}. The 2018 design: {} / {} \
         / {}, so this product is {}. The previous per-window refresh: {} / {} / {}, so this \
         product is {}. The previous refresher called each share right after every window, \
         {MIN_INTERVAL_SECONDS} s apart or not, and paid for it in throttles and calls; this \
         product obeys the interval, so a write waits for its window ({WINDOW_SECONDS} s), then \
         for the share's next allowed call (up to {MIN_INTERVAL_SECONDS} s after the previous \
         one, plus the 1-s clock margin and the wake-up's whole seconds), then for the refresh \
         itself.",
        fmt_stale(ours.stale(50.0)),
        fmt_stale(ours.stale(95.0)),
        fmt_stale(ours.stale(100.0)),
        fmt_stale(y2018.stale(50.0)),
        fmt_stale(y2018.stale(95.0)),
        fmt_stale(y2018.stale(100.0)),
        compare(y2018),
        fmt_stale(per_window.stale(50.0)),
        fmt_stale(per_window.stale(95.0)),
        fmt_stale(per_window.stale(100.0)),
        compare(per_window),
    );
    let _ = writeln!(
        md,
        "- **Listing work.** This product listed {} objects + prefixes, {:.2}× the physical \
         limit ({}); the previous refresher {:.2}× and the 2018 design {:.2}× ({} recursive \
         refreshes of whole shares).",
        group(ours.listed()),
        r.ratio(ours),
        group(r.limit_total()),
        r.ratio(per_window),
        r.ratio(y2018),
        y2018.recursive
    );
    for design in [per_window, y2018] {
        if let Some(run) = &design.replay {
            let _ = writeln!(
                md,
                "- **The {} (modelled).** {} window messages, {} attempts to process them, {} \
                 failed and came back after the {}-s visibility timeout, {} dropped because a \
                 newer window carried their folders{}.",
                design.short,
                group(run.messages as u64),
                group(run.attempts as u64),
                group(run.retries as u64),
                VISIBILITY_TIMEOUT_SECONDS,
                group(run.dropped as u64),
                if run.given_up > 0 {
                    format!(
                        "; {} still failing 24 h after the last write, when the replay stopped",
                        run.given_up
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    let _ = writeln!(
        md,
        "- **The functions.** The aggregator made {} `UpdateItem`, {} `GetItem` and {} \
         `SendMessage` for {} writes ({} failed invocations). The refresher handled {} window \
         messages, {} wake-ups and {} completion events in {} invocations, with {} `UpdateItem`, \
         {} `GetItem`, {} `PutItem` and {} `SendMessage`; the queue and the share items were \
         drained {:.1} s after the last write{}.\n",
        group(r.aggregator_requests[0]),
        group(r.aggregator_requests[1]),
        group(r.aggregator_requests[2]),
        group(r.writes as u64),
        r.aggregator_errors,
        group(r.mapping.window_messages as u64),
        group(r.mapping.wake_ups as u64),
        group(r.mapping.completion_events as u64),
        group(r.mapping.invocations as u64),
        group(r.refresher_requests[0]),
        group(r.refresher_requests[1]),
        group(r.refresher_requests[2]),
        group(r.refresher_requests[3]),
        r.drain.as_secs_f64(),
        if r.missing_completions > 0 || r.mapping.failures > 0 {
            format!(
                " ({} refreshes without a recorded completion, {} refresher batch item failures)",
                r.missing_completions, r.mapping.failures
            )
        } else {
            String::new()
        }
    );
}
