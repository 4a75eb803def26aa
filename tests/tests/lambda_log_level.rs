//! Lambda's own logging controls through the compiled binaries: the application log
//! level of the function's logging configuration reaches the function as
//! `AWS_LAMBDA_LOG_LEVEL`. `RUST_LOG` > `LOG_LEVEL` > `AWS_LAMBDA_LOG_LEVEL` > INFO.

use integration_tests::aws::BoxError;
use integration_tests::runtime_api::{LambdaProcess, LambdaSpawn};
use integration_tests::stack::{binary, Stack, StackOptions};
use serde_json::Value;
use std::time::Duration;

const SKIP_LINE: &str = "within refresh window, skipping";

/// Runs the aggregator on two events of one bucket with `env` (and no `LOG_LEVEL`
/// unless `env` has one); returns its output lines.
async fn aggregator_lines(env: &[(&str, &str)]) -> Result<Vec<String>, BoxError> {
    let stack = Stack::start(StackOptions {
        log_level: String::new(),
        extra_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("alc").await?;
    for key in ["a", "b"] {
        stack.clients.put_object(&bucket, key).await?;
    }
    let events = stack.collect_s3_events(3).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert_eq!(feed.total("windowsJoined"), 1, "{env:?}");
    Ok(stack.aggregator.output_lines())
}

fn has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

#[tokio::test]
async fn aws_lambda_log_level_applies_below_log_level_and_rust_log() -> Result<(), BoxError> {
    const JSON: (&str, &str) = ("AWS_LAMBDA_LOG_FORMAT", "JSON");
    // (environment, the INFO decision line printed)
    for (env, expect_info) in [
        (vec![JSON, ("AWS_LAMBDA_LOG_LEVEL", "WARN")], false),
        (vec![JSON, ("AWS_LAMBDA_LOG_LEVEL", "INFO")], true),
        (vec![JSON, ("AWS_LAMBDA_LOG_LEVEL", "DEBUG")], true),
        // The function's own LOG_LEVEL wins over the logging configuration's level.
        (
            vec![
                JSON,
                ("AWS_LAMBDA_LOG_LEVEL", "DEBUG"),
                ("LOG_LEVEL", "WARN"),
            ],
            false,
        ),
        (
            vec![
                JSON,
                ("AWS_LAMBDA_LOG_LEVEL", "WARN"),
                ("LOG_LEVEL", "INFO"),
            ],
            true,
        ),
        // RUST_LOG wins over both.
        (
            vec![
                JSON,
                ("AWS_LAMBDA_LOG_LEVEL", "ERROR"),
                ("LOG_LEVEL", "ERROR"),
                ("RUST_LOG", "aggregator=info,shared=info"),
            ],
            true,
        ),
    ] {
        let lines = aggregator_lines(&env).await?;
        assert_eq!(has(&lines, SKIP_LINE), expect_info, "{env:?}: {lines:#?}");
        // Every line of ours is JSON with a level Lambda can filter on.
        for line in lines.iter().filter(|l| !l.starts_with("{\"_aws\"")) {
            let parsed: Value = serde_json::from_str(line)
                .map_err(|e| format!("{env:?}: not JSON ({e}): {line}"))?;
            assert!(parsed["level"].is_string(), "{env:?}: {line}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_application_level_above_info_is_called_out_once() -> Result<(), BoxError> {
    // Lambda counts the EMF lines (no "level") as INFO and drops them at WARN.
    let lines = aggregator_lines(&[
        ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
        ("AWS_LAMBDA_LOG_LEVEL", "WARN"),
    ])
    .await?;
    let called_out: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("drops the EMF metric lines"))
        .collect();
    assert_eq!(called_out.len(), 1, "{lines:#?}");
    let parsed: Value = serde_json::from_str(called_out[0])?;
    assert_eq!(parsed["level"], "ERROR");
    // Text mode: Lambda filters nothing, nothing to say.
    let lines = aggregator_lines(&[("AWS_LAMBDA_LOG_LEVEL", "WARN")]).await?;
    assert!(!has(&lines, "drops the EMF metric lines"), "{lines:#?}");
    assert!(!has(&lines, SKIP_LINE), "{lines:#?}");
    Ok(())
}

#[tokio::test]
async fn a_malformed_aws_lambda_log_level_stops_both_functions_at_init() -> Result<(), BoxError> {
    for (name, function) in [
        ("aggregator", "S3EventAggregator"),
        ("refresher", "S3EventAggregatorRefresher"),
    ] {
        for bad in ["WARNING", "verbose", "5"] {
            let path = binary(name)?;
            let mut spec = LambdaSpawn::new(&path, function)
                .env("AWS_REGION", "us-east-1")
                .env("AWS_LAMBDA_LOG_LEVEL", bad)
                .env("LOG_LEVEL", "INFO");
            if name == "aggregator" {
                spec = spec.env(
                    "QUEUE_URL",
                    "https://sqs.us-east-1.amazonaws.com/123456789012/q",
                );
            }
            let process = LambdaProcess::spawn(spec).await?;
            let outcome = process.wait_for_init_error(Duration::from_secs(10)).await?;
            assert!(outcome.failed(), "{name} {bad:?} must stop at init");
            let named: Vec<&String> = outcome
                .output
                .iter()
                .filter(|l| l.contains("AWS_LAMBDA_LOG_LEVEL"))
                .collect();
            assert_eq!(named.len(), 1, "{name} {bad:?}: {:?}", outcome.output);
            assert!(
                named[0].contains(&format!("{bad:?}"))
                    && named[0].contains("TRACE, DEBUG, INFO, WARN, ERROR, FATAL"),
                "{name}: {}",
                named[0]
            );
        }
    }
    Ok(())
}
