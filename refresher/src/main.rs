//! The `refresher` Lambda: refresh messages in, `RefreshCache` calls out, with an SQS
//! partial batch response. All decisions live in `shared::refresher`.

use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::adapters::sdk::{
    load_aws_config, DynamoWindowStore, SdkAccessPoints, SdkFileGateway, SqsRequeue,
};
use shared::clock::SystemClock;
use shared::config::{from_process_env, RefresherConfig};
use shared::logging;
use shared::refresher::{Refresher, DEFAULT_CLOCK_MARGIN_MS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let config =
        RefresherConfig::from_env(&from_process_env).unwrap_or_else(|e| logging::fail_init(&e));
    if let Err(e) = logging::init(config.common.log_level) {
        logging::fail_init(&e);
    }
    let aws = load_aws_config().await;
    // GATEWAY_REGIONS, or the function's own region: one Storage Gateway client each.
    let regions = config
        .gateway_regions_or(aws.region().map(|r| r.as_ref()))
        .unwrap_or_else(|e| logging::fail_init(&e));
    // The share map lives in this value, so warm invocations reuse it.
    let refresher = Refresher::new(
        DynamoWindowStore::from_config(&aws, &config.common.table_name),
        SdkFileGateway::for_regions(&aws, &regions),
        // Windows longer than SQS's 900-second delay go back to the queue they came from.
        SqsRequeue::from_config(&aws),
        SystemClock,
    )
    // Shares on S3 access points: S3 Control says which bucket each one maps.
    .with_access_points(SdkAccessPoints::from_config(&aws))
    .with_pace(config.min_refresh_interval_seconds, DEFAULT_CLOCK_MARGIN_MS);
    let refresher = &refresher;
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        // Lambda's deadline (epoch ms): no call is started that could not be recorded.
        let deadline_ms = i64::try_from(event.context.deadline).unwrap_or(0);
        refresher.handle_until(&event.payload, deadline_ms).await
    }))
    .await
}
