//! Test support for s3-event-aggregator: the Storage Gateway stand-in, the Lambda
//! Runtime API harness, moto, AWS resources on moto, and the whole stack assembled.

pub mod aws;
pub mod bucket_model;
pub mod counting_proxy;
pub mod moto;
pub mod runtime_api;
pub mod s3control;
pub mod sgw_standin;
pub mod stack;
