//! The aggregator: S3 object events in, at most one refresh message per bucket window out.

use crate::clock::Clock;
use crate::error::{QueueError, StoreError};
use crate::metrics::{name, InvocationMetrics, MetricsSink, StdoutSink};
use crate::ports::{RefreshQueue, WindowStore};
use crate::refresh_message::{RefreshMessage, BODY_VERSION};
use crate::s3_event::{decode_notification, NotANotification, SkipReason};
use crate::window::{ChangeSet, WindowView};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
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
    pub skipped_gateway_writes: usize,
    pub skipped_test_events: usize,
    pub skipped_malformed: usize,
    pub undecodable_keys: usize,
    pub windows_opened: usize,
    pub windows_joined: usize,
    pub messages_sent: usize,
}

/// What happened to one bucket's share of the invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BucketOutcome {
    Opened,
    Joined,
    /// Joined a window whose message was not known to be sent (its opener crashed or
    /// failed between its two calls), so this invocation sent it.
    JoinedAndSent,
}

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
    metrics: Arc<dyn MetricsSink>,
}

impl<S: WindowStore, Q: RefreshQueue, C: Clock> Aggregator<S, Q, C> {
    pub fn new(store: S, queue: Q, clock: C, delay_seconds: u32) -> Self {
        Aggregator {
            store,
            queue,
            clock,
            delay_seconds,
            metrics: Arc::new(StdoutSink),
        }
    }

    /// Sends the EMF metric lines somewhere else than stdout.
    pub fn with_metrics_sink(mut self, sink: Arc<dyn MetricsSink>) -> Self {
        self.metrics = sink;
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
        let decoded = decode_notification(payload).inspect_err(|e| {
            error!(error = %e, payload = %truncate(&payload.to_string(), 2048), "Rejecting event");
        })?;
        let mut report = AggregatorReport {
            records: decoded.changes.len() + decoded.skipped.len(),
            changes: decoded.changes.len(),
            undecodable_keys: decoded.undecodable_keys.len(),
            ..Default::default()
        };
        let mut metrics = InvocationMetrics::default();
        for skipped in &decoded.skipped {
            match &skipped.reason {
                SkipReason::GatewayWrite { .. } => {
                    report.skipped_gateway_writes += 1;
                    metrics.count(skipped.bucket.as_deref(), name::EVENTS_RECEIVED, 1);
                    metrics.count(skipped.bucket.as_deref(), name::EVENTS_SKIPPED_GATEWAY, 1);
                    info!(
                        bucket = skipped.bucket.as_deref().unwrap_or(""),
                        record = skipped.index,
                        "Skipping {}",
                        skipped.reason
                    );
                }
                SkipReason::TestEvent => {
                    report.skipped_test_events += 1;
                    info!(
                        bucket = skipped.bucket.as_deref().unwrap_or(""),
                        "Skipping {}", skipped.reason
                    );
                }
                SkipReason::Malformed { .. } => {
                    report.skipped_malformed += 1;
                    metrics.count(skipped.bucket.as_deref(), name::EVENTS_RECEIVED, 1);
                    metrics.count(skipped.bucket.as_deref(), name::EVENTS_SKIPPED_MALFORMED, 1);
                    warn!(record = skipped.index, "Skipping {}", skipped.reason);
                }
            }
        }
        for bad in &decoded.undecodable_keys {
            warn!(record = bad.index, raw_key = %bad.raw_key, error = %bad.error,
                "Key cannot be decoded; its bucket's shares will be refreshed in full");
        }

        let mut buckets: BTreeMap<&str, BucketBatch> = BTreeMap::new();
        for change in &decoded.changes {
            let batch = buckets.entry(change.bucket.as_str()).or_default();
            batch.events += 1;
            metrics.count(Some(&change.bucket), name::EVENTS_RECEIVED, 1);
            if let Some(key) = change
                .key
                .as_ref()
                .filter(|_| batch.keys.len() < LOGGED_KEYS)
            {
                batch.keys.push(key.clone());
            }
            match change.folder() {
                Some(folder) => batch.changes.add_folder(folder),
                None => batch.changes.whole_bucket = true,
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
                Ok(BucketOutcome::Opened) => {
                    report.windows_opened += 1;
                    report.messages_sent += 1;
                    metrics.count(b, name::WINDOWS_OPENED, 1);
                    metrics.count(b, name::MESSAGES_SENT, 1);
                }
                Ok(BucketOutcome::Joined) => {
                    report.windows_joined += 1;
                    metrics.count(b, name::EVENTS_COALESCED, batch.events);
                }
                Ok(BucketOutcome::JoinedAndSent) => {
                    report.windows_joined += 1;
                    report.messages_sent += 1;
                    metrics.count(b, name::EVENTS_COALESCED, batch.events);
                    metrics.count(b, name::MESSAGES_SENT, 1);
                }
                Err(e) => {
                    error!(bucket, error = %e, "Failed to record events; the invocation will be retried");
                    first_error.get_or_insert(e);
                }
            }
        }
        metrics.emit(self.metrics.as_ref(), "aggregator", self.clock.now_ms());
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    async fn process_bucket(
        &self,
        bucket: &str,
        batch: &BucketBatch,
    ) -> Result<BucketOutcome, AggregatorError> {
        let store_err = |source| AggregatorError::Store {
            bucket: bucket.to_string(),
            source,
        };
        let window_ms = i64::from(self.delay_seconds) * 1000;
        for _ in 0..MAX_WRITE_ROUNDS {
            // Decisions use the time we process the event, not its eventTime: a late
            // event joins only a window whose refresh has not started, whenever it
            // happened.
            let now = self.clock.now_ms();
            let timestamp = batch.first_event_ms.unwrap_or(now);
            if let Some(view) = self
                .store
                .join(bucket, &batch.changes, now)
                .await
                .map_err(store_err)?
            {
                if view.message_sent {
                    info!(bucket, keys = ?batch.keys, events = batch.events, event_time = timestamp,
                        generation = view.generation, window_ends_at = view.ends_at_ms, outcome = "joined",
                        "Refresh for bucket: {bucket} within refresh window, skipping. S3 Event timestamp: {timestamp}");
                    return Ok(BucketOutcome::Joined);
                }
                warn!(
                    bucket,
                    generation = view.generation,
                    "Window is open but its refresh message is not known to be sent; sending it"
                );
                self.send(bucket, batch, &view, timestamp).await?;
                return Ok(BucketOutcome::JoinedAndSent);
            }
            if let Some(view) = self
                .store
                .open(bucket, &batch.changes, now, window_ms)
                .await
                .map_err(store_err)?
            {
                self.send(bucket, batch, &view, timestamp).await?;
                return Ok(BucketOutcome::Opened);
            }
            // Another invocation opened a window between our two writes: join it.
        }
        Err(AggregatorError::Contention {
            bucket: bucket.to_string(),
        })
    }

    async fn send(
        &self,
        bucket: &str,
        batch: &BucketBatch,
        view: &WindowView,
        timestamp_ms: i64,
    ) -> Result<(), AggregatorError> {
        let message = RefreshMessage {
            version: BODY_VERSION,
            bucket: bucket.to_string(),
            generation: view.generation,
            window_opened_at_ms: view.opened_at_ms,
            window_ends_at_ms: view.ends_at_ms,
            timestamp_ms,
        };
        let message_id = self
            .queue
            .send(&message, self.delay_seconds)
            .await
            .map_err(|source| AggregatorError::Queue {
                bucket: bucket.to_string(),
                source,
            })?;
        info!(bucket, keys = ?batch.keys, events = batch.events, event_time = timestamp_ms,
            generation = view.generation, window_ends_at = view.ends_at_ms, outcome = "sent",
            message_id = %message_id, delay_seconds = self.delay_seconds,
            "Sending refresh request for bucket: {bucket}, timestamp: {timestamp_ms}");
        // The message is on the queue either way; a failed mark only means a later
        // event of this window sends a duplicate, which the refresher tolerates.
        if let Err(e) = self.store.mark_sent(bucket, view.generation).await {
            warn!(bucket, generation = view.generation, error = %e, "Could not record the sent message");
        }
        Ok(())
    }
}

pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
        assert_eq!(item.folders, ["a/".to_string(), "c/".to_string()].into());
        // After the window's end a new one opens.
        clock.0.fetch_add(30_000, Ordering::Relaxed);
        let r3 = agg.handle(&event(&[("bkt1", "d")])).await.unwrap();
        assert_eq!(r3.windows_opened, 1);
        assert_eq!(agg.queue().sent().last().unwrap().message.generation, 2);
    }

    #[tokio::test]
    async fn unsent_window_gets_its_message_from_the_next_event() {
        let clock = TestClock(AtomicI64::new(0));
        let agg = Aggregator::new(
            MemoryWindowStore::default(),
            MemoryQueue::default(),
            &clock,
            30,
        );
        // An opener that crashed after its write: the window exists, no message.
        crate::ports::WindowStore::open(agg.store(), "bkt1", &ChangeSet::default(), 0, 30_000)
            .await
            .unwrap();
        let r = agg.handle(&event(&[("bkt1", "k")])).await.unwrap();
        assert_eq!((r.windows_joined, r.messages_sent), (1, 1));
        assert_eq!(agg.queue().sent().len(), 1);
        let r = agg.handle(&event(&[("bkt1", "k")])).await.unwrap();
        assert_eq!(r.messages_sent, 0);
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
        let gw = json!({"Records": [{"userIdentity": {"principalId": "x:StorageGateway-sgw-1"},
            "s3": {"bucket": {"name": "bkt1"}, "object": {"key": "k"}}}]});
        let r = agg.handle(&gw).await.unwrap();
        assert_eq!((r.skipped_gateway_writes, r.messages_sent), (1, 0));
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

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
