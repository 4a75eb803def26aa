//! Adapters for the ports: the AWS SDK, and in-memory models for tests.

pub mod memory;
pub mod regional;
#[cfg(feature = "aws")]
pub mod sdk;
#[cfg(feature = "storagegateway")]
pub mod sdk_gateway;
#[cfg(feature = "storagegateway")]
pub mod sdk_s3control;
#[cfg(feature = "aws")]
pub mod sdk_shares;
