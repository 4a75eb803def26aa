//! The refresher: refresh messages in, `RefreshCache` on every share that maps the
//! bucket out, with an SQS partial batch response.

use crate::access_points::{parse_location, share_account_region, AccessPointArn, LocationRef};
use crate::clock::Clock;
use crate::error::{AccessPointError, GatewayError, QueueError, Retry, StoreError};
use crate::logging::truncate;
use crate::metrics::{name, InvocationMetrics, MetricsSink, StdoutSink};
use crate::ports::{
    AccessPoint, AccessPoints, DescribedShare, FileGateway, NoAccessPoints, Requeue, ShareStore,
    WindowStore,
};
use crate::refresh_message::{decode_action_record, ActionMessage, IncomingRefresh};
use crate::scheduler::Pace;
use crate::shares::{plan_share_listings, FileShare, ShareKind, ShareLocation};
use crate::window::{ChangeSet, CloseOutcome, RefreshLog};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

pub use crate::ports::DESCRIBE_BATCH;
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
    /// S3 Control failed for now while resolving the shares on access points.
    #[error("resolving access point shares: {0}")]
    AccessPoints(#[from] AccessPointError),
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

pub use crate::refresh_message::MAX_SQS_DELAY_SECONDS;

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
    /// Every share that `ListFileShares` named when the map was resolved, including
    /// those left out of `shares` (an access point that could not be resolved).
    listed: BTreeSet<String>,
    loaded_at_ms: i64,
}

/// `A` resolves shares on S3 access points ([`Refresher::with_access_points`]); the
/// default, [`NoAccessPoints`], leaves them all unresolved.
pub struct Refresher<S, G, Q, C, A = NoAccessPoints> {
    pub(crate) store: S,
    pub(crate) gateway: G,
    pub(crate) requeue: Q,
    pub(crate) clock: C,
    access_points: A,
    cache: Mutex<Option<ShareCache>>,
    metrics: Arc<dyn MetricsSink>,
    /// Access points that the resolves since the last invocation's metrics could not
    /// map; counted into `AccessPointsUnresolved` when the invocation ends.
    unresolved_access_points: AtomicU64,
    /// The gateway's pace: `MIN_REFRESH_INTERVAL_SECONDS` and the clock margin.
    pub(crate) pace: Pace,
    /// Names this container's claims (unique across containers).
    claim_prefix: String,
    claims: AtomicU64,
    /// A fault switch for the simulation: in-flight refreshes are trusted to cover
    /// later changes of the folders they list.
    pub(crate) trusts_in_flight: bool,
    /// The simulation's other fault switches (all off in production).
    pub(crate) faults: FaultSwitches,
    /// The current invocation's deadline (epoch ms; 0: none known). Invocations of
    /// one container run one at a time.
    deadline_ms: AtomicI64,
}

/// Faults that the simulation must catch, rebuilt in the product behind switches that
/// only the simulation sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultSwitches {
    /// A failed `RefreshCache` fails the whole message (the shares after it wait for
    /// the redelivery), as before the bound.
    pub failing_share_fails_the_message: bool,
    /// A lease that ends frees its slot and forgets its folders.
    pub lease_drops_its_folders: bool,
    /// The completion event's share is `resources[0]`, whatever it is.
    pub share_is_the_first_resource: bool,
}

pub use crate::config::DEFAULT_MIN_REFRESH_INTERVAL_SECONDS;
/// The most two refresher clocks may differ by; added to the interval between calls.
pub const DEFAULT_CLOCK_MARGIN_MS: i64 = 1_000;

/// A prefix that no other container picks: a random value from the standard library's
/// hasher seeds (no extra dependency), and the process id.
fn random_claim_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

impl<S: WindowStore, G: FileGateway, Q: Requeue, C: Clock> Refresher<S, G, Q, C> {
    pub fn new(store: S, gateway: G, requeue: Q, clock: C) -> Self {
        Refresher {
            store,
            gateway,
            requeue,
            clock,
            access_points: NoAccessPoints,
            cache: Mutex::new(None),
            metrics: Arc::new(StdoutSink),
            unresolved_access_points: AtomicU64::new(0),
            pace: Pace::from_seconds(
                DEFAULT_MIN_REFRESH_INTERVAL_SECONDS,
                DEFAULT_CLOCK_MARGIN_MS,
            ),
            claim_prefix: random_claim_prefix(),
            claims: AtomicU64::new(0),
            trusts_in_flight: false,
            faults: FaultSwitches::default(),
            deadline_ms: AtomicI64::new(0),
        }
    }
}

impl<S, G, Q, C, A> Refresher<S, G, Q, C, A> {
    /// Resolves shares on access points (ARN or alias) through `access_points` (S3
    /// Control). The share map is resolved anew.
    pub fn with_access_points<B: AccessPoints>(self, access_points: B) -> Refresher<S, G, Q, C, B> {
        Refresher {
            store: self.store,
            gateway: self.gateway,
            requeue: self.requeue,
            clock: self.clock,
            access_points,
            cache: Mutex::new(None),
            metrics: self.metrics,
            unresolved_access_points: AtomicU64::new(0),
            pace: self.pace,
            claim_prefix: self.claim_prefix,
            claims: self.claims,
            trusts_in_flight: self.trusts_in_flight,
            faults: self.faults,
            deadline_ms: self.deadline_ms,
        }
    }

    pub fn access_points(&self) -> &A {
        &self.access_points
    }

    /// The least time between two calls on one share (`MIN_REFRESH_INTERVAL_SECONDS`)
    /// and the most two refresher clocks may differ by.
    pub fn with_pace(mut self, min_interval_seconds: u32, clock_margin_ms: i64) -> Self {
        self.pace = Pace::from_seconds(min_interval_seconds, clock_margin_ms);
        self
    }

    /// Names this refresher's claims `PREFIX-1`, `PREFIX-2`, ... (the simulation gives
    /// each container a fixed prefix, so that its runs repeat).
    pub fn with_claim_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.claim_prefix = prefix.into();
        self
    }

    /// The simulation's fault switch: trust an in-flight refresh to cover later changes
    /// of the folders it lists. Never set in production.
    pub fn trusting_in_flight_refreshes(mut self) -> Self {
        self.trusts_in_flight = true;
        self
    }

    /// The simulation's fault switches. Never set in production.
    pub fn with_fault_switches(mut self, faults: FaultSwitches) -> Self {
        self.faults = faults;
        self
    }

    /// Drops the share map: a share is gone, so the next message resolves again.
    pub(crate) async fn forget_share_map(&self) {
        *self.cache.lock().await = None;
    }

    /// The current invocation's deadline, if known.
    pub(crate) fn deadline(&self) -> Option<i64> {
        Some(self.deadline_ms.load(Ordering::Relaxed)).filter(|d| *d > 0)
    }

    pub(crate) fn next_claim_id(&self) -> String {
        let n = self.claims.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}-{n}", self.claim_prefix)
    }
}

impl<S: WindowStore + ShareStore, G: FileGateway, Q: Requeue, C: Clock, A: AccessPoints>
    Refresher<S, G, Q, C, A>
{
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

    /// Handles one SQS event as [`Refresher::handle`], in an invocation that ends at
    /// `deadline_ms` (Lambda's deadline, epoch ms): no call is started that could not
    /// be recorded before it.
    pub async fn handle_until(
        &self,
        payload: &Value,
        deadline_ms: i64,
    ) -> Result<SqsBatchResponse, RefresherError> {
        self.deadline_ms.store(deadline_ms, Ordering::Relaxed);
        // Boxed: the whole invocation's future is deep, and a caller's own future
        // nests it once more.
        let response = Box::pin(self.handle_records(payload)).await;
        self.deadline_ms.store(0, Ordering::Relaxed);
        response
    }

    /// Handles one SQS event. Messages are processed one after another, so this
    /// container never has more than one refresh in flight per share.
    pub async fn handle(&self, payload: &Value) -> Result<SqsBatchResponse, RefresherError> {
        Box::pin(self.handle_records(payload)).await
    }

    async fn handle_records(&self, payload: &Value) -> Result<SqsBatchResponse, RefresherError> {
        let records = payload
            .get("Records")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                RefresherError::NotAnSqsEvent(truncate(&payload.to_string(), 2048).to_string())
            })?;
        let mut response = SqsBatchResponse::default();
        let mut metrics = InvocationMetrics::default();
        for record in records {
            let request = match decode_action_record(record) {
                Ok(ActionMessage::Refresh(request)) => request,
                Ok(ActionMessage::Wake(wake)) => {
                    if let Err(e) = self.on_wake(&wake, &mut metrics).await {
                        warn!(share = %wake.wake.share_arn, message_id = %wake.message_id, error = %e,
                            "Wake-up failed; the message will be redelivered");
                        fail(
                            &mut response,
                            &mut metrics,
                            Some(&wake.wake.bucket),
                            &wake.message_id,
                        );
                    }
                    continue;
                }
                Ok(ActionMessage::Completion(event)) => {
                    let source = record.get("eventSourceARN").and_then(Value::as_str);
                    if let Err(e) = self.on_completion(&event, source, &mut metrics).await {
                        warn!(share = ?event.share_arn, message_id = %event.message_id, error = %e,
                            "Completion event failed; the message will be redelivered");
                        fail(&mut response, &mut metrics, None, &event.message_id);
                    }
                    continue;
                }
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
                    fail(
                        &mut response,
                        &mut metrics,
                        Some(&request.bucket),
                        &request.message_id,
                    );
                }
            }
        }
        let unresolved = self.unresolved_access_points.swap(0, Ordering::Relaxed);
        if unresolved > 0 {
            metrics.count(
                None,
                name::ACCESS_POINTS_UNRESOLVED,
                usize::try_from(unresolved).unwrap_or(usize::MAX),
            );
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
                CloseOutcome::Refresh(scope) | CloseOutcome::RefreshCarried(scope) => scope,
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
                    None => ChangeSet::whole(),
                },
            },
            None => ChangeSet::whole(),
        };

        let mut log = RefreshLog {
            generation: request.generation,
            started_at_ms: self.clock.now_ms(),
            refreshes: Vec::new(),
        };
        // The window's changes become pending on each share they concern; the share's
        // scheduler calls it now or when its rules allow. Everything in the window
        // happened before the close, so every call claimed after this hand-off starts
        // after it.
        let oldest_event_ms = request.timestamp_ms.unwrap_or(log.started_at_ms);
        // The shares as listed after the close, when no event of the window can come
        // any more: every share that existed at any of its changes is in it (one
        // created a moment before a change included), and a share left out because
        // its gateway wrote a change is still on that gateway (a share never moves: a
        // share on another gateway has another ARN). A cached map, loaded before some
        // change of the window, could miss a share created since.
        let shares = self.shares_listed_now().await?;
        let planned = plan_share_listings(&shares, bucket, &scope);
        if planned.is_empty() {
            if shares.iter().any(|s| s.location.bucket == bucket) {
                info!(bucket, ?scope,
                    "No share of bucket {bucket} needs these changes (outside its prefix, or written through its own gateway)");
            } else {
                warn!(
                    bucket,
                    ?scope,
                    "No file share maps bucket {bucket}; nothing to refresh"
                );
            }
        }
        let mut handed: Vec<String> = Vec::new();
        for share in planned {
            let driven = self
                .hand_off(
                    &share.share_arn,
                    bucket,
                    &share.prefix,
                    share.listings,
                    oldest_event_ms,
                    request.source_arn.as_deref(),
                    metrics,
                )
                .await?;
            // A share that is gone hands its changes to the bucket's other shares,
            // found on a map resolved anew.
            let driven = self
                .rehome(
                    &share.share_arn,
                    driven,
                    request.source_arn.as_deref(),
                    metrics,
                )
                .await?;
            log.refreshes.extend(driven.started);
            handed.push(share.share_arn);
        }

        // The log is for operators, and the mark only a shortcut for duplicates:
        // neither is worth a redelivery.
        if let Err(e) = self.store.record_refresh(bucket, &log).await {
            warn!(bucket, generation = ?request.generation, error = %e, "Could not record the refresh");
        }
        Ok(RecordOutcome::Refreshed { shares: handed })
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
    ///
    /// A map that could not be resolved whole (a gateway or S3 Control failure that is
    /// worth retrying) is not cached: the message fails, and the next one resolves
    /// again.
    /// Every NFS and SMB share, and whether the map was loaded by this call (rather
    /// than taken from the cache).
    pub(crate) async fn shares(&self, force: bool) -> Result<(Vec<FileShare>, bool), RecordError> {
        let now = self.clock.now_ms();
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if !force && now.saturating_sub(c.loaded_at_ms) < SHARE_CACHE_TTL_MS {
                return Ok((c.shares.clone(), false));
            }
        }
        let summaries = self.list_summaries().await?;
        let shares = self.resolve(&mut cache, summaries, now).await?;
        Ok((shares, true))
    }

    /// The shares that exist now: `ListFileShares` is asked again (a page per region
    /// for most accounts), and the cached map serves if it is fresh and knows every
    /// share listed; a share it does not know (created since) resolves the map anew.
    /// Shares that the listing no longer names are left out. A share's gateway and
    /// location never change, so only new ARNs need `Describe` and S3 Control.
    pub(crate) async fn shares_listed_now(&self) -> Result<Vec<FileShare>, RecordError> {
        let now = self.clock.now_ms();
        let summaries = self.list_summaries().await?;
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            let fresh = now.saturating_sub(c.loaded_at_ms) < SHARE_CACHE_TTL_MS;
            if fresh && summaries.iter().all(|s| c.listed.contains(&s.arn)) {
                let listed: BTreeSet<&str> = summaries.iter().map(|s| s.arn.as_str()).collect();
                return Ok(c
                    .shares
                    .iter()
                    .filter(|s| listed.contains(s.arn.as_str()))
                    .cloned()
                    .collect());
            }
        }
        self.resolve(&mut cache, summaries, now).await
    }

    /// Describes and locates `summaries`, and caches the map.
    async fn resolve(
        &self,
        cache: &mut Option<ShareCache>,
        summaries: Vec<crate::ports::ShareSummary>,
        now: i64,
    ) -> Result<Vec<FileShare>, RecordError> {
        let listed = summaries.iter().map(|s| s.arn.clone()).collect();
        let shares = self.describe_and_locate(summaries).await?;
        info!(shares = shares.len(), "Resolved file shares");
        *cache = Some(ShareCache {
            shares: shares.clone(),
            listed,
            loaded_at_ms: now,
        });
        Ok(shares)
    }

    /// Every page of `ListFileShares`.
    async fn list_summaries(&self) -> Result<Vec<crate::ports::ShareSummary>, RecordError> {
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
                    }
                    .into())
                }
                None => break,
            }
        }
        Ok(summaries)
    }

    async fn describe_and_locate(
        &self,
        summaries: Vec<crate::ports::ShareSummary>,
    ) -> Result<Vec<FileShare>, RecordError> {
        let mut described = Vec::with_capacity(summaries.len());
        for kind in [ShareKind::Nfs, ShareKind::Smb] {
            let arns: Vec<String> = summaries
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| s.arn.clone())
                .collect();
            for chunk in arns.chunks(DESCRIBE_BATCH) {
                match self.gateway.describe_file_shares(kind, chunk).await {
                    Ok(shares) => described.extend(shares),
                    // A share deleted since the listing fails the whole call, without
                    // saying which: describe the chunk one by one. A share that is gone
                    // needs no change, and its successor is listed next time.
                    Err(GatewayError::ShareNotFound { .. }) => {
                        for arn in chunk {
                            match self
                                .gateway
                                .describe_file_shares(kind, std::slice::from_ref(arn))
                                .await
                            {
                                Ok(shares) => described.extend(shares),
                                Err(GatewayError::ShareNotFound { .. }) => {
                                    info!(share = %arn, "File share deleted since it was listed; left out of the map");
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.locate_shares(described).await
    }

    /// The described shares with the bucket each one maps: the bucket of a bucket
    /// location as it is, and for an access point (by ARN or alias) the bucket that S3
    /// Control says it belongs to. The prefix is the location's either way, so
    /// [`plan_refreshes`] treats both alike.
    ///
    /// A share whose access point cannot be resolved (not found, alias not listed,
    /// access denied: what retrying the same call does not change) is logged with its
    /// ARN, counted, and left out of this map; the next resolve asks again. Its bucket
    /// is never guessed.
    ///
    /// An S3 Control failure worth retrying (throttling, 5xx, timeouts) fails the whole
    /// resolve instead, and so the message, before any refresh: SQS redelivers it and
    /// the map is resolved again then. Leaving the share out would cache a map without
    /// it for [`SHARE_CACHE_TTL_MS`] and delete messages whose changes it should have
    /// seen, which is the one thing the product must not do; refreshing the other shares
    /// and failing the message would refresh them twice. While S3 Control fails, every
    /// message waits for its redelivery (and ends in the DLQ, alarmed, if it lasts),
    /// which is the price of never missing a change.
    async fn locate_shares(
        &self,
        described: Vec<DescribedShare>,
    ) -> Result<Vec<FileShare>, RecordError> {
        let parsed: Vec<_> = described
            .into_iter()
            .map(|d| {
                let location = parse_location(&d.location_arn);
                (d, location)
            })
            .collect();
        let mut lookup = AccessPointLookup::new(
            &self.access_points,
            parsed.iter().flat_map(|(d, location)| {
                let access_point_region = match location {
                    Ok(LocationRef::AccessPoint { access_point, .. }) => {
                        Some(access_point.region.as_str())
                    }
                    _ => None,
                };
                share_account_region(&d.arn)
                    .map(|(_, region)| region)
                    .into_iter()
                    .chain(access_point_region)
            }),
        );
        let mut shares = Vec::with_capacity(parsed.len());
        for (described, location) in parsed {
            let location = match location {
                Ok(LocationRef::Bucket(location)) => location,
                Ok(reference) => match lookup.bucket_of(&described.arn, &reference).await? {
                    Ok(bucket) => {
                        info!(share = %described.arn, location = %described.location_arn, bucket = %bucket,
                            "Share on an access point maps bucket {bucket}");
                        ShareLocation {
                            bucket,
                            prefix: reference.prefix().to_string(),
                        }
                    }
                    Err(reason) => {
                        warn!(share = %described.arn, location = %described.location_arn, %reason,
                            "Access point of share {} cannot be resolved to a bucket; leaving the share out until the next resolve",
                            described.arn);
                        continue;
                    }
                },
                Err(e) => {
                    warn!(share = %described.arn, error = %e, "Skipping share whose location names no bucket");
                    continue;
                }
            };
            shares.push(FileShare {
                arn: described.arn,
                kind: described.kind,
                gateway_arn: described.gateway_arn,
                location,
            });
        }
        self.unresolved_access_points
            .fetch_add(lookup.unresolved(), Ordering::Relaxed);
        Ok(shares)
    }
}

/// A bucket, or why none is known.
type Resolution = Result<String, String>;

/// One resolve's answers from S3 Control: each access point is asked about once
/// (`GetAccessPoint`), and each account and region listed once (`ListAccessPoints`),
/// however many shares use them.
struct AccessPointLookup<'a, A> {
    access_points: &'a A,
    /// Where an alias is looked for after its share's own region: the regions of this
    /// resolve's shares and access point ARNs, in order of appearance.
    regions: Vec<String>,
    by_arn: HashMap<AccessPointArn, Resolution>,
    /// `(account, alias)` → its bucket.
    by_alias: HashMap<(String, String), Resolution>,
    /// `(account, region)` → its access points.
    listed: HashMap<(String, String), Vec<AccessPoint>>,
    /// The access points (ARN, or account and alias) that could not be resolved.
    unresolved: BTreeSet<String>,
}

impl<'a, A: AccessPoints> AccessPointLookup<'a, A> {
    fn new<'r>(access_points: &'a A, regions: impl Iterator<Item = &'r str>) -> Self {
        let mut unique: Vec<String> = Vec::new();
        for region in regions {
            if !unique.iter().any(|r| r == region) {
                unique.push(region.to_string());
            }
        }
        AccessPointLookup {
            access_points,
            regions: unique,
            by_arn: HashMap::new(),
            by_alias: HashMap::new(),
            listed: HashMap::new(),
            unresolved: BTreeSet::new(),
        }
    }

    /// How many access points could not be resolved.
    fn unresolved(&self) -> u64 {
        u64::try_from(self.unresolved.len()).unwrap_or(u64::MAX)
    }

    /// The bucket of an access point location of share `share_arn`; `Err` only for a
    /// failure worth retrying.
    async fn bucket_of(
        &mut self,
        share_arn: &str,
        reference: &LocationRef,
    ) -> Result<Resolution, AccessPointError> {
        let (key, resolution) = match reference {
            LocationRef::Bucket(location) => return Ok(Ok(location.bucket.clone())),
            LocationRef::AccessPoint { access_point, .. } => (
                access_point.to_string(),
                self.by_access_point_arn(access_point).await?,
            ),
            LocationRef::Alias { alias, .. } => match share_account_region(share_arn) {
                Some((account, region)) => (
                    format!("{account}:{alias}"),
                    self.by_alias(account, region, alias).await?,
                ),
                None => (
                    alias.clone(),
                    Err(format!(
                        "the share ARN names no account and region to look alias {alias} up in"
                    )),
                ),
            },
        };
        if resolution.is_err() {
            self.unresolved.insert(key);
        }
        Ok(resolution)
    }

    async fn by_access_point_arn(
        &mut self,
        arn: &AccessPointArn,
    ) -> Result<Resolution, AccessPointError> {
        if let Some(known) = self.by_arn.get(arn) {
            return Ok(known.clone());
        }
        let resolution = match self
            .access_points
            .get_access_point(&arn.account, &arn.region, &arn.name)
            .await
        {
            Ok(Some(point)) => Ok(point.bucket),
            Ok(None) => Err(format!("S3 Control knows no access point {arn}")),
            Err(e) if e.retry == Retry::Later => return Err(e),
            Err(e) => Err(e.to_string()),
        };
        self.by_arn.insert(arn.clone(), resolution.clone());
        Ok(resolution)
    }

    /// Looks `alias` up among the account's access points in `share_region`, then in
    /// the resolve's other regions.
    async fn by_alias(
        &mut self,
        account: &str,
        share_region: &str,
        alias: &str,
    ) -> Result<Resolution, AccessPointError> {
        let key = (account.to_string(), alias.to_string());
        if let Some(known) = self.by_alias.get(&key) {
            return Ok(known.clone());
        }
        let mut regions = vec![share_region.to_string()];
        regions.extend(self.regions.iter().filter(|r| *r != share_region).cloned());
        let mut failures = Vec::new();
        let mut resolution = None;
        for region in &regions {
            let listed = (account.to_string(), region.clone());
            if !self.listed.contains_key(&listed) {
                match self.access_points.list_access_points(account, region).await {
                    Ok(points) => {
                        self.listed.insert(listed.clone(), points);
                    }
                    Err(e) if e.retry == Retry::Later => return Err(e),
                    Err(e) => {
                        // Listing this region cannot work (access denied): the alias
                        // may still be found in another one.
                        failures.push(e.to_string());
                        self.listed.insert(listed.clone(), Vec::new());
                        continue;
                    }
                }
            }
            if let Some(point) = self
                .listed
                .get(&listed)
                .and_then(|points| points.iter().find(|p| p.alias == alias))
            {
                resolution = Some(Ok(point.bucket.clone()));
                break;
            }
        }
        let resolution = resolution.unwrap_or_else(|| {
            let mut why = format!(
                "no access point of account {account} in {} has alias {alias}",
                regions.join(", ")
            );
            for failure in failures {
                why.push_str("; ");
                why.push_str(&failure);
            }
            Err(why)
        });
        self.by_alias.insert(key, resolution.clone());
        Ok(resolution)
    }
}

/// Puts the message in the batch's failures, so that SQS delivers it again.
fn fail(
    response: &mut SqsBatchResponse,
    metrics: &mut InvocationMetrics,
    bucket: Option<&str>,
    message_id: &str,
) {
    metrics.count(bucket, name::MESSAGES_FAILED, 1);
    let mut failure = BatchItemFailure::default();
    failure.item_identifier = message_id.to_string();
    response.batch_item_failures.push(failure);
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
    use crate::window::{ChangeSet, OpenExpectation, Writer};
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
        // Warm: the shares are listed again (a share created since must be found), but
        // the cached map knows them all, so nothing is described again.
        r.handle(&json!({"Records": [message("m2", "target", None)]}))
            .await
            .unwrap();
        assert_eq!(r.gateway().list_calls(), 6);
        assert_eq!(r.gateway().describe_calls(), 7 + 7);
        // A share created since: listed, and the map is resolved anew.
        r.gateway()
            .add_share("share-new", ShareKind::Nfs, "arn:aws:s3:::target");
        r.handle(&json!({"Records": [message("m3", "target", None)]}))
            .await
            .unwrap();
        assert_eq!(
            r.gateway().list_calls(),
            9,
            "the listing is not asked twice"
        );
        assert_eq!(r.gateway().describe_calls(), 2 * (7 + 7));
        assert!(r
            .gateway()
            .refreshes()
            .iter()
            .any(|p| p.share_arn == "share-new"));
    }

    #[tokio::test]
    async fn a_share_that_moved_off_the_writing_gateway_is_found_before_skipping() {
        let r = refresher();
        let (a, b) = (
            "arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-AAAAAAAA",
            "arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-BBBBBBBB",
        );
        r.gateway()
            .add_share_on(a, "first", ShareKind::Nfs, "arn:aws:s3:::b1");
        r.gateway()
            .add_share_on(a, "second", ShareKind::Nfs, "arn:aws:s3:::b1");
        // Warm: the map is loaded, with both shares on gateway A.
        r.handle(&json!({"Records": [message("m0", "b1", None)]}))
            .await
            .unwrap();
        assert_eq!(r.gateway().list_calls(), 1);
        // The second share moves to gateway B; then A writes.
        r.gateway().remove_share("second");
        r.gateway()
            .add_share_on(b, "second-on-b", ShareKind::Nfs, "arn:aws:s3:::b1");
        let mut changes = ChangeSet::default();
        changes.add_gateway_write(&Writer::Gateway("sgw-aaaaaaaa".into()), Some("x/"));
        r.store()
            .open("b1", OpenExpectation::from_item(None), &changes, 0, 1)
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
        assert_eq!(refreshed, ["first", "second", "second-on-b"]);
        assert_eq!(
            r.gateway().list_calls(),
            2,
            "resolved again before skipping"
        );
    }

    #[tokio::test]
    async fn vanished_share_is_re_resolved() {
        // No interval: the second message calls the old share again at once.
        let r = refresher().with_pace(0, 0);
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

#[cfg(test)]
mod access_point_tests {
    use super::*;
    use crate::adapters::memory::{
        MemoryAccessPoints, MemoryGateway, MemoryQueue, MemoryWindowStore,
    };
    use crate::metrics::MemorySink;
    use crate::window::{ChangeSet, OpenExpectation};
    use serde_json::json;
    use std::io::Write;
    use std::sync::Mutex as StdMutex;

    const ACCOUNT: &str = "123456789012";
    const REGION: &str = "us-east-1";

    use crate::clock::ManualClock as TestClock;

    type ApRefresher =
        Refresher<MemoryWindowStore, MemoryGateway, MemoryQueue, TestClock, MemoryAccessPoints>;

    fn refresher() -> (ApRefresher, TestClock, Arc<MemorySink>) {
        let clock = TestClock::default();
        clock.advance(1_000_000);
        let sink = Arc::new(MemorySink::default());
        let r = Refresher::new(
            MemoryWindowStore::default(),
            MemoryGateway::new(100),
            MemoryQueue::default(),
            clock.clone(),
        )
        .with_metrics_sink(sink.clone())
        .with_access_points(MemoryAccessPoints::default());
        (r, clock, sink)
    }

    fn share_arn(region: &str, id: &str) -> String {
        format!("arn:aws:storagegateway:{region}:{ACCOUNT}:share/share-{id}")
    }

    fn ap_arn(region: &str, name: &str) -> String {
        format!("arn:aws:s3:{region}:{ACCOUNT}:accesspoint/{name}")
    }

    /// A message without our body: the whole bucket.
    fn whole_bucket(id: &str, bucket: &str) -> Value {
        json!({"Records": [{"messageId": id, "body": "{}",
               "messageAttributes": {"bucket-name": {"stringValue": bucket, "dataType": "String"}}}]})
    }

    fn window_message(id: &str, bucket: &str, generation: u64) -> Value {
        let body =
            json!({"version": 1, "bucket": bucket, "generation": generation, "windowOpenedAtMs": 0,
                          "windowEndsAtMs": 0, "timestampMs": 0})
            .to_string();
        json!({"Records": [{"messageId": id, "body": body,
               "messageAttributes": {"bucket-name": {"stringValue": bucket, "dataType": "String"}}}]})
    }

    fn refreshed<S: WindowStore + ShareStore, Q: Requeue, C: Clock, A: AccessPoints>(
        r: &Refresher<S, MemoryGateway, Q, C, A>,
    ) -> Vec<String> {
        let mut arns: Vec<String> = r
            .gateway()
            .refreshes()
            .into_iter()
            .map(|p| p.share_arn)
            .collect();
        arns.sort();
        arns
    }

    /// The sum of `metric` over the function lines emitted so far.
    fn metric(sink: &MemorySink, metric: &str) -> f64 {
        sink.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("Bucket").is_none())
            .filter_map(|v| v.get(metric).and_then(Value::as_f64))
            .sum()
    }

    #[derive(Clone, Default)]
    struct LogBuffer(Arc<StdMutex<Vec<u8>>>);

    impl Write for LogBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogBuffer {
        fn text(&self) -> String {
            self.0
                .lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        }
    }

    /// WARN and above, written to a buffer, on this thread for the guard's lifetime.
    fn capture_warnings() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        (buffer, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn access_point_and_alias_shares_refresh_their_bucket_and_a_decoy_does_not() {
        let (r, _, _) = refresher();
        let aps = r.access_points();
        let alias = aps.add(ACCOUNT, REGION, "main", "b1");
        aps.add(ACCOUNT, REGION, "decoy", "other");
        let gw = r.gateway();
        let on_ap = share_arn(REGION, "AP");
        let on_alias = share_arn(REGION, "ALIAS");
        let decoy = share_arn(REGION, "DECOY");
        let plain = share_arn(REGION, "PLAIN");
        gw.add_share(&on_ap, ShareKind::Nfs, &ap_arn(REGION, "main"));
        gw.add_share(&on_alias, ShareKind::Smb, &format!("arn:aws:s3:::{alias}"));
        gw.add_share(&decoy, ShareKind::Nfs, &ap_arn(REGION, "decoy"));
        gw.add_share(&plain, ShareKind::Nfs, "arn:aws:s3:::b1");
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        let mut expected = vec![on_ap.clone(), on_alias.clone(), plain.clone()];
        expected.sort();
        assert_eq!(refreshed(&r), expected);
        assert!(r
            .gateway()
            .refreshes()
            .iter()
            .all(|p| p.folders == ["/"] && p.recursive));
        // The decoy's bucket gets the decoy only.
        r.handle(&whole_bucket("m2", "other")).await.unwrap();
        assert_eq!(r.gateway().refreshes().last().unwrap().share_arn, decoy);
        // One GetAccessPoint per access point, one ListAccessPoints for the alias; the
        // second message used the cached map.
        assert_eq!((aps.get_calls(), aps.list_calls()), (2, 1));
    }

    #[tokio::test]
    async fn access_point_prefixes_are_relative_to_the_share_root() {
        let (r, _, _) = refresher();
        let alias = r.access_points().add(ACCOUNT, REGION, "main", "b1");
        let data = share_arn(REGION, "DATA");
        let logs = share_arn(REGION, "LOGS");
        let alias_data = share_arn(REGION, "ALIASDATA");
        r.gateway().add_share(
            &data,
            ShareKind::Nfs,
            &format!("{}/data/", ap_arn(REGION, "main")),
        );
        r.gateway().add_share(
            &logs,
            ShareKind::Nfs,
            &format!("{}/logs/", ap_arn(REGION, "main")),
        );
        r.gateway().add_share(
            &alias_data,
            ShareKind::Smb,
            &format!("arn:aws:s3:::{alias}/data/x"),
        );
        let mut changes = ChangeSet::default();
        changes.add_folder("data/x/y/");
        r.store()
            .open("b1", OpenExpectation::from_item(None), &changes, 0, 1)
            .await
            .unwrap();
        let out = r.handle(&window_message("m1", "b1", 1)).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        let plans = r.gateway().refreshes();
        let folders = |arn: &str| {
            plans
                .iter()
                .find(|p| p.share_arn == arn)
                .map(|p| p.folders.clone())
        };
        assert_eq!(
            folders(&data),
            Some(vec!["/".to_string(), "/x".into(), "/x/y".into()])
        );
        assert_eq!(
            folders(&alias_data),
            Some(vec!["/".to_string(), "/y".into()])
        );
        assert_eq!(folders(&logs), None, "no change under logs/");
    }

    #[tokio::test]
    async fn each_access_point_is_asked_about_once_per_resolve() {
        let (r, clock, _) = refresher();
        let aps = r.access_points();
        let alias = aps.add(ACCOUNT, REGION, "main", "b1");
        for i in 0..3 {
            r.gateway().add_share(
                &share_arn(REGION, &format!("AP{i}")),
                ShareKind::Nfs,
                &format!("{}/p{i}/", ap_arn(REGION, "main")),
            );
            r.gateway().add_share(
                &share_arn(REGION, &format!("AL{i}")),
                ShareKind::Smb,
                &format!("arn:aws:s3:::{alias}/p{i}/"),
            );
        }
        r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert_eq!(r.gateway().refreshes().len(), 6);
        assert_eq!((aps.get_calls(), aps.list_calls()), (1, 1));
        // Warm messages use the cached map.
        r.handle(&whole_bucket("m2", "b1")).await.unwrap();
        r.handle(&whole_bucket("m3", "b1")).await.unwrap();
        assert_eq!((aps.get_calls(), aps.list_calls()), (1, 1));
        // Their changes wait for the interval since each share's first call.
        assert_eq!(r.gateway().refreshes().len(), 6);
        assert_eq!(
            r.requeue().wakes().len(),
            12,
            "per share, one for the interval and one for the first call's lease"
        );
        // Once the map is stale, the next resolve asks again, once.
        clock.advance(SHARE_CACHE_TTL_MS);
        r.handle(&whole_bucket("m4", "b1")).await.unwrap();
        assert_eq!((aps.get_calls(), aps.list_calls()), (2, 2));
    }

    #[tokio::test]
    async fn an_unresolvable_access_point_is_logged_counted_and_tried_again_on_the_next_resolve() {
        let (r, clock, sink) = refresher();
        let (logs, _guard) = capture_warnings();
        let missing = ap_arn(REGION, "missing");
        let on_missing = share_arn(REGION, "MISSING");
        let on_alias = share_arn(REGION, "NOALIAS");
        let unknown_alias = "gone-0123456789abcdef0123456789abcdef01-s3alias";
        r.gateway().add_share(&on_missing, ShareKind::Nfs, &missing);
        r.gateway().add_share(
            &on_alias,
            ShareKind::Nfs,
            &format!("arn:aws:s3:::{unknown_alias}"),
        );
        r.gateway().add_share(
            &share_arn(REGION, "PLAIN"),
            ShareKind::Nfs,
            "arn:aws:s3:::b1",
        );
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert!(
            out.batch_item_failures.is_empty(),
            "nothing to retry: the map is what S3 Control says"
        );
        assert_eq!(refreshed(&r), [share_arn(REGION, "PLAIN")]);
        assert_eq!(metric(&sink, name::ACCESS_POINTS_UNRESOLVED), 2.0);
        let text = logs.text();
        assert!(text.contains("WARN"), "{text}");
        assert!(
            text.contains(&missing) && text.contains(&on_missing),
            "{text}"
        );
        assert!(
            text.contains(unknown_alias) && text.contains(&on_alias),
            "{text}"
        );
        // Cached with the shares left out: a warm message asks nothing and counts nothing.
        r.handle(&whole_bucket("m2", "b1")).await.unwrap();
        assert_eq!(
            (
                r.access_points().get_calls(),
                r.access_points().list_calls()
            ),
            (1, 1)
        );
        assert_eq!(metric(&sink, name::ACCESS_POINTS_UNRESOLVED), 2.0);
        // The access point appears: the next resolve finds it, and never guessed before.
        r.access_points().add(ACCOUNT, REGION, "missing", "b1");
        clock.advance(SHARE_CACHE_TTL_MS);
        r.handle(&whole_bucket("m3", "b1")).await.unwrap();
        assert_eq!(r.access_points().get_calls(), 2);
        assert!(refreshed(&r).contains(&on_missing));
        assert_eq!(
            metric(&sink, name::ACCESS_POINTS_UNRESOLVED),
            3.0,
            "the alias is still unknown"
        );
    }

    #[tokio::test]
    async fn a_transient_s3_control_error_fails_the_message_and_caches_nothing() {
        let (r, _, sink) = refresher();
        r.access_points().add(ACCOUNT, REGION, "main", "b1");
        r.gateway().add_share(
            &share_arn(REGION, "AP"),
            ShareKind::Nfs,
            &ap_arn(REGION, "main"),
        );
        r.gateway().add_share(
            &share_arn(REGION, "PLAIN"),
            ShareKind::Nfs,
            "arn:aws:s3:::b1",
        );
        r.access_points().fail_next(1, Retry::Later);
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert_eq!(out.batch_item_failures.len(), 1);
        assert_eq!(out.batch_item_failures[0].item_identifier, "m1");
        assert!(
            r.gateway().refreshes().is_empty(),
            "no share refreshed before the map is whole"
        );
        assert_eq!(metric(&sink, name::MESSAGES_FAILED), 1.0);
        assert_eq!(metric(&sink, name::ACCESS_POINTS_UNRESOLVED), 0.0);
        // Redelivered: resolved again (nothing was cached), and both shares refreshed.
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(r.gateway().list_calls(), 2);
        assert_eq!(r.access_points().get_calls(), 2);
        assert_eq!(
            refreshed(&r),
            [share_arn(REGION, "AP"), share_arn(REGION, "PLAIN")]
        );
    }

    #[tokio::test]
    async fn a_permanent_s3_control_error_leaves_the_share_out_without_failing() {
        let (r, _, sink) = refresher();
        r.access_points().add(ACCOUNT, REGION, "main", "b1");
        r.gateway().add_share(
            &share_arn(REGION, "AP"),
            ShareKind::Nfs,
            &ap_arn(REGION, "main"),
        );
        r.gateway().add_share(
            &share_arn(REGION, "PLAIN"),
            ShareKind::Nfs,
            "arn:aws:s3:::b1",
        );
        // Access denied, say: retrying the same call cannot help.
        r.access_points().fail_next(1, Retry::Never);
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(refreshed(&r), [share_arn(REGION, "PLAIN")]);
        assert_eq!(metric(&sink, name::ACCESS_POINTS_UNRESOLVED), 1.0);
    }

    #[tokio::test]
    async fn an_alias_is_looked_up_in_the_share_region_first_then_the_others() {
        let (r, _, _) = refresher();
        let aps = r.access_points();
        // The access point lives in eu-west-1; the alias share is on a us-east-1 gateway,
        // and another share sits on a gateway in eu-west-1.
        let alias = aps.add(ACCOUNT, "eu-west-1", "far", "b1");
        let on_alias = share_arn(REGION, "ALIAS");
        r.gateway()
            .add_share(&on_alias, ShareKind::Nfs, &format!("arn:aws:s3:::{alias}"));
        r.gateway().add_share(
            &share_arn("eu-west-1", "EU"),
            ShareKind::Nfs,
            "arn:aws:s3:::elsewhere",
        );
        // A second alias, in a region that only an access point ARN names.
        let alias_far = aps.add(ACCOUNT, "ap-southeast-2", "syd", "b2");
        aps.add(ACCOUNT, "ap-southeast-2", "other", "b3");
        let on_far_alias = share_arn(REGION, "FARALIAS");
        r.gateway().add_share(
            &on_far_alias,
            ShareKind::Nfs,
            &format!("arn:aws:s3:::{alias_far}"),
        );
        r.gateway().add_share(
            &share_arn(REGION, "SYDAP"),
            ShareKind::Nfs,
            &ap_arn("ap-southeast-2", "other"),
        );
        r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert_eq!(refreshed(&r).as_slice(), std::slice::from_ref(&on_alias));
        r.handle(&whole_bucket("m2", "b2")).await.unwrap();
        assert_eq!(refreshed(&r), [on_alias, on_far_alias]);
        // us-east-1, eu-west-1 and ap-southeast-2, each listed once for both aliases.
        assert_eq!(aps.list_calls(), 3);
    }

    #[tokio::test]
    async fn without_s3_control_access_point_shares_are_unresolved_and_bucket_shares_go_on() {
        let sink = Arc::new(MemorySink::default());
        let r = Refresher::new(
            MemoryWindowStore::default(),
            MemoryGateway::new(100),
            MemoryQueue::default(),
            TestClock::default(),
        )
        .with_metrics_sink(sink.clone());
        r.gateway().add_share(
            &share_arn(REGION, "AP"),
            ShareKind::Nfs,
            &ap_arn(REGION, "main"),
        );
        r.gateway().add_share(
            &share_arn(REGION, "PLAIN"),
            ShareKind::Nfs,
            "arn:aws:s3:::b1",
        );
        let out = r.handle(&whole_bucket("m1", "b1")).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(refreshed(&r), [share_arn(REGION, "PLAIN")]);
        assert_eq!(metric(&sink, name::ACCESS_POINTS_UNRESOLVED), 1.0);
    }
}
