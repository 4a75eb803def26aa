//! The `aggregator` Lambda: S3 object events in, delayed refresh messages out.
//! All decisions live in `shared::aggregator`; this only wires it to the runtime.

use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::adapters::sdk::{load_aws_config, DynamoWindowStore, SqsRefreshQueue};
use shared::aggregator::Aggregator;
use shared::clock::{Clock, SystemClock};
use shared::config::{from_process_env, AggregatorConfig};
use shared::logging;
use shared::shutdown::on_shutdown;
use tracing::warn;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let config =
        AggregatorConfig::from_env(&from_process_env).unwrap_or_else(|e| logging::fail_init(&e));
    if let Err(e) = logging::init(config.common.log_level) {
        logging::fail_init(&e);
    }
    let aws = load_aws_config().await;
    let interval_ms = i64::from(config.metrics_interval_seconds) * 1000;
    let mut aggregator = Aggregator::new(
        DynamoWindowStore::from_config(&aws, &config.common.table_name),
        SqsRefreshQueue::from_config(&aws, &config.queue_url),
        SystemClock,
        config.refresh_delay_seconds,
    )
    .with_metrics_interval_ms(interval_ms);
    // Metric lines may wait in the container only if they are written at its shutdown.
    if interval_ms > 0 {
        let metrics = aggregator.metrics_buffer();
        if let Err(e) =
            on_shutdown(move || async move { metrics.flush(SystemClock.now_ms()) }).await
        {
            warn!(error = %e, "Writing each invocation's metric lines");
            aggregator = aggregator.with_metrics_interval_ms(0);
        }
    }
    let aggregator = &aggregator;
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        aggregator
            .handle(&event.payload)
            .await
            .map(|report| report.into_response())
    }))
    .await
}
