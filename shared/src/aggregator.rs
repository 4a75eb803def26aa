//! The aggregator: S3 object events in, at most one refresh message per bucket window out.

use crate::clock::Clock;
use crate::error::{QueueError, StoreError};
use crate::ingest::{decode_invocation, InvocationKind};
use crate::logging::truncate;
use crate::metrics::{name, InvocationMetrics, MetricsBuffer, MetricsSink, StdoutSink};
use crate::ports::{RefreshQueue, WindowStore};
use crate::refresh_message::{RefreshMessage, BODY_VERSION, MAX_SQS_DELAY_SECONDS};
use crate::s3_event::{DecodedNotification, NotANotification, SkipReason};
use crate::window::{ChangeSet, OpenExpectation, WindowItem};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use tracing::{error, info, warn};

/// How many times one bucket's join-or-open is tried when other invocations keep
/// opening and closing windows between our two writes.
const MAX_WRITE_ROUNDS: usize = 3;

#[derive(Debug, Error)]
pub enum AggregatorError {
    /// The payload is not an S3 notification. Failing the invocation sends it, after
    /// Lambda's retries, to the function's DLQ / on-failure destination, where the
    /// operator can see it.
    #[error(transparent)]
    NotANotification(#[from] NotANotification),
    #[error("bucket {bucket}: {source}")]
    Store { bucket: String, source: StoreError },
    #[error("bucket {bucket}: {source}")]
    Queue { bucket: String, source: QueueError },
    #[error("bucket {bucket}: window kept changing under {MAX_WRITE_ROUNDS} rounds of writes")]
    Contention { bucket: String },
}

/// What one invocation did; also the invocation's response, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AggregatorReport {
    pub records: usize,
    pub changes: usize,
    /// Changes written through a gateway: refreshed on the other gateways' shares.
    pub gateway_writes: usize,
    pub skipped_test_events: usize,
    pub skipped_malformed: usize,
    pub undecodable_keys: usize,
    pub windows_opened: usize,
    pub windows_joined: usize,
    pub messages_sent: usize,
    /// DynamoDB write requests (conditional updates) this invocation made.
    pub window_writes: usize,
    /// Events that needed no call at all: a window this container recorded covers them.
    pub coalesced_in_container: usize,
    /// EventBridge events that change no listing (restores, tags, ...).
    pub skipped_not_listing_changes: usize,
    /// How the events arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest: Option<InvocationKind>,
    /// SQS-delivered batches: the messages to redeliver.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub batch_item_failures: Vec<String>,
}

impl AggregatorReport {
    /// What the function returns to Lambda: for an SQS event source, the partial batch
    /// response (only the messages whose events could not be recorded come back);
    /// otherwise this report.
    pub fn into_response(self) -> Value {
        if self.ingest == Some(InvocationKind::Sqs) {
            let failures: Vec<Value> = self
                .batch_item_failures
                .iter()
                .map(|id| serde_json::json!({ "itemIdentifier": id }))
                .collect();
            return serde_json::json!({ "batchItemFailures": failures });
        }
        serde_json::to_value(&self).unwrap_or(Value::Null)
    }
}

/// What happened to one bucket's share of the invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BucketOutcome {
    /// Sent the next window's message and opened that window.
    Opened,
    /// Joined the open window (or found that it already records these changes).
    Joined,
    /// A window this container recorded covers these changes: no call at all.
    CoalescedInContainer,
}

#[derive(Debug, Clone, Copy)]
struct BucketResult {
    outcome: BucketOutcome,
    generation: u64,
    ends_at_ms: i64,
    /// DynamoDB write requests and SQS sends this bucket cost.
    writes: usize,
    sends: usize,
}

/// How long before a window's end this container stops trusting its own record of
/// the window. The refresher closes a window only once its clock passes the end, so a
/// window this container saw open cannot have been closed before `end - margin` as
/// long as two Lambda clocks differ by less than the margin (Lambda hosts keep time
/// with the Amazon Time Sync Service, well within a millisecond).
pub const DEFAULT_CLOCK_MARGIN_MS: i64 = 1_000;

/// How many buckets a container remembers windows for; past this it forgets them all
/// (which costs only writes).
const MAX_KNOWN_WINDOWS: usize = 10_000;

/// Per-bucket input of one invocation.
#[derive(Debug, Default)]
struct BucketBatch {
    changes: ChangeSet,
    first_event_ms: Option<i64>,
    events: usize,
    /// The first few decoded keys, for the decision's log line.
    keys: Vec<String>,
}

/// How many keys a decision's log line names.
const LOGGED_KEYS: usize = 5;

pub struct Aggregator<S, Q, C> {
    store: S,
    queue: Q,
    clock: C,
    delay_seconds: u32,
    /// The container's metrics, added up between lines.
    metrics: Arc<MetricsBuffer>,
    /// The latest state of each bucket's item that this container wrote or read.
    known: Mutex<HashMap<String, WindowItem>>,
    clock_margin_ms: i64,
}

impl<S: WindowStore, Q: RefreshQueue, C: Clock> Aggregator<S, Q, C> {
    pub fn new(store: S, queue: Q, clock: C, delay_seconds: u32) -> Self {
        Aggregator {
            store,
            queue,
            clock,
            delay_seconds,
            metrics: Arc::new(MetricsBuffer::new(Arc::new(StdoutSink), "aggregator", 0)),
            known: Mutex::new(HashMap::new()),
            clock_margin_ms: DEFAULT_CLOCK_MARGIN_MS,
        }
    }

    /// Sends the EMF metric lines somewhere else than stdout.
    pub fn with_metrics_sink(mut self, sink: Arc<dyn MetricsSink>) -> Self {
        let interval_ms = self.metrics.interval_ms();
        self.metrics = Arc::new(MetricsBuffer::new(sink, "aggregator", interval_ms));
        self
    }

    /// Adds the metric lines of a warm container's invocations up and writes them at
    /// most once per `interval_ms` (see [`MetricsBuffer`]); 0, the default, writes each
    /// invocation's lines.
    pub fn with_metrics_interval_ms(mut self, interval_ms: i64) -> Self {
        let buffer = MetricsBuffer::new(self.metrics.sink(), "aggregator", interval_ms);
        self.metrics = Arc::new(buffer);
        self
    }

    /// The container's metric buffer, to write out when Lambda shuts the container
    /// down.
    pub fn metrics_buffer(&self) -> Arc<MetricsBuffer> {
        Arc::clone(&self.metrics)
    }

    /// The most two clocks may differ by (see [`DEFAULT_CLOCK_MARGIN_MS`]).
    pub fn with_clock_margin_ms(mut self, margin_ms: i64) -> Self {
        self.clock_margin_ms = margin_ms;
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn queue(&self) -> &Q {
        &self.queue
    }

    /// Handles one S3 event notification.
    ///
    /// Every bucket is processed even if another fails; any failure then fails the
    /// invocation so that Lambda retries it. A retry is safe: joining a window twice
    /// changes nothing, and an unsent window gets its message.
    pub async fn handle(&self, payload: &Value) -> Result<AggregatorReport, AggregatorError> {
        let invocation = decode_invocation(payload).inspect_err(|e| {
            error!(error = %e, payload = %truncate(&payload.to_string(), 2048), "Rejecting event");
        })?;
        let mut report = AggregatorReport {
            ingest: Some(invocation.kind),
            ..Default::default()
        };
        let mut metrics = InvocationMetrics::default();
        for unit in &invocation.units {
            match &unit.outcome {
                Err(e) => {
                    // Retrying cannot make this record readable: log it whole, count it.
                    report.records += 1;
                    report.skipped_malformed += 1;
                    metrics.count(None, name::EVENTS_SKIPPED_MALFORMED, 1);
                    error!(record = unit.index, message_id = unit.message_id.as_deref().unwrap_or(""),
                        error = %e, "Dropping a record that can never be processed");
                }
                Ok(events) => {
                    let decoded = &events.notification;
                    report.records +=
                        decoded.changes.len() + decoded.skipped.len() + events.ignored.len();
                    report.changes += decoded.changes.len();
                    report.gateway_writes += decoded
                        .changes
                        .iter()
                        .filter(|c| c.writer.is_some())
                        .count();
                    report.undecodable_keys += decoded.undecodable_keys.len();
                    report.skipped_not_listing_changes += events.ignored.len();
                    for ignored in &events.ignored {
                        info!(
                            bucket = ignored.bucket.as_deref().unwrap_or(""),
                            "Skipping {ignored}"
                        );
                    }
                    Self::log_skips(
                        unit.message_id.as_deref(),
                        decoded,
                        &mut report,
                        &mut metrics,
                    );
                }
            }
        }

        let mut buckets: BTreeMap<&str, BucketBatch> = BTreeMap::new();
        for (_, change) in invocation.changes() {
            let batch = buckets.entry(change.bucket.as_str()).or_default();
            batch.events += 1;
            metrics.count(Some(&change.bucket), name::EVENTS_RECEIVED, 1);
            if change.writer.is_some() {
                metrics.count(Some(&change.bucket), name::EVENTS_FROM_GATEWAY, 1);
            }
            if let Some(key) = change
                .key
                .as_ref()
                .filter(|_| batch.keys.len() < LOGGED_KEYS)
            {
                batch.keys.push(key.clone());
            }
            match (&change.writer, change.folder()) {
                (None, Some(folder)) => batch.changes.add_folder(folder),
                (None, None) => batch.changes.set_whole_bucket(),
                (Some(writer), folder) => batch.changes.add_gateway_write(writer, folder),
            }
            if let Some(t) = change.event_time_ms {
                batch.first_event_ms = Some(batch.first_event_ms.map_or(t, |f| f.min(t)));
            }
        }

        let mut first_error = None;
        let now = self.clock.now_ms();
        for (bucket, batch) in &buckets {
            let b = Some(*bucket);
            if let Some(first) = batch.first_event_ms {
                metrics.max_ms(b, name::OLDEST_EVENT_AGE, now.saturating_sub(first));
            }
            match self.process_bucket(bucket, batch).await {
                Ok(result) => {
                    report.window_writes += result.writes;
                    report.messages_sent += result.sends;
                    metrics.count(b, name::WINDOW_WRITES, result.writes);
                    metrics.count(b, name::MESSAGES_SENT, result.sends);
                    match result.outcome {
                        BucketOutcome::Opened => {
                            report.windows_opened += 1;
                            metrics.count(b, name::WINDOWS_OPENED, 1);
                        }
                        BucketOutcome::Joined | BucketOutcome::CoalescedInContainer => {
                            let timestamp = batch.first_event_ms.unwrap_or(now);
                            info!(bucket, keys = ?batch.keys, events = batch.events, event_time = timestamp,
                                generation = result.generation, window_ends_at = result.ends_at_ms,
                                outcome = if result.outcome == BucketOutcome::Joined { "joined" } else { "coalesced" },
                                "Refresh for bucket: {bucket} within refresh window, skipping. S3 Event timestamp: {timestamp}");
                            report.windows_joined += 1;
                            metrics.count(b, name::EVENTS_COALESCED, batch.events);
                            if result.outcome == BucketOutcome::CoalescedInContainer {
                                report.coalesced_in_container += batch.events;
                                metrics.count(b, name::EVENTS_COALESCED_LOCALLY, batch.events);
                            }
                        }
                    }
                }
                Err(e) => {
                    if invocation.kind == InvocationKind::Sqs {
                        // Only the messages that carried this bucket's events are retried.
                        let units: Vec<_> = invocation.units_for_bucket(bucket).collect();
                        if units.iter().all(|u| u.message_id.is_some()) {
                            let ids: Vec<&str> = invocation.sqs_message_ids_for_bucket(bucket);
                            error!(bucket, error = %e, messages = ids.len(),
                                "Failed to record events; their messages will be redelivered");
                            for id in ids {
                                if !report.batch_item_failures.iter().any(|f| f == id) {
                                    report.batch_item_failures.push(id.to_string());
                                }
                            }
                            continue;
                        }
                    }
                    error!(bucket, error = %e, "Failed to record events; the invocation will be retried");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.metrics.record(&metrics, self.clock.now_ms());
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn log_skips(
        message_id: Option<&str>,
        decoded: &DecodedNotification,
        report: &mut AggregatorReport,
        metrics: &mut InvocationMetrics,
    ) {
        let message_id = message_id.unwrap_or("");
        for skipped in &decoded.skipped {
            let bucket = skipped.bucket.as_deref();
            match &skipped.reason {
                SkipReason::TestEvent => {
                    report.skipped_test_events += 1;
                    info!(
                        bucket = bucket.unwrap_or(""),
                        message_id, "Skipping {}", skipped.reason
                    );
                }
                SkipReason::Malformed { .. } => {
                    report.skipped_malformed += 1;
                    metrics.count(bucket, name::EVENTS_RECEIVED, 1);
                    metrics.count(bucket, name::EVENTS_SKIPPED_MALFORMED, 1);
                    warn!(
                        record = skipped.index,
                        message_id, "Skipping {}", skipped.reason
                    );
                }
            }
        }
        for bad in &decoded.undecodable_keys {
            warn!(record = bad.index, message_id, raw_key = %bad.raw_key, error = %bad.error,
                "Key cannot be decoded; its bucket's shares will be refreshed in full");
        }
    }

    /// Records one bucket's changes: skipped when a window this container recorded
    /// covers them, else one write that joins the open window, or a send and one
    /// write that opens the next window.
    async fn process_bucket(
        &self,
        bucket: &str,
        batch: &BucketBatch,
    ) -> Result<BucketResult, AggregatorError> {
        let store_err = |source| AggregatorError::Store {
            bucket: bucket.to_string(),
            source,
        };
        let window_ms = i64::from(self.delay_seconds) * 1000;
        let mut result = BucketResult {
            outcome: BucketOutcome::Joined,
            generation: 0,
            ends_at_ms: 0,
            writes: 0,
            sends: 0,
        };
        let now = self.clock.now_ms();
        // A window known from this container's own write is used without a read while
        // it surely takes joins; one that is near its end is read again.
        let mut cached = self.known_window(bucket).filter(|known| {
            known.is_joinable(now) && now < known.ends_at_ms.saturating_sub(self.clock_margin_ms)
        });
        if let Some(known) = &cached {
            if known.covers(&batch.changes) {
                // Safe without a write: the window records these changes and cannot be
                // closed before its end (see `with_clock_margin_ms`), so its refresh
                // starts after these events.
                result.outcome = BucketOutcome::CoalescedInContainer;
                result.generation = known.generation;
                result.ends_at_ms = known.ends_at_ms;
                return Ok(result);
            }
        }
        for _ in 0..MAX_WRITE_ROUNDS {
            // Decisions use the time we process the event, not its eventTime: a late
            // event joins only a window whose refresh has not started, whenever it
            // happened.
            let now = self.clock.now_ms();
            let (item, fresh) = match cached.take() {
                Some(known) => (Some(known), false),
                None => (self.store.read(bucket).await.map_err(store_err)?, true),
            };
            if let Some(current) = item.as_ref().filter(|i| i.is_joinable(now)) {
                let rest = current.uncovered(&batch.changes);
                if fresh && rest.is_empty() {
                    // Just read: the window was open after these events happened and
                    // already records their changes.
                    result.generation = current.generation;
                    result.ends_at_ms = current.ends_at_ms;
                    self.remember(current.clone());
                    return Ok(result);
                }
                result.writes += 1;
                if let Some(joined) = self
                    .store
                    .join(bucket, current, &rest, now)
                    .await
                    .map_err(store_err)?
                {
                    result.generation = joined.generation;
                    result.ends_at_ms = joined.ends_at_ms;
                    self.remember(joined);
                    return Ok(result);
                }
                // Closed, full or moved on since we looked: look again.
                continue;
            }
            let expected = OpenExpectation::from_item(item.as_ref());
            // A new window starts with these changes alone; an unrefreshed current
            // window is kept beside it, and the two share the entry limit.
            let changes = expected.fit(&batch.changes);
            let message = RefreshMessage {
                version: BODY_VERSION,
                bucket: bucket.to_string(),
                generation: expected.next_generation(),
                window_opened_at_ms: now,
                window_ends_at_ms: now.saturating_add(window_ms),
                timestamp_ms: batch.first_event_ms.unwrap_or(now),
            };
            // The message goes first: a window in the table always has its message on
            // the queue. If the open below fails, this message names a window that
            // someone else opened (a harmless duplicate) or none (the refresher drops it).
            self.send(bucket, batch, &message).await?;
            result.sends += 1;
            result.writes += 1;
            if let Some(opened) = self
                .store
                .open(bucket, expected, &changes, now, window_ms)
                .await
                .map_err(store_err)?
            {
                result.outcome = BucketOutcome::Opened;
                result.generation = opened.generation;
                result.ends_at_ms = opened.ends_at_ms;
                self.remember(opened);
                return Ok(result);
            }
            // Another invocation opened or changed the window meanwhile: look again.
        }
        Err(AggregatorError::Contention {
            bucket: bucket.to_string(),
        })
    }

    fn known_window(&self, bucket: &str) -> Option<WindowItem> {
        lock(&self.known).get(bucket).cloned()
    }

    fn remember(&self, item: WindowItem) {
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN_WINDOWS && !known.contains_key(&item.bucket) {
            known.clear();
        }
        known.insert(item.bucket.clone(), item);
    }

    async fn send(
        &self,
        bucket: &str,
        batch: &BucketBatch,
        message: &RefreshMessage,
    ) -> Result<(), AggregatorError> {
        // SQS delays at most 900 s; the refresher sends a longer window's message
        // back until the window ends.
        let delay_seconds = self.delay_seconds.min(MAX_SQS_DELAY_SECONDS);
        let message_id = self
            .queue
            .send(message, delay_seconds)
            .await
            .map_err(|source| AggregatorError::Queue {
                bucket: bucket.to_string(),
                source,
            })?;
        let timestamp_ms = message.timestamp_ms;
        info!(bucket, keys = ?batch.keys, events = batch.events, event_time = timestamp_ms,
            generation = message.generation, window_ends_at = message.window_ends_at_ms, outcome = "sent",
            message_id = %message_id, delay_seconds,
            "Sending refresh request for bucket: {bucket}, timestamp: {timestamp_ms}");
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AggregatorError {
    /// The `errorType` Lambda records for a failed invocation.
    pub fn error_type(&self) -> &'static str {
        match self {
            AggregatorError::NotANotification(_) => "Aggregator.NotAnS3Notification",
            AggregatorError::Store { .. } => "Aggregator.WindowStore",
            AggregatorError::Queue { .. } => "Aggregator.RefreshQueue",
            AggregatorError::Contention { .. } => "Aggregator.Contention",
        }
    }
}

#[cfg(feature = "aws")]
impl From<AggregatorError> for lambda_runtime::Diagnostic {
    fn from(error: AggregatorError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: error.error_type().to_string(),
            error_message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryQueue, MemoryWindowStore};
    use crate::ports::WindowStore;
    use serde_json::json;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct TestClock(AtomicI64);
    impl Clock for &TestClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn event(records: &[(&str, &str)]) -> Value {
        let records: Vec<Value> = records
            .iter()
            .map(|(bucket, key)| {
                json!({"eventName": "ObjectCreated:Put", "eventTime": "2026-01-01T00:00:00.000Z",
                       "s3": {"bucket": {"name": bucket}, "object": {"key": key}}})
            })
            .collect();
        json!({ "Records": records })
    }

    #[tokio::test]
    async fn one_message_per_bucket_window() {
        let clock = TestClock(AtomicI64::new(1_000_000));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        let r1 = agg
            .handle(&event(&[("bkt1", "a/x"), ("bkt1", "a/y"), ("bkt2", "z")]))
            .await
            .unwrap();
        assert_eq!(
            (r1.windows_opened, r1.messages_sent, r1.windows_joined),
            (2, 2, 0)
        );
        let r2 = agg.handle(&event(&[("bkt1", "c/x")])).await.unwrap();
        assert_eq!(
            (r2.windows_opened, r2.windows_joined, r2.messages_sent),
            (0, 1, 0)
        );
        let sent = agg.queue().sent();
        assert_eq!(sent.len(), 2);
        assert!(sent
            .iter()
            .all(|m| m.delay_seconds == 30 && m.message.generation == 1));
        let item = agg.store().item("bkt1").unwrap();
        assert_eq!(
            item.changes.folders,
            ["a/".to_string(), "c/".to_string()].into()
        );
        // Past its end the window takes joins until the refresher closes it.
        clock.0.fetch_add(30_000, Ordering::Relaxed);
        let r3 = agg.handle(&event(&[("bkt1", "d")])).await.unwrap();
        assert_eq!((r3.windows_opened, r3.windows_joined), (0, 1));
        let closed = crate::ports::WindowStore::close(
            agg.store(),
            "bkt1",
            1,
            clock.0.load(Ordering::Relaxed),
        )
        .await
        .unwrap();
        assert!(matches!(closed, crate::window::CloseOutcome::Refresh(_)));
        let r3 = agg.handle(&event(&[("bkt1", "d")])).await.unwrap();
        assert_eq!(r3.windows_opened, 1);
        assert_eq!(agg.queue().sent().last().unwrap().message.generation, 2);
    }

    #[tokio::test]
    async fn a_warm_container_writes_once_per_folder_per_window() {
        let clock = TestClock(AtomicI64::new(1_000_000));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        for i in 0..1_000 {
            let folder = if i % 2 == 0 { "a" } else { "b" };
            agg.handle(&event(&[("bkt1", &format!("{folder}/k{i}"))]))
                .await
                .unwrap();
            clock.0.fetch_add(10, Ordering::Relaxed);
        }
        // Open (with folder a) and one join for folder b; one read when cold.
        assert_eq!(agg.store().writes(), 2);
        assert_eq!(agg.store().reads(), 1);
        assert_eq!(agg.queue().sent().len(), 1);
        // Within the last second of the window the container no longer trusts its
        // record: it reads, and a read that shows the change recorded needs no write.
        clock.0.store(1_000_000 + 29_500, Ordering::Relaxed);
        let r = agg.handle(&event(&[("bkt1", "a/late")])).await.unwrap();
        assert_eq!((r.window_writes, r.coalesced_in_container), (0, 0));
        assert_eq!(agg.store().reads(), 2);
        // The next window: one read, one send, one write.
        clock.0.store(1_000_000 + 31_000, Ordering::Relaxed);
        crate::ports::WindowStore::close(agg.store(), "bkt1", 1, 1_031_000)
            .await
            .unwrap();
        let r = agg.handle(&event(&[("bkt1", "c/x")])).await.unwrap();
        assert_eq!(
            (r.windows_opened, r.window_writes, r.messages_sent),
            (1, 1, 1)
        );
        let item = agg.store().item("bkt1").unwrap();
        assert_eq!(item.generation, 2);
        // Window 1 was closed but its refreshes were never recorded: carried beside
        // window 2, which records only its own folder.
        assert_eq!(item.changes.folders, ["c/".to_string()].into());
        let carried = item.carried.clone().unwrap();
        assert_eq!(carried.generation, 1);
        assert_eq!(
            item.changes_to_refresh().folders,
            ["a/".to_string(), "b/".to_string(), "c/".to_string()].into()
        );
    }

    /// A store that fails every call for one bucket.
    struct FailingFor(&'static str, MemoryWindowStore);

    impl WindowStore for FailingFor {
        async fn read(&self, bucket: &str) -> Result<Option<WindowItem>, StoreError> {
            self.check(bucket)?;
            self.1.read(bucket).await
        }
        async fn join(
            &self,
            bucket: &str,
            seen: &WindowItem,
            changes: &ChangeSet,
            now_ms: i64,
        ) -> Result<Option<WindowItem>, StoreError> {
            self.check(bucket)?;
            self.1.join(bucket, seen, changes, now_ms).await
        }
        async fn open(
            &self,
            bucket: &str,
            expected: OpenExpectation,
            changes: &ChangeSet,
            now_ms: i64,
            window_ms: i64,
        ) -> Result<Option<WindowItem>, StoreError> {
            self.check(bucket)?;
            self.1
                .open(bucket, expected, changes, now_ms, window_ms)
                .await
        }
        async fn close(
            &self,
            bucket: &str,
            generation: u64,
            now_ms: i64,
        ) -> Result<crate::window::CloseOutcome, StoreError> {
            self.1.close(bucket, generation, now_ms).await
        }
        async fn record_refresh(
            &self,
            bucket: &str,
            log: &crate::window::RefreshLog,
        ) -> Result<(), StoreError> {
            self.1.record_refresh(bucket, log).await
        }
    }

    impl FailingFor {
        fn check(&self, bucket: &str) -> Result<(), StoreError> {
            if bucket == self.0 {
                return Err(StoreError {
                    retry: crate::error::Retry::Later,
                    message: "throttled".into(),
                });
            }
            Ok(())
        }
    }

    fn sqs_batch(bodies: &[(&str, Value)]) -> Value {
        let records: Vec<Value> = bodies
            .iter()
            .map(|(id, body)| {
                json!({"messageId": id, "eventSource": "aws:sqs", "body": body.to_string(),
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ingest"})
            })
            .collect();
        json!({ "Records": records })
    }

    #[tokio::test]
    async fn an_sqs_batch_is_one_write_per_bucket_and_fails_only_its_messages() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            FailingFor("broken", MemoryWindowStore::default()),
            MemoryQueue::default(),
            &clock,
            30,
        );
        let mut bodies: Vec<(String, Value)> = (0..100)
            .map(|i| {
                (
                    format!("m{i}"),
                    event(&[("bkt1", &format!("f{}/k{i}", i % 3))]),
                )
            })
            .collect();
        bodies.push(("bad-1".into(), event(&[("broken", "x")])));
        bodies.push(("garbage".into(), json!("not an event")));
        bodies.push(("mixed".into(), event(&[("broken", "y"), ("bkt1", "f0/z")])));
        let refs: Vec<(&str, Value)> = bodies
            .iter()
            .map(|(i, b)| (i.as_str(), b.clone()))
            .collect();
        let report = agg.handle(&sqs_batch(&refs)).await.unwrap();
        assert_eq!(
            report.window_writes, 1,
            "one open for bkt1, whatever the batch size"
        );
        assert_eq!(report.messages_sent, 1);
        assert_eq!(report.skipped_malformed, 1);
        assert_eq!(report.batch_item_failures, ["bad-1", "mixed"]);
        assert_eq!(
            report.into_response(),
            json!({"batchItemFailures": [{"itemIdentifier": "bad-1"}, {"itemIdentifier": "mixed"}]})
        );
        let item = agg.store().1.item("bkt1").unwrap();
        assert_eq!(
            item.changes.folders,
            ["f0/".to_string(), "f1/".into(), "f2/".into()].into()
        );
    }

    #[tokio::test]
    async fn sns_and_eventbridge_deliveries_open_windows() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        let sns = json!({"Records": [{"EventSource": "aws:sns", "Sns": {"Message": event(&[("viasns", "a/b")]).to_string()}}]});
        let r = agg.handle(&sns).await.unwrap();
        assert_eq!((r.windows_opened, r.ingest), (1, Some(InvocationKind::Sns)));
        let eb = json!({"version": "0", "id": "e", "detail-type": "Object Created", "source": "aws.s3",
            "time": "2026-01-01T00:00:00Z", "region": "us-east-1", "account": "123456789012", "resources": [],
            "detail": {"version": "0", "bucket": {"name": "viaeb"}, "object": {"key": "x/y z"}, "reason": "PutObject"}});
        let r = agg.handle(&eb).await.unwrap();
        assert_eq!(
            (r.windows_opened, r.ingest),
            (1, Some(InvocationKind::EventBridge))
        );
        assert_eq!(
            agg.store().item("viaeb").unwrap().changes.folders,
            ["x/".to_string()].into()
        );
        assert!(r.into_response().get("windowsOpened").is_some());
    }

    #[tokio::test]
    async fn long_windows_send_with_at_most_900_seconds() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            43_200,
        );
        agg.handle(&event(&[("bkt1", "k")])).await.unwrap();
        let sent = agg.queue().sent();
        assert_eq!(sent[0].delay_seconds, 900);
        assert_eq!(sent[0].message.window_ends_at_ms, 43_200_000);
    }

    #[tokio::test]
    async fn skips_and_rejections() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        let r = agg
            .handle(&json!({"Event": "s3:TestEvent", "Bucket": "bkt1"}))
            .await
            .unwrap();
        assert_eq!((r.skipped_test_events, r.messages_sent), (1, 0));
        assert!(matches!(
            agg.handle(&json!({})).await,
            Err(AggregatorError::NotANotification(_))
        ));
        assert!(agg.queue().sent().is_empty());
        assert_eq!(agg.store().writes(), 0);
    }

    fn gateway_event(principal: &str, keys: &[&str]) -> Value {
        let records: Vec<Value> = keys
            .iter()
            .map(|key| {
                json!({"eventName": "ObjectCreated:Put", "userIdentity": {"principalId": principal},
                       "s3": {"bucket": {"name": "bkt1"}, "object": {"key": key}}})
            })
            .collect();
        json!({ "Records": records })
    }

    #[tokio::test]
    async fn gateway_writes_open_a_window_with_their_writer_and_coalesce() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        let principal = "AWS:AROAEXAMPLE:StorageGateway-sgw-12A3456B";
        let r = agg
            .handle(&gateway_event(principal, &["a/1", "a/2"]))
            .await
            .unwrap();
        assert_eq!(
            (r.gateway_writes, r.windows_opened, r.messages_sent),
            (2, 1, 1)
        );
        // Later writes through the same gateway to the same folder cost nothing.
        for i in 0..100 {
            clock.0.fetch_add(10, Ordering::Relaxed);
            let r = agg
                .handle(&gateway_event(principal, &[&format!("a/k{i}")]))
                .await
                .unwrap();
            assert_eq!(r.coalesced_in_container, 1);
        }
        assert_eq!((agg.store().writes(), agg.queue().sent().len()), (1, 1));
        // Another gateway's write of the folder is a new entry; a plain change too.
        agg.handle(&gateway_event("x:StorageGateway-sgw-99999999", &["a/x"]))
            .await
            .unwrap();
        agg.handle(&event(&[("bkt1", "a/y")])).await.unwrap();
        let item = agg.store().item("bkt1").unwrap();
        assert_eq!(item.changes.folders, ["a/".to_string()].into());
        let writers: Vec<String> = item
            .changes
            .gateway_writes
            .iter()
            .map(|c| c.encode())
            .collect();
        assert_eq!(writers, ["sgw-12a3456b:/a/", "sgw-99999999:/a/"]);
        assert_eq!(agg.store().writes(), 3);
    }
}
