//! Errors of the ports, classified into "retry later" and "never going to work".

use thiserror::Error;

/// Whether a failed step is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Throttling, 5xx, timeouts, connection errors: retry later.
    Later,
    /// Access denied, missing resource, invalid request: retrying the same call will
    /// fail again. It is still reported as a failure so the work ends in a DLQ.
    Never,
}

/// A DynamoDB (window store) failure other than a failed condition.
#[derive(Debug, Error)]
#[error("window store: {message}")]
pub struct StoreError {
    pub retry: Retry,
    pub message: String,
}

/// An SQS (refresh queue) failure.
#[derive(Debug, Error)]
#[error("refresh queue: {message}")]
pub struct QueueError {
    pub retry: Retry,
    pub message: String,
}

/// A Storage Gateway failure.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The file share no longer exists (deleted, or recreated under another ARN).
    #[error("file share not found: {share_arn}: {message}")]
    ShareNotFound { share_arn: String, message: String },
    /// The gateway refused the call for now: two refreshes already in flight on the
    /// share, gateway busy or offline. Retry later; the share still exists.
    #[error("gateway busy: {message}")]
    Busy { message: String },
    /// Any other failure.
    #[error("gateway: {message}")]
    Other { retry: Retry, message: String },
}

impl GatewayError {
    pub fn retry(&self) -> Retry {
        match self {
            GatewayError::ShareNotFound { .. } | GatewayError::Busy { .. } => Retry::Later,
            GatewayError::Other { retry, .. } => *retry,
        }
    }
}

/// An S3 Control (access point) failure. "The access point does not exist" is not an
/// error: the port answers `Ok(None)` for it.
#[derive(Debug, Error)]
#[error("S3 Control: {message}")]
pub struct AccessPointError {
    pub retry: Retry,
    pub message: String,
}
