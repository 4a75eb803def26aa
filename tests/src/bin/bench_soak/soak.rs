//! Section 6: the soak (issue 16). Minutes of writes through the release binaries on
//! moto and the stand-in while the function processes are killed at random points, one
//! gateway fails every call for a while and refresh-complete events are dropped,
//! delayed and duplicated ([`engine`]); reported against the staleness bound of
//! docs/protocol.md with the terms of the faults it injected.
//!
//! A run of only this section whose report file already holds a benchmark report
//! replaces this section and its rows of "Targets" there, and keeps the rest
//! ([`splice`]).

use std::fmt::Write as _;
use std::time::Duration;

use integration_tests::aws::BoxError;

use super::{fmt_duration, group, Bench, Machine, Target};

#[path = "engine.rs"]
pub mod engine;
use engine::analysis::{percentile, Bound, Covered, FaultKind, Micros};
use engine::{SoakConfig, SoakEnv, SoakOutcome};

/// How long the section writes, and how fast, unless the options say otherwise.
pub const DEFAULT_SECONDS: u32 = 300;
pub const DEFAULT_RATE: u32 = 10;

/// The heading of this section in the report; a spliced run replaces from it to the
/// next `## ` heading.
const HEADING: &str = "## 6. Soak";
/// Rows of "Targets" that belong to this section.
const TARGET_TAG: &str = "(soak)";

#[derive(Debug, Clone)]
pub struct SoakResult {
    pub outcome: SoakOutcome,
    /// The section's own wall time (set-up, writes, drain, analysis).
    pub took: Duration,
    /// When it ran (UTC), for a spliced report.
    pub date: String,
}

pub async fn measure(bench: &Bench) -> Result<SoakResult, BoxError> {
    let config = SoakConfig::bench(bench.options.soak_seconds, bench.options.soak_rate);
    println!(
        "\n==> Section 6: soak, {} s of writes at {}/s, with kills, a failing gateway and lost, late and duplicated completion events",
        config.seconds, config.rate
    );
    let started = std::time::Instant::now();
    let date = super::iso8601(super::now_ms());
    let env = SoakEnv {
        moto_endpoint: bench.moto.endpoint(),
        gateway: &bench.gateway,
        admin: &bench.admin,
        aggregator_bin: &bench.aggregator_bin,
        refresher_bin: &bench.refresher_bin,
    };
    let outcome = engine::run(&env, &config).await?;
    let result = SoakResult {
        outcome,
        took: started.elapsed(),
        date,
    };
    let o = &result.outcome;
    println!(
        "    {} writes, {} kills, {} RefreshCache accepted, {} not covered, {} outside the bound, staleness p50 {} p99 {} max {}",
        o.writes.len(),
        kills_total(o),
        o.calls.len(),
        o.not_covered().len(),
        o.outside_bound().len(),
        fmt_s(stat(&o.coverage.iter().collect::<Vec<_>>(), 50.0)),
        fmt_s(stat(&o.coverage.iter().collect::<Vec<_>>(), 99.0)),
        fmt_s(stat(&o.coverage.iter().collect::<Vec<_>>(), 100.0)),
    );
    for c in o.not_covered().iter().take(20) {
        let w = &o.writes[c.write];
        eprintln!(
            "soak: NOT COVERED: write {} ({}) at +{:.3} s on {}",
            c.write,
            w.key,
            secs(w.at - o.t0),
            o.shares[c.share].label
        );
    }
    for c in o.outside_bound().iter().take(20) {
        eprintln!("soak: OUTSIDE THE BOUND: {}", describe(o, c));
    }
    for problem in o.end_state_problems() {
        eprintln!("soak: end state: {problem}");
    }
    // Every write on every share, for a closer look.
    let path = super::workspace_root().join("target/bench/soak-coverage.tsv");
    let mut tsv = String::from(
        "write\tkey\tshare\twritten_s\tprocessed_s\tcovering_s\tstaleness_s\tallowed_after_processing_s\tfaults\n",
    );
    for c in &o.coverage {
        let w = &o.writes[c.write];
        let _ = writeln!(
            tsv,
            "{}\t{}\t{}\t{:.3}\t{:.3}\t{}\t{}\t{:.3}\t{}",
            c.write,
            w.key,
            o.shares[c.share].label,
            secs(w.at - o.t0),
            secs(w.processed.unwrap_or(w.at) - o.t0),
            c.covering
                .map_or_else(|| "-".to_string(), |t| format!("{:.3}", secs(t - o.t0))),
            c.staleness
                .map_or_else(|| "-".to_string(), |t| format!("{:.3}", secs(t))),
            secs(c.allowed),
            c.faults
                .iter()
                .map(|f| format!(
                    "{:?}@{:.1}",
                    o.faults[*f].kind,
                    secs(o.faults[*f].at - o.t0)
                ))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, tsv) {
        Ok(()) => println!("    every write on every share: {}", path.display()),
        Err(e) => eprintln!("soak: writing {}: {e}", path.display()),
    }
    Ok(result)
}

fn kills_total(o: &SoakOutcome) -> usize {
    [
        FaultKind::AggregatorKilledMidInvocation,
        FaultKind::AggregatorKilledAfterResponse,
        FaultKind::AggregatorKilledIdle,
        FaultKind::RefresherKilledMidInvocation,
        FaultKind::RefresherKilledAfterResponse,
        FaultKind::RefresherKilledIdle,
    ]
    .iter()
    .map(|k| o.kills(*k))
    .sum()
}

fn secs(us: Micros) -> f64 {
    us as f64 / 1e6
}

fn fmt_s(us: Option<Micros>) -> String {
    us.map_or_else(|| "–".to_string(), |us| format!("{:.1} s", secs(us)))
}

/// Percentile `p` of the staleness of the covered writes among `rows`.
fn stat(rows: &[&Covered], p: f64) -> Option<Micros> {
    let samples: Vec<Micros> = rows.iter().filter_map(|c| c.staleness).collect();
    percentile(&samples, p)
}

/// One write on one share, for the log and the report.
pub fn describe(o: &SoakOutcome, c: &Covered) -> String {
    let w = &o.writes[c.write];
    let faults: Vec<String> = c
        .faults
        .iter()
        .map(|f| {
            let f = &o.faults[*f];
            format!("{} at +{:.1} s", f.kind.describe(), secs(f.at - o.t0))
        })
        .collect();
    format!(
        "write {} (`{}`) at +{:.1} s, processed +{:.1} s, on {}: covering call at +{} ({} after the write), allowed {:.1} s after processing (faults: {})",
        c.write,
        w.key,
        secs(w.at - o.t0),
        secs(w.processed.unwrap_or(w.at) - o.t0),
        o.shares[c.share].label,
        c.covering.map_or_else(|| "never".to_string(), |t| format!("{:.1} s", secs(t - o.t0))),
        fmt_s(c.staleness),
        secs(c.allowed),
        if faults.is_empty() { "none".to_string() } else { faults.join("; ") }
    )
}

fn mean_s(mean: Option<Duration>) -> String {
    mean.map_or_else(|| "–".to_string(), |m| format!("{:.0}", m.as_secs_f64()))
}

fn class_name(o: &SoakOutcome, class: usize) -> String {
    match (class, o.failure_window) {
        (0, _) => "healthy shares (gateway A)".to_string(),
        (_, Some(_)) => "the failing gateway's shares (gateway B)".to_string(),
        (_, None) => "gateway B's shares".to_string(),
    }
}

fn describe_bound(b: &Bound) -> String {
    format!(
        "{:.1} s = W {:.0} + m {:.0} + H {}·S {:.1} + k {}·(max(P {:.0}, D {:.1}) + S {:.1})",
        secs(b.total()),
        secs(b.window),
        secs(b.margin),
        b.hops,
        secs(b.sqs),
        b.calls,
        secs(b.pace),
        secs(b.both_slots),
        secs(b.sqs)
    )
}

pub fn targets(r: &SoakResult) -> Vec<Target> {
    let o = &r.outcome;
    let checked = o.coverage.len();
    let not_covered = o.not_covered().len();
    let outside = o.outside_bound().len();
    let siblings: Vec<&Covered> = o.of_class(0);
    let siblings_outside = siblings
        .iter()
        .filter(|c| c.covering.is_some() && !c.within_bound())
        .count();
    let rejected = o.rejected.len();
    let problems = o.end_state_problems();
    vec![
        Target {
            name: format!(
                "{TARGET_TAG} writes not covered (no RefreshCache that started after the write lists its folder and each ancestor) = 0, {} writes × the shares of their bucket, with {} kills, a gateway failing for {}, {} completion events dropped / {} delayed / {} duplicated",
                group(o.writes.len() as u64),
                kills_total(o),
                o.failure_window
                    .map_or_else(|| "–".to_string(), |(a, b)| format!("{:.0} s", secs(b - a))),
                o.kills(FaultKind::CompletionDropped),
                o.kills(FaultKind::CompletionDelayed),
                o.kills(FaultKind::CompletionDuplicated),
            ),
            measured: format!("{not_covered} of {}", group(checked as u64)),
            pass: not_covered == 0,
        },
        Target {
            name: format!(
                "{TARGET_TAG} every covering call started within the bound B (docs/protocol.md) plus the terms of the faults that concern the write"
            ),
            measured: format!(
                "{outside} outside; healthy shares, the failing gateway's siblings: {siblings_outside} outside of {}",
                group(siblings.len() as u64)
            ),
            pass: outside == 0 && not_covered == 0,
        },
        Target {
            name: format!(
                "{TARGET_TAG} RefreshCache calls rejected by the stand-in's strict limits (a third in flight, or sooner than {} s after the previous call on the share) = 0",
                o.config.min_interval_seconds
            ),
            measured: format!(
                "{rejected} ({} in flight, {} too soon) in {} calls",
                o.rejected_in_flight,
                o.rejected_too_soon,
                group(o.calls.len() as u64)
            ),
            pass: rejected == 0,
        },
        Target {
            name: format!(
                "{TARGET_TAG} end state: the queue drained, every window handed off, no share with pending listings, no slot taken but those whose lease must run out (dropped event, killed claim)"
            ),
            measured: match (&o.drain_error, problems.is_empty()) {
                (None, true) => format!(
                    "drained {} after the last write",
                    o.drained_after.map_or_else(|| "–".to_string(), fmt_duration)
                ),
                (error, _) => {
                    let mut all: Vec<String> = error.iter().cloned().collect();
                    all.extend(problems.iter().cloned());
                    all.join("; ")
                }
            },
            pass: o.drain_error.is_none() && problems.is_empty(),
        },
    ]
}

pub fn render(md: &mut String, command: &str, machine: &Machine, r: &SoakResult) {
    let o = &r.outcome;
    let c = &o.config;
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "Reproduce: `bash scripts/bench.sh --only soak` (a run of only this section into a report \
         that already holds the other sections, here `BENCHMARKS.md`, replaces this section and its \
         `(soak)` rows in \"Targets\" and keeps everything else), or `{command}` (a new file: the \
         header, the targets and this section). This section's run: {}; git commit {}; {} CPUs \
         ({}), {} RAM; binaries `{}`, the refresher built {}; load average after: {}; it took {}.\n",
        r.date,
        machine.commit,
        machine.nproc,
        machine.cpu,
        machine.memory,
        machine.bin_dir,
        machine.binaries_built,
        super::read_trimmed("/proc/loadavg"),
        fmt_duration(r.took)
    );
    let objects = c.top_folders * c.sub_folders * c.objects_per_folder;
    let _ = writeln!(
        md,
        "**Set-up.** {} buckets, each a `BucketModel` of {} objects in {} top-level folders of {} \
         folders (`top03/dir00061/obj00042`), each with two NFS shares on its root: one on gateway A and \
         one on gateway B. For {} s, {} objects per second are written ({} in all, alternating between \
         the buckets; {} distinct folders, {} writes into a new subfolder): each goes into the bucket's \
         model and then, as one S3 notification, to the aggregator (S3 → Lambda, asynchronous). The \
         writes kept to their schedule within {:.0} ms and took {:.1} s from first to last. REFRESH_DELAY_SECONDS = W = {} s and \
         MIN_REFRESH_INTERVAL_SECONDS = {} s (with `ALLOW_SHORT_REFRESH_INTERVAL=true`); the stand-in \
         in strict mode (a call sooner than {} s after the previous accepted one on the share, or a \
         third in flight, is rejected); a refresh stays in flight {:.0} s + {} ms per object it lists; \
         its refresh-complete event goes through an EventBridge rule in moto to the action queue. The \
         event source mapping hands the queue's visible messages to the refresher, 10 per invocation, \
         one invocation at a time, and deletes what it does not report as failed; the queue's \
         visibility timeout is V = {} s (the stack's is 6 × the refresher's timeout; the refresher's \
         timeout here is {} s, the aggregator's {} s).\n",
        c.buckets,
        group(objects as u64),
        c.top_folders,
        c.sub_folders,
        c.seconds,
        c.rate,
        group(o.writes.len() as u64),
        group(o.distinct_folders as u64),
        group(o.new_folder_writes as u64),
        o.max_lag.as_secs_f64() * 1000.0,
        o.write_span.as_secs_f64(),
        c.window_seconds,
        c.min_interval_seconds,
        c.min_interval_seconds,
        c.refresh_base.as_secs_f64(),
        c.refresh_per_object.as_millis(),
        c.visibility_timeout_seconds,
        c.refresher_timeout.as_secs(),
        c.aggregator_timeout.as_secs(),
    );
    let _ = writeln!(
        md,
        "**Faults.** *Kills*: the function process gets SIGKILL and the next invocation goes to a \
         fresh process (a cold start), at random times (gaps uniform between 0.5 and 1.5 times a mean per kind: aggregator {} s mid-invocation and {} s between invocations, refresher {} s and {} s; seed {:#x}): \
         *mid-invocation*, at a random point within 1.2 × the function's recent median handler time (0.5 × after a kill that came too late) \
         after the event is handed out (some land after the response: counted as between \
         invocations), and *between invocations*. A killed aggregator invocation has no result, so its \
         event is retried {} s later (Lambda's asynchronous retry; Lambda waits about a minute); a \
         killed refresher invocation's batch stays in flight and SQS delivers it again after V. Kills \
         stop when the writes stop. *A failing gateway*: from +{:.0} s for {:.0} s every \
         `RefreshCache` on gateway B's shares answers HTTP 500 (the stand-in's \
         `fail_refreshes_of`), while gateway A's shares of the same buckets answer. *Completion \
         events*: on its first delivery the event source mapping drops an event with chance {:.0}% \
         (deleted unseen, as if EventBridge lost it; from +{:.0} s on, at most {} in all, one per \
         share, and only while the share's other slot is free) or delays it with chance {:.0}% (hidden \
         for {}–{} s with `ChangeMessageVisibility`); the stand-in puts the event of a completion \
         twice about every {} s (`duplicate_next_completion_events`). A lost event holds its slot \
         until the 20-minute lease, and so does a claim whose invocation was killed before its call \
         (\"the slot still counts as in flight until its lease, in case the call did start\"): two such \
         slots on one share stop it until the first lease ends, which the table allows (\"a lost \
         completion event: ... else up to the lease\") but which no run of minutes can wait for. So \
         after a drop, no mid-invocation kill is aimed at a batch that concerns that share (a killed \
         claim can still meet a killed claim; the end state below shows every slot left and why).\n",
        mean_s(c.kills.aggregator_mid),
        mean_s(c.kills.aggregator_idle),
        mean_s(c.kills.refresher_mid),
        mean_s(c.kills.refresher_idle),
        c.seed,
        c.async_retry_delay.as_secs(),
        c.failure.map_or(0.0, |f| f.0.as_secs_f64()),
        c.failure.map_or(0.0, |f| f.1.as_secs_f64()),
        c.completions.drop_probability * 100.0,
        c.completions.drops_from.as_secs_f64(),
        c.completions.drops,
        c.completions.delay_probability * 100.0,
        c.completions.delay.0.as_secs(),
        c.completions.delay.1.as_secs(),
        c.completions
            .duplicate_every
            .map_or_else(|| "–".to_string(), |d| d.as_secs().to_string()),
    );
    let _ = writeln!(
        md,
        "**Coverage and staleness.** For every write and every share that maps it, the covering time \
         is the latest, over its folder and each ancestor, of the start of the first `RefreshCache` on \
         that share that started after the write and lists that folder (a non-recursive call lists the \
         folder itself, a recursive one its subtree); *not covered* if there is none. Staleness = \
         covering time − write time. The bound B = W + m + H·S + k·(max(P, D) + S) of \
         docs/protocol.md is computed for this run's settings: m = 1 s, H = 1, P = the interval + m, \
         S = the harness's measured SQS margin (the latest any message was handled after it was due: \
         a window's message after W, a wake-up after its `visibleAtMs`, a completion event after the \
         refresh's completion; first deliveries in invocations that finished), D = the longest refresh \
         of the class's shares if two were ever in flight at once on one share, else 0, and k = the \
         calls the largest `Pending` set needed (sampled every second). Each write may also use the \
         terms of the table \"What each fault adds\" for the faults that concern it (on its share, \
         before its covering call, and not over before the write was processed): a refresher killed \
         during an invocation that carried a message about the share, V + S; the failing gateway, on \
         its shares only, its duration T plus the back-off step it reached; a completion event of the \
         share delayed by δ, δ; dropped and duplicated events and kills between invocations, 0. A \
         write whose aggregator invocation was killed is measured from its retry (the bound's t). \
         Every write on every share, with its covering call, its allowance and the faults that \
         concern it, goes to `target/bench/soak-coverage.tsv`, the timeline of calls and faults to \
         `target/bench/driver.log` (lines `soak: ...`).\n"
    );

    // Writes and faults.
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| writes | {} ({} writes × shares checked) |",
        group(o.writes.len() as u64),
        group(o.coverage.len() as u64)
    );
    let _ = writeln!(
        md,
        "| aggregator kills | {} mid-invocation (event retried), {} at a point after the response, {} between invocations; {} invocations, {} retries, {} events retried more than once |",
        o.kills(FaultKind::AggregatorKilledMidInvocation),
        o.kills(FaultKind::AggregatorKilledAfterResponse),
        o.kills(FaultKind::AggregatorKilledIdle),
        group(o.aggregator.invocations as u64),
        o.aggregator.retries,
        o.aggregator.retried_twice
    );
    let _ = writeln!(
        md,
        "| refresher kills | {} mid-invocation (batch redelivered after V), {} at a point after the response, {} between invocations; {} invocations |",
        o.kills(FaultKind::RefresherKilledMidInvocation),
        o.kills(FaultKind::RefresherKilledAfterResponse),
        o.kills(FaultKind::RefresherKilledIdle),
        group(o.queue.invocations as u64)
    );
    let _ = writeln!(
        md,
        "| processes started | {} aggregator, {} refresher |",
        o.aggregator_spawns, o.refresher_spawns
    );
    match o.failure_window {
        Some((from, to)) => {
            let _ = writeln!(
                md,
                "| failing gateway (B) | +{:.1} s to +{:.1} s ({:.1} s); failed calls per share: {}; back-off step reached {:.0} s |",
                secs(from - o.t0),
                secs(to - o.t0),
                secs(to - from),
                o.failed_calls
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| o.shares[*s].class == 1)
                    .map(|(s, n)| format!("{} {n}", o.shares[s].label))
                    .collect::<Vec<_>>()
                    .join(", "),
                secs(engine::analysis::backoff_step(
                    o.failure_streak.iter().copied().max().unwrap_or(0)
                ))
            );
        }
        None => {
            let _ = writeln!(md, "| failing gateway | none |");
        }
    }
    let delays: Vec<Micros> = o
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::CompletionDelayed)
        .map(|f| f.until - f.at)
        .collect();
    let _ = writeln!(
        md,
        "| completion events | {} refreshes completed; {} events dropped{}, {} delayed ({}), {} duplicated |",
        group(o.completions as u64),
        o.kills(FaultKind::CompletionDropped),
        if o.dropped_copies > 0 {
            format!(
                " ({} of them one copy of a duplicated event, whose other copy came)",
                o.dropped_copies
            )
        } else {
            String::new()
        },
        delays.len(),
        if delays.is_empty() {
            "–".to_string()
        } else {
            format!(
                "{:.0}–{:.0} s",
                secs(*delays.iter().min().unwrap_or(&0)),
                secs(*delays.iter().max().unwrap_or(&0))
            )
        },
        o.kills(FaultKind::CompletionDuplicated)
    );
    let accepted_per_share: Vec<String> = (0..o.shares.len())
        .map(|s| o.calls.iter().filter(|c| c.share == s).count().to_string())
        .collect();
    let _ = writeln!(
        md,
        "| RefreshCache | {} accepted ({} per share), {} failed with the injected 500, {} rejected by the strict limits ({} third in flight, {} too soon) |",
        group(o.calls.len() as u64),
        accepted_per_share.join(" / "),
        o.failed_calls.iter().sum::<usize>(),
        o.rejected.len(),
        o.rejected_in_flight,
        o.rejected_too_soon
    );
    let _ = writeln!(
        md,
        "| action queue | {} messages handed to the refresher: {} window messages, {} wake-ups, {} completion events; {} deliveries after the first; {} reported in `batchItemFailures` |",
        group(o.queue.messages as u64),
        group(o.queue.windows as u64),
        group(o.queue.wake_ups as u64),
        group(o.queue.completion_events as u64),
        o.queue.redelivered,
        o.queue.batch_item_failures
    );
    let unexpected = if o.unexpected.is_empty() {
        "none".to_string()
    } else {
        o.unexpected.join("; ")
    };
    let _ = writeln!(
        md,
        "| harness surprises (failures it did not cause) | {unexpected} |"
    );
    let _ = writeln!(md);

    // Coverage and staleness per class, against the bound.
    let _ = writeln!(
        md,
        "| shares | writes × shares | not covered | staleness p50 | p99 | max | bound B | max ÷ B | exceeded B (fault terms used) | outside B + fault terms | most of its allowance a write used |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for class in 0..o.bounds.len() {
        let rows = o.of_class(class);
        if rows.is_empty() {
            continue;
        }
        let b = o.bounds[class].total();
        let exceeded = rows
            .iter()
            .filter(|c| c.since_processed.is_some_and(|s| s > b))
            .count();
        let outside = rows
            .iter()
            .filter(|c| c.covering.is_some() && !c.within_bound())
            .count();
        let max = stat(&rows, 100.0);
        let bound_text = match (class, o.failure_term()) {
            (1, Some(term)) => format!(
                "{:.1} s (+ T + one back-off step = {:.1} s during the failure)",
                secs(b),
                secs(b + term)
            ),
            _ => format!("{:.1} s", secs(b)),
        };
        let used = rows
            .iter()
            .filter_map(|c| c.since_processed.map(|s| s as f64 / c.allowed as f64))
            .fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% |",
            class_name(o, class),
            group(rows.len() as u64),
            rows.iter().filter(|c| c.covering.is_none()).count(),
            fmt_s(stat(&rows, 50.0)),
            fmt_s(stat(&rows, 99.0)),
            fmt_s(max),
            bound_text,
            max.map_or_else(
                || "–".to_string(),
                |m| format!("{:.2}", m as f64 / b as f64)
            ),
            exceeded,
            outside,
            used * 100.0
        );
    }
    let _ = writeln!(md);
    let lat = &o.queue.lateness;
    let lat_all: Vec<Micros> = lat.iter().flatten().copied().collect();
    let _ = writeln!(
        md,
        "**The bound's terms.** S = {:.1} s measured (p50 {}, p99 {}; from {} window messages, {} \
         wake-ups and {} completion events), P = {} s + m; the largest `Pending` set seen per share: \
         {}. Healthy shares: B = {}. The failing gateway's shares: B = {}{}.\n",
        secs(o.sqs_margin()),
        fmt_s(percentile(&lat_all, 50.0)),
        fmt_s(percentile(&lat_all, 99.0)),
        lat[0].len(),
        lat[1].len(),
        lat[2].len(),
        c.min_interval_seconds,
        o.max_pending
            .iter()
            .enumerate()
            .map(|(s, n)| format!("{} {n}", o.shares[s].label))
            .collect::<Vec<_>>()
            .join(", "),
        describe_bound(&o.bounds[0]),
        describe_bound(&o.bounds[1]),
        o.failure_term().map_or_else(String::new, |t| format!(
            ", plus T + one back-off step = {:.1} s for the writes that the failure concerns",
            secs(t)
        )),
    );

    // Which fault terms the writes past B needed: without the terms of that kind, the
    // covering call would have started outside what the write is allowed.
    let needed = |c: &Covered, kind: FaultKind| {
        let sqs = o.bounds[o.shares[c.share].class].sqs;
        let of_kind: Micros = c
            .faults
            .iter()
            .filter(|f| o.faults[**f].kind == kind)
            .map(|f| o.faults[*f].term_us(o.config.visibility(), sqs))
            .sum();
        of_kind > 0 && c.since_processed.is_some_and(|s| s > c.allowed - of_kind)
    };
    let termed = [
        FaultKind::RefresherKilledMidInvocation,
        FaultKind::GatewayFailing,
        FaultKind::CompletionDelayed,
    ];
    let _ = writeln!(md, "**What the numbers show.**\n");
    let not_covered = o.not_covered();
    let outside = o.outside_bound();
    let _ = writeln!(
        md,
        "- **Coverage.** {} of {} writes × shares not covered.{}",
        not_covered.len(),
        group(o.coverage.len() as u64),
        if not_covered.is_empty() {
            String::new()
        } else {
            format!(
                " First: {}.",
                not_covered
                    .iter()
                    .take(5)
                    .map(|c| describe(o, c))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    );
    let mut per_class = Vec::new();
    for class in 0..o.bounds.len() {
        let rows = o.of_class(class);
        let b = o.bounds[class].total();
        let past = rows
            .iter()
            .filter(|c| c.since_processed.is_some_and(|s| s > b))
            .count();
        let needs: Vec<String> = termed
            .iter()
            .map(|k| (k, rows.iter().filter(|c| needed(c, *k)).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| {
                format!(
                    "{n} would be outside it without the term of a {}",
                    k.describe()
                )
            })
            .collect();
        per_class.push(format!(
            "{}: {} of {} started their covering call later than B = {:.1} s after the aggregator processed them{}",
            class_name(o, class),
            past,
            group(rows.len() as u64),
            secs(b),
            if needs.is_empty() {
                if past > 0 {
                    "; each of them is within it with any one of the terms that concern it"
                        .to_string()
                } else {
                    String::new()
                }
            } else {
                format!(
                    "; of these, {} (the others are within it with any one of the terms that concern them)",
                    needs.join(", ")
                )
            }
        ));
    }
    let _ = writeln!(
        md,
        "- **The bound.** {}. Outside B plus the terms of the faults that concern them: {}.{}",
        per_class.join("; "),
        outside.len(),
        if outside.is_empty() {
            String::new()
        } else {
            format!(
                " First: {}.",
                outside
                    .iter()
                    .take(5)
                    .map(|c| describe(o, c))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    );
    let late: Vec<&Covered> = o
        .coverage
        .iter()
        .filter(|c| needed(c, FaultKind::CompletionDelayed))
        .collect();
    if !late.is_empty() {
        let worst = late
            .iter()
            .max_by_key(|c| {
                c.since_processed.unwrap_or(0)
                    - (c.allowed - o.bounds[o.shares[c.share].class].total())
            })
            .copied();
        let _ = writeln!(
            md,
            "- **A late completion event is not free when both slots are in flight.** docs/protocol.md's \
             table gives a completion event that comes late 0. Here {} writes × shares started their \
             covering call later than B plus every other term that concerns them, and within it only \
             with the lateness δ of a completion event of their share: the refreshes (D = {:.1} s on the \
             healthy shares) outlast the interval (P = {:.0} s), so both slots are in flight, and the slot \
             that the late event frees stays taken until the event comes; the next call waits for it, as \
             the table says of a lost event (\"0 while the other slot is free; else up to the lease\"). \
             So the soak gives a late event the term δ. Worst: {}.",
            late.len(),
            secs(o.bounds[0].both_slots),
            secs(o.bounds[0].pace),
            worst.map_or_else(String::new, |c| describe(o, c))
        );
    }
    let _ = writeln!(
        md,
        "- **The failing gateway's siblings.** While gateway B failed, the shares on gateway A of the \
         same buckets kept within their bound: {} of their {} writes × shares outside it; the largest \
         staleness on them was {}, against B = {:.1} s.",
        o.of_class(0)
            .iter()
            .filter(|c| c.covering.is_some() && !c.within_bound())
            .count(),
        group(o.of_class(0).len() as u64),
        fmt_s(stat(&o.of_class(0), 100.0)),
        secs(o.bounds[0].total())
    );
    let problems = o.end_state_problems();
    let mut left = Vec::new();
    for (s, end) in o.share_end.iter().enumerate() {
        for (slot, why) in &end.slots {
            left.push(format!(
                "{}: `{slot}` ({})",
                o.shares[s].label,
                why.unwrap_or("unexplained")
            ));
        }
    }
    let _ = writeln!(
        md,
        "- **End state.** {}; {} share item(s) with pending listings; slots still taken: {}.{}",
        match (&o.drain_error, o.drained_after) {
            (Some(e), _) => format!("not drained: {e}"),
            (None, Some(d)) => format!(
                "the queue, the windows and the share items drained {} after the last write",
                fmt_duration(d)
            ),
            (None, None) => "drained".to_string(),
        },
        o.share_end.iter().filter(|e| e.pending > 0).count(),
        if left.is_empty() {
            "none".to_string()
        } else {
            left.join("; ")
        },
        if problems.is_empty() {
            String::new()
        } else {
            format!(" **Problems**: {}.", problems.join("; "))
        }
    );
    let _ = writeln!(
        md,
        "- **Limits of the set-up.** One aggregator process and one refresher process at a time (Lambda \
         would run several), moto's pace, and the shortened times (W, the interval, V and the \
         asynchronous retry) make this minutes, not hours; the bound's S here is the harness's \
         ({:.1} s), not the deployed event source mapping's 60 s.\n",
        secs(o.sqs_margin())
    );
}

/// The report with this section put in place of its previous version: the section
/// from its heading to the next `## ` heading (or the end) is replaced, or appended
/// when there was none; the rows of "Targets" tagged `(soak)` are replaced, or added at
/// the end of that table. `None` when `existing` is not a benchmark report.
pub fn splice(existing: &str, section: &str, targets: &[Target]) -> Option<String> {
    if !existing.starts_with("# Benchmarks") {
        return None;
    }
    // The section.
    let mut out = match existing.find(&format!("\n{HEADING}")) {
        Some(at) => {
            let start = at + 1;
            let end = existing[start + HEADING.len()..]
                .find("\n## ")
                .map_or(existing.len(), |i| start + HEADING.len() + i + 1);
            format!("{}{section}{}", &existing[..start], &existing[end..])
        }
        None => format!("{}\n\n{section}", existing.trim_end_matches('\n')),
    };
    // Its rows of the targets, at the end of that table.
    if let Some(table) = out.find("## Targets\n") {
        let len = table_len(&out[table..]);
        let tag = format!("| {TARGET_TAG}");
        let mut lines: Vec<String> = out[table..table + len]
            .split_inclusive('\n')
            .filter(|line| !line.starts_with(&tag))
            .map(str::to_string)
            .collect();
        for t in targets {
            lines.push(format!(
                "| {} | {} | **{}** |\n",
                t.name,
                t.measured,
                if t.pass { "PASS" } else { "FAIL" }
            ));
        }
        out = format!("{}{}{}", &out[..table], lines.concat(), &out[table + len..]);
    }
    Some(out)
}

/// The length of the "## Targets" heading and its table, up to (not including) the
/// line that follows the table.
fn table_len(from_heading: &str) -> usize {
    let mut len = 0;
    let mut in_table = false;
    for line in from_heading.split_inclusive('\n') {
        if line.starts_with('|') {
            in_table = true;
        } else if in_table {
            break;
        }
        len += line.len();
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, pass: bool) -> Target {
        Target {
            name: name.to_string(),
            measured: "m".to_string(),
            pass,
        }
    }

    const REPORT: &str = "# Benchmarks\n\nintro\n\n## Targets\n\n| target | measured | |\n|---|---|---|\n| a | 1 | **PASS** |\n| (soak) old | 0 | **FAIL** |\n\n## 1. Bursts\n\nbursts\n\n## 6. Soak\n\nold soak\n\n## 7. Later\n\nlater\n";

    #[test]
    fn a_spliced_run_replaces_only_its_section_and_its_targets() {
        let out = splice(
            REPORT,
            "## 6. Soak\n\nnew soak\n\n",
            &[target("(soak) new", true)],
        )
        .unwrap();
        assert_eq!(
            out,
            "# Benchmarks\n\nintro\n\n## Targets\n\n| target | measured | |\n|---|---|---|\n| a | 1 | **PASS** |\n| (soak) new | m | **PASS** |\n\n## 1. Bursts\n\nbursts\n\n## 6. Soak\n\nnew soak\n\n## 7. Later\n\nlater\n"
        );
    }

    #[test]
    fn a_report_without_the_section_gets_it_at_the_end() {
        let report = "# Benchmarks\n\n## Targets\n\n| target | measured | |\n|---|---|---|\n| a | 1 | **PASS** |\n\n## 5. Sustained\n\nsustained\n";
        let out = splice(report, "## 6. Soak\n\nnew\n", &[target("(soak) t", false)]).unwrap();
        assert_eq!(
            out,
            "# Benchmarks\n\n## Targets\n\n| target | measured | |\n|---|---|---|\n| a | 1 | **PASS** |\n| (soak) t | m | **FAIL** |\n\n## 5. Sustained\n\nsustained\n\n## 6. Soak\n\nnew\n"
        );
        assert!(splice("something else", "x", &[]).is_none());
    }
}
