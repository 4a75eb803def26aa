//! Domain logic of s3-event-aggregator.
//!
//! The two Lambda binaries are thin: they read their configuration, build the AWS
//! clients and hand each invocation to [`aggregator::Aggregator`] or
//! [`refresher::Refresher`]. Everything those services decide lives here as plain
//! functions and types, and they reach AWS only through the traits in [`ports`], so
//! the same code runs in unit tests (with [`adapters::memory`]), in the simulation and
//! in production (with [`adapters::sdk`]).

pub mod access_points;
pub mod adapters;
pub mod aggregator;
pub mod clock;
pub mod config;
pub mod dispatcher;
pub mod error;
pub mod ingest;
mod json;
pub mod logging;
pub mod metrics;
pub mod ports;
pub mod refresh_message;
pub mod refresher;
pub mod s3_event;
pub mod scheduler;
pub mod shares;
#[cfg(feature = "aws")]
pub mod shutdown;
pub mod window;
