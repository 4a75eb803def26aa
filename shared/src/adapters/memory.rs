//! In-memory adapters: the window rules applied to a map, a list for a queue, and a
//! table of shares for a gateway. They count every call, for assertions.

use crate::error::{AccessPointError, GatewayError, QueueError, Retry, StoreError};
use crate::ports::{
    AccessPoint, AccessPoints, DescribedShare, FileGateway, RefreshQueue, Requeue, SharePage,
    ShareStore, ShareSummary, WindowStore,
};
use crate::refresh_message::{RefreshMessage, WakeMessage};
use crate::scheduler::ShareState;
use crate::shares::{RefreshPlan, ShareKind};
use crate::window::{self, ChangeSet, CloseOutcome, OpenExpectation, RefreshLog, WindowItem};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another test thread must not hide this one's result.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
pub struct MemoryWindowStore {
    items: Mutex<HashMap<String, Option<WindowItem>>>,
    /// The share items, by share ARN.
    shares: Mutex<HashMap<String, ShareState>>,
    writes: AtomicU64,
    reads: AtomicU64,
}

impl MemoryWindowStore {
    pub fn item(&self, bucket: &str) -> Option<WindowItem> {
        lock(&self.items).get(bucket).cloned().flatten()
    }

    /// The scheduling state of `share_arn`.
    pub fn share(&self, share_arn: &str) -> Option<ShareState> {
        lock(&self.shares).get(share_arn).cloned()
    }

    /// Write requests so far (each write port call is one).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Consistent reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn with_item<R>(&self, bucket: &str, f: impl FnOnce(&mut Option<WindowItem>) -> R) -> R {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut items = lock(&self.items);
        f(items.entry(bucket.to_string()).or_default())
    }
}

impl WindowStore for MemoryWindowStore {
    async fn read(&self, bucket: &str) -> Result<Option<WindowItem>, StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(self.item(bucket))
    }

    async fn join(
        &self,
        bucket: &str,
        seen: &WindowItem,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        let generation = seen.generation;
        Ok(self.with_item(bucket, |item| {
            window::join(item, generation, changes, now_ms)
        }))
    }

    async fn open(
        &self,
        bucket: &str,
        expected: OpenExpectation,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        Ok(self.with_item(bucket, |item| {
            window::open(item, bucket, &expected, changes, now_ms, window_ms)
        }))
    }

    async fn close(
        &self,
        bucket: &str,
        generation: u64,
        now_ms: i64,
    ) -> Result<CloseOutcome, StoreError> {
        Ok(self.with_item(bucket, |item| window::close(item, generation, now_ms)))
    }

    async fn record_refresh(&self, bucket: &str, log: &RefreshLog) -> Result<(), StoreError> {
        self.with_item(bucket, |item| window::record_refresh(item, bucket, log));
        Ok(())
    }
}

impl ShareStore for MemoryWindowStore {
    async fn read_share(&self, share_arn: &str) -> Result<Option<ShareState>, StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(self.share(share_arn))
    }

    async fn write_share(&self, state: &ShareState) -> Result<bool, StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut shares = lock(&self.shares);
        let stored = shares.get(&state.share_arn).map_or(0, |s| s.version);
        if stored != state.version {
            return Ok(false);
        }
        let mut next = state.clone();
        next.version = state.version + 1;
        shares.insert(state.share_arn.clone(), next);
        Ok(true)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub id: String,
    pub message: RefreshMessage,
    pub delay_seconds: u32,
}

#[derive(Debug, Default)]
pub struct MemoryQueue {
    sent: Mutex<Vec<SentMessage>>,
    /// Wake-ups, with their delays.
    wakes: Mutex<Vec<(WakeMessage, u32)>>,
}

impl MemoryQueue {
    pub fn sent(&self) -> Vec<SentMessage> {
        lock(&self.sent).clone()
    }

    pub fn wakes(&self) -> Vec<(WakeMessage, u32)> {
        lock(&self.wakes).clone()
    }
}

impl Requeue for MemoryQueue {
    async fn requeue(
        &self,
        _source_arn: Option<&str>,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        self.send(message, delay_seconds).await
    }

    async fn wake(
        &self,
        _source_arn: Option<&str>,
        message: &WakeMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        let mut wakes = lock(&self.wakes);
        wakes.push((message.clone(), delay_seconds));
        Ok(format!("wake-{}", wakes.len()))
    }
}

impl RefreshQueue for MemoryQueue {
    async fn send(
        &self,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        let mut sent = lock(&self.sent);
        let id = format!("msg-{}", sent.len() + 1);
        sent.push(SentMessage {
            id: id.clone(),
            message: message.clone(),
            delay_seconds,
        });
        Ok(id)
    }
}

/// A gateway with a fixed page size, enough to exercise paging and the describe limit.
#[derive(Debug)]
pub struct MemoryGateway {
    shares: Mutex<Vec<DescribedShare>>,
    page_size: usize,
    refreshes: Mutex<Vec<RefreshPlan>>,
    list_calls: AtomicU64,
    describe_calls: AtomicU64,
    /// Shares whose every `RefreshCache` fails with this error (until cleared).
    failing: Mutex<Vec<(String, GatewayError)>>,
    /// `RefreshCache` calls that failed that way.
    failed_calls: Mutex<Vec<RefreshPlan>>,
}

impl MemoryGateway {
    pub fn new(page_size: usize) -> Self {
        MemoryGateway {
            shares: Mutex::default(),
            page_size: page_size.max(1),
            refreshes: Mutex::default(),
            list_calls: AtomicU64::new(0),
            describe_calls: AtomicU64::new(0),
            failing: Mutex::default(),
            failed_calls: Mutex::default(),
        }
    }

    /// Every `RefreshCache` on `share_arn` answers `error` until [`Self::heal`].
    pub fn fail_share(&self, share_arn: &str, error: GatewayError) {
        lock(&self.failing).push((share_arn.to_string(), error));
    }

    pub fn heal(&self, share_arn: &str) {
        lock(&self.failing).retain(|(arn, _)| arn != share_arn);
    }

    /// The calls that [`Self::fail_share`] failed.
    pub fn failed_calls(&self) -> Vec<RefreshPlan> {
        lock(&self.failed_calls).clone()
    }

    pub fn add_share(&self, arn: &str, kind: ShareKind, location_arn: &str) {
        self.add_share_on(
            "arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-MEMORY",
            arn,
            kind,
            location_arn,
        );
    }

    /// A share on the gateway `gateway_arn`.
    pub fn add_share_on(&self, gateway_arn: &str, arn: &str, kind: ShareKind, location_arn: &str) {
        lock(&self.shares).push(DescribedShare {
            arn: arn.to_string(),
            kind,
            gateway_arn: gateway_arn.to_string(),
            location_arn: location_arn.to_string(),
        });
    }

    pub fn remove_share(&self, arn: &str) {
        lock(&self.shares).retain(|s| s.arn != arn);
    }

    pub fn refreshes(&self) -> Vec<RefreshPlan> {
        lock(&self.refreshes).clone()
    }

    pub fn list_calls(&self) -> u64 {
        self.list_calls.load(Ordering::Relaxed)
    }

    pub fn describe_calls(&self) -> u64 {
        self.describe_calls.load(Ordering::Relaxed)
    }
}

impl FileGateway for MemoryGateway {
    async fn list_file_shares(&self, marker: Option<&str>) -> Result<SharePage, GatewayError> {
        self.list_calls.fetch_add(1, Ordering::Relaxed);
        let start: usize = match marker {
            None => 0,
            Some(m) => m.parse().map_err(|_| GatewayError::Other {
                retry: crate::error::Retry::Never,
                message: format!("bad marker {m:?}"),
            })?,
        };
        let shares = lock(&self.shares);
        let end = (start + self.page_size).min(shares.len());
        Ok(SharePage {
            shares: shares
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(|s| ShareSummary {
                    arn: s.arn.clone(),
                    kind: s.kind,
                })
                .collect(),
            next_marker: (end < shares.len()).then(|| end.to_string()),
        })
    }

    async fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> Result<Vec<DescribedShare>, GatewayError> {
        self.describe_calls.fetch_add(1, Ordering::Relaxed);
        if arns.is_empty() || arns.len() > crate::ports::DESCRIBE_BATCH {
            return Err(GatewayError::Other {
                retry: crate::error::Retry::Never,
                message: format!("describe takes 1 to 10 ARNs, got {}", arns.len()),
            });
        }
        let shares = lock(&self.shares);
        arns.iter()
            .map(|arn| {
                shares
                    .iter()
                    .find(|s| &s.arn == arn && s.kind == kind)
                    .cloned()
                    .ok_or_else(|| GatewayError::ShareNotFound {
                        share_arn: arn.clone(),
                        message: "no such share".to_string(),
                    })
            })
            .collect()
    }

    async fn refresh_cache(&self, plan: &RefreshPlan) -> Result<String, GatewayError> {
        let injected = lock(&self.failing)
            .iter()
            .find(|(arn, _)| *arn == plan.share_arn)
            .map(|(_, e)| copy_error(e));
        if let Some(error) = injected {
            lock(&self.failed_calls).push(plan.clone());
            return Err(error);
        }
        if !lock(&self.shares).iter().any(|s| s.arn == plan.share_arn) {
            return Err(GatewayError::ShareNotFound {
                share_arn: plan.share_arn.clone(),
                message: "no such share".to_string(),
            });
        }
        let mut refreshes = lock(&self.refreshes);
        refreshes.push(plan.clone());
        Ok(format!("notification-{}", refreshes.len()))
    }
}

fn copy_error(e: &GatewayError) -> GatewayError {
    match e {
        GatewayError::ShareNotFound { share_arn, message } => GatewayError::ShareNotFound {
            share_arn: share_arn.clone(),
            message: message.clone(),
        },
        GatewayError::Busy { message } => GatewayError::Busy {
            message: message.clone(),
        },
        GatewayError::Other { retry, message } => GatewayError::Other {
            retry: *retry,
            message: message.clone(),
        },
    }
}

/// S3 Control's access points in memory, by account and region. Counts every call and
/// can fail the next ones.
#[derive(Debug, Default)]
pub struct MemoryAccessPoints {
    /// `(account, region, access point)`.
    points: Mutex<Vec<(String, String, AccessPoint)>>,
    failures: Mutex<VecDeque<Retry>>,
    get_calls: AtomicU64,
    list_calls: AtomicU64,
}

impl MemoryAccessPoints {
    /// Adds access point `name` on `bucket`; returns its alias (`NAME-…-s3alias`).
    pub fn add(&self, account: &str, region: &str, name: &str, bucket: &str) -> String {
        let mut points = lock(&self.points);
        let alias = format!("{name}-{:034x}-s3alias", points.len() + 1);
        points.push((
            account.to_string(),
            region.to_string(),
            AccessPoint {
                name: name.to_string(),
                alias: alias.clone(),
                bucket: bucket.to_string(),
            },
        ));
        alias
    }

    pub fn remove(&self, account: &str, region: &str, name: &str) {
        lock(&self.points).retain(|(a, r, p)| !(a == account && r == region && p.name == name));
    }

    /// The next `count` calls (either operation) fail with `retry`.
    pub fn fail_next(&self, count: usize, retry: Retry) {
        lock(&self.failures).extend(std::iter::repeat_n(retry, count));
    }

    /// `GetAccessPoint` calls so far, failed ones included.
    pub fn get_calls(&self) -> u64 {
        self.get_calls.load(Ordering::Relaxed)
    }

    /// `ListAccessPoints` calls so far (each returns every page), failed ones included.
    pub fn list_calls(&self) -> u64 {
        self.list_calls.load(Ordering::Relaxed)
    }

    fn injected_failure(&self) -> Result<(), AccessPointError> {
        match lock(&self.failures).pop_front() {
            None => Ok(()),
            Some(retry) => Err(AccessPointError {
                retry,
                message: format!("injected failure ({retry:?})"),
            }),
        }
    }
}

impl AccessPoints for MemoryAccessPoints {
    async fn get_access_point(
        &self,
        account: &str,
        region: &str,
        name: &str,
    ) -> Result<Option<AccessPoint>, AccessPointError> {
        self.get_calls.fetch_add(1, Ordering::Relaxed);
        self.injected_failure()?;
        Ok(lock(&self.points)
            .iter()
            .find(|(a, r, p)| a == account && r == region && p.name == name)
            .map(|(_, _, p)| p.clone()))
    }

    async fn list_access_points(
        &self,
        account: &str,
        region: &str,
    ) -> Result<Vec<AccessPoint>, AccessPointError> {
        self.list_calls.fetch_add(1, Ordering::Relaxed);
        self.injected_failure()?;
        Ok(lock(&self.points)
            .iter()
            .filter(|(a, r, _)| a == account && r == region)
            .map(|(_, _, p)| p.clone())
            .collect())
    }
}
