//! The refresher: refresh messages in, `RefreshCache` on every share that maps the
//! bucket out, with an SQS partial batch response.

use crate::aggregator::truncate;
use crate::clock::Clock;
use crate::error::{GatewayError, QueueError, Retry, StoreError};
use crate::metrics::{name, InvocationMetrics, MetricsSink, StdoutSink};
use crate::ports::{FileGateway, Requeue, WindowStore};
use crate::refresh_message::{decode_sqs_record, IncomingRefresh};
use crate::shares::{parse_location_arn, plan_refreshes, FileShare, ShareKind};
use crate::window::{CloseOutcome, RefreshLog, RefreshScope, StartedRefresh};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

/// `Describe{NFS,SMB}FileShares` takes at most 10 ARNs.
pub const DESCRIBE_BATCH: usize = 10;
/// How long a warm container trusts its bucket-to-shares map. A share that is gone
/// drops the map at once; a new share is found within this time.
pub const SHARE_CACHE_TTL_MS: i64 = 5 * 60 * 1000;
/// A guard against a gateway that pages forever.
const MAX_LIST_PAGES: usize = 10_000;

#[derive(Debug, Error)]
pub enum RefresherError {
    #[error("not an SQS event: {0}")]
    NotAnSqsEvent(String),
}

/// Why one message must be retried.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("file shares kept disappearing while refreshing bucket {0}")]
    SharesUnstable(String),
    #[error("sending the message back for the rest of its window: {0}")]
    Requeue(#[from] QueueError),
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Refreshes started on these shares (empty: no share maps the bucket).
    Refreshed { shares: Vec<String> },
    /// This window was already refreshed: a duplicate delivery.
    Duplicate,
    /// The window ends later: the message went back with this delay.
    Requeued { delay_seconds: u32 },
    /// A newer window carries this one's changes; its message refreshes them.
    CarriedForward,
    /// The message's window was never opened (its opener failed after sending).
    NeverOpened,
}

/// SQS caps `DelaySeconds` at 900.
pub const MAX_SQS_DELAY_SECONDS: u32 = 900;

/// The longest a Lambda invocation lasts: an aggregator that sent a window's message
/// opens the window within this time or never.
pub const MAX_OPEN_LAG_MS: i64 = 15 * 60 * 1000;

/// The delay that brings a message back at `ends_at_ms`, in whole seconds rounded
/// up (so it never comes back early), at most SQS's 900.
pub fn remaining_delay_seconds(now_ms: i64, ends_at_ms: i64) -> u32 {
    let remaining_ms = ends_at_ms.saturating_sub(now_ms).max(0);
    let seconds = remaining_ms.saturating_add(999) / 1000;
    u32::try_from(seconds).map_or(MAX_SQS_DELAY_SECONDS, |s| s.min(MAX_SQS_DELAY_SECONDS))
}

#[derive(Debug)]
struct ShareCache {
    shares: Vec<FileShare>,
    loaded_at_ms: i64,
}

pub struct Refresher<S, G, Q, C> {
    store: S,
    gateway: G,
    requeue: Q,
    clock: C,
    cache: Mutex<Option<ShareCache>>,
    metrics: Arc<dyn MetricsSink>,
}

impl<S: WindowStore, G: FileGateway, Q: Requeue, C: Clock> Refresher<S, G, Q, C> {
    pub fn new(store: S, gateway: G, requeue: Q, clock: C) -> Self {
        Refresher {
            store,
            gateway,
            requeue,
            clock,
            cache: Mutex::new(None),
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

    pub fn gateway(&self) -> &G {
        &self.gateway
    }

    pub fn requeue(&self) -> &Q {
        &self.requeue
    }

    /// Handles one SQS event. Messages are processed one after another, so this
    /// container never has more than one refresh in flight per share.
    pub async fn handle(&self, payload: &Value) -> Result<SqsBatchResponse, RefresherError> {
        let records = payload
            .get("Records")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                RefresherError::NotAnSqsEvent(truncate(&payload.to_string(), 2048).to_string())
            })?;
        let mut response = SqsBatchResponse::default();
        let mut metrics = InvocationMetrics::default();
        for record in records {
            let request = match decode_sqs_record(record) {
                Ok(request) => request,
                Err(bad) => {
                    // Retrying cannot make this message readable.
                    error!(error = %bad, "Discarding unreadable refresh message");
                    metrics.count(None, name::MESSAGES_UNREADABLE, 1);
                    continue;
                }
            };
            if let Some(body) = &request.unreadable_body {
                warn!(bucket = %request.bucket, message_id = %request.message_id, body = %truncate(body, 1024),
                    "Message body is not ours; refreshing the whole bucket");
            }
            match self.process(&request, &mut metrics).await {
                Ok(RecordOutcome::Duplicate) => {
                    info!(bucket = %request.bucket, generation = ?request.generation, "Window already refreshed; duplicate message");
                }
                Ok(RecordOutcome::Requeued { delay_seconds }) => {
                    info!(bucket = %request.bucket, generation = ?request.generation, delay_seconds,
                        "Window ends later; message sent back for the rest of it");
                    metrics.count(Some(&request.bucket), name::MESSAGES_REQUEUED, 1);
                }
                Ok(RecordOutcome::CarriedForward) => {
                    info!(bucket = %request.bucket, generation = ?request.generation,
                        "A newer window carries this window's changes; its message refreshes them");
                }
                Ok(RecordOutcome::NeverOpened) => {
                    info!(bucket = %request.bucket, generation = ?request.generation,
                        "Window was never opened (its opener failed after sending); nothing to refresh");
                }
                Ok(RecordOutcome::Refreshed { shares }) if shares.is_empty() => {}
                Ok(RecordOutcome::Refreshed { .. }) => {}
                Err(e) => {
                    warn!(bucket = %request.bucket, message_id = %request.message_id, error = %e,
                        "Refresh failed; the message will be redelivered");
                    metrics.count(Some(&request.bucket), name::MESSAGES_FAILED, 1);
                    let mut failure = BatchItemFailure::default();
                    failure.item_identifier = request.message_id.clone();
                    response.batch_item_failures.push(failure);
                }
            }
        }
        metrics.emit(self.metrics.as_ref(), "refresher", self.clock.now_ms());
        Ok(response)
    }

    /// Closes the window and starts a refresh on every share that the window's
    /// changes concern.
    pub async fn process(
        &self,
        request: &IncomingRefresh,
        metrics: &mut InvocationMetrics,
    ) -> Result<RecordOutcome, RecordError> {
        let bucket = request.bucket.as_str();
        let scope = match request.generation {
            Some(generation) => match self
                .store
                .close(bucket, generation, self.clock.now_ms())
                .await?
            {
                CloseOutcome::Refresh(scope) => scope,
                CloseOutcome::AlreadyRefreshed => return Ok(RecordOutcome::Duplicate),
                CloseOutcome::TooEarly { ends_at_ms } => {
                    return self.send_back(request, ends_at_ms).await;
                }
                CloseOutcome::CarriedForward { .. } => return Ok(RecordOutcome::CarriedForward),
                CloseOutcome::NeverOpened { .. } => {
                    return Ok(self
                        .wait_for_open(request)
                        .await?
                        .unwrap_or(RecordOutcome::NeverOpened));
                }
                CloseOutcome::ItemMissing => match self.wait_for_open(request).await? {
                    // Most likely the bucket's first window, not written yet.
                    Some(requeued) => return Ok(requeued),
                    // Still no item long after: it was deleted; what changed is unknown.
                    None => RefreshScope::WholeBucket,
                },
            },
            None => RefreshScope::WholeBucket,
        };

        let mut log = RefreshLog {
            generation: request.generation,
            started_at_ms: self.clock.now_ms(),
            refreshes: Vec::new(),
        };
        let mut resolved_fresh = false;
        loop {
            let shares = self.shares(resolved_fresh).await?;
            let plans: Vec<_> = plan_refreshes(&shares, bucket, &scope)
                .into_iter()
                .filter(|p| {
                    !log.refreshes.iter().any(|r| {
                        r.share_arn == p.share_arn
                            && r.folders == p.folders
                            && r.recursive == p.recursive
                    })
                })
                .collect();
            if plans.is_empty() && log.refreshes.is_empty() {
                warn!(
                    bucket,
                    ?scope,
                    "No file share maps bucket {bucket}; nothing to refresh"
                );
            }
            let mut share_gone = false;
            for plan in &plans {
                match self.gateway.refresh_cache(plan).await {
                    Ok(notification_id) => {
                        let now = self.clock.now_ms();
                        let age = request.timestamp_ms.map(|t| now.saturating_sub(t));
                        info!(bucket, share = %plan.share_arn, folders = ?plan.folders, recursive = plan.recursive,
                            notification_id = %notification_id, event_age_ms = ?age,
                            "Refreshing cache of share {} for bucket: {bucket}", plan.share_arn);
                        metrics.count(Some(bucket), name::REFRESHES_REQUESTED, 1);
                        if let Some(age) = age {
                            metrics.max_ms(Some(bucket), name::OLDEST_EVENT_AGE, age);
                        }
                        log.refreshes.push(StartedRefresh {
                            share_arn: plan.share_arn.clone(),
                            notification_id,
                            folders: plan.folders.clone(),
                            recursive: plan.recursive,
                        });
                    }
                    Err(GatewayError::ShareNotFound { share_arn, message }) => {
                        warn!(bucket, share = %share_arn, %message, "File share is gone; resolving shares again");
                        metrics.count(Some(bucket), name::SHARES_NOT_FOUND, 1);
                        *self.cache.lock().await = None;
                        share_gone = true;
                        break;
                    }
                    Err(e) => {
                        if matches!(e, GatewayError::Busy { .. }) {
                            metrics.count(Some(bucket), name::REFRESHES_THROTTLED, 1);
                        }
                        return Err(e.into());
                    }
                }
            }
            if !share_gone {
                break;
            }
            if resolved_fresh {
                return Err(RecordError::SharesUnstable(bucket.to_string()));
            }
            resolved_fresh = true;
        }

        // The log is for operators, and the mark only a shortcut for duplicates:
        // neither is worth a redelivery.
        if let Err(e) = self.store.record_refresh(bucket, &log).await {
            warn!(bucket, generation = ?request.generation, error = %e, "Could not record the refresh");
        }
        Ok(RecordOutcome::Refreshed {
            shares: log.refreshes.into_iter().map(|r| r.share_arn).collect(),
        })
    }

    /// Sends the message back to its queue to come back when its window ends: the
    /// window is longer than SQS's 900-second delay, or this clock runs ahead.
    async fn send_back(
        &self,
        request: &IncomingRefresh,
        ends_at_ms: i64,
    ) -> Result<RecordOutcome, RecordError> {
        let Some(body) = request.body.as_ref() else {
            // A generation always comes with our body; without it, refresh nothing yet.
            return Err(RecordError::Requeue(QueueError {
                retry: Retry::Later,
                message: "no body to send back".to_string(),
            }));
        };
        let delay_seconds = remaining_delay_seconds(self.clock.now_ms(), ends_at_ms);
        self.requeue
            .requeue(request.source_arn.as_deref(), body, delay_seconds)
            .await?;
        Ok(RecordOutcome::Requeued { delay_seconds })
    }

    /// The message names a window that is not in the table yet. Its opener sends the
    /// message before the write that opens the window, so a prompt message can overtake
    /// that write: look again shortly. An opener is gone for good after the longest
    /// Lambda invocation; then the message is an orphan of a failed invocation (whose
    /// retry sent a message of its own) and is dropped.
    /// `None` once the opener cannot still be running.
    async fn wait_for_open(
        &self,
        request: &IncomingRefresh,
    ) -> Result<Option<RecordOutcome>, RecordError> {
        let now = self.clock.now_ms();
        let Some(body) = request.body.as_ref() else {
            return Ok(None);
        };
        let waited_ms = now.saturating_sub(body.window_opened_at_ms);
        if waited_ms >= MAX_OPEN_LAG_MS {
            return Ok(None);
        }
        // Look again after about as long as the window has waited so far: one look
        // for a prompt opener, a handful for an orphan.
        let delay_seconds = u32::try_from((waited_ms / 1000).clamp(1, 60)).unwrap_or(60);
        self.requeue
            .requeue(request.source_arn.as_deref(), body, delay_seconds)
            .await?;
        Ok(Some(RecordOutcome::Requeued { delay_seconds }))
    }

    /// Every NFS and SMB share in the account, from the cache when it is fresh.
    async fn shares(&self, force: bool) -> Result<Vec<FileShare>, GatewayError> {
        let now = self.clock.now_ms();
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if !force && now.saturating_sub(c.loaded_at_ms) < SHARE_CACHE_TTL_MS {
                return Ok(c.shares.clone());
            }
        }
        let shares = self.resolve_shares().await?;
        info!(shares = shares.len(), "Resolved file shares");
        *cache = Some(ShareCache {
            shares: shares.clone(),
            loaded_at_ms: now,
        });
        Ok(shares)
    }

    async fn resolve_shares(&self) -> Result<Vec<FileShare>, GatewayError> {
        let mut summaries = Vec::new();
        let mut marker: Option<String> = None;
        let mut seen_markers = BTreeSet::new();
        for _ in 0..MAX_LIST_PAGES {
            let page = self.gateway.list_file_shares(marker.as_deref()).await?;
            summaries.extend(page.shares);
            match page.next_marker {
                Some(next) if seen_markers.insert(next.clone()) => marker = Some(next),
                Some(repeated) => {
                    return Err(GatewayError::Other {
                        retry: Retry::Later,
                        message: format!("ListFileShares returned marker {repeated:?} twice"),
                    })
                }
                None => break,
            }
        }
        let mut shares = Vec::with_capacity(summaries.len());
        for kind in [ShareKind::Nfs, ShareKind::Smb] {
            let arns: Vec<String> = summaries
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| s.arn.clone())
                .collect();
            for chunk in arns.chunks(DESCRIBE_BATCH) {
                for described in self.gateway.describe_file_shares(kind, chunk).await? {
                    match parse_location_arn(&described.location_arn) {
                        Ok(location) => shares.push(FileShare {
                            arn: described.arn,
                            kind,
                            gateway_arn: described.gateway_arn,
                            location,
                        }),
                        Err(e) => {
                            warn!(share = %described.arn, error = %e, "Skipping share whose location names no bucket")
                        }
                    }
                }
            }
        }
        Ok(shares)
    }
}

#[cfg(feature = "aws")]
impl From<RefresherError> for lambda_runtime::Diagnostic {
    fn from(error: RefresherError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: "Refresher.NotAnSqsEvent".to_string(),
            error_message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryGateway, MemoryQueue, MemoryWindowStore};
    use crate::clock::SystemClock;
    use crate::window::{ChangeSet, OpenExpectation};
    use serde_json::json;

    fn message(id: &str, bucket: &str, generation: Option<u64>) -> Value {
        let body = match generation {
            Some(g) => {
                json!({"version": 1, "bucket": bucket, "generation": g, "windowOpenedAtMs": 0,
                              "windowEndsAtMs": 0, "timestampMs": 0})
                .to_string()
            }
            None => "{}".to_string(),
        };
        json!({"messageId": id, "body": body,
               "messageAttributes": {"bucket-name": {"stringValue": bucket, "dataType": "String"}}})
    }

    type TestRefresher = Refresher<MemoryWindowStore, MemoryGateway, MemoryQueue, SystemClock>;

    fn refresher() -> TestRefresher {
        let gateway = MemoryGateway::new(100);
        Refresher::new(
            MemoryWindowStore::default(),
            gateway,
            MemoryQueue::default(),
            SystemClock,
        )
    }

    #[tokio::test]
    async fn pages_and_describes_in_tens() {
        let r = Refresher::new(
            MemoryWindowStore::default(),
            MemoryGateway::new(50),
            MemoryQueue::default(),
            SystemClock,
        );
        for i in 0..130 {
            let kind = if i % 2 == 0 {
                ShareKind::Nfs
            } else {
                ShareKind::Smb
            };
            let bucket = if i == 129 { "target" } else { "other" };
            r.gateway().add_share(
                &format!("share-{i}"),
                kind,
                &format!("arn:aws:s3:::{bucket}"),
            );
        }
        let out = r
            .handle(&json!({"Records": [message("m1", "target", None)]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(r.gateway().list_calls(), 3);
        assert_eq!(r.gateway().describe_calls(), 7 + 7);
        let refreshed: Vec<_> = r
            .gateway()
            .refreshes()
            .into_iter()
            .map(|p| p.share_arn)
            .collect();
        assert_eq!(refreshed, ["share-129"]);
        // Warm: the map is cached.
        r.handle(&json!({"Records": [message("m2", "target", None)]}))
            .await
            .unwrap();
        assert_eq!(r.gateway().list_calls(), 3);
    }

    #[tokio::test]
    async fn vanished_share_is_re_resolved() {
        let r = refresher();
        r.gateway()
            .add_share("old", ShareKind::Nfs, "arn:aws:s3:::b1");
        r.handle(&json!({"Records": [message("m1", "b1", None)]}))
            .await
            .unwrap();
        r.gateway().remove_share("old");
        r.gateway()
            .add_share("new", ShareKind::Nfs, "arn:aws:s3:::b1");
        let out = r
            .handle(&json!({"Records": [message("m2", "b1", None)]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        let refreshed: Vec<_> = r
            .gateway()
            .refreshes()
            .into_iter()
            .map(|p| p.share_arn)
            .collect();
        assert_eq!(refreshed, ["old", "new"]);
        assert_eq!(r.gateway().list_calls(), 2);
    }

    #[tokio::test]
    async fn closes_the_window_and_skips_duplicates() {
        let r = refresher();
        r.gateway()
            .add_share("s", ShareKind::Smb, "arn:aws:s3:::b1/data/");
        let mut changes = ChangeSet::default();
        changes.add_folder("data/a/");
        r.store()
            .open("b1", OpenExpectation::from_item(None), &changes, 0, 30_000)
            .await
            .unwrap();
        let first = r
            .handle(&json!({"Records": [message("m1", "b1", Some(1))]}))
            .await
            .unwrap();
        assert!(first.batch_item_failures.is_empty());
        let item = r.store().item("b1").unwrap();
        assert_eq!((item.closed_generation, item.refreshed_generation), (1, 1));
        r.handle(&json!({"Records": [message("m1", "b1", Some(1))]}))
            .await
            .unwrap();
        assert_eq!(
            r.gateway().refreshes().len(),
            1,
            "duplicate delivery must not refresh again"
        );
    }

    #[tokio::test]
    async fn prefix_share_only_for_its_folders() {
        let r = refresher();
        r.gateway()
            .add_share("root", ShareKind::Nfs, "arn:aws:s3:::b1");
        r.gateway()
            .add_share("data", ShareKind::Nfs, "arn:aws:s3:::b1/data/");
        let mut changes = ChangeSet::default();
        changes.add_folder("logs/");
        r.store()
            .open("b1", OpenExpectation::from_item(None), &changes, 0, 30_000)
            .await
            .unwrap();
        r.handle(&json!({"Records": [message("m1", "b1", Some(1))]}))
            .await
            .unwrap();
        let refreshed: Vec<_> = r
            .gateway()
            .refreshes()
            .into_iter()
            .map(|p| p.share_arn)
            .collect();
        assert_eq!(refreshed, ["root"]);
    }

    #[tokio::test]
    async fn unreadable_messages_are_not_retried_and_others_go_on() {
        let r = refresher();
        r.gateway()
            .add_share("s", ShareKind::Nfs, "arn:aws:s3:::b1");
        let out = r
            .handle(&json!({"Records": [{"messageId": "bad", "body": "garbage"}, message("m2", "b1", None)]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(r.gateway().refreshes().len(), 1);
        assert!(r.handle(&json!({"nope": 1})).await.is_err());
    }

    #[tokio::test]
    async fn no_share_is_not_an_error() {
        let r = refresher();
        let out = r
            .handle(&json!({"Records": [message("m1", "lonely", None)]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert!(r.gateway().refreshes().is_empty());
    }

    #[tokio::test]
    async fn a_window_that_ends_later_is_sent_back_with_the_rest_of_its_time() {
        let r = refresher();
        r.gateway()
            .add_share("s", ShareKind::Nfs, "arn:aws:s3:::b1");
        let mut changes = ChangeSet::default();
        changes.add_folder("a/");
        let now = SystemClock.now_ms();
        let window_ms = 3 * 3600 * 1000;
        r.store()
            .open(
                "b1",
                OpenExpectation::from_item(None),
                &changes,
                now,
                window_ms,
            )
            .await
            .unwrap();
        let out = r
            .handle(&json!({"Records": [message("m1", "b1", Some(1))]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert!(r.gateway().refreshes().is_empty());
        let sent = r.requeue().sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].delay_seconds, sent[0].message.generation),
            (900, 1)
        );
        let item = r.store().item("b1").unwrap();
        assert_eq!(item.closed_generation, 0, "not closed before its end");
        assert_eq!(remaining_delay_seconds(0, 1), 1);
        assert_eq!(remaining_delay_seconds(0, 120_000), 120);
        assert_eq!(remaining_delay_seconds(5, 0), 0);
    }

    #[tokio::test]
    async fn targeted_refresh_lists_changed_folders_and_ancestors() {
        let r = refresher();
        r.gateway()
            .add_share("s", ShareKind::Nfs, "arn:aws:s3:::b1");
        let mut changes = ChangeSet::default();
        changes.add_folder("a/b/");
        r.store()
            .open("b1", OpenExpectation::from_item(None), &changes, 0, 1)
            .await
            .unwrap();
        r.handle(&json!({"Records": [message("m1", "b1", Some(1))]}))
            .await
            .unwrap();
        let plans = r.gateway().refreshes();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].folders, ["/", "/a", "/a/b"]);
        assert!(!plans[0].recursive);
    }
}
