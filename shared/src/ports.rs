//! The ports through which the services reach AWS. Each has an SDK adapter
//! ([`crate::adapters::sdk`]) and an in-memory one ([`crate::adapters::memory`]).

use crate::error::{AccessPointError, GatewayError, QueueError, StoreError};
use crate::refresh_message::{RefreshMessage, WakeMessage};
use crate::scheduler::ShareState;
use crate::shares::{RefreshPlan, ShareKind};
use crate::window::{ChangeSet, CloseOutcome, OpenExpectation, RefreshLog, WindowItem};
use std::future::Future;

/// The per-bucket window items (DynamoDB). Each write is one conditional write,
/// applying the rule of the same name in [`crate::window`].
pub trait WindowStore: Send + Sync {
    /// The bucket's item, read consistently (a read, not a write).
    fn read(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<Option<WindowItem>, StoreError>> + Send;

    /// Adds `changes` to the window the joiner `seen` if it still takes joins and
    /// they fit beside what it holds and carries; `Ok(None)` if not.
    fn join(
        &self,
        bucket: &str,
        seen: &WindowItem,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<WindowItem>, StoreError>> + Send;

    /// Opens the window after `expected`, whose message is already on the queue;
    /// `Ok(None)` when the item is no longer as expected.
    fn open(
        &self,
        bucket: &str,
        expected: OpenExpectation,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> impl Future<Output = Result<Option<WindowItem>, StoreError>> + Send;

    /// Closes `generation` so no more events join it, and says what to refresh.
    fn close(
        &self,
        bucket: &str,
        generation: u64,
        now_ms: i64,
    ) -> impl Future<Output = Result<CloseOutcome, StoreError>> + Send;

    /// Records what a message's refreshes started and, for a window, that they all
    /// started (the rule [`crate::window::record_refresh`]).
    fn record_refresh(
        &self,
        bucket: &str,
        log: &RefreshLog,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The per-share scheduling items (DynamoDB, the same table as the windows). Each
/// change is a read, the rule applied in [`crate::scheduler`], and a write that
/// succeeds only if nobody wrote the item in between.
pub trait ShareStore: Send + Sync {
    /// The share's state, read consistently; `None` when it has none.
    fn read_share(
        &self,
        share_arn: &str,
    ) -> impl Future<Output = Result<Option<ShareState>, StoreError>> + Send;

    /// Stores `state` as version `state.version + 1` if the stored version is still
    /// `state.version` (0: no item); `Ok(false)` when another write came first.
    fn write_share(
        &self,
        state: &ShareState,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The action queue (SQS).
pub trait RefreshQueue: Send + Sync {
    /// Sends `message` with `DelaySeconds = delay_seconds`; returns the message id.
    fn send(
        &self,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> impl Future<Output = Result<String, QueueError>> + Send;
}

/// The refresher's way back onto the action queue, for a window that ends later than
/// SQS's 900-second delay reaches.
pub trait Requeue: Send + Sync {
    /// Sends `message` again, to the queue `source_arn` (the SQS record's
    /// `eventSourceARN`) when the adapter was not told its queue.
    fn requeue(
        &self,
        source_arn: Option<&str>,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> impl Future<Output = Result<String, QueueError>> + Send;

    /// Sends a share's wake-up, like [`Requeue::requeue`].
    fn wake(
        &self,
        source_arn: Option<&str>,
        message: &WakeMessage,
        delay_seconds: u32,
    ) -> impl Future<Output = Result<String, QueueError>> + Send;
}

/// `Describe{NFS,SMB}FileShares` takes at most 10 ARNs.
pub const DESCRIBE_BATCH: usize = 10;

/// A share as `ListFileShares` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSummary {
    pub arn: String,
    pub kind: ShareKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharePage {
    pub shares: Vec<ShareSummary>,
    pub next_marker: Option<String>,
}

/// A share as `Describe{NFS,SMB}FileShares` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedShare {
    pub arn: String,
    pub kind: ShareKind,
    pub gateway_arn: String,
    pub location_arn: String,
}

/// Storage Gateway.
pub trait FileGateway: Send + Sync {
    /// One page of every file share in the account and region, all gateways.
    fn list_file_shares(
        &self,
        marker: Option<&str>,
    ) -> impl Future<Output = Result<SharePage, GatewayError>> + Send;

    /// Describes at most [`DESCRIBE_BATCH`] shares of one kind.
    fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> impl Future<Output = Result<Vec<DescribedShare>, GatewayError>> + Send;

    /// Starts a refresh; returns its notification id.
    fn refresh_cache(
        &self,
        plan: &RefreshPlan,
    ) -> impl Future<Output = Result<String, GatewayError>> + Send;
}

/// An S3 access point, as S3 Control describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPoint {
    pub name: String,
    /// `NAME-…-s3alias`; empty when S3 Control did not say.
    pub alias: String,
    /// The bucket that the access point belongs to.
    pub bucket: String,
}

/// S3 Control's access points (`GetAccessPoint`, `ListAccessPoints`). Both calls go
/// to `region`, the access point's region, in `account`.
pub trait AccessPoints: Send + Sync {
    /// The access point `name`; `Ok(None)` when S3 Control says there is none.
    fn get_access_point(
        &self,
        account: &str,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<AccessPoint>, AccessPointError>> + Send;

    /// Every access point of the account in the region, all pages.
    fn list_access_points(
        &self,
        account: &str,
        region: &str,
    ) -> impl Future<Output = Result<Vec<AccessPoint>, AccessPointError>> + Send;
}

/// No S3 Control: every share on an access point is unresolvable (the refresher logs
/// and counts it). The default of [`crate::refresher::Refresher`], so that a refresher
/// built without [`crate::refresher::Refresher::with_access_points`] still refreshes
/// every bucket share.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAccessPoints;

impl AccessPoints for NoAccessPoints {
    async fn get_access_point(
        &self,
        _account: &str,
        _region: &str,
        _name: &str,
    ) -> Result<Option<AccessPoint>, AccessPointError> {
        Ok(None)
    }

    async fn list_access_points(
        &self,
        _account: &str,
        _region: &str,
    ) -> Result<Vec<AccessPoint>, AccessPointError> {
        Ok(Vec::new())
    }
}
