//! Adapters for the ports: the AWS SDK, and in-memory models for tests.

pub mod memory;
#[cfg(feature = "aws")]
pub mod sdk;
#[cfg(feature = "storagegateway")]
pub mod sdk_gateway;
