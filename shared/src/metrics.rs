//! Metrics as CloudWatch Embedded Metric Format (EMF) lines on stdout: CloudWatch
//! Logs turns them into metrics, so counting costs no API call.
//!
//! Each invocation's metrics are one line with the function's totals (dimension
//! `Function`) and, for the metrics worth seeing per bucket, one line per bucket
//! (dimensions `Function`, `Bucket`). Buckets are few per deployment, so the
//! cardinality stays low. The aggregator runs once per S3 event, so its lines were most
//! of the log bill: a [`MetricsBuffer`] adds up a warm container's invocations and
//! writes them at most once per interval, at once when an alarm watches what changed,
//! and when Lambda shuts the container down.
//! `Function` is the Lambda function's own name (`AWS_LAMBDA_FUNCTION_NAME`), so that
//! two stacks in one account and region keep their metrics apart; outside Lambda it
//! is `aggregator` or `refresher`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;

pub const NAMESPACE: &str = "S3EventAggregator";

/// Metric names, as they appear in CloudWatch.
pub mod name {
    pub const EVENTS_RECEIVED: &str = "EventsReceived";
    /// Events written through a gateway: refreshed on every other gateway's shares.
    pub const EVENTS_FROM_GATEWAY: &str = "EventsFromGateway";
    pub const EVENTS_SKIPPED_MALFORMED: &str = "EventsSkippedMalformed";
    pub const WINDOWS_OPENED: &str = "WindowsOpened";
    pub const EVENTS_COALESCED: &str = "EventsCoalesced";
    pub const MESSAGES_SENT: &str = "MessagesSent";
    pub const REFRESHES_REQUESTED: &str = "RefreshesRequested";
    pub const REFRESHES_THROTTLED: &str = "RefreshesThrottled";
    pub const SHARES_NOT_FOUND: &str = "SharesNotFound";
    /// Access points of shares that S3 Control could not map to a bucket (not found,
    /// alias not listed, access denied), per share-map resolve: those shares are left
    /// out until the next resolve.
    pub const ACCESS_POINTS_UNRESOLVED: &str = "AccessPointsUnresolved";
    pub const MESSAGES_FAILED: &str = "MessagesFailed";
    pub const MESSAGES_UNREADABLE: &str = "MessagesUnreadable";
    /// Refresh messages sent back because their window ends later.
    pub const MESSAGES_REQUEUED: &str = "MessagesRequeued";
    /// Events whose change a window recorded by this container already covers:
    /// no DynamoDB write.
    pub const EVENTS_COALESCED_LOCALLY: &str = "EventsCoalescedInContainer";
    pub const WINDOW_WRITES: &str = "WindowWrites";
    pub const OLDEST_EVENT_AGE: &str = "OldestEventAgeMs";
    /// From the oldest event that a completed refresh covers to its `completed` time.
    pub const STALENESS: &str = "StalenessMs";
    /// Refresh-complete events that freed a slot.
    pub const REFRESHES_COMPLETED: &str = "RefreshesCompleted";
    /// Times a share's pending changes had to wait (the interval, or two in flight).
    pub const REFRESHES_DEFERRED: &str = "RefreshesDeferred";
    pub const WAKE_UPS_SENT: &str = "WakeUpsSent";
    /// `RefreshCache` calls that failed (5xx, timeout, denied, a share the gateway
    /// calls unknown while the share map lists it): the share backs off, alone.
    pub const REFRESHES_FAILED: &str = "RefreshesFailed";
    /// Slots whose completion event never came by the end of their lease: their
    /// folders were put back to be listed again.
    pub const LEASES_ENDED: &str = "LeasesEnded";
    /// Calls not started because the invocation's deadline was too near to record
    /// them: a wake-up brings them back at once.
    pub const CALLS_LEFT_FOR_DEADLINE: &str = "CallsLeftForDeadline";
}

/// The `Function` dimension: the Lambda function's name, else `default`.
pub fn function_dimension(default: &str) -> String {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("AWS_LAMBDA_FUNCTION_NAME")
            .ok()
            .filter(|n| !n.trim().is_empty())
    })
    .clone()
    .unwrap_or_else(|| default.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    Count,
    Milliseconds,
}

/// Values of one line: counts add up, ages keep the largest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricSet {
    values: BTreeMap<&'static str, (Unit, f64)>,
}

impl MetricSet {
    pub fn count(&mut self, name: &'static str, n: usize) {
        let entry = self.values.entry(name).or_insert((Unit::Count, 0.0));
        entry.1 += n as f64;
    }

    pub fn max_ms(&mut self, name: &'static str, ms: i64) {
        let entry = self.values.entry(name).or_insert((Unit::Milliseconds, 0.0));
        entry.1 = entry.1.max(ms.max(0) as f64);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).map(|(_, v)| *v)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Adds `other`: counts add up, ages keep the largest.
    pub fn absorb(&mut self, other: &MetricSet) {
        for (name, (unit, value)) in &other.values {
            let entry = self.values.entry(name).or_insert((*unit, 0.0));
            match unit {
                Unit::Count => entry.1 += value,
                Unit::Milliseconds => entry.1 = entry.1.max(*value),
            }
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MetricDefinition<'a> {
    name: &'a str,
    unit: Unit,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MetricDirective<'a> {
    namespace: &'a str,
    dimensions: Vec<Vec<&'a str>>,
    metrics: Vec<MetricDefinition<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Metadata<'a> {
    timestamp: i64,
    cloud_watch_metrics: Vec<MetricDirective<'a>>,
}

#[derive(Serialize)]
struct EmfLine<'a> {
    #[serde(rename = "_aws")]
    aws: Metadata<'a>,
    #[serde(rename = "Function")]
    function: &'a str,
    #[serde(rename = "Bucket", skip_serializing_if = "Option::is_none")]
    bucket: Option<&'a str>,
    #[serde(flatten)]
    values: BTreeMap<&'a str, f64>,
}

/// One EMF line, or `None` when there is nothing to report.
pub fn emf_line(
    function: &str,
    bucket: Option<&str>,
    timestamp_ms: i64,
    metrics: &MetricSet,
) -> Option<String> {
    if metrics.is_empty() {
        return None;
    }
    let mut dimensions = vec!["Function"];
    if bucket.is_some() {
        dimensions.push("Bucket");
    }
    let line = EmfLine {
        aws: Metadata {
            timestamp: timestamp_ms,
            cloud_watch_metrics: vec![MetricDirective {
                namespace: NAMESPACE,
                dimensions: vec![dimensions],
                metrics: metrics
                    .values
                    .iter()
                    .map(|(name, (unit, _))| MetricDefinition { name, unit: *unit })
                    .collect(),
            }],
        },
        function,
        bucket,
        values: metrics
            .values
            .iter()
            .map(|(name, (_, v))| (*name, *v))
            .collect(),
    };
    serde_json::to_string(&line).ok()
}

/// Where EMF lines go.
pub trait MetricsSink: Send + Sync {
    fn emit(&self, line: &str);
}

/// Standard output, where Lambda's log agent picks EMF lines up.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdoutSink;

impl MetricsSink for StdoutSink {
    fn emit(&self, line: &str) {
        println!("{line}");
    }
}

/// Keeps the lines, for tests.
#[derive(Debug, Default)]
pub struct MemorySink(Mutex<Vec<String>>);

impl MemorySink {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl MetricsSink for MemorySink {
    fn emit(&self, line: &str) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(line.to_string());
        }
    }
}

/// Discards the lines (the simulation).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl MetricsSink for NullSink {
    fn emit(&self, _: &str) {}
}

/// One invocation's metrics: the function's totals, and per bucket.
#[derive(Debug, Default)]
pub struct InvocationMetrics {
    pub total: MetricSet,
    pub per_bucket: BTreeMap<String, MetricSet>,
}

impl InvocationMetrics {
    pub fn count(&mut self, bucket: Option<&str>, name: &'static str, n: usize) {
        self.total.count(name, n);
        if let Some(b) = bucket {
            self.per_bucket
                .entry(b.to_string())
                .or_default()
                .count(name, n);
        }
    }

    pub fn max_ms(&mut self, bucket: Option<&str>, name: &'static str, ms: i64) {
        self.total.max_ms(name, ms);
        if let Some(b) = bucket {
            self.per_bucket
                .entry(b.to_string())
                .or_default()
                .max_ms(name, ms);
        }
    }

    /// Adds another invocation's metrics.
    pub fn absorb(&mut self, other: &InvocationMetrics) {
        self.total.absorb(&other.total);
        for (bucket, set) in &other.per_bucket {
            self.per_bucket
                .entry(bucket.clone())
                .or_default()
                .absorb(set);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total.is_empty() && self.per_bucket.values().all(MetricSet::is_empty)
    }

    /// Whether an alarm watches something in these metrics, so that its line must
    /// not wait: a count that alarms fire on, an event age over
    /// [`PROMPT_EVENT_AGE_MS`], or any staleness.
    pub fn needs_prompt_line(&self) -> bool {
        PROMPT_COUNTS
            .iter()
            .any(|name| self.total.get(name).is_some_and(|n| n > 0.0))
            || self
                .total
                .get(name::OLDEST_EVENT_AGE)
                .is_some_and(|ms| ms >= PROMPT_EVENT_AGE_MS as f64)
            || self.total.get(name::STALENESS).is_some()
    }

    /// Writes the function line, then one line per bucket.
    pub fn emit(&self, sink: &dyn MetricsSink, default_function: &str, timestamp_ms: i64) {
        let function = function_dimension(default_function);
        let function = function.as_str();
        if let Some(line) = emf_line(function, None, timestamp_ms, &self.total) {
            sink.emit(&line);
        }
        for (bucket, set) in &self.per_bucket {
            if let Some(line) = emf_line(function, Some(bucket), timestamp_ms, set) {
                sink.emit(&line);
            }
        }
    }
}

/// The counts that alarms fire on (`scripts/lib/monitoring.sh`): a buffered line with
/// one of them is written at once.
const PROMPT_COUNTS: [&str; 6] = [
    name::EVENTS_SKIPPED_MALFORMED,
    name::MESSAGES_FAILED,
    name::MESSAGES_UNREADABLE,
    name::REFRESHES_THROTTLED,
    name::REFRESHES_FAILED,
    name::ACCESS_POINTS_UNRESOLVED,
];

/// An event age from this on is written at once: an S3 delivery that lags (the
/// aggregator's `S3DeliveryLate` alarm fires at 5 minutes; events normally arrive
/// within a second).
pub const PROMPT_EVENT_AGE_MS: i64 = 60_000;

/// A warm container's metrics, added up between lines. `interval_ms` 0 writes every
/// invocation's lines at once.
pub struct MetricsBuffer {
    sink: std::sync::Arc<dyn MetricsSink>,
    default_function: &'static str,
    interval_ms: i64,
    pending: Mutex<PendingMetrics>,
}

#[derive(Default)]
struct PendingMetrics {
    /// When the oldest metrics still pending were recorded.
    since_ms: Option<i64>,
    metrics: InvocationMetrics,
}

impl MetricsBuffer {
    pub fn new(
        sink: std::sync::Arc<dyn MetricsSink>,
        default_function: &'static str,
        interval_ms: i64,
    ) -> Self {
        MetricsBuffer {
            sink,
            default_function,
            interval_ms: interval_ms.max(0),
            pending: Mutex::new(PendingMetrics::default()),
        }
    }

    pub fn interval_ms(&self) -> i64 {
        self.interval_ms
    }

    pub fn sink(&self) -> std::sync::Arc<dyn MetricsSink> {
        std::sync::Arc::clone(&self.sink)
    }

    /// Adds one invocation's metrics, and writes everything pending when the interval
    /// has passed since the oldest of it, or an alarm watches something in it.
    pub fn record(&self, metrics: &InvocationMetrics, now_ms: i64) {
        let mut pending = self.lock();
        pending.metrics.absorb(metrics);
        let due = self.interval_ms == 0
            || metrics.needs_prompt_line()
            || pending
                .since_ms
                .is_some_and(|since| now_ms.saturating_sub(since) >= self.interval_ms);
        if due {
            self.write(&mut pending, now_ms);
        } else if pending.since_ms.is_none() && !pending.metrics.is_empty() {
            pending.since_ms = Some(now_ms);
        }
    }

    /// Writes everything pending (the container is shutting down).
    pub fn flush(&self, now_ms: i64) {
        let mut pending = self.lock();
        self.write(&mut pending, now_ms);
    }

    fn write(&self, pending: &mut PendingMetrics, now_ms: i64) {
        let metrics = std::mem::take(&mut pending.metrics);
        pending.since_ms = None;
        metrics.emit(self.sink.as_ref(), self.default_function, now_ms);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingMetrics> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Checks a line against the EMF specification's required structure and returns it
/// parsed: `_aws.Timestamp` (a number), `_aws.CloudWatchMetrics[]` with `Namespace`
/// (a string), `Dimensions` (arrays of at most 30 names, each a string member of the
/// line) and `Metrics` (1 to 100 `{Name, Unit?}`, each a number member of the line).
pub fn check_emf_line(line: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let aws = v.get("_aws").ok_or("no _aws")?;
    if !aws.get("Timestamp").is_some_and(Value::is_i64) {
        return Err("_aws.Timestamp is not an integer".into());
    }
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(Value::as_array)
        .filter(|d| !d.is_empty())
        .ok_or("_aws.CloudWatchMetrics is not a non-empty array")?;
    for d in directives {
        if d.get("Namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            return Err("Namespace missing".into());
        }
        for set in d
            .get("Dimensions")
            .and_then(Value::as_array)
            .ok_or("Dimensions missing")?
        {
            let set = set.as_array().ok_or("a dimension set is not an array")?;
            if set.len() > 30 {
                return Err("more than 30 dimensions".into());
            }
            for dim in set {
                let dim = dim.as_str().ok_or("a dimension is not a string")?;
                if !v.get(dim).is_some_and(Value::is_string) {
                    return Err(format!("dimension {dim} is not a string member"));
                }
            }
        }
        let metrics = d
            .get("Metrics")
            .and_then(Value::as_array)
            .filter(|m| !m.is_empty() && m.len() <= 100)
            .ok_or("Metrics is not an array of 1 to 100")?;
        for m in metrics {
            let name = m
                .get("Name")
                .and_then(Value::as_str)
                .ok_or("a metric has no Name")?;
            if !v.get(name).is_some_and(Value::is_number) {
                return Err(format!("metric {name} is not a number member"));
            }
            if let Some(unit) = m.get("Unit") {
                if !matches!(unit.as_str(), Some("Count" | "Milliseconds")) {
                    return Err(format!("metric {name} has an unexpected unit {unit}"));
                }
            }
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn assert_valid_emf(line: &str) {
        if let Err(e) = check_emf_line(line) {
            panic!("{e}: {line}");
        }
    }

    #[test]
    fn lines_follow_the_emf_specification() {
        let mut m = InvocationMetrics::default();
        m.count(Some("b1"), name::EVENTS_RECEIVED, 3);
        m.count(Some("b2"), name::EVENTS_RECEIVED, 2);
        m.count(None, name::EVENTS_SKIPPED_MALFORMED, 1);
        m.max_ms(Some("b1"), name::OLDEST_EVENT_AGE, 1200);
        m.max_ms(Some("b1"), name::OLDEST_EVENT_AGE, 900);
        let sink = MemorySink::default();
        m.emit(&sink, "aggregator", 1_700_000_000_000);
        let lines = sink.lines();
        assert_eq!(lines.len(), 3);
        for line in &lines {
            assert_valid_emf(line);
        }
        let total: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(total["EventsReceived"], 5.0);
        assert_eq!(total["Function"], "aggregator");
        assert!(total.get("Bucket").is_none());
        let b1: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(b1["Bucket"], "b1");
        assert_eq!(b1["OldestEventAgeMs"], 1200.0);
        assert_eq!(
            b1["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0],
            serde_json::json!(["Function", "Bucket"])
        );
    }

    fn received(n: usize) -> InvocationMetrics {
        let mut m = InvocationMetrics::default();
        m.count(Some("b1"), name::EVENTS_RECEIVED, n);
        m.max_ms(Some("b1"), name::OLDEST_EVENT_AGE, 100 * n as i64);
        m
    }

    #[test]
    fn a_buffer_adds_invocations_up_and_writes_once_per_interval() {
        let sink = std::sync::Arc::new(MemorySink::default());
        let buffer = MetricsBuffer::new(sink.clone(), "aggregator", 60_000);
        buffer.record(&received(1), 0);
        buffer.record(&received(2), 30_000);
        assert!(sink.lines().is_empty(), "within the interval");
        buffer.record(&received(3), 60_000);
        let lines = sink.lines();
        assert_eq!(lines.len(), 2, "the function's line and the bucket's");
        let total: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(total["EventsReceived"], 6.0);
        assert_eq!(total["OldestEventAgeMs"], 300.0, "ages keep the largest");
        assert_eq!(total["_aws"]["Timestamp"], 60_000);
        // The next interval starts with the next invocation.
        buffer.record(&received(1), 70_000);
        buffer.record(&received(1), 129_999);
        assert_eq!(sink.lines().len(), 2);
        buffer.flush(130_000);
        let lines = sink.lines();
        assert_eq!(lines.len(), 4);
        let flushed: Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(flushed["EventsReceived"], 2.0);
        buffer.flush(140_000);
        assert_eq!(sink.lines().len(), 4, "nothing pending, nothing written");
    }

    #[test]
    fn what_an_alarm_watches_is_written_at_once_with_what_waited() {
        let sink = std::sync::Arc::new(MemorySink::default());
        let buffer = MetricsBuffer::new(sink.clone(), "aggregator", 60_000);
        buffer.record(&received(2), 0);
        let mut malformed = InvocationMetrics::default();
        malformed.count(None, name::EVENTS_SKIPPED_MALFORMED, 1);
        buffer.record(&malformed, 1_000);
        let total: Value = serde_json::from_str(&sink.lines()[0]).unwrap();
        assert_eq!(
            (
                total["EventsReceived"].clone(),
                total["EventsSkippedMalformed"].clone()
            ),
            (serde_json::json!(2.0), serde_json::json!(1.0))
        );
        let mut late = InvocationMetrics::default();
        late.max_ms(Some("b1"), name::OLDEST_EVENT_AGE, PROMPT_EVENT_AGE_MS);
        buffer.record(&late, 2_000);
        assert_eq!(sink.lines().len(), 4, "a late delivery is written at once");
        let mut on_time = InvocationMetrics::default();
        on_time.max_ms(Some("b1"), name::OLDEST_EVENT_AGE, PROMPT_EVENT_AGE_MS - 1);
        buffer.record(&on_time, 3_000);
        assert_eq!(sink.lines().len(), 4);
        // Interval 0: every invocation's lines at once, as without a buffer.
        let sink = std::sync::Arc::new(MemorySink::default());
        let every = MetricsBuffer::new(sink.clone(), "aggregator", 0);
        every.record(&received(1), 0);
        every.record(&received(1), 1);
        assert_eq!(sink.lines().len(), 4);
    }

    #[test]
    fn nothing_to_report_writes_nothing() {
        let sink = MemorySink::default();
        InvocationMetrics::default().emit(&sink, "refresher", 0);
        assert!(sink.lines().is_empty());
    }
}
