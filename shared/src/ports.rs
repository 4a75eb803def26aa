//! The ports through which the services reach AWS. Each has an SDK adapter
//! ([`crate::adapters::sdk`]) and an in-memory one ([`crate::adapters::memory`]).

use crate::error::{GatewayError, QueueError, StoreError};
use crate::refresh_message::RefreshMessage;
use crate::shares::{RefreshPlan, ShareKind};
use crate::window::{ChangeSet, CloseOutcome, RefreshLog, WindowView};
use std::future::Future;

/// The per-bucket window items (DynamoDB). Each method is one conditional write,
/// applying the rule of the same name in [`crate::window`].
pub trait WindowStore: Send + Sync {
    /// Adds `changes` to the bucket's open window; `Ok(None)` when no window is open.
    fn join(
        &self,
        bucket: &str,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<WindowView>, StoreError>> + Send;

    /// Opens the bucket's next window; `Ok(None)` when a window is still open.
    fn open(
        &self,
        bucket: &str,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> impl Future<Output = Result<Option<WindowView>, StoreError>> + Send;

    /// Records that the message for `generation` is on the queue.
    fn mark_sent(
        &self,
        bucket: &str,
        generation: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

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

/// The action queue (SQS).
pub trait RefreshQueue: Send + Sync {
    /// Sends `message` with `DelaySeconds = delay_seconds`; returns the message id.
    fn send(
        &self,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> impl Future<Output = Result<String, QueueError>> + Send;
}

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

    /// Describes at most [`crate::refresher::DESCRIBE_BATCH`] shares of one kind.
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
